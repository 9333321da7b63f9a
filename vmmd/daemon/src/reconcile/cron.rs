//! Scheduled units: each due time of a unit's `schedule` starts one run,
//! a fresh workload of the unit that runs to its end.
//!
//! # Design
//! The core keeps, per scheduled unit, when it last fired and when it is
//! next due (wall-clock time, passed in like the monotonic `now`, so the
//! tests move it). A run is a workload named `UNIT-YYYYMMDD-HHMM` (the due
//! minute, UTC) with `run` set to its due time; the replica logic leaves
//! runs alone. When a run is due while an earlier one still runs, the
//! unit's `concurrency` decides: `allow` starts it beside, `forbid` skips
//! it (and says so in the history), `replace` stops the running one first.
//! A run that outlives its `deadline` is stopped and ends as failed, never
//! restarted. Ended runs are kept (with their logs) up to the unit's
//! `history`, the oldest forgotten first.
//!
//! The last due time fired is kept across restarts of vmmd (the daemon
//! saves [`Core::cron_marks`]); when vmmd starts and the schedule named a
//! time after it, that one missed run is caught up, at most once, and
//! only when it was due no more than `starting-deadline` seconds ago
//! (Kubernetes CronJob's rule). A clock that jumps (a time step at boot)
//! fires at most one run per unit per tick, never a burst.

use super::{AfterStop, Backend, Core, Workload};
use chrono::{DateTime, Timelike, Utc};
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};
use steelcup_api::vmm1::{CronInfo, CronRun, WorkloadState};
use steelcup_units::schedule::Concurrency;
use steelcup_units::MicrovmSection;

/// What the core knows of one scheduled unit.
#[derive(Debug, Default)]
pub struct UnitCron {
    /// The last due time that fired (or was skipped).
    pub last_due: Option<DateTime<Utc>>,
    /// When it is due next.
    pub next_due: Option<DateTime<Utc>>,
    /// The schedule `next_due` was computed from (a reload may change it).
    from: String,
    /// Due times and what became of them, newest last.
    pub history: VecDeque<Record>,
}

/// One due time: the run it started, or why none.
#[derive(Debug, Clone)]
pub struct Record {
    pub due: DateTime<Utc>,
    /// The run's workload; None when skipped.
    pub workload: Option<String>,
    /// How it ended, kept when its workload is forgotten.
    pub outcome: String,
    pub exit_code: i32,
    pub note: String,
}

/// The scheduled units' state.
#[derive(Debug, Default)]
pub struct Book {
    pub units: BTreeMap<String, UnitCron>,
    /// Last due times read back at start, for the catch-up.
    restored: BTreeMap<String, DateTime<Utc>>,
}

/// How often vmmd looks at the clock while a unit is scheduled, at the
/// least: a clock stepped forward (time sync at boot) is noticed this soon.
pub const CLOCK_CHECK: Duration = Duration::from_secs(5);

impl<B: Backend> Core<B> {
    /// Gives the last due times saved by a previous vmmd (at start).
    pub fn restore_cron_marks(&mut self, marks: BTreeMap<String, DateTime<Utc>>) {
        self.cron.restored = marks;
    }

    /// The last due time fired per scheduled unit, to be kept across
    /// restarts.
    pub fn cron_marks(&self) -> BTreeMap<String, DateTime<Utc>> {
        self.cron
            .units
            .iter()
            .filter_map(|(u, c)| c.last_due.map(|d| (u.clone(), d)))
            .collect()
    }

    /// Fires what is due at `wall`, keeps the history current and trims it.
    pub(super) fn cron_tick(&mut self, now: Instant, wall: DateTime<Utc>) {
        let scheduled: Vec<(String, MicrovmSection)> = self
            .units
            .iter()
            .filter(|(_, s)| s.schedule.is_some())
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect();
        self.cron
            .units
            .retain(|u, _| scheduled.iter().any(|(n, _)| n == u));
        for (unit, spec) in &scheduled {
            self.cron_unit(unit, spec, now, wall);
        }
    }

    fn cron_unit(&mut self, unit: &str, spec: &MicrovmSection, now: Instant, wall: DateTime<Utc>) {
        let (Some(schedule), tz) = (&spec.schedule, spec.time_zone.unwrap_or_default()) else {
            return;
        };
        // Due times are whole seconds (whole minutes, in fact).
        let wall = wall.with_nanosecond(0).unwrap_or(wall);
        let from = format!("{schedule} {tz}");
        let restored = self.cron.restored.remove(unit);
        let c = self.cron.units.entry(unit.to_string()).or_default();
        let mut due = Vec::new();
        if c.from != from {
            let first = c.from.is_empty();
            c.from = from;
            c.next_due = schedule.next_after(&tz, wall);
            if first {
                c.last_due = restored;
                // A time named after the last run, missed while vmmd was
                // not running: caught up once.
                if let (Some(last), Some(missed)) =
                    (restored, schedule.last_at_or_before(&tz, wall))
                {
                    if missed > last {
                        due.push((missed, "caught up (missed while vmmd was not running)"));
                    }
                }
            }
        }
        if let Some(next) = c.next_due.filter(|n| *n <= wall) {
            // The latest time named by now (the clock may have jumped
            // past several).
            let latest = schedule.last_at_or_before(&tz, wall).unwrap_or(next);
            due.push((latest.max(next), ""));
            c.next_due = schedule.next_after(&tz, wall);
        }
        // At most one run per tick: the latest due time.
        if let Some((at, note)) = due.into_iter().max_by_key(|(at, _)| *at) {
            let c = self.cron.units.get_mut(unit).expect("entry made above");
            c.last_due = Some(at);
            let late = (wall - at).to_std().unwrap_or_default();
            match spec.starting_deadline {
                Some(s) if late > Duration::from_secs(u64::from(s)) => {
                    let note = format!(
                        "skipped: due {}s ago, past its starting deadline of {s}s",
                        late.as_secs()
                    );
                    tracing::info!("schedule {unit}: {note}");
                    self.record(unit, at, None, note);
                }
                _ => self.fire(unit, spec, at, note, now),
            }
        }
        self.cron_history(unit, spec);
    }

    /// A due run of `unit`: started, or skipped by its concurrency policy.
    fn fire(
        &mut self,
        unit: &str,
        spec: &MicrovmSection,
        due: DateTime<Utc>,
        note: &str,
        now: Instant,
    ) {
        let active: Vec<String> = self
            .workloads
            .iter()
            .filter(|(_, w)| {
                w.unit.as_deref() == Some(unit)
                    && w.run.is_some()
                    && w.state() != WorkloadState::Ended
            })
            .map(|(n, _)| n.clone())
            .collect();
        let mut note = note.to_string();
        match (spec.concurrency.unwrap_or_default(), active.first()) {
            (Concurrency::Forbid, Some(running)) => {
                let note = format!("skipped: {running} still runs (concurrency = \"forbid\")");
                tracing::info!("schedule {unit}: {note}");
                self.record(unit, due, None, note);
                return;
            }
            (Concurrency::Replace, Some(_)) => {
                for name in &active {
                    tracing::info!(
                        "workload {name}: replaced by the next run of {unit}; stopping it"
                    );
                    self.stop(
                        name,
                        None,
                        AfterStop::Expired("replaced by the next run".into()),
                        now,
                    );
                }
                note = format!("replaced {}", active.join(", "));
            }
            _ => {}
        }
        let base = format!("{unit}-{}", due.format("%Y%m%d-%H%M"));
        let name = std::iter::once(base.clone())
            .chain((2..).map(|k| format!("{base}-{k}")))
            .find(|n| !self.workloads.contains_key(n) && !self.units.contains_key(n))
            .unwrap_or(base);
        let mut w = Workload::new(spec.clone(), self.free_cid(), now);
        w.unit = Some(unit.to_string());
        w.run = Some(due);
        tracing::info!(
            "workload {name}: new, the run of unit {unit} due at {}",
            due.to_rfc3339()
        );
        self.workloads.insert(name.clone(), w);
        self.record(unit, due, Some(name), note);
    }

    fn record(&mut self, unit: &str, due: DateTime<Utc>, workload: Option<String>, note: String) {
        if let Some(c) = self.cron.units.get_mut(unit) {
            c.history.push_back(Record {
                due,
                workload,
                outcome: String::new(),
                exit_code: -1,
                note,
            });
        }
    }

    /// Copies the runs' outcomes into the history, forgets ended runs past
    /// the unit's `history`, and trims the records.
    fn cron_history(&mut self, unit: &str, spec: &MicrovmSection) {
        let keep = spec.history() as usize;
        let Some(c) = self.cron.units.get_mut(unit) else {
            return;
        };
        for r in &mut c.history {
            if let Some(w) = r.workload.as_ref().and_then(|n| self.workloads.get(n)) {
                r.outcome = w.last_outcome.text.clone();
                r.exit_code = w.last_outcome.exit_code;
            }
        }
        let mut ended: Vec<(DateTime<Utc>, String)> = self
            .workloads
            .iter()
            .filter(|(_, w)| w.unit.as_deref() == Some(unit) && w.state() == WorkloadState::Ended)
            .filter_map(|(n, w)| w.run.map(|d| (d, n.clone())))
            .collect();
        ended.sort();
        let extra = ended.len().saturating_sub(keep);
        for (_, name) in ended.into_iter().take(extra) {
            self.forget(name.as_str());
        }
        if let Some(c) = self.cron.units.get_mut(unit) {
            while c.history.len() > keep.max(1) * 2 {
                c.history.pop_front();
            }
        }
    }

    /// When the next scheduled run is due, as an instant (`wall` being
    /// `now`), no later than [`CLOCK_CHECK`] from now.
    pub(super) fn cron_wakeup(&self, now: Instant, wall: DateTime<Utc>) -> Option<Instant> {
        if !self.units.values().any(|s| s.schedule.is_some()) {
            return None;
        }
        let next = self
            .cron
            .units
            .values()
            .filter_map(|c| c.next_due)
            .min()
            .map(|d| now + (d - wall).to_std().unwrap_or_default());
        Some(next.map_or(now + CLOCK_CHECK, |n| n.min(now + CLOCK_CHECK)))
    }

    /// The scheduled units and their runs (`cup cron ls`).
    pub fn cron_info(&self) -> Vec<CronInfo> {
        let unix = |d: Option<DateTime<Utc>>| d.map_or(0, |d| d.timestamp());
        self.units
            .iter()
            .filter_map(|(unit, spec)| {
                let schedule = spec.schedule.as_ref()?;
                let c = self.cron.units.get(unit);
                Some(CronInfo {
                    unit: unit.clone(),
                    schedule: schedule.to_string(),
                    time_zone: spec.time_zone.unwrap_or_default().to_string(),
                    concurrency: spec.concurrency.unwrap_or_default().to_string(),
                    next_due: unix(c.and_then(|c| c.next_due)),
                    last_due: unix(c.and_then(|c| c.last_due)),
                    runs: c
                        .map(|c| {
                            c.history
                                .iter()
                                .map(|r| {
                                    let w = r.workload.as_ref().and_then(|n| self.workloads.get(n));
                                    CronRun {
                                        due: r.due.timestamp(),
                                        workload: r.workload.clone().unwrap_or_default(),
                                        state: match (w, &r.workload) {
                                            (Some(w), _) => w.state().to_string(),
                                            (None, Some(_)) => "removed".into(),
                                            (None, None) => "skipped".into(),
                                        },
                                        outcome: r.outcome.clone(),
                                        exit_code: r.exit_code,
                                        note: r.note.clone(),
                                    }
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                })
            })
            .collect()
    }
}
