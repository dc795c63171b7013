//! ContainerStats, UpdateResources, ListProcesses.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use oci_spec::runtime::LinuxResources;

use crate::agent::Agent;
use crate::cgroup::Stats;
use crate::error::{AgentError, Result};

/// The writable layer walk stops after this many entries (the result is then a lower bound).
pub const LAYER_WALK_MAX_ENTRIES: u64 = 200_000;
/// ... or after this long.
pub const LAYER_WALK_MAX_TIME: Duration = Duration::from_millis(1000);
/// Directories held open at once (waiting to be walked); past that a
/// directory is not descended into and the result is a lower bound.
pub const LAYER_WALK_MAX_OPEN_DIRS: usize = 256;

/// Disk usage of a container's writable layer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerUsage {
    pub used_bytes: u64,
    pub inodes_used: u64,
    pub truncated: bool,
}

/// The container's cgroup readings and its writable layer's usage (None: no
/// overlay upper dir). The walk runs off the async executor.
pub async fn do_stats(agent: &Arc<Agent>, id: &str) -> Result<(Stats, Option<LayerUsage>)> {
    let c = agent.container(id)?;
    let upper = c.dir.join("upper");
    tokio::task::spawn_blocking(move || {
        let layer = upper.is_dir().then(|| layer_usage(&upper));
        (c.cgroup.stats(), layer)
    })
    .await
    .map_err(|e| AgentError::Io("stats task".into(), std::io::Error::other(e)))
}

/// du of `root` without following symlinks or leaving its filesystem: blocks
/// of every inode (hard links once) and the number of inodes, the root included.
/// Directories are opened relative to their parent with O_NOFOLLOW, so a
/// container swapping a directory for a symlink cannot lead the walk outside.
pub fn layer_usage(root: &Path) -> LayerUsage {
    use nix::dir::Dir;
    use nix::fcntl::{AtFlags, OFlag};
    use nix::sys::stat::{Mode, fstat, fstatat};

    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mut u = LayerUsage::default();
    let Ok(top) = Dir::open(root, flags, Mode::empty()) else {
        return u;
    };
    let Ok(st) = fstat(&top) else {
        return u;
    };
    let dev = st.st_dev;
    u.used_bytes = (st.st_blocks as u64).saturating_mul(512);
    u.inodes_used = 1;
    let started = Instant::now();
    let mut seen = HashSet::new();
    let mut stack = vec![top];
    let mut entries = 0u64;
    while let Some(mut dir) = stack.pop() {
        let budget = (LAYER_WALK_MAX_ENTRIES - entries + 1) as usize;
        let names: Vec<_> = dir
            .iter()
            .flatten()
            .map(|e| e.file_name().to_owned())
            .filter(|n| n.to_bytes() != b"." && n.to_bytes() != b"..")
            .take(budget)
            .collect();
        for name in names {
            entries += 1;
            if entries > LAYER_WALK_MAX_ENTRIES || started.elapsed() > LAYER_WALK_MAX_TIME {
                u.truncated = true;
                return u;
            }
            let Ok(st) = fstatat(&dir, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) else {
                continue;
            };
            if st.st_dev != dev {
                continue;
            }
            if st.st_nlink > 1 && !seen.insert(st.st_ino) {
                continue;
            }
            u.used_bytes = u
                .used_bytes
                .saturating_add((st.st_blocks as u64).saturating_mul(512));
            u.inodes_used += 1;
            if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
                continue;
            }
            if stack.len() >= LAYER_WALK_MAX_OPEN_DIRS {
                u.truncated = true;
            } else if let Ok(d) = Dir::openat(&dir, name.as_c_str(), flags, Mode::empty()) {
                stack.push(d);
            }
        }
    }
    u
}

/// One line of /proc/net/dev.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub rx_bytes: u64,
    pub rx_errors: u64,
    pub tx_bytes: u64,
    pub tx_errors: u64,
    pub rx_packets: u64,
    pub rx_dropped: u64,
    pub tx_packets: u64,
    pub tx_dropped: u64,
}

pub fn parse_net_dev(content: &str) -> Vec<Interface> {
    content
        .lines()
        .skip(2)
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let f: Vec<u64> = rest
                .split_whitespace()
                .map(|v| v.parse().unwrap_or(0))
                .collect();
            (f.len() >= 12).then(|| Interface {
                name: name.trim().to_string(),
                rx_bytes: f[0],
                rx_packets: f[1],
                rx_errors: f[2],
                rx_dropped: f[3],
                tx_bytes: f[8],
                tx_packets: f[9],
                tx_errors: f[10],
                tx_dropped: f[11],
            })
        })
        .collect()
}

/// Pod cgroup stats and the interfaces of the pod's network namespace.
pub fn do_sandbox_stats(agent: &Arc<Agent>, sandbox_id: &str) -> Result<(Stats, Vec<Interface>)> {
    let s = agent.sandbox()?;
    if s.id != sandbox_id {
        return Err(AgentError::NotFound(format!("sandbox {sandbox_id}")));
    }
    let net = std::fs::read_to_string(format!("/proc/{}/net/dev", s.holder_pid))
        .map_err(|e| AgentError::Io("read pod /proc/net/dev".into(), e))?;
    Ok((s.cgroup.stats(), parse_net_dev(&net)))
}

pub fn do_update(agent: &Arc<Agent>, id: &str, resources_json: &[u8]) -> Result<()> {
    let c = agent.container(id)?;
    let res: LinuxResources = serde_json::from_slice(resources_json)
        .map_err(|e| AgentError::InvalidArgument(format!("resources: {e}")))?;
    crate::cgroup::validate(&res).map_err(|e| AgentError::InvalidArgument(e.to_string()))?;
    c.cgroup.apply(&res)?;
    Ok(())
}

/// (host pid, cmdline) of every process in the container's cgroup.
pub fn do_list_processes(agent: &Arc<Agent>, id: &str) -> Result<Vec<(i32, String)>> {
    let c = agent.container(id)?;
    Ok(c.cgroup
        .pids()
        .into_iter()
        .map(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd: Vec<String> = cmd
                .split(|b| *b == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect();
            (pid, cmd.join(" "))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_dev_parses() {
        let c = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:    1234      10    1    0    0     0          0         0     5678      12    2    0    0     0       0          0
  eth0: 99 1 0 0 0 0 0 0 77 1 0 0 0 0 0 0
";
        let ifs = parse_net_dev(c);
        assert_eq!(ifs.len(), 2);
        assert_eq!(
            ifs[0],
            Interface {
                name: "lo".into(),
                rx_bytes: 1234,
                rx_errors: 1,
                tx_bytes: 5678,
                tx_errors: 2,
                rx_packets: 10,
                rx_dropped: 0,
                tx_packets: 12,
                tx_dropped: 0,
            }
        );
        assert_eq!(
            (ifs[1].name.as_str(), ifs[1].rx_bytes, ifs[1].tx_bytes),
            ("eth0", 99, 77)
        );
    }

    #[test]
    fn layer_usage_counts_blocks_inodes_and_hard_links_once() {
        let d = tempfile::tempdir().unwrap();
        let empty = layer_usage(d.path());
        assert_eq!(empty.inodes_used, 1);
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("sub/f"), vec![7u8; 1 << 20]).unwrap();
        std::fs::hard_link(d.path().join("sub/f"), d.path().join("g")).unwrap();
        // A symlink out of the tree is counted as itself, never followed.
        std::os::unix::fs::symlink("/usr", d.path().join("out")).unwrap();
        let u = layer_usage(d.path());
        assert_eq!(u.inodes_used, 4, "{u:?}"); // root, sub, f (= g), out
        assert!(u.used_bytes >= 1 << 20 && u.used_bytes < 3 << 20, "{u:?}");
        assert!(!u.truncated);
        assert_eq!(
            layer_usage(&d.path().join("missing")),
            LayerUsage::default()
        );
    }
}
