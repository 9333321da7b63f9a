//! The contracts between steelcup's processes that run on both sides of a
//! VM boundary: what vmmd hands a guest and what vminit answers.
//!
//! # Design
//! [`guest`] is the guest's config (written into its initramfs or sent on
//! claim) and the exit status vminit reports; [`stdio`] is the framing of a
//! workload's stdio and exec requests over vsock; [`control`] is what vmmd
//! asks vminit (stop, kill, ping, health [`probe`]s, a warm VM's claim);
//! [`cpio`] writes the initramfs format the guest config travels in; [`worker`] is what vmmd hands a
//! VM's worker process and what the worker reports back. Every type here is serde, compiled by
//! both sides, so a change to a message breaks the build, not a guest.
//!
//! # Limitations
//! The stdio frames' exec request and exit status are JSON inside a
//! binary frame; the rest is one JSON object per line.

pub mod control;
#[cfg(feature = "copy")]
pub mod copy;
pub mod cpio;
pub mod guest;
pub mod probe;
pub mod processes;
pub mod stdio;
pub mod worker;

use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

/// Where a microVM's memory comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemoryBacking {
    /// Private anonymous memory.
    #[default]
    Anonymous,
    /// A shared mapping of a memfd (memory as a file descriptor).
    Memfd,
}

/// `192.168.1.10/24` -> (address, prefix).
pub fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (a, p) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?}: expected ADDRESS/PREFIX"))?;
    let addr: Ipv4Addr = a
        .parse()
        .map_err(|_| format!("{s:?}: {a:?} is not an IPv4 address"))?;
    let prefix: u8 = p
        .parse()
        .ok()
        .filter(|p| *p <= 32)
        .ok_or_else(|| format!("{s:?}: prefix must be 0..=32"))?;
    Ok((addr, prefix))
}
