//! virtio-blk exercise: get-id, read 8 sectors (sum printed), write sector 2 + flush + read back.
//! An empty disk slot (capacity 0) instead waits for the host to fill it: the config-change
//! interrupt, the new capacity and serial, and the new file's bytes.

use crate::virtio::{F_NEXT, F_WRITE, Mmio, Vq};
use crate::{BLK_AREA, put_dec, put_hex, putb, puts, rd8, wr32, wr64, wr8};

const HDR: u64 = BLK_AREA;
const DATA: u64 = BLK_AREA + 0x1000;
const STATUS: u64 = BLK_AREA + 0x3000;
const CHECK: u64 = BLK_AREA + 0x4000;

/// One synchronous request; returns the status byte.
fn request(q: &mut Vq, kind: u32, sector: u64, data: u64, len: u32, write_to_guest: bool) -> u8 {
    wr32(HDR, kind);
    wr32(HDR + 4, 0);
    wr64(HDR + 8, sector);
    wr8(STATUS, 0xff);
    let (a, b) = (q.alloc(), q.alloc());
    q.set_desc(a, HDR, 16, F_NEXT, b);
    if len > 0 {
        let c = q.alloc();
        q.set_desc(b, data, len, F_NEXT | if write_to_guest { F_WRITE } else { 0 }, c);
        q.set_desc(c, STATUS, 1, F_WRITE, 0);
    } else {
        q.set_desc(b, STATUS, 1, F_WRITE, 0);
    }
    q.push(a);
    q.notify();
    let (head, _) = q.wait_used();
    q.free_chain(head);
    rd8(STATUS)
}

pub fn run(base: u64, area: u64, irq: u32) {
    let m = Mmio(base);
    let feat = m.init((1 << 5) | (1 << 9));
    let ro = feat & (1 << 5) != 0;
    let mut q = Vq::new(&m, 0, area);
    m.driver_ok();
    let cap = crate::rd64(base + 0x100);
    if cap == 0 {
        slot(&m, &mut q, irq);
        return;
    }

    let st = request(&mut q, 8, 0, DATA, 20, true);
    // The device raised its interrupt status for that completion; acknowledge it.
    let isr = m.r(0x60);
    m.w(0x64, isr);
    puts("blk: isr=");
    put_dec(isr as u64);
    puts(" after-ack=");
    put_dec(m.r(0x60) as u64);
    puts("\n");
    puts("blk: id=");
    let mut n = 0;
    while n < 20 && rd8(DATA + n) != 0 {
        n += 1;
    }
    putb(unsafe { core::slice::from_raw_parts(DATA as *const u8, n as usize) });
    puts(" status=");
    put_dec(st as u64);
    puts(" sectors=");
    put_dec(cap);
    puts(if ro { " ro=1\n" } else { " ro=0\n" });

    let st = request(&mut q, 0, 0, DATA, 4096, true);
    let mut sum: u32 = 0;
    for i in 0..4096u64 {
        sum = sum.wrapping_mul(31).wrapping_add(rd8(DATA + i) as u32);
    }
    puts("blk: read status=");
    put_dec(st as u64);
    puts(" sum=");
    put_hex(sum as u64, 8);
    puts("\n");

    for i in 0..512u64 {
        wr8(DATA + i, (i as u8) ^ 0xa5);
    }
    let st = request(&mut q, 1, 2, DATA, 512, false);
    puts("blk: write status=");
    put_dec(st as u64);
    puts("\n");
    let fl = request(&mut q, 4, 0, 0, 0, false);
    let st2 = request(&mut q, 0, 2, CHECK, 512, true);
    let mut same = true;
    for i in 0..512u64 {
        if rd8(CHECK + i) != (i as u8) ^ 0xa5 {
            same = false;
            break;
        }
    }
    puts("blk: flush status=");
    put_dec(fl as u64);
    puts(" readback status=");
    put_dec(st2 as u64);
    puts(if same { " match=1\n" } else { " match=0\n" });
    // One request completed by interrupt: IOAPIC pin -> vector 0x30 -> handler counts it.
    crate::enable_irq(irq);
    wr32(HDR, 0);
    wr64(HDR + 8, 0);
    let (a, b, c) = (q.alloc(), q.alloc(), q.alloc());
    q.set_desc(a, HDR, 16, F_NEXT, b);
    q.set_desc(b, DATA, 512, F_NEXT | F_WRITE, c);
    q.set_desc(c, STATUS, 1, F_WRITE, 0);
    q.push(a);
    q.notify();
    let mut spins = 0u64;
    while crate::rd32(crate::IRQ_COUNT) == 0 && spins < crate::IRQ_SPINS {
        core::hint::spin_loop();
        spins += 1;
    }
    crate::disable_irq();
    let (head, _) = q.wait_used();
    q.free_chain(head);
    m.w(0x64, m.r(0x60));
    puts("blk: irq ");
    put_dec(irq as u64);
    puts(" delivered=");
    put_dec(crate::rd32(crate::IRQ_COUNT) as u64);
    puts("\n");
    // Out-of-range read must fail.
    let st = request(&mut q, 0, cap, DATA, 512, true);
    puts("blk: beyond-end status=");
    put_dec(st as u64);
    puts("\n");
}

/// Capacity read as a driver must: retry until ConfigGeneration is the same before and after.
fn capacity(m: &Mmio) -> (u64, u32) {
    loop {
        let g = m.r(0xfc);
        let cap = crate::rd64(m.0 + 0x100);
        if m.r(0xfc) == g {
            return (cap, g);
        }
    }
}

fn print_id(st: u8) {
    let mut n = 0;
    while n < 20 && rd8(DATA + n) != 0 {
        n += 1;
    }
    puts(" id=");
    putb(unsafe { core::slice::from_raw_parts(DATA as *const u8, n as usize) });
    puts(" id_status=");
    put_dec(st as u64);
}

/// An empty slot: no serial, reads fail; then idle in `hlt` until the config-change interrupt,
/// re-read the capacity and serial, and read the new disk.
fn slot(m: &Mmio, q: &mut Vq, irq: u32) {
    let (cap, gen0) = capacity(m);
    for i in 0..20 {
        wr8(DATA + i, 0);
    }
    let st = request(q, 8, 0, DATA, 20, true);
    puts("blkslot: empty sectors=");
    put_dec(cap);
    puts(" gen=");
    put_dec(gen0 as u64);
    print_id(st);
    puts("\n");
    let st = request(q, 0, 0, DATA, 512, true);
    puts("blkslot: read-empty status=");
    put_dec(st as u64);
    puts("\n");
    m.w(0x64, m.r(0x60));
    crate::enable_irq(irq);
    puts("blkslot: waiting\n");
    let isr = loop {
        // cli, check, then `sti; hlt` (the STI shadow makes the pair atomic): no lost wakeup.
        unsafe { core::arch::asm!("cli") };
        if crate::rd32(crate::IRQ_COUNT) != 0 {
            let isr = m.r(0x60);
            if isr & 2 != 0 {
                break isr;
            }
            // The edge of the read-empty request's used-buffer interrupt can arrive after
            // its ISR bit was acknowledged above (the VMM sets the bit, then signals): not
            // the config change; wait on.
            m.w(0x64, isr);
            crate::wr32(crate::IRQ_COUNT, 0);
        }
        unsafe { core::arch::asm!("sti; hlt") };
    };
    crate::disable_irq();
    m.w(0x64, isr);
    let (cap, gen1) = capacity(m);
    puts("blkslot: isr=");
    put_dec(isr as u64);
    puts(" sectors=");
    put_dec(cap);
    puts(" gen=");
    put_dec(gen1 as u64);
    puts("\n");
    for i in 0..20 {
        wr8(DATA + i, 0);
    }
    let st = request(q, 8, 0, DATA, 20, true);
    puts("blkslot: filled");
    print_id(st);
    puts("\n");
    let st = request(q, 0, 0, DATA, 4096, true);
    let mut sum: u32 = 0;
    for i in 0..4096u64 {
        sum = sum.wrapping_mul(31).wrapping_add(rd8(DATA + i) as u32);
    }
    puts("blkslot: read status=");
    put_dec(st as u64);
    puts(" sum=");
    put_hex(sum as u64, 8);
    puts("\n");
    let st = request(q, 0, cap, DATA, 512, true);
    puts("blkslot: beyond-end status=");
    put_dec(st as u64);
    puts("\n");
    m.w(0x64, m.r(0x60));
}
