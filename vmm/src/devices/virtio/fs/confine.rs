//! What a process serving a share gives up before it takes requests: new privileges, and every
//! capability but those a passthrough server needs to act on files the guest owns.

#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("{0}: {1}")]
    Os(&'static str, #[source] std::io::Error),
}

/// Capabilities kept: chown, dac_override, dac_read_search, fowner, fsetid (file ownership and
/// permission bits as the guest asks; reading files of any owner in the share).
const KEEP: [u32; 5] = [0, 1, 2, 3, 4];
const LAST_CAP: u32 = 63;

/// Sets no_new_privs and drops every other capability from the bounding, effective, permitted
/// and inheritable sets. Without CAP_SETPCAP (not root) only no_new_privs is set.
pub fn confine() -> Result<(), ConfineError> {
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(ConfineError::Os(
            "no_new_privs",
            std::io::Error::last_os_error(),
        ));
    }
    for cap in 0..=LAST_CAP {
        if KEEP.contains(&cap) {
            continue;
        }
        // SAFETY: prctl with integer arguments; EINVAL past the kernel's last cap is fine.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINVAL) => break,
                Some(libc::EPERM) => {
                    tracing::info!("virtio-fs: not privileged, capabilities left as they are");
                    return Ok(());
                }
                _ => return Err(ConfineError::Os("drop bounding capability", e)),
            }
        }
    }
    let mask: u32 = KEEP.iter().fold(0, |m, c| m | (1 << c));
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
            effective: mask,
            permitted: mask,
            inheritable: 0,
        },
        Data {
            effective: 0,
            permitted: 0,
            inheritable: 0,
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
