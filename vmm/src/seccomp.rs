//! Seccomp allow lists for husk-vmm's processes and threads, one per role: the VMM's main
//! thread (the device event loop and the control socket, one thread), each vCPU thread (its
//! own list, installed by the thread itself before it first enters the guest: the two lists
//! do not stack), the vhost-user vsock server, the vhost-user virtio-fs server and the log
//! writer. Built from what these processes were seen to call in the vmm and runtime_vm tests
//! (run them with `HUSK_SECCOMP=log`: unlisted calls are then allowed and logged by the kernel
//! as `audit: type=1326 … syscall=N`).
//!
//! Verdicts, in order: another architecture or the x32 ABI → kill; `DENIED` (calls a device
//! model must never make) → EPERM, so a probe gets an error rather than a dead process; the
//! role's list → allow, where `ioctl` is allowed only with the request numbers of the role
//! (`Role::ioctls`: a vCPU thread `KVM_RUN` and `KVM_GET_REGS`, the main thread and the
//! vhost-user servers `FIONBIO`, the log writer none);
//! anything else → kill the process (or log, in log mode). Other arguments are not inspected
//! (socket families, `openat` flags): see docs/security.md.

/// Which allow list a process installs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// husk-vmm's main thread once the VM is built: the device event loop and the control
    /// socket (devices, in-process virtio-fs, tap and vsock I/O; no KVM ioctl).
    Vmm,
    /// `husk-vmm vhost-user vsock`.
    VhostUserVsock,
    /// `husk-vmm vhost-user fs`.
    VhostUserFs,
    /// `husk-vmm log-writer`: reads pipes, writes, copies and truncates the files it holds.
    LogWriter,
    /// A VMM's vCPU thread (its own list, not stacked on `Vmm`): `KVM_RUN` and the device
    /// register accesses it dispatches (eventfd and serial writes); no files, sockets or
    /// threads, no other ioctl.
    Vcpu,
}

/// Refused with EPERM.
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

/// Every role: the Rust runtime (threads, memory, signals, time), epoll/eventfd loops, unix
/// sockets with fd passing (vhost-user, hybrid vsock), logging.
const BASE: &[libc::c_long] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_close,
    libc::SYS_lseek,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_openat,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_pipe2,
    libc::SYS_ioctl,
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_prctl,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_socket,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
];

/// The VMM's main thread besides `BASE`: tap and vsock I/O (read/write are in `BASE`), timers
/// and signal fds, the in-process virtio-fs server (`FS`).
const VMM: &[libc::c_long] = &[
    libc::SYS_signalfd4,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_kill,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
];

/// A vCPU thread (seen in the vmm tests: KVM_RUN, serial and eventfd writes, its stack and
/// allocator, fd drops at exit) plus the time, signal and memory calls the runtime may make.
const VCPU: &[libc::c_long] = &[
    libc::SYS_ioctl,
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_sigaltstack,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigreturn,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_yield,
    libc::SYS_prctl,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// The log writer (alone: not `BASE`): its files and pipes are open before it installs the
/// list, so no open, socket or thread; the runtime's memory, signal and exit calls.
const LOG_WRITER: &[libc::c_long] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_pwrite64,
    libc::SYS_pread64,
    libc::SYS_ftruncate,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_sigaltstack,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigreturn,
    libc::SYS_futex,
    libc::SYS_clock_gettime,
    libc::SYS_getrandom,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// `_IOC(dir, type, nr, size)` of asm-generic/ioctl.h.
const fn ioc(dir: u32, ty: u32, nr: u32, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | (ty << 8) | nr
}
const KVMIO: u32 = 0xae;
/// `_IO(KVMIO, 0x80)`.
pub const KVM_RUN: u32 = ioc(0, KVMIO, 0x80, 0);
/// `_IOR(KVMIO, 0x81, struct kvm_regs)`.
pub const KVM_GET_REGS: u32 = ioc(
    2,
    KVMIO,
    0x81,
    std::mem::size_of::<kvm_bindings::kvm_regs>(),
);
/// What std's `set_nonblocking` on a socket is.
pub const FIONBIO: u32 = libc::FIONBIO as u32;

/// ioctl requests a vCPU thread makes: entering the guest, and reading its registers for the
/// message when it stops on an error.
const VCPU_IOCTLS: &[u32] = &[KVM_RUN, KVM_GET_REGS];
/// ioctl requests of the VMM's main thread once the VM runs: making accepted and connected
/// unix sockets non-blocking (control socket, vsock). Every KVM and tap ioctl it needs
/// (`KVM_CREATE_*`, memory regions, irqfds, ioeventfds, `TUNSETIFF`) is made before.
const VMM_IOCTLS: &[u32] = &[FIONBIO];
/// ioctl requests of the vhost-user servers (seen under strace in the vhost_user_* tests:
/// only std's `set_nonblocking` on their sockets; the file server makes none).
const VHOST_USER_IOCTLS: &[u32] = &[FIONBIO];

/// The passthrough file server besides `BASE`.
const FS: &[libc::c_long] = &[
    libc::SYS_openat2,
    libc::SYS_getdents64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_renameat2,
    libc::SYS_linkat,
    libc::SYS_symlinkat,
    libc::SYS_readlinkat,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_utimensat,
    libc::SYS_fstatfs,
    libc::SYS_statfs,
    libc::SYS_flock,
    libc::SYS_copy_file_range,
    libc::SYS_fgetxattr,
    libc::SYS_fsetxattr,
    libc::SYS_flistxattr,
    libc::SYS_fremovexattr,
];

impl Role {
    /// The ioctl requests the role may make (by number).
    fn ioctls(self) -> &'static [u32] {
        match self {
            Role::Vmm => VMM_IOCTLS,
            Role::Vcpu => VCPU_IOCTLS,
            Role::LogWriter => &[],
            Role::VhostUserVsock | Role::VhostUserFs => VHOST_USER_IOCTLS,
        }
    }

    fn allowed(self) -> Vec<libc::c_long> {
        let mut v = BASE.to_vec();
        match self {
            Role::Vcpu => v = VCPU.to_vec(),
            Role::LogWriter => v = LOG_WRITER.to_vec(),
            Role::Vmm => {
                v.extend_from_slice(VMM);
                v.extend_from_slice(FS);
            }
            Role::VhostUserVsock => {}
            Role::VhostUserFs => v.extend_from_slice(FS),
        }
        v.sort_unstable();
        v.dedup();
        v
    }
}

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

/// The filter program for `role`; `log` turns the final kill into log-and-allow.
fn filter(role: Role, log: bool) -> Vec<libc::sock_filter> {
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
        stmt(ret, libc::SECCOMP_RET_KILL_PROCESS),
    ];
    for nr in DENIED {
        f.push(jeq(*nr as u32, 0, 1));
        f.push(stmt(ret, eperm));
    }
    let otherwise = if log {
        libc::SECCOMP_RET_LOG
    } else {
        libc::SECCOMP_RET_KILL_PROCESS
    };
    for nr in role.allowed() {
        match (nr == libc::SYS_ioctl).then(|| role.ioctls()) {
            // ioctl: allowed only with a listed request (the low 32 bits of args[1]: the
            // kernel reads the request as an unsigned int), else the final verdict.
            Some(reqs) => {
                f.push(jeq(nr as u32, 0, (2 * reqs.len() + 2) as u8));
                f.push(stmt(ld, IOCTL_REQUEST));
                for r in reqs {
                    f.push(jeq(*r, 0, 1));
                    f.push(stmt(ret, libc::SECCOMP_RET_ALLOW));
                }
                f.push(stmt(ret, otherwise));
            }
            None => {
                f.push(jeq(nr as u32, 0, 1));
                f.push(stmt(ret, libc::SECCOMP_RET_ALLOW));
            }
        }
    }
    f.push(stmt(ret, otherwise));
    f
}

/// Offset of the low 32 bits of `seccomp_data.args[1]` (x86-64 is little-endian).
const IOCTL_REQUEST: u32 = 16 + 8;

/// Whether `HUSK_SECCOMP=log` asks for log mode.
fn log_mode() -> bool {
    std::env::var("HUSK_SECCOMP").is_ok_and(|v| v == "log")
}

/// Sets no_new_privs and installs `role`'s filter: on every thread of the process
/// (`all_threads`) or the calling thread only (tests).
pub fn install(role: Role, all_threads: bool) -> std::io::Result<()> {
    let log = log_mode();
    if log {
        tracing::warn!(
            ?role,
            "HUSK_SECCOMP=log: system calls outside the allow list are logged, not refused"
        );
    }
    let f = filter(role, log);
    let prog = libc::sock_fprog {
        len: f.len() as u16,
        filter: f.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
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
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
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
            install(Role::VhostUserFs, false).expect("install");
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

    #[test]
    fn lists_are_sorted_and_disjoint_from_denied() {
        for role in [
            Role::Vmm,
            Role::VhostUserVsock,
            Role::VhostUserFs,
            Role::Vcpu,
            Role::LogWriter,
        ] {
            let a = role.allowed();
            assert!(a.iter().all(|nr| !DENIED.contains(nr)), "{role:?}");
            assert!(a.windows(2).all(|w| w[0] < w[1]));
        }
        assert!(!Role::VhostUserVsock.allowed().contains(&libc::SYS_openat2));
        assert!(Role::VhostUserFs.allowed().contains(&libc::SYS_openat2));
        // A vCPU thread's list (its own, not stacked) is within the VMM's, without files,
        // sockets or threads.
        let (vcpu, vmm) = (Role::Vcpu.allowed(), Role::Vmm.allowed());
        assert!(vcpu.iter().all(|nr| vmm.contains(nr)));
        for nr in [
            libc::SYS_openat,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_clone3,
        ] {
            assert!(!vcpu.contains(&nr));
        }
    }

    /// Forks a child that installs `role`'s filter (log mode or not), then runs `body` and
    /// exits with what it returns; returns the child's wait status.
    fn in_child(role: Role, log: bool, body: fn() -> i32) -> i32 {
        // SAFETY: fork in a test; the child only makes raw syscalls and exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            // SAFETY: in the child: install, then the body's raw calls, then _exit.
            unsafe {
                let f = filter(role, log);
                let prog = libc::sock_fprog {
                    len: f.len() as u16,
                    filter: f.as_ptr() as *mut libc::sock_filter,
                };
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                if libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    0,
                    &prog as *const libc::sock_fprog,
                ) != 0
                {
                    libc::_exit(3);
                }
                libc::_exit(body());
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        status
    }

    /// mkdirat: outside the vsock server's list.
    fn child_calls_unlisted(log: bool) -> i32 {
        in_child(Role::VhostUserVsock, log, || {
            // SAFETY: a raw call with a valid string; expected to be refused.
            unsafe {
                libc::syscall(
                    libc::SYS_mkdirat,
                    libc::AT_FDCWD,
                    c"/nonexistent/x".as_ptr(),
                    0,
                )
            };
            0
        })
    }

    fn killed_by_sigsys(status: i32) -> bool {
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS
    }

    fn exited_zero(status: i32) -> bool {
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
    }

    /// `ioctl(stdin, req)`: 0 when the filter let it through (whatever the kernel answered).
    fn ioctl_stdin(req: u32) -> i32 {
        let mut arg = 0i32;
        // SAFETY: an ioctl on fd 0 with a pointer to an int that outlives the call (the
        // kernel refuses requests that do not apply to it).
        unsafe { libc::ioctl(0, req as _, &mut arg) };
        0
    }

    /// The ioctl filters go by request number, per thread role: a vCPU thread may enter the
    /// guest and read registers but not touch a socket; the event loop may make a socket
    /// non-blocking but not run a vCPU. A request outside the role's list kills the process.
    #[test]
    fn ioctls_are_filtered_by_request_per_role() {
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert!(exited_zero(in_child(Role::Vcpu, false, || ioctl_stdin(
            KVM_RUN
        ))));
        assert!(exited_zero(in_child(Role::Vcpu, false, || ioctl_stdin(
            KVM_GET_REGS
        ))));
        assert!(killed_by_sigsys(in_child(Role::Vcpu, false, || {
            ioctl_stdin(FIONBIO)
        })));
        assert!(exited_zero(in_child(Role::Vmm, false, || {
            let mut on = 1i32;
            // SAFETY: a new socket, then FIONBIO on it with a pointer to an int.
            let ok = unsafe {
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                fd >= 0 && libc::ioctl(fd, libc::FIONBIO, &mut on) == 0
            };
            if ok { 0 } else { 1 }
        })));
        assert!(killed_by_sigsys(in_child(Role::Vmm, false, || {
            ioctl_stdin(KVM_RUN)
        })));
        // Requests that differ only above bit 31 are the same request to the kernel.
        assert!(killed_by_sigsys(in_child(Role::Vmm, false, || {
            // KVM_CREATE_VCPU: not the main thread's once the VM runs.
            ioctl_stdin(ioc(0, KVMIO, 0x41, 0))
        })));
        // In log mode an unlisted request goes through (and is logged).
        assert!(exited_zero(in_child(Role::Vcpu, true, || ioctl_stdin(
            FIONBIO
        ))));
        // The vhost-user servers: FIONBIO only.
        assert!(exited_zero(in_child(Role::VhostUserFs, false, || {
            ioctl_stdin(FIONBIO)
        })));
        assert!(killed_by_sigsys(in_child(
            Role::VhostUserVsock,
            false,
            || { ioctl_stdin(KVM_RUN) }
        )));
    }

    /// A call outside the allow list kills the process: SIGSYS.
    #[test]
    fn unlisted_syscall_kills_the_process() {
        let status = child_calls_unlisted(false);
        assert!(libc::WIFSIGNALED(status), "child exited: {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
    }

    /// Log mode lets it through (the kernel logs it).
    #[test]
    fn log_mode_lets_unlisted_calls_through() {
        let status = child_calls_unlisted(true);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{status:#x}"
        );
    }
}
