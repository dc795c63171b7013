//! `husk exec -it`, `husk attach`, `husk port-forward`: real clients of
//! huskd's streaming server (SPDY/3.1 or WebSocket, `--protocol`).

use std::io::IsTerminal;
use std::os::fd::AsFd;

use anyhow::{Context, bail};
use bytes::Bytes;
use husk_proto::cri;
use tokio::sync::mpsc;

use super::runtime::{container_id, pod_id};
use crate::client::Clients;
use crate::streaming::client::{self, CommandIo, SpdyForwarder, Transport};

/// Puts the terminal on stdin in raw mode until dropped.
struct RawTerminal {
    saved: nix::sys::termios::Termios,
}

impl RawTerminal {
    fn enable() -> anyhow::Result<Self> {
        use nix::sys::termios;
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd()).context("tcgetattr")?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), termios::SetArg::TCSANOW, &raw).context("tcsetattr")?;
        Ok(Self { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin().as_fd(),
            nix::sys::termios::SetArg::TCSANOW,
            &self.saved,
        );
    }
}

/// (cols, rows) of the terminal on stdout.
fn terminal_size() -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes a winsize to the pointer we pass.
    let r = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_col > 0).then_some((ws.ws_col, ws.ws_row))
}

/// Runs a session on `url` with this process's stdin/stdout/stderr.
async fn interactive(
    url: &str,
    transport: Transport,
    stdin: bool,
    tty: bool,
) -> anyhow::Result<i32> {
    let _raw = if tty && std::io::stdin().is_terminal() {
        Some(RawTerminal::enable()?)
    } else {
        None
    };
    let in_rx = stdin.then(|| {
        let (tx, rx) = mpsc::channel(16);
        // A plain thread: a blocking read of stdin must not hold the runtime.
        std::thread::spawn(move || {
            use std::io::Read;
            let mut input = std::io::stdin();
            let mut buf = vec![0u8; 32 << 10];
            while let Ok(n) = input.read(&mut buf) {
                if n == 0 || tx.blocking_send(Bytes::copy_from_slice(&buf[..n])).is_err() {
                    break;
                }
            }
        });
        rx
    });
    let resize = tty.then(|| {
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            if let Some(s) = terminal_size() {
                let _ = tx.send(s).await;
            }
            let Ok(mut winch) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
            else {
                return;
            };
            while winch.recv().await.is_some() {
                if let Some(s) = terminal_size()
                    && tx.send(s).await.is_err()
                {
                    return;
                }
            }
        });
        rx
    });
    let (out_tx, mut out_rx) = mpsc::channel::<Bytes>(16);
    let (err_tx, mut err_rx) = mpsc::channel::<Bytes>(16);
    let writers = tokio::spawn(async move {
        use std::io::Write;
        let mut out = std::io::stdout();
        let mut err = std::io::stderr();
        let (mut od, mut ed) = (false, false);
        while !(od && ed) {
            tokio::select! {
                d = out_rx.recv(), if !od => match d {
                    Some(d) => { let _ = out.write_all(&d); let _ = out.flush(); }
                    None => od = true,
                },
                d = err_rx.recv(), if !ed => match d {
                    Some(d) => { let _ = err.write_all(&d); let _ = err.flush(); }
                    None => ed = true,
                },
            }
        }
    });
    let io = CommandIo {
        stdin: in_rx,
        stdout: Some(out_tx),
        stderr: (!tty).then_some(err_tx),
        resize,
    };
    let r = client::run_command(url, transport, io).await;
    let _ = writers.await;
    drop(_raw);
    r.map_err(|m| anyhow::anyhow!("{m}"))
}

pub struct StreamOptions {
    pub stdin: bool,
    pub tty: bool,
    pub protocol: Transport,
}

/// `husk exec -i/-t CONTAINER -- CMD`: the exit code of CMD.
pub async fn exec(
    c: &mut Clients,
    id: &str,
    cmd: Vec<String>,
    o: StreamOptions,
) -> anyhow::Result<i32> {
    let id = container_id(c, id)
        .await?
        .with_context(|| format!("no container {id}"))?;
    let url = c
        .runtime
        .exec(cri::ExecRequest {
            container_id: id,
            cmd,
            tty: o.tty,
            stdin: o.stdin,
            stdout: true,
            stderr: !o.tty,
        })
        .await
        .map_err(|s| anyhow::anyhow!("exec: {}", s.message()))?
        .into_inner()
        .url;
    interactive(&url, o.protocol, o.stdin, o.tty).await
}

/// `husk attach CONTAINER`: until the container exits (or ^C).
pub async fn attach(c: &mut Clients, id: &str, o: StreamOptions) -> anyhow::Result<i32> {
    let id = container_id(c, id)
        .await?
        .with_context(|| format!("no container {id}"))?;
    let url = c
        .runtime
        .attach(cri::AttachRequest {
            container_id: id,
            stdin: o.stdin,
            tty: o.tty,
            stdout: true,
            stderr: !o.tty,
        })
        .await
        .map_err(|s| anyhow::anyhow!("attach: {}", s.message()))?
        .into_inner()
        .url;
    interactive(&url, o.protocol, o.stdin, o.tty).await
}

/// `LOCAL:REMOTE` or `PORT` (same on both sides).
pub fn parse_mapping(s: &str) -> anyhow::Result<(u16, u16)> {
    let (l, r) = s.split_once(':').unwrap_or((s, s));
    let p = |x: &str| -> anyhow::Result<u16> {
        match x.parse::<u16>() {
            Ok(p) if p > 0 => Ok(p),
            _ => bail!("bad port {x:?} in {s:?} (want LOCAL:REMOTE)"),
        }
    };
    Ok((p(l)?, p(r)?))
}

/// `husk port-forward POD LOCAL:REMOTE...`: listens on 127.0.0.1:LOCAL
/// until interrupted; each connection is forwarded to the pod's REMOTE.
pub async fn port_forward(
    c: &mut Clients,
    pod: &str,
    mappings: &[String],
    protocol: Transport,
) -> anyhow::Result<()> {
    let pod = pod_id(c, pod)
        .await?
        .with_context(|| format!("no pod {pod}"))?;
    let maps = mappings
        .iter()
        .map(|m| parse_mapping(m))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let ports: Vec<i32> = maps.iter().map(|m| i32::from(m.1)).collect();
    let new_url = {
        let c = c.clone();
        let pod = pod.clone();
        move |ports: Vec<i32>| {
            let mut c = c.clone();
            let pod = pod.clone();
            async move {
                c.runtime
                    .port_forward(cri::PortForwardRequest {
                        pod_sandbox_id: pod,
                        port: ports,
                    })
                    .await
                    .map(|r| r.into_inner().url)
                    .map_err(|s| anyhow::anyhow!("port-forward: {}", s.message()))
            }
        }
    };
    // SPDY: one session for every connection; WebSocket: one per connection.
    let spdy = match protocol {
        Transport::Spdy => Some(std::sync::Arc::new(
            SpdyForwarder::connect(&new_url(ports).await?).await?,
        )),
        Transport::WebSocket => None,
    };
    let mut tasks = tokio::task::JoinSet::new();
    for (local, remote) in maps {
        let l = tokio::net::TcpListener::bind(("127.0.0.1", local))
            .await
            .with_context(|| format!("listen on 127.0.0.1:{local}"))?;
        eprintln!("Forwarding from 127.0.0.1:{local} -> {remote}");
        let spdy = spdy.clone();
        let new_url = new_url.clone();
        tasks.spawn(async move {
            loop {
                let Ok((mut tcp, _)) = l.accept().await else {
                    continue;
                };
                eprintln!("Handling connection for {local}");
                let spdy = spdy.clone();
                let new_url = new_url.clone();
                tokio::spawn(async move {
                    let opened = match &spdy {
                        Some(f) => f.open(remote).await.map_err(anyhow::Error::from),
                        None => match new_url(vec![]).await {
                            Ok(u) => client::ws_forward(&u, remote)
                                .await
                                .map_err(anyhow::Error::from),
                            Err(e) => Err(e),
                        },
                    };
                    match opened {
                        Ok((mut s, err)) => {
                            let _ = tokio::io::copy_bidirectional(&mut tcp, &mut s).await;
                            if let Ok(m) = err.await
                                && !m.is_empty()
                            {
                                eprintln!("{m}");
                            }
                        }
                        Err(e) => eprintln!("port-forward {local} -> {remote}: {e:#}"),
                    }
                });
            }
        });
    }
    tokio::signal::ctrl_c().await?;
    tasks.shutdown().await;
    Ok(())
}
