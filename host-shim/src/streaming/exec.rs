//! Exec and Attach over a [`Session`]: stdin → agent, agent output →
//! stdout/stderr, resizes → the tty, and the exit status on the error
//! channel once all output has been sent.

use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::channels::{self, Output, Session};
use super::protocol;
use crate::sandbox::agent::{Agent, AgentError, POLL_TIMEOUT};
use crate::sandbox::stream::StreamTarget;

#[derive(Debug, Clone)]
pub struct ExecParams {
    pub container_id: String,
    pub cmd: Vec<String>,
    pub tty: bool,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

#[derive(Debug, Clone)]
pub struct AttachParams {
    pub container_id: String,
    pub tty: bool,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

/// Runs `p` in the container and serves it on `s` until it exits (or the
/// client goes away: then the process is killed, as containerd does).
pub async fn run_exec(t: StreamTarget, p: ExecParams, mut s: Session) {
    let exec_id = format!("exec-{}", &crate::sandbox::state::new_id()[..16]);
    let (agent, cid) = (t.agent.clone(), t.container_id.clone());
    let process = serde_json::json!({ "args": p.cmd, "terminal": p.tty });
    if let Err(e) = agent
        .exec_stdio(&cid, &exec_id, process, p.stdin, p.tty)
        .await
    {
        tracing::info!(container = %cid, error = %e, "streaming exec failed to start");
        if let Some(err) = &s.error {
            err.write(&protocol::error_status(s.format, &format!("exec: {e}")))
                .await;
        }
        s.finish().await;
        return;
    }
    tracing::debug!(container = %cid, exec = %exec_id, tty = p.tty, "streaming exec started");
    let stdin = s
        .stdin
        .take()
        .map(|rx| tokio::spawn(pump_stdin(agent.clone(), cid.clone(), exec_id.clone(), rx)));
    let resize = s
        .resize
        .take()
        .map(|rx| tokio::spawn(pump_resize(agent.clone(), cid.clone(), exec_id.clone(), rx)));
    let out = tokio::spawn(pump_output(
        agent.clone(),
        cid.clone(),
        exec_id.clone(),
        false,
        s.stdout.clone(),
    ));
    // With a tty the agent's stderr is empty; read it anyway to reach its end.
    let err = tokio::spawn(pump_output(
        agent.clone(),
        cid.clone(),
        exec_id.clone(),
        true,
        s.stderr.clone(),
    ));
    let mut gone = s.gone.clone();
    let code = tokio::select! {
        c = wait_exit(&agent, &cid, &exec_id) => c,
        _ = channels::until_true(&mut gone) => {
            tracing::debug!(container = %cid, exec = %exec_id, "client gone: killing the exec process");
            let _ = agent.signal(&cid, &exec_id, libc::SIGKILL, false).await;
            wait_exit(&agent, &cid, &exec_id).await
        }
    };
    // All output reaches the client before the status.
    let _ = out.await;
    let _ = err.await;
    if let Some(h) = stdin {
        h.abort();
    }
    if let Some(h) = resize {
        h.abort();
    }
    match code {
        Ok(c) => {
            if let (Some(e), Some(msg)) = (&s.error, protocol::exit_status(s.format, c)) {
                e.write(&msg).await;
            }
        }
        Err(m) => {
            if let Some(e) = &s.error {
                e.write(&protocol::error_status(s.format, &m)).await;
            }
        }
    }
    s.finish().await;
    if let Err(e) = agent.remove_process(&cid, &exec_id).await {
        tracing::debug!(container = %cid, exec = %exec_id, error = %e, "remove exec process");
    }
}

async fn wait_exit(agent: &Agent, cid: &str, exec_id: &str) -> Result<i32, String> {
    loop {
        match agent.wait(cid, exec_id, POLL_TIMEOUT).await {
            Ok(w) => return Ok(w.exit_code),
            Err(AgentError::Timeout) => continue,
            Err(e) => return Err(format!("exec wait: {e}")),
        }
    }
}

pub(super) async fn pump_stdin(
    agent: Agent,
    cid: String,
    exec_id: String,
    mut rx: mpsc::Receiver<Bytes>,
) {
    while let Some(d) = rx.recv().await {
        if let Err(e) = agent.write_stdin(&cid, &exec_id, d.to_vec()).await {
            tracing::debug!(container = %cid, exec = %exec_id, error = %e, "write stdin");
            return;
        }
    }
    if let Err(e) = agent.close_stdin(&cid, &exec_id).await {
        tracing::debug!(container = %cid, exec = %exec_id, error = %e, "close stdin");
    }
}

/// Terminal sizes arrive as a stream of JSON objects `{"Width":W,"Height":H}`.
pub(super) async fn pump_resize(
    agent: Agent,
    cid: String,
    exec_id: String,
    mut rx: mpsc::Receiver<Bytes>,
) {
    #[derive(serde::Deserialize)]
    struct Size {
        #[serde(rename = "Width")]
        width: u32,
        #[serde(rename = "Height")]
        height: u32,
    }
    let mut buf: Vec<u8> = Vec::new();
    while let Some(d) = rx.recv().await {
        buf.extend_from_slice(&d);
        if buf.len() > 64 << 10 {
            tracing::debug!(container = %cid, "resize stream: garbage, ignored");
            return;
        }
        let mut it = serde_json::Deserializer::from_slice(&buf).into_iter::<Size>();
        let mut last = None;
        let mut used = 0;
        loop {
            match it.next() {
                Some(Ok(sz)) => {
                    used = it.byte_offset();
                    last = Some(sz);
                }
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(e)) => {
                    tracing::debug!(container = %cid, error = %e, "bad resize message");
                    return;
                }
                None => {
                    used = buf.len();
                    break;
                }
            }
        }
        buf.drain(..used);
        if let Some(sz) = last
            && let Err(e) = agent.resize_tty(&cid, &exec_id, sz.height, sz.width).await
        {
            tracing::debug!(container = %cid, exec = %exec_id, error = %e, "resize");
        }
    }
}

/// Long-polls one output of the process to its end, writing to `out` while
/// the client is there (after that it only drains).
async fn pump_output(
    agent: Agent,
    cid: String,
    exec_id: String,
    stderr: bool,
    out: Option<Output>,
) {
    let mut out = out;
    // Acknowledged reads: what was read but not yet sent is read again after
    // a lost answer (the agent keeps it until acknowledged).
    let mut offset = 0u64;
    loop {
        match agent
            .read(&cid, &exec_id, stderr, Some((offset, offset)), POLL_TIMEOUT)
            .await
        {
            Ok(r) => {
                offset = r.offset + r.data.len() as u64;
                if let Some(o) = &out
                    && !r.data.is_empty()
                    && !o.write(&r.data).await
                {
                    out = None;
                }
                if r.eof {
                    if let Some(o) = &out {
                        o.close().await;
                    }
                    return;
                }
            }
            Err(AgentError::Timeout) => continue,
            Err(e) => {
                tracing::debug!(container = %cid, exec = %exec_id, error = %e, "read output");
                if let Some(o) = &out {
                    o.close().await;
                }
                return;
            }
        }
    }
}

/// How long attach waits for a stream's last output after the container exited.
pub const ATTACH_DRAIN: Duration = Duration::from_secs(2);

/// Attaches `s` to the container's init process: its output (a fan-out of
/// what the log copier reads, from now on), its stdin and tty size. Ends
/// when the container exits (after its last output) or the client leaves.
pub async fn run_attach(
    _runtime: std::sync::Arc<crate::sandbox::Manager>,
    t: StreamTarget,
    p: AttachParams,
    mut s: Session,
) {
    use crate::sandbox::OutputChunk;
    use crate::sandbox::logs::Stream;
    use tokio::sync::broadcast::error::RecvError;

    let (agent, cid) = (t.agent.clone(), t.container_id.clone());
    let stdin = match s.stdin.take() {
        Some(mut rx) if t.stdin => {
            let (agent, cid, once) = (agent.clone(), cid.clone(), t.stdin_once);
            Some(tokio::spawn(async move {
                while let Some(d) = rx.recv().await {
                    if let Err(e) = agent.write_stdin(&cid, "", d.to_vec()).await {
                        tracing::debug!(container = %cid, error = %e, "attach: write stdin");
                        return;
                    }
                }
                if once {
                    let _ = agent.close_stdin(&cid, "").await;
                }
            }))
        }
        _ => None,
    };
    let resize = s
        .resize
        .take()
        .filter(|_| t.tty)
        .map(|rx| tokio::spawn(pump_resize(agent.clone(), cid.clone(), String::new(), rx)));
    let mut output = t.output;
    let mut exited = t.exited.clone();
    let mut gone = s.gone.clone();
    let (mut out_open, mut err_open) = (p.stdout, p.stderr && !p.tty);
    let mut exited_at: Option<tokio::time::Instant> = None;
    loop {
        if *exited.borrow() && exited_at.is_none() {
            exited_at = Some(tokio::time::Instant::now());
        }
        let drain_deadline = exited_at.map(|t| t + ATTACH_DRAIN);
        let chunk = tokio::select! {
            c = output.recv() => c,
            _ = channels::until_true(&mut gone) => break,
            r = exited.changed(), if exited_at.is_none() => {
                if r.is_err() {
                    break;
                }
                continue;
            }
            _ = async {
                match drain_deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            } => break,
        };
        match chunk {
            Ok(OutputChunk::Data(st, d)) => {
                let o = match st {
                    Stream::Stdout => s.stdout.as_ref(),
                    Stream::Stderr if p.tty => s.stdout.as_ref(),
                    Stream::Stderr => s.stderr.as_ref(),
                };
                if let Some(o) = o
                    && !o.write(&d).await
                {
                    break;
                }
            }
            Ok(OutputChunk::Eof(Stream::Stdout)) => out_open = false,
            Ok(OutputChunk::Eof(Stream::Stderr)) => err_open = false,
            Err(RecvError::Lagged(n)) => {
                tracing::warn!(container = %cid, chunks = n, "attach client too slow: output skipped");
            }
            Err(RecvError::Closed) => break,
        }
        if exited_at.is_some() && !out_open && !err_open {
            break;
        }
    }
    if let Some(h) = stdin {
        h.abort();
    }
    if let Some(h) = resize {
        h.abort();
    }
    if let (Some(e), Some(msg)) = (&s.error, protocol::exit_status(s.format, 0)) {
        e.write(&msg).await;
    }
    s.finish().await;
}
