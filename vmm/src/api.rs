//! The VM's control plane on the event loop: the exit eventfd, SIGTERM/SIGINT (Ctrl-Alt-Del to
//! the guest, then exit after a grace period), and the optional control socket, a line protocol:
//! `status` → `running vcpus=N memory_mib=M`, `stop` (like SIGTERM) and `kill` (exit now),
//! `disks` → `disks 0=SERIAL 1=- ...` (the disk slots, `-` when empty) and
//! `disk-attach SLOT PATH SERIAL` (fill an empty slot read-only with PATH) → `ok` and
//! `disk-detach SLOT` (empty it again; the guest must have unmounted it) → `ok`, each answered
//! on one line; failures answer `error <why>`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use crate::devices::bus::lock;
use crate::devices::i8042::I8042;
use crate::devices::virtio::block::BlockDevice;
use crate::devices::{ExitReason, ExitSignal};

const TOKEN_EXIT: u32 = 0;
const TOKEN_SIGNAL: u32 = 1;
const TOKEN_LISTENER: u32 = 2;
/// Longest command line accepted (`disk-attach` carries a path).
const MAX_LINE: usize = 4096 + 64;

/// The control socket; its file is removed when the VMM stops.
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

pub fn bind_control(path: &Path) -> std::io::Result<ControlSocket> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    listener.set_nonblocking(true)?;
    Ok(ControlSocket {
        listener,
        path: path.to_owned(),
    })
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

pub struct Control {
    exit: Arc<ExitSignal>,
    signals: File,
    i8042: Arc<Mutex<I8042>>,
    listener: Option<ControlSocket>,
    clients: HashMap<RawFd, (UnixStream, Vec<u8>)>,
    status: String,
    stop_grace: Duration,
    stop_deadline: Option<Instant>,
    disk_slots: Vec<Arc<Mutex<BlockDevice>>>,
}

impl Control {
    pub fn new(
        exit: Arc<ExitSignal>,
        signals: File,
        i8042: Arc<Mutex<I8042>>,
        listener: Option<ControlSocket>,
        status: String,
        stop_grace: Duration,
    ) -> Self {
        Self {
            exit,
            signals,
            i8042,
            listener,
            clients: HashMap::new(),
            status,
            stop_grace,
            stop_deadline: None,
            disk_slots: Vec::new(),
        }
    }

    /// The disk slots `disks` and `disk-attach` work on.
    pub fn with_disk_slots(mut self, slots: Vec<Arc<Mutex<BlockDevice>>>) -> Self {
        self.disk_slots = slots;
        self
    }

    fn disks(&self) -> String {
        let mut s = String::from("disks");
        for (i, d) in self.disk_slots.iter().enumerate() {
            let d = lock(d);
            let serial = if d.is_empty_slot() { "-" } else { d.serial() };
            s.push_str(&format!(" {i}={serial}"));
        }
        s
    }

    /// Disk slot number `slot`, or the `error …` answer.
    fn slot(&self, slot: &str) -> Result<&Arc<Mutex<BlockDevice>>, String> {
        slot.parse::<usize>()
            .ok()
            .and_then(|i| self.disk_slots.get(i))
            .ok_or_else(|| {
                format!(
                    "error no disk slot {slot:?} (slots: {})",
                    self.disk_slots.len()
                )
            })
    }

    /// `SLOT PATH SERIAL`; the path may contain spaces (it is everything between the two).
    fn disk_attach(&self, args: &str) -> String {
        let args = args.trim();
        let parsed = args.split_once(' ').and_then(|(slot, rest)| {
            let (path, serial) = rest.trim().rsplit_once(' ')?;
            Some((slot, path.trim(), serial))
        });
        let Some((slot, path, serial)) = parsed.filter(|(_, p, _)| !p.is_empty()) else {
            return "error usage: disk-attach SLOT PATH SERIAL".into();
        };
        let dev = match self.slot(slot) {
            Ok(d) => d,
            Err(e) => return e,
        };
        match lock(dev).fill(Path::new(path), serial) {
            Ok(()) => "ok".into(),
            Err(e) => {
                tracing::warn!(slot, path, serial, error = %e, "disk-attach refused");
                format!("error slot {slot}: {e}")
            }
        }
    }

    fn disk_detach(&self, slot: &str) -> String {
        let slot = slot.trim();
        let dev = match self.slot(slot) {
            Ok(d) => d,
            Err(e) => return e,
        };
        match lock(dev).empty() {
            Ok(()) => "ok".into(),
            Err(e) => format!("error slot {slot}: {e}"),
        }
    }

    /// When the VMM exits if the guest has not shut down by itself.
    pub fn stop_deadline(&self) -> Option<Instant> {
        self.stop_deadline
    }

    fn request_stop(&mut self) {
        tracing::info!("stop requested: sending Ctrl-Alt-Del to the guest");
        lock(&self.i8042).trigger_ctrl_alt_del();
        self.stop_deadline
            .get_or_insert(Instant::now() + self.stop_grace);
    }

    fn command(&mut self, line: &str) -> String {
        if let Some(args) = line.trim_start().strip_prefix("disk-attach ") {
            return self.disk_attach(args);
        }
        if let Some(slot) = line.trim_start().strip_prefix("disk-detach ") {
            return self.disk_detach(slot);
        }
        match line.trim() {
            "disks" => self.disks(),
            "status" => self.status.clone(),
            "stop" => {
                self.request_stop();
                "ok".into()
            }
            "kill" => {
                self.exit.exit(ExitReason::Stopped);
                "ok".into()
            }
            other => format!("error unknown command {other:?}"),
        }
    }

    fn accept(&mut self, ops: &mut EventOps) {
        let Some(l) = &self.listener else { return };
        while let Ok((s, _)) = l.listener.accept() {
            if s.set_nonblocking(true).is_err() {
                continue;
            }
            let fd = s.as_raw_fd();
            if ops
                .add(Events::with_data_raw(fd, fd as u32 + 16, EventSet::IN))
                .is_ok()
            {
                self.clients.insert(fd, (s, Vec::new()));
            }
        }
    }

    fn client(&mut self, fd: RawFd, ops: &mut EventOps) {
        let mut reply = None;
        let mut close = false;
        if let Some((s, buf)) = self.clients.get_mut(&fd) {
            let mut chunk = [0u8; 512];
            match s.read(&mut chunk) {
                Ok(0) => close = true,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.iter().position(|b| *b == b'\n') {
                        reply = Some(String::from_utf8_lossy(&buf[..i]).to_string());
                        buf.drain(..=i);
                    } else if buf.len() > MAX_LINE {
                        close = true;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => close = true,
            }
        }
        if let Some(line) = reply {
            let answer = self.command(&line);
            if let Some((s, _)) = self.clients.get_mut(&fd) {
                // A short reply into a fresh socket buffer; a client that cannot take it is dropped.
                close |= s.write_all(format!("{answer}\n").as_bytes()).is_err();
            }
        }
        if close && let Some((s, _)) = self.clients.remove(&fd) {
            let _ = ops.remove(Events::with_data_raw(
                s.as_raw_fd(),
                fd as u32 + 16,
                EventSet::IN,
            ));
        }
    }
}

impl MutEventSubscriber for Control {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_EXIT => {
                let _ = self.exit.evt.read();
            }
            TOKEN_SIGNAL => {
                let mut info = [0u8; 128];
                while self.signals.read(&mut info).is_ok_and(|n| n > 0) {
                    self.request_stop();
                }
            }
            TOKEN_LISTENER => self.accept(ops),
            t => self.client((t - 16) as RawFd, ops),
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::with_data(&self.exit.evt, TOKEN_EXIT, EventSet::IN));
        let _ = ops.add(Events::with_data(&self.signals, TOKEN_SIGNAL, EventSet::IN));
        if let Some(l) = &self.listener {
            let _ = ops.add(Events::with_data(&l.listener, TOKEN_LISTENER, EventSet::IN));
        }
    }
}
