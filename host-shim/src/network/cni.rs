//! The CNI protocol as a runtime speaks it: network configuration lists
//! from a directory, plugin binaries executed with the `CNI_*` environment
//! and the config on stdin, results and errors parsed from stdout.
//! Spec versions 0.3.0 to 1.1.0 (chained lists with `prevResult`); CHECK
//! from 0.4.0 on.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::io::AsyncWriteExt;

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("no network config found in {0}")]
    NoConfig(PathBuf),
    #[error("network config {path}: {msg}")]
    BadConfig { path: PathBuf, msg: String },
    #[error("cni plugin {plugin:?} not found in {dirs}")]
    PluginNotFound { plugin: String, dirs: String },
    #[error("cni plugin {plugin} {command}: {msg}")]
    Plugin {
        plugin: String,
        command: &'static str,
        msg: String,
    },
    #[error("cni plugin {plugin} {command}: timed out after {secs}s")]
    Timeout {
        plugin: String,
        command: &'static str,
        secs: u64,
    },
    #[error("cni plugin {plugin}: {source}")]
    Exec {
        plugin: String,
        #[source]
        source: std::io::Error,
    },
}

/// One network configuration list (a `.conf` file is wrapped into one).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConfList {
    /// Where it was read from.
    pub file: PathBuf,
    pub name: String,
    pub cni_version: String,
    pub disable_check: bool,
    /// Each plugin's config object as written.
    pub plugins: Vec<Map<String, Value>>,
}

/// Spec versions this runtime accepts.
const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

fn version(v: &str) -> (u32, u32, u32) {
    let mut it = v.split('.').map(|p| p.parse().unwrap_or(0));
    (
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
    )
}

impl ConfList {
    /// Parses a `.conflist` (`plugins` array) or a single-plugin `.conf`.
    pub fn parse(file: &Path, text: &[u8]) -> Result<Self, CniError> {
        let bad = |msg: String| CniError::BadConfig {
            path: file.to_path_buf(),
            msg,
        };
        let v: Value = serde_json::from_slice(text).map_err(|e| bad(e.to_string()))?;
        let obj = v
            .as_object()
            .ok_or_else(|| bad("not a JSON object".into()))?;
        let s = |k: &str| obj.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let name = s("name");
        let cni_version = s("cniVersion");
        if name.is_empty() {
            return Err(bad("\"name\" is required".into()));
        }
        if !SUPPORTED.contains(&cni_version.as_str()) {
            return Err(bad(format!(
                "cniVersion {cni_version:?} is not supported (supported: {})",
                SUPPORTED.join(", ")
            )));
        }
        let plugins: Vec<Map<String, Value>> = match obj.get("plugins") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|p| {
                    p.as_object()
                        .cloned()
                        .ok_or_else(|| bad("a plugin is not an object".into()))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(bad("\"plugins\" must be an array".into())),
            None if obj.contains_key("type") => vec![obj.clone()],
            None => return Err(bad("neither \"plugins\" nor \"type\"".into())),
        };
        if plugins.is_empty() {
            return Err(bad("\"plugins\" is empty".into()));
        }
        for p in &plugins {
            let t = p.get("type").and_then(Value::as_str).unwrap_or("");
            if t.is_empty() || t.contains('/') || t.starts_with('.') {
                return Err(bad(format!("bad plugin type {t:?}")));
            }
        }
        let disable_check = match obj.get("disableCheck") {
            Some(Value::Bool(b)) => *b,
            Some(Value::String(s)) => s == "true",
            _ => false,
        };
        Ok(Self {
            file: file.to_path_buf(),
            name,
            cni_version,
            disable_check,
            plugins,
        })
    }

    /// The lexicographically first valid config in `dir` (`.conflist`,
    /// `.conf`, `.json`), as containerd picks it. Invalid files are skipped
    /// with a warning.
    pub fn load_dir(dir: &Path) -> Result<Self, CniError> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.is_file()
                    && matches!(
                        p.extension().and_then(|e| e.to_str()),
                        Some("conflist" | "conf" | "json")
                    )
            })
            .collect();
        files.sort();
        for f in files {
            match std::fs::read(&f)
                .map_err(|e| CniError::BadConfig {
                    path: f.clone(),
                    msg: e.to_string(),
                })
                .and_then(|t| Self::parse(&f, &t))
            {
                Ok(c) => return Ok(c),
                Err(e) => tracing::warn!(error = %e, "skipping cni config"),
            }
        }
        Err(CniError::NoConfig(dir.to_path_buf()))
    }

    pub fn plugin_types(&self) -> impl Iterator<Item = &str> {
        self.plugins
            .iter()
            .map(|p| p.get("type").and_then(Value::as_str).unwrap_or(""))
    }

    fn supports_check(&self) -> bool {
        !self.disable_check && version(&self.cni_version) >= (0, 4, 0)
    }

    /// The stdin of one plugin: its config plus the list's name and
    /// version, the runtime config its capabilities ask for, and the
    /// previous result.
    fn plugin_input(
        &self,
        plugin: &Map<String, Value>,
        caps: &Map<String, Value>,
        prev: Option<&Value>,
    ) -> Vec<u8> {
        let mut conf = plugin.clone();
        conf.insert("name".into(), Value::String(self.name.clone()));
        conf.insert("cniVersion".into(), Value::String(self.cni_version.clone()));
        let wanted: Map<String, Value> = match plugin.get("capabilities") {
            Some(Value::Object(c)) => caps
                .iter()
                .filter(|(k, _)| c.get(*k) == Some(&Value::Bool(true)))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            _ => Map::new(),
        };
        if !wanted.is_empty() {
            conf.insert("runtimeConfig".into(), Value::Object(wanted));
        }
        if let Some(p) = prev {
            conf.insert("prevResult".into(), p.clone());
        }
        serde_json::to_vec(&Value::Object(conf)).unwrap_or_default()
    }
}

/// What a runtime tells the plugins about one attachment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attachment {
    pub container_id: String,
    pub netns: PathBuf,
    pub ifname: String,
    /// `CNI_ARGS` pairs.
    pub args: Vec<(String, String)>,
    /// Runtime config by capability name (portMappings, bandwidth, dns, ipRanges).
    pub capability_args: Map<String, Value>,
}

/// Runs plugins found in `bin_dirs`.
#[derive(Debug, Clone)]
pub struct Plugins {
    pub bin_dirs: Vec<PathBuf>,
    pub timeout: Duration,
}

impl Plugins {
    pub fn find(&self, plugin: &str) -> Result<PathBuf, CniError> {
        self.bin_dirs
            .iter()
            .map(|d| d.join(plugin))
            .find(|p| p.is_file())
            .ok_or_else(|| CniError::PluginNotFound {
                plugin: plugin.to_string(),
                dirs: self.path_env(),
            })
    }

    fn path_env(&self) -> String {
        self.bin_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(":")
    }

    /// ADD through the list; the last plugin's result.
    pub async fn add(&self, list: &ConfList, att: &Attachment) -> Result<Value, CniError> {
        let mut prev: Option<Value> = None;
        for p in &list.plugins {
            let out = self
                .exec(
                    p,
                    "ADD",
                    att,
                    list.plugin_input(p, &att.capability_args, prev.as_ref()),
                )
                .await?;
            let plugin = plugin_type(p);
            let v: Value = serde_json::from_slice(&out).map_err(|e| CniError::Plugin {
                plugin: plugin.clone(),
                command: "ADD",
                msg: format!("bad result: {e}"),
            })?;
            prev = Some(v);
        }
        Ok(prev.unwrap_or(Value::Null))
    }

    /// DEL through the list in reverse. Every plugin runs even when one
    /// fails (DEL is idempotent; a retry redoes them all); the first error
    /// is returned.
    pub async fn del(
        &self,
        list: &ConfList,
        att: &Attachment,
        result: Option<&Value>,
    ) -> Result<(), CniError> {
        let prev = result.filter(|_| version(&list.cni_version) >= (0, 4, 0));
        let mut first = None;
        for p in list.plugins.iter().rev() {
            let input = list.plugin_input(p, &att.capability_args, prev);
            if let Err(e) = self.exec(p, "DEL", att, input).await {
                tracing::warn!(error = %e, "cni DEL");
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// CHECK through the list; `Ok(false)` when the version or the list
    /// does not support it.
    pub async fn check(
        &self,
        list: &ConfList,
        att: &Attachment,
        result: &Value,
    ) -> Result<bool, CniError> {
        if !list.supports_check() {
            return Ok(false);
        }
        for p in &list.plugins {
            let input = list.plugin_input(p, &att.capability_args, Some(result));
            self.exec(p, "CHECK", att, input).await?;
        }
        Ok(true)
    }

    async fn exec(
        &self,
        plugin: &Map<String, Value>,
        command: &'static str,
        att: &Attachment,
        stdin: Vec<u8>,
    ) -> Result<Vec<u8>, CniError> {
        let name = plugin_type(plugin);
        let bin = self.find(&name)?;
        let args = att
            .args
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(";");
        // The plugins inherit huskd's environment: portmap and bridge run iptables from $PATH.
        let mut child = tokio::process::Command::new(&bin)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &att.container_id)
            .env("CNI_NETNS", &att.netns)
            .env("CNI_IFNAME", &att.ifname)
            .env("CNI_ARGS", args)
            .env("CNI_PATH", self.path_env())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| CniError::Exec {
                plugin: name.clone(),
                source,
            })?;
        let mut input = child.stdin.take();
        let run = async {
            if let Some(i) = input.as_mut() {
                i.write_all(&stdin).await?;
            }
            drop(input);
            child.wait_with_output().await
        };
        let out = match tokio::time::timeout(self.timeout, run).await {
            Ok(r) => r.map_err(|source| CniError::Exec {
                plugin: name.clone(),
                source,
            })?,
            Err(_) => {
                return Err(CniError::Timeout {
                    plugin: name,
                    command,
                    secs: self.timeout.as_secs(),
                });
            }
        };
        tracing::debug!(plugin = %name, command, status = ?out.status.code(), "cni plugin ran");
        if out.status.success() {
            return Ok(out.stdout);
        }
        Err(CniError::Plugin {
            plugin: name,
            command,
            msg: error_message(&out.stdout, &out.stderr, out.status),
        })
    }
}

fn plugin_type(p: &Map<String, Value>) -> String {
    p.get("type")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

/// A plugin's error: the spec's `{code, msg, details}` on stdout, else stderr.
fn error_message(stdout: &[u8], stderr: &[u8], status: std::process::ExitStatus) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(stdout)
        && let Some(msg) = v.get("msg").and_then(Value::as_str)
    {
        let code = v.get("code").and_then(Value::as_u64).unwrap_or(0);
        return match v
            .get("details")
            .and_then(Value::as_str)
            .filter(|d| !d.is_empty())
        {
            Some(d) => format!("{msg}: {d} (code {code})"),
            None => format!("{msg} (code {code})"),
        };
    }
    let err = String::from_utf8_lossy(stderr).trim().to_string();
    if err.is_empty() {
        format!("exited with {status}")
    } else {
        err
    }
}

/// The parts of a CNI result (0.3.0 to 1.1.0) a runtime uses.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct CniResult {
    pub interfaces: Vec<ResultInterface>,
    pub ips: Vec<ResultIp>,
    pub routes: Vec<ResultRoute>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ResultInterface {
    pub name: String,
    pub mac: String,
    pub mtu: u32,
    pub sandbox: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ResultIp {
    /// CIDR: the address with its prefix length.
    pub address: String,
    pub gateway: String,
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ResultRoute {
    pub dst: String,
    pub gw: String,
}

impl CniResult {
    pub fn parse(v: &Value) -> Self {
        serde_json::from_value(v.clone()).unwrap_or_default()
    }

    /// The addresses (CIDR) of the interfaces inside the sandbox (those
    /// without an interface index count too).
    pub fn sandbox_ips(&self) -> Vec<&ResultIp> {
        self.ips
            .iter()
            .filter(
                |ip| match ip.interface.and_then(|i| self.interfaces.get(i)) {
                    Some(iface) => !iface.sandbox.is_empty(),
                    None => true,
                },
            )
            .collect()
    }

    /// The pod's IPs (no prefix), IPv4 first as containerd orders them.
    pub fn pod_ips(&self) -> Vec<String> {
        let mut ips: Vec<String> = self
            .sandbox_ips()
            .iter()
            .filter_map(|ip| ip.address.split('/').next().map(str::to_string))
            .filter(|a| !a.is_empty())
            .collect();
        ips.sort_by_key(|a| a.contains(':'));
        ips
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn conflist_and_conf_and_order() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(
            ConfList::load_dir(d.path()),
            Err(CniError::NoConfig(_))
        ));
        std::fs::write(
            d.path().join("20-b.conf"),
            r#"{"cniVersion":"0.4.0","name":"b","type":"bridge"}"#,
        )
        .unwrap();
        std::fs::write(d.path().join("10-bad.conflist"), "{").unwrap();
        std::fs::write(d.path().join("05-ignored.txt"), "{}").unwrap();
        let c = ConfList::load_dir(d.path()).unwrap();
        assert_eq!((c.name.as_str(), c.plugins.len()), ("b", 1));
        assert!(c.supports_check());
        std::fs::write(
            d.path().join("15-a.conflist"),
            r#"{"cniVersion":"0.3.1","name":"a","plugins":[{"type":"bridge"},{"type":"portmap","capabilities":{"portMappings":true}}]}"#,
        )
        .unwrap();
        let c = ConfList::load_dir(d.path()).unwrap();
        assert_eq!(c.name, "a");
        assert_eq!(c.plugin_types().collect::<Vec<_>>(), ["bridge", "portmap"]);
        assert!(!c.supports_check());
        for bad in [
            r#"{"cniVersion":"0.2.0","name":"x","type":"bridge"}"#,
            r#"{"cniVersion":"1.0.0","name":"x","plugins":[]}"#,
            r#"{"cniVersion":"1.0.0","name":"x","plugins":[{"type":"../sh"}]}"#,
            r#"{"cniVersion":"1.0.0","plugins":[{"type":"bridge"}]}"#,
        ] {
            assert!(
                ConfList::parse(Path::new("x"), bad.as_bytes()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn plugin_input_filters_capabilities() {
        let c = ConfList::parse(
            Path::new("x"),
            br#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"},{"type":"portmap","capabilities":{"portMappings":true,"bandwidth":false}}]}"#,
        )
        .unwrap();
        let caps: Map<String, Value> = serde_json::from_str(
            r#"{"portMappings":[{"hostPort":80,"containerPort":8080,"protocol":"tcp"}],"bandwidth":{"ingressRate":1}}"#,
        )
        .unwrap();
        let prev = serde_json::json!({"cniVersion":"1.0.0","ips":[]});
        let bridge: Value =
            serde_json::from_slice(&c.plugin_input(&c.plugins[0], &caps, None)).unwrap();
        assert_eq!(bridge["name"], "n");
        assert_eq!(bridge["cniVersion"], "1.0.0");
        assert!(bridge.get("runtimeConfig").is_none());
        assert!(bridge.get("prevResult").is_none());
        let pm: Value =
            serde_json::from_slice(&c.plugin_input(&c.plugins[1], &caps, Some(&prev))).unwrap();
        assert_eq!(pm["runtimeConfig"]["portMappings"][0]["hostPort"], 80);
        assert!(pm["runtimeConfig"].get("bandwidth").is_none());
        assert_eq!(pm["prevResult"], prev);
    }

    #[test]
    fn result_ips() {
        let v = serde_json::json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name":"cni0","mac":"aa"},{"name":"vethx","mac":"bb"},{"name":"eth0","mac":"cc","sandbox":"/run/netns/x"}],
            "ips": [
                {"address":"fd00::5/64","gateway":"fd00::1","interface":2},
                {"address":"10.1.0.5/24","gateway":"10.1.0.1","interface":2},
                {"address":"10.9.9.9/24","interface":0}
            ],
            "routes": [{"dst":"0.0.0.0/0"}]
        });
        let r = CniResult::parse(&v);
        assert_eq!(r.pod_ips(), ["10.1.0.5", "fd00::5"]);
        assert_eq!(r.routes[0].dst, "0.0.0.0/0");
        assert!(CniResult::parse(&Value::Null).pod_ips().is_empty());
    }

    #[test]
    fn plugin_error_message() {
        use std::os::unix::process::ExitStatusExt;
        let st = std::process::ExitStatus::from_raw(1 << 8);
        assert_eq!(
            error_message(
                br#"{"code":11,"msg":"no IP","details":"range full"}"#,
                b"",
                st
            ),
            "no IP: range full (code 11)"
        );
        assert_eq!(error_message(b"", b" boom\n", st), "boom");
        assert!(error_message(b"", b"", st).contains("exit status: 1"));
    }
}
