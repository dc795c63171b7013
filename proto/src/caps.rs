//! The one table of Linux capabilities that huskd (OCI specs from the CRI) and
//! husk-agent (capset/prctl in the container) share, and the bounding set of
//! the calling process.
//!
//! "All capabilities" (a privileged container, or `ALL` in a CRI add list) means
//! what the process that starts the container holds, as in containerd: for a
//! namespace pod that is huskd's own bounding set (`CapBnd` in
//! /proc/self/status), so a host where root lacks a capability (say
//! CAP_SYS_RESOURCE in a nested container) still runs privileged containers; for
//! a VM pod it is the whole table, the guest kernel's full set (the guest kernel
//! is built from images/ with every capability of this table and husk-agent runs
//! as its unconfined PID 1).

/// Capability names by number (bit n of a mask = capability n), as in
/// `include/uapi/linux/capability.h` up to CAP_CHECKPOINT_RESTORE (Linux 5.9+).
pub const NAMES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// Every capability of the table as a mask.
pub const ALL: u64 = (1u64 << NAMES.len()) - 1;

/// The number of a capability named with or without the `CAP_` prefix, in any case.
pub fn number(name: &str) -> Option<usize> {
    let upper = name.to_ascii_uppercase();
    let full = upper.strip_prefix("CAP_").unwrap_or(&upper);
    NAMES.iter().position(|n| &n[4..] == full)
}

/// The canonical (`CAP_…`) name of a capability given with or without the prefix.
pub fn canonical(name: &str) -> Option<&'static str> {
    number(name).map(|n| NAMES[n])
}

/// The names of the capabilities of `mask` that the table knows, in number order.
pub fn names(mask: u64) -> Vec<&'static str> {
    NAMES
        .iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, n)| *n)
        .collect()
}

/// The `CapBnd` mask of a /proc/PID/status text.
pub fn bounding_from_status(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// The calling process's bounding set.
pub fn own_bounding() -> std::io::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    bounding_from_status(&status).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "/proc/self/status has no CapBnd line",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers() {
        assert_eq!(number("CAP_CHOWN"), Some(0));
        assert_eq!(number("net_admin"), Some(12));
        assert_eq!(number("Sys_Resource"), Some(24));
        assert_eq!(number("CAP_CHECKPOINT_RESTORE"), Some(40));
        assert_eq!(number("CAP_BOGUS"), None);
        assert_eq!(number("ALL"), None);
        assert_eq!(canonical("bpf"), Some("CAP_BPF"));
        assert_eq!(names(ALL).len(), NAMES.len());
        assert_eq!(names((1 << 5) | (1 << 39)), vec!["CAP_KILL", "CAP_BPF"]);
    }

    #[test]
    fn bounding_set_of_a_status_text() {
        let s = "Name:\tx\nCapInh:\t0000000000000000\nCapBnd:\t000001fffeffffff\nCapAmb:\t0\n";
        let m = bounding_from_status(s).expect("CapBnd");
        assert_eq!(m & (1 << 24), 0, "no CAP_SYS_RESOURCE");
        assert_ne!(m & (1 << 21), 0, "CAP_SYS_ADMIN");
        assert_eq!(bounding_from_status("Name: x\n"), None);
        assert!(own_bounding().is_ok());
    }
}
