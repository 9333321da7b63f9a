//! init's API: an action enum the supervisor executes, and its D-Bus adapter.
//!
//! # Design
//! Every operation is an [`Action`]; the supervisor's loop executes it and
//! answers a [`Reply`] or an [`ApiError`]. [`dbus`] only decodes D-Bus calls
//! on `org.steelcup.Init1` into actions and forwards them, so tests drive the
//! actions without a bus. Log reads go straight to the log store, which is
//! shared and locked, so a slow reader never holds up the supervisor.
//!
//! The OS slots' actions (`Update`, `Rollback`, `UpdateStatus`) are disk
//! work, not supervision: [`slots::execute`] runs them (in
//! `steelcup_os::update`) on a thread of their own, and a reboot asked with
//! them goes to the supervisor as [`Action::Reboot`].
//!
//! Which states accept which action: `Start` — any state but a running or
//! starting one (resets the start limit); `Stop` — running or starting
//! units (others answer `Ok`, already stopped); `Restart` — any service;
//! `Reload`, `PowerOff`, `Reboot` — always.

pub mod dbus;
pub mod slots;

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
    /// Install unit files (`NAME.toml`, text) after checking them against
    /// the whole set, then reload; with `dry_run`, only say what would
    /// change.
    Apply {
        files: Vec<(String, String)>,
        dry_run: bool,
    },
    /// Remove an applied unit's file, then reload.
    RemoveUnit(String),
    /// A unit's file and drop-ins as text.
    CatUnit(String),
    /// Check a machine config whole and (unless `dry_run`) apply it live.
    MachineApply {
        text: String,
        dry_run: bool,
    },
    /// The applied machine config, secrets left out.
    MachineShow,
    /// Wipe the state partition at the next boot (then the API reboots).
    MachineReset,
    PowerOff,
    Reboot,
    /// Write the update at `source` (a file or block device on this host)
    /// into the OS slot that is not running and make it boot next, once.
    Update {
        source: std::path::PathBuf,
    },
    /// Make the other OS slot boot next, once.
    Rollback,
    /// The OS slots as they are.
    UpdateStatus,
    /// Each running service's CPU time and memory (`cup top`).
    Usage,
}

impl Action {
    /// Disk work on the OS slots: executed by [`slots::execute`] on a
    /// thread of its own, never on the supervisor's loop.
    pub fn is_slot_work(&self) -> bool {
        matches!(
            self,
            Action::Update { .. } | Action::Rollback | Action::UpdateStatus
        )
    }
}

/// The answer to an action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Units(Vec<UnitInfo>),
    Unit(UnitInfo),
    Reloaded(ReloadSummary),
    /// An update or rollback made `slot`, holding `version`, boot next.
    Installed {
        slot: String,
        version: String,
    },
    SlotStatus(steelcup_os::update::Status),
    Text(String),
    MachineChanged(crate::supervisor::machine::MachineChange),
    /// (unit, CPU time µs, memory bytes) of each running service.
    Usage(Vec<(String, u64, u64)>),
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
    /// An update, rollback or slot status refused.
    #[error(transparent)]
    Update(#[from] steelcup_os::update::UpdateError),
}

/// A request from the API to the supervisor, with where to send the answer.
#[derive(Debug)]
pub struct Request {
    pub action: Action,
    pub reply: futures_channel::oneshot::Sender<Result<Reply, ApiError>>,
}
