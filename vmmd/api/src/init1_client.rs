//! A blocking client of `org.steelcup.Init1`, for `cup` and tests.

use super::{ReloadSummary, UnitInfo, SOCKET};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

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
    fn logs(&self, name: &str, since: u64, max: u32) -> zbus::Result<(Vec<(u64, String)>, u64)>;
    fn tail(&self, name: &str, lines: u32) -> zbus::Result<(Vec<(u64, String)>, u64)>;
    fn power_off(&self) -> zbus::Result<()>;
    fn reboot(&self) -> zbus::Result<()>;
    fn update(&self, source: &str, reboot: bool) -> zbus::Result<(String, String)>;
    fn rollback(&self, reboot: bool) -> zbus::Result<(String, String)>;
    fn update_status(&self) -> zbus::Result<steelcup_os::update::Status>;
    #[zbus(signal)]
    fn unit_changed(&self, name: &str, state: &str) -> zbus::Result<()>;
}

/// `$STEELCUP_RUN_DIR`, else `/run/steelcup`.
pub fn run_dir() -> PathBuf {
    std::env::var_os("STEELCUP_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/steelcup"))
}

/// A peer-to-peer D-Bus connection to `who` at `socket`; errors say where
/// it looked and `hint`.
pub fn connect_p2p(
    who: &str,
    socket: &Path,
    hint: &str,
) -> Result<zbus::blocking::Connection, String> {
    let stream = UnixStream::connect(socket)
        .map_err(|e| format!("cannot reach {who} at {}: {e} ({hint})", socket.display()))?;
    p2p_over(stream, &socket.display().to_string())
}

/// A peer-to-peer D-Bus connection over `stream` (a local socket, or one
/// relayed to a remote machine); `peer` names it in errors.
pub fn p2p_over(stream: UnixStream, peer: &str) -> Result<zbus::blocking::Connection, String> {
    zbus::blocking::connection::Builder::async_io_unix_stream(stream)
        .p2p()
        .build()
        .map_err(|e| format!("D-Bus handshake with {peer}: {e}"))
}

/// Init's API over `stream`.
pub fn init1_over(stream: UnixStream, peer: &str) -> Result<Init1Proxy<'static>, String> {
    let conn = p2p_over(stream, peer)?;
    Init1Proxy::builder(&conn)
        .build()
        .map_err(|e| format!("init API: {e}"))
}

/// Connects to init's socket in `run_dir`.
pub fn connect(run_dir: &Path) -> Result<Init1Proxy<'static>, String> {
    let path = run_dir.join(SOCKET);
    let conn = connect_p2p(
        "init",
        &path,
        "is steelcup's init running? set STEELCUP_RUN_DIR for a supervisor started with --run-dir",
    )?;
    Init1Proxy::builder(&conn)
        .build()
        .map_err(|e| format!("init API: {e}"))
}
