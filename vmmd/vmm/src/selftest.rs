//! `vmmd selftest`: a tiny hand-written real-mode guest that checks KVM and
//! vmmd's exit handling end to end — guest memory, port I/O out, a memory
//! read, an MMIO write and read, HLT — in a few milliseconds.
//!
//! # Design
//! The guest is 17 bytes of 16-bit code at 0x1000 in 16 KiB of memory with
//! no interrupt controller (so HLT exits to userspace). Each exit is checked
//! against the expected sequence; anything else is a failure naming the
//! step. Then the same guest is snapshotted after its third exit (vCPU
//! state through the state file's encoding, memory into a memory file)
//! and a clone, its memory mapped copy-on-write from that file, must make
//! the remaining exits; and a VM's in-kernel interrupt controllers and PIT
//! must restore into a second VM the same (see [`crate::snapshot`]). It runs wherever KVM is real: in `vmmd/tests/` on hosts with vmx or
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

/// The exits the guest makes, in order.
const EXPECTED: [&str; 6] = [
    "out 0x3f8 0x4b",
    "out 0x3f8 0x33",
    "mmio write 0x8000 0x33",
    "mmio read 0x8004",
    "out 0x3f8 0x5a",
    "hlt",
];

/// Where the snapshot is taken: after this many exits.
const SNAPSHOT_AFTER: usize = 3;

/// Registers `mem`'s one region as slot 0 of `vm`.
fn register(vm: &kvm_ioctls::VmFd, mem: &GuestMemoryMmap) -> Result<(), String> {
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
    // SAFETY: `host` maps `region.len()` bytes owned by `mem`, which the
    // caller keeps alive for as long as it runs the VM.
    unsafe { vm.set_user_memory_region(slot) }.map_err(|e| format!("memory slot: {e}"))
}

/// Runs `vcpu` through the exits `expected[from..to]`; appends them to `seen`.
fn run_exits(
    vcpu: &mut kvm_ioctls::VcpuFd,
    from: usize,
    to: usize,
    seen: &mut Vec<String>,
) -> Result<(), String> {
    for (step, want) in EXPECTED.iter().enumerate().take(to).skip(from) {
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
        if exit != *want {
            return Err(format!(
                "step {}: expected {want:?}, got {exit:?} (after {seen:?})",
                step + 1
            ));
        }
        seen.push(exit);
    }
    Ok(())
}

/// Runs the tiny guest; returns the exits seen, or what went wrong.
pub fn run() -> Result<Vec<String>, String> {
    Ok(run_guest(false)?.0)
}

/// Runs the tiny guest, taking a snapshot after its third exit; then runs
/// a clone restored from that snapshot (its memory mapped copy-on-write
/// from the memory file) through the rest. Returns the original's exits
/// and the clone's.
pub fn run_with_snapshot() -> Result<(Vec<String>, Vec<String>), String> {
    run_guest(true)
}

fn run_guest(snapshot_too: bool) -> Result<(Vec<String>, Vec<String>), String> {
    use crate::snapshot;
    let kvm = Kvm::new().map_err(|e| format!("open /dev/kvm: {e}"))?;
    let vm = kvm.create_vm().map_err(|e| format!("create VM: {e}"))?;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x4000)])
        .map_err(|e| format!("guest memory: {e}"))?;
    mem.write_slice(&GUEST, GuestAddress(CODE_AT))
        .map_err(|e| format!("write code: {e}"))?;
    mem.write_obj(0x33u8, GuestAddress(DATA_AT))
        .map_err(|e| format!("write data: {e}"))?;
    register(&vm, &mem)?;
    let mut vcpu = vm.create_vcpu(0).map_err(|e| format!("create vCPU: {e}"))?;
    // The CPUID KVM supports: what the MSRs a snapshot saves depend on
    // (KVM takes a paravirtual MSR back only where CPUID offers it).
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| format!("supported CPUID: {e}"))?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(|e| format!("set CPUID: {e}"))?;
    let mut sregs = vcpu.get_sregs().map_err(|e| format!("get sregs: {e}"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs)
        .map_err(|e| format!("set sregs: {e}"))?;
    let mut regs = vcpu.get_regs().map_err(|e| format!("get regs: {e}"))?;
    regs.rip = CODE_AT;
    regs.rflags = 2;
    vcpu.set_regs(&regs).map_err(|e| format!("set regs: {e}"))?;

    let mut seen = Vec::new();
    if !snapshot_too {
        run_exits(&mut vcpu, 0, EXPECTED.len(), &mut seen)?;
        return Ok((seen, Vec::new()));
    }
    run_exits(&mut vcpu, 0, SNAPSHOT_AFTER, &mut seen)?;

    // The snapshot: the vCPU between instructions, its state through the
    // state file's encoding, guest memory into a memory file.
    let snap_err = |e: snapshot::SnapshotError| format!("snapshot: {e}");
    snapshot::complete_pending_io(&mut vcpu).map_err(snap_err)?;
    let msrs = snapshot::msr_list(&kvm).map_err(snap_err)?;
    let state = snapshot::Snapshot {
        build: snapshot::BUILD.into(),
        memory: vec![snapshot::MemoryRange {
            guest_addr: 0,
            len: 0x4000,
            file_offset: 0,
        }],
        vm: None,
        // No in-kernel interrupt controllers here (HLT must exit to the
        // worker), so no LAPIC.
        vcpus: vec![snapshot::save_vcpu(&vcpu, &msrs, false).map_err(snap_err)?],
    };
    let state_file = snapshot::encode(&state).map_err(snap_err)?;
    let memory_file = memfd("steelcup-selftest-memory")?;
    {
        use std::io::Write;
        let mut bytes = vec![0u8; 0x4000];
        mem.read_slice(&mut bytes, GuestAddress(0))
            .map_err(|e| format!("read guest memory: {e}"))?;
        (&memory_file)
            .write_all(&bytes)
            .map_err(|e| format!("write the memory file: {e}"))?;
    }

    // The original goes on to its end.
    run_exits(&mut vcpu, SNAPSHOT_AFTER, EXPECTED.len(), &mut seen)?;

    // The clone: a new VM from the state file, its memory the memory file
    // mapped private.
    let restored = snapshot::decode(&state_file).map_err(snap_err)?;
    let len = memory_file
        .metadata()
        .map_err(|e| format!("memory file: {e}"))?
        .len();
    restored.check_memory_file(len).map_err(snap_err)?;
    let clone_mem = GuestMemoryMmap::<()>::from_ranges_with_files([(
        GuestAddress(0),
        0x4000,
        Some(vm_memory::FileOffset::new(
            memory_file
                .try_clone()
                .map_err(|e| format!("memory file: {e}"))?,
            0,
        )),
    )])
    .map_err(|e| format!("map the memory file: {e}"))?;
    let clone_vm = kvm
        .create_vm()
        .map_err(|e| format!("create clone VM: {e}"))?;
    register(&clone_vm, &clone_mem)?;
    let mut clone = clone_vm
        .create_vcpu(0)
        .map_err(|e| format!("create clone vCPU: {e}"))?;
    clone
        .set_cpuid2(&cpuid)
        .map_err(|e| format!("set the clone's CPUID: {e}"))?;
    let vstate = restored.vcpus.first().ok_or("no vCPU in the snapshot")?;
    let refused = snapshot::restore_vcpu(&clone, vstate).map_err(snap_err)?;
    if !refused.is_empty() {
        let list: Vec<String> = refused
            .iter()
            .map(|(i, v)| format!("{i:#x}={v:#x}"))
            .collect();
        println!(
            "kvm selftest: snapshot: KVM did not take back {} MSRs: {}",
            list.len(),
            list.join(" ")
        );
    }
    let mut clone_seen = Vec::new();
    run_exits(&mut clone, SNAPSHOT_AFTER, EXPECTED.len(), &mut clone_seen)?;
    Ok((seen, clone_seen))
}

/// A VM with in-kernel interrupt controllers and PIT: its state saved,
/// restored into a second such VM, and saved again the same.
pub fn vm_state_round_trip() -> Result<(), String> {
    use crate::snapshot;
    let snap_err = |e: snapshot::SnapshotError| format!("{e}");
    let a = crate::vstate::vm::Vm::new().map_err(|e| format!("VM: {e}"))?;
    let b = crate::vstate::vm::Vm::new().map_err(|e| format!("second VM: {e}"))?;
    let saved = snapshot::save_vm(&a.fd).map_err(snap_err)?;
    snapshot::restore_vm(&b.fd, &saved).map_err(snap_err)?;
    let again = snapshot::save_vm(&b.fd).map_err(snap_err)?;
    // The PIT's channels without their load times (KVM stamps those
    // anew when a count is loaded).
    let json = |s: &snapshot::VmState| {
        let channels: Vec<_> = s
            .pit
            .channels
            .iter()
            .map(|c| (c.count, c.mode, c.gate, c.rw_mode, c.status, c.bcd))
            .collect();
        (
            serde_json::to_string(&s.ioapic).unwrap_or_default(),
            serde_json::to_string(&s.pic_master).unwrap_or_default(),
            format!("{channels:?}"),
        )
    };
    if json(&saved) != json(&again) {
        return Err("the restored VM's interrupt controllers or PIT differ".into());
    }
    Ok(())
}

fn memfd(name: &str) -> Result<std::fs::File, String> {
    let name = std::ffi::CString::new(name).map_err(|e| e.to_string())?;
    // SAFETY: memfd_create with a valid C string; the fd is owned below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(format!("memfd: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
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
            let t1 = std::time::Instant::now();
            match run_with_snapshot().and_then(|r| vm_state_round_trip().map(|()| r)) {
                Ok((_, clone)) => {
                    println!(
                        "kvm selftest: snapshot: ok: a clone restored after exit {SNAPSHOT_AFTER} made the last {} ({}); interrupt controllers and PIT restored the same; {:.1} ms",
                        clone.len(),
                        clone.join(", "),
                        t1.elapsed().as_secs_f64() * 1000.0
                    );
                    0
                }
                Err(e) => {
                    println!("kvm selftest: snapshot: FAILED: {e}");
                    1
                }
            }
        }
        Err(e) => {
            println!("kvm selftest: FAILED: {e}");
            1
        }
    }
}
