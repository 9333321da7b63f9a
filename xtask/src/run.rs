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

/// cup's config directory, as cup finds it (`vmmd/cup/src/context.rs`):
/// `$STEELCUP_CONFIG_DIR`, else `$XDG_CONFIG_HOME/steelcup`, else
/// `~/.config/steelcup`.
fn cup_config_dir() -> PathBuf {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(d) = var("STEELCUP_CONFIG_DIR") {
        return d.into();
    }
    if let Some(d) = var("XDG_CONFIG_HOME") {
        return Path::new(&d).join("steelcup");
    }
    Path::new(&var("HOME").unwrap_or_else(|| "/root".into())).join(".config/steelcup")
}

/// The `cup` built for the appliance (static: it runs here too).
pub(crate) fn cup_binary() -> PathBuf {
    sh::root()
        .join("target")
        .join(TARGET)
        .join("release")
        .join("cup")
}

/// Makes `cup` on this machine's PATH the one just built: a link in
/// /usr/local/bin, unless something else is there. Returns how to run it.
fn install_cup(cup: &Path) -> String {
    // Its bash completion and man pages too, where nothing of someone
    // else's is in the way.
    let dir = cup.parent().unwrap_or(Path::new("."));
    for (ours, link) in [
        (
            dir.join("completions/cup.bash"),
            Path::new("/usr/share/bash-completion/completions/cup"),
        ),
        (
            dir.join("man/man1/cup.1"),
            Path::new("/usr/local/share/man/man1/cup.1"),
        ),
    ] {
        if ours.exists()
            && link.parent().is_some_and(Path::is_dir)
            && std::fs::symlink_metadata(link).is_err()
        {
            let _ = std::os::unix::fs::symlink(&ours, link);
        }
    }
    let link = Path::new("/usr/local/bin/cup");
    let ours = std::fs::read_link(link).is_ok_and(|t| t == cup);
    if ours {
        return "cup".into();
    }
    if !link.exists() && std::os::unix::fs::symlink(cup, link).is_ok() {
        eprintln!("==> linked {} to {}", link.display(), cup.display());
        return "cup".into();
    }
    cup.display().to_string()
}

/// Context `appliance` (cup's current one from now on): the machine just
/// booted, through its forwarded admin gateway.
fn write_context(cup: &Path, admin: &str, certs: &Path) -> Result<()> {
    let add = Command::new(cup)
        .args([
            "context",
            "add",
            "appliance",
            "--remote",
            admin,
            "--tls-dir",
        ])
        .arg(certs)
        .args([
            "--description",
            "the appliance `cargo xtask run` boots",
            "--made-by",
            "cargo xtask run",
        ])
        .output()
        .context("run cup context add")?;
    let used = Command::new(cup)
        .args(["context", "use", "appliance"])
        .output()
        .context("run cup context use")?;
    for out in [add, used] {
        if !out.status.success() {
            bail!(
                "cup context: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    Ok(())
}

/// What to type in another terminal once the machine is up.
fn quick_start(cup: &str, ports: &[u16], taken: &[u16], metrics: &str) -> String {
    let web = ports.first().copied().unwrap_or(8080);
    let mut s = format!(
        "==> the appliance is up; cup's context `appliance` reaches it. In another terminal:\n\
         \x20     {cup} ps\n\
         \x20     {cup} units\n\
         \x20     {cup} run -d --name web -p {web}:80 nginx:alpine\n\
         \x20         (or an image in a registry on this machine: {reg}/NAME:TAG)\n\
         \x20     curl localhost:{web}\n\
         \x20     {cup} logs -f web\n\
         \x20     {cup} exec -it web sh\n\
         \x20     {cup} stop web\n\
         \x20     {cup} health    (and: {cup} top, {cup} dmesg)\n\
         \x20     curl {metrics}/metrics    (Prometheus metrics; or {cup} metrics)\n",
        reg = qemu_tests::run_machine::LOCAL_REGISTRY,
    );
    if let (Some(first), Some(last)) = (ports.first(), ports.last()) {
        s.push_str(&format!(
            "    the appliance's ports {first}-{last} are localhost's{}\n",
            if taken.is_empty() {
                String::new()
            } else {
                format!(" (not {taken:?}: taken here)")
            }
        ));
    }
    s.push_str("    Ctrl-C here presses its power button");
    s
}

pub(crate) fn run(once: bool) -> Result<()> {
    let artifacts = build()?;
    let once = once || !std::io::stdin().is_terminal();
    let certs = cup_config_dir().join("appliance");
    if qemu_tests::run_machine::ensure_certs(&certs)? {
        eprintln!(
            "==> made the appliance's admin certificates in {} (kept for the next runs)",
            certs.display()
        );
    }
    let machine = qemu_tests::run_machine::run_machine("run", &artifacts, &certs, &[])?;
    let mut cfg = machine.cfg;
    cfg.echo = true;
    let cup = cup_binary();
    let cup_cmd = if once {
        cup.display().to_string()
    } else {
        write_context(&cup, &machine.admin, &certs)?;
        install_cup(&cup)
    };
    let mut announced = once;
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
        if !announced
            && s.contains("phase units: done")
            && s.contains("admin: cup --remote on")
            && s.contains("unit vmmd: ready")
        {
            announced = true;
            eprintln!(
                "\n{}\n",
                quick_start(&cup_cmd, &machine.ports, &machine.taken, &machine.metrics)
            );
        }
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
