//! Guest memory: anonymous or on a memfd, optionally with huge pages; up
//! to 3.25 GiB below the 32-bit MMIO hole, the rest from 4 GiB up.
//!
//! # Design
//! [`Backing::Anonymous`] is private anonymous memory (the default).
//! [`Backing::Memfd`] is a shared mapping of a memfd the worker creates:
//! the memory is a file descriptor, which another process (a snapshotter,
//! a vhost-user backend) could map too. Huge pages: on anonymous memory,
//! transparent huge pages are asked for with `madvise(MADV_HUGEPAGE)` (a
//! hint; no reservation needed), and refused with `MADV_NOHUGEPAGE` when
//! not asked for, whatever the host's default (the appliance's Debian
//! kernel has `always`): the host then spends 4 KiB, not 2 MiB, on each
//! page the guest touches; on a memfd, `MFD_HUGETLB` takes 2 MiB pages
//! from the host's reserved pool (`/proc/sys/vm/nr_hugepages`) and fails
//! clearly if there are not enough. Anonymous memory starts on a 2 MiB
//! host boundary, so that the few ranges the guest writes end to end —
//! where its kernel decompresses itself, its initramfs — can take huge
//! pages even when the rest does not ([`advise_huge`]).

use crate::arch::MMIO_HOLE_START;
use std::os::fd::FromRawFd;
use vm_memory::mmap::MmapRegion;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

/// Where guest memory comes from (a unit's `memory-backing`).
pub use steelcup_proto::MemoryBacking as Backing;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory of {mib} MiB is out of range (16 MiB up to {MAX_MIB} MiB)")]
    Size { mib: u64 },
    #[error("map guest memory")]
    MapAnonymous(#[source] std::io::Error),
    #[error("create the guest memory memfd{}", if *.huge { " with 2 MiB huge pages (are enough reserved in /proc/sys/vm/nr_hugepages?)" } else { "" })]
    Memfd {
        huge: bool,
        #[source]
        source: std::io::Error,
    },
    #[error("map the guest memory memfd")]
    MapMemfd(#[source] vm_memory::mmap::MmapRegionError),
    #[error("guest memory regions")]
    Regions(#[source] vm_memory::GuestRegionCollectionError),
}

/// The most guest memory a VM may have (256 GiB).
pub const MAX_MIB: u64 = 256 << 10;

/// Where the guest memory above the MMIO hole starts.
pub const HIGH_MEMORY_START: u64 = 1 << 32;

/// Guest memory of `bytes` as (guest address, length) ranges: below the
/// 32-bit MMIO hole, then what does not fit there from 4 GiB up.
pub fn layout(bytes: u64) -> Vec<(GuestAddress, u64)> {
    let low = bytes.min(MMIO_HOLE_START);
    let mut ranges = vec![(GuestAddress(0), low)];
    if bytes > low {
        ranges.push((GuestAddress(HIGH_MEMORY_START), bytes - low));
    }
    ranges
}

/// The end of the guest memory below the MMIO hole (where boot data,
/// the kernel and the initramfs go).
pub fn low_end(mem: &GuestMemoryMmap) -> u64 {
    mem.iter()
        .filter(|r| r.start_addr().0 < MMIO_HOLE_START)
        .map(|r| r.start_addr().0 + r.len())
        .max()
        .unwrap_or(0)
}

/// Creates `mib` MiB of anonymous guest memory at guest address 0.
pub fn create(mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    create_with(mib, Backing::Anonymous, false)
}

/// Creates `mib` MiB of guest memory at guest address 0 from `backing`,
/// with huge pages if `huge_pages`.
pub fn create_with(
    mib: u64,
    backing: Backing,
    huge_pages: bool,
) -> Result<GuestMemoryMmap, MemoryError> {
    if !(16..=MAX_MIB).contains(&mib) {
        return Err(MemoryError::Size { mib });
    }
    let bytes = mib << 20;
    let mem = match backing {
        Backing::Anonymous => {
            // One host mapping; the guest's ranges are consecutive parts.
            let host = map_aligned(bytes as usize).map_err(MemoryError::MapAnonymous)?;
            let mut regions = Vec::new();
            let mut at = 0usize;
            for (guest, len) in layout(bytes) {
                // SAFETY: `host+at..host+at+len` lies inside the mapping
                // made just above, readable and writable, which nothing
                // else uses; the ranges do not overlap.
                let region =
                    unsafe { MmapRegion::build_raw(host.add(at), len as usize, RW, ANONYMOUS) }
                        .map_err(|e| MemoryError::MapAnonymous(std::io::Error::other(e)))?;
                regions.push(GuestRegionMmap::new(region, guest).ok_or(MemoryError::Size { mib })?);
                at += len as usize;
            }
            GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Regions)?
        }
        Backing::Memfd => {
            let memfd_err = |source| MemoryError::Memfd {
                huge: huge_pages,
                source,
            };
            let mut flags = libc::MFD_CLOEXEC;
            if huge_pages {
                flags |= libc::MFD_HUGETLB | libc::MFD_HUGE_2MB;
            }
            // SAFETY: memfd_create with a static C string; the fd is owned
            // by the File below.
            let fd = unsafe { libc::memfd_create(c"steelcup-guest-memory".as_ptr(), flags) };
            if fd < 0 {
                return Err(memfd_err(std::io::Error::last_os_error()));
            }
            // SAFETY: fd is a fresh descriptor nothing else owns.
            let file = unsafe { std::fs::File::from_raw_fd(fd) };
            file.set_len(bytes).map_err(memfd_err)?;
            // The file holds the ranges one after the other.
            let mut regions = Vec::new();
            let mut at = 0u64;
            for (guest, len) in layout(bytes) {
                let region = MmapRegion::build(
                    Some(FileOffset::new(file.try_clone().map_err(memfd_err)?, at)),
                    len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_NORESERVE,
                )
                .map_err(MemoryError::MapMemfd)?;
                regions.push(GuestRegionMmap::new(region, guest).ok_or(MemoryError::Size { mib })?);
                at += len;
            }
            GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Regions)?
        }
    };
    if backing == Backing::Anonymous {
        // Huge pages only when asked for, whatever the host's THP default:
        // a guest that touches a byte then costs 4 KiB, not 2 MiB.
        let advice = if huge_pages {
            libc::MADV_HUGEPAGE
        } else {
            libc::MADV_NOHUGEPAGE
        };
        for r in mem.iter() {
            // SAFETY: madvise on a mapping this process owns, with its
            // exact address and length; a hint that changes no contents.
            unsafe {
                libc::madvise(r.as_ptr().cast(), r.len() as usize, advice);
            }
        }
    }
    Ok(mem)
}

/// A transparent huge page (and the host's 2 MiB NPT/EPT mappings).
pub const HUGE_PAGE: u64 = 2 << 20;
const RW: i32 = libc::PROT_READ | libc::PROT_WRITE;
const ANONYMOUS: i32 = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;

/// Maps `bytes` of anonymous memory at a host address on a 2 MiB boundary,
/// so that guest-physical 2 MiB blocks are host 2 MiB blocks too: only
/// then can a huge page back a guest range and KVM map it with one 2 MiB
/// entry (the host kernel aligns only file mappings so). A larger
/// reservation is trimmed to the aligned part. The mapping is never
/// unmapped: a worker's guest memory lives as long as the worker.
fn map_aligned(bytes: usize) -> std::io::Result<*mut u8> {
    let huge = HUGE_PAGE as usize;
    let len = bytes + huge;
    // SAFETY: a new private anonymous mapping at an address of the
    // kernel's choosing; nothing else is touched.
    let start = unsafe { libc::mmap(std::ptr::null_mut(), len, RW, ANONYMOUS, -1, 0) };
    if start == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let start = start as usize;
    let aligned = start.next_multiple_of(huge);
    // SAFETY: both pieces lie inside the reservation just made, outside
    // the aligned part that is kept.
    unsafe {
        if aligned > start {
            libc::munmap(start as *mut libc::c_void, aligned - start);
        }
        let end = aligned + bytes;
        if start + len > end {
            libc::munmap(end as *mut libc::c_void, start + len - end);
        }
    }
    Ok(aligned as *mut u8)
}

/// Asks for transparent huge pages over the 2 MiB blocks that cover
/// `len` bytes at `addr`, where the guest writes nearly every byte anyway
/// (where the kernel decompresses itself, the initramfs), so the host
/// faults them in and maps them 2 MiB at a time rather than 4 KiB — each
/// fault is an exit from the guest, costly most of all on a nested host —
/// for at most a block's worth of memory more at either end. Anonymous
/// memory only (a memfd keeps its own page size); a hint, and nothing
/// outside guest memory is touched. Returns the bytes advised.
pub fn advise_huge(mem: &GuestMemoryMmap, addr: GuestAddress, len: u64) -> u64 {
    let Some(region) = mem.find_region(addr) else {
        return 0;
    };
    if region.file_offset().is_some() || len == 0 {
        return 0;
    }
    let region_start = region.start_addr().0;
    let lo = (addr.0 & !(HUGE_PAGE - 1)).max(region_start);
    let hi = (addr.0.saturating_add(len))
        .next_multiple_of(HUGE_PAGE)
        .min(region_start + region.len());
    let Ok(host) = mem.get_host_address(GuestAddress(lo)) else {
        return 0;
    };
    // SAFETY: `host..host+(hi-lo)` lies inside the region's mapping
    // (clipped above); MADV_HUGEPAGE changes no contents.
    let r = unsafe { libc::madvise(host.cast(), (hi - lo) as usize, libc::MADV_HUGEPAGE) };
    if r == 0 {
        hi - lo
    } else {
        0
    }
}

/// `MADV_POPULATE_WRITE` (Linux 5.14): fault pages in, writable.
const MADV_POPULATE_WRITE: libc::c_int = 23;

/// Faults in `len` bytes of guest memory at `addr` in one call, before the
/// VMM writes them (the kernel, the initramfs): one system call instead of
/// a page fault per page. A hint: where it fails (an older host kernel),
/// the writes fault the pages in as usual.
pub fn populate(mem: &GuestMemoryMmap, addr: GuestAddress, len: u64) {
    let Ok(host) = mem.get_host_address(addr) else {
        return;
    };
    let start = host as usize & !0xfff;
    let end = host as usize + len as usize;
    // The range must lie in the one region that holds `addr`.
    let fits = mem
        .find_region(addr)
        .is_some_and(|r| addr.0 + len <= r.start_addr().0 + r.len());
    if len == 0 || !fits {
        return;
    }
    // SAFETY: the range is inside a mapping this process owns (checked
    // above); MADV_POPULATE_WRITE only faults pages in, changing no
    // contents.
    unsafe {
        libc::madvise(start as *mut libc::c_void, end - start, MADV_POPULATE_WRITE);
    }
}

/// Maps `len` bytes of `file` from `offset` into guest memory at `addr`,
/// private and copy-on-write: the guest reads the file's pages from the
/// host's page cache (shared by every VM that maps the same file), and a
/// page is copied only when the guest writes to it. Nothing is read or
/// copied now. Returns false, mapping nothing, where that cannot be done —
/// memory on a memfd (a mapping of its own there would hide the pages
/// from the memfd's other users), `addr` not on a page boundary, or the
/// range not inside one region — and the caller copies the bytes instead.
///
/// The page after the file's last byte reads as zeros up to the page's
/// end; guest memory past that page is left as it was.
pub fn map_file(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    file: &std::fs::File,
    offset: u64,
    len: u64,
) -> bool {
    use std::os::fd::AsRawFd;
    let Some(region) = mem.find_region(addr) else {
        return false;
    };
    let pages = len.next_multiple_of(4096);
    if len == 0
        || !addr.0.is_multiple_of(4096)
        || !offset.is_multiple_of(4096)
        || i64::try_from(offset).is_err()
        || region.file_offset().is_some()
        || addr.0 + pages > region.start_addr().0 + region.len()
    {
        return false;
    }
    let Ok(host) = mem.get_host_address(addr) else {
        return false;
    };
    // SAFETY: `host..host+pages` lies inside the guest memory mapping this
    // process owns (checked above), which nothing else references yet but
    // KVM's memory slot, which follows the new pages by the host address;
    // MAP_FIXED replaces exactly that range, which stays mapped as long as
    // the rest of guest memory.
    let mapped = unsafe {
        libc::mmap(
            host.cast(),
            pages as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
            file.as_raw_fd(),
            offset as libc::off_t,
        )
    };
    mapped == host.cast()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn sizes_are_checked() {
        assert!(create(8).is_err());
        assert!(create(MAX_MIB + 1).is_err());
        let m = create(16).unwrap();
        assert_eq!(m.last_addr().0, (16 << 20) - 1);
        assert_eq!(low_end(&m), 16 << 20);
    }

    #[test]
    fn memory_past_the_hole_continues_at_4_gib() {
        assert_eq!(layout(1 << 30), [(GuestAddress(0), 1 << 30)]);
        assert_eq!(
            layout(5 << 30),
            [
                (GuestAddress(0), MMIO_HOLE_START),
                (GuestAddress(HIGH_MEMORY_START), (5 << 30) - MMIO_HOLE_START)
            ]
        );
        for backing in [Backing::Anonymous, Backing::Memfd] {
            // 5 GiB, never touched but for two words: nothing is reserved.
            let m = create_with(5 << 10, backing, false).unwrap();
            assert_eq!(m.iter().count(), 2);
            assert_eq!(low_end(&m), MMIO_HOLE_START);
            assert_eq!(
                m.last_addr().0,
                HIGH_MEMORY_START + (5 << 30) - MMIO_HOLE_START - 1
            );
            m.write_obj(7u64, GuestAddress(HIGH_MEMORY_START)).unwrap();
            m.write_obj(9u64, GuestAddress(MMIO_HOLE_START - 8))
                .unwrap();
            assert_eq!(
                m.read_obj::<u64>(GuestAddress(HIGH_MEMORY_START)).unwrap(),
                7
            );
            assert!(
                m.write_obj(1u64, GuestAddress(MMIO_HOLE_START)).is_err(),
                "the hole"
            );
        }
    }

    #[test]
    fn memfd_memory_is_a_shared_file_mapping() {
        let m = create_with(32, Backing::Memfd, false).unwrap();
        assert_eq!(m.last_addr().0, (32 << 20) - 1);
        let r = m.iter().next().unwrap();
        assert!(r.file_offset().is_some(), "backed by the memfd");
        m.write_obj(0xdead_beefu32, GuestAddress(0x1000)).unwrap();
        // The bytes are in the file: read them back through the descriptor.
        let f = r.file_offset().unwrap().file();
        let mut b = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(f, &mut b, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(b), 0xdead_beef);
    }

    #[test]
    fn populate_keeps_contents_and_ignores_ranges_out_of_memory() {
        let m = create(16).unwrap();
        m.write_obj(0x5au8, GuestAddress(0x20_0000)).unwrap();
        populate(&m, GuestAddress(0x10_0000), 4 << 20);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x20_0000)).unwrap(), 0x5a);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x30_0000)).unwrap(), 0);
        populate(&m, GuestAddress(15 << 20), 8 << 20);
        populate(&m, GuestAddress(64 << 20), 1);
    }

    #[test]
    fn a_mapped_file_reads_through_and_copies_on_write() {
        use std::io::Write;
        let m = create(16).unwrap();
        m.write_obj(0x77u8, GuestAddress(0x20_3000)).unwrap();
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        f.write_all(&data).unwrap();
        assert!(map_file(
            &m,
            GuestAddress(0x20_0000),
            &f,
            0,
            data.len() as u64
        ));
        let mut back = vec![0u8; data.len()];
        m.read_slice(&mut back, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(back, data);
        // The rest of the last page is zero; the page after is untouched.
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x20_2fff)).unwrap(), 0);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x20_3000)).unwrap(), 0x77);
        // A guest write changes its copy, never the file.
        m.write_obj(0xffu8, GuestAddress(0x20_0001)).unwrap();
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x20_0001)).unwrap(), 0xff);
        let mut b = [0u8; 1];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, 1).unwrap();
        assert_eq!(b[0], 1);
    }

    #[test]
    fn files_are_not_mapped_where_they_cannot_be() {
        use std::io::Write;
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[1u8; 8192]).unwrap();
        let m = create(16).unwrap();
        assert!(
            !map_file(&m, GuestAddress(0x20_0010), &f, 0, 8192),
            "unaligned"
        );
        assert!(
            !map_file(&m, GuestAddress((16 << 20) - 4096), &f, 0, 8192),
            "past the end"
        );
        assert!(!map_file(&m, GuestAddress(0x20_0000), &f, 0, 0), "empty");
        let shared = create_with(16, Backing::Memfd, false).unwrap();
        assert!(
            !map_file(&shared, GuestAddress(0x20_0000), &f, 0, 8192),
            "memfd"
        );
        assert!(
            !map_file(&m, GuestAddress(0x20_0000), &f, 512, 4096),
            "offset"
        );
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x20_0010)).unwrap(), 0);
        // From a page-aligned offset: the file's second page.
        assert!(map_file(&m, GuestAddress(0x40_0000), &f, 4096, 4096));
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x40_0000)).unwrap(), 1);
    }

    /// The `VmFlags:` of the mapping holding host address `at`.
    fn vm_flags_at(at: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for l in smaps.lines() {
            let head = l.split_whitespace().next().unwrap_or("");
            if let Some((a, b)) = head.split_once('-') {
                if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                {
                    inside = a <= at && at < b;
                    continue;
                }
            }
            if inside {
                if let Some(flags) = l.strip_prefix("VmFlags:") {
                    return flags.trim().to_string();
                }
            }
        }
        panic!("no mapping at {at:#x}");
    }

    #[test]
    fn anonymous_memory_starts_on_a_huge_page_boundary() {
        for mib in [16, 100, 129] {
            let m = create(mib).unwrap();
            let host = m.get_host_address(GuestAddress(0)).unwrap() as u64;
            assert_eq!(host % HUGE_PAGE, 0, "{mib} MiB at {host:#x}");
            // All of it usable, to its last byte.
            m.write_obj(0xabu8, GuestAddress((mib << 20) - 1)).unwrap();
            assert_eq!(
                m.read_obj::<u8>(GuestAddress((mib << 20) - 1)).unwrap(),
                0xab
            );
        }
    }

    #[test]
    fn huge_pages_are_asked_for_the_blocks_covering_a_range_only() {
        let m = create(64).unwrap();
        let host = |a: u64| m.get_host_address(GuestAddress(a)).unwrap() as usize;
        // 16 MiB + 1 KiB .. 19 MiB: the blocks from 16 MiB up to 20 MiB.
        assert_eq!(
            advise_huge(&m, GuestAddress((16 << 20) + 1024), 3 << 20),
            4 << 20
        );
        let flags = |a: u64| vm_flags_at(host(a));
        assert!(flags(16 << 20).contains("hg"), "{}", flags(16 << 20));
        assert!(flags((20 << 20) - 1).contains("hg"));
        // Outside the blocks the memory keeps its 4 KiB pages.
        assert!(
            flags((16 << 20) - 1).contains("nh"),
            "{}",
            flags((16 << 20) - 1)
        );
        assert!(flags(20 << 20).contains("nh"));
        // Clipped to guest memory; nothing outside it, or of an empty range.
        assert_eq!(advise_huge(&m, GuestAddress(63 << 20), 8 << 20), 2 << 20);
        assert_eq!(advise_huge(&m, GuestAddress(64 << 20), 1), 0);
        assert_eq!(advise_huge(&m, GuestAddress(0), 0), 0);
        // A memfd keeps its own pages.
        let f = create_with(32, Backing::Memfd, false).unwrap();
        assert_eq!(advise_huge(&f, GuestAddress(0), 2 << 20), 0);
    }

    #[test]
    fn transparent_huge_pages_are_a_hint_on_anonymous_memory() {
        let m = create_with(32, Backing::Anonymous, true).unwrap();
        m.write_obj(1u8, GuestAddress(31 << 20)).unwrap();
    }

    #[test]
    fn hugetlb_memfd_works_or_says_what_is_missing() {
        match create_with(16, Backing::Memfd, true) {
            Ok(m) => assert_eq!(m.last_addr().0, (16 << 20) - 1),
            Err(e) => {
                let msg = crate::worker::error_chain(&e);
                assert!(msg.contains("nr_hugepages"), "{msg}");
                eprintln!("no huge pages reserved on this host: {msg}");
            }
        }
    }
}
