//! cgroup management: v2 (the guest, where the agent mounts cgroup2) and v1
//! (hosts like the project's CI machine, used by the namespace sandbox). Two
//! real implementations behind one small enum.

pub mod bpf;
pub mod devices;
pub mod v1;
pub mod v2;

use std::path::{Path, PathBuf};

use oci_spec::runtime::LinuxResources;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no cgroup hierarchy found under {0}")]
    NotFound(String),
    #[error(transparent)]
    Bpf(bpf::BpfError),
    #[error("invalid resource value: {0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, CgroupError>;

pub(crate) fn write(path: &Path, value: &str) -> Result<()> {
    std::fs::write(path, value).map_err(|source| CgroupError::Io {
        op: "write",
        path: path.display().to_string(),
        source,
    })
}

pub(crate) fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| CgroupError::Io {
        op: "read",
        path: path.display().to_string(),
        source,
    })
}

pub(crate) fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Value of `key` in a flat-keyed file ("key value" lines).
pub(crate) fn keyed(content: &str, key: &str) -> Option<u64> {
    content.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next() == Some(key))
            .then(|| it.next()?.parse().ok())
            .flatten()
    })
}

pub(crate) fn rmdir_retry(path: &Path) -> Result<()> {
    for attempt in 0..50 {
        match std::fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempt < 49 => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(source) => {
                return Err(CgroupError::Io {
                    op: "rmdir",
                    path: path.display().to_string(),
                    source,
                });
            }
        }
    }
    Ok(())
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    pub cpu_usage_ns: u64,
    pub memory_usage: u64,
    pub memory_working_set: u64,
    pub memory_limit: u64,
    pub pids_current: u64,
    pub pids_limit: u64,
    pub io_read_bytes: u64,
    pub io_write_bytes: u64,
    pub oom_kills: u64,
    pub cpu_user_ns: u64,
    pub cpu_system_ns: u64,
    pub cpu_nr_periods: u64,
    pub cpu_nr_throttled: u64,
    pub cpu_throttled_ns: u64,
    pub memory_rss: u64,
    pub memory_cache: u64,
    pub memory_mapped_file: u64,
    pub memory_swap: u64,
    pub memory_max_usage: u64,
    pub memory_pgfault: u64,
    pub memory_pgmajfault: u64,
    pub io_devices: Vec<IoDevice>,
}

/// I/O of one block device, from io.stat (v2) or blkio (v1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IoDevice {
    pub major: u32,
    pub minor: u32,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub reads: u64,
    pub writes: u64,
}

/// At most this many devices are reported (the rest are summed into the totals only).
pub const MAX_IO_DEVICES: usize = 64;

/// The entry of device `maj:min` in `devs`, added when missing (up to [`MAX_IO_DEVICES`]).
pub(crate) fn io_device(devs: &mut Vec<IoDevice>, dev: &str) -> Option<usize> {
    let (maj, min) = dev.split_once(':')?;
    let (major, minor) = (maj.parse().ok()?, min.parse().ok()?);
    if let Some(i) = devs
        .iter()
        .position(|d| d.major == major && d.minor == minor)
    {
        return Some(i);
    }
    if devs.len() >= MAX_IO_DEVICES {
        return None;
    }
    devs.push(IoDevice {
        major,
        minor,
        ..Default::default()
    });
    Some(devs.len() - 1)
}

/// The cgroup hierarchy of this machine.
#[derive(Debug, Clone)]
pub enum Hierarchy {
    V1(v1::V1),
    V2(v2::V2),
}

impl Hierarchy {
    /// v2 when `root` is a cgroup2 mount, else v1 controllers from mountinfo.
    pub fn detect(root: &Path) -> Result<Self> {
        if root.join("cgroup.controllers").exists() {
            return Ok(Hierarchy::V2(v2::V2::new(root.to_path_buf())));
        }
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let v1 = v1::V1::from_mountinfo(&mountinfo);
        if v1.is_empty() {
            return Err(CgroupError::NotFound(root.display().to_string()));
        }
        Ok(Hierarchy::V1(v1))
    }

    pub fn version(&self) -> &'static str {
        match self {
            Hierarchy::V1(_) => "v1",
            Hierarchy::V2(_) => "v2",
        }
    }

    /// Create (or reuse) the cgroup at `rel` below the root.
    pub fn create(&self, rel: &Path) -> Result<Cgroup> {
        let rel = rel.strip_prefix("/").unwrap_or(rel);
        match self {
            Hierarchy::V1(h) => h.create(rel).map(Cgroup::V1),
            Hierarchy::V2(h) => h.create(rel).map(Cgroup::V2),
        }
    }
}

#[derive(Debug, Clone)]
pub enum Cgroup {
    V1(v1::Cgroup),
    V2(v2::Cgroup),
}

impl Cgroup {
    /// The file whose modification signals a memory event (an OOM kill among them):
    /// v2's `memory.events`; None on v1 (polled instead) or without the memory controller.
    pub fn memory_events_file(&self) -> Option<PathBuf> {
        match self {
            Cgroup::V1(_) => None,
            Cgroup::V2(c) => Some(c.dir.join("memory.events")).filter(|f| f.exists()),
        }
    }

    /// The cgroup.procs files a new process writes itself into.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        match self {
            Cgroup::V1(c) => c.dirs().map(|d| d.join("cgroup.procs")).collect(),
            Cgroup::V2(c) => vec![c.dir.join("cgroup.procs")],
        }
    }

    pub fn apply(&self, res: &LinuxResources) -> Result<()> {
        validate(res)?;
        if matches!(self, Cgroup::V1(_)) && res.unified().as_ref().is_some_and(|u| !u.is_empty()) {
            return Err(CgroupError::Invalid(
                "unified resources need cgroup v2".into(),
            ));
        }
        match self {
            Cgroup::V1(c) => c.apply(res),
            Cgroup::V2(c) => c.apply(res),
        }
    }

    /// Apply a device allow-list: v1 files, or a v2 eBPF program ([`bpf`]).
    pub fn apply_devices(&self, rules: &[devices::DeviceRule]) -> Result<()> {
        match self {
            Cgroup::V1(c) => c.apply_devices(rules),
            Cgroup::V2(c) => bpf::attach(&c.dir, rules).map_err(CgroupError::Bpf),
        }
    }

    pub fn stats(&self) -> Stats {
        match self {
            Cgroup::V1(c) => c.stats(),
            Cgroup::V2(c) => c.stats(),
        }
    }

    pub fn oom_kills(&self) -> u64 {
        match self {
            Cgroup::V1(c) => c.oom_kills(),
            Cgroup::V2(c) => c.oom_kills(),
        }
    }

    /// Pids in the cgroup (from the first hierarchy that has the file).
    pub fn pids(&self) -> Vec<i32> {
        self.procs_files()
            .iter()
            .find_map(|p| std::fs::read_to_string(p).ok())
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    pub fn destroy(&self) -> Result<()> {
        match self {
            Cgroup::V1(c) => c.dirs().try_for_each(|d| rmdir_retry(d)),
            Cgroup::V2(c) => rmdir_retry(&c.dir),
        }
    }
}

/// Reject values the kernel would take badly or silently clamp.
pub fn validate(res: &LinuxResources) -> Result<()> {
    if let Some(cpu) = res.cpu() {
        if let Some(shares) = cpu.shares()
            && !(2..=262_144).contains(&shares)
            && shares != 0
        {
            return Err(CgroupError::Invalid(format!(
                "cpu shares {shares} not in 2..=262144"
            )));
        }
        if let Some(period) = cpu.period()
            && period != 0
            && !(1000..=1_000_000).contains(&period)
        {
            return Err(CgroupError::Invalid(format!(
                "cpu period {period} not in 1000..=1000000"
            )));
        }
        if let Some(quota) = cpu.quota()
            && quota > 0
            && quota < 1000
        {
            return Err(CgroupError::Invalid(format!(
                "cpu quota {quota} below 1000"
            )));
        }
    }
    if let Some(mem) = res.memory() {
        if let Some(limit) = mem.limit()
            && limit > 0
            && limit < 4096
        {
            return Err(CgroupError::Invalid(format!(
                "memory limit {limit} below one page"
            )));
        }
        if let Some(sw) = mem.swappiness()
            && sw > 100
        {
            return Err(CgroupError::Invalid(format!("swappiness {sw} above 100")));
        }
    }
    for key in res.unified().iter().flatten().map(|(k, _)| k) {
        let reserved = [
            "cgroup.procs",
            "cgroup.threads",
            "cgroup.subtree_control",
            "cgroup.type",
        ];
        if key.is_empty()
            || key.contains('/')
            || key.starts_with('.')
            || reserved.contains(&key.as_str())
        {
            return Err(CgroupError::Invalid(format!("unified key {key:?}")));
        }
    }
    Ok(())
}

/// CRI shares (2..262144) to a cgroup v2 weight (1..10000), as runc does.
pub fn shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        100
    } else {
        1 + ((shares.saturating_sub(2)) * 9999) / 262_142
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_rejects_bad_values() {
        let res = |j| serde_json::from_value::<LinuxResources>(j).expect("res");
        assert!(validate(&res(serde_json::json!({"cpu": {"shares": 1}}))).is_err());
        assert!(validate(&res(serde_json::json!({"cpu": {"period": 10}}))).is_err());
        assert!(validate(&res(serde_json::json!({"cpu": {"quota": 5}}))).is_err());
        assert!(validate(&res(serde_json::json!({"memory": {"limit": 100}}))).is_err());
        assert!(
            validate(&res(
                serde_json::json!({"cpu": {"shares": 512, "quota": -1, "period": 100000},
            "memory": {"limit": 67108864}})
            ))
            .is_ok()
        );
    }

    #[test]
    fn weight_conversion_matches_runc() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
    }

    #[test]
    fn keyed_files_parse() {
        assert_eq!(
            keyed("low 0\nhigh 0\noom 2\noom_kill 1\n", "oom_kill"),
            Some(1)
        );
        assert_eq!(keyed("usage_usec 1500\n", "user_usec"), None);
    }
}
