//! The reconciler against a fake backend that records what it is asked
//! and a clock the tests move.

use super::*;
use steelcup_proto::worker::VmOutcome;
use steelcup_units::{MemSize, VolumeSpec};

#[derive(Debug, Default)]
struct Fake {
    calls: Vec<String>,
    next_pid: i32,
    /// `start` fails while set.
    refuse_starts: bool,
    /// Every start fits the warm pool's first size while set.
    pool_fits: bool,
    /// `start_warm` fails while set (the VM would not take the workload).
    refuse_warm: bool,
}

/// What the fake backend refuses with.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refusal(&'static str);

impl Backend for Fake {
    type PoolVm = String;
    type Error = Refusal;

    fn pool_fit(&self, _name: &str, w: &Workload) -> Option<Key> {
        self.pool_fits
            .then_some((w.spec.vcpus, w.spec.memory.mib()))
    }
    fn boot_pool_vm(&mut self, name: &str, key: Key) -> Result<String, Refusal> {
        self.calls
            .push(format!("boot-pool {name} {}x{}", key.0, key.1));
        Ok(name.to_string())
    }
    fn start_warm(
        &mut self,
        name: &str,
        _w: &Workload,
        _attach: bool,
        pool_name: &str,
        vm: String,
    ) -> Result<i32, Refusal> {
        assert_eq!(vm, pool_name, "the pool VM handed over is the one named");
        self.calls.push(format!("start-warm {name} {pool_name}"));
        if self.refuse_warm {
            return Err(Refusal("vminit refused the claim"));
        }
        self.next_pid += 1;
        Ok(1000 + self.next_pid)
    }
    fn kill_pool_vm(&mut self, name: &str, _vm: &String) {
        self.calls.push(format!("kill-pool {name}"));
    }
    fn prepare(&mut self, name: &str, image: &str) {
        self.calls.push(format!("prepare {name} {image}"));
    }
    fn start(&mut self, name: &str, w: &Workload, _attach: bool) -> Result<i32, Refusal> {
        if self.refuse_starts {
            return Err(Refusal("no KVM"));
        }
        self.next_pid += 1;
        self.calls.push(format!(
            "start {name} slot={} env={}",
            w.slot,
            w.spec.env.get("V").cloned().unwrap_or_default()
        ));
        Ok(1000 + self.next_pid)
    }
    fn ask_stop(&mut self, name: &str) {
        self.calls.push(format!("stop {name}"));
    }
    fn kill(&mut self, name: &str, _pid: i32) {
        self.calls.push(format!("kill {name}"));
    }
    fn probe(&mut self, name: &str, _check: &HealthCheck) {
        self.calls.push(format!("probe {name}"));
    }
    fn control(&mut self, name: &str, command: &WorkerCommand) -> Result<(), Refusal> {
        let command = match command {
            WorkerCommand::Pause {} => "pause",
            WorkerCommand::Resume {} => "resume",
            WorkerCommand::Attach { .. } => "attach",
            WorkerCommand::Counters {} => "counters",
        };
        self.calls.push(format!("{command} {name}"));
        Ok(())
    }
    fn forgotten(&mut self, name: &str) {
        self.calls.push(format!("forget {name}"));
    }
}

/// A pull that failed: the registry did not answer.
fn unreachable_registry() -> PrepareError {
    crate::image::source::SourceError::Registry {
        reference: "registry.example/app".into(),
        what: "connection refused".into(),
    }
    .into()
}

fn unit(replicas: u32, v: &str) -> MicrovmSection {
    MicrovmSection {
        image: None,
        kernel: None,
        initramfs: None,
        cmd: vec!["/bin/serve".into()],
        env: [("V".to_string(), v.to_string())].into(),
        vcpus: 1,
        memory: MemSize(64 << 20),
        restart: Restart::Always,
        root: None,
        volumes: Vec::new(),
        network: Default::default(),
        ports: Vec::new(),
        network_scope: Vec::new(),
        aliases: Vec::new(),
        memory_backing: Default::default(),
        huge_pages: false,
        rlimits: BTreeMap::new(),
        replicas,
        health: None,
        labels: Default::default(),
        ..Default::default()
    }
}

fn checked(mut u: MicrovmSection) -> MicrovmSection {
    u.health = Some(HealthCheck {
        command: Vec::new(),
        tcp: Some(80),
        http: None,
        path: "/".into(),
        interval: 5,
        timeout: 2,
        retries: 3,
        start_period: 0,
    });
    u
}

struct World {
    core: Core<Fake>,
    now: Instant,
    /// The wall clock, moved with `now`.
    wall: chrono::DateTime<chrono::Utc>,
}

impl World {
    fn new(units: &[(&str, MicrovmSection)]) -> World {
        let mut core = Core::new(Fake::default(), Default::default(), Vec::new());
        core.set_units(
            units
                .iter()
                .map(|(n, u)| (n.to_string(), u.clone()))
                .collect(),
        );
        World {
            core,
            now: Instant::now(),
            wall: "2026-12-07T21:00:30Z".parse().expect("a time"),
        }
    }
    fn tick(&mut self) {
        self.core.tick_at(self.now, self.wall);
    }
    fn wait(&mut self, secs: f64) {
        self.now += Duration::from_secs_f64(secs);
        self.wall += chrono::Duration::milliseconds((secs * 1000.0) as i64);
        self.tick();
    }
    /// The calls since the last look.
    fn calls(&mut self) -> Vec<String> {
        std::mem::take(&mut self.core.backend.calls)
    }
    fn names(&self) -> Vec<String> {
        self.core.workloads.keys().cloned().collect()
    }
    fn state(&self, name: &str) -> &'static str {
        self.core.workloads[name].state().as_str()
    }
    fn end(&mut self, name: &str, outcome: VmOutcome) {
        let report = WorkerReport {
            outcome,
            run_ms: 100,
        };
        self.core.ended(name, report, self.now);
        self.tick();
    }
    fn crash(&mut self, name: &str) {
        self.end(
            name,
            VmOutcome::VmmError {
                message: "worker killed by SIGKILL".into(),
            },
        );
    }
    fn probe(&mut self, name: &str, ok: bool) {
        let r = if ok {
            Ok(())
        } else {
            Err(ProbeFailure {
                message: "refused".into(),
                unreachable: false,
            })
        };
        self.core.probed(name, r, self.now);
        self.tick();
    }
    fn set(&mut self, units: &[(&str, MicrovmSection)]) -> UnitChanges {
        let c = self.core.set_units(
            units
                .iter()
                .map(|(n, u)| (n.to_string(), u.clone()))
                .collect(),
        );
        self.tick();
        c
    }
}

#[test]
fn replicas_start_at_once_and_scale_up_and_down() {
    let mut w = World::new(&[("web", unit(2, "a")), ("db", unit(1, "a"))]);
    w.tick();
    let mut calls = w.calls();
    calls.sort();
    assert_eq!(
        calls,
        [
            "start db slot=0 env=a",
            "start web.1 slot=0 env=a",
            "start web.2 slot=1 env=a"
        ]
    );
    let cids: std::collections::BTreeSet<u32> = w.core.workloads.values().map(|x| x.cid).collect();
    assert_eq!(cids.len(), 3, "one vsock context id each");

    // Up to 3: only the new one starts; the others are left alone.
    let c = w.set(&[("web", unit(3, "a")), ("db", unit(1, "a"))]);
    assert_eq!(c.changed, ["web"]);
    assert_eq!(w.calls(), ["start web.3 slot=2 env=a"]);

    // Down to 1: the highest slots are asked to stop, then forgotten.
    w.set(&[("web", unit(1, "a")), ("db", unit(1, "a"))]);
    assert_eq!(w.calls(), ["stop web.2", "stop web.3"]);
    assert_eq!(w.state("web.2"), "stopping");
    w.tick();
    assert_eq!(w.calls(), Vec::<String>::new(), "asked once");
    w.end("web.2", VmOutcome::PoweredOff);
    assert_eq!(w.calls(), ["forget web.2"]);
    // One that does not stop in time is killed.
    w.wait(STOP_GRACE.as_secs_f64());
    assert_eq!(w.calls(), ["kill web.3"]);
    w.crash("web.3");
    assert_eq!(w.calls(), ["forget web.3"]);
    assert_eq!(w.names(), ["db", "web.1"]);

    // A removed unit's workloads stop and go.
    let c = w.set(&[("web", unit(1, "a"))]);
    assert_eq!(c.removed, ["db"]);
    assert_eq!(w.calls(), ["stop db"]);
    w.end("db", VmOutcome::PoweredOff);
    assert_eq!(w.calls(), ["forget db"]);
    assert_eq!(w.names(), ["web.1"]);

    // replicas = 0 keeps the unit and no VM.
    w.set(&[("web", unit(0, "a"))]);
    assert_eq!(w.calls(), ["stop web.1"]);
    w.end("web.1", VmOutcome::PoweredOff);
    assert!(w.names().is_empty());
}

#[test]
fn a_changed_unit_is_rolled_one_healthy_vm_at_a_time() {
    let mut w = World::new(&[("web", checked(unit(2, "a")))]);
    w.tick();
    w.calls();
    // Nothing is probed before its first second.
    w.wait(0.5);
    assert_eq!(w.calls(), Vec::<String>::new());
    w.wait(0.5);
    assert_eq!(w.calls(), ["probe web.1", "probe web.2"]);
    w.probe("web.1", true);
    w.probe("web.2", true);
    assert_eq!(w.core.workloads["web.1"].health_name(), "healthy");

    w.set(&[("web", checked(unit(2, "b")))]);
    // One new VM, for the first slot; the old ones keep serving.
    assert_eq!(w.calls(), ["start web.3 slot=0 env=b"]);
    w.wait(1.0);
    assert_eq!(w.calls(), ["probe web.3"]);
    // Failing probes while it comes up hold the roll.
    w.probe("web.3", false);
    w.wait(1.0);
    assert_eq!(w.calls(), ["probe web.3"]);
    assert_eq!(w.state("web.1"), "running");
    // Healthy: the old one of its slot stops, the next new one starts.
    w.probe("web.3", true);
    assert_eq!(w.calls(), ["stop web.1", "start web.4 slot=1 env=b"]);
    w.end("web.1", VmOutcome::PoweredOff);
    assert_eq!(w.calls(), ["forget web.1"]);
    w.wait(1.0);
    assert_eq!(w.calls(), ["probe web.4"]);
    w.probe("web.4", true);
    assert_eq!(w.calls(), ["stop web.2"]);
    w.end("web.2", VmOutcome::PoweredOff);
    assert_eq!(w.calls(), ["forget web.2"]);
    assert_eq!(w.names(), ["web.3", "web.4"]);
    assert!(w.core.workloads.values().all(|x| x.spec.env["V"] == "b"));
}

#[test]
fn a_unit_after_another_starts_once_that_one_is_healthy_and_not_again_for_its_restarts() {
    let mut w = World::new(&[
        ("db", checked(unit(1, "a"))),
        ("web", unit(2, "a")),
        ("worker", unit(1, "a")),
    ]);
    w.core.set_after(
        [
            (
                "web".to_string(),
                vec!["db".to_string(), "vmmd".to_string()],
            ),
            ("worker".to_string(), vec!["web".to_string()]),
        ]
        .into(),
    );
    w.tick();
    // Only db: web waits for it (vmmd is not a [microvm] unit: no wait),
    // worker for web.
    assert_eq!(w.calls(), ["start db slot=0 env=a"]);
    w.wait(1.0);
    assert_eq!(w.calls(), ["probe db"]);
    w.probe("db", false);
    w.wait(1.0);
    assert_eq!(
        w.calls(),
        ["probe db"],
        "running but not healthy: web still waits"
    );
    w.probe("db", true);
    let mut calls = w.calls();
    calls.sort();
    assert_eq!(
        calls,
        ["start web.1 slot=0 env=a", "start web.2 slot=1 env=a"]
    );
    // web has no check: running is ready, and worker follows.
    w.tick();
    assert_eq!(w.calls(), ["start worker slot=0 env=a"]);
    // db crashing later does not stop or hold the others.
    w.crash("db");
    assert!(w
        .calls()
        .iter()
        .all(|c| !c.contains("web") && !c.contains("worker")));
    assert_eq!(w.state("web.1"), "running");
    // A dependency that never runs (replicas 0) holds nothing.
    let mut w = World::new(&[("db", unit(0, "a")), ("web", unit(1, "a"))]);
    w.core
        .set_after([("web".to_string(), vec!["db".to_string()])].into());
    w.tick();
    assert_eq!(w.calls(), ["start web slot=0 env=a"]);
}

#[test]
fn a_new_version_that_never_gets_healthy_leaves_the_old_one_running() {
    let mut w = World::new(&[("api", checked(unit(1, "a")))]);
    w.tick();
    w.wait(1.0);
    w.probe("api", true);
    w.calls();
    w.set(&[("api", checked(unit(1, "b")))]);
    assert_eq!(w.calls(), ["start api.1 slot=0 env=b"]);
    // It fails its probes (3 retries) and is stopped as a failure; the old
    // one serves on.
    for _ in 0..3 {
        w.wait(1.0);
        w.probe("api.1", false);
    }
    let calls = w.calls();
    assert!(calls.contains(&"stop api.1".to_string()), "{calls:?}");
    w.end("api.1", VmOutcome::PoweredOff);
    assert_eq!(w.state("api"), "running");
    let new = &w.core.workloads["api.1"];
    assert!(
        new.last_outcome.text.starts_with("unhealthy: refused"),
        "{:?}",
        new.last_outcome
    );
    assert_eq!(
        new.last_outcome.code(),
        Some(125),
        "vmmd's failure, not the guest's"
    );
    assert_eq!(
        new.state(),
        WorkloadState::Waiting,
        "restarted by its policy"
    );
}

#[test]
fn a_unit_with_volumes_stops_the_old_vm_before_the_new_one_takes_its_disk() {
    let mut u = unit(1, "a");
    u.volumes = vec![VolumeSpec {
        name: "data".into(),
        size: MemSize(1 << 20),
        mount: "/data".into(),
        read_only: false,
    }];
    let mut w = World::new(&[("db", u.clone())]);
    w.tick();
    w.calls();
    u.env.insert("V".into(), "b".into());
    w.set(&[("db", u)]);
    assert_eq!(w.calls(), ["stop db"]);
    w.end("db", VmOutcome::PoweredOff);
    assert_eq!(w.calls(), ["forget db", "start db slot=0 env=b"]);
    assert_eq!(w.core.workloads["db"].volume_key(), "db");
}

#[test]
fn replicas_keep_their_own_volumes() {
    let mut u = unit(3, "a");
    u.volumes = vec![VolumeSpec {
        name: "data".into(),
        size: MemSize(1 << 20),
        mount: "/data".into(),
        read_only: false,
    }];
    let mut w = World::new(&[("db", u)]);
    w.tick();
    let keys: Vec<String> = w.core.workloads.values().map(|x| x.volume_key()).collect();
    assert_eq!(keys, ["db", "db/replica-1", "db/replica-2"]);
}

#[test]
fn a_crashing_vm_restarts_with_backoff_and_a_steady_one_resets_it() {
    let mut w = World::new(&[("web", unit(1, "a"))]);
    w.tick();
    w.calls();
    w.crash("web");
    assert_eq!(w.state("web"), "waiting");
    assert_eq!(w.calls(), Vec::<String>::new());
    w.wait(0.9);
    assert_eq!(w.calls(), Vec::<String>::new());
    w.wait(0.1);
    assert_eq!(w.calls(), ["start web slot=0 env=a"]);
    w.crash("web");
    w.wait(1.5);
    assert_eq!(w.calls(), Vec::<String>::new(), "2 s the second time");
    w.wait(0.5);
    assert_eq!(w.calls(), ["start web slot=0 env=a"]);
    for _ in 0..6 {
        w.crash("web");
        w.wait(30.0);
    }
    assert_eq!(
        w.core.workloads["web"].backoff.peek(),
        BACKOFF_MAX,
        "capped"
    );
    w.calls();
    // Up long enough: the next crash restarts after 1 s again.
    w.wait(STEADY.as_secs_f64());
    w.crash("web");
    w.wait(1.0);
    assert_eq!(w.calls(), ["start web slot=0 env=a"]);
    assert_eq!(w.core.workloads["web"].runs, 10);
    // A clean end with restart = on-failure stays ended.
    let mut once = unit(1, "a");
    once.restart = Restart::OnFailure;
    w.set(&[("job", once)]);
    w.calls();
    w.end("job", VmOutcome::PoweredOff);
    w.wait(60.0);
    assert_eq!(w.state("job"), "ended");
    assert!(!w.calls().iter().any(|c| c.contains("job")));
    // Every end counted by how it ended.
    let count = |name: &str, kind: &str| {
        w.core
            .counters
            .outcomes
            .get(&(name.to_string(), kind.to_string()))
            .copied()
    };
    assert_eq!(count("web", "vmm_error"), Some(9));
    assert_eq!(count("job", "powered_off"), Some(1));
    assert_eq!(count("web", "success"), None);
}

#[test]
fn on_failure_with_a_limit_gives_up_after_that_many_restarts() {
    let mut flaky = unit(1, "a");
    flaky.restart = Restart::OnFailure;
    flaky.max_restarts = Some(2);
    let mut w = World::new(&[("flaky", flaky)]);
    w.tick();
    assert_eq!(w.calls(), ["start flaky slot=0 env=a"]);
    for _ in 0..2 {
        w.crash("flaky");
        w.wait(30.0);
        assert_eq!(w.calls(), ["start flaky slot=0 env=a"]);
    }
    // The third failure: two restarts were its most.
    w.crash("flaky");
    w.wait(60.0);
    assert_eq!(w.calls(), Vec::<String>::new());
    assert_eq!(w.state("flaky"), "ended");
    assert_eq!(w.core.workloads["flaky"].runs, 3);
}

#[test]
fn an_image_that_cannot_be_pulled_is_retried_without_holding_up_others() {
    let mut img = unit(1, "a");
    img.image = Some("registry.example/app:1".into());
    let mut w = World::new(&[("app", img), ("web", unit(1, "a"))]);
    w.tick();
    assert_eq!(
        w.calls(),
        [
            "prepare app registry.example/app:1",
            "start web slot=0 env=a"
        ]
    );
    assert_eq!(w.state("app"), "preparing");
    w.core.prepared("app", Err(unreachable_registry()), w.now);
    assert_eq!(w.state("app"), "waiting");
    assert!(w.core.workloads["app"]
        .last_outcome
        .text
        .contains("connection refused"));
    w.wait(1.0);
    assert_eq!(w.calls(), ["prepare app registry.example/app:1"]);
    w.core.prepared("app", Err(unreachable_registry()), w.now);
    w.wait(1.0);
    assert_eq!(w.calls(), Vec::<String>::new(), "2 s the second time");
    w.wait(1.0);
    assert_eq!(w.calls(), ["prepare app registry.example/app:1"]);
    let ready = crate::image::workload::Prepared {
        digest: "sha256:00".into(),
        rootfs: "/x.erofs".into(),
        process: Default::default(),
    };
    w.core.prepared("app", Ok(ready), w.now);
    w.tick();
    assert_eq!(w.calls(), ["start app slot=0 env=a"]);
}

#[test]
fn an_unhealthy_vm_is_stopped_and_restarted_but_start_period_failures_do_not_count() {
    let mut u = checked(unit(1, "a"));
    if let Some(h) = &mut u.health {
        h.start_period = 3;
        h.retries = 2;
    }
    let mut w = World::new(&[("web", u)]);
    w.tick();
    w.calls();
    // Failures in the first 3 s do not count.
    for _ in 0..2 {
        w.wait(1.0);
        w.probe("web", false);
    }
    assert_eq!(w.core.workloads["web"].probe_failures, 0);
    w.wait(1.0);
    w.probe("web", true);
    assert_eq!(w.core.workloads["web"].health_name(), "healthy");
    w.calls();
    // Healthy: probed every `interval`.
    w.wait(4.0);
    assert_eq!(w.calls(), Vec::<String>::new());
    w.wait(1.0);
    assert_eq!(w.calls(), ["probe web"]);
    w.probe("web", false);
    w.wait(5.0);
    w.probe("web", false);
    assert_eq!(w.calls(), ["probe web", "stop web"]);
    assert_eq!(w.core.workloads["web"].health_name(), "unhealthy");
    w.end("web", VmOutcome::PoweredOff);
    assert!(w.core.workloads["web"]
        .last_outcome
        .text
        .starts_with("unhealthy"));
    w.wait(1.0);
    assert_eq!(w.calls(), ["start web slot=0 env=a"]);
    assert_eq!(w.core.workloads["web"].health_name(), "starting");
}

#[test]
fn a_guest_still_booting_is_not_unhealthy_until_the_boot_grace_is_over() {
    let mut w = World::new(&[("web", checked(unit(1, "a")))]);
    w.tick();
    w.calls();
    let unreachable = |w: &mut World| {
        let f = ProbeFailure {
            message: "port 1024: the guest does not listen (yet)".into(),
            unreachable: true,
        };
        w.core.probed("web", Err(f), w.now);
        w.tick();
    };
    for _ in 0..(BOOT_GRACE.as_secs() - 1) {
        w.wait(1.0);
        unreachable(&mut w);
    }
    assert_eq!(w.core.workloads["web"].probe_failures, 0);
    assert_eq!(w.core.workloads["web"].health_name(), "starting");
    // A guest that never comes up is unhealthy after the grace.
    for _ in 0..3 {
        w.wait(1.0);
        unreachable(&mut w);
    }
    assert_eq!(w.core.workloads["web"].health_name(), "unhealthy");
}

#[test]
fn a_stopped_unit_vm_stays_stopped_and_a_removed_one_comes_back() {
    let mut w = World::new(&[("web", unit(1, "a"))]);
    w.tick();
    w.calls();
    w.core.stop("web", None, AfterStop::Stay, w.now);
    w.tick();
    assert_eq!(w.calls(), ["stop web"]);
    w.end("web", VmOutcome::PoweredOff);
    w.wait(60.0);
    assert_eq!(w.state("web"), "ended");
    assert_eq!(w.calls(), Vec::<String>::new());
    // `cup rm`: the unit wants a VM, so a new one comes.
    w.core.forget("web");
    w.tick();
    assert_eq!(w.calls(), ["forget web", "start web slot=0 env=a"]);
    // A pause is lifted before a stop (a paused guest cannot answer).
    w.core.workloads.get_mut("web").unwrap().paused = true;
    w.core.stop("web", None, AfterStop::Stay, w.now);
    assert_eq!(w.calls(), ["resume web", "stop web"]);
}

#[test]
fn a_stop_kills_after_its_own_grace_and_a_shorter_one_wins() {
    let mut w = World::new(&[("db", unit(1, "a")), ("web", unit(1, "a"))]);
    w.tick();
    w.calls();
    // `cup stop -t 1`: the guest has one second, not STOP_GRACE.
    w.core
        .stop_within("web", None, AfterStop::Stay, w.now, Duration::from_secs(1));
    assert_eq!(w.calls(), ["stop web"]);
    w.wait(0.5);
    assert_eq!(w.calls(), Vec::<String>::new());
    w.wait(0.6);
    assert_eq!(w.calls(), ["kill web"]);
    // A default stop joined by `-t 0` is killed at once.
    w.core.stop("db", None, AfterStop::Stay, w.now);
    w.core
        .stop_within("db", None, AfterStop::Stay, w.now, Duration::ZERO);
    w.tick();
    assert_eq!(w.calls(), ["stop db", "kill db"]);
}

#[test]
fn a_start_that_fails_is_retried_for_units_only() {
    let mut w = World::new(&[("web", unit(1, "a"))]);
    w.core.backend.refuse_starts = true;
    w.tick();
    assert!(w.core.workloads["web"].last_outcome.text.contains("no KVM"));
    assert_eq!(w.state("web"), "waiting");
    w.core.backend.refuse_starts = false;
    w.wait(1.0);
    assert_eq!(w.calls(), ["start web slot=0 env=a"]);
}

/// A world with one warm pool size (1 vCPU, 64 MiB, one VM) that every
/// start fits.
fn warm_world(units: &[(&str, MicrovmSection)]) -> World {
    let mut w = World::new(units);
    w.core.pool = Pool::new(vec![PoolSpec {
        vcpus: 1,
        memory_mib: 64,
        count: 1,
    }]);
    w.core.backend.pool_fits = true;
    w
}

#[test]
fn the_pool_boots_its_vms_and_a_fitting_start_takes_a_ready_one() {
    let mut w = warm_world(&[]);
    w.core.refill_pool(w.now);
    assert_eq!(w.calls(), ["boot-pool _pool-1 1x64"]);
    w.core.refill_pool(w.now);
    assert!(w.calls().is_empty(), "one is booting: nothing more");
    // Not ready yet: a unit's workload starts cold.
    w.core.set_units([("a".to_string(), unit(1, "1"))].into());
    w.tick();
    assert_eq!(w.calls(), ["start a slot=0 env=1"]);
    // Ready: the next start takes it, and the pool boots another.
    w.core.pool_ready("_pool-1", w.now);
    w.core.set_units(
        [
            ("a".to_string(), unit(1, "1")),
            ("b".to_string(), unit(1, "1")),
        ]
        .into(),
    );
    w.tick();
    assert_eq!(w.calls(), ["start-warm b _pool-1"]);
    assert_eq!(w.state("b"), "running");
    w.core.refill_pool(w.now);
    assert_eq!(w.calls(), ["boot-pool _pool-2 1x64"]);
    // `a` found none ready, `b` took one.
    assert_eq!(
        (w.core.counters.pool_hits, w.core.counters.pool_misses),
        (1, 1)
    );
}

#[test]
fn a_warm_vm_that_refuses_the_workload_gives_way_to_a_cold_start() {
    let mut w = warm_world(&[]);
    w.core.refill_pool(w.now);
    w.core.pool_ready("_pool-1", w.now);
    w.calls();
    w.core.backend.refuse_warm = true;
    w.core.set_units([("a".to_string(), unit(1, "1"))].into());
    w.tick();
    assert_eq!(w.calls(), ["start-warm a _pool-1", "start a slot=0 env=1"]);
    assert_eq!(w.state("a"), "running");
    assert!(!w.core.pool.owns("_pool-1"), "the refused VM is gone");
    assert_eq!(
        (w.core.counters.pool_hits, w.core.counters.pool_misses),
        (0, 1)
    );
}

#[test]
fn a_start_that_does_not_fit_boots_cold_and_leaves_the_pool_alone() {
    let mut w = warm_world(&[]);
    w.core.refill_pool(w.now);
    w.core.pool_ready("_pool-1", w.now);
    w.calls();
    w.core.backend.pool_fits = false;
    w.core.set_units([("a".to_string(), unit(1, "1"))].into());
    w.tick();
    assert_eq!(w.calls(), ["start a slot=0 env=1"]);
    assert!(w.core.pool.owns("_pool-1"));
    assert_eq!(
        (w.core.counters.pool_hits, w.core.counters.pool_misses),
        (0, 0),
        "a start that does not fit is neither"
    );
}

#[test]
fn pool_vms_that_die_unclaimed_back_off_and_a_stuck_one_is_killed() {
    let mut w = warm_world(&[]);
    w.core.refill_pool(w.now);
    w.calls();
    assert!(w.core.pool_ended("_pool-1", w.now));
    assert!(!w.core.pool_ended("web", w.now), "not a pool VM");
    w.core.refill_pool(w.now);
    assert!(w.calls().is_empty(), "its size backs off");
    assert_eq!(w.core.next_wakeup(), Some(w.now + Duration::from_secs(1)));
    w.now += Duration::from_secs(1);
    w.core.refill_pool(w.now);
    assert_eq!(w.calls(), ["boot-pool _pool-2 1x64"]);
    w.core.pool_stuck("_pool-2");
    assert_eq!(w.calls(), ["kill-pool _pool-2"]);
    w.core.pool_ready("_pool-2", w.now);
    w.core.pool_stuck("_pool-2");
    assert!(w.calls().is_empty(), "a ready VM is not stuck");
    w.core.drain_pool();
    assert_eq!(w.calls(), ["kill-pool _pool-2"]);
}

// Scheduled units.

fn every_minute(concurrency: &str) -> MicrovmSection {
    let mut u = unit(1, "cron");
    u.restart = Restart::No;
    u.schedule = Some(steelcup_units::schedule::CronSchedule::parse("* * * * *").unwrap());
    u.concurrency = match concurrency {
        "forbid" => Some(steelcup_units::schedule::Concurrency::Forbid),
        "replace" => Some(steelcup_units::schedule::Concurrency::Replace),
        _ => None,
    };
    u
}

fn runs(w: &World) -> Vec<(String, String, String)> {
    w.core.cron_info()[0]
        .runs
        .iter()
        .map(|r| (r.workload.clone(), r.state.clone(), r.note.clone()))
        .collect()
}

#[test]
fn a_schedule_starts_one_fresh_run_per_due_time_and_keeps_its_history() {
    let mut u = every_minute("allow");
    u.history = Some(2);
    let mut w = World::new(&[("tick", u)]);
    w.tick();
    assert!(w.names().is_empty(), "nothing is due at 21:00:30");
    assert_eq!(
        w.core.cron_info()[0].next_due,
        "2026-12-07T21:01:00Z"
            .parse::<chrono::DateTime<chrono::Utc>>()
            .unwrap()
            .timestamp()
    );
    w.wait(30.0);
    assert_eq!(w.names(), ["tick-20261207-2101"]);
    assert_eq!(w.calls(), ["start tick-20261207-2101 slot=0 env=cron"]);
    w.end("tick-20261207-2101", VmOutcome::Exited { code: 3 });
    assert_eq!(
        w.state("tick-20261207-2101"),
        "ended",
        "a run is not restarted"
    );
    for _ in 0..3 {
        w.wait(60.0);
        let last = w.names().last().cloned().unwrap();
        w.end(&last, VmOutcome::Exited { code: 0 });
    }
    // Four runs ended; the two newest are kept, with their logs.
    assert_eq!(w.names(), ["tick-20261207-2103", "tick-20261207-2104"]);
    let info = &w.core.cron_info()[0];
    assert_eq!(info.runs.len(), 4, "twice the history in records");
    assert_eq!(
        (info.runs[0].state.as_str(), info.runs[0].exit_code),
        ("removed", 3),
        "a forgotten run's exit code stays in the history"
    );
    assert_eq!(info.runs[3].exit_code, 0);
}

#[test]
fn forbid_skips_a_run_while_one_runs_allow_starts_beside_replace_stops_it() {
    let mut w = World::new(&[("f", every_minute("forbid"))]);
    w.tick();
    w.wait(30.0);
    w.wait(60.0);
    assert_eq!(w.names(), ["f-20261207-2101"], "the 21:02 run was skipped");
    assert_eq!(
        runs(&w)[1],
        (
            String::new(),
            "skipped".into(),
            "skipped: f-20261207-2101 still runs (concurrency = \"forbid\")".into()
        )
    );
    w.end("f-20261207-2101", VmOutcome::Exited { code: 0 });
    w.wait(60.0);
    assert_eq!(w.names(), ["f-20261207-2101", "f-20261207-2103"]);

    let mut w = World::new(&[("a", every_minute("allow"))]);
    w.tick();
    w.wait(30.0);
    w.wait(60.0);
    assert_eq!(w.names(), ["a-20261207-2101", "a-20261207-2102"]);

    let mut w = World::new(&[("r", every_minute("replace"))]);
    w.tick();
    w.wait(30.0);
    w.calls();
    w.wait(60.0);
    assert_eq!(
        w.calls(),
        [
            "stop r-20261207-2101",
            "start r-20261207-2102 slot=0 env=cron"
        ]
    );
    w.end("r-20261207-2101", VmOutcome::Killed { signal: 15 });
    assert_eq!(
        w.core.workloads["r-20261207-2101"].last_outcome.text,
        "replaced by the next run"
    );
    assert_eq!(runs(&w)[1].2, "replaced r-20261207-2101");
}

#[test]
fn a_run_past_its_deadline_is_stopped_and_not_restarted() {
    let mut u = every_minute("forbid");
    u.deadline = Some(20);
    u.restart = Restart::OnFailure;
    let mut w = World::new(&[("d", u)]);
    w.tick();
    w.wait(30.0);
    w.calls();
    w.wait(19.0);
    assert!(w.calls().is_empty());
    w.wait(1.0);
    assert_eq!(w.calls(), ["stop d-20261207-2101"]);
    w.end("d-20261207-2101", VmOutcome::Killed { signal: 15 });
    let run = &w.core.workloads["d-20261207-2101"];
    assert_eq!(run.state(), WorkloadState::Ended);
    assert_eq!(run.last_outcome.text, "stopped at its deadline (20s)");
    assert!(w.calls().is_empty(), "no restart");
}

#[test]
fn a_run_missed_while_vmmd_was_down_is_caught_up_once_within_its_starting_deadline() {
    let marks = |at: &str| BTreeMap::from([("c".to_string(), at.parse().unwrap())]);
    // Last fired 20:50; vmmd starts at 21:00:30: 21:00 was missed (and
    // nine before it): one run at once, then the schedule as usual.
    let mut w = World::new(&[("c", every_minute("allow"))]);
    w.core.restore_cron_marks(marks("2026-12-07T20:50:00Z"));
    w.tick();
    assert_eq!(w.names(), ["c-20261207-2100"]);
    assert!(runs(&w)[0].2.starts_with("caught up"));
    w.wait(1.0);
    assert_eq!(w.names().len(), 1, "once");
    w.wait(29.0);
    assert_eq!(w.names(), ["c-20261207-2100", "c-20261207-2101"]);
    assert_eq!(
        w.core.cron_marks()["c"],
        "2026-12-07T21:01:00Z"
            .parse::<chrono::DateTime<chrono::Utc>>()
            .unwrap()
    );

    // Past the starting deadline: skipped, and said so.
    let mut u = every_minute("allow");
    u.starting_deadline = Some(10);
    let mut w = World::new(&[("c", u)]);
    w.core.restore_cron_marks(marks("2026-12-07T20:50:00Z"));
    w.tick();
    assert!(w.names().is_empty());
    assert!(runs(&w)[0].2.contains("past its starting deadline of 10s"));

    // Nothing kept, nothing caught up; a mark at the last due time, too.
    let mut w = World::new(&[("c", every_minute("allow"))]);
    w.tick();
    assert!(w.names().is_empty());
    let mut w = World::new(&[("c", every_minute("allow"))]);
    w.core.restore_cron_marks(marks("2026-12-07T21:00:00Z"));
    w.tick();
    assert!(w.names().is_empty());
}

#[test]
fn a_clock_stepped_an_hour_ahead_fires_one_run_not_sixty() {
    let mut w = World::new(&[("j", every_minute("allow"))]);
    w.tick();
    w.wall += chrono::Duration::hours(1);
    w.tick();
    assert_eq!(w.names(), ["j-20261207-2200"]);
    assert!(
        w.core.next_wakeup_at(w.now, w.wall).unwrap()
            <= w.now + crate::reconcile::cron::CLOCK_CHECK,
        "the clock is looked at again soon"
    );
}

#[test]
fn a_unit_that_becomes_scheduled_loses_its_standing_workload_and_back() {
    let mut standing = every_minute("allow");
    standing.schedule = None;
    standing.restart = Restart::Always;
    let mut w = World::new(&[("s", standing.clone())]);
    w.tick();
    assert_eq!(w.names(), ["s"]);
    w.core
        .set_units([("s".to_string(), every_minute("allow"))].into());
    w.tick();
    w.wait(30.0);
    assert!(w.calls().contains(&"stop s".to_string()));
    w.end("s", VmOutcome::Killed { signal: 15 });
    assert_eq!(w.names(), ["s-20261207-2101"]);
    w.core.set_units([("s".to_string(), standing)].into());
    w.tick();
    assert!(w.calls().contains(&"stop s-20261207-2101".to_string()));
}

#[test]
fn due_times_are_whole_minutes_whatever_the_clock_reads_between() {
    let mut w = World::new(&[("m", every_minute("allow"))]);
    w.wall = "2026-12-07T21:00:59.700Z".parse().unwrap();
    w.tick();
    w.wait(0.5);
    assert_eq!(w.names(), ["m-20261207-2101"]);
    assert_eq!(
        w.core.cron_marks()["m"],
        "2026-12-07T21:01:00Z"
            .parse::<chrono::DateTime<chrono::Utc>>()
            .unwrap()
    );
    assert_eq!(
        w.core.workloads["m-20261207-2101"].run,
        Some("2026-12-07T21:01:00Z".parse().unwrap())
    );
}
