//! steelcup's APIs as types and clients.
//!
//! # Design
//! [`vmm1`] is vmmd's API (`org.steelcup.Vmm1`) and [`init1`] is init's
//! (`org.steelcup.Init1`): the action and reply types, the structs they
//! carry over D-Bus, and blocking client proxies. Both are served peer to
//! peer on private Unix sockets ([`bus`]). [`attach`] is a client's side of
//! a workload's stdio over its vsock socket; [`transfer`] frames bulk data
//! (image archives) to and from vmmd. With the `remote` feature,
//! [`remote`] carries all of it over mutual TLS (`cup --remote`, `vmmd
//! admin`). The servers' adapters live with their daemons.
//!
//! # Limitations
//! `Run` still takes its spec as a JSON string; workload states and
//! outcomes are strings on the wire.

pub mod attach;
pub mod bus;
mod error;
pub mod init1;
#[cfg(feature = "remote")]
pub mod remote;
pub mod transfer;
pub mod vmm1;

pub use error::ClientError;

/// With `cup --remote` (the `remote` feature, and [`remote::REMOTE`] set):
/// a stream to `target` (`init`, `vmmd`, `vsock NAME`) on the remote
/// machine, and the address it was reached at. `None`: talk to the local
/// sockets.
#[cfg_attr(not(feature = "remote"), allow(unused_variables))]
pub fn remote_stream(
    target: &str,
) -> Option<Result<(std::os::unix::net::UnixStream, String), ClientError>> {
    #[cfg(feature = "remote")]
    if let Some(r) = remote::REMOTE.get() {
        return Some(
            r.open(target)
                .map(|s| (s, r.addr.clone()))
                .map_err(|e| ClientError::Remote(Box::new(e))),
        );
    }
    None
}

/// A byte count as people read it: `512 B`, `1.5 KiB`, `3.2 MiB`, `1.1 GiB`.
pub fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}
