//! Attach's fan-out of a container's output: what the log copier reads from
//! the agent also goes to every attached client, through a broadcast ring.
//!
//! The guest decides how large each reply is (up to ttrpc's 4 MiB), and a
//! slow attach client keeps the ring's values alive until it reads them or
//! they are overwritten. So the ring holds copies of at most [`CHUNK`] bytes,
//! [`DEPTH`] of them: whatever the guest sends and however slow the client,
//! one container's fan-out holds at most [`BOUND`] bytes. A client that falls
//! further behind skips output (it is told so, `Lagged`); the log has it all.

use bytes::Bytes;
use tokio::sync::broadcast;

use super::OutputChunk;
use super::logs::Stream;

/// Largest piece of output one ring slot holds.
pub const CHUNK: usize = 32 << 10;
/// Slots in one container's ring.
pub const DEPTH: usize = 128;
/// Most output bytes one container's fan-out can hold (4 MiB).
pub const BOUND: usize = CHUNK * DEPTH;

/// A container's output ring.
pub fn channel() -> broadcast::Sender<OutputChunk> {
    broadcast::channel(DEPTH).0
}

/// Hands `data` to the attached clients in pieces of at most [`CHUNK`] bytes,
/// each copied (a slice would keep the whole reply alive). Nothing when no
/// client is attached.
pub fn send(tx: &broadcast::Sender<OutputChunk>, stream: Stream, data: &[u8]) {
    if data.is_empty() || tx.receiver_count() == 0 {
        return;
    }
    for piece in data.chunks(CHUNK) {
        if tx
            .send(OutputChunk::Data(stream, Bytes::copy_from_slice(piece)))
            .is_err()
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::broadcast::error::TryRecvError;

    /// What a receiver can still get is what the ring holds for it.
    fn drain(rx: &mut broadcast::Receiver<OutputChunk>) -> (usize, u64) {
        let (mut bytes, mut lagged) = (0, 0);
        loop {
            match rx.try_recv() {
                Ok(OutputChunk::Data(_, d)) => {
                    assert!(d.len() <= CHUNK, "a slot holds {} bytes", d.len());
                    bytes += d.len();
                }
                Ok(OutputChunk::Eof(_)) => {}
                Err(TryRecvError::Lagged(n)) => lagged += n,
                Err(TryRecvError::Empty | TryRecvError::Closed) => return (bytes, lagged),
            }
        }
    }

    #[test]
    fn a_flood_of_guest_sized_replies_stays_within_the_bound() {
        let tx = channel();
        let mut idle = tx.subscribe();
        // 64 replies of ttrpc's largest size (256 MiB) while the client reads nothing.
        let reply = vec![b'x'; 4 << 20];
        for _ in 0..64 {
            send(&tx, Stream::Stdout, &reply);
        }
        let (held, lagged) = drain(&mut idle);
        assert!(held <= BOUND, "ring held {held} bytes, bound {BOUND}");
        assert_eq!(held, BOUND, "the newest output is kept");
        assert_eq!(lagged as usize, 64 * (4 << 20) / CHUNK - DEPTH);
    }

    #[test]
    fn a_client_that_keeps_up_gets_every_byte_in_order() {
        let tx = channel();
        let mut rx = tx.subscribe();
        let data: Vec<u8> = (0..(CHUNK * 3 + 17)).map(|i| i as u8).collect();
        send(&tx, Stream::Stderr, &data);
        let mut got = Vec::new();
        while let Ok(OutputChunk::Data(s, d)) = rx.try_recv() {
            assert_eq!(s, Stream::Stderr);
            got.extend_from_slice(&d);
        }
        assert_eq!(got, data);
    }

    #[test]
    fn nothing_is_kept_without_a_client() {
        let tx = channel();
        send(&tx, Stream::Stdout, &vec![0; 1 << 20]);
        let mut late = tx.subscribe();
        assert!(matches!(late.try_recv(), Err(TryRecvError::Empty)));
    }
}
