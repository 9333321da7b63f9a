//! Peer-to-peer D-Bus, as both of steelcup's APIs speak it: a private Unix
//! socket per API, no bus daemon, a connection per client.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::ClientError;

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
) -> Result<zbus::blocking::Connection, ClientError> {
    let stream = UnixStream::connect(socket).map_err(|source| ClientError::Unreachable {
        who: who.to_string(),
        socket: socket.to_path_buf(),
        hint: hint.to_string(),
        source,
    })?;
    p2p_over(stream, &socket.display().to_string())
}

/// A peer-to-peer D-Bus connection over `stream` (a local socket, or one
/// relayed to a remote machine); `peer` names it in errors.
pub fn p2p_over(stream: UnixStream, peer: &str) -> Result<zbus::blocking::Connection, ClientError> {
    zbus::blocking::connection::Builder::async_io_unix_stream(stream)
        .p2p()
        .build()
        .map_err(|source| ClientError::Handshake {
            peer: peer.to_string(),
            source: Box::new(source),
        })
}

/// Live client connections, for signals.
pub type Connections = Arc<Mutex<Vec<zbus::blocking::Connection>>>;

/// Binds a Unix socket at `socket` (replacing a stale one) that only root
/// may connect to (mode 0600).
pub fn bind_private(socket: &Path) -> std::io::Result<UnixListener> {
    let _ = std::fs::remove_file(socket);
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = UnixListener::bind(socket)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Accepts connections on `listener` and speaks D-Bus peer to peer on
/// each, serving `iface()` at `path`. Each handshake runs on its own
/// thread, so a client that stalls in it holds up nobody else. Returns the
/// live connections (at most 64: the oldest goes first).
pub fn accept_p2p<I>(
    listener: UnixListener,
    path: &'static str,
    iface: impl Fn() -> I + Send + 'static,
) -> std::io::Result<Connections>
where
    I: zbus::object_server::Interface,
{
    let conns: Connections = Arc::new(Mutex::new(Vec::new()));
    let guid = zbus::Guid::generate();
    let accept_conns = conns.clone();
    std::thread::Builder::new()
        .name("api-accept".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let iface = iface();
                let guid = guid.clone();
                let conns = accept_conns.clone();
                let _ = std::thread::Builder::new()
                    .name("api-conn".into())
                    .spawn(move || {
                        let built =
                            zbus::blocking::connection::Builder::async_io_unix_stream(stream)
                                .server(guid)
                                .and_then(|b| b.p2p().serve_at(path, iface))
                                .and_then(|b| b.build());
                        match built {
                            Ok(c) => {
                                let mut list = conns.lock().unwrap_or_else(|p| p.into_inner());
                                if list.len() >= 64 {
                                    drop(list.remove(0));
                                }
                                list.push(c);
                            }
                            Err(e) => tracing::debug!("API connection failed: {e}"),
                        }
                    });
            }
        })?;
    Ok(conns)
}
