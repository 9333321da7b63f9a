//! The resident daemon: turns `[microvm]` units into running VMs, one worker
//! process each, and reports how each one ended.
//!
//! # Design
//! The main thread owns all state and waits on one channel for events: a
//! worker ended (with its report), a signal arrived, a restart is due. Each
//! worker has a monitor thread that feeds it its config, echoes its guest
//! output as `NAME | line` and its logs, waits for it, and sends the report.
//! Restart policy: `no`, `on-failure`, `always`, with backoff from 1 s
//! doubling to 30 s.
//!
//! # Limitations
//! No D-Bus API, no reload, no replicas, no warm pool yet; stop kills the
//! worker rather than asking the guest first.

use crate::config::{VmConfig, VmOutcome, WorkerReport, DEFAULT_CMDLINE, REPORT_PREFIX};
use nix::sys::signal::Signal;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use steelcup_init::guest::GuestConfig;
use steelcup_init::units::{self, MicrovmSection, Restart, UnitKind};

/// Where the image puts the default guest kernel and initramfs.
pub const DEFAULT_KERNEL: &str = "/usr/lib/steelcup/guest/vmlinuz";
pub const DEFAULT_INITRAMFS: &str = "/usr/lib/steelcup/guest/initramfs.cpio";

/// The longest guest output line vmmd passes on; longer ones are split.
const MAX_LINE: u64 = 4096;

/// Daemon settings.
#[derive(Debug, Clone)]
pub struct Options {
    pub units: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// Path of the `vmmd` binary to start workers with.
    pub worker_exe: PathBuf,
}

enum Event {
    Ended { name: String, report: WorkerReport },
    Signal(Signal),
}

struct Workload {
    spec: MicrovmSection,
    pid: Option<i32>,
    restart_at: Option<Instant>,
    backoff: Duration,
    runs: u64,
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(opts: Options) -> Result<(), String> {
    let sfd = steelcup_init::sys::signalfd(&[Signal::SIGTERM, Signal::SIGINT])
        .map_err(|e| crate::worker::error_chain(&e))?;
    let (tx, rx) = mpsc::channel::<Event>();
    let sig_tx = tx.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
            use std::os::fd::AsFd;
            let mut fds = [PollFd::new(sfd.as_fd(), PollFlags::POLLIN)];
            let _ = poll(&mut fds, PollTimeout::NONE);
            while let Ok(Some(info)) = sfd.read_signal() {
                if let Ok(sig) = Signal::try_from(info.ssi_signo as i32) {
                    if sig_tx.send(Event::Signal(sig)).is_err() {
                        return;
                    }
                }
            }
        })
        .map_err(|e| format!("spawn signal thread: {e}"))?;

    let (found, errors) = units::load_dir(&opts.units);
    for e in &errors {
        tracing::error!("{}", crate::worker::error_chain(e));
    }
    let mut workloads: BTreeMap<String, Workload> = found
        .into_iter()
        .filter_map(|u| match u.kind {
            UnitKind::Microvm(spec) => Some((
                u.name,
                Workload {
                    spec,
                    pid: None,
                    restart_at: Some(Instant::now()),
                    backoff: Duration::from_secs(1),
                    runs: 0,
                },
            )),
            UnitKind::Service(_) => None,
        })
        .collect();
    tracing::info!(
        "vmmd {} ready: {} microvm units in {}",
        env!("CARGO_PKG_VERSION"),
        workloads.len(),
        opts.units.display()
    );

    loop {
        let now = Instant::now();
        for (name, w) in workloads.iter_mut() {
            if w.pid.is_none() && w.restart_at.is_some_and(|t| t <= now) {
                w.restart_at = None;
                w.runs += 1;
                match start(&opts, name, &w.spec, tx.clone()) {
                    Ok(pid) => w.pid = Some(pid),
                    Err(e) => {
                        tracing::error!("workload {name}: cannot start worker: {e}");
                    }
                }
            }
        }
        let timeout = workloads
            .values()
            .filter_map(|w| w.restart_at)
            .min()
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(3600));
        match rx.recv_timeout(timeout) {
            Ok(Event::Signal(sig)) => {
                tracing::info!(
                    "{sig}: stopping {} workloads",
                    workloads.values().filter(|w| w.pid.is_some()).count()
                );
                stop_all(&mut workloads, &rx);
                tracing::info!("vmmd stopped");
                return Ok(());
            }
            Ok(Event::Ended { name, report }) => {
                let Some(w) = workloads.get_mut(&name) else {
                    continue;
                };
                w.pid = None;
                tracing::info!(
                    "workload {name}: {} after {:.2}s",
                    report.outcome,
                    report.run_ms as f64 / 1000.0
                );
                let again = match w.spec.restart {
                    Restart::Always => true,
                    Restart::OnFailure => !report.outcome.success(),
                    Restart::No => false,
                };
                if again {
                    tracing::info!("workload {name}: restarting in {}s", w.backoff.as_secs());
                    w.restart_at = Some(Instant::now() + w.backoff);
                    w.backoff = (w.backoff * 2).min(Duration::from_secs(30));
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return Err("event channel closed".into()),
        }
    }
}

fn stop_all(workloads: &mut BTreeMap<String, Workload>, rx: &mpsc::Receiver<Event>) {
    for (name, w) in workloads.iter() {
        if let Some(pid) = w.pid {
            tracing::info!("workload {name}: stopping");
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while workloads.values().any(|w| w.pid.is_some()) {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Event::Ended { name, .. }) => {
                if let Some(w) = workloads.get_mut(&name) {
                    w.pid = None;
                    tracing::info!("workload {name}: stopped");
                }
            }
            Ok(Event::Signal(_)) => {}
            Err(_) => break,
        }
    }
}

fn vm_config(opts: &Options, name: &str, spec: &MicrovmSection) -> VmConfig {
    VmConfig {
        name: name.to_string(),
        kernel: spec.kernel.clone().unwrap_or_else(|| opts.kernel.clone()),
        initramfs: spec
            .initramfs
            .clone()
            .unwrap_or_else(|| opts.initramfs.clone()),
        cmdline: DEFAULT_CMDLINE.to_string(),
        vcpus: spec.vcpus,
        memory_mib: spec.memory.mib(),
        guest: GuestConfig {
            cmd: spec.cmd.clone(),
            env: spec.env.clone(),
            workdir: None,
            hostname: Some(name.to_string()),
        },
    }
}

/// Starts a worker for `name`; a monitor thread reports its end on `tx`.
fn start(
    opts: &Options,
    name: &str,
    spec: &MicrovmSection,
    tx: mpsc::Sender<Event>,
) -> Result<i32, String> {
    if let Some(image) = &spec.image {
        return Err(format!(
            "image {image:?}: running OCI images is not supported by this vmmd yet"
        ));
    }
    let config = serde_json::to_vec(&vm_config(opts, name, spec)).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(&opts.worker_exe);
    steelcup_init::sys::reset_signal_mask(&mut cmd);
    let mut child = cmd
        .arg("worker")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", opts.worker_exe.display()))?;
    let pid = child.id() as i32;
    tracing::info!("workload {name}: starting microVM (worker pid {pid})");
    let mut stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let name = name.to_string();
    std::thread::Builder::new()
        .name(format!("worker-{name}"))
        .spawn(move || {
            if let Some(mut s) = stdin.take() {
                let _ = s.write_all(&config);
            }
            let out_thread = stdout.map(|o| {
                let name = name.clone();
                std::thread::spawn(move || echo_guest(&name, o))
            });
            let report = stderr.and_then(|e| read_report(&name, e));
            let status = child.wait();
            if let Some(t) = out_thread {
                let _ = t.join();
            }
            let report = report.unwrap_or_else(|| WorkerReport {
                outcome: VmOutcome::VmmError {
                    message: format!("worker ended without a report ({status:?})"),
                },
                run_ms: 0,
            });
            let _ = tx.send(Event::Ended { name, report });
        })
        .map_err(|e| format!("spawn monitor thread: {e}"))?;
    Ok(pid)
}

/// Passes guest output on as `NAME | line`, lines capped at [`MAX_LINE`].
fn echo_guest(name: &str, out: impl Read) {
    let mut r = BufReader::new(out);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut r).take(MAX_LINE).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end_matches(['\n', '\r']);
                let mut so = std::io::stdout().lock();
                let _ = writeln!(so, "{name} | {text}");
                let _ = so.flush();
            }
        }
    }
}

/// Passes worker logs on and returns its report.
fn read_report(name: &str, err: impl Read) -> Option<WorkerReport> {
    let mut report = None;
    for line in BufReader::new(err).lines().map_while(Result::ok) {
        if let Some(json) = line.strip_prefix(REPORT_PREFIX) {
            match serde_json::from_str(json) {
                Ok(r) => report = Some(r),
                Err(e) => tracing::error!("workload {name}: unreadable worker report: {e}"),
            }
        } else {
            eprintln!("{name}: {line}");
        }
    }
    report
}

/// The default options for the appliance.
pub fn default_options(units: &Path) -> Options {
    Options {
        units: units.to_path_buf(),
        kernel: DEFAULT_KERNEL.into(),
        initramfs: DEFAULT_INITRAMFS.into(),
        worker_exe: std::env::current_exe().unwrap_or_else(|_| "/usr/bin/vmmd".into()),
    }
}
