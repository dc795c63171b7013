//! Pod networking with CNI plugins.
//!
//! Per pod (unless it uses the host network, or no CNI config exists, in
//! which case the agent gives it a loopback-only namespace as before):
//! huskd pins a fresh network namespace at `<run_dir>/netns/<pod id>`, runs
//! the plugins' ADD in it and hands its path to the agent
//! (`SandboxNamespaces.network_path`). What DEL needs — the exact config
//! list, the namespace path, the CNI args and the ADD result — is written
//! to `<state_dir>/network/<pod id>.json` *before* ADD runs, so DEL works
//! after a huskd crash at any point. See docs/networking.md.

pub mod cni;
pub mod netns;
pub mod tap;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use husk_proto::cri;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use self::cni::{Attachment, CniError, CniResult, ConfList, Plugins};
use self::netns::NetnsError;
use crate::config::NetworkConfig;
use crate::store::{StoreError, write_atomic};

/// The interface CNI creates inside the pod.
pub const IFNAME: &str = "eth0";
/// CRI NamespaceMode NODE.
const NS_NODE: i32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("pod network: {0}")]
    Cni(#[from] CniError),
    #[error("pod network namespace: {0}")]
    Netns(#[from] NetnsError),
    #[error("pod network record: {0}")]
    Store(#[from] StoreError),
    #[error("pod network record {path}: {source}")]
    Record {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("pod network: {0}")]
    Tap(#[from] tap::TapError),
    #[error("pod CIDR {0:?}: want comma-separated ADDRESS/PREFIX (IPv4 or IPv6)")]
    BadCidr(String),
}

/// What huskd keeps about one pod's CNI attachment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodNetwork {
    pub pod_id: String,
    /// The exact config list ADD ran with (DEL must use the same).
    pub conf: ConfList,
    pub attachment: Attachment,
    /// The ADD result (`None` while ADD runs or after it failed).
    pub result: Option<Value>,
}

impl PodNetwork {
    pub fn netns(&self) -> &Path {
        &self.attachment.netns
    }

    pub fn result(&self) -> CniResult {
        self.result
            .as_ref()
            .map(CniResult::parse)
            .unwrap_or_default()
    }

    /// The pod's IPs, IPv4 first.
    pub fn ips(&self) -> Vec<String> {
        self.result().pod_ips()
    }
}

fn uses_host_network(config: &cri::PodSandboxConfig) -> bool {
    config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.as_ref())
        .is_some_and(|n| n.network == NS_NODE)
}

/// The node's pod CIDR (UpdateRuntimeConfig), in the network state dir (not a `.json` record).
const POD_CIDR_FILE: &str = "pod-cidr";

/// Pod networking for every pod of this huskd.
pub struct Network {
    cfg: NetworkConfig,
    plugins: Plugins,
    netns_dir: PathBuf,
    state_dir: PathBuf,
    pod_cidr: Mutex<String>,
    pods: Mutex<HashMap<String, PodNetwork>>,
    /// One CNI operation per pod at a time: the CHECK that recovery runs in
    /// the background must not interleave with a DEL of the same pod (their
    /// iptables edits race).
    ops: crate::image::KeyedLocks,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Network {
    /// Loads the records of pods that have a network.
    pub fn open(
        cfg: NetworkConfig,
        state_dir: PathBuf,
        netns_dir: PathBuf,
    ) -> Result<Self, NetworkError> {
        std::fs::create_dir_all(&state_dir).map_err(|source| StoreError::Io {
            path: state_dir.clone(),
            source,
        })?;
        let mut pods = HashMap::new();
        for e in std::fs::read_dir(&state_dir)
            .into_iter()
            .flatten()
            .flatten()
        {
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            match std::fs::read(&p)
                .map_err(|e| e.to_string())
                .and_then(|t| serde_json::from_slice::<PodNetwork>(&t).map_err(|e| e.to_string()))
            {
                Ok(r) => {
                    pods.insert(r.pod_id.clone(), r);
                }
                Err(e) => {
                    tracing::error!(path = %p.display(), error = %e, "unreadable pod network record")
                }
            }
        }
        // The node's pod CIDR outlives a restart: kubelet sends it again only when it changes.
        let pod_cidr = std::fs::read_to_string(state_dir.join(POD_CIDR_FILE))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        Ok(Self {
            plugins: Plugins {
                bin_dirs: cfg.cni_bin_dirs.clone(),
                timeout: Duration::from_millis(cfg.cni_timeout_ms),
            },
            cfg,
            netns_dir,
            state_dir,
            pod_cidr: Mutex::new(pod_cidr),
            pods: Mutex::new(pods),
            ops: crate::image::KeyedLocks::default(),
        })
    }

    /// The config list pods would get now, with every plugin binary present.
    pub fn config(&self) -> Result<ConfList, CniError> {
        let list = ConfList::load_dir(&self.cfg.cni_conf_dir)?;
        for t in list.plugin_types() {
            self.plugins.find(t)?;
        }
        Ok(list)
    }

    /// For the CRI `Status` NetworkReady condition: `Err(reason message)`
    /// while no usable CNI config exists.
    pub fn ready(&self) -> Result<String, String> {
        match self.config() {
            Ok(l) => Ok(format!(
                "cni network {:?} from {}",
                l.name,
                l.file.display()
            )),
            Err(e) => Err(format!(
                "cni config uninitialized ({e}); pods get a network namespace with loopback only (or the host network)"
            )),
        }
    }

    /// UpdateRuntimeConfig: the node's pod CIDR, given to IPAM plugins that
    /// declare the `ipRanges` capability (host-local does).
    /// Kept in the network state dir. An empty CIDR clears it.
    pub fn set_pod_cidr(&self, cidr: &str) -> Result<(), NetworkError> {
        let ok = cidrs(cidr).all(|c| {
            c.split_once('/')
                .is_some_and(|(a, p)| match a.parse::<std::net::IpAddr>() {
                    Ok(ip) => p
                        .parse::<u8>()
                        .is_ok_and(|p| p <= if ip.is_ipv4() { 32 } else { 128 }),
                    Err(_) => false,
                })
        });
        if !ok {
            return Err(NetworkError::BadCidr(cidr.to_string()));
        }
        let mut cur = lock(&self.pod_cidr);
        write_atomic(&self.state_dir.join(POD_CIDR_FILE), cidr.as_bytes())?;
        *cur = cidr.to_string();
        Ok(())
    }

    pub fn pod_cidr(&self) -> String {
        lock(&self.pod_cidr).clone()
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.state_dir.join(format!("{id}.json"))
    }

    fn persist(&self, r: &PodNetwork) -> Result<(), NetworkError> {
        let path = self.record_path(&r.pod_id);
        let data = serde_json::to_vec_pretty(r).map_err(|source| NetworkError::Record {
            path: path.clone(),
            source,
        })?;
        write_atomic(&path, &data)?;
        lock(&self.pods).insert(r.pod_id.clone(), r.clone());
        Ok(())
    }

    pub fn pod(&self, id: &str) -> Option<PodNetwork> {
        lock(&self.pods).get(id).cloned()
    }

    /// The pod's IPs (IPv4 first); empty without CNI.
    pub fn pod_ips(&self, id: &str) -> Vec<String> {
        self.pod(id).map(|r| r.ips()).unwrap_or_default()
    }

    /// RunPodSandbox: the namespace path to hand to the agent, or `None`
    /// when the pod uses the host network or no CNI config exists. On
    /// failure everything made is undone (DEL, namespace removed).
    pub async fn setup(
        &self,
        id: &str,
        config: &cri::PodSandboxConfig,
    ) -> Result<Option<PathBuf>, NetworkError> {
        if uses_host_network(config) {
            return Ok(None);
        }
        let conf = match self.config() {
            Ok(c) => c,
            Err(CniError::NoConfig(dir)) => {
                tracing::debug!(pod = id, dir = %dir.display(), "no cni config: loopback-only network namespace");
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        let netns = self.netns_dir.join(id);
        let mut rec = PodNetwork {
            pod_id: id.to_string(),
            attachment: Attachment {
                container_id: id.to_string(),
                netns: netns.clone(),
                ifname: IFNAME.into(),
                args: cni_args(id, config),
                capability_args: self.capability_args(config),
            },
            conf,
            result: None,
        };
        // Recorded first: a crash from here on is undone by DEL on recovery.
        self.persist(&rec)?;
        let added = async {
            netns::create(&netns)?;
            let r = self.plugins.add(&rec.conf, &rec.attachment).await?;
            Ok::<_, NetworkError>(r)
        }
        .await;
        match added {
            Ok(r) => {
                rec.result = Some(r);
                if let Err(e) = self.persist(&rec) {
                    let _ = self.teardown(id).await;
                    return Err(e);
                }
                tracing::info!(pod = id, ips = ?rec.ips(), network = %rec.conf.name, "pod network added");
                Ok(Some(netns))
            }
            Err(e) => {
                tracing::warn!(pod = id, error = %e, "cni ADD failed; undoing");
                if let Err(e2) = self.teardown(id).await {
                    tracing::error!(pod = id, error = %e2, "undo failed cni ADD");
                }
                Err(e)
            }
        }
    }

    /// StopPodSandbox/RemovePodSandbox (and recovery): DEL with the
    /// recorded config, then the namespace goes. Idempotent: no record, no
    /// work; a failed DEL keeps the record for the next try.
    pub async fn teardown(&self, id: &str) -> Result<(), NetworkError> {
        let _op = self.ops.lock(id).await;
        let Some(rec) = self.pod(id) else {
            return Ok(());
        };
        let netns = rec.netns().to_path_buf();
        let mut att = rec.attachment.clone();
        if !netns::is_netns(&netns) {
            // Plugins must still release what they hold (IPAM, iptables).
            att.netns = PathBuf::new();
        } else {
            let _ = tap::remove(&netns, tap::TAP_NAME);
        }
        self.plugins
            .del(&rec.conf, &att, rec.result.as_ref())
            .await?;
        netns::remove(&netns)?;
        match std::fs::remove_file(self.record_path(id)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(StoreError::Io {
                    path: self.record_path(id),
                    source,
                }
                .into());
            }
        }
        lock(&self.pods).remove(id);
        tracing::info!(pod = id, "pod network removed");
        Ok(())
    }

    /// A VM pod: the tap and tc redirects in its namespace, and what the
    /// VMM and the agent need. `None` when the pod has no CNI network.
    pub fn attach_vm(&self, id: &str) -> Result<Option<tap::VmNic>, NetworkError> {
        let Some(rec) = self.pod(id) else {
            return Ok(None);
        };
        let nic = tap::attach(
            rec.netns(),
            &rec.attachment.ifname,
            tap::TAP_NAME,
            &rec.result(),
        )?;
        tracing::info!(pod = id, mac = %nic.mac, mtu = nic.mtu, "VM pod network: tap redirected to {}", rec.attachment.ifname);
        Ok(Some(nic))
    }

    /// A VM pod on a pooled VM: the VM's tap (`pooled`, in namespace `from`) moves into the
    /// pod's namespace and is wired as [`Self::attach_vm`] wires a new one. `None` (the tap
    /// stays where it is) when the pod has no CNI network.
    pub fn adopt_vm(
        &self,
        id: &str,
        from: &Path,
        pooled: &str,
    ) -> Result<Option<tap::VmNic>, NetworkError> {
        let Some(rec) = self.pod(id) else {
            return Ok(None);
        };
        let nic = tap::adopt(
            from,
            pooled,
            rec.netns(),
            &rec.attachment.ifname,
            tap::TAP_NAME,
            &rec.result(),
        )?;
        tracing::info!(pod = id, mac = %nic.mac, mtu = nic.mtu, pooled, "pooled VM's tap moved into the pod network, redirected to {}", rec.attachment.ifname);
        Ok(Some(nic))
    }

    /// CHECK (where the config version supports it): `Ok(false)` when not
    /// supported or the pod has no CNI network.
    pub async fn check(&self, id: &str) -> Result<bool, NetworkError> {
        let _op = self.ops.lock(id).await;
        let Some(rec) = self.pod(id) else {
            return Ok(false);
        };
        let Some(result) = &rec.result else {
            return Ok(false);
        };
        Ok(self
            .plugins
            .check(&rec.conf, &rec.attachment, result)
            .await?)
    }

    /// Recovery: CHECKs the networks of pods still running, in the
    /// background (a broken one is logged; kubelet decides what to do).
    pub fn spawn_checks(self: std::sync::Arc<Self>, ids: Vec<String>) {
        tokio::spawn(async move {
            for id in ids {
                match self.check(&id).await {
                    Ok(true) => tracing::info!(pod = %id, "pod network checked"),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(pod = %id, error = %e, "pod network CHECK failed"),
                }
            }
        });
    }

    /// Recovery: tears down the networks of pods huskd no longer has.
    pub async fn remove_orphans(&self, known: &dyn Fn(&str) -> bool) {
        let ids: Vec<String> = lock(&self.pods).keys().cloned().collect();
        for id in ids.into_iter().filter(|i| !known(i)) {
            tracing::info!(pod = %id, "removing the network of a pod huskd has no record of");
            if let Err(e) = self.teardown(&id).await {
                tracing::error!(pod = %id, error = %e, "remove orphaned pod network");
            }
        }
    }

    /// Runtime config by capability: port mappings, bandwidth (from the
    /// kubernetes.io/{in,e}gress-bandwidth annotations), DNS and the pod CIDR.
    fn capability_args(&self, config: &cri::PodSandboxConfig) -> Map<String, Value> {
        let mut caps = Map::new();
        let ports: Vec<Value> = config
            .port_mappings
            .iter()
            .filter(|p| p.host_port > 0)
            .map(|p| {
                let proto = match cri::Protocol::try_from(p.protocol) {
                    Ok(cri::Protocol::Udp) => "udp",
                    Ok(cri::Protocol::Sctp) => "sctp",
                    _ => "tcp",
                };
                let mut m = json!({
                    "hostPort": p.host_port,
                    "containerPort": p.container_port,
                    "protocol": proto,
                });
                if !p.host_ip.is_empty() {
                    m["hostIP"] = Value::String(p.host_ip.clone());
                }
                m
            })
            .collect();
        if !ports.is_empty() {
            caps.insert("portMappings".into(), Value::Array(ports));
        }
        let bw = |k: &str| config.annotations.get(k).and_then(|v| parse_quantity(v));
        let (ing, eg) = (
            bw("kubernetes.io/ingress-bandwidth"),
            bw("kubernetes.io/egress-bandwidth"),
        );
        if ing.is_some() || eg.is_some() {
            let mut b = Map::new();
            if let Some(r) = ing {
                b.insert("ingressRate".into(), json!(r));
                b.insert("ingressBurst".into(), json!(u32::MAX / 8));
            }
            if let Some(r) = eg {
                b.insert("egressRate".into(), json!(r));
                b.insert("egressBurst".into(), json!(u32::MAX / 8));
            }
            caps.insert("bandwidth".into(), Value::Object(b));
        }
        if let Some(d) = &config.dns_config {
            caps.insert(
                "dns".into(),
                json!({"servers": d.servers, "searches": d.searches, "options": d.options}),
            );
        }
        let cidr = self.pod_cidr();
        if !cidr.is_empty() {
            let ranges: Vec<Value> = cidrs(&cidr).map(|c| json!([{"subnet": c}])).collect();
            caps.insert("ipRanges".into(), Value::Array(ranges));
        }
        caps
    }
}

/// The CIDRs of a pod CIDR string (kubelet's comma-separated dual-stack form).
fn cidrs(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').map(str::trim).filter(|c| !c.is_empty())
}

/// `CNI_ARGS` as kubelet-era runtimes pass them.
fn cni_args(id: &str, config: &cri::PodSandboxConfig) -> Vec<(String, String)> {
    let md = config.metadata.clone().unwrap_or_default();
    vec![
        ("IgnoreUnknown".into(), "1".into()),
        ("K8S_POD_NAMESPACE".into(), md.namespace),
        ("K8S_POD_NAME".into(), md.name),
        ("K8S_POD_INFRA_CONTAINER_ID".into(), id.to_string()),
        ("K8S_POD_UID".into(), md.uid),
    ]
}

/// A Kubernetes quantity in bits per second ("10M", "1Gi", "500k").
fn parse_quantity(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (num, unit) = if split == 0 {
        return None;
    } else {
        s.split_at(split)
    };
    let mult: f64 = match unit {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let v: f64 = num.parse().ok()?;
    Some((v * mult) as u64)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("10M"), Some(10_000_000));
        assert_eq!(parse_quantity("1Ki"), Some(1024));
        assert_eq!(parse_quantity("1.5k"), Some(1500));
        assert_eq!(parse_quantity("x"), None);
        assert_eq!(parse_quantity("10Q"), None);
    }

    fn pod(host_net: bool) -> cri::PodSandboxConfig {
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: "p".into(),
                namespace: "ns".into(),
                uid: "u".into(),
                attempt: 0,
            }),
            port_mappings: vec![cri::PortMapping {
                protocol: cri::Protocol::Udp as i32,
                container_port: 53,
                host_port: 5353,
                host_ip: String::new(),
            }],
            annotations: [(
                "kubernetes.io/ingress-bandwidth".to_string(),
                "1M".to_string(),
            )]
            .into(),
            linux: host_net.then(|| cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: NS_NODE,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn args_caps_and_no_config() {
        let d = tempfile::tempdir().unwrap();
        let n = Network::open(
            NetworkConfig {
                cni_conf_dir: d.path().join("net.d"),
                cni_bin_dirs: vec![d.path().join("bin")],
                cni_timeout_ms: 1000,
            },
            d.path().join("state"),
            d.path().join("netns"),
        )
        .unwrap();
        assert!(n.ready().is_err());
        // No config: the pod keeps the agent's loopback-only namespace.
        assert_eq!(n.setup("p1", &pod(false)).await.unwrap(), None);
        assert!(n.pod("p1").is_none());
        n.teardown("p1").await.unwrap();
        n.set_pod_cidr("10.5.0.0/24, fd00:5::/64").unwrap();
        for bad in [
            "10.5.0.0",
            "10.5.0.0/33",
            "fd00::/129",
            "x/8",
            "10.5.0.0/24,junk",
        ] {
            assert!(
                matches!(n.set_pod_cidr(bad), Err(NetworkError::BadCidr(_))),
                "{bad}"
            );
        }
        let reopened = Network::open(
            NetworkConfig {
                cni_conf_dir: d.path().join("net.d"),
                cni_bin_dirs: vec![d.path().join("bin")],
                cni_timeout_ms: 1000,
            },
            d.path().join("state"),
            d.path().join("netns"),
        )
        .unwrap();
        assert_eq!(
            reopened.pod_cidr(),
            "10.5.0.0/24, fd00:5::/64",
            "kept across a restart"
        );
        let caps = n.capability_args(&pod(false));
        assert_eq!(caps["portMappings"][0]["protocol"], "udp");
        assert_eq!(caps["portMappings"][0]["hostPort"], 5353);
        assert_eq!(caps["bandwidth"]["ingressRate"], 1_000_000);
        assert_eq!(caps["ipRanges"][1][0]["subnet"], "fd00:5::/64");
        let args = cni_args("id1", &pod(false));
        assert!(args.contains(&("K8S_POD_INFRA_CONTAINER_ID".into(), "id1".into())));
        // A config whose plugin is missing: not ready, and RunPodSandbox fails clearly.
        std::fs::create_dir_all(d.path().join("net.d")).unwrap();
        std::fs::write(
            d.path().join("net.d/10.conflist"),
            r#"{"cniVersion":"1.0.0","name":"t","plugins":[{"type":"nosuchplugin"}]}"#,
        )
        .unwrap();
        assert!(n.ready().unwrap_err().contains("nosuchplugin"));
        let e = n.setup("p2", &pod(false)).await.unwrap_err();
        // (FailedPrecondition on the wire: checked in cri/error.rs.)
        assert!(
            matches!(&e, NetworkError::Cni(CniError::PluginNotFound { .. })),
            "{e}"
        );
        assert!(!d.path().join("netns/p2").exists());
    }
}
