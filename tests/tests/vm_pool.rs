#![allow(clippy::unwrap_used)]
//! The warm VM pool (`[runtime.vm.pool]`) end to end on QEMU/TCG: pooled VMs boot in the
//! background, RunPodSandbox claims one (the pod's VM was running before the pod was
//! asked for), the pod works fully (hostname, DNS, a container, exec, a host-path volume),
//! the pool refills, no VM serves two pods, a pod bigger than a pooled VM boots its own,
//! `kill -9` of huskd leaves no pooled VM behind, and size 0 boots nothing.
//!
//! Needs HUSK_GUEST_KERNEL / HUSK_GUEST_INITRD and qemu-system-x86_64; prints
//! `skipped: <reason>` otherwise.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use husk_proto::cri;
use husk_tests::cri_env::CriEnv;
use husk_tests::require;
use husk_tests::runtime::{QEMU, VM_NEEDS as NEEDS, guest, vm_env_ok as env_ok};
use husk_tests::runtime::{alive, cgroup_exists, eventually};

fn config(kernel: &str, initrd: &str, pool: u32) -> String {
    format!(
        "[runtime]\ndefault_handler = \"{QEMU}\"\n[runtime.handlers]\nhusk = \"vm\"\n{QEMU} = {{ kind = \"qemu\", accel = \"tcg\" }}\nhusk-ns = \"namespace\"\n\
         [runtime.vm]\nkernel = \"{kernel}\"\ninitrd = \"{initrd}\"\nboot_timeout_ms = 120000\nmemory_mib = 256\n\
         [runtime.vm.pool]\nsize = 0\nhandlers = {{ {QEMU} = {pool} }}\n"
    )
}

async fn env(pool: u32) -> CriEnv {
    let (k, i) = guest().unwrap();
    CriEnv::new(QEMU, &config(&k, &i, pool)).await
}

/// The husk-qemu pool's stats from Status (verbose).
async fn pool_stats(e: &CriEnv) -> serde_json::Value {
    let st = e.status_verbose().await;
    let pools: serde_json::Value = serde_json::from_str(&st.info["vmPools"]).unwrap();
    pools
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["handler"] == QEMU)
        .cloned()
        .unwrap_or(serde_json::Value::Null)
}

async fn wait_ready(e: &CriEnv, n: u64) {
    let t = Instant::now();
    loop {
        let s = pool_stats(e).await;
        if s["ready"].as_u64() == Some(n) {
            eprintln!("pool: {n} ready after {:?}", t.elapsed());
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(240),
            "pool never had {n} ready VMs: {s}\n{}",
            e.d.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Seconds since boot at which `pid` started.
fn started_at(pid: i32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<&str> = s.rsplit_once(") ").unwrap().1.split_whitespace().collect();
    let ticks: f64 = f[19].parse().unwrap();
    // SAFETY: sysconf has no memory effects.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn uptime() -> f64 {
    std::fs::read_to_string("/proc/uptime")
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// (pid, start time) of every process the huskd of `run_dir` marked.
fn marked(run_dir: &Path) -> Vec<(i32, u64, String)> {
    husk_host::sandbox::orphans::scan(run_dir)
        .into_iter()
        .map(|m| (m.pid, m.start_time, m.pod))
        .collect()
}

#[tokio::test]
async fn vm_pool_claim_refill_and_no_reuse() {
    require!(env_ok(), NEEDS);
    let e = env(2).await;
    wait_ready(&e, 2).await;

    // A pod on a pooled VM: hostname, DNS, a container with a host-path volume, exec.
    let vol = tempfile::tempdir().unwrap();
    std::fs::write(vol.path().join("in.txt"), "from-host\n").unwrap();
    let mut cfg = e.pod("pooled-a");
    cfg.hostname = "pool-a".into();
    cfg.dns_config = Some(cri::DnsConfig {
        servers: vec!["192.0.2.53".into()],
        searches: vec!["pool.example".into()],
        options: vec![],
    });
    let asked = uptime();
    let t = Instant::now();
    let a = e.run_pod(&cfg).await.unwrap();
    let ready = t.elapsed();
    let mut ctr = e.ctr("main", &["sleep", "1000"]);
    ctr.mounts = vec![cri::Mount {
        container_path: "/vol".into(),
        host_path: vol.path().display().to_string(),
        ..Default::default()
    }];
    let c = e.run(&a, &ctr, &cfg).await;
    let running = t.elapsed();
    eprintln!("pooled pod: Ready {ready:?}, first container running {running:?}");
    let a_pids = e.vm_pids(&a).await;
    assert!(
        started_at(a_pids[0]) < asked,
        "the pod's VMM started before RunPodSandbox was called (a pooled VM)"
    );
    let s = pool_stats(&e).await;
    assert_eq!(s["claimed"], 1, "{s}");
    assert_eq!(e.sh(&c, "hostname").await.trim(), "pool-a");
    let resolv = e.sh(&c, "cat /etc/resolv.conf").await;
    assert!(
        resolv.contains("192.0.2.53") && resolv.contains("pool.example"),
        "{resolv}"
    );
    assert_eq!(e.sh(&c, "cat /vol/in.txt").await.trim(), "from-host");
    e.sh(&c, "echo from-guest > /vol/out.txt").await;
    assert_eq!(
        std::fs::read_to_string(vol.path().join("out.txt"))
            .unwrap()
            .trim(),
        "from-guest"
    );
    // The VM runs in the pod's cgroup (the pool's cgroup for this id is the pod's).
    assert!(cgroup_exists(&format!("husk/{a}")));

    // Second pod: the other pooled VM, not A's.
    let b_cfg = e.pod("pooled-b");
    let b = e.run_pod(&b_cfg).await.unwrap();
    let b_pids = e.vm_pids(&b).await;
    assert_ne!(a_pids[0], b_pids[0]);
    assert_eq!(pool_stats(&e).await["claimed"], 2);
    let cb = e.run(&b, &e.ctr("main", &["sleep", "1000"]), &b_cfg).await;
    assert_eq!(e.sh(&cb, "echo ok").await.trim(), "ok");

    // The pool refills in the background.
    wait_ready(&e, 2).await;

    // A pod asking for more memory than a pooled VM has boots its own VM.
    let big = e.pod_with_memory_limit("big", 64 << 20);
    let asked = uptime();
    let g = e.run_pod(&big).await.unwrap();
    let g_pids = e.vm_pids(&g).await;
    assert!(started_at(g_pids[0]) >= asked - 0.05, "a VM of its own");
    let s = pool_stats(&e).await;
    assert_eq!(s["tooBig"], 1, "{s}");
    assert_eq!(s["claimed"], 2, "{s}");

    // Removed pods' VMs are gone for good; a new pod never gets one of them.
    let mut seen: HashSet<i32> = [a_pids[0], b_pids[0], g_pids[0]].into();
    for p in [&a, &b, &g] {
        e.stop_and_remove_pod(p).await;
    }
    eventually(
        "removed pods' VMs exit",
        Duration::from_secs(20),
        || async { seen.iter().all(|p| !alive(*p)) },
    )
    .await;
    for n in 0..2 {
        let cfg = e.pod(&format!("again-{n}"));
        let p = e.run_pod(&cfg).await.unwrap();
        let vmm = e.vm_pids(&p).await[0];
        assert!(seen.insert(vmm), "VMM {vmm} served an earlier pod");
        e.stop_and_remove_pod(&p).await;
    }
    assert!(pool_stats(&e).await["claimed"].as_u64().unwrap() >= 3);
    assert!(!cgroup_exists(&format!("husk/{a}")), "pod cgroup left");
}

#[tokio::test]
async fn vm_pool_kill9_leaves_no_pooled_vm() {
    require!(env_ok(), NEEDS);
    let mut e = env(1).await;
    wait_ready(&e, 1).await;
    let run = e.d.run_dir();
    let before = marked(&run);
    assert!(!before.is_empty(), "the pooled VM's processes are marked");
    let pooled: HashSet<String> = before.iter().map(|m| m.2.clone()).collect();
    assert_eq!(pooled.len(), 1, "{before:?}");
    let id = pooled.iter().next().unwrap().clone();
    assert!(cgroup_exists(&format!("husk/{id}")));
    e.d.crash_and_restart().await.unwrap();
    e.c = e.d.clients().await.unwrap();
    // The old pooled VM is killed and cleaned (no pod record names it); a new one boots.
    for (pid, _, _) in &before {
        assert!(!alive(*pid), "pooled VM process {pid} survived the restart");
    }
    assert!(!run.join("vm").join(&id[..16]).exists(), "run dir left");
    assert!(!cgroup_exists(&format!("husk/{id}")), "cgroup left");
    wait_ready(&e, 1).await;
    let after = marked(&run);
    assert!(after.iter().all(|m| m.2 != id), "{after:?}");
    // And it serves a pod.
    let cfg = e.pod("after-crash");
    let p = e.run_pod(&cfg).await.unwrap();
    let c = e.run(&p, &e.ctr("main", &["sleep", "1000"]), &cfg).await;
    assert_eq!(e.sh(&c, "echo ok").await.trim(), "ok");
    assert_eq!(pool_stats(&e).await["claimed"], 1);
    e.stop_and_remove_pod(&p).await;
}

#[tokio::test]
async fn vm_pool_zero_boots_nothing() {
    require!(env_ok(), NEEDS);
    let e = env(0).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(marked(&e.d.run_dir()).is_empty(), "no VM without a pod");
    assert_eq!(pool_stats(&e).await, serde_json::Value::Null);
    let asked = uptime();
    let cfg = e.pod("cold");
    let p = e.run_pod(&cfg).await.unwrap();
    let vmm = e.vm_pids(&p).await[0];
    assert!(started_at(vmm) >= asked - 0.05, "booted for the pod");
    e.stop_and_remove_pod(&p).await;
    assert!(marked(&e.d.run_dir()).is_empty());
}

/// The image disks (`blk-…`) plugged into the VM of pod `id` (QMP `query-pci`).
async fn image_disks(run_dir: &Path, id: &str) -> Vec<String> {
    use husk_host::sandbox::vm::qemu::qmp::Qmp;
    let sock = husk_host::sandbox::vm::jail::sock_dir(&run_dir.join("vm").join(&id[..16]))
        .join("qmp.sock");
    let mut q = Qmp::connect(&sock, Duration::from_secs(10)).await.unwrap();
    let pci = q.execute("query-pci", serde_json::json!({})).await.unwrap();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        for d in v.as_array().into_iter().flatten() {
            if let Some(id) = d["qdev_id"].as_str().filter(|i| i.starts_with("blk-")) {
                out.push(id.to_string());
            }
            walk(&d["pci_bridge"]["devices"], out);
        }
    }
    let mut out = vec![];
    for bus in pci.as_array().into_iter().flatten() {
        walk(&bus["devices"], &mut out);
    }
    out
}

#[tokio::test]
async fn vm_pool_attaches_configured_images_before_a_pod_asks() {
    require!(env_ok(), NEEDS);
    let (k, i) = guest().unwrap();
    let reg = husk_tests::cri_env::busybox_registry().await;
    let image = format!("{}/e2e/busybox:1", reg.addr);
    let extra = format!("{}images = [\"{image}\"]\n", config(&k, &i, 1));
    let d = husk_tests::huskd::Huskd::start_with(
        husk_tests::huskd::Options::plain_http(&reg.addr),
        &extra,
    )
    .await
    .unwrap();
    // Pulls the image; the first pooled VM may have booted before that.
    let e = CriEnv::with_server(reg, d, QEMU).await;
    assert_eq!(e.image, image);
    wait_ready(&e, 1).await;
    let first = e.run_pod(&e.pod("first")).await.unwrap();
    // The refill boots after the pull: it gets the image's disk while it waits.
    wait_ready(&e, 1).await;
    let cfg = e.pod("warm");
    let p = e.run_pod(&cfg).await.unwrap();
    assert_eq!(pool_stats(&e).await["claimed"], 2);
    let run = e.d.run_dir();
    let before = image_disks(&run, &p).await;
    assert_eq!(
        before.len(),
        1,
        "the pooled VM holds the image disk before any container: {before:?}"
    );
    let t = Instant::now();
    let c = e.run(&p, &e.ctr("main", &["sleep", "1000"]), &cfg).await;
    eprintln!(
        "first container on a pooled VM with its image attached: running after {:?}",
        t.elapsed()
    );
    assert_eq!(e.sh(&c, "echo ok").await.trim(), "ok");
    assert_eq!(
        image_disks(&run, &p).await,
        before,
        "no disk hot-plugged for the container"
    );
    for p in [&p, &first] {
        e.stop_and_remove_pod(p).await;
    }
}

/// A pooled VM rehearses a pod start after its boot (a throwaway sandbox and container in
/// the guest, so QEMU/TCG has translated that code before a pod needs it), and nothing of
/// the rehearsal is left for the pod that claims it: no mount, cgroup, state or process,
/// and the pod's sandbox still gets the spare namespace holder.
#[tokio::test]
async fn vm_pool_rehearses_a_pod_start_and_keeps_nothing_of_it() {
    require!(env_ok(), NEEDS);
    let e = env(1).await;
    wait_ready(&e, 1).await;
    // The waiting VM's cgroup has the least CPU weight (its boot and rehearsal ran on
    // what pods leave); the claim gives the default back.
    let waiting = marked(&e.d.run_dir())
        .first()
        .map(|m| m.2.clone())
        .expect("the pooled VM's processes");
    assert_eq!(cpu_weight(&format!("husk/{waiting}")), Some(Weight::Least));
    // Pid namespace POD: in a VM that is the guest's own, so the container sees the
    // agent as PID 1 (and, privileged, its mounts and root).
    let pod_ns = cri::NamespaceOption {
        pid: cri::NamespaceMode::Pod as i32,
        ..Default::default()
    };
    let mut cfg = e.pod("rehearsed");
    cfg.linux = Some(cri::LinuxPodSandboxConfig {
        security_context: Some(cri::LinuxSandboxSecurityContext {
            privileged: true,
            namespace_options: Some(pod_ns.clone()),
            ..Default::default()
        }),
        ..Default::default()
    });
    let p = e.run_pod(&cfg).await.unwrap();
    assert_eq!(pool_stats(&e).await["claimed"], 1, "a pooled VM");
    assert_eq!(p, waiting, "the pod took the pooled VM's id");
    assert_eq!(cpu_weight(&format!("husk/{p}")), Some(Weight::Default));
    let console = e.d.run_dir().join("vm").join(&p[..16]).join("console.log");
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(
        log.contains("rehearsal done"),
        "the pooled VM rehearsed before the claim: {}",
        console.display()
    );
    let mut ctr = e.ctr("look", &["sleep", "1000"]);
    ctr.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            privileged: true,
            namespace_options: Some(pod_ns),
            ..Default::default()
        }),
        ..Default::default()
    });
    let c = e.run(&p, &ctr, &cfg).await;
    // The guest's agent, its mounts, state and cgroups, seen from the pod.
    let comm = e.sh(&c, "cat /proc/1/cmdline | tr '\\0' ' '").await;
    assert!(comm.starts_with("/init"), "PID 1 is the agent: {comm:?}");
    let mounts = e.sh(&c, "cat /proc/1/mountinfo").await;
    assert!(
        !mounts.contains("rehearsal"),
        "a rehearsal mount is left:\n{mounts}"
    );
    assert!(
        mounts.contains(&p),
        "the pod's own sandbox mounts are there:\n{mounts}"
    );
    let state = e.sh(&c, "ls /proc/1/root/run/husk-agent").await;
    assert!(
        !state.contains("rehearsal"),
        "rehearsal state is left: {state}"
    );
    let cgroups = e.sh(&c, "ls /proc/1/root/sys/fs/cgroup/husk").await;
    assert!(
        !cgroups.contains("rehearsal"),
        "a rehearsal cgroup is left: {cgroups}"
    );
    // The guest's cgroup2 keeps `favordynmods` (cgroup moves without an RCU grace period)
    // through the rehearsal's container and this privileged one: containers mount cgroup2
    // in a cgroup namespace of their own, or bind the guest's (a new mount in the initial
    // namespace would re-apply its options to the whole hierarchy).
    let cg2 = e
        .sh(&c, "grep ' - cgroup2 ' /proc/1/mountinfo | head -n 1")
        .await;
    assert!(cg2.contains("favordynmods"), "{cg2}");
    // An unprivileged container has a cgroup namespace of its own (containerd's rule on
    // cgroup v2).
    let plain = e.run(&p, &e.ctr("plain", &["sleep", "1000"]), &cfg).await;
    assert_eq!(e.sh(&plain, "cat /proc/self/cgroup").await.trim(), "0::/");
    // Processes: the agent, the pod's holder, this container's sleep and the exec'd sh;
    // no rehearsal holder or container.
    let procs = e
        .sh(
            &c,
            "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done | grep -v '^$'",
        )
        .await;
    let holders = procs.lines().filter(|l| l.contains("__init")).count();
    assert_eq!(holders, 1, "one namespace holder, the pod's:\n{procs}");
    assert!(!procs.contains("__rehearsal"), "{procs}");
    // The pod's sandbox took the holder spawned ahead (the rehearsal left it alone).
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    let created = log
        .lines()
        .find(|l| l.contains("sandbox created") && l.contains(&p))
        .unwrap_or_else(|| panic!("no sandbox created line for {p} in {}", console.display()));
    assert!(created.contains("spare_used=true"), "{created}");
    e.stop_and_remove_pod(&p).await;
}

#[derive(Debug, PartialEq, Eq)]
enum Weight {
    Least,
    Default,
    Other(String),
}

/// The CPU weight of host cgroup `rel` (v1 cpu.shares or v2 cpu.weight), if it has one.
fn cpu_weight(rel: &str) -> Option<Weight> {
    let root = Path::new("/sys/fs/cgroup");
    let (file, least, default) = if root.join("cgroup.procs").exists() {
        (root.join(rel).join("cpu.weight"), "1", "100")
    } else {
        (root.join("cpu").join(rel).join("cpu.shares"), "2", "1024")
    };
    let v = std::fs::read_to_string(file).ok()?;
    Some(match v.trim() {
        x if x == least => Weight::Least,
        x if x == default => Weight::Default,
        x => Weight::Other(x.to_string()),
    })
}
