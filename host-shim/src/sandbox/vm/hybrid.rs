//! Hybrid vsock, host side: connect to the VMM's unix socket, send
//! `CONNECT <port>\n`, read `OK <host port>\n`; the stream then carries the
//! guest connection's bytes. Both backends expose the same socket (husk-vmm
//! itself, or husk-vmm's vhost-user vsock device for QEMU).

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum HybridError {
    #[error("connect {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("port {port}: {msg}")]
    Handshake { port: u32, msg: String },
    #[error("port {port}: no answer within {timeout:?}")]
    Timeout { port: u32, timeout: Duration },
}

/// The longest `OK <port>\n` line accepted.
const MAX_LINE: usize = 32;

/// Dials guest vsock `port` through the hybrid socket `uds`.
pub async fn connect(uds: &Path, port: u32, timeout: Duration) -> Result<UnixStream, HybridError> {
    let mut s = UnixStream::connect(uds)
        .await
        .map_err(|source| HybridError::Connect {
            path: uds.display().to_string(),
            source,
        })?;
    let hs = async {
        s.write_all(format!("CONNECT {port}\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        // Byte by byte: the guest's first bytes may follow the OK line.
        let mut line = Vec::with_capacity(MAX_LINE);
        loop {
            let b = s.read_u8().await.map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    "refused (nothing listening in the guest yet?)".to_string()
                } else {
                    e.to_string()
                }
            })?;
            if b == b'\n' {
                break;
            }
            line.push(b);
            if line.len() > MAX_LINE {
                return Err(format!(
                    "bad handshake answer {:?}",
                    String::from_utf8_lossy(&line)
                ));
            }
        }
        let line = String::from_utf8_lossy(&line).into_owned();
        match line.strip_prefix("OK ").map(str::parse::<u32>) {
            Some(Ok(_)) => Ok(()),
            _ => Err(format!("bad handshake answer {line:?}")),
        }
    };
    match tokio::time::timeout(timeout, hs).await {
        Ok(Ok(())) => Ok(s),
        Ok(Err(msg)) => Err(HybridError::Handshake { port, msg }),
        Err(_) => Err(HybridError::Timeout { port, timeout }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncBufReadExt;

    async fn fake_vmm(answer: &'static [u8]) -> (tempfile::TempDir, std::path::PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("v.sock");
        let l = tokio::net::UnixListener::bind(&p).unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let mut r = tokio::io::BufReader::new(s);
                let mut line = String::new();
                r.read_line(&mut line).await.unwrap();
                assert_eq!(line, "CONNECT 1024\n");
                let mut s = r.into_inner();
                s.write_all(answer).await.unwrap();
                // Echo one message after the handshake.
                let mut b = [0u8; 4];
                if s.read_exact(&mut b).await.is_ok() {
                    s.write_all(&b).await.unwrap();
                }
            }
        });
        (d, p)
    }

    #[tokio::test]
    async fn handshake_then_data() {
        let (_d, p) = fake_vmm(b"OK 3000\n").await;
        let mut s = connect(&p, 1024, Duration::from_secs(2)).await.unwrap();
        s.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"ping");
    }

    #[tokio::test]
    async fn refused_and_garbage() {
        let (_d, p) = fake_vmm(b"").await;
        // The fake closes after the echo attempt: EOF before OK = refused.
        let e = connect(&p, 1024, Duration::from_secs(2)).await;
        assert!(
            matches!(
                e,
                Err(HybridError::Timeout { .. }) | Err(HybridError::Handshake { .. })
            ),
            "{e:?}"
        );
        let (_d2, p2) = fake_vmm(b"NOPE 1\n").await;
        let e = connect(&p2, 1024, Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("bad handshake"), "{e}");
        let (_d3, p3) = fake_vmm(b"OK 1234567890123456789012345678901234567890\n").await;
        assert!(connect(&p3, 1024, Duration::from_secs(2)).await.is_err());
        let e = connect(
            Path::new("/nonexistent/x.sock"),
            1024,
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, HybridError::Connect { .. }));
    }
}
