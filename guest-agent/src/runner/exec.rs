//! The last steps before execve: session/tty, user, capabilities, rlimits,
//! no_new_privs, seccomp, PATH lookup.

use std::ffi::CString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Uid};
use oci_spec::runtime::{Linux, Process};

use super::caps::{self, Caps, CapsError};
use super::seccomp::{self, SeccompError};
use super::user::{self, UserError};

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("process has no args")]
    NoArgs,
    #[error("executable {0} not found in $PATH")]
    NotFound(String),
    #[error("{0} is not executable")]
    NotExecutable(String),
    #[error("working directory {0}: {1}")]
    Cwd(String, #[source] nix::Error),
    #[error("nul byte in {0}")]
    Nul(&'static str),
    #[error("{0}: {1}")]
    Os(&'static str, #[source] nix::Error),
    #[error(transparent)]
    User(#[from] UserError),
    #[error(transparent)]
    Caps(#[from] CapsError),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
}

type Result<T> = std::result::Result<T, ExecError>;

/// Everything needed to exec, computed before dropping privileges.
#[derive(Debug)]
pub struct ExecPlan {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: PathBuf,
    pub user: user::ResolvedUser,
    pub caps: Option<Caps>,
    pub no_new_privs: bool,
    /// The compiled filter and its seccomp(2) flags.
    pub seccomp: Option<(Vec<libc::sock_filter>, u32)>,
    pub rlimits: Vec<(u32, u64, u64)>,
    pub oom_score_adj: Option<i32>,
    pub umask: u32,
}

/// A new session (the console, if any, becomes its controlling terminal).
pub fn prepare_session() {
    let _ = nix::unistd::setsid();
}

/// Env with defaults for PATH and HOME when the spec does not set them.
pub fn merge_env(env: &[String], extra: &[String], home: &str) -> Vec<String> {
    let mut out: Vec<String> = env.to_vec();
    let has = |out: &Vec<String>, k: &str| out.iter().any(|e| e.split('=').next() == Some(k));
    for e in extra {
        let key = e.split('=').next().unwrap_or_default().to_string();
        if !has(&out, &key) {
            out.push(e.clone());
        }
    }
    if !has(&out, "PATH") {
        out.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    }
    if !has(&out, "HOME") {
        out.push(format!("HOME={home}"));
    }
    out
}

pub fn prepare_process(
    process: Option<&Process>,
    linux: Option<&Linux>,
    extra_env: &[String],
) -> Result<ExecPlan> {
    let process = process.ok_or(ExecError::NoArgs)?;
    let args = process.args().clone().unwrap_or_default();
    if args.is_empty() {
        return Err(ExecError::NoArgs);
    }
    let u = process.user();
    let user = user::resolve(
        u.username().as_deref(),
        u.uid(),
        u.gid(),
        u.additional_gids().as_deref().unwrap_or_default(),
    )?;
    let env = merge_env(
        process.env().as_deref().unwrap_or_default(),
        extra_env,
        &user.home,
    );
    let caps = process
        .capabilities()
        .as_ref()
        .map(Caps::from_oci)
        .transpose()?;
    let seccomp = match linux.and_then(|l| l.seccomp().as_ref()) {
        Some(s) => Some((seccomp::compile(s)?, seccomp::flags(s))),
        None => None,
    };
    super::mark("process.seccomp_compile");
    let rlimits = process
        .rlimits()
        .iter()
        .flatten()
        .filter_map(|r| rlimit_resource(&r.typ().to_string()).map(|res| (res, r.soft(), r.hard())))
        .collect();
    Ok(ExecPlan {
        args,
        env,
        cwd: process.cwd().clone(),
        user,
        caps,
        no_new_privs: process.no_new_privileges().unwrap_or(false),
        seccomp,
        rlimits,
        oom_score_adj: process.oom_score_adj(),
        umask: u.umask().unwrap_or(0o022),
    })
}

fn rlimit_resource(name: &str) -> Option<u32> {
    Some(match name {
        "RLIMIT_CPU" => libc::RLIMIT_CPU,
        "RLIMIT_FSIZE" => libc::RLIMIT_FSIZE,
        "RLIMIT_DATA" => libc::RLIMIT_DATA,
        "RLIMIT_STACK" => libc::RLIMIT_STACK,
        "RLIMIT_CORE" => libc::RLIMIT_CORE,
        "RLIMIT_RSS" => libc::RLIMIT_RSS,
        "RLIMIT_NPROC" => libc::RLIMIT_NPROC,
        "RLIMIT_NOFILE" => libc::RLIMIT_NOFILE,
        "RLIMIT_MEMLOCK" => libc::RLIMIT_MEMLOCK,
        "RLIMIT_AS" => libc::RLIMIT_AS,
        "RLIMIT_LOCKS" => libc::RLIMIT_LOCKS,
        "RLIMIT_SIGPENDING" => libc::RLIMIT_SIGPENDING,
        "RLIMIT_MSGQUEUE" => libc::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => libc::RLIMIT_NICE,
        "RLIMIT_RTPRIO" => libc::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => libc::RLIMIT_RTTIME,
        _ => return None,
    })
}

/// rlimits, oom score, cwd, groups/uid/gid, capabilities, no_new_privs and (when
/// no_new_privs is off) seccomp, which then needs CAP_SYS_ADMIN still held.
pub fn drop_privileges(plan: &ExecPlan) -> Result<()> {
    for (res, soft, hard) in &plan.rlimits {
        let lim = libc::rlimit {
            rlim_cur: *soft,
            rlim_max: *hard,
        };
        // SAFETY: plain setrlimit with a valid struct.
        if unsafe { libc::setrlimit(*res, &lim) } < 0 {
            return Err(ExecError::Os("setrlimit", nix::Error::last()));
        }
    }
    if let Some(adj) = plan.oom_score_adj {
        let _ = std::fs::write("/proc/self/oom_score_adj", adj.to_string());
    }
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(
        plan.umask as libc::mode_t,
    ));
    // As runc: a working directory the image lacks is created (by root, 0755).
    if let Err(nix::Error::ENOENT) = nix::unistd::chdir(&plan.cwd) {
        let _ = std::fs::create_dir_all(&plan.cwd);
    }
    nix::unistd::chdir(&plan.cwd).map_err(|e| ExecError::Cwd(plan.cwd.display().to_string(), e))?;
    if let Some(caps) = &plan.caps {
        caps::apply_bounding(caps)?;
    }
    if !plan.no_new_privs
        && let Some((filter, flags)) = &plan.seccomp
    {
        seccomp::load(filter, *flags)?;
    }
    super::mark("process.seccomp_load");
    caps::keep_caps(true)?;
    let groups: Vec<Gid> = plan
        .user
        .additional_gids
        .iter()
        .map(|g| Gid::from_raw(*g))
        .collect();
    nix::unistd::setgroups(&groups).map_err(|e| ExecError::Os("setgroups", e))?;
    nix::unistd::setresgid(
        Gid::from_raw(plan.user.gid),
        Gid::from_raw(plan.user.gid),
        Gid::from_raw(plan.user.gid),
    )
    .map_err(|e| ExecError::Os("setgid", e))?;
    nix::unistd::setresuid(
        Uid::from_raw(plan.user.uid),
        Uid::from_raw(plan.user.uid),
        Uid::from_raw(plan.user.uid),
    )
    .map_err(|e| ExecError::Os("setuid", e))?;
    caps::keep_caps(false)?;
    if let Some(caps) = &plan.caps {
        caps::apply_sets(caps)?;
    }
    if plan.no_new_privs {
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } < 0 {
            return Err(ExecError::Os("no_new_privs", nix::Error::last()));
        }
    }
    Ok(())
}

pub fn find_executable(arg0: &str, env: &[String]) -> Result<PathBuf> {
    if arg0.contains('/') {
        return Ok(PathBuf::from(arg0));
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let candidate = Path::new(dir).join(arg0);
        if let Ok(meta) = candidate.metadata()
            && meta.is_file()
            && meta.permissions().mode() & 0o111 != 0
        {
            return Ok(candidate);
        }
    }
    Err(ExecError::NotFound(arg0.to_string()))
}

/// Default dispositions and an empty mask for the new program: ignored
/// signals survive execve, and the Rust runtime ignores SIGPIPE.
pub fn reset_signals() {
    /// The kernel's struct sigaction (x86_64): glibc's wrapper refuses its
    /// reserved signals 32 and 33, which may arrive ignored too.
    #[repr(C)]
    struct KernelSigaction {
        handler: usize,
        flags: u64,
        restorer: usize,
        mask: u64,
    }
    let default = KernelSigaction {
        handler: libc::SIG_DFL,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    for sig in 1..=64 {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            // SAFETY: rt_sigaction with a valid struct and a null old-action pointer.
            unsafe {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    &default as *const KernelSigaction,
                    std::ptr::null::<u8>(),
                    8usize,
                )
            };
        }
    }
    let _ = nix::sys::signal::SigSet::empty().thread_set_mask();
}

/// Load seccomp (no_new_privs case) and execve. Returns only on failure.
pub fn exec(plan: &ExecPlan) -> Result<()> {
    let exe = find_executable(&plan.args[0], &plan.env)?;
    let cstr = |s: &str, what| CString::new(s).map_err(|_| ExecError::Nul(what));
    let path = cstr(&exe.display().to_string(), "path")?;
    let args = plan
        .args
        .iter()
        .map(|a| cstr(a, "args"))
        .collect::<Result<Vec<_>>>()?;
    let env = plan
        .env
        .iter()
        .map(|e| cstr(e, "env"))
        .collect::<Result<Vec<_>>>()?;
    reset_signals();
    if plan.no_new_privs
        && let Some((filter, flags)) = &plan.seccomp
    {
        seccomp::load(filter, *flags)?;
    }
    match nix::unistd::execve(&path, &args, &env)
        .err()
        .unwrap_or(nix::Error::UnknownErrno)
    {
        nix::Error::ENOENT => Err(ExecError::NotFound(exe.display().to_string())),
        nix::Error::EACCES => Err(ExecError::NotExecutable(exe.display().to_string())),
        err => Err(ExecError::Os("execve", err)),
    }
}

/// `ip link set lo up` with two ioctls.
pub fn loopback_up() -> std::io::Result<()> {
    // SAFETY: plain socket() call.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&sock);
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in b"lo\0".iter().enumerate() {
        req.ifr_name[i] = *b as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read/write the ifreq we pass.
    unsafe {
        if libc::ioctl(raw, libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(raw, libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_defaults_do_not_override() {
        let env = merge_env(
            &["PATH=/x".into(), "A=1".into()],
            &["A=2".into(), "B=3".into()],
            "/root",
        );
        assert_eq!(env, vec!["PATH=/x", "A=1", "B=3", "HOME=/root"]);
    }

    #[test]
    fn finds_executables_on_path() {
        let dir = tempfile::tempdir().expect("tmp");
        let exe = dir.path().join("tool");
        std::fs::write(&exe, "#!/bin/sh\n").expect("write");
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::write(dir.path().join("data"), "").expect("write");
        let env = vec![format!("PATH=/nonexistent:{}", dir.path().display())];
        assert_eq!(find_executable("tool", &env).expect("found"), exe);
        assert!(matches!(
            find_executable("data", &env),
            Err(ExecError::NotFound(_))
        ));
        assert_eq!(
            find_executable("/abs/x", &env).expect("abs"),
            PathBuf::from("/abs/x")
        );
    }
}
