//! What a husk-vmm process gives up before the guest can reach it (the VMM before its vCPUs
//! run, a vhost-user server before it takes a frontend): new privileges, every capability but
//! the ones it names (none, or `FS_CAPS` for a passthrough file server acting on files the
//! guest owns), and (seccomp) every system call outside the allow list of its role
//! (`Role`): those lists hold what the VMM, the vsock server and the file server were seen to
//! make in the tests (`HUSK_SECCOMP=log` logs, instead of killing, what a list lacks: see
//! docs/security.md). Calls a device model must never make (exec, mounts and namespaces,
//! module loading, tracing other processes, BPF, keyrings, file handles — `open_by_handle_at`
//! is the classic container escape —, reboot, swap, kexec) fail with EPERM; anything else not
//! listed kills the process.

#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("{0}: {1}")]
    Os(&'static str, #[source] std::io::Error),
}

/// Capabilities a virtio-fs server keeps: chown, dac_override, dac_read_search, fowner, fsetid
/// (file ownership and permission bits as the guest asks; reading files of any owner in the
/// share).
pub const FS_CAPS: &[u32] = &[0, 1, 2, 3, 4];
pub(crate) const LAST_CAP: u32 = 63;

/// Sets no_new_privs, drops every capability but `keep` from the bounding (when root),
/// effective, permitted, inheritable and ambient sets, and installs `role`'s seccomp allow list
/// on every thread of the process.
pub fn confine(keep: &[u32], role: crate::seccomp::Role) -> Result<(), ConfineError> {
    drop_privileges(keep)?;
    crate::seccomp::install(role, true).map_err(|e| ConfineError::Os("seccomp", e))
}

/// no_new_privs and the capability drop (the VMM installs its seccomp lists per thread).
pub fn drop_privileges(keep: &[u32]) -> Result<(), ConfineError> {
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(ConfineError::Os(
            "no_new_privs",
            std::io::Error::last_os_error(),
        ));
    }
    for cap in 0..=LAST_CAP {
        if keep.contains(&cap) {
            continue;
        }
        // SAFETY: prctl with integer arguments; EINVAL past the kernel's last cap is fine.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINVAL) => break,
                // Not root (e.g. jailed): the bounding set was cut by the jail; the sets
                // below can still only shrink.
                Some(libc::EPERM) => break,
                _ => return Err(ConfineError::Os("drop bounding capability", e)),
            }
        }
    }
    set_caps(keep, false)?;
    // SAFETY: prctl with integer arguments.
    if unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    } != 0
    {
        return Err(ConfineError::Os(
            "clear ambient capabilities",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Sets the permitted and effective capability sets to `keep` (and the inheritable set too if
/// `inheritable`, as raising ambient capabilities needs).
pub(crate) fn set_caps(keep: &[u32], inheritable: bool) -> Result<(), ConfineError> {
    let mask: u64 = keep.iter().fold(0, |m, c| m | (1u64 << c));
    let inh = if inheritable { mask } else { 0 };
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let hdr = Header {
        version: 0x2008_0522,
        pid: 0,
    };
    let data = [
        Data {
            effective: mask as u32,
            permitted: mask as u32,
            inheritable: inh as u32,
        },
        Data {
            effective: (mask >> 32) as u32,
            permitted: (mask >> 32) as u32,
            inheritable: (inh >> 32) as u32,
        },
    ];
    // SAFETY: capset reads a v3 header and two data words from valid pointers.
    let r = unsafe { libc::syscall(libc::SYS_capset, &hdr as *const Header, data.as_ptr()) };
    if r != 0 {
        return Err(ConfineError::Os("capset", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The effective capability mask of this thread (from /proc), for tests and logs.
pub fn effective_caps() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line.trim_start_matches("CapEff:").trim(), 16).ok()
}
