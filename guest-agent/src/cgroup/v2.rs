//! cgroup v2 (unified hierarchy).

use std::path::{Path, PathBuf};

use oci_spec::runtime::LinuxResources;

use super::{CgroupError, Result, Stats, io_device, keyed, read_u64, shares_to_weight, write};

const CONTROLLERS: [&str; 5] = ["cpu", "cpuset", "memory", "pids", "io"];

#[derive(Debug, Clone)]
pub struct V2 {
    pub root: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Cgroup {
    pub dir: PathBuf,
}

impl V2 {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    pub fn create(&self, rel: &Path) -> Result<Cgroup> {
        let dir = self.root.join(rel);
        std::fs::create_dir_all(&dir).map_err(|source| CgroupError::Io {
            op: "mkdir",
            path: dir.display().to_string(),
            source,
        })?;
        // Delegate controllers down to the parent of the leaf.
        let mut cur = self.root.clone();
        let parts: Vec<_> = rel.components().collect();
        for part in parts
            .iter()
            .take(parts.len().saturating_sub(1))
            .map(|c| Some(*c))
            .chain([None])
        {
            let control = cur.join("cgroup.subtree_control");
            if let Ok(available) = std::fs::read_to_string(cur.join("cgroup.controllers")) {
                // Each write to subtree_control takes the cgroup lock and walks the subtree,
                // even for a controller already on: only the missing ones are written.
                let on = std::fs::read_to_string(&control).unwrap_or_default();
                for c in CONTROLLERS.iter().filter(|c| {
                    available.split_whitespace().any(|a| a == **c)
                        && !on.split_whitespace().any(|a| a == **c)
                }) {
                    // Best effort: a controller may be busy in a threaded subtree.
                    let _ = std::fs::write(&control, format!("+{c}"));
                }
            }
            match part {
                Some(p) => cur.push(p),
                None => break,
            }
        }
        Ok(Cgroup { dir })
    }
}

impl Cgroup {
    pub fn apply(&self, res: &LinuxResources) -> Result<()> {
        super::validate(res)?;
        let d = &self.dir;
        if let Some(cpu) = res.cpu() {
            if let Some(shares) = cpu.shares().filter(|s| *s > 0) {
                write(&d.join("cpu.weight"), &shares_to_weight(shares).to_string())?;
            }
            if cpu.quota().is_some() || cpu.period().is_some() {
                let period = cpu.period().filter(|p| *p > 0).unwrap_or(100_000);
                let quota = match cpu.quota() {
                    Some(q) if q > 0 => q.to_string(),
                    _ => "max".to_string(),
                };
                write(&d.join("cpu.max"), &format!("{quota} {period}"))?;
            }
            if let Some(cpus) = cpu.cpus().as_deref().filter(|s| !s.is_empty()) {
                write(&d.join("cpuset.cpus"), cpus)?;
            }
            if let Some(mems) = cpu.mems().as_deref().filter(|s| !s.is_empty()) {
                write(&d.join("cpuset.mems"), mems)?;
            }
        }
        if let Some(mem) = res.memory()
            && let Some(limit) = mem.limit()
        {
            let v = if limit > 0 {
                limit.to_string()
            } else {
                "max".into()
            };
            write(&d.join("memory.max"), &v)?;
            if let Some(swap) = mem.swap() {
                // OCI swap is memory+swap; v2 wants swap alone.
                let v = if swap > 0 && limit > 0 {
                    (swap - limit).max(0).to_string()
                } else {
                    "max".into()
                };
                let _ = write(&d.join("memory.swap.max"), &v);
            }
        }
        if let Some(r) = res.memory().as_ref().and_then(|m| m.reservation()) {
            write(
                &d.join("memory.low"),
                &(if r > 0 { r.to_string() } else { "0".into() }),
            )?;
        }
        if let Some(pids) = res.pids() {
            let v = if pids.limit() > 0 {
                pids.limit().to_string()
            } else {
                "max".into()
            };
            write(&d.join("pids.max"), &v)?;
        }
        for h in res.hugepage_limits().iter().flatten() {
            let p = d.join(format!("hugetlb.{}.max", h.page_size()));
            if p.exists() {
                write(&p, &h.limit().to_string())?;
            } else {
                tracing::warn!(page_size = %h.page_size(), "no hugetlb controller for this page size");
            }
        }
        // Raw cgroup v2 files (kubelet's MemoryQoS and friends); keys checked in validate().
        for (key, value) in res.unified().iter().flatten() {
            write(&d.join(key), value)?;
        }
        Ok(())
    }

    pub fn stats(&self) -> Stats {
        let d = &self.dir;
        let cpu = std::fs::read_to_string(d.join("cpu.stat")).unwrap_or_default();
        let mem_stat = std::fs::read_to_string(d.join("memory.stat")).unwrap_or_default();
        let usage = read_u64(&d.join("memory.current")).unwrap_or(0);
        let inactive = keyed(&mem_stat, "inactive_file").unwrap_or(0);
        let mut devs = Vec::new();
        let (mut rd, mut wr) = (0, 0);
        for line in std::fs::read_to_string(d.join("io.stat"))
            .unwrap_or_default()
            .lines()
        {
            let mut it = line.split_whitespace();
            let dev = it.next().and_then(|dev| io_device(&mut devs, dev));
            for kv in it {
                let Some((k, v)) = kv.split_once('=') else {
                    continue;
                };
                let v = v.parse::<u64>().unwrap_or(0);
                match k {
                    "rbytes" => rd += v,
                    "wbytes" => wr += v,
                    _ => {}
                }
                if let Some(i) = dev {
                    let e = &mut devs[i];
                    match k {
                        "rbytes" => e.read_bytes = v,
                        "wbytes" => e.write_bytes = v,
                        "rios" => e.reads = v,
                        "wios" => e.writes = v,
                        _ => {}
                    }
                }
            }
        }
        let ms = |k: &str| keyed(&mem_stat, k).unwrap_or(0);
        let cs = |k: &str| keyed(&cpu, k).unwrap_or(0);
        Stats {
            cpu_usage_ns: cs("usage_usec") * 1000,
            memory_usage: usage,
            memory_working_set: usage.saturating_sub(inactive),
            memory_limit: read_u64(&d.join("memory.max")).unwrap_or(0),
            pids_current: read_u64(&d.join("pids.current")).unwrap_or(0),
            pids_limit: read_u64(&d.join("pids.max")).unwrap_or(0),
            io_read_bytes: rd,
            io_write_bytes: wr,
            oom_kills: self.oom_kills(),
            cpu_user_ns: cs("user_usec") * 1000,
            cpu_system_ns: cs("system_usec") * 1000,
            cpu_nr_periods: cs("nr_periods"),
            cpu_nr_throttled: cs("nr_throttled"),
            cpu_throttled_ns: cs("throttled_usec") * 1000,
            memory_rss: ms("anon"),
            memory_cache: ms("file"),
            memory_mapped_file: ms("file_mapped"),
            memory_swap: read_u64(&d.join("memory.swap.current")).unwrap_or(0),
            memory_max_usage: read_u64(&d.join("memory.peak")).unwrap_or(0),
            memory_pgfault: ms("pgfault"),
            memory_pgmajfault: ms("pgmajfault"),
            io_devices: devs,
        }
    }

    pub fn oom_kills(&self) -> u64 {
        let events = std::fs::read_to_string(self.dir.join("memory.events")).unwrap_or_default();
        keyed(&events, "oom_kill").unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_and_stats_on_a_fake_tree() {
        let root = tempfile::tempdir().expect("tmp");
        std::fs::write(root.path().join("cgroup.controllers"), "cpu memory pids").expect("w");
        let h = V2::new(root.path().to_path_buf());
        let cg = h.create(Path::new("husk/pod/c1")).expect("create");
        assert_eq!(
            std::fs::read_to_string(root.path().join("cgroup.subtree_control")).expect("r"),
            "+pids"
        );
        // Controllers already on are not written again (each write walks the subtree).
        std::fs::write(
            root.path().join("cgroup.subtree_control"),
            "cpu memory pids",
        )
        .expect("w");
        h.create(Path::new("husk/pod/c2")).expect("create");
        assert_eq!(
            std::fs::read_to_string(root.path().join("cgroup.subtree_control")).expect("r"),
            "cpu memory pids"
        );
        let res: LinuxResources = serde_json::from_value(serde_json::json!({
            "cpu": {"shares": 1024, "quota": 50000, "period": 100000, "cpus": "0"},
            "memory": {"limit": 67108864}, "pids": {"limit": 64}
        }))
        .expect("res");
        cg.apply(&res).expect("apply");
        let r = |f: &str| std::fs::read_to_string(cg.dir.join(f)).expect(f);
        assert_eq!(r("cpu.weight"), "39");
        assert_eq!(r("cpu.max"), "50000 100000");
        assert_eq!(r("memory.max"), "67108864");
        assert_eq!(r("pids.max"), "64");
        assert_eq!(r("cpuset.cpus"), "0");
        let res: LinuxResources = serde_json::from_value(serde_json::json!({
            "memory": {"reservation": 4096}, "unified": {"memory.high": "1000000"}
        }))
        .expect("res");
        cg.apply(&res).expect("apply");
        assert_eq!(r("memory.low"), "4096");
        assert_eq!(r("memory.high"), "1000000");
        let bad: LinuxResources =
            serde_json::from_value(serde_json::json!({"unified": {"../x": "1"}})).expect("res");
        assert!(matches!(cg.apply(&bad), Err(CgroupError::Invalid(_))));
        let bad: LinuxResources =
            serde_json::from_value(serde_json::json!({"unified": {"cgroup.procs": "1"}}))
                .expect("res");
        assert!(matches!(cg.apply(&bad), Err(CgroupError::Invalid(_))));
        std::fs::write(cg.dir.join("cpu.stat"), "usage_usec 2000\nuser_usec 1\n").expect("w");
        std::fs::write(cg.dir.join("memory.current"), "1000\n").expect("w");
        std::fs::write(cg.dir.join("memory.stat"), "anon 1\ninactive_file 300\n").expect("w");
        std::fs::write(cg.dir.join("memory.events"), "oom 1\noom_kill 2\n").expect("w");
        std::fs::write(
            cg.dir.join("io.stat"),
            "8:0 rbytes=10 wbytes=20 rios=1\n8:16 rbytes=1 wbytes=2\n",
        )
        .expect("w");
        let s = cg.stats();
        assert_eq!(
            (s.cpu_usage_ns, s.memory_usage, s.memory_working_set),
            (2_000_000, 1000, 700)
        );
        assert_eq!(
            (s.io_read_bytes, s.io_write_bytes, s.oom_kills, s.pids_limit),
            (11, 22, 2, 64)
        );
        assert_eq!((s.cpu_user_ns, s.memory_rss), (1000, 1));
        assert_eq!(
            s.io_devices[0],
            crate::cgroup::IoDevice {
                major: 8,
                minor: 0,
                read_bytes: 10,
                write_bytes: 20,
                reads: 1,
                writes: 0
            }
        );
        assert_eq!((s.io_devices[1].minor, s.io_devices.len()), (16, 2));
    }
}
