//! Guest physical memory: layout constants and the anonymous mmap backing.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Start of the 32-bit MMIO hole (virtio-mmio devices, IOAPIC, LAPIC); RAM resumes at 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xd000_0000;
pub const FOUR_GIB: u64 = 1 << 32;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot allocate {mib} MiB of guest memory: {source}")]
    Alloc {
        mib: u32,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// The RAM ranges for `mem_mib` MiB: below the MMIO hole, and the rest above 4 GiB.
pub fn ram_ranges(mem_mib: u32) -> Vec<(GuestAddress, usize)> {
    let size = u64::from(mem_mib) << 20;
    if size <= MMIO_HOLE_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_HOLE_START as usize),
            (GuestAddress(FOUR_GIB), (size - MMIO_HOLE_START) as usize),
        ]
    }
}

/// Allocates guest RAM as private anonymous mappings (pages are faulted in only when touched,
/// so untouched guest memory costs the host nothing).
pub fn create_guest_memory(mem_mib: u32) -> Result<GuestMemoryMmap, MemoryError> {
    GuestMemoryMmap::from_ranges(&ram_ranges(mem_mib)).map_err(|source| MemoryError::Alloc {
        mib: mem_mib,
        source,
    })
}

/// End (exclusive) of the RAM below the MMIO hole.
pub fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    mem.iter()
        .map(|r| r.start_addr().0 + r.len())
        .filter(|end| *end <= MMIO_HOLE_START)
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_around_the_hole() {
        assert_eq!(ram_ranges(64), vec![(GuestAddress(0), 64 << 20)]);
        let r = ram_ranges(4096);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), MMIO_HOLE_START as usize));
        assert_eq!(r[1].0, GuestAddress(FOUR_GIB));
        assert_eq!(r[0].1 + r[1].1, 4096 << 20);
    }

    #[test]
    fn low_ram_end_of_small_vm() {
        let m = create_guest_memory(16).expect("alloc");
        assert_eq!(low_ram_end(&m), 16 << 20);
    }
}
