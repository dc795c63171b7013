//! Initial vCPU state for the two entry modes: 64-bit long mode (Linux boot protocol entry) and
//! 32-bit protected mode (PVH entry). Builds the GDT and identity page tables in guest memory.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::*;

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("cannot write boot page tables/GDT to guest memory: {0}")]
    Write(#[source] vm_memory::GuestMemoryError),
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// GDT: null, 64-bit code (0x08), data (0x10), TSS (0x18), 32-bit code (0x20).
const GDT: [u64; 5] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
    gdt_entry(0xc09b, 0, 0xfffff),
];
const CODE64_SEL: usize = 1;
const DATA_SEL: usize = 2;
const TSS_SEL: usize = 3;
const CODE32_SEL: usize = 4;

const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn segment(index: usize) -> kvm_segment {
    let e = GDT[index];
    let flags = (e >> 40) & 0xf0ff;
    let g = ((flags >> 15) & 1) as u8;
    let raw_limit = (((e >> 32) & 0x000f_0000) | (e & 0xffff)) as u32;
    kvm_segment {
        base: (((e >> 32) & 0xff00_0000) | ((e >> 16) & 0x00ff_ffff)),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: (index * 8) as u16,
        type_: (flags & 0xf) as u8,
        present: ((flags >> 7) & 1) as u8,
        dpl: ((flags >> 5) & 3) as u8,
        db: ((flags >> 14) & 1) as u8,
        s: ((flags >> 4) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        g,
        avl: ((flags >> 12) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Writes the GDT, an empty IDT and identity-mapped page tables for the first 4 GiB (2 MiB pages,
/// which also covers the MMIO hole so early guest code can reach devices).
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(RegsError::Write)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(RegsError::Write)?;
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))
        .map_err(RegsError::Write)?;
    let mut pd = vec![0u8; 4 * 4096];
    for i in 0..2048u64 {
        let entry = (i << 21) | 0x83; // present, writable, 2 MiB page
        pd[(i * 8) as usize..(i * 8 + 8) as usize].copy_from_slice(&entry.to_le_bytes());
    }
    mem.write_slice(&pd, GuestAddress(PDE_START))
        .map_err(RegsError::Write)?;
    for i in 0..4u64 {
        let pdpte = (PDE_START + i * 4096) | 0x03;
        mem.write_obj(pdpte, GuestAddress(PDPTE_START + i * 8))
            .map_err(RegsError::Write)?;
    }
    Ok(())
}

/// Special registers for long mode with paging on the identity tables.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    set_tables(&mut sregs);
    sregs.cs = segment(CODE64_SEL);
    let data = segment(DATA_SEL);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = segment(TSS_SEL);
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// Special registers for the PVH entry: flat 32-bit protected mode, paging off.
pub fn protected_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    set_tables(&mut sregs);
    sregs.cs = segment(CODE32_SEL);
    let data = segment(DATA_SEL);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = segment(TSS_SEL);
    sregs.cr0 = (sregs.cr0 | X86_CR0_PE | X86_CR0_ET) & !X86_CR0_PG;
    sregs.cr4 = 0;
    sregs.efer = 0;
    sregs
}

fn set_tables(sregs: &mut kvm_sregs) {
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
}

/// General registers for the Linux 64-bit entry: `rsi` points at the zero page.
pub fn linux64_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

/// General registers for the PVH entry: `rbx` points at `hvm_start_info`.
pub fn pvh_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rbx: PVH_INFO_START,
        ..Default::default()
    }
}

pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_decode_from_gdt() {
        let cs = segment(CODE64_SEL);
        assert_eq!(
            (cs.l, cs.db, cs.present, cs.type_, cs.selector),
            (1, 0, 1, 0xb, 0x08)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let cs32 = segment(CODE32_SEL);
        assert_eq!((cs32.l, cs32.db, cs32.selector), (0, 1, 0x20));
        let ds = segment(DATA_SEL);
        assert_eq!((ds.type_, ds.s, ds.base), (0x3, 1, 0));
    }

    #[test]
    fn page_tables_identity_map_4gib() {
        let mem = crate::vstate::memory::create_guest_memory(4).expect("mem");
        write_boot_tables(&mem).expect("tables");
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).expect("read");
        assert_eq!(pml4, PDPTE_START | 3);
        // The PDE mapping the virtio MMIO window at 0xd000_0000.
        let idx = 0xd000_0000u64 >> 21;
        let pde: u64 = mem
            .read_obj(GuestAddress(PDE_START + idx * 8))
            .expect("read");
        assert_eq!(pde, 0xd000_0000 | 0x83);
        let pdpte3: u64 = mem.read_obj(GuestAddress(PDPTE_START + 24)).expect("read");
        assert_eq!(pdpte3, (PDE_START + 3 * 4096) | 3);
    }
}
