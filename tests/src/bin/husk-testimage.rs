//! Builds a test image with husk's own code and pushes it to a registry
//! (used by the demo and by hand): `husk-testimage busybox 127.0.0.1:5000 library/busybox:latest`.

use clap::Parser;
use husk_tests::oci::{Compression, ImageSpec, Pusher, build_image, busybox_layer};

#[derive(Parser)]
struct Args {
    /// Image kind: `busybox`.
    kind: String,
    /// Registry host:port (plain HTTP).
    registry: String,
    /// repository:tag
    target: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    anyhow::ensure!(a.kind == "busybox", "only `busybox` is known");
    let (repo, tag) = a.target.split_once(':').unwrap_or((&a.target, "latest"));
    let img = build_image(&ImageSpec {
        layers: vec![busybox_layer(Compression::Gzip)?],
        ..Default::default()
    });
    let d = Pusher::new(&a.registry, None)
        .push_image(repo, Some(tag), &img)
        .await?;
    println!("{}/{repo}:{tag}@{d}", a.registry);
    Ok(())
}
