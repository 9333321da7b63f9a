//! steelcup's VMM: the per-VM worker process (`vmm-worker`).
//!
//! # Design
//! In the shape of Firecracker's `vmm`: [`vstate`] wraps KVM (the VM, its
//! memory and vCPUs, with [`jail`] one of the few places with `unsafe`),
//! [`arch`] sets up the x86_64 boot state (page tables, GDT, zero page,
//! e820, MP table), [`devices`] are the emulated devices, [`builder`]
//! assembles a VM from a [`config::VmConfig`], and [`worker`] is the
//! process: it reads its config and descriptors from vmmd, builds the VM,
//! runs its vCPUs on their own threads and reports how it ended. [`jail`]
//! confines it (seccomp, a mount namespace, a cgroup); [`selftest`] checks
//! KVM with a tiny guest; [`fuzz`] drives the device models with hostile
//! bytes.
//!
//! This crate is what a hostile guest faces, so it links no async runtime,
//! D-Bus, HTTP or netlink (`tests/dependencies.rs`): vmmd opens the VM's
//! tap and disks and hands over the descriptors.
//!
//! # Limitations
//! No snapshots, no hotplug beyond empty disk slots, no vhost offload.

pub mod arch;
pub mod builder;

pub mod devices;
pub mod fuzz;
pub mod jail;
pub mod selftest;
pub mod snapshot;
pub mod vstate;
pub mod worker;

/// The worker protocol (`steelcup_proto::worker`), under the name the
/// VMM's modules use for it.
pub use steelcup_proto::worker as config;
