#![allow(clippy::unwrap_used)]
//! huskd's Prometheus endpoint (`[metrics] address`) end to end: a real huskd
//! runs a pod lifecycle (husk-ns; a VM pod on husk-qemu/TCG when the guest
//! artefacts are there), then the test scrapes `GET /metrics` over TCP and
//! checks the numbers against the calls it made.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::Duration;

use husk_proto::cri;
use husk_tests::cri_env::CriEnv;
use husk_tests::require;
use husk_tests::runtime::{NS, NS_NEEDS, QEMU, VM_NEEDS, code_of, guest, ns_env_ok, vm_env_ok};
use tonic::Code;

const METRICS: &str = "[metrics]\naddress = \"127.0.0.1:0\"\n";
const RT: &str = "runtime.v1.RuntimeService";

/// huskd's log without ANSI colour sequences (huskd colours only a terminal,
/// but the check costs nothing).
fn plain_log(e: &CriEnv) -> String {
    let mut plain = String::new();
    let mut esc = false;
    for ch in e.d.log().chars() {
        match (esc, ch) {
            (false, '\x1b') => esc = true,
            (true, 'm') => esc = false,
            (true, _) => {}
            (false, c) => plain.push(c),
        }
    }
    plain
}

/// The address huskd logged for its metrics endpoint.
fn metrics_address(e: &CriEnv) -> String {
    let log = plain_log(e);
    let line = log
        .lines()
        .find(|l| l.contains("serving metrics"))
        .unwrap_or_else(|| panic!("no metrics endpoint in huskd's log:\n{log}"));
    let at = line.find("address=").unwrap() + "address=".len();
    line[at..].split_whitespace().next().unwrap().to_string()
}

/// One scrape over a plain TCP connection: (status line, headers, body).
fn get(addr: &str, path: &str) -> (String, String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_string(), headers.to_lowercase(), body.to_string())
}

/// A parsed exposition: `name{labels}` → value.
struct Scrape(BTreeMap<String, f64>);

impl Scrape {
    fn of(addr: &str) -> Scrape {
        let (status, headers, body) = get(addr, "/metrics");
        assert!(status.contains(" 200 "), "{status}\n{body}");
        assert!(
            headers.contains("content-type: application/openmetrics-text"),
            "{headers}"
        );
        assert!(body.ends_with("# EOF\n"), "{body}");
        let mut m = BTreeMap::new();
        for l in body
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (k, v) = l.rsplit_once(' ').unwrap();
            m.insert(k.to_string(), v.parse::<f64>().unwrap());
        }
        Scrape(m)
    }

    /// The value of the one series `name` whose labels include all of `labels` (0 if none).
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let hits: Vec<_> = self
            .0
            .iter()
            .filter(|(k, _)| {
                let (n, l) = k.split_once('{').unwrap_or((k, ""));
                n == name
                    && labels
                        .iter()
                        .all(|(lk, lv)| l.contains(&format!("{lk}=\"{lv}\"")))
            })
            .collect();
        assert!(hits.len() <= 1, "{name} {labels:?} matches {hits:?}");
        hits.first().map_or(0.0, |(_, v)| **v)
    }

    fn calls(&self, method: &str, code: &str) -> f64 {
        self.get(
            "husk_cri_requests_total",
            &[("service", RT), ("method", method), ("code", code)],
        )
    }

    fn phases(&self, handler: &str, phase: &str) -> f64 {
        self.get(
            "husk_pod_start_phase_seconds_count",
            &[("handler", handler), ("phase", phase)],
        )
    }
}

async fn container_status(e: &CriEnv, id: &str) -> Result<cri::ContainerStatus, tonic::Status> {
    e.c.runtime
        .clone()
        .container_status(cri::ContainerStatusRequest {
            container_id: id.into(),
            verbose: false,
        })
        .await
        .map(|r| r.into_inner().status.unwrap())
}

#[tokio::test]
async fn scrape_after_a_namespace_pod_lifecycle() {
    require!(ns_env_ok(), NS_NEEDS);
    let e = CriEnv::new(NS, METRICS).await;
    let addr = metrics_address(&e);

    // CriEnv pulled busybox: one pull that downloaded its blobs.
    let s0 = Scrape::of(&addr);
    assert_eq!(s0.get("husk_image_pulls_total", &[("result", "ok")]), 1.0);
    assert_eq!(s0.get("husk_image_pull_duration_seconds_count", &[]), 1.0);
    let blobs: u64 = std::fs::read_dir(e.d.images_dir().join("blobs/sha256"))
        .unwrap()
        .map(|f| f.unwrap().metadata().unwrap().len())
        .sum();
    assert_eq!(
        s0.get("husk_image_pull_bytes_total", &[]) as u64,
        blobs,
        "bytes downloaded = the blobs stored"
    );
    assert_eq!(s0.calls("RunPodSandbox", "OK"), 0.0);

    // The lifecycle, one call each, plus a restart (attempt 1) of the container.
    let pcfg = e.pod("metrics");
    let pod = e.run_pod(&pcfg).await.unwrap();
    let c1 = e
        .create(&pod, &e.ctr("one", &["sleep", "1000"]), &pcfg)
        .await
        .unwrap();
    e.start(&c1).await.unwrap();
    let mut again = e.ctr("one", &["sleep", "1000"]);
    again.metadata.as_mut().unwrap().attempt = 1;
    let c2 = e.create(&pod, &again, &pcfg).await.unwrap();
    // Two calls that fail: NotFound and FailedPrecondition (start twice).
    assert_eq!(
        code_of(container_status(&e, "nonexistent").await),
        Code::NotFound
    );
    assert_eq!(code_of(e.start(&c1).await), Code::FailedPrecondition);

    let s1 = Scrape::of(&addr);
    assert_eq!(
        s1.get("husk_pods", &[("handler", NS), ("state", "ready")]),
        1.0
    );
    assert_eq!(
        s1.get("husk_containers", &[("handler", NS), ("state", "running")]),
        1.0
    );
    assert_eq!(
        s1.get("husk_containers", &[("handler", NS), ("state", "created")]),
        1.0
    );
    let mem = |part| {
        s1.get(
            "husk_pod_memory_bytes",
            &[("pod", &pod), ("handler", NS), ("part", part)],
        )
    };
    assert_eq!(mem("guest_ram"), 0.0, "no guest in a namespace pod");
    assert!(mem("overhead_pss") > 0.0 && mem("overhead_rss") >= mem("overhead_pss"));
    for phase in [
        "network",
        "spawn",
        "agent_ready",
        "sandbox_create",
        "total",
        "first_container_create",
        "first_container_start",
    ] {
        assert_eq!(s1.phases(NS, phase), 1.0, "{phase}");
    }
    assert!(
        s1.get(
            "husk_pod_start_phase_seconds_sum",
            &[("handler", NS), ("phase", "total")]
        ) > 0.0
    );
    assert_eq!(
        s1.get("husk_container_restarts_total", &[("handler", NS)]),
        1.0
    );
    assert_eq!(s1.calls("ContainerStatus", "NotFound"), 1.0);
    assert_eq!(
        s1.get(
            "husk_cri_request_errors_total",
            &[
                ("service", RT),
                ("method", "ContainerStatus"),
                ("code", "NotFound")
            ]
        ),
        1.0
    );
    assert_eq!(
        s1.get(
            "husk_cri_request_errors_total",
            &[
                ("service", RT),
                ("method", "StartContainer"),
                ("code", "FailedPrecondition")
            ]
        ),
        1.0
    );

    e.stop_container(&c1, 0).await.unwrap();
    for c in [&c1, &c2] {
        e.c.runtime
            .clone()
            .remove_container(cri::RemoveContainerRequest {
                container_id: c.to_string(),
            })
            .await
            .unwrap();
    }
    let mut rt = e.c.runtime.clone();
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .unwrap();
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .unwrap();

    let s2 = Scrape::of(&addr);
    for (method, n) in [
        ("RunPodSandbox", 1.0),
        ("CreateContainer", 2.0),
        ("StartContainer", 1.0),
        ("StopContainer", 1.0),
        ("RemoveContainer", 2.0),
        ("StopPodSandbox", 1.0),
        ("RemovePodSandbox", 1.0),
    ] {
        assert_eq!(s2.calls(method, "OK"), n, "{method}");
        assert_eq!(
            s2.get(
                "husk_cri_request_duration_seconds_count",
                &[("service", RT), ("method", method)]
            ),
            n + if method == "StartContainer" { 1.0 } else { 0.0 },
            "{method}: every call is timed, failed ones too"
        );
    }
    assert!(
        s2.get(
            "husk_cri_request_duration_seconds_sum",
            &[("service", RT), ("method", "RunPodSandbox")]
        ) > 0.0
    );
    assert_eq!(
        s2.get(
            "husk_sandbox_exits_total",
            &[("handler", NS), ("reason", "stopped")]
        ),
        1.0
    );
    assert_eq!(
        s2.get(
            "husk_sandbox_exits_total",
            &[("handler", NS), ("reason", "died")]
        ),
        0.0
    );
    // Nothing left: the gauges are rebuilt from what exists.
    assert_eq!(
        s2.get("husk_pods", &[("handler", NS), ("state", "ready")]),
        0.0
    );
    assert_eq!(
        s2.get(
            "husk_pod_memory_bytes",
            &[("pod", &pod), ("part", "overhead_pss")]
        ),
        0.0
    );
    // The first-container phases are reported once per pod.
    assert_eq!(s2.phases(NS, "first_container_create"), 1.0);

    // Only GET /metrics is served.
    assert!(get(&addr, "/").0.contains(" 404 "));
    // The log carries the ids on the call's span.
    let log = plain_log(&e);
    assert!(!e.d.log().contains('\x1b'), "no colour in a log file");
    assert!(
        log.lines()
            .any(|l| l.contains("rpc{method=CreateContainer pod=") && l.contains(&pod)),
        "no CreateContainer line with the pod id in its span:\n{log}"
    );
}

#[tokio::test]
async fn metrics_are_off_by_default() {
    require!(ns_env_ok(), NS_NEEDS);
    let e = CriEnv::new(NS, "").await;
    assert!(!e.d.log().contains("serving metrics"), "{}", e.d.log());
}

#[tokio::test]
async fn scrape_a_vm_pod() {
    require!(vm_env_ok(), VM_NEEDS);
    let (k, i) = guest().unwrap();
    let cfg = format!(
        "{METRICS}[runtime]\ndefault_handler = \"{QEMU}\"\n[runtime.handlers]\n{QEMU} = {{ kind = \"qemu\", accel = \"tcg\" }}\n\
         [runtime.vm]\nkernel = \"{k}\"\ninitrd = \"{i}\"\nboot_timeout_ms = 90000\nmemory_mib = 256\n"
    );
    let e = CriEnv::new(QEMU, &cfg).await;
    let addr = metrics_address(&e);
    let pcfg = e.pod("vm-metrics");
    let pod = e
        .run_pod(&pcfg)
        .await
        .unwrap_or_else(|s| panic!("{s:?}\n{}", e.d.log()));
    let s = Scrape::of(&addr);
    for phase in ["network", "spawn", "agent_ready", "sandbox_create", "total"] {
        assert_eq!(s.phases(QEMU, phase), 1.0, "{phase}");
    }
    // Booting a guest on TCG takes longer than spawning QEMU.
    let sum = |p| {
        s.get(
            "husk_pod_start_phase_seconds_sum",
            &[("handler", QEMU), ("phase", p)],
        )
    };
    assert!(
        sum("agent_ready") > sum("spawn"),
        "{} {}",
        sum("agent_ready"),
        sum("spawn")
    );
    let mem = |part| {
        s.get(
            "husk_pod_memory_bytes",
            &[("pod", &pod), ("handler", QEMU), ("part", part)],
        )
    };
    assert!(
        mem("guest_ram") > (1 << 20) as f64,
        "guest RAM touched: {}",
        mem("guest_ram")
    );
    assert!(
        mem("guest_ram") <= (256u64 << 20) as f64 * 1.1,
        "{}",
        mem("guest_ram")
    );
    assert!(mem("overhead_pss") > 0.0);
    assert_eq!(
        s.get("husk_pods", &[("handler", QEMU), ("state", "ready")]),
        1.0
    );
    eprintln!(
        "husk-qemu pod: agent_ready {:.2}s, total {:.2}s, guest RAM {:.1} MiB, overhead PSS {:.1} MiB",
        sum("agent_ready"),
        sum("total"),
        mem("guest_ram") / 1048576.0,
        mem("overhead_pss") / 1048576.0
    );

    // The VMM dies: counted as a death, the pod turns NotReady.
    let vmm = e.agent_pid(&pod).await;
    // SAFETY: kill(2) on the pod's QEMU, a process this test's huskd started.
    unsafe { libc::kill(vmm, libc::SIGKILL) };
    let mut died = 0.0;
    for _ in 0..100 {
        died = Scrape::of(&addr).get(
            "husk_sandbox_exits_total",
            &[("handler", QEMU), ("reason", "died")],
        );
        if died > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(died, 1.0, "{}", e.d.log());
    let s = Scrape::of(&addr);
    assert_eq!(
        s.get("husk_pods", &[("handler", QEMU), ("state", "notready")]),
        1.0
    );
    let mut rt = e.c.runtime.clone();
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .unwrap();
}

/// The warm pool's series after real pooled pods (husk-qemu on TCG, pool of 1): the ready
/// gauge before a claim, a claim, a cold boot of a pod too big for a warm VM, and every count
/// equal to what Status (verbose) reports for the pool.
#[tokio::test]
async fn scrape_a_pooled_vm_pod() {
    require!(vm_env_ok(), VM_NEEDS);
    let (k, i) = guest().unwrap();
    let cfg = format!(
        "{METRICS}[runtime]\ndefault_handler = \"{QEMU}\"\n[runtime.handlers]\n{QEMU} = {{ kind = \"qemu\", accel = \"tcg\" }}\n\
         [runtime.vm]\nkernel = \"{k}\"\ninitrd = \"{i}\"\nboot_timeout_ms = 120000\nmemory_mib = 256\n\
         [runtime.vm.pool]\nsize = 0\nhandlers = {{ {QEMU} = 1 }}\n"
    );
    let e = CriEnv::new(QEMU, &cfg).await;
    let addr = metrics_address(&e);
    let h = [("handler", QEMU)];
    let t = std::time::Instant::now();
    while Scrape::of(&addr).get("husk_vm_pool_ready", &h) < 1.0 {
        assert!(
            t.elapsed() < Duration::from_secs(240),
            "no warm VM: {}",
            e.d.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let s = Scrape::of(&addr);
    assert_eq!(s.get("husk_vm_pool_claims_total", &h), 0.0);
    assert_eq!(
        s.get("husk_vm_pool_booting", &h),
        0.0,
        "a pool of 1 is full"
    );

    let a = e
        .run_pod(&e.pod("pooled"))
        .await
        .unwrap_or_else(|s| panic!("{s:?}\n{}", e.d.log()));
    let s = Scrape::of(&addr);
    assert_eq!(s.get("husk_vm_pool_claims_total", &h), 1.0);

    // More memory than a warm VM has: a VM of its own.
    let big = e.pod_with_memory_limit("big", 64 << 20);
    let b = e
        .run_pod(&big)
        .await
        .unwrap_or_else(|s| panic!("{s:?}\n{}", e.d.log()));
    let s = Scrape::of(&addr);
    let cold = |reason| {
        s.get(
            "husk_vm_pool_cold_boots_total",
            &[("handler", QEMU), ("reason", reason)],
        )
    };
    assert_eq!(cold("too_small"), 1.0);
    assert_eq!(s.get("husk_vm_pool_claims_total", &h), 1.0);

    // The same numbers as the pool's own stats (nothing runs a pod in between).
    let st = e.status_verbose().await;
    let pools: serde_json::Value = serde_json::from_str(&st.info["vmPools"]).unwrap();
    let p = pools
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["handler"] == QEMU)
        .unwrap();
    let n = |k: &str| p[k].as_f64().unwrap();
    assert_eq!(s.get("husk_vm_pool_claims_total", &h), n("claimed"), "{p}");
    assert_eq!(cold("empty"), n("empty"), "{p}");
    assert_eq!(cold("too_small"), n("tooBig"), "{p}");
    assert_eq!(
        s.get("husk_vm_pool_refill_failures_total", &h),
        n("bootFailures"),
        "{p}"
    );
    assert_eq!(
        s.get("husk_vm_pool_discards_total", &h),
        n("discarded"),
        "{p}"
    );
    eprintln!("pool after 2 pods: {p}");
    for id in [a, b] {
        e.stop_and_remove_pod(&id).await;
    }
}
