//! init as the real PID 1 of the booted appliance: units start, a unit killed
//! with SIGKILL is restarted and what it left in its cgroup is killed
//! (vmmd too: the new one cleans up after the old),
//! and `cup poweroff` or SIGTERM to PID 1 stops everything in order and
//! powers the machine off.
//!
//! Runs on the test image (`qemu-tests/steelcup-test.toml`): the appliance plus
//! a host busybox and the units in `qemu-tests/units/`, whose driver acts on
//! `steelcup.test=MODE` on the kernel command line.

#![allow(clippy::unwrap_used)] // tests fail by panicking

use qemu_tests::{boot_test_image, run_booted, Guest};
use std::time::Duration;

const BOOT: Duration = Duration::from_secs(300);
const STEP: Duration = Duration::from_secs(120);

fn shuts_down_in_order(g: &mut Guest, trigger: &str, announce: &str) -> anyhow::Result<()> {
    g.wait_for("phase units: done", BOOT)?;
    // vmmd's tiny hand-written guest on the appliance's (real) KVM.
    g.wait_for("[kvm-selftest] kvm selftest: ok: 6 exits as expected", STEP)?;
    // A snapshot of the tiny guest after its third exit: a clone of it,
    // memory mapped from the memory file, makes the last three.
    g.wait_for(
        "[kvm-selftest] kvm selftest: snapshot: ok: a clone restored after exit 3 made the last 3 (mmio read 0x8004, out 0x3f8 0x5a, hlt)",
        STEP,
    )?;
    for unit in ["vmmd", "victim", "zz-driver"] {
        g.wait_for(&format!("unit {unit}: started"), STEP)?;
    }
    g.wait_for("driver: killing victim", STEP)?;
    g.wait_for("unit victim: killed by SIGKILL", STEP)?;
    g.wait_for("unit victim: restarting in 0.5s", STEP)?;
    g.wait_for("driver: victim restarted (restarts=1", STEP)?;
    // What it left in its cgroup went with its main process.
    g.wait_for("unit victim: killing 1 processes it left behind", STEP)?;
    g.wait_for("driver: processes the old victim left: 0 still alive", STEP)?;
    g.wait_for(trigger, STEP)?;
    g.wait_for(announce, STEP)?;
    g.wait_for("syncing disks and powering off", STEP)?;
    let s = g.wait_clean_poweroff(STEP)?;
    let pos = |n: &str| {
        s.find(n)
            .unwrap_or_else(|| panic!("{n:?} missing; see {}", g.log_path.display()))
    };
    // Dependents first: the driver (after vmmd and victim), then the rest.
    assert!(pos("unit zz-driver: stopping") < pos("unit vmmd: stopping"));
    assert!(pos("unit zz-driver: stopping") < pos("unit victim: stopping"));
    assert!(pos("vmmd stopped") < pos("syncing disks and powering off"));
    assert!(pos("unit victim: stopped in") < pos("syncing disks and powering off"));
    Ok(())
}

#[test]
fn cup_poweroff_stops_units_in_order_and_powers_off() {
    run_booted(
        "poweroff",
        || boot_test_image("poweroff"),
        |g| {
            // vmmd killed with SIGKILL while a VM runs: init starts it
            // again, the worker died with it, and the new vmmd removes the
            // cgroup it left.
            g.wait_for("driver: detached: sleeper", BOOT)?;
            g.wait_for(
                "driver: vmmd is back; workers of the old one still alive: 0; cgroups: []",
                STEP,
            )?;
            g.wait_for("removed the cgroup sleeper an earlier vmmd left", STEP)?;
            shuts_down_in_order(g, "driver: cup poweroff", "API: powering off")
        },
    );
}

#[test]
fn sigterm_to_pid1_stops_units_in_order_and_powers_off() {
    run_booted(
        "sigterm",
        || boot_test_image("sigterm"),
        |g| shuts_down_in_order(g, "driver: SIGTERM to PID 1", "SIGTERM: powering off"),
    );
}
