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
//! [`api`] is the daemon's D-Bus interface; [`fuzz`] drives the device
//! models with hostile bytes. [`image`] is the image store (registries,
//! layouts, archives; layers to erofs root images); [`attach`] is cup's
//! side of a workload's stdio over vsock.
//!
//! Devices: the serial console, the i8042 reset line, the status port, and
//! virtio-mmio rng, block, net (tap) and vsock. The worker is confined by
//! seccomp, its own mount namespace and a cgroup (see [`jail`]).
//!
//! # Limitations
//! No snapshots, no hotplug, no vhost offload.

pub mod api;
pub mod arch;
pub mod attach;
pub mod bench;
pub mod bench_start;
pub mod builder;
pub mod config;
pub mod cup_update;
pub mod cup_workloads;
pub mod daemon;
pub mod devices;
pub mod fuzz;
pub mod image;
pub mod jail;
pub mod net;
pub mod pool;
pub mod reconcile;
pub mod remote;
pub mod selftest;
pub mod vstate;
pub mod worker;
