//! vmmd: steelcup's virtual machine monitor daemon.
//!
//! # Design
//! In the shape of Firecracker's `vmm`: [`vstate`] wraps KVM (the VM, its
//! memory and vCPUs, the only place with `unsafe`), [`arch`] sets up the x86_64
//! boot state (page tables, GDT, zero page, e820), [`devices`] are the emulated
//! devices on the port-I/O bus, [`builder`] assembles a VM from a
//! [`config::VmConfig`], [`worker`] is the per-VM process, and [`daemon`] is
//! the resident supervisor of those workers. vCPUs run on their own threads.
//! [`jail`] confines the worker; [`selftest`] checks KVM with a tiny guest.
//!
//! # Limitations
//! Devices are the serial console, the i8042 reset line, the status port
//! and virtio-rng; virtio block, net and vsock, the D-Bus API, and a mount namespace and cgroup for
//! the worker (it already runs under seccomp, see [`jail`]) are still to come.

pub mod api;
pub mod arch;
pub mod builder;
pub mod config;
pub mod daemon;
pub mod devices;
pub mod fuzz;
pub mod image;
pub mod jail;
pub mod selftest;
pub mod vstate;
pub mod worker;
