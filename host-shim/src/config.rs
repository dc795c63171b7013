//! huskd configuration: `/etc/husk/config.toml` (or `huskd --config PATH`).
//! Every key is optional; defaults below.
//!
//! ```toml
//! socket = "/run/husk/huskd.sock"     # CRI gRPC socket (mode 0660)
//! state_dir = "/var/lib/husk"         # persistent state (images, pods)
//! run_dir = "/run/husk"               # runtime files
//! log_level = "info"                  # tracing filter; RUST_LOG overrides
//!
//! [image]
//! registry_config_dir = "/etc/husk/certs.d"   # <registry>/hosts.toml files
//! docker_config = "/root/.docker/config.json" # registry credentials
//! max_concurrent_downloads = 3
//!
//! [runtime]
//! default_handler = "husk"            # RuntimeClass handler used when the CRI names none
//! agent_binary = ""                   # husk-agent for husk-ns ("" = next to huskd, else $PATH)
//! cgroup_parent = "husk"              # pod cgroups: <cgroup_parent>/<pod id> unless the CRI gives one
//! agent_start_timeout_ms = 10000      # husk-ns: agent process up and answering
//! restrict_oom_score_adj = false      # clamp containers' oom_score_adj to huskd's own (hosts where
//!                                     # root lacks CAP_SYS_RESOURCE and cannot lower it)
//! # handler name -> sandbox kind ("vm" | "namespace"); these two are the defaults
//! [runtime.handlers]
//! husk = "vm"                         # VM sandbox (husk-vmm); not available yet
//! husk-ns = "namespace"               # namespace sandbox: container-level isolation, NOT a VM
//!
//! [network]
//! cni_conf_dir = "/etc/cni/net.d"     # first .conflist/.conf/.json (by name) is the pod network
//! cni_bin_dirs = ["/usr/lib/cni", "/opt/cni/bin"]  # where plugin binaries are looked up, in order
//! cni_timeout_ms = 120000             # one plugin run (ADD/DEL/CHECK)
//! ```

use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub const DEFAULT_CONFIG: &str = "/etc/husk/config.toml";
pub const DEFAULT_SOCKET: &str = "/run/husk/huskd.sock";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parse {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub log_level: String,
    pub image: ImageConfig,
    pub runtime: RuntimeConfig,
    pub network: NetworkConfig,
    pub streaming: StreamingConfig,
}

/// Pod networking with CNI plugins (see docs/networking.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    pub cni_conf_dir: PathBuf,
    pub cni_bin_dirs: Vec<PathBuf>,
    pub cni_timeout_ms: u64,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            cni_conf_dir: "/etc/cni/net.d".into(),
            cni_bin_dirs: vec!["/usr/lib/cni".into(), "/opt/cni/bin".into()],
            cni_timeout_ms: 120_000,
        }
    }
}

/// `[streaming]`: the server Exec/Attach/PortForward URLs point at.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamingConfig {
    /// host:port to listen on (port 0 = a random free port).
    pub address: String,
    /// How long a URL handed out by Exec/Attach/PortForward stays usable.
    pub token_ttl_secs: u64,
    /// Address put into the URLs (default: the bound address).
    pub advertise: Option<String>,
}

impl Default for StreamingConfig {
    fn default() -> Self {
        Self {
            address: "127.0.0.1:0".into(),
            token_ttl_secs: 60,
            advertise: None,
        }
    }
}

/// The kind of sandbox a RuntimeClass handler runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxKind {
    /// A husk-vmm microVM per pod.
    Vm,
    /// A husk-agent host process in fresh namespaces per pod (no VM).
    Namespace,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    pub default_handler: String,
    pub agent_binary: Option<PathBuf>,
    pub cgroup_parent: String,
    pub agent_start_timeout_ms: u64,
    pub restrict_oom_score_adj: bool,
    pub handlers: BTreeMap<String, SandboxKind>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            default_handler: "husk".into(),
            agent_binary: None,
            cgroup_parent: "husk".into(),
            agent_start_timeout_ms: 10_000,
            restrict_oom_score_adj: false,
            handlers: BTreeMap::from([
                ("husk".to_string(), SandboxKind::Vm),
                ("husk-ns".to_string(), SandboxKind::Namespace),
            ]),
        }
    }
}

impl RuntimeConfig {
    /// The sandbox kind of `handler` ("" = the default handler).
    pub fn resolve<'a>(&'a self, handler: &'a str) -> Option<(&'a str, SandboxKind)> {
        let name = if handler.is_empty() {
            self.default_handler.as_str()
        } else {
            handler
        };
        self.handlers.get(name).map(|k| (name, *k))
    }

    /// The husk-agent binary: configured, next to the running executable, or `husk-agent` on $PATH.
    pub fn agent_path(&self) -> PathBuf {
        if let Some(p) = self
            .agent_binary
            .as_ref()
            .filter(|p| !p.as_os_str().is_empty())
        {
            return p.clone();
        }
        if let Ok(exe) = std::env::current_exe()
            && let Some(dir) = exe.parent()
        {
            let p = dir.join("husk-agent");
            if p.exists() {
                return p;
            }
        }
        PathBuf::from("husk-agent")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageConfig {
    pub registry_config_dir: Option<PathBuf>,
    pub docker_config: Option<PathBuf>,
    pub max_concurrent_downloads: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            socket: DEFAULT_SOCKET.into(),
            state_dir: "/var/lib/husk".into(),
            run_dir: "/run/husk".into(),
            log_level: "info".into(),
            image: ImageConfig::default(),
            runtime: RuntimeConfig::default(),
            network: NetworkConfig::default(),
            streaming: StreamingConfig::default(),
        }
    }
}

impl Default for ImageConfig {
    fn default() -> Self {
        let docker = std::env::var_os("DOCKER_CONFIG")
            .map(|d| PathBuf::from(d).join("config.json"))
            .unwrap_or_else(|| PathBuf::from("/root/.docker/config.json"));
        Self {
            registry_config_dir: Some("/etc/husk/certs.d".into()),
            docker_config: Some(docker),
            max_concurrent_downloads: 3,
        }
    }
}

impl Config {
    /// Loads `path`; a missing default config file means all defaults, a
    /// missing explicitly named file is an error.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let (path, explicit) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG), false),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(Self::default());
            }
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        let cfg: Config =
            toml::from_str(&text).map_err(|source| ConfigError::Parse { path, source })?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.image.max_concurrent_downloads == 0 || self.image.max_concurrent_downloads > 64 {
            return Err(ConfigError::Invalid(
                "image.max_concurrent_downloads must be 1..=64".into(),
            ));
        }
        if !self
            .runtime
            .handlers
            .contains_key(&self.runtime.default_handler)
        {
            return Err(ConfigError::Invalid(format!(
                "runtime.default_handler {:?} is not in runtime.handlers",
                self.runtime.default_handler
            )));
        }
        if self.runtime.cgroup_parent.is_empty() || self.runtime.cgroup_parent.contains("..") {
            return Err(ConfigError::Invalid(
                "runtime.cgroup_parent must be a non-empty relative cgroup path".into(),
            ));
        }
        for (k, p) in [
            ("socket", &self.socket),
            ("state_dir", &self.state_dir),
            ("run_dir", &self.run_dir),
            ("network.cni_conf_dir", &self.network.cni_conf_dir),
        ] {
            if !p.is_absolute() {
                return Err(ConfigError::Invalid(format!(
                    "{k} must be an absolute path, got {}",
                    p.display()
                )));
            }
        }
        if let Some(p) = self.network.cni_bin_dirs.iter().find(|p| !p.is_absolute()) {
            return Err(ConfigError::Invalid(format!(
                "network.cni_bin_dirs must be absolute paths, got {}",
                p.display()
            )));
        }
        if self.network.cni_timeout_ms == 0 {
            return Err(ConfigError::Invalid(
                "network.cni_timeout_ms must be positive".into(),
            ));
        }
        Ok(())
    }

    pub fn pods_state_dir(&self) -> PathBuf {
        self.state_dir.join("pods")
    }

    pub fn images_dir(&self) -> PathBuf {
        self.state_dir.join("images")
    }

    /// Persisted pod network records (what CNI DEL needs after a crash).
    pub fn network_state_dir(&self) -> PathBuf {
        self.state_dir.join("network")
    }

    /// Bind-mounted pod network namespaces.
    pub fn netns_dir(&self) -> PathBuf {
        self.run_dir.join("netns")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.toml");
        std::fs::write(
            &p,
            "state_dir = \"/tmp/x\"\n[image]\nmax_concurrent_downloads = 5\n",
        )
        .unwrap();
        let c = Config::load(Some(&p)).unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(c.image.max_concurrent_downloads, 5);
        std::fs::write(
            &p,
            "[runtime]\ndefault_handler = \"husk-ns\"\n[runtime.handlers]\nhusk-ns = \"namespace\"\n",
        )
        .unwrap();
        let c = Config::load(Some(&p)).unwrap();
        assert_eq!(
            c.runtime.resolve(""),
            Some(("husk-ns", SandboxKind::Namespace))
        );
        assert_eq!(c.runtime.resolve("husk"), None);
        std::fs::write(&p, "[runtime]\ndefault_handler = \"nope\"\n").unwrap();
        assert!(matches!(
            Config::load(Some(&p)),
            Err(ConfigError::Invalid(_))
        ));
        let rd = RuntimeConfig::default();
        assert_eq!(rd.resolve(""), Some(("husk", SandboxKind::Vm)));
        assert_eq!(
            rd.resolve("husk-ns"),
            Some(("husk-ns", SandboxKind::Namespace))
        );
        std::fs::write(&p, "sockett = \"/x\"\n").unwrap();
        assert!(matches!(
            Config::load(Some(&p)),
            Err(ConfigError::Parse { .. })
        ));
        std::fs::write(&p, "socket = \"rel\"\n").unwrap();
        assert!(matches!(
            Config::load(Some(&p)),
            Err(ConfigError::Invalid(_))
        ));
        assert!(matches!(
            Config::load(Some(&d.path().join("missing"))),
            Err(ConfigError::Read { .. })
        ));
    }
}
