//! The disk image (docs/disk-image.md) booted as a server boots its disk,
//! over one machine's life: UEFI firmware (Debian's OVMF) runs GRUB from
//! the EFI system partition, GRUB picks a slot by ORDER and tries, checks
//! its unified kernel image against the slot's SHA256SUMS and chainloads
//! it. The disk is the test image's (`cargo xtask test` builds it with
//! `steelcup.test=disk`, so its driver unit drives each boot; the step it
//! is at lives on /var), and QEMU runs with `-no-reboot`, so every reboot
//! ends a QEMU process and the test boots the same disk again:
//!
//! 1. slot A, first boot: the state partition grown, formatted, mounted
//!    at /var; the machine config on a config drive applied (hostname, a
//!    unit, a registry, an update key, remote administration: this test
//!    lists units and workloads with cup --remote's client over mutual TLS,
//!    and a stranger's certificate is refused); the health gate marks A good; a
//!    workload writes a volume; an unsigned update is refused; `cup update
//!    URL` (served by this test, outside QEMU) writes a second build,
//!    signed, into slot B, checked, to boot once; init reboots;
//! 2. slot B: the machine config is not applied again (its hostname and
//!    unit are still there); the volume's data is there; the gate marks B
//!    good; an update to a build whose vmmd is broken goes into slot A;
//! 3. slot A, broken: vmmd fails, the gate fails, init reboots;
//! 4. GRUB, A's one try spent, boots B again by itself (a rollback, said
//!    by init and by `cup update --status`); an update is started and QEMU
//!    killed while it writes slot A;
//! 5. slot B boots (the half-written slot had lost its tries first); the
//!    driver asks for `cup machine reset`;
//! 6. the state partition is formatted again and the config drive applied
//!    again, as at the first boot: the kept `--restart always` run, which
//!    came back after each reboot before, is gone with /var.

#![allow(clippy::unwrap_used)] // tests fail by panicking

use qemu_tests::{log_dir, Guest, GuestConfig};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const BOOT: Duration = Duration::from_secs(300);
const STEP: Duration = Duration::from_secs(120);
/// Where the driver fetches update files (QEMU's user network reaches the
/// test's loopback at 10.0.2.2).
const UPDATE_PORT: u16 = 15057;

/// The machine config on the test's config drive (with the update key
/// `cargo xtask test` made, whose updates are signed).
const MACHINE_CONFIG: &str = r#"
hostname = "node-17"
update-key = "UPDATE_KEY"

ADMIN

[units.provisioned]
unit = { description = "a unit from the machine config" }
service = { exec = ["/bin/sh", "-c", "echo provisioned: running on $(cat /proc/sys/kernel/hostname)"] }

[[registry]]
host = "10.0.2.2:15055"
insecure = true
"#;

/// A D-Bus connection over `stream` whose calls give up after two
/// minutes: a call the machine never answers (the emulated host hung under
/// it, as TCG does now and then) ends the step with an error the harness
/// can judge, instead of waiting for ever.
fn p2p_with_timeout(
    stream: std::os::unix::net::UnixStream,
) -> anyhow::Result<zbus::blocking::Connection> {
    Ok(
        zbus::blocking::connection::Builder::async_io_unix_stream(stream)
            .p2p()
            .method_timeout(std::time::Duration::from_secs(120))
            .build()?,
    )
}

/// cup --remote from here: init's units and vmmd's workloads over mutual
/// TLS, through QEMU's forwarding to the machine's port 7443.
fn remote_admin(g: &Guest, tls_dir: &Path) -> anyhow::Result<()> {
    let remote = steelcup_api::remote::Remote {
        addr: format!("127.0.0.1:{}", g.forwarded.expect("port 7443 forwarded")),
        tls_dir: tls_dir.to_path_buf(),
    };
    let init_conn = p2p_with_timeout(remote.open("init")?)?;
    let init = steelcup_api::init1::Init1Proxy::builder(&init_conn).build()?;
    let units: Vec<String> = init.list_units()?.into_iter().map(|u| u.name).collect();
    println!("disk: units through cup --remote: {}", units.join(" "));
    anyhow::ensure!(
        units.iter().any(|u| u == "provisioned") && units.iter().any(|u| u == "admin"),
        "the remote unit list lacks the provisioned units: {units:?}"
    );
    let slots = init.update_status()?;
    anyhow::ensure!(slots.booted == "A", "remote update status: {slots:?}");
    let conn = p2p_with_timeout(remote.open("vmmd")?)?;
    let vms = steelcup_api::vmm1::Vmm1ClientProxy::builder(&conn)
        .build()?
        .list()?;
    println!("disk: workloads through cup --remote: {}", vms.len());
    // A client without a certificate the machine's CA signed is refused.
    let stranger = tls_dir.with_file_name("stranger");
    image_build::admin::certs(&stranger, &["127.0.0.1".to_string()])?;
    std::fs::copy(tls_dir.join("ca.crt"), stranger.join("ca.crt"))?;
    let refused = steelcup_api::remote::Remote {
        addr: remote.addr.clone(),
        tls_dir: stranger,
    }
    .open("init");
    anyhow::ensure!(refused.is_err(), "a stranger's certificate was let in");
    Ok(())
}

/// Serves the files of `dir` over HTTP/1.0 GET on 127.0.0.1:UPDATE_PORT.
fn serve_updates(dir: PathBuf) -> std::io::Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", UPDATE_PORT))?;
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let dir = dir.clone();
            std::thread::spawn(move || -> std::io::Result<()> {
                let mut s = stream;
                let mut r = BufReader::new(s.try_clone()?);
                let mut request = String::new();
                r.read_line(&mut request)?;
                let mut line = String::new();
                while r.read_line(&mut line)? > 2 {
                    line.clear();
                }
                let name = request
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("/")
                    .trim_start_matches('/');
                let file = (!name.contains('/') && name.ends_with(".img"))
                    .then(|| std::fs::read(dir.join(name)).ok())
                    .flatten();
                println!("disk: the appliance fetched /{name}");
                match file {
                    Some(data) => {
                        write!(
                            s,
                            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n\r\n",
                            data.len()
                        )?;
                        s.write_all(&data)
                    }
                    None => s.write_all(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n"),
                }
            });
        }
    });
    Ok(())
}

/// The versions `cargo xtask test` recorded: the disk's slot A, the good
/// update, the broken one.
fn versions(dir: &Path) -> (String, String, String) {
    let text = std::fs::read_to_string(dir.join("versions")).expect("versions of the test disk");
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k} ")))
            .unwrap_or_else(|| panic!("no {k} version in {text:?}"))
            .to_string()
    };
    (get("disk"), get("good"), get("bad"))
}

/// Boots the disk, runs `steps`, panics with the boot's name and serial log
/// when one does not come. When the emulated host fails underneath (see
/// `qemu_tests::emulation_fault`), the disk and firmware variables go back
/// to what they were before this boot and it boots again.
fn boot(cfg: &GuestConfig, name: &str, steps: impl Fn(&mut Guest) -> anyhow::Result<()>) {
    let cfg = GuestConfig {
        name: format!("uefi-disk-{name}"),
        ..cfg.clone()
    };
    let qemu_tests::Boot::Uefi { disk, vars } = &cfg.boot else {
        panic!("the disk test boots a disk");
    };
    let kept: Vec<(PathBuf, PathBuf)> = [disk, vars]
        .iter()
        .map(|f| (f.to_path_buf(), f.with_extension("before-boot")))
        .collect();
    let copy = |from: &Path, to: &Path| {
        let st = Command::new("cp")
            .args(["--sparse=always", "--reflink=auto"])
            .arg(from)
            .arg(to)
            .status()
            .unwrap();
        assert!(st.success(), "cp {} {}: {st}", from.display(), to.display());
    };
    for (f, before) in &kept {
        copy(f, before);
    }
    let mut attempt = 0;
    qemu_tests::run_booted(
        &format!("disk: boot {name}"),
        || {
            attempt += 1;
            if attempt > 1 {
                for (f, before) in &kept {
                    copy(before, f);
                }
            }
            Some(Guest::boot(&cfg).unwrap())
        },
        |g| {
            steps(g)?;
            println!(
                "disk: boot {name} done in {:.0}s",
                g.started.elapsed().as_secs_f64()
            );
            Ok(())
        },
    );
    for (_, before) in &kept {
        let _ = std::fs::remove_file(before);
    }
}

/// init reboots (QEMU, run with -no-reboot, exits).
fn rebooted(g: &mut Guest) -> anyhow::Result<()> {
    g.wait_for("syncing disks and rebooting", STEP)?;
    g.wait_exit(STEP)?;
    Ok(())
}

#[test]
fn disk_image_boots_updates_and_rolls_back() {
    let Some(dir) = std::env::var_os("STEELCUP_DISK").map(PathBuf::from) else {
        assert!(
            std::env::var_os("STEELCUP_REQUIRE_ARTIFACTS").is_none(),
            "STEELCUP_DISK is not set"
        );
        eprintln!("disk: skipped: needs the test disk image built by `cargo xtask test`");
        return;
    };
    let (v1, v2, v3) = versions(&dir);
    serve_updates(dir.clone()).expect("the update server's port");
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
    let mut cfg = GuestConfig::uefi("uefi-disk", &disk, &logs).unwrap();
    // A config drive (docs/provisioning.md), attached at every boot:
    // applied at the first, only installed at the others.
    let drive = logs.join("config-drive.img");
    let fat = image_build::disk::fat(
        40 << 20,
        "STEELCUPCFG",
        &[(
            "machine.toml".to_string(),
            MACHINE_CONFIG
                .replace(
                    "UPDATE_KEY",
                    std::fs::read_to_string(dir.join("update.pub"))
                        .expect("the test disk's update.pub")
                        .trim(),
                )
                .replace(
                    "ADMIN",
                    &std::fs::read_to_string(dir.join("admin/machine-admin.toml"))
                        .expect("the test disk's admin certificates"),
                )
                .into_bytes(),
        )],
    )
    .unwrap();
    std::fs::write(&drive, fat).unwrap();
    cfg.drives.push(drive);
    cfg.forward_port = Some(steelcup_api::remote::DEFAULT_PORT);

    boot(&cfg, "1-slot-a", |g| {
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
        // The config drive, applied onto /var before the units start.
        g.wait_for(
            "provision: applied the machine config from config drive /dev/vdb (sha256",
            STEP,
        )?;
        g.wait_for("hostname node-17", STEP)?;
        g.wait_for("provisioned: running on node-17", BOOT)?;
        g.wait_for("registries: 0 with credentials, 1 over plain HTTP", BOOT)?;
        // Remote administration, set up by the machine config.
        g.wait_for("admin: cup --remote on 0.0.0.0:7443", BOOT)?;
        remote_admin(g, &dir.join("admin"))?;
        g.wait_for("health gate passed", BOOT)?;
        g.wait_for(
            "slots: slot A marked good (booted slot A; order A B; A: 3 tries",
            STEP,
        )?;
        g.wait_for("driver: disk step 0", STEP)?;
        g.wait_for(&format!("driver: status: A     {v1}"), STEP)?;
        g.wait_for("driver: volume: written", BOOT)?;
        g.wait_for("driver: unsigned update: cup: /run/steelcup/update-", BOOT)?;
        g.wait_for(
            "manifest.json is not signed (no manifest.sig), and this machine takes only updates signed by its update key",
            STEP,
        )?;
        // (init's word: cup's own answer may not reach the console before
        // the reboot stops the driver.)
        g.wait_for(
            &format!(
                "update: slot B holds version {v2} and boots next, once; slot A stays the fallback"
            ),
            BOOT,
        )?;
        rebooted(g)
    });

    boot(&cfg, "2-slot-b", |g| {
        g.wait_for(
            "steelcup: booting slot B (0 tries left after this one)",
            BOOT,
        )?;
        g.wait_for("steelcup.efi: OK", STEP)?;
        g.wait_for("state: /dev/vda4 mounted at /var", BOOT)?;
        // Saved on /var when the first boot rebooted.
        g.wait_for("entropy: mixed 512 bytes of saved seed", STEP)?;
        // The machine config is not applied again; what it made still is.
        g.wait_for(
            "provision: the machine config from config drive /dev/vdb was applied at an earlier boot; not applied again",
            STEP,
        )?;
        g.wait_for("provisioned: running on node-17", BOOT)?;
        g.wait_for(
            "slots: booted slot B; order B A; A: 3 tries, B: 0 tries",
            STEP,
        )?;
        g.wait_for(
            "slots: slot B marked good (booted slot B; order B A; A: 3 tries, B: 3 tries)",
            BOOT,
        )?;
        // The --restart always run of the first boot, kept on /var.
        g.wait_for("workload keeper: kept run, started again", BOOT)?;
        g.wait_for("driver: disk step 1", STEP)?;
        g.wait_for(&format!("driver: status: B     {v2}"), STEP)?;
        g.wait_for(
            "driver: volume after the update: written before the update",
            BOOT,
        )?;
        // From outside, as an administrator does: the real cup, the URL
        // fetched here and streamed to the machine through its gateway.
        g.wait_for("driver: waiting for the remote update", STEP)?;
        let admin = format!("127.0.0.1:{}", g.forwarded.expect("port 7443 forwarded"));
        let remote = |args: &[&str]| -> anyhow::Result<String> {
            let out = Command::new(qemu_tests::cup_binary())
                .args(["--remote", &admin, "--tls-dir"])
                .arg(dir.join("admin"))
                .args(args)
                .env("STEELCUP_CONFIG_DIR", dir.join("cup-config"))
                .output()?;
            let said = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            println!("disk: $ cup --remote {admin} {}\n{said}", args.join(" "));
            anyhow::ensure!(out.status.success(), "cup {args:?}: {said}");
            Ok(said)
        };
        let url = format!("http://127.0.0.1:{UPDATE_PORT}/update-bad.img");
        let said = remote(&["update", "--no-reboot", &url])?;
        anyhow::ensure!(
            said.contains(&format!("slot A holds version {v3} and boots next")),
            "cup --remote update: {said}"
        );
        g.wait_for(
            &format!(
                "update: slot A holds version {v3} and boots next, once; slot B stays the fallback"
            ),
            STEP,
        )?;
        let status = remote(&["update", "--status"])?;
        anyhow::ensure!(
            status.contains(&v3),
            "cup --remote update --status: {status}"
        );
        // The booted slot, as metrics name it.
        let metrics = remote(&["metrics"])?;
        anyhow::ensure!(
            metrics.contains("steelcup_update_slot_info{slot=\"B\",good="),
            "cup --remote metrics: no booted slot B in:\n{metrics}"
        );
        // The reboot's answer may not make it out before the gateway stops.
        let _ = remote(&["reboot"]);
        rebooted(g)
    });

    boot(&cfg, "3-broken-build", |g| {
        g.wait_for(
            "steelcup: booting slot A (0 tries left after this one)",
            BOOT,
        )?;
        g.wait_for("unit vmmd: failed: 5 starts in a row", BOOT)?;
        g.wait_for("health gate failed", STEP)?;
        g.wait_for("slots: slot A is not good; slot B has tries left", STEP)?;
        rebooted(g)
    });

    boot(&cfg, "4-rolled-back", |g| {
        g.wait_for("steelcup: slot A has no tries left", BOOT)?;
        g.wait_for(
            "steelcup: booting slot B (2 tries left after this one)",
            STEP,
        )?;
        g.wait_for(
            "slots: slot A was first but did not come up; rolled back to slot B",
            BOOT,
        )?;
        g.wait_for("slots: slot B marked good", BOOT)?;
        g.wait_for("driver: disk step 2", STEP)?;
        g.wait_for(
            "driver: status: rolled back: slot A was first but did not come up",
            STEP,
        )?;
        // QEMU killed the moment init starts writing slot A.
        g.wait_for(&format!("holds version {v2} ("), BOOT)?;
        g.wait_for("; writing it into slot A", STEP)?;
        g.kill();
        Ok(())
    });

    boot(&cfg, "5-after-the-cut", |g| {
        g.wait_for(
            "steelcup: booting slot B (2 tries left after this one)",
            BOOT,
        )?;
        g.wait_for(
            "slots: booted slot B; order B A; A: 0 tries, B: 2 tries",
            BOOT,
        )?;
        g.wait_for("slots: slot B marked good", BOOT)?;
        g.wait_for("driver: disk step 3", STEP)?;
        g.wait_for(&format!("driver: status: B     {v2}"), STEP)?;
        g.wait_for("driver: disk steps done", STEP)?;
        let s = g.serial();
        anyhow::ensure!(!s.contains("is blank"), "a later boot formatted /var again");
        g.wait_for(
            "machine reset: the state partition is wiped at the next boot; rebooting",
            STEP,
        )?;
        rebooted(g)
    });

    boot(&cfg, "6-reset", |g| {
        g.wait_for(
            "state: cup machine reset asked for a wipe: formatting /dev/vda4 again",
            BOOT,
        )?;
        g.wait_for(
            "provision: applied the machine config from config drive /dev/vdb (sha256",
            STEP,
        )?;
        g.wait_for("provisioned: running on node-17", BOOT)?;
        g.wait_for("unit vmmd: ready", BOOT)?;
        // The driver's step lived on /var too: it starts over.
        g.wait_for("driver: disk step 0", BOOT)?;
        anyhow::ensure!(
            !g.serial().contains("workload keeper: kept run"),
            "the kept run outlived the machine reset"
        );
        g.kill();
        Ok(())
    });
}
