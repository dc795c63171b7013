//! husk-vmm's control socket (`<vm dir>/control.sock`), a line protocol: one command, one
//! answer line. Used for the pod's image disks: husk-vmm starts with `--disk-slots N` empty
//! read-only virtio-blk slots; `disk-attach SLOT PATH SERIAL` fills one (the guest sees the
//! capacity change through a config-change interrupt) and `disks` lists them, so a restarted
//! huskd reads the slot state from the VMM itself.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// The longest answer line read from husk-vmm (a `disks` list of every slot fits many times).
const MAX_ANSWER: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum VmmCtlError {
    #[error("husk-vmm control socket {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("husk-vmm control socket {0}: no answer in time")]
    Timeout(String),
    #[error("husk-vmm refused {command:?}: {why}")]
    Refused { command: String, why: String },
    #[error("husk-vmm answered {command:?} with {answer:?}")]
    Protocol { command: String, answer: String },
    #[error(
        "all {0} disk slots hold disks of images that containers use (runtime.vm.hotplug_slots): one disk per image per pod"
    )]
    Full(usize),
}

/// Sends one command line and returns the answer line (without the newline).
pub async fn command(sock: &Path, cmd: &str, timeout: Duration) -> Result<String, VmmCtlError> {
    let path = sock.display().to_string();
    let io = |source| VmmCtlError::Io {
        path: path.clone(),
        source,
    };
    let talk = async {
        let mut s = UnixStream::connect(sock).await.map_err(io)?;
        s.write_all(format!("{cmd}\n").as_bytes())
            .await
            .map_err(io)?;
        let mut line = String::new();
        let n = BufReader::new(s)
            .take(MAX_ANSWER as u64)
            .read_line(&mut line)
            .await
            .map_err(io)?;
        if n >= MAX_ANSWER && !line.ends_with('\n') {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("answer longer than {MAX_ANSWER} bytes"),
            )));
        }
        Ok(line.trim_end().to_string())
    };
    let answer = tokio::time::timeout(timeout, talk)
        .await
        .map_err(|_| VmmCtlError::Timeout(path.clone()))??;
    match answer.strip_prefix("error ") {
        Some(why) => Err(VmmCtlError::Refused {
            command: cmd.to_string(),
            why: why.to_string(),
        }),
        None => Ok(answer),
    }
}

/// The disk slots: the serial in each, `None` when empty.
pub async fn disks(sock: &Path, timeout: Duration) -> Result<Vec<Option<String>>, VmmCtlError> {
    let answer = command(sock, "disks", timeout).await?;
    parse_disks(&answer).ok_or_else(|| VmmCtlError::Protocol {
        command: "disks".into(),
        answer,
    })
}

/// `disks 0=SERIAL 1=- ...` → slots in order.
fn parse_disks(answer: &str) -> Option<Vec<Option<String>>> {
    let mut words = answer.split_whitespace();
    if words.next()? != "disks" {
        return None;
    }
    let mut slots = vec![];
    for (i, w) in words.enumerate() {
        let (n, serial) = w.split_once('=')?;
        if n.parse::<usize>().ok()? != i || serial.is_empty() {
            return None;
        }
        slots.push((serial != "-").then(|| serial.to_string()));
    }
    Some(slots)
}

/// Makes `file` visible in the guest as the virtio-blk disk with `serial`: nothing to do when a
/// slot already holds that serial (idempotent per image per pod), else fill the first empty
/// slot. When none is empty, a slot whose disk `in_use` says no container needs is emptied
/// (`disk-detach`) and filled (the agent drops the guest's cached blocks before it mounts).
/// Callers serialise attaches per VM.
pub async fn attach_disk(
    sock: &Path,
    file: &Path,
    serial: &str,
    timeout: Duration,
    in_use: &(dyn Fn(&str) -> bool + Sync),
) -> Result<(), VmmCtlError> {
    let slots = disks(sock, timeout).await?;
    if slots.iter().any(|s| s.as_deref() == Some(serial)) {
        return Ok(());
    }
    let slot = match slots.iter().position(Option::is_none) {
        Some(free) => free,
        None => {
            let Some(unused) = slots
                .iter()
                .position(|s| s.as_deref().is_some_and(|s| !in_use(s)))
            else {
                return Err(VmmCtlError::Full(slots.len()));
            };
            expect_ok(sock, &format!("disk-detach {unused}"), timeout).await?;
            tracing::info!(slot = unused, old = ?slots[unused], "disk slot emptied for another image (no container used it)");
            unused
        }
    };
    expect_ok(
        sock,
        &format!("disk-attach {slot} {} {serial}", file.display()),
        timeout,
    )
    .await
}

async fn expect_ok(sock: &Path, cmd: &str, timeout: Duration) -> Result<(), VmmCtlError> {
    let answer = command(sock, cmd, timeout).await?;
    if answer != "ok" {
        return Err(VmmCtlError::Protocol {
            command: cmd.to_string(),
            answer,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_answer() {
        assert_eq!(parse_disks("disks"), Some(vec![]));
        assert_eq!(
            parse_disks("disks 0=img00 1=- 2=x"),
            Some(vec![Some("img00".into()), None, Some("x".into())])
        );
        for bad in ["", "running", "disks 1=a", "disks 0=", "disks 0a"] {
            assert_eq!(parse_disks(bad), None, "{bad:?}");
        }
    }
}
