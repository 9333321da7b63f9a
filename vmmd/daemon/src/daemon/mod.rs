//! The resident daemon: turns `[microvm]` units and `cup run` into
//! running VMs, one worker process each, and reports how each one ended.
//!
//! # Design
//! The main thread owns all state (a [`Core`], see [`crate::reconcile`]
//! for the policy: replicas, rolling replace, restarts, health) and waits
//! on one channel for events: a worker ended (with its report), an image
//! is prepared, a health probe answered, a signal arrived, an API request.
//! Each worker has a monitor thread that feeds it its config, passes its
//! guest output on (as `NAME | line` and into the workload's log), waits
//! for it, and sends the report. [`WorkerBackend`] is how the core's
//! decisions reach the world: workers, vsock requests to vminit, threads
//! that pull images and run probes.
//!
//! The API (`org.steelcup.Vmm1`, see [`steelcup_api::vmm1`]) reaches the
//! loop as events too (executed in `actions`); pause and resume go to the
//! worker over its control socket (`workers`). SIGHUP (init sends it on
//! `cup reload`) re-reads the unit files. `guest` talks to vminit,
//! `volumes` keeps the volumes' disk files, `warm` is the warm pool's side.
//!
//! # Limitations
//! A restarted vmmd does not find VMs of the one before (its workers die
//! with it: they run with PR_SET_PDEATHSIG); unit workloads come back from
//! their units, `cup run` workloads do not.

use crate::dbus;
use crate::image::source::PullOptions;
use crate::image::workload::{PrepareError, Prepared};

use crate::reconcile::{AfterStop, Backend, Core, ProbeFailure, Workload};
use nix::sys::signal::Signal;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use steelcup_api::vmm1::{self, Action, ApiError, Reply, VmInfo, WorkloadState};
use steelcup_os::logs::LogStore;
use steelcup_proto::control::{GuestAnswer, GuestRequest, CONTROL_PORT};
use steelcup_proto::guest::{disk_device, GuestConfig, GuestNetwork, GuestVolume, POOL_PORT};
use steelcup_proto::worker::{
    DiskConfig, NetConfig, VmConfig, VmOutcome, VsockConfig, WorkerCommand, WorkerMessage,
    WorkerReport, DEFAULT_CMDLINE,
};
use steelcup_units::{self as units, HealthCheck, MicrovmSection, Network, Restart, UnitKind};

pub use crate::reconcile::STOP_GRACE;

mod actions;
mod backend;
mod cron_marks;
mod error;
mod guest;
mod runs;
mod stats;
mod transfer;
mod volumes;
mod warm;
mod workers;

use actions::*;
pub use backend::WorkerBackend;
pub use error::{DaemonError, GuestError, NoNetwork, PortError, VmError};
use guest::*;
pub use guest::{ask_guest, vsock_path};
use volumes::*;
pub use volumes::{ensure_volume, NAMED_VOLUMES, NAMED_VOLUME_SIZE};
use warm::*;
pub use workers::Worker;
use workers::*;

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
    /// `/etc/steelcup/registries.toml`: credentials (and more plain-HTTP
    /// registries) by registry host.
    pub registries: crate::image::registries::Registries,
    /// Where `registries` came from, read again on SIGHUP (`cup reload`,
    /// `cup machine apply`).
    pub registries_file: Option<PathBuf>,
    /// `cup login`'s credentials (before registries.toml's).
    pub logins: crate::image::registries::Logins,
    /// Pulls in flight, by source: shared by the threads doing them and
    /// the API.
    pub pulls: Pulls,
    /// How the last removed workloads (`cup run --rm`) ended, newest last,
    /// so `cup run` can say why a VM it waited for is gone.
    pub removed: crate::reconcile::Removed,
    /// Each workload's console output (`cup logs`), in memory.
    pub logs: Arc<LogStore>,
    /// The warm pool's sizes (`--warm-pool`); empty: every start is cold.
    pub warm_pool: Vec<crate::pool::PoolSpec>,
    /// The workload network (`--network`); None: no VM gets a network.
    pub network: Option<crate::net::NetOptions>,
}

/// Pulls in flight, by source.
pub type Pulls = std::sync::Arc<std::sync::Mutex<BTreeMap<String, vmm1::PullInfo>>>;

/// A progress callback that records a pull of `source` in `pulls`, and a
/// guard that forgets it when dropped.
fn track(pulls: &Pulls, source: &str) -> (impl FnMut(crate::image::source::Progress), PullGuard) {
    let (p, s) = (pulls.clone(), source.to_string());
    let report = move |x: crate::image::source::Progress| {
        let info = vmm1::PullInfo {
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
    Api(dbus::Request),
    /// A workload's image is pulled and its root image built (or not).
    Prepared {
        name: String,
        result: Result<Prepared, PrepareError>,
    },
    /// A health probe's answer.
    Probed {
        name: String,
        result: Result<(), ProbeFailure>,
    },
    /// A warm-pool VM's vminit answered: it waits for a workload.
    PoolReady {
        name: String,
    },
    /// A warm-pool VM did not answer within [`POOL_BOOT_LIMIT`].
    PoolStuck {
        name: String,
    },
    /// The registry took a `cup login`'s credentials: keep them, answer.
    LoginChecked {
        registry: String,
        user: String,
        password: String,
        reply: futures_channel::oneshot::Sender<Result<Reply, ApiError>>,
    },
}

/// The `[microvm]` units in `dir` whose conditions hold.
fn load_units(
    dir: &Path,
    current: &BTreeMap<String, MicrovmSection>,
    after: &mut BTreeMap<String, Vec<String>>,
) -> BTreeMap<String, MicrovmSection> {
    let (found, errors) = units::load_dir(dir);
    // A kept unit (its file refused) keeps its order too.
    after.retain(|n, _| {
        errors
            .iter()
            .any(|e| e.unit_name().as_deref() == Some(n.as_str()))
    });
    for u in &found {
        let deps: Vec<String> = u
            .unit
            .after
            .iter()
            .chain(&u.unit.requires)
            .cloned()
            .collect();
        if !deps.is_empty() {
            after.insert(u.name.clone(), deps);
        }
    }
    let mut kept = BTreeMap::new();
    for e in &errors {
        tracing::error!("{}", steelcup_vmm::worker::error_chain(e));
        // A unit whose file no longer reads goes on as it was (init keeps
        // its last good definition too) until the file is fixed.
        if let Some((name, spec)) = e
            .unit_name()
            .and_then(|n| current.get(&n).map(|s| (n, s.clone())))
        {
            tracing::warn!("unit {name}: its file is refused; it goes on as it was");
            kept.insert(name, spec);
        }
    }
    let cmdline = units::kernel_cmdline();
    let mut found: BTreeMap<String, MicrovmSection> = found
        .into_iter()
        .filter(|u| match u.unit.unmet_condition(&cmdline) {
            Some(c) => {
                tracing::info!(
                    "unit {}: skipped: condition-kernel-cmdline {c:?} not met",
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
        .collect();
    for (name, spec) in kept {
        found.entry(name).or_insert(spec);
    }
    found
}

/// Leaves out (with an error each) the units whose published ports another
/// unit (first by name), a `cup run` workload or a host program holds: the
/// others load.
fn without_port_clashes(
    mut found: BTreeMap<String, MicrovmSection>,
    workloads: &BTreeMap<String, Workload>,
) -> BTreeMap<String, MicrovmSection> {
    let mut kept: BTreeMap<String, MicrovmSection> = BTreeMap::new();
    for (name, spec) in std::mem::take(&mut found) {
        let mine = |w: &Workload| w.unit.as_deref() == Some(name.as_str());
        let host = spec.ports.iter().try_for_each(|p| {
            // Ports this unit's own VMs already publish are not the host's.
            let published = workloads
                .values()
                .any(|w| mine(w) && w.spec.ports.contains(p));
            if published {
                Ok(())
            } else {
                crate::net::host_port_free(p).map_err(PortError::from)
            }
        });
        match port_clash(workloads, &kept, &name, &spec.ports).and(host) {
            Ok(()) => {
                kept.insert(name, spec);
            }
            Err(e) => tracing::error!("unit {name}: not started: {e}"),
        }
    }
    kept
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(opts: Options) -> Result<(), DaemonError> {
    let sfd = steelcup_sys::signalfd(&[Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP])?;
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
        .map_err(DaemonError::io("spawn the signal thread"))?;

    let backend = WorkerBackend {
        opts: opts.clone(),
        tx: tx.clone(),
        controls: BTreeMap::new(),
        net: match &opts.network {
            None => Err(NoNetwork::TurnedOff),
            Some(n) => crate::net::HostNet::setup(n.clone(), &opts.state_dir).map_err(|e| {
                let e = steelcup_sys::error_chain(&e);
                tracing::error!("network: {e}; workloads that want a network cannot start");
                NoNetwork::SetupFailed(e)
            }),
        },
        taps: BTreeMap::new(),
        next_tap: 0,
    };
    let mut core = Core::new(backend, opts.removed.clone(), opts.warm_pool.clone());
    let mut after = BTreeMap::new();
    let found = without_port_clashes(
        load_units(&opts.units, &BTreeMap::new(), &mut after),
        &core.workloads,
    );
    core.set_units(found);
    core.set_after(after);
    let mut cron_kept = cron_marks::load(&opts.state_dir);
    core.restore_cron_marks(cron_kept.clone());
    // `cup run`s with a restart policy, kept by the vmmd before.
    for spec in runs::load(&opts.state_dir) {
        let name = spec.name.clone().unwrap_or_default();
        match run_workload(&core.workloads, &core.units, spec, Instant::now()) {
            Ok((name, w)) => {
                tracing::info!("workload {name}: kept run, started again");
                core.add(name, w);
            }
            Err(e) => tracing::error!("workload {name}: kept run not started: {e}"),
        }
    }
    // Leases of VMs no unit or kept run can have any more (and of other
    // `cup run`s of the vmmd before) go back.
    if let Ok(net) = &mut core.backend.net {
        let (units, runs) = (&core.units, &core.workloads);
        net.prune(|vm| {
            runs.contains_key(vm)
                || units.keys().any(|u| {
                    vm == u
                        || vm
                            .strip_prefix(u.as_str())
                            .is_some_and(|k| k.starts_with('.'))
                })
        });
    }
    for dir in [
        opts.run_dir.join("vsock"),
        steelcup_vmm::jail::mount::scratch_dir(&opts.run_dir),
    ] {
        std::fs::create_dir_all(&dir).map_err(|source| DaemonError::Dir {
            path: dir.clone(),
            source,
        })?;
    }
    clean_leftovers(&opts);
    let (api_tx, api_rx) = mpsc::channel::<dbus::Request>();
    let changes = dbus::serve(&opts.api_socket, api_tx).map_err(|source| DaemonError::Api {
        socket: opts.api_socket.clone(),
        source,
    })?;
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
        .map_err(DaemonError::io("spawn the API thread"))?;
    steelcup_sys::notify_ready("vmmd");
    tracing::info!(
        "vmmd {} ready: {} microvm units in {}",
        env!("CARGO_PKG_VERSION"),
        core.units.len(),
        opts.units.display()
    );

    let mut seen: BTreeMap<String, dbus::Change> = BTreeMap::new();
    loop {
        core.tick(Instant::now());
        core.refill_pool(Instant::now());
        let marks = core.cron_marks();
        if marks != cron_kept {
            cron_marks::save(&opts.state_dir, &marks);
            cron_kept = marks;
        }
        announce(&core, &mut seen, &changes);
        sync_network(&mut core);
        let timeout = core
            .next_wakeup_at(Instant::now(), chrono::Utc::now())
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(3600));
        let now = || Instant::now();
        match rx.recv_timeout(timeout) {
            Ok(Event::Signal(Signal::SIGHUP)) => {
                if let Some(file) = &opts.registries_file {
                    core.backend.opts.registries = load_registries(file);
                }
                let mut after = core.after.clone();
                let found = without_port_clashes(
                    load_units(&opts.units, &core.units, &mut after),
                    &core.workloads,
                );
                let c = core.set_units(found);
                core.set_after(after);
                tracing::info!(
                    "reload: units new [{}], removed [{}], changed [{}]",
                    c.added.join(", "),
                    c.removed.join(", "),
                    c.changed.join(", ")
                );
            }
            Ok(Event::Signal(sig)) => {
                tracing::info!("{sig}: stopping {} workloads", core.running());
                stop_all(&mut core, &rx);
                if let Ok(net) = &mut core.backend.net {
                    net.teardown();
                }
                tracing::info!("vmmd stopped");
                return Ok(());
            }
            Ok(Event::Ended { name, report }) if name.starts_with('_') => {
                // A warm-pool VM that ended unclaimed (or whose claim failed).
                if core.pool_ended(&name, now()) {
                    tracing::warn!(
                        "warm pool: {name} ended before a workload took it: {}",
                        report.outcome
                    );
                }
                let _ = std::fs::remove_file(vsock_path(&opts, &name));
            }
            Ok(Event::Ended { name, report }) => {
                core.backend.controls.remove(&name);
                core.backend.taps.remove(&name);
                core.ended(&name, report, now());
            }
            Ok(Event::PoolStuck { name }) => core.pool_stuck(&name),
            Ok(Event::PoolReady { name }) => core.pool_ready(&name, now()),
            Ok(Event::LoginChecked {
                registry,
                user,
                password,
                reply,
            }) => {
                let _ = reply.send(keep_login(&mut core, registry, &user, &password));
            }
            Ok(Event::Api(req)) => execute(&opts, &mut core, req),
            Ok(Event::Prepared { name, result }) => core.prepared(&name, result, now()),
            Ok(Event::Probed { name, result }) => core.probed(&name, result, now()),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return Err(DaemonError::EventsClosed),
        }
    }
}

/// Hands the workload network what runs now (its rules and DNS follow).
fn sync_network(core: &mut Daemon) {
    let Core {
        workloads, backend, ..
    } = core;
    let Ok(net) = &mut backend.net else { return };
    let vms: Vec<crate::net::RunningVm> = workloads
        .iter()
        .filter(|(_, w)| w.pid.is_some())
        .filter_map(|(name, w)| {
            Some(crate::net::RunningVm {
                name: name.clone(),
                tap: backend.taps.get(name)?.clone(),
                unit: w.unit.clone(),
                scopes: network_scopes(name, w),
                aliases: w.spec.aliases.clone(),
                ports: w.spec.ports.clone(),
                ready: w.ready(),
            })
        })
        .collect();
    // An error is logged by sync, once; the next change tries again.
    let _ = net.sync(&vms);
}

/// Workload `name`'s network scopes: the unit's own, or its unit, or
/// itself.
fn network_scopes(name: &str, w: &Workload) -> Vec<String> {
    if w.spec.network_scope.is_empty() {
        vec![w.unit.clone().unwrap_or_else(|| name.to_string())]
    } else {
        w.spec.network_scope.clone()
    }
}

/// Who else publishes one of `ports` (a unit, or another `cup run`
/// workload), as an error for `owner`'s start.
fn port_clash(
    workloads: &BTreeMap<String, Workload>,
    units: &BTreeMap<String, MicrovmSection>,
    owner: &str,
    ports: &[steelcup_units::ports::PortSpec],
) -> Result<(), PortError> {
    let theirs = units
        .iter()
        .filter(|(u, _)| u.as_str() != owner)
        .map(|(u, s)| (format!("unit {u}"), &s.ports))
        .chain(
            workloads
                .iter()
                .filter(|(n, w)| w.unit.is_none() && n.as_str() != owner)
                .map(|(n, w)| (format!("workload {n}"), &w.spec.ports)),
        );
    for (who, their) in theirs {
        for p in ports {
            if let Some(q) = their.iter().find(|q| p.clashes(q)) {
                return Err(PortError::Clash {
                    port: p.host_port,
                    protocol: p.protocol.name(),
                    who,
                    theirs: *q,
                });
            }
        }
    }
    Ok(())
}

/// Cleans up after an earlier vmmd that did not stop its VMs (killed,
/// crashed): its workers are gone with it (they run with
/// PR_SET_PDEATHSIG; their taps and jail mounts were theirs alone), but
/// their cgroups and vsock sockets stay. Their workloads start again from
/// the units; `cup run` ones are gone with the daemon that made them.
fn clean_leftovers(opts: &Options) {
    if let Some(root) = &opts.cgroup_root {
        for (name, killed) in steelcup_vmm::jail::cgroup::remove_leftovers(root) {
            tracing::info!(
                "removed the cgroup {name} an earlier vmmd left ({killed} processes killed)"
            );
        }
    }
    // Pulls and builds of the vmmd before that never finished.
    if let Ok(store) = crate::image::store::Store::open(&opts.state_dir) {
        let n = store.remove_tmp("");
        if n > 0 {
            tracing::info!("removed {n} temporary files an earlier vmmd left in the image store");
        }
    }
    let dir = opts.run_dir.join("vsock");
    let stale: Vec<PathBuf> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    if !stale.is_empty() {
        tracing::info!(
            "removed {} vsock sockets an earlier vmmd left in {}",
            stale.len(),
            dir.display()
        );
    }
    for p in stale {
        let _ = std::fs::remove_file(p);
    }
}

/// Sends `WorkloadChanged` for every workload whose state, health or last
/// outcome differs from `seen` (and `removed` for those gone).
fn announce(
    core: &Daemon,
    seen: &mut BTreeMap<String, dbus::Change>,
    changes: &mpsc::Sender<dbus::Change>,
) {
    for (name, w) in &core.workloads {
        let now = dbus::Change {
            name: name.clone(),
            state: w.state(),
            health: w.health_name().to_string(),
            outcome: w.last_outcome.clone(),
        };
        if seen.get(name) != Some(&now) {
            let _ = changes.send(now.clone());
            seen.insert(name.clone(), now);
        }
    }
    seen.retain(|name, last| {
        let kept = core.workloads.contains_key(name);
        if !kept {
            // How its last run ended, as it was when vmmd forgot it: a
            // `cup run --rm` workload ends and goes between two
            // announcements, and its outcome is only in this signal.
            let last = core
                .removed
                .lock()
                .ok()
                .and_then(|r| {
                    r.iter()
                        .rev()
                        .find(|(n, _)| n == name)
                        .map(|(_, o)| o.clone())
                })
                .unwrap_or_else(|| last.outcome.clone());
            let _ = changes.send(dbus::Change {
                name: name.clone(),
                state: WorkloadState::Removed,
                health: String::new(),
                outcome: last,
            });
        }
        kept
    });
}

type Daemon = Core<WorkerBackend>;

/// Stops every running workload: asks each guest's vminit over vsock, waits
/// up to [`STOP_GRACE`], then kills the workers that are left.
fn stop_all(core: &mut Daemon, rx: &mpsc::Receiver<Event>) {
    let now = Instant::now();
    // Warm VMs run no workload: nothing to ask, they just go.
    core.drain_pool();
    let running: Vec<String> = core
        .workloads
        .iter()
        .filter(|(_, w)| w.pid.is_some())
        .map(|(n, _)| n.clone())
        .collect();
    for name in &running {
        core.stop(name, None, AfterStop::Stay, now);
    }
    let wait = |core: &mut Daemon, deadline: Instant| {
        while core.running() > 0 {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(Event::Ended { name, report }) => core.ended(&name, report, Instant::now()),
                Ok(
                    Event::Signal(_)
                    | Event::Prepared { .. }
                    | Event::Probed { .. }
                    | Event::PoolReady { .. }
                    | Event::PoolStuck { .. },
                ) => {}
                Ok(Event::LoginChecked { reply, .. }) => {
                    let _ = reply.send(Err(ApiError::ShuttingDown));
                }
                Ok(Event::Api(req)) => {
                    let _ = req.reply.send(Err(ApiError::ShuttingDown));
                }
                Err(_) => break,
            }
        }
    };
    wait(core, now + STOP_GRACE);
    for (name, w) in core.workloads.iter() {
        if let Some(pid) = w.pid {
            tracing::warn!(
                "workload {name}: still running after {}s; killing its worker",
                STOP_GRACE.as_secs()
            );
            kill_worker(pid);
        }
    }
    wait(core, Instant::now() + Duration::from_secs(5));
}

/// How `image` is pulled: over plain HTTP if its registry is listed so
/// (`--insecure-registry`, registries.toml), with the credentials
/// registries.toml gives its registry.
fn pull_options(opts: &Options, image: &str) -> PullOptions {
    PullOptions {
        insecure: opts
            .insecure_registries
            .iter()
            .chain(&opts.registries.insecure)
            .cloned()
            .collect(),
        credentials: crate::image::registries::login_key(image)
            .and_then(|r| opts.logins.get(&r))
            .or_else(|| opts.registries.credentials_for(image)),
    }
}

/// Pulls a workload's image and builds its root image off the main
/// thread; the answer comes back as [`Event::Prepared`].
fn spawn_prepare(opts: &Options, name: &str, image: &str, tx: mpsc::Sender<Event>) {
    let (store, image, name) = (opts.state_dir.clone(), image.to_string(), name.to_string());
    let pull = pull_options(opts, &image);
    let pulls = opts.pulls.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("prepare-{name}"))
        .spawn({
            let tx = tx.clone();
            let name = name.clone();
            move || {
                let (mut progress, _guard) = track(&pulls, &image);
                let result = crate::image::workload::prepare(
                    &store,
                    &image,
                    &pull,
                    &mut progress,
                    &crate::image::workload::child_builder(),
                );
                let _ = tx.send(Event::Prepared { name, result });
            }
        });
    if let Err(e) = spawned {
        let _ = tx.send(Event::Prepared {
            name,
            result: Err(PrepareError::Thread(e)),
        });
    }
}

/// The VM config of workload `name`'s next boot.
fn vm_config(
    opts: &Options,
    name: &str,
    w: &Workload,
    net: Option<(NetConfig, GuestNetwork)>,
) -> Result<VmConfig, VmError> {
    let (spec, prepared, cid) = (&w.spec, w.prepared.as_ref(), w.cid);
    let mut disks = Vec::new();
    let mut root = None;
    let root_image = prepared.map(|p| &p.rootfs).or(spec.root.as_ref());
    if let Some(path) = root_image {
        root = Some(disk_device(disks.len()));
        disks.push(DiskConfig {
            path: path.clone(),
            read_only: true,
            id: "root".into(),
            empty_slot: false,
        });
    }
    let mut volumes = Vec::new();
    for v in &spec.volumes {
        let path = ensure_volume(&opts.state_dir, &w.volume_key(), v)?;
        volumes.push(GuestVolume {
            device: disk_device(disks.len()),
            path: v.mount.display().to_string(),
            read_only: v.read_only,
        });
        disks.push(DiskConfig {
            path,
            read_only: v.read_only,
            id: v.name.clone(),
            empty_slot: false,
        });
    }
    let (net, network) = net.unzip();
    let process = match prepared {
        Some(p) => p.process.merge(spec)?,
        None => crate::image::workload::Process::default().merge(spec)?,
    };
    Ok(VmConfig {
        name: name.to_string(),
        kernel: spec.kernel.clone().unwrap_or_else(|| opts.kernel.clone()),
        initramfs: spec
            .initramfs
            .clone()
            .unwrap_or_else(|| opts.initramfs.clone()),
        cmdline: DEFAULT_CMDLINE.to_string(),
        vcpus: spec.vcpus(),
        memory_mib: spec.memory.mib(),
        memory_backing: spec.memory_backing,
        huge_pages: spec.huge_pages,
        guest: GuestConfig {
            cmd: process.argv,
            env: process.env,
            workdir: process.workdir,
            hostname: Some(spec.hostname.clone().unwrap_or_else(|| name.to_string())),
            root,
            volumes,
            network,
            user: process.user,
            attach: false,
            tty: false,
            rlimits: spec.rlimits.clone(),
            pool: false,
            read_only: spec.read_only,
            extra_hosts: spec.extra_hosts.clone().into_iter().collect(),
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
            .then(|| steelcup_vmm::jail::mount::scratch_dir(&opts.run_dir)),
        cpu_max_millis: spec.cpu_max.map(steelcup_units::Cpus::millis),
    })
}

/// The registries file at `path` (docs/provisioning.md): said when it
/// has something; a bad one is said and pulls go on without it.
pub fn load_registries(path: &Path) -> crate::image::registries::Registries {
    match crate::image::registries::Registries::load(path) {
        Ok(r) => {
            if r != Default::default() {
                tracing::info!(
                    "registries: {} with credentials, {} over plain HTTP, from {}",
                    r.credentials.len(),
                    r.insecure.len(),
                    path.display()
                );
            }
            r
        }
        Err(e) => {
            tracing::error!("registries: {e}; pulling without it");
            Default::default()
        }
    }
}

/// The default options for the appliance.
pub fn default_options(units: &Path) -> Options {
    Options {
        units: units.to_path_buf(),
        kernel: DEFAULT_KERNEL.into(),
        initramfs: DEFAULT_INITRAMFS.into(),
        worker_exe: steelcup_vmm::worker::exe(),
        state_dir: DEFAULT_STATE_DIR.into(),
        run_dir: DEFAULT_RUN_DIR.into(),
        api_socket: vmm1::DEFAULT_SOCKET.into(),
        cgroup_root: Path::new("/sys/fs/cgroup/cgroup.controllers")
            .exists()
            .then(|| steelcup_vmm::jail::cgroup::DEFAULT_ROOT.into()),
        jail: nix::unistd::geteuid().is_root(),
        insecure_registries: Vec::new(),
        registries: Default::default(),
        registries_file: None,
        logins: Default::default(),
        pulls: Default::default(),
        removed: Default::default(),
        logs: Arc::new(LogStore::new(None, false)),
        warm_pool: Vec::new(),
        network: Some(crate::net::NetOptions::default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> vmm1::RunSpec {
        serde_json::from_str(json).unwrap()
    }

    fn refused(r: Result<Reply, ApiError>) -> String {
        match r {
            Err(ApiError::Refused(m)) => m,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn a_new_volume_is_a_sparse_ext4_disk_and_an_old_one_is_kept() {
        if !MKE2FS_PATHS.iter().any(|p| Path::new(p).exists()) {
            eprintln!("SKIP: no mke2fs (e2fsprogs) here; vminit formats blank disks instead");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let v = steelcup_units::VolumeSpec {
            name: "data".into(),
            size: steelcup_units::MemSize(64 << 20),
            mount: "/data".into(),
            read_only: false,
        };
        let path = ensure_volume(dir.path(), "web", &v).unwrap();
        assert_eq!(path, dir.path().join("volumes/web/data.img"));
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        // Sparse: nothing zeroed (the inode tables are not written on a
        // new file).
        use std::os::unix::fs::MetadataExt;
        assert!(
            meta.blocks() * 512 < 4 << 20,
            "{} bytes allocated",
            meta.blocks() * 512
        );
        let bytes = std::fs::read(&path).unwrap();
        // The ext superblock at 1024: magic 0xEF53 at offset 56, and no
        // journal (has_journal in the compat features at 92): it could
        // not be replayed on a read-only attach after a reset.
        assert_eq!(&bytes[1024 + 56..1024 + 58], &[0x53, 0xEF]);
        assert_eq!(bytes[1024 + 92] & 0x4, 0, "no journal");
        // No temporary file left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("volumes/web"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("data.img")]);
        // An existing disk is never reformatted.
        std::fs::write(&path, b"kept").unwrap();
        ensure_volume(dir.path(), "web", &v).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"kept");
    }

    #[test]
    fn images_are_found_by_the_names_docker_users_write() {
        use crate::image::store::Store;
        let dir = tempfile::tempdir().unwrap();
        let mut opts = default_options(Path::new("/nonexistent/units"));
        opts.state_dir = dir.path().to_path_buf();
        let store = Store::open(dir.path()).unwrap();
        let config = br#"{"architecture":"amd64","os":"linux","config":{"Cmd":["sh"]},"rootfs":{"type":"layers","diff_ids":[]}}"#;
        let cd = store.put_bytes(config).unwrap();
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cd}","size":{}}},"layers":[]}}"#,
            config.len()
        );
        let md = store.put_bytes(manifest.as_bytes()).unwrap();
        store.tag("docker.io/library/mybox:1", &md).unwrap();
        let text = |r: Result<Reply, ApiError>| match r {
            Ok(Reply::Text(t)) => t,
            other => panic!("{other:?}"),
        };
        // Inspected, tagged and removed by the short name.
        let v: serde_json::Value = serde_json::from_str(&text(image_action(
            &opts,
            Action::InspectImage("mybox:1".into()),
        )))
        .unwrap();
        assert_eq!(
            v["RepoTags"],
            serde_json::json!(["docker.io/library/mybox:1"])
        );
        assert_eq!(v["Config"]["Cmd"], serde_json::json!(["sh"]));
        let tagged = text(image_action(
            &opts,
            Action::TagImage("mybox:1".into(), "other:2".into()),
        ));
        assert_eq!(tagged, "docker.io/library/other:2");
        assert!(matches!(
            image_action(&opts, Action::RemoveImage("other:2".into())),
            Ok(Reply::Done)
        ));
        assert!(image_action(&opts, Action::InspectImage("other:2".into())).is_err());
        let e = image_action(&opts, Action::TagImage("mybox:1".into(), "oci:/x".into()));
        assert!(matches!(e, Err(ApiError::Refused(m)) if m.contains("registry reference")));
    }

    #[test]
    fn a_workloads_process_options_and_cpu_quota_reach_its_vm() {
        let opts = default_options(Path::new("/nonexistent/units"));
        let spec = MicrovmSection {
            cmd: vec!["/bin/sh".into()],
            entrypoint: Some(vec!["/bin/busybox".into()]),
            workdir: Some("/srv".into()),
            user: Some("1000:1000".into()),
            hostname: Some("box".into()),
            read_only: true,
            extra_hosts: [("db".to_string(), [10, 1, 2, 3].into())].into(),
            cpu_max: Some("1.5".parse().unwrap()),
            ..Default::default()
        };
        let w = Workload::new(spec, 3, Instant::now());
        let vm = vm_config(&opts, "job", &w, None).unwrap();
        assert_eq!((vm.vcpus, vm.cpu_max_millis), (2, Some(1500)));
        let g = &vm.guest;
        assert_eq!(g.cmd, ["/bin/busybox", "/bin/sh"]);
        assert_eq!(
            (
                g.workdir.as_deref(),
                g.user.as_deref(),
                g.hostname.as_deref()
            ),
            (Some("/srv"), Some("1000:1000"), Some("box"))
        );
        assert!(g.read_only);
        assert_eq!(g.extra_hosts, [("db".to_string(), [10, 1, 2, 3].into())]);
    }

    #[test]
    fn cup_run_specs_are_checked_before_a_workload_exists() {
        let mut w = BTreeMap::new();
        let mut units = BTreeMap::new();
        let now = Instant::now();
        let run = |w: &mut BTreeMap<String, Workload>,
                   units: &BTreeMap<String, MicrovmSection>,
                   json: &str| {
            run_workload(w, units, spec(json), now).map(|(name, x)| {
                w.insert(name.clone(), x);
                Reply::Text(name)
            })
        };
        let img = r#""image":"oci-archive:/x.tar:latest""#;
        assert!(refused(run(&mut w, &units, r#"{"image":"Not A Ref"}"#))
            .contains("not an image reference"));
        for (json, why) in [
            (r#","name":"Bad Name""#, "lowercase"),
            (r#","memory":"8MiB""#, "16 MiB to 256 GiB"),
            (r#","memory":"200GiB""#, "this machine has"),
            (r#","vcpus":0"#, "1 to 32"),
            (r#","rlimits":{"files":1}"#, "unknown limit"),
            (r#","workdir":"srv""#, "absolute path"),
            (r#","hostname":"a_b""#, "hostname"),
            (r#","user":"a:b:c""#, "USER:GROUP"),
            (r#","extra_hosts":{"-x":"10.0.0.1"}"#, "not a host name"),
        ] {
            let e = refused(run(&mut w, &units, &format!("{{{img}{json}}}")));
            assert!(e.contains(why), "{json}: {e}");
        }
        // Sizes and volumes are refused where the spec is read, before it
        // reaches the daemon's loop (the API answers `run spec: ...`).
        for (json, why) in [
            (r#","memory":"lots""#, "not a size"),
            (
                r#","volumes":["/srv:/data"]"#,
                "cannot share a host directory",
            ),
            (r#","volumes":["data"]"#, "expected NAME:/PATH"),
            (r#","volumes":["data:/"]"#, "absolute path other than /"),
            (r#","volumes":["data:/x/../etc"]"#, "without '..'"),
            (r#","volumes":["data:/data:rx"]"#, "unknown option"),
            (r#","volumes":["da ta:/data"]"#, "letters, digits"),
        ] {
            let e = serde_json::from_str::<vmm1::RunSpec>(&format!("{{{img}{json}}}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{json}: {e}");
        }
        assert!(w.is_empty(), "nothing half-made");
        assert!(serde_json::from_str::<vmm1::RunSpec>(&format!(r#"{{{img},"bogus":1}}"#)).is_err());

        // Names: given, or run-N; a taken one (a workload's or a unit's)
        // is refused.
        let named = run(
            &mut w,
            &units,
            &format!(r#"{{{img},"name":"web","attach":true,"rm":true}}"#),
        );
        assert_eq!(named, Ok(Reply::Text("web".into())));
        assert!(
            refused(run(&mut w, &units, &format!(r#"{{{img},"name":"web"}}"#))).contains("exists")
        );
        units.insert("run-1".to_string(), w["web"].spec.clone());
        assert!(
            refused(run(&mut w, &units, &format!(r#"{{{img},"name":"run-1"}}"#)))
                .contains("exists")
        );
        assert_eq!(
            run(&mut w, &units, &format!("{{{img}}}")),
            Ok(Reply::Text("run-2".into()))
        );
        assert_eq!(
            run(&mut w, &units, &format!("{{{img}}}")),
            Ok(Reply::Text("run-3".into()))
        );
        run(
            &mut w,
            &units,
            &format!(r#"{{{img},"name":"db","volumes":["pgdata:/var/lib/pg","seed:/seed:ro"]}}"#),
        )
        .unwrap();
        let v = &w["db"].spec.volumes;
        assert_eq!((v[0].name.as_str(), v[0].read_only), ("pgdata", false));
        assert_eq!((v[1].mount.to_str(), v[1].read_only), (Some("/seed"), true));
        assert_eq!(
            w["db"].volume_key(),
            NAMED_VOLUMES,
            "shared by every cup run"
        );
        let web = &w["web"];
        assert!(web.unit.is_none() && web.attach && web.remove_when_done && !web.tty);
        assert_eq!(web.spec.restart, Restart::No);
        let e = refused(run(
            &mut w,
            &units,
            &format!(r#"{{{img},"rm":true,"restart":"always"}}"#),
        ));
        assert!(e.contains("cannot go together"), "{e}");
        let cids: std::collections::BTreeSet<u32> = w.values().map(|x| x.cid).collect();
        assert_eq!(cids.len(), 4, "every VM its own vsock context id");
    }
}
