//! init's API: an action enum the supervisor executes, and its D-Bus adapter.
//!
//! # Design
//! Every operation is an [`Action`]; the supervisor's loop executes it and
//! answers a [`Reply`] or an [`ApiError`]. [`dbus`] only decodes D-Bus calls
//! on `org.steelcup.Init1` into actions and forwards them, so tests drive the
//! actions without a bus. Log reads go straight to the log store, which is
//! shared and locked, so a slow reader never holds up the supervisor.
//!
//! The OS slots' methods (`Update`, `Rollback`, `UpdateStatus`) are disk
//! work, not supervision: the adapter runs them in [`crate::update`] on a
//! thread of their own and then, if asked, sends [`Action::Reboot`].
//!
//! Which states accept which action: `Start` — any state but a running or
//! starting one (resets the start limit); `Stop` — running or starting
//! units (others answer `Ok`, already stopped); `Restart` — any service;
//! `Reload`, `PowerOff`, `Reboot` — always.

pub mod client;
pub mod dbus;

use serde::{Deserialize, Serialize};
use zbus::zvariant::Type;

/// Object path of the interface.
pub const PATH: &str = "/org/steelcup/Init1";
/// Interface name.
pub const INTERFACE: &str = "org.steelcup.Init1";
/// The socket name under the run directory.
pub const SOCKET: &str = "init.sock";

/// An operation on init.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    ListUnits,
    Status(String),
    Start(String),
    Stop(String),
    Restart(String),
    Reload,
    PowerOff,
    Reboot,
}

/// One unit as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct UnitInfo {
    pub name: String,
    /// `service` or `microvm`.
    pub kind: String,
    /// `waiting`, `starting`, `running`, `exited`, `failed`, `stopping`,
    /// `stopped`, or `vmmd` for microvm units (vmmd runs them).
    pub state: String,
    /// Why a unit failed; empty otherwise.
    pub reason: String,
    /// Main process, 0 if none.
    pub pid: u32,
    /// Restarts since boot (automatic and requested).
    pub restarts: u32,
    /// Last exit code (128+N for a signal), -1 if it never exited.
    pub last_exit: i32,
    pub description: String,
}

/// What a reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct ReloadSummary {
    pub started: Vec<String>,
    pub stopped: Vec<String>,
    pub restarted: Vec<String>,
    /// Unit files that could not be read, with the error.
    pub errors: Vec<String>,
}

/// The answer to an action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Units(Vec<UnitInfo>),
    Unit(UnitInfo),
    Reloaded(ReloadSummary),
    Done,
}

/// Why an action was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("no unit named {0:?}")]
    NoSuchUnit(String),
    #[error("unit {0:?} is a microvm unit; vmmd runs it")]
    NotAService(String),
    #[error("{0}")]
    Refused(String),
    #[error("init is shutting down")]
    ShuttingDown,
}

/// A request from the API to the supervisor, with where to send the answer.
#[derive(Debug)]
pub struct Request {
    pub action: Action,
    pub reply: futures_channel::oneshot::Sender<Result<Reply, ApiError>>,
}
