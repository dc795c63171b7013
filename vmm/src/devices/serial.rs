//! The 8250 UART on COM1 (vm-superio), raising IRQ 4 through an irqfd.

use std::io::Write;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;

pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_IRQ: u32 = 4;

/// Raises the UART's interrupt by writing its irqfd.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Serial output sink. The UART flushes after every byte; this buffers until a newline (or
/// 4 KiB) so a line costs one write(2), and the event loop calls `flush_pending` periodically
/// and at exit so partial lines are not held back.
pub struct LineWriter<W: Write + Send> {
    inner: W,
    buf: Vec<u8>,
}

impl<W: Write + Send> LineWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            buf: Vec::with_capacity(256),
        }
    }
}

/// Output that may hold bytes back until asked.
pub trait PendingFlush: Write + Send {
    fn flush_pending(&mut self) -> std::io::Result<()>;
}

impl<W: Write + Send> PendingFlush for LineWriter<W> {
    fn flush_pending(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            let r = self
                .inner
                .write_all(&self.buf)
                .and_then(|_| self.inner.flush());
            self.buf.clear();
            r?;
        }
        Ok(())
    }
}

impl<W: Write + Send> Write for LineWriter<W> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if data.contains(&b'\n') || self.buf.len() >= 4096 {
            self.flush_pending()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub struct SerialDevice {
    uart: Serial<EventFdTrigger, vm_superio::serial::NoEvents, Box<dyn PendingFlush>>,
}

impl SerialDevice {
    pub fn new(irq: EventFd, out: Box<dyn PendingFlush>) -> Self {
        Self {
            uart: Serial::new(EventFdTrigger(irq), out),
        }
    }

    /// Writes out any partial line.
    pub fn flush_pending(&mut self) {
        if let Err(e) = self.uart.writer_mut().flush_pending() {
            tracing::debug!("serial flush: {e}");
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(b) = data.first_mut() {
            *b = self.uart.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(b) = data.first() {
            // Output errors (a closed stdout) must not stop the guest.
            if let Err(e) = self.uart.write(offset as u8, *b) {
                tracing::debug!("serial write: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmits_bytes_and_raises_thre_interrupt() {
        let sink = Sink::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let mut dev = SerialDevice::new(
            irq.try_clone().expect("clone"),
            Box::new(LineWriter::new(sink.clone())),
        );
        dev.write(1, &[0x02]); // IER: THR empty interrupt
        for b in b"hi\nab" {
            dev.write(0, &[*b]);
        }
        assert_eq!(
            &*sink.0.lock().expect("lock"),
            b"hi\n",
            "partial line held back"
        );
        dev.flush_pending();
        assert_eq!(&*sink.0.lock().expect("lock"), b"hi\nab");
        assert!(irq.read().expect("interrupt raised") >= 1);
    }
}
