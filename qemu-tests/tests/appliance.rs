//! The appliance end to end: boot, a microVM's line and exit code, orderly
//! power-off; the same through PXE; and reproducible image builds (the
//! initramfs, and the disk image with its update file).
//!
//! These need the artifacts `cargo xtask test` builds and passes in
//! `STEELCUP_ARTIFACTS`; run without them, each test says so and does nothing.
//! `cargo xtask test` sets `STEELCUP_REQUIRE_ARTIFACTS`, so there a missing
//! artifact fails instead.

#![allow(clippy::unwrap_used)] // tests fail by panicking

use qemu_tests::{artifacts, record, run_booted, Artifacts, Guest, GuestConfig};
use std::time::Duration;

/// Under software emulation the host kernel boots in tens of seconds and a
/// nested microVM in a few; these bounds leave room for a busy CI machine.
const BOOT: Duration = Duration::from_secs(300);
const STEP: Duration = Duration::from_secs(120);

const HELLO_LINE: &str = "hello | hello from a steelcup microVM";
const HELLO_EXIT: &str = "workload hello: exited with code 7";

fn need_artifacts(test: &str) -> Option<Artifacts> {
    let a = artifacts();
    if a.is_none() {
        assert!(
            std::env::var_os("STEELCUP_REQUIRE_ARTIFACTS").is_none(),
            "{test}: STEELCUP_ARTIFACTS is not set"
        );
        eprintln!("{test}: skipped: needs the appliance built by `cargo xtask test`");
    }
    a
}

#[test]
fn boots_runs_a_microvm_and_powers_off_in_order() {
    let Some(a) = need_artifacts("boot") else {
        return;
    };
    run_booted(
        "boot",
        || Some(Guest::boot(&GuestConfig::direct("boot", &a.dir).unwrap()).unwrap()),
        |g| boot_run_power_off(g, &a),
    );
}

fn boot_run_power_off(g: &mut Guest, a: &Artifacts) -> anyhow::Result<()> {
    println!(
        "accelerator: {:?}; serial log: {}",
        g.accel,
        g.log_path.display()
    );

    for phase in [
        "early-mounts",
        "kmsg-logging",
        "hostname",
        "modules",
        "entropy",
        "network",
        "units",
    ] {
        g.wait_for(&format!("phase {phase}: done"), BOOT)?;
    }
    let s = g.serial();
    assert!(
        s.contains("module kvm_amd: loaded") || s.contains("module kvm_intel: loaded"),
        "init must load the KVM module for the CPU"
    );
    let coldplug = s
        .lines()
        .find(|l| l.contains("coldplug:"))
        .unwrap_or_default();
    assert!(
        coldplug.contains("virtio_rng"),
        "coldplug must load the RNG's driver: {coldplug}"
    );
    g.wait_for("unit vmmd: started", STEP)?;
    let line_at = g.wait_for(HELLO_LINE, STEP)?;
    g.wait_for(HELLO_EXIT, STEP)?;
    // The example microVM has two vCPUs: the MP table must bring both up.
    let hello = g
        .serial()
        .lines()
        .find(|l| l.contains(HELLO_LINE))
        .unwrap_or_default()
        .to_string();
    assert!(hello.contains("CPUs 0-1,"), "both vCPUs online: {hello}");
    // Every microVM has a virtio-rng device on the MMIO transport.
    assert!(
        hello.ends_with("RNG virtio_rng.0 (16 bytes read)"),
        "the guest's RNG is vmmd's virtio-rng: {hello}"
    );
    // The example OCI workload: its image (an oci-archive in the appliance)
    // becomes an erofs root image, run as the image's user in its working
    // directory with its environment.
    g.wait_for(
        "hello-oci | hello from an OCI image: hello from app (uid 1234) in /work, root filesystem overlay over erofs",
        STEP,
    )?;
    g.wait_for("workload hello-oci: exited with code 0", STEP)?;
    record(
        a,
        "qemu_start_to_microvm_line_s",
        &format!("{:.1}", line_at.as_secs_f64()),
    );
    record(a, "accelerator", &format!("{:?}", g.accel));

    // The power button: init stops vmmd, syncs and powers off; QEMU exits by itself.
    g.power_button()?;
    g.wait_for("power button pressed", STEP)?;
    g.wait_for("unit vmmd: stopping", STEP)?;
    g.wait_for("vmmd stopped", STEP)?;
    g.wait_for("unit vmmd: stopped in", STEP)?;
    g.wait_for("syncing disks and powering off", STEP)?;
    let s = g.wait_clean_poweroff(STEP)?;
    // Order: the workload's report, then vmmd stops, then init powers off.
    let pos = |n: &str| s.find(n).unwrap_or_else(|| panic!("{n:?} missing"));
    assert!(pos(HELLO_EXIT) < pos("unit vmmd: stopping"));
    assert!(pos("vmmd stopped") < pos("syncing disks and powering off"));
    Ok(())
}

#[test]
fn pxe_boot_reaches_the_microvm() {
    let Some(a) = need_artifacts("pxe") else {
        return;
    };
    // No -kernel/-initrd: QEMU's iPXE ROM must fetch boot.ipxe, the kernel and
    // the initramfs over TFTP, so reaching init proves the PXE path. (SeaBIOS
    // and iPXE print to VGA, not to the serial console.)
    run_booted(
        "pxe",
        || Some(Guest::boot(&GuestConfig::pxe("pxe", &a.dir)).unwrap()),
        |g| pxe_boot(g, &a),
    );
}

fn pxe_boot(g: &mut Guest, a: &Artifacts) -> anyhow::Result<()> {
    g.wait_for("starting as PID 1", BOOT)?;
    g.wait_for("phase units: done", BOOT)?;
    let s = g.serial();
    let coldplug = s
        .lines()
        .find(|l| l.contains("coldplug:"))
        .unwrap_or_default();
    assert!(
        coldplug.contains("e1000"),
        "coldplug must load the NIC's driver: {coldplug}"
    );
    // No network.toml: DHCP on every physical NIC, from QEMU's DHCP server.
    g.wait_for(
        "network: eth0 10.0.2.15/24 via DHCP (server 10.0.2.2, router 10.0.2.2",
        STEP,
    )?;
    let line_at = g.wait_for(HELLO_LINE, STEP)?;
    g.wait_for(HELLO_EXIT, STEP)?;
    record(
        a,
        "pxe_qemu_start_to_microvm_line_s",
        &format!("{:.1}", line_at.as_secs_f64()),
    );
    Ok(())
}

#[test]
fn image_build_twice_gives_identical_bytes() {
    let Some(a) = need_artifacts("reproducible") else {
        return;
    };
    let inputs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.dir.join("../build-inputs.json")).unwrap())
            .unwrap();
    let path = |k: &str| std::path::PathBuf::from(inputs[k].as_str().unwrap());
    let tmp = std::env::temp_dir().join(format!("steelcup-repro-{}", std::process::id()));
    let mut built = Vec::new();
    for run in ["one", "two"] {
        let out = tmp.join(run);
        let m = image_build::build(&image_build::Inputs {
            manifest: path("manifest"),
            bin_dir: path("bin_dir"),
            guest_kernel: path("guest_kernel"),
            host_kernel_root: path("host_kernel_root"),
            out: out.clone(),
            extra_files: serde_json::from_value(inputs["extra_files"].clone()).unwrap(),
        })
        .unwrap();
        built.push((out, m));
    }
    let (one, m1) = &built[0];
    let (two, m2) = &built[1];
    assert_eq!(m1, m2, "manifests differ");
    assert!(!m1.artifacts.is_empty());
    for name in m1.artifacts.keys() {
        let b1 = std::fs::read(one.join(name)).unwrap();
        let b2 = std::fs::read(two.join(name)).unwrap();
        assert!(b1 == b2, "{name} differs between two builds");
    }
    let j1 = std::fs::read(one.join("manifest.json")).unwrap();
    assert_eq!(j1, std::fs::read(two.join("manifest.json")).unwrap());
    // And the artifacts under test are those same bytes.
    let shipped: image_build::ArtifactManifest =
        serde_json::from_slice(&std::fs::read(a.dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(
        &shipped, m1,
        "the tested appliance differs from a fresh build"
    );
    record(&a, "host_image_bytes", &m1.image_bytes.to_string());
    // The host image budget: kernel + initramfs under 40 MB.
    assert!(
        m1.image_bytes < 40_000_000,
        "host image is {} bytes; the budget is 40 MB",
        m1.image_bytes
    );
    // The disk image (GRUB, the unified kernel image, FAT, GPT) and the
    // update file: the same bytes from the same appliance.
    let cmdline = std::fs::read_to_string(one.join("cmdline")).unwrap();
    let disks: Vec<_> = ["disk-one", "disk-two"]
        .iter()
        .map(|d| {
            let out = tmp.join(d);
            image_build::disk::build(
                &one.join("vmlinuz"),
                &one.join("initramfs.cpio.zst"),
                cmdline.trim(),
                &out,
                None,
            )
            .unwrap();
            out
        })
        .collect();
    for name in ["disk.img", "slot.img", "disk.qcow2"] {
        let b1 = std::fs::read(disks[0].join(name)).unwrap();
        let b2 = std::fs::read(disks[1].join(name)).unwrap();
        assert!(b1 == b2, "{name} differs between two builds");
    }
    let _ = std::fs::remove_dir_all(&tmp);
}
