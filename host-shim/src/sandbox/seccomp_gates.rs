//! The capability gates of the RuntimeDefault seccomp profile. Docker's default profile,
//! which containerd's and husk's follow, refuses a syscall group only while the container
//! lacks the capability that governs it: a container granted CAP_SYS_ADMIN may `mount`, one
//! granted CAP_SYS_TIME may `settimeofday`, and so on (containerd's
//! `contrib/seccomp` adds the same groups for each capability in the bounding set).

use oci_spec::runtime::Capability;

/// Each capability and the syscalls of the deny list it unlocks.
const GATES: &[(Capability, &[&str])] = &[
    (Capability::DacReadSearch, &["open_by_handle_at"]),
    (
        Capability::SysAdmin,
        &[
            "bpf",
            "lookup_dcookie",
            "mount",
            "name_to_handle_at",
            "perf_event_open",
            "quotactl",
            "setns",
            "umount2",
            "unshare",
        ],
    ),
    (Capability::SysBoot, &["reboot"]),
    (
        Capability::SysModule,
        &[
            "delete_module",
            "init_module",
            "finit_module",
            "query_module",
        ],
    ),
    (Capability::SysPacct, &["acct"]),
    (
        Capability::SysPtrace,
        &["kcmp", "process_vm_readv", "process_vm_writev", "ptrace"],
    ),
    (Capability::SysRawio, &["iopl", "ioperm"]),
    (
        Capability::SysTime,
        &["settimeofday", "clock_settime", "clock_adjtime"],
    ),
    (Capability::Bpf, &["bpf"]),
    (Capability::Perfmon, &["perf_event_open"]),
];

/// `deny` without the syscalls a capability in `bounding` unlocks.
pub fn deny_list(deny: &[&'static str], bounding: &[Capability]) -> Vec<&'static str> {
    deny.iter()
        .copied()
        .filter(|name| {
            !GATES
                .iter()
                .any(|(cap, calls)| bounding.contains(cap) && calls.contains(name))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_granted_capability_unlocks_its_syscalls_only() {
        let deny = ["mount", "umount2", "reboot", "keyctl", "bpf"];
        assert_eq!(deny_list(&deny, &[]), deny);
        assert_eq!(
            deny_list(&deny, &[Capability::SysAdmin, Capability::Chown]),
            ["reboot", "keyctl"]
        );
        assert_eq!(
            deny_list(&deny, &[Capability::Bpf]),
            ["mount", "umount2", "reboot", "keyctl"]
        );
        // keyctl has no capability gate: never unlocked.
        let all = [
            Capability::SysAdmin,
            Capability::SysBoot,
            Capability::SysTime,
            Capability::Bpf,
        ];
        assert_eq!(deny_list(&deny, &all), ["keyctl"]);
    }
}
