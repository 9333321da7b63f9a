//! steelcup's host PID 1 (`init`).
//!
//! # Design
//! A library and the thin `init` binary. [`boot`] runs the host's boot
//! phases ([`modules`], [`network`], [`power`]); [`supervisor`] starts,
//! watches, reloads and stops services (restart with backoff, cgroups,
//! bounded logs); [`api`] is `org.steelcup.Init1`'s action enum and D-Bus
//! adapter. Unit files are `steelcup_units`, the disk and machine config
//! `steelcup_os`, raw syscalls `steelcup_sys`.
//!
//! # Limitations
//! The A/B health gate and the cgroup code still live in the supervisor's
//! module; stopping a unit waits out its stop timeout on the supervisor's
//! thread.

pub mod api;
pub mod boot;
pub mod modules;
pub mod network;
pub mod power;
pub mod supervisor;
pub mod timesync;

pub use steelcup_os::logging::{init_logging, log_to_kmsg};
