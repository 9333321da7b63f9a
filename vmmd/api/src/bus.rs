//! Peer-to-peer D-Bus, as both of steelcup's APIs speak it: a private Unix
//! socket per API, no bus daemon, a connection per client.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

/// The most clients an API serves at once; one more is turned away (a
/// connection in use is never dropped to make room).
pub const MAX_CLIENTS: usize = 4096;

/// How long a client has to finish the D-Bus handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The signals a client may have waiting; a client that falls this far
/// behind (a suspended `cup logs -f`, say) is dropped, so it never holds
/// up the others.
pub const CLIENT_QUEUE: usize = 256;

/// Sends one signal on a client's connection; false when it failed.
pub type Emit<S> = Arc<dyn Fn(&zbus::blocking::Connection, &S) -> bool + Send + Sync>;

/// The clients of a peer-to-peer API, each with its own bounded queue of
/// signals and its own sender thread.
pub struct Clients<S> {
    inner: Arc<Mutex<Vec<Client<S>>>>,
}

impl<S> Clone for Clients<S> {
    fn clone(&self) -> Self {
        Clients {
            inner: self.inner.clone(),
        }
    }
}

impl<S> std::fmt::Debug for Clients<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Clients({})", self.count())
    }
}

struct Client<S> {
    id: u64,
    queue: std::sync::mpsc::SyncSender<S>,
    /// The client's socket (a duplicate): polled for a hang-up, shut
    /// down to drop the client.
    sock: UnixStream,
}

impl<S: Clone> Clients<S> {
    /// Queues `signal` for every client; a client whose queue is full is
    /// dropped.
    pub fn broadcast(&self, signal: &S) {
        let mut list = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        list.retain(|c| match c.queue.try_send(signal.clone()) {
            Ok(()) => true,
            Err(std::sync::mpsc::TrySendError::Full(_)) => {
                tracing::warn!(
                    "API client {}: {CLIENT_QUEUE} signals behind; dropped",
                    c.id
                );
                let _ = c.sock.shutdown(std::net::Shutdown::Both);
                false
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => false,
        });
    }
}

impl<S> Clients<S> {
    /// How many clients are connected (handshake done).
    pub fn count(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Forgets clients whose peer hung up.
    fn sweep(&self) {
        use std::os::fd::AsFd;
        let mut list = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        list.retain(|c| {
            // No events asked for: the kernel still reports a hang-up
            // (POLLHUP once the peer has closed), and nothing else.
            let mut fds = [nix::poll::PollFd::new(
                c.sock.as_fd(),
                nix::poll::PollFlags::empty(),
            )];
            match nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO) {
                Ok(0) => true,
                _ => !fds[0].revents().is_none_or(|r| {
                    r.intersects(
                        nix::poll::PollFlags::POLLHUP
                            | nix::poll::PollFlags::POLLERR
                            | nix::poll::PollFlags::POLLNVAL,
                    )
                }),
            }
        });
    }
}

/// The most threads of the shared pool zbus runs its blocking socket
/// calls on (peer credentials, the handshake's first byte): an idle
/// thread of that pool never exits below the pool's limit (500 unless
/// set), so a burst of clients would leave a server (init is PID 1) with
/// hundreds of threads for good. Those calls are short: the client has
/// spoken before zbus gets its socket.
pub const BLOCKING_THREADS: usize = 4;

/// A connection still in its handshake, and when it must be done.
struct Pending {
    deadline: std::time::Instant,
    sock: UnixStream,
    done: Arc<std::sync::atomic::AtomicBool>,
}

/// Accepts connections on `listener` and speaks D-Bus peer to peer on
/// each, serving `iface()` at `path`. Each client has a thread of its own
/// (its handshake, then sending its signals with `emit`), a handshake
/// limit of [`HANDSHAKE_TIMEOUT`] and a queue of [`CLIENT_QUEUE`]
/// signals; at most [`MAX_CLIENTS`] are served at once. A watchdog thread
/// cuts handshakes that take too long and forgets clients that hung up,
/// so threads and descriptors go back to what they were when clients
/// leave.
pub fn accept_p2p<I, S>(
    listener: UnixListener,
    path: &'static str,
    iface: impl Fn() -> I + Send + 'static,
    emit: Emit<S>,
) -> std::io::Result<Clients<S>>
where
    I: zbus::object_server::Interface,
    S: Send + 'static,
{
    if let Some(n) = std::num::NonZeroUsize::new(BLOCKING_THREADS) {
        blocking::set_max_blocking_threads(n);
    }
    let clients = Clients {
        inner: Arc::new(Mutex::new(Vec::new())),
    };
    let pending: Arc<Mutex<Vec<Pending>>> = Arc::default();
    let guid = zbus::Guid::generate();
    {
        let (clients, pending) = (clients.clone(), pending.clone());
        std::thread::Builder::new()
            .name("api-watchdog".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(250));
                let now = std::time::Instant::now();
                pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .retain(|p| {
                        if p.done.load(std::sync::atomic::Ordering::Acquire) {
                            return false;
                        }
                        if p.deadline <= now {
                            let _ = p.sock.shutdown(std::net::Shutdown::Both);
                            return false;
                        }
                        true
                    });
                clients.sweep();
            })?;
    }
    let accept_clients = clients.clone();
    std::thread::Builder::new()
        .name("api-accept".into())
        .spawn(move || {
            let mut next_id = 0u64;
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let waiting = pending.lock().unwrap_or_else(|p| p.into_inner()).len();
                if accept_clients.count() + waiting >= MAX_CLIENTS {
                    tracing::warn!("API: {MAX_CLIENTS} clients already; one more turned away");
                    continue;
                }
                let Ok(dup) = stream.try_clone() else {
                    continue;
                };
                let Ok(watch) = stream.try_clone() else {
                    continue;
                };
                let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
                pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Pending {
                        deadline: std::time::Instant::now() + HANDSHAKE_TIMEOUT,
                        sock: watch,
                        done: done.clone(),
                    });
                next_id += 1;
                let id = next_id;
                let iface = iface();
                let guid = guid.clone();
                let clients = accept_clients.clone();
                let emit = emit.clone();
                let spawned =
                    std::thread::Builder::new()
                        .name("api-conn".into())
                        .spawn(move || {
                            // Until the client speaks, it costs this thread
                            // only: zbus's handshake would hold a thread of
                            // its shared blocking pool meanwhile, and enough
                            // silent clients would starve everyone else.
                            if !speaks_within(&stream, HANDSHAKE_TIMEOUT) {
                                done.store(true, std::sync::atomic::Ordering::Release);
                                return;
                            }
                            let stream = match identifiable(stream) {
                                Ok(s) => s,
                                Err(e) => {
                                    tracing::info!("API: a client turned away: {e}");
                                    done.store(true, std::sync::atomic::Ordering::Release);
                                    return;
                                }
                            };
                            let built =
                                zbus::blocking::connection::Builder::async_io_unix_stream(stream)
                                    .server(guid)
                                    .and_then(|b| b.p2p().serve_at(path, iface))
                                    .and_then(|b| b.build());
                            done.store(true, std::sync::atomic::Ordering::Release);
                            let conn = match built {
                                Ok(c) => c,
                                Err(e) => {
                                    tracing::info!("API: a client's handshake failed: {e}");
                                    return;
                                }
                            };
                            let (queue, signals) = std::sync::mpsc::sync_channel(CLIENT_QUEUE);
                            clients
                                .inner
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push(Client {
                                    id,
                                    queue,
                                    sock: dup,
                                });
                            // Until the client is forgotten (it hung up, or
                            // fell behind) or a send fails.
                            for s in signals {
                                if !emit(&conn, &s) {
                                    break;
                                }
                            }
                            clients
                                .inner
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .retain(|c| c.id != id);
                        });
                if spawned.is_err() {
                    tracing::warn!("API: cannot start a client thread; one turned away");
                }
            }
        })?;
    Ok(clients)
}

/// True once `stream` has something to read within `limit`.
fn speaks_within(stream: &UnixStream, limit: Duration) -> bool {
    use std::os::fd::AsFd;
    let mut fds = [nix::poll::PollFd::new(
        stream.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    let ms = u16::try_from(limit.as_millis()).unwrap_or(u16::MAX);
    matches!(nix::poll::poll(&mut fds, ms), Ok(n) if n > 0)
        && fds[0]
            .revents()
            .is_some_and(|r| r.contains(nix::poll::PollFlags::POLLIN))
}

/// `stream`, or a stream zbus can take: the peer of a client in another
/// PID namespace (init as a container's PID 1, `cup` outside it) has no
/// pid here, and zbus's handshake refuses such a peer; its bytes are
/// relayed through a socket pair of our own instead. Its user must be
/// ours, as the socket's mode already demands.
fn identifiable(stream: UnixStream) -> std::io::Result<UnixStream> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let creds = getsockopt(&stream, PeerCredentials).map_err(std::io::Error::from)?;
    if creds.pid() != 0 {
        return Ok(stream);
    }
    if creds.uid() != nix::unistd::geteuid().as_raw() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("uid {} from outside this PID namespace", creds.uid()),
        ));
    }
    let (ours, theirs) = UnixStream::pair()?;
    let relay = |mut from: UnixStream, mut to: UnixStream| {
        move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = from.shutdown(std::net::Shutdown::Both);
            let _ = to.shutdown(std::net::Shutdown::Both);
        }
    };
    std::thread::Builder::new()
        .name("api-relay".into())
        .spawn(relay(stream.try_clone()?, ours.try_clone()?))?;
    std::thread::Builder::new()
        .name("api-relay".into())
        .spawn(relay(ours, stream))?;
    Ok(theirs)
}
