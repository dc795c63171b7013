//! The Linux zero page (`boot_params`) and the PVH `hvm_start_info`, each with the E820 map.

use linux_loader::loader::bootparam::{boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::layout::*;
use super::{BootError, InitrdInfo};

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// The E820 map: low RAM below the EBDA, the EBDA reserved, then RAM from 1 MiB in each region.
pub fn e820_map(mem: &GuestMemoryMmap) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, EBDA_END - EBDA_START, E820_RESERVED),
    ];
    for r in mem.iter() {
        let start = r.start_addr().0.max(HIGH_MEMORY_START);
        let end = r.start_addr().0 + r.len();
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map
}

pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    hdr: Option<setup_header>,
    cmdline_size: u32,
    initrd: Option<InitrdInfo>,
) -> Result<(), BootError> {
    let mut p = boot_params::default();
    if let Some(h) = hdr {
        p.hdr = h;
    }
    p.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    p.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    p.hdr.header = KERNEL_HDR_MAGIC;
    p.hdr.cmd_line_ptr = CMDLINE_START as u32;
    p.hdr.cmdline_size = cmdline_size;
    if p.hdr.kernel_alignment == 0 {
        p.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    if let Some(i) = initrd {
        p.hdr.ramdisk_image = i.addr as u32;
        p.hdr.ramdisk_size = i.size as u32;
    }
    let map = e820_map(mem);
    for (i, (addr, size, kind)) in map.iter().enumerate() {
        p.e820_table[i].addr = *addr;
        p.e820_table[i].size = *size;
        p.e820_table[i].r#type = *kind;
    }
    p.e820_entries = map.len() as u8;
    mem.write_obj(p, GuestAddress(ZERO_PAGE_START))
        .map_err(BootError::Write)
}

/// `hvm_start_info` (version 1) with the module list (initrd) and memory map, written as the
/// little-endian layout of the PVH ABI.
pub fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    initrd: Option<InitrdInfo>,
) -> Result<(), BootError> {
    let map = e820_map(mem);
    let mut memmap = Vec::new();
    for (addr, size, kind) in &map {
        memmap.extend_from_slice(&addr.to_le_bytes());
        memmap.extend_from_slice(&size.to_le_bytes());
        memmap.extend_from_slice(&kind.to_le_bytes());
        memmap.extend_from_slice(&0u32.to_le_bytes());
    }
    mem.write_slice(&memmap, GuestAddress(PVH_MEMMAP_START))
        .map_err(BootError::Write)?;
    let mut nr_modules = 0u32;
    if let Some(i) = initrd {
        let mut m = Vec::new();
        m.extend_from_slice(&i.addr.to_le_bytes());
        m.extend_from_slice(&i.size.to_le_bytes());
        m.extend_from_slice(&[0u8; 16]); // cmdline_paddr, reserved
        mem.write_slice(&m, GuestAddress(PVH_MODLIST_START))
            .map_err(BootError::Write)?;
        nr_modules = 1;
    }
    let mut s = Vec::with_capacity(56);
    s.extend_from_slice(&XEN_HVM_START_MAGIC.to_le_bytes());
    s.extend_from_slice(&1u32.to_le_bytes()); // version
    s.extend_from_slice(&0u32.to_le_bytes()); // flags
    s.extend_from_slice(&nr_modules.to_le_bytes());
    s.extend_from_slice(&PVH_MODLIST_START.to_le_bytes());
    s.extend_from_slice(&CMDLINE_START.to_le_bytes());
    s.extend_from_slice(&0u64.to_le_bytes()); // rsdp_paddr: no ACPI
    s.extend_from_slice(&PVH_MEMMAP_START.to_le_bytes());
    s.extend_from_slice(&(map.len() as u32).to_le_bytes());
    s.extend_from_slice(&0u32.to_le_bytes());
    mem.write_slice(&s, GuestAddress(PVH_INFO_START))
        .map_err(BootError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_reserves_ebda_and_skips_legacy_hole() {
        let mem = crate::vstate::memory::create_guest_memory(32).expect("mem");
        let m = e820_map(&mem);
        assert_eq!(m[0], (0, EBDA_START, E820_RAM));
        assert_eq!(m[1].2, E820_RESERVED);
        assert_eq!(
            m[2],
            (HIGH_MEMORY_START, (32 << 20) - HIGH_MEMORY_START, E820_RAM)
        );
    }

    #[test]
    fn zero_page_fields() {
        let mem = crate::vstate::memory::create_guest_memory(32).expect("mem");
        write_zero_page(
            &mem,
            None,
            10,
            Some(InitrdInfo {
                addr: 0x100_0000,
                size: 0x1234,
            }),
        )
        .expect("zp");
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).expect("read");
        let h = p.hdr;
        assert_eq!({ h.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ h.ramdisk_size }, 0x1234);
        assert_eq!({ h.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!(p.e820_entries, 3);
    }

    #[test]
    fn pvh_start_info_layout() {
        let mem = crate::vstate::memory::create_guest_memory(32).expect("mem");
        write_pvh_start_info(&mem, None).expect("pvh");
        let magic: u32 = mem.read_obj(GuestAddress(PVH_INFO_START)).expect("read");
        assert_eq!(magic, XEN_HVM_START_MAGIC);
        let cmdline: u64 = mem
            .read_obj(GuestAddress(PVH_INFO_START + 24))
            .expect("read");
        assert_eq!(cmdline, CMDLINE_START);
        let entries: u32 = mem
            .read_obj(GuestAddress(PVH_INFO_START + 48))
            .expect("read");
        assert_eq!(entries, 3);
    }
}
