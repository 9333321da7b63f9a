//! The host OS's disk and configuration, shared by init, vmmd, cup and
//! image-build.
//!
//! # Design
//! [`state`] finds, grows and mounts the state partition; [`slots`] reads
//! and writes the A/B boot environment on the ESP; [`update`] checks and
//! installs a new OS slot (signatures included); [`provision`] checks and
//! applies a machine config; [`netconfig`] is the host network's schema;
//! [`logs`] is the bounded per-unit log store init and vmmd both keep;
//! [`kmsg`] reads the kernel's log.
//! Everything here is plain functions over files and block devices; the
//! processes that call them decide when.
//!
//! # Limitations
//! IPv4 host networking only; one disk holds the slots.

pub mod host;
pub mod kmsg;
pub mod logging;
pub mod logs;
pub mod netconfig;
pub mod provision;
pub mod slots;
pub mod state;
pub mod time;
pub mod update;

/// `kernel/arch/x86/kvm/kvm-amd.ko` -> `kvm_amd`.
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}
