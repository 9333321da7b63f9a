//! Supervision of service units: start in dependency order, readiness,
//! output capture, restart with backoff, reload, stop in reverse order.
//!
//! # Design
//! One thread owns all state and waits (poll) on a signalfd (SIGCHLD,
//! SIGTERM, SIGINT, SIGPWR, SIGHUP), the notify socket, and the API's wake
//! eventfd, with a timeout for the next timer (restart or readiness
//! deadline). Children are reaped with `waitpid(-1, WNOHANG)` until nothing
//! is left, so processes re-parented to init never linger as zombies. Each
//! service runs in its own process group and, where init has a cgroup tree,
//! in its own cgroup with its limits; its stdout and stderr go line by line to
//! the [`logs::LogStore`]. Restart policy is a wrapper around the start:
//! backoff from 0.5 s doubling to 30 s, reset after 10 s of stable running;
//! 5 starts in a row that each ended within 10 s mark the unit `failed`
//! instead of spinning (with exponential backoff, a fixed time window would
//! never fill).
//! `ready = "notify"` services count as started when they send `READY=1` to
//! `$NOTIFY_SOCKET`, a datagram socket of their own (`RUN_DIR/notify/NAME`):
//! the socket says whose message it is, so a helper that sends and exits at
//! once cannot be mistaken for someone else (matching senders by pid races
//! with the sender's exit).
//! Stopping is asynchronous ([`stop`]): a unit in its stop timeout holds
//! up neither the API nor the other units.

pub mod apply;
pub mod capture;
mod cgroup;
mod gate;
pub mod machine;
mod reload;
mod stop;

pub use gate::{Gate, Verdict};
pub use steelcup_os::logs;

use crate::api::{Action, ApiError, ReloadSummary, Reply, UnitInfo};
use logs::LogStore;
use nix::sys::signal::{killpg, Signal};
use nix::sys::signalfd::SignalFd;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use steelcup_sys::{self as sys, NotifySocket, PowerAction};
use steelcup_units::{
    self as units, graph, Backoff, Ready, Restart, ServiceSection, Unit, UnitKind,
};

const BACKOFF_START: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// Consecutive starts that never ran [`STABLE_AFTER`] before a unit is `failed`.
const START_LIMIT: u32 = 5;

/// The state of one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Waiting for its dependencies or for its restart time.
    Waiting,
    /// Running, not yet ready (`ready = "notify"`).
    Starting,
    Running,
    /// Exited and will not be restarted.
    Exited(i32),
    /// Refused or given up on; the reason.
    Failed(String),
    Stopping,
    Stopped,
    /// Not started: its condition is not met (the condition).
    Skipped(String),
}

impl State {
    pub fn name(&self) -> &'static str {
        match self {
            State::Waiting => "waiting",
            State::Starting => "starting",
            State::Running => "running",
            State::Exited(_) => "exited",
            State::Failed(_) => "failed",
            State::Stopping => "stopping",
            State::Stopped => "stopped",
            State::Skipped(_) => "skipped",
        }
    }
}

#[derive(Debug)]
struct Service {
    unit: Unit,
    spec: ServiceSection,
    deps: Vec<String>,
    state: State,
    pid: Option<Pid>,
    /// Starts in a row that ended before running [`STABLE_AFTER`].
    quick_exits: u32,
    backoff: Backoff,
    restart_at: Option<Instant>,
    ready_deadline: Option<Instant>,
    started_at: Option<Instant>,
    notify: Option<NotifySocket>,
    restarts: u32,
    last_exit: Option<i32>,
    /// How long its last start took (to ready, or to running).
    start_latency: Option<Duration>,
    /// Set while it stops.
    stopping: Option<stop::Stopping>,
}

impl Service {
    fn new(unit: Unit, spec: ServiceSection, deps: Vec<String>, state: State) -> Self {
        Service {
            unit,
            spec,
            deps,
            state,
            pid: None,
            quick_exits: 0,
            backoff: Backoff::new(BACKOFF_START, BACKOFF_MAX),
            restart_at: None,
            ready_deadline: None,
            started_at: None,
            notify: None,
            restarts: 0,
            last_exit: None,
            start_latency: None,
            stopping: None,
        }
    }
}

/// Why the supervisor's loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Power(PowerAction),
}

/// Where a supervisor lives and what it may use.
#[derive(Debug, Clone)]
pub struct Options {
    pub units_dir: PathBuf,
    /// Where `cup apply` keeps applied unit files across boots (a
    /// machine with a state partition); None: only in `units_dir`.
    pub applied_dir: Option<PathBuf>,
    /// Where the machine config is applied (`/var/lib/steelcup/machine`)
    /// for `cup machine apply|show`; None: not this init's to change.
    pub machine_dir: Option<PathBuf>,
    /// What a machine config installs into (`/etc/steelcup`).
    pub etc_dir: PathBuf,
    pub run_dir: PathBuf,
    /// A cgroup v2 directory init may create unit cgroups in.
    pub cgroup: Option<PathBuf>,
    /// True as PID 1: at the end, everything left is killed.
    pub pid1: bool,
}

/// Called on every state change: (unit, new state).
pub type Observer = Box<dyn Fn(&str, &State) + Send>;

/// The supervisor of a set of service units.
pub struct Supervisor {
    services: BTreeMap<String, Service>,
    microvms: BTreeMap<String, Unit>,
    order: Vec<String>,
    started: Vec<String>,
    opts: Options,
    logs: Arc<LogStore>,
    capture: Option<Arc<capture::Capture>>,
    observer: Option<Observer>,
    shutting_down: bool,
    /// For `condition-kernel-cmdline`, read once at start.
    pub kernel_cmdline: String,
    boot: Instant,
    all_started_reported: bool,
    gate: Option<Gate>,
    /// Services to restart at a time (`cup machine apply`'s new admin
    /// certificates, once its answer has left).
    restart_later: Vec<(String, Instant)>,
    /// Units whose file (or a drop-in) is refused, and why; a running one
    /// goes on with its last good definition.
    refused_files: BTreeMap<String, String>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("services", &self.services.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Supervisor {
    /// Plans `units` (microvm units are left to vmmd); refused units are logged.
    pub fn new(units: Vec<Unit>, opts: Options, logs: Arc<LogStore>) -> Self {
        let capture = match capture::Capture::start(logs.clone()) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::error!(
                    "cannot start the output capture thread: {e}; service output is lost"
                );
                None
            }
        };
        let mut sup = Supervisor {
            services: BTreeMap::new(),
            microvms: BTreeMap::new(),
            order: Vec::new(),
            started: Vec::new(),
            opts,
            logs,
            capture,
            observer: None,
            shutting_down: false,
            kernel_cmdline: steelcup_units::kernel_cmdline(),
            boot: Instant::now(),
            all_started_reported: false,
            gate: None,
            restart_later: Vec::new(),
            refused_files: BTreeMap::new(),
        };
        sup.apply(units);
        sup
    }

    /// Registers the observer of state changes (the API's signals).
    pub fn observe(&mut self, observer: Observer) {
        self.observer = Some(observer);
    }

    /// The shared log store.
    pub fn logs(&self) -> Arc<LogStore> {
        self.logs.clone()
    }

    fn set_state(&mut self, name: &str, state: State) {
        if let Some(s) = self.services.get_mut(name) {
            if s.state != state {
                s.state = state.clone();
                if let Some(o) = &self.observer {
                    o(name, &state);
                }
            }
        }
    }

    /// The state of every service.
    pub fn states(&self) -> BTreeMap<String, State> {
        self.services
            .iter()
            .map(|(n, s)| (n.clone(), s.state.clone()))
            .collect()
    }

    /// The order services were (last) started in.
    pub fn start_order(&self) -> &[String] {
        &self.started
    }

    fn info(&self, name: &str) -> Option<UnitInfo> {
        let refused = self.refused_files.get(name);
        let kept = |r: &String| format!("its file is refused, it runs as it was: {r}");
        if let Some(s) = self.services.get(name) {
            return Some(UnitInfo {
                name: name.to_string(),
                kind: "service".into(),
                state: s.state.name().into(),
                reason: match (&s.state, refused) {
                    (_, Some(r)) => kept(r),
                    (State::Failed(r), None) => r.clone(),
                    (State::Skipped(c), None) => format!("condition not met: {c}"),
                    _ => String::new(),
                },
                pid: s.pid.map(|p| p.as_raw() as u32).unwrap_or(0),
                restarts: s.restarts,
                last_exit: s.last_exit.unwrap_or(-1),
                description: s.unit.unit.description.clone().unwrap_or_default(),
                start_usec: s.start_latency.map_or(0, |d| d.as_micros() as u64),
                log_bytes_dropped: 0,
            });
        }
        if let Some(u) = self.microvms.get(name) {
            return Some(UnitInfo {
                name: name.to_string(),
                kind: "microvm".into(),
                state: "vmmd".into(),
                reason: refused.map(kept).unwrap_or_default(),
                pid: 0,
                restarts: 0,
                last_exit: -1,
                description: u.unit.description.clone().unwrap_or_default(),
                start_usec: 0,
                log_bytes_dropped: 0,
            });
        }
        refused.map(|r| UnitInfo {
            name: name.to_string(),
            kind: "-".into(),
            state: "refused".into(),
            reason: r.clone(),
            pid: 0,
            restarts: 0,
            last_exit: -1,
            description: String::new(),
            start_usec: 0,
            log_bytes_dropped: 0,
        })
    }

    fn dep_started(&self, name: &str) -> bool {
        match self.services.get(name) {
            // A microvm unit (vmmd's) or an unknown one does not hold services back.
            None => true,
            // A skipped unit does not hold its dependents back (as in systemd).
            Some(s) => matches!(
                s.state,
                State::Running | State::Exited(0) | State::Skipped(_)
            ),
        }
    }

    /// Starts every waiting service whose dependencies have started and whose
    /// restart time has come.
    pub fn start_ready(&mut self, now: Instant) {
        if self.shutting_down {
            return;
        }
        for name in self.order.clone() {
            let s = &self.services[&name];
            if s.state != State::Waiting || s.restart_at.is_some_and(|t| t > now) {
                continue;
            }
            if !s.deps.iter().all(|d| self.dep_started(d)) {
                continue;
            }
            self.start(&name, now);
        }
        if !self.all_started_reported
            && self
                .services
                .values()
                .all(|s| !matches!(s.state, State::Waiting | State::Starting))
        {
            self.all_started_reported = true;
            tracing::info!(
                "all units started ({} services) in {:.1}ms",
                self.services.len(),
                self.boot.elapsed().as_secs_f64() * 1000.0
            );
        }
    }

    fn start(&mut self, name: &str, now: Instant) {
        let Some(s) = self.services.get_mut(name) else {
            return;
        };
        if s.last_exit.is_some() {
            s.restarts += 1;
        }
        s.restart_at = None;
        if let Some(c) = s.unit.unit.unmet_condition(&self.kernel_cmdline) {
            let c = c.to_string();
            tracing::info!("unit {name}: skipped: condition-kernel-cmdline {c:?} not met");
            self.set_state(name, State::Skipped(c));
            return;
        }
        let spec = s.spec.clone();
        let procs = self.setup_cgroup(name, &spec);
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        env.insert("PATH".into(), "/usr/sbin:/usr/bin:/sbin:/bin".into());
        env.insert("STEELCUP_UNIT".into(), name.into());
        env.extend(spec.env.clone());
        let mut notify = None;
        if spec.ready == Ready::Notify {
            let dir = self.opts.run_dir.join("notify");
            let bound =
                std::fs::create_dir_all(&dir).and_then(|_| NotifySocket::bind(&dir.join(name)));
            match bound {
                Ok(n) => {
                    env.insert(
                        "NOTIFY_SOCKET".into(),
                        n.path.to_string_lossy().into_owned(),
                    );
                    notify = Some(n);
                }
                Err(e) => {
                    tracing::error!("unit {name}: notify socket in {}: {e}", dir.display());
                    self.set_state(name, State::Failed(format!("notify socket: {e}")));
                    return;
                }
            }
        }
        let (mut uid, mut gid) = (None, None);
        if let Some(user) = &spec.user {
            match sys::lookup_user(user) {
                Some((u, g)) => {
                    uid = Some(u);
                    gid = Some(g);
                    if let Some(n) = &notify {
                        let _ = std::os::unix::fs::chown(&n.path, Some(u), Some(g));
                    }
                }
                None => {
                    tracing::error!("unit {name}: no user {user:?} in /etc/passwd");
                    self.set_state(name, State::Failed(format!("no user {user:?}")));
                    return;
                }
            }
        }
        if let Some(group) = &spec.group {
            match sys::lookup_group(group) {
                Some(g) => gid = Some(g),
                None => {
                    tracing::error!("unit {name}: no group {group:?} in /etc/group");
                    self.set_state(name, State::Failed(format!("no group {group:?}")));
                    return;
                }
            }
        }
        let spawn_began = Instant::now();
        let spawned = (|| -> Result<(Pid, OwnedFd, OwnedFd), String> {
            let (out_r, out_w) = sys::pipe().map_err(|e| format!("pipe: {e}"))?;
            let (err_r, err_w) = sys::pipe().map_err(|e| format!("pipe: {e}"))?;
            let c = |s: &str| sys::cstring(s).map_err(|e| e.to_string());
            let spawn = sys::SpawnSpec {
                argv: spec.exec.iter().map(|a| c(a)).collect::<Result<_, _>>()?,
                envp: env
                    .iter()
                    .map(|(k, v)| c(&format!("{k}={v}")))
                    .collect::<Result<_, _>>()?,
                cwd: sys::cstring(spec.workdir.as_deref().unwrap_or(Path::new("/")))
                    .map_err(|e| e.to_string())?,
                uid,
                gid,
                cgroup_procs: procs
                    .as_deref()
                    .map(sys::cstring)
                    .transpose()
                    .map_err(|e| e.to_string())?,
                stdout: out_w,
                stderr: err_w,
            };
            let pid = sys::spawn(&spawn).map_err(|e| steelcup_sys::error_chain(&e))?;
            Ok((pid, out_r, err_r))
        })();
        match spawned {
            Ok((pid, out, err)) => {
                tracing::info!("unit {name}: started (pid {pid})");
                if let Some(cap) = &self.capture {
                    cap.add(name, out);
                    cap.add(name, err);
                }
                let ready = spec.ready;
                let timeout = Duration::from_secs(u64::from(spec.ready_timeout));
                if let Some(s) = self.services.get_mut(name) {
                    s.pid = Some(pid);
                    s.notify = notify;
                    s.started_at = Some(now);
                    s.ready_deadline = (ready == Ready::Notify).then(|| now + timeout);
                    s.start_latency = (ready != Ready::Notify).then(|| spawn_began.elapsed());
                }
                self.set_state(
                    name,
                    if ready == Ready::Notify {
                        State::Starting
                    } else {
                        State::Running
                    },
                );
                self.started.retain(|n| n != name);
                self.started.push(name.to_string());
            }
            Err(e) => {
                tracing::error!("unit {name}: cannot start {}: {e}", spec.exec[0]);
                self.after_exit(name, 127, now);
            }
        }
    }

    fn after_exit(&mut self, name: &str, code: i32, now: Instant) {
        let shutting_down = self.shutting_down;
        let Some(s) = self.services.get_mut(name) else {
            return;
        };
        let pid = s.pid.take();
        s.ready_deadline = None;
        s.notify = None;
        s.last_exit = Some(code);
        let stopping = s.stopping.is_some();
        self.clean_cgroup(name);
        if stopping {
            self.finish_stop(name, pid);
            return;
        }
        let Some(s) = self.services.get_mut(name) else {
            return;
        };
        if s.started_at
            .is_some_and(|t| now.duration_since(t) >= STABLE_AFTER)
        {
            s.backoff.reset();
            s.quick_exits = 0;
        } else {
            s.quick_exits += 1;
        }
        let restart = !shutting_down
            && match s.spec.restart {
                Restart::Always => true,
                Restart::OnFailure => code != 0,
                Restart::No => false,
            };
        if restart && s.quick_exits >= START_LIMIT {
            tracing::error!(
                "unit {name}: failed: {START_LIMIT} starts in a row ended within {}s; giving up",
                STABLE_AFTER.as_secs()
            );
            self.set_state(name, State::Failed("start limit hit".into()));
        } else if restart {
            let delay = s.backoff.take();
            tracing::info!("unit {name}: restarting in {:.1}s", delay.as_secs_f64());
            s.restart_at = Some(now + delay);
            self.set_state(name, State::Waiting);
        } else {
            self.set_state(name, State::Exited(code));
        }
    }

    /// Handles children reaped by `waitpid`.
    pub fn reaped(&mut self, children: Vec<(Pid, WaitStatus)>, now: Instant) {
        for (pid, status) in children {
            let Some(name) = self
                .services
                .iter()
                .find(|(_, s)| s.pid == Some(pid))
                .map(|(n, _)| n.clone())
            else {
                // An orphan init reaped as PID 1 (or a subreaper).
                continue;
            };
            let (code, what) = match status {
                WaitStatus::Exited(_, code) => (code, format!("exited with code {code}")),
                WaitStatus::Signaled(_, sig, _) => (128 + sig as i32, format!("killed by {sig}")),
                _ => continue,
            };
            tracing::info!("unit {name}: {what}");
            self.after_exit(&name, code, now);
        }
    }

    /// Handles `READY=1` and friends from `name`'s notify socket.
    pub fn notified(&mut self, name: &str, message: &str) {
        if !message.lines().any(|l| l.trim() == "READY=1") {
            return;
        }
        if self
            .services
            .get(name)
            .is_some_and(|s| s.state == State::Starting)
        {
            tracing::info!("unit {name}: ready");
            if let Some(s) = self.services.get_mut(name) {
                s.ready_deadline = None;
                s.start_latency = s.started_at.map(|t| t.elapsed());
            }
            self.set_state(name, State::Running);
        }
    }

    fn check_deadlines(&mut self, now: Instant) {
        for (name, s) in &self.services {
            if s.ready_deadline.is_some_and(|d| d <= now) {
                if let Some(pid) = s.pid {
                    tracing::error!(
                        "unit {name}: not ready within {}s; killing it",
                        s.spec.ready_timeout
                    );
                    let _ = killpg(pid, Signal::SIGKILL);
                }
            }
        }
        for s in self.services.values_mut() {
            if s.ready_deadline.is_some_and(|d| d <= now) {
                s.ready_deadline = None;
            }
        }
        self.restart_due(now);
        self.check_stops(now);
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.services
            .values()
            .filter_map(|s| match s.state {
                State::Waiting => s.restart_at,
                State::Starting => s.ready_deadline,
                _ => None,
            })
            .chain(self.gate.as_ref().map(|g| g.deadline))
            .chain(self.restart_later.iter().map(|(_, at)| *at))
            .chain(self.stop_deadline())
            .min()
    }

    /// Executes an API action.
    pub fn handle(&mut self, action: Action) -> Result<Reply, ApiError> {
        if self.shutting_down {
            return Err(ApiError::ShuttingDown);
        }
        let service = |sup: &Self, name: &str| -> Result<(), ApiError> {
            if sup.services.contains_key(name) {
                Ok(())
            } else if sup.microvms.contains_key(name) {
                Err(ApiError::NotAService(name.into()))
            } else {
                Err(ApiError::NoSuchUnit(name.into()))
            }
        };
        match action {
            Action::ListUnits => {
                let names: std::collections::BTreeSet<String> = self
                    .services
                    .keys()
                    .chain(self.microvms.keys())
                    .chain(self.refused_files.keys())
                    .cloned()
                    .collect();
                Ok(Reply::Units(
                    names.iter().filter_map(|n| self.info(n)).collect(),
                ))
            }
            Action::Status(name) => self
                .info(&name)
                .map(Reply::Unit)
                .ok_or(ApiError::NoSuchUnit(name)),
            Action::Start(name) => {
                service(self, &name)?;
                let s = &self.services[&name];
                if matches!(s.state, State::Running | State::Starting) {
                    return Ok(Reply::Done);
                }
                // Still stopping: it starts again once it has stopped (never
                // a second copy beside the one on its way out).
                if s.stopping.is_some() {
                    self.begin_stop(&name, stop::AfterStop::Start, None);
                    return Ok(Reply::Done);
                }
                if let State::Failed(why) = &s.state {
                    if why.starts_with("dependency cycle") || why.starts_with("requires") {
                        return Err(ApiError::Refused(format!("unit {name} is refused: {why}")));
                    }
                }
                if let Some(s) = self.services.get_mut(&name) {
                    s.quick_exits = 0;
                    s.backoff.reset();
                    s.restart_at = None;
                }
                self.set_state(&name, State::Waiting);
                self.start_ready(Instant::now());
                Ok(Reply::Done)
            }
            // Answered at once here; the loop's API callers are answered
            // once the stop is over (`handle_request`).
            Action::Stop(name) => {
                service(self, &name)?;
                self.begin_stop(&name, stop::AfterStop::Stay, None);
                Ok(Reply::Done)
            }
            Action::Restart(name) => {
                service(self, &name)?;
                self.begin_stop(&name, stop::AfterStop::Start, None);
                Ok(Reply::Done)
            }
            Action::Reload => Ok(Reply::Reloaded(self.reload())),
            Action::Apply { files, dry_run } => {
                self.apply_files(&files, dry_run).map(Reply::Reloaded)
            }
            Action::RemoveUnit(name) => self.remove_unit(&name).map(Reply::Reloaded),
            Action::CatUnit(name) => self.cat_unit(&name).map(Reply::Text),
            Action::MachineApply { text, dry_run } => self
                .machine_apply(&text, dry_run)
                .map(Reply::MachineChanged),
            Action::MachineShow => self.machine_show().map(Reply::Text),
            Action::Usage => Ok(Reply::Usage(self.usage())),
            // The reboot itself is the API's to ask for, after the answer.
            Action::MachineReset => self.machine_reset().map(|()| Reply::Done),
            Action::PowerOff | Action::Reboot => Ok(Reply::Done),
            // Disk work: the API executes it off this loop (api::slots).
            a @ (Action::Update { .. } | Action::Rollback | Action::UpdateStatus) => Err(
                ApiError::Refused(format!("{a:?} is not the supervisor's to execute")),
            ),
        }
    }

    /// Runs until a signal or the API asks for power-off or reboot, then
    /// stops every service in reverse start order.
    pub fn run(
        &mut self,
        sfd: &mut SignalFd,
        control: Option<&crate::api::dbus::Control>,
    ) -> Ending {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        loop {
            let now = Instant::now();
            self.check_deadlines(now);
            self.start_ready(now);
            if self.judge_gate(now) {
                tracing::info!("rebooting: the other slot boots next");
                self.stop_all();
                return Ending::Power(PowerAction::Reboot);
            }
            let timeout = self
                .next_deadline()
                .map(|d| d.saturating_duration_since(Instant::now()))
                .unwrap_or(Duration::from_secs(60));
            {
                let mut fds = vec![PollFd::new(sfd.as_fd(), PollFlags::POLLIN)];
                for n in self.services.values().filter_map(|s| s.notify.as_ref()) {
                    fds.push(PollFd::new(n.as_fd(), PollFlags::POLLIN));
                }
                if let Some(c) = control {
                    fds.push(PollFd::new(c.wake.as_fd(), PollFlags::POLLIN));
                }
                let ms = timeout.as_millis().clamp(1, 60_000) as u16;
                let _ = poll(&mut fds, PollTimeout::from(ms));
            }
            while let Ok(Some(info)) = sfd.read_signal() {
                let Ok(sig) = Signal::try_from(info.ssi_signo as i32) else {
                    continue;
                };
                match sig {
                    Signal::SIGTERM | Signal::SIGPWR => {
                        tracing::info!("{sig}: powering off");
                        self.stop_all();
                        return Ending::Power(PowerAction::PowerOff);
                    }
                    Signal::SIGINT => {
                        tracing::info!("ctrl-alt-del: rebooting");
                        self.stop_all();
                        return Ending::Power(PowerAction::Reboot);
                    }
                    Signal::SIGHUP => {
                        self.reload();
                    }
                    _ => {}
                }
            }
            self.reaped(sys::reap(), Instant::now());
            let mut messages = Vec::new();
            for (name, s) in &self.services {
                if let Some(n) = &s.notify {
                    while let Some(m) = n.recv() {
                        messages.push((name.clone(), m));
                    }
                }
            }
            for (name, msg) in messages {
                self.notified(&name, &msg);
            }
            if let Some(c) = control {
                c.drain_wake();
                while let Ok(req) = c.requests.try_recv() {
                    let action = req.action.clone();
                    self.handle_request(req);
                    if matches!(action, Action::PowerOff | Action::Reboot) {
                        // Let the caller's reply go out before the process ends.
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    match action {
                        Action::PowerOff => {
                            tracing::info!("API: powering off");
                            self.stop_all();
                            return Ending::Power(PowerAction::PowerOff);
                        }
                        Action::Reboot => {
                            tracing::info!("API: rebooting");
                            self.stop_all();
                            return Ending::Power(PowerAction::Reboot);
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    /// Executes an API request; a `Stop` or `Restart` is answered once the
    /// stop is over, the loop serving others meanwhile.
    fn handle_request(&mut self, req: crate::api::Request) {
        let then = match &req.action {
            Action::Stop(_) => Some(stop::AfterStop::Stay),
            Action::Restart(_) => Some(stop::AfterStop::Start),
            _ => None,
        };
        match (req.action, then) {
            (Action::Stop(name) | Action::Restart(name), Some(then))
                if !self.shutting_down && self.services.contains_key(&name) =>
            {
                self.begin_stop(&name, then, Some(req.reply));
            }
            (action, _) => {
                let _ = req.reply.send(self.handle(action));
            }
        }
    }

    /// Stops every running service, dependents first: the reverse of the
    /// dependency order (a unit restarted later still stops before what it
    /// depends on). As PID 1, then kills whatever else is left.
    pub fn stop_all(&mut self) {
        self.shutting_down = true;
        // Then what a reload left stopping outside the order (removed).
        let mut names: Vec<String> = self.order.iter().rev().cloned().collect();
        names.extend(
            self.services
                .keys()
                .filter(|n| !self.order.contains(n))
                .cloned()
                .collect::<Vec<_>>(),
        );
        for name in &names {
            self.stop_one(name);
        }
        if self.opts.pid1 {
            let _ = nix::sys::signal::kill(Pid::from_raw(-1), Signal::SIGKILL);
            std::thread::sleep(Duration::from_millis(50));
            let _ = sys::reap();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use steelcup_units::parse;

    fn svc(name: &str, exec: &str, restart: &str, after: &[&str]) -> Unit {
        let text = format!(
            "[unit]\nafter = {after:?}\n[service]\nexec = [\"/bin/sh\", \"-c\", {exec:?}]\nrestart = {restart:?}\nstop-timeout = 2\n"
        );
        parse(&PathBuf::from(format!("/u/{name}.toml")), &text).unwrap()
    }

    fn sup(units: Vec<Unit>) -> Supervisor {
        let run = std::env::temp_dir().join(format!(
            "steelcup-sup-{}-{}",
            std::process::id(),
            units.len()
        ));
        std::fs::create_dir_all(&run).unwrap();
        let opts = Options {
            units_dir: run.clone(),
            applied_dir: None,
            machine_dir: None,
            etc_dir: run.clone(),
            run_dir: run,
            cgroup: None,
            pid1: false,
        };
        Supervisor::new(units, opts, Arc::new(LogStore::new(None, false)))
    }

    fn wait_for(sup: &mut Supervisor, mut done: impl FnMut(&Supervisor) -> bool) {
        let t0 = Instant::now();
        while !done(sup) {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "timed out: {:?}",
                sup.states()
            );
            std::thread::sleep(Duration::from_millis(20));
            sup.reaped(sys::reap(), Instant::now());
            sup.check_deadlines(Instant::now());
            sup.start_ready(Instant::now());
        }
    }

    // One test drives every scenario: reaping with waitpid(-1) would steal the
    // children of tests running in parallel in the same process.
    #[test]
    fn supervises_services() {
        let _ = nix::sys::prctl::set_child_subreaper(true);
        // Dependency order, exit codes, captured output.
        let mut s = sup(vec![
            svc("second", "echo from second; exit 3", "no", &["first"]),
            svc("first", "sleep 0.2", "no", &[]),
        ]);
        s.start_ready(Instant::now());
        // ready = "exec": a dependent starts once its dependency is running.
        assert_eq!(s.started, ["first", "second"]);
        wait_for(&mut s, |s| {
            s.states()["second"] == State::Exited(3) && s.states()["first"] == State::Exited(0)
        });
        let logs = s.logs();
        let t0 = Instant::now();
        while logs.tail("second", 1).0.is_empty() && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(logs.tail("second", 1).0[0].1, "from second");

        // on-failure restarts until the start limit, then fails.
        let mut s = sup(vec![svc("crashy", "exit 1", "on-failure", &[])]);
        for x in s.services.values_mut() {
            x.backoff = Backoff::new(Duration::from_millis(1), Duration::from_millis(1));
        }
        wait_for(&mut s, |s| matches!(s.states()["crashy"], State::Failed(_)));
        assert_eq!(s.services["crashy"].quick_exits, START_LIMIT);
        assert_eq!(s.services["crashy"].restarts, START_LIMIT - 1);

        // Stop sends SIGTERM, and SIGKILL to one that ignores it.
        let mut s = sup(vec![
            svc("polite", "sleep 30", "always", &[]),
            svc(
                "stubborn",
                "trap '' TERM; sleep 30 & wait; sleep 30",
                "always",
                &[],
            ),
        ]);
        s.start_ready(Instant::now());
        // Let the shell install its trap before it is asked to stop.
        std::thread::sleep(Duration::from_millis(300));
        let t0 = Instant::now();
        s.stop_all();
        assert!(
            t0.elapsed() >= Duration::from_secs(2),
            "stubborn must need SIGKILL"
        );
        assert_eq!(s.states()["polite"], State::Stopped);
        assert_eq!(s.states()["stubborn"], State::Stopped);
        assert!(s.services.values().all(|x| x.pid.is_none()));

        // API actions.
        let mut s = sup(vec![svc("one", "sleep 30", "no", &[])]);
        s.start_ready(Instant::now());
        assert!(
            matches!(s.handle(Action::Status("one".into())), Ok(Reply::Unit(u)) if u.state == "running" && u.pid > 0)
        );
        assert_eq!(
            s.handle(Action::Status("nope".into())),
            Err(ApiError::NoSuchUnit("nope".into()))
        );
        // Stop answers at once and the unit stops while the loop goes on.
        assert_eq!(s.handle(Action::Stop("one".into())), Ok(Reply::Done));
        assert_eq!(s.states()["one"], State::Stopping);
        wait_for(&mut s, |s| s.states()["one"] == State::Stopped);
        assert_eq!(s.handle(Action::Start("one".into())), Ok(Reply::Done));
        assert_eq!(s.states()["one"], State::Running);
        s.stop_all();
        assert_eq!(s.handle(Action::ListUnits), Err(ApiError::ShuttingDown));
    }

    #[test]
    fn refused_units_do_not_start() {
        let mut s = sup(vec![
            svc("a", "true", "no", &["b"]),
            svc("b", "true", "no", &["a"]),
        ]);
        assert!(matches!(s.states()["a"], State::Failed(_)));
        assert!(matches!(s.states()["b"], State::Failed(_)));
        assert!(matches!(
            s.handle(Action::Start("a".into())),
            Err(ApiError::Refused(_))
        ));
    }
}
