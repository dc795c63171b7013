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
    let r = a.client.check(ctx(), &pb::CheckRequest::new()).await.expect("check after garbage");
    assert!(r.pid > 0);
    let c = ttrpc::r#async::Client::connect(&format!("unix://{}", socket.display())).await.expect("connect");
    pb::AgentClient::new(c).check(ctx(), &pb::CheckRequest::new()).await.expect("fresh check");
    assert!(a.child_alive());
}

impl TestAgent {
    fn child_alive(&self) -> bool {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), None).is_ok()
    }
}
