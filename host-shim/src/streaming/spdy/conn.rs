//! A SPDY/3.1 connection over any byte stream: one reader task (parses
//! frames, routes data to streams, answers pings), one writer task (encodes
//! and writes frames in order). Streams opened by the peer arrive on
//! [`Incoming`] already answered with SYN_REPLY (what kubelet's streaming
//! server does); streams opened here wait for the peer's SYN_REPLY.
//!
//! Flow control: like the Go implementation Kubernetes clients use, windows
//! are not enforced; a stream whose reader is slow back-pressures the
//! connection's reader (bounded queues).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use super::frame::{
    self, FLAG_FIN, Frame, FrameError, HeaderDecoder, HeaderEncoder, Headers, goaway, rst,
};

/// Largest DATA frame this side writes.
const WRITE_CHUNK: usize = 32 << 10;
/// Queued frames per stream before the connection reader waits.
const STREAM_QUEUE: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("spdy connection closed")]
    Closed,
    #[error("spdy stream reset by peer (status {0})")]
    Reset(u32),
    #[error("spdy: {0}")]
    Frame(#[from] FrameError),
    #[error("spdy i/o: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
}

enum Out {
    Frame(Frame),
    Shutdown,
}

#[derive(Default)]
struct Slot {
    data: Option<mpsc::Sender<Bytes>>,
    reply: Option<oneshot::Sender<Result<Headers, u32>>>,
    remote_done: bool,
    local_done: bool,
    reset: bool,
}

#[derive(Default)]
struct Table {
    streams: HashMap<u32, Slot>,
    last_peer_id: u32,
}

type Shared = Arc<Mutex<Table>>;

fn lock(t: &Shared) -> std::sync::MutexGuard<'_, Table> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

/// Streams the peer opened.
pub type Incoming = mpsc::Receiver<Stream>;

/// A connection. Dropping it stops the reader; the writer ends when the last
/// stream handle is gone.
pub struct Conn {
    role: Role,
    table: Shared,
    out: mpsc::Sender<Out>,
    next_id: AtomicU32,
    reader: tokio::task::JoinHandle<()>,
    writer_done: Option<oneshot::Receiver<()>>,
    closed: tokio::sync::watch::Receiver<bool>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Conn {
    /// Starts the connection's tasks on `io` (already past the HTTP upgrade).
    pub fn start<T>(io: T, role: Role) -> (Conn, Incoming)
    where
        T: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(io);
        let (out_tx, out_rx) = mpsc::channel(256);
        let (in_tx, in_rx) = mpsc::channel(64);
        let table: Shared = Arc::default();
        let (done_tx, done_rx) = oneshot::channel();
        tokio::spawn(async move {
            writer(wr, out_rx).await;
            let _ = done_tx.send(());
        });
        let (closed_tx, closed) = tokio::sync::watch::channel(false);
        let t = table.clone();
        let o = out_tx.clone();
        let reader = tokio::spawn(async move {
            reader(rd, role, t, o, in_tx).await;
            closed_tx.send_replace(true);
        });
        let first = if role == Role::Client { 1 } else { 2 };
        (
            Conn {
                role,
                table,
                out: out_tx,
                next_id: AtomicU32::new(first),
                reader,
                writer_done: Some(done_rx),
                closed,
            },
            in_rx,
        )
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// Becomes true when the peer's side of the connection ended.
    pub fn closed(&self) -> tokio::sync::watch::Receiver<bool> {
        self.closed.clone()
    }

    /// Opens a stream and waits for the peer's SYN_REPLY.
    pub async fn open(&self, headers: Headers) -> Result<Stream, ConnError> {
        let id = self.next_id.fetch_add(2, Ordering::Relaxed);
        let (reply_tx, reply_rx) = oneshot::channel();
        let (data_tx, data_rx) = mpsc::channel(STREAM_QUEUE);
        lock(&self.table).streams.insert(
            id,
            Slot {
                data: Some(data_tx),
                reply: Some(reply_tx),
                ..Default::default()
            },
        );
        self.out
            .send(Out::Frame(Frame::SynStream {
                stream: id,
                associated: 0,
                priority: 0,
                flags: 0,
                headers: headers.clone(),
            }))
            .await
            .map_err(|_| ConnError::Closed)?;
        match reply_rx.await {
            Ok(Ok(_)) => {}
            Ok(Err(status)) => return Err(ConnError::Reset(status)),
            Err(_) => return Err(ConnError::Closed),
        }
        Ok(Stream {
            id,
            headers,
            rx: data_rx,
            tx: StreamWriter {
                id,
                out: self.out.clone(),
                table: self.table.clone(),
            },
        })
    }

    /// Sends GOAWAY, then closes the write side once every stream handle is
    /// gone (or at once when `streams_too`), and waits for the writes to finish.
    pub async fn shutdown(mut self) {
        let last = lock(&self.table).last_peer_id;
        let _ = self
            .out
            .send(Out::Frame(Frame::GoAway {
                last_stream: last,
                status: goaway::OK,
            }))
            .await;
        let _ = self.out.send(Out::Shutdown).await;
        if let Some(done) = self.writer_done.take() {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), done).await;
        }
    }
}

/// One stream: the data the peer sends on it, and a writer.
pub struct Stream {
    pub id: u32,
    pub headers: Headers,
    rx: mpsc::Receiver<Bytes>,
    tx: StreamWriter,
}

impl Stream {
    pub fn header(&self, name: &str) -> Option<&str> {
        frame::header(&self.headers, name)
    }

    /// The next chunk the peer sent; `None` after its FIN (or a reset / the connection's end).
    pub async fn read(&mut self) -> Option<Bytes> {
        self.rx.recv().await
    }

    pub fn writer(&self) -> StreamWriter {
        self.tx.clone()
    }

    pub fn split(self) -> (mpsc::Receiver<Bytes>, StreamWriter) {
        (self.rx, self.tx)
    }
}

/// The sending half of a stream; cheap to clone.
#[derive(Clone)]
pub struct StreamWriter {
    id: u32,
    out: mpsc::Sender<Out>,
    table: Shared,
}

impl StreamWriter {
    pub fn id(&self) -> u32 {
        self.id
    }

    fn usable(&self) -> Result<(), ConnError> {
        match lock(&self.table).streams.get(&self.id) {
            Some(s) if s.reset => Err(ConnError::Reset(rst::CANCEL)),
            Some(s) if s.local_done => Err(ConnError::Closed),
            _ => Ok(()),
        }
    }

    pub async fn write(&self, data: &[u8]) -> Result<(), ConnError> {
        self.usable()?;
        for chunk in data.chunks(WRITE_CHUNK) {
            self.out
                .send(Out::Frame(Frame::Data {
                    stream: self.id,
                    flags: 0,
                    data: Bytes::copy_from_slice(chunk),
                }))
                .await
                .map_err(|_| ConnError::Closed)?;
        }
        Ok(())
    }

    /// Half-closes: an empty DATA frame with FIN. Idempotent.
    pub async fn close(&self) {
        {
            let mut t = lock(&self.table);
            let Some(s) = t.streams.get_mut(&self.id) else {
                return;
            };
            if s.local_done || s.reset {
                return;
            }
            s.local_done = true;
            if s.remote_done {
                t.streams.remove(&self.id);
            }
        }
        let _ = self
            .out
            .send(Out::Frame(Frame::Data {
                stream: self.id,
                flags: FLAG_FIN,
                data: Bytes::new(),
            }))
            .await;
    }

    /// Aborts the stream (RST_STREAM).
    pub async fn reset(&self, status: u32) {
        lock(&self.table).streams.remove(&self.id);
        let _ = self
            .out
            .send(Out::Frame(Frame::RstStream {
                stream: self.id,
                status,
            }))
            .await;
    }
}

async fn writer<W: AsyncWrite + Unpin>(mut wr: W, mut rx: mpsc::Receiver<Out>) {
    let mut enc = HeaderEncoder::new();
    let mut buf = BytesMut::with_capacity(64 << 10);
    'outer: while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(o) = next {
            match o {
                Out::Frame(f) => frame::encode(&f, &mut enc, &mut buf),
                Out::Shutdown => {
                    let _ = wr.write_all(&buf).await;
                    break 'outer;
                }
            }
            if buf.len() > 256 << 10 {
                break;
            }
            next = rx.try_recv().ok();
        }
        if let Err(e) = wr.write_all(&buf).await {
            tracing::debug!(error = %e, "spdy write");
            break;
        }
        buf.clear();
        let _ = wr.flush().await;
    }
    let _ = wr.shutdown().await;
}

async fn reader<R: AsyncRead + Unpin>(
    mut rd: R,
    role: Role,
    table: Shared,
    out: mpsc::Sender<Out>,
    incoming: mpsc::Sender<Stream>,
) {
    let mut dec = HeaderDecoder::new();
    let mut buf = BytesMut::with_capacity(64 << 10);
    let peer_parity = if role == Role::Server { 1 } else { 0 };
    let mut going_away = false;
    let result: Result<(), ConnError> = async {
        loop {
            while let Some(f) = frame::parse(&mut buf, &mut dec)? {
                handle(
                    f,
                    role,
                    peer_parity,
                    &table,
                    &out,
                    &incoming,
                    &mut going_away,
                )
                .await;
            }
            buf.reserve(64 << 10);
            if rd.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        }
    }
    .await;
    if let Err(e) = &result {
        tracing::debug!(error = %e, "spdy connection error");
        if let ConnError::Frame(_) = e {
            let last = lock(&table).last_peer_id;
            let _ = out
                .send(Out::Frame(Frame::GoAway {
                    last_stream: last,
                    status: goaway::PROTOCOL_ERROR,
                }))
                .await;
            let _ = out.send(Out::Shutdown).await;
        }
    }
    // The peer is gone: every stream's reader sees the end.
    let mut t = lock(&table);
    for s in t.streams.values_mut() {
        s.data = None;
        if let Some(r) = s.reply.take() {
            let _ = r.send(Err(rst::CANCEL));
        }
        s.reset = true;
    }
}

#[allow(clippy::too_many_arguments)]
async fn handle(
    f: Frame,
    role: Role,
    peer_parity: u32,
    table: &Shared,
    out: &mpsc::Sender<Out>,
    incoming: &mpsc::Sender<Stream>,
    going_away: &mut bool,
) {
    let send = |f: Frame| async move {
        let _ = out.send(Out::Frame(f)).await;
    };
    match f {
        Frame::SynStream {
            stream: id,
            flags,
            headers,
            ..
        } => {
            let ok = {
                let mut t = lock(table);
                let valid = id % 2 == peer_parity
                    && id > t.last_peer_id
                    && !t.streams.contains_key(&id)
                    && !*going_away;
                if valid {
                    t.last_peer_id = id;
                }
                valid
            };
            if !ok {
                send(Frame::RstStream {
                    stream: id,
                    status: rst::PROTOCOL_ERROR,
                })
                .await;
                return;
            }
            let (data_tx, data_rx) = mpsc::channel(STREAM_QUEUE);
            let fin = flags & FLAG_FIN != 0;
            lock(table).streams.insert(
                id,
                Slot {
                    data: (!fin).then_some(data_tx),
                    remote_done: fin,
                    ..Default::default()
                },
            );
            send(Frame::SynReply {
                stream: id,
                flags: 0,
                headers: vec![],
            })
            .await;
            let s = Stream {
                id,
                headers,
                rx: data_rx,
                tx: StreamWriter {
                    id,
                    out: out.clone(),
                    table: table.clone(),
                },
            };
            if incoming.try_send(s).is_err() {
                lock(table).streams.remove(&id);
                send(Frame::RstStream {
                    stream: id,
                    status: rst::REFUSED_STREAM,
                })
                .await;
            }
        }
        Frame::SynReply { stream, flags, .. } => {
            let mut t = lock(table);
            if let Some(s) = t.streams.get_mut(&stream)
                && let Some(r) = s.reply.take()
            {
                let _ = r.send(Ok(vec![]));
                if flags & FLAG_FIN != 0 {
                    remote_fin(&mut t, stream);
                }
            }
        }
        Frame::Data {
            stream,
            flags,
            data,
        } => {
            let tx = lock(table)
                .streams
                .get(&stream)
                .and_then(|s| s.data.clone());
            match tx {
                Some(tx) => {
                    if !data.is_empty() {
                        // A reader that went away just loses the data.
                        let _ = tx.send(data).await;
                    }
                    if flags & FLAG_FIN != 0 {
                        remote_fin(&mut lock(table), stream);
                    }
                }
                None => {
                    let known = lock(table).streams.contains_key(&stream);
                    if !known && stream % 2 == peer_parity {
                        send(Frame::RstStream {
                            stream,
                            status: rst::INVALID_STREAM,
                        })
                        .await;
                    }
                }
            }
        }
        Frame::RstStream { stream, status } => {
            let mut t = lock(table);
            if let Some(mut s) = t.streams.remove(&stream) {
                if let Some(r) = s.reply.take() {
                    let _ = r.send(Err(status));
                }
                s.data = None;
            }
            // Writers still holding it see "reset".
            t.streams.insert(
                stream,
                Slot {
                    reset: true,
                    remote_done: true,
                    local_done: true,
                    ..Default::default()
                },
            );
        }
        Frame::Ping { id } => {
            // Answer the peer's pings (their parity); ours come back as answers.
            let ours = if role == Role::Client { 1 } else { 0 };
            if id % 2 != ours {
                send(Frame::Ping { id }).await;
            }
        }
        Frame::GoAway { .. } => *going_away = true,
        Frame::Settings { .. }
        | Frame::WindowUpdate { .. }
        | Frame::Headers { .. }
        | Frame::Unknown { .. } => {}
    }
}

fn remote_fin(t: &mut Table, id: u32) {
    if let Some(s) = t.streams.get_mut(&id) {
        s.data = None;
        s.remote_done = true;
        if s.local_done {
            t.streams.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(k: &str, v: &str) -> Headers {
        vec![(k.to_string(), v.to_string())]
    }

    #[tokio::test]
    async fn streams_carry_data_both_ways_and_fin() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (client, _cin) = Conn::start(a, Role::Client);
        let (_server, mut sin) = Conn::start(b, Role::Server);
        let srv = tokio::spawn(async move {
            let mut s = sin.recv().await.expect("stream");
            assert_eq!(s.header("streamtype"), Some("stdin"));
            let w = s.writer();
            let mut got = Vec::new();
            while let Some(d) = s.read().await {
                got.extend_from_slice(&d);
            }
            w.write(&got).await.expect("echo");
            w.close().await;
            got.len()
        });
        let mut s = client.open(h("streamType", "stdin")).await.expect("open");
        let big = vec![7u8; 200_000];
        s.writer().write(&big).await.expect("write");
        s.writer().close().await;
        let mut back = Vec::new();
        while let Some(d) = s.read().await {
            back.extend_from_slice(&d);
        }
        assert_eq!(srv.await.expect("join"), big.len());
        assert_eq!(back, big);
    }

    #[tokio::test]
    async fn peer_going_away_ends_every_stream() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (client, _cin) = Conn::start(a, Role::Client);
        let (server, mut sin) = Conn::start(b, Role::Server);
        let srv = tokio::spawn(async move {
            let s = sin.recv().await.expect("stream");
            drop(s);
            server.shutdown().await;
        });
        let mut s = client.open(h("streamtype", "error")).await.expect("open");
        srv.await.expect("join");
        assert!(s.read().await.is_none());
    }

    #[tokio::test]
    async fn garbage_gets_goaway_and_close() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let (_server, _sin) = Conn::start(b, Role::Server);
        a.write_all(&[
            0x80, 0x03, 0x00, 0x01, 0x00, 0x00, 0x00, 0x0a, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,
        ])
        .await
        .expect("write");
        let mut back = Vec::new();
        a.read_to_end(&mut back).await.expect("read");
        // GOAWAY with PROTOCOL_ERROR, then EOF.
        assert_eq!(&back[..4], &[0x80, 0x03, 0x00, 0x07]);
        assert_eq!(
            &back[back.len() - 4..],
            &goaway::PROTOCOL_ERROR.to_be_bytes()
        );
    }
}
