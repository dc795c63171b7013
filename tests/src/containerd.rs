//! A containerd (Debian package, its CRI plugin, runc) on its own socket and
//! state dirs: the baseline of the benchmarks.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use husk_host::client::Clients;
use husk_proto::cri;

/// Where containerd's CRI plugin finds CNI: plugin binaries and config.
pub struct Cni<'a> {
    pub bin_dir: &'a Path,
    pub conf_dir: &'a Path,
}

pub struct Containerd {
    child: Child,
    dir: tempfile::TempDir,
    pub sock: std::path::PathBuf,
    /// The host bridge of [`Self::start_with_bridge`]'s network, deleted on drop.
    bridge: Option<String>,
    /// Its CNI config dir (IPAM state inside), for [`Self::start_with_bridge`].
    net_dir: Option<tempfile::TempDir>,
}

impl Containerd {
    pub fn start(registry: &str, pause: &str) -> anyhow::Result<Self> {
        Self::start_with_cni(registry, pause, None)
    }

    /// Like [`Self::start`], with containerd's CNI pointed at `cni` (else
    /// empty dirs: pods must use the host network).
    pub fn start_with_cni(registry: &str, pause: &str, cni: Option<Cni>) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        let sock = d.join("containerd.sock");
        let certs = d.join("certs.d");
        std::fs::create_dir_all(certs.join(registry))?;
        std::fs::write(
            certs.join(registry).join("hosts.toml"),
            format!(
                "server = \"http://{registry}\"\n[host.\"http://{registry}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ),
        )?;
        for sub in ["cni/bin", "cni/conf"] {
            std::fs::create_dir_all(d.join(sub))?;
        }
        let cfg = d.join("config.toml");
        std::fs::write(
            &cfg,
            format!(
                r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{sock}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  # Lowering oom_score_adj (the pause container's -998) needs CAP_SYS_RESOURCE,
  # which this machine's root lacks: clamp to containerd's own value.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{certs}"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      BinaryName = "{runc}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cnibin}"
    conf_dir = "{cniconf}"
"#,
                root = d.join("root").display(),
                state = d.join("state").display(),
                sock = sock.display(),
                certs = certs.display(),
                cnibin = cni
                    .as_ref()
                    .map_or(d.join("cni/bin"), |c| c.bin_dir.to_path_buf())
                    .display(),
                cniconf = cni
                    .as_ref()
                    .map_or(d.join("cni/conf"), |c| c.conf_dir.to_path_buf())
                    .display(),
                runc = std::env::var("HUSK_BENCH_RUNC").unwrap_or_else(|_| "runc".into()),
            ),
        )?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("containerd.log"))?)
            .spawn()?;
        Ok(Self {
            child,
            dir,
            sock,
            bridge: None,
            net_dir: None,
        })
    }

    /// Like [`Self::start`], with pods on a CNI bridge network of their own
    /// (a free `198.19.x.0/24`, no masquerade, no port mappings): containerd's
    /// CRI refuses pod-network sandboxes without a CNI network.
    pub fn start_with_bridge(registry: &str, pause: &str) -> anyhow::Result<Self> {
        let net = tempfile::tempdir()?;
        let routes =
            String::from_utf8_lossy(&Command::new("ip").arg("route").output()?.stdout).into_owned();
        let x = (10..250u8)
            .rev()
            .find(|x| !routes.contains(&format!("198.19.{x}.")))
            .ok_or_else(|| anyhow::anyhow!("no free 198.19.x.0/24"))?;
        let tag = std::process::id() ^ u32::from(x) << 24;
        let bridge = format!("hc{tag:08x}");
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": format!("husk-ctd-{tag:08x}"),
            "plugins": [
                {
                    "type": "bridge", "bridge": bridge, "isGateway": true, "ipMasq": false,
                    "ipam": {
                        "type": "host-local", "dataDir": net.path().join("ipam"),
                        "ranges": [[{"subnet": format!("198.19.{x}.0/24")}]],
                    }
                },
                {"type": "loopback"}
            ]
        });
        std::fs::write(net.path().join("10-ctd.conflist"), conflist.to_string())?;
        let mut c = Self::start_with_cni(
            registry,
            pause,
            Some(Cni {
                bin_dir: Path::new("/usr/lib/cni"),
                conf_dir: net.path(),
            }),
        )?;
        c.bridge = Some(bridge);
        c.net_dir = Some(net);
        Ok(c)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(b) = &self.bridge {
            let _ = Command::new("ip")
                .args(["link", "del", b])
                .stderr(Stdio::null())
                .status();
        }
        let _ = Command::new("umount")
            .arg("-R")
            .arg(self.dir.path().join("root"))
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("umount")
            .arg("-R")
            .arg(self.dir.path().join("state"))
            .stderr(Stdio::null())
            .status();
    }
}

pub async fn pull(c: &Clients, image: &str) -> anyhow::Result<()> {
    c.image
        .clone()
        .pull_image(cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await?;
    Ok(())
}

pub async fn connect(sock: &Path) -> anyhow::Result<Clients> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if sock.exists()
            && let Ok(mut c) = Clients::connect(sock).await
            && c.runtime
                .version(cri::VersionRequest::default())
                .await
                .is_ok()
        {
            return Ok(c);
        }
        anyhow::ensure!(Instant::now() < deadline, "no CRI on {}", sock.display());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl crate::cri_env::CriServer for Containerd {
    fn socket(&self) -> &Path {
        &self.sock
    }
    fn log(&self) -> String {
        Containerd::log(self)
    }
    fn pid(&self) -> Option<u32> {
        Some(self.child.id())
    }
    fn logs_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("logs")
    }
    /// Drop stops it (and unmounts its state).
    fn shutdown(&mut self) {}
}
