//! Seed corpora for huskd's fuzz targets, made with the real encoders: SPDY frames and header
//! blocks from huskd's own SPDY encoder (what kubectl's client sends looks the same), WebSocket
//! frames from tungstenite's client, tar layers from the `tar` crate, CRI configs from the
//! k8s-cri protobuf types, agent replies from the agent's ttrpc messages.

use std::path::Path;

use bytes::{Bytes, BytesMut};
use husk_host::streaming::spdy::frame::{self, Frame, HeaderEncoder};
use husk_proto::agent as pb;
use husk_proto::cri;

fn put(root: &Path, target: &str, name: &str, data: &[u8]) {
    let d = root.join(target);
    std::fs::create_dir_all(&d).expect("corpus dir");
    std::fs::write(d.join(name), data).expect("seed");
}

fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn exec_streams() -> Vec<Frame> {
    let mut v = Vec::new();
    for (i, ty) in ["error", "stdin", "stdout", "stderr", "resize"]
        .iter()
        .enumerate()
    {
        v.push(Frame::SynStream {
            stream: 1 + 2 * i as u32,
            associated: 0,
            priority: 0,
            flags: 0,
            headers: h(&[("streamtype", ty)]),
        });
    }
    v
}

fn wire(frames: &[Frame]) -> Vec<u8> {
    let mut enc = HeaderEncoder::new();
    let mut out = BytesMut::new();
    for f in frames {
        frame::encode(f, &mut enc, &mut out);
    }
    out.to_vec()
}

fn spdy(root: &Path) {
    let data = |stream, flags, d: &'static [u8]| Frame::Data {
        stream,
        flags,
        data: Bytes::from_static(d),
    };
    let mut session = exec_streams();
    session.extend([
        data(3, 0, b"echo hello\n"),
        data(9, 0, br#"{"Width":80,"Height":24}"#),
        data(3, 1, b""),
        Frame::Ping { id: 1 },
        Frame::WindowUpdate {
            stream: 5,
            delta: 65536,
        },
        Frame::RstStream {
            stream: 7,
            status: frame::rst::CANCEL,
        },
        Frame::GoAway {
            last_stream: 9,
            status: 0,
        },
    ]);
    let singles: Vec<(&str, Frame)> = vec![
        ("syn_stream", session[0].clone()),
        (
            "syn_stream_port_forward",
            Frame::SynStream {
                stream: 1,
                associated: 0,
                priority: 0,
                flags: 0,
                headers: h(&[("streamtype", "data"), ("port", "8080"), ("requestid", "0")]),
            },
        ),
        (
            "syn_reply",
            Frame::SynReply {
                stream: 1,
                flags: 0,
                headers: h(&[(":status", "200")]),
            },
        ),
        (
            "headers",
            Frame::Headers {
                stream: 1,
                flags: 1,
                headers: h(&[("x", "y")]),
            },
        ),
        ("data", data(1, 0, b"payload")),
        ("data_fin", data(1, 1, b"")),
        (
            "settings",
            Frame::Settings {
                flags: 0,
                entries: vec![(0, 4, 100), (0, 7, 65536)],
            },
        ),
        ("ping", Frame::Ping { id: 7 }),
        (
            "rst",
            Frame::RstStream {
                stream: 1,
                status: frame::rst::PROTOCOL_ERROR,
            },
        ),
        (
            "goaway",
            Frame::GoAway {
                last_stream: 1,
                status: 0,
            },
        ),
        (
            "window_update",
            Frame::WindowUpdate {
                stream: 0,
                delta: 1 << 20,
            },
        ),
    ];
    for (name, f) in &singles {
        put(root, "spdy_frames", name, &wire(std::slice::from_ref(f)));
        put(root, "spdy_conn", name, &wire(std::slice::from_ref(f)));
    }
    put(root, "spdy_frames", "exec_session", &wire(&session));
    put(root, "spdy_conn", "exec_session", &wire(&session));
    let mut dup = exec_streams();
    dup.push(session[0].clone());
    put(root, "spdy_conn", "duplicate_stream", &wire(&dup));
    let mut w = wire(&session[..1]);
    w[0] = 0x80;
    w[1] = 2; // SPDY/2
    put(root, "spdy_frames", "bad_version", &w);
    put(root, "spdy_frames", "truncated", &wire(&session)[..20]);
    // Header blocks: u16 length + the compressed block, one zlib context for all.
    let mut enc = HeaderEncoder::new();
    let mut blocks = Vec::new();
    for hs in [
        h(&[("streamtype", "error")]),
        h(&[("streamtype", "stdout")]),
        h(&[("streamtype", "data"), ("port", "80"), ("requestid", "1")]),
        h(&[(":status", "200"), ("content-type", "text/plain")]),
    ] {
        let b = enc.encode(&hs);
        blocks.extend_from_slice(&(b.len() as u16).to_le_bytes());
        blocks.extend_from_slice(&b);
        put(
            root,
            "spdy_headers",
            &format!("block_{}", blocks.len()),
            &blocks,
        );
    }
    let mut raw = vec![];
    raw.extend_from_slice(&4u16.to_le_bytes());
    raw.extend_from_slice(&[0x78, 0xbb, 0xe3, 0xc6]);
    put(root, "spdy_headers", "header_only", &raw);
}

fn websocket(root: &Path) {
    use futures::SinkExt;
    use tokio::io::AsyncReadExt;
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::Role;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    // (protocol index in WS_EXEC, messages a client sends)
    let cases: Vec<(&str, u8, Vec<Message>)> = vec![
        (
            "v5_stdin_resize_close",
            0,
            vec![
                Message::Binary(Bytes::from_static(b"\x00ls -l\n")),
                Message::Binary(Bytes::from_static(b"\x04{\"Width\":100,\"Height\":30}")),
                Message::Binary(Bytes::from_static(b"\xff\x00")),
                Message::Close(None),
            ],
        ),
        (
            "v4_binary",
            1,
            vec![
                Message::Binary(Bytes::from_static(b"\x00echo hi\n")),
                Message::Ping(Bytes::from_static(b"p")),
            ],
        ),
        (
            "v4_base64",
            2,
            vec![
                Message::Text("0ZWNobyBoaQo=".into()),
                Message::Text("4eyJXaWR0aCI6ODB9".into()),
            ],
        ),
        (
            "channel_text",
            3,
            vec![
                Message::Text("\u{0}hello".into()),
                Message::Binary(Bytes::new()),
            ],
        ),
        (
            "base64_bad",
            4,
            vec![Message::Text("0!!!!".into()), Message::Text("9".into())],
        ),
    ];
    for (name, proto, msgs) in cases {
        let bytes = rt.block_on(async {
            let (a, mut b) = tokio::io::duplex(1 << 20);
            let mut ws = WebSocketStream::from_raw_socket(a, Role::Client, None).await;
            for m in msgs {
                let _ = ws.send(m).await;
            }
            drop(ws);
            let mut out = vec![];
            let _ = b.read_to_end(&mut out).await;
            out
        });
        let mut seed = vec![proto];
        seed.extend_from_slice(&bytes);
        put(root, "websocket", name, &seed);
    }
}

fn line_readers(root: &Path) {
    let seeds: &[(&str, u8, &[u8])] = &[
        ("hybrid_ok", 0, b"OK 1073741824\n"),
        ("hybrid_ok_then_data", 0, b"OK 1073741825\n\x00\x00\x00\x10"),
        ("hybrid_bad", 0, b"NO\n"),
        ("hybrid_long", 0, b"OK 11111111111111111111111111111111111111\n"),
        ("hybrid_eof", 0, b"OK"),
        ("vmmctl_disks", 1, b"disks 0=img1 1=- 2=img3\n"),
        ("vmmctl_disks_bad", 1, b"disks 1=x\n"),
        ("vmmctl_error", 1, b"error no\n"),
        (
            "qmp_status",
            2,
            br#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": []}}
{"return": {}}
{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "RESUME"}
{"return": {"status": "running", "singlestep": false, "running": true}}
"#,
        ),
        (
            "qmp_error",
            2,
            br#"{"QMP": {"version": {}, "capabilities": []}}
{"error": {"class": "GenericError", "desc": "nope"}}
"#,
        ),
        ("qmp_not_json", 2, b"hello\n"),
        ("command_ok", 3, b"running\n"),
        ("command_error", 3, b"error unknown command\n"),
    ];
    for (name, sel, answer) in seeds {
        let mut s = vec![*sel];
        s.extend_from_slice(answer);
        put(root, "line_readers", name, &s);
    }
}

fn tar_seeds(root: &Path) {
    fn layer(f: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        f(&mut b);
        b.into_inner().expect("tar")
    }
    fn entry(
        b: &mut tar::Builder<Vec<u8>>,
        path: &str,
        ty: tar::EntryType,
        link: Option<&str>,
        data: &[u8],
    ) {
        let mut hd = tar::Header::new_gnu();
        // Written into the raw name field so that hostile names ("..", absolute) survive.
        let name = &mut hd.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        hd.set_entry_type(ty);
        hd.set_mode(if ty == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        hd.set_size(data.len() as u64);
        if let Some(l) = link {
            hd.set_link_name(l).expect("link");
        }
        hd.set_cksum();
        b.append(&hd, data).expect("append");
    }
    use tar::EntryType as T;
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        (
            "rootfs",
            layer(|b| {
                entry(b, "bin/", T::Directory, None, b"");
                entry(b, "bin/sh", T::Regular, None, b"#!shell");
                entry(b, "bin/ls", T::Link, Some("bin/sh"), b"");
                entry(b, "etc/", T::Directory, None, b"");
                entry(b, "etc/hosts", T::Regular, None, b"127.0.0.1 localhost\n");
                entry(b, "usr/bin/env", T::Symlink, Some("../../bin/sh"), b"");
            }),
        ),
        (
            "whiteouts",
            layer(|b| {
                entry(b, "etc/", T::Directory, None, b"");
                entry(b, "etc/.wh.hosts", T::Regular, None, b"");
                entry(b, "var/", T::Directory, None, b"");
                entry(b, "var/.wh..wh..opq", T::Regular, None, b"");
            }),
        ),
        (
            "devices",
            layer(|b| {
                entry(b, "dev/", T::Directory, None, b"");
                entry(b, "dev/null", T::Char, None, b"");
                entry(b, "dev/sda", T::Block, None, b"");
                entry(b, "dev/fifo", T::Fifo, None, b"");
            }),
        ),
        (
            "dotdot",
            layer(|b| entry(b, "../escaped", T::Regular, None, b"x")),
        ),
        (
            "absolute",
            layer(|b| entry(b, "/etc/escaped", T::Regular, None, b"x")),
        ),
        (
            "write_through_symlink",
            layer(|b| {
                entry(b, "up", T::Symlink, Some(".."), b"");
                entry(b, "up/escaped", T::Regular, None, b"x");
            }),
        ),
        (
            "hardlink_out",
            layer(|b| entry(b, "h", T::Link, Some("../outside"), b"")),
        ),
        (
            "pax_xattrs",
            layer(|b| {
                let mut pax = Vec::new();
                for (k, v) in [
                    ("SCHILY.xattr.user.a", "1"),
                    ("SCHILY.xattr.security.capability", "x"),
                ] {
                    let rec = format!(" {k}={v}\n");
                    let len = rec.len() + 2;
                    pax.extend_from_slice(format!("{len}{rec}").as_bytes());
                }
                entry(b, "././@PaxHeader", T::XHeader, None, &pax);
                entry(b, "f", T::Regular, None, b"data");
            }),
        ),
        (
            "long_name",
            layer(|b| {
                let long = "d/".repeat(60) + "file";
                let mut hd = tar::Header::new_gnu();
                hd.set_size(1);
                hd.set_mode(0o644);
                b.append_data(&mut hd, &long, &b"z"[..]).expect("long");
            }),
        ),
    ];
    for (name, data) in seeds {
        put(root, "tar_layer", name, &data);
    }
}

fn manifests(root: &Path) {
    let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
    let seeds = vec![
        (
            "oci_manifest",
            serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": d('a'), "size": 1469},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d('b'), "size": 2152262}]
            }),
        ),
        (
            "docker_manifest",
            serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": d('c'), "size": 7023},
                "layers": [
                    {"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": d('d'), "size": 32654},
                    {"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": d('e'), "size": 16724}
                ]
            }),
        ),
        (
            "oci_index",
            serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": [
                    {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": d('1'), "size": 610, "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"}},
                    {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": d('2'), "size": 610, "platform": {"architecture": "amd64", "os": "linux"}}
                ]
            }),
        ),
        (
            "docker_list_no_amd64",
            serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.docker.distribution.manifest.list.v2+json",
                "manifests": [{"mediaType": "application/vnd.docker.distribution.manifest.v2+json", "digest": d('3'), "size": 1, "platform": {"architecture": "s390x", "os": "linux"}}]
            }),
        ),
        (
            "image_config",
            serde_json::json!({
                "architecture": "amd64", "os": "linux",
                "config": {"User": "1000:1000", "Env": ["PATH=/usr/bin"], "Cmd": ["sh"], "StopSignal": "SIGQUIT"},
                "rootfs": {"type": "layers", "diff_ids": [d('f'), d('0')]}
            }),
        ),
    ];
    for (name, v) in seeds {
        put(root, "manifest", name, v.to_string().as_bytes());
    }
}

fn hosts(root: &Path) {
    let seeds: &[(&str, &str)] = &[
        (
            "mirror",
            "server = \"https://registry.example.com\"\nca = \"ca.pem\"\n\n[host.\"https://mirror.example.com\"]\ncapabilities = [\"pull\", \"resolve\"]\nskip_verify = true\n",
        ),
        (
            "plain_http",
            "server = \"http://localhost:5000\"\n\n[host.\"http://localhost:5000\"]\ncapabilities = [\"pull\", \"resolve\", \"push\"]\n",
        ),
        (
            "ca_list",
            "[host.\"https://m1\"]\nca = [\"a.pem\", \"/etc/certs/b.pem\"]\n[host.\"https://m2\"]\nskip_verify = false\n",
        ),
        ("empty", ""),
        ("bad_toml", "server = [\n"),
        (
            "override_path",
            "[host.\"https://m/v2/prefix\"]\noverride_path = true\ncapabilities = [\"pull\"]\n",
        ),
    ];
    for (name, t) in seeds {
        put(root, "hosts_toml", name, t.as_bytes());
    }
}

fn cri_seeds(root: &Path) {
    use prost::Message;
    let img = serde_json::json!({
        "config": {"Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo hi"], "User": "nobody",
                   "Env": ["PATH=/usr/bin:/bin"], "WorkingDir": "/srv", "StopSignal": "SIGTERM"}
    })
    .to_string();
    let pod = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "p".into(),
            uid: "u1".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: "p".into(),
        log_directory: "/var/log/pods/default_p_u1".into(),
        ..Default::default()
    };
    let base = cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: "c".into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: "busybox".into(),
            ..Default::default()
        }),
        command: vec!["sleep".into()],
        args: vec!["3600".into()],
        working_dir: "/tmp".into(),
        envs: vec![cri::KeyValue {
            key: "A".into(),
            value: "b".into(),
        }],
        log_path: "c/0.log".into(),
        ..Default::default()
    };
    let mut mounts = base.clone();
    mounts.mounts = vec![cri::Mount {
        container_path: "/data".into(),
        host_path: "/var/lib/data".into(),
        readonly: true,
        ..Default::default()
    }];
    let mut privileged = base.clone();
    privileged.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            cpu_period: 100_000,
            cpu_quota: 50_000,
            cpu_shares: 512,
            memory_limit_in_bytes: 64 << 20,
            oom_score_adj: -998,
            ..Default::default()
        }),
        security_context: Some(cri::LinuxContainerSecurityContext {
            capabilities: Some(cri::Capability {
                add_capabilities: vec!["NET_ADMIN".into(), "ALL".into()],
                drop_capabilities: vec!["CHOWN".into()],
                ..Default::default()
            }),
            privileged: true,
            readonly_rootfs: true,
            run_as_user: Some(cri::Int64Value { value: 1000 }),
            seccomp: Some(cri::SecurityProfile {
                profile_type: cri::security_profile::ProfileType::RuntimeDefault as i32,
                localhost_ref: String::new(),
            }),
            ..Default::default()
        }),
    });
    let mut bad = base.clone();
    bad.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            cpu_quota: -5,
            memory_limit_in_bytes: -1,
            ..Default::default()
        }),
        security_context: Some(cri::LinuxContainerSecurityContext {
            capabilities: Some(cri::Capability {
                add_capabilities: vec!["NOT_A_CAP".into()],
                ..Default::default()
            }),
            ..Default::default()
        }),
    });
    let mut no_cmd = base.clone();
    no_cmd.command.clear();
    no_cmd.args.clear();
    let mut devices = base.clone();
    devices.devices = vec![cri::Device {
        container_path: "/dev/xx".into(),
        host_path: "/dev/null".into(),
        permissions: "rwm".into(),
    }];
    for (name, c) in [
        ("basic", base),
        ("mounts", mounts),
        ("privileged_resources", privileged),
        ("bad_values", bad),
        ("image_command", no_cmd),
        ("devices", devices),
    ] {
        let cb = c.encode_to_vec();
        let pb_ = pod.encode_to_vec();
        let mut s = Vec::new();
        s.extend_from_slice(&(cb.len() as u16).to_le_bytes());
        s.extend_from_slice(&cb);
        s.extend_from_slice(&(pb_.len() as u16).to_le_bytes());
        s.extend_from_slice(&pb_);
        s.extend_from_slice(img.as_bytes());
        put(root, "cri_oci", name, &s);
    }
}

fn agent(root: &Path) {
    use protobuf::Message;
    fn response(payload: Vec<u8>) -> Vec<u8> {
        let mut r = ttrpc::Response::new();
        r.payload = payload;
        r.write_to_bytes().expect("response")
    }
    // One answer per call huskd makes (fuzzing::agent_replies): a frame count, then frames
    // of (type 2 = response, flags, u16 length, payload).
    fn answer(frames: &[(u8, Vec<u8>)]) -> Vec<u8> {
        let mut a = vec![frames.len() as u8];
        for (ty, p) in frames {
            a.push(*ty);
            a.push(0);
            a.extend_from_slice(&(p.len() as u16).to_le_bytes());
            a.extend_from_slice(p);
        }
        a
    }
    let check = pb::CheckResponse {
        version: "0.1.0".into(),
        pid: 1,
        cgroup_version: "v2".into(),
        init: true,
        ..Default::default()
    };
    let wait = pb::WaitProcessResponse {
        exit_code: 137,
        signal: 9,
        oom_killed: true,
        ..Default::default()
    };
    let read = pb::ReadStreamResponse {
        data: b"hello\n".to_vec(),
        eof: false,
        offset: 0,
        ..Default::default()
    };
    let stats = pb::ContainerStatsResponse {
        timestamp: 1,
        cpu_usage_ns: 123,
        memory_usage_bytes: 4096,
        memory_working_set_bytes: 2048,
        ..Default::default()
    };
    let mut sb = pb::SandboxStatsResponse::new();
    sb.cgroup = protobuf::MessageField::some(stats.clone());
    let list = pb::ListContainersResponse {
        containers: vec![pb::ContainerStateResponse {
            container_id: "c".into(),
            pid: 7,
            ..Default::default()
        }],
        ..Default::default()
    };
    let all = [
        answer(&[(2, response(check.write_to_bytes().expect("m")))]),
        answer(&[(2, response(wait.write_to_bytes().expect("m")))]),
        answer(&[(2, response(read.write_to_bytes().expect("m")))]),
        answer(&[(2, response(stats.write_to_bytes().expect("m")))]),
        answer(&[(2, response(sb.write_to_bytes().expect("m")))]),
        answer(&[(2, response(list.write_to_bytes().expect("m")))]),
    ];
    put(root, "agent_replies", "all_calls", &all.concat());
    put(root, "agent_replies", "check_only", &all[0]);
    put(
        root,
        "agent_replies",
        "garbage_payload",
        &answer(&[(2, b"\xff\xff\xff\xff".to_vec())]),
    );
    put(
        root,
        "agent_replies",
        "request_type",
        &answer(&[(1, response(vec![]))]),
    );
    put(
        root,
        "agent_replies",
        "two_answers",
        &answer(&[
            (2, response(check.write_to_bytes().expect("m"))),
            (2, response(check.write_to_bytes().expect("m"))),
        ]),
    );
    put(root, "agent_replies", "silent", &[0, 0]);
}

pub fn write_all(root: &Path) {
    spdy(root);
    websocket(root);
    line_readers(root);
    tar_seeds(root);
    manifests(root);
    hosts(root);
    cri_seeds(root);
    agent(root);
}
