//! KVM state: the VM, its memory and its vCPUs. The only place in vmmd with
//! `unsafe`, each block with the invariant it relies on.

pub mod memory;
pub mod pause;
pub mod vcpu;
pub mod vm;

/// Errors talking to KVM, one variant per ioctl call site.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("open /dev/kvm")]
    Open(#[source] kvm_ioctls::Error),
    #[error("KVM API version {0} is not the supported version 12")]
    ApiVersion(i32),
    #[error("KVM lacks {0}, which steelcup needs")]
    MissingCap(&'static str),
    #[error("create VM")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("set TSS address")]
    Tss(#[source] kvm_ioctls::Error),
    #[error("create in-kernel interrupt controller")]
    IrqChip(#[source] kvm_ioctls::Error),
    #[error("create in-kernel PIT")]
    Pit(#[source] kvm_ioctls::Error),
    #[error("register guest memory slot {slot}")]
    MemoryRegion {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("register irqfd for GSI {gsi}")]
    Irqfd {
        gsi: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("get supported CPUID")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    #[error("create vCPU {index}")]
    CreateVcpu {
        index: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: {what}")]
    VcpuSetup {
        index: u8,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: set MSRs: only {set} of {wanted} were accepted")]
    Msrs {
        index: u8,
        set: usize,
        wanted: usize,
    },
    #[error("vCPU {index}: KVM_RUN")]
    Run {
        index: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("create eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("register ioeventfd at {addr:#x}")]
    Ioevent {
        addr: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
}
