#![allow(clippy::unwrap_used)]
//! Exec, Attach and PortForward end to end: a real huskd with the namespace
//! sandbox, the CRI client for the URLs, husk's own SPDY and WebSocket
//! clients for the streams.

use std::ops::Deref;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use husk_host::streaming::client::{self, CommandIo, SpdyForwarder, Transport};
use husk_proto::cri;
use husk_tests::cri_env::CriEnv;
use husk_tests::registry;
use husk_tests::require;
use husk_tests::runtime::NS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tonic::Code;

const NEEDS: &str = "needs root, /usr/bin/docker-registry, /bin/busybox and unshare(1) (tests/run.sh installs them)";
const BOTH: [Transport; 2] = [Transport::Spdy, Transport::WebSocket];

fn env_ok() -> bool {
    registry::available() && husk_tests::is_root() && Path::new("/bin/busybox").exists()
}

/// The shared CRI environment (husk-ns) with the one pod each test streams to.
struct Env {
    e: CriEnv,
    pod: String,
    pod_cfg: cri::PodSandboxConfig,
}

impl Deref for Env {
    type Target = CriEnv;
    fn deref(&self) -> &CriEnv {
        &self.e
    }
}

impl Env {
    async fn new(name: &str) -> Env {
        let e = CriEnv::new(NS, "").await;
        let pod_cfg = e.pod(name);
        let pod = e
            .run_pod(&pod_cfg)
            .await
            .unwrap_or_else(|err| panic!("run pod: {err:?}\n{}", e.d.log()));
        Env { e, pod, pod_cfg }
    }

    /// Create + start in the pod; `f` adjusts the config.
    async fn run(
        &self,
        name: &str,
        cmd: &[&str],
        f: impl FnOnce(&mut cri::ContainerConfig),
    ) -> String {
        let mut cfg = self.ctr(name, cmd);
        f(&mut cfg);
        self.e.run(&self.pod, &cfg, &self.pod_cfg).await
    }

    async fn pf_url(&self, ports: &[i32]) -> String {
        self.port_forward_url(&self.pod, ports).await.unwrap()
    }

    fn huskd_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.d.pid().unwrap()))
            .unwrap()
            .count()
    }
}

/// huskd's fd count settles back to `before` (allowing a little slack for
/// pooled agent connections).
async fn fds_settle(env: &Env, before: usize) {
    let mut now = env.huskd_fds();
    for _ in 0..100 {
        if now <= before + 2 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        now = env.huskd_fds();
    }
    panic!("huskd fds: {before} before the streams, {now} after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exec_with_and_without_tty_through_both_protocols() {
    require!(env_ok(), NEEDS);
    let env = Env::new("stream-exec").await;
    let id = env.run("main", &["sleep", "3600"], |_| {}).await;
    // Warm up one exec so pooled connections exist before counting fds.
    let url = env.exec_url(&id, &["true"], false, false).await.unwrap();
    let (_, _, r) = client::exec_collect(&url, Transport::Spdy, None, true).await;
    assert_eq!(r, Ok(0));
    let fds = env.huskd_fds();

    for t in BOTH {
        // stdout, stderr, non-zero exit code through the error channel.
        let url = env
            .exec_url(
                &id,
                &["sh", "-c", "echo hi; echo err >&2; exit 3"],
                false,
                false,
            )
            .await
            .unwrap();
        let (o, e, r) = client::exec_collect(&url, t, None, true).await;
        assert_eq!(
            (o.as_slice(), e.as_slice(), r),
            (&b"hi\n"[..], &b"err\n"[..], Ok(3)),
            "{t:?}"
        );

        // stdin, and its close reaching the process as EOF.
        let url = env
            .exec_url(&id, &["sh", "-c", "cat; echo done"], true, false)
            .await
            .unwrap();
        let (o, _, r) = client::exec_collect(&url, t, Some(b"abc\n".to_vec()), true).await;
        assert_eq!(
            (String::from_utf8_lossy(&o).as_ref(), r),
            ("abc\ndone\n", Ok(0)),
            "{t:?}"
        );

        // A process exiting with lots of output buffered: nothing lost.
        let url = env
            .exec_url(
                &id,
                &["sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' x"],
                false,
                false,
            )
            .await
            .unwrap();
        let (o, _, r) = client::exec_collect(&url, t, None, true).await;
        assert_eq!((o.len(), r), (3_000_000, Ok(0)), "{t:?}");
        assert!(o.iter().all(|b| *b == b'x'));

        // A tty: one output stream, and the resize reaches the terminal.
        let url = env
            .exec_url(&id, &["sh", "-c", "read x; stty size; exit 7"], true, true)
            .await
            .unwrap();
        let (in_tx, in_rx) = mpsc::channel(4);
        let (out_tx, mut out_rx) = mpsc::channel(16);
        let (rs_tx, rs_rx) = mpsc::channel(4);
        let run = tokio::spawn(async move {
            let io = CommandIo {
                stdin: Some(in_rx),
                stdout: Some(out_tx),
                stderr: None,
                resize: Some(rs_rx),
            };
            client::run_command(&url, t, io).await
        });
        rs_tx.send((123, 45)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        in_tx.send(Bytes::from_static(b"go\r")).await.unwrap();
        let mut out = Vec::new();
        while let Some(d) = out_rx.recv().await {
            out.extend_from_slice(&d);
        }
        let r = run.await.unwrap();
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("45 123"), "{t:?}: {text:?}");
        assert_eq!(r, Ok(7), "{t:?}: {text:?}");
        drop(in_tx);
    }
    fds_settle(&env, fds).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exec_bad_requests_and_faults_are_clean() {
    require!(env_ok(), NEEDS);
    let env = Env::new("stream-bad").await;
    let id = env.run("main", &["sleep", "3600"], |_| {}).await;
    let done = env.run("done", &["true"], |_| {}).await;
    let mut rt = env.c.runtime.clone();
    let exec = |cid: &str, cmd: Vec<String>, io: (bool, bool, bool, bool)| cri::ExecRequest {
        container_id: cid.into(),
        cmd,
        stdin: io.0,
        stdout: io.1,
        stderr: io.2,
        tty: io.3,
    };
    let sh = vec!["true".to_string()];
    let code = |r: Result<tonic::Response<cri::ExecResponse>, tonic::Status>| r.unwrap_err().code();
    assert_eq!(
        code(
            rt.exec(exec("nope", sh.clone(), (false, true, false, false)))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            rt.exec(exec(&id, sh.clone(), (false, false, false, false)))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            rt.exec(exec(&id, vec![], (false, true, false, false)))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            rt.exec(exec(&id, sh.clone(), (false, true, true, true)))
                .await
        ),
        Code::InvalidArgument
    );
    husk_tests::runtime::wait_exited(&env.c, &done, Duration::from_secs(10)).await;
    assert_eq!(
        code(
            rt.exec(exec(&done, sh.clone(), (false, true, false, false)))
                .await
        ),
        Code::FailedPrecondition
    );
    let pf = env.port_forward_url(&env.pod, &[70000]).await;
    assert_eq!(pf.unwrap_err().code(), Code::InvalidArgument);
    let pf = env.port_forward_url("nope", &[80]).await;
    assert_eq!(pf.unwrap_err().code(), Code::NotFound);

    let fds = env.huskd_fds();
    // A used token, an unknown token: 404.
    let url = env.exec_url(&id, &["true"], false, false).await.unwrap();
    let (_, _, r) = client::exec_collect(&url, Transport::Spdy, None, true).await;
    assert_eq!(r, Ok(0));
    for t in BOTH {
        let (_, _, r) = client::exec_collect(&url, t, None, true).await;
        assert!(r.as_ref().unwrap_err().contains("404"), "{t:?}: {r:?}");
    }
    let bogus = format!("{}/exec/AAAA", url.rsplit_once("/exec/").unwrap().0);
    let (_, _, r) = client::exec_collect(&bogus, Transport::WebSocket, None, true).await;
    assert!(r.unwrap_err().contains("404"));

    // Wrong protocol versions: 403 (SPDY) / refused (WebSocket).
    let url = env.exec_url(&id, &["true"], false, false).await.unwrap();
    let e = client::connect_spdy(&url, &["v9.channel.k8s.io"])
        .await
        .err()
        .unwrap();
    assert!(e.to_string().contains("403"), "{e}");
    let url = env.exec_url(&id, &["true"], false, false).await.unwrap();
    assert!(
        client::connect_ws(&url, &["v9.channel.k8s.io"])
            .await
            .is_err()
    );

    // Garbage and oversized frames after the upgrade: the connection is closed.
    for junk in [
        vec![0xffu8; 64],
        vec![0x80, 0x03, 0x00, 0x01, 0x00, 0xff, 0xff, 0xff],
    ] {
        let url = env.exec_url(&id, &["true"], false, false).await.unwrap();
        let (host, path) = url["http://".len()..].split_once('/').unwrap();
        let mut s = tokio::net::TcpStream::connect(host).await.unwrap();
        s.write_all(format!("POST /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\n\r\n").as_bytes()).await.unwrap();
        s.write_all(&junk).await.unwrap();
        let mut all = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut all)).await;
        assert!(r.is_ok(), "connection left open after garbage");
        assert!(String::from_utf8_lossy(&all).starts_with("HTTP/1.1 101"));
    }

    // A client that disappears mid-stream: the exec'd process is killed.
    let url = env
        .exec_url(
            &id,
            &["sh", "-c", "echo $$ > /tmp/victim; exec sleep 1000"],
            false,
            false,
        )
        .await
        .unwrap();
    let (out_tx, _out_rx) = mpsc::channel(16);
    let h = tokio::spawn(async move {
        client::run_command(
            &url,
            Transport::Spdy,
            CommandIo {
                stdin: None,
                stdout: Some(out_tx),
                stderr: None,
                resize: None,
            },
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    h.abort();
    let url = env
        .exec_url(
            &id,
            &[
                "sh",
                "-c",
                "sleep 1; kill -0 $(cat /tmp/victim) && echo alive || echo gone",
            ],
            false,
            false,
        )
        .await
        .unwrap();
    let (o, _, _) = client::exec_collect(&url, Transport::WebSocket, None, true).await;
    assert_eq!(String::from_utf8_lossy(&o).trim(), "gone");

    // Expired tokens are 404 too (ttl is 60 s by default: not waited for here).
    fds_settle(&env, fds).await;
}

async fn http_get(
    mut s: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    path: &str,
) -> Vec<u8> {
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(8), s.read_to_end(&mut all))
        .await
        .unwrap()
        .unwrap();
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn port_forward_parallel_connections_through_both_protocols() {
    require!(env_ok(), NEEDS);
    let env = Env::new("stream-pf").await;
    let _web = env
        .run(
            "web",
            &["sh", "-c", "mkdir -p /www && echo hello-from-pod > /www/index.html && head -c 2000000 /dev/zero > /www/big && exec httpd -f -p 8080 -h /www"],
            |_| {},
        )
        .await;
    // httpd up?
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fds = env.huskd_fds();

    // SPDY: one connection, many forwarded connections, one failing.
    let fwd = SpdyForwarder::connect(&env.pf_url(&[8080]).await)
        .await
        .unwrap();
    let (bad, bad_err) = fwd.open(9).await.unwrap();
    let mut gets = Vec::new();
    for i in 0..8 {
        let (s, err) = fwd.open(8080).await.unwrap();
        let path = if i % 2 == 0 { "/index.html" } else { "/big" };
        gets.push(tokio::spawn(async move {
            (path, http_get(s, path).await, err.await.unwrap())
        }));
    }
    for g in gets {
        let (path, body, err) = g.await.unwrap();
        assert_eq!(err, "", "{path}");
        let text = String::from_utf8_lossy(&body);
        assert!(
            text.starts_with("HTTP/1.1 200"),
            "{path}: {}",
            &text[..text.len().min(200)]
        );
        if path == "/big" {
            assert!(body.len() > 2_000_000);
        } else {
            assert!(text.ends_with("hello-from-pod\n"));
        }
    }
    let mut bad = bad;
    let mut junk = Vec::new();
    let _ = bad.read_to_end(&mut junk).await;
    let msg = bad_err.await.unwrap();
    assert!(msg.contains("error forwarding port 9"), "{msg}");
    // The session survives the failed connection.
    let (s, _) = fwd.open(8080).await.unwrap();
    assert!(
        String::from_utf8_lossy(&http_get(s, "/index.html").await).ends_with("hello-from-pod\n")
    );
    fwd.close().await;

    // WebSocket: a URL (and a socket) per connection, in parallel.
    let mut gets = Vec::new();
    for _ in 0..4 {
        let url = env.pf_url(&[]).await;
        gets.push(tokio::spawn(async move {
            let (s, err) = client::ws_forward(&url, 8080).await.unwrap();
            (http_get(s, "/index.html").await, err.await.unwrap())
        }));
    }
    for g in gets {
        let (body, err) = g.await.unwrap_or_else(|e| panic!("{e}\n{}", env.d.log()));
        assert_eq!(err, "");
        assert!(String::from_utf8_lossy(&body).ends_with("hello-from-pod\n"));
    }
    let (mut s, err) = client::ws_forward(&env.pf_url(&[]).await, 9).await.unwrap();
    let _ = s.read_to_end(&mut Vec::new()).await;
    assert!(err.await.unwrap().contains("error forwarding port 9"));
    fds_settle(&env, fds).await;
}

/// Feeds `out_rx` into a buffer until it contains `want` (or 15 s pass).
async fn read_until(out_rx: &mut mpsc::Receiver<Bytes>, buf: &mut Vec<u8>, want: &str) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !String::from_utf8_lossy(buf).contains(want) {
        match tokio::time::timeout_at(deadline, out_rx.recv()).await {
            Ok(Some(d)) => buf.extend_from_slice(&d),
            _ => return false,
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attach_to_running_containers_through_both_protocols() {
    require!(env_ok(), NEEDS);
    let env = Env::new("stream-attach").await;
    // A pipe container reading stdin, answering on stdout and stderr.
    let echo = env
        .run(
            "echo",
            &[
                "sh",
                "-c",
                "while read l; do echo got $l; echo err $l >&2; done",
            ],
            |c| {
                c.stdin = true;
            },
        )
        .await;
    let no_stdin = env.run("plain", &["sleep", "3600"], |_| {}).await;
    let r = env.attach_url(&no_stdin, true, false).await;
    assert_eq!(r.unwrap_err().code(), Code::FailedPrecondition);
    let r = env.attach_url(&no_stdin, false, true).await;
    assert_eq!(r.unwrap_err().code(), Code::FailedPrecondition);
    let mut ttys = Vec::new();
    for t in BOTH {
        let name = format!("tty-{t:?}").to_lowercase();
        let id = env
            .run(&name, &["sh"], |c| {
                c.stdin = true;
                c.tty = true;
            })
            .await;
        ttys.push((t, id));
    }
    let fds = env.huskd_fds();
    for (i, t) in BOTH.into_iter().enumerate() {
        let url = env.attach_url(&echo, true, false).await.unwrap();
        let (in_tx, in_rx) = mpsc::channel(4);
        let (out_tx, mut out_rx) = mpsc::channel(16);
        let (err_tx, mut err_rx) = mpsc::channel(16);
        let run = tokio::spawn(async move {
            let io = CommandIo {
                stdin: Some(in_rx),
                stdout: Some(out_tx),
                stderr: Some(err_tx),
                resize: None,
            };
            client::run_command(&url, t, io).await
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        in_tx
            .send(Bytes::from(format!("hello{i}\n")))
            .await
            .unwrap();
        let (mut o, mut e) = (Vec::new(), Vec::new());
        assert!(
            read_until(&mut out_rx, &mut o, &format!("got hello{i}")).await,
            "{t:?}: {o:?}"
        );
        assert!(
            read_until(&mut err_rx, &mut e, &format!("err hello{i}")).await,
            "{t:?}: {e:?}"
        );
        // Detach: the container goes on.
        run.abort();
        drop(in_tx);
    }
    let st = env.ctr_status(&echo).await;
    assert_eq!(st.state, cri::ContainerState::ContainerRunning as i32);

    // A tty container: the resize reaches the terminal, and the attach ends
    // (successfully) when the container exits.
    for (t, tty) in ttys {
        let url = env.attach_url(&tty, true, true).await.unwrap();
        let (in_tx, in_rx) = mpsc::channel(4);
        let (out_tx, mut out_rx) = mpsc::channel(16);
        let (rs_tx, rs_rx) = mpsc::channel(4);
        let run = tokio::spawn(async move {
            let io = CommandIo {
                stdin: Some(in_rx),
                stdout: Some(out_tx),
                stderr: None,
                resize: Some(rs_rx),
            };
            client::run_command(&url, t, io).await
        });
        rs_tx.send((99, 33)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        in_tx
            .send(Bytes::from_static(b"stty size; exit 4\n"))
            .await
            .unwrap();
        let mut o = Vec::new();
        assert!(
            read_until(&mut out_rx, &mut o, "33 99").await,
            "{t:?}: {:?}",
            String::from_utf8_lossy(&o)
        );
        let r = tokio::time::timeout(Duration::from_secs(20), run)
            .await
            .expect("attach ends")
            .unwrap();
        assert_eq!(r, Ok(0), "{t:?}");
        husk_tests::runtime::wait_exited(&env.c, &tty, Duration::from_secs(10)).await;
        drop((in_tx, rs_tx));
    }
    fds_settle(&env, fds).await;
}

fn husk(env: &Env) -> std::process::Command {
    let mut c = std::process::Command::new(husk_tests::bin_path("husk"));
    c.arg("--socket").arg(&env.d.socket);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cli_exec_attach_and_port_forward() {
    use std::io::{BufRead, Read, Write};
    use std::process::Stdio;
    require!(env_ok(), NEEDS);
    let env = Env::new("stream-cli").await;
    let web = env
        .run(
            "web",
            &["sh", "-c", "mkdir -p /www && echo cli-hello > /www/index.html && httpd -p 8080 -h /www && while true; do echo tick; sleep 0.2; done"],
            |_| {},
        )
        .await;
    for proto in ["spdy", "websocket"] {
        // exec -i: stdin in, stdout out, the exit code out.
        let mut child = husk(&env)
            .args([
                "exec",
                "-i",
                "--protocol",
                proto,
                &web[..12],
                "--",
                "sh",
                "-c",
                "tr a-z A-Z; exit 5",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(b"shout\n").unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "SHOUT\n", "{proto}");
        assert_eq!(out.status.code(), Some(5), "{proto}");

        // attach: the container's output arrives.
        let mut child = husk(&env)
            .args(["attach", "--protocol", proto, &web])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, "tick\n", "{proto}");
        child.kill().unwrap();
        child.wait().unwrap();

        // port-forward LOCAL:REMOTE, several connections.
        let port = husk_tests::free_port();
        let mut child = husk(&env)
            .args([
                "port-forward",
                "--protocol",
                proto,
                &env.pod,
                &format!("{port}:8080"),
            ])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        err.read_line(&mut line).unwrap();
        assert!(
            line.contains(&format!("127.0.0.1:{port} -> 8080")),
            "{line}"
        );
        for _ in 0..3 {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").unwrap();
            let mut body = String::new();
            s.read_to_string(&mut body).unwrap();
            assert!(body.ends_with("cli-hello\n"), "{proto}: {body}");
        }
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        child.wait().unwrap();
    }
}

/// Debian's python3-kubernetes, the official Python client (WebSocket
/// v4.channel.k8s.io), as an independent check of the wire format.
fn python_kubernetes() -> bool {
    std::process::Command::new("/usr/bin/python3")
        .args(["-c", "import kubernetes.stream.ws_client"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn python_kubernetes_client_interoperates() {
    require!(env_ok(), NEEDS);
    require!(
        python_kubernetes(),
        "needs Debian's python3-kubernetes (tests/install-deps.sh installs it)"
    );
    let env = Env::new("stream-py").await;
    let id = env
        .run(
            "web",
            &["sh", "-c", "mkdir -p /www && echo py-hello > /www/index.html && httpd -p 8080 -h /www && exec sleep 3600"],
            |_| {},
        )
        .await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/k8s_python_client.py");
    let url = env
        .exec_url(
            &id,
            &["sh", "-c", "head -n1; echo to-stderr >&2; exit 3"],
            true,
            false,
        )
        .await
        .unwrap();
    let out = tokio::process::Command::new("/usr/bin/python3")
        .args([script, "exec", &url])
        .output()
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(v["stdout"], "line-from-python\n");
    assert_eq!(v["stderr"], "to-stderr\n");
    assert_eq!(v["rc"], 3);

    let url = env.pf_url(&[]).await;
    let out = tokio::process::Command::new("/usr/bin/python3")
        .args([script, "portforward", &url, "8080"])
        .output()
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert!(v["body"].as_str().unwrap().ends_with("py-hello\n"), "{v}");
}
