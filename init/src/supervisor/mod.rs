//! Supervision of service units: start in dependency order, capture output,
//! restart with backoff, stop in reverse order.
//!
//! # Design
//! One thread owns all state and waits on a signalfd (SIGCHLD, SIGTERM,
//! SIGINT, SIGPWR, SIGHUP) with a timeout for the next restart. Children are
//! reaped with `waitpid(-1, WNOHANG)` until nothing is left, so processes
//! re-parented to init never linger as zombies. Each service runs in its own
//! process group; its stdout and stderr are echoed line by line to the
//! console prefixed with the unit's name. Restart policy is a wrapper around
//! the start: backoff starts at 0.5 s, doubles up to 30 s, resets after 10 s
//! of stable running; more than 5 starts in 10 s marks the unit `failed`.
//!
//! # Limitations
//! `ready = "notify"` is treated as `exec` until the notify socket lands;
//! reload, cgroup limits, user/group and log files are still to come.

pub mod logs;

use crate::sys::{self, PowerAction};
use crate::units::{graph, Restart, ServiceSection, Unit, UnitKind};
use nix::sys::signal::{killpg, Signal};
use nix::sys::signalfd::SignalFd;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BACKOFF_START: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const STABLE_AFTER: Duration = Duration::from_secs(10);
const START_LIMIT: usize = 5;
const START_WINDOW: Duration = Duration::from_secs(10);

/// The state of one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Waiting for its dependencies or for its restart time.
    Waiting,
    Running,
    /// Exited and will not be restarted.
    Exited(i32),
    /// Refused or gave up on; the reason.
    Failed(String),
    Stopped,
}

#[derive(Debug)]
struct Service {
    unit: Unit,
    spec: ServiceSection,
    deps: Vec<String>,
    state: State,
    pid: Option<Pid>,
    starts: VecDeque<Instant>,
    backoff: Duration,
    restart_at: Option<Instant>,
    started_at: Option<Instant>,
}

/// Why the supervisor's loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Power(PowerAction),
}

/// The supervisor of a set of service units.
#[derive(Debug)]
pub struct Supervisor {
    services: BTreeMap<String, Service>,
    order: Vec<String>,
    started: Vec<String>,
    pid1: bool,
}

impl Supervisor {
    /// Plans `units`; microvm units are left to vmmd. Refused units are logged.
    pub fn new(units: Vec<Unit>, pid1: bool) -> Self {
        let plan = graph::plan(&units);
        for (name, why) in &plan.refused {
            tracing::error!("unit {name}: refused: {why}");
        }
        let names: Vec<String> = units.iter().map(|u| u.name.clone()).collect();
        let mut services = BTreeMap::new();
        for u in units {
            let UnitKind::Service(spec) = u.kind.clone() else {
                continue;
            };
            let deps = u
                .unit
                .after
                .iter()
                .chain(&u.unit.requires)
                .filter(|d| names.contains(d))
                .cloned()
                .collect();
            let state = match plan.refused.get(&u.name) {
                Some(why) => State::Failed(why.clone()),
                None => State::Waiting,
            };
            services.insert(
                u.name.clone(),
                Service {
                    unit: u,
                    spec,
                    deps,
                    state,
                    pid: None,
                    starts: VecDeque::new(),
                    backoff: BACKOFF_START,
                    restart_at: None,
                    started_at: None,
                },
            );
        }
        let order = plan
            .order
            .into_iter()
            .filter(|n| services.contains_key(n))
            .collect();
        Supervisor {
            services,
            order,
            started: Vec::new(),
            pid1,
        }
    }

    /// The state of every service.
    pub fn states(&self) -> BTreeMap<String, State> {
        self.services
            .iter()
            .map(|(n, s)| (n.clone(), s.state.clone()))
            .collect()
    }

    fn dep_started(&self, name: &str) -> bool {
        match self.services.get(name) {
            // A microvm unit (vmmd's) or an unknown one does not hold services back.
            None => true,
            Some(s) => matches!(s.state, State::Running | State::Exited(0)),
        }
    }

    /// Starts every waiting service whose dependencies have started and whose
    /// restart time has come.
    pub fn start_ready(&mut self, now: Instant) {
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
    }

    fn start(&mut self, name: &str, now: Instant) {
        let Some(s) = self.services.get_mut(name) else {
            return;
        };
        while s.starts.front().is_some_and(|t| now.duration_since(*t) > START_WINDOW) {
            s.starts.pop_front();
        }
        if s.starts.len() >= START_LIMIT {
            tracing::error!(
                "unit {name}: failed: started {START_LIMIT} times within {}s; giving up",
                START_WINDOW.as_secs()
            );
            s.state = State::Failed("start limit hit".into());
            return;
        }
        s.starts.push_back(now);
        s.restart_at = None;
        let mut cmd = Command::new(&s.spec.exec[0]);
        cmd.args(&s.spec.exec[1..])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .envs(&s.spec.env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        match cmd.spawn() {
            Ok(mut child) => {
                let pid = Pid::from_raw(child.id() as i32);
                tracing::info!("unit {name}: started (pid {pid})");
                if let Some(out) = child.stdout.take() {
                    echo(name, out);
                }
                if let Some(err) = child.stderr.take() {
                    echo(name, err);
                }
                // The child is reaped by the supervisor's waitpid(-1) loop.
                drop(child);
                s.pid = Some(pid);
                s.state = State::Running;
                s.started_at = Some(now);
                self.started.retain(|n| n != name);
                self.started.push(name.to_string());
            }
            Err(e) => {
                tracing::error!("unit {name}: cannot start {}: {e}", s.spec.exec[0]);
                Self::after_exit(name, s, false, now);
            }
        }
    }

    fn after_exit(name: &str, s: &mut Service, success: bool, now: Instant) {
        s.pid = None;
        if s.started_at.is_some_and(|t| now.duration_since(t) >= STABLE_AFTER) {
            s.backoff = BACKOFF_START;
        }
        let restart = match s.spec.restart {
            Restart::Always => true,
            Restart::OnFailure => !success,
            Restart::No => false,
        };
        if restart {
            tracing::info!(
                "unit {name}: restarting in {:.1}s",
                s.backoff.as_secs_f64()
            );
            s.state = State::Waiting;
            s.restart_at = Some(now + s.backoff);
            s.backoff = (s.backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Handles children reaped by `waitpid`.
    pub fn reaped(&mut self, children: Vec<(Pid, WaitStatus)>, now: Instant) {
        for (pid, status) in children {
            let Some((name, s)) = self
                .services
                .iter_mut()
                .find(|(_, s)| s.pid == Some(pid))
            else {
                continue;
            };
            let (code, what) = match status {
                WaitStatus::Exited(_, code) => (code, format!("exited with code {code}")),
                WaitStatus::Signaled(_, sig, _) => (128 + sig as i32, format!("killed by {sig}")),
                _ => continue,
            };
            tracing::info!("unit {name}: {what}");
            let stopping = s.state == State::Stopped;
            s.state = if stopping { State::Stopped } else { State::Exited(code) };
            if !stopping {
                let name = name.clone();
                Self::after_exit(&name, s, code == 0, now);
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.services
            .values()
            .filter(|s| s.state == State::Waiting)
            .filter_map(|s| s.restart_at)
            .min()
    }

    /// Runs until a signal asks for power-off or reboot, then stops every
    /// service in reverse start order.
    pub fn run(&mut self, sfd: &mut SignalFd) -> Ending {
        loop {
            let now = Instant::now();
            self.start_ready(now);
            let timeout = self
                .next_deadline()
                .map(|d| d.saturating_duration_since(Instant::now()))
                .unwrap_or(Duration::from_secs(60));
            wait_readable(sfd, timeout);
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
                    _ => {}
                }
            }
            self.reaped(sys::reap(), Instant::now());
        }
    }

    /// Stops every running service, dependents first: the stop signal, then
    /// SIGKILL after the unit's stop timeout. As PID 1, then kills whatever
    /// else is left.
    pub fn stop_all(&mut self) {
        for name in self.started.clone().iter().rev() {
            let s = &self.services[name];
            let (Some(pid), State::Running) = (s.pid, &s.state) else {
                continue;
            };
            let timeout = s.unit.stop_timeout();
            let t0 = Instant::now();
            tracing::info!("unit {name}: stopping");
            if let Some(s) = self.services.get_mut(name) {
                s.state = State::Stopped;
            }
            let _ = killpg(pid, Signal::SIGTERM);
            while Instant::now() < t0 + timeout && self.services[name].pid.is_some() {
                std::thread::sleep(Duration::from_millis(20));
                self.reap_stopping();
            }
            if self.services[name].pid.is_some() {
                tracing::warn!("unit {name}: did not stop in {}s; killing it", timeout.as_secs());
                let _ = killpg(pid, Signal::SIGKILL);
                while self.services[name].pid.is_some() && t0.elapsed() < timeout + Duration::from_secs(5) {
                    std::thread::sleep(Duration::from_millis(20));
                    self.reap_stopping();
                }
            }
            tracing::info!("unit {name}: stopped in {:.2}s", t0.elapsed().as_secs_f64());
        }
        if self.pid1 {
            let _ = nix::sys::signal::kill(Pid::from_raw(-1), Signal::SIGKILL);
            std::thread::sleep(Duration::from_millis(50));
            let _ = sys::reap();
        }
    }

    fn reap_stopping(&mut self) {
        for (pid, _) in sys::reap() {
            for s in self.services.values_mut() {
                if s.pid == Some(pid) {
                    s.pid = None;
                }
            }
        }
    }
}

fn wait_readable(sfd: &SignalFd, timeout: Duration) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let ms = timeout.as_millis().min(60_000) as u16;
    let mut fds = [PollFd::new(sfd.as_fd(), PollFlags::POLLIN)];
    let _ = poll(&mut fds, PollTimeout::from(ms));
}

/// Echoes a child's output to the console, a line at a time, with its unit's name.
fn echo(name: &str, stream: impl std::io::Read + Send + 'static) {
    let name = name.to_string();
    let _ = std::thread::Builder::new()
        .name(format!("log-{name}"))
        .spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut line = Vec::new();
            loop {
                line.clear();
                // Lines are capped so one endless line cannot exhaust memory.
                match std::io::Read::take(&mut reader, 64 * 1024).read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&line);
                        let mut out = std::io::stdout().lock();
                        let _ = writeln!(out, "[{name}] {}", text.trim_end_matches(['\n', '\r']));
                        let _ = out.flush();
                    }
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::parse;
    use std::path::PathBuf;

    fn svc(name: &str, exec: &str, restart: &str, after: &[&str]) -> Unit {
        let text = format!(
            "[unit]\nafter = {after:?}\n[service]\nexec = [\"/bin/sh\", \"-c\", {exec:?}]\nrestart = {restart:?}\nstop-timeout = 2\n"
        );
        parse(&PathBuf::from(format!("/u/{name}.toml")), &text).unwrap()
    }

    fn wait_for(sup: &mut Supervisor, mut done: impl FnMut(&Supervisor) -> bool) {
        let t0 = Instant::now();
        while !done(sup) {
            assert!(t0.elapsed() < Duration::from_secs(20), "timed out: {:?}", sup.states());
            std::thread::sleep(Duration::from_millis(20));
            sup.reaped(sys::reap(), Instant::now());
            sup.start_ready(Instant::now());
        }
    }

    // One test drives every scenario: reaping with waitpid(-1) would steal the
    // children of tests running in parallel in the same process.
    #[test]
    fn supervises_services() {
        let _ = nix::sys::prctl::set_child_subreaper(true);
        // Dependency order and exit codes.
        let mut sup = Supervisor::new(
            vec![
                svc("second", "exit 3", "no", &["first"]),
                svc("first", "sleep 0.2", "no", &[]),
            ],
            false,
        );
        sup.start_ready(Instant::now());
        // ready = "exec": a dependent starts once its dependency is running.
        assert_eq!(sup.started, ["first", "second"]);
        wait_for(&mut sup, |s| {
            s.states()["second"] == State::Exited(3) && s.states()["first"] == State::Exited(0)
        });

        // on-failure restarts until the start limit, then fails.
        let mut sup = Supervisor::new(vec![svc("crashy", "exit 1", "on-failure", &[])], false);
        for s in sup.services.values_mut() {
            s.backoff = Duration::from_millis(1);
        }
        wait_for(&mut sup, |s| matches!(s.states()["crashy"], State::Failed(_)));
        assert_eq!(sup.services["crashy"].starts.len(), START_LIMIT);

        // Stop sends SIGTERM, and SIGKILL to one that ignores it.
        let mut sup = Supervisor::new(
            vec![
                svc("polite", "sleep 30", "always", &[]),
                svc("stubborn", "trap '' TERM; sleep 30 & wait; sleep 30", "always", &[]),
            ],
            false,
        );
        sup.start_ready(Instant::now());
        let t0 = Instant::now();
        sup.stop_all();
        assert!(t0.elapsed() >= Duration::from_secs(2), "stubborn must need SIGKILL");
        assert_eq!(sup.states()["polite"], State::Stopped);
        assert_eq!(sup.states()["stubborn"], State::Stopped);
        assert!(sup.services.values().all(|s| s.pid.is_none()));
    }

    #[test]
    fn refused_units_do_not_start() {
        let sup = Supervisor::new(
            vec![svc("a", "true", "no", &["b"]), svc("b", "true", "no", &["a"])],
            false,
        );
        assert!(matches!(sup.states()["a"], State::Failed(_)));
        assert!(matches!(sup.states()["b"], State::Failed(_)));
    }
}
