//! The daemon's state machine: desired state (the `[microvm]` units) and
//! the workloads that run it, one VM each, reconciled on every event.
//!
//! # Design
//! [`Core`] owns every workload and the desired units and decides; what it
//! decides happens through a [`Backend`] (the real one starts jailed
//! workers, the tests' one records calls), and what happened comes back as
//! calls (`ended`, `prepared`, `probed`) with the time passed in, so the
//! whole policy runs in unit tests without a VM or a clock.
//!
//! A unit with `replicas = N` has N workloads, each holding a slot
//! `0..N` (a slot keeps its volumes across replacements). A workload is
//! named `UNIT` (one replica) or `UNIT.K`, the first free K. On every tick,
//! per unit:
//! - a workload whose spec is not the unit's is *old*; with old ones
//!   around, new ones start one at a time, each only when the previous new
//!   one is ready (running, and healthy when the unit has a health check),
//!   and an old one is retired (asked to stop, then forgotten) once a ready
//!   new one holds its slot: a rolling replace. A unit with volumes stops
//!   the old workload of a slot before the new one starts (one disk, one
//!   VM);
//! - missing slots start at once when there is nothing old (boot, scale
//!   up, a workload removed by `cup rm`);
//! - slots at or past `replicas` are retired (scale down); a removed unit
//!   retires all of its workloads.
//!
//! A workload restarts by its restart policy with backoff (1 s doubling to
//! 30 s, back to 1 s once it has been healthy or up for 10 s). A health
//! check probes every second until the first success, then every
//! `interval`; `retries` failures in a row (not counting those in
//! `start-period`) make the workload unhealthy: it is stopped and that
//! counts as a failure. An image that cannot be pulled is retried with the
//! same backoff, without holding up other workloads.
//!
//! The warm pool is the core's too (`warm.rs`): it decides which pool VMs
//! to boot and when (the bookkeeping of `crate::pool`), and a start that
//! fits a ready pool VM takes it, or starts cold when the VM cannot take
//! the workload.

use crate::image::workload::{PrepareError, Prepared};
use crate::pool::{Key, Pool, PoolSpec};
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use steelcup_api::vmm1::{ApiError, Outcome, Reply, WorkloadState};
use steelcup_proto::worker::{VmOutcome, WorkerCommand, WorkerReport};
use steelcup_units::{Backoff, HealthCheck, MicrovmSection, Restart};

/// What the core asks of the world.
pub trait Backend {
    /// A warm-pool VM as the backend holds it (the real one: its worker).
    type PoolVm: std::fmt::Debug;
    /// Why a start, a warm start or a control command failed.
    type Error: std::error::Error + 'static;
    /// Pull `image` and build its root image for workload `name`; the
    /// answer comes back through [`Core::prepared`].
    fn prepare(&mut self, name: &str, image: &str);
    /// Start workload `name`'s VM; its end comes back through
    /// [`Core::ended`]. Ok with the worker's pid.
    fn start(&mut self, name: &str, w: &Workload, attach: bool) -> Result<i32, Self::Error>;
    /// Ask the guest to end its workload (it may not answer).
    fn ask_stop(&mut self, name: &str);
    /// Kill the VM's worker.
    fn kill(&mut self, name: &str, pid: i32);
    /// Probe the workload's health; the answer comes back through
    /// [`Core::probed`].
    fn probe(&mut self, name: &str, check: &HealthCheck);
    /// Send a control command (pause, resume) to the VM's worker.
    fn control(&mut self, name: &str, command: &WorkerCommand) -> Result<(), Self::Error>;
    /// A workload is gone for good: drop what is kept for it.
    fn forgotten(&mut self, name: &str);
    /// The warm-pool size a start of workload `w` fits, if any.
    fn pool_fit(&self, name: &str, w: &Workload) -> Option<Key>;
    /// Boot pool VM `name` of size `key`; that it is ready comes back
    /// through [`Core::pool_ready`], its end through [`Core::pool_ended`].
    fn boot_pool_vm(&mut self, name: &str, key: Key) -> Result<Self::PoolVm, Self::Error>;
    /// Start workload `name` in warm VM `vm` (pool member `pool_name`).
    /// Err: the VM could not take it and is gone; the core starts it cold.
    fn start_warm(
        &mut self,
        name: &str,
        w: &Workload,
        attach: bool,
        pool_name: &str,
        vm: Self::PoolVm,
    ) -> Result<i32, Self::Error>;
    /// Kill pool VM `name` (it did not come up in time, or vmmd stops).
    fn kill_pool_vm(&mut self, name: &str, vm: &Self::PoolVm);
}

/// How long a guest has to end its workload after being asked to stop.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// The first restart delay, and the longest.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// A run this long (or a healthy probe) resets the backoff.
const STEADY: Duration = Duration::from_secs(10);

/// Until a workload is first healthy it is probed this often.
const FIRST_PROBES: Duration = Duration::from_secs(1);

/// Until this long after a start (plus the check's `start-period`), a
/// probe that cannot reach the guest at all does not count: the VM is
/// still booting.
pub const BOOT_GRACE: Duration = Duration::from_secs(60);

/// Why a health probe failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeFailure {
    pub message: String,
    /// vminit could not be reached (the guest is still booting, or hung).
    pub unreachable: bool,
}

/// How many removed workloads' outcomes are remembered.
const REMEMBER_REMOVED: usize = 64;

/// How the last removed workloads ended, newest last (shared with the API
/// so `cup run` can say why a VM it waited for is gone).
pub type Removed = Arc<Mutex<VecDeque<(String, Outcome)>>>;

/// What happens once a stopping workload has ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterStop {
    /// It stays, ended (`cup stop`).
    Stay,
    /// It ended as a failure (unhealthy): the restart policy decides.
    Failed(String),
    /// It ended as a failure that is not restarted (a scheduled run past
    /// its deadline, or replaced by the next run).
    Expired(String),
    /// It goes (retired by the reconciler, `cup rm -f`).
    Remove,
}

/// A stop in progress.
#[derive(Debug)]
pub struct Stopping {
    pub kill_at: Instant,
    pub replies: Vec<futures_channel::oneshot::Sender<Result<Reply, ApiError>>>,
    pub then: AfterStop,
}

/// Health, for workloads with a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Starting,
    Healthy,
    Unhealthy,
}

/// One workload: one VM at a time.
#[derive(Debug)]
pub struct Workload {
    pub spec: MicrovmSection,
    /// Its unit; None for `cup run`'s.
    pub unit: Option<String>,
    /// Its place among the unit's replicas (names its volumes).
    pub slot: u32,
    /// The guest's vsock context id.
    pub cid: u32,
    pub pid: Option<i32>,
    pub paused: bool,
    pub restart_at: Option<Instant>,
    pub backoff: Backoff,
    pub runs: u64,
    pub last_outcome: Outcome,
    pub started_at: Option<Instant>,
    pub stopping: Option<Stopping>,
    /// The workload's image, ready to boot.
    pub prepared: Option<Prepared>,
    /// A thread is pulling the image or building its root image.
    pub preparing: bool,
    /// Forgotten once it has ended (`cup run --rm`).
    pub remove_when_done: bool,
    /// The next boot waits for `cup` to attach to the workload's stdio
    /// (with a terminal when `tty`).
    pub attach: bool,
    pub tty: bool,
    pub health: Option<Health>,
    pub probe_failures: u32,
    pub last_probe: String,
    pub next_probe: Option<Instant>,
    pub probing: bool,
    /// Restarts its policy made since it was started (`max-restarts`).
    pub policy_restarts: u32,
    /// A scheduled unit's run: the time it was due ([`cron`]).
    pub run: Option<chrono::DateTime<chrono::Utc>>,
    /// A scheduled run that is still running then is stopped.
    pub deadline_at: Option<Instant>,
}

impl Workload {
    pub fn new(spec: MicrovmSection, cid: u32, now: Instant) -> Workload {
        Workload {
            spec,
            unit: None,
            slot: 0,
            cid,
            pid: None,
            paused: false,
            restart_at: Some(now),
            backoff: Backoff::new(BACKOFF_FIRST, BACKOFF_MAX),
            runs: 0,
            last_outcome: Outcome::none(),
            started_at: None,
            stopping: None,
            prepared: None,
            preparing: false,
            remove_when_done: false,
            attach: false,
            tty: false,
            health: None,
            probe_failures: 0,
            last_probe: String::new(),
            next_probe: None,
            probing: false,
            policy_restarts: 0,
            run: None,
            deadline_at: None,
        }
    }

    /// Its state, from what it has: a worker, a pause, a restart due.
    pub fn state(&self) -> WorkloadState {
        match (self.pid, self.paused, self.restart_at) {
            (Some(_), _, _) if self.stopping.is_some() => WorkloadState::Stopping,
            (Some(_), true, _) => WorkloadState::Paused,
            (Some(_), false, _) => WorkloadState::Running,
            (None, _, _) if self.preparing => WorkloadState::Preparing,
            (None, _, Some(_)) => WorkloadState::Waiting,
            (None, _, None) => WorkloadState::Ended,
        }
    }

    /// `healthy`, `unhealthy`, `starting`, or empty without a check.
    pub fn health_name(&self) -> &'static str {
        match self.health {
            None => "",
            Some(Health::Starting) => "starting",
            Some(Health::Healthy) => "healthy",
            Some(Health::Unhealthy) => "unhealthy",
        }
    }

    /// Running, not on its way out, and healthy if it has a check.
    pub fn ready(&self) -> bool {
        self.pid.is_some()
            && self.stopping.is_none()
            && (self.spec.health.is_none() || self.health == Some(Health::Healthy))
    }

    /// Where its volumes live under the state directory's `volumes/`
    /// (`cup run`'s named volumes are shared by every `cup run`).
    pub fn volume_key(&self) -> String {
        match (&self.unit, self.slot) {
            (Some(u), 0) => u.clone(),
            (Some(u), k) => format!("{u}/replica-{k}"),
            (None, _) => crate::daemon::NAMED_VOLUMES.to_string(),
        }
    }
}

/// Two specs run the same VM (replicas may differ).
fn same_vm(a: &MicrovmSection, b: &MicrovmSection) -> bool {
    let mut b = b.clone();
    b.replicas = a.replicas;
    *a == b
}

/// What a change of units did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UnitChanges {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

/// The daemon's state.
#[derive(Debug)]
pub struct Core<B: Backend> {
    pub workloads: BTreeMap<String, Workload>,
    /// The `[microvm]` units: the desired state.
    pub units: BTreeMap<String, MicrovmSection>,
    pub backend: B,
    pub removed: Removed,
    /// The warm pool's VMs.
    pub pool: Pool<B::PoolVm>,
    pub counters: Counters,
    /// The scheduled units' runs.
    pub cron: cron::Book,
    /// Each unit's `after` and `requires`: the units whose first ready VM
    /// its first VM waits for (Compose's `depends_on`).
    pub after: BTreeMap<String, Vec<String>>,
    /// Units said to be waiting for their `after` (said once).
    waiting: std::collections::BTreeSet<String>,
}

/// The outcome kind of a run vmmd itself could not carry out (its image,
/// its start).
pub const VMMD_FAILED: &str = "vmmd_failed";

/// What the reconciler counted since vmmd started (`cup metrics`).
#[derive(Debug, Default)]
pub struct Counters {
    /// Starts the warm pool served.
    pub pool_hits: u64,
    /// Starts that fit a pool but found no VM ready, or one that refused.
    pub pool_misses: u64,
    /// Runs that ended, by (workload, `VmOutcome::kind` or
    /// `vmmd_failed`); a workload's go when it is removed.
    pub outcomes: BTreeMap<(String, String), u64>,
}

impl Counters {
    fn ended(&mut self, name: &str, kind: &str) {
        *self
            .outcomes
            .entry((name.to_string(), kind.to_string()))
            .or_default() += 1;
    }
}

impl<B: Backend> Core<B> {
    pub fn new(backend: B, removed: Removed, pool: Vec<PoolSpec>) -> Self {
        Core {
            workloads: BTreeMap::new(),
            units: BTreeMap::new(),
            backend,
            removed,
            pool: Pool::new(pool),
            counters: Counters::default(),
            cron: cron::Book::default(),
            after: BTreeMap::new(),
            waiting: Default::default(),
        }
    }

    /// Installs each unit's start order: the `[microvm]` units named by
    /// its `after` and `requires` (others are init's business).
    pub fn set_after(&mut self, after: BTreeMap<String, Vec<String>>) {
        self.after = after;
    }

    /// The unit `unit` waits for before its first VM: one of its `after`
    /// units, standing (not scheduled, replicas wanted) with no ready VM.
    fn waits_for(&self, unit: &str) -> Option<String> {
        let deps = self.after.get(unit)?;
        deps.iter()
            .filter(|d| d.as_str() != unit)
            .filter(|d| {
                self.units
                    .get(d.as_str())
                    .is_some_and(|s| s.schedule.is_none() && s.replicas > 0)
            })
            .find(|d| {
                !self
                    .workloads
                    .values()
                    .any(|w| w.unit.as_deref() == Some(d.as_str()) && w.ready())
            })
            .cloned()
    }

    /// Installs a new desired state (at start and on reload); the next
    /// [`Core::tick`] acts on it.
    pub fn set_units(&mut self, units: BTreeMap<String, MicrovmSection>) -> UnitChanges {
        let mut c = UnitChanges::default();
        for (name, spec) in &units {
            match self.units.get(name) {
                None => c.added.push(name.clone()),
                Some(old) if old != spec => c.changed.push(name.clone()),
                Some(_) => {}
            }
        }
        c.removed = self
            .units
            .keys()
            .filter(|n| !units.contains_key(*n))
            .cloned()
            .collect();
        // A removed unit no longer waits; one added again says so again.
        self.waiting.retain(|u| units.contains_key(u));
        self.units = units;
        c
    }

    /// The lowest vsock context id no workload has (3 and up).
    pub fn free_cid(&self) -> u32 {
        let used: std::collections::BTreeSet<u32> =
            self.workloads.values().map(|w| w.cid).collect();
        (3..).find(|c| !used.contains(c)).unwrap_or(3)
    }

    /// Adds a workload made by `cup run`.
    pub fn add(&mut self, name: String, w: Workload) {
        tracing::info!("workload {name}: created by cup run");
        self.workloads.insert(name, w);
    }

    /// The first free name for a new workload of `unit`.
    fn new_name(&self, unit: &str, replicas: u32) -> String {
        let taken = |n: &String| self.workloads.contains_key(n) || self.units.contains_key(n);
        let first = (replicas == 1)
            .then(|| unit.to_string())
            .filter(|n| !self.workloads.contains_key(n));
        first
            .into_iter()
            .chain((1..).map(|k| format!("{unit}.{k}")).filter(|n| !taken(n)))
            .next()
            .unwrap_or_default()
    }

    /// Compares every unit with its workloads and starts, retires, stops
    /// or kills what is due; the time of the next thing due comes from
    /// [`Core::next_wakeup`].
    pub fn tick(&mut self, now: Instant) {
        self.tick_at(now, chrono::Utc::now());
    }

    /// [`Self::tick`] with the wall-clock time `wall` (scheduled units
    /// fire by it).
    pub fn tick_at(&mut self, now: Instant, wall: chrono::DateTime<chrono::Utc>) {
        self.cron_tick(now, wall);
        self.reconcile(now);
        let names: Vec<String> = self.workloads.keys().cloned().collect();
        for name in names {
            self.tick_one(&name, now);
        }
    }

    fn tick_one(&mut self, name: &str, now: Instant) {
        let Some(w) = self.workloads.get_mut(name) else {
            return;
        };
        if let (Some(s), Some(pid)) = (&mut w.stopping, w.pid) {
            if s.kill_at <= now {
                tracing::warn!(
                    "workload {name}: still running {}s after it was asked to stop; killing its worker",
                    STOP_GRACE.as_secs()
                );
                self.backend.kill(name, pid);
                s.kill_at = now + Duration::from_secs(3600);
            }
            return;
        }
        if let (Some(_), Some(at)) = (w.pid, w.deadline_at) {
            if at <= now {
                w.deadline_at = None;
                let secs = w.spec.deadline.unwrap_or_default();
                tracing::info!(
                    "workload {name}: still running at its deadline ({secs}s); stopping it"
                );
                let why = format!("stopped at its deadline ({secs}s)");
                self.stop(name, None, AfterStop::Expired(why), now);
                return;
            }
        }
        if w.pid.is_some() {
            if let Some(check) = &w.spec.health {
                if !w.probing && w.next_probe.is_some_and(|t| t <= now) {
                    w.probing = true;
                    self.backend.probe(name, check);
                }
            }
            return;
        }
        if w.restart_at.is_none_or(|t| t > now) {
            return;
        }
        w.restart_at = None;
        if let (Some(image), None) = (&w.spec.image, &w.prepared) {
            if !w.preparing {
                w.preparing = true;
                let image = image.clone();
                self.backend.prepare(name, &image);
            }
            return;
        }
        w.runs += 1;
        let attach = std::mem::take(&mut w.attach);
        let fit = self.backend.pool_fit(name, w);
        let warm = fit.and_then(|key| self.pool.take(key));
        if fit.is_some() && warm.is_none() {
            self.counters.pool_misses += 1;
        }
        let started = match warm {
            Some((pool_name, m)) => {
                match self
                    .backend
                    .start_warm(name, w, attach, &pool_name, m.handle)
                {
                    Ok(pid) => {
                        self.counters.pool_hits += 1;
                        Ok(pid)
                    }
                    Err(e) => {
                        self.counters.pool_misses += 1;
                        tracing::warn!(
                            "workload {name}: warm VM {pool_name} refused: {}; starting cold",
                            steelcup_sys::error_chain(&e)
                        );
                        self.backend.start(name, w, attach)
                    }
                }
            }
            None => self.backend.start(name, w, attach),
        };
        match started {
            Ok(pid) => {
                w.pid = Some(pid);
                w.paused = false;
                w.started_at = Some(now);
                w.health = w.spec.health.as_ref().map(|_| Health::Starting);
                w.probe_failures = 0;
                w.next_probe = Some(now + FIRST_PROBES);
                w.deadline_at = w
                    .run
                    .and(w.spec.deadline)
                    .map(|s| now + Duration::from_secs(u64::from(s)));
            }
            Err(e) => {
                let e = steelcup_sys::error_chain(&e);
                tracing::error!("workload {name}: cannot start its VM: {e}");
                w.last_outcome = Outcome::failed(format!("cannot start: {e}"));
                self.counters.ended(name, VMMD_FAILED);
                if w.unit.is_some() {
                    w.restart_at = Some(now + w.backoff.take());
                }
            }
        }
    }

    /// Starts what the units are missing and retires what they no longer
    /// want.
    fn reconcile(&mut self, now: Instant) {
        // Workloads of units that are gone.
        let orphans: Vec<String> = self
            .workloads
            .iter()
            .filter(|(_, w)| w.unit.as_ref().is_some_and(|u| !self.units.contains_key(u)))
            .map(|(n, _)| n.clone())
            .collect();
        for name in orphans {
            self.retire(&name, now, "its unit is gone");
        }
        let units: Vec<(String, MicrovmSection)> = self
            .units
            .iter()
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect();
        for (unit, spec) in units {
            // A scheduled unit has runs ([`cron`]) and no standing
            // workloads; an unscheduled one no runs.
            let strays: Vec<String> = self
                .workloads
                .iter()
                .filter(|(_, w)| w.unit.as_deref() == Some(unit.as_str()))
                .filter(|(_, w)| w.run.is_some() != spec.schedule.is_some())
                .map(|(n, _)| n.clone())
                .collect();
            for name in strays {
                let why = match spec.schedule {
                    Some(_) => "its unit is scheduled now",
                    None => "its unit is no longer scheduled",
                };
                self.retire(&name, now, why);
            }
            if spec.schedule.is_none() {
                self.reconcile_unit(&unit, &spec, now);
            }
        }
    }

    fn reconcile_unit(&mut self, unit: &str, spec: &MicrovmSection, now: Instant) {
        let retiring = |w: &Workload| {
            w.stopping
                .as_ref()
                .is_some_and(|s| s.then == AfterStop::Remove)
        };
        let mine = |want_current: bool| -> Vec<(String, u32, bool)> {
            self.workloads
                .iter()
                .filter(|(_, w)| w.unit.as_deref() == Some(unit) && !retiring(w))
                .filter(|(_, w)| same_vm(&w.spec, spec) == want_current)
                .map(|(n, w)| (n.clone(), w.slot, w.ready()))
                .collect()
        };
        let (current, old) = (mine(true), mine(false));
        // A unit's first VM waits for the units it comes after to be
        // ready (running, and healthy when they have a check); once it
        // runs, their later restarts do not hold it.
        if current.is_empty() && old.is_empty() {
            if let Some(dep) = self.waits_for(unit) {
                if self.waiting.insert(unit.to_string()) {
                    tracing::info!("unit {unit}: waiting for {dep} to be ready (after)");
                }
                return;
            }
            self.waiting.remove(unit);
        }
        // Scale down: slots past the replicas go, old or new.
        for (name, slot, _) in current.iter().chain(&old) {
            if *slot >= spec.replicas {
                self.retire(name, now, "scaled down");
            }
        }
        // Old workloads whose slot a ready new one holds.
        for (name, slot, _) in &old {
            if current.iter().any(|(_, s, ready)| s == slot && *ready) {
                self.retire(name, now, "replaced");
            }
        }
        let rolling = old.iter().any(|(_, s, _)| *s < spec.replicas);
        let mut busy = current
            .iter()
            .any(|(_, s, ready)| !ready && *s < spec.replicas);
        for slot in 0..spec.replicas {
            if current.iter().any(|(_, s, _)| *s == slot) {
                continue;
            }
            if rolling && busy {
                return;
            }
            if !spec.volumes.is_empty() {
                // One disk, one VM: the old one of the slot goes first.
                for (n, _, _) in old.iter().filter(|(_, s, _)| *s == slot) {
                    self.retire(n, now, "replaced (its volumes go to the new one)");
                }
                let held = self
                    .workloads
                    .values()
                    .any(|w| w.unit.as_deref() == Some(unit) && w.slot == slot && w.pid.is_some());
                if held {
                    busy = true;
                    continue;
                }
            }
            let name = self.new_name(unit, spec.replicas);
            let mut w = Workload::new(spec.clone(), self.free_cid(), now);
            w.unit = Some(unit.to_string());
            w.slot = slot;
            tracing::info!(
                "workload {name}: new, for unit {unit} (replica {} of {})",
                slot + 1,
                spec.replicas
            );
            self.workloads.insert(name, w);
            busy = true;
        }
    }

    /// Takes a workload out: stops it if it runs, forgets it once ended.
    fn retire(&mut self, name: &str, now: Instant, why: &str) {
        let Some(w) = self.workloads.get_mut(name) else {
            return;
        };
        if w.pid.is_some() {
            tracing::info!("workload {name}: {why}; stopping it");
            self.stop(name, None, AfterStop::Remove, now);
        } else {
            tracing::info!("workload {name}: {why}");
            self.forget(name);
        }
    }

    /// Begins stopping workload `name` (killed after [`STOP_GRACE`]), or
    /// joins a stop in progress; `reply` is answered once it has ended. A
    /// workload that is not running is kept from starting again.
    pub fn stop(
        &mut self,
        name: &str,
        reply: Option<futures_channel::oneshot::Sender<Result<Reply, ApiError>>>,
        then: AfterStop,
        now: Instant,
    ) {
        self.stop_within(name, reply, then, now, STOP_GRACE)
    }

    /// As [`Self::stop`], killed after `grace` (`cup stop -t`); joining a
    /// stop in progress can only bring its kill nearer.
    pub fn stop_within(
        &mut self,
        name: &str,
        reply: Option<futures_channel::oneshot::Sender<Result<Reply, ApiError>>>,
        then: AfterStop,
        now: Instant,
        grace: Duration,
    ) {
        let Some(w) = self.workloads.get_mut(name) else {
            if let Some(r) = reply {
                let _ = r.send(Err(ApiError::NoSuchVm(name.to_string())));
            }
            return;
        };
        w.restart_at = None;
        if w.pid.is_none() {
            if let Some(r) = reply {
                let _ = r.send(Ok(Reply::Done));
            }
            if then == AfterStop::Remove {
                self.forget(name);
            }
            return;
        }
        if let Some(s) = &mut w.stopping {
            s.replies.extend(reply);
            s.kill_at = s.kill_at.min(now + grace);
            // Removing is the strongest wish.
            if then == AfterStop::Remove || s.then == AfterStop::Stay {
                s.then = then;
            }
            return;
        }
        w.stopping = Some(Stopping {
            kill_at: now + grace,
            replies: reply.into_iter().collect(),
            then,
        });
        if w.paused {
            // A paused guest cannot answer a stop: let it run first.
            let _ = self.backend.control(name, &WorkerCommand::Resume {});
            w.paused = false;
        }
        self.backend.ask_stop(name);
    }

    /// A workload's VM has ended.
    pub fn ended(&mut self, name: &str, report: WorkerReport, now: Instant) {
        let Some(w) = self.workloads.get_mut(name) else {
            return;
        };
        let ran = w.started_at.map(|t| now.saturating_duration_since(t));
        w.pid = None;
        w.paused = false;
        w.probing = false;
        w.next_probe = None;
        // Health is a running VM's; the outcome says why it ended.
        w.health = None;
        w.last_outcome = Outcome::of(&report.outcome);
        self.counters.ended(name, report.outcome.kind());
        tracing::info!(
            "workload {name}: {} after {:.2}s",
            report.outcome,
            report.run_ms as f64 / 1000.0
        );
        let mut failed = !report.outcome.success();
        if let Some(s) = w.stopping.take() {
            for r in s.replies {
                let _ = r.send(Ok(Reply::Done));
            }
            match s.then {
                AfterStop::Stay => {
                    tracing::info!("workload {name}: stopped");
                    if w.remove_when_done {
                        self.forget(name);
                    }
                    return;
                }
                AfterStop::Remove => {
                    self.forget(name);
                    return;
                }
                AfterStop::Failed(why) => {
                    w.last_outcome = Outcome::failed(why);
                    failed = true;
                }
                AfterStop::Expired(why) => {
                    w.last_outcome = Outcome::failed(why);
                    if w.remove_when_done {
                        self.forget(name);
                    }
                    return;
                }
            }
        }
        if ran.is_some_and(|r| r >= STEADY) {
            w.backoff.reset();
        }
        let mut again = match w.spec.restart {
            Restart::Always => true,
            // A reboot from inside asks for the workload again.
            Restart::OnFailure => failed || report.outcome == VmOutcome::Rebooted,
            Restart::No => false,
        };
        if again
            && w.spec
                .max_restarts
                .is_some_and(|max| w.policy_restarts >= max)
        {
            tracing::info!(
                "workload {name}: not restarted: {} restarts were its most",
                w.policy_restarts
            );
            again = false;
        }
        if again {
            w.policy_restarts += 1;
            let delay = w.backoff.take();
            tracing::info!("workload {name}: restarting in {}s", delay.as_secs());
            w.restart_at = Some(now + delay);
        } else if w.remove_when_done {
            self.forget(name);
        }
    }

    /// A workload's image is ready (or not).
    pub fn prepared(&mut self, name: &str, result: Result<Prepared, PrepareError>, now: Instant) {
        let Some(w) = self.workloads.get_mut(name) else {
            return;
        };
        w.preparing = false;
        let image = w.spec.image.clone().unwrap_or_default();
        match result.map_err(|e| steelcup_sys::error_chain(&e)) {
            Ok(p) => {
                tracing::info!("workload {name}: image {} ready", p.digest);
                w.prepared = Some(p);
                if w.stopping.is_none() {
                    w.restart_at = Some(now);
                }
            }
            Err(e) if w.unit.is_none() => {
                self.counters.ended(name, VMMD_FAILED);
                // `cup run` reports it; nobody asked for retries.
                tracing::error!("workload {name}: image {image}: {e}");
                w.last_outcome = Outcome::failed(format!("image failed: {e}"));
                w.restart_at = None;
                if w.remove_when_done {
                    self.forget(name);
                }
            }
            Err(e) => {
                self.counters.ended(name, VMMD_FAILED);
                let delay = w.backoff.take();
                tracing::error!(
                    "workload {name}: image {image}: {e}; trying again in {}s",
                    delay.as_secs()
                );
                w.last_outcome = Outcome::failed(format!("image failed: {e}"));
                w.restart_at = Some(now + delay);
            }
        }
    }

    /// A health probe of a workload has an answer.
    pub fn probed(&mut self, name: &str, result: Result<(), ProbeFailure>, now: Instant) {
        let Some(w) = self.workloads.get_mut(name) else {
            return;
        };
        if !w.probing {
            return;
        }
        w.probing = false;
        let (Some(check), Some(_)) = (w.spec.health.clone(), w.pid) else {
            return;
        };
        if w.stopping.is_some() {
            return;
        }
        match result {
            Ok(()) => {
                if w.health != Some(Health::Healthy) {
                    tracing::info!("workload {name}: healthy");
                }
                w.health = Some(Health::Healthy);
                w.probe_failures = 0;
                w.backoff.reset();
                w.last_probe = "ok".into();
                w.next_probe = Some(now + Duration::from_secs(u64::from(check.interval)));
            }
            Err(ProbeFailure {
                message: e,
                unreachable,
            }) => {
                let grace = Duration::from_secs(u64::from(check.start_period))
                    + if unreachable {
                        BOOT_GRACE
                    } else {
                        Duration::ZERO
                    };
                let in_start = w.health == Some(Health::Starting)
                    && w.started_at.is_some_and(|t| now < t + grace);
                if !in_start {
                    w.probe_failures += 1;
                }
                tracing::info!(
                    "workload {name}: health probe failed ({} of {}): {e}",
                    w.probe_failures,
                    check.retries
                );
                w.last_probe = e.clone();
                let every = match w.health {
                    Some(Health::Healthy) => Duration::from_secs(u64::from(check.interval)),
                    _ => FIRST_PROBES,
                };
                w.next_probe = Some(now + every);
                if w.probe_failures >= check.retries {
                    tracing::warn!(
                        "workload {name}: unhealthy after {} failed probes; stopping it",
                        w.probe_failures
                    );
                    w.health = Some(Health::Unhealthy);
                    let why = format!("unhealthy: {e}");
                    self.stop(name, None, AfterStop::Failed(why), now);
                }
            }
        }
    }

    /// Forgets a workload (it has ended).
    pub fn forget(&mut self, name: &str) {
        if let Some(w) = self.workloads.remove(name) {
            self.counters.outcomes.retain(|(n, _), _| n != name);
            let mut removed = self.removed.lock().unwrap_or_else(|e| e.into_inner());
            removed.retain(|(n, _)| n != name);
            removed.push_back((name.to_string(), w.last_outcome));
            while removed.len() > REMEMBER_REMOVED {
                removed.pop_front();
            }
            drop(removed);
            self.backend.forgotten(name);
            tracing::info!("workload {name}: removed");
        }
    }

    /// [`Self::next_wakeup`], and the next scheduled run (`wall` being
    /// the time at `now`).
    pub fn next_wakeup_at(
        &self,
        now: Instant,
        wall: chrono::DateTime<chrono::Utc>,
    ) -> Option<Instant> {
        self.next_wakeup()
            .into_iter()
            .chain(self.cron_wakeup(now, wall))
            .min()
    }

    /// When the next thing is due (a restart, a kill, a probe, a deadline).
    pub fn next_wakeup(&self) -> Option<Instant> {
        self.workloads
            .values()
            .flat_map(|w| {
                let probe = (w.pid.is_some() && !w.probing && w.stopping.is_none())
                    .then_some(w.next_probe)
                    .flatten();
                let restart = w.pid.is_none().then_some(w.restart_at).flatten();
                let deadline = (w.pid.is_some() && w.stopping.is_none())
                    .then_some(w.deadline_at)
                    .flatten();
                [
                    restart,
                    w.stopping.as_ref().map(|s| s.kill_at),
                    probe,
                    deadline,
                ]
            })
            .flatten()
            .chain(self.pool.next_wakeup())
            .min()
    }

    /// Workloads with a running VM.
    pub fn running(&self) -> usize {
        self.workloads.values().filter(|w| w.pid.is_some()).count()
    }
}

pub mod cron;
#[cfg(test)]
mod tests;
mod warm;
