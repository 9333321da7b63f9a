//! What a client of steelcup's APIs meets: a socket nobody listens on, a
//! handshake that fails, a guest port that is closed.

use std::path::PathBuf;

/// A client's error, with its cause.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach {who} at {} ({hint})", socket.display())]
    Unreachable {
        who: String,
        socket: PathBuf,
        hint: String,
        #[source]
        source: std::io::Error,
    },
    // zbus::Error is large: boxed, so every client result stays small.
    #[error("D-Bus handshake with {peer}")]
    Handshake {
        peer: String,
        #[source]
        source: Box<zbus::Error>,
    },
    #[error("{what} API")]
    Proxy {
        what: &'static str,
        #[source]
        source: Box<zbus::Error>,
    },
    /// `cup --remote`: the machine could not be reached.
    #[error("the remote machine")]
    Remote(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("connect {}", path.display())]
    Vsock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("port {port}: the guest does not listen (yet)")]
    NotListening { port: u32 },
    #[error("port {port}: {said:?}")]
    PortRefused { port: u32, said: String },
    #[error("{what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the VM ended before the process reported an exit status")]
    NoExitStatus,
    #[error("a bad exit status from the guest")]
    BadExitStatus(#[source] serde_json::Error),
    #[error("{0}")]
    Guest(String),
    /// [`crate::attach::connect_when_ready`] waited long enough.
    #[error("gave up after {secs}s")]
    GaveUp {
        secs: u64,
        #[source]
        last: Option<Box<ClientError>>,
    },
}

/// Clients that speak in messages (cup's verbs) get the whole chain, once.
impl From<ClientError> for String {
    fn from(e: ClientError) -> String {
        steelcup_sys::error_chain(&e)
    }
}
