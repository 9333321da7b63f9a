//! Guest memory: one anonymous mapping below the 32-bit MMIO hole.

use crate::arch::MMIO_HOLE_START;
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory of {mib} MiB is out of range (16 MiB up to 3 GiB)")]
    Size { mib: u64 },
    #[error("map guest memory")]
    Map(#[source] vm_memory::mmap::FromRangesError),
}

/// Creates `mib` MiB of guest memory starting at guest address 0.
pub fn create(mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let bytes = mib << 20;
    if !(16..=3072).contains(&mib) || bytes > MMIO_HOLE_START {
        return Err(MemoryError::Size { mib });
    }
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), bytes as usize)]).map_err(MemoryError::Map)
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_are_checked() {
        assert!(super::create(8).is_err());
        assert!(super::create(4096).is_err());
        let m = super::create(16).unwrap();
        assert_eq!(
            vm_memory::GuestMemoryBackend::last_addr(&m).0,
            (16 << 20) - 1
        );
    }
}
