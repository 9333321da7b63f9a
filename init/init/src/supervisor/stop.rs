//! Stopping a service without stopping the supervisor.
//!
//! # Design
//! A stop sends the unit's stop signal to its process group and returns;
//! the loop goes on serving the API and the other units. SIGKILL follows
//! at the unit's stop timeout, a deadline like a restart's, and the
//! supervisor gives up on the process [`AFTER_KILL`] later (one stuck in
//! the kernel). What comes after the stop happens when its exit is reaped:
//! nothing, a start (`cup unit restart`), the unit's new definition (a
//! reload that changed it) or its removal (a reload that removed it).
//! Callers of the API's `Stop` and `Restart` are answered then, as
//! `systemctl stop` returns once the unit has stopped. Only the shutdown
//! ([`Supervisor::stop_all`]) waits in place, one unit after the other in
//! reverse start order.

use super::*;

/// An API caller waiting for a stop to end.
pub(super) type Waiter = futures_channel::oneshot::Sender<Result<Reply, ApiError>>;

/// How long the exit of a killed unit is waited for.
const AFTER_KILL: Duration = Duration::from_secs(5);

/// What follows a stop.
#[derive(Debug)]
pub(super) enum AfterStop {
    Stay,
    /// Started again (`cup unit restart`).
    Start,
    /// A reload changed the unit: its new definition takes its place.
    Replace(Box<Service>),
    /// A reload removed the unit.
    Remove,
}

/// A stop under way.
#[derive(Debug)]
pub(super) struct Stopping {
    began: Instant,
    /// When SIGKILL goes; once it went, when the supervisor stops waiting.
    deadline: Instant,
    killed: bool,
    then: AfterStop,
    waiters: Vec<Waiter>,
}

impl Supervisor {
    /// Begins to stop `name`, then does `then`; `waiter` is answered once
    /// that is done. A unit already stopping takes the new `then` (unless
    /// it is [`AfterStop::Stay`]) and one more waiter.
    pub(super) fn begin_stop(&mut self, name: &str, then: AfterStop, waiter: Option<Waiter>) {
        let now = Instant::now();
        let Some(s) = self.services.get_mut(name) else {
            if let Some(w) = waiter {
                let _ = w.send(Err(ApiError::NoSuchUnit(name.into())));
            }
            return;
        };
        if let Some(st) = &mut s.stopping {
            if !matches!(then, AfterStop::Stay) {
                st.then = then;
            }
            st.waiters.extend(waiter);
            return;
        }
        let (pid, signal) = (s.pid, s.spec.stop_signal());
        s.restart_at = None;
        s.ready_deadline = None;
        s.stopping = Some(Stopping {
            began: now,
            deadline: now + s.unit.stop_timeout(),
            killed: false,
            then,
            waiters: waiter.into_iter().collect(),
        });
        let Some(pid) = pid else {
            // Not running: a restart it waited for is off; nothing to signal.
            self.finish_stop(name, None);
            return;
        };
        tracing::info!("unit {name}: stopping");
        self.set_state(name, State::Stopping);
        let _ = killpg(pid, signal);
    }

    /// SIGKILL for the stops past their timeout; gives up on those killed
    /// [`AFTER_KILL`] ago.
    pub(super) fn check_stops(&mut self, now: Instant) {
        let due: Vec<String> = self
            .services
            .iter()
            .filter(|(_, s)| s.stopping.as_ref().is_some_and(|st| st.deadline <= now))
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            let Some(s) = self.services.get_mut(&name) else {
                continue;
            };
            let timeout = s.unit.stop_timeout().as_secs();
            let pid = s.pid;
            let Some(st) = s.stopping.as_mut() else {
                continue;
            };
            if !st.killed {
                tracing::warn!("unit {name}: did not stop in {timeout}s; killing it");
                if let Some(pid) = pid {
                    let _ = killpg(pid, Signal::SIGKILL);
                }
                st.killed = true;
                st.deadline = now + AFTER_KILL;
            } else {
                tracing::error!(
                    "unit {name}: still there {}s after SIGKILL (stuck in the kernel?); no longer waited for",
                    AFTER_KILL.as_secs()
                );
                s.pid = None;
                self.finish_stop(&name, pid);
            }
        }
    }

    /// The next stop deadline.
    pub(super) fn stop_deadline(&self) -> Option<Instant> {
        self.services
            .values()
            .filter_map(|s| s.stopping.as_ref().map(|st| st.deadline))
            .min()
    }

    /// True while `name` is stopping.
    pub(super) fn is_stopping(&self, name: &str) -> bool {
        self.services
            .get(name)
            .is_some_and(|s| s.stopping.is_some())
    }

    /// The stop of `name` is over: its process `pid` ended (None: it was
    /// not running); what follows is done and the waiters answered.
    pub(super) fn finish_stop(&mut self, name: &str, pid: Option<Pid>) {
        let Some(st) = self.services.get_mut(name).and_then(|s| s.stopping.take()) else {
            return;
        };
        if let Some(pid) = pid {
            // Whatever else is left of its process group.
            let _ = killpg(pid, Signal::SIGKILL);
            tracing::info!(
                "unit {name}: stopped in {:.2}s",
                st.began.elapsed().as_secs_f64()
            );
        }
        if self
            .services
            .get(name)
            .is_some_and(|s| matches!(s.state, State::Stopping | State::Waiting))
        {
            self.set_state(name, State::Stopped);
        }
        match st.then {
            AfterStop::Stay => {}
            AfterStop::Start => {
                if let Some(s) = self.services.get_mut(name) {
                    s.quick_exits = 0;
                    s.backoff.reset();
                    s.restart_at = None;
                }
                self.set_state(name, State::Waiting);
            }
            AfterStop::Replace(mut new) => {
                if let Some(old) = self.services.remove(name) {
                    new.restarts = old.restarts;
                }
                let state = new.state.clone();
                self.services.insert(name.to_string(), *new);
                if let Some(o) = &self.observer {
                    o(name, &state);
                }
            }
            AfterStop::Remove => {
                self.services.remove(name);
                self.remove_cgroup(name);
                self.started.retain(|n| n != name);
                self.order.retain(|n| n != name);
            }
        }
        for w in st.waiters {
            let _ = w.send(Ok(Reply::Done));
        }
    }

    /// Stops `name` and waits for it (the shutdown's way).
    pub fn stop_one(&mut self, name: &str) {
        self.begin_stop(name, AfterStop::Stay, None);
        while self.is_stopping(name) {
            std::thread::sleep(Duration::from_millis(10));
            self.reaped(sys::reap(), Instant::now());
            self.check_stops(Instant::now());
        }
    }
}
