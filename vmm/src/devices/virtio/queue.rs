//! Descriptor-chain helpers shared by the device backends. Everything here treats the chain as
//! hostile: each segment is bounds-checked against guest memory, totals are capped, and a
//! device-readable descriptor after a device-writable one is rejected (virtio 1.x 2.7.4.2).

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("descriptor {addr:#x}+{len:#x} is outside guest memory")]
    OutOfRange { addr: u64, len: u32 },
    #[error("device-readable descriptor after a device-writable one")]
    ReadAfterWrite,
    #[error("chain carries more than {0} bytes")]
    TooLong(usize),
    #[error("chain too short: {0}")]
    TooShort(&'static str),
    #[error("guest memory access failed")]
    Memory,
}

/// A chain split into its device-readable and device-writable segments.
#[derive(Debug, Default, Clone)]
pub struct Segments {
    pub readable: Vec<(GuestAddress, u32)>,
    pub writable: Vec<(GuestAddress, u32)>,
    pub read_len: usize,
    pub write_len: usize,
}

impl Segments {
    pub fn from_chain(
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
        max_total: usize,
    ) -> Result<Self, ChainError> {
        let mut s = Segments::default();
        for d in chain {
            if d.len() == 0 {
                continue;
            }
            if !mem.check_range(d.addr(), d.len() as usize) {
                return Err(ChainError::OutOfRange {
                    addr: d.addr().0,
                    len: d.len(),
                });
            }
            if d.is_write_only() {
                s.writable.push((d.addr(), d.len()));
                s.write_len += d.len() as usize;
            } else {
                if !s.writable.is_empty() {
                    return Err(ChainError::ReadAfterWrite);
                }
                s.readable.push((d.addr(), d.len()));
                s.read_len += d.len() as usize;
            }
            if s.read_len + s.write_len > max_total {
                return Err(ChainError::TooLong(max_total));
            }
        }
        Ok(s)
    }

    /// Copies readable bytes starting at `offset` into `buf`; returns how many were copied.
    pub fn read_at(
        &self,
        mem: &GuestMemoryMmap,
        mut offset: usize,
        buf: &mut [u8],
    ) -> Result<usize, ChainError> {
        gather(&self.readable, mem, &mut offset, buf)
    }

    /// Copies `data` into the writable segments starting at `offset`; returns bytes written.
    pub fn write_at(
        &self,
        mem: &GuestMemoryMmap,
        mut offset: usize,
        data: &[u8],
    ) -> Result<usize, ChainError> {
        let mut done = 0;
        for &(addr, len) in &self.writable {
            let len = len as usize;
            if offset >= len {
                offset -= len;
                continue;
            }
            let n = (len - offset).min(data.len() - done);
            mem.write_slice(&data[done..done + n], addr.unchecked_add_usize(offset))
                .map_err(|_| ChainError::Memory)?;
            done += n;
            offset = 0;
            if done == data.len() {
                break;
            }
        }
        Ok(done)
    }
}

trait AddUsize {
    fn unchecked_add_usize(self, o: usize) -> GuestAddress;
}
impl AddUsize for GuestAddress {
    fn unchecked_add_usize(self, o: usize) -> GuestAddress {
        GuestAddress(self.0.wrapping_add(o as u64))
    }
}

fn gather(
    segs: &[(GuestAddress, u32)],
    mem: &GuestMemoryMmap,
    offset: &mut usize,
    buf: &mut [u8],
) -> Result<usize, ChainError> {
    let mut done = 0;
    for &(addr, len) in segs {
        let len = len as usize;
        if *offset >= len {
            *offset -= len;
            continue;
        }
        let n = (len - *offset).min(buf.len() - done);
        mem.read_slice(&mut buf[done..done + n], addr.unchecked_add_usize(*offset))
            .map_err(|_| ChainError::Memory)?;
        done += n;
        *offset = 0;
        if done == buf.len() {
            break;
        }
    }
    Ok(done)
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
    pub use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};

    pub const F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
    pub const F_WRITE: u16 = VRING_DESC_F_WRITE as u16;

    pub fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    /// Puts `descs` (one chain starting at index 0) on a mock queue and returns the parse result.
    pub fn parse(
        mem: &GuestMemoryMmap,
        descs: &[RawDescriptor],
        max: usize,
    ) -> Result<Segments, ChainError> {
        let vq = MockSplitQueue::new(mem, 16);
        vq.add_desc_chains(descs, 0).expect("mock chain");
        let mut q: Queue = vq.create_queue().expect("queue");
        let chain = q.iter(mem).expect("iter").next().expect("chain");
        Segments::from_chain(chain, mem, max)
    }

    /// The used ring of a mock queue as (id, len) pairs.
    pub fn used(mem: &GuestMemoryMmap, vq: &MockSplitQueue<GuestMemoryMmap>) -> Vec<(u32, u32)> {
        let base = vq.used_addr();
        let idx: u16 = mem.read_obj(GuestAddress(base.0 + 2)).expect("used idx");
        (0..idx as u64)
            .map(|i| {
                let e = base.0 + 4 + 8 * i;
                (
                    mem.read_obj(GuestAddress(e)).expect("id"),
                    mem.read_obj(GuestAddress(e + 4)).expect("len"),
                )
            })
            .collect()
    }

    #[test]
    fn splits_readable_and_writable() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("mem");
        mem.write_slice(b"hello", GuestAddress(0x8000)).expect("w");
        mem.write_slice(b" world", GuestAddress(0x9000)).expect("w");
        let s = parse(
            &mem,
            &[
                desc(0x8000, 5, F_NEXT, 1),
                desc(0x9000, 6, F_NEXT, 2),
                desc(0xa000, 4, F_WRITE, 0),
            ],
            1 << 20,
        )
        .expect("valid chain");
        assert_eq!((s.read_len, s.write_len), (11, 4));
        let mut buf = [0u8; 11];
        assert_eq!(s.read_at(&mem, 0, &mut buf).expect("read"), 11);
        assert_eq!(&buf, b"hello world");
        let mut tail = [0u8; 4];
        assert_eq!(s.read_at(&mem, 7, &mut tail).expect("read"), 4);
        assert_eq!(&tail, b"orld");
        assert_eq!(s.write_at(&mem, 1, b"xyzzy").expect("write"), 3);
        let mut out = [0u8; 4];
        mem.read_slice(&mut out, GuestAddress(0xa000)).expect("r");
        assert_eq!(&out, b"\0xyz");
    }

    #[test]
    fn rejects_malformed_chains() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("mem");
        // Out of guest memory, and straddling its end.
        assert!(matches!(
            parse(&mem, &[desc(0x4000_0000, 16, 0, 0)], 1 << 20),
            Err(ChainError::OutOfRange { .. })
        ));
        assert!(matches!(
            parse(&mem, &[desc(0xf_fff0, 32, 0, 0)], 1 << 20),
            Err(ChainError::OutOfRange { .. })
        ));
        // Address overflow.
        assert!(parse(&mem, &[desc(u64::MAX - 4, 16, 0, 0)], 1 << 20).is_err());
        // Wrong direction: readable after writable.
        assert_eq!(
            parse(
                &mem,
                &[desc(0x8000, 8, F_WRITE | F_NEXT, 1), desc(0x9000, 8, 0, 0)],
                1 << 20
            )
            .err(),
            Some(ChainError::ReadAfterWrite)
        );
        // Oversized total.
        assert_eq!(
            parse(
                &mem,
                &[desc(0x8000, 0x8000, F_NEXT, 1), desc(0x10000, 0x8000, 0, 0)],
                0xffff
            )
            .err(),
            Some(ChainError::TooLong(0xffff))
        );
    }

    #[test]
    fn descriptor_loop_terminates() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("mem");
        // 0 -> 1 -> 0 -> ... : the chain iterator stops after queue-size descriptors.
        let s = parse(
            &mem,
            &[desc(0x8000, 8, F_NEXT, 1), desc(0x9000, 8, F_NEXT, 0)],
            1 << 20,
        )
        .expect("bounded");
        assert!(s.read_len <= 16 * 8);
        // With a tight cap the loop is reported as oversized instead.
        assert!(matches!(
            parse(
                &mem,
                &[desc(0x8000, 8, F_NEXT, 1), desc(0x9000, 8, F_NEXT, 0)],
                40
            ),
            Err(ChainError::TooLong(40))
        ));
    }
}
