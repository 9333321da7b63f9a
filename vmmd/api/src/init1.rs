//! init's API, `org.steelcup.Init1`: the types it carries and a blocking
//! client, for `cup` and tests. init's side (the action enum its
//! supervisor executes and the D-Bus adapter) is `steelcup_init::api`.

use crate::bus::{connect_p2p, p2p_over};
use crate::ClientError;
use serde::{Deserialize, Serialize};
use std::os::unix::net::UnixStream;
use std::path::Path;
use zbus::zvariant::Type;

/// Object path of the interface.
pub const PATH: &str = "/org/steelcup/Init1";
/// Interface name.
pub const INTERFACE: &str = "org.steelcup.Init1";
/// The socket name under the run directory.
pub const SOCKET: &str = "init.sock";

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
    /// How long its last start took: to `READY=1` with `ready = "notify"`,
    /// else to its process running; µs, 0 before it started.
    pub start_usec: u64,
    /// Bytes of its output lost: cut from overlong lines, or let go from
    /// the ring with no log file to keep them.
    pub log_bytes_dropped: u64,
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

// Peer to peer there is no bus to route by name; the destination is
// required by the proxy and ignored by init.
#[zbus::proxy(
    interface = "org.steelcup.Init1",
    default_service = "org.steelcup.Init1",
    default_path = "/org/steelcup/Init1",
    gen_async = false
)]
pub trait Init1 {
    fn list_units(&self) -> zbus::Result<Vec<UnitInfo>>;
    fn status(&self, name: &str) -> zbus::Result<UnitInfo>;
    fn start(&self, name: &str) -> zbus::Result<()>;
    fn stop(&self, name: &str) -> zbus::Result<()>;
    fn restart(&self, name: &str) -> zbus::Result<()>;
    fn reload(&self) -> zbus::Result<ReloadSummary>;
    fn apply(&self, files: &[(String, String)], dry_run: bool) -> zbus::Result<ReloadSummary>;
    fn remove_unit(&self, name: &str) -> zbus::Result<ReloadSummary>;
    fn cat_unit(&self, name: &str) -> zbus::Result<String>;
    fn machine_apply(
        &self,
        text: &str,
        dry_run: bool,
    ) -> zbus::Result<(Vec<String>, Vec<String>, ReloadSummary)>;
    fn machine_show(&self) -> zbus::Result<String>;
    fn machine_reset(&self, confirm: &str) -> zbus::Result<()>;
    fn logs(&self, name: &str, since: u64, max: u32) -> zbus::Result<(Vec<(u64, String)>, u64)>;
    fn tail(&self, name: &str, lines: u32) -> zbus::Result<(Vec<(u64, String)>, u64)>;
    fn logs_timed(
        &self,
        name: &str,
        since: u64,
        max: u32,
    ) -> zbus::Result<(Vec<(u64, u64, String)>, u64)>;
    fn tail_timed(&self, name: &str, lines: u32) -> zbus::Result<(Vec<(u64, u64, String)>, u64)>;
    fn kernel_log(&self, since: u64, max: u32) -> zbus::Result<(Vec<(u64, u64, u8, String)>, u64)>;
    fn host_status(&self) -> zbus::Result<steelcup_os::host::HostStatus>;
    fn usage(&self) -> zbus::Result<Vec<(String, u64, u64)>>;
    fn power_off(&self) -> zbus::Result<()>;
    fn reboot(&self) -> zbus::Result<()>;
    fn update(&self, source: &str, reboot: bool) -> zbus::Result<(String, String)>;
    fn rollback(&self, reboot: bool) -> zbus::Result<(String, String)>;
    fn update_status(&self) -> zbus::Result<steelcup_os::update::Status>;
    #[zbus(signal)]
    fn unit_changed(&self, name: &str, state: &str) -> zbus::Result<()>;
}

/// Init's API over `stream`.
pub fn init1_over(stream: UnixStream, peer: &str) -> Result<Init1Proxy<'static>, ClientError> {
    let conn = p2p_over(stream, peer)?;
    Init1Proxy::builder(&conn)
        .build()
        .map_err(|source| ClientError::Proxy {
            what: "init",
            source: Box::new(source),
        })
}

/// Connects to init's socket in `run_dir`.
pub fn connect(run_dir: &Path) -> Result<Init1Proxy<'static>, ClientError> {
    let path = run_dir.join(SOCKET);
    let conn = connect_p2p(
        "init",
        &path,
        "is steelcup's init running? set STEELCUP_RUN_DIR for a supervisor started with --run-dir",
    )?;
    Init1Proxy::builder(&conn)
        .build()
        .map_err(|source| ClientError::Proxy {
            what: "init",
            source: Box::new(source),
        })
}
