//! Host memory a VM pod costs, split into the guest's RAM and the VMM's own overhead.
//!
//! Guest RAM is recognised by `MADV_DONTDUMP` (`dd` in the `VmFlags` of
//! `/proc/PID/smaps`): husk-vmm marks its guest RAM so, its vhost-user servers mark the
//! guest memory they map, and QEMU's memory backend gets `dump=off`. Everything else a
//! VM process has resident (heap, stacks, the binary and its libraries, QEMU's TCG code
//! cache) is overhead.
//!
//! A leaf (reads /proc only): the metrics inventory, the CRI verbose info and the
//! CLI's bench all read it.

use serde::Serialize;

/// Resident host memory of one pod's VM processes, in bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HostMemory {
    /// Guest RAM the guest has touched. Proportional (PSS), so memory that the VMM and a
    /// vhost-user server both map is counted once.
    pub guest_ram_bytes: u64,
    /// Everything else resident (RSS): an upper bound, shared libraries counted in full.
    pub overhead_rss_bytes: u64,
    /// Everything else, proportional: pages shared with other processes (libraries, the
    /// binary, other pods' VMMs) divided among them.
    pub overhead_pss_bytes: u64,
}

impl std::ops::Add for HostMemory {
    type Output = Self;
    fn add(self, o: Self) -> Self {
        Self {
            guest_ram_bytes: self.guest_ram_bytes + o.guest_ram_bytes,
            overhead_rss_bytes: self.overhead_rss_bytes + o.overhead_rss_bytes,
            overhead_pss_bytes: self.overhead_pss_bytes + o.overhead_pss_bytes,
        }
    }
}

/// Parses the text of `/proc/PID/smaps`.
pub fn parse_smaps(smaps: &str) -> HostMemory {
    let kib = |v: &str| {
        v.split_whitespace()
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    let mut m = HostMemory::default();
    let (mut rss, mut pss) = (0, 0);
    for l in smaps.lines() {
        if let Some(v) = l.strip_prefix("Rss:") {
            rss = kib(v);
        } else if let Some(v) = l.strip_prefix("Pss:") {
            pss = kib(v);
        } else if let Some(flags) = l.strip_prefix("VmFlags:") {
            // VmFlags closes a mapping's block.
            if flags.split_whitespace().any(|f| f == "dd") {
                m.guest_ram_bytes += pss;
            } else {
                m.overhead_rss_bytes += rss;
                m.overhead_pss_bytes += pss;
            }
            (rss, pss) = (0, 0);
        }
    }
    m
}

/// One process's memory; a process that is gone (or unreadable) counts as nothing.
pub fn of_process(pid: i32) -> HostMemory {
    std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .map(|s| parse_smaps(&s))
        .unwrap_or_default()
}

/// The sum over a pod's VM processes (the VMM and its helpers).
pub fn of_processes(pids: impl IntoIterator<Item = i32>) -> HostMemory {
    pids.into_iter()
        .map(of_process)
        .fold(HostMemory::default(), |a, b| a + b)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0000000-55d0c0100000 r-xp 00000000 08:01 42  /usr/bin/qemu-system-x86_64
Size:               1024 kB
Rss:                 800 kB
Pss:                 200 kB
VmFlags: rd ex mr mw me sd
7f1c0ffff000-7f1c13fff000 rw-s 00000000 00:01 1513  /memfd:memory-backend-memfd (deleted)
Size:              65536 kB
Rss:               40000 kB
Pss:               20000 kB
VmFlags: rd wr sh mr mw me ms dc dd hg
7f1c20000000-7f1c24000000 rw-p 00000000 00:00 0
Size:              65536 kB
Rss:                3000 kB
Pss:                3000 kB
VmFlags: rd wr mr mw me ac sd
";

    #[test]
    fn guest_ram_is_the_dontdump_mappings() {
        let m = parse_smaps(SMAPS);
        assert_eq!(m.guest_ram_bytes, 20000 << 10);
        assert_eq!(m.overhead_rss_bytes, 3800 << 10);
        assert_eq!(m.overhead_pss_bytes, 3200 << 10);
    }

    #[test]
    fn this_process_has_overhead_and_no_guest_ram() {
        let m = of_process(std::process::id() as i32);
        assert!(m.overhead_rss_bytes > 0, "{m:?}");
        assert!(m.overhead_pss_bytes <= m.overhead_rss_bytes, "{m:?}");
        assert_eq!(of_process(i32::MAX), HostMemory::default(), "a gone pid");
    }
}
