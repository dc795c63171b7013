//! The sandbox (pod): a namespace-holder process, the pod's /etc files,
//! its /dev/shm and extra mounts, and the cgroup parent of its containers.
//! This file holds the sandbox's state (what the agent's state holder keeps);
//! [`lifecycle`] creates, configures and destroys it.

pub mod lifecycle;
pub mod rehearsal;
pub mod spare;

use std::collections::HashMap;
use std::path::PathBuf;

use crate::reaper::ExitWatch;
use crate::runner::config::Ns;

/// Leaf cgroup of the namespace holder below the pod cgroup.
pub const PAUSE_CGROUP: &str = "pause";

/// What CreateSandbox asked for (wire types converted in rpc.rs).
#[derive(Debug, Clone, Default)]
pub struct SandboxConfig {
    pub id: String,
    pub hostname: String,
    pub dns_servers: Vec<String>,
    pub dns_searches: Vec<String>,
    pub dns_options: Vec<String>,
    pub hosts: String,
    pub new_net: bool,
    pub new_ipc: bool,
    pub new_uts: bool,
    pub new_pid: bool,
    /// Join this network namespace (wins over new_net).
    pub network_path: Option<PathBuf>,
    pub mounts: Vec<SandboxMount>,
    pub shm_size: u64,
    pub cgroup_parent: String,
    /// LinuxResources JSON for the pod cgroup (empty = none).
    pub resources: Vec<u8>,
    /// Spawn a holder of its own and leave the spare holder for the pod (a rehearsal).
    pub keep_spare: bool,
}

#[derive(Debug, Clone, Default)]
pub struct SandboxMount {
    pub name: String,
    pub source: String,
    pub fstype: String,
    pub options: Vec<String>,
}

pub struct Sandbox {
    pub id: String,
    pub dir: PathBuf,
    pub holder_pid: i32,
    holder_exit: ExitWatch,
    pub has_pid_ns: bool,
    pub cgroup_parent: PathBuf,
    /// The pod cgroup (parent of the containers' and the holder's).
    pub cgroup: crate::cgroup::Cgroup,
    /// Named mounts (including "shm") containers can refer to as "sandbox:NAME".
    pub mounts: HashMap<String, PathBuf>,
}

impl Sandbox {
    /// /proc/PID/ns/NAME of the holder: what containers join.
    pub fn ns_path(&self, ns: Ns) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/{}", self.holder_pid, ns.proc_name()))
    }

    pub fn etc_file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn alive(&self) -> bool {
        self.holder_exit.borrow().is_none()
    }
}

pub fn resolv_conf(c: &SandboxConfig) -> Option<String> {
    if c.dns_servers.is_empty() && c.dns_searches.is_empty() && c.dns_options.is_empty() {
        return None;
    }
    let mut s = String::new();
    for server in &c.dns_servers {
        s.push_str(&format!("nameserver {server}\n"));
    }
    if !c.dns_searches.is_empty() {
        s.push_str(&format!("search {}\n", c.dns_searches.join(" ")));
    }
    if !c.dns_options.is_empty() {
        s.push_str(&format!("options {}\n", c.dns_options.join(" ")));
    }
    Some(s)
}

pub fn hosts_file(c: &SandboxConfig) -> String {
    if !c.hosts.is_empty() {
        return c.hosts.clone();
    }
    let mut s = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    if !c.hostname.is_empty() {
        s.push_str(&format!("127.0.1.1\t{}\n", c.hostname));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etc_files() {
        let c = SandboxConfig {
            hostname: "web-0".into(),
            dns_servers: vec!["10.0.0.10".into()],
            dns_searches: vec!["ns.svc.cluster.local".into(), "svc.cluster.local".into()],
            dns_options: vec!["ndots:5".into()],
            ..Default::default()
        };
        assert_eq!(
            resolv_conf(&c).expect("resolv"),
            "nameserver 10.0.0.10\nsearch ns.svc.cluster.local svc.cluster.local\noptions ndots:5\n"
        );
        assert!(hosts_file(&c).contains("127.0.1.1\tweb-0\n"));
        assert_eq!(resolv_conf(&SandboxConfig::default()), None);
        let c = SandboxConfig {
            hosts: "1.2.3.4 x\n".into(),
            ..Default::default()
        };
        assert_eq!(hosts_file(&c), "1.2.3.4 x\n");
    }
}
