#![allow(clippy::unwrap_used)]
//! Every client's HTTP/2 `:authority` (and HTTP/1 `Host`) is accepted: the
//! percent-encoded socket path grpc-go < 1.60 sends (kubelet/crictl <= 1.29),
//! `localhost` (grpc-go >= 1.60), the unencoded socket path (grpc-java), an
//! empty one, and none. Through three clients that share no code with huskd's
//! tonic/h2 stack: grpc-go (Debian's, kubelet's and crictl's gRPC stack;
//! tests/clients/grpc-go), Python grpcio (gRPC core in C) and a hand-written
//! HTTP/2 client that puts the exact bytes on the wire. The streaming server's URLs
//! get each form as their `Host` header.

use std::path::Path;
use std::time::Duration;

use husk_proto::cri;
use husk_tests::cri_env::CriEnv;
use husk_tests::huskd::{Huskd, Options};
use husk_tests::require;
use husk_tests::runtime::NS;
use husk_tests::{is_root, registry};
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

const NEEDS: &str = "needs root, /usr/bin/docker-registry, /bin/busybox and unshare(1) (tests/run.sh installs them)";
const PY: &str = "/usr/bin/python3";
/// What grpc-go < 1.60 sends for `unix:///run/husk/huskd.sock` (the example).
const DEFAULT_SOCKET_ENCODED: &str = "%2Frun%2Fhusk%2Fhuskd.sock";

fn env_ok() -> bool {
    registry::available() && is_root() && Path::new("/bin/busybox").exists()
}

fn grpcio() -> bool {
    std::process::Command::new(PY)
        .args(["-c", "import grpc"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// grpc-go's form of a unix socket target's authority: the path, percent-encoded.
fn percent_encoded(p: &Path) -> String {
    let mut s = String::new();
    for b in p.as_os_str().as_encoded_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(b) {
            s.push(*b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

/// Every authority form a CRI client sends on huskd's socket.
fn authorities(socket: &Path) -> Vec<String> {
    vec![
        percent_encoded(socket),
        DEFAULT_SOCKET_ENCODED.into(),
        "localhost".into(),
        socket.display().to_string(),
        String::new(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_with_every_authority() {
    require!(env_ok(), NEEDS);
    require!(
        grpcio(),
        "needs Debian's python3-grpcio (tests/install-deps.sh installs it)"
    );
    let e = CriEnv::new(NS, "").await.remove_pods_on_drop();
    let pod = e
        .run_pod(&e.pod("authority"))
        .await
        .unwrap_or_else(|err| panic!("run pod: {err:?}\n{}", e.d.log()));
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/cri_authority_client.py"
    );
    let mut forms: Vec<String> = authorities(&e.d.socket);
    forms.push("-".into()); // grpcio's own default
    for authority in &forms {
        let out = tokio::process::Command::new(PY)
            .arg(script)
            .arg(&e.d.socket)
            .arg(authority)
            .output()
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|err| panic!("{err}: {}", String::from_utf8_lossy(&out.stderr)));
        for m in ["Version", "ListPodSandbox", "ListImages", "ImageFsInfo"] {
            assert_eq!(
                v[m]["ok"],
                true,
                "authority {authority:?}: {m}: {}\n{}",
                v[m],
                e.d.log()
            );
        }
        // VersionResponse: 1 version, 2 runtime_name, 4 runtime_api_version.
        assert_eq!(v["Version"]["fields"]["2"], "husk", "{v}");
        assert_eq!(v["Version"]["fields"]["4"], "v1", "{v}");
        // Field 1 is the repeated list in each of the others.
        assert_eq!(v["ListPodSandbox"]["fields"]["1"], 1, "{authority:?}: {v}");
        assert!(v["ListImages"]["fields"]["1"].as_u64() >= Some(1), "{v}");
        assert!(v["ImageFsInfo"]["fields"]["1"].as_u64() >= Some(1), "{v}");
    }
    e.stop_pod(&pod).await.unwrap();
    e.remove_pod(&pod).await.unwrap();
}

/// Debian's grpc-go (golang-google-grpc-dev), the gRPC stack of kubelet and crictl.
const GO: &str = "/usr/bin/go";
const GO_NEEDS: &str = "needs Debian's golang-go, golang-google-grpc-dev, golang-google-protobuf-dev \
                        and golang-golang-x-net-dev (tests/install-deps.sh installs them)";

/// Builds tests/clients/grpc-go offline (GOPATH mode on Debian's
/// /usr/share/gocode); the binary's path, or why it could not be built.
fn build_grpc_go_client() -> Result<std::path::PathBuf, String> {
    let gocode = Path::new("/usr/share/gocode/src");
    for dep in [
        "google.golang.org/grpc",
        "google.golang.org/protobuf/encoding/protowire",
        "golang.org/x/net/http2",
    ] {
        if !gocode.join(dep).is_dir() {
            return Err(format!("{} is missing", gocode.join(dep).display()));
        }
    }
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("grpc-go-cri");
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/grpc-go/main.go");
    let build = std::process::Command::new(GO)
        .args(["build", "-o"])
        .arg(&out)
        .arg(src)
        .env("GO111MODULE", "off")
        .env("GOPATH", "/usr/share/gocode")
        .env("GOFLAGS", "")
        .env("GOPROXY", "off")
        .env("CGO_ENABLED", "0")
        .env(
            "GOCACHE",
            Path::new(env!("CARGO_TARGET_TMPDIR")).join("go-cache"),
        )
        .output()
        .map_err(|e| format!("{GO}: {e}"))?;
    if !build.status.success() {
        return Err(format!(
            "go build: {}",
            String::from_utf8_lossy(&build.stderr)
        ));
    }
    Ok(out)
}

/// grpc-go (kubelet's and crictl's gRPC stack) dials huskd every way kubelet
/// and crictl do, and sends every `:authority` grpc-go versions send; then
/// runs a pod's whole life on the percent-encoded one (kubelet <= 1.29's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_go_client_with_every_authority() {
    require!(env_ok(), NEEDS);
    require!(Path::new(GO).exists(), GO_NEEDS);
    let bin = build_grpc_go_client().unwrap_or_else(|e| panic!("{e}"));
    let e = CriEnv::new(NS, "").await.remove_pods_on_drop();
    let pod = e
        .run_pod(&e.pod("authority-go"))
        .await
        .unwrap_or_else(|err| panic!("run pod: {err:?}\n{}", e.d.log()));
    let logdir = e.logs.join("grpc-go-pod");
    let out = tokio::process::Command::new(&bin)
        .arg(&e.d.socket)
        .arg(&e.image)
        .arg(&logdir)
        .arg(NS)
        .output()
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|err| {
        panic!(
            "{err}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    for f in v["forms"].as_array().into_iter().flatten() {
        println!(
            "grpc-go {}: {} (target {}) sent :authority {}",
            v["grpc_version"], f["name"], f["target"], f["sent_authority"]
        );
    }
    assert!(
        v["grpc_version"]
            .as_str()
            .is_some_and(|s| s.starts_with("1.")),
        "{v}"
    );
    let sock = e.d.socket.display().to_string();
    let expected_sent = [
        // grpc-go 1.33 sends a passthrough target's endpoint unencoded ...
        ("bare-path+dialer", sock.clone()),
        // ... `localhost` for a unix:// target ...
        ("unix-scheme+dialer", "localhost".to_string()),
        // ... and what WithAuthority says (grpc-go 1.4x-1.59's escaping, >= 1.60's localhost).
        ("percent-encoded", percent_encoded(&e.d.socket)),
        ("localhost", "localhost".to_string()),
        ("plain-path", sock.clone()),
    ];
    let forms = v["forms"].as_array().unwrap();
    assert_eq!(forms.len(), 6, "{v}");
    for f in forms {
        let name = f["name"].as_str().unwrap();
        assert!(f["dial_error"].is_null(), "{name}: {f}\n{}", e.d.log());
        if let Some((_, want)) = expected_sent.iter().find(|(n, _)| *n == name) {
            assert_eq!(f["sent_authority"], want.as_str(), "{name}: {f}");
        }
        let c = &f["calls"];
        for m in ["Version", "ListPodSandbox", "ListImages", "ImageFsInfo"] {
            assert_eq!(c[m]["ok"], true, "{name}: {m}: {}\n{}", c[m], e.d.log());
        }
        assert_eq!(c["Version"]["values"]["2"], "husk", "{f}");
        assert_eq!(c["Version"]["values"]["4"], "v1", "{f}");
        assert_eq!(c["ListPodSandbox"]["fields"]["1"], 1, "{name}: {f}");
        assert!(c["ListImages"]["fields"]["1"].as_u64() >= Some(1), "{f}");
        assert!(c["ImageFsInfo"]["fields"]["1"].as_u64() >= Some(1), "{f}");
    }
    let l = &v["lifecycle"];
    for m in [
        "RunPodSandbox",
        "CreateContainer",
        "StartContainer",
        "ExecSync",
        "ContainerStatus",
        "StopContainer",
        "RemoveContainer",
        "StopPodSandbox",
        "RemovePodSandbox",
    ] {
        assert_eq!(l[m]["ok"], true, "{m}: {}\n{}", l[m], e.d.log());
    }
    // ExecSyncResponse: 1 stdout, 3 exit_code; the pod's hostname is its name.
    assert_eq!(l["ExecSync"]["values"]["1"], "grpc-go:grpc-go-pod\n", "{l}");
    assert_eq!(l["ExecSync"]["values"]["3"], "3", "{l}");
    // ContainerStatus.state 1: CONTAINER_RUNNING.
    assert_eq!(l["ContainerStatus"]["values"]["3"], "1", "{l}");
    // Only the test's own pod is left.
    assert_eq!(l["ListPodSandboxAfter"]["fields"]["1"], 1, "{l}");
    e.stop_pod(&pod).await.unwrap();
    e.remove_pod(&pod).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_http2_with_exact_authorities() {
    require!(is_root(), "needs root (huskd)");
    let d = Huskd::start(Options {
        hosts: vec![],
        docker_config: None,
    })
    .await
    .unwrap();
    let mut forms: Vec<Option<String>> = authorities(&d.socket).into_iter().map(Some).collect();
    forms.push(None); // no :authority at all
    for a in &forms {
        let a = a.as_deref();
        let body = cri::VersionRequest {
            version: "v1".into(),
        }
        .encode_to_vec();
        let r = h2_unary(&d.socket, a, "/runtime.v1.RuntimeService/Version", &body)
            .await
            .unwrap_or_else(|err| panic!("authority {a:?}: Version: {err}\n{}", d.log()));
        let v = cri::VersionResponse::decode(grpc_message(&r)).unwrap();
        assert_eq!(
            (v.runtime_name.as_str(), v.version.as_str()),
            ("husk", "0.1.0")
        );

        for (path, req) in [
            ("/runtime.v1.RuntimeService/ListPodSandbox", vec![]),
            ("/runtime.v1.ImageService/ListImages", vec![]),
        ] {
            // Empty lists are empty messages: success is a DATA frame
            // carrying a message, then trailers, and no reset.
            let r = h2_unary(&d.socket, a, path, &req)
                .await
                .unwrap_or_else(|err| panic!("authority {a:?}: {path}: {err}\n{}", d.log()));
            assert_eq!(r.len(), 5, "{path}: {r:?}");
        }
        let r = h2_unary(&d.socket, a, "/runtime.v1.ImageService/ImageFsInfo", &[])
            .await
            .unwrap_or_else(|err| panic!("authority {a:?}: ImageFsInfo: {err}\n{}", d.log()));
        let fs = cri::ImageFsInfoResponse::decode(grpc_message(&r)).unwrap();
        assert!(!fs.image_filesystems.is_empty(), "{fs:?}");
    }
}

/// The message of a one-message gRPC body (5-byte prefix, uncompressed).
fn grpc_message(body: &[u8]) -> &[u8] {
    assert!(body.len() >= 5 && body[0] == 0, "{body:?}");
    let n = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
    assert_eq!(body.len(), 5 + n, "one message");
    &body[5..]
}

// ---- a minimal HTTP/2 client with exact header bytes (RFC 9113, RFC 7541) ----

const FRAME_DATA: u8 = 0;
const FRAME_HEADERS: u8 = 1;
const FRAME_RST_STREAM: u8 = 3;
const FRAME_SETTINGS: u8 = 4;
const FRAME_GOAWAY: u8 = 7;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_ACK: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend([kind, flags]);
    f.extend(stream.to_be_bytes());
    f.extend(payload);
    f
}

/// HPACK integer with an `n`-bit prefix (RFC 7541 5.1).
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// "Literal header field without indexing, new name", plain strings (RFC 7541 6.2.2).
fn hpack_literal(out: &mut Vec<u8>, name: &str, value: &str) {
    out.push(0);
    hpack_int(out, 0, 7, name.len());
    out.extend(name.as_bytes());
    hpack_int(out, 0, 7, value.len());
    out.extend(value.as_bytes());
}

/// One unary gRPC call on stream 1 of a fresh connection; returns the
/// response's DATA bytes, or how the stream or connection was refused.
async fn h2_unary(
    socket: &Path,
    authority: Option<&str>,
    path: &str,
    msg: &[u8],
) -> Result<Vec<u8>, String> {
    let mut s = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| e.to_string())?;
    let mut block = vec![];
    hpack_literal(&mut block, ":method", "POST");
    hpack_literal(&mut block, ":scheme", "http");
    hpack_literal(&mut block, ":path", path);
    if let Some(a) = authority {
        hpack_literal(&mut block, ":authority", a);
    }
    hpack_literal(&mut block, "content-type", "application/grpc");
    hpack_literal(&mut block, "te", "trailers");
    let mut body = vec![0];
    body.extend((msg.len() as u32).to_be_bytes());
    body.extend(msg);
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(FRAME_SETTINGS, 0, 0, &[]));
    out.extend(frame(FRAME_HEADERS, FLAG_END_HEADERS, 1, &block));
    out.extend(frame(FRAME_DATA, FLAG_END_STREAM, 1, &body));
    s.write_all(&out).await.map_err(|e| e.to_string())?;
    let read = async {
        let mut data = vec![];
        loop {
            let (kind, flags, stream, payload) = read_frame(&mut s).await?;
            match kind {
                FRAME_SETTINGS if flags & FLAG_ACK == 0 => s
                    .write_all(&frame(FRAME_SETTINGS, FLAG_ACK, 0, &[]))
                    .await
                    .map_err(|e| e.to_string())?,
                FRAME_RST_STREAM if stream == 1 => {
                    return Err(format!(
                        "RST_STREAM, error code {}",
                        u32::from_be_bytes(payload[..4].try_into().unwrap())
                    ));
                }
                FRAME_GOAWAY => {
                    return Err(format!(
                        "GOAWAY, error code {}",
                        u32::from_be_bytes(payload[4..8].try_into().unwrap())
                    ));
                }
                FRAME_DATA if stream == 1 => data.extend(payload),
                _ => {}
            }
            if stream == 1
                && matches!(kind, FRAME_DATA | FRAME_HEADERS)
                && flags & FLAG_END_STREAM != 0
            {
                return if data.is_empty() {
                    Err("trailers only (a gRPC error status)".into())
                } else {
                    Ok(data)
                };
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .map_err(|_| "no answer in 20 s".to_string())?
}

async fn read_frame(s: &mut (impl AsyncRead + Unpin)) -> Result<(u8, u8, u32, Vec<u8>), String> {
    let mut h = [0u8; 9];
    s.read_exact(&mut h)
        .await
        .map_err(|e| format!("connection: {e}"))?;
    let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
    let stream = u32::from_be_bytes(h[5..9].try_into().unwrap()) & 0x7fff_ffff;
    let mut payload = vec![0; len];
    s.read_exact(&mut payload)
        .await
        .map_err(|e| format!("connection: {e}"))?;
    Ok((h[3], h[4], stream, payload))
}

// ---- the streaming server (HTTP/1.1) with each Host header ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_urls_with_every_host_header() {
    require!(env_ok(), NEEDS);
    let e = CriEnv::new(NS, "").await.remove_pods_on_drop();
    let pod_cfg = e.pod("authority-stream");
    let pod = e
        .run_pod(&pod_cfg)
        .await
        .unwrap_or_else(|err| panic!("run pod: {err:?}\n{}", e.d.log()));
    let id = e
        .run(&pod, &e.ctr("main", &["sleep", "3600"]), &pod_cfg)
        .await;
    let mut hosts: Vec<Option<String>> = authorities(&e.d.socket).into_iter().map(Some).collect();
    hosts.push(None); // no Host header
    for host in &hosts {
        let url = e
            .exec_url(&id, &["sh", "-c", "echo host-ok; exit 4"], false, false)
            .await
            .unwrap();
        let (stdout, status) = ws_exec(&url, host.as_deref())
            .await
            .unwrap_or_else(|err| panic!("Host {host:?}: {err}\n{}", e.d.log()));
        assert_eq!(stdout, "host-ok\n", "Host {host:?}");
        assert!(
            status.contains("NonZeroExitCode") && status.contains("\"4\""),
            "Host {host:?}: {status}"
        );
    }
    // The URL's own host:port, as kubelet's client sends it, for comparison.
    let url = e
        .exec_url(&id, &["echo", "host-ok"], false, false)
        .await
        .unwrap();
    let own = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let (stdout, status) = ws_exec(&url, Some(&own)).await.unwrap();
    assert_eq!(
        (stdout.as_str(), status.contains("Success")),
        ("host-ok\n", true),
        "{status}"
    );
    e.stop_pod(&pod).await.unwrap();
    e.remove_pod(&pod).await.unwrap();
}

/// An exec through WebSocket (`v4.channel.k8s.io`) with `host` as the
/// request's Host header (None: no Host header). Returns stdout and the
/// status JSON of the error channel.
async fn ws_exec(url: &str, host: Option<&str>) -> Result<(String, String), String> {
    let rest = url.strip_prefix("http://").ok_or("not an http URL")?;
    let (addr, path) = rest.split_once('/').ok_or("no path")?;
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let host_line = host.map(|h| format!("Host: {h}\r\n")).unwrap_or_default();
    let req = format!(
        "GET /{path} HTTP/1.1\r\n{host_line}Connection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Protocol: v4.channel.k8s.io\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let work = async {
        // The response head, byte by byte up to the blank line (frames follow).
        let mut head = vec![];
        while !head.ends_with(b"\r\n\r\n") {
            head.push(
                s.read_u8()
                    .await
                    .map_err(|e| format!("response head: {e}"))?,
            );
            if head.len() > 16 << 10 {
                return Err("response head too long".into());
            }
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        if !head.starts_with("HTTP/1.1 101") {
            return Err(format!("no upgrade: {head}"));
        }
        let (mut stdout, mut status) = (vec![], vec![]);
        while let Ok(b0) = s.read_u8().await {
            let b1 = s.read_u8().await.map_err(|e| e.to_string())?;
            let len = match b1 & 0x7f {
                126 => u64::from(s.read_u16().await.map_err(|e| e.to_string())?),
                127 => s.read_u64().await.map_err(|e| e.to_string())?,
                n => u64::from(n),
            };
            if len > 1 << 20 {
                return Err(format!("frame of {len} bytes"));
            }
            let mut p = vec![0; len as usize];
            s.read_exact(&mut p).await.map_err(|e| e.to_string())?;
            match b0 & 0x0f {
                0x8 => break, // close
                0x2 if !p.is_empty() => match p[0] {
                    1 => stdout.extend(&p[1..]),
                    3 => status.extend(&p[1..]),
                    _ => {}
                },
                _ => {}
            }
        }
        Ok((
            String::from_utf8_lossy(&stdout).into_owned(),
            String::from_utf8_lossy(&status).into_owned(),
        ))
    };
    tokio::time::timeout(Duration::from_secs(30), work)
        .await
        .map_err(|_| "no end of stream in 30 s".to_string())?
}
