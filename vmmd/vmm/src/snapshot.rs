//! Snapshots: a paused VM's state (vCPUs, in-kernel interrupt controllers,
//! PIT, clock) in a versioned, checked file beside its guest memory.
//!
//! # Format
//! A snapshot is two files. The memory file is guest memory as it was,
//! byte for byte, region after region (a clone maps it `MAP_PRIVATE`, so
//! clones share every page none of them wrote). The state file is:
//!
//! | bytes | what |
//! |---|---|
//! | 8 | `STCUSNAP` |
//! | 4 | format version, little-endian ([`FORMAT_VERSION`]) |
//! | 8 | body length, little-endian (at most [`MAX_BODY`]) |
//! | body | a [`Snapshot`] as JSON |
//! | 32 | SHA-256 of the body |
//!
//! [`decode`] refuses, naming why, a file that is not a snapshot, one of
//! another format version, a truncated or corrupted one (the checksum), and
//! one taken by another build of the worker ([`BUILD`]: a hash of the
//! device model's sources and the dependency lock, so a snapshot is only
//! ever restored by the code that wrote it). The memory file's length must
//! be the one the state file records. Nothing of a refused snapshot is
//! restored.
//!
//! # What is saved
//! Per vCPU, in the order KVM needs them back (Firecracker's order): the
//! multiprocessing state, general and special registers, XSAVE area (FPU,
//! SSE, AVX), XCRs, debug registers, LAPIC, the MSRs KVM lists, and pending
//! events. Per VM: the PIC pair and I/O APIC, the PIT, and the KVM clock.
//! A vCPU is saved between `KVM_RUN`s with no port or MMIO access half done
//! ([`complete_pending_io`]).

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The first bytes of a state file.
pub const MAGIC: &[u8; 8] = b"STCUSNAP";
/// The state file's layout and meaning; a change bumps it.
pub const FORMAT_VERSION: u32 = 1;
/// The largest body read (a VM of 32 vCPUs needs well under 1 MiB).
pub const MAX_BODY: u64 = 16 << 20;
/// This build of the worker (see the module docs).
pub const BUILD: &str = env!("STEELCUP_VMM_BUILD");

/// Why a snapshot is refused.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("not a steelcup snapshot (no STCUSNAP header)")]
    NotASnapshot,
    #[error("snapshot format version {found}; this worker reads version {FORMAT_VERSION}")]
    Version { found: u32 },
    #[error("the state file is truncated: {have} bytes where {need} were written")]
    Truncated { need: u64, have: u64 },
    #[error("the state's body of {0} bytes is over the {MAX_BODY}-byte limit")]
    TooLarge(u64),
    #[error("the state file is corrupted: its checksum does not match")]
    Corrupt,
    #[error("taken by worker build {found}, not this one ({BUILD}): take a new snapshot")]
    OtherBuild { found: String },
    #[error("the memory file has {have} bytes; the snapshot recorded {need}")]
    MemorySize { need: u64, have: u64 },
    #[error("the state does not parse: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{what}: {source}")]
    Kvm {
        what: String,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// One vCPU's state.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    /// `None` in a VM without in-kernel interrupt controllers.
    pub lapic: Option<kvm_lapic_state>,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
}

/// The VM's in-kernel devices.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// A guest memory region and where its bytes are in the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRange {
    pub guest_addr: u64,
    pub len: u64,
    pub file_offset: u64,
}

/// Everything a state file holds.
#[derive(Debug, Serialize, Deserialize)]
pub struct Snapshot {
    /// The worker build that took it ([`BUILD`]).
    pub build: String,
    pub memory: Vec<MemoryRange>,
    /// The VM's in-kernel devices (`None` for a VM without them, such as
    /// the self-test's).
    pub vm: Option<VmState>,
    pub vcpus: Vec<VcpuState>,
}

impl Snapshot {
    /// Bytes the memory file must hold.
    pub fn memory_bytes(&self) -> u64 {
        self.memory
            .iter()
            .map(|r| r.file_offset + r.len)
            .max()
            .unwrap_or(0)
    }

    /// Checks the memory file's length against the state.
    pub fn check_memory_file(&self, len: u64) -> Result<(), SnapshotError> {
        let need = self.memory_bytes();
        if len != need {
            return Err(SnapshotError::MemorySize { need, have: len });
        }
        Ok(())
    }
}

/// The state file's bytes for `snapshot`.
pub fn encode(snapshot: &Snapshot) -> Result<Vec<u8>, SnapshotError> {
    let body = serde_json::to_vec(snapshot)?;
    let mut out = Vec::with_capacity(body.len() + 52);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    out.extend_from_slice(&Sha256::digest(&body));
    Ok(out)
}

/// Reads a state file (see the module docs for what is refused).
pub fn decode(bytes: &[u8]) -> Result<Snapshot, SnapshotError> {
    if bytes.len() < 20 || &bytes[..8] != MAGIC {
        return Err(SnapshotError::NotASnapshot);
    }
    let word = |at: usize, n: usize| {
        let mut b = [0u8; 8];
        b[..n].copy_from_slice(&bytes[at..at + n]);
        u64::from_le_bytes(b)
    };
    let version = word(8, 4) as u32;
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version { found: version });
    }
    let len = word(12, 8);
    if len > MAX_BODY {
        return Err(SnapshotError::TooLarge(len));
    }
    let need = 20 + len + 32;
    if (bytes.len() as u64) < need {
        return Err(SnapshotError::Truncated {
            need,
            have: bytes.len() as u64,
        });
    }
    let body = &bytes[20..20 + len as usize];
    let sum = &bytes[20 + len as usize..need as usize];
    if Sha256::digest(body).as_slice() != sum {
        return Err(SnapshotError::Corrupt);
    }
    // The build first, so a snapshot of another build says so even when
    // its state no longer parses here.
    #[derive(Deserialize)]
    struct Build {
        build: String,
    }
    let b: Build = serde_json::from_slice(body)?;
    if b.build != BUILD {
        return Err(SnapshotError::OtherBuild { found: b.build });
    }
    Ok(serde_json::from_slice(body)?)
}

fn kvm_err(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
    let what = what.into();
    move |source| SnapshotError::Kvm { what, source }
}

/// Finishes a port or MMIO access the vCPU exited for (`KVM_RUN` with
/// `immediate_exit`), so its state is whole between instructions. Call it
/// on the vCPU's thread after the exit's data was handled.
pub fn complete_pending_io(vcpu: &mut VcpuFd) -> Result<(), SnapshotError> {
    vcpu.set_kvm_immediate_exit(1);
    let r = match vcpu.run() {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Err(e) => Err(kvm_err("KVM_RUN to finish pending I/O")(e)),
        // KVM returns EINTR before it enters the guest; anything else
        // means the guest ran.
        Ok(exit) => Err(SnapshotError::Kvm {
            what: format!("KVM_RUN to finish pending I/O ran the guest into {exit:?}"),
            source: kvm_ioctls::Error::new(libc::EINVAL),
        }),
    };
    vcpu.set_kvm_immediate_exit(0);
    r
}

/// The MSRs KVM saves and restores for a vCPU (its index list).
pub fn msr_list(kvm: &Kvm) -> Result<Vec<u32>, SnapshotError> {
    Ok(kvm
        .get_msr_index_list()
        .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?
        .as_slice()
        .to_vec())
}

/// Saves vCPU `vcpu`'s state; `msrs` from [`msr_list`]; `lapic` if the VM
/// has in-kernel interrupt controllers (and so the vCPU a LAPIC).
pub fn save_vcpu(vcpu: &VcpuFd, msrs: &[u32], lapic: bool) -> Result<VcpuState, SnapshotError> {
    let mut entries = Vec::with_capacity(msrs.len());
    // In chunks within what one KVM_GET_MSRS takes; an MSR this vCPU does
    // not have ends its chunk early and is left out.
    for chunk in msrs.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
        let mut want = Msrs::from_entries(
            &chunk
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect::<Vec<_>>(),
        )
        .map_err(|_| SnapshotError::Kvm {
            what: "MSR list".into(),
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let mut rest = &mut want;
        let mut owned;
        loop {
            let got = vcpu.get_msrs(rest).map_err(kvm_err("KVM_GET_MSRS"))?;
            entries.extend_from_slice(&rest.as_slice()[..got]);
            if got >= rest.as_slice().len() {
                break;
            }
            // Skip the MSR KVM stopped at.
            let left: Vec<kvm_msr_entry> = rest.as_slice()[got + 1..].to_vec();
            if left.is_empty() {
                break;
            }
            owned = Msrs::from_entries(&left).map_err(|_| SnapshotError::Kvm {
                what: "MSR list".into(),
                source: kvm_ioctls::Error::new(libc::E2BIG),
            })?;
            rest = &mut owned;
        }
    }
    Ok(VcpuState {
        mp_state: vcpu.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?,
        regs: vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?,
        sregs: vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?,
        xsave: vcpu.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?,
        xcrs: vcpu.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?,
        debugregs: vcpu
            .get_debug_regs()
            .map_err(kvm_err("KVM_GET_DEBUGREGS"))?,
        lapic: match lapic {
            true => Some(vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?),
            false => None,
        },
        msrs: entries,
        events: vcpu
            .get_vcpu_events()
            .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?,
    })
}

/// Restores `state` into a new vCPU whose CPUID is already set. Returns
/// the MSRs (index and value) KVM would not take back, which were left at
/// their reset values; everything else is restored or an error.
pub fn restore_vcpu(vcpu: &VcpuFd, state: &VcpuState) -> Result<Vec<(u32, u64)>, SnapshotError> {
    vcpu.set_mp_state(state.mp_state)
        .map_err(kvm_err("KVM_SET_MP_STATE"))?;
    vcpu.set_regs(&state.regs)
        .map_err(kvm_err("KVM_SET_REGS"))?;
    vcpu.set_sregs(&state.sregs)
        .map_err(kvm_err("KVM_SET_SREGS"))?;
    // SAFETY: the XSAVE area comes from KVM_GET_XSAVE of the same build on
    // a host with the same CPU features (a snapshot of another build is
    // refused); KVM checks its header.
    unsafe { vcpu.set_xsave(&state.xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
    vcpu.set_xcrs(&state.xcrs)
        .map_err(kvm_err("KVM_SET_XCRS"))?;
    vcpu.set_debug_regs(&state.debugregs)
        .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
    if let Some(lapic) = &state.lapic {
        vcpu.set_lapic(lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
    }
    let mut refused = Vec::new();
    let mut rest: &[kvm_msr_entry] = &state.msrs;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(kvm_bindings::KVM_MAX_MSR_ENTRIES)];
        let msrs = Msrs::from_entries(chunk).map_err(|_| SnapshotError::Kvm {
            what: "MSR list".into(),
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let set = vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
        // KVM stops at the first MSR it refuses: note it, go on after it.
        match chunk.get(set) {
            Some(bad) => {
                refused.push((bad.index, bad.data));
                rest = &rest[set + 1..];
            }
            None => rest = &rest[chunk.len()..],
        }
    }
    vcpu.set_vcpu_events(&state.events)
        .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
    Ok(refused)
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, SnapshotError> {
    let mut c = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut c)
        .map_err(kvm_err(format!("KVM_GET_IRQCHIP {chip_id}")))?;
    Ok(c)
}

/// Saves the VM's in-kernel devices (it must have them: see `Vm::new`).
pub fn save_vm(vm: &VmFd) -> Result<VmState, SnapshotError> {
    Ok(VmState {
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?,
        clock: vm.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?,
    })
}

/// Restores `state` into a new VM with in-kernel devices, before its
/// vCPUs are restored.
pub fn restore_vm(vm: &VmFd, state: &VmState) -> Result<(), SnapshotError> {
    vm.set_pit2(&state.pit).map_err(kvm_err("KVM_SET_PIT2"))?;
    // The clock goes on from where it was; KVM_CLOCK_TSC_STABLE is a flag
    // KVM reports, not one it takes.
    let mut clock = state.clock;
    clock.flags = 0;
    vm.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))?;
    for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
        vm.set_irqchip(chip)
            .map_err(kvm_err(format!("KVM_SET_IRQCHIP {}", chip.chip_id)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        Snapshot {
            build: BUILD.into(),
            memory: vec![
                MemoryRange {
                    guest_addr: 0,
                    len: 0x4000,
                    file_offset: 0,
                },
                MemoryRange {
                    guest_addr: 1 << 32,
                    len: 0x1000,
                    file_offset: 0x4000,
                },
            ],
            vm: None,
            vcpus: vec![VcpuState {
                mp_state: kvm_mp_state::default(),
                regs: kvm_regs {
                    rip: 0x1234,
                    rax: 41,
                    ..Default::default()
                },
                sregs: kvm_sregs::default(),
                xsave: kvm_xsave::default(),
                xcrs: kvm_xcrs::default(),
                debugregs: kvm_debugregs::default(),
                lapic: Some(kvm_lapic_state::default()),
                msrs: vec![kvm_msr_entry {
                    index: 0x10,
                    data: 99,
                    ..Default::default()
                }],
                events: kvm_vcpu_events::default(),
            }],
        }
    }

    #[test]
    fn a_snapshot_reads_back_as_written() {
        let bytes = encode(&sample()).unwrap();
        let back = decode(&bytes).unwrap();
        assert_eq!(back.vcpus[0].regs.rip, 0x1234);
        assert_eq!(back.vcpus[0].regs.rax, 41);
        assert_eq!(back.vcpus[0].msrs[0].data, 99);
        assert_eq!(back.memory, sample().memory);
        assert_eq!(back.memory_bytes(), 0x5000);
        assert!(back.check_memory_file(0x5000).is_ok());
        assert!(matches!(
            back.check_memory_file(0x4fff),
            Err(SnapshotError::MemorySize { need: 0x5000, .. })
        ));
    }

    #[test]
    fn corrupted_truncated_foreign_and_other_builds_are_refused() {
        let good = encode(&sample()).unwrap();
        // Any flipped byte of the body: the checksum.
        for at in [20, good.len() / 2, good.len() - 33] {
            let mut bad = good.clone();
            bad[at] ^= 0x40;
            assert!(
                matches!(decode(&bad), Err(SnapshotError::Corrupt)),
                "byte {at}"
            );
        }
        let mut bad = good.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(matches!(decode(&bad), Err(SnapshotError::Corrupt)));
        assert!(matches!(
            decode(&good[..good.len() - 1]),
            Err(SnapshotError::Truncated { .. })
        ));
        assert!(matches!(
            decode(b"\x7fELF..."),
            Err(SnapshotError::NotASnapshot)
        ));
        assert!(matches!(decode(&[]), Err(SnapshotError::NotASnapshot)));
        let mut v2 = good.clone();
        v2[8] = 2;
        assert!(matches!(
            decode(&v2),
            Err(SnapshotError::Version { found: 2 })
        ));
        let mut huge = good.clone();
        huge[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(decode(&huge), Err(SnapshotError::TooLarge(_))));
        let mut other = sample();
        other.build = "0.0.1+0000000000000000".into();
        let e = decode(&encode(&other).unwrap()).unwrap_err();
        assert!(matches!(e, SnapshotError::OtherBuild { .. }));
        assert!(e.to_string().contains("0.0.1+0000000000000000"), "{e}");
    }

    #[test]
    fn the_build_names_the_version_and_a_source_hash() {
        let (version, hash) = BUILD.split_once('+').unwrap();
        assert_eq!(version, env!("CARGO_PKG_VERSION"));
        assert_eq!(hash.len(), 16);
        assert!(hash.bytes().all(|b| b.is_ascii_hexdigit()));
    }
}
