//! PortForward: each client connection to a pod port becomes a connection
//! to the pod's agent forward endpoint (`FORWARD <port>\n` → `OK\n` /
//! `ERR <msg>\n`, then raw bytes to localhost:<port> in the pod's network
//! namespace). A failed connection reports on its own error stream/channel;
//! the others go on.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use super::channels::{self, Output, STREAM_CREATION_TIMEOUT, Ws, WsOut};
use super::spdy::conn::{Conn, Role, Stream};
use super::spdy::frame::rst;
use crate::sandbox::Manager;

/// Opens a forwarded connection to `port` in pod `pod_id`.
pub async fn dial(runtime: &Arc<Manager>, pod_id: &str, port: u16) -> Result<UnixStream, String> {
    if port == 0 {
        return Err("port 0 is not a valid port".into());
    }
    let mut s = runtime
        .dial_forward(pod_id)
        .await
        .map_err(|e| e.to_string())?;
    s.write_all(format!("FORWARD {port}\n").as_bytes())
        .await
        .map_err(|e| format!("agent forward endpoint: {e}"))?;
    let mut line = Vec::with_capacity(64);
    let read = async {
        let mut b = [0u8; 1];
        while line.len() < 512 {
            if s.read(&mut b).await? == 0 {
                break;
            }
            if b[0] == b'\n' {
                break;
            }
            line.push(b[0]);
        }
        Ok::<_, std::io::Error>(())
    };
    match tokio::time::timeout(Duration::from_secs(30), read).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(format!("agent forward endpoint: {e}")),
        Err(_) => return Err("agent forward endpoint did not answer".into()),
    }
    let line = String::from_utf8_lossy(&line);
    if line == "OK" {
        Ok(s)
    } else if let Some(m) = line.strip_prefix("ERR ") {
        Err(m.to_string())
    } else {
        Err(format!(
            "agent forward endpoint: unexpected answer {line:?}"
        ))
    }
}

fn pf_error(port: u16, pod_id: &str, msg: &str) -> String {
    format!("error forwarding port {port} to pod {pod_id}, uid : {msg}")
}

/// Copies between the client (`rx` in, `out` out) and the pod connection.
async fn splice(sock: UnixStream, mut rx: mpsc::Receiver<Bytes>, out: Output) {
    let (mut rd, mut wr) = sock.into_split();
    let up = async move {
        while let Some(d) = rx.recv().await {
            if wr.write_all(&d).await.is_err() {
                return;
            }
        }
        let _ = wr.shutdown().await;
    };
    let down = async {
        let mut buf = vec![0u8; 32 << 10];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if !out.write(&buf[..n]).await {
                        break;
                    }
                }
            }
        }
        out.close().await;
    };
    // The client closing its side half-closes toward the pod; the pod side
    // closing ends the whole connection.
    tokio::pin!(down, up);
    tokio::select! {
        _ = &mut down => {}
        _ = &mut up => down.await,
    }
}

/// SPDY: the client opens an error stream and a data stream per connection,
/// both with `port` and `requestID` headers.
pub async fn serve_spdy(runtime: Arc<Manager>, pod_id: String, io: TokioIo<Upgraded>) {
    let (conn, mut incoming) = Conn::start(io, Role::Server);
    let mut closed = conn.closed();
    let mut half: HashMap<String, (Option<Stream>, Option<Stream>, tokio::time::Instant)> =
        HashMap::new();
    let mut tasks = tokio::task::JoinSet::new();
    let mut sweep = tokio::time::interval(Duration::from_secs(5));
    loop {
        let s = tokio::select! {
            s = incoming.recv() => match s { Some(s) => s, None => break },
            _ = channels::until_true(&mut closed) => break,
            _ = sweep.tick() => {
                let now = tokio::time::Instant::now();
                let stale: Vec<String> = half.iter().filter(|(_, v)| v.2 <= now).map(|(k, _)| k.clone()).collect();
                for k in stale {
                    if let Some((e, d, _)) = half.remove(&k) {
                        for s in [e, d].into_iter().flatten() {
                            s.writer().reset(rst::CANCEL).await;
                        }
                    }
                }
                continue;
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        let (Some(kind), Some(req)) = (s.header("streamtype"), s.header("requestid")) else {
            s.writer().reset(rst::PROTOCOL_ERROR).await;
            continue;
        };
        let (kind, req) = (kind.to_string(), req.to_string());
        let entry = half.entry(req.clone()).or_insert((
            None,
            None,
            tokio::time::Instant::now() + STREAM_CREATION_TIMEOUT,
        ));
        let slot = match kind.as_str() {
            "error" => &mut entry.0,
            "data" => &mut entry.1,
            _ => {
                s.writer().reset(rst::PROTOCOL_ERROR).await;
                continue;
            }
        };
        if slot.is_some() {
            s.writer().reset(rst::PROTOCOL_ERROR).await;
            continue;
        }
        *slot = Some(s);
        let complete = half
            .get(&req)
            .is_some_and(|v| v.0.is_some() && v.1.is_some());
        if complete && let Some((Some(e), Some(d), _)) = half.remove(&req) {
            let (runtime, pod_id) = (runtime.clone(), pod_id.clone());
            tasks.spawn(async move { forward_spdy(runtime, pod_id, e, d).await });
        }
    }
    // The client is gone: stop every forwarded connection.
    tasks.shutdown().await;
    conn.shutdown().await;
}

async fn forward_spdy(runtime: Arc<Manager>, pod_id: String, err: Stream, data: Stream) {
    let port_hdr = data.header("port").unwrap_or("").to_string();
    let ew = err.writer();
    let (rx, dw) = data.split();
    let result = match port_hdr.parse::<u16>() {
        Ok(port) => dial(&runtime, &pod_id, port)
            .await
            .map_err(|m| pf_error(port, &pod_id, &m)),
        Err(_) => Err(format!("invalid port {port_hdr:?}")),
    };
    match result {
        Ok(sock) => {
            splice(sock, rx, Output::Spdy(dw)).await;
        }
        Err(m) => {
            tracing::debug!(pod = %pod_id, error = %m, "port-forward connection failed");
            let _ = ew.write(m.as_bytes()).await;
            dw.close().await;
        }
    }
    ew.close().await;
}

/// WebSocket: one connection per requested port; channel 2i carries port
/// i's data, 2i+1 its errors; each channel starts with the port number
/// (2 bytes, little endian).
pub async fn serve_ws(runtime: Arc<Manager>, pod_id: String, ports: Vec<u16>, proto: &str, ws: Ws) {
    tracing::debug!(?ports, proto, "ws port-forward session");
    let mut inputs = HashMap::new();
    let mut rxs = Vec::new();
    for i in 0..ports.len() {
        let (tx, rx) = mpsc::channel(16);
        inputs.insert((2 * i) as u8, tx);
        rxs.push(rx);
    }
    let (tx, mut gone, writer, reader) = channels::ws_tasks(ws, proto, inputs);
    if ports.is_empty() || ports.len() > 64 {
        let _ = tx
            .send(WsOut::Data(
                1,
                Bytes::from_static(b"port-forward needs 1 to 64 ports (?port=N)"),
            ))
            .await;
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (port, rx)) in ports.iter().copied().zip(rxs).enumerate().take(64) {
        let data = Output::Ws {
            ch: (2 * i) as u8,
            tx: tx.clone(),
        };
        let err = Output::Ws {
            ch: (2 * i + 1) as u8,
            tx: tx.clone(),
        };
        let (runtime, pod_id) = (runtime.clone(), pod_id.clone());
        tasks.spawn(async move {
            let p = port.to_le_bytes();
            data.write(&p).await;
            err.write(&p).await;
            match dial(&runtime, &pod_id, port).await {
                Ok(sock) => splice(sock, rx, data).await,
                Err(m) => {
                    err.write(pf_error(port, &pod_id, &m).as_bytes()).await;
                }
            }
        });
    }
    drop(tx);
    tokio::select! {
        _ = async { while tasks.join_next().await.is_some() {} } => {}
        _ = channels::until_true(&mut gone) => {}
    }
    tasks.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    reader.abort();
}
