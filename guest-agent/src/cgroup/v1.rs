//! cgroup v1: one directory per controller hierarchy.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use oci_spec::runtime::LinuxResources;

use super::{CgroupError, Result, Stats, io_device, keyed, read, read_u64, write};

const CONTROLLERS: [&str; 8] = [
    "cpu", "cpuacct", "cpuset", "memory", "pids", "blkio", "devices", "hugetlb",
];

/// Mount point of each controller we use.
#[derive(Debug, Clone, Default)]
pub struct V1 {
    pub mounts: BTreeMap<&'static str, PathBuf>,
}

#[derive(Debug, Clone)]
pub struct Cgroup {
    /// Directory per controller (controllers co-mounted share one).
    pub paths: BTreeMap<&'static str, PathBuf>,
}

impl V1 {
    pub fn from_mountinfo(mountinfo: &str) -> Self {
        let mut mounts = BTreeMap::new();
        for line in mountinfo.lines() {
            let Some((pre, post)) = line.split_once(" - ") else {
                continue;
            };
            let mut post = post.split_whitespace();
            if post.next() != Some("cgroup") {
                continue;
            }
            let opts = post.nth(1).unwrap_or_default();
            let Some(mount_point) = pre.split_whitespace().nth(4) else {
                continue;
            };
            for c in CONTROLLERS {
                if opts.split(',').any(|o| o == c) {
                    mounts.insert(c, PathBuf::from(mount_point));
                }
            }
        }
        Self { mounts }
    }

    pub fn is_empty(&self) -> bool {
        self.mounts.is_empty()
    }

    pub fn create(&self, rel: &Path) -> Result<Cgroup> {
        let mut paths = BTreeMap::new();
        for (c, mount) in &self.mounts {
            let dir = mount.join(rel);
            if *c == "cpuset" {
                // A new cpuset is empty: copy cpus/mems down level by level.
                let mut cur = mount.clone();
                for part in rel.components() {
                    let parent = cur.clone();
                    cur.push(part);
                    mkdir(&cur)?;
                    for f in ["cpuset.cpus", "cpuset.mems"] {
                        if read(&cur.join(f))
                            .map(|s| s.trim().is_empty())
                            .unwrap_or(false)
                        {
                            write(&cur.join(f), read(&parent.join(f))?.trim())?;
                        }
                    }
                }
            } else {
                mkdir(&dir)?;
            }
            paths.insert(*c, dir);
        }
        Ok(Cgroup { paths })
    }
}

fn mkdir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| CgroupError::Io {
        op: "mkdir",
        path: dir.display().to_string(),
        source,
    })
}

impl Cgroup {
    /// Distinct directories (co-mounted controllers appear once).
    pub fn dirs(&self) -> impl Iterator<Item = &PathBuf> {
        let mut seen: Vec<&PathBuf> = Vec::new();
        for p in self.paths.values() {
            if !seen.contains(&p) {
                seen.push(p);
            }
        }
        seen.into_iter()
    }

    fn file(&self, controller: &str, name: &str) -> Option<PathBuf> {
        self.paths.get(controller).map(|d| d.join(name))
    }

    fn set(&self, controller: &str, name: &str, value: &str) -> Result<()> {
        match self.file(controller, name) {
            Some(p) => write(&p, value),
            None => Ok(()),
        }
    }

    fn get(&self, controller: &str, name: &str) -> Option<u64> {
        read_u64(&self.file(controller, name)?)
    }

    pub fn apply(&self, res: &LinuxResources) -> Result<()> {
        if let Some(cpu) = res.cpu() {
            if let Some(shares) = cpu.shares().filter(|s| *s > 0) {
                self.set("cpu", "cpu.shares", &shares.to_string())?;
            }
            if let Some(period) = cpu.period().filter(|p| *p > 0) {
                self.set("cpu", "cpu.cfs_period_us", &period.to_string())?;
            }
            if let Some(quota) = cpu.quota() {
                self.set(
                    "cpu",
                    "cpu.cfs_quota_us",
                    &(if quota > 0 { quota } else { -1 }).to_string(),
                )?;
            }
            if let Some(cpus) = cpu.cpus().as_deref().filter(|s| !s.is_empty()) {
                self.set("cpuset", "cpuset.cpus", cpus)?;
            }
            if let Some(mems) = cpu.mems().as_deref().filter(|s| !s.is_empty()) {
                self.set("cpuset", "cpuset.mems", mems)?;
            }
        }
        if let Some(mem) = res.memory()
            && let Some(limit) = mem.limit()
        {
            let v = if limit > 0 { limit } else { -1 };
            self.set("memory", "memory.limit_in_bytes", &v.to_string())?;
            if let Some(swap) = mem.swap()
                && let Some(p) = self.file("memory", "memory.memsw.limit_in_bytes")
                && p.exists()
            {
                write(&p, &(if swap > 0 { swap } else { -1 }).to_string())?;
            }
        }
        if let Some(mem) = res.memory() {
            if let Some(r) = mem.reservation() {
                self.set(
                    "memory",
                    "memory.soft_limit_in_bytes",
                    &(if r > 0 { r } else { -1 }).to_string(),
                )?;
            }
            if let Some(sw) = mem.swappiness() {
                self.set("memory", "memory.swappiness", &sw.to_string())?;
            }
        }
        if let Some(pids) = res.pids() {
            let v = if pids.limit() > 0 {
                pids.limit().to_string()
            } else {
                "max".into()
            };
            self.set("pids", "pids.max", &v)?;
        }
        for h in res.hugepage_limits().iter().flatten() {
            match self.file(
                "hugetlb",
                &format!("hugetlb.{}.limit_in_bytes", h.page_size()),
            ) {
                Some(p) if p.exists() => write(&p, &h.limit().to_string())?,
                _ => {
                    tracing::warn!(page_size = %h.page_size(), "no hugetlb controller for this page size")
                }
            }
        }
        Ok(())
    }

    pub fn apply_devices(&self, rules: &[super::devices::DeviceRule]) -> Result<()> {
        for r in rules {
            self.set(
                "devices",
                if r.allow {
                    "devices.allow"
                } else {
                    "devices.deny"
                },
                &r.v1_line(),
            )?;
        }
        Ok(())
    }

    pub fn stats(&self) -> Stats {
        let text = |c: &str, f: &str| {
            self.file(c, f)
                .and_then(|p| std::fs::read_to_string(p).ok())
                .unwrap_or_default()
        };
        let mem_stat = text("memory", "memory.stat");
        let usage = self.get("memory", "memory.usage_in_bytes").unwrap_or(0);
        let inactive = keyed(&mem_stat, "total_inactive_file").unwrap_or(0);
        let mut devs = Vec::new();
        let (mut rd, mut wr) = (0, 0);
        // "MAJ:MIN Op value" lines; bytes first, then operation counts.
        for (file, bytes) in [
            ("blkio.throttle.io_service_bytes_recursive", true),
            ("blkio.throttle.io_serviced_recursive", false),
        ] {
            for line in text("blkio", file).lines() {
                let f: Vec<&str> = line.split_whitespace().collect();
                let [dev, op, v] = f.as_slice() else {
                    continue;
                };
                let v = v.parse::<u64>().unwrap_or(0);
                let i = io_device(&mut devs, dev);
                match (*op, bytes) {
                    ("Read", true) => {
                        rd += v;
                        if let Some(i) = i {
                            devs[i].read_bytes = v;
                        }
                    }
                    ("Write", true) => {
                        wr += v;
                        if let Some(i) = i {
                            devs[i].write_bytes = v;
                        }
                    }
                    ("Read", false) => {
                        if let Some(i) = i {
                            devs[i].reads = v;
                        }
                    }
                    ("Write", false) => {
                        if let Some(i) = i {
                            devs[i].writes = v;
                        }
                    }
                    _ => {}
                }
            }
        }
        let pids_limit = self
            .file("pids", "pids.max")
            .and_then(|p| std::fs::read_to_string(p).ok());
        // cpuacct.stat counts USER_HZ (100 Hz) ticks.
        let ticks = text("cpuacct", "cpuacct.stat");
        let tick_ns = |k: &str| keyed(&ticks, k).unwrap_or(0).saturating_mul(10_000_000);
        let cpu = text("cpu", "cpu.stat");
        let ms = |k: &str| keyed(&mem_stat, k).unwrap_or(0);
        Stats {
            cpu_usage_ns: self.get("cpuacct", "cpuacct.usage").unwrap_or(0),
            memory_usage: usage,
            memory_working_set: usage.saturating_sub(inactive),
            memory_limit: self.get("memory", "memory.limit_in_bytes").unwrap_or(0),
            pids_current: self.get("pids", "pids.current").unwrap_or(0),
            pids_limit: pids_limit.and_then(|s| s.trim().parse().ok()).unwrap_or(0),
            io_read_bytes: rd,
            io_write_bytes: wr,
            oom_kills: self.oom_kills(),
            cpu_user_ns: tick_ns("user"),
            cpu_system_ns: tick_ns("system"),
            cpu_nr_periods: keyed(&cpu, "nr_periods").unwrap_or(0),
            cpu_nr_throttled: keyed(&cpu, "nr_throttled").unwrap_or(0),
            cpu_throttled_ns: keyed(&cpu, "throttled_time").unwrap_or(0),
            memory_rss: ms("total_rss"),
            memory_cache: ms("total_cache"),
            memory_mapped_file: ms("total_mapped_file"),
            memory_swap: ms("total_swap"),
            memory_max_usage: self.get("memory", "memory.max_usage_in_bytes").unwrap_or(0),
            memory_pgfault: ms("total_pgfault"),
            memory_pgmajfault: ms("total_pgmajfault"),
            io_devices: devs,
        }
    }

    pub fn oom_kills(&self) -> u64 {
        self.file("memory", "memory.oom_control")
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|s| keyed(&s, "oom_kill"))
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
30 24 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
32 30 0:28 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
33 30 0:29 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
34 30 0:30 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
35 30 0:31 / /sys/fs/cgroup/net_cls,net_prio rw - cgroup cgroup rw,net_cls,net_prio
";

    #[test]
    fn finds_controllers_in_mountinfo() {
        let v1 = V1::from_mountinfo(MOUNTINFO);
        assert_eq!(
            v1.mounts.get("cpu"),
            Some(&PathBuf::from("/sys/fs/cgroup/cpu"))
        );
        assert_eq!(
            v1.mounts.get("memory"),
            Some(&PathBuf::from("/sys/fs/cgroup/memory"))
        );
        assert!(!v1.mounts.contains_key("pids"));
        assert_eq!(v1.mounts.len(), 3);
    }

    #[test]
    fn apply_and_stats_on_a_fake_tree() {
        let root = tempfile::tempdir().expect("tmp");
        let mut v1 = V1::default();
        for c in ["cpu", "cpuset", "memory", "pids"] {
            std::fs::create_dir_all(root.path().join(c)).expect("mkdir");
            v1.mounts.insert(c, root.path().join(c));
        }
        // cpuacct co-mounted with cpu.
        v1.mounts.insert("cpuacct", root.path().join("cpu"));
        std::fs::write(root.path().join("cpuset/cpuset.cpus"), "0-1\n").expect("w");
        std::fs::write(root.path().join("cpuset/cpuset.mems"), "0\n").expect("w");
        // Simulate the kernel's empty files in the first level.
        std::fs::create_dir_all(root.path().join("cpuset/husk")).expect("mkdir");
        std::fs::write(root.path().join("cpuset/husk/cpuset.cpus"), "").expect("w");
        std::fs::write(root.path().join("cpuset/husk/cpuset.mems"), "").expect("w");
        let cg = v1.create(Path::new("husk/c1")).expect("create");
        assert_eq!(
            std::fs::read_to_string(root.path().join("cpuset/husk/cpuset.cpus")).expect("r"),
            "0-1"
        );
        assert_eq!(cg.dirs().count(), 4);
        // Reservation and swappiness.
        let res: LinuxResources = serde_json::from_value(
            serde_json::json!({"memory": {"reservation": 1048576, "swappiness": 10}}),
        )
        .expect("res");
        cg.apply(&res).expect("apply");
        let r0 = |c: &str, f: &str| {
            std::fs::read_to_string(root.path().join(c).join("husk/c1").join(f)).expect(f)
        };
        assert_eq!(r0("memory", "memory.soft_limit_in_bytes"), "1048576");
        assert_eq!(r0("memory", "memory.swappiness"), "10");
        let res: LinuxResources = serde_json::from_value(serde_json::json!({
            "cpu": {"shares": 512, "quota": -1, "period": 100000},
            "memory": {"limit": 33554432}, "pids": {"limit": 0}
        }))
        .expect("res");
        cg.apply(&res).expect("apply");
        let r = |c: &str, f: &str| {
            std::fs::read_to_string(root.path().join(c).join("husk/c1").join(f)).expect(f)
        };
        assert_eq!(r("cpu", "cpu.shares"), "512");
        assert_eq!(r("cpu", "cpu.cfs_quota_us"), "-1");
        assert_eq!(r("memory", "memory.limit_in_bytes"), "33554432");
        assert_eq!(r("pids", "pids.max"), "max");
        std::fs::write(root.path().join("cpu/husk/c1/cpuacct.usage"), "12345\n").expect("w");
        std::fs::write(
            root.path().join("memory/husk/c1/memory.usage_in_bytes"),
            "4096\n",
        )
        .expect("w");
        std::fs::write(
            root.path().join("memory/husk/c1/memory.stat"),
            "cache 1\ntotal_inactive_file 1024\ntotal_rss 512\ntotal_pgmajfault 9\n",
        )
        .expect("w");
        std::fs::write(
            root.path().join("memory/husk/c1/memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
        )
        .expect("w");
        let s = cg.stats();
        assert_eq!(
            (
                s.cpu_usage_ns,
                s.memory_usage,
                s.memory_working_set,
                s.oom_kills
            ),
            (12345, 4096, 3072, 3)
        );
        assert_eq!((s.memory_rss, s.memory_pgmajfault), (512, 9));
    }
}
