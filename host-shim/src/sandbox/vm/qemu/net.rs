//! The pod's CNI network on QEMU's command line: the tap huskd made in the pod's network
//! namespace (`crate::network::tap`) becomes the guest's NIC, with the CNI interface's MAC
//! and MTU (the agent sets the MTU inside the guest too). QEMU runs outside the namespace:
//! it gets an fd on the tap as fd 3 (`-netdev tap,fd=3`) and a `virtio-net-pci` device.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use super::super::{RuntimeError, VmError};
use crate::network::tap::{self, VmNic};

/// The fd number QEMU finds the tap on.
const TAP_FD: i32 = 3;

/// Adds the NIC to a QEMU command; the returned fd must live until the spawn.
pub fn nic(cmd: &mut Command, nic: &VmNic) -> Result<OwnedFd, RuntimeError> {
    let fd = tap::open(&nic.netns, &nic.tap).map_err(VmError::Tap)?;
    cmd.arg("-netdev")
        .arg(format!("tap,id=net0,fd={TAP_FD}"))
        .arg("-device")
        .arg(format!(
            "virtio-net-pci,netdev=net0,mac={},host_mtu={},romfile=",
            nic.mac, nic.mtu
        ));
    let raw = fd.as_raw_fd();
    // SAFETY: dup2(2) and fcntl(2) are async-signal-safe; they only touch
    // this child's fd table between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if raw == TAP_FD {
                // dup2 onto itself keeps FD_CLOEXEC: clear it.
                if libc::fcntl(raw, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(raw, TAP_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(fd)
}
