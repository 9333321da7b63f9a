//! vmmd's microVMs on the appliance's real (nested) KVM: a workload on a
//! read-only ext4 root disk whose data volume keeps its contents across a
//! restart, `reboot` inside a guest, a worker killed with SIGKILL while
//! vmmd and another VM run on, the worker's cgroup and mount namespace,
//! data to and from a guest over virtio-net, pause and resume through
//! vmmd's API, and a graceful stop asked over vsock.
//!
//! Runs on the test image with `steelcup.test=vms`: the units in
//! `qemu-tests/units/` (disks, rebooter, net, vm-a, vm-b) run only then,
//! and the driver unit drives the rest and powers off when all is done.

use std::time::Duration;

const BOOT: Duration = Duration::from_secs(300);
const STEP: Duration = Duration::from_secs(240);

#[test]
fn disks_reboot_and_a_killed_worker() {
    let Some(mut g) = qemu_tests::boot_test_image("vms") else {
        return;
    };
    g.wait_for("phase units: done", BOOT).unwrap();

    // The root disk is mounted read-only (ext4 by mkfs.ext4) under a
    // writable layer; the data volume is formatted on first use and keeps
    // the first boot's count for the second.
    g.wait_for("workload disks: created volume data (16MiB)", STEP)
        .unwrap();
    g.wait_for(
        "disks | disks: boot 1: read from the read-only root disk; root device read-only: yes",
        STEP,
    )
    .unwrap();
    g.wait_for("workload disks: exited with code 1", STEP)
        .unwrap();
    g.wait_for(
        "disks | disks: boot 2: read from the read-only root disk; root device read-only: yes",
        STEP,
    )
    .unwrap();
    g.wait_for("workload disks: exited with code 0", STEP)
        .unwrap();

    // `reboot` inside a guest ends its VM with that status, and restart = "no"
    // keeps it ended.
    g.wait_for("rebooter | rebooter: asking for a reboot", STEP)
        .unwrap();
    g.wait_for("workload rebooter: rebooted from inside the guest", STEP)
        .unwrap();

    // One worker killed: its VM ends with that reason, vmmd and vm-b run on.
    g.wait_for("driver: killing the worker of vm-a", STEP)
        .unwrap();
    g.wait_for("workload vm-a: VMM error: worker killed by SIGKILL", STEP)
        .unwrap();
    g.wait_for(
        "driver: vm-b still runs after vm-a's worker was killed",
        STEP,
    )
    .unwrap();
    // The worker's confinement: cgroup limits from the unit (64 MiB guest
    // plus 64 MiB overhead, 1 vCPU), a mount namespace with only /run.
    g.wait_for(
        "driver: vm-b worker cgroup 0::/vms/vm-b memory.max 134217728 pids.max 9 cpu.max 100000 100000",
        STEP,
    )
    .unwrap();
    g.wait_for("driver: vm-b worker root holds: [run ]", STEP)
        .unwrap();
    g.wait_for("driver: vm-b worker has its own mount namespace", STEP)
        .unwrap();
    g.wait_for("driver: vm-b guest memory is a memfd", STEP)
        .unwrap();
    // virtio-net over the workload's tap: the host's bytes reach the
    // guest's echo server and come back.
    g.wait_for("driver: net at 10.200.", STEP).unwrap();
    g.wait_for("answered: ping from the host", STEP).unwrap();
    // Pause and resume through vmmd's API (`cup pause`, `cup unpause`).
    g.wait_for("driver: cup: no workload named \"nosuch\"", STEP)
        .unwrap();
    g.wait_for("driver: paused vm-b", STEP).unwrap();
    g.wait_for("driver: ps: vm-b             paused", STEP)
        .unwrap();
    g.wait_for("driver: vm-b printed 0 ticks in 4 s while paused", STEP)
        .unwrap();
    g.wait_for("driver: resumed vm-b", STEP).unwrap();
    g.wait_for("driver: vm-b ticks again after resume", STEP)
        .unwrap();
    g.wait_for("driver: cup poweroff", STEP).unwrap();
    // Power-off: vmmd asks vm-b's vminit over vsock to stop its workload
    // (a request and an answer through the VM's Unix socket), and the
    // workload ends by that SIGTERM.
    g.wait_for("workload vm-b: asked to stop; guest: stopping", STEP)
        .unwrap();
    g.wait_for("workload vm-b: killed by signal 15", STEP)
        .unwrap();
    let s = g.wait_clean_poweroff(STEP).unwrap();
    let pos = |n: &str| {
        s.find(n)
            .unwrap_or_else(|| panic!("{n:?} missing; see {}", g.log_path.display()))
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
