//! Volume cases: host paths (directory, single file, through a symlink,
//! read-only, with an SELinux relabel request), mount propagation; and the
//! guest kernel's networking for a privileged container in a VM.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use husk_proto::cri;

use super::{Kind, Suite, host_dir};
use crate::runtime::eventually;

fn mount(container: &str, host: &Path) -> cri::Mount {
    cri::Mount {
        container_path: container.into(),
        host_path: host.display().to_string(),
        ..Default::default()
    }
}

/// Host paths: a directory reached through a symlink, a read-only single file, and a
/// mount with an SELinux relabel request (ignored: this host has no SELinux).
pub async fn volumes(s: &Suite) {
    assert!(
        !Path::new("/sys/fs/selinux/enforce").exists(),
        "this case expects a host without SELinux"
    );
    let d = host_dir(s, "vol", "from-host\n");
    let link = s.host.path().join("vol-link");
    std::os::unix::fs::symlink(&d, &link).expect("symlink");
    let mut cfg = s.ctr(
        "volumes",
        &[
            "sh",
            "-c",
            "cat /vol/f; cat /file; echo new > /vol/new && echo wrote; \
             (echo x > /file) 2>/dev/null && echo file-written || echo file-ro; cat /relabel/f",
        ],
    );
    let mut file = mount("/file", &d.join("f"));
    file.readonly = true;
    let mut relabel = mount("/relabel", &d);
    relabel.selinux_relabel = true;
    cfg.mounts = vec![mount("/vol", &link), file, relabel];
    let out = s.ok_output(&cfg).await;
    assert_eq!(out, "from-host\nfrom-host\nwrote\nfile-ro\nfrom-host\n");
    assert_eq!(
        std::fs::read_to_string(d.join("new")).expect("new"),
        "new\n"
    );
    assert_eq!(
        std::fs::read_to_string(d.join("f")).expect("f"),
        "from-host\n"
    );
}

fn sh(cmd: &str) {
    let st = Command::new("sh").arg("-c").arg(cmd).status().expect("sh");
    assert!(st.success(), "{cmd}");
}

/// Unmounts the propagation source tree on drop.
struct Shared(std::path::PathBuf);

impl Drop for Shared {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-R")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Propagation: host mounts made after the container started reach a host-to-container
/// volume and not a private one. The source is an rshared bind mount made before the pod
/// (critest does the same): a namespace pod gets a pod of its own for it (its agent's
/// mount namespace is a slave copy of the host's taken at pod start, and this host's `/`
/// is private), a VM pod uses the suite's (huskd binds into the share on the host).
///
/// A private volume must not show the later host mount in either kind (in a VM pod the
/// virtio-fs server keeps the two binds of one host directory apart: their inodes are
/// keyed by mount too). Bidirectional propagation (a privileged container's mount reaches
/// the host) is asserted on containerd, the reference; it is excluded for VM pods
/// ([`super::VM_EXCLUSIONS`]) and asserted in namespace pods as on containerd.
pub async fn mount_propagation(s: &Suite) {
    let d = host_dir(s, "prop", "p\n");
    let shared = Shared(d.clone());
    sh(&format!(
        "mount --bind {0} {0} && mount --make-rshared {0} && mkdir -p {0}/sub",
        d.display()
    ));
    let (pod, pcfg) = match s.kind {
        Kind::Vm => (s.pod.clone(), s.pcfg.clone()),
        Kind::Namespace | Kind::Containerd => {
            // Privileged: the bidirectional case's container mounts (containerd refuses a
            // privileged container in a sandbox that is not).
            let mut pcfg = s.e.pod("propagation");
            pcfg.linux = Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    privileged: true,
                    ..Default::default()
                }),
                ..Default::default()
            });
            let pod =
                s.e.run_pod(&pcfg)
                    .await
                    .unwrap_or_else(|e| panic!("run pod: {e:?}\n{}", s.e.d.log()));
            (pod, pcfg)
        }
    };
    let mut slave = mount("/h2c", &d);
    slave.propagation = cri::MountPropagation::PropagationHostToContainer as i32;
    let private = mount("/private", &d);
    let mut cfg = s.ctr("propagation", &["sleep", "1000"]);
    cfg.mounts = vec![slave, private];
    let id = s.e.run(&pod, &cfg, &pcfg).await;
    sh(&format!(
        "mount -t tmpfs tmpfs {0}/sub && echo late > {0}/sub/late",
        d.display()
    ));
    eventually(
        "host mount reaches the host-to-container volume",
        Duration::from_secs(60),
        || async {
            s.e.exec(&id, &["cat", "/h2c/sub/late"], 30)
                .await
                .is_ok_and(|r| r.exit_code == 0 && r.stdout == b"late\n")
        },
    )
    .await;
    let r =
        s.e.exec(&id, &["cat", "/private/sub/late"], 30)
            .await
            .expect("exec");
    assert_ne!(
        r.exit_code,
        0,
        "a private volume saw a later host mount: {}",
        String::from_utf8_lossy(&r.stdout)
    );
    s.e.remove_container(&id).await.expect("remove");
    if s.kind != Kind::Vm {
        bidirectional(s, &d, &pod, &pcfg).await;
    }
    if pod != s.pod {
        s.e.stop_and_remove_pod(&pod).await;
        if s.kind == Kind::Namespace {
            assert_no_mounts_of_pod(&pod);
        }
    }
    drop(shared);
}

/// A mount made by a privileged container in a bidirectional volume of the rshared `d`
/// shows up on the host.
async fn bidirectional(s: &Suite, d: &Path, pod: &str, pcfg: &cri::PodSandboxConfig) {
    std::fs::create_dir_all(d.join("bi")).expect("mkdir");
    let mut bi = mount("/bi", d);
    bi.propagation = cri::MountPropagation::PropagationBidirectional as i32;
    let mut cfg = s.ctr_sc("bidirectional", "sleep 1000", |c| c.privileged = true);
    cfg.mounts = vec![bi];
    let id = s.e.run(pod, &cfg, pcfg).await;
    let r =
        s.e.exec(
            &id,
            &[
                "sh",
                "-c",
                "mount -t tmpfs bi /bi/bi && echo from-ctr > /bi/bi/f",
            ],
            30,
        )
        .await
        .expect("exec");
    assert_eq!(r.exit_code, 0, "{}", String::from_utf8_lossy(&r.stderr));
    let seen = || std::fs::read_to_string(d.join("bi/f")).ok();
    eventually(
        "the container's mount reaches the host",
        Duration::from_secs(30),
        || async { seen().as_deref() == Some("from-ctr\n") },
    )
    .await;
    s.e.remove_container(&id).await.expect("remove");
    if s.kind == Kind::Namespace {
        bidirectional_refusals(s, d, pod, pcfg).await;
    }
}

/// Bidirectional propagation is refused, with InvalidArgument naming why, for a host
/// source that is not on a shared mount (containerd's rule) and for a container that is
/// not privileged (kubelet's); nothing of the refused container stays bound.
async fn bidirectional_refusals(s: &Suite, d: &Path, pod: &str, pcfg: &cri::PodSandboxConfig) {
    let private = host_dir(s, "bi-private", "x\n");
    let _guard = Shared(private.clone());
    sh(&format!(
        "mount --bind {0} {0} && mount --make-private {0}",
        private.display()
    ));
    let mut m = mount("/bi", &private);
    m.propagation = cri::MountPropagation::PropagationBidirectional as i32;
    let mut cfg = s.ctr_sc("bi-not-shared", "sleep 1000", |c| c.privileged = true);
    cfg.mounts = vec![m];
    let err =
        s.e.create(pod, &cfg, pcfg)
            .await
            .expect_err("a private source");
    super::assert_code(s, &err, tonic::Code::InvalidArgument);
    assert!(err.message().contains("not a shared mount"), "{err:?}");

    let mut m = mount("/bi", d);
    m.propagation = cri::MountPropagation::PropagationBidirectional as i32;
    let mut cfg = s.ctr_sc("bi-unprivileged", "sleep 1000", |_| {});
    cfg.mounts = vec![m];
    let err =
        s.e.create(pod, &cfg, pcfg)
            .await
            .expect_err("not privileged");
    super::assert_code(s, &err, tonic::Code::InvalidArgument);
    assert!(err.message().contains("privileged"), "{err:?}");
}

/// No mount of the pod's run dir is left on the host (its propagation dir and the host
/// sources bound in it) once the pod is removed.
fn assert_no_mounts_of_pod(pod: &str) {
    let left: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(pod))
        .map(str::to_string)
        .collect();
    assert!(
        left.is_empty(),
        "mounts left after RemovePodSandbox: {left:#?}"
    );
}

/// What a CNI plugin or a privileged container asks of the guest kernel: a bridge,
/// veth pairs, tun, bridge netfilter, iptables matches and targets (conntrack,
/// MASQUERADE).
pub async fn guest_kernel_networking(s: &Suite) {
    assert_eq!(s.kind, Kind::Vm);
    let script = "brctl addbr br-conf && ip link add vc0 type veth peer name vc1 \
        && ip link set vc0 master br-conf && ip link set br-conf up && ip link set vc0 up \
        && ip -o link show vc0 | grep -q 'master br-conf' && echo bridge-veth; \
        test -e /sys/class/misc/tun && echo tun; \
        test -e /proc/sys/net/bridge/bridge-nf-call-iptables && echo br-netfilter; \
        grep -q conntrack /proc/net/ip_tables_matches && echo conntrack; \
        grep -q MASQUERADE /proc/net/ip_tables_targets && echo masquerade; \
        grep -q DNAT /proc/net/ip_tables_targets && echo dnat";
    let cfg = s.ctr_sc("kernel-net", script, |c| c.privileged = true);
    let out = s.ok_output(&cfg).await;
    assert_eq!(
        out, "bridge-veth\ntun\nbr-netfilter\nconntrack\nmasquerade\ndnat\n",
        "guest kernel networking"
    );
}
