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
//! The API (`org.steelcup.Vmm1`, see [`steelcup_api::vmm1`]) reaches the loop as
//! events too; pause and resume go to the worker over its stdin. SIGHUP
//! (init sends it on `cup reload`) re-reads the unit files.
//!
//! # Limitations
//! A restarted vmmd does not find VMs of the one before (its workers die
//! with it: they run with PR_SET_PDEATHSIG); unit workloads come back from
//! their units, `cup run` workloads do not.

use crate::dbus;
use crate::image::source::PullOptions;
use crate::image::workload::{Merged, Prepared};
use crate::pool::Pool;
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
        result: Result<Prepared, String>,
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
}

/// A worker's stdin (commands, a Unix socket so a command can carry a
/// descriptor) and its answers (from its stderr).
#[derive(Debug)]
struct WorkerControl {
    commands: UnixStream,
    /// Each command's answer: done, or refused and why.
    answers: mpsc::Receiver<Result<(), String>>,
}

/// How long a worker has to answer a control command.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

impl WorkerControl {
    /// Sends `command`; Ok once the worker has carried it out.
    fn ask(&mut self, command: &WorkerCommand) -> Result<(), String> {
        while self.answers.try_recv().is_ok() {}
        self.commands
            .write_all(command.line().as_bytes())
            .and_then(|_| self.commands.flush())
            .map_err(|e| format!("worker control channel: {e}"))?;
        self.answer(command)
    }

    /// Sends `command` with descriptor `fd` passed along (`SCM_RIGHTS`).
    fn ask_with_fd(
        &mut self,
        command: &WorkerCommand,
        fd: std::os::fd::BorrowedFd,
    ) -> Result<(), String> {
        while self.answers.try_recv().is_ok() {}
        send_with_fds(&self.commands, command.line().as_bytes(), &[fd])
            .map_err(|e| format!("worker control channel: {e}"))?;
        self.answer(command)
    }

    fn answer(&mut self, command: &WorkerCommand) -> Result<(), String> {
        match self.answers.recv_timeout(CONTROL_TIMEOUT) {
            Ok(a) => a,
            Err(_) => Err(format!(
                "the worker did not answer {command:?} within {}s",
                CONTROL_TIMEOUT.as_secs()
            )),
        }
    }
}

/// Writes `bytes` on `sock` with `fds` passed along (`SCM_RIGHTS`, with
/// the first bytes); the rest of a short write follows plainly.
fn send_with_fds(
    sock: &UnixStream,
    bytes: &[u8],
    fds: &[std::os::fd::BorrowedFd],
) -> std::io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use std::os::fd::AsRawFd;
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsgs = [ControlMessage::ScmRights(&raw)];
    let sent = sendmsg::<()>(
        sock.as_raw_fd(),
        &[std::io::IoSlice::new(bytes)],
        if raw.is_empty() { &[] } else { &cmsgs },
        MsgFlags::empty(),
        None,
    )
    .map_err(std::io::Error::from)?;
    (&*sock).write_all(&bytes[sent..])
}

/// The descriptors a worker gets with its config (see
/// `steelcup_proto::worker::VmConfig`): each disk that is not an empty
/// slot, opened here (writable ones locked), then the VM's tap, made here
/// and put on its bridge. The jailed worker opens none of them itself and
/// needs no network capability.
fn open_vm_handles(vm: &VmConfig) -> Result<Vec<std::fs::File>, String> {
    let mut handles = Vec::new();
    for d in vm.disks.iter().filter(|d| !d.empty_slot) {
        let f = steelcup_vmm::devices::virtio::block::Block::open_file(&d.path, d.read_only)
            .map_err(|e| format!("disk {}: {}", d.id, steelcup_sys::error_chain(&e)))?;
        handles.push(f);
    }
    if let Some(n) = &vm.net {
        handles.push(crate::net::link::open_tap(n).map_err(|e| format!("tap {}: {e}", n.tap))?);
    }
    Ok(handles)
}

/// The real backend: jailed workers, vsock requests to vminit, threads.
#[derive(Debug)]
pub struct WorkerBackend {
    opts: Options,
    tx: mpsc::Sender<Event>,
    controls: BTreeMap<String, WorkerControl>,
    /// The warm pool's VMs, by their workers.
    pool: Pool<Worker>,
    /// The workload network, or why there is none.
    net: Result<crate::net::HostNet, String>,
    /// Each running workload's tap.
    taps: BTreeMap<String, String>,
    /// Numbers the taps (`sctN`).
    next_tap: u32,
}

impl WorkerBackend {
    /// Workload `name`'s address on the workload network, if it has one.
    fn address_of(&self, name: &str) -> Option<std::net::Ipv4Addr> {
        self.net.as_ref().ok()?.address_of(name)
    }

    /// Boots what the warm pool is missing.
    fn refill_pool(&mut self, now: Instant) {
        for (name, key) in self.pool.wanted(now) {
            let net = self.pool_net(&name);
            let vm = pool_vm_config(&self.opts, &name, key, net);
            match spawn_worker(&self.opts, &vm, self.tx.clone()) {
                Ok(worker) => {
                    tracing::debug!("warm pool: booting {name} ({} vCPU, {} MiB)", key.0, key.1);
                    spawn_pool_ping(&self.opts, &name, self.tx.clone());
                    self.pool.add(name, key, worker, now);
                }
                Err(e) => {
                    tracing::warn!("warm pool: cannot boot {name}: {e}");
                    self.pool.boot_failed(key, now);
                }
            }
        }
    }

    /// A tap for a new VM `name` on the bridge (its MAC from the name), if
    /// there is a workload network: a pool VM's or a workload's.
    fn pool_net(&mut self, name: &str) -> Option<NetConfig> {
        let net = self.net.as_ref().ok()?;
        self.next_tap = self.next_tap.wrapping_add(1);
        Some(NetConfig {
            tap: format!("sct{}", self.next_tap),
            mac: crate::net::mac_for_name(name),
            bridge: Some(net.opts.bridge.clone()),
            host_address: None,
            mtu: Some(net.opts.mtu),
        })
    }

    /// Workload `name`'s network: its address (leased), tap and how the
    /// guest sets it up; None for `network = "none"`.
    fn workload_net(
        &mut self,
        name: &str,
        spec: &MicrovmSection,
    ) -> Result<Option<(NetConfig, GuestNetwork)>, String> {
        // `vmmd --network none`: no VM gets a network device.
        if spec.network == Network::None || self.opts.network.is_none() {
            return Ok(None);
        }
        let Some(tap) = self.pool_net(name) else {
            return match &self.net {
                Err(e) => Err(format!("the workload network is not available: {e}")),
                Ok(_) => Ok(None),
            };
        };
        let net = self.net.as_mut().map_err(|e| e.clone())?;
        let ip = net.lease(name)?;
        Ok(Some((tap, net.guest_network(name, ip))))
    }

    /// Takes a warm VM for workload `name` if one fits `vm`; None: start
    /// cold.
    fn claim_warm(&mut self, name: &str, vm: &VmConfig) -> Option<i32> {
        let key = pool_fit(&self.opts, vm, self.net.is_ok())?;
        let (pool_name, member) = self.pool.take(key)?;
        let waited = member.since.elapsed();
        let t0 = Instant::now();
        let mut worker = member.handle;
        match claim(&self.opts, &pool_name, name, &mut worker, vm) {
            Ok(()) => {
                tracing::info!(
                    "workload {name}: started from the warm pool in {} ms (VM {pool_name}, worker pid {}, booted {:.1}s before)",
                    t0.elapsed().as_millis(),
                    worker.pid,
                    waited.as_secs_f64()
                );
                let pid = worker.pid;
                if let Some(c) = worker.control.take() {
                    self.controls.insert(name.to_string(), c);
                }
                if let Some(tap) = worker.tap.take() {
                    self.taps.insert(name.to_string(), tap);
                }
                Some(pid)
            }
            Err(e) => {
                tracing::warn!("workload {name}: warm VM {pool_name} refused: {e}; starting cold");
                kill_worker(worker.pid);
                None
            }
        }
    }
}

impl Backend for WorkerBackend {
    fn prepare(&mut self, name: &str, image: &str) {
        spawn_prepare(&self.opts, name, image, self.tx.clone());
    }

    fn start(&mut self, name: &str, w: &Workload, attach: bool) -> Result<i32, String> {
        let net = self.workload_net(name, &w.spec)?;
        let mut vm = vm_config(&self.opts, name, w, net)?;
        (vm.guest.attach, vm.guest.tty) = (attach, w.tty);
        if let Some(pid) = self.claim_warm(name, &vm) {
            return Ok(pid);
        }
        let mut worker = spawn_worker(&self.opts, &vm, self.tx.clone())?;
        tracing::info!(
            "workload {name}: starting microVM (worker pid {})",
            worker.pid
        );
        if let Some(c) = worker.control.take() {
            self.controls.insert(name.to_string(), c);
        }
        if let Some(tap) = worker.tap.take() {
            self.taps.insert(name.to_string(), tap);
        }
        Ok(worker.pid)
    }

    fn ask_stop(&mut self, name: &str) {
        let (uds, name) = (vsock_path(&self.opts, name), name.to_string());
        // The guest answers on its own time; the loop goes on.
        let _ = std::thread::Builder::new()
            .name(format!("stop-{name}"))
            .spawn(move || ask_to_stop(&uds, &name));
    }

    fn kill(&mut self, _name: &str, pid: i32) {
        kill_worker(pid);
    }

    fn probe(&mut self, name: &str, check: &HealthCheck) {
        let (uds, check, tx) = (vsock_path(&self.opts, name), check.clone(), self.tx.clone());
        let name = name.to_string();
        let _ = std::thread::Builder::new()
            .name(format!("probe-{name}"))
            .spawn(move || {
                let result = probe(&uds, &check);
                let _ = tx.send(Event::Probed { name, result });
            });
    }

    fn control(&mut self, name: &str, command: &WorkerCommand) -> Result<(), String> {
        match self.controls.get_mut(name) {
            Some(c) => c.ask(command),
            None => Err(format!("workload {name:?} is not running")),
        }
    }

    fn forgotten(&mut self, name: &str) {
        self.controls.remove(name);
        self.taps.remove(name);
        if let Ok(net) = &mut self.net {
            net.release(name);
        }
        self.opts.logs.forget(name);
        let _ = std::fs::remove_file(vsock_path(&self.opts, name));
    }
}

/// Runs a health check inside the VM behind `uds`.
fn probe(uds: &Path, check: &HealthCheck) -> Result<(), ProbeFailure> {
    use steelcup_proto::probe::Probe;
    let timeout = Duration::from_secs(u64::from(check.timeout));
    let failed = |message: String| ProbeFailure {
        message,
        unreachable: false,
    };
    let unreachable = |message: String| ProbeFailure {
        message,
        unreachable: true,
    };
    let p = match (check.tcp, check.http) {
        (Some(port), _) => Probe::Tcp(port),
        (None, Some(port)) => Probe::Http(port, check.path.clone()),
        (None, None) => {
            let conn = steelcup_api::attach::connect(uds, steelcup_proto::stdio::EXEC_PORT)
                .map_err(unreachable)?;
            return probe_command(conn, &check.command, timeout).map_err(failed);
        }
    };
    let conn = steelcup_api::attach::connect(uds, CONTROL_PORT).map_err(unreachable)?;
    let request = GuestRequest::probe(p, timeout);
    request_on(conn, &request, timeout + Duration::from_secs(2)).map_err(failed)
}

/// Runs `argv` inside the VM as `cup exec` does; Ok when it exits 0.
fn probe_command(
    conn: std::os::unix::net::UnixStream,
    argv: &[String],
    timeout: Duration,
) -> Result<(), String> {
    use steelcup_proto::stdio::{read_frame, ExecRequest, EXIT, STDIN_EOF};
    let request = ExecRequest {
        argv: argv.to_vec(),
        env: BTreeMap::new(),
        workdir: None,
        user: None,
        tty: false,
    };
    let mut conn = steelcup_api::attach::send_exec(conn, &request)?;
    conn.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let _ = steelcup_proto::stdio::write_frame(&mut conn, STDIN_EOF, b"");
    let deadline = Instant::now() + timeout;
    let mut r = BufReader::new(conn);
    loop {
        if Instant::now() > deadline {
            return Err(format!("{argv:?} took more than {}s", timeout.as_secs()));
        }
        match read_frame(&mut r) {
            Ok(Some((EXIT, d))) => {
                let status: steelcup_proto::guest::ExitStatus = serde_json::from_slice(&d)
                    .map_err(|e| format!("a bad exit status from the guest: {e}"))?;
                return match steelcup_api::attach::exit_code(status) {
                    0 => Ok(()),
                    code => Err(format!("{argv:?} exited with {code}")),
                };
            }
            Ok(Some(_)) => {}
            Ok(None) => return Err(format!("{argv:?}: the guest closed the connection")),
            Err(e) => return Err(format!("{argv:?}: {e}")),
        }
    }
}

/// The `[microvm]` units in `dir` whose conditions hold.
fn load_units(dir: &Path) -> BTreeMap<String, MicrovmSection> {
    let (found, errors) = units::load_dir(dir);
    for e in &errors {
        tracing::error!("{}", steelcup_vmm::worker::error_chain(e));
    }
    let cmdline = units::kernel_cmdline();
    found
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
        .collect()
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
                crate::net::host_port_free(p)
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
pub fn run(opts: Options) -> Result<(), String> {
    let sfd = steelcup_sys::signalfd(&[Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP])
        .map_err(|e| steelcup_vmm::worker::error_chain(&e))?;
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

    let backend = WorkerBackend {
        opts: opts.clone(),
        tx: tx.clone(),
        controls: BTreeMap::new(),
        pool: Pool::new(opts.warm_pool.clone()),
        net: match &opts.network {
            None => Err("vmmd runs with --network none".into()),
            Some(n) => crate::net::HostNet::setup(n.clone(), &opts.state_dir).map_err(|e| {
                tracing::error!("network: {e}; workloads that want a network cannot start");
                e
            }),
        },
        taps: BTreeMap::new(),
        next_tap: 0,
    };
    let mut core = Core::new(backend, opts.removed.clone());
    let found = without_port_clashes(load_units(&opts.units), &core.workloads);
    core.set_units(found);
    // Leases of VMs no unit can have any more (and of `cup run`s of the
    // vmmd before) go back.
    if let Ok(net) = &mut core.backend.net {
        let units = &core.units;
        net.prune(|vm| {
            units.keys().any(|u| {
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
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    }
    clean_leftovers(&opts);
    let (api_tx, api_rx) = mpsc::channel::<dbus::Request>();
    let changes = dbus::serve(&opts.api_socket, api_tx)
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
        core.units.len(),
        opts.units.display()
    );

    let mut seen: BTreeMap<String, dbus::Change> = BTreeMap::new();
    loop {
        core.tick(Instant::now());
        core.backend.refill_pool(Instant::now());
        announce(&core, &mut seen, &changes);
        sync_network(&mut core);
        let timeout = [core.next_wakeup(), core.backend.pool.next_wakeup()]
            .into_iter()
            .flatten()
            .min()
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(3600));
        let now = || Instant::now();
        match rx.recv_timeout(timeout) {
            Ok(Event::Signal(Signal::SIGHUP)) => {
                let found = without_port_clashes(load_units(&opts.units), &core.workloads);
                let c = core.set_units(found);
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
                if core.backend.pool.ended(&name, now()).is_some() {
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
            Ok(Event::PoolStuck { name }) => {
                if let Some(pid) = core.backend.pool.booting_handle(&name).map(|w| w.pid) {
                    tracing::warn!(
                        "warm pool: {name} did not come up within {}s; killing it",
                        POOL_BOOT_LIMIT.as_secs()
                    );
                    kill_worker(pid);
                }
            }
            Ok(Event::PoolReady { name }) => {
                let seen = core
                    .backend
                    .pool
                    .ready(&name)
                    .map(|m| (m.key, m.since.elapsed()));
                if let Some((key, took)) = seen {
                    let (ready, booting) = core.backend.pool.counts();
                    tracing::info!(
                        "warm pool: {name} ready ({} vCPU, {} MiB) after {:.1}s; {ready} ready, {booting} booting",
                        key.0,
                        key.1,
                        took.as_secs_f64()
                    );
                }
            }
            Ok(Event::Api(req)) => execute(&opts, &mut core, req),
            Ok(Event::Prepared { name, result }) => core.prepared(&name, result, now()),
            Ok(Event::Probed { name, result }) => core.probed(&name, result, now()),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return Err("event channel closed".into()),
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
                scope: network_scope(name, w),
                ports: w.spec.ports.clone(),
                ready: w.ready(),
            })
        })
        .collect();
    // An error is logged by sync, once; the next change tries again.
    let _ = net.sync(&vms);
}

/// Workload `name`'s network scope: the unit's own, or its unit, or itself.
fn network_scope(name: &str, w: &Workload) -> String {
    w.spec
        .network_scope
        .clone()
        .or_else(|| w.unit.clone())
        .unwrap_or_else(|| name.to_string())
}

/// Who else publishes one of `ports` (a unit, or another `cup run`
/// workload), as an error for `owner`'s start.
fn port_clash(
    workloads: &BTreeMap<String, Workload>,
    units: &BTreeMap<String, MicrovmSection>,
    owner: &str,
    ports: &[steelcup_units::ports::PortSpec],
) -> Result<(), String> {
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
                return Err(format!(
                    "port {}/{} is already published by {who} ({q})",
                    p.host_port,
                    p.protocol.name()
                ));
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

type Daemon = Core<WorkerBackend>;

/// Executes an API request on the daemon's state and answers it, or (a
/// stop) keeps the answer for when the VM has ended.
fn execute(opts: &Options, core: &mut Daemon, req: dbus::Request) {
    let now = Instant::now();
    if let Action::Stop(name) = &req.action {
        if !core.workloads.contains_key(name) {
            let _ = req.reply.send(Err(ApiError::NoSuchVm(name.clone())));
            return;
        }
        core.stop(name, Some(req.reply), AfterStop::Stay, now);
        return;
    }
    if let Action::Pull(source) = &req.action {
        let (store, source) = (opts.state_dir.clone(), source.clone());
        let pull = pull_options(opts, &source);
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
                            .map_err(|e| steelcup_sys::error_chain(&e))
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
        Action::Run(spec) => {
            run_workload(&core.workloads, &core.units, spec, now).map(|(name, w)| {
                core.add(name.clone(), w);
                Reply::Text(name)
            })
        }
        Action::Socket(name) => match core.workloads.get(&name) {
            None => {
                let removed = opts.removed.lock().unwrap_or_else(|e| e.into_inner());
                match removed.iter().rev().find(|(n, _)| *n == name) {
                    Some((_, outcome)) => Err(ApiError::Refused(format!(
                        "workload {name:?} ended ({}) and was removed",
                        outcome.text
                    ))),
                    None => Err(ApiError::NoSuchVm(name)),
                }
            }
            Some(w) if w.pid.is_none() => Err(ApiError::Refused(format!(
                "workload {name:?} is not running"
            ))),
            Some(_) => Ok(Reply::Text(vsock_path(opts, &name).display().to_string())),
        },
        Action::Remove(name) => match core.workloads.get(&name) {
            None => Err(ApiError::NoSuchVm(name)),
            Some(w) if w.pid.is_some() || w.preparing => Err(ApiError::Refused(format!(
                "workload {name:?} is running; stop it first (or cup rm -f)"
            ))),
            Some(_) => {
                core.forget(&name);
                Ok(Reply::Done)
            }
        },
        Action::Images | Action::RemoveImage(_) | Action::Prune => image_action(opts, req.action),
        Action::Inspect(name) => match core.workloads.get(&name) {
            None => Err(ApiError::NoSuchVm(name)),
            Some(w) => Ok(Reply::Text(inspect(opts, &core.backend, &name, w))),
        },
        Action::Kill(name, signal) => {
            match core.workloads.get(&name) {
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
                                ask_guest(&uds, CONTROL_PORT, &GuestRequest::Kill { signal })
                                    .map(|()| Reply::Done)
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
        Action::Logs { name, since, max } => match core.workloads.get(&name) {
            None => Err(ApiError::NoSuchVm(name)),
            Some(w) => {
                let max = max.min(10_000) as usize;
                let (lines, next) = match since {
                    Some(s) => opts.logs.read(&name, s, max),
                    None => opts.logs.tail(&name, max),
                };
                Ok(Reply::Logs(
                    lines,
                    next,
                    w.pid.is_some() || w.restart_at.is_some() || w.preparing,
                ))
            }
        },
        action => execute_now(core, action),
    };
    let _ = req.reply.send(answer);
}

/// `cup inspect`: what vmmd knows of a workload.
fn inspect(opts: &Options, backend: &WorkerBackend, name: &str, w: &Workload) -> String {
    let v = serde_json::json!({
        "name": name,
        "state": w.state(),
        "health": w.health_name(),
        "last_probe": w.last_probe,
        "pid": w.pid,
        "runs": w.runs,
        "last_outcome": w.last_outcome.text,
        "exit_code": w.last_outcome.code(),
        "from": if w.unit.is_some() { "unit" } else { "cup run" },
        "unit": w.unit,
        "replica": w.unit.as_ref().map(|_| w.slot + 1),
        "remove_when_done": w.remove_when_done,
        "vsock_cid": w.cid,
        "vsock_socket": vsock_path(opts, name),
        "address": backend.address_of(name).map(|a| a.to_string()),
        "network": {
            "mode": w.spec.network,
            "scope": network_scope(name, w),
            "ports": w.spec.ports,
            "tap": backend.taps.get(name),
            "mac": backend.address_of(name).map(|_| steelcup_proto::guest::format_mac(crate::net::mac_for_name(name))),
        },
        "image": w.spec.image,
        "image_digest": w.prepared.as_ref().map(|p| p.digest.clone()),
        "root_image": w.prepared.as_ref().map(|p| p.rootfs.clone()),
        "spec": w.spec,
    });
    serde_json::to_string_pretty(&v).unwrap_or_default()
}

/// A workload for `cup run`: its name and the workload, checked.
fn run_workload(
    workloads: &BTreeMap<String, Workload>,
    units: &BTreeMap<String, MicrovmSection>,
    spec: vmm1::RunSpec,
    now: Instant,
) -> Result<(String, Workload), ApiError> {
    let refused = |s: String| Err(ApiError::Refused(s));
    crate::image::source::Source::parse(&spec.image)
        .map_err(|e| ApiError::Refused(e.to_string()))?;
    let taken = |n: &str| workloads.contains_key(n) || units.contains_key(n);
    let name = match spec.name {
        Some(n) => {
            if !units::valid_name(&n) {
                return refused(format!(
                    "name {n:?}: lowercase letters, digits, '.', '_', '-', at most 64"
                ));
            }
            if taken(&n) {
                return refused(format!(
                    "a workload or unit named {n:?} exists; `cup rm {n}` first or pick another name"
                ));
            }
            n
        }
        None => (1..)
            .map(|i| format!("run-{i}"))
            .find(|n| !taken(n))
            .unwrap_or_default(),
    };
    let memory = match &spec.memory {
        Some(m) => units::MemSize::try_from(m.as_str())
            .map_err(|e| ApiError::Refused(format!("memory {m:?}: {e}")))?,
        None => units::MemSize::default(),
    };
    steelcup_proto::guest::check_rlimits(&spec.rlimits)
        .map_err(|e| ApiError::Refused(format!("--ulimit: {e}")))?;
    let vcpus = spec.vcpus.unwrap_or(1);
    if !(1..=32).contains(&vcpus) {
        return refused(format!("{vcpus} vCPUs: 1 to 32"));
    }
    if memory.mib() < 16 || memory.mib() > 3072 {
        return refused(format!("memory {}MiB: 16 MiB to 3 GiB", memory.mib()));
    }
    let network = match spec.network.as_deref() {
        None | Some("bridge") => Network::Bridge,
        Some("none") => Network::None,
        Some(other) => return refused(format!("--network {other:?}: bridge or none")),
    };
    let ports = spec
        .ports
        .iter()
        .map(|p| steelcup_units::ports::PortSpec::parse(p))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ApiError::Refused(format!("-p {e}")))?;
    let section = MicrovmSection {
        image: Some(spec.image),
        cmd: spec.cmd,
        env: spec.env,
        vcpus,
        memory,
        restart: spec.restart,
        kernel: None,
        initramfs: None,
        root: None,
        volumes: spec
            .volumes
            .iter()
            .map(|v| named_volume(v))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ApiError::Refused(format!("-v {e}")))?,
        network,
        ports,
        network_scope: None,
        memory_backing: Default::default(),
        huge_pages: false,
        rlimits: spec.rlimits,
        replicas: 1,
        health: None,
    };
    section
        .check_network()
        .map_err(|e| ApiError::Refused(e.replace("ports:", "-p:")))?;
    port_clash(workloads, units, &name, &section.ports).map_err(ApiError::Refused)?;
    for p in &section.ports {
        crate::net::host_port_free(p).map_err(ApiError::Refused)?;
    }
    let used: std::collections::BTreeSet<u32> = workloads.values().map(|w| w.cid).collect();
    let cid = (3..).find(|c| !used.contains(c)).unwrap_or(3);
    if spec.rm && spec.restart != Restart::No {
        return refused(
            "--rm and --restart cannot go together (a workload that restarts never ends)".into(),
        );
    }
    let mut w = Workload::new(section, cid, now);
    w.remove_when_done = spec.rm;
    w.attach = spec.attach;
    w.tty = spec.tty;
    Ok((name, w))
}

/// Where `cup run -v NAME:...` volumes live under `volumes/`, shared by
/// every `cup run` that names them (not a unit name: those start with a
/// letter or digit).
pub const NAMED_VOLUMES: &str = "_named";

/// The size of a named volume vmmd creates.
pub const NAMED_VOLUME_SIZE: u64 = 1 << 30;

/// `NAME:/path[:ro|:rw]`: a named volume (created empty, 1 GiB sparse, on
/// first use) mounted at `/path`.
fn named_volume(v: &str) -> Result<steelcup_units::VolumeSpec, String> {
    let mut parts = v.split(':');
    let (Some(name), Some(mount)) = (parts.next(), parts.next()) else {
        return Err(format!("{v:?}: expected NAME:/PATH[:ro]"));
    };
    let read_only = match parts.next() {
        None | Some("rw") => false,
        Some("ro") => true,
        Some(o) => return Err(format!("{v:?}: unknown option {o:?} (ro or rw)")),
    };
    if parts.next().is_some() {
        return Err(format!("{v:?}: expected NAME:/PATH[:ro]"));
    }
    if name.starts_with('/') || name.starts_with('.') {
        return Err(format!(
            "{v:?}: a microVM cannot share a host directory; name a volume instead (like data:/data), vmmd keeps it as a disk"
        ));
    }
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !ok {
        return Err(format!(
            "{v:?}: volume name {name:?} must be 1-64 letters, digits, '-' or '_'"
        ));
    }
    if !mount.starts_with('/') || mount == "/" || mount.split('/').any(|c| c == "..") {
        return Err(format!(
            "{v:?}: {mount:?} must be an absolute path other than /, without '..'"
        ));
    }
    Ok(steelcup_units::VolumeSpec {
        name: name.to_string(),
        size: units::MemSize(NAMED_VOLUME_SIZE),
        mount: mount.into(),
        read_only,
    })
}

/// The image store's actions, answered at once.
fn image_action(opts: &Options, action: Action) -> Result<Reply, ApiError> {
    let store = crate::image::store::Store::open(&opts.state_dir)
        .map_err(|e| ApiError::Refused(e.to_string()))?;
    let err = |e: crate::image::store::StoreError| ApiError::Refused(steelcup_sys::error_chain(&e));
    match action {
        Action::Images => Ok(Reply::Images(
            store
                .list()
                .map_err(err)?
                .into_iter()
                .map(|i| vmm1::ImageInfo {
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
fn execute_now(core: &mut Daemon, action: Action) -> Result<Reply, ApiError> {
    let running = |core: &Daemon, name: &str| match core.workloads.get(name) {
        None => Err(ApiError::NoSuchVm(name.to_string())),
        Some(w) if w.pid.is_none() => Err(ApiError::Refused(format!(
            "workload {name:?} is not running"
        ))),
        Some(_) => Ok(()),
    };
    let pause = matches!(action, Action::Pause(_));
    match action {
        Action::List => Ok(Reply::Vms(
            core.workloads
                .iter()
                .map(|(name, w)| VmInfo {
                    name: name.clone(),
                    state: w.state().as_str().into(),
                    health: w.health_name().into(),
                    unit: w.unit.clone().unwrap_or_default(),
                    last_outcome: w.last_outcome.text.clone(),
                    exit_code: w.last_outcome.exit_code,
                    pid: w.pid.unwrap_or(0) as u32,
                    runs: w.runs as u32,
                    vcpus: u32::from(w.spec.vcpus),
                    memory_mib: w.spec.memory.mib() as u32,
                    address: core
                        .backend
                        .address_of(name)
                        .map(|a| a.to_string())
                        .unwrap_or_default(),
                })
                .collect(),
        )),
        Action::Pause(name) | Action::Resume(name) => {
            running(core, &name)?;
            let (command, done) = if pause {
                (WorkerCommand::Pause {}, "paused")
            } else {
                (WorkerCommand::Resume {}, "resumed")
            };
            core.backend
                .control(&name, &command)
                .map_err(ApiError::Refused)?;
            if let Some(w) = core.workloads.get_mut(&name) {
                w.paused = pause;
            }
            tracing::info!("workload {name}: {done}");
            Ok(Reply::Done)
        }
        Action::Start(name) => {
            let w = core
                .workloads
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

/// Stops every running workload: asks each guest's vminit over vsock, waits
/// up to [`STOP_GRACE`], then kills the workers that are left.
fn stop_all(core: &mut Daemon, rx: &mpsc::Receiver<Event>) {
    let now = Instant::now();
    // Warm VMs run no workload: nothing to ask, they just go.
    for (name, m) in core.backend.pool.drain() {
        tracing::debug!("warm pool: {name} goes");
        kill_worker(m.handle.pid);
    }
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

/// Asks workload `name`'s vminit, over its vsock socket `uds`, to stop,
/// and logs the answer.
fn ask_to_stop(uds: &Path, name: &str) {
    match ask_guest(uds, CONTROL_PORT, &GuestRequest::Stop {}) {
        Ok(()) => tracing::info!("workload {name}: asked to stop; guest: stopping"),
        Err(e) => tracing::warn!("workload {name}: cannot ask the guest to stop: {e}"),
    }
}

/// The host side of workload `name`'s vsock device.
pub fn vsock_path(opts: &Options, name: &str) -> PathBuf {
    opts.run_dir.join("vsock").join(format!("{name}.sock"))
}

/// Sends `request` to a guest's vsock `port` through the VM's Unix socket
/// and reads vminit's answer: Ok when it carried the request out.
pub fn ask_guest(uds: &Path, port: u32, request: &GuestRequest) -> Result<(), String> {
    let conn = steelcup_api::attach::connect(uds, port)?;
    request_on(conn, request, Duration::from_secs(2))
}

/// Sends `request` on a connection to the guest and reads its answer,
/// waiting up to `patience`.
fn request_on(
    mut s: std::os::unix::net::UnixStream,
    request: &GuestRequest,
    patience: Duration,
) -> Result<(), String> {
    s.set_read_timeout(Some(patience))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    s.write_all(request.line().as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut line = String::new();
    BufReader::new(s.take(MAX_ANSWER))
        .read_line(&mut line)
        .map_err(|e| format!("no answer from the guest: {e}"))?;
    if line.is_empty() {
        return Err("the guest closed the connection without an answer".into());
    }
    GuestAnswer::parse(&line)
}

/// The longest answer read from a guest (a failed probe's reason).
const MAX_ANSWER: u64 = 4096;

/// The disk file of volume `volume` of workload `unit`, created empty
/// (sparse) at its size if it does not exist yet. An existing disk is kept
/// as it is: its data outlives any change to the unit.
pub fn ensure_volume(
    state_dir: &Path,
    unit: &str,
    volume: &steelcup_units::VolumeSpec,
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
    drop(f);
    let formatted = format_volume(&tmp).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    std::fs::rename(&tmp, &path).map_err(|e| format!("create {}: {e}", path.display()))?;
    let whose = match unit {
        NAMED_VOLUMES => "cup run".to_string(),
        unit => format!("workload {unit}"),
    };
    tracing::info!(
        "{whose}: created volume {} ({}) at {}{}",
        volume.name,
        volume.size,
        path.display(),
        if formatted { ", ext4" } else { "" }
    );
    Ok(path)
}

/// Where vmmd looks for e2fsprogs' mke2fs (the appliance ships it).
const MKE2FS_PATHS: [&str; 3] = ["/usr/sbin/mke2fs", "/sbin/mke2fs", "/usr/bin/mke2fs"];

/// Formats a new, sparse volume file as ext4 on the host, when mke2fs is
/// there: with nothing to zero on a new file (`assume_storage_prezeroed`:
/// the inode tables are taken as zeroed, so the file stays sparse and
/// neither mke2fs nor the guest kernel writes them), it takes
/// milliseconds, where the guest's busybox mke2fs writes every inode
/// table through the VM's disk. Without mke2fs (false), vminit formats the
/// blank disk on first use.
fn format_volume(file: &Path) -> Result<bool, String> {
    let Some(mke2fs) = MKE2FS_PATHS.iter().map(Path::new).find(|p| p.exists()) else {
        return Ok(false);
    };
    let out = std::process::Command::new(mke2fs)
        .args([
            "-q",
            "-F",
            "-t",
            "ext4",
            "-m",
            "0",
            // No journal, as the guest's own format had none: a VM ends by
            // a reset without unmounting (after a sync), and a journal
            // left open cannot be replayed when the disk is next attached
            // read-only.
            "-O",
            "^has_journal",
            "-E",
            "assume_storage_prezeroed=1,nodiscard",
        ])
        .arg(file)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("run {}: {e}", mke2fs.display()))?;
    if !out.status.success() {
        return Err(format!(
            "format {} as ext4: {}: {}",
            file.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(true)
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
        credentials: opts.registries.credentials_for(image),
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

/// The VM config of workload `name`'s next boot.
fn vm_config(
    opts: &Options,
    name: &str,
    w: &Workload,
    net: Option<(NetConfig, GuestNetwork)>,
) -> Result<VmConfig, String> {
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
            pool: false,
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
    })
}

/// The name a worker's output and end are reported under: a warm-pool
/// VM's (`_pool-N`) until a workload claims it, then the workload's.
type Label = Arc<Mutex<String>>;

fn label_of(l: &Label) -> String {
    l.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// A running worker, as its starter holds it.
#[derive(Debug)]
struct Worker {
    pid: i32,
    control: Option<WorkerControl>,
    label: Label,
    /// Set when a workload takes a warm VM: the time the VM waited in the
    /// pool (ms), which its reported run time leaves out.
    waited_ms: Arc<std::sync::atomic::AtomicU64>,
    started: Instant,
    cgroup: Arc<Mutex<Option<steelcup_vmm::jail::cgroup::VmCgroup>>>,
    /// The VM's tap, when it has a network.
    tap: Option<String>,
}

impl Worker {
    /// From now on the worker's output and end are reported as `name`'s,
    /// its run time less `waited` (the time a warm VM spent in the pool).
    fn report_as(&self, name: &str, waited: Duration) {
        *self.label.lock().unwrap_or_else(|p| p.into_inner()) = name.to_string();
        self.waited_ms.store(
            waited.as_millis() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }
}

/// Starts a worker for `vm` (its cgroup named after `vm.name`); a monitor
/// thread reports its end on `tx` under the worker's label.
fn spawn_worker(opts: &Options, vm: &VmConfig, tx: mpsc::Sender<Event>) -> Result<Worker, String> {
    let name = vm.name.as_str();
    let mut config = serde_json::to_vec(&vm).map_err(|e| e.to_string())?;
    config.push(b'\n');
    let cgroup = opts.cgroup_root.as_ref().and_then(|root| {
        let limits = steelcup_vmm::jail::cgroup::Limits::for_vm(vm.vcpus, vm.memory_mib);
        steelcup_vmm::jail::cgroup::VmCgroup::create(root, name, limits)
            .map_err(|e| tracing::warn!("workload {name}: no cgroup, limits are off: {e}"))
            .ok()
    });
    let mut cmd = Command::new(&opts.worker_exe);
    steelcup_sys::reset_signal_mask(&mut cmd);
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
                steelcup_vmm::jail::cgroup::join_self(fd)?;
            }
            Ok(())
        });
    }
    let handles = open_vm_handles(vm)?;
    let (commands, theirs) =
        UnixStream::pair().map_err(|e| format!("a control socket for the worker: {e}"))?;
    let mut child = cmd
        .args(["worker", name])
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", opts.worker_exe.display()))?;
    let pid = child.id() as i32;
    let started = Instant::now();
    // One line with the VM's descriptors; the worker reads it first thing.
    let fds: Vec<_> = handles.iter().map(std::os::fd::AsFd::as_fd).collect();
    send_with_fds(&commands, &config, &fds)
        .map_err(|e| format!("send config to the worker: {e}"))?;
    drop(handles);
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let messages = commands
        .try_clone()
        .map_err(|e| format!("the worker's control socket: {e}"))?;
    let label: Label = Arc::new(Mutex::new(name.to_string()));
    let cgroup = Arc::new(Mutex::new(cgroup));
    let (answer_tx, answers) = mpsc::channel();
    let logs = opts.logs.clone();
    let (l, cg) = (label.clone(), cgroup.clone());
    let waited_ms: Arc<std::sync::atomic::AtomicU64> = Arc::default();
    let waited = waited_ms.clone();
    std::thread::Builder::new()
        .name(format!("worker-{name}"))
        .spawn(move || {
            let out_thread = stdout.map(|o| {
                let l = l.clone();
                let logs = logs.clone();
                std::thread::spawn(move || echo_guest(&l, o, &logs))
            });
            let err_thread = stderr.map(|e| {
                let l = l.clone();
                std::thread::spawn(move || echo_worker_log(&l, e))
            });
            let report = read_messages(&l, messages, &answer_tx);
            let status = child.wait();
            if let Some(t) = err_thread {
                let _ = t.join();
            }
            let ran = started.elapsed();
            if let Some(c) = cg.lock().unwrap_or_else(|p| p.into_inner()).take() {
                c.remove();
            }
            if let Some(t) = out_thread {
                let _ = t.join();
            }
            let mut report = report.unwrap_or_else(|| WorkerReport {
                outcome: VmOutcome::VmmError {
                    message: worker_death(&status),
                },
                run_ms: ran.as_millis() as u64,
            });
            report.run_ms = report
                .run_ms
                .saturating_sub(waited.load(std::sync::atomic::Ordering::Relaxed));
            let name = label_of(&l);
            let _ = tx.send(Event::Ended { name, report });
        })
        .map_err(|e| format!("spawn monitor thread: {e}"))?;
    Ok(Worker {
        pid,
        control: Some(WorkerControl { commands, answers }),
        label,
        waited_ms,
        started,
        cgroup,
        tap: vm.net.as_ref().map(|n| n.tap.clone()),
    })
}

/// The VM config of a warm-pool VM `name` of size `key`: the default
/// kernel and initramfs, an empty root disk slot, vsock; vminit waits.
fn pool_vm_config(
    opts: &Options,
    name: &str,
    key: crate::pool::Key,
    net: Option<NetConfig>,
) -> VmConfig {
    VmConfig {
        name: name.to_string(),
        kernel: opts.kernel.clone(),
        initramfs: opts.initramfs.clone(),
        cmdline: DEFAULT_CMDLINE.to_string(),
        vcpus: key.0,
        memory_mib: key.1,
        memory_backing: Default::default(),
        huge_pages: false,
        guest: GuestConfig {
            pool: true,
            ..Default::default()
        },
        disks: vec![DiskConfig {
            path: PathBuf::new(),
            read_only: true,
            id: "root".into(),
            empty_slot: true,
        }],
        // The context id is the guest's own (each VM has its own vsock
        // device), so pool VMs need not differ from workloads.
        vsock: Some(VsockConfig {
            cid: 3,
            uds: vsock_path(opts, name),
        }),
        net,
        report_timing: false,
        jail_scratch: opts
            .jail
            .then(|| steelcup_vmm::jail::mount::scratch_dir(&opts.run_dir)),
    }
}

/// The warm-pool size a cold start of `vm` could take instead: a VM with
/// one read-only root disk and nothing a booted pool VM lacks.
fn pool_fit(opts: &Options, vm: &VmConfig, pool_has_net: bool) -> Option<crate::pool::Key> {
    let fits = matches!(vm.disks.as_slice(), [d] if d.read_only && d.id == "root" && !d.empty_slot)
        && vm.guest.root.as_deref() == Some(disk_device(0).as_str())
        && vm.net.is_some() == pool_has_net
        && vm.kernel == opts.kernel
        && vm.initramfs == opts.initramfs
        && vm.cmdline == DEFAULT_CMDLINE
        && vm.memory_backing == Default::default()
        && !vm.huge_pages;
    fits.then_some((vm.vcpus, vm.memory_mib))
}

/// How long a pool VM may take to boot before it is given up.
const POOL_BOOT_LIMIT: Duration = Duration::from_secs(300);

/// Pings pool VM `name`'s vminit until it answers, then reports it ready.
fn spawn_pool_ping(opts: &Options, name: &str, tx: mpsc::Sender<Event>) {
    let (uds, name) = (vsock_path(opts, name), name.to_string());
    let _ = std::thread::Builder::new()
        .name(format!("ping-{name}"))
        .spawn(move || {
            let t0 = Instant::now();
            while t0.elapsed() < POOL_BOOT_LIMIT {
                // Refused until the worker has bound its socket and vminit
                // listens.
                if ask_guest(&uds, POOL_PORT, &GuestRequest::Ping {}).is_ok() {
                    let _ = tx.send(Event::PoolReady { name });
                    return;
                }
                if !uds.exists() && t0.elapsed() > Duration::from_secs(10) {
                    return; // the worker is gone
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = tx.send(Event::PoolStuck { name });
        });
}

/// Hands pool VM `pool_name` (its worker `worker`) to workload `name`: the
/// root image to its empty slot, the config to its vminit, then the VM's
/// vsock socket takes the workload's name and its worker moves to the
/// workload's cgroup.
fn claim(
    opts: &Options,
    pool_name: &str,
    name: &str,
    worker: &mut Worker,
    vm: &VmConfig,
) -> Result<(), String> {
    let root = &vm.disks[0].path;
    let file = std::fs::File::open(root).map_err(|e| format!("{}: {e}", root.display()))?;
    let len = file
        .metadata()
        .map_err(|e| format!("{}: {e}", root.display()))?
        .len();
    let control = worker
        .control
        .as_mut()
        .ok_or("the pool VM has no control channel")?;
    use std::os::fd::AsFd;
    let attach = WorkerCommand::Attach {
        disk: "root".into(),
        bytes: len,
    };
    control
        .ask_with_fd(&attach, file.as_fd())
        .map_err(|e| format!("attach root: {e}"))?;
    let claim = GuestRequest::Claim {
        config: Box::new(vm.guest.clone()),
    };
    // From here the VM's output and end are the workload's.
    worker.report_as(name, worker.started.elapsed());
    let old = vsock_path(opts, pool_name);
    if let Err(e) = ask_guest(&old, POOL_PORT, &claim) {
        worker.report_as(pool_name, Duration::ZERO);
        return Err(format!("vminit: {e}"));
    }
    let new = vsock_path(opts, name);
    let _ = std::fs::remove_file(&new);
    if let Err(e) = std::fs::rename(&old, &new) {
        // The VM runs the workload already: it is the workload's, whatever
        // its socket is called; but nothing reaches it at `new`.
        tracing::warn!("workload {name}: cannot rename {}: {e}", old.display());
    }
    if let Some(c) = worker
        .cgroup
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_mut()
    {
        let limits = steelcup_vmm::jail::cgroup::Limits::for_vm(vm.vcpus, vm.memory_mib);
        if let Err(e) = c.move_to(name, limits, worker.pid as u32) {
            tracing::warn!("workload {name}: its VM stays in the pool's cgroup: {e}");
        }
    }
    Ok(())
}

/// Kills a VM's worker (its monitor thread reports the end); pids of 0 or
/// less are never signalled.
fn kill_worker(pid: i32) {
    if pid > 0 {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
    }
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

/// Passes guest output on as `NAME | line` and into the workload's log,
/// lines capped at [`MAX_LINE`].
fn echo_guest(label: &Label, out: impl Read, logs: &LogStore) {
    let mut r = BufReader::new(out);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut r).take(MAX_LINE).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end_matches(['\n', '\r']);
                let name = label_of(label);
                logs.push(&name, text);
                let mut so = std::io::stdout().lock();
                let _ = writeln!(so, "{name} | {text}");
                let _ = so.flush();
            }
        }
    }
}

/// The worker's own log lines (its stderr), under the workload's name.
fn echo_worker_log(label: &Label, err: impl Read) {
    for line in BufReader::new(err).lines().map_while(Result::ok) {
        eprintln!("{}: {line}", label_of(label));
    }
}

/// Reads the worker's messages on its control socket until it closes:
/// answers go to `answers`, the report is returned.
fn read_messages(
    label: &Label,
    socket: UnixStream,
    answers: &mpsc::Sender<Result<(), String>>,
) -> Option<WorkerReport> {
    let mut report = None;
    // A line is a short JSON object; a worker that sends more is cut off.
    let mut reader = BufReader::new(socket);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut reader).take(MAX_MESSAGE).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) if line.last() != Some(&b'\n') => {
                tracing::error!(
                    "workload {}: a worker message over {MAX_MESSAGE} bytes; its control channel is closed",
                    label_of(label)
                );
                break;
            }
            Ok(_) => {}
        }
        match serde_json::from_slice::<WorkerMessage>(&line) {
            Ok(WorkerMessage::Done) => {
                let _ = answers.send(Ok(()));
            }
            Ok(WorkerMessage::Refused { reason }) => {
                let _ = answers.send(Err(reason));
            }
            Ok(WorkerMessage::Report { report: r }) => report = Some(r),
            Ok(timing) => tracing::debug!("workload {}: {timing:?}", label_of(label)),
            Err(e) => tracing::error!(
                "workload {}: unreadable worker message: {e}",
                label_of(label)
            ),
        }
    }
    report
}

/// The longest message a worker sends (a report with a long VMM error).
const MAX_MESSAGE: u64 = 64 * 1024;

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
            (r#","memory":"8MiB""#, "16 MiB to 3 GiB"),
            (r#","memory":"lots""#, "not a size"),
            (r#","vcpus":0"#, "1 to 32"),
            (r#","rlimits":{"files":1}"#, "unknown limit"),
        ] {
            let e = refused(run(&mut w, &units, &format!("{{{img}{json}}}")));
            assert!(e.contains(why), "{json}: {e}");
        }
        for (json, why) in [
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
            let e = refused(run(&mut w, &units, &format!("{{{img}{json}}}")));
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
