//! vmmd's microVMs on the appliance's real (nested) KVM, in two boots of
//! the test image (each with fewer VMs at once: under TCG, nested guests
//! fail more often the more of them run).
//!
//! `steelcup.test=vms`: a workload on a read-only ext4 root disk whose
//! data volume keeps its contents across a restart, `reboot` inside a
//! guest, a worker killed with SIGKILL while vmmd and another VM run on,
//! the worker's cgroup and mount namespace, data to and from a guest over
//! virtio-net, pause and resume through vmmd's API, OCI images run by
//! their config, and a graceful stop asked over vsock.
//!
//! `steelcup.test=workloads`: a `[microvm]` unit scaled to two replicas
//! with health checks, one killed from the host and replaced, a rolling
//! replace on `cup reload`; `cup run` (attached, detached, stdin, exit
//! codes, limits, named volumes), `exec`, `inspect`, `kill`, `rm`; a
//! `cup run` taken by a VM of the warm pool.
//!
//! The units in `qemu-tests/units/` run only in their mode, and the driver
//! unit drives the rest and powers off when all is done.

#![allow(clippy::unwrap_used)] // tests fail by panicking

use anyhow::Result;
use qemu_tests::Guest;
use std::time::Duration;

const BOOT: Duration = Duration::from_secs(300);
const STEP: Duration = Duration::from_secs(150);

#[test]
fn microvms_on_nested_kvm() {
    if let Some(s) =
        qemu_tests::run_booted("microvms", || qemu_tests::boot_test_image("vms"), scenario)
    {
        check_log(&s);
    }
}

#[test]
fn workloads_on_nested_kvm() {
    if let Some(s) = qemu_tests::run_booted(
        "workloads",
        || qemu_tests::boot_test_image("workloads"),
        workloads,
    ) {
        check_workloads_log(&s);
    }
}

/// The workloads boot; Err at the first step that does not come.
fn workloads(g: &mut Guest) -> Result<String> {
    g.wait_for("phase units: done", BOOT)?;
    // Replicas: unit web runs as web.1 and web.2, each found healthy by an
    // HTTP probe vminit makes inside its VM; a worker killed from the host
    // comes back healthy; an edited unit and `cup reload` roll it, a new
    // VM healthy before each old one stops.
    g.wait_for("driver: scaled: reloaded:", STEP)?;
    g.wait_for("driver: ps: web.1            running (healthy)", STEP)?;
    g.wait_for("driver: ps: web.2            running (healthy)", STEP)?;
    g.wait_for("driver: logs web.1: serving version 1", STEP)?;
    // Port 8080 is published: from the appliance itself the connections
    // spread over both replicas; from outside QEMU (its host forwarding to
    // the appliance's uplink) a replica answers too.
    g.wait_for("driver: published: version 1 from web.1", STEP)?;
    g.wait_for("driver: published: version 1 from web.2", STEP)?;
    let page = get_from_outside(g, "/index.html")?;
    anyhow::ensure!(
        page.contains("200 OK") && page.contains("version 1 from web."),
        "GET through QEMU's forwarding to the published port: {page:?}"
    );
    println!("workloads: from outside QEMU: {:?}", page.lines().last());
    g.wait_for("workload web.2: VMM error: worker killed by SIGKILL", STEP)?;
    // One replica down: the published port keeps being served.
    g.wait_for(
        "driver: with web.2 killed, served: version 1 from web.1",
        STEP,
    )?;
    g.wait_for("driver: web.2 is back: running (healthy)", STEP)?;
    g.wait_for(
        "driver: reloaded: started [], stopped [], restarted [web]",
        STEP,
    )?;
    g.wait_for("workload web.1: replaced; stopping it", STEP)?;
    g.wait_for("workload web.2: replaced; stopping it", STEP)?;
    g.wait_for("driver: web.3 serves: version 2 from web.3", STEP)?;
    g.wait_for("driver: web.4 serves: version 2 from web.4", STEP)?;
    g.wait_for("driver: web workloads after the roll: web.3 web.4", STEP)?;
    // cup run: attached stdio (stdout and stderr), the workload's exit code
    // as cup's, stdin from the host, env overrides; cup exec into a
    // detached workload as its user or another, with exit codes; --rm
    // leaves nothing behind.
    // The warm pool: a VM booted ahead of time takes `cup run`'s workload
    // (its config and root image handed over, no kernel boot), which runs
    // under its own hostname on its image's erofs root.
    // (The driver first waits for a pool VM that is ready now: one the
    // emulation crashed is booted again, after a backoff.)
    g.wait_for("workload warm: started from the warm pool in", BOOT)?;
    g.wait_for("driver: warm run: hostname warm, root overlay", STEP)?;
    // ... with the network vmmd handed over in the claim (DNS on the bridge).
    g.wait_for(
        "driver: warm run: hostname warm, root overlay, dns 10.88.0.1",
        STEP,
    )?;
    // The VM's worker now lives in the workload's cgroup.
    g.wait_for("driver: warm worker cgroup 0::/vms/warm", STEP)?;
    g.wait_for("driver: run says: hi, open files 1048576", STEP)?;
    g.wait_for("driver: run says: oops", STEP)?;
    g.wait_for("driver: limited: open files 512", STEP)?;
    g.wait_for("driver: cup run exited 3", STEP)?;
    g.wait_for("driver: hey, got: a line from the host", STEP)?;
    g.wait_for("driver: detached: sleeper", STEP)?;
    g.wait_for("driver: exec as app in /work with hello", STEP)?;
    g.wait_for("driver: exec -u root: 0", STEP)?;
    g.wait_for("driver: top: 1 with the script, pid 1 is /init", STEP)?;
    g.wait_for("driver: cp in: from the host", STEP)?;
    g.wait_for("driver: cp out: from the guest, link to /etc/passwd", STEP)?;
    g.wait_for("driver: cp refused: cup: sleeper:\"/tmp/../etc/shadow\": a path in the guest is absolute, without '..'", STEP)?;
    g.wait_for("driver: exec -d returned 0", STEP)?;
    g.wait_for("driver: exec -d: detached exec ran", STEP)?;
    g.wait_for(
        "driver: options: in /tmp as 1000:1000 on made-up, db at 10.1.2.3, root read-only",
        STEP,
    )?;
    g.wait_for("driver: half: cpu.max 50000 100000, vCPUs 1", BOOT)?;
    g.wait_for("driver: flaky: 1 exited 3", BOOT)?;
    check_stats(g)?;
    // Workloads find each other by name (vmmd's DNS on the bridge); one
    // with network = none has no interface but loopback and reaches nothing.
    g.wait_for("driver: sleeper reached web by name: web is 10.88.", STEP)?;
    g.wait_for(
        "driver: sleeper reached web by name: version 2 from web.",
        STEP,
    )?;
    g.wait_for("driver: no network: interfaces lo", STEP)?;
    g.wait_for("driver: no network: web unreachable", STEP)?;
    g.wait_for("driver: exec -t: stdin is /dev/pts/0", STEP)?;
    g.wait_for("driver: exec of a failing command exited 1", STEP)?;
    g.wait_for("driver: cannot run /no/such/program", STEP)?;
    g.wait_for("driver: exec of a missing program exited 127", STEP)?;
    g.wait_for("driver: exec after refusals: still answers", STEP)?;
    g.wait_for(
        "driver: run of a missing program exited 127 saying: vminit: cannot run /no/such/program",
        STEP,
    )?;
    g.wait_for(
        "driver: cup: workload \"sleeper\" is running; stop it first",
        STEP,
    )?;
    g.wait_for("driver: inspect: \"state\": \"running\"", STEP)?;
    g.wait_for("driver: inspect: \"from\": \"cup run\"", STEP)?;
    // cup attach: the workload's output, a signal passed on (its trap
    // prints), and its exit code (128 + 9) when it is killed.
    g.wait_for("driver: attach: sleeper: got USR1", STEP)?;
    g.wait_for("driver: killed sleeper", STEP)?;
    g.wait_for("workload sleeper: killed by signal 9", STEP)?;
    g.wait_for("driver: attach exited 137", STEP)?;
    // Docker's scripting verbs: wait, inspect -f, ps -q --filter.
    g.wait_for(
        "driver: scripted: wait 137, inspect exited 137, exited [sleeper]",
        STEP,
    )?;
    g.wait_for("driver: removed sleeper", STEP)?;
    // A named volume outlives the cup run that wrote it; `:ro` mounts it
    // read-only. Each run boots a VM of its own (the warm pool's have no
    // data disk), the first formats the volume.
    g.wait_for("driver: volume: written", STEP)?;
    g.wait_for("driver: volume: kept across runs", STEP)?;
    g.wait_for("driver: volume: read-only: yes", STEP)?;
    g.wait_for("driver: volumes: made scratch stats ", STEP)?;
    g.wait_for("driver: volume removed: scratch", STEP)?;
    g.wait_for("driver: volumes pruned: 2", STEP)?;
    g.wait_for(
        "driver: images: oci-archive:/usr/lib/steelcup/examples/busybox.oci.tar:latest",
        STEP,
    )?;
    g.wait_for(
        "driver: tagged: docker.io/library/mybox:1,oci-archive:/usr/lib/steelcup/examples/busybox.oci.tar:latest",
        STEP,
    )?;
    g.wait_for("driver: tag: run by its new name", STEP)?;
    // The table of Docker command lines and their cup spellings (in the
    // driver): the same exit codes, the same output shapes.
    if let Err(e) = g.wait_for("driver: compat: 28 of 28 like Docker", STEP) {
        let unlike: Vec<String> = g
            .serial()
            .lines()
            .filter(|l| l.contains("driver: compat:"))
            .map(str::to_string)
            .collect();
        anyhow::bail!("{e}: {unlike:#?}");
    }
    g.wait_for("driver: leftover cup run workloads: 0", STEP)?;
    g.wait_for("driver: df: Images", STEP)?;
    g.wait_for("driver: df: Volumes", STEP)?;
    g.wait_for("driver: system prune: removed workload gone", STEP)?;
    g.wait_for("driver: cup poweroff", STEP)?;
    // Power-off: the rolled replicas are asked to stop over vsock.
    g.wait_for("workload web.3: asked to stop; guest: stopping", STEP)?;
    g.wait_clean_poweroff(STEP)
}

/// `cup stats --no-stream` as the driver printed it: `busy` (a shell busy
/// loop) shows the CPU share its worker's cgroup counted over the same
/// seconds (under TCG a busy vCPU gets a third to all of an emulated CPU,
/// so the figure is checked against the cgroup, not against 100%), and
/// `writer`'s disk counted the 40 MiB it wrote (the worker's own block
/// counters).
fn check_stats(g: &mut Guest) -> Result<()> {
    g.wait_for("driver: cgroup: busy ", BOOT)?;
    let serial = g.serial();
    let after = |prefix: &str| {
        serial
            .lines()
            .find_map(|l| l.split_once(prefix).map(|(_, r)| r.to_string()))
            .unwrap_or_default()
    };
    let (busy, writer) = (
        after("driver: stats: busy "),
        after("driver: stats: writer "),
    );
    let cgroup = after("driver: cgroup: busy ");
    // `98.52% 0B / 0B 70.2MiB / 192MiB`
    let pct = |s: &str| -> Result<f64> {
        s.split('%')
            .next()
            .and_then(|c| c.trim().parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no percentage in {s:?}"))
    };
    let (cpu, counted) = (pct(&busy)?, pct(&cgroup)?);
    anyhow::ensure!(
        cpu >= 20.0 && (cpu - counted).abs() <= 25.0,
        "cup stats: busy used {cpu}% of a CPU, its cgroup counted {counted}%: {busy:?}"
    );
    let written = writer
        .split_whitespace()
        .nth(3)
        .ok_or_else(|| anyhow::anyhow!("cup stats writer: {writer:?}"))?;
    let mb: f64 = written
        .strip_suffix("MB")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("cup stats writer wrote {written:?}: {writer:?}"))?;
    anyhow::ensure!(
        mb >= 41.9,
        "cup stats: writer's disk counted {mb} MB of 40 MiB: {writer:?}"
    );
    println!("workloads: cup stats: busy {busy} (cgroup {counted}%); writer {writer}");
    Ok(())
}

/// An HTTP GET of `path` from this machine to the appliance's published
/// port 8080, through QEMU's host forwarding; retried for a minute (the
/// appliance's uplink may still be getting its DHCP lease).
fn get_from_outside(g: &Guest, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let port = g
        .forwarded
        .ok_or_else(|| anyhow::anyhow!("the workloads boot has no forwarded port"))?;
    let mut last = String::new();
    for _ in 0..30 {
        let got = (|| -> std::io::Result<String> {
            let mut c = std::net::TcpStream::connect(("127.0.0.1", port))?;
            c.set_read_timeout(Some(Duration::from_secs(10)))?;
            write!(c, "GET {path} HTTP/1.0\r\nHost: steelcup\r\n\r\n")?;
            let mut out = String::new();
            c.read_to_string(&mut out)?;
            Ok(out)
        })();
        match got {
            Ok(page) if !page.is_empty() => return Ok(page),
            Ok(_) => last = "an empty answer".into(),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    anyhow::bail!("GET {path} on 127.0.0.1:{port}: {last}")
}

/// What the workloads boot's serial log must show once it is through.
fn check_workloads_log(s: &str) {
    // A killed replica gets no more connections of the published port.
    assert!(
        !s.contains("driver: with web.2 killed, served: version 1 from web.2"),
        "the published port still sent connections to the killed web.2"
    );
    let pos = |n: &str| {
        s.find(n).unwrap_or_else(|| {
            panic!("{n:?} missing; see target/steelcup/qemu-logs/test-workloads.log")
        })
    };
    // The roll: each old VM stops only once a new one is healthy.
    assert!(pos("workload web.3: healthy") < pos("workload web.1: replaced"));
    assert!(pos("workload web.1: replaced") < pos("workload web.4: new"));
    assert!(pos("workload web.4: healthy") < pos("workload web.2: replaced"));
}

/// The whole run on one boot; Err at the first step that does not come.
fn scenario(g: &mut Guest) -> Result<String> {
    g.wait_for("phase units: done", BOOT)?;

    // The root disk is mounted read-only (ext4 by mkfs.ext4) under a
    // writable layer; the data volume is formatted on first use and keeps
    // the first boot's count for the second.
    g.wait_for("workload disks: created volume data (16MiB)", STEP)?;
    g.wait_for(
        "disks | disks: boot 1: read from the read-only root disk; root device read-only: yes",
        STEP,
    )?;
    g.wait_for("workload disks: exited with code 1", STEP)?;
    g.wait_for(
        "disks | disks: boot 2: read from the read-only root disk; root device read-only: yes",
        STEP,
    )?;
    g.wait_for("workload disks: exited with code 0", STEP)?;

    // `reboot` inside a guest ends its VM with that status, and restart = "no"
    // keeps it ended.
    g.wait_for("rebooter | rebooter: asking for a reboot", STEP)?;
    g.wait_for("workload rebooter: rebooted from inside the guest", STEP)?;

    // One worker killed: its VM ends with that reason, vmmd and vm-b run on.
    g.wait_for("driver: killing the worker of vm-a", STEP)?;
    g.wait_for("workload vm-a: VMM error: worker killed by SIGKILL", STEP)?;
    g.wait_for(
        "driver: vm-b still runs after vm-a's worker was killed",
        STEP,
    )?;
    // The worker's confinement: cgroup limits from the unit (64 MiB guest
    // plus 64 MiB overhead, 1 vCPU; threads: the vCPU, the worker's own,
    // vhost-net's and the disks' io_uring workers), a mount namespace with
    // only /run.
    g.wait_for(
        "driver: vm-b worker cgroup 0::/vms/vm-b memory.max 134217728 pids.max 17 cpu.max 100000 100000",
        STEP,
    )?;
    g.wait_for("driver: vm-b worker root holds: [run ]", STEP)?;
    g.wait_for("driver: vm-b worker has its own mount namespace", STEP)?;
    g.wait_for("driver: vm-b guest memory is a memfd", STEP)?;
    // virtio-net over the workload's tap: the host's bytes reach the
    // guest's echo server and come back.
    g.wait_for("driver: net at 10.88.", STEP)?;
    g.wait_for("answered: ping from the host", STEP)?;
    // Its worker runs with no capability: no CAP_NET_ADMIN, the tap was
    // made by vmmd.
    g.wait_for(
        "driver: net worker CapEff 0000000000000000 CapPrm 0000000000000000",
        STEP,
    )?;
    // Stop through the API: the guest is asked over vsock, the call returns
    // once the VM has ended; start brings it back.
    g.wait_for("workload net: asked to stop; guest: stopping", STEP)?;
    g.wait_for("driver: cup stop net returned: ended", STEP)?;
    g.wait_for("driver: net started again: running", STEP)?;
    // Pause and resume through vmmd's API (`cup pause`, `cup unpause`).
    g.wait_for("driver: cup: no workload named \"nosuch\"", STEP)?;
    g.wait_for("driver: paused vm-b", STEP)?;
    g.wait_for("driver: ps: vm-b             paused", STEP)?;
    g.wait_for("driver: vm-b printed 0 ticks in 4 s while paused", STEP)?;
    g.wait_for("driver: resumed vm-b", STEP)?;
    g.wait_for("driver: vm-b ticks again after resume", STEP)?;
    // OCI images: oci-a runs the image's own Cmd as its user `app` in its
    // WorkingDir with its Env; oci-b overrides the command and one
    // variable; both boot from the one erofs root image built from the
    // image's layers, with a writable layer over it.
    g.wait_for(
        "oci-a | hi from hello as 1234:1234 groups 1234 50 in /work home /work",
        STEP,
    )?;
    g.wait_for("workload oci-a: exited with code 3", STEP)?;
    g.wait_for(
        "oci-b | oci-b: overridden in /work as app; root overlay; 13 programs",
        STEP,
    )?;
    g.wait_for("oci-b | written", STEP)?;
    g.wait_for("driver: root images in the store: 1", STEP)?;
    // A scheduled unit (cup apply), the appliance's clock moved a minute
    // at a time: a run per due time, one skipped while a run runs
    // (concurrency = "forbid"), the exit codes kept.
    g.wait_for("driver: cron ls: ticker * * * * * forbid", STEP)?;
    g.wait_for("driver: cron: skipped skipped: ticker-", STEP)?;
    let exits = |s: &str| -> Vec<String> {
        s.lines()
            .filter(|l| l.contains("driver: cron: ticker-") && l.contains(" exited "))
            .map(String::from)
            .collect()
    };
    g.wait_until("three runs' exits", STEP * 2, |s| exits(s).len() >= 3)?;
    for l in exits(&g.serial()) {
        if !l.ends_with(" exited 3") {
            anyhow::bail!("a scheduled run did not end with its own code: {l}");
        }
    }
    g.wait_for("driver: cron logs: ticker ran", STEP)?;
    // The real clock moves too (a minute may turn while the test runs),
    // so: at least three runs, each ended with 3, and at least one skip.
    let history: Vec<(u32, String)> = g
        .serial()
        .lines()
        .filter_map(|l| l.split_once("driver: cron history: ").map(|(_, h)| h))
        .filter_map(|h| h.split_once(' '))
        .filter_map(|(n, what)| Some((n.parse().ok()?, what.to_string())))
        .collect();
    let count = |what: &str| {
        history
            .iter()
            .filter(|(_, w)| w == what)
            .map(|(n, _)| n)
            .sum::<u32>()
    };
    if count("ended 3") < 3
        || count("skipped -1") < 1
        || history
            .iter()
            .any(|(_, w)| w != "ended 3" && w != "skipped -1")
    {
        anyhow::bail!("the scheduled unit's history: {history:?}");
    }
    g.wait_for("driver: cup poweroff", STEP)?;
    // Power-off: vmmd asks vm-b's vminit over vsock to stop its workload
    // (a request and an answer through the VM's Unix socket), and the
    // workload ends by that SIGTERM.
    g.wait_for("workload vm-b: asked to stop; guest: stopping", STEP)?;
    g.wait_for("workload vm-b: killed by signal 15", STEP)?;
    g.wait_clean_poweroff(STEP)
}

/// What the whole serial log must show once the run is through.
fn check_log(s: &str) {
    let pos = |n: &str| {
        s.find(n)
            .unwrap_or_else(|| panic!("{n:?} missing; see target/steelcup/qemu-logs/test-vms.log"))
    };
    assert_eq!(
        s.matches("created volume data").count(),
        1,
        "the volume is created once and reused on restart"
    );
    assert_eq!(
        s.matches("rebooter | rebooter: asking for a reboot")
            .count(),
        1,
        "a rebooted workload with restart = \"no\" is not started again"
    );
    assert!(pos("workload vm-a: VMM error") < pos("driver: vm-b still runs"));
}
