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

/// An operation on vmmd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    List,
    Pause(String),
    Resume(String),
    /// Ask the guest to stop, kill its worker after the grace period; not
    /// restarted. Answered once the VM has ended.
    Stop(String),
    /// Start a workload that is not running (resets its restart backoff).
    Start(String),
    /// A new workload from an image (`cup run`); answered with its name.
    Run(RunSpec),
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
    /// Garbage-collect the store.
    Prune,
    /// Send a signal (a number) to the workload's processes in the guest.
    Kill(String, i32),
    /// Everything vmmd knows of a workload, as JSON.
    Inspect(String),
    /// Pulls in flight and how far each is.
    Pulls,
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
    /// Like `128MiB`.
    #[serde(default)]
    pub memory: Option<String>,
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
    /// Named volumes, `NAME:/PATH[:ro]` (kept by vmmd as disks).
    #[serde(default)]
    pub volumes: Vec<String>,
    /// `no` (the default), `on-failure` or `always`, with the units'
    /// backoff.
    #[serde(default)]
    pub restart: steelcup_units::Restart,
    /// Published ports, `[HOST_IP:]HOST:GUEST[/tcp|udp]`.
    #[serde(default)]
    pub ports: Vec<String>,
    /// `bridge` (the default) or `none`.
    #[serde(default)]
    pub network: Option<String>,
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

/// One workload as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct VmInfo {
    pub name: String,
    /// `running`, `paused`, `stopping`, `preparing` (its image), `waiting`
    /// (for a restart) or `ended`.
    pub state: String,
    /// How its last run ended; empty while it has not ended.
    pub last_outcome: String,
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
    /// Lines with their sequence numbers, the cursor to go on from, and
    /// whether the workload still runs.
    Logs(Vec<(u64, String)>, u64, bool),
}

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
    fn start(&self, name: &str) -> zbus::Result<()>;
    fn run(&self, spec: &str) -> zbus::Result<String>;
    fn socket(&self, name: &str) -> zbus::Result<String>;
    fn remove(&self, name: &str) -> zbus::Result<()>;
    fn pull(&self, source: &str) -> zbus::Result<(String, String)>;
    fn images(&self) -> zbus::Result<Vec<ImageInfo>>;
    fn remove_image(&self, name: &str) -> zbus::Result<()>;
    fn prune(&self) -> zbus::Result<String>;
    fn pulls(&self) -> zbus::Result<Vec<PullInfo>>;
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
    ) -> zbus::Result<()>;
    fn logs(
        &self,
        name: &str,
        since: u64,
        max: u32,
    ) -> zbus::Result<(Vec<(u64, String)>, u64, bool)>;
}

/// Connects to vmmd at `socket` (with `cup --remote`, to the remote
/// machine's vmmd).
pub fn connect(socket: &Path) -> Result<Vmm1ClientProxy<'static>, String> {
    #[cfg(feature = "remote")]
    let remote = crate::remote::REMOTE.get();
    #[cfg(not(feature = "remote"))]
    let remote: Option<&std::convert::Infallible> = None;
    let conn = match remote {
        #[cfg(feature = "remote")]
        Some(r) => crate::bus::p2p_over(r.open("vmmd")?, &r.addr)?,
        #[cfg(not(feature = "remote"))]
        Some(never) => match *never {},
        None => crate::bus::connect_p2p(
            "vmmd",
            socket,
            "is the vmmd unit running? `cup unit status vmmd`",
        )?,
    };
    Vmm1ClientProxy::builder(&conn)
        .build()
        .map_err(|e| format!("vmmd API: {e}"))
}
