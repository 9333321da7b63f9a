//! A vCPU: its boot state (CPUID, MSRs, registers, FPU, LAPIC) and its run loop.

use super::KvmError;
use crate::arch::{self, gdt};
use crate::devices::{Bus, VmAction};
use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Why a vCPU stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStop {
    /// vminit reported the workload's exit status on the status port.
    Exited,
    /// The guest asked for a reset (i8042 pulse, the way Linux reboots here).
    Reset,
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN).
    /// A triple fault. (The registers are not worth reporting: on AMD, KVM
    /// has already reset the vCPU when it reports the shutdown.)
    TripleFault,
    /// The guest halted with no interrupt controller to wake it.
    Halted,
    /// KVM could not run the guest; the reason.
    Failed(String),
}

/// One vCPU of a VM.
#[derive(Debug)]
pub struct Vcpu {
    pub index: u8,
    pub fd: VcpuFd,
}

/// The CPUID the host's KVM supports, read once per VM.
pub fn supported_cpuid(kvm: &kvm_ioctls::Kvm) -> Result<CpuId, KvmError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(KvmError::SupportedCpuid)
}

/// Makes the CPUID KVM supports describe this VM: vCPU `index` of `vcpus`,
/// each its own core (one thread per core, one socket), on a hypervisor,
/// without a performance-monitoring unit to program.
pub fn normalize_cpuid(entries: &mut [kvm_bindings::kvm_cpuid_entry2], index: u8, vcpus: u8) {
    let (index, vcpus) = (u32::from(index), u32::from(vcpus.max(1)));
    // Bits of APIC ID that number the cores.
    let core_bits = 32 - (vcpus - 1).leading_zeros();
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                // Initial APIC ID and logical processor count.
                e.ebx = (e.ebx & 0x0000_ffff) | (vcpus << 16) | (index << 24);
                // Tell the guest it runs on a hypervisor, and that its
                // LAPIC timer has TSC-deadline mode (KVM emulates it; see
                // KVM_CAP_TSC_DEADLINE_TIMER), so the guest needs no timer
                // calibration against the PIT at boot.
                e.ecx |= (1 << 31) | (1 << 24);
                // HTT: the count in EBX[23:16] is valid.
                if vcpus > 1 {
                    e.edx |= 1 << 28;
                } else {
                    e.edx &= !(1 << 28);
                }
            }
            // Deterministic cache parameters (Intel): cores per package, and
            // which caches are shared (the last level, by all).
            4 => {
                let level = (e.eax >> 5) & 7;
                let sharing = if level >= 3 { vcpus - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | (sharing << 14) | ((vcpus - 1) << 26);
            }
            // Architectural performance monitoring: none.
            0xa => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            // Extended topology: an SMT level of one thread, then a core level.
            0xb | 0x1f => {
                let (eax, ebx, kind) = match e.index {
                    0 => (0, 1, 1),
                    1 => (core_bits, vcpus, 2),
                    _ => (0, 0, 0),
                };
                e.eax = eax;
                e.ebx = ebx;
                e.ecx = (kind << 8) | (e.index & 0xff);
                e.edx = index;
            }
            // AMD: core count and APIC ID size.
            0x8000_0008 => {
                e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | (vcpus - 1);
            }
            // AMD: one thread per core, one node; the extended APIC ID.
            0x8000_001e => {
                e.eax = index;
                e.ebx = (e.ebx & !0xff00) | (index & 0xff);
                e.ecx = 0;
            }
            _ => {}
        }
    }
}

impl Vcpu {
    pub fn new(vm: &kvm_ioctls::VmFd, index: u8) -> Result<Self, KvmError> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|source| KvmError::CreateVcpu { index, source })?;
        Ok(Vcpu { index, fd })
    }

    fn setup_err(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
        let index = self.index;
        move |source| KvmError::VcpuSetup {
            index,
            what,
            source,
        }
    }

    /// Sets up the vCPU to enter the kernel at `entry` in 64-bit mode.
    pub fn configure(
        &self,
        mem: &GuestMemoryMmap,
        supported: &CpuId,
        entry: GuestAddress,
        vcpus: u8,
    ) -> Result<(), KvmError> {
        self.setup_cpuid(supported, vcpus)?;
        self.setup_msrs()?;
        self.setup_regs(entry)?;
        self.setup_sregs(mem)?;
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd.set_fpu(&fpu).map_err(self.setup_err("set FPU"))?;
        self.setup_lapic()
    }

    fn setup_cpuid(&self, supported: &CpuId, vcpus: u8) -> Result<(), KvmError> {
        let mut cpuid = supported.clone();
        normalize_cpuid(cpuid.as_mut_slice(), self.index, vcpus);
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(self.setup_err("set CPUID"))
    }

    fn setup_msrs(&self) -> Result<(), KvmError> {
        let entries = [
            (0x174, 0),             // IA32_SYSENTER_CS
            (0x175, 0),             // IA32_SYSENTER_ESP
            (0x176, 0),             // IA32_SYSENTER_EIP
            (0xc000_0081, 0),       // STAR
            (0xc000_0082, 0),       // LSTAR
            (0xc000_0083, 0),       // CSTAR
            (0xc000_0084, 0),       // SYSCALL_MASK
            (0xc000_0102, 0),       // KERNEL_GS_BASE
            (0x10, 0),              // TSC
            (0x1a0, 1),             // IA32_MISC_ENABLE: fast strings
            (0x2ff, (1 << 11) | 6), // MTRR default type: enabled, write-back
        ];
        let list: Vec<kvm_msr_entry> = entries
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&list).map_err(|_| KvmError::Msrs {
            index: self.index,
            set: 0,
            wanted: list.len(),
        })?;
        let set = self
            .fd
            .set_msrs(&msrs)
            .map_err(self.setup_err("set MSRs"))?;
        if set != list.len() {
            return Err(KvmError::Msrs {
                index: self.index,
                set,
                wanted: list.len(),
            });
        }
        Ok(())
    }

    fn setup_regs(&self, entry: GuestAddress) -> Result<(), KvmError> {
        let regs = kvm_regs {
            rflags: 0x2,
            rip: entry.0,
            rsp: arch::BOOT_STACK_POINTER,
            rbp: arch::BOOT_STACK_POINTER,
            rsi: arch::ZERO_PAGE_START,
            ..Default::default()
        };
        self.fd
            .set_regs(&regs)
            .map_err(self.setup_err("set registers"))
    }

    fn setup_sregs(&self, mem: &GuestMemoryMmap) -> Result<(), KvmError> {
        let mut sregs = self.fd.get_sregs().map_err(self.setup_err("get sregs"))?;
        for (i, entry) in gdt::BOOT_GDT.iter().enumerate() {
            mem.write_obj(*entry, GuestAddress(arch::BOOT_GDT_START + (i as u64) * 8))
                .map_err(|_| KvmError::VcpuSetup {
                    index: self.index,
                    what: "write GDT",
                    source: kvm_ioctls::Error::new(libc::EFAULT),
                })?;
        }
        mem.write_obj(0u64, GuestAddress(arch::BOOT_IDT_START))
            .map_err(|_| KvmError::VcpuSetup {
                index: self.index,
                what: "write IDT",
                source: kvm_ioctls::Error::new(libc::EFAULT),
            })?;
        let code = gdt::segment(gdt::BOOT_GDT[1], 1);
        let data = gdt::segment(gdt::BOOT_GDT[2], 2);
        let tss = gdt::segment(gdt::BOOT_GDT[3], 3);
        sregs.gdt.base = arch::BOOT_GDT_START;
        sregs.gdt.limit = (gdt::BOOT_GDT.len() * 8 - 1) as u16;
        sregs.idt.base = arch::BOOT_IDT_START;
        sregs.idt.limit = 7;
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = tss;
        let cr3 = arch::setup_page_tables(mem).map_err(|_| KvmError::VcpuSetup {
            index: self.index,
            what: "write page tables",
            source: kvm_ioctls::Error::new(libc::EFAULT),
        })?;
        sregs.cr3 = cr3;
        sregs.cr4 |= X86_CR4_PAE;
        sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
        sregs.efer |= EFER_LME | EFER_LMA;
        self.fd
            .set_sregs(&sregs)
            .map_err(self.setup_err("set sregs"))
    }

    /// LINT0 delivers the PIC's ExtINT, LINT1 NMIs: the virtual-wire mode a
    /// Linux guest expects to find.
    fn setup_lapic(&self) -> Result<(), KvmError> {
        let mut lapic = self.fd.get_lapic().map_err(self.setup_err("get LAPIC"))?;
        for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
            let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
            let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
            for (i, b) in value.to_le_bytes().iter().enumerate() {
                lapic.regs[reg + i] = *b as i8;
            }
        }
        self.fd
            .set_lapic(&lapic)
            .map_err(self.setup_err("set LAPIC"))
    }

    /// Runs the vCPU until the guest resets, faults or KVM fails. Port I/O
    /// and MMIO go to `bus`; before each entry into the guest the vCPU
    /// passes `gate`, where it parks while the VM is paused.
    pub fn run(&mut self, bus: &Arc<Mutex<Bus>>, gate: &super::pause::PauseGate) -> VcpuStop {
        loop {
            gate.checkpoint();
            let exit = self.fd.run();
            EXITS.count(&exit);
            match exit {
                Ok(VcpuExit::IoIn(port, data)) => lock(bus).pio_read(port, data),
                Ok(VcpuExit::IoOut(port, data)) => match lock(bus).pio_write(port, data) {
                    Some(VmAction::Reset) => return VcpuStop::Reset,
                    Some(VmAction::Exit) => return VcpuStop::Exited,
                    None => {}
                },
                Ok(VcpuExit::MmioRead(addr, data)) => lock(bus).mmio_read(addr, data),
                Ok(VcpuExit::MmioWrite(addr, data)) => lock(bus).mmio_write(addr, data),
                Ok(VcpuExit::Hlt) => return VcpuStop::Halted,
                Ok(VcpuExit::Shutdown) => return VcpuStop::TripleFault,
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    return match kind {
                        kvm_bindings::KVM_SYSTEM_EVENT_RESET => VcpuStop::Reset,
                        kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VcpuStop::Reset,
                        other => VcpuStop::Failed(format!("system event {other}")),
                    }
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    return VcpuStop::Failed(format!(
                        "VM entry failed on CPU {cpu}: hardware reason {reason:#x}"
                    ))
                }
                Ok(VcpuExit::InternalError) => {
                    return VcpuStop::Failed("KVM internal error (emulation failure)".into())
                }
                Ok(VcpuExit::Intr) => {}
                Ok(other) => {
                    lock(bus).unhandled(&format!("exit {other:?}"), 0);
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => {
                    return VcpuStop::Failed(
                        KvmError::Run {
                            index: self.index,
                            source: e,
                        }
                        .to_string()
                            + &format!(": {e}"),
                    )
                }
            }
        }
    }
}

/// Exits of this VM's vCPUs to the VMM (`KVM_RUN` returning), by kind:
/// one relaxed atomic add each (`cup metrics`). Exits KVM handles in the
/// kernel never reach here.
#[derive(Debug)]
pub struct ExitCounters {
    io: AtomicU64,
    mmio: AtomicU64,
    other: AtomicU64,
}

/// The worker's (one VM per process).
pub static EXITS: ExitCounters = ExitCounters {
    io: AtomicU64::new(0),
    mmio: AtomicU64::new(0),
    other: AtomicU64::new(0),
};

impl ExitCounters {
    fn count(&self, exit: &Result<VcpuExit<'_>, kvm_ioctls::Error>) {
        let which = match exit {
            Ok(VcpuExit::IoIn(..) | VcpuExit::IoOut(..)) => &self.io,
            Ok(VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..)) => &self.mmio,
            _ => &self.other,
        };
        which.fetch_add(1, Ordering::Relaxed);
    }

    /// Port I/O, MMIO and other exits so far.
    pub fn totals(&self) -> (u64, u64, u64) {
        (
            self.io.load(Ordering::Relaxed),
            self.mmio.load(Ordering::Relaxed),
            self.other.load(Ordering::Relaxed),
        )
    }
}

fn lock(bus: &Arc<Mutex<Bus>>) -> std::sync::MutexGuard<'_, Bus> {
    bus.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn leaf(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    #[test]
    fn cpuid_describes_the_vm_topology() {
        let mut e = vec![
            leaf(1, 0, 0x000a_0f12, 0xff00_0800, 0x7ed8_320b, 0x178b_fbff),
            leaf(4, 0, 0x1c00_4121, 0, 0, 0), // L1d, shared by 2 on the host
            leaf(4, 3, 0x1c03_c163, 0, 0, 0), // L3
            leaf(0xa, 0, 0x0704_0002, 0xff, 0, 0x603),
            leaf(0xb, 0, 1, 2, 0x100, 9),
            leaf(0xb, 1, 4, 16, 0x201, 9),
            leaf(0xb, 2, 0, 0, 2, 9),
            leaf(0x8000_0008, 0, 0x3030, 0, 0x700f, 0),
            leaf(0x8000_001e, 0, 9, 0x0100, 0x0303, 0),
        ];
        normalize_cpuid(&mut e, 2, 3);
        // APIC ID 2 of 3 logical CPUs, HTT set, hypervisor bit set.
        assert_eq!(e[0].ebx >> 24, 2);
        assert_eq!((e[0].ebx >> 16) & 0xff, 3);
        assert_eq!(e[0].ebx & 0xffff, 0x0800);
        assert_ne!(e[0].ecx & (1 << 31), 0);
        assert_ne!(e[0].edx & (1 << 28), 0);
        // Three cores per package; L1 per core, L3 shared by all three.
        assert_eq!(e[1].eax >> 26, 2);
        assert_eq!((e[1].eax >> 14) & 0xfff, 0);
        assert_eq!((e[2].eax >> 14) & 0xfff, 2);
        assert_eq!(e[1].eax & 0x3fff, 0x0121);
        // No PMU.
        assert_eq!((e[3].eax, e[3].ebx, e[3].edx), (0, 0, 0));
        // Topology: 1 thread per core, 3 cores (2 bits), x2APIC ID 2.
        assert_eq!((e[4].eax, e[4].ebx, e[4].ecx, e[4].edx), (0, 1, 0x100, 2));
        assert_eq!((e[5].eax, e[5].ebx, e[5].ecx, e[5].edx), (2, 3, 0x201, 2));
        assert_eq!((e[6].eax, e[6].ebx, e[6].ecx), (0, 0, 2));
        // AMD: NC = 2, APIC ID size 2 bits.
        assert_eq!(e[7].ecx & 0xff, 2);
        assert_eq!((e[7].ecx >> 12) & 0xf, 2);
        assert_eq!(e[8].eax, 2);
        assert_eq!(e[8].ebx & 0xff00, 0, "one thread per core");
    }

    #[test]
    fn a_single_vcpu_has_no_htt() {
        let mut e = vec![leaf(1, 0, 0, 0, 0, 1 << 28)];
        normalize_cpuid(&mut e, 0, 1);
        assert_eq!(e[0].edx & (1 << 28), 0);
        assert_ne!(e[0].ecx & (1 << 24), 0, "TSC-deadline timer");
        assert_ne!(e[0].ecx & (1 << 31), 0, "hypervisor");
        assert_eq!((e[0].ebx >> 16) & 0xff, 1);
    }
}
