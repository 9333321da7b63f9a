//! The boot's A/B health gate: judged once per boot on the services'
//! states, it keeps the booted OS slot or has the machine reboot into the
//! other (`steelcup_os::slots`).

use super::*;

/// The boot's health gate: it passes once every service has started (each
/// running and ready, or done with status 0, or skipped by its condition)
/// before `deadline`, and fails when a service has failed or the deadline
/// comes first. Judged once per boot.
pub struct Gate {
    pub deadline: Instant,
    pub on_pass: Box<dyn FnOnce() + Send>,
    /// Told why; returns true to reboot.
    pub on_fail: Box<dyn FnOnce(&str) -> bool + Send>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

/// What a gate sees now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Pending,
    Passed,
    Failed(String),
}

impl Supervisor {
    /// Sets the boot's health gate.
    pub fn set_gate(&mut self, gate: Gate) {
        self.gate = Some(gate);
    }

    /// The gate's verdict on the services now, at `now` against `deadline`.
    pub fn verdict(&self, now: Instant, deadline: Instant) -> Verdict {
        let mut waiting = Vec::new();
        for (name, s) in &self.services {
            match &s.state {
                State::Running | State::Exited(0) | State::Skipped(_) => {}
                State::Failed(why) => return Verdict::Failed(format!("unit {name} failed: {why}")),
                State::Exited(code) => {
                    return Verdict::Failed(format!("unit {name} exited with status {code}"))
                }
                _ => waiting.push(name.as_str()),
            }
        }
        if waiting.is_empty() {
            Verdict::Passed
        } else if now >= deadline {
            Verdict::Failed(format!(
                "not started within {:.0}s: {}",
                deadline.saturating_duration_since(self.boot).as_secs_f64(),
                waiting.join(", ")
            ))
        } else {
            Verdict::Pending
        }
    }

    /// Judges the gate once its verdict is in; true: reboot.
    pub(super) fn judge_gate(&mut self, now: Instant) -> bool {
        let Some(deadline) = self.gate.as_ref().map(|g| g.deadline) else {
            return false;
        };
        match self.verdict(now, deadline) {
            Verdict::Pending => false,
            Verdict::Passed => {
                tracing::info!(
                    "health gate passed in {:.1}s",
                    self.boot.elapsed().as_secs_f64()
                );
                if let Some(g) = self.gate.take() {
                    (g.on_pass)();
                }
                false
            }
            Verdict::Failed(why) => {
                tracing::error!("health gate failed: {why}");
                self.gate.take().is_some_and(|g| (g.on_fail)(&why))
            }
        }
    }
}
