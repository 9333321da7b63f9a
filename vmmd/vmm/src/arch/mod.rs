//! x86_64 boot state for a direct 64-bit Linux boot (no firmware).
//!
//! # Design
//! The guest-physical layout follows Firecracker's: GDT at 0x500, IDT at
//! 0x520, the zero page (boot_params) at 0x7000, the boot stack below 0x8ff0,
//! identity-mapped page tables for the first 1 GiB at 0x9000..0xc000, the
//! command line at 0x20000, the kernel at 1 MiB and the initramfs at the top
//! of memory. Pure functions over [`GuestMemoryMmap`] so they are unit tested.

pub mod gdt;
pub mod mptable;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

pub const BOOT_GDT_START: u64 = 0x500;
pub const BOOT_IDT_START: u64 = 0x520;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the Extended BIOS Data Area; RAM below 1 MiB ends here.
pub const EBDA_START: u64 = 0x9fc00;
pub const HIMEM_START: u64 = 0x10_0000;
/// Where KVM puts the TSS (three pages below the 4 GiB boundary).
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// Guest memory stays below the 32-bit MMIO hole.
pub const MMIO_HOLE_START: u64 = 0xd000_0000;

const E820_RAM: u32 = 1;

/// Errors setting up the boot state.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    #[error("write page tables")]
    PageTables(#[source] vm_memory::GuestMemoryError),
    #[error("write GDT/IDT")]
    Gdt(#[source] vm_memory::GuestMemoryError),
    #[error("write zero page")]
    ZeroPage(#[source] vm_memory::GuestMemoryError),
    #[error("initramfs of {size} bytes does not fit in guest memory below {limit:#x}")]
    InitrdTooBig { size: u64, limit: u64 },
}

/// Identity-maps the first 1 GiB with 2 MiB pages; returns the CR3 value.
pub fn setup_page_tables(mem: &GuestMemoryMmap) -> Result<u64, ArchError> {
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))
        .map_err(ArchError::PageTables)?;
    mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START))
        .map_err(ArchError::PageTables)?;
    for i in 0..512u64 {
        // Present | writable | page size (2 MiB).
        mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + i * 8))
            .map_err(ArchError::PageTables)?;
    }
    Ok(PML4_START)
}

/// Where to put an initramfs of `size` bytes: page aligned, as high as
/// possible below both the end of memory and the kernel's `initrd_addr_max`.
pub fn initrd_address(
    mem: &GuestMemoryMmap,
    size: u64,
    initrd_addr_max: u32,
) -> Result<GuestAddress, ArchError> {
    let end = crate::vstate::memory::low_end(mem);
    let limit = end.min(u64::from(initrd_addr_max) + 1);
    let lowest = HIMEM_START + (16 << 20);
    match limit.checked_sub(size) {
        Some(addr) if addr & !0xfff >= lowest => Ok(GuestAddress(addr & !0xfff)),
        _ => Err(ArchError::InitrdTooBig { size, limit }),
    }
}

/// Fills in and writes the zero page: the kernel's setup header as loaded,
/// the loader fields, the command line, the initramfs and the e820 map.
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    setup_header: Option<linux_loader::loader::bootparam::setup_header>,
    cmdline_len: usize,
    initrd: Option<(GuestAddress, u64)>,
) -> Result<(), ArchError> {
    let mut params = boot_params::default();
    if let Some(hdr) = setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.kernel_alignment = 0x0100_0000;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr.raw_value() as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let low = crate::vstate::memory::low_end(mem);
    let high = mem.last_addr().raw_value() + 1;
    let mut map = vec![(0, EBDA_START), (HIMEM_START, low - HIMEM_START)];
    if high > crate::vstate::memory::HIGH_MEMORY_START {
        let start = crate::vstate::memory::HIGH_MEMORY_START;
        map.push((start, high - start));
    }
    for (i, (addr, size)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: E820_RAM,
        };
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(ArchError::ZeroPage)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(mib: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mib << 20)]).unwrap()
    }

    #[test]
    fn page_tables_identity_map_the_first_gib() {
        let m = mem(16);
        assert_eq!(setup_page_tables(&m).unwrap(), PML4_START);
        let pml4: u64 = m.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        let pde_last: u64 = m.read_obj(GuestAddress(PDE_START + 511 * 8)).unwrap();
        assert_eq!(pde_last, (511 << 21) | 0x83);
    }

    #[test]
    fn initrd_goes_high_and_page_aligned() {
        let m = mem(128);
        let a = initrd_address(&m, 5000, 0x7fff_ffff).unwrap();
        assert_eq!(a.raw_value() % 4096, 0);
        assert!(a.raw_value() + 5000 <= 128 << 20);
        assert!(a.raw_value() > 120 << 20);
        // Respects initrd_addr_max.
        let a = initrd_address(&m, 4096, (64 << 20) - 1).unwrap();
        assert_eq!(a.raw_value(), (64 << 20) - 4096);
        // Too big.
        assert!(initrd_address(&m, 200 << 20, 0x7fff_ffff).is_err());
    }

    #[test]
    fn zero_page_has_loader_fields_and_e820() {
        let m = mem(64);
        write_zero_page(&m, None, 42, Some((GuestAddress(0x300_0000), 1234))).unwrap();
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ p.hdr.cmdline_size }, 42);
        assert_eq!({ p.hdr.ramdisk_image }, 0x300_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 1234);
        assert_eq!(p.e820_entries, 2);
        assert_eq!({ p.e820_table[1].addr }, HIMEM_START);
        assert_eq!({ p.e820_table[1].size }, (64 << 20) - HIMEM_START);
    }
}
