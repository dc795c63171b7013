#![allow(clippy::unwrap_used)]
//! CRI ImageService end to end: a real registry, a real huskd, the CRI
//! client on its unix socket.

use std::path::{Path, PathBuf};
use std::process::Command;

use husk_proto::cri;
use husk_tests::huskd::{Huskd, Options};
use husk_tests::oci::{
    self, Compression, Entry, ImageSpec, Layer, Pusher, build_image, busybox_layer, file,
};
use husk_tests::registry::{self, Registry};
use husk_tests::require;
use tonic::Code;

fn spec(image: &str) -> Option<cri::ImageSpec> {
    Some(cri::ImageSpec {
        image: image.into(),
        ..Default::default()
    })
}

async fn pull(
    d: &Huskd,
    image: &str,
    auth: Option<cri::AuthConfig>,
) -> Result<String, tonic::Status> {
    let mut c = d.clients().await.expect("connect");
    c.image
        .pull_image(cri::PullImageRequest {
            image: spec(image),
            auth,
            sandbox_config: None,
        })
        .await
        .map(|r| r.into_inner().image_ref)
}

async fn status(d: &Huskd, image: &str) -> cri::ImageStatusResponse {
    let mut c = d.clients().await.expect("connect");
    c.image
        .image_status(cri::ImageStatusRequest {
            image: spec(image),
            verbose: true,
        })
        .await
        .expect("status")
        .into_inner()
}

async fn list(d: &Huskd) -> Vec<cri::Image> {
    let mut c = d.clients().await.expect("connect");
    c.image
        .list_images(cri::ListImagesRequest { filter: None })
        .await
        .expect("list")
        .into_inner()
        .images
}

fn count(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// Asserts the store holds nothing but what `images` reference.
fn assert_store_clean(d: &Huskd) {
    let root = d.images_dir();
    assert_eq!(count(&root.join("ingest")), 0, "temp downloads leaked");
    let tmp = std::fs::read_dir(root.join("snapshots"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
        .count();
    assert_eq!(tmp, 0, "temp snapshots leaked");
}

fn env_ok() -> bool {
    registry::available() && husk_tests::is_root() && Path::new("/bin/busybox").exists()
}

const NEEDS: &str =
    "needs root, /usr/bin/docker-registry and /bin/busybox (tests/run.sh installs them)";

/// Overlay-mounts an image's snapshots and runs `args` chrooted in it.
fn run_in_rootfs(lowers: &[PathBuf], args: &[&str]) -> (String, bool) {
    let t = tempfile::tempdir().unwrap();
    let (upper, work, merged) = (t.path().join("u"), t.path().join("w"), t.path().join("m"));
    for p in [&upper, &work, &merged] {
        std::fs::create_dir(p).unwrap();
    }
    let lower = lowers
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let opts = format!(
        "lowerdir={lower},upperdir={},workdir={}",
        upper.display(),
        work.display()
    );
    let st = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(&merged)
        .status()
        .unwrap();
    assert!(st.success(), "overlay mount of the snapshots failed");
    let out = Command::new("chroot")
        .arg(&merged)
        .args(args)
        .output()
        .unwrap();
    let _ = Command::new("umount").arg(&merged).status();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.status.success(),
    )
}

fn lowers_of(st: &cri::ImageStatusResponse) -> Vec<PathBuf> {
    let info: serde_json::Value = serde_json::from_str(&st.info["info"]).unwrap();
    let mut v: Vec<PathBuf> = info["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| PathBuf::from(l["snapshot"].as_str().unwrap()))
        .collect();
    v.reverse(); // top first
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_busybox_via_docker_io_mirror_and_run_it_from_the_snapshots() {
    require!(env_ok(), NEEDS);
    let reg = Registry::start(None).unwrap();
    let img = build_image(&ImageSpec {
        layers: vec![busybox_layer(Compression::Gzip).unwrap()],
        user: "nobody",
        ..Default::default()
    });
    Pusher::new(&reg.addr, None)
        .push_image("library/busybox", Some("latest"), &img)
        .await
        .unwrap();
    // docker.io resolves through a plain-HTTP loopback mirror.
    let hosts = format!(
        "server = \"https://registry-1.docker.io\"\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
        reg.addr
    );
    let d = Huskd::start(Options {
        hosts: vec![("docker.io".into(), hosts)],
        docker_config: None,
    })
    .await
    .unwrap();

    let id = pull(&d, "busybox", None).await.unwrap();
    assert_eq!(id, img.config_digest);
    let images = list(&d).await;
    assert_eq!(images.len(), 1);
    assert_eq!(
        images[0].repo_tags,
        vec!["docker.io/library/busybox:latest"]
    );
    assert_eq!(
        images[0].repo_digests,
        vec![format!("docker.io/library/busybox@{}", img.manifest_digest)]
    );
    assert_eq!(images[0].username, "nobody");
    assert!(images[0].uid.is_none());
    assert!(images[0].size > 500_000);

    // Every way kubelet names it resolves to the same image.
    for name in [
        "busybox",
        "busybox:latest",
        "docker.io/library/busybox:latest",
        &id,
        &id[7..19],
        &format!("docker.io/library/busybox@{}", img.manifest_digest),
    ] {
        assert_eq!(
            status(&d, name).await.image.map(|i| i.id),
            Some(id.clone()),
            "{name}"
        );
    }
    let mut c = d.clients().await.unwrap();
    for (filter, want) in [("busybox", 1), ("nothere", 0)] {
        let found = c
            .image
            .list_images(cri::ListImagesRequest {
                filter: Some(cri::ImageFilter {
                    image: spec(filter),
                }),
            })
            .await
            .unwrap()
            .into_inner()
            .images;
        assert_eq!(found.len(), want, "filter {filter}");
    }

    // Verbose status carries the image config.
    let st = status(&d, "busybox").await;
    let info: serde_json::Value = serde_json::from_str(&st.info["info"]).unwrap();
    assert_eq!(info["imageSpec"]["config"]["User"], "nobody");
    // The snapshots are a usable rootfs.
    let (out, ok) = run_in_rootfs(
        &lowers_of(&st),
        &["/bin/busybox", "echo", "hello-from-snapshot"],
    );
    assert!(ok);
    assert_eq!(out.trim(), "hello-from-snapshot");

    // ImageFsInfo counts the store.
    let fs = c
        .image
        .image_fs_info(cri::ImageFsInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let u = &fs.image_filesystems[0];
    assert_eq!(
        u.fs_id.as_ref().unwrap().mountpoint,
        d.images_dir().display().to_string()
    );
    assert!(u.used_bytes.as_ref().unwrap().value > 1_000_000, "{u:?}");
    assert!(u.inodes_used.as_ref().unwrap().value > 10);
    assert_store_clean(&d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_arch_index_zstd_uncompressed_and_docker_schema2() {
    require!(env_ok(), NEEDS);
    let reg = Registry::start(None).unwrap();
    let p = Pusher::new(&reg.addr, None);
    let arch_img = |arch: &'static str| {
        build_image(&ImageSpec {
            layers: vec![Layer {
                entries: vec![file("arch", arch)],
                compression: Compression::Gzip,
            }],
            arch,
            user: "1000:1000",
            ..Default::default()
        })
    };
    let (arm, amd) = (arch_img("arm64"), arch_img("amd64"));
    let index = p
        .push_index("multi", "v1", &[("arm64", &arm), ("amd64", &amd)])
        .await
        .unwrap();
    // zstd + uncompressed layers in a Docker schema2 manifest.
    let mixed = build_image(&ImageSpec {
        layers: vec![
            Layer {
                entries: vec![file("z", "zstd-layer")],
                compression: Compression::Zstd,
            },
            Layer {
                entries: vec![file("u", "plain-layer")],
                compression: Compression::None,
            },
        ],
        docker: true,
        ..Default::default()
    });
    p.push_image("mixed", Some("v1"), &mixed).await.unwrap();
    let d = Huskd::start(Options::plain_http(&reg.addr)).await.unwrap();

    let id = pull(&d, &format!("{}/multi:v1", reg.addr), None)
        .await
        .unwrap();
    assert_eq!(id, amd.config_digest, "linux/amd64 picked from the index");
    let st = status(&d, &id).await;
    let img = st.image.clone().unwrap();
    assert_eq!(img.uid.map(|u| u.value), Some(1000));
    assert_eq!(
        img.repo_digests,
        vec![format!("{}/multi@{index}", reg.addr)],
        "repo digest is the index digest"
    );
    let snap = &lowers_of(&st)[0];
    assert_eq!(std::fs::read_to_string(snap.join("arch")).unwrap(), "amd64");
    // Pull by the index digest resolves the same.
    assert_eq!(
        pull(&d, &format!("{}/multi@{index}", reg.addr), None)
            .await
            .unwrap(),
        id
    );

    let id = pull(&d, &format!("{}/mixed:v1", reg.addr), None)
        .await
        .unwrap();
    let st = status(&d, &id).await;
    let info: serde_json::Value = serde_json::from_str(&st.info["info"]).unwrap();
    assert_eq!(info["manifestMediaType"], oci::DOCKER_MANIFEST);
    let l = lowers_of(&st);
    assert_eq!(
        std::fs::read_to_string(l[1].join("z")).unwrap(),
        "zstd-layer"
    );
    assert_eq!(
        std::fs::read_to_string(l[0].join("u")).unwrap(),
        "plain-layer"
    );
    assert_store_clean(&d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whiteouts_opaque_dirs_and_hard_links_apply_through_overlay() {
    require!(env_ok(), NEEDS);
    let reg = Registry::start(None).unwrap();
    let base = busybox_layer(Compression::Gzip).unwrap();
    let l1 = Layer {
        entries: vec![
            Entry::Dir("a", 0o755),
            file("a/gone", "x"),
            file("a/kept", "k"),
            Entry::Dir("b", 0o755),
            file("b/old", "o"),
            Entry::Owned("owned".into(), b"o".to_vec(), 0o4750, 1234, 5678),
        ],
        compression: Compression::Gzip,
    };
    let l2 = Layer {
        entries: vec![
            file("a/.wh.gone", ""),
            Entry::Dir("b", 0o755),
            file("b/.wh..wh..opq", ""),
            file("b/new", "n"),
            file("h1", "linked"),
            Entry::Hardlink("h2".into(), "h1".into()),
        ],
        compression: Compression::Gzip,
    };
    let img = build_image(&ImageSpec {
        layers: vec![base, l1, l2],
        ..Default::default()
    });
    Pusher::new(&reg.addr, None)
        .push_image("layers", Some("v1"), &img)
        .await
        .unwrap();
    let d = Huskd::start(Options::plain_http(&reg.addr)).await.unwrap();
    let id = pull(&d, &format!("{}/layers:v1", reg.addr), None)
        .await
        .unwrap();
    let lowers = lowers_of(&status(&d, &id).await);
    let (out, ok) = run_in_rootfs(
        &lowers,
        &[
            "/bin/sh",
            "-c",
            "ls /a; echo --; ls /b; echo --; ls -i /h1 | cut -d' ' -f1; ls -i /h2 | cut -d' ' -f1; stat -c '%u %g %a' /owned",
        ],
    );
    assert!(ok, "{out}");
    let parts: Vec<&str> = out.split("--\n").collect();
    assert_eq!(parts[0].trim(), "kept", "whiteout hid a/gone");
    assert_eq!(parts[1].trim(), "new", "opaque dir hid b/old");
    let rest: Vec<&str> = parts[2].lines().collect();
    assert_eq!(rest[0], rest[1], "hard links share an inode");
    assert_eq!(rest[2], "1234 5678 4750", "owner and mode preserved");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_registry_with_basic_auth() {
    require!(env_ok(), NEEDS);
    let reg = Registry::start(Some(("alice", "s3cret"))).unwrap();
    let img = build_image(&ImageSpec {
        layers: vec![busybox_layer(Compression::Gzip).unwrap()],
        ..Default::default()
    });
    Pusher::new(&reg.addr, Some(("alice", "s3cret")))
        .push_image("private/bb", Some("v1"), &img)
        .await
        .unwrap();
    let name = format!("{}/private/bb:v1", reg.addr);

    let d = Huskd::start(Options::plain_http(&reg.addr)).await.unwrap();
    let e = pull(&d, &name, None).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let bad = cri::AuthConfig {
        username: "alice".into(),
        password: "wrong".into(),
        ..Default::default()
    };
    assert_eq!(
        pull(&d, &name, Some(bad)).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let good = cri::AuthConfig {
        username: "alice".into(),
        password: "s3cret".into(),
        ..Default::default()
    };
    assert_eq!(
        pull(&d, &name, Some(good)).await.unwrap(),
        img.config_digest
    );
    assert_store_clean(&d);
    drop(d);

    // Credentials from a docker config.json.
    use base64::Engine as _;
    let enc = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
    let mut opts = Options::plain_http(&reg.addr);
    opts.docker_config = Some(format!(
        "{{\"auths\":{{\"{}\":{{\"auth\":\"{enc}\"}}}}}}",
        reg.addr
    ));
    let d = Huskd::start(opts).await.unwrap();
    assert_eq!(pull(&d, &name, None).await.unwrap(), img.config_digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_by_tag_id_digest_frees_content_and_shared_layers_are_stored_once() {
    require!(env_ok(), NEEDS);
    let reg = Registry::start(None).unwrap();
    let p = Pusher::new(&reg.addr, None);
    let base = busybox_layer(Compression::Gzip).unwrap();
    let mk = |extra: &str| {
        build_image(&ImageSpec {
            layers: vec![
                base.clone(),
                Layer {
                    entries: vec![file("which", extra)],
                    compression: Compression::Gzip,
                },
            ],
            ..Default::default()
        })
    };
    let (a, b) = (mk("a"), mk("b"));
    p.push_image("a", Some("v1"), &a).await.unwrap();
    p.push_image("b", Some("v1"), &b).await.unwrap();
    let d = Huskd::start(Options::plain_http(&reg.addr)).await.unwrap();
    let snaps = d.images_dir().join("snapshots");
    let blobs = d.images_dir().join("blobs/sha256");
    let ia = pull(&d, &format!("{}/a:v1", reg.addr), None).await.unwrap();
    assert_eq!(count(&snaps), 2);
    pull(&d, &format!("{}/b:v1", reg.addr), None).await.unwrap();
    assert_eq!(count(&snaps), 3, "the shared busybox layer is stored once");
    assert_eq!(
        count(&blobs),
        3 + 2 + 2,
        "shared layer blob + 2 own layers, 2 configs, 2 manifests"
    );

    let mut c = d.clients().await.unwrap();
    // By tag: a's own layer, config and manifest go; the shared layer stays.
    c.image
        .remove_image(cri::RemoveImageRequest {
            image: spec(&format!("{}/a:v1", reg.addr)),
        })
        .await
        .unwrap();
    assert!(status(&d, &ia).await.image.is_none());
    assert_eq!(count(&snaps), 2);
    assert_eq!(count(&blobs), 4);
    // Removing again is fine (idempotent, as the CRI requires).
    c.image
        .remove_image(cri::RemoveImageRequest { image: spec(&ia) })
        .await
        .unwrap();
    // By digest, then everything is gone.
    c.image
        .remove_image(cri::RemoveImageRequest {
            image: spec(&format!("{}/b@{}", reg.addr, b.manifest_digest)),
        })
        .await
        .unwrap();
    assert!(list(&d).await.is_empty());
    assert_eq!((count(&snaps), count(&blobs)), (0, 0));
    // And by id.
    let ia = pull(&d, &format!("{}/a:v1", reg.addr), None).await.unwrap();
    c.image
        .remove_image(cri::RemoveImageRequest { image: spec(&ia) })
        .await
        .unwrap();
    assert!(list(&d).await.is_empty());
    let e = c
        .image
        .remove_image(cri::RemoveImageRequest { image: spec("") })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pulls_of_one_image_download_once() {
    require!(env_ok(), NEEDS);
    let reg = Registry::start(None).unwrap();
    let img = build_image(&ImageSpec {
        layers: vec![
            oci::random_layer(1, 8 << 20, 4, Compression::Gzip),
            busybox_layer(Compression::Gzip).unwrap(),
        ],
        ..Default::default()
    });
    Pusher::new(&reg.addr, None)
        .push_image("dedup", Some("v1"), &img)
        .await
        .unwrap();
    let d = Huskd::start(Options::plain_http(&reg.addr)).await.unwrap();
    let name = format!("{}/dedup:v1", reg.addr);
    // husk's progress stream (what `husk pull` draws its bars from).
    let mut c = d.clients().await.unwrap();
    let mut watch = c
        .husk
        .watch_pull(husk_proto::husk::WatchPullRequest {
            image: name.clone(),
            wait_ms: 5000,
        })
        .await
        .unwrap()
        .into_inner();
    let watcher = tokio::spawn(async move {
        let mut msgs = vec![];
        while let Some(m) = watch.message().await.unwrap() {
            msgs.push(m);
        }
        msgs
    });
    let mut tasks = vec![];
    for _ in 0..6 {
        let (n, s) = (name.clone(), d.socket.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = husk_host::client::Clients::connect(&s).await.unwrap();
            c.image
                .pull_image(cri::PullImageRequest {
                    image: spec(&n),
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().image_ref)
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), img.config_digest);
    }
    for l in &img.layers {
        assert_eq!(
            reg.blob_gets(&l.digest),
            1,
            "layer {} fetched once",
            l.digest
        );
    }
    assert_eq!(list(&d).await.len(), 1);
    let msgs = watcher.await.unwrap();
    let last = msgs.last().expect("progress messages");
    assert!(last.finished && last.error.is_empty(), "{last:?}");
    let digests: Vec<_> = last.layers.iter().map(|l| l.digest.clone()).collect();
    assert_eq!(
        digests,
        img.layers
            .iter()
            .map(|l| l.digest.clone())
            .collect::<Vec<_>>()
    );
    assert!(
        last.layers
            .iter()
            .all(|l| l.done == l.total && l.total > 0 && l.phase == "done"),
        "{last:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_references_and_missing_images() {
    require!(env_ok(), NEEDS);
    let reg = Registry::start(None).unwrap();
    let d = Huskd::start(Options::plain_http(&reg.addr)).await.unwrap();
    let e = pull(&d, "Busybox:latest", None).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("Busybox"),
        "names the bad part: {}",
        e.message()
    );
    let e = pull(&d, "busybox@sha256:1234", None).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("digest"), "{}", e.message());
    assert_eq!(
        pull(&d, "", None).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    // Unknown repository / tag on a live registry.
    let e = pull(&d, &format!("{}/nothere:v1", reg.addr), None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let img = build_image(&ImageSpec {
        layers: vec![Layer {
            entries: vec![file("x", "x")],
            compression: Compression::Gzip,
        }],
        ..Default::default()
    });
    Pusher::new(&reg.addr, None)
        .push_image("there", Some("v1"), &img)
        .await
        .unwrap();
    let e = pull(&d, &format!("{}/there:v2", reg.addr), None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    // Unreachable registry.
    let dead = format!("127.0.0.1:{}", husk_tests::free_port());
    let e = pull(&d, &format!("{dead}/x:v1"), None).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    // ImageStatus of an unknown image: no image, no error (CRI semantics).
    assert!(status(&d, "nothere:v9").await.image.is_none());
    assert!(list(&d).await.is_empty());
    assert_store_clean(&d);
    assert_eq!(count(&d.images_dir().join("blobs/sha256")), 0);
}

/// Pushes `layers` (prebuilt, maybe broken) as `repo:v1` and pulls it.
async fn pull_broken(
    reg: &Registry,
    d: &Huskd,
    repo: &str,
    layers: Vec<oci::BuiltLayer>,
) -> tonic::Status {
    let img = oci::build_image_from(layers, &ImageSpec::default());
    Pusher::new(&reg.addr, None)
        .push_image(repo, Some("v1"), &img)
        .await
        .unwrap();
    pull(d, &format!("{}/{repo}:v1", reg.addr), None)
        .await
        .unwrap_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_content_is_refused_and_nothing_is_left() {
    require!(env_ok(), NEEDS);
    let reg = Registry::start(None).unwrap();
    let d = Huskd::start(Options::plain_http(&reg.addr)).await.unwrap();
    let layer = || {
        oci::build_layer(&Layer {
            entries: vec![file("f", vec![b'x'; 100_000])],
            compression: Compression::Gzip,
        })
    };

    // Digest mismatch: the registry serves other bytes than the digest names.
    let img = build_image(&ImageSpec {
        layers: vec![Layer {
            entries: vec![file("f", vec![b'y'; 100_000])],
            compression: Compression::Gzip,
        }],
        ..Default::default()
    });
    Pusher::new(&reg.addr, None)
        .push_image("tampered", Some("v1"), &img)
        .await
        .unwrap();
    let f = reg.blob_file(&img.layers[0].digest);
    let mut data = std::fs::read(&f).unwrap();
    let n = data.len();
    data[n / 2] ^= 0xff;
    std::fs::write(&f, &data).unwrap();
    let e = pull(&d, &format!("{}/tampered:v1", reg.addr), None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");
    assert!(e.message().contains("digest mismatch"), "{}", e.message());

    // Truncated blob.
    std::fs::write(&f, &data[..n / 2]).unwrap();
    let e = pull(&d, &format!("{}/tampered:v1", reg.addr), None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");
    assert!(e.message().contains("truncated"), "{}", e.message());

    // Corrupt gzip whose blob digest is right (the registry verifies it).
    let mut bad = layer();
    let mut blob = bad.blob.clone();
    for b in blob.iter_mut().skip(20).take(200) {
        *b = 0x42;
    }
    bad.digest = oci::sha(&blob);
    bad.blob = blob;
    let e = pull_broken(&reg, &d, "badgzip", vec![bad]).await;
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");

    // A layer whose content does not match the config's diff id.
    let mut wrong = layer();
    wrong.diff_id = oci::sha(b"something else");
    let e = pull_broken(&reg, &d, "wrongdiff", vec![wrong]).await;
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");
    assert!(e.message().contains("diff id"), "{}", e.message());

    assert!(list(&d).await.is_empty());
    assert_store_clean(&d);
    assert_eq!(
        count(&d.images_dir().join("blobs/sha256")),
        0,
        "nothing left in the store"
    );
    assert_eq!(count(&d.images_dir().join("snapshots")), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malicious_layers_never_write_outside_the_snapshot() {
    require!(env_ok(), NEEDS);
    let reg = Registry::start(None).unwrap();
    let d = Huskd::start(Options::plain_http(&reg.addr)).await.unwrap();
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("pwned");

    let dotdot = oci::build_layer(&Layer {
        entries: vec![Entry::RawFile(
            b"../../../../../../tmp/husk-escape-test".to_vec(),
            b"bad".to_vec(),
        )],
        compression: Compression::Gzip,
    });
    let e = pull_broken(&reg, &d, "dotdot", vec![dotdot]).await;
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");
    assert!(e.message().contains(".."), "{}", e.message());
    assert!(!Path::new("/tmp/husk-escape-test").exists());

    let symlink = oci::build_layer(&Layer {
        entries: vec![
            Entry::Symlink("escape".into(), outside.path().display().to_string()),
            file("escape/pwned", "bad"),
        ],
        compression: Compression::Gzip,
    });
    let e = pull_broken(&reg, &d, "symlink", vec![symlink]).await;
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");
    assert!(!target.exists(), "wrote through an escaping symlink");

    // An absolute symlink is kept as data and resolves inside the rootfs only.
    let abs = oci::build_layer(&Layer {
        entries: vec![Entry::Symlink("etcpasswd".into(), "/etc/passwd".into())],
        compression: Compression::Gzip,
    });
    let img = oci::build_image_from(vec![abs], &ImageSpec::default());
    Pusher::new(&reg.addr, None)
        .push_image("abs", Some("v1"), &img)
        .await
        .unwrap();
    let id = pull(&d, &format!("{}/abs:v1", reg.addr), None)
        .await
        .unwrap();
    let snap = &lowers_of(&status(&d, &id).await)[0];
    assert_eq!(
        std::fs::read_link(snap.join("etcpasswd")).unwrap(),
        Path::new("/etc/passwd")
    );
    assert_store_clean(&d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_survives_restart_and_a_crash_mid_pull_leaves_no_half_image() {
    require!(env_ok(), NEEDS);
    let reg = Registry::start(None).unwrap();
    let p = Pusher::new(&reg.addr, None);
    let small = build_image(&ImageSpec {
        layers: vec![busybox_layer(Compression::Gzip).unwrap()],
        ..Default::default()
    });
    p.push_image("small", Some("v1"), &small).await.unwrap();
    let big = build_image(&ImageSpec {
        layers: (0..4)
            .map(|i| oci::random_layer(100 + i, 12 << 20, 24, Compression::Gzip))
            .collect(),
        ..Default::default()
    });
    p.push_image("big", Some("v1"), &big).await.unwrap();
    let mut d = Huskd::start(Options::plain_http(&reg.addr)).await.unwrap();
    pull(&d, &format!("{}/small:v1", reg.addr), None)
        .await
        .unwrap();

    d.crash_and_restart().await.unwrap();
    let images = list(&d).await;
    assert_eq!(images.len(), 1, "index survived kill -9");
    assert_eq!(images[0].id, small.config_digest);

    // Start a big pull and kill huskd in the middle of it.
    let (s, n) = (d.socket.clone(), format!("{}/big:v1", reg.addr));
    let task = tokio::spawn(async move {
        let mut c = husk_host::client::Clients::connect(&s).await.unwrap();
        c.image
            .pull_image(cri::PullImageRequest {
                image: spec(&n),
                ..Default::default()
            })
            .await
    });
    let ingest = d.images_dir().join("ingest");
    let snaps = d.images_dir().join("snapshots");
    let mut mid = false;
    for _ in 0..2000 {
        if count(&ingest) > 0
            || std::fs::read_dir(&snaps)
                .unwrap()
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
        {
            mid = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    assert!(mid, "pull never got under way");
    d.crash_and_restart().await.unwrap();
    assert!(task.await.unwrap().is_err(), "the interrupted pull failed");
    let images = list(&d).await;
    assert_eq!(images.len(), 1, "no half image visible: {images:?}");
    assert_store_clean(&d);
    // Only the small image's content remains.
    assert_eq!(count(&d.images_dir().join("blobs/sha256")), 3);
    // And the pull succeeds on a second try.
    assert_eq!(
        pull(&d, &format!("{}/big:v1", reg.addr), None)
            .await
            .unwrap(),
        big.config_digest
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huskd_lifecycle_and_the_husk_cli() {
    require!(env_ok(), NEEDS);
    let out = Command::new(husk_tests::bin_path("huskd"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("huskd "),
        "{out:?}"
    );
    let reg = Registry::start(None).unwrap();
    let img = build_image(&ImageSpec {
        layers: vec![busybox_layer(Compression::Gzip).unwrap()],
        ..Default::default()
    });
    Pusher::new(&reg.addr, None)
        .push_image("cli/bb", Some("v1"), &img)
        .await
        .unwrap();
    let mut d = Huskd::start(Options::plain_http(&reg.addr)).await.unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777,
        0o660
    );

    let husk = |args: &[&str]| {
        let out = Command::new(husk_tests::bin_path("husk"))
            .arg("--socket")
            .arg(&d.socket)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let name = format!("{}/cli/bb:v1", reg.addr);
    let (ok, out, err) = husk(&["pull", &name]);
    assert!(ok, "{out}{err}");
    assert!(out.contains(&img.config_digest), "{out}");
    let (ok, out, _) = husk(&["images"]);
    assert!(ok);
    assert!(
        out.starts_with("IMAGE")
            && out.contains(&format!("{}/cli/bb", reg.addr))
            && out.contains("v1"),
        "{out}"
    );
    let (ok, out, _) = husk(&["images", "-q"]);
    assert!(ok && out.trim() == img.config_digest);
    let (ok, out, _) = husk(&["inspecti", &name]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["status"]["id"], img.config_digest);
    let (ok, out, _) = husk(&["version"]);
    assert!(ok && out.contains("RuntimeName:  husk"), "{out}");
    let (ok, _, err) = husk(&["pull", "Bad//ref"]);
    assert!(!ok && err.contains("invalid"), "{err}");
    let (ok, out, _) = husk(&["rmi", &name]);
    assert!(ok && out.contains("Deleted"), "{out}");
    let (ok, _, err) = husk(&["rmi", &name]);
    assert!(!ok && err.contains("not found"), "{err}");

    // SIGTERM: clean exit, socket removed.
    let st = d.terminate().unwrap();
    assert!(st.success(), "{st:?}\n{}", d.log());
    assert!(!d.socket.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_registry_needs_its_ca_or_skip_verify() {
    require!(
        env_ok() && Path::new("/usr/bin/openssl").exists(),
        "needs openssl besides the image test tools"
    );
    let reg = Registry::start_with(None, true).unwrap();
    let img = build_image(&ImageSpec {
        layers: vec![Layer {
            entries: vec![file("tls", "yes")],
            compression: Compression::Gzip,
        }],
        ..Default::default()
    });
    Pusher::with_protocol(&reg.addr, None, true)
        .push_image("secure", Some("v1"), &img)
        .await
        .unwrap();
    let name = format!("{}/secure:v1", reg.addr);
    let https = |extra: &str| Options {
        hosts: vec![(
            reg.addr.clone(),
            format!("server = \"https://{}\"\n{extra}", reg.addr),
        )],
        docker_config: None,
    };

    // Unknown self-signed certificate: refused.
    let d = Huskd::start(https("")).await.unwrap();
    let e = pull(&d, &name, None).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(list(&d).await.is_empty());
    drop(d);
    // With its CA.
    let d = Huskd::start(https(&format!("ca = \"{}\"\n", reg.cert().display())))
        .await
        .unwrap();
    assert_eq!(pull(&d, &name, None).await.unwrap(), img.config_digest);
    drop(d);
    // With skip_verify.
    let d = Huskd::start(https("skip_verify = true\n")).await.unwrap();
    assert_eq!(pull(&d, &name, None).await.unwrap(), img.config_digest);
    // Plain HTTP is not tried against a TLS-only configuration.
    let d2 = Huskd::start(Options::plain_http(&reg.addr)).await.unwrap();
    assert!(pull(&d2, &name, None).await.is_err());
}
