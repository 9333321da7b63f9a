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
//! The API (`org.steelcup.Vmm1`, see [`crate::api`]) reaches the loop as
//! events too; pause and resume go to the worker over its stdin.
//!
//! Workloads come from unit files and from `cup run` (transient; `--rm`
//! ones are forgotten when they end). A workload with an image is
//! prepared (pulled, root image built) by a thread before its first boot.
//!
//! # Limitations
//! No reload, no replicas, no health checks, no warm pool yet.

use crate::api::{self, Action, ApiError, Reply, VmInfo};
use crate::config::{
    DiskConfig, NetConfig, VmConfig, VmOutcome, VsockConfig, WorkerReport, CONTROL_PREFIX,
    DEFAULT_CMDLINE, REPORT_PREFIX,
};
use crate::image::source::PullOptions;
use crate::image::workload::{Merged, Prepared};
use nix::sys::signal::Signal;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use steelcup_init::guest::{disk_device, GuestConfig, GuestNetwork, GuestVolume};
use steelcup_init::units::{self, MicrovmSection, Network, Restart, UnitKind};

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
    /// vmmd's state: volumes under `volumes/UNIT/NAME.img`.
    pub state_dir: PathBuf,
    /// Runtime files: each VM's vsock socket under `vsock/NAME.sock`.
    pub run_dir: PathBuf,
    /// The API socket (`org.steelcup.Vmm1`).
    pub api_socket: PathBuf,
    /// Where each VM gets a cgroup v2 with its limits; None: no cgroups.
    pub cgroup_root: Option<PathBuf>,
    /// Workers jail themselves in a mount namespace (needs root).
    pub jail: bool,
    /// Registries (`host[:port]`) pulled from over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// Pulls in flight, by source: shared by the threads doing them and
    /// the API.
    pub pulls: Pulls,
    /// How the last removed workloads (`cup run --rm`) ended, newest last,
    /// so `cup run` can say why a VM it waited for is gone.
    pub removed: std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<(String, String)>>>,
}

/// How many removed workloads' outcomes vmmd remembers.
const REMEMBER_REMOVED: usize = 64;

/// Pulls in flight, by source.
pub type Pulls = std::sync::Arc<std::sync::Mutex<BTreeMap<String, api::PullInfo>>>;

/// A progress callback that records a pull of `source` in `pulls`, and a
/// guard that forgets it when dropped.
fn track(pulls: &Pulls, source: &str) -> (impl FnMut(crate::image::source::Progress), PullGuard) {
    let (p, s) = (pulls.clone(), source.to_string());
    let report = move |x: crate::image::source::Progress| {
        let info = api::PullInfo {
            source: s.clone(),
            digest: x.digest,
            done: x.done,
            total: x.total,
        };
        p.lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(s.clone(), info);
    };
    (report, PullGuard(pulls.clone(), source.to_string()))
}

struct PullGuard(Pulls, String);

impl Drop for PullGuard {
    fn drop(&mut self) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.1);
    }
}

/// Where vmmd keeps runtime files on the appliance.
pub const DEFAULT_RUN_DIR: &str = "/run/steelcup/vmmd";

/// Where vmmd keeps its state on the appliance.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/steelcup";

enum Event {
    Ended {
        name: String,
        report: WorkerReport,
    },
    Signal(Signal),
    Api(api::Request),
    /// A workload's image is pulled and its root image built (or not).
    Prepared {
        name: String,
        result: Result<Prepared, String>,
    },
}

struct Workload {
    spec: MicrovmSection,
    /// The guest's vsock context id, fixed for the daemon's life.
    cid: u32,
    pid: Option<i32>,
    /// The running worker's control channel.
    control: Option<WorkerControl>,
    paused: bool,
    restart_at: Option<Instant>,
    backoff: Duration,
    runs: u64,
    last_outcome: String,
    /// Asked to stop through the API: killed at `kill_at` if still
    /// running, not restarted, and the callers answered when it ends.
    stopping: Option<Stopping>,
    /// The workload's image, ready to boot (units with `image`).
    prepared: Option<Prepared>,
    /// A thread is pulling the image or building its root image.
    preparing: bool,
    /// Made by `cup run`, not by a unit file.
    transient: bool,
    /// Forgotten once it has ended (`cup run --rm`).
    remove_when_done: bool,
    /// The next boot waits for `cup` to attach to the workload's stdio
    /// (with a terminal when `tty`).
    attach: bool,
    tty: bool,
}

impl Workload {
    /// `running`, `paused`, `stopping`, `preparing` (its image), `waiting`
    /// (for a restart) or `ended`.
    fn state(&self) -> &'static str {
        match (self.pid, self.paused, self.restart_at) {
            (Some(_), _, _) if self.stopping.is_some() => "stopping",
            (Some(_), true, _) => "paused",
            (Some(_), false, _) => "running",
            (None, _, _) if self.preparing => "preparing",
            (None, _, Some(_)) => "waiting",
            (None, _, None) => "ended",
        }
    }

    fn new(spec: MicrovmSection, cid: u32) -> Workload {
        Workload {
            spec,
            cid,
            pid: None,
            control: None,
            paused: false,
            restart_at: Some(Instant::now()),
            backoff: Duration::from_secs(1),
            runs: 0,
            last_outcome: String::new(),
            stopping: None,
            prepared: None,
            preparing: false,
            transient: false,
            remove_when_done: false,
            attach: false,
            tty: false,
        }
    }
}

struct Stopping {
    kill_at: Instant,
    replies: Vec<futures_channel::oneshot::Sender<Result<Reply, ApiError>>>,
}

/// A worker's stdin (commands) and its answers (from its stderr).
struct WorkerControl {
    commands: ChildStdin,
    answers: mpsc::Receiver<String>,
}

/// How long a worker has to answer a control command.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

impl WorkerControl {
    /// Sends `command`; Ok with the worker's answer, Err with why not.
    fn ask(&mut self, command: &str) -> Result<String, String> {
        while self.answers.try_recv().is_ok() {}
        writeln!(self.commands, "{command}")
            .and_then(|_| self.commands.flush())
            .map_err(|e| format!("worker control channel: {e}"))?;
        match self.answers.recv_timeout(CONTROL_TIMEOUT) {
            Ok(a) => match a.strip_prefix("error: ") {
                Some(e) => Err(e.to_string()),
                None => Ok(a),
            },
            Err(_) => Err(format!(
                "the worker did not answer {command:?} within {}s",
                CONTROL_TIMEOUT.as_secs()
            )),
        }
    }
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
    let cmdline = units::kernel_cmdline();
    let mut workloads: BTreeMap<String, Workload> = found
        .into_iter()
        .filter(|u| match u.unit.unmet_condition(&cmdline) {
            Some(c) => {
                tracing::info!(
                    "workload {}: skipped: condition-kernel-cmdline {c:?} not met",
                    u.name
                );
                false
            }
            None => true,
        })
        .filter_map(|u| match u.kind {
            UnitKind::Microvm(spec) => Some((u.name, spec)),
            UnitKind::Service(_) => None,
        })
        .enumerate()
        .map(|(i, (name, spec))| (name, Workload::new(spec, 3 + i as u32)))
        .collect();
    for dir in [
        opts.run_dir.join("vsock"),
        crate::jail::mount::scratch_dir(&opts.run_dir),
    ] {
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    }
    let (api_tx, api_rx) = mpsc::channel::<api::Request>();
    api::serve(&opts.api_socket, api_tx)
        .map_err(|e| format!("serve the API on {}: {e}", opts.api_socket.display()))?;
    let fwd = tx.clone();
    std::thread::Builder::new()
        .name("api-forward".into())
        .spawn(move || {
            for r in api_rx {
                if fwd.send(Event::Api(r)).is_err() {
                    return;
                }
            }
        })
        .map_err(|e| format!("spawn API thread: {e}"))?;
    notify_ready();
    tracing::info!(
        "vmmd {} ready: {} microvm units in {}",
        env!("CARGO_PKG_VERSION"),
        workloads.len(),
        opts.units.display()
    );

    loop {
        let now = Instant::now();
        for (name, w) in workloads.iter_mut() {
            if let (Some(s), Some(pid)) = (&mut w.stopping, w.pid) {
                if s.kill_at <= now {
                    tracing::warn!(
                        "workload {name}: still running {}s after it was asked to stop; killing its worker",
                        STOP_GRACE.as_secs()
                    );
                    let _ =
                        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
                    s.kill_at = now + Duration::from_secs(3600);
                }
            }
            if w.pid.is_none() && w.restart_at.is_some_and(|t| t <= now) {
                w.restart_at = None;
                if let (Some(image), None) = (&w.spec.image, &w.prepared) {
                    if !w.preparing {
                        w.preparing = true;
                        spawn_prepare(&opts, name, image, tx.clone());
                    }
                    continue;
                }
                w.runs += 1;
                let stdio = (std::mem::take(&mut w.attach), w.tty);
                match start(
                    &opts,
                    name,
                    &w.spec,
                    w.prepared.as_ref(),
                    stdio,
                    w.cid,
                    tx.clone(),
                ) {
                    Ok((pid, control)) => {
                        w.pid = Some(pid);
                        w.control = Some(control);
                        w.paused = false;
                    }
                    Err(e) => {
                        tracing::error!("workload {name}: cannot start worker: {e}");
                    }
                }
            }
        }
        let timeout = workloads
            .values()
            .filter_map(|w| w.restart_at)
            .chain(
                workloads
                    .values()
                    .filter_map(|w| w.stopping.as_ref().map(|s| s.kill_at)),
            )
            .min()
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(3600));
        match rx.recv_timeout(timeout) {
            Ok(Event::Signal(sig)) => {
                tracing::info!(
                    "{sig}: stopping {} workloads",
                    workloads.values().filter(|w| w.pid.is_some()).count()
                );
                stop_all(&opts, &mut workloads, &rx);
                tracing::info!("vmmd stopped");
                return Ok(());
            }
            Ok(Event::Ended { name, report }) => {
                let Some(w) = workloads.get_mut(&name) else {
                    continue;
                };
                w.pid = None;
                w.control = None;
                w.paused = false;
                w.last_outcome = report.outcome.to_string();
                tracing::info!(
                    "workload {name}: {} after {:.2}s",
                    report.outcome,
                    report.run_ms as f64 / 1000.0
                );
                if let Some(s) = w.stopping.take() {
                    tracing::info!("workload {name}: stopped");
                    for r in s.replies {
                        let _ = r.send(Ok(Reply::Done));
                    }
                    if w.remove_when_done {
                        forget(&opts, &mut workloads, &name);
                    }
                    continue;
                }
                let again = match w.spec.restart {
                    Restart::Always => true,
                    // A reboot from inside asks for the workload again.
                    Restart::OnFailure => {
                        !report.outcome.success() || report.outcome == VmOutcome::Rebooted
                    }
                    Restart::No => false,
                };
                if again {
                    tracing::info!("workload {name}: restarting in {}s", w.backoff.as_secs());
                    w.restart_at = Some(Instant::now() + w.backoff);
                    w.backoff = (w.backoff * 2).min(Duration::from_secs(30));
                } else if w.remove_when_done {
                    forget(&opts, &mut workloads, &name);
                }
            }
            Ok(Event::Api(req)) => execute(&opts, &mut workloads, req),
            Ok(Event::Prepared { name, result }) => {
                let Some(w) = workloads.get_mut(&name) else {
                    continue;
                };
                w.preparing = false;
                match result {
                    Ok(p) => {
                        tracing::info!("workload {name}: image {} ready", p.digest);
                        w.prepared = Some(p);
                        w.restart_at = Some(Instant::now());
                    }
                    Err(e) if w.transient => {
                        // `cup run` reports it; nobody asked for retries.
                        tracing::error!(
                            "workload {name}: image {}: {e}",
                            w.spec.image.as_deref().unwrap_or_default()
                        );
                        w.last_outcome = format!("image failed: {e}");
                        w.restart_at = None;
                        if w.remove_when_done {
                            forget(&opts, &mut workloads, &name);
                        }
                    }
                    Err(e) => {
                        tracing::error!(
                            "workload {name}: image {}: {e}; trying again in {}s",
                            w.spec.image.as_deref().unwrap_or_default(),
                            w.backoff.as_secs()
                        );
                        w.last_outcome = format!("image failed: {e}");
                        w.restart_at = Some(Instant::now() + w.backoff);
                        w.backoff = (w.backoff * 2).min(Duration::from_secs(30));
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return Err("event channel closed".into()),
        }
    }
}

/// Tells the supervisor (init, or anything speaking sd_notify) that the API
/// is served: `READY=1` to `$NOTIFY_SOCKET`, when there is one.
fn notify_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent =
        std::os::unix::net::UnixDatagram::unbound().and_then(|s| s.send_to(b"READY=1", &path));
    if let Err(e) = sent {
        tracing::warn!(
            "cannot tell {} that vmmd is ready: {e}",
            Path::new(&path).display()
        );
    }
}

/// Executes an API request on the daemon's state and answers it, or (a
/// stop) keeps the answer for when the VM has ended.
fn execute(opts: &Options, workloads: &mut BTreeMap<String, Workload>, req: api::Request) {
    if let Action::Stop(name) = &req.action {
        match workloads.get_mut(name) {
            None => {
                let _ = req.reply.send(Err(ApiError::NoSuchVm(name.clone())));
            }
            Some(w) if w.pid.is_none() => {
                // Not running: make sure it stays so.
                w.restart_at = None;
                let _ = req.reply.send(Ok(Reply::Done));
            }
            Some(w) => {
                w.restart_at = None;
                if let Some(s) = &mut w.stopping {
                    s.replies.push(req.reply);
                    return;
                }
                w.stopping = Some(Stopping {
                    kill_at: Instant::now() + STOP_GRACE,
                    replies: vec![req.reply],
                });
                resume_if_paused(w);
                let (uds, name) = (vsock_path(opts, name), name.clone());
                // The guest answers on its own time; the loop goes on.
                let _ = std::thread::Builder::new()
                    .name(format!("stop-{name}"))
                    .spawn(move || ask_to_stop(&uds, &name));
            }
        }
        return;
    }
    if let Action::Pull(source) = &req.action {
        let (store, source) = (opts.state_dir.clone(), source.clone());
        let pull = PullOptions {
            insecure: opts.insecure_registries.clone(),
            credentials: None,
        };
        let reply = req.reply;
        let pulls = opts.pulls.clone();
        let _ = std::thread::Builder::new()
            .name("pull".into())
            .spawn(move || {
                let (mut progress, _guard) = track(&pulls, &source);
                let answer = crate::image::store::Store::open(&store)
                    .map_err(|e| e.to_string())
                    .and_then(|s| {
                        crate::image::source::pull(&s, &source, &pull, &mut progress)
                            .map_err(|e| steelcup_init::boot::error_chain(&e))
                    })
                    .map(|(name, d)| Reply::Pulled {
                        name,
                        digest: d.to_string(),
                    })
                    .map_err(ApiError::Refused);
                let _ = reply.send(answer);
            });
        return;
    }
    let answer = match req.action {
        Action::Run(spec) => run_workload(workloads, spec),
        Action::Socket(name) => match workloads.get(&name) {
            None => {
                let removed = opts.removed.lock().unwrap_or_else(|e| e.into_inner());
                match removed.iter().rev().find(|(n, _)| *n == name) {
                    Some((_, outcome)) => Err(ApiError::Refused(format!(
                        "workload {name:?} ended ({outcome}) and was removed"
                    ))),
                    None => Err(ApiError::NoSuchVm(name)),
                }
            }
            Some(w) if w.pid.is_none() => Err(ApiError::Refused(format!(
                "workload {name:?} is not running"
            ))),
            Some(_) => Ok(Reply::Text(vsock_path(opts, &name).display().to_string())),
        },
        Action::Remove(name) => match workloads.get(&name) {
            None => Err(ApiError::NoSuchVm(name)),
            Some(w) if w.pid.is_some() || w.preparing => Err(ApiError::Refused(format!(
                "workload {name:?} is running; stop it first (or cup rm -f)"
            ))),
            Some(_) => {
                forget(opts, workloads, &name);
                Ok(Reply::Done)
            }
        },
        Action::Images | Action::RemoveImage(_) | Action::Prune => image_action(opts, req.action),
        Action::Inspect(name) => match workloads.get(&name) {
            None => Err(ApiError::NoSuchVm(name)),
            Some(w) => Ok(Reply::Text(inspect(opts, &name, w))),
        },
        Action::Kill(name, signal) => {
            match workloads.get(&name) {
                None => Err(ApiError::NoSuchVm(name)),
                Some(w) if w.pid.is_none() => Err(ApiError::Refused(format!(
                    "workload {name:?} is not running"
                ))),
                Some(_) if Signal::try_from(signal).is_err() => {
                    Err(ApiError::Refused(format!("{signal} is not a signal")))
                }
                Some(_) => {
                    // The guest answers on its own time; the loop goes on.
                    let uds = vsock_path(opts, &name);
                    let reply = req.reply;
                    let _ = std::thread::Builder::new()
                        .name(format!("kill-{name}"))
                        .spawn(move || {
                            let answer =
                                ask_guest(&uds, GUEST_CONTROL_PORT, &format!("kill {signal}"))
                                    .and_then(|a| {
                                        if a == "signalled" {
                                            Ok(Reply::Done)
                                        } else {
                                            Err(a)
                                        }
                                    })
                                    .map_err(|e| {
                                        ApiError::Refused(format!("workload {name:?}: {e}"))
                                    });
                            let _ = reply.send(answer);
                        });
                    return;
                }
            }
        }
        Action::Pulls => Ok(Reply::Pulls(
            opts.pulls
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .cloned()
                .collect(),
        )),
        action => execute_now(workloads, action),
    };
    let _ = req.reply.send(answer);
}

/// `cup inspect`: what vmmd knows of a workload.
fn inspect(opts: &Options, name: &str, w: &Workload) -> String {
    let v = serde_json::json!({
        "name": name,
        "state": w.state(),
        "pid": w.pid,
        "runs": w.runs,
        "last_outcome": w.last_outcome,
        "from": if w.transient { "cup run" } else { "unit" },
        "remove_when_done": w.remove_when_done,
        "vsock_cid": w.cid,
        "vsock_socket": vsock_path(opts, name),
        "address": tap_index(&w.spec, w.cid).ok().flatten().map(|n| format!("10.200.{n}.2")),
        "image": w.spec.image,
        "image_digest": w.prepared.as_ref().map(|p| p.digest.clone()),
        "root_image": w.prepared.as_ref().map(|p| p.rootfs.clone()),
        "spec": w.spec,
    });
    serde_json::to_string_pretty(&v).unwrap_or_default()
}

/// Forgets a workload that has ended (its vsock socket goes with it).
fn forget(opts: &Options, workloads: &mut BTreeMap<String, Workload>, name: &str) {
    if let Some(w) = workloads.remove(name) {
        let mut removed = opts.removed.lock().unwrap_or_else(|e| e.into_inner());
        removed.retain(|(n, _)| n != name);
        removed.push_back((name.to_string(), w.last_outcome));
        while removed.len() > REMEMBER_REMOVED {
            removed.pop_front();
        }
        let _ = std::fs::remove_file(vsock_path(opts, name));
        tracing::info!("workload {name}: removed");
    }
}

/// A workload for `cup run`.
fn run_workload(
    workloads: &mut BTreeMap<String, Workload>,
    spec: api::RunSpec,
) -> Result<Reply, ApiError> {
    let refused = |s: String| Err(ApiError::Refused(s));
    crate::image::source::Source::parse(&spec.image)
        .map_err(|e| ApiError::Refused(e.to_string()))?;
    let name = match spec.name {
        Some(n) => {
            if !units::valid_name(&n) {
                return refused(format!(
                    "name {n:?}: lowercase letters, digits, '.', '_', '-', at most 64"
                ));
            }
            if workloads.contains_key(&n) {
                return refused(format!(
                    "a workload named {n:?} exists; `cup rm {n}` first or pick another name"
                ));
            }
            n
        }
        None => (1..)
            .map(|i| format!("run-{i}"))
            .find(|n| !workloads.contains_key(n))
            .unwrap_or_default(),
    };
    let memory = match &spec.memory {
        Some(m) => units::MemSize::try_from(m.as_str())
            .map_err(|e| ApiError::Refused(format!("memory {m:?}: {e}")))?,
        None => units::MemSize::default(),
    };
    steelcup_init::guest::check_rlimits(&spec.rlimits)
        .map_err(|e| ApiError::Refused(format!("--ulimit: {e}")))?;
    let vcpus = spec.vcpus.unwrap_or(1);
    if !(1..=32).contains(&vcpus) {
        return refused(format!("{vcpus} vCPUs: 1 to 32"));
    }
    if memory.mib() < 16 || memory.mib() > 3072 {
        return refused(format!("memory {}MiB: 16 MiB to 3 GiB", memory.mib()));
    }
    let section = MicrovmSection {
        image: Some(spec.image),
        cmd: spec.cmd,
        env: spec.env,
        vcpus,
        memory,
        restart: Restart::No,
        kernel: None,
        initramfs: None,
        root: None,
        volumes: Vec::new(),
        network: Network::None,
        memory_backing: Default::default(),
        huge_pages: false,
        rlimits: spec.rlimits,
    };
    let cid = workloads.values().map(|w| w.cid).max().unwrap_or(2) + 1;
    let mut w = Workload::new(section, cid);
    w.transient = true;
    w.remove_when_done = spec.rm;
    w.attach = spec.attach;
    w.tty = spec.tty;
    tracing::info!("workload {name}: created by cup run");
    workloads.insert(name.clone(), w);
    Ok(Reply::Text(name))
}

/// The image store's actions, answered at once.
fn image_action(opts: &Options, action: Action) -> Result<Reply, ApiError> {
    let store = crate::image::store::Store::open(&opts.state_dir)
        .map_err(|e| ApiError::Refused(e.to_string()))?;
    let err = |e: crate::image::store::StoreError| {
        ApiError::Refused(steelcup_init::boot::error_chain(&e))
    };
    match action {
        Action::Images => Ok(Reply::Images(
            store
                .list()
                .map_err(err)?
                .into_iter()
                .map(|i| api::ImageInfo {
                    name: i.name,
                    digest: i.digest,
                    size: i.size,
                    rootfs: i.rootfs,
                })
                .collect(),
        )),
        Action::RemoveImage(name) => match store.untag(&name).map_err(err)? {
            true => Ok(Reply::Done),
            false => Err(ApiError::Refused(format!(
                "no image named {name:?}; see `cup images`"
            ))),
        },
        Action::Prune => {
            let r = store.gc().map_err(err)?;
            Ok(Reply::Text(format!(
                "removed {} blobs, {} root images, {} temporary files ({} bytes)",
                r.blobs, r.rootfs, r.tmp, r.bytes
            )))
        }
        other => Err(ApiError::Refused(format!("{other:?}: not an image action"))),
    }
}

/// Executes an action that is answered at once.
fn execute_now(
    workloads: &mut BTreeMap<String, Workload>,
    action: Action,
) -> Result<Reply, ApiError> {
    fn running<'w>(
        workloads: &'w mut BTreeMap<String, Workload>,
        name: &str,
    ) -> Result<&'w mut Workload, ApiError> {
        let w = workloads
            .get_mut(name)
            .ok_or_else(|| ApiError::NoSuchVm(name.to_string()))?;
        if w.control.is_none() {
            return Err(ApiError::Refused(format!(
                "workload {name:?} is not running"
            )));
        }
        Ok(w)
    }
    match action {
        Action::List => Ok(Reply::Vms(
            workloads
                .iter()
                .map(|(name, w)| VmInfo {
                    name: name.clone(),
                    state: w.state().into(),
                    last_outcome: w.last_outcome.clone(),
                    pid: w.pid.unwrap_or(0) as u32,
                    runs: w.runs as u32,
                    vcpus: u32::from(w.spec.vcpus),
                    memory_mib: w.spec.memory.mib() as u32,
                    address: tap_index(&w.spec, w.cid)
                        .ok()
                        .flatten()
                        .map(|n| format!("10.200.{n}.2"))
                        .unwrap_or_default(),
                })
                .collect(),
        )),
        Action::Pause(name) => set_paused(running(workloads, &name)?, &name, true),
        Action::Resume(name) => set_paused(running(workloads, &name)?, &name, false),
        Action::Start(name) => {
            let w = workloads
                .get_mut(&name)
                .ok_or_else(|| ApiError::NoSuchVm(name.clone()))?;
            if w.pid.is_some() {
                return Err(ApiError::Refused(format!(
                    "workload {name:?} is already running"
                )));
            }
            w.restart_at = Some(Instant::now());
            w.backoff = Duration::from_secs(1);
            Ok(Reply::Done)
        }
        // Answered by `execute`.
        other => Err(ApiError::Refused(format!("{other:?}: internal error"))),
    }
}

/// Pauses or resumes a running workload's vCPUs through its worker.
fn set_paused(w: &mut Workload, name: &str, pause: bool) -> Result<Reply, ApiError> {
    let (command, done) = if pause {
        ("pause", "paused")
    } else {
        ("resume", "resumed")
    };
    if let Some(c) = w.control.as_mut() {
        c.ask(command).map_err(ApiError::Refused)?;
    }
    w.paused = pause;
    tracing::info!("workload {name}: {done}");
    Ok(Reply::Done)
}

/// How long a guest has to end its workload after being asked to stop.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// Stops every running workload: asks each guest's vminit over vsock, waits
/// up to [`STOP_GRACE`], then kills the workers that are left.
fn stop_all(
    opts: &Options,
    workloads: &mut BTreeMap<String, Workload>,
    rx: &mpsc::Receiver<Event>,
) {
    for (name, w) in workloads.iter_mut() {
        if w.pid.is_some() {
            resume_if_paused(w);
            ask_to_stop(&vsock_path(opts, name), name);
        }
    }
    let wait = |workloads: &mut BTreeMap<String, Workload>, deadline: Instant| {
        while workloads.values().any(|w| w.pid.is_some()) {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(Event::Ended { name, report }) => {
                    if let Some(w) = workloads.get_mut(&name) {
                        w.pid = None;
                        tracing::info!("workload {name}: {}", report.outcome);
                    }
                }
                Ok(Event::Signal(_) | Event::Prepared { .. }) => {}
                Ok(Event::Api(req)) => {
                    let _ = req.reply.send(Err(ApiError::ShuttingDown));
                }
                Err(_) => break,
            }
        }
    };
    wait(workloads, Instant::now() + STOP_GRACE);
    for (name, w) in workloads.iter() {
        if let Some(pid) = w.pid {
            tracing::warn!(
                "workload {name}: still running after {}s; killing its worker",
                STOP_GRACE.as_secs()
            );
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    wait(workloads, Instant::now() + Duration::from_secs(5));
}

/// A paused guest cannot answer a stop: let it run first.
fn resume_if_paused(w: &mut Workload) {
    if w.paused {
        if let Some(c) = w.control.as_mut() {
            let _ = c.ask("resume");
        }
        w.paused = false;
    }
}

/// Asks workload `name`'s vminit, over its vsock socket `uds`, to stop,
/// and logs the answer.
fn ask_to_stop(uds: &Path, name: &str) {
    match ask_guest(uds, GUEST_CONTROL_PORT, "stop") {
        Ok(a) => tracing::info!("workload {name}: asked to stop; guest: {a}"),
        Err(e) => tracing::warn!("workload {name}: cannot ask the guest to stop: {e}"),
    }
}

/// The vsock port vminit answers control requests on (`stop`, `ping`).
pub const GUEST_CONTROL_PORT: u32 = 1024;

/// The host side of workload `name`'s vsock device.
pub fn vsock_path(opts: &Options, name: &str) -> PathBuf {
    opts.run_dir.join("vsock").join(format!("{name}.sock"))
}

/// Sends one request line to a guest's vsock `port` through the VM's Unix
/// socket and returns the guest's one-line answer.
pub fn ask_guest(uds: &Path, port: u32, request: &str) -> Result<String, String> {
    let mut s = crate::attach::connect(uds, port)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    writeln!(s, "{request}").map_err(|e| format!("write: {e}"))?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| format!("no answer from the guest: {e}"))?;
    Ok(line.trim().to_string())
}

/// The disk file of volume `volume` of workload `unit`, created empty
/// (sparse) at its size if it does not exist yet. An existing disk is kept
/// as it is: its data outlives any change to the unit.
pub fn ensure_volume(
    state_dir: &Path,
    unit: &str,
    volume: &steelcup_init::units::VolumeSpec,
) -> Result<PathBuf, String> {
    let dir = state_dir.join("volumes").join(unit);
    let path = dir.join(format!("{}.img", volume.name));
    if path.exists() {
        return Ok(path);
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    // Create under a temporary name and rename, so a crash never leaves a
    // disk of the wrong size behind.
    let tmp = dir.join(format!(".{}.img.new", volume.name));
    let f = std::fs::File::create(&tmp).map_err(|e| format!("create {}: {e}", tmp.display()))?;
    f.set_len(volume.size.0)
        .map_err(|e| format!("size {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &path).map_err(|e| format!("create {}: {e}", path.display()))?;
    tracing::info!(
        "workload {unit}: created volume {} ({}) at {}",
        volume.name,
        volume.size,
        path.display()
    );
    Ok(path)
}

/// The VM's index for `network = "tap"` (its tap `sctapN`, host
/// `10.200.N.1`, guest `10.200.N.2`); None without a network.
fn tap_index(spec: &MicrovmSection, cid: u32) -> Result<Option<u32>, String> {
    match spec.network {
        Network::None => Ok(None),
        // cid - 3 is the VM's index among the units.
        Network::Tap if cid - 3 > 255 => Err(format!(
            "network = \"tap\" has addresses for 256 VMs; this is VM {}",
            cid - 2
        )),
        Network::Tap => Ok(Some(cid - 3)),
    }
}

/// Pulls a workload's image and builds its root image off the main
/// thread; the answer comes back as [`Event::Prepared`].
fn spawn_prepare(opts: &Options, name: &str, image: &str, tx: mpsc::Sender<Event>) {
    let (store, image, name) = (opts.state_dir.clone(), image.to_string(), name.to_string());
    let pull = PullOptions {
        insecure: opts.insecure_registries.clone(),
        credentials: None,
    };
    let pulls = opts.pulls.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("prepare-{name}"))
        .spawn({
            let tx = tx.clone();
            let name = name.clone();
            move || {
                let (mut progress, _guard) = track(&pulls, &image);
                let result = crate::image::workload::prepare(&store, &image, &pull, &mut progress);
                let _ = tx.send(Event::Prepared { name, result });
            }
        });
    if let Err(e) = spawned {
        let _ = tx.send(Event::Prepared {
            name,
            result: Err(format!("spawn a thread: {e}")),
        });
    }
}

fn vm_config(
    opts: &Options,
    name: &str,
    spec: &MicrovmSection,
    prepared: Option<&Prepared>,
    cid: u32,
) -> Result<VmConfig, String> {
    let mut disks = Vec::new();
    let mut root = None;
    let root_image = prepared.map(|p| &p.rootfs).or(spec.root.as_ref());
    if let Some(path) = root_image {
        root = Some(disk_device(disks.len()));
        disks.push(DiskConfig {
            path: path.clone(),
            read_only: true,
            id: "root".into(),
        });
    }
    let mut volumes = Vec::new();
    for v in &spec.volumes {
        let path = ensure_volume(&opts.state_dir, name, v)?;
        volumes.push(GuestVolume {
            device: disk_device(disks.len()),
            path: v.mount.display().to_string(),
        });
        disks.push(DiskConfig {
            path,
            read_only: false,
            id: v.name.clone(),
        });
    }
    let (net, network) = match tap_index(spec, cid)? {
        None => (None, None),
        Some(n) => (
            Some(NetConfig {
                tap: format!("sctap{n}"),
                mac: crate::devices::virtio::net::mac_for(n),
                host_address: format!("10.200.{n}.1/30"),
            }),
            Some(GuestNetwork {
                interface: "eth0".into(),
                address: format!("10.200.{n}.2/30"),
                gateway: Some(std::net::Ipv4Addr::new(10, 200, n as u8, 1)),
            }),
        ),
    };
    let process = match prepared {
        Some(p) => p.process.merge(&spec.cmd, &spec.env)?,
        None => Merged {
            argv: spec.cmd.clone(),
            env: spec.env.clone(),
            workdir: None,
            user: None,
        },
    };
    Ok(VmConfig {
        name: name.to_string(),
        kernel: spec.kernel.clone().unwrap_or_else(|| opts.kernel.clone()),
        initramfs: spec
            .initramfs
            .clone()
            .unwrap_or_else(|| opts.initramfs.clone()),
        cmdline: DEFAULT_CMDLINE.to_string(),
        vcpus: spec.vcpus,
        memory_mib: spec.memory.mib(),
        memory_backing: spec.memory_backing,
        huge_pages: spec.huge_pages,
        guest: GuestConfig {
            cmd: process.argv,
            env: process.env,
            workdir: process.workdir,
            hostname: Some(name.to_string()),
            root,
            volumes,
            network,
            user: process.user,
            attach: false,
            tty: false,
            rlimits: spec.rlimits.clone(),
        },
        disks,
        vsock: Some(VsockConfig {
            cid,
            uds: vsock_path(opts, name),
        }),
        net,
        report_timing: false,
        jail_scratch: opts
            .jail
            .then(|| crate::jail::mount::scratch_dir(&opts.run_dir)),
    })
}

/// Starts a worker for `name`; a monitor thread reports its end on `tx`.
fn start(
    opts: &Options,
    name: &str,
    spec: &MicrovmSection,
    prepared: Option<&Prepared>,
    (attach, tty): (bool, bool),
    cid: u32,
    tx: mpsc::Sender<Event>,
) -> Result<(i32, WorkerControl), String> {
    let mut vm = vm_config(opts, name, spec, prepared, cid)?;
    (vm.guest.attach, vm.guest.tty) = (attach, tty);
    let mut config = serde_json::to_vec(&vm).map_err(|e| e.to_string())?;
    config.push(b'\n');
    let cgroup = opts.cgroup_root.as_ref().and_then(|root| {
        let limits = crate::jail::cgroup::Limits::for_vm(spec.vcpus, spec.memory.mib());
        crate::jail::cgroup::VmCgroup::create(root, name, limits)
            .map_err(|e| tracing::warn!("workload {name}: no cgroup, limits are off: {e}"))
            .ok()
    });
    let mut cmd = Command::new(&opts.worker_exe);
    steelcup_init::sys::reset_signal_mask(&mut cmd);
    let procs_fd = cgroup.as_ref().map(|c| c.procs_fd());
    // SAFETY: the closure runs between fork and exec and makes only
    // async-signal-safe calls (prctl, write).
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || {
            // A worker never outlives vmmd (its control channel and output
            // go to vmmd).
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(fd) = procs_fd {
                crate::jail::cgroup::join_self(fd)?;
            }
            Ok(())
        });
    }
    let mut child = cmd
        .args(["worker", name])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", opts.worker_exe.display()))?;
    let pid = child.id() as i32;
    let started = Instant::now();
    tracing::info!("workload {name}: starting microVM (worker pid {pid})");
    let mut commands = child.stdin.take().ok_or("worker has no stdin")?;
    // One line; the pipe holds it whatever the worker does.
    commands
        .write_all(&config)
        .map_err(|e| format!("send config to the worker: {e}"))?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let name = name.to_string();
    let (answer_tx, answers) = mpsc::channel();
    std::thread::Builder::new()
        .name(format!("worker-{name}"))
        .spawn(move || {
            let out_thread = stdout.map(|o| {
                let name = name.clone();
                std::thread::spawn(move || echo_guest(&name, o))
            });
            let report = stderr.and_then(|e| read_report(&name, e, &answer_tx));
            let status = child.wait();
            let ran = started.elapsed();
            if let Some(c) = cgroup {
                c.remove();
            }
            if let Some(t) = out_thread {
                let _ = t.join();
            }
            let report = report.unwrap_or_else(|| WorkerReport {
                outcome: VmOutcome::VmmError {
                    message: worker_death(&status),
                },
                run_ms: ran.as_millis() as u64,
            });
            let _ = tx.send(Event::Ended { name, report });
        })
        .map_err(|e| format!("spawn monitor thread: {e}"))?;
    Ok((pid, WorkerControl { commands, answers }))
}

/// Why a worker ended without a report.
fn worker_death(status: &std::io::Result<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.signal(), s.code()) {
            (Some(sig), _) => match Signal::try_from(sig) {
                // SIGSYS: the seccomp filter killed it for a forbidden call.
                Ok(Signal::SIGSYS) => {
                    "worker killed by SIGSYS (a syscall its seccomp filter forbids)".into()
                }
                Ok(sig) => format!("worker killed by {sig}"),
                Err(_) => format!("worker killed by signal {sig}"),
            },
            (None, Some(code)) => format!("worker exited with code {code} without a report"),
            _ => "worker ended without a report".into(),
        },
        Err(e) => format!("wait for worker: {e}"),
    }
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

/// Passes worker logs on, control answers to `answers`, and returns its
/// report.
fn read_report(name: &str, err: impl Read, answers: &mpsc::Sender<String>) -> Option<WorkerReport> {
    let mut report = None;
    for line in BufReader::new(err).lines().map_while(Result::ok) {
        if let Some(answer) = line.strip_prefix(CONTROL_PREFIX) {
            let _ = answers.send(answer.to_string());
        } else if let Some(json) = line.strip_prefix(REPORT_PREFIX) {
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
        state_dir: DEFAULT_STATE_DIR.into(),
        run_dir: DEFAULT_RUN_DIR.into(),
        api_socket: api::DEFAULT_SOCKET.into(),
        cgroup_root: Path::new("/sys/fs/cgroup/cgroup.controllers")
            .exists()
            .then(|| crate::jail::cgroup::DEFAULT_ROOT.into()),
        jail: nix::unistd::geteuid().is_root(),
        insecure_registries: Vec::new(),
        pulls: Default::default(),
        removed: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> api::RunSpec {
        serde_json::from_str(json).unwrap()
    }

    fn refused(r: Result<Reply, ApiError>) -> String {
        match r {
            Err(ApiError::Refused(m)) => m,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn cup_run_specs_are_checked_before_a_workload_exists() {
        let mut w = BTreeMap::new();
        let img = r#""image":"oci-archive:/x.tar:latest""#;
        assert!(
            refused(run_workload(&mut w, spec(r#"{"image":"Not A Ref"}"#)))
                .contains("not an image reference")
        );
        assert!(refused(run_workload(
            &mut w,
            spec(&format!(r#"{{{img},"name":"Bad Name"}}"#))
        ))
        .contains("lowercase"));
        assert!(refused(run_workload(
            &mut w,
            spec(&format!(r#"{{{img},"memory":"8MiB"}}"#))
        ))
        .contains("16 MiB to 3 GiB"));
        assert!(refused(run_workload(
            &mut w,
            spec(&format!(r#"{{{img},"memory":"lots"}}"#))
        ))
        .contains("not a size"));
        assert!(refused(run_workload(
            &mut w,
            spec(&format!(r#"{{{img},"vcpus":0}}"#))
        ))
        .contains("1 to 32"));
        assert!(refused(run_workload(
            &mut w,
            spec(&format!(r#"{{{img},"rlimits":{{"files":1}}}}"#))
        ))
        .contains("unknown limit"));
        assert!(w.is_empty(), "nothing half-made");
        assert!(serde_json::from_str::<api::RunSpec>(&format!(r#"{{{img},"bogus":1}}"#)).is_err());

        // Names: given, or run-N; a taken one is refused.
        let named = run_workload(
            &mut w,
            spec(&format!(
                r#"{{{img},"name":"web","attach":true,"rm":true}}"#
            )),
        );
        assert_eq!(named, Ok(Reply::Text("web".into())));
        assert!(refused(run_workload(
            &mut w,
            spec(&format!(r#"{{{img},"name":"web"}}"#))
        ))
        .contains("exists"));
        assert_eq!(
            run_workload(&mut w, spec(&format!("{{{img}}}"))),
            Ok(Reply::Text("run-1".into()))
        );
        assert_eq!(
            run_workload(&mut w, spec(&format!("{{{img}}}"))),
            Ok(Reply::Text("run-2".into()))
        );
        let web = &w["web"];
        assert!(web.transient && web.attach && web.remove_when_done && !web.tty);
        assert_eq!(web.spec.restart, Restart::No);
        let cids: std::collections::BTreeSet<u32> = w.values().map(|x| x.cid).collect();
        assert_eq!(cids.len(), 3, "every VM its own vsock context id");
    }
}
