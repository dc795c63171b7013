//! Registry host configuration, the way containerd users know it:
//! `<config_path>/<registry>/hosts.toml` (or `_default/hosts.toml`) with
//! an optional `server` and `[host."scheme://name"]` mirrors tried in order.
//!
//! ```toml
//! server = "https://registry.example.com"
//! [host."http://127.0.0.1:5000"]
//!   capabilities = ["pull", "resolve"]
//!   skip_verify = false
//!   ca = "/etc/husk/certs.d/ca.pem"   # or a list
//! ```
//! Plain HTTP is used only for hosts configured with an `http://` URL.

use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum HostsError {
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
    #[error("{path}: bad host {host:?}: {why}")]
    BadHost {
        path: PathBuf,
        host: String,
        why: &'static str,
    },
    #[error("{path}: unknown capability {cap:?} (expected pull, resolve or push)")]
    BadCapability { path: PathBuf, cap: String },
}

/// One endpoint to try for a registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryHost {
    /// `host[:port]` to connect to.
    pub host: String,
    pub plain_http: bool,
    /// May fetch content by digest.
    pub pull: bool,
    /// May resolve tags to digests.
    pub resolve: bool,
    pub skip_verify: bool,
    /// PEM files with extra CA certificates.
    pub ca: Vec<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostsFile {
    server: Option<String>,
    capabilities: Option<Vec<String>>,
    skip_verify: Option<bool>,
    ca: Option<OneOrMany>,
    #[serde(default)]
    host: indexmap_like::OrderedHosts,
    // Accepted for compatibility; husk does not send extra headers yet.
    #[serde(default)]
    header: Option<toml::Table>,
    #[serde(default)]
    client: Option<toml::Value>,
    #[serde(default)]
    override_path: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostEntry {
    capabilities: Option<Vec<String>>,
    skip_verify: Option<bool>,
    ca: Option<OneOrMany>,
    #[serde(default)]
    header: Option<toml::Table>,
    #[serde(default)]
    client: Option<toml::Value>,
    #[serde(default)]
    override_path: Option<bool>,
}

mod indexmap_like {
    //! `[host."…"]` tables in file order (toml's `preserve_order`).
    use serde::Deserialize;

    #[derive(Debug, Default)]
    pub struct OrderedHosts(pub Vec<(String, super::HostEntry)>);

    impl<'de> Deserialize<'de> for OrderedHosts {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            let table = toml::Table::deserialize(d)?;
            let mut out = Vec::new();
            for (k, v) in table {
                let entry = super::HostEntry::deserialize(v).map_err(serde::de::Error::custom)?;
                out.push((k, entry));
            }
            Ok(Self(out))
        }
    }
}

/// The default upstream endpoint for a registry when nothing is configured.
fn default_host(registry: &str) -> RegistryHost {
    let host = if registry == "docker.io" {
        "registry-1.docker.io"
    } else {
        registry
    };
    RegistryHost {
        host: host.to_string(),
        plain_http: false,
        pull: true,
        resolve: true,
        skip_verify: false,
        ca: vec![],
    }
}

/// Endpoints for `registry`, mirrors first (in file order), then the server.
pub fn hosts_for(
    config_dir: Option<&Path>,
    registry: &str,
) -> Result<Vec<RegistryHost>, HostsError> {
    let Some(dir) = config_dir else {
        return Ok(vec![default_host(registry)]);
    };
    let mut path = dir.join(registry).join("hosts.toml");
    if !path.exists() {
        path = dir.join("_default").join("hosts.toml");
        if !path.exists() {
            return Ok(vec![default_host(registry)]);
        }
    }
    let text = std::fs::read_to_string(&path).map_err(|source| HostsError::Read {
        path: path.clone(),
        source,
    })?;
    let file: HostsFile = toml::from_str(&text).map_err(|source| HostsError::Parse {
        path: path.clone(),
        source,
    })?;
    let base = path.parent().unwrap_or(dir).to_path_buf();

    if file.client.is_some() || file.host.0.iter().any(|(_, e)| e.client.is_some()) {
        return Err(HostsError::BadHost {
            path: path.clone(),
            host: "client".into(),
            why: "TLS client certificates are not supported",
        });
    }
    if file.header.is_some() || file.host.0.iter().any(|(_, e)| e.header.is_some()) {
        tracing::warn!(path = %path.display(), "hosts.toml: custom headers are not supported and are ignored");
    }
    if file.override_path.is_some() || file.host.0.iter().any(|(_, e)| e.override_path.is_some()) {
        tracing::warn!(path = %path.display(), "hosts.toml: override_path is not supported and is ignored");
    }
    let mut out = Vec::new();
    for (url, entry) in file.host.0 {
        out.push(make_host(
            &path,
            &base,
            &url,
            entry.capabilities,
            entry.skip_verify,
            entry.ca,
        )?);
    }
    let server = match file.server {
        Some(url) => make_host(
            &path,
            &base,
            &url,
            file.capabilities,
            file.skip_verify,
            file.ca,
        )?,
        None => {
            let mut h = default_host(registry);
            h.skip_verify = file.skip_verify.unwrap_or(false);
            h.ca = resolve_ca(&base, file.ca);
            h
        }
    };
    out.push(server);
    Ok(out)
}

fn resolve_ca(base: &Path, ca: Option<OneOrMany>) -> Vec<PathBuf> {
    ca.map(OneOrMany::into_vec)
        .unwrap_or_default()
        .into_iter()
        .map(|p| {
            let p = PathBuf::from(p);
            if p.is_absolute() { p } else { base.join(p) }
        })
        .collect()
}

fn make_host(
    path: &Path,
    base: &Path,
    url: &str,
    caps: Option<Vec<String>>,
    skip_verify: Option<bool>,
    ca: Option<OneOrMany>,
) -> Result<RegistryHost, HostsError> {
    let bad = |why| HostsError::BadHost {
        path: path.to_path_buf(),
        host: url.to_string(),
        why,
    };
    let (plain_http, rest) = if let Some(r) = url.strip_prefix("http://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("https://") {
        (false, r)
    } else if url.contains("://") {
        return Err(bad("scheme must be http or https"));
    } else {
        (false, url)
    };
    let host = rest.split('/').next().unwrap_or("");
    let path_part = &rest[host.len()..];
    if host.is_empty() {
        return Err(bad("no host name"));
    }
    if !(path_part.is_empty() || path_part == "/" || path_part == "/v2" || path_part == "/v2/") {
        return Err(bad("path prefixes other than /v2 are not supported"));
    }
    let (mut pull, mut resolve) = (true, true);
    if let Some(caps) = caps {
        pull = false;
        resolve = false;
        for c in caps {
            match c.as_str() {
                "pull" => pull = true,
                "resolve" => resolve = true,
                "push" => {}
                _ => {
                    return Err(HostsError::BadCapability {
                        path: path.to_path_buf(),
                        cap: c,
                    });
                }
            }
        }
    }
    Ok(RegistryHost {
        host: host.to_string(),
        plain_http,
        pull,
        resolve,
        skip_verify: skip_verify.unwrap_or(false),
        ca: resolve_ca(base, ca),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, reg: &str, text: &str) {
        std::fs::create_dir_all(dir.join(reg)).unwrap();
        std::fs::write(dir.join(reg).join("hosts.toml"), text).unwrap();
    }

    #[test]
    fn defaults_without_config() {
        let h = hosts_for(None, "docker.io").unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].host, "registry-1.docker.io");
        assert!(!h[0].plain_http);
    }

    #[test]
    fn mirrors_in_order_then_server() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "example.com",
            r#"
server = "https://example.com"
[host."http://127.0.0.1:5001"]
  capabilities = ["pull"]
[host."https://mirror-b:443"]
  capabilities = ["pull", "resolve"]
  skip_verify = true
  ca = "ca.pem"
"#,
        );
        let h = hosts_for(Some(d.path()), "example.com").unwrap();
        let names: Vec<_> = h.iter().map(|h| h.host.as_str()).collect();
        assert_eq!(names, ["127.0.0.1:5001", "mirror-b:443", "example.com"]);
        assert!(h[0].plain_http && h[0].pull && !h[0].resolve);
        assert!(h[1].skip_verify && h[1].resolve);
        assert_eq!(h[1].ca, vec![d.path().join("example.com").join("ca.pem")]);
        // Other registries fall back to the built-in default.
        assert_eq!(
            hosts_for(Some(d.path()), "other.io").unwrap()[0].host,
            "other.io"
        );
    }

    #[test]
    fn default_dir_applies_to_all() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "_default", "server = \"http://localhost:5000\"\n");
        let h = hosts_for(Some(d.path()), "anything.io").unwrap();
        assert_eq!(h[0].host, "localhost:5000");
        assert!(h[0].plain_http);
    }

    #[test]
    fn bad_files_are_errors() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "a.io", "[host.\"ftp://x\"]\n");
        assert!(matches!(
            hosts_for(Some(d.path()), "a.io"),
            Err(HostsError::BadHost { .. })
        ));
        write(
            d.path(),
            "b.io",
            "[host.\"https://x\"]\ncapabilities = [\"fly\"]\n",
        );
        assert!(matches!(
            hosts_for(Some(d.path()), "b.io"),
            Err(HostsError::BadCapability { .. })
        ));
        write(d.path(), "c.io", "server = 3\n");
        assert!(matches!(
            hosts_for(Some(d.path()), "c.io"),
            Err(HostsError::Parse { .. })
        ));
    }
}
