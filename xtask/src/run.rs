//! `cargo xtask run`: the appliance booted in QEMU with the example units.

use crate::*;

/// The example workloads that run to completion (restart = "no"): `--once`
/// waits for each to report before powering off.
pub(crate) fn finite_workloads() -> Vec<String> {
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

pub(crate) fn run(once: bool) -> Result<()> {
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
