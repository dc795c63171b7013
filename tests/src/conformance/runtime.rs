//! Runtime cases: runtime info, pod and container lifecycle, ids by prefix,
//! hostname and DNS, ExecSync (with timeout), logs and log reopen, image
//! references, streaming exec/attach/port-forward.

use std::time::{Duration, Instant};

use husk_host::streaming::client::{self, SpdyForwarder, Transport};
use husk_proto::cri;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

use super::{Suite, assert_code, containerd_gap, node_hostname};
use crate::runtime::{code_of, container_status, eventually, log_records, pod_status, wait_exited};

/// Version, Status (runtime and handler) and RuntimeConfig (cgroup driver).
pub async fn runtime_info(s: &Suite) {
    let mut rt = s.e.c.runtime.clone();
    let v = rt
        .version(cri::VersionRequest {
            version: "v1".into(),
        })
        .await
        .expect("version")
        .into_inner();
    assert_eq!(v.runtime_api_version, "v1");
    if !containerd_gap(s, "runtime name") {
        assert_eq!(v.runtime_name, "husk");
    }
    let st = rt
        .status(cri::StatusRequest { verbose: false })
        .await
        .expect("status")
        .into_inner();
    let conds = st.status.expect("runtime status").conditions;
    assert!(
        conds.iter().any(|c| c.r#type == "RuntimeReady" && c.status),
        "{conds:?}"
    );
    assert!(
        conds.iter().any(|c| c.r#type == "NetworkReady"),
        "{conds:?}"
    );
    if !containerd_gap(s, "runtime handlers in Status") {
        assert!(
            st.runtime_handlers.iter().any(|h| h.name == s.e.handler),
            "{:?}",
            st.runtime_handlers
        );
    }
    if containerd_gap(s, "RuntimeConfig") {
        let err = rt
            .runtime_config(cri::RuntimeConfigRequest {})
            .await
            .expect_err("RuntimeConfig on containerd 1.6");
        assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
        return;
    }
    // husk manages cgroups itself under its cgroup parent: cgroupfs.
    let rc = rt
        .runtime_config(cri::RuntimeConfigRequest {})
        .await
        .unwrap_or_else(|e| panic!("RuntimeConfig: {e:?}"))
        .into_inner();
    assert_eq!(
        rc.linux.expect("linux runtime config").cgroup_driver,
        cri::CgroupDriver::Cgroupfs as i32
    );
}

/// The suite pod has no hostname and a name longer than a hostname: it runs with
/// the node's hostname (containerd); an explicit hostname over 64 bytes is refused.
pub async fn hostname_and_dns(s: &Suite) {
    let st = pod_status(&s.e.c, &s.pod).await.expect("pod status");
    let status = st.status.expect("status");
    assert_eq!(status.state, cri::PodSandboxState::SandboxReady as i32);
    assert_eq!(status.runtime_handler, s.e.handler);
    assert!(status.metadata.expect("metadata").name.len() > 64);
    let node = node_hostname();
    let out = s
        .ok_output(&s.ctr(
            "hostname",
            &[
                "sh",
                "-c",
                "hostname; cat /etc/hostname; cat /etc/resolv.conf",
            ],
        ))
        .await;
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some(node.as_str()), "{out}");
    assert_eq!(lines.next(), Some(node.as_str()), "{out}");
    let resolv: Vec<&str> = lines.collect();
    assert!(resolv.contains(&"nameserver 198.51.100.53"), "{out}");
    assert!(resolv.contains(&"search conformance.example"), "{out}");
    assert!(resolv.contains(&"options ndots:3"), "{out}");

    let mut p = s.e.pod("long-hostname");
    p.hostname = "h".repeat(65);
    let err = s.e.run_pod(&p).await.expect_err("65-byte hostname");
    assert_code(s, &err, Code::InvalidArgument);
    assert!(err.message().contains("hostname"), "{err:?}");
    // Refused before anything was made: no such pod listed.
    assert!(s.e.pods().await.iter().all(|p| {
        p.metadata
            .as_ref()
            .is_some_and(|m| m.name != "long-hostname")
    }));
}

/// Container lifecycle through ids given by unique prefix (as containerd accepts
/// them: `crictl stop <prefix>`), unknown ids, ambiguous prefixes.
pub async fn lifecycle_and_id_prefixes(s: &Suite) {
    let st = pod_status(&s.e.c, &s.pod[..10])
        .await
        .expect("pod status by prefix");
    assert_eq!(st.status.expect("status").id, s.pod);
    assert_eq!(
        code_of(pod_status(&s.e.c, "0123456789abcdefx").await),
        Code::NotFound
    );

    let id = s.run(&s.ctr("lifecycle", &["sleep", "1000"])).await;
    let p = &id[..12];
    let st = s.e.ctr_status(p).await;
    assert_eq!(
        (st.id.as_str(), st.state),
        (id.as_str(), cri::ContainerState::ContainerRunning as i32)
    );
    assert!(st.created_at > 0 && st.started_at >= st.created_at);
    let r =
        s.e.exec(p, &["echo", "by-prefix"], 30)
            .await
            .expect("exec by prefix");
    assert_eq!(r.stdout, b"by-prefix\n");
    s.e.stop_container(p, 5).await.expect("stop by prefix");
    let st = wait_exited(&s.e.c, &id, Duration::from_secs(60)).await;
    assert_eq!(st.exit_code, 143, "SIGTERM: {st:?}");
    assert!(st.finished_at >= st.started_at);
    s.e.remove_container(p).await.expect("remove by prefix");
    assert_eq!(code_of(container_status(&s.e.c, &id).await), Code::NotFound);
    // Removing again (and unknown ids) succeeds: RemoveContainer is idempotent.
    s.e.remove_container(&id).await.expect("remove twice");

    // 17 ids over 16 hex digits: two share their first digit, an ambiguous prefix.
    let mut ids = vec![];
    for i in 0..17 {
        ids.push(
            s.create(&s.ctr(&format!("prefix-{i}"), &["true"]))
                .await
                .unwrap_or_else(|e| panic!("create: {e:?}\n{}", s.e.d.log())),
        );
    }
    let first = ids
        .iter()
        .map(|i| &i[..1])
        .find(|c| ids.iter().filter(|i| i.starts_with(*c)).count() > 1)
        .expect("pigeonhole");
    let err = container_status(&s.e.c, first)
        .await
        .expect_err("ambiguous");
    assert_code(s, &err, Code::InvalidArgument);
    // containerd: "Multiple IDs found with provided prefix".
    let m = err.message();
    assert!(
        m.contains("ambiguous") || m.contains("Multiple IDs"),
        "{err:?}"
    );
    let listed =
        s.e.list_containers(cri::ContainerFilter {
            pod_sandbox_id: s.pod[..8].into(),
            label_selector: [("ctr".to_string(), "prefix-3".to_string())].into(),
            ..Default::default()
        })
        .await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, ids[3]);
    assert_eq!(
        listed[0].state,
        cri::ContainerState::ContainerCreated as i32
    );
    for i in &ids {
        s.e.remove_container(i).await.expect("remove");
    }
}

/// ExecSync: output, exit code, and a timeout that kills the command.
pub async fn exec_sync(s: &Suite) {
    let id = s.run(&s.ctr("exec", &["sleep", "1000"])).await;
    let r =
        s.e.exec(&id, &["sh", "-c", "echo out; echo err >&2; exit 7"], 60)
            .await
            .expect("exec");
    assert_eq!(
        (r.stdout.as_slice(), r.stderr.as_slice(), r.exit_code),
        (&b"out\n"[..], &b"err\n"[..], 7)
    );
    let t = Instant::now();
    let err =
        s.e.exec(&id, &["sleep", "60"], 2)
            .await
            .expect_err("timeout");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    // The container goes on.
    let r =
        s.e.exec(&id, &["true"], 30)
            .await
            .expect("exec after timeout");
    assert_eq!(r.exit_code, 0);
    s.e.remove_container(&id).await.expect("remove");
}

/// Logs in the CRI format, and ReopenContainerLog after the file was rotated away.
pub async fn logs_and_reopen(s: &Suite) {
    let cfg = s.ctr(
        "logs",
        &[
            "sh",
            "-c",
            "echo first; echo to-stderr >&2; while true; do echo tick; sleep 0.3; done",
        ],
    );
    let id = s.run(&cfg).await;
    let path = s.e.log_path(&s.pcfg, "logs");
    // stdout and stderr are two pipes: neither's order against the other is promised,
    // so wait for both streams.
    eventually("first lines", Duration::from_secs(60), || async {
        let recs = log_records(&path);
        recs.iter().any(|r| r.2 == "tick") && recs.iter().any(|r| r.0 == "stderr")
    })
    .await;
    let recs = log_records(&path);
    let first_out = recs
        .iter()
        .find(|r| r.0 == "stdout")
        .expect("stdout record");
    assert_eq!(
        first_out,
        &("stdout".into(), false, "first".into()),
        "{recs:?}"
    );
    assert!(
        recs.iter().any(|r| r.0 == "stderr" && r.2 == "to-stderr"),
        "{recs:?}"
    );
    let rotated = path.with_extension("log.1");
    std::fs::rename(&path, &rotated).expect("rotate");
    s.e.reopen_log(&id).await.expect("reopen");
    eventually(
        "lines in the reopened log",
        Duration::from_secs(60),
        || async { log_records(&path).iter().any(|r| r.2 == "tick") },
    )
    .await;
    assert!(log_records(&rotated).iter().any(|r| r.2 == "tick"));
    s.e.stop_container(&id, 0).await.expect("stop");
    let err =
        s.e.reopen_log(&id)
            .await
            .expect_err("reopen a stopped container's log");
    assert_code(s, &err, Code::FailedPrecondition);
    s.e.remove_container(&id).await.expect("remove");
}

/// A container's image named by tag, by digest and by image id: the same image.
pub async fn image_references(s: &Suite) {
    let st =
        s.e.c
            .image
            .clone()
            .image_status(cri::ImageStatusRequest {
                image: Some(cri::ImageSpec {
                    image: s.img.clone(),
                    ..Default::default()
                }),
                verbose: false,
            })
            .await
            .expect("image status")
            .into_inner()
            .image
            .expect("the suite image");
    let digest = s
        .img_by_digest
        .rsplit_once('@')
        .expect("digest")
        .1
        .to_string();
    let check_image_id = !containerd_gap(s, "ContainerStatus.image_id");
    for (n, reference) in [s.img.clone(), s.img_by_digest.clone(), st.id.clone()]
        .into_iter()
        .enumerate()
    {
        let mut cfg = s.ctr(&format!("imageref-{n}"), &["cat", "/etc/secret"]);
        cfg.image = Some(cri::ImageSpec {
            image: reference.clone(),
            ..Default::default()
        });
        let name = format!("imageref-{n}");
        let id = s.run(&cfg).await;
        let cst = wait_exited(&s.e.c, &id, Duration::from_secs(60)).await;
        assert_eq!(cst.exit_code, 0, "{reference}");
        if check_image_id {
            assert_eq!(cst.image_id, st.id, "{reference}");
        }
        assert!(
            cst.image_ref.contains(&digest),
            "{reference}: {}",
            cst.image_ref
        );
        assert_eq!(s.stdout_of(&name), "secret\n");
        s.e.remove_container(&id).await.expect("remove");
    }
}

/// Exec (SPDY and WebSocket), Attach and PortForward through the streaming server.
pub async fn streaming(s: &Suite) {
    let mut cfg = s.ctr(
        "stream",
        &["sh", "-c", "mkdir -p /www && echo conformance > /www/index.html && httpd -p 8080 -h /www && while read l; do echo got $l; done"],
    );
    cfg.stdin = true;
    let id = s.run(&cfg).await;
    for t in [Transport::Spdy, Transport::WebSocket] {
        // Closing stdin over WebSocket needs v5.channel.k8s.io.
        let stdin = t == Transport::Spdy || !containerd_gap(s, "WebSocket stdin close");
        let cmd = if stdin {
            "cat; exit 9"
        } else {
            "echo in; exit 9"
        };
        let url =
            s.e.exec_url(&id[..12], &["sh", "-c", cmd], stdin, false)
                .await
                .expect("exec url");
        let input = stdin.then(|| b"in\n".to_vec());
        let (o, _, r) = tokio::time::timeout(
            Duration::from_secs(120),
            client::exec_collect(&url, t, input, true),
        )
        .await
        .unwrap_or_else(|_| panic!("{t:?} exec: no end in 120 s\n{}", s.e.d.log()));
        assert_eq!(
            (String::from_utf8_lossy(&o).as_ref(), r),
            ("in\n", Ok(9)),
            "{t:?}"
        );
    }
    let url =
        s.e.c
            .runtime
            .clone()
            .attach(cri::AttachRequest {
                container_id: id[..12].into(),
                stdin: true,
                stdout: true,
                stderr: false,
                tty: false,
            })
            .await
            .expect("attach url")
            .into_inner()
            .url;
    let (in_tx, in_rx) = tokio::sync::mpsc::channel(4);
    let (out_tx, mut out_rx) = tokio::sync::mpsc::channel(16);
    let run = tokio::spawn(async move {
        let io = client::CommandIo {
            stdin: Some(in_rx),
            stdout: Some(out_tx),
            stderr: None,
            resize: None,
        };
        client::run_command(&url, Transport::Spdy, io).await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    in_tx
        .send(bytes::Bytes::from_static(b"ping\n"))
        .await
        .expect("stdin");
    let got = match tokio::time::timeout(Duration::from_secs(60), out_rx.recv())
        .await
        .expect("attach output in time")
    {
        Some(g) => g,
        None => panic!("attach ended: {:?}\n{}", run.await, s.e.d.log()),
    };
    assert_eq!(&got[..], b"got ping\n");
    run.abort();

    let url =
        s.e.port_forward_url(&s.pod[..12], &[8080])
            .await
            .expect("port-forward url");
    let f = SpdyForwarder::connect(&url).await.expect("port-forward");
    let body = async {
        let (mut c, err) = f.open(8080).await.expect("open");
        c.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")
            .await
            .expect("write");
        let mut body = Vec::new();
        c.read_to_end(&mut body).await.expect("read");
        (
            String::from_utf8_lossy(&body).into_owned(),
            err.await.unwrap_or_default(),
        )
    };
    let mut answer = body.await;
    if !answer.0.ends_with("conformance\n") {
        // httpd may not listen yet on a slow guest: once more.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (mut c, _) = f.open(8080).await.expect("open");
        c.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")
            .await
            .expect("write");
        let mut body = Vec::new();
        c.read_to_end(&mut body).await.expect("read");
        answer.0 = String::from_utf8_lossy(&body).into_owned();
    }
    assert!(
        answer.0.starts_with("HTTP/1.") && answer.0.ends_with("conformance\n"),
        "{answer:?}"
    );
    f.close().await;
    s.e.remove_container(&id).await.expect("remove");
}
