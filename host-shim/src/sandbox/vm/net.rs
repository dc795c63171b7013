//! The pod's CNI network on the VMM command line: the tap huskd made in the
//! pod's network namespace (`crate::network::tap`) becomes the guest's NIC,
//! with the CNI interface's MAC (and MTU for QEMU; the agent sets the MTU
//! inside the guest either way).
//! - QEMU runs outside the namespace: it gets an fd on the tap as fd 3
//!   (`-netdev tap,fd=3`) and a `virtio-net-pci` device.
//! - husk-vmm opens the tap by name, so it starts inside the namespace; jailed (no
//!   CAP_NET_ADMIN), it gets an fd on the tap as fd 4 instead (`--net tap=…,fd=4`).

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use super::{RuntimeError, VmError};
use crate::network::tap::{self, VmNic};

/// The fd number QEMU finds the tap on.
const TAP_FD: i32 = 3;

/// Adds the NIC to a QEMU command; the returned fd must live until the spawn.
pub fn qemu(cmd: &mut Command, nic: &VmNic) -> Result<OwnedFd, RuntimeError> {
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

/// The fd a jailed husk-vmm finds the tap on (3 is the share).
const VMM_TAP_FD: i32 = 4;

/// Adds the NIC to a husk-vmm command: by fd when `jailed`, else by name with the process
/// started in the pod's network namespace. The returned fd must live until the spawn.
pub fn husk_vmm(cmd: &mut Command, nic: &VmNic, jailed: bool) -> Result<OwnedFd, RuntimeError> {
    if jailed {
        let fd = tap::open(&nic.netns, &nic.tap).map_err(VmError::Tap)?;
        cmd.arg("--net")
            .arg(format!("tap={},mac={},fd={VMM_TAP_FD}", nic.tap, nic.mac));
        let raw = fd.as_raw_fd();
        // SAFETY: dup2(2) and fcntl(2) are async-signal-safe; they only touch this child's
        // fd table between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if raw == VMM_TAP_FD {
                    if libc::fcntl(raw, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(raw, VMM_TAP_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        return Ok(fd);
    }
    let ns = std::fs::File::open(&nic.netns).map_err(|source| VmError::Netns {
        path: nic.netns.clone(),
        source,
    })?;
    cmd.arg("--net")
        .arg(format!("tap={},mac={}", nic.tap, nic.mac));
    let raw = ns.as_raw_fd();
    // SAFETY: setns(2) is async-signal-safe; it only moves this child.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(raw, libc::CLONE_NEWNET) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(OwnedFd::from(ns))
}
