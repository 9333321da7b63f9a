//! vmmd: steelcup's VMM daemon.
//!
//! # Design
//! The resident control plane of the VMs: [`daemon`] is the event loop
//! that owns every workload and starts one worker process
//! (`steelcup_vmm`, `vmm-worker`) per VM; [`reconcile`] is the pure policy
//! (replicas, health, restarts, rolling replace) behind a backend trait;
//! [`pool`] keeps warm VMs; [`image`] is the image store (registries,
//! layouts, archives; layers to erofs root images); [`net`] is the
//! workload network (bridge, taps, addresses, NAT, published ports, DNS);
//! [`dbus`] is the API's D-Bus adapter (types in `steelcup_api::vmm1`);
//! [`bench`] and [`bench_start`] measure it.
//!
//! # Limitations
//! No snapshots; one workload network per machine.

pub mod bench;
pub mod bench_start;
pub mod daemon;
pub mod dbus;
pub mod fuzz;
pub mod image;
pub mod net;
pub mod pool;
pub mod reconcile;
