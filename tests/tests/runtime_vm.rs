#![allow(clippy::unwrap_used)]
//! CRI RuntimeService end to end with the VM sandbox on QEMU/TCG (handler
//! `husk-qemu`, accel tcg): a real guest kernel (images/), the real
//! husk-agent as the guest's PID 1, husk-vmm's virtio-vsock device over
//! vhost-user, image rootfs as erofs disks hot-plugged through QMP.
//! With `HUSK_VM_HANDLER=husk` the same tests run on husk-vmm (handler `husk`:
//! in-process vsock and virtio-fs, image disks in disk slots), where a Linux
//! guest boots on /dev/kvm (hardware KVM, or the nested L1 of
//! tests/nested/husk-suite.sh).
//!
//! Needs HUSK_GUEST_KERNEL / HUSK_GUEST_INITRD (tests/run.sh builds them)
//! and qemu-system-x86_64; prints `skipped: <reason>` otherwise.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use husk_proto::cri;
use husk_tests::cri_env::CriEnv;
use husk_tests::oci::{Compression, ImageSpec, Layer, Pusher, build_image, busybox_layer, file};
use husk_tests::registry;
use husk_tests::require;
use husk_tests::runtime::{
    VM_HANDLERS, VM_NEEDS as NEEDS, guest, on_husk_vmm, vm_env_ok as env_ok, vm_handler, vm_kind,
};
use husk_tests::runtime::{
    alive, cgroup_exists, container_status, eventually, info, log_records, pod_status, wait_exited,
};
use tonic::Code;

/// huskd config: the suite's VM handler (husk-qemu on TCG unless HUSK_VM_HANDLER) is the default.
fn vm_config(kernel: &str, initrd: &str, boot_timeout_ms: u64) -> String {
    format!(
        "[runtime]\ndefault_handler = \"{h}\"\n[runtime.handlers]\n{VM_HANDLERS}husk-ns = \"namespace\"\n\
         [runtime.vm]\nkernel = \"{kernel}\"\ninitrd = \"{initrd}\"\nboot_timeout_ms = {boot_timeout_ms}\nmemory_mib = 256\n",
        h = vm_handler()
    )
}

async fn vm_env() -> CriEnv {
    let (k, i) = guest().unwrap();
    CriEnv::new(vm_handler(), &vm_config(&k, &i, 90_000)).await
}

/// Pushes and pulls `repo:1`: busybox plus a layer with `/marker` holding `marker`.
async fn marked_image(e: &CriEnv, repo: &str, marker: &str) -> String {
    let img = build_image(&ImageSpec {
        layers: vec![
            busybox_layer(Compression::Gzip).unwrap(),
            Layer {
                entries: vec![file("marker", format!("{marker}\n"))],
                compression: Compression::Gzip,
            },
        ],
        ..Default::default()
    });
    Pusher::new(&e.reg.addr, None)
        .push_image(repo, Some("1"), &img)
        .await
        .unwrap();
    let r = format!("{}/{repo}:1", e.reg.addr);
    e.pull(&r).await;
    r
}

fn host_file(p: &str) -> String {
    std::fs::read_to_string(p).unwrap().trim().to_string()
}

fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// A VM process is jailed (docs/security.md, "VMM and helper jail"): a uid and gid of the
/// jail range (default base), no_new_privs, a seccomp filter, no capability (the virtio-fs
/// server keeps its five file ones), and a root of its own without the host's /etc.
/// Returns its uid.
fn assert_jailed(pid: i32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let f = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .map(|l| l[k.len()..].trim().to_string())
            .unwrap_or_default()
    };
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let what = format!("pid {pid} ({}): {status}", comm(pid));
    let ids: Vec<u32> = [f("Uid:"), f("Gid:")]
        .join(" ")
        .split_whitespace()
        .map(|u| u.parse().unwrap())
        .collect();
    assert_eq!(ids.len(), 8, "{what}");
    assert!(
        ids.iter().all(|u| *u == ids[0] && *u >= 0x7000_0000),
        "{what}"
    );
    assert_eq!(f("NoNewPrivs:"), "1", "{what}");
    assert_eq!(f("Seccomp:"), "2", "{what}");
    // QEMU's vhost-user fs server, or husk-vmm serving virtio-fs in process (`--fs`).
    let cmd = String::from_utf8_lossy(&cmd);
    let fs_server = cmd.contains("vhost-user\0fs") || cmd.contains("\0--fs\0");
    let caps = if fs_server {
        "000000000000001f"
    } else {
        "0000000000000000"
    };
    assert_eq!(f("CapEff:"), caps, "{what}");
    assert_eq!(f("CapBnd:"), caps, "{what}");
    // husk-vmm's vCPU threads (where the guest's port and MMIO writes are decoded) hold no
    // capability, also when its event loop keeps the file server's.
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let st = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let tf = |k: &str| {
            st.lines()
                .find(|l| l.starts_with(k))
                .map(|l| l[k.len()..].trim().to_string())
                .unwrap_or_default()
        };
        if tf("Name:").starts_with("vcpu") {
            assert_eq!(tf("CapEff:"), "0000000000000000", "{what}: {st}");
        }
    }
    let root: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for want in ["usr", "dev", "proc"] {
        assert!(
            root.iter().any(|e| e == want),
            "no /{want} in {root:?}: {what}"
        );
    }
    for host in ["etc", "root", "home", "boot", "sys"] {
        assert!(
            !root.iter().any(|e| e == host),
            "host /{host} in {root:?}: {what}"
        );
    }
    ids[0]
}

/// After RemovePodSandbox: no process, run dir or cgroup of the pod left.
async fn assert_pod_gone(e: &CriEnv, pod: &str, pids: &[i32]) {
    let dir = e.d.run_dir().join("vm").join(&pod[..16]);
    eventually("VM processes gone", Duration::from_secs(15), || async {
        pids.iter().all(|p| !alive(*p))
    })
    .await;
    assert!(!dir.exists(), "run dir {} left", dir.display());
    assert!(
        !cgroup_exists(&format!("husk/{pod}")),
        "pod cgroup left behind"
    );
    assert_eq!(
        pod_status(&e.c, pod).await.unwrap_err().code(),
        Code::NotFound
    );
}

#[tokio::test]
async fn vm_pod_containers_logs_exec_stats_and_cleanup() {
    require!(env_ok(), NEEDS);
    let e = vm_env().await;
    let pcfg = e.pod("vm1");
    let t = Instant::now();
    let pod = e
        .run_pod(&pcfg)
        .await
        .unwrap_or_else(|err| panic!("run pod: {err:?}\n{}", e.d.log()));
    println!(
        "RunPodSandbox ({} boot + agent) {:?}",
        vm_handler(),
        t.elapsed()
    );
    let st = pod_status(&e.c, &pod).await.unwrap();
    assert_eq!(
        st.status.as_ref().unwrap().state,
        cri::PodSandboxState::SandboxReady as i32
    );
    let i = info(&st.info);
    assert_eq!(i["kind"], vm_kind().0);
    assert_eq!(i["isolation"], vm_kind().1);
    let pids = e.vm_pids(&pod).await;
    // Host memory: guest RAM (MADV_DONTDUMP mappings) apart from QEMU's own.
    let m = &i["vmHostMemory"];
    assert!(m["guestRamBytes"].as_u64().unwrap() > 10 << 20, "{i}");
    assert!(m["guestRamBytes"].as_u64().unwrap() <= 512 << 20, "{i}");
    assert!(m["overheadRssBytes"].as_u64().unwrap() > 1 << 20, "{i}");
    assert!(
        m["overheadPssBytes"].as_u64() <= m["overheadRssBytes"].as_u64(),
        "{i}"
    );
    let vmm = if on_husk_vmm() {
        "husk-vmm"
    } else {
        "qemu-system"
    };
    assert!(comm(pids[0]).starts_with(vmm), "{}", comm(pids[0]));
    // QEMU has its vhost-user vsock and fs servers; husk-vmm serves both in process.
    assert_eq!(
        pids.len(),
        if on_husk_vmm() { 2 } else { 4 },
        "the VMM, its helpers, and the pod's log writer"
    );
    let writer = *pids.last().unwrap();
    assert!(comm(writer).starts_with("husk-vmm"), "{}", comm(writer));
    // Every VM process is in the pod's host cgroup.
    for p in &pids {
        let cg = std::fs::read_to_string(format!("/proc/{p}/cgroup")).unwrap();
        assert!(
            cg.contains(&format!("husk/{pod}")),
            "pid {p} not in the pod cgroup: {cg}"
        );
    }
    // QEMU, its two servers (what parses guest input) and the log writer (which copies
    // their pipes into files huskd opened for it) are jailed, under the pod's one uid.
    let uids: Vec<u32> = pids.iter().map(|p| assert_jailed(*p)).collect();
    assert!(uids.iter().all(|u| *u == uids[0]), "{uids:?}");
    // The jailed writer fills the root-owned log files huskd opened for it.
    let console =
        e.d.run_dir()
            .join("vm")
            .join(&pod[..16])
            .join("console.log");
    let text = std::fs::read_to_string(&console).unwrap();
    assert!(
        text.contains("husk-agent ready"),
        "{}: {text}",
        console.display()
    );
    // The guest's log lines carry no colour codes, and the pod's sandbox took the holder
    // the agent spawned ahead of it (guest-agent/src/sandbox/spare.rs).
    assert!(
        !text.contains('\x1b'),
        "colour codes in {}",
        console.display()
    );
    eventually(
        "the sandbox's create line",
        Duration::from_secs(10),
        || async { std::fs::read_to_string(&console).is_ok_and(|t| t.contains("sandbox created")) },
    )
    .await;
    let text = std::fs::read_to_string(&console).unwrap();
    assert!(
        text.contains("spare_used=true"),
        "{}: {text}",
        console.display()
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&console).unwrap().uid(), 0);

    // A container on the guest kernel, logs written on the host.
    let c1 = e
        .run(
            &pod,
            &e.ctr(
                "main",
                &["sh", "-c", "echo out; echo err >&2; exec sleep 1000"],
            ),
            &pcfg,
        )
        .await;
    let log = e.log_path(&pcfg, "main");
    eventually("both log lines", Duration::from_secs(30), || async {
        log_records(&log).len() >= 2
    })
    .await;
    let recs = log_records(&log);
    assert!(
        recs.contains(&("stdout".into(), false, "out".into())),
        "{recs:?}"
    );
    assert!(
        recs.contains(&("stderr".into(), false, "err".into())),
        "{recs:?}"
    );

    // It really runs on the guest's kernel.
    let rel = e.sh(&c1, "uname -r").await;
    assert_ne!(rel.trim(), host_file("/proc/sys/kernel/osrelease"));
    let boot = e.sh(&c1, "cat /proc/sys/kernel/random/boot_id").await;
    assert_ne!(boot.trim(), host_file("/proc/sys/kernel/random/boot_id"));
    let cpuinfo = e.sh(&c1, "grep -c ^processor /proc/cpuinfo").await;
    assert_eq!(cpuinfo.trim(), "1", "one vCPU by default");
    assert_eq!(e.sh(&c1, "hostname").await.trim(), "vm1");

    // ExecSync exit codes, stderr, timeout.
    let r = e
        .exec(&c1, &["sh", "-c", "echo x >&2; exit 3"], 30)
        .await
        .unwrap();
    assert_eq!(r.exit_code, 3);
    assert_eq!(String::from_utf8_lossy(&r.stderr), "x\n");
    let r = e.exec(&c1, &["sleep", "30"], 1).await;
    assert_eq!(r.unwrap_err().code(), Code::DeadlineExceeded);

    // Stats from the guest's cgroup v2.
    let stats = e.container_stats(&c1).await.unwrap().stats.unwrap();
    assert!(stats.memory.unwrap().working_set_bytes.unwrap().value > 0);
    assert!(stats.cpu.unwrap().usage_core_nano_seconds.unwrap().value > 0);
    let ps = e.pod_stats(&pod).await.unwrap().stats.unwrap();
    assert!(
        ps.linux
            .unwrap()
            .memory
            .unwrap()
            .working_set_bytes
            .unwrap()
            .value
            > 0
    );

    // Resource updates land in the guest's cgroup.
    e.update_resources(
        &c1,
        cri::LinuxContainerResources {
            memory_limit_in_bytes: 64 << 20,
            ..Default::default()
        },
    )
    .await
    .unwrap_or_else(|err| panic!("update: {err:?}\n{}", e.d.log()));
    let max = e
        .sh(
            &c1,
            &format!("cat /sys/fs/cgroup/husk/{pod}/{c1}/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory.max"),
        )
        .await;
    assert_eq!(max.trim(), (64u64 << 20).to_string());

    // A second container of the same image shares the hot-plugged disk,
    // with its own writable layer.
    let c2 = e
        .run(
            &pod,
            &e.ctr("second", &["sh", "-c", "echo mine > /own; exec sleep 1000"]),
            &pcfg,
        )
        .await;
    eventually("second writes", Duration::from_secs(20), || async {
        e.exec(&c2, &["cat", "/own"], 10)
            .await
            .is_ok_and(|r| r.exit_code == 0)
    })
    .await;
    let r = e.exec(&c1, &["cat", "/own"], 10).await.unwrap();
    assert_ne!(r.exit_code, 0, "container upper dirs must be separate");

    // Bidirectional propagation cannot cross into the VM: refused clearly.
    let mut m = e.ctr("mounts", &["true"]);
    m.mounts.push(cri::Mount {
        container_path: "/data".into(),
        host_path: "/tmp".into(),
        propagation: cri::MountPropagation::PropagationBidirectional as i32,
        ..Default::default()
    });
    let err = e.create(&pod, &m, &pcfg).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("bidirectional"), "{err:?}");

    // StopContainer: SIGTERM ends sleep (not PID 1: the pod's PID namespace).
    e.stop_container(&c1, 10).await.unwrap();
    let st = wait_exited(&e.c, &c1, Duration::from_secs(30)).await;
    assert_eq!(st.exit_code, 143, "{st:?}");
    e.remove_container(&c1).await.unwrap();
    assert_eq!(
        container_status(&e.c, &c1).await.unwrap_err().code(),
        Code::NotFound
    );

    // Stop: the guest is shut down, the VMM exits; remove leaves nothing.
    let t = Instant::now();
    e.stop_pod(&pod).await.unwrap();
    println!("StopPodSandbox {:?}", t.elapsed());
    for p in &pids {
        assert!(!alive(*p), "pid {p} ({}) survived StopPodSandbox", comm(*p));
    }
    let st = container_status(&e.c, &c2).await.unwrap().status.unwrap();
    assert_eq!(st.state, cri::ContainerState::ContainerExited as i32);
    e.remove_pod(&pod).await.unwrap();
    assert_pod_gone(&e, &pod, &pids).await;
}

#[tokio::test]
async fn vm_oom_second_image_hotplug_and_cli() {
    require!(env_ok(), NEEDS);
    let e = vm_env().await;
    // A second image: busybox plus a layer with a marker file.
    let marked = marked_image(&e, "e2e/marked", "second image").await;

    let pcfg = e.pod("vm2");
    let pod = e
        .run_pod(&pcfg)
        .await
        .unwrap_or_else(|err| panic!("run pod: {err:?}\n{}", e.d.log()));
    let pids = e.vm_pids(&pod).await;

    // OOM inside the guest → OOMKilled.
    let mut hog = e.ctr(
        "hog",
        &[
            "sh",
            "-c",
            "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived",
        ],
    );
    hog.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: 32 << 20,
            ..Default::default()
        }),
        ..Default::default()
    });
    let h = e.run(&pod, &hog, &pcfg).await;
    let st = wait_exited(&e.c, &h, Duration::from_secs(120)).await;
    assert_eq!(st.reason, "OOMKilled", "{st:?}");
    assert_eq!(st.exit_code, 137);

    // A container of another image: a second disk hot-plugged.
    let mut m = e.ctr("marked", &["sh", "-c", "cat /marker; exec sleep 1000"]);
    m.image = Some(cri::ImageSpec {
        image: marked.clone(),
        ..Default::default()
    });
    let c = match e.create(&pod, &m, &pcfg).await {
        Ok(c) => c,
        Err(err) => {
            let dir = e.d.run_dir().join("vm").join(&pod[..16]);
            panic!(
                "create marked: {err:?}\nconsole:\n{}\nqemu:\n{}",
                std::fs::read_to_string(dir.join("console.log")).unwrap_or_default(),
                std::fs::read_to_string(dir.join("vmm.log")).unwrap_or_default()
            );
        }
    };
    e.start(&c).await.unwrap();
    let log = e.log_path(&pcfg, "marked");
    eventually("marker in the log", Duration::from_secs(30), || async {
        log_records(&log).iter().any(|r| r.2 == "second image")
    })
    .await;
    let disks = e
        .sh(&c, "for f in /sys/block/vd*/serial; do cat $f; echo; done")
        .await;
    // husk-vmm's empty disk slots have no serial.
    let disks: Vec<&str> = disks.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(disks.len(), 2, "two image disks: {disks:?}");

    // The pod's VM shows up in ListPodSandbox with its handler.
    let list = e.pods().await;
    assert!(
        list.iter()
            .any(|p| p.id == pod && p.runtime_handler == vm_handler())
    );

    // Host networking in a VM is refused (a VM has its own kernel).
    let mut hn = e.pod("hostnet");
    hn.linux = Some(cri::LinuxPodSandboxConfig {
        security_context: Some(cri::LinuxSandboxSecurityContext {
            namespace_options: Some(cri::NamespaceOption {
                network: cri::NamespaceMode::Node as i32,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    assert_eq!(
        e.run_pod(&hn).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    e.stop_pod(&pod).await.unwrap();
    e.remove_pod(&pod).await.unwrap();
    assert_pod_gone(&e, &pod, &pids).await;

    // `husk run` uses the default handler: the VM.
    let out = std::process::Command::new(husk_tests::bin_path("husk"))
        .arg("--socket")
        .arg(&e.d.socket)
        .args(["run", "--rm", &e.image, "--", "uname", "-r"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rel = String::from_utf8_lossy(&out.stdout);
    assert!(!rel.trim().is_empty());
    assert_ne!(rel.trim(), host_file("/proc/sys/kernel/osrelease"));

    // `husk bench cri` on the VM handler: host memory splits guest RAM from QEMU's own.
    let out = std::process::Command::new(husk_tests::bin_path("husk"))
        .arg("--socket")
        .arg(&e.d.socket)
        .args(["bench", "cri", "--image", &e.image, "--json"])
        .args(["--runs", "1", "--parallel", "2", "--idle", "1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        e.d.log()
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(r["readyMs"]["p50"].as_f64().unwrap() > 0.0, "{r}");
    assert_eq!(r["isolation"], vm_kind().1, "{r}");
    let guest = r["guestRamMib"].as_f64().unwrap();
    assert!(guest > 10.0 && guest <= 256.0, "{r}");
    assert!(r["overheadRssMib"].as_f64().unwrap() > 1.0, "{r}");
    let left = e.pods().await;
    assert!(left.is_empty(), "bench pods left: {left:?}");
}

/// With one hot-plug slot: a second image's container is refused (ResourceExhausted) while the
/// first image's container exists; once it is removed, the unused disk is unplugged and the
/// second image's disk takes its slot.
#[tokio::test]
async fn vm_unused_image_disk_makes_room() {
    require!(env_ok(), NEEDS);
    let (k, i) = guest().unwrap();
    let e = CriEnv::new(
        vm_handler(),
        &(vm_config(&k, &i, 90_000) + "hotplug_slots = 1\n"),
    )
    .await;
    let other = marked_image(&e, "e2e/other", "other image").await;
    let pcfg = e.pod("vm-slot");
    let pod = e
        .run_pod(&pcfg)
        .await
        .unwrap_or_else(|err| panic!("run pod: {err:?}\n{}", e.d.log()));
    let first = e
        .run(&pod, &e.ctr("first", &["sleep", "1000"]), &pcfg)
        .await;
    let mut o = e.ctr("other", &["sh", "-c", "cat /marker; exec sleep 1000"]);
    o.image = Some(cri::ImageSpec {
        image: other.clone(),
        ..Default::default()
    });
    let err = e.create(&pod, &o, &pcfg).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("hotplug_slots"), "{err:?}");

    e.stop_container(&first, 0).await.unwrap();
    e.remove_container(&first).await.unwrap();
    let t = Instant::now();
    let c = e
        .create(&pod, &o, &pcfg)
        .await
        .unwrap_or_else(|err| panic!("create after removal: {err:?}\n{}", e.d.log()));
    println!("create with an unplug first: {:?}", t.elapsed());
    e.start(&c).await.unwrap();
    let log = e.log_path(&pcfg, "other");
    eventually("marker in the log", Duration::from_secs(30), || async {
        log_records(&log).iter().any(|r| r.2 == "other image")
    })
    .await;
    let disks = e
        .sh(&c, "for f in /sys/block/vd*/serial; do cat $f; echo; done")
        .await;
    assert_eq!(
        disks.lines().filter(|l| !l.is_empty()).count(),
        1,
        "only the other image's disk: {disks}"
    );
    e.stop_pod(&pod).await.unwrap();
    e.remove_pod(&pod).await.unwrap();
}

#[tokio::test]
async fn vm_huskd_kill9_and_restart_reattaches() {
    require!(env_ok(), NEEDS);
    let mut e = vm_env().await;
    let pcfg = e.pod("vm3");
    let pod = e
        .run_pod(&pcfg)
        .await
        .unwrap_or_else(|err| panic!("run pod: {err:?}\n{}", e.d.log()));
    let pids = e.vm_pids(&pod).await;
    let c = e
        .run(
            &pod,
            &e.ctr(
                "ticker",
                &[
                    "sh",
                    "-c",
                    "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.2; done",
                ],
            ),
            &pcfg,
        )
        .await;
    let log = e.log_path(&pcfg, "ticker");
    eventually("ticks", Duration::from_secs(30), || async {
        log_records(&log).len() >= 3
    })
    .await;
    e.d.crash_and_restart().await.unwrap();
    e.c = e.d.clients().await.unwrap();
    // Same VM, still ready; the container still runs and logs.
    for p in &pids {
        assert!(alive(*p), "VM process {p} died with huskd");
    }
    let st = pod_status(&e.c, &pod).await.unwrap();
    assert_eq!(
        st.status.unwrap().state,
        cri::PodSandboxState::SandboxReady as i32,
        "{}",
        e.d.log()
    );
    assert_eq!(e.vm_pids(&pod).await, pids);
    let st = container_status(&e.c, &c).await.unwrap().status.unwrap();
    assert_eq!(st.state, cri::ContainerState::ContainerRunning as i32);
    let n = log_records(&log).len();
    eventually(
        "ticks after the restart",
        Duration::from_secs(30),
        || async { log_records(&log).len() > n + 3 },
    )
    .await;
    assert!(e.sh(&c, "echo alive").await.contains("alive"));
    e.stop_pod(&pod).await.unwrap();
    e.remove_pod(&pod).await.unwrap();
    assert_pod_gone(&e, &pod, &pids).await;
}

/// husk-vmm's control socket: one command, its answer line.
fn vmm_ctl(e: &CriEnv, pod: &str, cmd: &str) -> String {
    use std::io::{BufRead, BufReader, Write};
    let sock =
        e.d.run_dir()
            .join("vm")
            .join(&pod[..16])
            .join("sock")
            .join("control.sock");
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    s.write_all(format!("{cmd}\n").as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    line.trim_end().to_string()
}

/// The handler `husk` (husk-vmm) end to end where a Linux guest boots on it (hardware KVM):
/// containers whose image disks fill husk-vmm's pre-attached disk slots, one slot per image
/// (a second container of an image reuses its slot, also after a huskd restart, which reads
/// the slots back from husk-vmm). Detection is a real pod start with a short boot timeout:
/// where the guest does not boot (no /dev/kvm, kvm-pvm) it prints `skipped: <reason>`.
#[tokio::test]
async fn vmm_pod_containers_on_disk_slots() {
    require!(
        registry::available() && husk_tests::is_root() && guest().is_some(),
        "needs root, docker-registry and HUSK_GUEST_KERNEL/HUSK_GUEST_INITRD"
    );
    let (k, i) = guest().unwrap();
    // Where the suite runs on husk-vmm (HUSK_VM_HANDLER=husk) the guest must boot.
    let boot_ms = if on_husk_vmm() { 90_000 } else { 20_000 };
    let cfg = vm_config(&k, &i, boot_ms).replace(
        "default_handler = \"husk-qemu\"",
        "default_handler = \"husk\"",
    ) + "hotplug_slots = 3\n";
    let mut e = CriEnv::new("husk", &cfg).await;
    let pcfg = e.pod("vmm-slots");
    let pod = match e.run_pod(&pcfg).await {
        Ok(pod) => pod,
        Err(s) if on_husk_vmm() => panic!("run pod: {s:?}\n{}", e.d.log()),
        Err(s) => {
            let why: String = s.message().chars().take(300).collect();
            println!(
                "skipped: no Linux guest boots on husk-vmm here ({:?}: {why})",
                s.code()
            );
            return;
        }
    };
    let pids = e.vm_pids(&pod).await;
    assert!(comm(pids[0]).starts_with("husk-vmm"), "{}", comm(pids[0]));
    assert_eq!(vmm_ctl(&e, &pod, "disks"), "disks 0=- 1=- 2=-");

    let c1 = e
        .run(
            &pod,
            &e.ctr("main", &["sh", "-c", "echo out; exec sleep 1000"]),
            &pcfg,
        )
        .await;
    let log = e.log_path(&pcfg, "main");
    eventually("log line", Duration::from_secs(30), || async {
        log_records(&log).iter().any(|r| r.2 == "out")
    })
    .await;
    let rel = e.sh(&c1, "uname -r").await;
    assert_ne!(
        rel.trim(),
        host_file("/proc/sys/kernel/osrelease"),
        "runs on the guest kernel"
    );
    let d = vmm_ctl(&e, &pod, "disks");
    assert!(
        d.starts_with("disks 0=img") && d.ends_with(" 1=- 2=-"),
        "{d}"
    );
    let serial = d
        .split(' ')
        .nth(1)
        .unwrap()
        .trim_start_matches("0=")
        .to_string();
    let serials = e.sh(&c1, "cat /sys/block/vd*/serial").await;
    assert!(
        serials.contains(&serial),
        "guest serials {serials:?}, slot {serial}"
    );

    // The same image again: the same slot.
    let again = e
        .run(&pod, &e.ctr("again", &["sleep", "1000"]), &pcfg)
        .await;
    assert_eq!(vmm_ctl(&e, &pod, "disks"), d);

    // Another image: the next slot; after a huskd crash the slots are read back from husk-vmm.
    let marked = marked_image(&e, "e2e/vmm-marked", "second image").await;
    let mut m = e.ctr("marked", &["sh", "-c", "cat /marker; exec sleep 1000"]);
    m.image = Some(cri::ImageSpec {
        image: marked.clone(),
        ..Default::default()
    });
    e.run(&pod, &m, &pcfg).await;
    let mlog = e.log_path(&pcfg, "marked");
    eventually("marker in the log", Duration::from_secs(30), || async {
        log_records(&mlog).iter().any(|r| r.2 == "second image")
    })
    .await;
    let d2 = vmm_ctl(&e, &pod, "disks");
    assert!(
        d2.starts_with(&format!("disks 0={serial} 1=img")) && d2.ends_with(" 2=-"),
        "{d2}"
    );
    e.d.crash_and_restart().await.unwrap();
    e.c = e.d.clients().await.unwrap();
    m.metadata.as_mut().unwrap().name = "marked2".into();
    e.run(&pod, &m, &pcfg).await;
    assert_eq!(
        vmm_ctl(&e, &pod, "disks"),
        d2,
        "no new slot after the restart"
    );

    // A third image takes the last slot; with every slot full, a fourth image's disk goes
    // into the slot of the first image once no container uses it, and the container sees
    // the fourth image's files (not the first's blocks cached by the guest).
    let third = marked_image(&e, "e2e/vmm-third", "third image").await;
    let mut t = e.ctr("third", &["sleep", "1000"]);
    t.image = Some(cri::ImageSpec {
        image: third,
        ..Default::default()
    });
    e.run(&pod, &t, &pcfg).await;
    let fourth = marked_image(&e, "e2e/vmm-fourth", "fourth image").await;
    let mut f = e.ctr("fourth", &["sh", "-c", "cat /marker; exec sleep 1000"]);
    f.image = Some(cri::ImageSpec {
        image: fourth,
        ..Default::default()
    });
    let full = e.create(&pod, &f, &pcfg).await.unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted, "{full:?}");
    for c in [&c1, &again] {
        e.stop_container(c, 0).await.unwrap();
        e.remove_container(c).await.unwrap();
    }
    e.run(&pod, &f, &pcfg).await;
    let flog = e.log_path(&pcfg, "fourth");
    eventually(
        "fourth marker in the log",
        Duration::from_secs(30),
        || async { log_records(&flog).iter().any(|r| r.2 == "fourth image") },
    )
    .await;
    let d4 = vmm_ctl(&e, &pod, "disks");
    assert!(
        !d4.contains(&serial) && !d4.contains("=-"),
        "slot 0 reused: {d4}"
    );

    e.stop_pod(&pod).await.unwrap();
    e.remove_pod(&pod).await.unwrap();
    assert_pod_gone(&e, &pod, &pids).await;
}

/// No VMM process whose command line mentions `needle` remains.
fn no_process_mentions(needle: &str) -> bool {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<i32>().is_ok())
        .all(|e| {
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            !String::from_utf8_lossy(&cmd).contains(needle)
        })
}

fn pods_dir_empty(run_dir: &Path) -> bool {
    ["pods", "vm"].iter().all(|d| {
        std::fs::read_dir(run_dir.join(d))
            .map(|d| d.count() == 0)
            .unwrap_or(true)
    })
}

#[tokio::test]
async fn vm_start_failures_are_clear_and_leak_nothing() {
    require!(env_ok(), NEEDS);
    let (k, i) = guest().unwrap();

    // 1. The husk-vmm handler. Where hardware KVM exists the pod boots; on
    // this kind of host (kvm-pvm or no KVM) it fails with a clear reason
    // (boot timeout with the guest console's tail, or no /dev/kvm).
    {
        let boot_ms = if on_husk_vmm() { 90_000 } else { 15_000 };
        let mut cfg = vm_config(&k, &i, boot_ms);
        cfg = cfg.replace(
            "default_handler = \"husk-qemu\"",
            "default_handler = \"husk\"",
        );
        let e = CriEnv::new("husk", &cfg).await;
        let pcfg = e.pod("vmm");
        match e.run_pod(&pcfg).await {
            Ok(pod) => {
                println!("husk-vmm booted the guest here (hardware KVM)");
                e.stop_pod(&pod).await.unwrap();
                e.remove_pod(&pod).await.unwrap();
            }
            Err(s) if on_husk_vmm() => panic!("husk-vmm must boot here: {s:?}\n{}", e.d.log()),
            Err(s) => {
                println!("husk-vmm: {:?}: {}", s.code(), s.message());
                match s.code() {
                    Code::FailedPrecondition => assert!(s.message().contains("/dev/kvm"), "{s:?}"),
                    Code::DeadlineExceeded | Code::Unavailable => {
                        assert!(s.message().contains("guest console"), "{s:?}")
                    }
                    other => panic!("unexpected {other:?}: {s:?}"),
                }
            }
        }
        assert!(pods_dir_empty(&e.d.run_dir()), "run dir left");
        assert!(no_process_mentions(&e.d.run_dir().display().to_string()));
        let list = e.pods().await;
        assert!(
            list.is_empty()
                || list
                    .iter()
                    .all(|p| p.state == cri::PodSandboxState::SandboxReady as i32)
        );
        // The name can be used again (nothing reserved by the failure).
        let _ = e.run_pod(&pcfg).await;
    }

    // 2. A guest kernel the VMM cannot load: the VMM exits during boot.
    {
        let e = CriEnv::new(vm_handler(), &vm_config("/bin/busybox", &i, 30_000)).await;
        let s = e.run_pod(&e.pod("badkernel")).await.unwrap_err();
        assert_eq!(s.code(), Code::Unavailable, "{s:?}");
        assert!(s.message().contains("exited during boot"), "{s:?}");
        assert!(s.message().contains("guest console"), "{s:?}");
        assert!(pods_dir_empty(&e.d.run_dir()));
        assert!(no_process_mentions(&e.d.run_dir().display().to_string()));
        assert!(
            std::fs::read_dir(e.d.state_dir().join("pods"))
                .unwrap()
                .next()
                .is_none()
        );
    }

    // 3. A missing kernel: refused before anything starts; Status says so.
    {
        let missing: PathBuf = "/nonexistent/bzImage".into();
        let e = CriEnv::new(
            vm_handler(),
            &vm_config(&missing.display().to_string(), &i, 30_000),
        )
        .await;
        let s = e.run_pod(&e.pod("nokernel")).await.unwrap_err();
        assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
        assert!(s.message().contains("/nonexistent/bzImage"), "{s:?}");
        let st = e.status_verbose().await;
        let rr = st
            .status
            .unwrap()
            .conditions
            .into_iter()
            .find(|c| c.r#type == "RuntimeReady")
            .unwrap();
        // husk-ns still works, so the runtime is ready; the message names the broken handler.
        assert!(rr.status);
        assert!(
            rr.message.contains(&format!("{}: not ready", vm_handler())),
            "{rr:?}"
        );
        assert!(pods_dir_empty(&e.d.run_dir()));
    }
}

/// CRI mounts in a VM pod: the host directories reach the guest through husk-vmm's virtio-fs
/// server (the pod share): both directions, read-only refused, a single-file mount, a
/// ConfigMap-style `..data` swap on the host seen in the container, and after removal the
/// share holds nothing while the volumes are untouched.
#[tokio::test]
async fn vm_pod_host_mounts_over_virtio_fs() {
    require!(env_ok(), NEEDS);
    let e = vm_env().await;
    let vols = tempfile::tempdir().unwrap();
    let data = vols.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("from-host"), b"host bytes\n").unwrap();
    let cfg = vols.path().join("cfg");
    std::fs::create_dir_all(cfg.join("..v1")).unwrap();
    std::fs::write(cfg.join("..v1/key"), b"v1").unwrap();
    std::os::unix::fs::symlink("..v1", cfg.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/key", cfg.join("key")).unwrap();
    let single = vols.path().join("termination-log");
    std::fs::write(&single, b"").unwrap();
    let ro = vols.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    std::fs::write(ro.join("r"), b"read only\n").unwrap();

    let pcfg = e.pod("vmfs");
    let pod = e
        .run_pod(&pcfg)
        .await
        .unwrap_or_else(|err| panic!("run pod: {err:?}\n{}", e.d.log()));
    let mount = |host: &Path, ctr: &str, readonly: bool| cri::Mount {
        container_path: ctr.into(),
        host_path: host.display().to_string(),
        readonly,
        ..Default::default()
    };
    let mut c = e.ctr("vol", &["sleep", "1000"]);
    c.mounts = vec![
        mount(&data, "/data", false),
        mount(&cfg, "/config", true),
        mount(&single, "/dev/termination-log", false),
        mount(&ro, "/ro", true),
    ];
    let id = e.run(&pod, &c, &pcfg).await;
    let share = e.d.run_dir().join("vm").join(&pod[..16]).join("share");

    // Host -> guest, with the host's attributes.
    assert_eq!(e.sh(&id, "cat /data/from-host").await, "host bytes\n");
    assert_eq!(e.sh(&id, "cat /config/key").await, "v1");
    assert_eq!(e.sh(&id, "cat /ro/r").await, "read only\n");
    // Guest -> host: a file with owner and mode, a single-file mount.
    e.sh(&id, "echo guest bytes > /data/from-guest && chown 1234:4321 /data/from-guest && chmod 640 /data/from-guest && echo done > /dev/termination-log").await;
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(data.join("from-guest")).unwrap();
    assert_eq!(
        std::fs::read(data.join("from-guest")).unwrap(),
        b"guest bytes\n"
    );
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o777), (1234, 4321, 0o640));
    assert_eq!(std::fs::read(&single).unwrap(), b"done\n");
    // Read-only mounts refuse writes.
    let r = e
        .exec(&id, &["sh", "-c", "echo x > /ro/new"], 30)
        .await
        .unwrap();
    assert_ne!(r.exit_code, 0);
    assert!(!ro.join("new").exists());
    // The kubelet's ConfigMap update: atomic ..data swap on the host.
    std::fs::create_dir_all(cfg.join("..v2")).unwrap();
    std::fs::write(cfg.join("..v2/key"), b"v2").unwrap();
    std::os::unix::fs::symlink("..v2", cfg.join("..data_tmp")).unwrap();
    std::fs::rename(cfg.join("..data_tmp"), cfg.join("..data")).unwrap();
    eventually(
        "ConfigMap swap seen in the guest",
        Duration::from_secs(10),
        || async {
            e.exec(&id, &["cat", "/config/key"], 10)
                .await
                .is_ok_and(|r| r.stdout == b"v2")
        },
    )
    .await;
    // The guest sees the share's entries only, never the host around them.
    let r = e
        .exec(
            &id,
            &["sh", "-c", "ls /data/.. /data/../.. | grep -c share"],
            10,
        )
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&r.stdout).trim(), "0");
    assert!(
        std::fs::read_dir(&share).unwrap().count() >= 4,
        "entries bound into the share"
    );

    e.stop_container(&id, 0).await.unwrap();
    e.remove_container(&id).await.unwrap();
    assert_eq!(
        std::fs::read_dir(&share).unwrap().count(),
        0,
        "the container's entries unbound"
    );
    let pids = e.vm_pids(&pod).await;
    e.stop_pod(&pod).await.unwrap();
    e.remove_pod(&pod).await.unwrap();
    assert_pod_gone(&e, &pod, &pids).await;
    // The volumes are intact (removing the pod never reached into them).
    assert_eq!(
        std::fs::read(data.join("from-host")).unwrap(),
        b"host bytes\n"
    );
    assert_eq!(std::fs::read(ro.join("r")).unwrap(), b"read only\n");
    assert!(cfg.join("..v2/key").exists());
}
