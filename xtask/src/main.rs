//! `cargo xtask`: steelcup's two set-up commands and the benchmarks.
//!
//! - `cargo xtask run [--once]`: install what is missing, build the guest
//!   kernel (cached), the static binaries and the appliance image, boot it in
//!   QEMU with the example units from `configs/`, and show the console. With
//!   `--once`, or when stdin is not a terminal, press the appliance's power
//!   button once the example workloads have finished and exit 0.
//! - `cargo xtask test`: unit tests, then the QEMU end-to-end tests;
//!   `--qemu NAME` builds and runs only `qemu-tests/tests/NAME.rs`.
//! - `cargo xtask bench`: boot measurements, written to `docs/performance.md`.
//! - `cargo xtask build`: just build the appliance into `target/steelcup/artifacts`.

mod bench_http;
mod bench_image;
mod bench_init;
mod bench_vmm;
mod deps;
mod kernel;
mod sh;

use anyhow::{bail, Context, Result};
use qemu_tests::{Guest, GuestConfig};
use sh::step;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub const TARGET: &str = "x86_64-unknown-linux-gnu";
const STATIC_BINS: &[&str] = &["init", "vminit", "vmmd", "vmm-worker", "cup"];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") => run(args.iter().any(|a| a == "--once")),
        Some("test") => match args.iter().position(|a| a == "--qemu") {
            Some(i) => match args.get(i + 1) {
                Some(name) => test_qemu_only(name),
                None => Err(anyhow::anyhow!(
                    "--qemu needs the name of a file in qemu-tests/tests, like disk"
                )),
            },
            None => test(),
        },
        Some("bench") if args.iter().any(|a| a == "--init-only") => bench_init_only(),
        Some("bench") if args.iter().any(|a| a == "--image-only") => bench_image_only(),
        Some("bench") if args.iter().any(|a| a == "--vmm-only") => bench_vmm_only(),
        Some("bench") if args.iter().any(|a| a == "--http-only") => bench_http_only(),
        Some("bench") => bench(),
        Some("build") => build().map(|_| ()),
        Some("disk") => disk().map(|_| ()),
        Some("update-key") => update_key(args.get(1).map(String::as_str)),
        Some("admin-certs") => admin_certs(&args[1..]),
        _ => {
            eprintln!(
                "usage: cargo xtask run [--once] | test [--qemu NAME] | bench [--init-only|--image-only|--vmm-only|--http-only] | build | disk | update-key DIR | admin-certs DIR HOST..."
            );
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("\x1b[1;31merror:\x1b[0m {e:#}");
        std::process::exit(1);
    }
}

/// Builds everything; returns the artifacts directory.
/// `cargo xtask disk`: the appliance as a flashable disk image (GPT, ESP
/// with GRUB, OS slots A and B, state; docs/disk-image.md) in
/// `target/steelcup/disk`: `disk.img`, `disk.qcow2` and the update file
/// `slot.img`.
fn disk() -> Result<PathBuf> {
    let artifacts = build()?;
    disk_image(&artifacts)
}

/// `cargo xtask update-key DIR`: a new update key pair in DIR,
/// `update.key` (the signing key: keep it on the build machine) and
/// `update.pub` (for `[host] update-key` or a machine config).
fn update_key(dir: Option<&str>) -> Result<()> {
    let dir = Path::new(dir.context("update-key needs the directory to write the key pair into")?);
    std::fs::create_dir_all(dir)?;
    let (seed, public) = image_build::disk::new_update_key()?;
    let key = dir.join("update.key");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key)
            .with_context(|| {
                format!("create {} (an old key is never overwritten)", key.display())
            })?;
        f.write_all(format!("{seed}\n").as_bytes())?;
    }
    std::fs::write(dir.join("update.pub"), format!("{public}\n"))?;
    eprintln!(
        "update key: {} (signing key, keep it secret) and {} (public: {public})",
        key.display(),
        dir.join("update.pub").display()
    );
    Ok(())
}

/// `cargo xtask admin-certs DIR HOST...`: certificates for `cup
/// --remote` (docs/remote.md): the machines' valid for each HOST (a name
/// or an address), cup's, their CA, and the `[admin]` section of a
/// machine config.
fn admin_certs(args: &[String]) -> Result<()> {
    let (dir, names) = args
        .split_first()
        .context("admin-certs needs a directory and the host names or addresses of the machines")?;
    if names.is_empty() {
        bail!("admin-certs needs the host names or addresses cup reaches the machines by");
    }
    image_build::admin::certs(Path::new(dir), names)?;
    eprintln!(
        "admin certificates in {dir}: put machine-admin.toml's [admin] into the machine config; \
         cup --remote HOST --tls-dir {dir} uses ca.crt, client.crt and client.key"
    );
    Ok(())
}

/// The signing key `cargo xtask disk` signs the OS slot with:
/// `$STEELCUP_UPDATE_SIGNING_KEY`, a file from `cargo xtask update-key`.
fn signing_key() -> Result<Option<ed25519_dalek::SigningKey>> {
    std::env::var_os("STEELCUP_UPDATE_SIGNING_KEY")
        .map(|p| image_build::disk::read_signing_key(Path::new(&p)))
        .transpose()
}

/// What building a disk image takes (and booting it in QEMU).
fn disk_packages() -> Result<()> {
    deps::ensure_packages(&[
        "grub-efi-amd64-bin",
        "grub-common",
        "systemd-boot-efi",
        "qemu-utils",
        "binutils",
        // UEFI firmware for QEMU: the disk image's test boots it.
        "ovmf",
    ])
}

/// The disk image of the appliance in `artifacts`.
fn disk_image(artifacts: &Path) -> Result<PathBuf> {
    disk_packages()?;
    step("building the disk image (GRUB, unified kernel image, GPT)");
    let out = sh::out_dir().join("disk");
    std::fs::create_dir_all(&out)?;
    let cmdline = std::fs::read_to_string(artifacts.join("cmdline"))?;
    let manifest = image_build::disk::build(
        &artifacts.join("vmlinuz"),
        &artifacts.join("initramfs.cpio.zst"),
        cmdline.trim(),
        &out,
        signing_key()?.as_ref(),
    )?;
    let size = |n: &str| std::fs::metadata(out.join(n)).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "disk image: {} (raw {} MB, qcow2 {} MB); OS slot {} with a {:.1} MB unified kernel image",
        out.join("disk.img").display(),
        size("disk.img") / 1_000_000,
        size("disk.qcow2") / 1_000_000,
        manifest["version"].as_str().unwrap_or("?"),
        manifest["uki_bytes"].as_u64().unwrap_or(0) as f64 / 1e6
    );
    Ok(out)
}

/// The vmmd unit of the disk test's broken build: vmmd refuses its
/// arguments, init gives up after its start limit, and the health gate
/// fails.
const BROKEN_VMMD_UNIT: &str = r#"# A broken build (the disk test's rollback): vmmd cannot start.
[unit]
description = "steelcup VMM daemon (broken on purpose)"

[service]
exec = ["/usr/bin/vmmd", "--this-build-is-broken"]
restart = "always"
ready = "notify"
"#;

/// The disk test's disk and update files, from the test image in
/// `test_artifacts` with `steelcup.test=disk` on its command line, in
/// `target/steelcup/test-disk`: `disk.qcow2` (slot A), `update-good.img`
/// (a second build: the same image with `steelcup.build=2`, so another
/// version), `update-bad.img` (a build whose vmmd unit is broken), both
/// signed with a new update key whose public half is `update.pub`, and
/// `update-unsigned.img` (the second build, unsigned).
fn test_disk(test_artifacts: &Path) -> Result<PathBuf> {
    disk_packages()?;
    step("building the disk test's disk image and update files");
    let out = sh::out_dir().join("test-disk");
    std::fs::create_dir_all(&out)?;
    let work = out.join("work");
    let cmdline = format!(
        "{} steelcup.test=disk",
        std::fs::read_to_string(test_artifacts.join("cmdline"))?.trim()
    );
    let vmlinuz = test_artifacts.join("vmlinuz");
    let initramfs = test_artifacts.join("initramfs.cpio.zst");
    let first = image_build::disk::build(&vmlinuz, &initramfs, &cmdline, &out, None)?;
    // The test's update key: the machine config on its config drive
    // configures the public half; the updates are signed with the other.
    let (seed, public) = image_build::disk::new_update_key()?;
    std::fs::write(out.join("update.pub"), format!("{public}\n"))?;
    let signer = {
        std::fs::create_dir_all(&work)?;
        std::fs::write(work.join("update.key"), &seed)?;
        image_build::disk::read_signing_key(&work.join("update.key"))?
    };
    let mut good = image_build::disk::slot(
        &vmlinuz,
        &initramfs,
        &format!("{cmdline} steelcup.build=2"),
        &work,
    )?;
    std::fs::write(
        out.join("update-unsigned.img"),
        image_build::disk::slot_image(&good)?,
    )?;
    good.sign(&signer)?;
    std::fs::write(
        out.join("update-good.img"),
        image_build::disk::slot_image(&good)?,
    )?;
    let bad_initramfs = work.join("initramfs-broken-vmmd.cpio.zst");
    std::fs::write(
        &bad_initramfs,
        image_build::disk::overlay_initramfs(
            &std::fs::read(&initramfs)?,
            &[(
                "etc/steelcup/units/vmmd.toml",
                0o644,
                BROKEN_VMMD_UNIT.as_bytes().to_vec(),
            )],
        )?,
    )?;
    let mut bad = image_build::disk::slot(
        &vmlinuz,
        &bad_initramfs,
        &format!("{cmdline} steelcup.build=broken-vmmd"),
        &work,
    )?;
    bad.sign(&signer)?;
    std::fs::write(
        out.join("update-bad.img"),
        image_build::disk::slot_image(&bad)?,
    )?;
    // cup --remote's certificates: the test reaches the machine through
    // QEMU's forwarding to 127.0.0.1.
    image_build::admin::certs(&out.join("admin"), &["127.0.0.1".to_string()])?;
    // The test checks what each boot says it runs.
    let version = |m: &serde_json::Value| m["version"].as_str().unwrap_or("?").to_string();
    std::fs::write(
        out.join("versions"),
        format!(
            "disk {}\ngood {}\nbad {}\n",
            version(&first),
            version(&good.manifest),
            version(&bad.manifest)
        ),
    )?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(out)
}

fn build() -> Result<PathBuf> {
    let t0 = Instant::now();
    deps::ensure()?;
    let root = sh::root();
    let manifest_path = root.join("image-build/steelcup.toml");
    let manifest = image_build::manifest::Manifest::load(&manifest_path)?;
    let guest_kernel = kernel::guest_kernel()?;
    let host_root = kernel::host_kernel(&manifest.host.kernel_package)?;

    step("building static binaries (init, vminit, vmmd, vmm-worker, cup)");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    sh::run(
        Command::new(cargo)
            .current_dir(&root)
            .args([
                "build",
                "--release",
                "--target",
                TARGET,
                "-p",
                "steelcup-init",
                "-p",
                "steelcup-vminit",
                "-p",
                "vmmd",
                "-p",
                "steelcup-vmm",
                "-p",
                "cup",
            ])
            .env("RUSTFLAGS", "-C target-feature=+crt-static"),
    )?;
    let bin_dir = root.join("target").join(TARGET).join("release");
    for b in STATIC_BINS {
        let path = bin_dir.join(b);
        let data = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
        let elf = object::File::parse(&*data)
            .with_context(|| format!("{} is not ELF", path.display()))?;
        if object::Object::section_by_name(&elf, ".interp").is_some() {
            bail!("{b} is dynamically linked; the image needs static binaries");
        }
    }

    step("building the appliance image");
    let out = sh::out_dir().join("artifacts");
    let oci_archive = example_oci_archive()?;
    let inputs = image_build::Inputs {
        manifest: manifest_path,
        bin_dir,
        guest_kernel,
        host_kernel_root: host_root,
        out: out.clone(),
        extra_files: vec![(EXAMPLE_OCI_ARCHIVE.into(), oci_archive)],
    };
    let m = image_build::build(&inputs)?;
    // The test image: the same plus a host busybox, qemu-tests/units and a
    // root disk image for a workload.
    let root_disk = test_root_disk()?;
    let mut extra_files = inputs.extra_files.clone();
    extra_files.push((TEST_ROOT_DISK.into(), root_disk));
    image_build::build(&image_build::Inputs {
        manifest: root.join("qemu-tests/steelcup-test.toml"),
        out: sh::out_dir().join("test-artifacts"),
        extra_files,
        ..inputs.clone()
    })?;
    let recorded = serde_json::json!({
        "manifest": inputs.manifest,
        "bin_dir": inputs.bin_dir,
        "guest_kernel": inputs.guest_kernel,
        "host_kernel_root": inputs.host_kernel_root,
        "extra_files": inputs.extra_files,
    });
    std::fs::write(
        sh::out_dir().join("build-inputs.json"),
        recorded.to_string(),
    )?;
    eprintln!(
        "host image: {:.1} MB (Debian kernel {} + initramfs {:.1} MB) in {}; built in {}",
        m.image_bytes as f64 / 1e6,
        m.kernel_release,
        m.artifacts["initramfs.cpio.zst"].size as f64 / 1e6,
        out.display(),
        sh::elapsed(t0)
    );
    Ok(out)
}

/// Where the test image carries the root disk of qemu-tests/units/disks.toml.
pub const TEST_ROOT_DISK: &str = "var/lib/steelcup/test/root.ext4";

/// Where the appliance carries the example OCI image of
/// configs/units/hello-oci.toml (the test units use it too).
pub const EXAMPLE_OCI_ARCHIVE: &str = "usr/lib/steelcup/examples/busybox.oci.tar";

/// A busybox OCI image made by Debian's umoci and written as an
/// `oci-archive` by skopeo (tools no one here wrote): a user `app`
/// (1234:1234), a working directory, an environment and a default command.
pub fn example_oci_archive() -> Result<PathBuf> {
    deps::ensure_packages(&["umoci", "skopeo"])?;
    let dir = sh::out_dir().join("test-oci");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let layout = dir.join("layout");
    let image = format!("{}:latest", layout.display());
    let umoci = |args: &[&str]| sh::run(Command::new("umoci").args(args));
    umoci(&["init", "--layout", &layout.display().to_string()])?;
    umoci(&["new", "--image", &image])?;
    let bundle = dir.join("bundle");
    umoci(&["unpack", "--image", &image, &bundle.display().to_string()])?;
    let rootfs = bundle.join("rootfs");
    for d in ["bin", "etc", "work", "tmp"] {
        std::fs::create_dir_all(rootfs.join(d))?;
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).context("copy /bin/busybox")?;
    for applet in [
        "sh", "echo", "id", "pwd", "cat", "ls", "sleep", "wc", "mkdir", "hostname", "httpd", "wget",
    ] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))?;
    }
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1234:1234:app:/work:/bin/sh\n",
    )?;
    std::fs::write(
        rootfs.join("etc/group"),
        "root:x:0:\napp:x:1234:\nstaff:x:50:app\n",
    )?;
    umoci(&["repack", "--image", &image, &bundle.display().to_string()])?;
    umoci(&[
        "config",
        "--image",
        &image,
        "--config.env",
        "PATH=/bin",
        "--config.env",
        "GREETING=hello",
        "--config.workingdir",
        "/work",
        "--config.user",
        "app",
        "--config.cmd",
        "sh",
        "--config.cmd",
        "-c",
        "--config.cmd",
        "echo \"hi from $GREETING as $(id -u):$(id -g) groups $(id -G) in $(pwd) home $HOME\"; exit 3",
    ])?;
    let policy = dir.join("policy.json");
    std::fs::write(
        &policy,
        r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
    )?;
    let archive = dir.join("busybox-oci.tar");
    sh::run(
        Command::new("skopeo")
            .arg("--policy")
            .arg(&policy)
            .args(["copy", "--quiet"])
            .arg(format!("oci:{image}"))
            .arg(format!("oci-archive:{}:latest", archive.display())),
    )?;
    Ok(archive)
}

/// An ext4 root filesystem image for a test workload, made with Debian's
/// mkfs.ext4 (not our code): a static busybox and a file to read.
fn test_root_disk() -> Result<PathBuf> {
    let dir = sh::out_dir().join("test-root");
    let _ = std::fs::remove_dir_all(&dir);
    for d in [
        "bin",
        "etc/steelcup-test",
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "data",
    ] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    std::fs::copy("/bin/busybox", dir.join("bin/busybox")).context("copy /bin/busybox")?;
    for applet in [
        "sh", "cat", "echo", "touch", "sync", "grep", "mount", "rm", "reboot",
    ] {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet))?;
    }
    std::fs::write(
        dir.join("etc/steelcup-test/message"),
        "read from the read-only root disk\n",
    )?;
    let image = sh::out_dir().join("test-root.ext4");
    let _ = std::fs::remove_file(&image);
    sh::run(
        Command::new("mkfs.ext4")
            .args(["-q", "-L", "steelcup-test", "-U", "clear", "-E"])
            .arg("root_owner=0:0,hash_seed=5e5e5e5e-0000-4000-8000-000000000001")
            .arg("-d")
            .arg(&dir)
            .arg(&image)
            .arg("16M")
            .env("E2FSPROGS_FAKE_TIME", "1700000000"),
    )?;
    Ok(image)
}

/// The example workloads that run to completion (restart = "no"): `--once`
/// waits for each to report before powering off.
fn finite_workloads() -> Vec<String> {
    let (units, _) = steelcup_units::load_dir(&sh::root().join("configs/units"));
    units
        .into_iter()
        .filter_map(|u| match u.kind {
            steelcup_units::UnitKind::Microvm(m) if m.restart == steelcup_units::Restart::No => {
                Some(u.name)
            }
            _ => None,
        })
        .collect()
}

fn run(once: bool) -> Result<()> {
    let artifacts = build()?;
    let once = once || !std::io::stdin().is_terminal();
    let mut cfg = GuestConfig::direct("run", &artifacts)?;
    cfg.echo = true;
    let accel = qemu_tests::Accel::detect();
    step(&format!(
        "booting the appliance in QEMU ({}); {}",
        match accel {
            qemu_tests::Accel::Kvm => "KVM",
            qemu_tests::Accel::Tcg =>
                "software emulation of an AMD-V CPU; the first boot takes a minute",
        },
        if once {
            "it powers off when the example workloads have finished"
        } else {
            "Ctrl-C presses its power button"
        }
    ));
    // Ctrl-C is ours (QEMU runs in its own process group).
    let sfd = steelcup_sys::signalfd(&[
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
    ])
    .context("signal handling")?;
    let mut g = Guest::boot(&cfg)?;
    let workloads = finite_workloads();
    let mut pressed: Option<Instant> = None;
    loop {
        if !g.running() {
            break;
        }
        if let Ok(Some(_)) = sfd.read_signal() {
            if pressed.is_some() {
                eprintln!("\nsecond Ctrl-C: stopping QEMU");
                g.kill();
                break;
            }
            eprintln!("\n==> pressing the power button (Ctrl-C again to kill QEMU)");
            g.power_button()?;
            pressed = Some(Instant::now());
        }
        let s = g.serial();
        if s.contains("Kernel panic") {
            std::thread::sleep(Duration::from_secs(1));
            g.kill();
            bail!(
                "the appliance's kernel panicked; serial log: {}",
                g.log_path.display()
            );
        }
        if once && pressed.is_none() {
            // vmmd reports each end as "workload NAME: <outcome> after N.NNs".
            let done = s.contains("phase units: done")
                && workloads.iter().all(|w| {
                    s.lines()
                        .any(|l| l.contains(&format!("workload {w}: ")) && l.contains(" after "))
                });
            if done {
                eprintln!("==> example workloads finished; pressing the power button");
                g.power_button()?;
                pressed = Some(Instant::now());
            } else if g.started.elapsed() > Duration::from_secs(600) {
                g.kill();
                bail!(
                    "workloads did not finish in 10 minutes; serial log: {}",
                    g.log_path.display()
                );
            }
        }
        if pressed.is_some_and(|t| t.elapsed() > Duration::from_secs(120)) {
            g.kill();
            bail!(
                "the appliance did not power off within 2 minutes; serial log: {}",
                g.log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let s = g.serial();
    eprintln!(
        "==> QEMU exited after {:.1}s; serial log: {}",
        g.started.elapsed().as_secs_f64(),
        g.log_path.display()
    );
    if once && !s.contains("reboot: Power down") {
        bail!(
            "the appliance did not power off cleanly; serial log: {}",
            g.log_path.display()
        );
    }
    Ok(())
}

fn test() -> Result<()> {
    deps::ensure()?;
    let root = sh::root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    step("formatting (cargo fmt --check)");
    sh::run(
        Command::new(&cargo)
            .current_dir(&root)
            .args(["fmt", "--all", "--", "--check"]),
    )
    .context("code is not formatted: run `cargo fmt --all`")?;
    step("lints (cargo clippy --workspace --all-targets -- -D warnings)");
    sh::run(Command::new(&cargo).current_dir(&root).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
    .context("clippy found something: fix it, or allow it where it is with the reason")?;
    step("a debootstrapped Debian as an OCI image, for the image store's tests");
    let debian = bench_image::debian_image()?;
    step("unit and host-side integration tests");
    sh::run(
        Command::new(&cargo)
            .current_dir(&root)
            .args(["test", "--workspace", "--exclude", "qemu-tests"])
            // Tests that need a tool from Debian fail instead of skipping.
            .env("STEELCUP_REQUIRE_TOOLS", "1")
            .env("STEELCUP_DEBIAN_IMAGE", &debian),
    )?;
    qemu_tests(None)
}

/// `cargo xtask test --qemu NAME`: builds what the QEMU tests need and runs
/// only `qemu-tests/tests/NAME.rs` (for working on one of them).
fn test_qemu_only(name: &str) -> Result<()> {
    deps::ensure()?;
    if !sh::root()
        .join("qemu-tests/tests")
        .join(format!("{name}.rs"))
        .exists()
    {
        bail!("no qemu-tests/tests/{name}.rs");
    }
    qemu_tests(Some(name))
}

/// Builds the appliance, the test disk and the nginx image, then runs the
/// QEMU tests (`only`: one test file).
fn qemu_tests(only: Option<&str>) -> Result<()> {
    let root = sh::root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let artifacts = build()?;
    let disk = test_disk(&sh::out_dir().join("test-artifacts"))?;
    step("Debian's nginx as an OCI image, for the network test");
    let nginx = bench_image::nginx_image()?;
    let results = sh::out_dir().join("qemu-results.txt");
    let _ = std::fs::remove_file(&results);
    step("QEMU end-to-end tests (the appliance booted under QEMU, one test at a time)");
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&root).args(["test", "-p", "qemu-tests"]);
    if let Some(name) = only {
        cmd.args(["--test", name]);
    }
    sh::run(
        cmd.args(["--", "--test-threads=1", "--nocapture"])
            .env("STEELCUP_ARTIFACTS", &artifacts)
            .env(
                "STEELCUP_TEST_ARTIFACTS",
                sh::out_dir().join("test-artifacts"),
            )
            .env("STEELCUP_REQUIRE_ARTIFACTS", "1")
            .env("STEELCUP_DISK", &disk)
            .env("STEELCUP_NGINX_IMAGE", &nginx),
    )?;
    step("results");
    eprint!("{}", std::fs::read_to_string(&results).unwrap_or_default());
    Ok(())
}

/// `cargo xtask bench --init-only`: the init benchmark alone, printed.
fn bench_init_only() -> Result<()> {
    build()?;
    let md = bench_init::run(&sh::root().join("target").join(TARGET).join("release/init"))?;
    print!("{md}");
    Ok(())
}

/// `cargo xtask bench --image-only`: the image benchmark alone, printed and
/// written over its section of docs/performance.md.
fn bench_image_only() -> Result<()> {
    let md = bench_image::run()?;
    print!("{md}");
    write_sections(&md)
}

/// `cargo xtask bench --vmm-only`: the VMM and start benchmarks alone (one
/// boot of the bench image), printed and written over their sections.
fn bench_vmm_only() -> Result<()> {
    build()?;
    let md = bench_vmm::run()?;
    print!("{md}");
    write_sections(&md)
}

/// `cargo xtask bench --http-only`: the HTTP benchmark alone (one boot of
/// its bench image), printed and written over its section.
fn bench_http_only() -> Result<()> {
    build()?;
    let md = bench_http::run()?;
    print!("{md}");
    write_sections(&md)
}

/// Writes each `## ` section of `md` over the section of the same heading
/// in docs/performance.md (or at its end).
fn write_sections(md: &str) -> Result<()> {
    let path = sh::root().join("docs/performance.md");
    let mut doc = std::fs::read_to_string(&path).unwrap_or_default();
    let mut starts: Vec<usize> = md.match_indices("## ").map(|(i, _)| i).collect();
    starts.retain(|i| *i == 0 || md.as_bytes()[i - 1] == b'\n');
    starts.push(md.len());
    for w in starts.windows(2) {
        let section = &md[w[0]..w[1]];
        let heading = section.lines().next().unwrap_or_default();
        doc = match doc.find(heading) {
            Some(start) => {
                let rest = &doc[start + heading.len()..];
                let end = rest
                    .find("\n## ")
                    .map_or(doc.len(), |i| start + heading.len() + i + 1);
                format!("{}{section}{}", &doc[..start], &doc[end..])
            }
            None => format!("{}\n\n{section}", doc.trim_end()),
        };
    }
    std::fs::write(&path, doc)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

fn bench() -> Result<()> {
    let artifacts = build()?;
    let vmm_md = bench_vmm::run()?;
    eprint!("{vmm_md}");
    let http_md = bench_http::run()?;
    eprint!("{http_md}");
    step("OCI image to root image, beside umoci unpack + mkfs.erofs");
    let image_md = bench_image::run()?;
    eprint!("{image_md}");
    step("init: 100 services, side by side with runit");
    let init_md = bench_init::run(&sh::root().join("target").join(TARGET).join("release/init"))?;
    eprint!("{init_md}");
    let manifest: image_build::ArtifactManifest =
        serde_json::from_slice(&std::fs::read(artifacts.join("manifest.json"))?)?;
    let runs = 3;
    let mut rows = Vec::new();
    for i in 0..runs {
        step(&format!("boot {}/{runs}", i + 1));
        let mut g = Guest::boot(&GuestConfig::direct("bench", &artifacts)?)?;
        let long = Duration::from_secs(300);
        let init_at = g.wait_for("starting as PID 1", long)?;
        let units_at = g.wait_for("phase units: done", long)?;
        let line_at = g.wait_for("hello | hello from a steelcup microVM", long)?;
        let exit_at = g.wait_for("workload hello: exited with code 7", long)?;
        g.power_button()?;
        let t = Instant::now();
        g.wait_exit(long)?;
        let off = t.elapsed();
        let s = g.serial();
        let vm_secs: f64 = s
            .lines()
            .find(|l| l.contains("workload hello: exited with code 7 after"))
            .and_then(|l| l.rsplit("after ").next())
            .and_then(|v| v.trim_end_matches('s').parse().ok())
            .unwrap_or(f64::NAN);
        rows.push([
            init_at.as_secs_f64(),
            units_at.as_secs_f64(),
            line_at.as_secs_f64(),
            exit_at.as_secs_f64(),
            vm_secs,
            off.as_secs_f64(),
        ]);
    }
    let accel = format!("{:?}", qemu_tests::Accel::detect());
    let mut md = String::from("# Performance\n\nWritten by `cargo xtask bench`; numbers from the last run on the machine that ran it.\n\n");
    md.push_str(&format!(
        "## Host image\n\n| artifact | bytes |\n|---|---|\n| host kernel (Debian {}) | {} |\n| initramfs (zstd) | {} |\n| **total** | **{}** ({:.1} MB; budget 40 MB) |\n\n",
        manifest.kernel_release,
        manifest.artifacts["vmlinuz"].size,
        manifest.artifacts["initramfs.cpio.zst"].size,
        manifest.image_bytes,
        manifest.image_bytes as f64 / 1e6
    ));
    md.push_str(&init_md);
    md.push_str(&format!("## Boot to a microVM ({runs} boots, QEMU accelerator: {accel})\n\nSeconds from QEMU's start. Under software emulation (`Tcg`) every instruction of the host and the nested microVM is emulated, so these are far above what KVM hardware gives; compare runs on the same machine only.\n\n| boot | init starts | units started | microVM's line | exit code reported | microVM run (vmmd) | power-off |\n|---|---|---|---|---|---|---|\n"));
    for (i, r) in rows.iter().enumerate() {
        md.push_str(&format!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.1} |\n",
            i + 1,
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            r[5]
        ));
    }
    md.push_str("\nThe microVM run is vmmd's own measure: worker start to the guest's reset, including the guest kernel's boot.\n\n");
    md.push_str(&vmm_md);
    md.push_str(&http_md);
    md.push_str(&image_md);
    let path = sh::root().join("docs/performance.md");
    std::fs::write(&path, md)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
