//! `husk bench cri`: how fast huskd starts pods and what an idle pod costs the host,
//! measured through the CRI against a running huskd (the operator's own, with its own
//! handlers and guest image), the way kubelet would drive it.
//!
//! - RunPodSandbox → returned (pod Ready), and → first container running
//!   (CreateContainer + StartContainer returned), sequential, p50/p99;
//! - `parallel` pods started at once, each to a running container: per pod p50/p99 and
//!   the wall time;
//! - host memory of `idle` pods with a sleeping container: guest RAM, the VMM's and its
//!   helpers' own overhead (from huskd's verbose pod status; see `sandbox::vm::memory`),
//!   and huskd's own growth per pod.
//!
//! Every pod the bench makes is stopped and removed, also when a step fails.

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use husk_proto::cri;
use serde::Serialize;

use crate::client::Clients;
use crate::memory::{self, HostMemory};

pub struct BenchOptions {
    /// RuntimeClass handler ("" = huskd's default).
    pub runtime: String,
    pub image: String,
    /// The container's command: it must keep running (default `sleep 1000000`).
    pub cmd: Vec<String>,
    pub runs: usize,
    pub parallel: usize,
    /// Idle pods whose memory is measured (0: none; needs huskd's verbose pod status).
    pub idle: usize,
    /// Pods on the host network (a namespace-sandbox or runc baseline without CNI).
    pub host_network: bool,
    /// Before each sequential pod, wait until the handler's pool is full again: every pod
    /// then finds a warm VM and no refill boot runs beside it.
    pub settle: bool,
}

/// Milliseconds, p50 and p99.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
}

impl Percentiles {
    pub(super) fn of(mut v: Vec<f64>) -> Self {
        if v.is_empty() {
            return Self { p50: 0.0, p99: 0.0 };
        }
        v.sort_by(f64::total_cmp);
        let at = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
        Self {
            p50: at(0.5),
            p99: at(0.99),
        }
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub handler: String,
    /// What the handler's pods are, from huskd's verbose pod status (e.g. "virtual
    /// machine (QEMU)").
    pub isolation: String,
    pub runs: usize,
    pub ready_ms: Percentiles,
    pub running_ms: Percentiles,
    pub parallel: usize,
    pub parallel_ready_ms: Percentiles,
    pub parallel_running_ms: Percentiles,
    pub parallel_wall_ms: f64,
    /// The handler's warm VM pool (huskd's Status): its size, and how many of the measured
    /// pods got a pooled VM / found the pool empty / were too big for one.
    pub pool: Option<PoolUse>,
    pub idle_pods: usize,
    /// Per idle pod (median); `None` for a sandbox without a VM.
    pub guest_ram_mib: Option<f64>,
    /// The VMM's and helpers' own memory (the agent's for husk-ns), per idle pod (median).
    pub overhead_rss_mib: f64,
    pub overhead_pss_mib: f64,
    /// huskd's resident growth per idle pod.
    pub huskd_per_pod_mib: f64,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolUse {
    pub size: u64,
    pub claimed: u64,
    pub empty: u64,
    pub too_big: u64,
}

/// Several reports as one table, a column each (e.g. cold boot, warm pool, runc).
pub fn side_by_side(rs: &[(&str, &Report)]) -> String {
    let mut s = String::from("| metric |");
    for (n, _) in rs {
        s += &format!(" {n} |");
    }
    s += "\n|---|";
    s += &"---|".repeat(rs.len());
    s += "\n";
    let row = |s: &mut String, what: String, f: &dyn Fn(&Report) -> String| {
        *s += &format!("| {what} |");
        for (_, r) in rs {
            *s += &format!(" {} |", f(r));
        }
        *s += "\n";
    };
    let pp = |x: Percentiles| format!("{:.0} / {:.0} ms", x.p50, x.p99);
    row(&mut s, "RunPodSandbox → Ready, p50 / p99".into(), &|r| {
        pp(r.ready_ms)
    });
    row(
        &mut s,
        "RunPodSandbox → first container running, p50 / p99".into(),
        &|r| pp(r.running_ms),
    );
    let par = rs.first().map_or(0, |r| r.1.parallel);
    row(
        &mut s,
        format!("{par} in parallel: → Ready, p50 / p99"),
        &|r| pp(r.parallel_ready_ms),
    );
    row(
        &mut s,
        format!("{par} in parallel: → running, p50 / p99"),
        &|r| pp(r.parallel_running_ms),
    );
    row(&mut s, format!("{par} in parallel: wall"), &|r| {
        format!("{:.0} ms", r.parallel_wall_ms)
    });
    row(
        &mut s,
        "pool size; pods on a pooled VM / pool empty".into(),
        &|r| {
            r.pool.map_or("-".into(), |p| {
                format!("{}; {} / {}", p.size, p.claimed, p.empty)
            })
        },
    );
    s
}

impl Report {
    pub fn markdown(&self) -> String {
        let p = |x: Percentiles| format!("{:.0} ms | {:.0} ms", x.p50, x.p99);
        let mut s = format!(
            "handler {} ({}): {} sequential pods, {} in parallel, {} idle\n\n\
             | metric | p50 | p99 |\n|---|---|---|\n\
             | RunPodSandbox → Ready | {} |\n\
             | RunPodSandbox → first container running | {} |\n\
             | {} in parallel, per pod → Ready | {} |\n\
             | {} in parallel, per pod → running | {} |\n\
             | {} in parallel, wall | {:.0} ms | |\n",
            self.handler,
            self.isolation,
            self.runs,
            self.parallel,
            self.idle_pods,
            p(self.ready_ms),
            p(self.running_ms),
            self.parallel,
            p(self.parallel_ready_ms),
            self.parallel,
            p(self.parallel_running_ms),
            self.parallel,
            self.parallel_wall_ms,
        );
        if self.idle_pods == 0 {
            return s;
        }
        s += "\n| host memory per idle pod (median) | MiB |\n|---|---|\n";
        if let Some(g) = self.guest_ram_mib {
            s += &format!("| guest RAM resident | {g:.1} |\n");
        }
        s += &format!(
            "| VMM + helpers own memory, RSS (shared libraries in full) | {:.1} |\n\
             | VMM + helpers own memory, PSS | {:.1} |\n\
             | huskd growth | {:.2} |\n",
            self.overhead_rss_mib, self.overhead_pss_mib, self.huskd_per_pod_mib
        );
        s
    }
}

/// huskd's pid: the peer of a connection to its socket.
pub(super) fn huskd_pid(socket: &Path) -> anyhow::Result<i32> {
    let s = std::os::unix::net::UnixStream::connect(socket)
        .with_context(|| format!("connect {}", socket.display()))?;
    let cred = nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::PeerCredentials)
        .context("SO_PEERCRED")?;
    Ok(cred.pid())
}

pub(super) fn rss_anon_bytes(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// The pods made so far, removed at the end whatever happened.
#[derive(Default)]
pub(super) struct Made(Mutex<Vec<String>>);

impl Made {
    pub(super) fn add(&self, id: &str) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(id.into());
    }
    pub(super) fn take(&self, id: &str) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|p| p != id);
    }
    pub(super) fn list(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

pub(super) struct Bench<'a> {
    pub(super) c: Clients,
    pub(super) o: &'a BenchOptions,
    pub(super) made: Made,
    pub(super) tag: String,
}

impl Bench<'_> {
    fn pod_config(&self, name: &str) -> cri::PodSandboxConfig {
        let mut c = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                uid: format!("husk-bench-{}-{name}", self.tag),
                namespace: "husk-bench".into(),
                attempt: 0,
            }),
            hostname: name.into(),
            ..Default::default()
        };
        if self.o.host_network {
            // runc refuses a hostname without a UTS namespace of the pod's own.
            c.hostname = String::new();
            c.linux = Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(host_net()),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        c
    }

    /// The handler's pool from huskd's Status (verbose): (target, claimed, empty, too big,
    /// ready); None without one (or another CRI runtime).
    async fn pool(&self) -> Option<(PoolUse, u64)> {
        let st = self
            .c
            .clone()
            .runtime
            .status(cri::StatusRequest { verbose: true })
            .await
            .ok()?
            .into_inner();
        let pools: serde_json::Value = serde_json::from_str(st.info.get("vmPools")?).ok()?;
        let handler = if self.o.runtime.is_empty() {
            let cfg: serde_json::Value = serde_json::from_str(st.info.get("config")?).ok()?;
            cfg["defaultHandler"].as_str()?.to_string()
        } else {
            self.o.runtime.clone()
        };
        let p = pools
            .as_array()?
            .iter()
            .find(|p| p["handler"].as_str() == Some(handler.as_str()))?;
        let n = |k: &str| p[k].as_u64().unwrap_or(0);
        Some((
            PoolUse {
                size: n("target"),
                claimed: n("claimed"),
                empty: n("empty"),
                too_big: n("tooBig"),
            },
            n("ready"),
        ))
    }

    /// Waits (up to 10 minutes) until the handler's pool, if it has one, is full.
    async fn wait_pool_full(&self) {
        let t = Instant::now();
        while let Some((p, ready)) = self.pool().await {
            if ready >= p.size || t.elapsed() > Duration::from_secs(600) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// One pod to a running container: (pod, → Ready, → running).
    pub(super) async fn pod_to_running(
        &self,
        name: &str,
    ) -> anyhow::Result<(String, Duration, Duration)> {
        let mut c = self.c.clone();
        let config = self.pod_config(name);
        let t0 = Instant::now();
        let pod = c
            .runtime
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: self.o.runtime.clone(),
            })
            .await
            .map_err(|s| anyhow::anyhow!("RunPodSandbox {name}: {}", s.message()))?
            .into_inner()
            .pod_sandbox_id;
        let ready = t0.elapsed();
        self.made.add(&pod);
        let ctr = c
            .runtime
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(cri::ContainerConfig {
                    metadata: Some(cri::ContainerMetadata {
                        name: "main".into(),
                        attempt: 0,
                    }),
                    image: Some(cri::ImageSpec {
                        image: self.o.image.clone(),
                        ..Default::default()
                    }),
                    command: self.o.cmd.clone(),
                    linux: self.o.host_network.then(|| cri::LinuxContainerConfig {
                        security_context: Some(cri::LinuxContainerSecurityContext {
                            namespace_options: Some(host_net()),
                            ..Default::default()
                        }),
                        resources: None,
                    }),
                    ..Default::default()
                }),
                sandbox_config: Some(config),
            })
            .await
            .map_err(|s| anyhow::anyhow!("CreateContainer in {name}: {}", s.message()))?
            .into_inner()
            .container_id;
        c.runtime
            .start_container(cri::StartContainerRequest { container_id: ctr })
            .await
            .map_err(|s| anyhow::anyhow!("StartContainer in {name}: {}", s.message()))?;
        Ok((pod, ready, t0.elapsed()))
    }

    pub(super) async fn remove(&self, pod: &str) {
        let mut c = self.c.clone();
        let _ = c
            .runtime
            .stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: pod.into(),
            })
            .await;
        match c
            .runtime
            .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: pod.into(),
            })
            .await
        {
            Ok(_) => self.made.take(pod),
            Err(s) => tracing::warn!(pod, error = %s.message(), "remove bench pod"),
        }
    }

    /// Isolation and host memory of a running pod, from huskd's verbose status.
    async fn pod_memory(&self, pod: &str) -> anyhow::Result<(String, bool, HostMemory)> {
        let st = self
            .c
            .clone()
            .runtime
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: pod.into(),
                verbose: true,
            })
            .await
            .map_err(|s| anyhow::anyhow!("PodSandboxStatus: {}", s.message()))?
            .into_inner();
        let info: serde_json::Value =
            serde_json::from_str(st.info.get("info").map_or("{}", String::as_str))
                .context("verbose pod info")?;
        let isolation = info["isolation"].as_str().unwrap_or("?").to_string();
        let m = &info["vmHostMemory"];
        if m.is_object() {
            let get = |k: &str| m[k].as_u64().unwrap_or(0);
            return Ok((
                isolation,
                true,
                HostMemory {
                    guest_ram_bytes: get("guestRamBytes"),
                    overhead_rss_bytes: get("overheadRssBytes"),
                    overhead_pss_bytes: get("overheadPssBytes"),
                },
            ));
        }
        let pid = info["agentPid"]
            .as_i64()
            .context("verbose pod info has no agentPid")?;
        Ok((isolation, false, memory::of_process(pid as i32)))
    }

    async fn run(&self, socket: &Path) -> anyhow::Result<Report> {
        // Warm-up: the image's block image, page cache, huskd's first-use allocations.
        self.wait_pool_full().await;
        let (pod, _, _) = self.pod_to_running("warm").await?;
        self.remove(&pod).await;
        self.wait_pool_full().await;
        let pool0 = self.pool().await.map(|p| p.0);

        let (mut ready, mut running) = (vec![], vec![]);
        for n in 0..self.o.runs {
            if self.o.settle {
                self.wait_pool_full().await;
            }
            let (pod, r, c) = self.pod_to_running(&format!("seq-{n}")).await?;
            ready.push(r.as_secs_f64() * 1e3);
            running.push(c.as_secs_f64() * 1e3);
            self.remove(&pod).await;
        }

        let (mut vm, mut guest, mut rss, mut pss) = (false, vec![], vec![], vec![]);
        let mut isolation = String::new();
        let mut huskd_per_pod = 0.0;
        if self.o.idle > 0 {
            let huskd = huskd_pid(socket)?;
            let before = rss_anon_bytes(huskd);
            let mut idle = vec![];
            for n in 0..self.o.idle {
                idle.push(self.pod_to_running(&format!("idle-{n}")).await?.0);
            }
            tokio::time::sleep(Duration::from_secs(3)).await;
            for p in &idle {
                let (iso, is_vm, m) = self.pod_memory(p).await?;
                isolation = iso;
                vm |= is_vm;
                guest.push(m.guest_ram_bytes as f64 / 1048576.0);
                rss.push(m.overhead_rss_bytes as f64 / 1048576.0);
                pss.push(m.overhead_pss_bytes as f64 / 1048576.0);
            }
            huskd_per_pod = rss_anon_bytes(huskd).saturating_sub(before) as f64
                / 1048576.0
                / self.o.idle as f64;
            for p in &idle {
                self.remove(p).await;
            }
        }

        self.wait_pool_full().await;
        let t0 = Instant::now();
        let starts = (0..self.o.parallel).map(|n| async move {
            let r = self.pod_to_running(&format!("par-{n}")).await;
            r.map(|(_, r, c)| (r.as_secs_f64() * 1e3, c.as_secs_f64() * 1e3))
        });
        let par = futures::future::join_all(starts).await;
        let wall = t0.elapsed().as_secs_f64() * 1e3;
        // The parallel pods go with every other one left, in `cri`.
        let par = par.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
        let pool = match (pool0, self.pool().await) {
            (Some(a), Some((b, _))) => Some(PoolUse {
                size: b.size,
                claimed: b.claimed - a.claimed,
                empty: b.empty - a.empty,
                too_big: b.too_big - a.too_big,
            }),
            _ => None,
        };

        Ok(Report {
            handler: if self.o.runtime.is_empty() {
                "(default)".into()
            } else {
                self.o.runtime.clone()
            },
            isolation,
            runs: self.o.runs,
            ready_ms: Percentiles::of(ready),
            running_ms: Percentiles::of(running),
            parallel: self.o.parallel,
            parallel_ready_ms: Percentiles::of(par.iter().map(|p| p.0).collect()),
            parallel_running_ms: Percentiles::of(par.iter().map(|p| p.1).collect()),
            parallel_wall_ms: wall,
            pool,
            idle_pods: self.o.idle,
            guest_ram_mib: vm.then(|| Percentiles::of(guest).p50),
            overhead_rss_mib: Percentiles::of(rss).p50,
            overhead_pss_mib: Percentiles::of(pss).p50,
            huskd_per_pod_mib: huskd_per_pod,
        })
    }
}

/// Host network, PID and IPC namespaces of the node (`NODE` = 2).
fn host_net() -> cri::NamespaceOption {
    cri::NamespaceOption {
        network: 2,
        ..Default::default()
    }
}

/// Runs the CRI bench against huskd on `socket`. Pulls the image first when it is missing.
pub async fn cri(c: &Clients, socket: &Path, o: &BenchOptions) -> anyhow::Result<Report> {
    if o.runs == 0 {
        bail!("--runs must be at least 1");
    }
    super::runtime::ensure_image(&mut c.clone(), &o.image).await?;
    let b = Bench {
        c: c.clone(),
        o,
        made: Made::default(),
        tag: hex::encode(rand::random::<[u8; 4]>()),
    };
    let r = b.run(socket).await;
    // Whatever failed, leave no pod behind.
    for p in b.made.list() {
        b.remove(&p).await;
    }
    r
}
