#![allow(clippy::unwrap_used)]
//! The guest is hostile: attacks run from a privileged container in a VM pod on QEMU/TCG
//! (handler `husk-qemu`), with the host checked afterwards.
//!
//! - symlinks planted in the pod's virtio-fs share root, pointing at a host mount point and a
//!   host file, must not make RemoveContainer/RemovePodSandbox unmount or touch them;
//! - a setuid binary, a FIFO and a device node made in a host-directory volume are refused;
//! - a guest that stops answering (its container unbinds the guest's vsock driver): stats
//!   answer within their deadline from the last sample, other pods and huskd's own calls go
//!   on, and the pod is still stopped and removed with its VM;
//! - CRI input that names host paths (`log_path` with `..` or absolute, a seccomp profile
//!   that is a FIFO or `/dev/zero`) and invalid UTF-8 are InvalidArgument, with nothing made.
//!
//! Needs HUSK_GUEST_KERNEL / HUSK_GUEST_INITRD (tests/run.sh builds them) and
//! qemu-system-x86_64; prints `skipped: <reason>` otherwise.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use husk_host::sandbox::stats::STATS_DEADLINE;
use husk_proto::cri;
use husk_tests::cri_env::CriEnv;
use husk_tests::require;
use husk_tests::runtime::{VM_HANDLERS, VM_NEEDS as NEEDS, guest, vm_env_ok as env_ok, vm_handler};
use husk_tests::runtime::{eventually, info, pod_status};
use tonic::Code;

async fn vm_env() -> CriEnv {
    let (k, i) = guest().unwrap();
    let h = vm_handler();
    let cfg = format!(
        "[runtime]\ndefault_handler = \"{h}\"\n[runtime.handlers]\n{VM_HANDLERS}\
         [runtime.vm]\nkernel = \"{k}\"\ninitrd = \"{i}\"\nboot_timeout_ms = 90000\nmemory_mib = 256\n"
    );
    CriEnv::new(h, &cfg).await.remove_pods_on_drop()
}

fn privileged(mut c: cri::ContainerConfig) -> cri::ContainerConfig {
    c.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            privileged: true,
            ..Default::default()
        }),
        ..Default::default()
    });
    c
}

/// A pod sandbox that may hold privileged containers (containerd's rule: never in one that
/// is not).
fn privileged_pod(mut p: cri::PodSandboxConfig) -> cri::PodSandboxConfig {
    p.linux = Some(cri::LinuxPodSandboxConfig {
        security_context: Some(cri::LinuxSandboxSecurityContext {
            privileged: true,
            ..Default::default()
        }),
        ..Default::default()
    });
    p
}

/// A tmpfs the test mounts on the host (the kind of mount point the guest went for).
struct HostMount(PathBuf);

impl HostMount {
    fn new(dir: &Path) -> Self {
        let p = dir.join("hostmnt");
        std::fs::create_dir(&p).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "husk-hostile-test"])
            .arg(&p)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs");
        std::fs::write(p.join("keep"), b"host data\n").unwrap();
        Self(p)
    }

    fn mounted(&self) -> bool {
        let parent = self.0.parent().unwrap();
        std::fs::metadata(&self.0).unwrap().dev() != std::fs::metadata(parent).unwrap().dev()
    }
}

impl Drop for HostMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Every regular file below `dir` with its content and mode (a snapshot to compare).
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>, u32)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                todo.push(e.path());
            } else {
                out.push((
                    e.path(),
                    std::fs::read(e.path()).unwrap_or_default(),
                    m.mode(),
                ));
            }
        }
    }
    out.sort();
    out
}

/// The guest (a privileged container mounting the pod's share itself) plants symlinks in
/// the share root, named like share entries and not, pointing at a host tmpfs mount point and
/// at host files. Removing the container and the pod must leave the host mount mounted and
/// every host file as it was.
#[tokio::test]
async fn share_symlinks_never_reach_host_mounts_or_files() {
    require!(env_ok(), NEEDS);
    let e = vm_env().await;
    let t = tempfile::tempdir().unwrap();
    let host = HostMount::new(t.path());
    let outside = t.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("file"), b"host file\n").unwrap();
    let vol = t.path().join("vol");
    std::fs::create_dir(&vol).unwrap();
    std::fs::write(vol.join("v"), b"volume\n").unwrap();
    let before = (snapshot(&outside), snapshot(&host.0), snapshot(&vol));

    let pcfg = privileged_pod(e.pod("symlinks"));
    let pod = e
        .run_pod(&pcfg)
        .await
        .unwrap_or_else(|err| panic!("run pod: {err:?}\n{}", e.d.log()));
    let mut c = privileged(e.ctr("attacker", &["sleep", "1000"]));
    c.mounts = vec![cri::Mount {
        container_path: "/data".into(),
        host_path: vol.display().to_string(),
        ..Default::default()
    }];
    let id = e.run(&pod, &c, &pcfg).await;
    let share = e.d.run_dir().join("vm").join(&pod[..16]).join("share");
    let (h, f) = (host.0.display(), outside.join("file"));
    let f = f.display();
    let script = format!(
        "set -e; mkdir -p /mnt/s; mount -t virtiofs husk-share /mnt/s; ls /mnt/s; \
         ln -s {h} /mnt/s/{id}-1; ln -s {h} /mnt/s/{id}-7; ln -s {f} /mnt/s/{id}-8; \
         ln -s {h} /mnt/s/0000-0; ln -s {h} /mnt/s/anything; ln -s {f} /mnt/s/file; \
         mkdir /mnt/s/dir; ln -s {h} /mnt/s/dir/{id}-0; ln -s / /mnt/s/dir/root; \
         umount /mnt/s; echo planted"
    );
    let out = e.sh(&id, &script).await;
    assert!(
        out.contains(&format!("{id}-0")),
        "the share root seen: {out}"
    );
    assert!(out.contains("planted"), "{out}");
    // On the host: the links are there (the attack is real), pointing at the host.
    assert_eq!(
        std::fs::read_link(share.join(format!("{id}-1"))).unwrap(),
        host.0
    );

    e.stop_container(&id, 0).await.unwrap();
    e.remove_container(&id)
        .await
        .unwrap_or_else(|err| panic!("remove container: {err:?}\n{}", e.d.log()));
    assert!(host.mounted(), "RemoveContainer unmounted a host mount");
    for n in [1, 7, 8] {
        assert!(
            std::fs::symlink_metadata(share.join(format!("{id}-{n}"))).is_err(),
            "the container's planted names went"
        );
    }
    e.stop_pod(&pod).await.unwrap();
    e.remove_pod(&pod)
        .await
        .unwrap_or_else(|err| panic!("remove pod: {err:?}\n{}", e.d.log()));
    assert!(host.mounted(), "RemovePodSandbox unmounted a host mount");
    assert!(!share.exists(), "the share is gone");
    let after = (snapshot(&outside), snapshot(&host.0), snapshot(&vol));
    assert_eq!(before, after, "no host file outside the pod's dirs changed");
}

/// The guest makes a setuid binary, a FIFO and device nodes in a host-directory volume:
/// refused by the virtio-fs server, checked on the host. Then CRI input that names host
/// paths: `log_path` escapes and seccomp profiles that are not small regular files are
/// InvalidArgument (quickly), and invalid UTF-8 in a request is InvalidArgument.
#[tokio::test]
async fn volume_special_files_and_host_path_inputs_are_refused() {
    require!(env_ok(), NEEDS);
    let e = vm_env().await;
    let t = tempfile::tempdir().unwrap();
    let vol = t.path().join("vol");
    std::fs::create_dir(&vol).unwrap();

    let pcfg = privileged_pod(e.pod("special"));
    let pod = e
        .run_pod(&pcfg)
        .await
        .unwrap_or_else(|err| panic!("run pod: {err:?}\n{}", e.d.log()));
    let mut c = privileged(e.ctr("attacker", &["sleep", "1000"]));
    c.mounts = vec![cri::Mount {
        container_path: "/data".into(),
        host_path: vol.display().to_string(),
        ..Default::default()
    }];
    let id = e.run(&pod, &c, &pcfg).await;
    let try_sh = |script: &'static str| {
        let e = &e;
        let id = id.clone();
        async move {
            let r = e.exec(&id, &["sh", "-c", script], 60).await.unwrap();
            (r.exit_code, String::from_utf8_lossy(&r.stderr).into_owned())
        }
    };
    // Ordinary files still work.
    let (code, err) = try_sh("cp /bin/busybox /data/tool && chmod 755 /data/tool").await;
    assert_eq!(code, 0, "{err}");
    // chmod u+s / g+s, and a set-id mode at creation.
    for script in [
        "chmod 4755 /data/tool",
        "chmod 2755 /data/tool",
        "chmod u+s /data/tool",
        "install -m 4755 /bin/busybox /data/suid",
        "mknod /data/fifo p",
        "mkfifo /data/fifo2",
        "mknod /data/null c 1 3",
        "mknod /data/sda b 8 0",
    ] {
        let (code, _) = try_sh(script).await;
        assert_ne!(code, 0, "{script} succeeded in the guest");
    }
    let m = std::fs::metadata(vol.join("tool")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o755, "the host file has no set-id bit");
    if let Ok(m) = std::fs::metadata(vol.join("suid")) {
        assert_eq!(m.mode() & 0o6000, 0, "install made a set-id file");
    }
    for n in ["fifo", "fifo2", "null", "sda"] {
        assert!(
            std::fs::symlink_metadata(vol.join(n)).is_err(),
            "{n} exists on the host"
        );
    }

    // log_path escapes: InvalidArgument, and nothing made outside the log directory.
    let logs_before = snapshot(&e.logs);
    for bad in [
        "../escape.log".to_string(),
        "c/../../../escape.log".to_string(),
        t.path().join("abs.log").display().to_string(),
    ] {
        let mut c = e.ctr("badlog", &["true"]);
        c.log_path = bad.clone();
        let err = e.create(&pod, &c, &pcfg).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}: {err:?}");
    }
    assert!(!t.path().join("abs.log").exists());
    assert!(!e.logs.join("escape.log").exists());
    assert!(!e.logs.parent().unwrap().join("escape.log").exists());
    assert_eq!(snapshot(&e.logs), logs_before);

    // A seccomp localhost profile that is a FIFO or an endless device: InvalidArgument at
    // once (not a hung huskd), and huskd still answers.
    let fifo = t.path().join("profile.fifo");
    let st = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(st.success());
    for p in [fifo.display().to_string(), "/dev/zero".to_string()] {
        let mut c = e.ctr("badseccomp", &["true"]);
        c.linux = Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                seccomp: Some(cri::SecurityProfile {
                    profile_type: cri::security_profile::ProfileType::Localhost as i32,
                    localhost_ref: p.clone(),
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        let t0 = Instant::now();
        let err = tokio::time::timeout(Duration::from_secs(20), e.create(&pod, &c, &pcfg))
            .await
            .unwrap_or_else(|_| panic!("{p}: CreateContainer hung"))
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{p}: {err:?}");
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{p}: {:?}",
            t0.elapsed()
        );
    }

    // Invalid UTF-8 in a CRI string field: InvalidArgument, not Internal.
    let ch = husk_host::client::connect(&e.d.socket).await.unwrap();
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready().await.unwrap();
    // VersionRequest { version (1): b"\xff\xfe" } as raw protobuf.
    let raw = vec![0x0a, 0x02, 0xff, 0xfe];
    let err = grpc
        .unary(
            tonic::Request::new(raw),
            http::uri::PathAndQuery::from_static("/runtime.v1.RuntimeService/Version"),
            RawCodec,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // A valid request on the same path still works.
    grpc.ready().await.unwrap();
    let ok = grpc
        .unary(
            tonic::Request::new(vec![0x0a, 0x02, b'v', b'1']),
            http::uri::PathAndQuery::from_static("/runtime.v1.RuntimeService/Version"),
            RawCodec,
        )
        .await;
    assert!(ok.is_ok(), "{ok:?}");

    e.stop_and_remove_pod(&pod).await;
    assert!(
        std::fs::read(vol.join("tool")).is_ok(),
        "the volume is intact"
    );
}

/// The guest goes silent on purpose: a privileged container unbinds the guest kernel's vsock
/// driver, so the agent can neither answer nor be reached, while the VM runs on. huskd must
/// not wait on it: stats within their deadline (the pod's last sample), another pod's stats
/// fresh, `Version`/`ListPodSandbox` fast, and Stop/RemovePodSandbox still end the VM.
#[tokio::test]
async fn a_guest_that_stops_answering_stalls_nothing() {
    require!(env_ok(), NEEDS);
    let e = vm_env().await;
    let (acfg, bcfg) = (privileged_pod(e.pod("silent")), e.pod("bystander"));
    let apod = e
        .run_pod(&acfg)
        .await
        .unwrap_or_else(|err| panic!("run pod: {err:?}\n{}", e.d.log()));
    let bpod = e
        .run_pod(&bcfg)
        .await
        .unwrap_or_else(|err| panic!("run pod: {err:?}\n{}", e.d.log()));
    let ac = e
        .run(
            &apod,
            &privileged(e.ctr("attacker", &["sleep", "100000"])),
            &acfg,
        )
        .await;
    let bc = e.run(&bpod, &e.ctr("b", &["sleep", "100000"]), &bcfg).await;
    let vmm = info(&pod_status(&e.c, &apod).await.unwrap().info)["agentPid"]
        .as_i64()
        .unwrap() as i32;
    let ts = |s: &cri::ContainerStats| s.cpu.as_ref().unwrap().timestamp;
    let before_a = ts(&e.container_stats(&ac).await.unwrap().stats.unwrap());
    let before_b = ts(&e.container_stats(&bc).await.unwrap().stats.unwrap());

    // The unbind runs a second after the exec returned (the exec itself rides on vsock).
    let drv = "/sys/bus/virtio/drivers/vmw_vsock_virtio_transport";
    let script = format!(
        "ls -d {drv}/virtio* >/dev/null || exit 3; \
         setsid sh -c 'sleep 1; for d in {drv}/virtio*; do echo ${{d##*/}} > {drv}/unbind; done' \
         </dev/null >/dev/null 2>&1 & exit 0"
    );
    let r = e.exec(&ac, &["sh", "-c", &script], 30).await.unwrap();
    assert_eq!(
        r.exit_code,
        0,
        "no vsock driver to unbind in the guest: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    // Silent: an ExecSync no longer gets through, and it ends at its own timeout (kubelet's
    // exec probes), not at the agent's RPC deadline.
    eventually(
        "the guest stops answering",
        Duration::from_secs(30),
        || async {
            let t = Instant::now();
            let r = tokio::time::timeout(Duration::from_secs(20), e.exec(&ac, &["true"], 3)).await;
            let r = r.unwrap_or_else(|_| panic!("ExecSync (timeout 3 s) hung on a silent guest"));
            let took = t.elapsed();
            eprintln!(
                "ExecSync: {:?} after {took:?}",
                r.as_ref().map(|r| r.exit_code)
            );
            assert!(
                took < Duration::from_secs(8),
                "ExecSync with timeout 3 s took {took:?}"
            );
            // QEMU's vhost-user vsock keeps the connection and the guest never answers
            // (DeadlineExceeded at the timeout); husk-vmm's own vsock device is reset when
            // the driver goes and closes it (Unavailable at once). Either way an error, in
            // time.
            match r {
                Ok(_) => false,
                Err(s) => {
                    assert!(
                        matches!(s.code(), Code::DeadlineExceeded | Code::Unavailable),
                        "{s:?}"
                    );
                    true
                }
            }
        },
    )
    .await;

    let bound = STATS_DEADLINE + Duration::from_millis(1500);
    let t = Instant::now();
    let l = e.list_container_stats(None).await.unwrap();
    let took = t.elapsed();
    eprintln!("ListContainerStats with a silent guest: {took:?} (deadline {STATS_DEADLINE:?})");
    assert!(
        took < bound,
        "ListContainerStats took {took:?} with a silent guest"
    );
    let by_id = |id: &str| {
        ts(l.iter()
            .find(|s| s.attributes.as_ref().unwrap().id == id)
            .unwrap())
    };
    assert_eq!(by_id(&ac), before_a, "the silent pod: its last sample");
    assert!(by_id(&bc) > before_b, "the other pod: a fresh sample");

    // huskd's own calls do not wait on the guest.
    let mut lat = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        e.list_pods(None).await;
        lat.push(t.elapsed());
    }
    lat.sort();
    let p99 = lat[lat.len() - 1];
    eprintln!("ListPodSandbox with a silent guest: max of 20 {p99:?}");
    assert!(p99 < Duration::from_secs(1), "ListPodSandbox took {p99:?}");

    // Stop and remove still end the VM, well within kubelet's 2 minutes per call: the agent's
    // part of the stop is bounded as a whole (15 s), not by the RPC deadline per call.
    let t = Instant::now();
    tokio::time::timeout(Duration::from_secs(120), e.stop_and_remove_pod(&apod))
        .await
        .unwrap_or_else(|_| panic!("stop/remove of a silent pod hung\n{}", e.d.log()));
    let took = t.elapsed();
    eprintln!("Stop + RemovePodSandbox of the silent pod: {took:?}");
    assert!(
        took < Duration::from_secs(45),
        "stop + remove took {took:?}\n{}",
        e.d.log()
    );
    eventually(
        "the silent pod's VM is gone",
        Duration::from_secs(30),
        || async {
            !Path::new(&format!("/proc/{vmm}")).exists()
                || std::fs::read_to_string(format!("/proc/{vmm}/environ"))
                    .map_or(true, |env| !env.contains(&apod))
        },
    )
    .await;
    assert!(
        !e.list_pods(None).await.iter().any(|p| p.id == apod),
        "the silent pod is still listed"
    );
    e.stop_and_remove_pod(&bpod).await;
}

/// Raw protobuf bytes both ways (to send what a well-behaved client cannot).
#[derive(Clone, Copy)]
struct RawCodec;

struct Raw;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl tonic::codec::Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf;
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n).to_vec()))
    }
}
