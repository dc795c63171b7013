//! husk test guest: a bare-metal x86_64 program that husk-vmm boots in its integration tests.
//! It prints to COM1 and drives the VMM's devices through its own virtio-mmio driver. The
//! kvm-pvm host here emulates every guest instruction, so the code favours few instructions:
//! no copying of payloads (vsock echoes by re-posting the received buffers), polling, no SIMD.
#![no_std]
#![no_main]
#![no_builtins]

mod virtio;
mod vsock;
mod blk;
mod net;
mod fs;

use core::arch::{asm, global_asm};
use core::ptr::{read_volatile, write_volatile};

global_asm!(include_str!("entry.S"));

// The program runs on identity-mapped guest-physical memory; these are the addresses it owns.
pub const QUEUE_AREA: u64 = 0x20_0000;
pub const VSOCK_TXHDR: u64 = 0x28_0000;
pub const VSOCK_EVT: u64 = 0x2f_0000;
pub const VSOCK_RXBUF: u64 = 0x30_0000;
pub const BLK_AREA: u64 = 0x40_0000;
pub const NET_AREA: u64 = 0x50_0000;
pub const FS_AREA: u64 = 0x60_0000;
const AP_TRAMPOLINE: u64 = 0x8000;

#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    let mut i = 0;
    while i < n {
        unsafe { write_volatile(d.add(i), read_volatile(s.add(i))) };
        i += 1;
    }
    d
}
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    if (d as usize) < (s as usize) {
        unsafe { memcpy(d, s, n) }
    } else {
        let mut i = n;
        while i > 0 {
            i -= 1;
            unsafe { write_volatile(d.add(i), read_volatile(s.add(i))) };
        }
        d
    }
}
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(d: *mut u8, c: i32, n: usize) -> *mut u8 {
    let mut i = 0;
    while i < n {
        unsafe { write_volatile(d.add(i), c as u8) };
        i += 1;
    }
    d
}
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        let (x, y) = unsafe { (read_volatile(a.add(i)), read_volatile(b.add(i))) };
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    unsafe { memcmp(a, b, n) }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    puts("husk-test-guest: PANIC\n");
    reset()
}

pub fn outb(port: u16, v: u8) {
    unsafe { asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack)) };
}
pub fn inb(port: u16) -> u8 {
    let v: u8;
    unsafe { asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack)) };
    v
}

pub fn puts(s: &str) {
    for b in s.bytes() {
        outb(0x3f8, b);
    }
}
pub fn putb(s: &[u8]) {
    for b in s {
        outb(0x3f8, *b);
    }
}
pub fn put_dec(mut v: u64) {
    let mut buf = [0u8; 20];
    let mut i = 20;
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    putb(&buf[i..]);
}
pub fn put_hex(v: u64, digits: u32) {
    let mut d = digits;
    while d > 0 {
        d -= 1;
        let n = ((v >> (d * 4)) & 0xf) as u8;
        outb(0x3f8, if n < 10 { b'0' + n } else { b'a' + n - 10 });
    }
}

pub fn rd32(a: u64) -> u32 {
    unsafe { read_volatile(a as *const u32) }
}
pub fn wr32(a: u64, v: u32) {
    unsafe { write_volatile(a as *mut u32, v) }
}
pub fn rd16(a: u64) -> u16 {
    unsafe { read_volatile(a as *const u16) }
}
pub fn wr16(a: u64, v: u16) {
    unsafe { write_volatile(a as *mut u16, v) }
}
pub fn rd64(a: u64) -> u64 {
    unsafe { read_volatile(a as *const u64) }
}
pub fn wr64(a: u64, v: u64) {
    unsafe { write_volatile(a as *mut u64, v) }
}
pub fn rd8(a: u64) -> u8 {
    unsafe { read_volatile(a as *const u8) }
}
pub fn wr8(a: u64, v: u8) {
    unsafe { write_volatile(a as *mut u8, v) }
}

pub fn reset() -> ! {
    outb(0x64, 0xfe);
    loop {
        unsafe { asm!("cli; hlt") };
    }
}

/// The kernel command line as a byte slice.
fn cmdline(mode: u32, info: u64) -> &'static [u8] {
    let p = if mode == 1 { rd64(info + 24) } else { rd32(info + 0x228) as u64 };
    if p == 0 {
        return &[];
    }
    let mut n = 0;
    while n < 2048 && rd8(p + n as u64) != 0 {
        n += 1;
    }
    unsafe { core::slice::from_raw_parts(p as *const u8, n) }
}

pub struct Words<'a>(&'a [u8]);
impl<'a> Iterator for Words<'a> {
    type Item = &'a [u8];
    fn next(&mut self) -> Option<&'a [u8]> {
        let s = self.0;
        let mut i = 0;
        while i < s.len() && s[i] == b' ' {
            i += 1;
        }
        if i == s.len() {
            return None;
        }
        let mut j = i;
        while j < s.len() && s[j] != b' ' {
            j += 1;
        }
        self.0 = &s[j..];
        Some(&s[i..j])
    }
}

pub fn starts_with(s: &[u8], p: &[u8]) -> bool {
    s.len() >= p.len() && &s[..p.len()] == p
}

/// The value of `key=` on the command line.
pub fn param(cmd: &'static [u8], key: &[u8]) -> Option<&'static [u8]> {
    for w in Words(cmd) {
        if w == key {
            return Some(&[]);
        }
        if starts_with(w, key) && w.len() > key.len() && w[key.len()] == b'=' {
            return Some(&w[key.len() + 1..]);
        }
    }
    None
}

pub fn parse_num(s: &[u8]) -> u64 {
    let (digits, radix) = if starts_with(s, b"0x") { (&s[2..], 16) } else { (s, 10) };
    let mut v = 0u64;
    for &c in digits {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            b'A'..=b'F' => c - b'A' + 10,
            _ => break,
        } as u64;
        if d >= radix {
            break;
        }
        v = v * radix + d;
    }
    v
}

/// Base addresses from `virtio_mmio.device=4K@0xADDR:IRQ` entries.
fn virtio_devices(cmd: &'static [u8], out: &mut [u64; 8]) -> usize {
    let mut n = 0;
    for w in Words(cmd) {
        if n < 8 && starts_with(w, b"virtio_mmio.device=") {
            let mut i = 0;
            while i < w.len() && w[i] != b'@' {
                i += 1;
            }
            if i < w.len() {
                out[n] = parse_num(&w[i + 1..]);
                n += 1;
            }
        }
    }
    n
}

/// Counts processor entries in the MP table the VMM put in the EBDA.
fn mp_cpus() -> u32 {
    let mut a = 0x9fc00u64;
    while a < 0xa0000 {
        if rd32(a) == 0x5f50_4d5f {
            let t = rd32(a + 4) as u64;
            if rd32(t) != 0x504d_4350 {
                return 0;
            }
            let count = rd16(t + 34) as u64;
            let mut p = t + 44;
            let mut cpus = 0;
            for _ in 0..count {
                let kind = rd8(p);
                if kind == 0 {
                    cpus += 1;
                    p += 20;
                } else {
                    p += 8;
                }
            }
            return cpus;
        }
        a += 16;
    }
    0
}

unsafe extern "C" {
    fn irq_handler();
    static ap_tramp_start: u8;
    static ap_tramp_end: u8;
}

pub const IRQ_VECTOR: u64 = 0x30;
pub const IRQ_COUNT: u64 = 0x1a_1000;
/// Spins an interrupt test waits for its interrupt: it ends at the interrupt, so only a
/// lost one costs the whole budget (seconds); a loaded host may run the device thread late.
pub const IRQ_SPINS: u64 = 2_000_000_000;
const IDT: u64 = 0x1a_0000;

/// Routes IOAPIC pin `irq` to vector 0x30 on APIC 0 (edge, active high), installs the
/// handler, enables the local APIC and interrupts.
pub fn enable_irq(irq: u32) {
    let cs: u16;
    unsafe { asm!("mov {0:x}, cs", out(reg) cs) };
    let h = irq_handler as usize as u64;
    let e = IDT + IRQ_VECTOR * 16;
    wr32(e, (h as u32 & 0xffff) | ((cs as u32) << 16));
    wr32(e + 4, (h as u32 & 0xffff_0000) | 0x8e00);
    wr32(e + 8, (h >> 32) as u32);
    wr32(e + 12, 0);
    let idtr: [u16; 5] = [4095, IDT as u16, (IDT >> 16) as u16, 0, 0];
    unsafe { asm!("lidt [{0}]", in(reg) idtr.as_ptr()) };
    wr32(IRQ_COUNT, 0);
    // Mask the legacy PICs: GSIs below 16 also reach them, and their vectors have no handler.
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    let apic = 0xfee0_0000u64;
    wr32(apic + 0xf0, rd32(apic + 0xf0) | 0x1ff);
    wr32(apic + 0x80, 0); // TPR
    let ioapic = 0xfec0_0000u64;
    wr32(ioapic, 0x10 + 2 * irq);
    wr32(ioapic + 0x10, IRQ_VECTOR as u32);
    wr32(ioapic, 0x11 + 2 * irq);
    wr32(ioapic + 0x10, 0);
    unsafe { asm!("sti") };
}

pub fn disable_irq() {
    unsafe { asm!("cli") };
}

/// IRQ numbers from `virtio_mmio.device=4K@0xADDR:IRQ`, in the same order as the bases.
fn virtio_irqs(cmd: &'static [u8], out: &mut [u32; 8]) {
    let mut n = 0;
    for w in Words(cmd) {
        if n < 8 && starts_with(w, b"virtio_mmio.device=") {
            let mut i = w.len();
            while i > 0 && w[i - 1] != b':' {
                i -= 1;
            }
            out[n] = parse_num(&w[i..]) as u32;
            n += 1;
        }
    }
}

/// Wakes APIC id 1 with INIT + SIPI into a real-mode trampoline that bumps a counter.
fn start_ap() -> bool {
    let (s, e) = unsafe { (&ap_tramp_start as *const u8, &ap_tramp_end as *const u8) };
    let n = e as usize - s as usize;
    unsafe { memcpy(AP_TRAMPOLINE as *mut u8, s, n) };
    wr16(AP_TRAMPOLINE + 0x100, 0);
    let apic = 0xfee0_0000u64;
    wr32(apic + 0xf0, rd32(apic + 0xf0) | 0x1ff); // software-enable, spurious vector 0xff
    wr32(apic + 0x310, 1 << 24);
    wr32(apic + 0x300, 0x4500); // INIT
    for _ in 0..2 {
        wr32(apic + 0x310, 1 << 24);
        wr32(apic + 0x300, 0x4600 | (AP_TRAMPOLINE >> 12) as u32); // SIPI
        for _ in 0..200_000 {
            if rd16(AP_TRAMPOLINE + 0x100) != 0 {
                return true;
            }
            core::hint::spin_loop();
        }
    }
    false
}

/// Idles in `hlt` with the keyboard interrupt (IOAPIC pin 1) enabled until the i8042 delivers
/// Ctrl-Alt-Del, as a Linux guest would, then resets.
fn wait_ctrl_alt_del() -> ! {
    enable_irq(1);
    puts("wait: waiting for ctrl-alt-del\n");
    let mut seq = 0;
    loop {
        // cli, check, then `sti; hlt` (the STI shadow makes the pair atomic): no lost wakeup.
        unsafe { asm!("cli") };
        if rd32(IRQ_COUNT) == 0 {
            unsafe { asm!("sti; hlt") };
            continue;
        }
        wr32(IRQ_COUNT, 0);
        unsafe { asm!("sti") };
        while inb(0x64) & 1 != 0 {
            let b = inb(0x60);
            // Scancode set 2, as husk-vmm's untranslated i8042 sends it (and Linux's atkbd
            // reads it): Ctrl 0x14, Alt 0x11, then Del 0xe0 0x71.
            if b == 0x71 && seq >= 2 {
                disable_irq();
                puts("wait: got ctrl-alt-del by interrupt\n");
                reset();
            }
            if b == 0x14 || b == 0x11 {
                seq += 1;
            }
        }
    }
}

/// RAM bytes in the firmware memory map (PVH memmap or zero-page E820), and the initrd
/// (address, size) from the PVH module list or the zero page.
fn boot_info(mode: u32, info: u64) -> (u64, u64, u64) {
    let mut ram = 0;
    let (map, n, stride) = if mode == 1 {
        (rd64(info + 40), rd32(info + 48) as u64, 24)
    } else {
        (info + 0x2d0, rd8(info + 0x1e8) as u64, 20)
    };
    for i in 0..n {
        let e = map + i * stride;
        if rd32(e + 16) == 1 {
            ram += rd64(e + 8);
        }
    }
    let (addr, size) = if mode == 1 {
        if rd32(info + 12) > 0 {
            let m = rd64(info + 16);
            (rd64(m), rd64(m + 8))
        } else {
            (0, 0)
        }
    } else {
        (rd32(info + 0x218) as u64, rd32(info + 0x21c) as u64)
    };
    (ram, addr, size)
}

#[unsafe(no_mangle)]
pub extern "C" fn guest_main(mode: u32, info: u64) -> ! {
    puts(if mode == 1 { "husk-test-guest: entry=pvh\n" } else { "husk-test-guest: entry=linux64\n" });
    puts("HUSK_GUEST_READY\n");
    let cmd = cmdline(mode, info);
    puts("cmdline: ");
    putb(cmd);
    puts("\n");
    if param(cmd, b"husk.bootinfo").is_some() {
        let (ram, addr, size) = boot_info(mode, info);
        puts("bootinfo: ram=");
        put_dec(ram);
        puts(" initrd_addr=");
        put_hex(addr, 8);
        puts(" initrd_size=");
        put_dec(size);
        puts(" initrd_head=");
        for i in 0..size.min(8) {
            put_hex(rd8(addr + i) as u64, 2);
        }
        puts("\n");
    }
    if param(cmd, b"husk.serialirq").is_some() {
        // THR-empty interrupt from the UART: IOAPIC pin 4 -> vector 0x30.
        enable_irq(4);
        outb(0x3f9, 0x02);
        let mut spins = 0u64;
        while rd32(IRQ_COUNT) == 0 && spins < IRQ_SPINS {
            core::hint::spin_loop();
            spins += 1;
        }
        outb(0x3f9, 0);
        disable_irq();
        puts("serial: irq 4 delivered=");
        put_dec(rd32(IRQ_COUNT) as u64);
        puts("\n");
    }
    if param(cmd, b"husk.crash").is_some() {
        puts("crash: loading an empty IDT and faulting\n");
        let idt = [0u16; 5];
        unsafe { asm!("lidt [{0}]", "ud2", in(reg) idt.as_ptr(), options(noreturn)) };
    }
    let mut devs = [0u64; 8];
    let mut irqs = [0u32; 8];
    let n = virtio_devices(cmd, &mut devs);
    virtio_irqs(cmd, &mut irqs);
    for (i, &base) in devs[..n].iter().enumerate() {
        let area = QUEUE_AREA + i as u64 * 0x1_0000;
        match rd32(base + 8) {
            19 => vsock::run(base, area, cmd),
            2 => blk::run(base, area, irqs[i]),
            1 => net::run(base, area),
            26 => fs::run(base, area),
            id => {
                puts("virtio: unknown device id ");
                put_dec(id as u64);
                puts("\n");
            }
        }
    }
    if param(cmd, b"husk.smp").is_some() {
        puts("smp: mptable cpus=");
        put_dec(mp_cpus() as u64);
        puts("\n");
        puts(if start_ap() { "smp: ap 1 started\n" } else { "smp: ap 1 did not start\n" });
    }
    if param(cmd, b"husk.hang").is_some() {
        puts("hang: ignoring everything\n");
        loop {
            core::hint::spin_loop();
        }
    }
    if param(cmd, b"husk.wait").is_some() {
        wait_ctrl_alt_del();
    }
    puts("HUSK_GUEST_DONE\n");
    reset()
}

/// The precompiled `core` references this even with panic=abort; it is never called.
#[unsafe(no_mangle)]
pub extern "C" fn rust_eh_personality() {}
