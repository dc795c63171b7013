//! Bounds and shape checks on CRI input that reaches the host as paths, files or process
//! arguments: a caller's mistake (or a hostile caller) gets InvalidArgument before anything
//! is created, never a root-owned file somewhere else, a hung worker or an Internal error.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use husk_proto::cri;

use crate::sandbox::RuntimeError;

type Result<T> = std::result::Result<T, RuntimeError>;

/// Longest metadata name, namespace or uid (a Kubernetes DNS subdomain).
pub const MAX_NAME_LEN: usize = 253;
/// Longest single argument or `KEY=value` (Linux `MAX_ARG_STRLEN`: exec refuses longer).
pub const MAX_ARG_LEN: usize = 128 << 10;
/// Most arguments (command + args) or environment variables of one process.
pub const MAX_ARGS: usize = 16 << 10;
/// Most bytes of command, args and environment together (a typical Linux `ARG_MAX`).
pub const MAX_ARGV_ENV_BYTES: usize = 2 << 20;
/// Most bytes of labels and annotations together (the Kubernetes API's own bound).
pub const MAX_LABEL_BYTES: usize = 256 << 10;
/// Largest seccomp `localhost/` profile read.
pub const MAX_SECCOMP_PROFILE: u64 = 1 << 20;

fn invalid(msg: impl Into<String>) -> RuntimeError {
    RuntimeError::InvalidArgument(msg.into())
}

fn name(what: &str, v: &str) -> Result<()> {
    if v.len() > MAX_NAME_LEN {
        return Err(invalid(format!(
            "{what}: {} bytes, at most {MAX_NAME_LEN}",
            v.len()
        )));
    }
    if v.contains('\0') {
        return Err(invalid(format!("{what}: contains NUL")));
    }
    Ok(())
}

fn labels<'a>(what: &str, maps: impl IntoIterator<Item = (&'a String, &'a String)>) -> Result<()> {
    let total: usize = maps.into_iter().map(|(k, v)| k.len() + v.len()).sum();
    if total > MAX_LABEL_BYTES {
        return Err(invalid(format!(
            "{what}: labels and annotations take {total} bytes, at most {MAX_LABEL_BYTES}"
        )));
    }
    Ok(())
}

/// A process's argv and environment: counts, each string and the total bounded, no NUL.
pub fn argv_env<'a>(
    what: &str,
    args: impl IntoIterator<Item = &'a str>,
    env: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<()> {
    let (mut n, mut total) = (0usize, 0usize);
    let mut one = |kind: &str, s: usize, nul: bool| {
        n += 1;
        total += s;
        if nul {
            return Err(invalid(format!("{what}: an {kind} contains NUL")));
        }
        if s > MAX_ARG_LEN {
            return Err(invalid(format!(
                "{what}: an {kind} of {s} bytes, at most {MAX_ARG_LEN}"
            )));
        }
        if n > MAX_ARGS {
            return Err(invalid(format!(
                "{what}: more than {MAX_ARGS} arguments and variables"
            )));
        }
        if total > MAX_ARGV_ENV_BYTES {
            return Err(invalid(format!(
                "{what}: arguments and environment over {MAX_ARGV_ENV_BYTES} bytes"
            )));
        }
        Ok(())
    };
    for a in args {
        one("argument", a.len(), a.contains('\0'))?;
    }
    for (k, v) in env {
        if k.is_empty() || k.contains('=') {
            return Err(invalid(format!(
                "{what}: bad environment variable name {k:?}"
            )));
        }
        one(
            "environment variable",
            k.len() + 1 + v.len(),
            k.contains('\0') || v.contains('\0'),
        )?;
    }
    Ok(())
}

/// RunPodSandbox's config: names bounded, log directory absolute.
pub fn pod_config(c: &cri::PodSandboxConfig) -> Result<()> {
    if let Some(md) = &c.metadata {
        name("pod sandbox name", &md.name)?;
        name("pod sandbox namespace", &md.namespace)?;
        name("pod sandbox uid", &md.uid)?;
    }
    name("hostname", &c.hostname)?;
    if !c.log_directory.is_empty() && !Path::new(&c.log_directory).is_absolute() {
        return Err(invalid(format!(
            "pod sandbox log_directory {:?} must be absolute",
            c.log_directory
        )));
    }
    labels(
        "pod sandbox config",
        c.labels.iter().chain(c.annotations.iter()),
    )
}

/// CreateContainer's config: names, command, args and environment bounded; log path
/// relative and inside the log directory.
pub fn container_config(c: &cri::ContainerConfig) -> Result<()> {
    if let Some(md) = &c.metadata {
        name("container name", &md.name)?;
    }
    argv_env(
        "container",
        c.command.iter().chain(c.args.iter()).map(String::as_str),
        c.envs.iter().map(|e| (e.key.as_str(), e.value.as_str())),
    )?;
    labels(
        "container config",
        c.labels.iter().chain(c.annotations.iter()),
    )?;
    relative_log_path(&c.log_path)
}

/// A privileged container only in a privileged pod sandbox, as containerd refuses it ("no
/// privileged container allowed in sandbox"): the pod's own security context is what an
/// admission policy looks at.
pub fn privileged(c: &cri::ContainerConfig, pod: &cri::PodSandboxConfig) -> Result<()> {
    let ctr = c
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .is_some_and(|s| s.privileged);
    let pod_privileged = pod
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .is_some_and(|s| s.privileged);
    if ctr && !pod_privileged {
        return Err(invalid(
            "no privileged container allowed in sandbox: security_context.privileged is set on \
             the container but not on its pod sandbox",
        ));
    }
    Ok(())
}

fn relative_log_path(rel: &str) -> Result<()> {
    let bad = |why: &str| Err(invalid(format!("container log_path {rel:?}: {why}")));
    if rel.contains('\0') {
        return bad("contains NUL");
    }
    for c in Path::new(rel).components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return bad("must be relative to the pod's log_directory");
            }
            Component::ParentDir => return bad("must stay inside the pod's log_directory"),
        }
    }
    Ok(())
}

/// The host path of a container's log: `log_path` below the pod's `log_directory`, or none
/// when either is unset. `..` and absolute paths are InvalidArgument.
pub fn log_path(log_directory: &str, rel: &str) -> Result<Option<PathBuf>> {
    if log_directory.is_empty() || rel.is_empty() {
        return Ok(None);
    }
    relative_log_path(rel)?;
    if !Path::new(log_directory).is_absolute() {
        return Err(invalid(format!(
            "pod sandbox log_directory {log_directory:?} must be absolute"
        )));
    }
    Ok(Some(Path::new(log_directory).join(rel)))
}

/// Reads a seccomp `localhost/` profile: a regular file of at most [`MAX_SECCOMP_PROFILE`]
/// bytes. Opened non-blocking, so a FIFO or a device is refused at once instead of hanging
/// or streaming forever. Blocking file I/O: call it off the async executor.
pub fn read_seccomp_profile(path: &Path) -> Result<Vec<u8>> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |e: std::io::Error| invalid(format!("seccomp profile {}: {e}", path.display()));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(err)?;
    let meta = f.metadata().map_err(err)?;
    if !meta.is_file() {
        return Err(invalid(format!(
            "seccomp profile {}: not a regular file",
            path.display()
        )));
    }
    let too_big = || {
        invalid(format!(
            "seccomp profile {}: larger than {MAX_SECCOMP_PROFILE} bytes",
            path.display()
        ))
    };
    if meta.len() > MAX_SECCOMP_PROFILE {
        return Err(too_big());
    }
    let mut data = Vec::with_capacity(meta.len() as usize);
    f.take(MAX_SECCOMP_PROFILE + 1)
        .read_to_end(&mut data)
        .map_err(err)?;
    if data.len() as u64 > MAX_SECCOMP_PROFILE {
        return Err(too_big());
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn is_invalid<T: std::fmt::Debug>(r: Result<T>) -> bool {
        matches!(r, Err(RuntimeError::InvalidArgument(_)))
    }

    #[test]
    fn log_path_stays_below_the_log_directory() {
        let d = "/var/log/pods/ns_p_uid";
        assert_eq!(
            log_path(d, "c/0.log").unwrap(),
            Some(PathBuf::from("/var/log/pods/ns_p_uid/c/0.log"))
        );
        assert_eq!(
            log_path(d, "./c_0.log").unwrap().unwrap(),
            Path::new(d).join("c_0.log")
        );
        assert_eq!(log_path("", "c.log").unwrap(), None);
        assert_eq!(log_path(d, "").unwrap(), None);
        for bad in ["../x.log", "c/../../x.log", "/etc/cron.d/x", "c/..", "a\0b"] {
            assert!(is_invalid(log_path(d, bad)), "{bad}");
        }
        assert!(is_invalid(log_path("relative/dir", "c.log")));
    }

    #[test]
    fn oversized_names_args_and_env_are_refused() {
        let mut c = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: "c".into(),
                attempt: 0,
            }),
            args: vec!["sh".into(), "-c".into(), "true".into()],
            envs: vec![cri::KeyValue {
                key: "K".into(),
                value: "v".into(),
            }],
            ..Default::default()
        };
        container_config(&c).unwrap();
        let mut long = c.clone();
        long.metadata.as_mut().unwrap().name = "n".repeat(MAX_NAME_LEN + 1);
        assert!(is_invalid(container_config(&long)));
        let mut big = c.clone();
        big.args.push("a".repeat(MAX_ARG_LEN + 1));
        assert!(is_invalid(container_config(&big)));
        let mut many = c.clone();
        many.args = vec!["a".into(); MAX_ARGS + 1];
        assert!(is_invalid(container_config(&many)));
        let mut total = c.clone();
        total.envs = (0..40)
            .map(|i| cri::KeyValue {
                key: format!("K{i}"),
                value: "v".repeat(64 << 10),
            })
            .collect();
        assert!(is_invalid(container_config(&total)));
        let mut nul = c.clone();
        nul.args.push("a\0b".into());
        assert!(is_invalid(container_config(&nul)));
        c.envs.push(cri::KeyValue {
            key: "A=B".into(),
            value: String::new(),
        });
        assert!(is_invalid(container_config(&c)));
        let pod = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: "p".repeat(MAX_NAME_LEN + 1),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(is_invalid(pod_config(&pod)));
        let pod = cri::PodSandboxConfig {
            log_directory: "var/log".into(),
            ..Default::default()
        };
        assert!(is_invalid(pod_config(&pod)));
    }

    #[test]
    fn privileged_container_needs_a_privileged_pod() {
        let ctr = |privileged| cri::ContainerConfig {
            linux: Some(cri::LinuxContainerConfig {
                security_context: Some(cri::LinuxContainerSecurityContext {
                    privileged,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let pod = |privileged| cri::PodSandboxConfig {
            linux: Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    privileged,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let err = privileged(&ctr(true), &pod(false)).unwrap_err();
        assert!(matches!(&err, RuntimeError::InvalidArgument(m) if m.contains("privileged")));
        assert!(is_invalid(privileged(
            &ctr(true),
            &cri::PodSandboxConfig::default()
        )));
        assert!(privileged(&ctr(true), &pod(true)).is_ok());
        assert!(privileged(&ctr(false), &pod(false)).is_ok());
        assert!(privileged(&cri::ContainerConfig::default(), &pod(false)).is_ok());
    }

    #[test]
    fn seccomp_profile_must_be_a_small_regular_file() {
        let d = tempfile::tempdir().unwrap();
        let ok = d.path().join("ok.json");
        std::fs::write(&ok, br#"{"defaultAction":"SCMP_ACT_ALLOW"}"#).unwrap();
        assert!(read_seccomp_profile(&ok).unwrap().starts_with(b"{"));
        // A FIFO nobody writes: refused at once, not a hang.
        let fifo = d.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let t = std::time::Instant::now();
        assert!(is_invalid(read_seccomp_profile(&fifo)));
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
        // An endless device: refused, nothing read.
        assert!(is_invalid(read_seccomp_profile(Path::new("/dev/zero"))));
        assert!(is_invalid(read_seccomp_profile(d.path())));
        let big = d.path().join("big.json");
        let f = std::fs::File::create(&big).unwrap();
        f.set_len(MAX_SECCOMP_PROFILE + 1).unwrap();
        assert!(is_invalid(read_seccomp_profile(&big)));
        assert!(is_invalid(read_seccomp_profile(&d.path().join("missing"))));
    }
}
