//! image-build: builds the steelcup appliance from a manifest.
//!
//! # Design
//! Inputs: the manifest (`steelcup.toml`: host kernel package, modules,
//! guest busybox, units directory), the static binaries (`init`, `vminit`,
//! `vmmd`, `vmm-worker`, `cup`), the guest kernel, and the host kernel package unpacked.
//! Outputs: the host initramfs (a cpio newc archive written by our own
//! writer, zstd-compressed), the host kernel, a PXE set (kernel, initramfs, iPXE script), and
//! `manifest.json` listing every file with its size and sha256. Every entry is
//! written in path order with mtime 0, uid/gid 0 and fixed modes, so the same
//! inputs give the same bytes.
//!
//! # Limitations
//! The disk image is still to come.

pub mod admin;
pub mod disk;
pub mod manifest;
pub mod modules;
pub mod tree;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tree::Tree;

/// Inputs that are build products rather than part of the manifest.
#[derive(Debug, Clone)]
pub struct Inputs {
    pub manifest: PathBuf,
    /// Directory with the static `init`, `vminit`, `vmmd`, `vmm-worker`, `cup`.
    pub bin_dir: PathBuf,
    /// The guest kernel (bzImage).
    pub guest_kernel: PathBuf,
    /// The host kernel package unpacked (`boot/vmlinuz-*`, `lib/modules/*`).
    pub host_kernel_root: PathBuf,
    pub out: PathBuf,
    /// More files for the host initramfs, as (path in the image, source
    /// file): the test image's disk images.
    pub extra_files: Vec<(String, PathBuf)>,
}

/// One artifact in `manifest.json`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct FileEntry {
    pub size: u64,
    pub sha256: String,
}

/// `manifest.json`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ArtifactManifest {
    pub kernel_release: String,
    /// Host kernel + initramfs: what a machine boots.
    pub image_bytes: u64,
    pub artifacts: BTreeMap<String, FileEntry>,
    /// Every file inside the host initramfs.
    pub initramfs: BTreeMap<String, FileEntry>,
}

fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("read {}", path.display()))
}

/// The host kernel's release: the one directory under `lib/modules`.
pub fn kernel_release(root: &Path) -> Result<String> {
    let dir = root.join("lib/modules");
    let mut found: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("read {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("kernel").is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    found.sort();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("{}: no kernel modules found", dir.display()),
        many => bail!(
            "{}: more than one kernel: {}",
            dir.display(),
            many.join(", ")
        ),
    }
}

/// A static busybox at `bin/busybox` with a symlink per applet.
fn add_busybox(t: &mut Tree, busybox: &Path, applets: &[String]) -> Result<()> {
    t.file("bin/busybox", 0o755, read(busybox)?)?;
    for applet in applets {
        t.symlink(&format!("bin/{applet}"), "busybox")?;
    }
    Ok(())
}

/// The mount points an init expects, and the device nodes the kernel needs
/// before devtmpfs is mounted (`/dev/console` for init's stdio).
fn add_base(t: &mut Tree, dirs: &[&str]) -> Result<()> {
    for d in dirs {
        t.dir(d, 0o755)?;
    }
    t.char_dev("dev/console", 0o600, 5, 1)?;
    t.char_dev("dev/null", 0o666, 1, 3)?;
    Ok(())
}

/// A Debian program of the build machine and the shared libraries `ldd`
/// says it loads (with the loader), by the paths the loader asks for.
pub fn program_files(program: &Path) -> Result<Vec<PathBuf>> {
    let out = std::process::Command::new("ldd")
        .arg(program)
        .output()
        .with_context(|| format!("run ldd {}", program.display()))?;
    if !out.status.success() {
        bail!(
            "ldd {}: {}",
            program.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut files = vec![program.to_path_buf()];
    files.extend(
        shared_libraries(&String::from_utf8_lossy(&out.stdout))
            .with_context(|| format!("ldd {}", program.display()))?,
    );
    Ok(files)
}

/// A dynamically linked program at its own path, with every shared
/// library `ldd` says it loads (and the loader) at theirs.
fn add_program(t: &mut Tree, program: &Path) -> Result<()> {
    let files = program_files(program)?;
    for f in files {
        let path = f.to_string_lossy();
        // Executable as on the build machine: the kernel execs the
        // loader, which must be.
        let exec = std::fs::metadata(&f)
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0)
            .unwrap_or(false);
        let mode = if exec || f == program { 0o755 } else { 0o644 };
        // The file's content at the path the loader asks for (symlinks
        // followed on the build machine).
        t.file(path.trim_start_matches('/'), mode, read(&f)?)?;
    }
    Ok(())
}

/// The absolute paths in `ldd` output: `libx.so.1 => /lib/.../libx.so.1
/// (0x...)` and the loader's `/lib64/ld-linux-x86-64.so.2 (0x...)`.
fn shared_libraries(ldd: &str) -> Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for line in ldd.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.contains("not found") {
            bail!("a library is missing: {line}");
        }
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    libs.sort();
    libs.dedup();
    Ok(libs)
}

/// Builds the guest's default initramfs: vminit as `/init` and busybox.
pub fn guest_initramfs(inputs: &Inputs, m: &manifest::Manifest) -> Result<Vec<u8>> {
    let mut t = Tree::default();
    t.file("init", 0o755, read(&inputs.bin_dir.join("vminit"))?)?;
    add_busybox(&mut t, &m.guest.busybox, &m.guest.applets)?;
    add_base(&mut t, &["dev", "proc", "sys", "run", "tmp", "etc", "root"])?;
    t.to_cpio()
}

/// Builds everything into `inputs.out` and returns the manifest.
pub fn build(inputs: &Inputs) -> Result<ArtifactManifest> {
    let m = manifest::Manifest::load(&inputs.manifest)?;
    let release = kernel_release(&inputs.host_kernel_root)?;
    let mods_root = inputs.host_kernel_root.join("lib/modules").join(&release);

    let mut t = Tree::default();
    t.file("init", 0o755, read(&inputs.bin_dir.join("init"))?)?;
    for b in ["vmmd", "vmm-worker", "cup"] {
        t.file(
            &format!("usr/bin/{b}"),
            0o755,
            read(&inputs.bin_dir.join(b))?,
        )?;
    }
    t.file(
        "usr/lib/steelcup/guest/vmlinuz",
        0o644,
        read(&inputs.guest_kernel)?,
    )?;
    t.file(
        "usr/lib/steelcup/guest/initramfs.cpio",
        0o644,
        guest_initramfs(inputs, &m)?,
    )?;

    // Host modules: the closure of what is loaded and shipped, and its modules.dep.
    let index = modules::ModuleIndex::scan(&mods_root)?;
    let mut wanted: Vec<String> = m.host.modules.clone();
    wanted.extend(m.host.ship.iter().cloned());
    let closure = index.closure(&wanted)?;
    let mut dep = String::new();
    for (name, entry) in &closure {
        t.file(
            &format!("lib/modules/{release}/{}", entry.path),
            0o644,
            read(&mods_root.join(&entry.path))?,
        )?;
        let deps: Vec<&str> = entry
            .all_deps
            .iter()
            .map(|d| closure[d].path.as_str())
            .collect();
        dep.push_str(&format!("{}: {}\n", entry.path, deps.join(" ")).replace(": \n", ":\n"));
        let _ = name;
    }
    t.file(
        &format!("lib/modules/{release}/modules.dep"),
        0o644,
        dep.into_bytes(),
    )?;
    let names: Vec<&String> = closure.keys().collect();
    t.file(
        &format!("lib/modules/{release}/modules.alias"),
        0o644,
        index.aliases(&names)?.into_bytes(),
    )?;
    for f in ["modules.builtin", "modules.order"] {
        let p = mods_root.join(f);
        if p.exists() {
            t.file(&format!("lib/modules/{release}/{f}"), 0o644, read(&p)?)?;
        }
    }

    // Configuration.
    let mut modules_list = String::from("# Loaded by init at boot (phase `modules`).\n");
    for m in &m.host.modules {
        modules_list.push_str(m);
        modules_list.push('\n');
    }
    t.file("etc/steelcup/modules", 0o644, modules_list.into_bytes())?;
    t.file(
        "etc/steelcup/hostname",
        0o644,
        format!("{}\n", m.host.hostname).into_bytes(),
    )?;
    if let Some(path) = &m.host.machine_config {
        // Checked as init will check it at first boot.
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read the machine config {}", path.display()))?;
        steelcup_os::provision::check(&path.display().to_string(), &text)?;
        t.file("etc/steelcup/machine.toml", 0o644, text.into_bytes())?;
    }
    if let Some(path) = &m.host.update_key {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read the update key {}", path.display()))?;
        steelcup_os::update::parse_key(&text)
            .map_err(|e| anyhow::anyhow!("the update key {}: {e}", path.display()))?;
        t.file(
            "etc/steelcup/update.pub",
            0o644,
            format!("{}\n", text.trim()).into_bytes(),
        )?;
    }
    let mut units: BTreeMap<String, PathBuf> = BTreeMap::new();
    for dir in std::iter::once(&m.units.dir).chain(&m.units.extra) {
        for e in
            std::fs::read_dir(dir).with_context(|| format!("read units from {}", dir.display()))?
        {
            let p = e?.path();
            if p.extension().is_some_and(|e| e == "toml") {
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                units.insert(name, p);
            }
        }
    }
    // A unit that would be refused at boot is refused at build time: each
    // file as init reads it, then the set's dependency graph.
    let mut parsed = Vec::new();
    for u in units.values() {
        let text = steelcup_units::read_unit_file(u)?;
        parsed.push(steelcup_units::parse(u, &text)?);
    }
    let plan = steelcup_units::graph::plan(&parsed);
    if let Some((name, why)) = plan.refused.iter().next() {
        anyhow::bail!("unit {name} would be refused at boot: {why}");
    }
    for u in units.values() {
        let text = steelcup_units::read_unit_file(u)?;
        let name = u.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        t.file(
            &format!("etc/steelcup/units/{name}"),
            0o644,
            text.into_bytes(),
        )?;
    }
    if let Some(busybox) = &m.host.busybox {
        add_busybox(&mut t, busybox, &m.host.busybox_applets)?;
    }
    for program in &m.host.programs {
        add_program(&mut t, program)?;
    }
    for f in &m.host.files {
        let path = f.to_string_lossy();
        t.file(path.trim_start_matches('/'), 0o644, read(f)?)?;
    }
    for (path, source) in &inputs.extra_files {
        // Executables stay executable (0755); everything else is 0644.
        let exec = std::fs::metadata(source)
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0)
            .unwrap_or(false);
        let mode = if exec { 0o755 } else { 0o644 };
        t.file(path.trim_start_matches('/'), mode, read(source)?)?;
    }
    add_base(&mut t, &["dev", "proc", "sys", "run", "tmp", "var", "root"])?;

    let initramfs_files = t.digests();
    // zstd: the Debian kernel unpacks it (CONFIG_RD_ZSTD); level 9 keeps
    // the build fast and the image well under budget.
    let initramfs = zstd::bulk::compress(&t.to_cpio()?, 9).context("compress the initramfs")?;
    let vmlinuz = read(
        &inputs
            .host_kernel_root
            .join(format!("boot/vmlinuz-{release}")),
    )?;

    std::fs::create_dir_all(inputs.out.join("pxe"))
        .with_context(|| format!("create {}", inputs.out.display()))?;
    let ipxe = format!(
        "#!ipxe\n# steelcup PXE boot: kernel, initramfs, command line.\nkernel vmlinuz {}\ninitrd initramfs.cpio.zst\nboot\n",
        m.host.cmdline
    );
    let outputs: [(&str, &[u8]); 6] = [
        ("vmlinuz", &vmlinuz),
        ("initramfs.cpio.zst", &initramfs),
        ("cmdline", m.host.cmdline.as_bytes()),
        ("pxe/vmlinuz", &vmlinuz),
        ("pxe/initramfs.cpio.zst", &initramfs),
        ("pxe/boot.ipxe", ipxe.as_bytes()),
    ];
    let mut artifacts = BTreeMap::new();
    for (name, data) in outputs {
        let path = inputs.out.join(name);
        std::fs::write(&path, data).with_context(|| format!("write {}", path.display()))?;
        artifacts.insert(
            name.to_string(),
            FileEntry {
                size: data.len() as u64,
                sha256: sha256(data),
            },
        );
    }
    let manifest = ArtifactManifest {
        kernel_release: release,
        image_bytes: (vmlinuz.len() + initramfs.len()) as u64,
        artifacts,
        initramfs: initramfs_files,
    };
    let json = serde_json::to_string_pretty(&manifest)?;
    std::fs::write(inputs.out.join("manifest.json"), json + "\n")
        .with_context(|| "write manifest.json".to_string())?;
    Ok(manifest)
}

pub(crate) fn digest(data: &[u8]) -> FileEntry {
    FileEntry {
        size: data.len() as u64,
        sha256: sha256(data),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ldd_output_gives_the_libraries_and_the_loader() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibnftables.so.1 => /lib/x86_64-linux-gnu/libnftables.so.1 (0x00007f)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        let libs = super::shared_libraries(ldd).unwrap();
        assert_eq!(
            libs,
            [
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib/x86_64-linux-gnu/libnftables.so.1",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(std::path::PathBuf::from)
        );
        assert!(super::shared_libraries("\tlibx.so.1 => not found\n").is_err());
    }
}
