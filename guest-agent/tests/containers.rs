//! Real containers on this host through a real agent over its unix socket.
//! Needs root and /bin/busybox (busybox-static); skips with a reason otherwise.

mod common;

use std::time::Duration;

use std::os::unix::fs::OpenOptionsExt;

use common::{TestAgent, code, ctx, spec, unique};
use husk_proto::agent as pb;
use ttrpc::Code;

#[tokio::test]
async fn echo_hello_exit_code_and_state() {
    require_root!();
    let a = TestAgent::with_sandbox().await;
    let id = unique("echo");
    a.run(
        &id,
        &spec(&["sh", "-c", "echo hello; echo oops >&2; exit 3"]),
    )
    .await;
    let (out, err) = tokio::join!(a.read_all(&id, "", false), a.read_all(&id, "", true));
    assert_eq!(out, "hello\n");
    assert_eq!(err, "oops\n");
    let w = a.wait(&id, "").await;
    assert_eq!((w.exit_code, w.signal), (3, 0));
    assert!(w.exited_at >= w.started_at && w.started_at > 0, "{w:?}");
    let st = a
        .client
        .container_state(
            ctx(),
            &pb::ContainerStateRequest {
                container_id: id.clone(),
                ..Default::default()
            },
        )
        .await
        .expect("state");
    assert_eq!(
        st.status.enum_value(),
        Ok(pb::ContainerStatus::CONTAINER_STATUS_STOPPED)
    );
    assert_eq!(st.exit_code, 3);
    assert!(st.created_at > 0 && st.finished_at >= st.started_at);
    // Waiting again gives the same answer (exit codes are kept).
    assert_eq!(a.wait(&id, "").await.exit_code, 3);
    // The runner's intermediate processes were reaped too (give the 1 s tick a chance).
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while !common::zombie_children(a.agent_pid).is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(common::zombie_children(a.agent_pid), Vec::<i32>::new());
    a.remove(&id, false).await.expect("remove");
    let e = a.wait_err(&id).await;
    assert_eq!(e, Code::NOT_FOUND);
}

impl TestAgent {
    async fn wait_err(&self, id: &str) -> Code {
        let req = pb::WaitProcessRequest {
            container_id: id.into(),
            ..Default::default()
        };
        code(
            &self
                .client
                .wait_process(ctx(), &req)
                .await
                .expect_err("should fail"),
        )
    }
}

#[tokio::test]
async fn env_cwd_user_and_username() {
    require_root!();
    let a = TestAgent::with_sandbox().await;
    let mut s = spec(&[
        "sh",
        "-c",
        "echo $FOO; pwd; id -u; id -g; id -G; echo $HOME; umask",
    ]);
    s["process"]["env"] = serde_json::json!(["PATH=/bin", "FOO=bar baz"]);
    s["process"]["cwd"] = "/tmp".into();
    s["process"]["user"] =
        serde_json::json!({"uid": 1000, "gid": 1000, "additionalGids": [5], "umask": 63});
    let (out, err, code) = a.output(&unique("user"), &s).await;
    assert_eq!(code, 0, "stderr: {err}");
    assert_eq!(
        out,
        "bar baz\n/tmp\n1000\n1000\n1000 5 10\n/home/alice\n0077\n"
    );

    // A username is resolved against the image's /etc/passwd and /etc/group.
    let mut s = spec(&["sh", "-c", "id -u; id -G"]);
    s["process"]["user"] =
        serde_json::json!({"uid": 0, "gid": husk_proto::GID_FROM_PASSWD, "username": "alice"});
    let (out, _, code) = a.output(&unique("username"), &s).await;
    assert_eq!((out.as_str(), code), ("1000\n1000 10\n", 0));

    // A working directory the image lacks is created.
    let mut s = spec(&["pwd"]);
    s["process"]["cwd"] = "/srv/app/data".into();
    let (out, err, code) = a.output(&unique("cwd"), &s).await;
    assert_eq!((out.as_str(), code), ("/srv/app/data\n", 0), "{err}");

    let mut s = spec(&["true"]);
    s["process"]["user"] = serde_json::json!({"uid": 0, "gid": 0, "username": "mallory"});
    let id = unique("nouser");
    let e = a.create(&id, &s).await.expect_err("unknown user");
    assert_eq!(common::code(&e), Code::INVALID_ARGUMENT, "{e:?}");
    // The failed create left nothing behind: no cgroup, no state, no process.
    assert!(
        !cgroup_file(&a, "memory", &id, "").exists(),
        "cgroup left behind"
    );
    assert!(
        !a.dir
            .path()
            .join("state")
            .join(&a.sandbox_id)
            .join("containers")
            .join(&id)
            .exists(),
        "state left behind"
    );
    let procs = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/memory/{}/pause/cgroup.procs",
        a.cgroup_parent()
    ))
    .unwrap_or_default();
    assert!(
        procs.lines().count() <= 1,
        "only the holder remains: {procs}"
    );
}

#[tokio::test]
async fn readonly_rootfs_is_enforced_and_writable_one_is_private() {
    require_root!();
    let a = TestAgent::with_sandbox().await;
    let mut s = spec(&["sh", "-c", "touch /newfile"]);
    s["root"]["readonly"] = true.into();
    let (_, err, code) = a.output(&unique("ro"), &s).await;
    assert_ne!(code, 0);
    assert!(err.contains("Read-only file system"), "{err}");

    // A missing working directory cannot be made on a read-only root: the caller's fault.
    let mut s = spec(&["pwd"]);
    s["root"]["readonly"] = true.into();
    s["process"]["cwd"] = "/nowhere".into();
    assert_eq!(
        code_of(a.create(&unique("rocwd"), &s).await),
        Code::INVALID_ARGUMENT
    );

    let (out, err, code) = a
        .output(
            &unique("rw"),
            &spec(&["sh", "-c", "echo hi > /etc/motd && cat /etc/motd"]),
        )
        .await;
    assert_eq!((out.as_str(), code), ("hi\n", 0), "{err}");
    // The write went to the container's upper dir, not the image.
    assert_eq!(
        std::fs::read_to_string(common::rootfs().join("etc/motd")).expect("motd"),
        "from the image\n"
    );
}

/// The runner runs with ASLR off (the same layout in every runner, for QEMU/TCG's translation
/// cache); what it execs must not inherit that: a container's persona is the default one.
#[tokio::test]
async fn containers_get_address_space_randomisation_back() {
    require_root!();
    let a = TestAgent::with_sandbox().await;
    let (out, err, code) = a
        .output(&unique("aslr"), &spec(&["cat", "/proc/self/personality"]))
        .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        "00000000",
        "ADDR_NO_RANDOMIZE (0x0040000) leaked into the container"
    );
}

#[tokio::test]
async fn pid_namespace_hostname_and_etc_files() {
    require_root!();
    let a = TestAgent::with_sandbox().await;
    let (out, err, code) = a
        .output(&unique("pidns"), &spec(&["sh", "-c", "echo $$; hostname; cat /etc/hostname; grep nameserver /etc/resolv.conf; readlink /proc/self"]))
        .await;
    assert_eq!(code, 0, "{err}");
    let (head, last) = out.trim_end().rsplit_once('\n').expect("lines");
    assert_eq!(
        head,
        format!("1\n{h}\n{h}\nnameserver 10.96.0.10", h = a.hostname)
    );
    // Only this container's few processes exist in its pid namespace.
    assert!(last.parse::<u32>().expect("pid") < 10, "{out}");
    // The host's hostname is untouched.
    assert_ne!(
        nix::unistd::gethostname()
            .expect("hostname")
            .to_string_lossy(),
        a.hostname
    );
}

#[tokio::test]
async fn exec_into_running_container_with_stdin_and_tty() {
    require_root!();
    let a = TestAgent::with_sandbox().await;
    let id = unique("exec");
    let mut s = spec(&["sleep", "1000"]);
    s["process"]["env"] = serde_json::json!(["PATH=/bin", "FROM_SPEC=yes"]);
    a.run(&id, &s).await;

    a.exec(
        &id,
        "e1",
        &[
            "sh",
            "-c",
            "cat /proc/1/cmdline | tr '\\0' ' '; echo; hostname; echo $FROM_SPEC",
        ],
        false,
        false,
    )
    .await
    .expect("exec");
    assert_eq!(
        a.read_all(&id, "e1", false).await,
        format!("sleep 1000 \n{}\nyes\n", a.hostname)
    );
    assert_eq!(a.wait(&id, "e1").await.exit_code, 0);
    let rm = |e: &str| pb::RemoveProcessRequest {
        container_id: id.clone(),
        exec_id: e.into(),
        ..Default::default()
    };
    a.client
        .remove_process(ctx(), &rm("e1"))
        .await
        .expect("remove exec");
    assert_eq!(
        code(
            &a.client
                .remove_process(ctx(), &rm("e1"))
                .await
                .expect_err("gone")
        ),
        Code::NOT_FOUND
    );

    // stdin
    a.exec(&id, "e2", &["cat"], true, false)
        .await
        .expect("exec cat");
    let w = pb::WriteStdinRequest {
        container_id: id.clone(),
        exec_id: "e2".into(),
        data: b"piped".to_vec(),
        ..Default::default()
    };
    assert_eq!(a.client.write_stdin(ctx(), &w).await.expect("write").len, 5);
    a.client
        .close_stdin(
            ctx(),
            &pb::CloseStdinRequest {
                container_id: id.clone(),
                exec_id: "e2".into(),
                ..Default::default()
            },
        )
        .await
        .expect("close");
    assert_eq!(a.read_all(&id, "e2", false).await, "piped");
    assert_eq!(a.wait(&id, "e2").await.exit_code, 0);

    // tty + resize: the shell waits for a line, then reports the size.
    a.exec(
        &id,
        "e3",
        &["sh", "-c", "tty; read x; stty size; exit 4"],
        true,
        true,
    )
    .await
    .expect("exec tty");
    let r = pb::ResizeTtyRequest {
        container_id: id.clone(),
        exec_id: "e3".into(),
        rows: 33,
        cols: 111,
        ..Default::default()
    };
    a.client.resize_tty(ctx(), &r).await.expect("resize");
    let w = pb::WriteStdinRequest {
        container_id: id.clone(),
        exec_id: "e3".into(),
        data: b"go\n".to_vec(),
        ..Default::default()
    };
    a.client.write_stdin(ctx(), &w).await.expect("write");
    let out = a.read_all(&id, "e3", false).await;
    assert!(out.contains("33 111"), "{out:?}");
    // The pty lives in the container's own devpts.
    assert!(out.contains("/dev/pts/0"), "{out:?}");
    assert_eq!(a.wait(&id, "e3").await.exit_code, 4);

    // An exec as another user, resolved by name in the container.
    let req = pb::ExecProcessRequest {
        container_id: id.clone(),
        exec_id: "e5".into(),
        process: serde_json::to_vec(
            &serde_json::json!({"args": ["id"], "user": {"uid": 0, "gid": husk_proto::GID_FROM_PASSWD, "username": "alice"}}),
        )
        .expect("json"),
        ..Default::default()
    };
    a.client
        .exec_process(ctx(), &req)
        .await
        .expect("exec as alice");
    assert_eq!(
        a.read_all(&id, "e5", false).await,
        "uid=1000(alice) gid=1000(alice) groups=10(wheel)\n"
    );

    // Bad exec requests.
    let e = a
        .exec(&id, "e4", &["no-such-binary"], false, false)
        .await
        .expect_err("missing binary");
    assert_eq!(code(&e), Code::INVALID_ARGUMENT, "{e:?}");
    let e = a
        .exec(&id, "e2", &["true"], false, false)
        .await
        .expect_err("duplicate exec id");
    assert_eq!(code(&e), Code::ALREADY_EXISTS);
    let e = a
        .exec("nope", "x", &["true"], false, false)
        .await
        .expect_err("unknown container");
    assert_eq!(code(&e), Code::NOT_FOUND);

    let procs = a
        .client
        .list_processes(
            ctx(),
            &pb::ListProcessesRequest {
                container_id: id.clone(),
                ..Default::default()
            },
        )
        .await
        .expect("ps");
    assert!(
        procs.processes.iter().any(|p| p.cmdline == "sleep 1000"),
        "{procs:?}"
    );

    let e = a.remove(&id, false).await.expect_err("running");
    assert_eq!(code(&e), Code::FAILED_PRECONDITION);
    a.remove(&id, true).await.expect("force remove");
}

#[tokio::test]
async fn signals_reach_the_process() {
    require_root!();
    let a = TestAgent::with_sandbox().await;
    let id = unique("trap");
    a.run(
        &id,
        &spec(&[
            "sh",
            "-c",
            "trap 'exit 42' TERM; echo ready; while true; do sleep 0.05; done",
        ]),
    )
    .await;
    let first = a
        .client
        .read_stdout(
            ctx(),
            &pb::ReadStreamRequest {
                container_id: id.clone(),
                ..Default::default()
            },
        )
        .await
        .expect("read");
    assert_eq!(first.data, b"ready\n");
    a.signal(&id, "", libc::SIGTERM).await.expect("term");
    assert_eq!(a.wait(&id, "").await.exit_code, 42);
    let e = a.signal(&id, "", libc::SIGTERM).await.expect_err("exited");
    assert_eq!(code(&e), Code::FAILED_PRECONDITION);
    a.remove(&id, false).await.expect("remove");

    let id = unique("kill");
    a.run(&id, &spec(&["sleep", "1000"])).await;
    let e = a.signal(&id, "", 999).await.expect_err("bad signal");
    assert_eq!(code(&e), Code::INVALID_ARGUMENT);
    a.signal(&id, "", libc::SIGKILL).await.expect("kill");
    let w = a.wait(&id, "").await;
    assert_eq!((w.exit_code, w.signal), (137, 9));
    a.remove(&id, false).await.expect("remove");
}

fn cgroup_file(a: &TestAgent, controller: &str, id: &str, file: &str) -> std::path::PathBuf {
    let v2 = std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let base = if v2 {
        "/sys/fs/cgroup".to_string()
    } else {
        format!("/sys/fs/cgroup/{controller}")
    };
    std::path::Path::new(&base)
        .join(a.cgroup_parent())
        .join(id)
        .join(file)
}

#[tokio::test]
async fn cgroup_limits_stats_and_update() {
    require_root!();
    let a = TestAgent::with_sandbox().await;
    let id = unique("limits");
    let mut s = spec(&[
        "sh",
        "-c",
        "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; echo done; sleep 1000",
    ]);
    s["linux"]["resources"] = serde_json::json!({
        "memory": {"limit": 67108864}, "cpu": {"shares": 512, "quota": 50000, "period": 100000}, "pids": {"limit": 64}
    });
    a.run(&id, &s).await;
    let r = a
        .client
        .read_stdout(
            ctx(),
            &pb::ReadStreamRequest {
                container_id: id.clone(),
                ..Default::default()
            },
        )
        .await
        .expect("read");
    assert_eq!(r.data, b"done\n");
    let v2 = std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let (mem_file, quota_file) = if v2 {
        ("memory.max", "cpu.max")
    } else {
        ("memory.limit_in_bytes", "cpu.cfs_quota_us")
    };
    let read = |c, f| {
        std::fs::read_to_string(cgroup_file(&a, c, &id, f))
            .unwrap_or_else(|e| panic!("{f}: {e}"))
            .trim()
            .to_string()
    };
    assert_eq!(read("memory", mem_file), "67108864");
    assert!(read("cpu", quota_file).starts_with("50000"));
    assert_eq!(read("pids", "pids.max"), "64");

    let st = a
        .client
        .container_stats(
            ctx(),
            &pb::ContainerStatsRequest {
                container_id: id.clone(),
                ..Default::default()
            },
        )
        .await
        .expect("stats");
    assert!(st.cpu_usage_ns > 0, "{st:?}");
    assert!(
        st.memory_usage_bytes > 0 && st.memory_working_set_bytes > 0,
        "{st:?}"
    );
    assert_eq!(st.memory_limit_bytes, 67108864);
    assert!(st.pids_current >= 1 && st.pids_limit == 64, "{st:?}");

    let res = serde_json::json!({"memory": {"limit": 134217728, "reservation": 33554432}, "pids": {"limit": 32}});
    let u = pb::UpdateResourcesRequest {
        container_id: id.clone(),
        resources: serde_json::to_vec(&res).expect("json"),
        ..Default::default()
    };
    a.client.update_resources(ctx(), &u).await.expect("update");
    assert_eq!(read("memory", mem_file), "134217728");
    assert_eq!(read("pids", "pids.max"), "32");
    assert_eq!(
        read(
            "memory",
            if v2 {
                "memory.low"
            } else {
                "memory.soft_limit_in_bytes"
            }
        ),
        "33554432"
    );
    // Raw v2 files only where there is v2.
    let unified = serde_json::json!({"unified": {"memory.high": "100000000"}});
    let u = pb::UpdateResourcesRequest {
        container_id: id.clone(),
        resources: serde_json::to_vec(&unified).expect("json"),
        ..Default::default()
    };
    let r = a.client.update_resources(ctx(), &u).await;
    if v2 {
        r.expect("unified");
    } else {
        assert_eq!(
            code(&r.expect_err("v1 has no unified files")),
            Code::INVALID_ARGUMENT
        );
    }
    let bad = serde_json::json!({"cpu": {"shares": 1}});
    let u = pb::UpdateResourcesRequest {
        container_id: id.clone(),
        resources: serde_json::to_vec(&bad).expect("json"),
        ..Default::default()
    };
    assert_eq!(
        code(
            &a.client
                .update_resources(ctx(), &u)
                .await
                .expect_err("bad shares")
        ),
        Code::INVALID_ARGUMENT
    );

    let pod = a
        .client
        .sandbox_stats(
            ctx(),
            &pb::SandboxStatsRequest {
                sandbox_id: a.sandbox_id.clone(),
                ..Default::default()
            },
        )
        .await
        .expect("pod stats");
    let cg = pod.cgroup.as_ref().expect("pod cgroup");
    assert!(
        cg.cpu_usage_ns >= st.cpu_usage_ns && cg.memory_usage_bytes > 0,
        "{pod:?}"
    );
    assert_eq!(
        pod.interfaces
            .iter()
            .map(|i| i.name.as_str())
            .collect::<Vec<_>>(),
        ["lo"],
        "fresh pod netns"
    );

    a.remove(&id, true).await.expect("remove");
    assert!(
        !cgroup_file(&a, "memory", &id, "").exists(),
        "cgroup removed"
    );
}

#[tokio::test]
async fn mounts_masks_caps_and_seccomp() {
    require_root!();
    let a = TestAgent::with_sandbox().await;
    let host = tempfile::tempdir().expect("tmp");
    std::fs::write(host.path().join("file"), "host data\n").expect("write");
    let mut s = spec(&[
        "sh",
        "-c",
        "cat /data/file; touch /data/x 2>&1; echo $(wc -c < /proc/timer_list) $(ls /sys/firmware | wc -l); grep -E 'CapEff|NoNewPrivs' /proc/self/status; (echo x > /proc/sys/kernel/hostname) 2>&1; mkdir /tmp/d 2>&1; echo end",
    ]);
    s["mounts"].as_array_mut().expect("mounts").push(serde_json::json!(
        {"destination": "/data", "type": "bind", "source": host.path(), "options": ["rbind", "ro"]}));
    s["process"]["capabilities"] =
        serde_json::json!({"bounding": [], "effective": [], "permitted": []});
    s["linux"]["seccomp"] = serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "flags": ["SECCOMP_FILTER_FLAG_LOG"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    });
    let (out, err, code) = a.output(&unique("mounts"), &s).await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "host data");
    assert!(lines[1].contains("Read-only file system"), "{out}");
    assert_eq!(
        lines[2].trim(),
        "0 0",
        "masked file reads empty, masked dir is empty: {out}"
    );
    assert!(
        lines[3].starts_with("CapEff:") && lines[3].ends_with("0000000000000000"),
        "{out}"
    );
    assert_eq!(
        lines[4].split_whitespace().collect::<Vec<_>>(),
        ["NoNewPrivs:", "1"]
    );
    assert!(
        lines[5].contains("Read-only file system") || lines[5].contains("Permission denied"),
        "{out}"
    );
    assert!(
        lines[6].contains("Operation not permitted"),
        "seccomp: {out}"
    );
    assert_eq!(lines[7], "end");

    // Bad mounts are rejected up front.
    let mut s = spec(&["true"]);
    s["mounts"]
        .as_array_mut()
        .expect("mounts")
        .push(serde_json::json!(
        {"destination": "/data", "type": "bind", "source": "/no/such/dir", "options": ["rbind"]}));
    assert_eq!(
        code_of(a.create(&unique("badmount"), &s).await),
        Code::INVALID_ARGUMENT
    );
}

fn code_of<T: std::fmt::Debug>(r: ttrpc::Result<T>) -> Code {
    code(&r.expect_err("should fail"))
}

#[tokio::test]
async fn api_errors_map_to_codes() {
    require_root!();
    let a = TestAgent::start().await;
    let s = spec(&["true"]);
    assert_eq!(
        code_of(a.create("c1", &s).await),
        Code::FAILED_PRECONDITION,
        "no sandbox yet"
    );
    let check = a
        .client
        .check(ctx(), &pb::CheckRequest::new())
        .await
        .expect("check");
    assert_eq!(
        (check.sandbox_id.as_str(), check.sandbox_ready),
        ("", false)
    );
    // A failed CreateSandbox leaves nothing behind and can be retried.
    let bad = pb::CreateSandboxRequest {
        sandbox_id: a.sandbox_id.clone(),
        cgroup_parent: a.cgroup_parent(),
        resources: b"{bad json".to_vec(),
        ..Default::default()
    };
    assert_eq!(
        code_of(a.client.create_sandbox(ctx(), &bad).await),
        Code::INVALID_ARGUMENT
    );
    let bad = pb::CreateSandboxRequest {
        sandbox_id: a.sandbox_id.clone(),
        mounts: vec![pb::SandboxMount {
            name: "x".into(),
            source: "/no/such/dir".into(),
            fstype: "bind".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    assert_eq!(
        code_of(a.client.create_sandbox(ctx(), &bad).await),
        Code::INVALID_ARGUMENT
    );
    for c in ["memory", "cpu", "pids"] {
        let d = std::path::Path::new("/sys/fs/cgroup")
            .join(c)
            .join(a.cgroup_parent());
        assert!(!d.exists(), "{} left behind", d.display());
    }
    assert!(
        !a.dir.path().join("state").join(&a.sandbox_id).exists(),
        "sandbox state left behind"
    );
    a.create_sandbox(false).await;
    assert_eq!(
        code_of(
            a.client
                .create_sandbox(
                    ctx(),
                    &pb::CreateSandboxRequest {
                        sandbox_id: "other".into(),
                        ..Default::default()
                    }
                )
                .await
        ),
        Code::ALREADY_EXISTS
    );
    let check = a
        .client
        .check(ctx(), &pb::CheckRequest::new())
        .await
        .expect("check");
    assert_eq!(
        (check.sandbox_id.as_str(), check.sandbox_ready),
        (a.sandbox_id.as_str(), true)
    );
    assert_eq!(
        code_of(a.create("bad/id", &s).await),
        Code::INVALID_ARGUMENT
    );
    let req = pb::CreateContainerRequest {
        container_id: "junk".into(),
        oci_spec: b"{not json".to_vec(),
        ..Default::default()
    };
    assert_eq!(
        code_of(a.client.create_container(ctx(), &req).await),
        Code::INVALID_ARGUMENT
    );
    let mut s2 = s.clone();
    s2["linux"]["resources"] = serde_json::json!({"memory": {"limit": 12}});
    assert_eq!(code_of(a.create("c0", &s2).await), Code::INVALID_ARGUMENT);
    a.create("c1", &s).await.expect("create");
    assert_eq!(code_of(a.create("c1", &s).await), Code::ALREADY_EXISTS);
    assert_eq!(code_of(a.start_container("nope").await), Code::NOT_FOUND);
    a.start_container("c1").await.expect("start");
    assert_eq!(
        code_of(a.start_container("c1").await),
        Code::FAILED_PRECONDITION
    );
    assert_eq!(a.wait("c1", "").await.exit_code, 0);
    assert_eq!(
        code_of(
            a.client
                .resize_tty(
                    ctx(),
                    &pb::ResizeTtyRequest {
                        container_id: "c1".into(),
                        rows: 1,
                        cols: 1,
                        ..Default::default()
                    }
                )
                .await
        ),
        Code::FAILED_PRECONDITION
    );
    // A created (never started) container can be removed.
    a.create("c2", &spec(&["sleep", "1000"]))
        .await
        .expect("create");
    a.remove("c2", false).await.expect("remove created");
    let list = a
        .client
        .list_containers(ctx(), &pb::ListContainersRequest::new())
        .await
        .expect("list");
    assert_eq!(
        list.containers
            .iter()
            .map(|c| c.container_id.as_str())
            .collect::<Vec<_>>(),
        ["c1"]
    );
    // A failed start: the binary does not exist.
    a.create("c3", &spec(&["/bin/missing"]))
        .await
        .expect("create");
    assert_eq!(
        code_of(a.start_container("c3").await),
        Code::INVALID_ARGUMENT
    );
    a.remove("c3", false).await.expect("remove failed");
    a.client
        .destroy_sandbox(
            ctx(),
            &pb::DestroySandboxRequest {
                sandbox_id: a.sandbox_id.clone(),
                ..Default::default()
            },
        )
        .await
        .expect("destroy");
    assert_eq!(code_of(a.container_state_of("c1").await), Code::NOT_FOUND);
}

impl TestAgent {
    async fn container_state_of(&self, id: &str) -> ttrpc::Result<pb::ContainerStateResponse> {
        self.client
            .container_state(
                ctx(),
                &pb::ContainerStateRequest {
                    container_id: id.into(),
                    ..Default::default()
                },
            )
            .await
    }
}

#[tokio::test]
async fn shared_pod_pid_namespace() {
    require_root!();
    let a = TestAgent::start().await;
    a.create_sandbox(true).await;
    let mut s = spec(&["sh", "-c", "echo $$; cat /proc/1/cmdline | tr '\\0' ' '"]);
    // No pid namespace in the spec: the container joins the pod's.
    s["linux"]["namespaces"] = serde_json::json!([{"type": "mount"}]);
    let (out, err, code) = a.output(&unique("sharedpid"), &s).await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_ne!(lines[0], "1", "not the pod's init: {out}");
    assert!(
        lines[1].contains("__init"),
        "pid 1 is the sandbox holder: {out}"
    );
}

#[tokio::test]
async fn oom_kill_is_reported() {
    require_root!();
    let a = TestAgent::with_sandbox().await;
    let id = unique("oom");
    let mut s = spec(&[
        "sh",
        "-c",
        "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived",
    ]);
    s["linux"]["resources"] = serde_json::json!({"memory": {"limit": 16777216, "swap": 16777216}});
    a.run(&id, &s).await;
    let w = a.wait(&id, "").await;
    assert_ne!(w.exit_code, 0);
    // Right after the exit, before the monitor's next poll, the state knows.
    let st = a.container_state_of(&id).await.expect("state");
    assert!(st.oom_killed, "{st:?}");
    let ev = tokio::time::timeout(
        Duration::from_secs(60),
        a.client.get_oom_event(
            common::short_ctx(Duration::from_secs(60)),
            &pb::GetOomEventRequest::new(),
        ),
    )
    .await
    .expect("oom event in time")
    .expect("oom event");
    assert_eq!(ev.container_id, id);
}

#[tokio::test]
async fn pod_shares_shm_sandbox_mounts_and_netns_sysctls() {
    require_root!();
    let a = TestAgent::start().await;
    let scratch = pb::SandboxMount {
        name: "scratch".into(),
        source: "tmpfs".into(),
        fstype: "tmpfs".into(),
        options: vec!["size=1m".into()],
        ..Default::default()
    };
    let pod = a
        .create_sandbox_with(
            false,
            vec![scratch],
            Some(serde_json::json!({"memory": {"limit": 268435456}})),
        )
        .await;
    // Pod-level limit on the pod cgroup; the namespace holder in its pause leaf.
    let v2 = std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let (mem_dir, limit_file) = if v2 {
        ("/sys/fs/cgroup".to_string(), "memory.max")
    } else {
        ("/sys/fs/cgroup/memory".to_string(), "memory.limit_in_bytes")
    };
    let pod_cg = std::path::Path::new(&mem_dir).join(a.cgroup_parent());
    assert_eq!(
        std::fs::read_to_string(pod_cg.join(limit_file))
            .expect("pod limit")
            .trim(),
        "268435456"
    );
    // (The runner's short-lived intermediate may still be listed next to the holder.)
    let pause_procs =
        std::fs::read_to_string(pod_cg.join("pause/cgroup.procs")).expect("pause procs");
    assert!(
        pause_procs.lines().any(|p| p == pod.pid.to_string()),
        "{pause_procs}"
    );
    let host_forward =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").expect("host sysctl");

    let with_scratch = |args: &[&str]| {
        let mut s = spec(args);
        s["mounts"].as_array_mut().expect("mounts").push(serde_json::json!(
            {"destination": "/scratch", "type": "bind", "source": "sandbox:scratch", "options": ["rbind"]}));
        s
    };
    let mut s = with_scratch(&[
        "sh",
        "-c",
        "echo shm > /dev/shm/x && echo sb > /scratch/y && ulimit -n && cat /proc/sys/net/ipv4/ip_forward",
    ]);
    s["linux"]["sysctl"] = serde_json::json!({"net.ipv4.ip_forward": (if host_forward.trim() == "1" { "0" } else { "1" })});
    s["process"]["rlimits"] =
        serde_json::json!([{"type": "RLIMIT_NOFILE", "hard": 1000, "soft": 900}]);
    let (out, err, code) = a.output(&unique("writer"), &s).await;
    assert_eq!(code, 0, "{err}");
    let pod_forward = if host_forward.trim() == "1" { "0" } else { "1" };
    assert_eq!(out, format!("900\n{pod_forward}\n"));

    let (out, err, code) = a
        .output(
            &unique("reader"),
            &with_scratch(&[
                "sh",
                "-c",
                "cat /dev/shm/x /scratch/y /proc/sys/net/ipv4/ip_forward",
            ]),
        )
        .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, format!("shm\nsb\n{pod_forward}\n"));
    // The sysctl was the pod network namespace's, not the host's.
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").expect("host sysctl"),
        host_forward
    );

    let mut s = spec(&["true"]);
    s["linux"]["sysctl"] = serde_json::json!({"../../etc/x": "1"});
    assert_eq!(
        code_of(a.create(&unique("badsysctl"), &s).await),
        Code::INVALID_ARGUMENT
    );
    let mut s = spec(&["true"]);
    s["process"]["capabilities"] = serde_json::json!({"bounding": ["CAP_NOPE"]});
    assert_eq!(
        code_of(a.create(&unique("badcap"), &s).await),
        Code::INVALID_ARGUMENT
    );
}

#[tokio::test]
async fn many_containers_in_parallel() {
    require_root!();
    let a = std::sync::Arc::new(TestAgent::with_sandbox().await);
    let mut tasks = Vec::new();
    for i in 0..12 {
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("par-{i}");
            let script = format!("echo {i}; exit {}", i % 5);
            let (out, err, code) = a.output(&id, &spec(&["sh", "-c", &script])).await;
            assert_eq!((out, code), (format!("{i}\n"), i % 5), "{err}");
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let list = a
        .client
        .list_containers(ctx(), &pb::ListContainersRequest::new())
        .await
        .expect("list");
    assert!(list.containers.is_empty(), "all removed: {list:?}");
}

#[tokio::test]
async fn devices_are_allow_listed() {
    require_root!();
    let a = TestAgent::with_sandbox().await;
    let v1_devices = std::path::Path::new("/sys/fs/cgroup/devices").exists();
    // A spec device is created (and allowed); a node made by hand for a host disk is not usable.
    let mut s = spec(&[
        "sh",
        "-c",
        "ls -l /dev/mynull | head -c 1; echo; echo hi > /dev/mynull && echo wrote; \
        mknod /tmp/disk b 7 0 && (head -c 1 /tmp/disk > /dev/null 2>&1 && echo readable || echo denied)",
    ]);
    s["linux"]["devices"] = serde_json::json!([{"path": "/dev/mynull", "type": "c", "major": 1, "minor": 3, "fileMode": 438}]);
    let (out, err, code) = a.output(&unique("devices"), &s).await;
    assert_eq!(code, 0, "{err}");
    let want_disk = if v1_devices { "denied" } else { "readable" };
    assert_eq!(out, format!("c\nwrote\n{want_disk}\n"), "{err}");
}

#[tokio::test]
async fn tty_container_with_stdin() {
    require_root!();
    let a = TestAgent::with_sandbox().await;
    let id = unique("tty");
    a.create_with(
        &id,
        &spec(&["sh", "-c", "tty; stty size; read x; echo got $x; exit 5"]),
        true,
        true,
    )
    .await
    .expect("create");
    // Resize before start: the size is there when the shell asks.
    let r = pb::ResizeTtyRequest {
        container_id: id.clone(),
        rows: 24,
        cols: 99,
        ..Default::default()
    };
    a.client.resize_tty(ctx(), &r).await.expect("resize");
    a.start_container(&id).await.expect("start");
    let w = pb::WriteStdinRequest {
        container_id: id.clone(),
        data: b"line\n".to_vec(),
        ..Default::default()
    };
    a.client.write_stdin(ctx(), &w).await.expect("write");
    let out = a.read_all(&id, "", false).await;
    assert!(out.contains("24 99"), "{out:?}");
    assert!(out.contains("got line"), "{out:?}");
    assert!(
        out.contains("/dev/pts/0"),
        "tty is named inside the container: {out:?}"
    );
    // One stream on a tty: stderr is empty and closed.
    assert_eq!(a.read_all(&id, "", true).await, "");
    assert_eq!(a.wait(&id, "").await.exit_code, 5);
    a.remove(&id, false).await.expect("remove");
}

/// A runner that has not exec'd yet (a created container) runs the agent
/// binary; a container process reaching it through /proc/PID/exe (an image
/// binary that is `#!/proc/self/exe`, CVE-2019-5736) must not be able to
/// overwrite it: runners run from a read-only bind mount of the binary.
#[tokio::test]
async fn runner_binary_cannot_be_overwritten() {
    require_root!();
    let a = TestAgent::with_sandbox().await;
    let id = unique("created");
    let pid = a.create(&id, &spec(&["true"])).await.expect("create").pid;
    assert!(!a.log().contains("not protected"), "{}", a.log());
    // As the exploit does: hold an O_PATH fd while the runner lives, reopen it
    // for writing once the runner is gone (no longer "text busy").
    let opath = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(format!("/proc/{pid}/exe"))
        .expect("O_PATH");
    a.remove(&id, false).await.expect("remove");
    let fd_path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&opath));
    let err = std::fs::OpenOptions::new()
        .write(true)
        .open(&fd_path)
        .expect_err("must not open for writing");
    // ETXTBSY while any agent runs the file; EROFS always, from the mount:
    assert!(
        matches!(err.raw_os_error(), Some(libc::EROFS | libc::ETXTBSY)),
        "{err}"
    );
    let vfs = nix::sys::statvfs::fstatvfs(&opath).expect("fstatvfs");
    assert!(
        vfs.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY),
        "runner binary on a writable mount"
    );
}

/// Not a test: `cargo test -p husk-agent --test containers -- --ignored --nocapture lifecycle_latency`.
#[tokio::test]
#[ignore = "measurement"]
async fn lifecycle_latency() {
    require_root!();
    let a = TestAgent::with_sandbox().await;
    let mut times = Vec::new();
    for i in 0..20 {
        let t = std::time::Instant::now();
        let (_, _, code) = a.output(&format!("lat-{i}"), &spec(&["true"])).await;
        assert_eq!(code, 0);
        times.push(t.elapsed());
    }
    let exec_t = {
        let id = unique("lat-exec");
        a.run(&id, &spec(&["sleep", "100"])).await;
        let t = std::time::Instant::now();
        for i in 0..20 {
            let e = format!("e{i}");
            a.exec(&id, &e, &["true"], false, false)
                .await
                .expect("exec");
            a.wait(&id, &e).await;
        }
        a.remove(&id, true).await.expect("remove");
        t.elapsed() / 20
    };
    times.sort();
    eprintln!(
        "create+start+exit+remove of `true`: median {:?}, max {:?}; exec+wait: {exec_t:?}",
        times[10], times[19]
    );
}

/// huskd makes the pod network namespace (CNI) and hands its path over.
#[tokio::test]
async fn sandbox_joins_a_given_network_namespace() {
    require_root!();
    // A network namespace held by a process of ours, like /var/run/netns/cni-...
    let mut holder = std::process::Command::new("unshare")
        .args(["--net", "sleep", "100"])
        .spawn()
        .expect("unshare");
    let ns_path = format!("/proc/{}/ns/net", holder.id());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::fs::read_link(&ns_path).ok() == std::fs::read_link("/proc/self/ns/net").ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "unshare did not make a netns"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let want = std::fs::read_link(&ns_path)
        .expect("netns")
        .display()
        .to_string();
    let a = TestAgent::start().await;
    let req = pb::CreateSandboxRequest {
        sandbox_id: a.sandbox_id.clone(),
        cgroup_parent: a.cgroup_parent(),
        namespaces: Some(pb::SandboxNamespaces {
            network: true,
            uts: true,
            network_path: ns_path.clone(),
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    a.client.create_sandbox(ctx(), &req).await.expect("sandbox");
    let (out, err, code) = a
        .output(&unique("netns"), &spec(&["readlink", "/proc/self/ns/net"]))
        .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), want);
    let bad = pb::CreateSandboxRequest {
        sandbox_id: "other".into(),
        cgroup_parent: a.cgroup_parent() + "-other",
        namespaces: Some(pb::SandboxNamespaces {
            network_path: "/no/such/netns".into(),
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    let b = TestAgent::start().await;
    assert_eq!(
        code_of(b.client.create_sandbox(ctx(), &bad).await),
        Code::INVALID_ARGUMENT
    );
    let _ = holder.kill();
    let _ = holder.wait();
}

/// The VM rootfs path on a loop device: an ext4 image of the busybox rootfs,
/// mounted by the agent, with an overlay upper dir per container.
#[tokio::test]
async fn block_device_rootfs() {
    require_root!();
    let tools = ["mkfs.ext4", "losetup"];
    if tools
        .iter()
        .any(|t| std::process::Command::new(t).arg("-V").output().is_err())
    {
        eprintln!("skipped: {tools:?} missing (e2fsprogs, util-linux)");
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let image = dir.path().join("rootfs.ext4");
    let mk = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(common::rootfs())
        .arg(&image)
        .arg("16M")
        .output()
        .expect("mkfs");
    assert!(
        mk.status.success(),
        "{}",
        String::from_utf8_lossy(&mk.stderr)
    );
    let lo = std::process::Command::new("losetup")
        .args(["-f", "--show", "-r"])
        .arg(&image)
        .output()
        .expect("losetup");
    if !lo.status.success() {
        eprintln!(
            "skipped: no loop device: {}",
            String::from_utf8_lossy(&lo.stderr)
        );
        return;
    }
    let device = String::from_utf8_lossy(&lo.stdout).trim().to_string();
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .arg("-d")
                .arg(&self.0)
                .status();
        }
    }
    let _detach = Detach(device.clone());

    let a = TestAgent::with_sandbox().await;
    for (i, opts) in [
        vec!["ro".to_string()],
        vec!["ro".to_string(), "noatime".to_string()],
    ]
    .into_iter()
    .enumerate()
    {
        let id = unique("blk");
        let req = pb::CreateContainerRequest {
            container_id: id.clone(),
            oci_spec: serde_json::to_vec(&spec(&[
                "sh",
                "-c",
                "cat /etc/motd; echo changed > /etc/motd; cat /etc/motd",
            ]))
            .expect("json"),
            rootfs: Some(pb::Rootfs {
                source: Some(pb::rootfs::Source::Block(pb::BlockRootfs {
                    device: device.clone(),
                    fstype: "ext4".into(),
                    options: opts,
                    overlay: true,
                    ..Default::default()
                })),
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        a.client
            .create_container(ctx(), &req)
            .await
            .unwrap_or_else(|e| panic!("create {i}: {e:?}\n{}", a.log()));
        a.start_container(&id).await.expect("start");
        let out = a.read_all(&id, "", false).await;
        assert_eq!(a.wait(&id, "").await.exit_code, 0);
        assert_eq!(
            out, "from the image\nchanged\n",
            "each container starts from the image"
        );
        a.remove(&id, false).await.expect("remove");
    }
}

/// huskd restarts while a long-poll read is pending: the next huskd gets
/// every byte (the dropped connection cancels the old read before it reads).
#[tokio::test]
async fn pending_read_of_a_dead_client_loses_nothing() {
    require_root!();
    let a = TestAgent::with_sandbox().await;
    let id = unique("restart");
    a.create_with(
        &id,
        &spec(&["sh", "-c", "read x; echo after $x"]),
        true,
        false,
    )
    .await
    .expect("create");
    a.start_container(&id).await.expect("start");
    let addr = format!("unix://{}", a.socket.display());
    {
        let old = pb::AgentClient::new(
            ttrpc::r#async::Client::connect(&addr)
                .await
                .expect("connect"),
        );
        let req = pb::ReadStreamRequest {
            container_id: id.clone(),
            ..Default::default()
        };
        let pending = tokio::spawn(async move { old.read_stdout(ctx(), &req).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!pending.is_finished(), "nothing to read yet");
        pending.abort();
        let _ = pending.await;
    }
    // Give the agent a moment to see the disconnect.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let w = pb::WriteStdinRequest {
        container_id: id.clone(),
        data: b"x\n".to_vec(),
        ..Default::default()
    };
    a.client.write_stdin(ctx(), &w).await.expect("write");
    let out = tokio::time::timeout(Duration::from_secs(10), a.read_all(&id, "", false))
        .await
        .expect("output reached the new client");
    assert_eq!(out, "after x\n");
    assert_eq!(a.wait(&id, "").await.exit_code, 0);
}

/// ConfigureNetwork sets MTU, addresses and routes in the pod's network
/// namespace (a veth stands in for the guest's virtio-net).
#[tokio::test]
async fn configure_network_in_the_pod_namespace() {
    require_root!();
    if std::process::Command::new("ip").arg("-V").output().is_err() {
        eprintln!("skipped: ip(8) missing (iproute2)");
        return;
    }
    let a = TestAgent::start().await;
    let pod = a.create_sandbox(false).await;
    let in_pod = |args: &[&str]| {
        let out = std::process::Command::new("nsenter")
            .arg("-t")
            .arg(pod.pid.to_string())
            .arg("-n")
            .arg("ip")
            .args(args)
            .output()
            .expect("nsenter ip");
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    in_pod(&[
        "link",
        "add",
        "eth0",
        "address",
        "02:00:00:aa:bb:cc",
        "type",
        "veth",
        "peer",
        "name",
        "peer0",
    ]);
    in_pod(&["link", "set", "peer0", "up"]);
    let req = pb::ConfigureNetworkRequest {
        interfaces: vec![pb::NetworkInterface {
            mac: "02:00:00:AA:BB:CC".into(),
            addresses: vec!["10.123.4.5/24".into(), "fd00:123::5/64".into()],
            mtu: 1400,
            ..Default::default()
        }],
        routes: vec![
            pb::Route {
                destination: "default".into(),
                gateway: "10.123.4.1".into(),
                ..Default::default()
            },
            pb::Route {
                destination: "10.200.0.0/16".into(),
                device: "eth0".into(),
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    a.client
        .configure_network(ctx(), &req)
        .await
        .unwrap_or_else(|e| panic!("configure: {e:?}\n{}", a.log()));
    let link = in_pod(&["-o", "link", "show", "eth0"]);
    assert!(link.contains("mtu 1400") && link.contains("UP"), "{link}");
    let addrs = in_pod(&["-o", "addr", "show", "eth0"]);
    assert!(
        addrs.contains("10.123.4.5/24") && addrs.contains("fd00:123::5/64"),
        "{addrs}"
    );
    let routes = in_pod(&["route"]);
    assert!(
        routes.contains("default via 10.123.4.1 dev eth0"),
        "{routes}"
    );
    assert!(routes.contains("10.200.0.0/16 dev eth0"), "{routes}");
    // Containers see it (they share the pod's network namespace).
    let (out, err, code) = a
        .output(&unique("net"), &spec(&["cat", "/sys/class/net/eth0/mtu"]))
        .await;
    assert_eq!((out.as_str(), code), ("1400\n", 0), "{err}");
    // Bad input.
    let bad = pb::ConfigureNetworkRequest {
        interfaces: vec![pb::NetworkInterface {
            name: "nope0".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    assert_eq!(
        code_of(a.client.configure_network(ctx(), &bad).await),
        Code::INVALID_ARGUMENT
    );
    let bad = pb::ConfigureNetworkRequest {
        interfaces: vec![pb::NetworkInterface {
            name: "eth0".into(),
            addresses: vec!["10.1.1.1".into()],
            ..Default::default()
        }],
        ..Default::default()
    };
    assert_eq!(
        code_of(a.client.configure_network(ctx(), &bad).await),
        Code::INVALID_ARGUMENT
    );
    // The host's namespace was not touched.
    assert!(!std::path::Path::new("/sys/class/net/eth0").exists() || !in_host_has("10.123.4.5"));
}

fn in_host_has(addr: &str) -> bool {
    let out = std::process::Command::new("ip")
        .args(["-o", "addr"])
        .output()
        .expect("ip");
    String::from_utf8_lossy(&out.stdout).contains(addr)
}

/// Containers start with default signal dispositions and an empty mask (the
/// agent is a Rust program, which ignores SIGPIPE; that must not leak).
#[tokio::test]
async fn signal_dispositions_are_reset() {
    require_root!();
    let a = TestAgent::with_sandbox().await;
    let (out, err, code) = a
        .output(
            &unique("sigs"),
            &spec(&["grep", "-E", "^Sig(Ign|Blk)", "/proc/self/status"]),
        )
        .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n"
    );
    let id = unique("sigs-exec");
    a.run(&id, &spec(&["sleep", "100"])).await;
    a.exec(
        &id,
        "e",
        &["grep", "-E", "^Sig(Ign|Blk)", "/proc/self/status"],
        false,
        false,
    )
    .await
    .expect("exec");
    assert_eq!(
        a.read_all(&id, "e", false).await,
        "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n"
    );
    a.remove(&id, true).await.expect("remove");
}

/// Nothing of the agent (sockets, other containers' pipes) leaks into a
/// container: only stdio is open (ls shows its own directory fd as 3).
#[tokio::test]
async fn no_fds_leak_into_containers() {
    require_root!();
    let a = TestAgent::with_sandbox().await;
    // Another container with open pipes in the agent at the same time.
    let busy = unique("busy");
    a.run(&busy, &spec(&["sleep", "100"])).await;
    let (out, err, code) = a
        .output(&unique("fds"), &spec(&["ls", "/proc/self/fd"]))
        .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["0", "1", "2", "3"]
    );
    a.exec(&busy, "e", &["ls", "/proc/self/fd"], false, false)
        .await
        .expect("exec");
    assert_eq!(
        a.read_all(&busy, "e", false)
            .await
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["0", "1", "2", "3"]
    );
    a.remove(&busy, true).await.expect("remove");
}

/// Rehearse (a pooled VM's warm-up) is for a guest's agent before any sandbox: a host
/// agent refuses it, and so does any agent serving a sandbox.
#[tokio::test]
async fn rehearse_is_refused_outside_a_fresh_guest() {
    require_root!();
    let a = TestAgent::with_sandbox().await;
    let e = a.rehearse().await.expect_err("a host agent with a sandbox");
    assert_eq!(code(&e), Code::FAILED_PRECONDITION, "{e:?}");
}
