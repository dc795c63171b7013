//! Intel MultiProcessor Specification 1.4 table in the EBDA: lets a guest without ACPI find its
//! CPUs, the IOAPIC and the ISA interrupt routing.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{APIC_START, EBDA_END, EBDA_START, IOAPIC_START};

#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("MP table for {0} vCPUs does not fit in the EBDA")]
    TooBig(u8),
    #[error("cannot write the MP table: {0}")]
    Write(#[source] vm_memory::GuestMemoryError),
}

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const IRQ_LINES: u8 = 24;
const CPU_ENABLED: u8 = 1;
/// Interrupt type of an I/O or local interrupt entry: vectored (INT) and 8259 (ExtINT).
const MP_INT: u8 = 0;
const MP_EXTINT: u8 = 3;
const CPU_BOOTPROCESSOR: u8 = 2;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the MP floating pointer followed by the configuration table, as bytes.
pub fn build(num_cpus: u8) -> Vec<u8> {
    let ioapic_id = num_cpus;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        entries.push(0u8); // processor entry
        entries.push(cpu);
        entries.push(APIC_VERSION);
        entries.push(CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 });
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]); // bus 0
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]); // IOAPIC, enabled
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;
    for irq in 0..IRQ_LINES {
        // I/O interrupt entry: ISA IRQ n is a plain (vectored) interrupt on IOAPIC pin n,
        // conforming polarity/trigger (edge, active high), as KVM's default GSI routing has it.
        // No IOAPIC pin is ExtINT: an ExtINT entry for IRQ 0 makes Linux route its timer
        // through the 8259 (`check_timer`: "ExtINT not setup in hardware but reported by MP
        // table"), which panics in setup_IO_APIC. The 8259 reaches the CPU on LINT0 below.
        entries.extend_from_slice(&[3, MP_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts: LINT0 = ExtINT, LINT1 = NMI, to all local APICs.
    entries.extend_from_slice(&[4, MP_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"HUSK    ");
    table.extend_from_slice(b"HUSK-VMM    ");
    table.extend_from_slice(&[0; 4]); // OEM table pointer
    table.extend_from_slice(&[0; 2]); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&[0; 4]); // extended table length + checksum + reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let table_addr = (EBDA_START + 16) as u32;
    let mut out = Vec::with_capacity(16 + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&table_addr.to_le_bytes());
    out.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length 1 paragraph, rev 1.4, checksum
    out[10] = checksum(&out[..16]);
    out.extend_from_slice(&table);
    out
}

pub fn setup(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MptableError> {
    let bytes = build(num_cpus);
    if bytes.len() as u64 > EBDA_END - EBDA_START {
        return Err(MptableError::TooBig(num_cpus));
    }
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_cpu_entries() {
        for n in [1u8, 2, 32] {
            let b = build(n);
            assert!(b.len() as u64 <= EBDA_END - EBDA_START, "{n} cpus fit");
            assert_eq!(&b[..4], b"_MP_");
            assert_eq!(b[..16].iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
            let t = &b[16..];
            assert_eq!(&t[..4], b"PCMP");
            let len = u16::from_le_bytes([t[4], t[5]]) as usize;
            assert_eq!(len, t.len());
            assert_eq!(t.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
            let cpus = (0..n as usize).filter(|i| t[44 + i * 20] == 0).count();
            assert_eq!(cpus, n as usize);
            assert_eq!(t[44 + 3] & CPU_BOOTPROCESSOR, CPU_BOOTPROCESSOR);
        }
    }

    /// Every ISA IRQ is a vectored interrupt on the IOAPIC pin of the same number, none is
    /// ExtINT (Linux then panics in check_timer); LINT0 alone carries the 8259.
    #[test]
    fn isa_irqs_are_plain_interrupts_on_their_pin() {
        let b = build(2);
        let t = &b[16..];
        let mut at = 44;
        let mut io = vec![];
        let mut local = vec![];
        while at < t.len() {
            let len = if t[at] == 0 { 20 } else { 8 };
            let e = &t[at..at + len];
            match e[0] {
                3 => io.push((e[1], e[5], e[7])),
                4 => local.push((e[1], e[7])),
                _ => {}
            }
            at += len;
        }
        assert_eq!(io.len(), IRQ_LINES as usize);
        for (i, &(kind, src, pin)) in io.iter().enumerate() {
            assert_eq!((kind, src, pin), (MP_INT, i as u8, i as u8), "entry {i}");
        }
        assert_eq!(local, vec![(MP_EXTINT, 0), (1, 1)]);
    }
}
