//! Minimal virtio-mmio (version 2) driver with split virtqueues, polled.

use crate::{rd16, rd32, wr16, wr32, wr64};
use core::sync::atomic::{Ordering, compiler_fence};

pub const QSIZE: u16 = 128;
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;

pub struct Mmio(pub u64);
impl Mmio {
    pub fn r(&self, off: u64) -> u32 {
        rd32(self.0 + off)
    }
    pub fn w(&self, off: u64, v: u32) {
        wr32(self.0 + off, v)
    }
    /// Reset, ACK, DRIVER, negotiate `want` (high word always includes VERSION_1), FEATURES_OK.
    /// Returns the accepted features.
    pub fn init(&self, want: u64) -> u64 {
        self.w(0x70, 0);
        self.w(0x70, 1);
        self.w(0x70, 3);
        self.w(0x14, 0);
        let lo = self.r(0x10) as u64;
        self.w(0x14, 1);
        let hi = self.r(0x10) as u64;
        let feat = ((hi << 32) | lo) & (want | (1 << 32));
        self.w(0x24, 0);
        self.w(0x20, feat as u32);
        self.w(0x24, 1);
        self.w(0x20, (feat >> 32) as u32);
        self.w(0x70, 0xb);
        feat
    }
    pub fn driver_ok(&self) {
        self.w(0x70, 0xf);
    }
}

/// A split virtqueue in guest memory at `base` (descriptors, avail at +2048, used at +4096).
pub struct Vq {
    pub mmio: u64,
    pub idx: u32,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub avail_idx: u16,
    pub last_used: u16,
    free: [u16; QSIZE as usize],
    pub nfree: usize,
}

impl Vq {
    pub fn new(m: &Mmio, idx: u32, base: u64) -> Vq {
        let mut free = [0u16; QSIZE as usize];
        let mut i = 0;
        while i < QSIZE as usize {
            free[i] = (QSIZE as usize - 1 - i) as u16;
            i += 1;
        }
        let q = Vq {
            mmio: m.0,
            idx,
            desc: base,
            avail: base + 2048,
            used: base + 4096,
            avail_idx: 0,
            last_used: 0,
            free,
            nfree: QSIZE as usize,
        };
        m.w(0x30, idx);
        m.w(0x38, QSIZE as u32);
        m.w(0x80, q.desc as u32);
        m.w(0x84, (q.desc >> 32) as u32);
        m.w(0x90, q.avail as u32);
        m.w(0x94, (q.avail >> 32) as u32);
        m.w(0xa0, q.used as u32);
        m.w(0xa4, (q.used >> 32) as u32);
        m.w(0x44, 1);
        q
    }

    pub fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = self.desc + i as u64 * 16;
        wr64(d, addr);
        wr32(d + 8, len);
        wr16(d + 12, flags);
        wr16(d + 14, next);
    }

    pub fn alloc(&mut self) -> u16 {
        self.nfree -= 1;
        self.free[self.nfree]
    }

    /// Returns a chain's descriptors to the free list.
    pub fn free_chain(&mut self, head: u16) {
        let mut i = head;
        loop {
            self.free[self.nfree] = i;
            self.nfree += 1;
            let d = self.desc + i as u64 * 16;
            if rd16(d + 12) & F_NEXT == 0 {
                break;
            }
            i = rd16(d + 14);
        }
    }

    /// Makes the chain at `head` available (without notifying).
    pub fn push(&mut self, head: u16) {
        wr16(self.avail + 4 + (self.avail_idx % QSIZE) as u64 * 2, head);
        compiler_fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        wr16(self.avail + 2, self.avail_idx);
        compiler_fence(Ordering::SeqCst);
    }

    pub fn notify(&self) {
        wr32(self.mmio + 0x50, self.idx);
    }

    /// Next used element: (head, len).
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        if rd16(self.used + 2) == self.last_used {
            return None;
        }
        compiler_fence(Ordering::SeqCst);
        let e = self.used + 4 + (self.last_used % QSIZE) as u64 * 8;
        let r = (rd32(e) as u16, rd32(e + 4));
        self.last_used = self.last_used.wrapping_add(1);
        Some(r)
    }

    /// Polls until one used element appears.
    pub fn wait_used(&mut self) -> (u16, u32) {
        loop {
            if let Some(u) = self.pop_used() {
                return u;
            }
            core::hint::spin_loop();
        }
    }
}
