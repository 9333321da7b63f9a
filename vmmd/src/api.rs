//! vmmd's API: an action enum the daemon's loop executes, served on D-Bus
//! as `org.steelcup.Vmm1`, peer to peer on `/run/steelcup/vmmd.sock`.
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
use std::sync::mpsc;
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

/// A request from the API to the daemon's loop.
#[derive(Debug)]
pub struct Request {
    pub action: Action,
    pub reply: futures_channel::oneshot::Sender<Result<Reply, ApiError>>,
}

/// D-Bus errors: `org.steelcup.Vmm1.Error.NoSuchVm`, ...
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.steelcup.Vmm1.Error")]
pub enum Vmm1Error {
    #[zbus(error)]
    ZBus(zbus::Error),
    NoSuchVm(String),
    Refused(String),
    ShuttingDown(String),
    Internal(String),
}

impl From<ApiError> for Vmm1Error {
    fn from(e: ApiError) -> Self {
        let msg = e.to_string();
        match e {
            ApiError::NoSuchVm(_) => Vmm1Error::NoSuchVm(msg),
            ApiError::Refused(_) => Vmm1Error::Refused(msg),
            ApiError::ShuttingDown => Vmm1Error::ShuttingDown(msg),
        }
    }
}

/// The interface object served on every connection.
#[derive(Debug, Clone)]
struct Vmm1 {
    requests: mpsc::Sender<Request>,
}

impl Vmm1 {
    async fn call(&self, action: Action) -> Result<Reply, Vmm1Error> {
        let (reply, answer) = futures_channel::oneshot::channel();
        self.requests
            .send(Request { action, reply })
            .map_err(|_| Vmm1Error::from(ApiError::ShuttingDown))?;
        match answer.await {
            Ok(r) => r.map_err(Vmm1Error::from),
            Err(_) => Err(ApiError::ShuttingDown.into()),
        }
    }
}

#[zbus::interface(name = "org.steelcup.Vmm1")]
impl Vmm1 {
    /// Every workload: (name, state, last outcome, pid, runs, vcpus, memory
    /// MiB, address).
    async fn list(&self) -> Result<Vec<VmInfo>, Vmm1Error> {
        match self.call(Action::List).await? {
            Reply::Vms(v) => Ok(v),
            r => Err(Vmm1Error::Internal(format!("unexpected reply {r:?}"))),
        }
    }

    /// Stops the workload's vCPUs; its memory and devices stay.
    async fn pause(&self, name: String) -> Result<(), Vmm1Error> {
        self.call(Action::Pause(name)).await.map(|_| ())
    }

    /// Lets a paused workload's vCPUs run again.
    async fn resume(&self, name: String) -> Result<(), Vmm1Error> {
        self.call(Action::Resume(name)).await.map(|_| ())
    }

    /// Asks the guest to stop (then kills it after 5 s); answers once the
    /// VM has ended. It is not restarted.
    async fn stop(&self, name: String) -> Result<(), Vmm1Error> {
        self.call(Action::Stop(name)).await.map(|_| ())
    }

    /// Starts a workload that is not running.
    async fn start(&self, name: String) -> Result<(), Vmm1Error> {
        self.call(Action::Start(name)).await.map(|_| ())
    }

    /// Runs an image as a new workload; `spec` is a JSON [`RunSpec`].
    /// Answers the workload's name at once (the image is pulled and the VM
    /// booted after).
    async fn run(&self, spec: String) -> Result<String, Vmm1Error> {
        let spec: RunSpec = serde_json::from_str(&spec)
            .map_err(|e| Vmm1Error::from(ApiError::Refused(format!("run spec: {e}"))))?;
        self.text(Action::Run(spec)).await
    }

    /// The Unix socket of a workload's vsock device (`CONNECT PORT`).
    async fn socket(&self, name: String) -> Result<String, Vmm1Error> {
        self.text(Action::Socket(name)).await
    }

    /// Forgets a workload that is not running.
    async fn remove(&self, name: String) -> Result<(), Vmm1Error> {
        self.call(Action::Remove(name)).await.map(|_| ())
    }

    /// Pulls an image into the store; answers its name and manifest digest.
    async fn pull(&self, source: String) -> Result<(String, String), Vmm1Error> {
        match self.call(Action::Pull(source)).await? {
            Reply::Pulled { name, digest } => Ok((name, digest)),
            r => Err(Vmm1Error::Internal(format!("unexpected reply {r:?}"))),
        }
    }

    /// The images in the store: (name, digest, size, root image built).
    async fn images(&self) -> Result<Vec<ImageInfo>, Vmm1Error> {
        match self.call(Action::Images).await? {
            Reply::Images(v) => Ok(v),
            r => Err(Vmm1Error::Internal(format!("unexpected reply {r:?}"))),
        }
    }

    /// Forgets an image's name (its blobs go with the next prune).
    async fn remove_image(&self, name: String) -> Result<(), Vmm1Error> {
        self.call(Action::RemoveImage(name)).await.map(|_| ())
    }

    /// Pulls in flight (by `Pull` or for a unit): (source, blob digest,
    /// bytes done, bytes in the blob). `cup pull` draws its progress bar
    /// from this.
    async fn pulls(&self) -> Result<Vec<PullInfo>, Vmm1Error> {
        match self.call(Action::Pulls).await? {
            Reply::Pulls(v) => Ok(v),
            r => Err(Vmm1Error::Internal(format!("unexpected reply {r:?}"))),
        }
    }

    /// Sends signal `signal` (a number, like 9) to the workload's process
    /// group inside its VM; answers once the guest has it.
    async fn kill(&self, name: String, signal: i32) -> Result<(), Vmm1Error> {
        self.call(Action::Kill(name, signal)).await.map(|_| ())
    }

    /// A workload as JSON: its spec, image, state, pid, runs, address,
    /// last outcome and vsock socket.
    async fn inspect(&self, name: String) -> Result<String, Vmm1Error> {
        self.text(Action::Inspect(name)).await
    }

    /// The last `lines` lines of a workload's console output: (lines as
    /// (sequence number, text), cursor after them, still running).
    async fn tail(
        &self,
        name: String,
        lines: u32,
    ) -> Result<(Vec<(u64, String)>, u64, bool), Vmm1Error> {
        self.logs_of(name, None, lines).await
    }

    /// A workload's console output from sequence number `since`, at most
    /// `max` lines: (lines, cursor to go on from, still running).
    async fn logs(
        &self,
        name: String,
        since: u64,
        max: u32,
    ) -> Result<(Vec<(u64, String)>, u64, bool), Vmm1Error> {
        self.logs_of(name, Some(since), max).await
    }

    /// Emitted on every change of a workload's state, health or last
    /// outcome; state `removed` when vmmd forgets it.
    #[zbus(signal)]
    async fn workload_changed(
        emitter: &zbus::object_server::SignalEmitter<'_>,
        name: &str,
        state: &str,
        health: &str,
        last_outcome: &str,
    ) -> zbus::Result<()>;

    /// Removes what no image name reaches; answers what went.
    async fn prune(&self) -> Result<String, Vmm1Error> {
        self.text(Action::Prune).await
    }
}

impl Vmm1 {
    async fn logs_of(
        &self,
        name: String,
        since: Option<u64>,
        max: u32,
    ) -> Result<(Vec<(u64, String)>, u64, bool), Vmm1Error> {
        match self.call(Action::Logs { name, since, max }).await? {
            Reply::Logs(lines, next, running) => Ok((lines, next, running)),
            r => Err(Vmm1Error::Internal(format!("unexpected reply {r:?}"))),
        }
    }

    async fn text(&self, action: Action) -> Result<String, Vmm1Error> {
        match self.call(action).await? {
            Reply::Text(t) => Ok(t),
            r => Err(Vmm1Error::Internal(format!("unexpected reply {r:?}"))),
        }
    }
}

/// A workload's state as `WorkloadChanged` tells it: name, state,
/// health, last outcome.
pub type Change = (String, String, String, String);

/// Serves the API on `socket` (mode 0600), forwarding to `requests`;
/// what is sent on the returned channel goes out as `WorkloadChanged` to
/// every client.
pub fn serve(
    socket: &Path,
    requests: mpsc::Sender<Request>,
) -> std::io::Result<mpsc::Sender<Change>> {
    use steelcup_init::api::dbus::{accept_p2p, bind_private};
    use zbus::object_server::SignalEmitter;
    let listener = bind_private(socket)?;
    let conns = accept_p2p(listener, PATH, move || Vmm1 {
        requests: requests.clone(),
    })?;
    let (tx, rx) = mpsc::channel::<Change>();
    std::thread::Builder::new()
        .name("api-signals".into())
        .spawn(move || {
            for (name, state, health, outcome) in rx {
                let mut list = conns.lock().unwrap_or_else(|p| p.into_inner());
                list.retain(|c| {
                    let Ok(emitter) = SignalEmitter::new(c.inner(), PATH) else {
                        return false;
                    };
                    zbus::block_on(Vmm1::workload_changed(
                        &emitter, &name, &state, &health, &outcome,
                    ))
                    .is_ok()
                });
            }
        })?;
    tracing::info!("API {INTERFACE} on {}", socket.display());
    Ok(tx)
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
    let conn = match crate::remote::REMOTE.get() {
        Some(r) => steelcup_init::api::client::p2p_over(r.open("vmmd")?, &r.addr)?,
        None => steelcup_init::api::client::connect_p2p(
            "vmmd",
            socket,
            "is the vmmd unit running? `cup unit status vmmd`",
        )?,
    };
    Vmm1ClientProxy::builder(&conn)
        .build()
        .map_err(|e| format!("vmmd API: {e}"))
}
