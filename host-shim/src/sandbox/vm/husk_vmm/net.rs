//! The pod's CNI network on husk-vmm's command line: the tap huskd made in the pod's network
//! namespace (`crate::network::tap`) becomes the guest's NIC, with the CNI interface's MAC
//! (the agent sets the MTU inside the guest). husk-vmm opens the tap by name, so it starts
//! inside the namespace; jailed (no CAP_NET_ADMIN), it gets an fd on the tap as fd 4 instead
//! (`--net tap=…,fd=4`).

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use super::super::{RuntimeError, VmError};
use crate::network::tap::{self, VmNic};

/// The fd a jailed husk-vmm finds the tap on (3 is the share).
const VMM_TAP_FD: i32 = 4;

/// Adds the NIC to a husk-vmm command: by fd when `jailed`, else by name with the process
/// started in the pod's network namespace. The returned fd must live until the spawn.
pub fn nic(cmd: &mut Command, nic: &VmNic, jailed: bool) -> Result<OwnedFd, RuntimeError> {
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
