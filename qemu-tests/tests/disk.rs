//! The disk image (`cargo xtask disk`, docs/disk-image.md) booted as a
//! server boots its disk: UEFI firmware (Debian's OVMF) runs GRUB from the
//! EFI system partition, GRUB takes slot A (spending one of its tries),
//! checks the unified kernel image against the slot's SHA256SUMS and
//! chainloads it. On the first boot init grows the blank state partition
//! to the end of the (larger) disk, formats it and mounts it at /var, and
//! the health gate gives slot A its tries back. After a power-off the
//! second boot finds its state where it left it: the filesystem mounted as
//! it is, the random seed the first boot saved, and GRUB counting from the
//! tries init wrote back.

use qemu_tests::{log_dir, Guest, GuestConfig};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

const BOOT: Duration = Duration::from_secs(300);
const STEP: Duration = Duration::from_secs(120);

#[test]
fn disk_image_boots_under_uefi_and_keeps_its_state() {
    let Some(dir) = std::env::var_os("STEELCUP_DISK").map(PathBuf::from) else {
        assert!(
            std::env::var_os("STEELCUP_REQUIRE_ARTIFACTS").is_none(),
            "STEELCUP_DISK is not set"
        );
        eprintln!("disk: skipped: needs the disk image built by `cargo xtask test`");
        return;
    };
    let logs = log_dir(&dir);
    // The machine's disk: the image on a 2 GiB disk (the state partition
    // grows into the rest), a copy so the built image stays as built.
    let disk = logs.join("uefi-disk.qcow2");
    std::fs::create_dir_all(&logs).unwrap();
    std::fs::copy(dir.join("disk.qcow2"), &disk).unwrap();
    let st = Command::new("qemu-img")
        .args(["resize", "-q"])
        .arg(&disk)
        .arg("2G")
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img resize: {st}");
    let cfg = GuestConfig::uefi("uefi-disk", &disk, &logs).unwrap();

    let mut g = Guest::boot(&cfg).unwrap();
    let first = (|| -> anyhow::Result<()> {
        g.wait_for(
            "steelcup: booting slot A (2 tries left after this one)",
            BOOT,
        )?;
        g.wait_for("steelcup.efi: OK", STEP)?;
        g.wait_for("starting as PID 1", STEP)?;
        g.wait_for("state: /dev/vda4 is blank: growing and formatting it", STEP)?;
        // 16 MiB as built; 2 GiB less the rest of the disk's partitions
        // (193 MiB) and the backup table's 1 MiB.
        g.wait_for(
            "state: first boot: /dev/vda4 grown from 16 to 1854 MiB, formatted ext4 and mounted at /var",
            STEP,
        )?;
        g.wait_for(
            "slots: booted slot A; order A B; A: 2 tries, B: 0 tries",
            STEP,
        )?;
        g.wait_for("health gate passed", BOOT)?;
        g.wait_for(
            "slots: slot A marked good (booted slot A; order A B; A: 3 tries",
            STEP,
        )?;
        g.power_button()?;
        g.wait_for("syncing disks and powering off", STEP)?;
        g.wait_clean_poweroff(STEP)?;
        Ok(())
    })();
    if let Err(e) = first {
        panic!("first boot: {e:#}; serial log: {}", g.log_path.display());
    }
    drop(g);

    let cfg = GuestConfig {
        name: "uefi-disk-2".into(),
        ..cfg
    };
    let mut g = Guest::boot(&cfg).unwrap();
    let second = (|| -> anyhow::Result<()> {
        // GRUB counts from the 3 tries init wrote into its environment.
        g.wait_for(
            "steelcup: booting slot A (2 tries left after this one)",
            BOOT,
        )?;
        g.wait_for("state: /dev/vda4 mounted at /var", BOOT)?;
        // Saved on /var at the first boot's power-off.
        g.wait_for("entropy: mixed 512 bytes of saved seed", STEP)?;
        g.wait_for("slots: slot A marked good", BOOT)?;
        g.power_button()?;
        g.wait_clean_poweroff(STEP)?;
        Ok(())
    })();
    if let Err(e) = second {
        panic!("second boot: {e:#}; serial log: {}", g.log_path.display());
    }
    let s = g.serial();
    assert!(!s.contains("is blank"), "the second boot formatted again");
}
