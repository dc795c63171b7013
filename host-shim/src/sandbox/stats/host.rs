//! The host side of a pod: its host cgroup (for a VM pod the VMM and its
//! helpers, guest work included; for a namespace pod its containers), read
//! from cgroupfs v2 or the v1 controllers, as cAdvisor reads a pod cgroup.

use std::path::Path;

/// Readings of a pod's host cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostCgroup {
    pub cpu_ns: u64,
    pub memory_usage: u64,
    pub memory_working_set: u64,
    pub memory_rss: u64,
    pub memory_cache: u64,
    pub pids: u64,
}

fn read_u64(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

fn keyed(content: &str, key: &str) -> Option<u64> {
    content.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// The readings of cgroup `rel` (relative to the cgroup root) under `root`
/// (`/sys/fs/cgroup`); None when it does not exist. Blocking (cgroupfs reads).
pub fn read(root: &Path, rel: &str) -> Option<HostCgroup> {
    let rel = rel.trim_matches('/');
    if rel.is_empty() || rel.split('/').any(|c| c == ".." || c == ".") {
        return None;
    }
    if root.join("cgroup.controllers").exists() {
        let d = root.join(rel);
        let cpu = std::fs::read_to_string(d.join("cpu.stat")).ok()?;
        let mem = std::fs::read_to_string(d.join("memory.stat")).unwrap_or_default();
        let usage = read_u64(&d.join("memory.current")).unwrap_or(0);
        return Some(HostCgroup {
            cpu_ns: keyed(&cpu, "usage_usec").unwrap_or(0).saturating_mul(1000),
            memory_usage: usage,
            memory_working_set: usage.saturating_sub(keyed(&mem, "inactive_file").unwrap_or(0)),
            memory_rss: keyed(&mem, "anon").unwrap_or(0),
            memory_cache: keyed(&mem, "file").unwrap_or(0),
            pids: read_u64(&d.join("pids.current")).unwrap_or(0),
        });
    }
    let cpu_ns = read_u64(&root.join("cpuacct").join(rel).join("cpuacct.usage"))?;
    let m = root.join("memory").join(rel);
    let mem = std::fs::read_to_string(m.join("memory.stat")).unwrap_or_default();
    let usage = read_u64(&m.join("memory.usage_in_bytes")).unwrap_or(0);
    Some(HostCgroup {
        cpu_ns,
        memory_usage: usage,
        memory_working_set: usage.saturating_sub(keyed(&mem, "total_inactive_file").unwrap_or(0)),
        memory_rss: keyed(&mem, "total_rss").unwrap_or(0),
        memory_cache: keyed(&mem, "total_cache").unwrap_or(0),
        pids: read_u64(&root.join("pids").join(rel).join("pids.current")).unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_v1_and_v2_trees() {
        let v1 = tempfile::tempdir().unwrap();
        let w = |p: &str, c: &str| {
            let p = v1.path().join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, c).unwrap();
        };
        w("cpuacct/husk/p/cpuacct.usage", "123\n");
        w("memory/husk/p/memory.usage_in_bytes", "1000\n");
        w(
            "memory/husk/p/memory.stat",
            "cache 1\ntotal_cache 300\ntotal_rss 600\ntotal_inactive_file 200\n",
        );
        w("pids/husk/p/pids.current", "7\n");
        let h = read(v1.path(), "/husk/p").unwrap();
        assert_eq!(
            h,
            HostCgroup {
                cpu_ns: 123,
                memory_usage: 1000,
                memory_working_set: 800,
                memory_rss: 600,
                memory_cache: 300,
                pids: 7
            }
        );
        assert!(read(v1.path(), "husk/missing").is_none());
        assert!(read(v1.path(), "husk/../husk/p").is_none());
        assert!(read(v1.path(), "").is_none());

        let v2 = tempfile::tempdir().unwrap();
        std::fs::write(v2.path().join("cgroup.controllers"), "cpu memory pids").unwrap();
        let d = v2.path().join("husk/p");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("cpu.stat"), "usage_usec 5\nuser_usec 3\n").unwrap();
        std::fs::write(d.join("memory.current"), "900\n").unwrap();
        std::fs::write(
            d.join("memory.stat"),
            "anon 500\nfile 400\ninactive_file 100\n",
        )
        .unwrap();
        let h = read(v2.path(), "husk/p").unwrap();
        assert_eq!(
            (h.cpu_ns, h.memory_usage, h.memory_working_set, h.memory_rss),
            (5000, 900, 800, 500)
        );
    }
}
