//! A small QMP client (JSON lines on QEMU's `-qmp` unix socket) and what huskd does with
//! it: hot-plug an image disk onto a free PCIe root port, unplug one that no container
//! uses any more, status, quit.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::slot_bus;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP connect {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("QMP {cmd}: {class}: {desc}")]
    Command {
        cmd: String,
        class: String,
        desc: String,
    },
    #[error("QMP {0}")]
    Protocol(String),
    #[error(
        "all {0} hot-plug slots hold disks of images that containers use (runtime.vm.hotplug_slots): one disk per image per pod"
    )]
    SlotsFull(u32),
    #[error("QMP: no answer within {0:?}")]
    Timeout(Duration),
}

/// The longest QMP message read (QEMU's answers here are a few KiB; a process that sends an
/// endless line must not grow huskd).
const MAX_QMP_LINE: usize = 1 << 20;

/// One QMP session (capabilities negotiated).
pub struct Qmp {
    r: BufReader<tokio::net::unix::OwnedReadHalf>,
    w: tokio::net::unix::OwnedWriteHalf,
    timeout: Duration,
    /// Events read while waiting for a command's answer, for `wait_event`.
    events: Vec<Value>,
}

impl Qmp {
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let s = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        let (r, w) = s.into_split();
        let mut q = Self {
            r: BufReader::new(r),
            w,
            timeout,
            events: Vec::new(),
        };
        let greeting = q.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "unexpected greeting {greeting}"
            )));
        }
        q.execute("qmp_capabilities", json!({})).await?;
        Ok(q)
    }

    async fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        let mut bounded = (&mut self.r).take(MAX_QMP_LINE as u64);
        let n = tokio::time::timeout(self.timeout, bounded.read_line(&mut line))
            .await
            .map_err(|_| QmpError::Timeout(self.timeout))?
            .map_err(|e| QmpError::Protocol(e.to_string()))?;
        if n == 0 {
            return Err(QmpError::Protocol("connection closed".into()));
        }
        if !line.ends_with('\n') && n >= MAX_QMP_LINE {
            return Err(QmpError::Protocol(format!(
                "message longer than {MAX_QMP_LINE} bytes"
            )));
        }
        serde_json::from_str(&line).map_err(|e| QmpError::Protocol(format!("bad JSON: {e}")))
    }

    /// Runs `cmd`, skipping asynchronous events; returns its `return` value.
    pub async fn execute(&mut self, cmd: &str, arguments: Value) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": cmd });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(b'\n');
        self.w
            .write_all(&bytes)
            .await
            .map_err(|e| QmpError::Protocol(e.to_string()))?;
        loop {
            let m = self.read_message().await?;
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                return Err(QmpError::Command {
                    cmd: cmd.to_string(),
                    class: e["class"].as_str().unwrap_or("").to_string(),
                    desc: e["desc"].as_str().unwrap_or("").to_string(),
                });
            }
            if m.get("event").is_some() {
                self.events.push(m);
            }
        }
    }

    /// Waits until `deadline` for the event `name` whose `data` passes `matches` (events
    /// that came while a command ran count too); returns its `data`.
    pub async fn wait_event(
        &mut self,
        name: &str,
        matches: impl Fn(&Value) -> bool,
        deadline: Instant,
    ) -> Result<Value, QmpError> {
        let hit = |m: &Value| m["event"] == name && matches(&m["data"]);
        if let Some(i) = self.events.iter().position(hit) {
            return Ok(self.events.remove(i)["data"].take());
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = tokio::time::timeout(left, self.read_message())
                .await
                .map_err(|_| QmpError::Protocol(format!("no {name} event in time")))??;
            if hit(&m) {
                return Ok(m["data"].clone());
            }
        }
    }
}

/// Names of a hot-plugged read-only image disk, all from one short hex name `H`: block node
/// `img-H`, device `blk-H`, virtio-blk serial `imgH`.
pub struct DiskNames {
    pub node: String,
    pub device: String,
    /// virtio-blk serial (≤ 20 bytes) the guest finds it by.
    pub serial: String,
}

impl DiskNames {
    pub fn new(h: &str) -> Self {
        Self {
            node: format!("img-{h}"),
            device: format!("blk-{h}"),
            serial: format!("img{h}"),
        }
    }

    /// The names of the image disk with device id `device`; None for another device.
    fn of_device(device: &str) -> Option<Self> {
        device.strip_prefix("blk-").map(Self::new)
    }
}

/// How long the guest may take to give up a disk: Linux's pciehp waits 5 s after the
/// attention button before it powers a slot off (the user's chance to cancel).
const UNPLUG_TIMEOUT: Duration = Duration::from_secs(30);

/// Attaches `file` read-only as a virtio-blk disk on the first free root port. Attaching the
/// same names twice is a no-op. When every port holds a disk, an image disk that `in_use` says
/// no container needs is unplugged first (about 5 s: the guest's pciehp delay); only when all
/// are in use does it fail.
pub async fn hotplug_disk(
    qmp_path: &Path,
    file: &Path,
    names: &DiskNames,
    slots: u32,
    timeout: Duration,
    in_use: &(dyn Fn(&DiskNames) -> bool + Sync),
) -> Result<(), QmpError> {
    let mut q = Qmp::connect(qmp_path, timeout).await?;
    // Never device_add onto an occupied root port: QEMU 7.2's failing
    // hot-plug there presses the slot's attention button, and the guest
    // then powers off (unplugs) the disk already in it.
    let pci = q.execute("query-pci", json!({})).await?;
    let ports = root_ports(&pci);
    if ports.iter().any(|(_, devs)| devs.contains(&names.device)) {
        return Ok(());
    }
    let free = (0..slots)
        .map(slot_bus)
        .find(|bus| ports.iter().all(|(p, devs)| p != bus || devs.is_empty()));
    let bus = match free {
        Some(bus) => bus,
        None => {
            let unused = ports.iter().find_map(|(p, devs)| match devs.as_slice() {
                [d] => DiskNames::of_device(d)
                    .filter(|n| !in_use(n))
                    .map(|n| (p.clone(), n)),
                _ => None,
            });
            let Some((port, disk)) = unused else {
                return Err(QmpError::SlotsFull(slots));
            };
            unplug_disk(&mut q, &disk).await?;
            port
        }
    };
    let add = q
        .execute(
            "blockdev-add",
            json!({
                "driver": "raw",
                "node-name": names.node,
                "read-only": true,
                "file": { "driver": "file", "filename": file.display().to_string(), "read-only": true },
            }),
        )
        .await;
    match add {
        Ok(_) => {}
        Err(QmpError::Command { ref desc, .. }) if desc.contains("Duplicate") => {}
        Err(e) => return Err(e),
    }
    q.execute(
        "device_add",
        json!({
            "driver": "virtio-blk-pci",
            "id": names.device,
            "drive": names.node,
            "serial": names.serial,
            "bus": bus,
        }),
    )
    .await?;
    Ok(())
}

/// Unplugs an image disk: `device_del`, the guest's acknowledgement (DEVICE_DELETED), then
/// its block node goes, closing the image file.
async fn unplug_disk(q: &mut Qmp, disk: &DiskNames) -> Result<(), QmpError> {
    let deadline = Instant::now() + UNPLUG_TIMEOUT;
    let device = disk.device.as_str();
    q.execute("device_del", json!({ "id": device })).await?;
    q.wait_event("DEVICE_DELETED", |d| d["device"] == device, deadline)
        .await?;
    let node = disk.node.as_str();
    match q
        .execute("blockdev-del", json!({ "node-name": node }))
        .await
    {
        Ok(_) => {}
        Err(e) => tracing::warn!(node, error = %e, "blockdev-del after unplug"),
    }
    tracing::info!(device, "image disk unplugged (no container used it)");
    Ok(())
}

/// From `query-pci`: every root port (bridge) by qdev id, with the qdev ids of the devices on
/// it.
fn root_ports(pci: &Value) -> Vec<(String, Vec<String>)> {
    fn walk(devs: &Value, out: &mut Vec<(String, Vec<String>)>) {
        for d in devs.as_array().into_iter().flatten() {
            if let Some(children) = d["pci_bridge"]["devices"].as_array() {
                let ids = children
                    .iter()
                    .filter_map(|c| c["qdev_id"].as_str())
                    .map(String::from)
                    .collect();
                out.push((d["qdev_id"].as_str().unwrap_or("").to_string(), ids));
                walk(&d["pci_bridge"]["devices"], out);
            }
        }
    }
    let mut out = vec![];
    for bus in pci.as_array().into_iter().flatten() {
        walk(&bus["devices"], &mut out);
    }
    out
}

/// Tells QEMU to exit now (the guest has no writable disks to flush).
pub async fn quit(qmp_path: &Path, timeout: Duration) -> Result<(), QmpError> {
    let mut q = Qmp::connect(qmp_path, timeout).await?;
    match q.execute("quit", json!({})).await {
        Ok(_) => Ok(()),
        // QEMU may close the socket before answering.
        Err(QmpError::Protocol(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// `query-status` of the VM ("running", "paused", ...).
pub async fn status(qmp_path: &Path, timeout: Duration) -> Result<String, QmpError> {
    let mut q = Qmp::connect(qmp_path, timeout).await?;
    let r = q.execute("query-status", json!({})).await?;
    Ok(r["status"].as_str().unwrap_or("").to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_disk_names() {
        let n = DiskNames::new("0123456789abcdef");
        assert_eq!(
            (n.node.as_str(), n.device.as_str(), n.serial.as_str()),
            (
                "img-0123456789abcdef",
                "blk-0123456789abcdef",
                "img0123456789abcdef"
            )
        );
        let back = DiskNames::of_device(&n.device).unwrap();
        assert_eq!((back.node, back.serial), (n.node, n.serial));
        assert!(DiskNames::of_device("vhost-user-vsock").is_none());
    }

    #[test]
    fn occupied_root_ports() {
        let pci = json!([{"bus": 0, "devices": [
            {"qdev_id": "", "bus": 0},
            {"qdev_id": "hp0", "pci_bridge": {"devices": [{"qdev_id": "blk-a"}]}},
            {"qdev_id": "hp1", "pci_bridge": {"devices": []}},
            {"qdev_id": "hp2", "pci_bridge": {"devices": [{"qdev_id": "blk-b"}]}},
        ]}]);
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            root_ports(&pci),
            vec![
                ("hp0".to_string(), s(&["blk-a"])),
                ("hp1".to_string(), s(&[])),
                ("hp2".to_string(), s(&["blk-b"])),
            ]
        );
    }

    /// A fake QMP peer checks the client's framing: greeting, capabilities,
    /// events skipped, errors surfaced.
    #[tokio::test]
    async fn qmp_framing() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("q.sock");
        let l = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            w.write_all(b"{\"QMP\": {\"version\": {}}}\n")
                .await
                .unwrap();
            let mut line = String::new();
            r.read_line(&mut line).await.unwrap();
            assert!(line.contains("qmp_capabilities"));
            w.write_all(b"{\"return\": {}}\n").await.unwrap();
            line.clear();
            r.read_line(&mut line).await.unwrap();
            assert!(line.contains("query-status"));
            w.write_all(b"{\"event\": \"X\"}\n{\"return\": {\"status\": \"running\"}}\n")
                .await
                .unwrap();
            line.clear();
            r.read_line(&mut line).await.unwrap();
            assert!(line.contains("\"arguments\""), "{line}");
            w.write_all(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"boom\"}}\n")
                .await
                .unwrap();
        });
        let mut q = Qmp::connect(&path, Duration::from_secs(2)).await.unwrap();
        let r = q.execute("query-status", json!({})).await.unwrap();
        assert_eq!(r["status"], "running");
        // The event that came before the answer is kept for wait_event.
        q.wait_event("X", |_| true, Instant::now()).await.unwrap();
        assert!(q.wait_event("X", |_| true, Instant::now()).await.is_err());
        let e = q
            .execute("device_add", json!({"id": "x"}))
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "QMP device_add: GenericError: boom");
    }
}
