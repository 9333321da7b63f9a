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
//! # Limitations
//! The first methods of the interface: list, pause, resume, stop, start.
//! Run, logs, images and the state-change signal come with the daemon's
//! full API.

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
}

/// One workload as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct VmInfo {
    pub name: String,
    /// `running`, `paused`, `waiting` (for a restart) or `ended`.
    pub state: String,
    /// How its last run ended; empty while it has not ended.
    pub last_outcome: String,
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
}

/// Serves the API on `socket` (mode 0600), forwarding to `requests`.
pub fn serve(socket: &Path, requests: mpsc::Sender<Request>) -> std::io::Result<()> {
    use steelcup_init::api::dbus::{accept_p2p, bind_private};
    let listener = bind_private(socket)?;
    // The connections live in the accept thread's list; nothing signals them yet.
    let _conns = accept_p2p(listener, PATH, move || Vmm1 {
        requests: requests.clone(),
    })?;
    tracing::info!("API {INTERFACE} on {}", socket.display());
    Ok(())
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
}

/// Connects to vmmd at `socket`.
pub fn connect(socket: &Path) -> Result<Vmm1ClientProxy<'static>, String> {
    let conn = steelcup_init::api::client::connect_p2p(
        "vmmd",
        socket,
        "is the vmmd unit running? `cup unit status vmmd`",
    )?;
    Vmm1ClientProxy::builder(&conn)
        .build()
        .map_err(|e| format!("vmmd API: {e}"))
}
