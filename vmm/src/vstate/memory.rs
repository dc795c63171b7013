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
///
/// The mappings are marked `MADV_DONTDUMP`: a core dump of the VMM must not carry the
/// tenant's memory. The flag (`dd` in `/proc/PID/smaps`) is also how huskd tells guest RAM
/// apart from the VMM's own memory when it accounts a pod's host overhead; QEMU gets the
/// same with `dump=off` on its memory backend.
pub fn create_guest_memory(mem_mib: u32) -> Result<GuestMemoryMmap, MemoryError> {
    let mem = GuestMemoryMmap::from_ranges(&ram_ranges(mem_mib)).map_err(|source| {
        MemoryError::Alloc {
            mib: mem_mib,
            source,
        }
    })?;
    exclude_from_core_dumps(&mem);
    Ok(mem)
}

/// Marks every region of `mem` `MADV_DONTDUMP` (best effort: a failure is logged). Used on
/// the VMM's own guest RAM and on the guest memory a vhost-user backend maps.
pub fn exclude_from_core_dumps(mem: &GuestMemoryMmap) {
    for r in mem.iter() {
        // SAFETY: the range is exactly one mapping this GuestMemoryMmap owns; MADV_DONTDUMP
        // changes only core-dump behaviour, never the contents or the mapping.
        let rc = unsafe { libc::madvise(r.as_ptr().cast(), r.len() as usize, libc::MADV_DONTDUMP) };
        if rc != 0 {
            tracing::warn!(
                error = %std::io::Error::last_os_error(),
                "madvise(MADV_DONTDUMP) on guest memory failed; a core dump would include it"
            );
        }
    }
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
    fn guest_memory_is_left_out_of_core_dumps() {
        let m = create_guest_memory(8).expect("alloc");
        let start = m.iter().next().expect("region").as_ptr() as usize;
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        let mut in_region = false;
        let mut flags = None;
        for l in smaps.lines() {
            if let Some((range, _)) = l.split_once(' ')
                && let Some((a, _)) = range.split_once('-')
                && let Ok(a) = usize::from_str_radix(a, 16)
                && !l.starts_with("VmFlags")
            {
                in_region = a == start;
                continue;
            }
            if in_region && let Some(f) = l.strip_prefix("VmFlags:") {
                flags = Some(f.split_whitespace().map(String::from).collect::<Vec<_>>());
            }
        }
        let flags = flags.expect("guest memory mapping in smaps");
        assert!(flags.iter().any(|f| f == "dd"), "flags {flags:?}");
    }

    #[test]
    fn low_ram_end_of_small_vm() {
        let m = create_guest_memory(16).expect("alloc");
        assert_eq!(low_ram_end(&m), 16 << 20);
    }
}
