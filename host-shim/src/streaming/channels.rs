//! One exec/attach session's channels, the same for SPDY (a stream per
//! channel) and WebSocket (one connection, a channel byte per message).

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use super::protocol::{self, CLOSE, ERROR, RESIZE, STDERR, STDIN, STDOUT, StatusFormat};
use super::spdy::conn::{Conn, Role, StreamWriter};
use super::spdy::frame::rst;

/// How long a client has to open the streams the session needs.
pub const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);

pub type Ws = WebSocketStream<TokioIo<Upgraded>>;

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("client did not open the {0} stream in time")]
    MissingStream(&'static str),
    #[error("client closed the connection during setup")]
    Gone,
}

/// A message for a WebSocket connection's writer.
pub enum WsOut {
    Data(u8, Bytes),
    /// v5: the server will not write on this channel any more.
    Close(u8),
}

/// One output channel (stdout, stderr, error, port-forward data...).
#[derive(Clone)]
pub enum Output {
    Spdy(StreamWriter),
    Ws { ch: u8, tx: mpsc::Sender<WsOut> },
}

impl Output {
    /// Whether the bytes went out (false: the client is gone).
    pub async fn write(&self, d: &[u8]) -> bool {
        match self {
            Output::Spdy(w) => w.write(d).await.is_ok(),
            Output::Ws { ch, tx } => {
                for c in d.chunks(32 << 10) {
                    if tx
                        .send(WsOut::Data(*ch, Bytes::copy_from_slice(c)))
                        .await
                        .is_err()
                    {
                        return false;
                    }
                }
                true
            }
        }
    }

    pub async fn close(&self) {
        match self {
            Output::Spdy(w) => w.close().await,
            Output::Ws { ch, tx } => {
                let _ = tx.send(WsOut::Close(*ch)).await;
            }
        }
    }
}

/// Which channels the session uses.
#[derive(Debug, Clone, Copy)]
pub struct Wanted {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub resize: bool,
}

/// The channels of one exec/attach session.
pub struct Session {
    pub stdin: Option<mpsc::Receiver<Bytes>>,
    pub stdout: Option<Output>,
    pub stderr: Option<Output>,
    pub error: Option<Output>,
    pub resize: Option<mpsc::Receiver<Bytes>>,
    pub format: StatusFormat,
    /// True once the client's side of the connection ended.
    pub gone: watch::Receiver<bool>,
    ending: Ending,
}

enum Ending {
    Spdy(Conn),
    Ws {
        writer: tokio::task::JoinHandle<()>,
        reader: tokio::task::JoinHandle<()>,
    },
}

impl Session {
    /// Closes every channel and the connection, waiting (bounded) for the
    /// last writes to reach the client.
    pub async fn finish(mut self) {
        for o in [self.stdout.take(), self.stderr.take(), self.error.take()]
            .into_iter()
            .flatten()
        {
            o.close().await;
        }
        self.stdin = None;
        self.resize = None;
        match self.ending {
            Ending::Spdy(conn) => conn.shutdown().await,
            Ending::Ws { writer, reader } => {
                let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    let mut gone = self.gone;
                    let _ = gone.wait_for(|g| *g).await;
                })
                .await;
                reader.abort();
            }
        }
    }
}

/// Sets up a SPDY session: waits for the client's streams.
pub async fn spdy_session(
    io: TokioIo<Upgraded>,
    proto: &str,
    want: Wanted,
) -> Result<Session, ChannelError> {
    let (conn, mut incoming) = Conn::start(io, Role::Server);
    let format = StatusFormat::for_protocol(proto);
    let mut got: HashMap<u8, super::spdy::conn::Stream> = HashMap::new();
    let mut need = vec![ERROR];
    if want.stdin {
        need.push(STDIN);
    }
    if want.stdout {
        need.push(STDOUT);
    }
    if want.stderr {
        need.push(STDERR);
    }
    let deadline = tokio::time::Instant::now() + STREAM_CREATION_TIMEOUT;
    while !need.iter().all(|c| got.contains_key(c)) {
        let s = match tokio::time::timeout_at(deadline, incoming.recv()).await {
            Ok(Some(s)) => s,
            Ok(None) => return Err(ChannelError::Gone),
            Err(_) => {
                let missing = need
                    .iter()
                    .find(|c| !got.contains_key(c))
                    .copied()
                    .unwrap_or(ERROR);
                return Err(ChannelError::MissingStream(protocol::stream_type_name(
                    missing,
                )));
            }
        };
        match s.header("streamtype").and_then(protocol::stream_type) {
            Some(t) if !got.contains_key(&t) => {
                got.insert(t, s);
            }
            _ => s.writer().reset(rst::PROTOCOL_ERROR).await,
        }
    }
    // A resize stream may come later than the others (or never); other
    // streams after setup are refused.
    let resize_late = if want.resize && !got.contains_key(&RESIZE) {
        let (tx, rx) = mpsc::channel(8);
        Some((tx, rx))
    } else {
        None
    };
    let (late_tx, late_rx) = match resize_late {
        Some((tx, rx)) => (Some(tx), Some(rx)),
        None => (None, None),
    };
    tokio::spawn(async move {
        let mut late_tx = late_tx;
        while let Some(s) = incoming.recv().await {
            if s.header("streamtype") == Some("resize")
                && let Some(tx) = late_tx.take()
            {
                let (mut rx, _w) = s.split();
                tokio::spawn(async move {
                    while let Some(d) = rx.recv().await {
                        if tx.send(d).await.is_err() {
                            return;
                        }
                    }
                });
                continue;
            }
            s.writer().reset(rst::REFUSED_STREAM).await;
        }
    });
    let out = |s: Option<super::spdy::conn::Stream>| s.map(|s| Output::Spdy(s.writer()));
    let inp = |s: Option<super::spdy::conn::Stream>| s.map(|s| s.split().0);
    let resize = match got.remove(&RESIZE) {
        Some(s) => Some(s.split().0),
        None => late_rx,
    };
    Ok(Session {
        stdin: inp(got.remove(&STDIN)),
        stdout: out(got.remove(&STDOUT)),
        stderr: out(got.remove(&STDERR)),
        error: out(got.remove(&ERROR)),
        resize,
        format,
        gone: conn.closed(),
        ending: Ending::Spdy(conn),
    })
}

/// Splits a WebSocket into a writer task (fed by `WsOut`) and a reader
/// task routing each input channel to its sender.
pub fn ws_tasks(
    ws: Ws,
    proto: &str,
    inputs: HashMap<u8, mpsc::Sender<Bytes>>,
) -> (
    mpsc::Sender<WsOut>,
    watch::Receiver<bool>,
    tokio::task::JoinHandle<()>,
    tokio::task::JoinHandle<()>,
) {
    let b64 = protocol::is_base64(proto);
    let v5 = proto.starts_with("v5.");
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::channel::<WsOut>(64);
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            let msg = match m {
                WsOut::Data(ch, d) => encode_ws(b64, ch, &d),
                WsOut::Close(ch) if v5 => Message::Binary(Bytes::from(vec![CLOSE, ch])),
                WsOut::Close(_) => continue,
            };
            if sink.send(msg).await.is_err() {
                return;
            }
        }
        let _ = sink.send(Message::Close(None)).await;
        let _ = sink.close().await;
    });
    let (gone_tx, gone) = watch::channel(false);
    let reader = tokio::spawn(async move {
        let mut inputs: HashMap<u8, mpsc::Sender<Bytes>> = inputs;
        while let Some(Ok(msg)) = stream.next().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
            let Some((ch, data)) = decode_ws(&msg, b64) else {
                continue;
            };
            if ch == CLOSE && v5 {
                if let Some(c) = data.first() {
                    inputs.remove(c);
                }
                continue;
            }
            if let Some(tx) = inputs.get(&ch)
                && !data.is_empty()
                && tx.send(data).await.is_err()
            {
                inputs.remove(&ch);
            }
        }
        drop(inputs);
        gone_tx.send_replace(true);
    });
    (tx, gone, writer, reader)
}

/// The channel and data of one client message (`None`: not a data message, or undecodable).
pub fn decode_ws(msg: &Message, b64: bool) -> Option<(u8, Bytes)> {
    match msg {
        Message::Binary(d) if !d.is_empty() && !b64 => Some((d[0], d.slice(1..))),
        // Some clients (the Python one) send binary-protocol frames as text.
        Message::Text(t) if !t.is_empty() && !b64 => {
            let d = Bytes::copy_from_slice(t.as_bytes());
            Some((d[0], d.slice(1..)))
        }
        Message::Text(t) if b64 && !t.is_empty() => {
            // Bytes, not str: a first character of several bytes is no char boundary.
            let t = t.as_bytes();
            let ch = t[0].wrapping_sub(b'0');
            let d = base64::engine::general_purpose::STANDARD
                .decode(&t[1..])
                .ok()?;
            Some((ch, Bytes::from(d)))
        }
        _ => None,
    }
}

pub fn encode_ws(b64: bool, ch: u8, d: &[u8]) -> Message {
    if b64 {
        let mut s = String::with_capacity(1 + d.len() * 4 / 3 + 4);
        s.push((b'0' + ch) as char);
        s.push_str(&base64::engine::general_purpose::STANDARD.encode(d));
        Message::Text(s.into())
    } else {
        let mut v = Vec::with_capacity(d.len() + 1);
        v.push(ch);
        v.extend_from_slice(d);
        Message::Binary(Bytes::from(v))
    }
}

/// Sets up a WebSocket exec/attach session.
pub fn ws_session(ws: Ws, proto: &str, want: Wanted) -> Session {
    let mut inputs = HashMap::new();
    let (stdin, resize) = {
        let mut stdin = None;
        let mut resize = None;
        if want.stdin {
            let (tx, rx) = mpsc::channel(16);
            inputs.insert(STDIN, tx);
            stdin = Some(rx);
        }
        if want.resize {
            let (tx, rx) = mpsc::channel(8);
            inputs.insert(RESIZE, tx);
            resize = Some(rx);
        }
        (stdin, resize)
    };
    let (tx, gone, writer, reader) = ws_tasks(ws, proto, inputs);
    let out = |ch: u8, on: bool| on.then(|| Output::Ws { ch, tx: tx.clone() });
    Session {
        stdin,
        stdout: out(STDOUT, want.stdout),
        stderr: out(STDERR, want.stderr),
        error: out(ERROR, true),
        resize,
        format: StatusFormat::for_protocol(proto),
        gone,
        ending: Ending::Ws { writer, reader },
    }
}

/// Resolves once `w` is true (or its sender is gone).
pub async fn until_true(w: &mut watch::Receiver<bool>) {
    let _ = w.wait_for(|v| *v).await;
}
