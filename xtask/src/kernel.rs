//! The guest kernel build (from `kernel/guest/*.config`) and the host kernel
//! package, both cached.

use crate::sh::{self, cache_dir, step};
use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Bump when the build recipe below changes in a way that changes the output.
const RECIPE: &str = "tinyconfig+fragments+olddefconfig+bzImage+vmlinux v2";
const SOURCE_PKG: &str = "linux-source-6.1";
const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";

fn package_version(pkg: &str) -> Result<String> {
    Ok(
        sh::output(Command::new("dpkg-query").args(["-W", "-f=${Version}", pkg]))?
            .trim()
            .to_string(),
    )
}

fn fragments() -> Result<Vec<PathBuf>> {
    let dir = sh::root().join("kernel/guest");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "config"))
        .collect();
    v.sort();
    Ok(v)
}

/// The cache key: fragments, kernel source version, recipe.
pub fn guest_kernel_hash() -> Result<String> {
    let mut h = Sha256::new();
    h.update(RECIPE);
    h.update(package_version(SOURCE_PKG)?);
    for f in fragments()? {
        h.update(
            f.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        h.update(std::fs::read(&f)?);
    }
    Ok(hex::encode(h.finalize())[..16].to_string())
}

/// What the fragments ask for: `CONFIG_X=v` lines and `# CONFIG_X is not set`.
pub fn requested_options(text: &str) -> Vec<(String, Option<String>)> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            if let Some(rest) = l
                .strip_prefix("# ")
                .and_then(|r| r.strip_suffix(" is not set"))
            {
                return rest
                    .starts_with("CONFIG_")
                    .then(|| (rest.to_string(), None));
            }
            let (k, v) = l.split_once('=')?;
            k.starts_with("CONFIG_")
                .then(|| (k.to_string(), Some(v.to_string())))
        })
        .collect()
}

/// Every requested option must have survived `make olddefconfig`.
pub fn check_config(fragments: &[PathBuf], config: &str) -> Result<()> {
    let mut lost = Vec::new();
    for f in fragments {
        let text = std::fs::read_to_string(f)?;
        for (k, v) in requested_options(&text) {
            let line = config.lines().find(|l| l.starts_with(&format!("{k}=")));
            let ok = match (&v, line) {
                (Some(v), Some(l)) => l == format!("{k}={v}"),
                (Some(_), None) => false,
                (None, Some(l)) => l.ends_with("=n"),
                (None, None) => true,
            };
            if !ok {
                let name = f
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                lost.push(format!(
                    "{name}: {k}{} but .config has {}",
                    v.as_ref()
                        .map(|v| format!("={v}"))
                        .unwrap_or_else(|| " unset".into()),
                    line.unwrap_or("it unset")
                ));
            }
        }
    }
    if !lost.is_empty() {
        bail!(
            "guest kernel options did not survive olddefconfig (unmet dependencies?):\n  {}",
            lost.join("\n  ")
        );
    }
    Ok(())
}

/// The guest kernel as an uncompressed ELF `vmlinux` with its PVH entry
/// (the form Firecracker and Cloud Hypervisor boot), from the same build
/// as [`guest_kernel`]'s bzImage.
pub fn guest_vmlinux() -> Result<PathBuf> {
    let image = guest_kernel()?;
    Ok(image.with_file_name("vmlinux"))
}

/// Builds the guest kernel if the cache lacks it; returns the bzImage path
/// (its `vmlinux` lies beside it).
pub fn guest_kernel() -> Result<PathBuf> {
    let hash = guest_kernel_hash()?;
    let dir = cache_dir().join("kernel").join(&hash);
    let image = dir.join("bzImage");
    if image.exists() {
        eprintln!("guest kernel: cached ({})", image.display());
        return Ok(image);
    }
    let version = package_version(SOURCE_PKG)?;
    let src = cache_dir().join("linux-src").join(&version);
    if !src.join("Makefile").exists() {
        step(&format!("unpacking {SOURCE_TARBALL}"));
        let tmp = src.with_extension("partial");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        sh::run(
            Command::new("tar")
                .args(["xf", SOURCE_TARBALL, "--strip-components=1", "-C"])
                .arg(&tmp),
        )?;
        let _ = std::fs::remove_dir_all(&src);
        std::fs::rename(&tmp, &src)?;
    }
    let build = cache_dir().join("kernel-build").join(&hash);
    std::fs::create_dir_all(&build)?;
    let make = |args: &[&str]| {
        let mut c = Command::new("make");
        c.arg("-C")
            .arg(&src)
            .arg(format!("O={}", build.display()))
            .args(args);
        c
    };
    step(&format!("configuring the guest kernel ({hash})"));
    sh::run(make(&["-s", "tinyconfig"]).stdout(Stdio::null()))?;
    let frags = fragments()?;
    sh::run(
        Command::new(src.join("scripts/kconfig/merge_config.sh"))
            .current_dir(&build)
            .args(["-m", "-O"])
            .arg(&build)
            .arg(build.join(".config"))
            .args(&frags)
            .stdout(Stdio::null()),
    )?;
    sh::run(make(&["-s", "olddefconfig"]).stdout(Stdio::null()))?;
    let config = std::fs::read_to_string(build.join(".config"))?;
    check_config(&frags, &config)?;

    let jobs = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    step(&format!(
        "building the guest kernel with {jobs} jobs (about 3-5 minutes on 2 cores)"
    ));
    let t0 = Instant::now();
    let mut child = make(&[&format!("-j{jobs}"), "bzImage"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("start make")?;
    let out = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("no make stdout"))?;
    let mut compiled = 0usize;
    let mut last = Instant::now();
    for line in BufReader::new(out).lines().map_while(Result::ok) {
        if line.trim_start().starts_with("CC") {
            compiled += 1;
        }
        if last.elapsed() > Duration::from_secs(15) {
            eprintln!(
                "  guest kernel: {compiled} files compiled, {}",
                sh::elapsed(t0)
            );
            last = Instant::now();
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!(
            "guest kernel build failed ({status}); build tree: {}",
            build.display()
        );
    }
    std::fs::create_dir_all(&dir)?;
    let tmp = dir.join("bzImage.partial");
    std::fs::copy(build.join("arch/x86/boot/bzImage"), &tmp)?;
    std::fs::copy(build.join("vmlinux"), dir.join("vmlinux"))?;
    std::fs::copy(build.join(".config"), dir.join("config"))?;
    std::fs::rename(&tmp, &image)?;
    let _ = std::fs::remove_dir_all(&build);
    eprintln!(
        "guest kernel: built in {} ({} bytes)",
        sh::elapsed(t0),
        std::fs::metadata(&image)?.len()
    );
    Ok(image)
}

/// Downloads and unpacks the host kernel package the manifest names (a
/// metapackage such as `linux-image-amd64` resolves to its kernel); returns
/// the unpacked root.
pub fn host_kernel(package: &str) -> Result<PathBuf> {
    let resolve = || -> Result<(String, String)> {
        let deps = sh::output(Command::new("apt-cache").args(["depends", package]))?;
        let real = deps
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .find(|d| d.starts_with("linux-image-"))
            .unwrap_or(package)
            .trim()
            .to_string();
        let policy = sh::output(Command::new("apt-cache").args(["policy", &real]))?;
        let candidate = policy
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Candidate: "))
            .next()
            .filter(|c| *c != "(none)")
            .ok_or_else(|| anyhow!("no candidate version of {real}"))?
            .to_string();
        Ok((real, candidate))
    };
    let (real, version) = match resolve() {
        Ok(r) => r,
        Err(_) => {
            crate::deps::apt_update()?;
            resolve().with_context(|| format!("resolve Debian package {package}"))?
        }
    };
    let base = cache_dir()
        .join("host-kernel")
        .join(format!("{real}_{version}"));
    let root = base.join("root");
    if root.join("boot").exists() {
        eprintln!("host kernel: cached {real} {version}");
        return Ok(root);
    }
    step(&format!("downloading {real} {version}"));
    std::fs::create_dir_all(&base)?;
    let download = || {
        sh::run(
            Command::new("apt-get")
                .args(["download", "-q"])
                .arg(format!("{real}={version}"))
                .current_dir(&base),
        )
    };
    if download().is_err() {
        crate::deps::apt_update()?;
        download()?;
    }
    let deb = std::fs::read_dir(&base)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| anyhow!("apt-get download left no .deb in {}", base.display()))?;
    let tmp = base.join("root.partial");
    let _ = std::fs::remove_dir_all(&tmp);
    sh::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp))?;
    std::fs::rename(&tmp, &root)?;
    let _ = std::fs::remove_file(&deb);
    Ok(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_set_and_unset_options() {
        let o = requested_options(
            "# comment\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=\"x\"\nnoise\n",
        );
        assert_eq!(
            o,
            vec![
                ("CONFIG_A".into(), Some("y".into())),
                ("CONFIG_B".into(), None),
                ("CONFIG_C".into(), Some("\"x\"".into())),
            ]
        );
    }

    #[test]
    fn check_names_lost_options() {
        let dir = std::env::temp_dir().join(format!("xtask-kcheck-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("10-x.config");
        std::fs::write(&f, "CONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\n").unwrap();
        assert!(check_config(std::slice::from_ref(&f), "CONFIG_A=y\nCONFIG_B=y\n").is_ok());
        let err = check_config(std::slice::from_ref(&f), "CONFIG_A=y\nCONFIG_C=y\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("10-x.config: CONFIG_B=y"), "{err}");
        assert!(err.contains("CONFIG_C unset"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
