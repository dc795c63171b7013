//! virtio-net exercise: send an Ethernet frame (ethertype 0x88b5, "husk-net-ping") and wait for
//! one back carrying "husk-net-pong".

use crate::virtio::{F_WRITE, Mmio, Vq};
use crate::{NET_AREA, put_hex, puts, rd16, rd8, wr8};

const RXBUFS: u16 = 16;
const RXBUF_SIZE: u32 = 2048;
const TXBUF: u64 = NET_AREA + 0x2_0000;

pub fn run(base: u64, area: u64) {
    let m = Mmio(base);
    m.init(1 << 5);
    let mut rx = Vq::new(&m, 0, area);
    let mut tx = Vq::new(&m, 1, area + 0x4000);
    m.driver_ok();
    let mut mac = [0u8; 6];
    puts("net: mac=");
    for (i, b) in mac.iter_mut().enumerate() {
        *b = rd8(base + 0x100 + i as u64);
        put_hex(*b as u64, 2);
        if i < 5 {
            puts(":");
        }
    }
    puts("\n");
    for _ in 0..RXBUFS {
        let d = rx.alloc();
        rx.set_desc(d, NET_AREA + d as u64 * RXBUF_SIZE as u64, RXBUF_SIZE, F_WRITE, 0);
        rx.push(d);
    }
    rx.notify();

    // 12-byte virtio_net_hdr_v1 (zero) + frame.
    for i in 0..12u64 {
        wr8(TXBUF + i, 0);
    }
    let f = TXBUF + 12;
    for i in 0..6u64 {
        wr8(f + i, 0xff);
        wr8(f + 6 + i, mac[i as usize]);
    }
    wr8(f + 12, 0x88);
    wr8(f + 13, 0xb5);
    let msg = b"husk-net-ping";
    for i in 0..46u64 {
        wr8(f + 14 + i, if (i as usize) < msg.len() { msg[i as usize] } else { 0 });
    }
    let d = tx.alloc();
    tx.set_desc(d, TXBUF, 12 + 60, 0, 0);
    tx.push(d);
    tx.notify();
    let (h, _) = tx.wait_used();
    tx.free_chain(h);
    puts("net: tx done\n");

    loop {
        let (head, len) = rx.wait_used();
        let buf = NET_AREA + head as u64 * RXBUF_SIZE as u64;
        let fr = buf + 12;
        let is_pong = len >= 12 + 14 + 13
            && rd16(fr + 12) == 0xb588
            && (0..13u64).all(|i| rd8(fr + 14 + i) == b"husk-net-pong"[i as usize]);
        if is_pong {
            let mine = (0..6u64).all(|i| rd8(fr + i) == mac[i as usize]);
            puts(if mine { "net: rx pong ok\n" } else { "net: rx pong with wrong dst\n" });
            return;
        }
        rx.push(head);
        rx.notify();
    }
}
