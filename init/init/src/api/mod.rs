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

pub mod dbus;

pub use steelcup_api::init1::{ReloadSummary, UnitInfo, INTERFACE, PATH, SOCKET};

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
