//! Minimal i8042 keyboard controller: the reset line (guest reboot/power-off ends the VM) and
//! Ctrl-Alt-Del injection (how SIGTERM asks the guest to stop), as Firecracker does.

use std::collections::VecDeque;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;
use super::{ExitReason, ExitSignal};

pub const I8042_PORT: u64 = 0x60;
pub const I8042_LEN: u64 = 5;
pub const KBD_IRQ: u32 = 1;

const OFF_DATA: u64 = 0;
const OFF_CMD: u64 = 4;
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_RESET_CPU: u8 = 0xfe;
const SB_OUT_DATA_AVAIL: u8 = 0x01;
const SB_I8042_CMD_DATA: u8 = 0x08;
const SB_KBD_ENABLED: u8 = 0x10;
const CTR_KBD_INT: u8 = 0x01;
/// Control byte bit: the controller translates set 2 to set 1 (never set here).
#[cfg(test)]
const CTR_XLATE: u8 = 0x40;

/// Ctrl-Alt-Del in scancode set 2, make then break (0xf0 prefixes a break, 0xe0 an extended
/// key): the controller does not translate (no XLATE bit in its control byte), so Linux's
/// atkbd reads raw set 2. (Set-1 codes arrive as "Unknown key pressed (raw set 2 …)".)
const CTRL_ALT_DEL: [u8; 11] = [
    0x14, 0x11, 0xe0, 0x71, // make: Ctrl, Alt, Del
    0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14, // break: Del, Alt, Ctrl
];
/// Bytes the output buffer holds at most (guest reads drain it).
const BUF_MAX: usize = 64;

pub struct I8042 {
    exit: Arc<ExitSignal>,
    kbd_irq: EventFd,
    status: u8,
    control: u8,
    outp: u8,
    cmd: u8,
    buf: VecDeque<u8>,
}

impl I8042 {
    pub fn new(exit: Arc<ExitSignal>, kbd_irq: EventFd) -> Self {
        Self {
            exit,
            kbd_irq,
            status: SB_KBD_ENABLED,
            control: CTR_KBD_INT,
            outp: 0,
            cmd: 0,
            buf: VecDeque::new(),
        }
    }

    /// Queues the Ctrl-Alt-Del key sequence and interrupts the guest.
    pub fn trigger_ctrl_alt_del(&mut self) {
        if self.buf.len() + CTRL_ALT_DEL.len() <= BUF_MAX {
            self.buf.extend(CTRL_ALT_DEL);
        }
        self.refill();
        self.raise();
    }

    fn raise(&self) {
        if self.control & CTR_KBD_INT != 0 && self.status & SB_OUT_DATA_AVAIL != 0 {
            let _ = self.kbd_irq.write(1);
        }
    }

    fn refill(&mut self) {
        if self.buf.is_empty() {
            self.status &= !SB_OUT_DATA_AVAIL;
        } else {
            self.status |= SB_OUT_DATA_AVAIL;
        }
    }

    fn push(&mut self, b: u8) {
        if self.buf.len() >= BUF_MAX {
            return;
        }
        self.buf.push_back(b);
        self.refill();
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let Some(out) = data.first_mut() else { return };
        *out = match offset {
            OFF_CMD => self.status,
            OFF_DATA => {
                let b = self.buf.pop_front().unwrap_or(0);
                self.refill();
                self.raise();
                b
            }
            _ => 0,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            OFF_CMD => {
                self.status |= SB_I8042_CMD_DATA;
                self.cmd = v;
                match v {
                    CMD_RESET_CPU => {
                        tracing::info!("guest reset via i8042");
                        self.exit.exit(ExitReason::GuestShutdown);
                    }
                    CMD_READ_CTR => self.push(self.control),
                    CMD_READ_OUTP => self.push(self.outp),
                    _ => {}
                }
            }
            OFF_DATA => {
                self.status &= !SB_I8042_CMD_DATA;
                match self.cmd {
                    CMD_WRITE_CTR => self.control = v,
                    CMD_WRITE_OUTP => {
                        self.outp = v;
                        // Output port bit 0 low pulses the CPU reset line.
                        if v & 1 == 0 {
                            self.exit.exit(ExitReason::GuestShutdown);
                        }
                    }
                    _ => self.push(0xfa), // ACK keyboard commands
                }
                self.cmd = 0;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> (I8042, Arc<ExitSignal>, EventFd) {
        let exit = Arc::new(ExitSignal::new().expect("exit"));
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        (
            I8042::new(exit.clone(), irq.try_clone().expect("clone")),
            exit,
            irq,
        )
    }

    #[test]
    fn reset_command_requests_shutdown() {
        let (mut d, exit, _) = dev();
        assert_eq!(exit.reason(), None);
        d.write(OFF_CMD, &[CMD_RESET_CPU]);
        assert_eq!(exit.reason(), Some(ExitReason::GuestShutdown));
        assert_eq!(exit.evt.read().expect("woken"), 1);
    }

    #[test]
    fn ctrl_alt_del_is_readable_with_interrupt() {
        let (mut d, exit, irq) = dev();
        d.trigger_ctrl_alt_del();
        assert!(irq.read().expect("irq") >= 1);
        let mut got = vec![];
        loop {
            let mut s = [0u8];
            d.read(OFF_CMD, &mut s);
            if s[0] & SB_OUT_DATA_AVAIL == 0 {
                break;
            }
            let mut b = [0u8];
            d.read(OFF_DATA, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, CTRL_ALT_DEL);
        assert_eq!(&got[..4], &[0x14, 0x11, 0xe0, 0x71], "set-2 make codes");
        assert_eq!(exit.reason(), None);
        let mut ctr = [0u8];
        d.write(OFF_CMD, &[CMD_READ_CTR]);
        d.read(OFF_DATA, &mut ctr);
        assert_eq!(ctr[0] & CTR_XLATE, 0, "raw set 2: no translation");
    }

    #[test]
    fn output_buffer_is_bounded() {
        let (mut d, _exit, _irq) = dev();
        for _ in 0..100 {
            d.trigger_ctrl_alt_del();
            d.write(OFF_CMD, &[CMD_READ_CTR]);
        }
        assert!(d.buf.len() <= BUF_MAX);
    }
}
