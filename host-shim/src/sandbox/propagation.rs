//! Bidirectional mount propagation in `husk-ns`. The agent's mount namespace is an `rslave`
//! copy of the host's (its own mounts never leak out), so a volume bound there from its host
//! source is a slave of it: a mount made in the container would stay in the container. A
//! per-pod shared directory (`<pod run dir>/propagation`, a bind of itself in its own peer
//! group) is the way through: the agent takes a copy of it before it makes its namespace
//! one-way and attaches it at `<state dir>/propagation`, a peer of huskd's. For each
//! bidirectional volume huskd binds a peer copy of the host source's (shared) mount into the
//! directory; it reaches the agent's copy as a peer too, the agent binds it into the
//! container (rootfs propagation `rshared`), and a mount made below it in the container
//! reaches the host source. Semantics are containerd's: the host source must be on a shared
//! mount, and the container must be privileged (kubelet's rule; nothing else may mount).

use std::path::{Path, PathBuf};

use husk_proto::cri;
use oci_spec::runtime::Spec;

use super::error::RuntimeError;
use super::share::{HostMount, PodShare};

/// The per-pod shared directory on the host.
pub fn host_dir(pod_dir: &Path) -> PathBuf {
    pod_dir.join(husk_proto::PROPAGATION_DIR)
}

/// The agent's peer of [`host_dir`] (the agent's state dir is `<pod dir>/state`).
pub fn agent_dir(pod_dir: &Path) -> PathBuf {
    pod_dir.join("state").join(husk_proto::PROPAGATION_DIR)
}

fn mount(src: &Path, target: &Path, flags: libc::c_ulong) -> std::io::Result<()> {
    nix::mount::mount(
        Some(src),
        target,
        None::<&str>,
        nix::mount::MsFlags::from_bits_truncate(flags),
        None::<&str>,
    )
    .map_err(std::io::Error::from)
}

/// Makes `dir` a mount of its own, shared in a peer group of its own (private first: the
/// bind must not join its parent's peers).
pub fn setup(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    mount(dir, dir, libc::MS_BIND)?;
    let r = mount(Path::new("none"), dir, libc::MS_PRIVATE)
        .and_then(|_| mount(Path::new("none"), dir, libc::MS_SHARED));
    if let Err(e) = r {
        let _ = nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH);
        return Err(e);
    }
    Ok(())
}

/// Unbinds every entry, unmounts `dir` and removes it. False when something stays (then
/// nothing may remove the pod dir by path: a host source could still be bound below).
pub fn teardown(dir: &Path) -> bool {
    let Some(share) = PodShare::existing(dir) else {
        return true;
    };
    let clean = share.unbind_all();
    drop(share);
    if !clean {
        return false;
    }
    // As many binds of `dir` as there are (one; more after a crash in setup's retry).
    for _ in 0..8 {
        if !is_mount_point(dir) {
            break;
        }
        if let Err(e) = nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!(dir = %dir.display(), error = %e, "unmount the propagation dir");
            return false;
        }
    }
    if is_mount_point(dir) {
        return false;
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "remove the propagation dir");
            false
        }
    }
}

fn is_mount_point(dir: &Path) -> bool {
    let Ok(canon) = dir.canonicalize() else {
        return false;
    };
    mountinfo()
        .iter()
        .any(|m| Path::new(&m.mount_point) == canon)
}

struct MountEntry {
    mount_point: String,
    shared: bool,
}

fn mountinfo() -> Vec<MountEntry> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines().filter_map(parse_mountinfo).collect()
}

/// `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 shared:2 - ext3 /dev/root rw`
fn parse_mountinfo(line: &str) -> Option<MountEntry> {
    let fields: Vec<&str> = line.split(' ').collect();
    let mount_point = unescape(fields.get(4)?);
    let sep = fields.iter().position(|f| *f == "-")?;
    let shared = fields.get(6..sep)?.iter().any(|f| f.starts_with("shared:"));
    Some(MountEntry {
        mount_point,
        shared,
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount point `path` lies on, and whether that mount is shared (the last mount of
/// the longest matching mount point: the one on top).
fn mount_of(path: &Path) -> Option<(String, bool)> {
    let mut best: Option<(usize, String, bool)> = None;
    for m in mountinfo() {
        let mp = Path::new(&m.mount_point);
        if path.starts_with(mp) {
            let depth = mp.components().count();
            if best.as_ref().is_none_or(|(d, _, _)| depth >= *d) {
                best = Some((depth, m.mount_point.clone(), m.shared));
            }
        }
    }
    best.map(|(_, p, s)| (p, s))
}

fn invalid(msg: String) -> RuntimeError {
    RuntimeError::InvalidArgument(msg)
}

/// Checks a bidirectional volume as containerd does (its host source on a shared mount)
/// and as kubelet does (a privileged container).
pub fn validate(m: &cri::Mount, privileged: bool) -> Result<(), RuntimeError> {
    if !privileged {
        return Err(invalid(format!(
            "mount {} -> {}: bidirectional mount propagation is available only to \
             privileged containers",
            m.host_path, m.container_path
        )));
    }
    let canon = Path::new(&m.host_path)
        .canonicalize()
        .map_err(|e| invalid(format!("mount source {}: {e}", m.host_path)))?;
    match mount_of(&canon) {
        Some((_, true)) => Ok(()),
        Some((mp, false)) => Err(invalid(format!(
            "path {:?} is mounted on {mp:?} but it is not a shared mount: bidirectional \
             mount propagation needs a shared host source",
            m.host_path
        ))),
        None => Err(invalid(format!(
            "mount source {}: no mount found for it",
            m.host_path
        ))),
    }
}

/// For a husk-ns pod: binds each bidirectional CRI mount's source into the pod's
/// propagation dir and points the spec's mount for it at the agent's peer copy; sets the
/// rootfs propagation to `rshared` (as containerd does) when there is one. On error nothing
/// of `container`'s stays bound. Returns whether anything was bound.
pub fn bind_mounts(
    pod_dir: &Path,
    container: &str,
    mounts: &[cri::Mount],
    spec: &mut Spec,
) -> Result<bool, RuntimeError> {
    let bidi = |m: &cri::Mount| {
        m.propagation == cri::MountPropagation::PropagationBidirectional as i32
            && !m.host_path.is_empty()
    };
    if !mounts.iter().any(bidi) {
        return Ok(false);
    }
    let dir = host_dir(pod_dir);
    let share = PodShare::existing(&dir).ok_or_else(|| {
        RuntimeError::FailedPrecondition(format!(
            "this pod sandbox has no propagation dir ({}) for bidirectional volumes: it was \
             started by an older huskd",
            dir.display()
        ))
    })?;
    let agent = agent_dir(pod_dir);
    let mut specs = spec.mounts().clone().unwrap_or_default();
    for (n, m) in mounts.iter().enumerate().filter(|(_, m)| bidi(m)) {
        let hm = HostMount {
            host_path: m.host_path.clone(),
            container_path: m.container_path.clone(),
            readonly: m.readonly,
            propagation: m.propagation,
        };
        let entry = match share.bind_peer(container, n, &hm) {
            Ok(e) => e,
            Err(e) => {
                share.unbind_container(container);
                return Err(RuntimeError::InvalidArgument(e.to_string()));
            }
        };
        let dest = Path::new(&m.container_path);
        if let Some(sm) = specs.iter_mut().rev().find(|s| s.destination() == dest) {
            sm.set_source(Some(agent.join(&entry)));
        }
    }
    spec.set_mounts(Some(specs));
    let mut linux = spec.linux().clone().unwrap_or_default();
    linux.set_rootfs_propagation(Some("rshared".into()));
    spec.set_linux(Some(linux));
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_parse() {
        let m = parse_mountinfo(
            "36 35 98:0 /mnt1 /mnt\\040two rw,noatime master:1 shared:2 - ext3 /dev/root rw",
        )
        .unwrap();
        assert_eq!(m.mount_point, "/mnt two");
        assert!(m.shared);
        let m = parse_mountinfo("36 35 98:0 / /x rw master:1 - ext3 /dev/root rw").unwrap();
        assert!(!m.shared);
        assert!(parse_mountinfo("garbage").is_none());
    }

    #[test]
    fn the_root_mount_is_always_found() {
        assert!(mount_of(Path::new("/")).is_some());
    }
}
