//! Security-context cases: run-as user/group/username, supplemental groups,
//! read-only rootfs, privileged, capabilities add/drop/ALL, masked and
//! read-only paths, NoNewPrivs, seccomp (unconfined, runtime default,
//! localhost), sysctls.

use husk_proto::caps;
use husk_proto::cri;
use tonic::Code;

use super::{Kind, Suite, containerd_gap, status_field};

/// containerd's default capability set.
const DEFAULT_CAPS: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

fn mask(names: &[&str]) -> u64 {
    names
        .iter()
        .map(|n| 1u64 << caps::number(n).unwrap_or_else(|| panic!("capability {n}")))
        .fold(0, |a, b| a | b)
}

fn hex(out: &str, key: &str) -> u64 {
    u64::from_str_radix(status_field(out, key), 16).unwrap_or_else(|e| panic!("{key}: {e}: {out}"))
}

/// What "all capabilities" is in this suite's pods: the runtime's own bounding set on
/// the host (huskd's, containerd's), the guest kernel's full set in a VM.
fn all_caps(s: &Suite) -> u64 {
    match s.kind {
        Kind::Vm => caps::ALL,
        Kind::Namespace | Kind::Containerd => {
            let pid = s.e.d.pid().expect("runtime pid");
            let st = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("huskd status");
            caps::bounding_from_status(&st).expect("CapBnd") & caps::ALL
        }
    }
}

/// run_as_user/run_as_group/run_as_username/supplemental_groups, containerd's rules.
pub async fn users_and_groups(s: &Suite) {
    let ids = "id -u; id -g; id -G";
    // A uid without a group: the primary group from the image's /etc/passwd, the CRI's
    // supplemental groups plus the image's groups that list the user.
    let out = s
        .ok_output(&s.ctr_sc("user-1000", ids, |c| {
            c.run_as_user = Some(cri::Int64Value { value: 1000 });
            c.supplemental_groups = vec![1234];
        }))
        .await;
    assert_eq!(out, "1000\n1000\n1000 1234 50000\n");
    // An explicit group wins.
    let out = s
        .ok_output(&s.ctr_sc("user-group", ids, |c| {
            c.run_as_user = Some(cri::Int64Value { value: 1000 });
            c.run_as_group = Some(cri::Int64Value { value: 2000 });
        }))
        .await;
    assert_eq!(out, "1000\n2000\n2000 50000\n");
    // A user name, resolved in the image.
    let out = s
        .ok_output(&s.ctr_sc("username", ids, |c| {
            c.run_as_username = "user1000".into();
        }))
        .await;
    assert_eq!(out, "1000\n1000\n1000 50000\n");
    // A uid the image does not know: group 0.
    let out = s
        .ok_output(&s.ctr_sc("unknown-uid", "id -u; id -g", |c| {
            c.run_as_user = Some(cri::Int64Value { value: 4242 });
        }))
        .await;
    assert_eq!(out, "4242\n0\n");
    // A group without a user: refused.
    let err = s
        .create_err(
            &s.ctr_sc("group-only", ids, |c| {
                c.run_as_group = Some(cri::Int64Value { value: 50 });
            }),
            Code::InvalidArgument,
        )
        .await;
    // containerd: `user group "50" is specified without user`.
    let m = err.message();
    assert!(
        m.contains("run_as_group") || m.contains("without user"),
        "{err:?}"
    );
    // An unknown user name: refused.
    s.create_err(
        &s.ctr_sc("no-such-user", ids, |c| {
            c.run_as_username = "nobody-here".into()
        }),
        Code::InvalidArgument,
    )
    .await;
}

/// Capability sets: defaults, add/drop, ALL, privileged (= the starter's bounding set).
pub async fn capabilities(s: &Suite) {
    let all = all_caps(s);
    let script = "grep -E '^Cap(Bnd|Eff|Prm)' /proc/self/status";
    let run = |name: &'static str, f: fn(&mut cri::LinuxContainerSecurityContext)| {
        let cfg = s.ctr_sc(name, script, f);
        async move { s.ok_output(&cfg).await }
    };
    let out = run("caps-default", |_| {}).await;
    assert_eq!(hex(&out, "CapBnd"), mask(DEFAULT_CAPS), "{out}");
    assert_eq!(hex(&out, "CapEff"), mask(DEFAULT_CAPS), "{out}");

    let out = run("caps-privileged", |c| c.privileged = true).await;
    for k in ["CapBnd", "CapEff", "CapPrm"] {
        assert_eq!(hex(&out, k), all, "{k}: {out}");
    }
    let out = run("caps-all", |c| {
        c.capabilities = Some(cri::Capability {
            add_capabilities: vec!["ALL".into()],
            drop_capabilities: vec!["KILL".into()],
            ..Default::default()
        })
    })
    .await;
    assert_eq!(hex(&out, "CapBnd"), all & !mask(&["KILL"]), "{out}");
    let out = run("caps-drop-all", |c| {
        c.capabilities = Some(cri::Capability {
            add_capabilities: vec!["NET_BIND_SERVICE".into()],
            drop_capabilities: vec!["ALL".into()],
            ..Default::default()
        })
    })
    .await;
    assert_eq!(hex(&out, "CapBnd"), mask(&["NET_BIND_SERVICE"]), "{out}");
    let out = run("caps-add", |c| {
        c.capabilities = Some(cri::Capability {
            add_capabilities: vec!["SYS_ADMIN".into(), "CAP_NET_ADMIN".into()],
            drop_capabilities: vec!["CHOWN".into()],
            ..Default::default()
        })
    })
    .await;
    let mut want = (mask(DEFAULT_CAPS) | mask(&["SYS_ADMIN", "NET_ADMIN"])) & !mask(&["CHOWN"]);
    let names_checked = !containerd_gap(s, "capability names");
    if !names_checked {
        want &= !mask(&["NET_ADMIN"]);
    }
    assert_eq!(hex(&out, "CapEff"), want, "{out}");
    if names_checked {
        s.create_err(
            &s.ctr_sc("caps-bogus", "true", |c| {
                c.capabilities = Some(cri::Capability {
                    add_capabilities: vec!["NOT_A_CAP".into()],
                    ..Default::default()
                })
            }),
            Code::InvalidArgument,
        )
        .await;
    }
    // A privileged container can do what needs CAP_SYS_ADMIN: mount.
    let out = s
        .ok_output(&s.ctr_sc(
            "privileged-mount",
            "mount -t tmpfs t /mnt && echo mounted",
            |c| c.privileged = true,
        ))
        .await;
    assert_eq!(out, "mounted\n");
}

/// Read-only rootfs, masked and read-only paths, NoNewPrivs.
pub async fn paths_and_no_new_privs(s: &Suite) {
    let out = s
        .ok_output(&s.ctr_sc(
            "ro-rootfs",
            "touch /x 2>/dev/null && echo wrote || echo refused; grep NoNewPrivs /proc/self/status",
            |c| {
                c.readonly_rootfs = true;
                c.no_new_privs = true;
            },
        ))
        .await;
    assert_eq!(out.lines().next(), Some("refused"), "{out}");
    assert_eq!(status_field(&out, "NoNewPrivs"), "1");
    let out = s
        .ok_output(&s.ctr_sc(
            "rw-rootfs",
            "touch /x && echo wrote; grep NoNewPrivs /proc/self/status",
            |_| {},
        ))
        .await;
    assert_eq!(out.lines().next(), Some("wrote"), "{out}");
    assert_eq!(status_field(&out, "NoNewPrivs"), "0");
    let out = s
        .ok_output(&s.ctr_sc(
            "masked",
            "echo \"[$(cat /etc/secret)]\"; touch /home/x 2>/dev/null && echo wrote || echo refused; touch /tmp/x && echo tmp",
            |c| {
                c.masked_paths = vec!["/etc/secret".into()];
                c.readonly_paths = vec!["/home".into()];
            },
        ))
        .await;
    assert_eq!(out, "[]\nrefused\ntmp\n");
}

/// Seccomp: unconfined, the runtime default (Docker's and containerd's: `unshare` refused,
/// and `mount` allowed once CAP_SYS_ADMIN is granted) and a localhost profile (mkdir
/// refused).
pub async fn seccomp(s: &Suite) {
    let script = "grep '^Seccomp:' /proc/self/status; mount -t tmpfs t /mnt 2>/dev/null && echo mounted || echo no-mount; mkdir /tmp/d 2>/dev/null && echo made || echo no-mkdir";
    let with = |name: &'static str, profile: Option<cri::SecurityProfile>| {
        s.ctr_sc(name, script, move |c| {
            c.capabilities = Some(cri::Capability {
                add_capabilities: vec!["SYS_ADMIN".into()],
                ..Default::default()
            });
            c.seccomp = profile;
        })
    };
    let out = s
        .ok_output(&with(
            "seccomp-unconfined",
            Some(cri::SecurityProfile {
                profile_type: cri::security_profile::ProfileType::Unconfined as i32,
                ..Default::default()
            }),
        ))
        .await;
    assert_eq!(out, "Seccomp:\t0\nmounted\nmade\n");
    let out = s
        .ok_output(&with(
            "seccomp-default",
            Some(cri::SecurityProfile {
                profile_type: cri::security_profile::ProfileType::RuntimeDefault as i32,
                ..Default::default()
            }),
        ))
        .await;
    // Granted CAP_SYS_ADMIN unlocks mount (the profile's capability gate, as containerd's).
    assert_eq!(out, "Seccomp:\t2\nmounted\nmade\n");
    // Without it, the profile refuses what the capabilities alone would allow: a user
    // namespace (no capability needed; `unshare` is in the profile's CAP_SYS_ADMIN group).
    let userns = "unshare -U true 2>/dev/null && echo userns || echo no-userns";
    for (name, profile, want) in [
        (
            "userns-unconfined",
            cri::security_profile::ProfileType::Unconfined,
            "userns\n",
        ),
        (
            "userns-default",
            cri::security_profile::ProfileType::RuntimeDefault,
            "no-userns\n",
        ),
    ] {
        let cfg = s.ctr_sc(name, userns, |c| {
            c.seccomp = Some(cri::SecurityProfile {
                profile_type: profile as i32,
                ..Default::default()
            })
        });
        assert_eq!(s.ok_output(&cfg).await, want, "{name}");
    }
    let profile = s.host.path().join("deny-mkdir.json");
    std::fs::write(
        &profile,
        serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}],
        })
        .to_string(),
    )
    .expect("profile");
    let out = s
        .ok_output(&with(
            "seccomp-localhost",
            Some(cri::SecurityProfile {
                profile_type: cri::security_profile::ProfileType::Localhost as i32,
                localhost_ref: profile.display().to_string(),
            }),
        ))
        .await;
    assert_eq!(out, "Seccomp:\t2\nmounted\nno-mkdir\n");
    s.create_err(
        &with(
            "seccomp-missing",
            Some(cri::SecurityProfile {
                profile_type: cri::security_profile::ProfileType::Localhost as i32,
                localhost_ref: s.host.path().join("none.json").display().to_string(),
            }),
        ),
        Code::InvalidArgument,
    )
    .await;
}

/// The pod's sysctls reach its containers (an IPC and a network one).
pub async fn sysctls(s: &Suite) {
    let out = s
        .ok_output(&s.ctr(
            "sysctls",
            &[
                "sh",
                "-c",
                "cat /proc/sys/kernel/shm_rmid_forced /proc/sys/net/ipv4/ping_group_range",
            ],
        ))
        .await;
    assert_eq!(out, "1\n0\t2147483647\n");
}

/// A privileged container in a pod sandbox that is not privileged is refused, as containerd
/// refuses it ("no privileged container allowed in sandbox"): InvalidArgument naming why.
/// The suite pod is privileged, so this runs in a pod of its own (namespace kinds only: the
/// check is the same code for VM pods, before the sandbox kind matters, and a second
/// TCG-booted VM costs minutes).
pub async fn privileged_needs_privileged_pod(s: &Suite) {
    if s.kind == Kind::Vm {
        println!(
            "privileged container in an unprivileged pod: not run in the VM kind (a second \
             VM pod); the refusal is kind-independent (cri::validate::privileged)"
        );
        return;
    }
    let pcfg = s.e.pod("unprivileged");
    let pod =
        s.e.run_pod(&pcfg)
            .await
            .unwrap_or_else(|e| panic!("run the unprivileged pod: {e:?}\n{}", s.e.d.log()));
    let cfg = s.ctr_sc("privileged-in-unprivileged", "true", |c| {
        c.privileged = true
    });
    let err = match s.e.create(&pod, &cfg, &pcfg).await {
        Ok(id) => panic!("privileged container {id} created in an unprivileged pod"),
        Err(e) => e,
    };
    super::assert_code(s, &err, Code::InvalidArgument);
    assert!(
        err.message().contains("privileged container"),
        "the reason is named: {err:?}"
    );
    // The pod goes on: an unprivileged container still runs in it.
    let ok = s.ctr_sc("unprivileged-in-unprivileged", "sleep 1000", |_| {});
    let id = s.e.run(&pod, &ok, &pcfg).await;
    s.e.remove_container(&id).await.expect("remove");
    s.e.stop_and_remove_pod(&pod).await;
}
