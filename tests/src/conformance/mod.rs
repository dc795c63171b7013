//! husk's CRI conformance suite, shared by both sandbox kinds: the cases walk the
//! CRI the way Kubernetes' CRI validation suite (cri-tools `critest`) does and
//! assert the semantics themselves (container output, CRI status, error codes),
//! through the independent tonic CRI client of the other suites.
//!
//! One [`Suite`] is one huskd, one registry with the suite image and one pod
//! (in a VM pod the cases reuse that pod: QEMU/TCG boots are slow). Cases
//! live in [`runtime`] (runtime info, lifecycle, exec, logs, images, ids,
//! streaming), [`security`] (users, groups, capabilities, paths, seccomp,
//! sysctls) and [`storage`] (volumes, propagation, the guest kernel's
//! networking). What a VM pod cannot do by design is in [`VM_EXCLUSIONS`],
//! the one table the suite checks and docs/vm.md lists.

pub mod runtime;
pub mod security;
pub mod storage;

use std::time::Duration;

use husk_proto::cri;
use tonic::Code;

use crate::containerd::Containerd;
use crate::cri_env::{CriEnv, CriServer, busybox_registry};
use crate::oci::{
    Compression, Entry, ImageSpec, Layer, Pusher, build_image, busybox_layer, file, set_cmd,
};
use crate::runtime::{NS, log_records, vm_handler, wait_exited};

/// The QEMU handler (TCG here) of the VM cases.
pub const QEMU: &str = "husk-qemu";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Namespace,
    Vm,
    /// The reference: Debian's containerd 1.6 (CRI plugin, runc), runtime
    /// handler `runc`. The cases assert the same semantics of it, except
    /// [`CONTAINERD_1_6_GAPS`].
    Containerd,
}

/// What the suite checks that containerd 1.6 (Debian 12's) does not have, each
/// skipped (and printed) in the containerd run only.
pub const CONTAINERD_1_6_GAPS: &[(&str, &str)] = &[
    (
        "runtime name",
        "the runtime names itself: \"containerd\", not \"husk\"",
    ),
    (
        "RuntimeConfig",
        "the RuntimeConfig RPC came with containerd 1.7 (Kubernetes 1.28): Unimplemented",
    ),
    (
        "runtime handlers in Status",
        "StatusResponse.runtime_handlers came with containerd 2.0 (Kubernetes 1.30)",
    ),
    (
        "error codes",
        "containerd 1.6 answers most refusals with code Unknown (a plain Go error: runc's \
         sethostname EINVAL for a 65-byte hostname, \"Multiple IDs found\" for an ambiguous \
         id prefix, \"container is not running\" for ReopenContainerLog of a stopped \
         container, a group without a user...), where husk gives the code the refusal means \
         (InvalidArgument, FailedPrecondition); the refusal itself is checked",
    ),
    (
        "ContainerStatus.image_id",
        "ContainerStatus.image_id came with Kubernetes 1.30's CRI: containerd 1.6 leaves it empty",
    ),
    (
        "capability names",
        "containerd 1.6 does not check capability names: it prefixes each with CAP_ itself, \
         so CAP_NET_ADMIN becomes the unknown CAP_CAP_NET_ADMIN, and it and NOT_A_CAP are \
         dropped without an error; husk takes both forms (as CRI-O does) and refuses an \
         unknown name with InvalidArgument",
    ),
    (
        "WebSocket stdin close",
        "containerd 1.6's streaming server speaks v4.channel.k8s.io at most: a WebSocket \
         client cannot close stdin (v5, Kubernetes 1.30); exec over WebSocket runs without stdin",
    ),
];

/// Asserts a refusal's code: `code`, or Unknown on containerd (its "error codes" gap).
pub fn assert_code(s: &Suite, err: &tonic::Status, code: Code) {
    if err.code() == Code::Unknown && code != Code::Unknown && containerd_gap(s, "error codes") {
        return;
    }
    assert_eq!(err.code(), code, "{err:?}");
}

/// Whether `what` (a [`CONTAINERD_1_6_GAPS`] entry) is skipped in this run;
/// prints the skip with its reason.
pub fn containerd_gap(s: &Suite, what: &str) -> bool {
    if s.kind != Kind::Containerd {
        return false;
    }
    let (_, why) = CONTAINERD_1_6_GAPS
        .iter()
        .find(|(w, _)| *w == what)
        .unwrap_or_else(|| panic!("{what:?} is not in CONTAINERD_1_6_GAPS"));
    println!("skipped on containerd 1.6: {what}: {why}");
    true
}

/// How a by-design exclusion of VM pods is asked for.
#[derive(Debug, Clone, Copy)]
pub enum Ask {
    /// A pod sharing a host namespace (CRI NamespaceMode NODE): network, pid, ipc.
    HostNamespace(&'static str),
    /// A container mount with bidirectional propagation.
    BidirectionalMount,
}

/// What a VM pod cannot do by design, each refused with InvalidArgument whose
/// message contains `reason`. docs/vm.md ("Known exclusions") lists the same.
pub struct Exclusion {
    pub what: &'static str,
    pub ask: Ask,
    pub reason: &'static str,
}

pub const VM_EXCLUSIONS: &[Exclusion] = &[
    Exclusion {
        what: "host network namespace (hostNetwork)",
        ask: Ask::HostNamespace("network"),
        reason: "cannot share the host network namespace",
    },
    Exclusion {
        what: "host PID namespace (hostPID)",
        ask: Ask::HostNamespace("pid"),
        reason: "cannot share the host PID namespace",
    },
    Exclusion {
        what: "host IPC namespace (hostIPC)",
        ask: Ask::HostNamespace("ipc"),
        reason: "cannot share the host IPC namespace",
    },
    Exclusion {
        what: "bidirectional mount propagation with the host",
        ask: Ask::BidirectionalMount,
        reason: "bidirectional propagation cannot cross into a VM sandbox",
    },
];

/// The node's hostname, as huskd sees it.
pub fn node_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("hostname")
        .trim()
        .to_string()
}

/// The suite image: busybox, more applets, a user 1000 (primary group 1000) that
/// /etc/group also lists in group 50000, and /etc/secret for the masked-path case.
fn suite_image_layers() -> Vec<Layer> {
    let mut extra = vec![
        file(
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n\
             user1000:x:1000:1000:u:/home/u:/bin/sh\n",
        ),
        file(
            "etc/group",
            "root:x:0:\nnogroup:x:65534:\ng1000:x:1000:\nextra:x:50000:user1000\nothers:x:50001:root\n",
        ),
        file("etc/secret", "secret\n"),
        Entry::Dir("mnt", 0o755),
        Entry::Dir("home", 0o755),
    ];
    for applet in [
        "brctl", "ip", "grep", "cut", "sed", "mkdir", "readlink", "stat", "touch", "test",
        "sysctl", "tail", "tr", "unshare", "umount", "rm",
    ] {
        extra.push(Entry::Symlink(format!("bin/{applet}"), "busybox".into()));
    }
    vec![
        busybox_layer(Compression::Gzip).expect("busybox layer"),
        Layer {
            entries: extra,
            compression: Compression::Gzip,
        },
    ]
}

/// One huskd with the suite image pulled and the suite's pod running.
pub struct Suite {
    pub e: CriEnv<Box<dyn CriServer>>,
    pub kind: Kind,
    /// `registry/conformance/suite:1`.
    pub img: String,
    /// The same image by manifest digest (`registry/conformance/suite@sha256:…`).
    pub img_by_digest: String,
    pub pcfg: cri::PodSandboxConfig,
    pub pod: String,
    /// Host directories for volume cases.
    pub host: tempfile::TempDir,
}

impl Suite {
    /// `extra`: huskd config (the VM handler's kernel and initrd).
    pub async fn start(kind: Kind, extra: &str) -> Suite {
        let e = match kind {
            Kind::Containerd => {
                let reg = busybox_registry().await;
                // containerd's pause image: busybox sleeping.
                let mut pause = build_image(&ImageSpec {
                    layers: vec![busybox_layer(Compression::Gzip).expect("busybox layer")],
                    ..Default::default()
                });
                set_cmd(&mut pause, &["/bin/sleep", "2147483647"]);
                Pusher::new(&reg.addr, None)
                    .push_image("conformance/pause", Some("1"), &pause)
                    .await
                    .expect("push the pause image");
                let pause = format!("{}/conformance/pause:1", reg.addr);
                let ctd = Containerd::start_with_bridge(&reg.addr, &pause).expect("containerd");
                if let Err(err) = crate::containerd::connect(&ctd.sock).await {
                    panic!("{err}\n{}", ctd.log());
                }
                let d: Box<dyn CriServer> = Box::new(ctd);
                let e = CriEnv::with_server(reg, d, "runc").await;
                e.pull(&pause).await;
                e
            }
            Kind::Namespace | Kind::Vm => {
                let (reg, d) = CriEnv::start_huskd(extra).await;
                let d: Box<dyn CriServer> = Box::new(d);
                let handler = if kind == Kind::Vm { vm_handler() } else { NS };
                CriEnv::with_server(reg, d, handler).await
            }
        }
        .remove_pods_on_drop();
        let img = build_image(&ImageSpec {
            layers: suite_image_layers(),
            ..Default::default()
        });
        let digest = Pusher::new(&e.reg.addr, None)
            .push_image("conformance/suite", Some("1"), &img)
            .await
            .expect("push the suite image");
        let tag = format!("{}/conformance/suite:1", e.reg.addr);
        e.pull(&tag).await;
        // No hostname and a name longer than a hostname may be (containerd: the node's).
        let name = format!("conformance-{}", "n".repeat(60));
        let mut pcfg = e.pod(&name);
        pcfg.hostname = String::new();
        pcfg.dns_config = Some(cri::DnsConfig {
            servers: vec!["198.51.100.53".into()],
            searches: vec!["conformance.example".into()],
            options: vec!["ndots:3".into()],
        });
        pcfg.linux = Some(cri::LinuxPodSandboxConfig {
            sysctls: [
                ("kernel.shm_rmid_forced".to_string(), "1".to_string()),
                (
                    "net.ipv4.ping_group_range".to_string(),
                    "0 2147483647".to_string(),
                ),
            ]
            .into(),
            security_context: Some(cri::LinuxSandboxSecurityContext {
                privileged: true,
                ..Default::default()
            }),
            ..Default::default()
        });
        let pod = e
            .run_pod(&pcfg)
            .await
            .unwrap_or_else(|err| panic!("run the suite pod: {err:?}\n{}", e.d.log()));
        Suite {
            img: tag,
            img_by_digest: format!("{}/conformance/suite@{digest}", e.reg.addr),
            e,
            kind,
            pcfg,
            pod,
            host: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// A container config of the suite image.
    pub fn ctr(&self, name: &str, cmd: &[&str]) -> cri::ContainerConfig {
        let mut c = self.e.ctr(name, cmd);
        c.image = Some(cri::ImageSpec {
            image: self.img.clone(),
            ..Default::default()
        });
        c
    }

    /// A container config running `script` with its security context set by `sc`.
    pub fn ctr_sc(
        &self,
        name: &str,
        script: &str,
        sc: impl FnOnce(&mut cri::LinuxContainerSecurityContext),
    ) -> cri::ContainerConfig {
        let mut c = self.ctr(name, &["sh", "-c", script]);
        let mut ctx = cri::LinuxContainerSecurityContext::default();
        sc(&mut ctx);
        c.linux = Some(cri::LinuxContainerConfig {
            security_context: Some(ctx),
            resources: None,
        });
        c
    }

    pub async fn create(&self, cfg: &cri::ContainerConfig) -> Result<String, tonic::Status> {
        self.e.create(&self.pod, cfg, &self.pcfg).await
    }

    /// Creates and starts `cfg` in the suite pod.
    pub async fn run(&self, cfg: &cri::ContainerConfig) -> String {
        self.e.run(&self.pod, cfg, &self.pcfg).await
    }

    /// Runs `cfg` to its end: (exit code, its stdout lines from the CRI log,
    /// joined). Removes the container.
    pub async fn output(&self, cfg: &cri::ContainerConfig) -> (i32, String) {
        let name = cfg.metadata.as_ref().expect("metadata").name.clone();
        let id = self.run(cfg).await;
        let st = wait_exited(&self.e.c, &id, Duration::from_secs(120)).await;
        let out = self.stdout_of(&name);
        self.e.remove_container(&id).await.expect("remove");
        (st.exit_code, out)
    }

    /// Like [`Self::output`], asserting exit 0.
    pub async fn ok_output(&self, cfg: &cri::ContainerConfig) -> String {
        let (code, out) = self.output(cfg).await;
        let name = &cfg.metadata.as_ref().expect("metadata").name;
        assert_eq!(
            code,
            0,
            "{name}: exit {code}, output {out:?}\n{}",
            self.e.d.log()
        );
        out
    }

    /// A container's stdout from its CRI log (full lines joined by newlines).
    pub fn stdout_of(&self, name: &str) -> String {
        let recs = log_records(&self.e.log_path(&self.pcfg, name));
        let mut out = String::new();
        for (stream, partial, text) in recs {
            if stream == "stdout" {
                out.push_str(&text);
                if !partial {
                    out.push('\n');
                }
            }
        }
        out
    }

    /// The error of a CreateContainer that must fail with `code`.
    pub async fn create_err(&self, cfg: &cri::ContainerConfig, code: Code) -> tonic::Status {
        let err = match self.create(cfg).await {
            Ok(id) => panic!("create {id} should have failed with {code:?}"),
            Err(e) => e,
        };
        assert_code(self, &err, code);
        err
    }

    /// Stops and removes the suite pod by a prefix of its id (`crictl stopp <prefix>`),
    /// then checks it is gone.
    pub async fn finish(self) {
        let prefix = &self.pod[..12];
        self.e
            .stop_pod(prefix)
            .await
            .unwrap_or_else(|e| panic!("stop pod by prefix: {e:?}\n{}", self.e.d.log()));
        self.e
            .remove_pod(prefix)
            .await
            .expect("remove pod by prefix");
        let st = crate::runtime::pod_status(&self.e.c, &self.pod).await;
        assert_eq!(crate::runtime::code_of(st), Code::NotFound);
    }
}

/// Every exclusion of [`VM_EXCLUSIONS`] is refused with InvalidArgument naming why, and
/// the VM pod goes on.
pub async fn vm_exclusions(s: &Suite) {
    assert_eq!(s.kind, Kind::Vm);
    for x in VM_EXCLUSIONS {
        let err = match x.ask {
            Ask::HostNamespace(ns) => {
                let mut p = s.e.pod(&format!("excluded-{ns}"));
                let opts = p
                    .linux
                    .get_or_insert_with(Default::default)
                    .security_context
                    .get_or_insert_with(Default::default)
                    .namespace_options
                    .get_or_insert_with(Default::default);
                let node = cri::NamespaceMode::Node as i32;
                match ns {
                    "network" => opts.network = node,
                    "pid" => opts.pid = node,
                    _ => opts.ipc = node,
                }
                match s.e.run_pod(&p).await {
                    Ok(id) => panic!("{}: pod {id} started", x.what),
                    Err(e) => e,
                }
            }
            Ask::BidirectionalMount => {
                let mut c = s.ctr("excluded-bidir", &["true"]);
                c.mounts.push(cri::Mount {
                    container_path: "/bi".into(),
                    host_path: s.host.path().display().to_string(),
                    propagation: cri::MountPropagation::PropagationBidirectional as i32,
                    ..Default::default()
                });
                match s.create(&c).await {
                    Ok(id) => panic!("{}: container {id} created", x.what),
                    Err(e) => e,
                }
            }
        };
        assert_eq!(err.code(), Code::InvalidArgument, "{}: {err:?}", x.what);
        assert!(
            err.message().contains(x.reason),
            "{}: {:?} does not say {:?}",
            x.what,
            err.message(),
            x.reason
        );
    }
}

/// `/proc/self/status` field `key` of a container's output line `Key:\tvalue`.
pub fn status_field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':')))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {key} in {out:?}"))
}

/// A host directory under the suite's temp dir with one file `f` holding `text`.
pub fn host_dir(s: &Suite, name: &str, text: &str) -> std::path::PathBuf {
    let d = s.host.path().join(name);
    std::fs::create_dir_all(&d).expect("mkdir");
    std::fs::write(d.join("f"), text).expect("write");
    d
}
