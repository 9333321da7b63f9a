//! The KVM VM: interrupt controllers, PIT, memory slots, irqfds.

use super::KvmError;
use crate::arch::KVM_TSS_ADDRESS;
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

/// `KVM_REINJECT_CONTROL`: `_IO(KVMIO, 0x71)`.
pub const KVM_REINJECT_CONTROL: u64 = 0xae71;
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

/// A KVM VM with its interrupt controllers and memory.
#[derive(Debug)]
pub struct Vm {
    pub kvm: Kvm,
    pub fd: VmFd,
}

impl Vm {
    /// Opens `/dev/kvm`, checks what steelcup needs, and creates a VM with an
    /// in-kernel PIC/IOAPIC/LAPIC and PIT.
    pub fn new() -> Result<Self, KvmError> {
        let kvm = Kvm::new().map_err(KvmError::Open)?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(KvmError::ApiVersion(version));
        }
        for (cap, name) in [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
            (Cap::Irqfd, "KVM_CAP_IRQFD"),
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
            (Cap::Pit2, "KVM_CAP_PIT2"),
            (Cap::PitState2, "KVM_CAP_PIT_STATE2"),
            (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
            (Cap::TscDeadlineTimer, "KVM_CAP_TSC_DEADLINE_TIMER"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(KvmError::MissingCap(name));
            }
        }
        let fd = kvm.create_vm().map_err(KvmError::CreateVm)?;
        fd.set_tss_address(KVM_TSS_ADDRESS).map_err(KvmError::Tss)?;
        fd.create_irq_chip().map_err(KvmError::IrqChip)?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(KvmError::Pit)?;
        Ok(Vm { kvm, fd })
    }

    /// A second descriptor of this VM, for [`stop_pit_replay`] on another
    /// thread (it keeps the VM open however long that takes).
    pub fn dup_fd(&self) -> std::io::Result<OwnedFd> {
        // SAFETY: the VM's descriptor is open for as long as `self` lives.
        unsafe { BorrowedFd::borrow_raw(self.fd.as_raw_fd()) }.try_clone_to_owned()
    }

    /// Registers every region of `mem` as a KVM memory slot.
    pub fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), KvmError> {
        for (slot, region) in mem.iter().enumerate() {
            let slot = slot as u32;
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| KvmError::MemoryRegion {
                    slot,
                    source: kvm_ioctls::Error::new(libc::EFAULT),
                })?;
            let r = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: `host..host+len` is a live mapping owned by `mem`, which
            // the caller keeps alive for as long as the VM exists (the builder
            // stores both in the same `BuiltVm`); slots are distinct and do not
            // overlap because they come from distinct regions of `mem`.
            unsafe { self.fd.set_user_memory_region(r) }
                .map_err(|source| KvmError::MemoryRegion { slot, source })?;
        }
        Ok(())
    }

    /// Makes a write to `evt` raise interrupt line `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), KvmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|source| KvmError::Irqfd { gsi, source })
    }

    /// Makes a 32-bit guest write of `value` to MMIO address `addr` signal
    /// `evt` inside KVM, without a VM exit to the worker.
    pub fn register_ioevent(&self, evt: &EventFd, addr: u64, value: u32) -> Result<(), KvmError> {
        self.fd
            .register_ioevent(evt, &kvm_ioctls::IoEventAddress::Mmio(addr), value)
            .map_err(|source| KvmError::Ioevent { addr, source })
    }
}

/// Turns off the PIT's tick replay in `vm`: ticks the PIT could not
/// deliver on time are dropped, not replayed, so a slow or paused VM does
/// not come back to a storm of timer interrupts (nor the host's kvm-pit
/// thread to a busy loop). The host kernel waits out two SRCU grace periods
/// for it (about 16 ms, longer than everything else before the first
/// `KVM_RUN`), so the worker calls it on its control thread while the guest
/// starts; until then the PIT replays, as KVM's default (and QEMU's) has it.
pub fn stop_pit_replay(vm: impl AsFd) -> Result<(), KvmError> {
    let no_reinject = kvm_bindings::kvm_reinject_control {
        pit_reinject: 0,
        reserved: [0; 31],
    };
    // SAFETY: KVM_REINJECT_CONTROL (_IO(KVMIO, 0x71)) reads a
    // kvm_reinject_control from the pointer, which outlives the call.
    let r = unsafe {
        libc::ioctl(
            vm.as_fd().as_raw_fd(),
            KVM_REINJECT_CONTROL as libc::c_ulong,
            &no_reinject,
        )
    };
    if r < 0 {
        return Err(KvmError::Pit(kvm_ioctls::Error::last()));
    }
    Ok(())
}
