//! What a husk-vmm process gives up before the guest can reach it (the VMM before its vCPUs
//! run, a vhost-user server before it takes a frontend): new privileges, every capability but
//! the ones it names (none, or `FS_CAPS` for a passthrough file server acting on files the
//! guest owns), and (seccomp) the system calls a device model never makes: exec, mounts and
//! namespaces, module loading, tracing other processes, BPF, keyrings, file handles
//! (`open_by_handle_at` is the classic container escape), reboot, swap, kexec. They fail with
//! EPERM. A deny list, not an allow list: KVM's and the vhost-user library's own needs are not
//! pinned down here.

#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("{0}: {1}")]
    Os(&'static str, #[source] std::io::Error),
}

/// Capabilities a virtio-fs server keeps: chown, dac_override, dac_read_search, fowner, fsetid
/// (file ownership and permission bits as the guest asks; reading files of any owner in the
/// share).
pub const FS_CAPS: &[u32] = &[0, 1, 2, 3, 4];
const LAST_CAP: u32 = 63;

/// Sets no_new_privs, drops every capability but `keep` from the bounding, effective, permitted
/// and inheritable sets (without CAP_SETPCAP, i.e. not root, they are left as they are), and
/// installs the deny list on every thread of the process.
pub fn confine(keep: &[u32]) -> Result<(), ConfineError> {
    drop_privileges(keep)?;
    deny_syscalls(true)
}

/// System calls refused (EPERM) once confined.
const DENIED: &[libc::c_long] = &[
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_userfaultfd,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_fsopen,
    libc::SYS_fsmount,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
];

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const X32_BIT: u32 = 0x4000_0000;

fn stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jeq(k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    }
}

/// The filter: other architectures and x32 are killed/refused, `DENIED` is EPERM, the rest runs.
fn filter() -> Vec<libc::sock_filter> {
    let ld = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    let ret = libc::BPF_RET | libc::BPF_K;
    let eperm = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
    let mut f = vec![
        stmt(ld, 4), // seccomp_data.arch
        jeq(AUDIT_ARCH_X86_64, 1, 0),
        stmt(ret, libc::SECCOMP_RET_KILL_PROCESS),
        stmt(ld, 0), // seccomp_data.nr
        libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16,
            jt: 0,
            jf: 1,
            k: X32_BIT,
        },
        stmt(ret, eperm),
    ];
    for nr in DENIED {
        f.push(jeq(*nr as u32, 0, 1));
        f.push(stmt(ret, eperm));
    }
    f.push(stmt(ret, libc::SECCOMP_RET_ALLOW));
    f
}

/// Installs the deny-list filter: for every thread of the process (`all_threads`) or the
/// calling thread only (tests).
pub fn deny_syscalls(all_threads: bool) -> Result<(), ConfineError> {
    let f = filter();
    let prog = libc::sock_fprog {
        len: f.len() as u16,
        filter: f.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(ConfineError::Os(
            "no_new_privs",
            std::io::Error::last_os_error(),
        ));
    }
    let flags = if all_threads {
        libc::SECCOMP_FILTER_FLAG_TSYNC
    } else {
        0
    };
    // SAFETY: seccomp reads the program (`f` outlives the call) and copies it into the kernel.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            flags,
            &prog as *const libc::sock_fprog,
        )
    };
    if r != 0 {
        return Err(ConfineError::Os("seccomp", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// no_new_privs and the capability drop.
fn drop_privileges(keep: &[u32]) -> Result<(), ConfineError> {
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
                Some(libc::EPERM) => {
                    tracing::info!("not privileged: capabilities left as they are");
                    return Ok(());
                }
                _ => return Err(ConfineError::Os("drop bounding capability", e)),
            }
        }
    }
    let mask: u64 = keep.iter().fold(0, |m, c| m | (1u64 << c));
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
            inheritable: 0,
        },
        Data {
            effective: (mask >> 32) as u32,
            permitted: (mask >> 32) as u32,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// On a thread of its own (the filter stays with it): denied calls fail with EPERM, the
    /// file calls a server makes still work.
    #[test]
    fn denied_syscalls_fail_and_file_calls_work() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().to_path_buf();
        let r = std::thread::spawn(move || {
            deny_syscalls(false).expect("install");
            // SAFETY: plain syscalls with valid (or null) arguments; they are expected to fail.
            let unshare = unsafe { libc::unshare(libc::CLONE_NEWNS) };
            let e1 = std::io::Error::last_os_error().raw_os_error();
            // SAFETY: as above.
            let exec =
                unsafe { libc::execve(c"/bin/true".as_ptr(), std::ptr::null(), std::ptr::null()) };
            let e2 = std::io::Error::last_os_error().raw_os_error();
            // SAFETY: as above.
            let handle = unsafe {
                libc::syscall(libc::SYS_open_by_handle_at, -1, std::ptr::null::<u8>(), 0)
            };
            let e3 = std::io::Error::last_os_error().raw_os_error();
            let file_ok =
                std::fs::write(p.join("f"), b"x").is_ok() && std::fs::read(p.join("f")).is_ok();
            (unshare, e1, exec, e2, handle, e3, file_ok)
        })
        .join()
        .expect("thread");
        assert_eq!(
            r,
            (
                -1,
                Some(libc::EPERM),
                -1,
                Some(libc::EPERM),
                -1,
                Some(libc::EPERM),
                true
            )
        );
        // This thread is not filtered.
        assert!(std::fs::read_dir(dir.path()).is_ok());
    }
}
