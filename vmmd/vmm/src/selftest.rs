//! `vmmd selftest`: a tiny hand-written real-mode guest that checks KVM and
//! vmmd's exit handling end to end — guest memory, port I/O out, a memory
//! read, an MMIO write and read, HLT — in a few milliseconds.
//!
//! # Design
//! The guest is 17 bytes of 16-bit code at 0x1000 in 16 KiB of memory with
//! no interrupt controller (so HLT exits to userspace). Each exit is checked
//! against the expected sequence; anything else is a failure naming the
//! step. It runs wherever KVM is real: in `vmmd/tests/` on hosts with vmx or
//! svm, and inside the booted appliance (qemu-tests), where it always is.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

const CODE_AT: u64 = 0x1000;
const DATA_AT: u64 = 0x2000;

/// The guest (the MMIO accesses hit 0x8000, above its memory):
/// `mov dx,0x3f8; mov al,'K'; out dx,al; mov al,[0x2000]; out dx,al;
///  mov [0x8000],al; mov al,[0x8004]; out dx,al; hlt`
pub const GUEST: [u8; 20] = [
    0xba, 0xf8, 0x03, 0xb0, b'K', 0xee, 0xa0, 0x00, 0x20, 0xee, 0xa2, 0x00, 0x80, 0xa0, 0x04, 0x80,
    0xee, 0xf4, 0xf4, 0xf4,
];

/// True where KVM runs guests at hardware speed: the CPU shows vmx or svm.
/// (`/dev/kvm` alone proves nothing: it may be an emulating shim.)
pub fn kvm_usable() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| {
            c.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false)
        && std::path::Path::new("/dev/kvm").exists()
}

/// Runs the tiny guest; returns the exits seen, or what went wrong.
pub fn run() -> Result<Vec<String>, String> {
    let kvm = Kvm::new().map_err(|e| format!("open /dev/kvm: {e}"))?;
    let vm = kvm.create_vm().map_err(|e| format!("create VM: {e}"))?;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x4000)])
        .map_err(|e| format!("guest memory: {e}"))?;
    mem.write_slice(&GUEST, GuestAddress(CODE_AT))
        .map_err(|e| format!("write code: {e}"))?;
    mem.write_obj(0x33u8, GuestAddress(DATA_AT))
        .map_err(|e| format!("write data: {e}"))?;
    let region = mem.iter().next().ok_or("no memory region")?;
    let host = region
        .get_host_address(vm_memory::MemoryRegionAddress(0))
        .map_err(|e| format!("host address: {e}"))?;
    let slot = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: region.len(),
        userspace_addr: host as u64,
    };
    // SAFETY: `host` maps `region.len()` bytes owned by `mem`, which lives
    // until this function returns, after the VM (declared earlier, dropped
    // later) is no longer run.
    unsafe { vm.set_user_memory_region(slot) }.map_err(|e| format!("memory slot: {e}"))?;
    let mut vcpu = vm.create_vcpu(0).map_err(|e| format!("create vCPU: {e}"))?;
    let mut sregs = vcpu.get_sregs().map_err(|e| format!("get sregs: {e}"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs)
        .map_err(|e| format!("set sregs: {e}"))?;
    let mut regs = vcpu.get_regs().map_err(|e| format!("get regs: {e}"))?;
    regs.rip = CODE_AT;
    regs.rflags = 2;
    vcpu.set_regs(&regs).map_err(|e| format!("set regs: {e}"))?;

    let expected = [
        "out 0x3f8 0x4b",
        "out 0x3f8 0x33",
        "mmio write 0x8000 0x33",
        "mmio read 0x8004",
        "out 0x3f8 0x5a",
        "hlt",
    ];
    let mut seen = Vec::new();
    while seen.len() < expected.len() {
        let exit = match vcpu.run().map_err(|e| format!("KVM_RUN: {e}"))? {
            VcpuExit::IoOut(port, data) if data.len() == 1 => {
                format!("out {port:#x} {:#x}", data[0])
            }
            VcpuExit::MmioWrite(addr, data) if data.len() == 1 => {
                format!("mmio write {addr:#x} {:#x}", data[0])
            }
            VcpuExit::MmioRead(addr, data) => {
                data.fill(0x5a);
                format!("mmio read {addr:#x}")
            }
            VcpuExit::Hlt => "hlt".to_string(),
            other => format!("unexpected exit {other:?}"),
        };
        let step = seen.len();
        if exit != expected[step] {
            return Err(format!(
                "step {}: expected {:?}, got {exit:?} (after {seen:?})",
                step + 1,
                expected[step]
            ));
        }
        seen.push(exit);
    }
    Ok(seen)
}

/// `vmmd selftest`: prints the result; exit code 0 on success.
pub fn main() -> i32 {
    if !kvm_usable() {
        println!("kvm selftest: skipped: this CPU shows neither vmx nor svm, so KVM is emulated or absent");
        return 0;
    }
    let t0 = std::time::Instant::now();
    match run() {
        Ok(seen) => {
            println!(
                "kvm selftest: ok: {} exits as expected ({}) in {:.1} ms",
                seen.len(),
                seen.join(", "),
                t0.elapsed().as_secs_f64() * 1000.0
            );
            0
        }
        Err(e) => {
            println!("kvm selftest: FAILED: {e}");
            1
        }
    }
}
