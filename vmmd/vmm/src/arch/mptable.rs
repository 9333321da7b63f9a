//! The Intel MultiProcessor Specification 1.4 table: how a Linux guest with
//! no ACPI learns its CPUs, its I/O APIC and how the legacy IRQs are wired.
//!
//! # Design
//! Written at the top of base memory ([`MPTABLE_START`], the last KiB below
//! 640 KiB, which the e820 map leaves out of RAM), where Linux scans for the
//! `_MP_` floating pointer. Entries: one processor per vCPU (vCPU 0 the
//! bootstrap processor), one ISA bus, one I/O APIC, the 24 ISA/IOAPIC
//! interrupts mapped 1:1, and the local interrupts (ExtINT on LINT0, NMI on
//! LINT1) — the same layout Firecracker writes. Bytes are built by hand, each
//! structure little-endian and checksummed.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Where the floating pointer goes (the last KiB of base memory).
pub const MPTABLE_START: u64 = 0x9fc00;
/// The I/O APIC's MMIO base and the local APIC's.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// The most vCPUs whose table fits in the KiB below 640 KiB (32 make 924
/// bytes); the unit schema allows the same.
pub const MAX_CPUS: u8 = 32;
const IRQS: u8 = 24;

/// Errors writing the table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("{0} vCPUs is more than the MP table holds ({MAX_CPUS})")]
    TooManyCpus(u8),
    #[error("write the MP table")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// The table for `cpus` vCPUs, as bytes to place at [`MPTABLE_START`].
pub fn build(cpus: u8) -> Result<Vec<u8>, MptableError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(MptableError::TooManyCpus(cpus));
    }
    let ioapic_id = cpus + 1;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        // Processor entry (20 bytes).
        entries.push(0); // type: processor
        entries.push(id); // local APIC id
        entries.push(0x14); // local APIC version
        entries.push(if id == 0 { 0x03 } else { 0x01 }); // enabled (| bootstrap processor)
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    // Bus entry (8 bytes): bus 0 is ISA.
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    // I/O APIC entry (8 bytes).
    entries.extend_from_slice(&[2, ioapic_id, 0x11, 0x01]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    // I/O interrupt entries (8 bytes each): ISA IRQ i -> I/O APIC pin i.
    for irq in 0..IRQS {
        entries.extend_from_slice(&[3, 0]); // type, mp_INT
        entries.extend_from_slice(&0u16.to_le_bytes()); // conforming polarity/trigger
        entries.extend_from_slice(&[0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupt entries: ExtINT on LINT0, NMI on LINT1 of every CPU.
    entries.extend_from_slice(&[4, 3]);
    entries.extend_from_slice(&0u16.to_le_bytes());
    entries.extend_from_slice(&[0, 0, 0, 0]);
    entries.extend_from_slice(&[4, 1]);
    entries.extend_from_slice(&0u16.to_le_bytes());
    entries.extend_from_slice(&[0, 0, 0xff, 1]);
    count += 2;

    // Configuration table header (44 bytes) followed by the entries.
    let table_addr = MPTABLE_START as u32 + 16;
    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"STEELCUP"); // OEM id
    table.extend_from_slice(b"MICROVM     "); // product id
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0); // reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    // Floating pointer (16 bytes).
    let mut mpf = Vec::with_capacity(16);
    mpf.extend_from_slice(b"_MP_");
    mpf.extend_from_slice(&table_addr.to_le_bytes());
    mpf.push(1); // length in 16-byte units
    mpf.push(4); // spec revision
    mpf.push(0); // checksum, below
    mpf.extend_from_slice(&[0; 5]); // features: a table follows
    mpf[10] = checksum(&mpf);

    let mut out = mpf;
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the table for `cpus` vCPUs into guest memory.
pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), MptableError> {
    let bytes = build(cpus)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_layout() {
        for cpus in [1u8, 2, 8, MAX_CPUS] {
            let b = build(cpus).unwrap();
            assert_eq!(&b[..4], b"_MP_");
            assert_eq!(sum(&b[..16]), 0, "floating pointer checksum");
            let table = &b[16..];
            assert_eq!(&table[..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0, "table checksum");
            let count = u16::from_le_bytes([table[34], table[35]]);
            assert_eq!(count, u16::from(cpus) + 1 + 1 + 24 + 2);
            assert_eq!(len, 44 + 20 * cpus as usize + 8 * (1 + 1 + 24 + 2));
            // The pointer points at the table.
            assert_eq!(
                u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
                MPTABLE_START as u32 + 16
            );
            // vCPU 0 is the bootstrap processor; the others are not.
            assert_eq!(table[44 + 3], 0x03);
            if cpus > 1 {
                assert_eq!(table[44 + 20 + 1], 1);
                assert_eq!(table[44 + 20 + 3], 0x01);
            }
            // Fits below 640 KiB.
            assert!(MPTABLE_START as usize + b.len() <= 0xa0000);
        }
    }

    #[test]
    fn cpu_count_is_checked() {
        assert!(build(0).is_err());
        assert!(build(MAX_CPUS + 1).is_err());
    }

    #[test]
    fn writes_into_guest_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        write(&mem, 2).unwrap();
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(MPTABLE_START))
            .unwrap();
        assert_eq!(&sig, b"_MP_");
    }
}
