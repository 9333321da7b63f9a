//! Confinement of the per-VM worker.
//!
//! # Limitations
//! Seccomp is in place; the worker's own mount namespace and cgroup are
//! still to come.

pub mod seccomp;
