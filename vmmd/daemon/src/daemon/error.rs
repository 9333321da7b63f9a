//! What can go wrong when vmmd starts a workload's VM, hands it a warm
//! one, steers its worker or asks its guest: typed, so the reconciler, the
//! API and the logs each say what failed and where.

use std::path::PathBuf;

/// Why a workload's VM could not be started or steered.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A file of the VM (a disk, a volume, the root image) could not be
    /// made or opened.
    #[error("{what} {}: {source}", path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// A disk the worker gets could not be opened.
    #[error("disk {id}: {}", steelcup_sys::error_chain(source))]
    Disk {
        id: String,
        source: steelcup_vmm::devices::virtio::block::BlockError,
    },
    #[error("{count} disks and a tap are more than a worker takes ({max})")]
    TooManyHandles { count: usize, max: usize },
    #[error("the workload network is not available: {0}")]
    NoNetwork(#[from] NoNetwork),
    #[error("workload network: {}", steelcup_sys::error_chain(.0))]
    Net(#[from] crate::net::NetError),
    /// A program (the worker, mke2fs) could not be run.
    #[error("run {}: {source}", program.display())]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
    #[error("format {} as ext4: {status}: {said}", file.display())]
    Format {
        file: PathBuf,
        status: std::process::ExitStatus,
        said: String,
    },
    /// Something of vmmd's own (a socket pair, a thread) failed.
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    /// The VM's config has what JSON cannot carry (a path that is not
    /// UTF-8).
    #[error("the VM's config: {0}")]
    Encode(serde_json::Error),
    #[error("the worker refused {command}: {reason}")]
    Refused { command: String, reason: String },
    #[error("the worker did not answer {command} within {secs}s")]
    NoAnswer { command: String, secs: u64 },
    #[error("workload {0:?} is not running")]
    NotRunning(String),
    #[error("the pool VM has no control channel")]
    NoControl,
    #[error("vminit: {}", steelcup_sys::error_chain(.0))]
    Guest(#[from] GuestError),
    #[error(transparent)]
    NothingToRun(#[from] crate::image::workload::NothingToRun),
}

impl VmError {
    /// An I/O error on `path` while doing `what` ("create", "open", ...).
    pub(super) fn file(
        what: &'static str,
        path: &std::path::Path,
    ) -> impl FnOnce(std::io::Error) -> VmError {
        let path = path.to_path_buf();
        move |source| VmError::File { what, path, source }
    }

    /// An I/O error of vmmd's own while doing `what`.
    pub(super) fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> VmError {
        move |source| VmError::Io { what, source }
    }
}

/// Why vmmd has no workload network.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NoNetwork {
    #[error("vmmd runs with --network none")]
    TurnedOff,
    /// Its setup failed when vmmd started (the whole chain, as logged
    /// then).
    #[error("{0}")]
    SetupFailed(String),
}

/// Why a request to a guest's vminit (stop, claim, a probe, a command
/// run as a probe) did not get the answer asked for.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("{}", steelcup_sys::error_chain(.0))]
    Connect(#[from] steelcup_api::ClientError),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("the guest closed the connection without an answer")]
    Closed,
    /// vminit answered, and not with done.
    #[error(transparent)]
    Answer(#[from] steelcup_proto::control::AnswerError),
    #[error("a bad exit status from the guest: {0}")]
    BadStatus(serde_json::Error),
    #[error("{argv:?} exited with {code}")]
    Exited { argv: Vec<String>, code: i32 },
    #[error("{argv:?} took more than {secs}s")]
    TimedOut { argv: Vec<String>, secs: u64 },
}

impl GuestError {
    pub(super) fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> GuestError {
        move |source| GuestError::Io { what, source }
    }
}

/// Why a workload may not publish its ports.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error("port {port}/{protocol} is already published by {who} ({theirs})")]
    Clash {
        port: u16,
        protocol: &'static str,
        /// `unit NAME` or `workload NAME`.
        who: String,
        theirs: steelcup_units::ports::PortSpec,
    },
    /// A program on the host holds it.
    #[error("{}", steelcup_sys::error_chain(.0))]
    Host(#[from] crate::net::NetError),
}

/// Why vmmd could not start serving.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{}", steelcup_sys::error_chain(.0))]
    Sys(#[from] steelcup_sys::SysError),
    /// Every sender of the main loop's events is gone.
    #[error("the event channel closed")]
    EventsClosed,
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("create {}: {source}", path.display())]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("serve the API on {}: {source}", socket.display())]
    Api {
        socket: PathBuf,
        source: std::io::Error,
    },
}

impl DaemonError {
    pub(super) fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> DaemonError {
        move |source| DaemonError::Io { what, source }
    }
}
