//! `init`: steelcup's host PID 1, or a unit supervisor under another init.
//!
//! As PID 1 it boots the machine in named phases, starts the units in
//! `/etc/steelcup/units`, supervises them, and on SIGTERM/SIGPWR (the power
//! button) or SIGINT (ctrl-alt-del) stops them in order and powers off or
//! reboots. It never exits and never panics out of `main`: a fatal error is
//! logged, the disks synced and the machine powered off.
//!
//! Outside PID 1: `init --units DIR --run-dir DIR [--log-dir DIR] [--cgroup DIR]`
//! supervises the units in DIR as a child subreaper, serves the API on
//! `RUN-DIR/init.sock`, and stops its units and exits on SIGTERM or SIGINT.

use nix::sys::signal::Signal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use steelcup_init::api;
use steelcup_init::boot::{self, error_chain, phase};
use steelcup_init::supervisor::{self, Ending, Gate, Options, Supervisor};
use steelcup_os::logs::LogStore;
use steelcup_os::{provision, slots, state};
use steelcup_sys::{self as sys, PowerAction};

/// The open-file limit init raises itself to.
const NOFILE: u64 = 65536;
use steelcup_units as units;

struct Args {
    units: PathBuf,
    run_dir: PathBuf,
    log_dir: Option<PathBuf>,
    cgroup: Option<PathBuf>,
    /// PID 1 of a container or PID namespace, not of a machine.
    container: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        units: PathBuf::from("/etc/steelcup/units"),
        run_dir: PathBuf::from("/run/steelcup"),
        log_dir: None,
        cgroup: None,
        container: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--units" => args.units = it.next().ok_or("--units needs a directory")?.into(),
            "--run-dir" => args.run_dir = it.next().ok_or("--run-dir needs a directory")?.into(),
            "--log-dir" => {
                args.log_dir = Some(it.next().ok_or("--log-dir needs a directory")?.into())
            }
            "--container" => args.container = true,
            "--cgroup" => {
                args.cgroup = Some(
                    it.next()
                        .ok_or("--cgroup needs a cgroup v2 directory")?
                        .into(),
                )
            }
            // The kernel passes unknown command-line words to init; ignore them as PID 1.
            _ if sys::is_pid1() => {}
            other => return Err(format!("unknown argument {other:?}; see --help")),
        }
    }
    Ok(args)
}

fn run(pid1: bool) -> Result<PowerAction, String> {
    let args = parse_args()?;
    let signals = [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGPWR,
        Signal::SIGHUP,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ];
    // Block signals before any thread exists, so every thread inherits the mask.
    let mut sfd = sys::signalfd(&signals).map_err(|e| error_chain(&e))?;
    let mut booted = None;
    let container = pid1 && boot::in_container(args.container);
    if container {
        tracing::info!(
            "steelcup init {} starting as PID 1 of a container: the machine's phases are left to the host",
            env!("CARGO_PKG_VERSION")
        );
        phase("early-mounts", || boot::early_mounts(true)).map_err(|e| error_chain(&e))?;
    } else if pid1 {
        tracing::info!(
            "steelcup init {} starting as PID 1",
            env!("CARGO_PKG_VERSION")
        );
        phase("early-mounts", || boot::early_mounts(false)).map_err(|e| error_chain(&e))?;
        phase("kmsg-logging", steelcup_init::log_to_kmsg)
            .unwrap_or_else(|e| tracing::warn!("/dev/kmsg: {e}; logging to the console only"));
        if let Err(e) = sys::disable_ctrl_alt_del() {
            tracing::warn!("{}", error_chain(&e));
        }
        phase("modules", boot::load_modules);
        booted = phase("state", || {
            let parts = state::partitions(Path::new("/sys/class/block"));
            state::report(&state::mount_state(&parts));
            slots::Booted::probe(&parts).unwrap_or_else(|e| {
                tracing::error!("slots: {e}; the health gate will not mark this boot");
                None
            })
        });
        if let Some(b) = &booted {
            tracing::info!("slots: {}", b.env.describe());
            if let Some(slot) = b.env.passed_over() {
                tracing::warn!(
                    "slots: slot {slot} was first but did not come up; rolled back to slot {}",
                    b.env.booted().unwrap_or("?")
                );
            }
        }
        // The machine config (docs/provisioning.md), applied once onto /var
        // and installed into /etc/steelcup before the phases that read it.
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        phase("provision", || provision_local(&cmdline));
        phase("hostname", boot::hostname)
            .unwrap_or_else(|e| tracing::error!("{}", error_chain(&e)));
        phase("entropy", boot::entropy);
        steelcup_init::power::watch();
        phase("network", steelcup_init::network::bring_up);
        if let Some(url) = provision::url_from_cmdline(&cmdline) {
            phase("provision-url", || provision_url(&url));
        }
    } else {
        nix::sys::prctl::set_child_subreaper(true)
            .map_err(|e| format!("set child subreaper: {e}"))?;
    }
    sys::mkdir_p(&args.run_dir).map_err(|e| error_chain(&e))?;
    // Every API client is a descriptor (or two); services inherit the
    // limit set in their unit, not this one.
    let nofile = sys::raise_nofile(NOFILE);
    tracing::debug!("open-file limit {nofile}");
    let cgroup = match (&args.cgroup, pid1) {
        (Some(dir), _) => Some(dir.clone()),
        (None, true) => boot::unit_cgroups(),
        (None, false) => None,
    };
    let log_dir = args.log_dir.clone().or_else(|| {
        Some(if pid1 {
            PathBuf::from("/var/log/steelcup")
        } else {
            args.run_dir.join("logs")
        })
    });
    let logs = Arc::new(LogStore::new(log_dir, true));
    let (handle, control) = api::dbus::channel().map_err(|e| format!("API channel: {e}"))?;
    // Units `cup apply` installed are kept on a state partition; a machine
    // with its /var in memory keeps them until it powers off.
    let machine = pid1 && !container;
    let applied_dir = machine.then(|| PathBuf::from(supervisor::apply::APPLIED_DIR));
    let mut sup = phase("units", || {
        if let Some(dir) = &applied_dir {
            let n = supervisor::apply::install_applied(dir, &args.units);
            if n > 0 {
                tracing::info!("{n} units applied with cup apply, from {}", dir.display());
            }
        }
        let (found, errors) = units::load_dir(&args.units);
        for e in &errors {
            tracing::error!("{}", error_chain(e));
        }
        tracing::info!(
            "{} units in {} ({} refused)",
            found.len(),
            args.units.display(),
            errors.len()
        );
        let opts = Options {
            units_dir: args.units.clone(),
            applied_dir: applied_dir.clone(),
            machine_dir: machine.then(|| PathBuf::from(provision::APPLIED_DIR)),
            etc_dir: PathBuf::from(boot::ETC),
            run_dir: args.run_dir.clone(),
            cgroup,
            pid1,
        };
        let mut sup = Supervisor::new(found, opts, logs.clone());
        sup.refuse_files(&errors);
        // The OS slots' methods (cup update, rollback) for init as PID 1.
        let slots = machine.then(|| api::slots::Slots {
            class_block: PathBuf::from("/sys/class/block"),
            passed_over: booted.as_ref().and_then(|b| b.env.passed_over()),
            key_file: PathBuf::from(steelcup_os::update::KEY_PATH),
        });
        match api::dbus::serve(&args.run_dir.join(api::SOCKET), handle, logs.clone(), slots) {
            Ok(observer) => sup.observe(observer),
            Err(e) => tracing::error!(
                "API socket in {}: {e}; cup cannot reach init",
                args.run_dir.display()
            ),
        }
        if let Some(b) = booted.take() {
            sup.set_gate(health_gate(b, &sup.kernel_cmdline));
        }
        sup.start_ready(std::time::Instant::now());
        sup
    });
    match sup.run(&mut sfd, Some(&control)) {
        Ending::Power(action) => Ok(action),
    }
}

/// The `provision` phase: a config drive, else (unless a URL is given on
/// the command line, applied after the network) the image's own
/// `machine.toml`; then what was applied is installed.
fn provision_local(cmdline: &str) {
    let etc = Path::new(boot::ETC);
    let dir = Path::new(provision::APPLIED_DIR);
    let found = match provision::find_drive(Path::new("/sys/class/block"), Path::new("/dev")) {
        Ok(Some((dev, text))) => Some((format!("config drive {}", dev.display()), text)),
        Ok(None) => None,
        Err(e) => {
            // A drive that cannot be read stops provisioning (no other
            // source stands in for it); what was applied before is still
            // installed.
            provision::report(&Err(e));
            if provision::applied(dir).is_some() {
                provision::report(&provision::provision(dir, etc, None));
            }
            return;
        }
    };
    let url = provision::url_from_cmdline(cmdline);
    let found = found.or_else(|| {
        if url.is_some() {
            return None;
        }
        let baked = etc.join(provision::FILE);
        let text = std::fs::read_to_string(&baked).ok()?;
        Some((format!("the image's {}", baked.display()), text))
    });
    if found.is_none() && url.is_some() && provision::applied(dir).is_none() {
        tracing::info!(
            "provision: the machine config comes from {} after the network phase",
            url.unwrap_or_default()
        );
        return;
    }
    provision::report(&provision::provision(dir, etc, found));
}

/// `provision-url`: `steelcup.config=URL` fetched (once the network has an
/// address) and applied, unless a config was applied before.
fn provision_url(url: &str) {
    let dir = Path::new(provision::APPLIED_DIR);
    if provision::applied(dir).is_some() {
        return;
    }
    let found = match provision::fetch(url, Duration::from_secs(60)) {
        Ok(text) => Some((url.to_string(), text)),
        Err(e) => {
            provision::report(&Err(e));
            return;
        }
    };
    let outcome = provision::provision(dir, Path::new(boot::ETC), found);
    let applied = outcome.is_ok();
    provision::report(&outcome);
    if applied {
        boot::hostname().unwrap_or_else(|e| tracing::error!("{}", error_chain(&e)));
    }
}

/// How long the health gate waits for every service by default
/// (`steelcup.health-timeout=SECONDS` on the kernel command line).
const HEALTH_TIMEOUT: Duration = Duration::from_secs(300);

/// The boot's health gate for a disk boot: passing marks the booted slot
/// good; failing reboots when the other slot has tries left (GRUB then goes
/// back to it once this one's are spent), and otherwise leaves the machine
/// up as it is.
fn health_gate(mut booted: slots::Booted, cmdline: &str) -> Gate {
    let timeout = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("steelcup.health-timeout="))
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(HEALTH_TIMEOUT);
    let fallback = booted.env.fallback();
    let slot = booted.env.booted().unwrap_or("?").to_string();
    let this = slot.clone();
    Gate {
        deadline: std::time::Instant::now() + timeout,
        on_pass: Box::new(move || match booted.passed() {
            Ok(()) => tracing::info!("slots: slot {slot} marked good ({})", booted.env.describe()),
            Err(e) => tracing::error!("slots: marking slot {slot} good: {e}"),
        }),
        on_fail: Box::new(move |_why| match fallback {
            Some(other) => {
                tracing::error!("slots: slot {this} is not good; slot {other} has tries left");
                true
            }
            None => {
                tracing::error!(
                    "slots: slot {this} is not good, and no other slot can boot; staying up"
                );
                false
            }
        }),
    }
}

/// `init --help`.
const USAGE: &str =
    "usage: init [--units DIR] [--run-dir DIR] [--log-dir DIR] [--cgroup DIR] [--container]
       init time-sync   (the time-sync unit: the clock kept right from NTP
                         servers, /etc/steelcup/time.toml)

steelcup's init: PID 1 of a steelcup machine, or a supervisor of the unit
files in DIR (default /etc/steelcup/units) anywhere else.
  --units DIR    the unit files
  --run-dir DIR  where the API socket (init.sock) and the units' notify
                 sockets go (default /run/steelcup)
  --log-dir DIR  keep each unit's log in DIR/NAME.log too
  --cgroup DIR   a cgroup v2 directory to put each service in
  --container    as PID 1 of a container or PID namespace (also when the
                 environment has container=...): only the pseudo
                 filesystems that are not mounted yet, then the units;
                 no modules, state partition, machine config or host
                 network";

fn main() {
    let pid1 = sys::is_pid1();
    // As PID 1 the kernel's leftover command-line words are not ours to
    // answer; anywhere else --help is a request.
    if !pid1 && std::env::args().skip(1).any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return;
    }
    steelcup_init::init_logging();
    if !pid1 && std::env::args().nth(1).as_deref() == Some("time-sync") {
        std::process::exit(steelcup_init::timesync::run());
    }
    if pid1 {
        // Release builds abort on panic, so nothing unwinds to main: the hook
        // is PID 1's last word. Log, sync, power off — never let the kernel
        // panic because init died.
        std::panic::set_hook(Box::new(|info| {
            tracing::error!("fatal: internal error: {info}; syncing disks and powering off");
            let err = sys::power(PowerAction::PowerOff);
            tracing::error!("{}; halting", error_chain(&err));
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }));
    }
    // PID 1 must never unwind out of main: a panic here would panic the kernel.
    let outcome = std::panic::catch_unwind(|| run(pid1));
    let action = match outcome {
        Ok(Ok(action)) => action,
        Ok(Err(e)) => {
            tracing::error!("fatal: {e}");
            if !pid1 {
                std::process::exit(1);
            }
            PowerAction::PowerOff
        }
        Err(_) => {
            tracing::error!("fatal: internal error (panic); powering off");
            if !pid1 {
                std::process::exit(101);
            }
            PowerAction::PowerOff
        }
    };
    if !pid1 {
        tracing::info!("all units stopped; exiting");
        return;
    }
    boot::save_seed();
    state::settle();
    tracing::info!(
        "syncing disks and {}",
        match action {
            PowerAction::PowerOff => "powering off",
            PowerAction::Reboot => "rebooting",
        }
    );
    let err = sys::power(action);
    tracing::error!("{}; halting", error_chain(&err));
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
