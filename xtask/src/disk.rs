//! `cargo xtask disk`: the flashable disk image, and the disk and update
//! files the QEMU disk test boots.

use crate::*;

/// Builds everything; returns the artifacts directory.
/// `cargo xtask disk`: the appliance as a flashable disk image (GPT, ESP
/// with GRUB, OS slots A and B, state; docs/disk-image.md) in
/// `target/steelcup/disk`: `disk.img`, `disk.qcow2` and the update file
/// `slot.img`.
pub(crate) fn disk() -> Result<PathBuf> {
    let artifacts = build()?;
    disk_image(&artifacts)
}

/// What building a disk image takes (and booting it in QEMU).
pub(crate) fn disk_packages() -> Result<()> {
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
pub(crate) fn disk_image(artifacts: &Path) -> Result<PathBuf> {
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
pub(crate) const BROKEN_VMMD_UNIT: &str = r#"# A broken build (the disk test's rollback): vmmd cannot start.
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
pub(crate) fn test_disk(test_artifacts: &Path) -> Result<PathBuf> {
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

/// Where the test image carries the root disk of qemu-tests/units/disks.toml.
pub const TEST_ROOT_DISK: &str = "var/lib/steelcup/test/root.ext4";

/// An ext4 root filesystem image for a test workload, made with Debian's
/// mkfs.ext4 (not our code): a static busybox and a file to read.
pub(crate) fn test_root_disk() -> Result<PathBuf> {
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
