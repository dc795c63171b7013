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
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

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
        for (k, p) in [
            ("socket", &self.socket),
            ("state_dir", &self.state_dir),
            ("run_dir", &self.run_dir),
        ] {
            if !p.is_absolute() {
                return Err(ConfigError::Invalid(format!(
                    "{k} must be an absolute path, got {}",
                    p.display()
                )));
            }
        }
        Ok(())
    }

    pub fn images_dir(&self) -> PathBuf {
        self.state_dir.join("images")
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
