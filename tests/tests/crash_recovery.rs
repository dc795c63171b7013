//! huskd killed (SIGKILL, as `kill -9`) at each step of RunPodSandbox and
//! CreateContainer, then restarted on the same state: nothing the interrupted call
//! started may survive — no process, mount, cgroup, netns, run dir or record — and a
//! pod that was already running keeps running with its recorded containers only.
//!
//! The steps are armed with `HUSK_TEST_CRASH_AT` (huskd's fault-injection hook,
//! `sandbox/orphans.rs`). What is left is checked independently of huskd's own
//! bookkeeping: `/proc` (every process whose command line or environment names the
//! pod), `/proc/self/mountinfo`, the cgroup hierarchies and the state and run dirs.
//! Husk-ns pods always; VM pods on QEMU/TCG where the guest artefacts are built.
//!
//! Also a VM that dies (not huskd) in the middle of RunPodSandbox, its VMM killed by
//! `HUSK_TEST_KILL_AGENT_AT`: huskd answers with the VM's exit and cleans up on its own.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use husk_proto::cri;
use husk_tests::cri_env::CriEnv;
use husk_tests::require;
use husk_tests::runtime::{NS, NS_NEEDS, ns_env_ok};
use husk_tests::runtime::{VM_HANDLERS, VM_NEEDS, vm_env_ok, vm_handler};

const RUN_POD_STEPS: [&str; 6] = [
    "run_pod:recorded",
    "run_pod:network",
    "run_pod:spawned",
    "run_pod:launched",
    "run_pod:agent-recorded",
    "run_pod:sandbox-created",
];
/// Steps after which the pod's processes exist (the leak the records must cover).
const AFTER_SPAWN: [&str; 4] = [
    "run_pod:spawned",
    "run_pod:launched",
    "run_pod:agent-recorded",
    "run_pod:sandbox-created",
];
const CREATE_STEPS: [&str; 3] = [
    "create_container:shared",
    "create_container:rootfs",
    "create_container:agent-created",
];

/// How long a huskd that broke a call off by dying may take to be reaped. The call's error
/// arrives once its connection closed, that is once the process is gone: a huskd still
/// alive after this answered the call itself (the error says why) and never got to the step.
const KILL_WAIT: Duration = Duration::from_secs(30);

/// Pod ids with a record under the state dir.
fn recorded_pods(state: &Path) -> Vec<String> {
    std::fs::read_dir(state.join("pods"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

/// Pids of live processes whose command line or environment mentions `needle`.
fn processes_naming(needle: &str) -> Vec<i32> {
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        {
            continue;
        }
        let names = |f: &str| {
            std::fs::read(format!("/proc/{pid}/{f}"))
                .map(|b| String::from_utf8_lossy(&b).contains(needle))
                .unwrap_or(false)
        };
        if names("cmdline") || names("environ") {
            out.push(pid);
        }
    }
    out
}

/// What pod `id` of this huskd left behind, as readable descriptions (empty: clean).
fn leftovers(e: &CriEnv, id: &str) -> Vec<String> {
    let mut left = vec![];
    let short = &id[..16];
    // Processes: a VMM names its run dir (run/vm/<16 hex>) in its arguments, every
    // process huskd starts for the pod carries the pod id in its environment.
    for pid in processes_naming(id)
        .into_iter()
        .chain(processes_naming(&format!("/vm/{short}")))
    {
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        left.push(format!(
            "process {pid}: {}",
            String::from_utf8_lossy(&cmd).replace('\0', " ")
        ));
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let root = e.d.dir.path().display().to_string();
    for l in mountinfo.lines() {
        let mp = l.split(' ').nth(4).unwrap_or("");
        if mp.starts_with(&root) && (mp.contains(id) || mp.contains(short)) {
            left.push(format!("mount {mp}"));
        }
    }
    for dir in [
        e.d.state_dir().join("pods").join(id),
        e.d.run_dir().join("pods").join(id),
        e.d.run_dir().join("vm").join(short),
        e.d.run_dir().join("netns").join(id),
    ] {
        if dir.exists() {
            left.push(format!("path {}", dir.display()));
        }
    }
    // A VM pod's jail uid claim (a file holding the pod id).
    if let Ok(claims) = std::fs::read_dir(e.d.run_dir().join("jail-uids")) {
        for c in claims.flatten() {
            if std::fs::read_to_string(c.path()).is_ok_and(|t| t.contains(id)) {
                left.push(format!("jail uid claim {}", c.path().display()));
            }
        }
    }
    for h in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let cg = h.path().join("husk").join(id);
        if cg.exists() {
            left.push(format!("cgroup {}", cg.display()));
        }
    }
    left
}

async fn crash_run_pod_at_each_step(mut e: CriEnv) {
    for step in RUN_POD_STEPS {
        e.d.env = vec![("HUSK_TEST_CRASH_AT".into(), step.into())];
        e.d.restart().await.unwrap();
        let cfg = e.pod(&format!("crash-{}", step.replace([':', '_'], "-")));
        let r = e.run_pod(&cfg).await;
        assert!(r.is_err(), "{step}: RunPodSandbox answered {r:?}");
        // The call broke because huskd died: it is gone already (KILL_WAIT is for the
        // reaping only). Still alive: huskd answered `r` itself and never reached the step.
        let st = e.d.wait_exit(KILL_WAIT);
        assert!(
            st.is_some_and(|s| std::os::unix::process::ExitStatusExt::signal(&s) == Some(9)),
            "{step}: huskd was not killed there ({st:?}); RunPodSandbox answered {r:?}\n{}",
            e.d.log()
        );
        let ids = recorded_pods(&e.d.state_dir());
        assert_eq!(
            ids.len(),
            1,
            "{step}: the interrupted pod's record: {ids:?}"
        );
        let id = ids[0].clone();
        if AFTER_SPAWN.contains(&step) {
            assert!(
                !processes_naming(&id).is_empty(),
                "{step}: expected the pod's processes to be running before the restart"
            );
        }
        e.d.env.clear();
        e.d.restart().await.unwrap();
        assert!(e.pods().await.is_empty(), "{step}: pods after recovery");
        let left = leftovers(&e, &id);
        assert!(
            left.is_empty(),
            "{step}: left behind after recovery:\n{}\n{}",
            left.join("\n"),
            e.d.log()
        );
    }
}

async fn crash_create_container_at_each_step(mut e: CriEnv) {
    let volume = tempfile::tempdir().unwrap();
    std::fs::write(volume.path().join("data"), "volume").unwrap();
    let pcfg = e.pod("crash-create");
    let pod = e
        .run_pod(&pcfg)
        .await
        .unwrap_or_else(|s| panic!("{s:?}\n{}", e.d.log()));
    let keep = e
        .create(&pod, &e.ctr("keep", &["sleep", "3600"]), &pcfg)
        .await;
    let keep = keep.unwrap_or_else(|s| panic!("{s:?}\n{}", e.d.log()));
    e.start(&keep).await.unwrap();
    for step in CREATE_STEPS {
        e.d.env = vec![("HUSK_TEST_CRASH_AT".into(), step.into())];
        e.d.restart().await.unwrap();
        let mut cfg = e.ctr(
            &format!("c-{}", step.replace([':', '_'], "-")),
            &["sleep", "3600"],
        );
        cfg.mounts.push(cri::Mount {
            container_path: "/vol".into(),
            host_path: volume.path().display().to_string(),
            readonly: true,
            ..Default::default()
        });
        let r = e.create(&pod, &cfg, &pcfg).await;
        assert!(r.is_err(), "{step}: CreateContainer answered {r:?}");
        assert!(
            e.d.wait_exit(KILL_WAIT).is_some(),
            "{step}: huskd was not killed there; CreateContainer answered {r:?}\n{}",
            e.d.log()
        );
        e.d.env.clear();
        e.d.restart().await.unwrap();
        // The pod and its running container are back; the interrupted one is nowhere.
        let pods = e.pods().await;
        assert_eq!(pods.len(), 1, "{step}");
        assert_eq!(
            pods[0].state,
            cri::PodSandboxState::SandboxReady as i32,
            "{step}"
        );
        let ctrs = e.list_containers(cri::ContainerFilter::default()).await;
        assert_eq!(
            ctrs.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
            vec![keep.as_str()],
            "{step}: containers after recovery"
        );
        assert_eq!(
            e.ctr_status(&keep).await.state,
            cri::ContainerState::ContainerRunning as i32,
            "{step}"
        );
        // Neither a bind of the volume on the host nor an entry in a VM pod's share.
        let mounted = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.split(' ').nth(4).unwrap_or("").contains("/share/"))
            .filter(|l| l.contains(e.d.dir.path().to_str().unwrap()))
            .count();
        assert_eq!(mounted, 0, "{step}: share binds left");
        let agent_ids = e.sh(&keep, "true").await;
        assert!(
            agent_ids.is_empty(),
            "{step}: exec into the kept container: {agent_ids}"
        );
    }
    e.stop_and_remove_pod(&pod).await;
}

#[tokio::test]
async fn ns_crash_during_run_pod_leaves_nothing() {
    require!(ns_env_ok(), NS_NEEDS);
    crash_run_pod_at_each_step(CriEnv::new(NS, "").await).await;
}

#[tokio::test]
async fn ns_crash_during_create_container_leaves_nothing() {
    require!(ns_env_ok(), NS_NEEDS);
    crash_create_container_at_each_step(CriEnv::new(NS, "").await).await;
}

fn vm_config() -> Option<String> {
    let k = std::env::var("HUSK_GUEST_KERNEL").ok()?;
    let i = std::env::var("HUSK_GUEST_INITRD").ok()?;
    vm_env_ok().then(|| {
        format!(
            "[runtime]\ndefault_handler = \"{h}\"\n[runtime.handlers]\n{VM_HANDLERS}husk-ns = \"namespace\"\n\
             [runtime.vm]\nkernel = \"{k}\"\ninitrd = \"{i}\"\nboot_timeout_ms = 120000\nmemory_mib = 256\n",
            h = vm_handler()
        )
    })
}

#[tokio::test]
async fn vm_crash_during_run_pod_leaves_nothing() {
    let cfg = vm_config();
    require!(cfg.is_some(), VM_NEEDS);
    crash_run_pod_at_each_step(CriEnv::new(vm_handler(), &cfg.unwrap()).await).await;
}

#[tokio::test]
async fn vm_crash_during_create_container_leaves_nothing() {
    let cfg = vm_config();
    require!(cfg.is_some(), VM_NEEDS);
    crash_create_container_at_each_step(CriEnv::new(vm_handler(), &cfg.unwrap()).await).await;
}

/// A VM that dies after its agent came up, in the middle of RunPodSandbox (its VMM killed
/// just before CreateSandbox, `HUSK_TEST_KILL_AGENT_AT`): huskd itself answers, with
/// Unavailable naming the VM's exit and its logs rather than a broken agent connection, and
/// cleans everything the call started up without a restart.
#[tokio::test]
async fn vm_dying_during_run_pod_is_named_and_leaves_nothing() {
    let cfg = vm_config();
    require!(cfg.is_some(), VM_NEEDS);
    let mut e = CriEnv::new(vm_handler(), &cfg.unwrap()).await;
    e.d.env = vec![(
        "HUSK_TEST_KILL_AGENT_AT".into(),
        "run_pod:agent-recorded".into(),
    )];
    e.d.restart().await.unwrap();
    let err = e.run_pod(&e.pod("dies")).await.unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::Unavailable,
        "{err:?}\n{}",
        e.d.log()
    );
    assert!(
        err.message()
            .contains("exited after its agent came up, during create sandbox"),
        "{err:?}"
    );
    assert!(err.message().contains("guest console"), "{err:?}");
    let log = e.d.log();
    let id = log
        .split("VM starting pod=\"")
        .nth(1)
        .and_then(|s| s.get(..64))
        .unwrap_or_else(|| panic!("no VM start logged:\n{log}"))
        .to_string();
    assert!(e.pods().await.is_empty(), "pods after the failed call");
    let left = leftovers(&e, &id);
    assert!(left.is_empty(), "left behind:\n{}\n{log}", left.join("\n"));
}
