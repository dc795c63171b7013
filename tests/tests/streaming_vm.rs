#![allow(clippy::unwrap_used)]
//! Exec, Attach and PortForward with a VM pod (QEMU/TCG, or husk-vmm with
//! HUSK_VM_HANDLER=husk): the same streaming
//! server, the agent reached over hybrid vsock, port-forward through the
//! agent's vsock port 1025 endpoint inside the guest.
//! Needs HUSK_GUEST_KERNEL / HUSK_GUEST_INITRD (tests/run.sh builds them).

use std::time::Duration;

use husk_host::streaming::client::{self, SpdyForwarder, Transport};
use husk_proto::cri;
use husk_tests::cri_env::CriEnv;
use husk_tests::require;
use husk_tests::runtime::{VM_HANDLERS, VM_NEEDS as NEEDS, guest, vm_env_ok as env_ok, vm_handler};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn vm_pod_exec_attach_and_port_forward() {
    require!(env_ok(), NEEDS);
    let (k, i) = guest().unwrap();
    let h = vm_handler();
    let cfg = format!(
        "[runtime]\ndefault_handler = \"{h}\"\n[runtime.handlers]\n{VM_HANDLERS}husk-ns = \"namespace\"\n\
         [runtime.vm]\nkernel = \"{k}\"\ninitrd = \"{i}\"\nboot_timeout_ms = 90000\nmemory_mib = 256\n"
    );
    let e = CriEnv::new(h, &cfg).await;
    let pcfg = e.pod("vm-stream");
    let pod = e
        .run_pod(&pcfg)
        .await
        .unwrap_or_else(|err| panic!("run pod: {err:?}\n{}", e.d.log()));
    let mut ccfg = e.ctr(
        "web",
        &["sh", "-c", "mkdir -p /www && echo vm-hello > /www/index.html && httpd -p 8080 -h /www && while read l; do echo got $l; done"],
    );
    ccfg.stdin = true;
    let id = e.run(&pod, &ccfg, &pcfg).await;
    for t in [Transport::Spdy, Transport::WebSocket] {
        let url = e
            .exec_url(&id, &["sh", "-c", "cat; uname -r; exit 9"], true, false)
            .await
            .unwrap();
        let (o, _, r) = client::exec_collect(&url, t, Some(b"in-vm\n".to_vec()), true).await;
        let text = String::from_utf8_lossy(&o);
        assert!(text.starts_with("in-vm\n"), "{t:?}: {text}");
        assert_eq!(r, Ok(9), "{t:?}");
    }
    // Attach: stdin in, output out.
    let url =
        e.c.runtime
            .clone()
            .attach(cri::AttachRequest {
                container_id: id.clone(),
                stdin: true,
                stdout: true,
                stderr: false,
                tty: false,
            })
            .await
            .unwrap()
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
        .unwrap();
    let got = match tokio::time::timeout(Duration::from_secs(30), out_rx.recv())
        .await
        .unwrap()
    {
        Some(g) => g,
        None => panic!("attach ended: {:?}\n{}", run.await, e.d.log()),
    };
    assert_eq!(&got[..], b"got ping\n");
    run.abort();

    // Port-forward reaches the agent's endpoint in the guest (vsock 1025):
    // a closed port gives a clean per-connection error, the session goes on.
    let url = e.port_forward_url(&pod, &[9, 8080]).await.unwrap();
    let f = SpdyForwarder::connect(&url).await.unwrap();
    for _ in 0..2 {
        let (mut bad, bad_err) = f.open(9).await.unwrap();
        let _ = bad.read_to_end(&mut Vec::new()).await;
        let m = bad_err.await.unwrap();
        assert!(m.contains("error forwarding port 9"), "{m}");
    }
    // ... and a listening port answers through the same session: busybox
    // httpd in the guest, reached via the guest's loopback.
    for _ in 0..2 {
        let (mut s, err) = f.open(8080).await.unwrap();
        s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")
            .await
            .unwrap();
        let mut body = Vec::new();
        s.read_to_end(&mut body).await.unwrap();
        let text = String::from_utf8_lossy(&body);
        assert!(
            text.starts_with("HTTP/1.") && text.ends_with("vm-hello\n"),
            "{text}"
        );
        assert_eq!(err.await.unwrap(), "");
    }
    f.close().await;
    let _ = e.stop_pod(&pod).await;
    let _ = e.remove_pod(&pod).await;
}
