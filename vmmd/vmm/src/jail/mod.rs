//! Confinement of the per-VM worker: a seccomp filter ([`seccomp`]), its
//! own mount namespace holding only its vsock directory ([`mount`]), a
//! cgroup v2 with the VM's limits ([`cgroup`]), and no capabilities
//! ([`caps`]).

pub mod caps;
pub mod cgroup;
pub mod mount;
pub mod seccomp;
