//! A client of the streaming server (and of any Kubernetes-style one, e.g.
//! containerd's): exec/attach and port-forward over SPDY/3.1 or WebSocket.
//! Used by the CLI, the tests and the benchmarks.

use std::collections::HashMap;

use base64::Engine as _;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use super::channels::encode_ws;
use super::protocol::{self, CLOSE, ERROR, RESIZE, STDERR, STDIN, STDOUT, StatusFormat};
use super::spdy::conn::{Conn, Incoming, Role, Stream};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad streaming url {0:?}")]
    Url(String),
    #[error("connect {0}: {1}")]
    Connect(String, #[source] std::io::Error),
    #[error("upgrade refused: {0}")]
    Refused(String),
    #[error("websocket: {0}")]
    Ws(String),
    #[error(transparent)]
    Spdy(#[from] super::spdy::conn::ConnError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Spdy,
    WebSocket,
}

impl std::str::FromStr for Transport {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "spdy" => Ok(Transport::Spdy),
            "websocket" | "ws" => Ok(Transport::WebSocket),
            _ => Err(format!("unknown protocol {s:?} (spdy or websocket)")),
        }
    }
}

fn split_url(url: &str) -> Result<(String, String), ClientError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| ClientError::Url(url.into()))?;
    let (host, path) = rest
        .split_once('/')
        .ok_or_else(|| ClientError::Url(url.into()))?;
    Ok((host.to_string(), format!("/{path}")))
}

/// HTTP/1.1 upgrade to SPDY/3.1 offering `protocols`; returns the
/// connection and the protocol the server chose.
pub async fn connect_spdy(
    url: &str,
    protocols: &[&str],
) -> Result<(Conn, Incoming, String), ClientError> {
    let (host, path) = split_url(url)?;
    let mut tcp = TcpStream::connect(&host)
        .await
        .map_err(|e| ClientError::Connect(host.clone(), e))?;
    let _ = tcp.set_nodelay(true);
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nContent-Length: 0\r\n"
    );
    for p in protocols {
        req.push_str(&format!("X-Stream-Protocol-Version: {p}\r\n"));
    }
    req.push_str("\r\n");
    tcp.write_all(req.as_bytes()).await?;
    // Byte by byte up to the blank line: nothing of the SPDY stream is read.
    let mut head = Vec::with_capacity(512);
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if tcp.read(&mut b).await? == 0 || head.len() > 16 << 10 {
            return Err(ClientError::Refused(
                String::from_utf8_lossy(&head).into_owned(),
            ));
        }
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "101" {
        let mut body = vec![0u8; 4096];
        let n = tokio::time::timeout(std::time::Duration::from_secs(2), tcp.read(&mut body))
            .await
            .ok()
            .and_then(|r| r.ok())
            .unwrap_or(0);
        let first = head.lines().next().unwrap_or("").to_string();
        return Err(ClientError::Refused(format!(
            "{first}: {}",
            String::from_utf8_lossy(&body[..n]).trim()
        )));
    }
    let chosen = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("x-stream-protocol-version"))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    let (conn, incoming) = Conn::start(tcp, Role::Client);
    Ok((conn, incoming, chosen))
}

pub type WsClient = tokio_tungstenite::WebSocketStream<TcpStream>;

/// WebSocket handshake offering `protocols`.
pub async fn connect_ws(url: &str, protocols: &[&str]) -> Result<(WsClient, String), ClientError> {
    let (host, _) = split_url(url)?;
    let ws_url = format!("ws://{}", &url["http://".len()..]);
    let mut req = ws_url
        .into_client_request()
        .map_err(|e| ClientError::Ws(e.to_string()))?;
    if !protocols.is_empty() {
        let v = protocols.join(", ");
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            v.parse().map_err(|_| ClientError::Url(url.into()))?,
        );
    }
    let tcp = TcpStream::connect(&host)
        .await
        .map_err(|e| ClientError::Connect(host.clone(), e))?;
    let _ = tcp.set_nodelay(true);
    let (ws, resp) = tokio_tungstenite::client_async(req, tcp)
        .await
        .map_err(|e| match e {
            tokio_tungstenite::tungstenite::Error::Http(r) => ClientError::Refused(format!(
                "{}: {}",
                r.status(),
                String::from_utf8_lossy(r.body().as_deref().unwrap_or_default()).trim()
            )),
            e => ClientError::Ws(e.to_string()),
        })?;
    let chosen = resp
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    Ok((ws, chosen))
}

/// What an exec/attach client sends and receives.
pub struct CommandIo {
    /// Input; the sender dropping = stdin EOF. None = no stdin.
    pub stdin: Option<mpsc::Receiver<Bytes>>,
    pub stdout: Option<mpsc::Sender<Bytes>>,
    pub stderr: Option<mpsc::Sender<Bytes>>,
    /// Terminal sizes (cols, rows). Only with a tty.
    pub resize: Option<mpsc::Receiver<(u16, u16)>>,
}

fn resize_json(cols: u16, rows: u16) -> Vec<u8> {
    serde_json::json!({"Width": cols, "Height": rows})
        .to_string()
        .into_bytes()
}

/// Runs an exec/attach session; Ok(exit code) or Err(message from the
/// error channel / transport).
pub async fn run_command(url: &str, transport: Transport, io: CommandIo) -> Result<i32, String> {
    match transport {
        Transport::Spdy => run_spdy(url, io).await,
        Transport::WebSocket => run_ws(url, io).await,
    }
}

async fn run_spdy(url: &str, io: CommandIo) -> Result<i32, String> {
    let (conn, _incoming, proto) = connect_spdy(url, protocol::SPDY_EXEC)
        .await
        .map_err(|e| e.to_string())?;
    let format = StatusFormat::for_protocol(&proto);
    let open = |t: u8| {
        let conn = &conn;
        async move {
            conn.open(vec![(
                "streamtype".into(),
                protocol::stream_type_name(t).into(),
            )])
            .await
            .map_err(|e| e.to_string())
        }
    };
    let mut error = open(ERROR).await?;
    let mut tasks = Vec::new();
    if let Some(mut rx) = io.stdin {
        let s = open(STDIN).await?;
        let w = s.writer();
        tasks.push(tokio::spawn(async move {
            while let Some(d) = rx.recv().await {
                if w.write(&d).await.is_err() {
                    return;
                }
            }
            w.close().await;
        }));
    }
    let mut outs = Vec::new();
    for (t, tx) in [(STDOUT, io.stdout), (STDERR, io.stderr)] {
        if let Some(tx) = tx {
            let s = open(t).await?;
            outs.push(tokio::spawn(drain(s, tx)));
        }
    }
    if let Some(mut rx) = io.resize
        && protocol::has_resize(&proto)
    {
        {
            let s = open(RESIZE).await?;
            let w = s.writer();
            tasks.push(tokio::spawn(async move {
                while let Some((c, r)) = rx.recv().await {
                    if w.write(&resize_json(c, r)).await.is_err() {
                        return;
                    }
                }
            }));
        }
    }
    let mut status = Vec::new();
    while let Some(d) = error.read().await {
        status.extend_from_slice(&d);
    }
    for o in outs {
        let _ = o.await;
    }
    for t in tasks {
        t.abort();
    }
    conn.shutdown().await;
    protocol::parse_status(format, &status)
}

async fn drain(mut s: Stream, tx: mpsc::Sender<Bytes>) {
    while let Some(d) = s.read().await {
        if tx.send(d).await.is_err() {
            return;
        }
    }
}

async fn run_ws(url: &str, io: CommandIo) -> Result<i32, String> {
    let (ws, proto) = connect_ws(url, protocol::WS_EXEC)
        .await
        .map_err(|e| e.to_string())?;
    let format = StatusFormat::for_protocol(&proto);
    let b64 = protocol::is_base64(&proto);
    let v5 = proto.starts_with("v5.");
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::channel::<Message>(16);
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if sink.send(m).await.is_err() {
                return;
            }
        }
        let _ = sink.close().await;
    });
    let mut tasks = Vec::new();
    if let Some(mut input) = io.stdin {
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(d) = input.recv().await {
                if tx.send(encode_ws(b64, STDIN, &d)).await.is_err() {
                    return;
                }
            }
            if v5 {
                let _ = tx
                    .send(Message::Binary(Bytes::from(vec![CLOSE, STDIN])))
                    .await;
            }
        }));
    }
    if let Some(mut r) = io.resize {
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            while let Some((c, rows)) = r.recv().await {
                if tx
                    .send(encode_ws(b64, RESIZE, &resize_json(c, rows)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }));
    }
    let mut status = Vec::new();
    while let Some(Ok(m)) = stream.next().await {
        let (ch, data) = match m {
            Message::Binary(d) if !d.is_empty() => (d[0], d.slice(1..)),
            Message::Text(t) if !t.is_empty() => {
                let t = t.as_str();
                let d = base64::engine::general_purpose::STANDARD
                    .decode(&t[1..])
                    .unwrap_or_default();
                (t.as_bytes()[0].wrapping_sub(b'0'), Bytes::from(d))
            }
            Message::Close(_) => break,
            _ => continue,
        };
        match ch {
            STDOUT => {
                if let Some(o) = &io.stdout {
                    let _ = o.send(data).await;
                }
            }
            STDERR => {
                if let Some(o) = &io.stderr {
                    let _ = o.send(data).await;
                }
            }
            ERROR => status.extend_from_slice(&data),
            _ => {}
        }
    }
    for t in tasks {
        t.abort();
    }
    drop(tx);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), writer).await;
    protocol::parse_status(format, &status)
}

/// Runs a command with fixed stdin and collects its output.
pub async fn exec_collect(
    url: &str,
    transport: Transport,
    stdin: Option<Vec<u8>>,
    want_stderr: bool,
) -> (Vec<u8>, Vec<u8>, Result<i32, String>) {
    let (in_tx, in_rx) = mpsc::channel(4);
    if let Some(d) = stdin.clone() {
        tokio::spawn(async move {
            let _ = in_tx.send(Bytes::from(d)).await;
        });
    }
    let (out_tx, mut out_rx) = mpsc::channel(16);
    let (err_tx, mut err_rx) = mpsc::channel(16);
    let io = CommandIo {
        stdin: stdin.map(|_| in_rx),
        stdout: Some(out_tx),
        stderr: want_stderr.then_some(err_tx),
        resize: None,
    };
    let run = run_command(url, transport, io);
    let collect = async {
        let mut o = Vec::new();
        let mut e = Vec::new();
        let (mut od, mut ed) = (false, false);
        while !(od && ed) {
            tokio::select! {
                d = out_rx.recv(), if !od => match d { Some(d) => o.extend_from_slice(&d), None => od = true },
                d = err_rx.recv(), if !ed => match d { Some(d) => e.extend_from_slice(&d), None => ed = true },
            }
        }
        (o, e)
    };
    let (r, (o, e)) = tokio::join!(run, collect);
    (o, e, r)
}

/// A SPDY port-forward connection: one per session, many forwarded connections.
pub struct SpdyForwarder {
    conn: Conn,
    next: std::sync::atomic::AtomicU32,
}

impl SpdyForwarder {
    pub async fn connect(url: &str) -> Result<Self, ClientError> {
        let (conn, _incoming, _) = connect_spdy(url, protocol::SPDY_PORT_FORWARD).await?;
        Ok(Self {
            conn,
            next: 0.into(),
        })
    }

    /// Opens a connection to `port`: the local end of it, and the error
    /// message the server reports for it ("" = none) once it ends.
    pub async fn open(
        &self,
        port: u16,
    ) -> Result<(DuplexStream, tokio::task::JoinHandle<String>), ClientError> {
        let id = self
            .next
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .to_string();
        let h = |t: &str| {
            vec![
                ("streamtype".to_string(), t.to_string()),
                ("port".to_string(), port.to_string()),
                ("requestid".to_string(), id.clone()),
            ]
        };
        let mut err = self.conn.open(h("error")).await?;
        err.writer().close().await;
        let data = self.conn.open(h("data")).await?;
        let (local, remote) = tokio::io::duplex(64 << 10);
        let (mut rx, w) = data.split();
        let (mut rd, mut wr) = tokio::io::split(remote);
        tokio::spawn(async move {
            while let Some(d) = rx.recv().await {
                if wr.write_all(&d).await.is_err() {
                    break;
                }
            }
            let _ = wr.shutdown().await;
        });
        tokio::spawn(async move {
            let mut buf = vec![0u8; 32 << 10];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if w.write(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
            w.close().await;
        });
        let errors = tokio::spawn(async move {
            let mut m = Vec::new();
            while let Some(d) = err.read().await {
                m.extend_from_slice(&d);
            }
            String::from_utf8_lossy(&m).into_owned()
        });
        Ok((local, errors))
    }

    pub async fn close(self) {
        self.conn.shutdown().await;
    }
}

/// A WebSocket port-forward of one connection to `port` (`url` must be
/// fresh: one URL per WebSocket).
pub async fn ws_forward(
    url: &str,
    port: u16,
) -> Result<(DuplexStream, tokio::task::JoinHandle<String>), ClientError> {
    let sep = if url.contains('?') { '&' } else { '?' };
    let (ws, proto) =
        connect_ws(&format!("{url}{sep}port={port}"), protocol::WS_PORT_FORWARD).await?;
    let b64 = protocol::is_base64(&proto);
    let (mut sink, mut stream) = ws.split();
    let (local, remote) = tokio::io::duplex(64 << 10);
    let (mut rd, mut wr) = tokio::io::split(remote);
    let reader = tokio::spawn(async move {
        let mut seen: HashMap<u8, bool> = HashMap::new();
        let mut err = Vec::new();
        while let Some(Ok(m)) = stream.next().await {
            let (ch, data) = match m {
                Message::Binary(d) if !d.is_empty() => (d[0], d.slice(1..)),
                Message::Text(t) if !t.is_empty() => {
                    let t = t.as_str();
                    let d = base64::engine::general_purpose::STANDARD
                        .decode(&t[1..])
                        .unwrap_or_default();
                    (t.as_bytes()[0].wrapping_sub(b'0'), Bytes::from(d))
                }
                Message::Close(_) => break,
                _ => continue,
            };
            // Each channel starts with the port number (2 bytes).
            let first = !seen.contains_key(&ch);
            seen.insert(ch, true);
            let data = if first && data.len() >= 2 {
                data.slice(2..)
            } else {
                data
            };
            match ch {
                0 if !data.is_empty() && wr.write_all(&data).await.is_err() => break,
                1 => err.extend_from_slice(&data),
                _ => {}
            }
        }
        let _ = wr.shutdown().await;
        String::from_utf8_lossy(&err).into_owned()
    });
    tokio::spawn(async move {
        let mut buf = vec![0u8; 32 << 10];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if sink.send(encode_ws(b64, 0, &buf[..n])).await.is_err() {
                        return;
                    }
                }
            }
        }
        // No half-close in this framing: the server ends the connection.
        let _ = sink.flush().await;
    });
    Ok((local, reader))
}
