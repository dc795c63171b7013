//! Garbage on the wire must never take the agent down.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{TestAgent, ctx};
use husk_proto::agent as pb;

/// ttrpc frame header: u32 length, u32 stream id, u8 type, u8 flags (big endian).
fn header(len: u32, stream: u32, typ: u8, flags: u8) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(&stream.to_be_bytes());
    h.push(typ);
    h.push(flags);
    h
}

fn send(socket: &std::path::Path, bytes: &[u8]) {
    if let Ok(mut s) = UnixStream::connect(socket) {
        let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
        let _ = s.write_all(bytes);
        // Sometimes close immediately, sometimes linger half-written.
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[tokio::test]
async fn garbage_frames_do_not_crash_the_agent() {
    require_root!();
    let a = TestAgent::start().await;
    let socket = a.socket.clone();
    let mut cases: Vec<Vec<u8>> = vec![
        vec![],
        vec![0xff; 3],
        header(10, 1, 1, 0)[..7].to_vec(),
        // Claims 10 bytes, sends 2 (truncated body).
        [header(10, 1, 1, 0), vec![1, 2]].concat(),
        // Oversized length.
        header(u32::MAX, 1, 1, 0),
        header(5 << 20, 1, 1, 0),
        // Well-formed frame, body is not a protobuf Request.
        [header(4, 1, 1, 0), vec![0xff, 0xff, 0xff, 0xff]].concat(),
        // Unknown message type, even stream id.
        [header(0, 2, 0x7f, 0xff), header(0, 0, 2, 0)].concat(),
        // A valid Request for an unknown service/method.
        {
            let mut req = ttrpc::proto::Request::new();
            req.service = "husk.agent.v1.Nope".into();
            req.method = "Nope".into();
            let body = protobuf::Message::write_to_bytes(&req).expect("encode");
            [header(body.len() as u32, 1, 1, 0), body].concat()
        },
        // A valid Request to a real method with a garbage payload.
        {
            let mut req = ttrpc::proto::Request::new();
            req.service = "husk.agent.v1.Agent".into();
            req.method = "CreateContainer".into();
            req.payload = vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f];
            let body = protobuf::Message::write_to_bytes(&req).expect("encode");
            [header(body.len() as u32, 3, 1, 0), body].concat()
        },
    ];
    // Deterministic pseudo-random junk.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for n in 0..50 {
        let mut junk = Vec::new();
        for _ in 0..(n * 37 % 300) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            junk.push(x as u8);
        }
        cases.push(junk);
    }
    let s2 = socket.clone();
    tokio::task::spawn_blocking(move || {
        for c in &cases {
            send(&s2, c);
        }
    })
    .await
    .expect("send");
    // Still alive and serving, on a fresh connection and the old one.
    let r = a
        .client
        .check(ctx(), &pb::CheckRequest::new())
        .await
        .expect("check after garbage");
    assert!(r.pid > 0);
    let c = ttrpc::r#async::Client::connect(&format!("unix://{}", socket.display()))
        .await
        .expect("connect");
    pb::AgentClient::new(c)
        .check(ctx(), &pb::CheckRequest::new())
        .await
        .expect("fresh check");
    assert!(a.child_alive());
}

impl TestAgent {
    fn child_alive(&self) -> bool {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), None).is_ok()
    }
}

/// Mangled specs (truncated, bytes flipped, fields of the wrong type) are
/// answered with an error or a container, never a dead agent or INTERNAL for
/// what is really bad input.
#[tokio::test]
async fn mangled_specs_are_rejected_cleanly() {
    require_root!();
    let a = TestAgent::with_sandbox().await;
    let good = serde_json::to_vec(&common::spec(&["true"])).expect("json");
    // HUSK_FUZZ_SEED explores other mutations; the default keeps CI deterministic.
    let mut x: u64 = std::env::var("HUSK_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x2545_f491_4f6c_dd1d);
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut variants: Vec<Vec<u8>> = Vec::new();
    for _ in 0..40 {
        let cut = (next() as usize) % good.len();
        variants.push(good[..cut].to_vec());
    }
    for _ in 0..40 {
        let mut v = good.clone();
        for _ in 0..3 {
            let i = (next() as usize) % v.len();
            let alphabet = b"{}[]\":,0az\x00\xff";
            v[i] = alphabet[(next() as usize) % alphabet.len()];
        }
        variants.push(v);
    }
    let edits: [fn(&mut serde_json::Value); 8] = [
        |v| v["process"]["args"] = serde_json::json!("not-a-list"),
        |v| v["process"]["user"]["uid"] = serde_json::json!(-1),
        |v| v["mounts"] = serde_json::json!([{"destination": 5}]),
        |v| v["linux"]["maskedPaths"] = serde_json::json!(7),
        |v| v["root"] = serde_json::json!({"readonly": "yes"}),
        |v| v["linux"]["seccomp"] = serde_json::json!({"defaultAction": "SCMP_ACT_NOTIFY"}),
        |v| v["linux"]["namespaces"] = serde_json::json!([{"type": "user"}]),
        |v| v["linux"]["resources"] = serde_json::json!({"memory": {"limit": "lots"}}),
    ];
    for edit in edits {
        let mut v = common::spec(&["true"]);
        edit(&mut v);
        variants.push(serde_json::to_vec(&v).expect("json"));
    }
    let mut created = 0;
    for (i, v) in variants.iter().enumerate() {
        let id = format!("m{i}");
        let req = pb::CreateContainerRequest {
            container_id: id.clone(),
            oci_spec: v.clone(),
            rootfs: Some(pb::Rootfs {
                source: Some(pb::rootfs::Source::Path(
                    common::rootfs().display().to_string(),
                )),
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        match a.client.create_container(ctx(), &req).await {
            Ok(_) => {
                created += 1;
                a.remove(&id, true).await.expect("remove");
            }
            Err(e) => assert_ne!(
                common::code(&e),
                ttrpc::Code::INTERNAL,
                "variant {i}: {e:?}\n{}",
                String::from_utf8_lossy(v)
            ),
        }
    }
    assert!(created < variants.len(), "mangling must reject something");
    a.client
        .check(ctx(), &pb::CheckRequest::new())
        .await
        .expect("alive");
}

/// Every RPC with an empty request, before and after CreateSandbox: an
/// answer with a meaningful code (never INTERNAL), and the agent lives on.
#[tokio::test]
async fn empty_requests_get_meaningful_codes() {
    require_root!();
    use ttrpc::Code;
    let a = TestAgent::start().await;
    let c = &a.client;
    let short = || common::short_ctx(Duration::from_millis(300));
    for round in 0..2 {
        if round == 1 {
            a.create_sandbox(false).await;
        }
        let mut codes: Vec<(&str, Result<(), Code>)> = Vec::new();
        macro_rules! call {
            ($name:literal, $fut:expr) => {
                codes.push(($name, $fut.await.map(|_| ()).map_err(|e| common::code(&e))));
            };
        }
        call!(
            "CreateSandbox",
            c.create_sandbox(short(), &Default::default())
        );
        call!(
            "ConfigureNetwork",
            c.configure_network(short(), &Default::default())
        );
        call!(
            "CreateContainer",
            c.create_container(short(), &Default::default())
        );
        call!(
            "StartContainer",
            c.start_container(short(), &Default::default())
        );
        call!(
            "RemoveContainer",
            c.remove_container(short(), &Default::default())
        );
        call!(
            "ContainerState",
            c.container_state(short(), &Default::default())
        );
        call!(
            "ListContainers",
            c.list_containers(short(), &Default::default())
        );
        call!("ExecProcess", c.exec_process(short(), &Default::default()));
        call!(
            "RemoveProcess",
            c.remove_process(short(), &Default::default())
        );
        call!(
            "SignalProcess",
            c.signal_process(short(), &Default::default())
        );
        call!("WaitProcess", c.wait_process(short(), &Default::default()));
        call!("WriteStdin", c.write_stdin(short(), &Default::default()));
        call!("CloseStdin", c.close_stdin(short(), &Default::default()));
        call!("ReadStdout", c.read_stdout(short(), &Default::default()));
        call!("ReadStderr", c.read_stderr(short(), &Default::default()));
        call!("ResizeTty", c.resize_tty(short(), &Default::default()));
        call!(
            "ListProcesses",
            c.list_processes(short(), &Default::default())
        );
        call!(
            "ContainerStats",
            c.container_stats(short(), &Default::default())
        );
        call!(
            "SandboxStats",
            c.sandbox_stats(short(), &Default::default())
        );
        call!(
            "UpdateResources",
            c.update_resources(short(), &Default::default())
        );
        call!("GetOomEvent", c.get_oom_event(short(), &Default::default()));
        call!(
            "DestroySandbox",
            c.destroy_sandbox(short(), &Default::default())
        );
        for (name, r) in &codes {
            assert_ne!(*r, Err(Code::INTERNAL), "round {round}: {name}");
            // GetOomEvent has nothing to say: the client's own deadline ends it.
            if *name != "GetOomEvent" {
                assert_ne!(*r, Err(Code::UNKNOWN), "round {round}: {name} (transport)");
            }
        }
        let get = |n: &str| {
            codes
                .iter()
                .find(|(name, _)| *name == n)
                .map(|(_, r)| *r)
                .expect("called")
        };
        assert_eq!(
            get("CreateSandbox"),
            Err(Code::INVALID_ARGUMENT),
            "empty id"
        );
        assert_eq!(get("ContainerState"), Err(Code::NOT_FOUND));
        assert_eq!(get("ListContainers"), Ok(()));
        assert!(get("GetOomEvent").is_err(), "no OOM happened");
        let no_sandbox = if round == 0 {
            Err(Code::FAILED_PRECONDITION)
        } else {
            Err(Code::NOT_FOUND)
        };
        assert_eq!(get("SandboxStats"), no_sandbox);
        assert_eq!(get("DestroySandbox"), no_sandbox);
    }
    a.client
        .check(ctx(), &pb::CheckRequest::new())
        .await
        .expect("alive");
}
