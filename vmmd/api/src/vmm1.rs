//! vmmd's API: an action enum the daemon's loop executes, served on D-Bus
//! as `org.steelcup.Vmm1`, peer to peer on `/run/steelcup/vmmd.sock`. The
//! types and the client proxy live here; the daemon's D-Bus adapter is
//! `vmmd::dbus`.
//!
//! # Design
//! As init's API (`steelcup_init::api`): each D-Bus method decodes into an
//! [`Action`], goes to the daemon's event loop with a one-shot reply
//! channel, and the loop answers a [`Reply`] or an [`ApiError`]; the loop
//! owns all state, so the API never races it. `cup ps`, `cup pause` and
//! `cup unpause` use it.
//!
//! Every change of a workload's state goes out as the signal
//! `WorkloadChanged` to every connected client.

use serde::{Deserialize, Serialize};
use std::path::Path;
use zbus::zvariant::Type;

/// Object path of the interface.
pub const PATH: &str = "/org/steelcup/Vmm1";
/// Interface name.
pub const INTERFACE: &str = "org.steelcup.Vmm1";
/// vmmd's API socket on the appliance.
pub const DEFAULT_SOCKET: &str = "/run/steelcup/vmmd.sock";

/// An image `cup load` put in the store: its names (none when the
/// archive gave it none; then its digest names it) and manifest digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Loaded {
    pub names: Vec<String>,
    pub digest: String,
}

/// An operation on vmmd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    List,
    Pause(String),
    Resume(String),
    /// Ask the guest to stop, kill its worker after the grace period (the
    /// seconds given, else vmmd's 5 s); not restarted. Answered once the VM
    /// has ended.
    Stop(String, Option<u32>),
    /// Start a workload that is not running (resets its restart backoff).
    Start(String),
    /// A new workload from an image (`cup run`); answered with its name.
    Run(Box<RunSpec>),
    /// The Unix socket of a running workload's vsock device (the host
    /// side of `cup run`'s attach and `cup exec`).
    Socket(String),
    /// Forget a workload that is not running (`cup rm`); units come back
    /// with their unit files.
    Remove(String),
    /// Pull an image into the store (answered when it is there).
    Pull(String),
    Images,
    RemoveImage(String),
    /// An image's manifest and config as JSON (`cup image inspect`).
    InspectImage(String),
    /// Another name for an image in the store: source, target.
    TagImage(String, String),
    /// Images as one archive (`cup save`): answered with the path of a
    /// transfer socket that sends it ([`crate::transfer`]).
    Save(Vec<String>),
    /// Images from an archive (`cup load`): answered with the path of a
    /// transfer socket that takes it and answers a JSON list of
    /// [`Loaded`].
    Load,
    /// Garbage-collect the store.
    Prune,
    /// Send a signal (a number) to the workload's processes in the guest.
    Kill(String, i32),
    /// Everything vmmd knows of a workload, as JSON.
    Inspect(String),
    /// Pulls in flight and how far each is.
    Pulls,
    /// The counters of every running VM.
    Stats,
    /// vmmd's own counters.
    Counters,
    /// The scheduled units and their last runs.
    Cron,
    /// A `cup run` workload that is not running gets another name.
    Rename(String, String),
    /// Keep credentials for a registry (`cup login`): registry, user,
    /// password; answered with the registry as kept.
    Login(String, String, String),
    /// Forget them; answered with the registry, or empty if there were none.
    Logout(String),
    Volumes,
    /// A named volume of that many bytes (kept if it exists).
    CreateVolume(String, u64),
    RemoveVolume(String),
    /// Named volumes no workload names; answered with their names.
    PruneVolumes,
    /// A workload's console output: lines from sequence number `since`
    /// (or the last `max` when None), at most `max`.
    Logs {
        name: String,
        since: Option<u64>,
        max: u32,
    },
}

/// How far a pull is: the blob it is on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct PullInfo {
    /// What is being pulled, as asked.
    pub source: String,
    pub digest: String,
    pub done: u64,
    pub total: u64,
}

/// What `cup run` asks for (JSON on the bus; unknown fields are refused).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    /// The image source (see docs/images.md).
    pub image: String,
    /// Replaces the image's `Cmd`.
    #[serde(default)]
    pub cmd: Vec<String>,
    /// Over the image's `Env`.
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// A name for the workload; `run-N` when absent.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub vcpus: Option<u8>,
    /// Like `128MiB` on the wire; checked as it is read.
    #[serde(default)]
    pub memory: Option<steelcup_units::MemSize>,
    /// The workload waits for `cup` to attach to its stdio.
    #[serde(default)]
    pub attach: bool,
    /// With `attach`: a terminal.
    #[serde(default)]
    pub tty: bool,
    /// Forget the workload once it has ended.
    #[serde(default)]
    pub rm: bool,
    /// Resource limits by name (`nofile`, `nproc`, ...).
    #[serde(default)]
    pub rlimits: std::collections::BTreeMap<String, u64>,
    /// Named volumes (kept by vmmd as disks).
    #[serde(default)]
    pub volumes: Vec<NamedVolume>,
    /// `no` (the default), `on-failure` or `always`, with the units'
    /// backoff.
    #[serde(default)]
    pub restart: steelcup_units::Restart,
    /// Published ports, `[HOST_IP:]HOST:GUEST[/tcp|udp]` on the wire.
    #[serde(default)]
    pub ports: Vec<steelcup_units::ports::PortSpec>,
    /// `bridge` (the default) or `none`.
    #[serde(default)]
    pub network: Option<steelcup_units::Network>,
    /// `-l NAME=VALUE`.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// `--entrypoint` (`""`: none); replaces the image's Cmd too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// `-w DIR`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// `-u USER[:GROUP]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// `--hostname`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// `--read-only`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
    /// `--add-host NAME:ADDRESS`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub extra_hosts: std::collections::BTreeMap<String, std::net::IpAddr>,
    /// `--cpus 1.5`: CPU time in CPUs (the VM gets at least that many
    /// vCPUs, rounded up, and a cgroup quota of exactly that).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<steelcup_units::Cpus>,
    /// `--restart on-failure:N`: at most N restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_restarts: Option<u32>,
}

/// A named volume of a `cup run` workload, `NAME:/PATH[:ro]` on the
/// command line and on the wire, checked once where it is read: vmmd keeps
/// it as a disk of its own; a host directory is refused (a microVM shares
/// no host filesystem).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedVolume {
    pub name: String,
    pub mount: std::path::PathBuf,
    pub read_only: bool,
}

/// A `-v` value cup and vmmd refuse: the value, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?}: {why}")]
pub struct VolumeError {
    pub value: String,
    pub why: VolumeProblem,
}

/// What is wrong with a `-v` value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VolumeProblem {
    #[error("expected NAME:/PATH[:ro]")]
    Form,
    #[error("unknown option {0:?} (ro or rw)")]
    Option(String),
    #[error("a microVM cannot share a host directory; name a volume instead (like data:/data), vmmd keeps it as a disk")]
    HostDirectory,
    #[error("volume name {0:?} must be 1-64 letters, digits, '-' or '_'")]
    Name(String),
    #[error("{0:?} must be an absolute path other than /, without '..'")]
    Mount(String),
}

impl TryFrom<&str> for NamedVolume {
    type Error = VolumeError;
    fn try_from(v: &str) -> Result<NamedVolume, VolumeError> {
        let bad = |why| VolumeError {
            value: v.to_string(),
            why,
        };
        let mut parts = v.split(':');
        let (Some(name), Some(mount)) = (parts.next(), parts.next()) else {
            return Err(bad(VolumeProblem::Form));
        };
        let read_only = match parts.next() {
            None | Some("rw") => false,
            Some("ro") => true,
            Some(o) => return Err(bad(VolumeProblem::Option(o.to_string()))),
        };
        if parts.next().is_some() {
            return Err(bad(VolumeProblem::Form));
        }
        if name.starts_with('/') || name.starts_with('.') {
            return Err(bad(VolumeProblem::HostDirectory));
        }
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !ok {
            return Err(bad(VolumeProblem::Name(name.to_string())));
        }
        if !mount.starts_with('/') || mount == "/" || mount.split('/').any(|c| c == "..") {
            return Err(bad(VolumeProblem::Mount(mount.to_string())));
        }
        Ok(NamedVolume {
            name: name.to_string(),
            mount: mount.into(),
            read_only,
        })
    }
}

impl std::fmt::Display for NamedVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.name, self.mount.display())?;
        if self.read_only {
            f.write_str(":ro")?;
        }
        Ok(())
    }
}

impl Serialize for NamedVolume {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for NamedVolume {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        NamedVolume::try_from(s.as_str()).map_err(serde::de::Error::custom)
    }
}

/// An image in the store as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct ImageInfo {
    pub name: String,
    pub digest: String,
    /// Compressed bytes of its layers.
    pub size: u64,
    /// Whether its root image is built.
    pub rootfs: bool,
}

/// A volume as the API shows it (`cup volume ls`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct VolumeInfo {
    /// `NAME` for `cup run -v NAME:...`'s, `UNIT/NAME` for a unit's.
    pub name: String,
    /// Its disk file on the machine.
    pub path: String,
    /// Its size, and the bytes its (sparse) file takes.
    pub size: u64,
    pub allocated: u64,
    /// Workloads (running or not) that name it.
    pub used_by: Vec<String>,
}

/// A workload's state. On the wire it is its name (`running`, ...), so any
/// D-Bus client reads it; vmmd and cup both go through this enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkloadState {
    /// Its image is being pulled or its root image built.
    Preparing,
    /// Between runs, for a restart (or its first start).
    Waiting,
    Running,
    Paused,
    /// Asked to stop, not ended yet.
    Stopping,
    /// Ended, and not to be restarted.
    Ended,
    /// Forgotten by vmmd (`cup rm`, `cup run --rm`); only in signals.
    Removed,
}

impl WorkloadState {
    pub const ALL: [WorkloadState; 7] = [
        WorkloadState::Preparing,
        WorkloadState::Waiting,
        WorkloadState::Running,
        WorkloadState::Paused,
        WorkloadState::Stopping,
        WorkloadState::Ended,
        WorkloadState::Removed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadState::Preparing => "preparing",
            WorkloadState::Waiting => "waiting",
            WorkloadState::Running => "running",
            WorkloadState::Paused => "paused",
            WorkloadState::Stopping => "stopping",
            WorkloadState::Ended => "ended",
            WorkloadState::Removed => "removed",
        }
    }

    /// The state named `s` on the wire.
    pub fn parse(s: &str) -> Option<WorkloadState> {
        Self::ALL.into_iter().find(|w| w.as_str() == s)
    }

    /// A run is over: the workload ended, waits for a restart, or is gone.
    pub fn run_is_over(self) -> bool {
        matches!(
            self,
            WorkloadState::Ended | WorkloadState::Waiting | WorkloadState::Removed
        )
    }

    /// It has a VM (running, paused, on its way out) or is getting one.
    pub fn is_live(self) -> bool {
        matches!(
            self,
            WorkloadState::Running | WorkloadState::Paused | WorkloadState::Preparing
        )
    }
}

impl std::fmt::Display for WorkloadState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a workload's last run ended: the words people read (`cup ps -a`)
/// and the exit code a client exits with, a number that is never parsed
/// back out of the words.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct Outcome {
    /// Empty while no run has ended.
    pub text: String,
    /// The run's exit code as `cup run` gives it (see
    /// `steelcup_proto::worker::VmOutcome::exit_code`); -1 while no run has
    /// ended.
    pub exit_code: i32,
}

impl Outcome {
    /// Not ended yet.
    pub fn none() -> Outcome {
        Outcome {
            text: String::new(),
            exit_code: -1,
        }
    }

    /// How the VM ended, as its worker reported it.
    pub fn of(vm: &steelcup_proto::worker::VmOutcome) -> Outcome {
        Outcome {
            text: vm.to_string(),
            exit_code: i32::from(vm.exit_code()),
        }
    }

    /// vmmd could not run it (its image, its start, its health): 125, as
    /// docker gives when the runtime fails.
    pub fn failed(why: String) -> Outcome {
        Outcome {
            text: why,
            exit_code: 125,
        }
    }

    /// Whether a run has ended.
    pub fn is_some(&self) -> bool {
        self.exit_code >= 0
    }

    /// The exit code, if a run has ended.
    pub fn code(&self) -> Option<u8> {
        u8::try_from(self.exit_code).ok()
    }
}

/// One workload as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct VmInfo {
    pub name: String,
    /// `running`, `paused`, `stopping`, `preparing` (its image), `waiting`
    /// (for a restart) or `ended`.
    pub state: String,
    /// How its last run ended; empty while it has not ended.
    pub last_outcome: String,
    /// Its last run's exit code (see [`Outcome`]); -1 while none ended.
    pub exit_code: i32,
    /// `healthy`, `unhealthy`, `starting`; empty without a health check.
    pub health: String,
    /// Its unit; empty for a `cup run` workload.
    pub unit: String,
    /// Worker process, 0 if none.
    pub pid: u32,
    /// Runs started since vmmd started.
    pub runs: u32,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// The guest's IPv4 address; empty without a network.
    pub address: String,
    /// The image as the unit or `cup run` named it; empty for a unit that
    /// boots a kernel of its own.
    pub image: String,
    pub labels: std::collections::BTreeMap<String, String>,
}

impl VmInfo {
    /// Its state; `None` for a name this build does not know.
    pub fn state(&self) -> Option<WorkloadState> {
        WorkloadState::parse(&self.state)
    }
}

/// The answer to an action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Vms(Vec<VmInfo>),
    Done,
    /// A name or a path.
    Text(String),
    Pulled {
        name: String,
        digest: String,
    },
    Images(Vec<ImageInfo>),
    Pulls(Vec<PullInfo>),
    /// Lines as (sequence number, microseconds since the Unix epoch when
    /// it arrived, text), the cursor to go on from, and whether the
    /// workload still runs.
    Logs(Vec<TimedLine>, u64, bool),
    Stats(Vec<VmStats>),
    Counters(Box<VmmdCounters>),
    Cron(Vec<CronInfo>),
    Volumes(Vec<VolumeInfo>),
}

/// A running VM's counters as the host keeps them (`cup stats`): all
/// totals since its worker started, except memory and tasks (now).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct VmStats {
    pub name: String,
    /// CPU time of its worker (vCPUs and devices), µs.
    pub cpu_usec: u64,
    /// Memory charged to its cgroup (guest memory it touched, the VMM).
    pub memory_bytes: u64,
    /// The cgroup's memory limit.
    pub memory_limit: u64,
    /// Tasks (threads) of its worker.
    pub pids: u64,
    /// Bytes the guest received and sent on its network device.
    pub net_rx: u64,
    pub net_tx: u64,
    /// Bytes its disk files were read and written at the storage layer
    /// (the devices' own counts where the worker answers).
    pub block_read: u64,
    pub block_write: u64,
    /// Read and write requests its disks served.
    pub block_reads: u64,
    pub block_writes: u64,
    /// Its vCPUs' exits to the VMM: port I/O, MMIO, the rest.
    pub exits_io: u64,
    pub exits_mmio: u64,
    pub exits_other: u64,
    /// From its VM's start (a warm VM's claim) to its process running, µs;
    /// 0 while it boots.
    pub boot_usec: u64,
}

/// What vmmd counted since it started (`cup metrics`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct VmmdCounters {
    /// Starts the warm pool served, and starts that fit a pool but found
    /// no VM ready (or one that refused).
    pub pool_hits: u64,
    pub pool_misses: u64,
    /// Pool VMs ready and booting now.
    pub pool_ready: u32,
    pub pool_booting: u32,
    /// Pulls and imports by kind of source (`registry`, `oci-archive`,
    /// `docker-archive`, `layout`): (kind, done, failed, µs spent).
    pub pulls: Vec<(String, u64, u64, u64)>,
    /// Bytes of the image store's blobs and root images on disk.
    pub store_bytes: u64,
    /// How runs ended, by workload: (name, kind, count). Kinds:
    /// `steelcup_proto::worker::VmOutcome::kind`'s, and `vmmd_failed`
    /// (its image, its start or its health failed).
    pub outcomes: Vec<(String, String, u64)>,
    /// Console lines of workloads the log ring let go before anyone read
    /// them, and bytes cut from overlong lines.
    pub log_bytes_dropped: u64,
}

/// A scheduled unit (`schedule = ...`) as vmmd runs it (`cup cron ls`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct CronInfo {
    pub unit: String,
    /// The cron expression, as the unit gives it.
    pub schedule: String,
    /// The IANA time zone it is read in.
    pub time_zone: String,
    /// `allow`, `forbid` or `replace`.
    pub concurrency: String,
    /// When it is due next and when it last was, in seconds since the
    /// Unix epoch; 0 for none.
    pub next_due: i64,
    pub last_due: i64,
    /// Its last due times, oldest first: the runs, and the ones skipped.
    pub runs: Vec<CronRun>,
}

/// One due time of a scheduled unit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct CronRun {
    /// Seconds since the Unix epoch.
    pub due: i64,
    /// The run's workload (its logs: `cup logs WORKLOAD`); empty when
    /// the run was skipped.
    pub workload: String,
    /// The workload's state, `removed` once forgotten, `skipped`.
    pub state: String,
    /// How it ended, and its exit code (-1 while it runs).
    pub outcome: String,
    pub exit_code: i32,
    /// Why it was skipped, caught up, or what it replaced.
    pub note: String,
}

/// A line of a workload's output: (sequence number, microseconds since the
/// Unix epoch when vmmd got it, text).
pub type TimedLine = (u64, u64, String);

/// Why an action was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("no workload named {0:?}")]
    NoSuchVm(String),
    #[error("{0}")]
    Refused(String),
    #[error("vmmd is shutting down")]
    ShuttingDown,
}

// Peer to peer there is no bus to route by name; the destination is
// required by the proxy and ignored by vmmd.
#[zbus::proxy(
    interface = "org.steelcup.Vmm1",
    default_service = "org.steelcup.Vmm1",
    default_path = "/org/steelcup/Vmm1",
    gen_async = false
)]
pub trait Vmm1Client {
    fn list(&self) -> zbus::Result<Vec<VmInfo>>;
    fn pause(&self, name: &str) -> zbus::Result<()>;
    fn resume(&self, name: &str) -> zbus::Result<()>;
    fn stop(&self, name: &str) -> zbus::Result<()>;
    fn stop_within(&self, name: &str, seconds: u32) -> zbus::Result<()>;
    fn start(&self, name: &str) -> zbus::Result<()>;
    fn run(&self, spec: &str) -> zbus::Result<String>;
    fn socket(&self, name: &str) -> zbus::Result<String>;
    fn remove(&self, name: &str) -> zbus::Result<()>;
    fn pull(&self, source: &str) -> zbus::Result<(String, String)>;
    fn images(&self) -> zbus::Result<Vec<ImageInfo>>;
    fn remove_image(&self, name: &str) -> zbus::Result<()>;
    fn inspect_image(&self, name: &str) -> zbus::Result<String>;
    fn tag_image(&self, source: &str, target: &str) -> zbus::Result<String>;
    fn save(&self, names: &[&str]) -> zbus::Result<String>;
    fn load(&self) -> zbus::Result<String>;
    fn prune(&self) -> zbus::Result<String>;
    fn pulls(&self) -> zbus::Result<Vec<PullInfo>>;
    fn stats(&self) -> zbus::Result<Vec<VmStats>>;
    fn counters(&self) -> zbus::Result<VmmdCounters>;
    fn cron(&self) -> zbus::Result<Vec<CronInfo>>;
    fn volumes(&self) -> zbus::Result<Vec<VolumeInfo>>;
    fn rename(&self, name: &str, to: &str) -> zbus::Result<()>;
    fn login(&self, registry: &str, user: &str, password: &str) -> zbus::Result<String>;
    fn logout(&self, registry: &str) -> zbus::Result<String>;
    fn create_volume(&self, name: &str, size: u64) -> zbus::Result<String>;
    fn remove_volume(&self, name: &str) -> zbus::Result<()>;
    fn prune_volumes(&self) -> zbus::Result<String>;
    fn kill(&self, name: &str, signal: i32) -> zbus::Result<()>;
    fn inspect(&self, name: &str) -> zbus::Result<String>;
    fn tail(&self, name: &str, lines: u32) -> zbus::Result<(Vec<(u64, String)>, u64, bool)>;
    #[zbus(signal)]
    fn workload_changed(
        &self,
        name: &str,
        state: &str,
        health: &str,
        last_outcome: &str,
        exit_code: i32,
    ) -> zbus::Result<()>;
    fn logs(
        &self,
        name: &str,
        since: u64,
        max: u32,
    ) -> zbus::Result<(Vec<(u64, String)>, u64, bool)>;
    fn tail_timed(&self, name: &str, lines: u32) -> zbus::Result<(Vec<TimedLine>, u64, bool)>;
    fn logs_timed(
        &self,
        name: &str,
        since: u64,
        max: u32,
    ) -> zbus::Result<(Vec<TimedLine>, u64, bool)>;
}

/// Connects to vmmd at `socket` (with `cup --remote`, to the remote
/// machine's vmmd).
pub fn connect(socket: &Path) -> Result<Vmm1ClientProxy<'static>, crate::ClientError> {
    let conn = match crate::remote_stream("vmmd") {
        Some(remote) => {
            let (stream, addr) = remote?;
            crate::bus::p2p_over(stream, &addr)?
        }
        None => crate::bus::connect_p2p(
            "vmmd",
            socket,
            "is the vmmd unit running? `cup unit status vmmd`",
        )?,
    };
    Vmm1ClientProxy::builder(&conn)
        .build()
        .map_err(|source| crate::ClientError::Proxy {
            what: "vmmd",
            source: Box::new(source),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use steelcup_proto::worker::VmOutcome;

    #[test]
    fn a_run_spec_is_checked_as_it_is_read() {
        let ok = r#"{"image":"busybox","memory":"256MiB","volumes":["data:/data:ro"],"ports":["8080:80"],"network":"none"}"#;
        let spec: RunSpec = serde_json::from_str(ok).unwrap();
        assert_eq!(spec.memory.map(|m| m.mib()), Some(256));
        assert_eq!(spec.volumes[0].to_string(), "data:/data:ro");
        assert_eq!(spec.network, Some(steelcup_units::Network::None));
        let back: RunSpec = serde_json::from_str(&serde_json::to_string(&spec).unwrap()).unwrap();
        assert_eq!(back, spec);
        for bad in [
            r#"{"image":"x","memory":"lots"}"#,
            r#"{"image":"x","volumes":["/etc:/etc"]}"#,
            r#"{"image":"x","volumes":["data:relative"]}"#,
            r#"{"image":"x","ports":["99999:80"]}"#,
            r#"{"image":"x","network":"host"}"#,
        ] {
            assert!(serde_json::from_str::<RunSpec>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn named_volumes_refuse_host_paths_and_escapes() {
        for bad in [
            "/srv:/data",
            "./x:/data",
            "data",
            "data:/",
            "data:/a/../b",
            "data:/d:rx",
            "a b:/d",
        ] {
            assert!(NamedVolume::try_from(bad).is_err(), "{bad}");
        }
        let v = NamedVolume::try_from("cache-1:/var/cache").unwrap();
        assert_eq!((v.name.as_str(), v.read_only), ("cache-1", false));
    }

    #[test]
    fn every_state_reads_back_from_its_name() {
        for s in WorkloadState::ALL {
            assert_eq!(WorkloadState::parse(s.as_str()), Some(s));
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
        assert_eq!(WorkloadState::parse("exploded"), None);
    }

    #[test]
    fn an_outcome_carries_its_code_beside_its_words() {
        let o = Outcome::of(&VmOutcome::Killed { signal: 9 });
        assert_eq!(
            (o.text.as_str(), o.code()),
            ("killed by signal 9", Some(137))
        );
        assert_eq!(
            Outcome::failed("image failed: 404".into()).code(),
            Some(125)
        );
        assert!(!Outcome::none().is_some());
        assert_eq!(Outcome::none().code(), None);
    }
}

#[cfg(test)]
mod signatures {
    use super::*;
    use zbus::zvariant::Type;

    /// docs/api.md spells the D-Bus signatures out.
    #[test]
    fn stats_and_counters_have_the_documented_signatures() {
        assert_eq!(VmStats::SIGNATURE.to_string(), "(stttttttttttttt)");
        assert_eq!(VmmdCounters::SIGNATURE.to_string(), "(ttuua(sttt)ta(sst)t)");
        assert_eq!(CronInfo::SIGNATURE.to_string(), "(ssssxxa(xsssis))");
    }
}
