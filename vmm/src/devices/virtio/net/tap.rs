//! A tap device opened through `/dev/net/tun` (no packet-info header, no vnet header: offloads off).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(#[source] std::io::Error),
    #[error("cannot open tap {name}: {source}")]
    SetIff {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

pub struct Tap {
    file: File,
    pub name: String,
}

impl Tap {
    /// Attaches to (or creates, given CAP_NET_ADMIN) the tap interface `name`.
    pub fn open(name: &str) -> Result<Self, TapError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in req
            .ifr_name
            .iter_mut()
            .zip(name.bytes().take(libc::IFNAMSIZ - 1))
        {
            *d = s as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI;
        // SAFETY: TUNSETIFF reads a properly initialised ifreq that outlives the call, on a tun fd.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) };
        if ret < 0 {
            return Err(TapError::SetIff {
                name: name.to_string(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Self {
            file,
            name: name.to_string(),
        })
    }

    /// Takes over inherited fd `fd`, already attached to tap `name` (e.g. by huskd).
    pub fn from_fd(fd: RawFd, name: &str) -> Result<Self, TapError> {
        let bad = |source| TapError::SetIff {
            name: name.to_string(),
            source,
        };
        // SAFETY: F_GETFD on an arbitrary number only reports whether it is open.
        if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(bad(std::io::Error::from_raw_os_error(libc::EBADF)));
        }
        // SAFETY: the fd is open (checked above) and handed to this process to own.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        for (cmd, arg) in [
            (libc::F_SETFD, libc::FD_CLOEXEC),
            (
                libc::F_SETFL,
                // SAFETY: F_GETFL on an open fd.
                unsafe { libc::fcntl(fd, libc::F_GETFL) } | libc::O_NONBLOCK,
            ),
        ] {
            // SAFETY: fcntl on our own open fd with integer arguments.
            if unsafe { libc::fcntl(fd, cmd, arg) } < 0 {
                return Err(bad(std::io::Error::last_os_error()));
            }
        }
        Ok(Self {
            file,
            name: name.to_string(),
        })
    }

    pub fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }

    pub fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<usize> {
        self.file.write(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
