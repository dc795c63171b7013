//! `husk pull | images | rmi | inspecti`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use husk_proto::cri;
use husk_proto::husk::WatchPullRequest;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use super::table::{human_size, render};
use crate::client::Clients;

fn spec(image: &str) -> Option<cri::ImageSpec> {
    Some(cri::ImageSpec {
        image: image.to_string(),
        ..Default::default()
    })
}

fn short_id(id: &str) -> String {
    id.strip_prefix("sha256:")
        .unwrap_or(id)
        .chars()
        .take(13)
        .collect()
}

/// Pulls with one progress bar per layer and a total bytes/s line.
pub async fn pull(
    c: &mut Clients,
    image: &str,
    creds: Option<&str>,
    quiet: bool,
) -> anyhow::Result<()> {
    let auth = match creds {
        Some(s) => {
            let (u, p) = s.split_once(':').context("--creds must be USER:PASSWORD")?;
            Some(cri::AuthConfig {
                username: u.into(),
                password: p.into(),
                ..Default::default()
            })
        }
        None => None,
    };
    let req = cri::PullImageRequest {
        image: spec(image),
        auth,
        sandbox_config: None,
    };
    let mut image_client = c.image.clone();
    let pull = tokio::spawn(async move { image_client.pull_image(req).await });
    if !quiet && let Err(e) = show_progress(c, image).await {
        tracing::debug!(error = %e, "progress stream ended");
    }
    let resp = pull
        .await
        .context("pull task")?
        .map_err(|s| anyhow::anyhow!("pull {image}: {}", s.message()))?;
    println!("Image is up to date for {}", resp.into_inner().image_ref);
    Ok(())
}

async fn show_progress(c: &mut Clients, image: &str) -> anyhow::Result<()> {
    let mut stream = c
        .husk
        .watch_pull(WatchPullRequest {
            image: image.to_string(),
            wait_ms: 3000,
        })
        .await?
        .into_inner();
    let multi = MultiProgress::new();
    let style =
        ProgressStyle::with_template("{prefix:>14} {msg:12} [{bar:30}] {bytes}/{total_bytes}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
    let total_bar = multi.add(ProgressBar::new_spinner());
    let mut bars: HashMap<String, ProgressBar> = HashMap::new();
    let start = Instant::now();
    while let Some(p) = stream.message().await? {
        let mut done = 0u64;
        for l in &p.layers {
            let bar = bars.entry(l.digest.clone()).or_insert_with(|| {
                let b = multi.insert_before(&total_bar, ProgressBar::new(l.total));
                b.set_style(style.clone());
                b.set_prefix(short_id(&l.digest));
                b
            });
            bar.set_position(l.done);
            bar.set_message(l.phase.clone());
            done += l.done;
        }
        let secs = start.elapsed().as_secs_f64().max(0.001);
        total_bar.set_message(format!(
            "total {} at {}/s",
            human_size(done),
            human_size((done as f64 / secs) as u64)
        ));
        if p.finished {
            for b in bars.values() {
                b.finish();
            }
            total_bar.finish();
            if !p.error.is_empty() {
                bail!("{}", p.error);
            }
            break;
        }
    }
    Ok(())
}

pub async fn images(
    c: &mut Clients,
    filter: Option<&str>,
    quiet: bool,
    json: bool,
) -> anyhow::Result<()> {
    let filter = filter.map(|f| cri::ImageFilter { image: spec(f) });
    let resp = c
        .image
        .list_images(cri::ListImagesRequest { filter })
        .await?
        .into_inner();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "images": resp.images }))?
        );
        return Ok(());
    }
    if quiet {
        for i in &resp.images {
            println!("{}", i.id);
        }
        return Ok(());
    }
    let mut rows = Vec::new();
    for i in &resp.images {
        let id = short_id(&i.id);
        let size = human_size(i.size);
        if i.repo_tags.is_empty() {
            rows.push(vec![
                "<none>".into(),
                "<none>".into(),
                id.clone(),
                size.clone(),
            ]);
        }
        for t in &i.repo_tags {
            let (name, tag) = t.rsplit_once(':').unwrap_or((t, "<none>"));
            rows.push(vec![name.into(), tag.into(), id.clone(), size.clone()]);
        }
    }
    print!("{}", render(&["IMAGE", "TAG", "IMAGE ID", "SIZE"], &rows));
    Ok(())
}

pub async fn rmi(c: &mut Clients, images: &[String]) -> anyhow::Result<()> {
    let mut failed = false;
    for image in images {
        let st = c
            .image
            .image_status(cri::ImageStatusRequest {
                image: spec(image),
                verbose: false,
            })
            .await?
            .into_inner();
        let Some(img) = st.image else {
            eprintln!("error: image {image:?} not found");
            failed = true;
            continue;
        };
        c.image
            .remove_image(cri::RemoveImageRequest {
                image: spec(&img.id),
            })
            .await?;
        for t in &img.repo_tags {
            println!("Deleted: {t}");
        }
        if img.repo_tags.is_empty() {
            println!("Deleted: {}", img.id);
        }
    }
    if failed {
        bail!("some images were not removed");
    }
    Ok(())
}

pub async fn inspecti(c: &mut Clients, image: &str) -> anyhow::Result<()> {
    let st = c
        .image
        .image_status(cri::ImageStatusRequest {
            image: spec(image),
            verbose: true,
        })
        .await?
        .into_inner();
    let Some(img) = st.image else {
        bail!("image {image:?} not found")
    };
    let info: serde_json::Value = st
        .info
        .get("info")
        .map(|s| serde_json::from_str(s))
        .transpose()
        .context("verbose info is not JSON")?
        .unwrap_or(serde_json::Value::Null);
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({ "status": img, "info": info }))?
    );
    Ok(())
}

/// Waits up to `timeout` for huskd's socket to answer.
pub async fn wait_ready(path: &std::path::Path, timeout: Duration) -> anyhow::Result<Clients> {
    let deadline = Instant::now() + timeout;
    loop {
        match Clients::connect(path).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() >= deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}
