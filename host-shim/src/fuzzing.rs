//! Entry points for the fuzz targets in `host-shim/fuzz/` and for the corpus replay test
//! (`host-shim/tests/fuzz_corpus.rs`): each takes the fuzzer's bytes, drives one parser that a
//! guest, a VMM helper, a registry or a CRI/streaming client reaches, and panics only when an
//! invariant breaks. Not part of huskd's API.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use crate::streaming::spdy::frame::{self, Frame, HeaderDecoder, HeaderEncoder};

/// A scratch directory under the system temp dir, removed on drop.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(what: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "husk-fuzz-{what}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("scratch dir");
        Scratch(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// SPDY/3.1 framing: every frame parsed from the input re-encodes to a frame that parses
/// back the same; the buffer only shrinks by whole frames.
pub fn spdy_frames(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    let mut dec = HeaderDecoder::new();
    let mut enc = HeaderEncoder::new();
    let mut dec2 = HeaderDecoder::new();
    loop {
        let before = buf.len();
        match frame::parse(&mut buf, &mut dec) {
            Ok(Some(f)) => {
                assert!(buf.len() < before, "a frame consumes bytes");
                if matches!(f, Frame::Unknown { .. }) {
                    continue;
                }
                let mut out = BytesMut::new();
                frame::encode(&f, &mut enc, &mut out);
                let back = frame::parse(&mut out, &mut dec2)
                    .expect("our own encoding parses")
                    .expect("a whole frame");
                assert_eq!(back, f, "frame round trip");
                assert!(out.is_empty(), "nothing left after our own frame");
            }
            Ok(None) | Err(_) => break,
        }
    }
}

/// A SPDY header block through zlib (with the SPDY dictionary) and the block parser: the
/// decoded headers stay within the limits, and a decoder survives a bad block.
pub fn spdy_headers(data: &[u8]) {
    let mut dec = HeaderDecoder::new();
    // The input is one or more blocks, each prefixed by a u16 length (as SYN_STREAM and
    // HEADERS frames of one connection share one zlib stream).
    let mut rest = data;
    while rest.len() >= 2 {
        let n = usize::from(u16::from_le_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        let block = &rest[2..2 + n];
        rest = &rest[2 + n..];
        if let Ok(h) = dec.decode(block) {
            assert!(h.len() <= frame::MAX_HEADERS);
            let total: usize = h.iter().map(|(k, v)| k.len() + v.len()).sum();
            assert!(total <= frame::MAX_HEADER_BLOCK);
        }
    }
}

/// A SPDY connection (server side, as huskd's streaming server runs it) fed the input as the
/// client's bytes: it must neither panic nor outlive the client by more than a moment.
pub fn spdy_conn(data: &[u8]) {
    use crate::streaming::spdy::conn::{Conn, Role as SpdyRole};
    let rt = runtime();
    rt.block_on(async {
        let (client, server) = tokio::io::duplex(64 << 10);
        let (conn, mut incoming) = Conn::start(server, SpdyRole::Server);
        let (mut cr, mut cw) = tokio::io::split(client);
        let reader = tokio::spawn(async move {
            let mut sink = vec![0u8; 16 << 10];
            while cr.read(&mut sink).await.is_ok_and(|n| n > 0) {}
        });
        let _ = cw.write_all(data).await;
        let streams = tokio::spawn(async move {
            let mut n = 0;
            while let Some(mut s) = incoming.recv().await {
                n += 1;
                assert!(n <= 10_000, "streams are bounded by the frames sent");
                tokio::spawn(async move { while s.read().await.is_some() {} });
            }
        });
        let _ = cw.shutdown().await;
        drop(cw);
        let mut closed = conn.closed();
        let done = tokio::time::timeout(Duration::from_secs(5), closed.wait_for(|c| *c)).await;
        assert!(done.is_ok(), "connection ends when the client's bytes end");
        conn.shutdown().await;
        let _ = tokio::time::timeout(Duration::from_secs(1), streams).await;
        reader.abort();
    });
}

/// WebSocket framing (tungstenite, server role, the streaming server's config) and huskd's
/// channel decoding of each message, for every channel protocol.
pub fn websocket(data: &[u8]) {
    let Some((&sel, bytes)) = data.split_first() else {
        return;
    };
    let protos = crate::streaming::protocol::WS_EXEC;
    let proto = protos[usize::from(sel) % protos.len()];
    let b64 = crate::streaming::protocol::is_base64(proto);
    let rt = runtime();
    rt.block_on(async {
        let (client, server) = tokio::io::duplex(64 << 10);
        let cfg = WebSocketConfig::default();
        let ws = WebSocketStream::from_raw_socket(server, Role::Server, Some(cfg)).await;
        let (mut cr, mut cw) = tokio::io::split(client);
        let drain = tokio::spawn(async move {
            let mut sink = vec![0u8; 16 << 10];
            while cr.read(&mut sink).await.is_ok_and(|n| n > 0) {}
        });
        let feed = bytes.to_vec();
        tokio::spawn(async move {
            let _ = cw.write_all(&feed).await;
            let _ = cw.shutdown().await;
        });
        let (_sink, mut stream) = ws.split();
        let read = async {
            while let Some(Ok(msg)) = stream.next().await {
                if let Some((ch, d)) = crate::streaming::channels::decode_ws(&msg, b64) {
                    let _ = (ch, d.len());
                }
            }
        };
        assert!(
            tokio::time::timeout(Duration::from_secs(5), read)
                .await
                .is_ok(),
            "the reader ends when the client's bytes end"
        );
        drain.abort();
    });
}

/// How a fake peer (a VMM, QEMU, a guest behind the vsock socket) answers: the input once,
/// then, if `flood`, newline-free filler until the reader stops reading.
struct Peer {
    written: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

/// Bytes a line reader may take from a peer that never ends its line before giving up: its
/// line limit plus what the two socket buffers hold.
const FLOOD_SLACK: usize = 4 << 20;
const FLOOD_MAX: usize = 64 << 20;

fn fake_peer(sock: &Path, answer: Vec<u8>, flood: bool, read_first: bool) -> Peer {
    let l = tokio::net::UnixListener::bind(sock).expect("bind fake peer");
    let written = Arc::new(AtomicUsize::new(0));
    let w = written.clone();
    let task = tokio::spawn(async move {
        let Ok((mut s, _)) = l.accept().await else {
            return;
        };
        if read_first {
            // The request line (CONNECT / a command).
            let mut b = [0u8; 1];
            while s.read(&mut b).await.is_ok_and(|n| n == 1) && b[0] != b'\n' {}
        }
        if s.write_all(&answer).await.is_err() {
            return;
        }
        w.fetch_add(answer.len(), Ordering::Relaxed);
        if flood {
            let chunk = vec![b'x'; 64 << 10];
            while w.load(Ordering::Relaxed) < FLOOD_MAX {
                if s.write_all(&chunk).await.is_err() {
                    return;
                }
                w.fetch_add(chunk.len(), Ordering::Relaxed);
            }
        }
        // Keep the connection open: the reader decides when it has had enough.
        let mut sink = [0u8; 4096];
        while s.read(&mut sink).await.is_ok_and(|n| n > 0) {}
    });
    Peer { written, task }
}

/// The line readers huskd runs against a VMM helper or QEMU: the hybrid-vsock `CONNECT`
/// answer (`OK <port>`), the husk-vmm control socket, QMP. Selector byte: which reader, and
/// whether the peer floods a line that never ends. Each must return within its timeout and
/// stop reading a line at its bound.
pub fn line_readers(data: &[u8]) {
    use crate::sandbox::vm::husk_vmm::vmmctl;
    use crate::sandbox::vm::{hybrid, qemu::qmp};
    let Some((&sel, answer)) = data.split_first() else {
        return;
    };
    let flood = sel & 0x80 != 0;
    let dir = Scratch::new("lines");
    let sock = dir.path().join("peer.sock");
    let timeout = Duration::from_millis(300);
    let rt = runtime();
    rt.block_on(async {
        let which = sel % 4;
        let peer = fake_peer(&sock, answer.to_vec(), flood, which != 2);
        let start = Instant::now();
        match which {
            0 => {
                let _ = hybrid::connect(&sock, 1024, timeout).await;
            }
            1 => {
                let _ = vmmctl::disks(&sock, timeout).await;
            }
            2 => {
                let _ = qmp::status(&sock, timeout).await;
            }
            _ => {
                let _ = vmmctl::command(&sock, "status", timeout).await;
            }
        }
        let took = start.elapsed();
        let taken = peer.written.load(Ordering::Relaxed);
        peer.task.abort();
        assert!(
            took < timeout * 4 + Duration::from_secs(1),
            "reader {which} took {took:?}"
        );
        assert!(
            taken <= answer.len() + FLOOD_SLACK,
            "reader {which} kept reading an endless line: {taken} bytes"
        );
    });
}

/// An image layer (tar) unpacked into a scratch snapshot: nothing appears or changes outside
/// it, whatever the entries say.
pub fn tar_layer(data: &[u8]) {
    let dir = Scratch::new("tar");
    let dest = dir.path().join("snap");
    std::fs::create_dir_all(&dest).expect("dest");
    std::fs::write(dir.path().join("outside"), b"sentinel").expect("sentinel");
    let _ = crate::image::unpack::unpack_layer(data, &dest);
    let mut names: Vec<_> = std::fs::read_dir(dir.path())
        .expect("scratch")
        .map(|e| e.expect("entry").file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["outside", "snap"], "nothing beside the snapshot");
    assert_eq!(
        std::fs::read(dir.path().join("outside")).expect("sentinel"),
        b"sentinel"
    );
}

/// A registry's manifest, index or image config as huskd reads them; every digest it would
/// store stays a file inside the store.
pub fn manifest(data: &[u8]) {
    let base = Path::new("/store/blobs/sha256");
    for d in crate::image::pull::fuzz_manifest(data) {
        let p = base.join(crate::image::store::hex_of(&d));
        assert!(
            p.parent() == Some(base)
                && matches!(
                    p.components().next_back(),
                    Some(std::path::Component::Normal(_))
                ),
            "digest {d:?} names {} outside the store",
            p.display()
        );
    }
}

/// `hosts.toml` for a registry: parsed without panicking; every endpoint it yields is a URL
/// for the registry or one of its mirrors.
pub fn hosts_toml(data: &[u8]) {
    let dir = Scratch::new("hosts");
    let reg = dir.path().join("registry.test");
    std::fs::create_dir_all(&reg).expect("dir");
    let mut f = std::fs::File::create(reg.join("hosts.toml")).expect("hosts.toml");
    f.write_all(data).expect("write");
    drop(f);
    let _ = crate::image::hosts::hosts_for(Some(dir.path()), "registry.test");
}

/// CRI → OCI: a `ContainerConfig` and `PodSandboxConfig` (protobuf, as kubelet sends them)
/// and an image config (JSON) into a runtime spec. Input: u16 length + container config,
/// u16 length + pod config, then the image config.
pub fn cri_oci(data: &[u8]) {
    use husk_proto::cri;
    use prost::Message;
    let mut rest = data;
    let mut take = || {
        if rest.len() < 2 {
            return &[][..];
        }
        let n = usize::from(u16::from_le_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        let (a, b) = rest[2..].split_at(n);
        rest = b;
        a
    };
    let Ok(config) = cri::ContainerConfig::decode(take()) else {
        return;
    };
    let Ok(pod) = cri::PodSandboxConfig::decode(take()) else {
        return;
    };
    let image: serde_json::Value = serde_json::from_slice(rest).unwrap_or_default();
    // Profiles named by a CRI client are host files: only the fuzz scratch area may be named.
    if let Some(sc) = config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        && let Some(p) = &sc.seccomp
        && !p.localhost_ref.is_empty()
    {
        return;
    }
    let _ = crate::sandbox::spec::validate_mounts(&config.mounts);
    if let Some(r) = config.linux.as_ref().and_then(|l| l.resources.as_ref()) {
        let _ = crate::sandbox::spec::validate_resources(r);
    }
    let _ = crate::sandbox::spec::stop_signal(&image);
    let _ = crate::sandbox::spec::container_spec(&config, &pod, &image, Some(-999), u64::MAX, true);
}

/// The agent's replies as huskd's ttrpc client decodes them: a fake agent answers each
/// request with frames from the input (the stream id patched to the request's), for the
/// calls huskd makes of a running guest. Each call returns within its deadline.
pub fn agent_replies(data: &[u8]) {
    use crate::sandbox::agent::Agent;
    let dir = Scratch::new("agent");
    let sock = dir.path().join("agent.sock");
    let rt = runtime();
    let answers = data.to_vec();
    rt.block_on(async {
        let l = tokio::net::UnixListener::bind(&sock).expect("bind");
        let fake = tokio::spawn(async move {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let mut inp = &answers[..];
            loop {
                // One request: 10-byte header, then its payload.
                let mut h = [0u8; 10];
                if s.read_exact(&mut h).await.is_err() {
                    return;
                }
                let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
                let mut body = vec![0u8; len.min(1 << 20)];
                if s.read_exact(&mut body).await.is_err() {
                    return;
                }
                let id = [h[4], h[5], h[6], h[7]];
                // Answer: u16 count of frames, each u8 type, u8 flags, u16 length, payload.
                if inp.len() < 2 {
                    return;
                }
                let frames = inp[0] % 4;
                inp = &inp[1..];
                for _ in 0..frames {
                    if inp.len() < 4 {
                        break;
                    }
                    let (ty, fl) = (inp[0], inp[1]);
                    let n = usize::from(u16::from_le_bytes([inp[2], inp[3]])).min(inp.len() - 4);
                    let payload = &inp[4..4 + n];
                    inp = &inp[4 + n..];
                    let mut f = Vec::with_capacity(10 + n);
                    f.extend_from_slice(&(n as u32).to_be_bytes());
                    f.extend_from_slice(&id);
                    f.push(ty);
                    f.push(fl);
                    f.extend_from_slice(payload);
                    if s.write_all(&f).await.is_err() {
                        return;
                    }
                }
            }
        });
        let stream = tokio::net::UnixStream::connect(&sock)
            .await
            .expect("connect");
        let agent = Agent::over(stream);
        let t = Duration::from_millis(200);
        let start = Instant::now();
        let _ = agent.check(t).await;
        let _ = agent.wait("c", "e", t).await;
        let _ = agent.read("c", "e", false, Some((0, 0)), t).await;
        let _ = tokio::time::timeout(t, agent.container_stats("c", t)).await;
        let _ = tokio::time::timeout(t, agent.sandbox_stats("p", t)).await;
        let _ = tokio::time::timeout(t, agent.list_containers()).await;
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "agent calls end at their deadlines"
        );
        drop(agent);
        fake.abort();
    });
}
