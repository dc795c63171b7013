//! Device models: legacy PIO devices and virtio devices on the MMIO transport.

pub mod bus;
pub mod i8042;
pub mod serial;
pub mod virtio;

use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

/// Why the VM stops. The first reason reported wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest asked for a reset/power-off (i8042 reset line).
    GuestShutdown,
    /// SIGTERM or a control-socket `stop` whose grace period ran out.
    Stopped,
    /// A fatal error: KVM failure, triple fault, emulation failure.
    Error(String),
}

impl ExitReason {
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::GuestShutdown => 0,
            ExitReason::Stopped => 143,
            ExitReason::Error(_) => 1,
        }
    }
}

/// Shared by vCPUs and devices to ask the main thread to end the VM.
pub struct ExitSignal {
    pub evt: EventFd,
    reason: Mutex<Option<ExitReason>>,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
            reason: Mutex::new(None),
        })
    }

    pub fn exit(&self, reason: ExitReason) {
        let mut r = bus::lock(&self.reason);
        if r.is_none() {
            *r = Some(reason);
        }
        drop(r);
        // A failed eventfd write means the counter is saturated: the main thread is already woken.
        let _ = self.evt.write(1);
    }

    pub fn reason(&self) -> Option<ExitReason> {
        bus::lock(&self.reason).clone()
    }
}
