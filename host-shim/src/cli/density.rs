//! `husk bench density`: how many idle pods a node holds, and what each costs.
//!
//! Starts idle pods (a sleeping container each) in steps of `step` until a host memory
//! budget is reached, huskd's answers degrade past `p99_limit_ms`, a start fails, the host
//! runs short of memory, `max_pods` are running, or Ctrl-C. After each step it measures,
//! over every pod running:
//! - host memory per pod: PSS of the pod's processes (the VMM and its helpers, or a
//!   namespace pod's agent), guest RAM apart from the VMM's and helpers' own memory
//!   (`crate::memory`: guest RAM is the `MADV_DONTDUMP` mappings), and that own memory
//!   split by process (QEMU, vhost-user vsock, vhost-user fs, log writer) with QEMU's TCG
//!   translation cache (its anonymous executable mappings) apart;
//! - idle CPU per pod: utime + stime of those processes over `window_s`;
//! - huskd's Version and ListPodSandbox latency, p50/p99 of `probes` calls each, one at a
//!   time, and huskd's own resident memory and CPU over the window.
//!
//! Every pod it made is stopped and removed at the end, whatever happened (also after
//! Ctrl-C: the first stops new starts and measurements, the pods then go), and the report
//! says how many of its pods huskd still lists afterwards (0 unless removal failed).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use husk_proto::cri;
use serde::Serialize;

use super::bench::{Bench, BenchOptions, Made, Percentiles, huskd_pid, rss_anon_bytes};
use crate::client::Clients;
use crate::memory;

pub struct DensityOptions {
    /// RuntimeClass handler ("" = huskd's default).
    pub runtime: String,
    pub image: String,
    /// The container's command: it must keep running.
    pub cmd: Vec<String>,
    /// Host memory the pods may use all told (PSS), MiB; 0: 3/4 of MemAvailable at start.
    pub budget_mib: u64,
    /// Pods started per step.
    pub step: usize,
    /// Pods started at once within a step.
    pub concurrency: usize,
    /// Stop after this many pods (0: no limit but the others).
    pub max_pods: usize,
    /// Stop when huskd's Version or ListPodSandbox p99 exceeds this.
    pub p99_limit_ms: f64,
    /// Seconds the pods idle before a step is measured.
    pub settle_s: u64,
    /// Seconds over which idle CPU is measured.
    pub window_s: u64,
    /// Calls of Version and of ListPodSandbox per step.
    pub probes: usize,
    /// Stop before a step would leave the host less MemAvailable than this, MiB.
    pub reserve_mib: u64,
    /// Pods on the host network.
    pub host_network: bool,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    pub pods: usize,
    /// Start of this step's pods, RunPodSandbox → container running, p50 / p99.
    pub start_ms: Percentiles,
    /// Per pod, mean over the running pods, MiB (PSS).
    pub guest_ram_mib: f64,
    pub overhead_pss_mib: f64,
    pub total_pss_mib: f64,
    /// The overhead by process kind ("qemu", "vhost-user vsock", …; "tcg cache" is
    /// QEMU's translation cache, apart from "qemu"), per pod, MiB (PSS).
    pub overhead_by_process_mib: BTreeMap<String, f64>,
    /// Per pod, % of one CPU, over the window.
    pub idle_cpu_pct: f64,
    pub huskd_cpu_pct: f64,
    pub huskd_rss_anon_mib: f64,
    pub host_mem_available_mib: u64,
    pub version_ms: Percentiles,
    pub list_pods_ms: Percentiles,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DensityReport {
    pub handler: String,
    pub budget_mib: u64,
    pub p99_limit_ms: f64,
    pub window_s: u64,
    pub steps: Vec<Step>,
    /// The most pods running at once.
    pub max_pods: usize,
    /// Why it stopped.
    pub stop: String,
    /// Pods removed at the end, and the bench's pods huskd still listed afterwards.
    pub removed: usize,
    pub left_behind: usize,
    pub cleanup_s: f64,
}

impl DensityReport {
    pub fn markdown(&self) -> String {
        let mut s = format!(
            "handler {}: budget {} MiB, p99 limit {:.0} ms, CPU window {} s\n\n\
             | pods | start p50 / p99 | guest RAM / pod | VMM + helpers / pod | all told / pod | idle CPU / pod | huskd CPU | huskd anon | MemAvailable | Version p50 / p99 | ListPodSandbox p50 / p99 |\n\
             |---|---|---|---|---|---|---|---|---|---|---|\n",
            self.handler, self.budget_mib, self.p99_limit_ms, self.window_s
        );
        for t in &self.steps {
            s += &format!(
                "| {} | {:.0} / {:.0} ms | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.2} % | {:.2} % | {:.1} MiB | {} MiB | {:.1} / {:.1} ms | {:.1} / {:.1} ms |\n",
                t.pods,
                t.start_ms.p50,
                t.start_ms.p99,
                t.guest_ram_mib,
                t.overhead_pss_mib,
                t.total_pss_mib,
                t.idle_cpu_pct,
                t.huskd_cpu_pct,
                t.huskd_rss_anon_mib,
                t.host_mem_available_mib,
                t.version_ms.p50,
                t.version_ms.p99,
                t.list_pods_ms.p50,
                t.list_pods_ms.p99,
            );
        }
        if let Some(t) = self.steps.last() {
            s += &format!(
                "\nVMM + helpers per pod at {} pods (PSS): {}\n",
                t.pods,
                t.overhead_by_process_mib
                    .iter()
                    .map(|(k, v)| format!("{k} {v:.1} MiB"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        s += &format!(
            "\nmost pods: {}; stopped: {}; removed {} in {:.1} s, left behind {}\n",
            self.max_pods, self.stop, self.removed, self.cleanup_s, self.left_behind
        );
        s
    }
}

/// Host MemAvailable, bytes.
fn mem_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// utime + stime of a process (all its threads), clock ticks; 0 when it is gone.
fn cpu_ticks(pid: i32) -> u64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // After the comm's closing parenthesis: state is field 3, utime 14, stime 15.
    let Some((_, rest)) = s.rsplit_once(") ") else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf reads a constant; no memory is touched.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// What a pod process is, from its command line.
fn process_kind(pid: i32) -> String {
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<String> = cmd
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    if let Some(i) = args.iter().position(|a| a == "vhost-user") {
        return format!("vhost-user {}", args.get(i + 1).map_or("?", String::as_str));
    }
    if args.iter().any(|a| a == "log-writer") {
        return "log writer".into();
    }
    let bin = args
        .first()
        .map_or("?", |a| a.rsplit('/').next().unwrap_or(a));
    if bin.starts_with("qemu-system") {
        "qemu".into()
    } else {
        bin.to_string()
    }
}

/// A process's own memory (not guest RAM), PSS bytes: (TCG translation cache, the rest).
/// The TCG cache is QEMU's anonymous, private, executable memory.
fn overhead_split(pid: i32) -> (u64, u64) {
    let Ok(smaps) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return (0, 0);
    };
    let (mut tcg, mut rest) = (0, 0);
    let (mut anon_x, mut pss) = (false, 0);
    for l in smaps.lines() {
        if let Some(v) = l.strip_prefix("Pss:") {
            pss = v
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)
                * 1024;
        } else if let Some(flags) = l.strip_prefix("VmFlags:") {
            let f: Vec<&str> = flags.split_whitespace().collect();
            if !f.contains(&"dd") {
                if anon_x {
                    tcg += pss;
                } else {
                    rest += pss;
                }
            }
            (anon_x, pss) = (false, 0);
        } else if let Some(first) = l.split_whitespace().next()
            && first.contains('-')
            && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
        {
            // A mapping's header: "start-end perms offset dev inode [path]".
            let cols: Vec<&str> = l.split_whitespace().collect();
            anon_x = cols
                .get(1)
                .is_some_and(|p| p.contains('x') && p.ends_with('p'))
                && cols.get(4) == Some(&"0")
                && cols.len() == 5;
        }
    }
    (tcg, rest)
}

/// A running bench pod's host processes (VMM + helpers, or the agent).
struct Pod {
    pids: Vec<i32>,
}

struct Density<'a> {
    b: Bench<'a>,
    o: &'a DensityOptions,
    stop: Arc<AtomicBool>,
}

impl Density<'_> {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Sleeps `d`, or less when Ctrl-C comes.
    async fn idle(&self, d: Duration) {
        let t = Instant::now();
        while t.elapsed() < d && !self.stopped() {
            tokio::time::sleep(Duration::from_millis(100).min(d - t.elapsed())).await;
        }
    }

    async fn pids(&self, pod: &str) -> anyhow::Result<Vec<i32>> {
        let st = self
            .b
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
            serde_json::from_str(st.info.get("info").map_or("{}", String::as_str))?;
        let mut v: Vec<i32> = info["agentPid"]
            .as_i64()
            .into_iter()
            .map(|p| p as i32)
            .collect();
        if let Some(h) = info["vmHelpers"].as_array() {
            v.extend(h.iter().filter_map(|p| p.as_i64().map(|p| p as i32)));
        }
        if v.is_empty() {
            bail!("pod {pod}: verbose status names no process");
        }
        Ok(v)
    }

    /// Starts up to `n` pods, `concurrency` at a time; their start times (ms), and the
    /// first error (the pods started before it are kept).
    async fn start(
        &self,
        first: usize,
        n: usize,
        pods: &mut Vec<Pod>,
    ) -> (Vec<f64>, Option<String>) {
        let mut times = vec![];
        let mut i = 0;
        while i < n && !self.stopped() {
            let k = self.o.concurrency.max(1).min(n - i);
            let batch = (0..k).map(|j| {
                let name = format!("dense-{}", first + i + j);
                async move { self.b.pod_to_running(&name).await }
            });
            let got = futures::future::join_all(batch).await;
            i += k;
            let mut err = None;
            for r in got {
                match r {
                    Ok((id, _, running)) => match self.pids(&id).await {
                        Ok(pids) => {
                            times.push(running.as_secs_f64() * 1e3);
                            pods.push(Pod { pids });
                        }
                        Err(e) => err = Some(format!("{e:#}")),
                    },
                    Err(e) => err = Some(format!("{e:#}")),
                }
            }
            if err.is_some() {
                return (times, err);
            }
        }
        (times, None)
    }

    /// Latencies (ms) of `probes` Version and ListPodSandbox calls, one at a time.
    async fn probe(&self) -> anyhow::Result<(Percentiles, Percentiles)> {
        let mut c = self.b.c.clone();
        let (mut v, mut l) = (vec![], vec![]);
        for _ in 0..self.o.probes.max(1) {
            let t = Instant::now();
            c.runtime
                .version(cri::VersionRequest {
                    version: "v1".into(),
                })
                .await
                .map_err(|s| anyhow::anyhow!("Version: {}", s.message()))?;
            v.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            c.runtime
                .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
                .await
                .map_err(|s| anyhow::anyhow!("ListPodSandbox: {}", s.message()))?;
            l.push(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok((Percentiles::of(v), Percentiles::of(l)))
    }

    /// Measures the running pods (after `settle_s`).
    async fn measure(&self, pods: &[Pod], huskd: i32, start_ms: Vec<f64>) -> anyhow::Result<Step> {
        self.idle(Duration::from_secs(self.o.settle_s)).await;
        let n = pods.len().max(1) as f64;
        let all: Vec<i32> = pods.iter().flat_map(|p| p.pids.iter().copied()).collect();
        let (c0, h0, t0) = (
            all.iter().map(|p| cpu_ticks(*p)).sum::<u64>(),
            cpu_ticks(huskd),
            Instant::now(),
        );
        self.idle(Duration::from_secs(self.o.window_s)).await;
        let (c1, h1, secs) = (
            all.iter().map(|p| cpu_ticks(*p)).sum::<u64>(),
            cpu_ticks(huskd),
            t0.elapsed().as_secs_f64(),
        );
        let pct = |ticks: u64| ticks as f64 / clk_tck() / secs.max(1e-3) * 100.0;
        let (version_ms, list_pods_ms) = self.probe().await?;

        let mib = |b: u64| b as f64 / 1048576.0;
        let mem = memory::of_processes(all.iter().copied());
        let mut by: BTreeMap<String, f64> = BTreeMap::new();
        for p in &all {
            let (tcg, rest) = overhead_split(*p);
            if tcg > 0 {
                *by.entry("tcg cache".into()).or_default() += mib(tcg) / n;
            }
            *by.entry(process_kind(*p)).or_default() += mib(rest) / n;
        }
        Ok(Step {
            pods: pods.len(),
            start_ms: Percentiles::of(start_ms),
            guest_ram_mib: mib(mem.guest_ram_bytes) / n,
            overhead_pss_mib: mib(mem.overhead_pss_bytes) / n,
            total_pss_mib: mib(mem.guest_ram_bytes + mem.overhead_pss_bytes) / n,
            overhead_by_process_mib: by,
            idle_cpu_pct: pct(c1.saturating_sub(c0)) / n,
            huskd_cpu_pct: pct(h1.saturating_sub(h0)),
            huskd_rss_anon_mib: mib(rss_anon_bytes(huskd)),
            host_mem_available_mib: mem_available() >> 20,
            version_ms,
            list_pods_ms,
        })
    }

    /// Steps until a limit; the steps and why it stopped.
    async fn run(&self, socket: &Path, budget: u64, pods: &mut Vec<Pod>) -> (Vec<Step>, String) {
        let mut steps: Vec<Step> = vec![];
        let huskd = match huskd_pid(socket) {
            Ok(p) => p,
            Err(e) => return (steps, format!("error: {e:#}")),
        };
        let reserve = self.o.reserve_mib << 20;
        loop {
            // Would the next step pass a limit? Judge by the last step's cost per pod.
            let per_pod = steps.last().map_or(0.0, |t| t.total_pss_mib * 1048576.0);
            let mut n = self.o.step.max(1);
            if self.o.max_pods > 0 {
                n = n.min(self.o.max_pods.saturating_sub(pods.len()));
                if n == 0 {
                    return (steps, format!("max pods ({})", self.o.max_pods));
                }
            }
            if per_pod > 0.0 {
                let used = per_pod * pods.len() as f64;
                let fit = ((budget as f64 - used) / per_pod).floor().max(0.0) as usize;
                let fit_host = ((mem_available().saturating_sub(reserve)) as f64 / per_pod)
                    .floor()
                    .max(0.0) as usize;
                if fit == 0 {
                    return (steps, format!("memory budget ({} MiB)", budget >> 20));
                }
                if fit_host == 0 {
                    return (
                        steps,
                        format!("host MemAvailable reserve ({} MiB)", self.o.reserve_mib),
                    );
                }
                n = n.min(fit).min(fit_host);
            }
            let first = pods.len();
            let (times, err) = self.start(first, n, pods).await;
            if self.stopped() {
                return (steps, "interrupted".into());
            }
            if let Some(e) = err {
                // Measure what runs, then stop: the node failed to start a pod.
                if let Ok(s) = self.measure(pods, huskd, times).await {
                    steps.push(s);
                }
                return (steps, format!("a start failed: {e}"));
            }
            let s = match self.measure(pods, huskd, times).await {
                Ok(s) => s,
                Err(e) => return (steps, format!("error: {e:#}")),
            };
            let worst = s.version_ms.p99.max(s.list_pods_ms.p99);
            eprintln!(
                "density: {} pods, {:.1} MiB/pod all told, idle CPU {:.2} %/pod, p99 {:.1} ms",
                s.pods, s.total_pss_mib, s.idle_cpu_pct, worst
            );
            steps.push(s);
            if self.stopped() {
                return (steps, "interrupted".into());
            }
            if worst > self.o.p99_limit_ms {
                return (
                    steps,
                    format!("huskd p99 {worst:.1} ms > {:.0} ms", self.o.p99_limit_ms),
                );
            }
        }
    }

    /// Removes every pod the bench made, `concurrency` at a time, and counts the bench's
    /// pods huskd still lists (its pod uids carry the bench's tag). When huskd cannot list
    /// its pods, every pod not known to be removed counts as left behind.
    async fn cleanup(&self) -> (usize, usize) {
        let mut removed = 0;
        loop {
            // Also pods whose RunPodSandbox returned after an error elsewhere, by uid.
            let mut ids = self.b.made.list();
            let Some(listed) = self.listed().await else {
                return (removed, ids.len());
            };
            for p in listed {
                if !ids.contains(&p) {
                    ids.push(p);
                }
            }
            if ids.is_empty() {
                return (removed, 0);
            }
            let before = ids.len();
            for chunk in ids.chunks(self.o.concurrency.max(1)) {
                futures::future::join_all(chunk.iter().map(|p| self.b.remove(p))).await;
            }
            let Some(left) = self.listed().await else {
                return (removed, self.b.made.list().len());
            };
            removed += before - left.len().min(before);
            if left.is_empty() || left.len() >= before {
                return (removed, left.len());
            }
        }
    }

    /// The bench's pods huskd lists; `None` when it does not answer.
    async fn listed(&self) -> Option<Vec<String>> {
        let prefix = format!("husk-bench-{}-", self.b.tag);
        let r = self
            .b
            .c
            .clone()
            .runtime
            .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
            .await;
        match r {
            Ok(r) => Some(
                r.into_inner()
                    .items
                    .into_iter()
                    .filter(|p| {
                        p.metadata
                            .as_ref()
                            .is_some_and(|m| m.uid.starts_with(&prefix))
                    })
                    .map(|p| p.id)
                    .collect(),
            ),
            Err(s) => {
                tracing::warn!(error = %s.message(), "ListPodSandbox during cleanup");
                None
            }
        }
    }
}

/// Runs the density bench against huskd on `socket`; `stop` (set on Ctrl-C) ends the
/// stepping early. Pulls the image first when it is missing.
pub async fn density(
    c: &Clients,
    socket: &Path,
    o: &DensityOptions,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<DensityReport> {
    if o.step == 0 || o.probes == 0 || o.window_s == 0 {
        bail!("--step, --probes and --window must be at least 1");
    }
    super::runtime::ensure_image(&mut c.clone(), &o.image).await?;
    let budget = if o.budget_mib > 0 {
        o.budget_mib << 20
    } else {
        mem_available() / 4 * 3
    };
    let bo = BenchOptions {
        runtime: o.runtime.clone(),
        image: o.image.clone(),
        cmd: o.cmd.clone(),
        runs: 0,
        parallel: 0,
        idle: 0,
        host_network: o.host_network,
        settle: false,
    };
    let d = Density {
        b: Bench {
            c: c.clone(),
            o: &bo,
            made: Made::default(),
            tag: hex::encode(rand::random::<[u8; 4]>()),
        },
        o,
        stop,
    };
    let mut pods = vec![];
    let (steps, why) = d.run(socket, budget, &mut pods).await;
    let t = Instant::now();
    let (removed, left_behind) = d.cleanup().await;
    Ok(DensityReport {
        handler: if o.runtime.is_empty() {
            "(default)".into()
        } else {
            o.runtime.clone()
        },
        budget_mib: budget >> 20,
        p99_limit_ms: o.p99_limit_ms,
        window_s: o.window_s,
        max_pods: steps.iter().map(|s| s.pods).max().unwrap_or(pods.len()),
        steps,
        stop: why,
        removed,
        left_behind,
        cleanup_s: t.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_cpu_and_a_kind() {
        let me = std::process::id() as i32;
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(cpu_ticks(me) > 0);
        assert_eq!(cpu_ticks(i32::MAX), 0, "a gone pid");
        assert!(!process_kind(me).is_empty());
        assert!(mem_available() > 0);
        let (tcg, rest) = overhead_split(me);
        assert!(rest > 0, "{tcg} {rest}");
    }
}
