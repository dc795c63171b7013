//! The jail of a VM pod's host processes (QEMU, the vhost-user servers, husk-vmm): each runs
//! through `husk-vmm jail` (private mount namespace with a minimal root, the pod's own
//! unprivileged uid and gid, no capabilities but the file server's, no_new_privs; see
//! docs/security.md, "VMM and helper jail").
//!
//! - uid = gid = `jail_uid_base + n`, n claimed per pod by creating `<run_dir>/jail-uids/<uid>`
//!   (holding the pod id) exclusively, so a restarted huskd sees which are taken; released
//!   at cleanup.
//! - The pod's run dir stays root's. What the jailed processes create lives in `sock/` (owned
//!   by the pod's uid, mode 0700: vhost-user, hybrid-vsock, QMP and control sockets); their
//!   output (the guest console included) leaves through pipes to the pod's log writer, so
//!   no jail sees a log file; `root/` is the empty directory each jail mounts its tmpfs root
//!   on (in its own namespace).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::super::error::RuntimeError;

/// The directory of the sockets a pod's processes create.
pub fn sock_dir(pod_dir: &Path) -> PathBuf {
    pod_dir.join("sock")
}

/// The mount point of the jails' roots.
fn root_dir(pod_dir: &Path) -> PathBuf {
    pod_dir.join("root")
}

fn uid_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("jail-uids")
}

fn internal(op: &'static str, p: &Path, source: std::io::Error) -> RuntimeError {
    RuntimeError::Io {
        op,
        path: p.to_path_buf(),
        source,
    }
}

/// Claims a uid for `pod` in `[base, base + count)`: the one it holds already, else a free
/// one (probing from a hash of the pod id).
pub fn claim(run_dir: &Path, pod: &str, base: u32, count: u32) -> Result<u32, RuntimeError> {
    let d = uid_dir(run_dir);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&d)
        .map_err(|e| internal("jail uid dir", &d, e))?;
    if let Some(uid) = held(run_dir, pod) {
        return Ok(uid);
    }
    let start = pod.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    }) % count as u64;
    for i in 0..count as u64 {
        let uid = base + ((start + i) % count as u64) as u32;
        let p = d.join(uid.to_string());
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&p)
        {
            Ok(mut f) => {
                f.write_all(pod.as_bytes())
                    .map_err(|e| internal("jail uid claim", &p, e))?;
                return Ok(uid);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(internal("jail uid claim", &p, e)),
        }
    }
    Err(super::VmError::JailUidsTaken { count, base }.into())
}

/// The uid `pod` holds, if any.
pub fn held(run_dir: &Path, pod: &str) -> Option<u32> {
    std::fs::read_dir(uid_dir(run_dir))
        .ok()?
        .flatten()
        .find(|e| std::fs::read(e.path()).is_ok_and(|c| c == pod.as_bytes()))
        .and_then(|e| e.file_name().to_str()?.parse().ok())
}

/// Gives `pod`'s uid back.
pub fn release(run_dir: &Path, pod: &str) {
    if let Some(uid) = held(run_dir, pod) {
        let p = uid_dir(run_dir).join(uid.to_string());
        if let Err(e) = std::fs::remove_file(&p) {
            tracing::warn!(pod, uid, error = %e, "release jail uid");
        }
    }
}

fn chown(p: &Path, uid: u32) -> Result<(), RuntimeError> {
    std::os::unix::fs::chown(p, Some(uid), Some(uid)).map_err(|e| internal("chown", p, e))
}

/// Creates the pod dir's `sock/` (owned by `uid` when jailed) and `root/`.
pub fn prepare(pod_dir: &Path, uid: Option<u32>) -> Result<(), RuntimeError> {
    let sock = sock_dir(pod_dir);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&sock)
        .map_err(|e| internal("pod socket dir", &sock, e))?;
    let root = root_dir(pod_dir);
    std::fs::DirBuilder::new()
        .mode(0o755)
        .create(&root)
        .map_err(|e| internal("pod jail root", &root, e))?;
    if let Some(uid) = uid {
        chown(&sock, uid)?;
    }
    Ok(())
}

/// What one jailed process sees and keeps.
#[derive(Default)]
pub struct Jailed<'a> {
    pub ro: Vec<&'a Path>,
    pub rw: Vec<&'a Path>,
    pub devs: Vec<&'a str>,
    /// `(dir, fd)`: opened onto fd before the root changes.
    pub open_dirs: Vec<(&'a Path, i32)>,
    pub keep_fs_caps: bool,
}

/// `program` (absolute) as pod `uid` runs it: through `vmm jail` when `uid` is set, else
/// directly. The caller appends the program's arguments.
pub fn command(
    vmm: &Path,
    uid: Option<u32>,
    pod_dir: &Path,
    program: &Path,
    j: &Jailed<'_>,
) -> Command {
    let Some(uid) = uid else {
        return Command::new(program);
    };
    let mut c = Command::new(vmm);
    c.arg("jail")
        .args(["--uid", &uid.to_string(), "--gid", &uid.to_string()])
        .arg("--root")
        .arg(root_dir(pod_dir));
    for p in &j.ro {
        c.arg("--ro").arg(p);
    }
    for p in &j.rw {
        c.arg("--rw").arg(p);
    }
    for d in &j.devs {
        c.args(["--dev", d]);
    }
    for (p, fd) in &j.open_dirs {
        c.arg("--open-dir").arg(format!("{}:{fd}", p.display()));
    }
    if j.keep_fs_caps {
        c.arg("--keep-fs-caps");
    }
    c.arg("--").arg(program);
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_are_claimed_once_and_released() {
        let d = tempfile::tempdir().unwrap();
        let a = claim(d.path(), "pod-a", 5000, 2).unwrap();
        assert_eq!(
            claim(d.path(), "pod-a", 5000, 2).unwrap(),
            a,
            "same pod, same uid"
        );
        let b = claim(d.path(), "pod-b", 5000, 2).unwrap();
        assert_ne!(a, b);
        assert!((5000..5002).contains(&a) && (5000..5002).contains(&b));
        let e = claim(d.path(), "pod-c", 5000, 2).unwrap_err();
        assert!(
            matches!(
                &e,
                RuntimeError::Vm(v) if matches!(**v, super::super::VmError::JailUidsTaken {
                    count: 2,
                    base: 5000
                })
            ),
            "{e}"
        );
        assert_eq!(held(d.path(), "pod-b"), Some(b));
        release(d.path(), "pod-a");
        assert_eq!(held(d.path(), "pod-a"), None);
        assert_eq!(claim(d.path(), "pod-c", 5000, 2).unwrap(), a);
    }

    #[test]
    fn jailed_command_line() {
        let c = command(
            Path::new("/bin/husk-vmm"),
            Some(7000),
            Path::new("/run/p"),
            Path::new("/usr/bin/qemu"),
            &Jailed {
                ro: vec![Path::new("/k")],
                rw: vec![Path::new("/run/p/sock")],
                devs: vec!["kvm"],
                open_dirs: vec![(Path::new("/run/p/share"), 3)],
                keep_fs_caps: true,
            },
        );
        let args: Vec<String> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args.join(" "),
            "jail --uid 7000 --gid 7000 --root /run/p/root --ro /k --rw /run/p/sock --dev kvm \
             --open-dir /run/p/share:3 --keep-fs-caps -- /usr/bin/qemu"
        );
        let plain = command(
            Path::new("/bin/husk-vmm"),
            None,
            Path::new("/run/p"),
            Path::new("/usr/bin/qemu"),
            &Jailed::default(),
        );
        assert_eq!(plain.get_program(), "/usr/bin/qemu");
    }
}
