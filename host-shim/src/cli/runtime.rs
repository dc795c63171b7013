//! `husk run | ps | pods | logs | exec | stop | rm`: pods and containers
//! through the CRI RuntimeService, crictl style.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use husk_proto::cri;
use tonic::Code;

use super::table::render;
use crate::client::Clients;
use crate::logfmt::parse_record;

pub struct RunOptions {
    pub image: String,
    pub cmd: Vec<String>,
    pub rm: bool,
    pub runtime: Option<String>,
    pub name: Option<String>,
    pub log_root: PathBuf,
}

fn short(id: &str) -> String {
    id.chars().take(13).collect()
}

fn ago(ns: i64) -> String {
    let now = now_ns();
    let s = (now - ns).max(0) / 1_000_000_000;
    match s {
        0..60 => format!("{s} seconds ago"),
        60..3600 => format!("{} minutes ago", s / 60),
        3600..86400 => format!("{} hours ago", s / 3600),
        _ => format!("{} days ago", s / 86400),
    }
}

/// Pulls `image` unless present.
pub(super) async fn ensure_image(c: &mut Clients, image: &str) -> anyhow::Result<()> {
    let spec = Some(cri::ImageSpec {
        image: image.into(),
        ..Default::default()
    });
    let st = c
        .image
        .image_status(cri::ImageStatusRequest {
            image: spec.clone(),
            verbose: false,
        })
        .await?
        .into_inner();
    if st.image.is_none() {
        eprintln!("pulling {image}");
        c.image
            .pull_image(cri::PullImageRequest {
                image: spec,
                auth: None,
                sandbox_config: None,
            })
            .await
            .map_err(|s| anyhow::anyhow!("pull {image}: {}", s.message()))?;
    }
    Ok(())
}

/// Runs IMAGE CMD in a fresh pod, streams its output, returns its exit code.
pub async fn run(c: &mut Clients, o: RunOptions) -> anyhow::Result<i32> {
    ensure_image(c, &o.image).await?;
    let suffix: String = hex::encode(rand::random::<[u8; 4]>());
    let name = o.name.clone().unwrap_or_else(|| format!("run-{suffix}"));
    let uid = format!("husk-run-{suffix}");
    let log_dir = o.log_root.join(format!("default_{name}_{uid}"));
    let config = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.clone(),
            uid: uid.clone(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.clone(),
        log_directory: log_dir.display().to_string(),
        ..Default::default()
    };
    let handler = o.runtime.clone().unwrap_or_default();
    let pod = match c
        .runtime
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.clone(),
        })
        .await
    {
        Ok(r) => r.into_inner().pod_sandbox_id,
        Err(s)
            if s.code() == Code::FailedPrecondition && o.runtime.as_deref() != Some("husk-ns") =>
        {
            bail!(
                "cannot start the pod: {}\nhint: another handler may work here: --runtime husk-qemu (a QEMU VM, TCG without KVM) \
                 or --runtime husk-ns (namespace sandbox, not a VM)",
                s.message()
            )
        }
        Err(s) => bail!("run pod sandbox: {}", s.message()),
    };
    let result = run_in_pod(c, &o, &pod, &name, config, &log_dir).await;
    if o.rm {
        let _ = c
            .runtime
            .stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await;
        let _ = c
            .runtime
            .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await;
        let _ = std::fs::remove_dir_all(&log_dir);
    } else {
        eprintln!("pod {pod}");
    }
    result
}

async fn run_in_pod(
    c: &mut Clients,
    o: &RunOptions,
    pod: &str,
    name: &str,
    sandbox_config: cri::PodSandboxConfig,
    log_dir: &Path,
) -> anyhow::Result<i32> {
    let ctr = c
        .runtime
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(cri::ContainerConfig {
                metadata: Some(cri::ContainerMetadata {
                    name: name.into(),
                    attempt: 0,
                }),
                image: Some(cri::ImageSpec {
                    image: o.image.clone(),
                    ..Default::default()
                }),
                command: o.cmd.clone(),
                log_path: format!("{name}.log"),
                ..Default::default()
            }),
            sandbox_config: Some(sandbox_config),
        })
        .await
        .map_err(|s| anyhow::anyhow!("create container: {}", s.message()))?
        .into_inner()
        .container_id;
    c.runtime
        .start_container(cri::StartContainerRequest {
            container_id: ctr.clone(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("start container: {}", s.message()))?;
    let log = log_dir.join(format!("{name}.log"));
    let st = follow(c, &ctr, &log, true).await?;
    if !o.rm {
        eprintln!("container {ctr}");
    }
    Ok(st.exit_code)
}

/// Prints a CRI log (content only, to stdout/stderr by stream); with
/// `follow`, until the container has exited. Returns the last status.
async fn follow(
    c: &mut Clients,
    id: &str,
    path: &Path,
    follow: bool,
) -> anyhow::Result<cri::ContainerStatus> {
    let mut pos = 0u64;
    let mut carry = String::new();
    loop {
        let st = status(c, id).await?;
        let done = st.state == cri::ContainerState::ContainerExited as i32 || !follow;
        pos = print_new(path, pos, &mut carry)?;
        if done {
            // One more read: the last lines may land just before the exit is recorded.
            print_new(path, pos, &mut carry)?;
            return Ok(st);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn print_new(path: &Path, pos: u64, carry: &mut String) -> anyhow::Result<u64> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(pos),
        Err(e) => return Err(e).with_context(|| format!("open {}", path.display())),
    };
    let len = f.metadata()?.len();
    let pos = if len < pos { 0 } else { pos }; // rotated
    f.seek(SeekFrom::Start(pos))?;
    let mut buf = String::new();
    f.read_to_string(&mut buf)?;
    carry.push_str(&buf);
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr().lock();
    while let Some(nl) = carry.find('\n') {
        let line: String = carry.drain(..=nl).collect();
        if let Some((stream, partial, content)) = parse_record(line.trim_end_matches('\n')) {
            let w: &mut dyn Write = if stream == "stderr" {
                &mut err
            } else {
                &mut out
            };
            let _ = w.write_all(content.as_bytes());
            if !partial {
                let _ = w.write_all(b"\n");
            }
        }
    }
    let _ = out.flush();
    Ok(pos + buf.len() as u64)
}

async fn status(c: &mut Clients, id: &str) -> anyhow::Result<cri::ContainerStatus> {
    c.runtime
        .container_status(cri::ContainerStatusRequest {
            container_id: id.into(),
            verbose: false,
        })
        .await
        .map_err(|s| anyhow::anyhow!("container {id}: {}", s.message()))?
        .into_inner()
        .status
        .context("no status")
}

/// The full id of a container named by an id prefix.
pub(crate) async fn container_id(c: &mut Clients, prefix: &str) -> anyhow::Result<Option<String>> {
    let l = c
        .runtime
        .list_containers(cri::ListContainersRequest {
            filter: Some(cri::ContainerFilter {
                id: prefix.into(),
                ..Default::default()
            }),
        })
        .await?
        .into_inner()
        .containers;
    unique(l.into_iter().map(|c| c.id), prefix)
}

/// The one id an id prefix matched: none, one, or an ambiguity error.
fn unique(mut ids: impl Iterator<Item = String>, prefix: &str) -> anyhow::Result<Option<String>> {
    match (ids.next(), ids.next()) {
        (None, _) => Ok(None),
        (Some(id), None) => Ok(Some(id)),
        _ => bail!("{prefix} is ambiguous"),
    }
}

pub(crate) async fn pod_id(c: &mut Clients, prefix: &str) -> anyhow::Result<Option<String>> {
    let l = c
        .runtime
        .list_pod_sandbox(cri::ListPodSandboxRequest {
            filter: Some(cri::PodSandboxFilter {
                id: prefix.into(),
                ..Default::default()
            }),
        })
        .await?
        .into_inner()
        .items;
    unique(l.into_iter().map(|p| p.id), prefix)
}

pub async fn ps(c: &mut Clients, all: bool, quiet: bool) -> anyhow::Result<()> {
    let filter = (!all).then(|| cri::ContainerFilter {
        state: Some(cri::ContainerStateValue {
            state: cri::ContainerState::ContainerRunning as i32,
        }),
        ..Default::default()
    });
    let l = c
        .runtime
        .list_containers(cri::ListContainersRequest { filter })
        .await?
        .into_inner()
        .containers;
    if quiet {
        l.iter().for_each(|x| println!("{}", x.id));
        return Ok(());
    }
    let rows: Vec<Vec<String>> = l
        .iter()
        .map(|x| {
            let md = x.metadata.clone().unwrap_or_default();
            let state = cri::ContainerState::try_from(x.state)
                .map(|s| s.as_str_name().trim_start_matches("CONTAINER_").to_string());
            vec![
                short(&x.id),
                x.image
                    .as_ref()
                    .map(|i| i.image.clone())
                    .unwrap_or_default(),
                ago(x.created_at),
                state.unwrap_or_default(),
                md.name,
                md.attempt.to_string(),
                short(&x.pod_sandbox_id),
            ]
        })
        .collect();
    print!(
        "{}",
        render(
            &[
                "CONTAINER",
                "IMAGE",
                "CREATED",
                "STATE",
                "NAME",
                "ATTEMPT",
                "POD ID"
            ],
            &rows
        )
    );
    Ok(())
}

pub async fn pods(c: &mut Clients, quiet: bool) -> anyhow::Result<()> {
    let l = c
        .runtime
        .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
        .await?
        .into_inner()
        .items;
    if quiet {
        l.iter().for_each(|x| println!("{}", x.id));
        return Ok(());
    }
    let rows: Vec<Vec<String>> = l
        .iter()
        .map(|x| {
            let md = x.metadata.clone().unwrap_or_default();
            let state = if x.state == cri::PodSandboxState::SandboxReady as i32 {
                "Ready"
            } else {
                "NotReady"
            };
            vec![
                short(&x.id),
                ago(x.created_at),
                state.into(),
                md.name,
                md.namespace,
                md.attempt.to_string(),
                x.runtime_handler.clone(),
            ]
        })
        .collect();
    print!(
        "{}",
        render(
            &[
                "POD ID",
                "CREATED",
                "STATE",
                "NAME",
                "NAMESPACE",
                "ATTEMPT",
                "RUNTIME"
            ],
            &rows
        )
    );
    Ok(())
}

pub async fn logs(c: &mut Clients, id: &str, follow_: bool) -> anyhow::Result<()> {
    let id = container_id(c, id)
        .await?
        .with_context(|| format!("no container {id}"))?;
    let st = status(c, &id).await?;
    if st.log_path.is_empty() {
        bail!("container {id} has no log path");
    }
    follow(c, &id, Path::new(&st.log_path), follow_).await?;
    Ok(())
}

pub async fn exec(
    c: &mut Clients,
    id: &str,
    cmd: Vec<String>,
    timeout: i64,
) -> anyhow::Result<i32> {
    let id = container_id(c, id)
        .await?
        .with_context(|| format!("no container {id}"))?;
    let r = c
        .runtime
        .exec_sync(cri::ExecSyncRequest {
            container_id: id,
            cmd,
            timeout,
        })
        .await
        .map_err(|s| anyhow::anyhow!("exec: {}", s.message()))?
        .into_inner();
    std::io::stdout().write_all(&r.stdout)?;
    std::io::stderr().write_all(&r.stderr)?;
    Ok(r.exit_code)
}

/// Stops containers or pods (by id prefix; containers first).
pub async fn stop(c: &mut Clients, ids: &[String], timeout: i64) -> anyhow::Result<()> {
    for id in ids {
        if let Some(cid) = container_id(c, id).await? {
            c.runtime
                .stop_container(cri::StopContainerRequest {
                    container_id: cid.clone(),
                    timeout,
                })
                .await
                .map_err(|s| anyhow::anyhow!("stop {cid}: {}", s.message()))?;
            println!("{cid}");
        } else if let Some(pid) = pod_id(c, id).await? {
            c.runtime
                .stop_pod_sandbox(cri::StopPodSandboxRequest {
                    pod_sandbox_id: pid.clone(),
                })
                .await
                .map_err(|s| anyhow::anyhow!("stop pod {pid}: {}", s.message()))?;
            println!("{pid}");
        } else {
            bail!("no container or pod {id}");
        }
    }
    Ok(())
}

/// Removes containers or pods (by id prefix; a pod is stopped first).
pub async fn rm(c: &mut Clients, ids: &[String]) -> anyhow::Result<()> {
    for id in ids {
        if let Some(cid) = container_id(c, id).await? {
            c.runtime
                .remove_container(cri::RemoveContainerRequest {
                    container_id: cid.clone(),
                })
                .await
                .map_err(|s| anyhow::anyhow!("remove {cid}: {}", s.message()))?;
            println!("{cid}");
        } else if let Some(pid) = pod_id(c, id).await? {
            c.runtime
                .stop_pod_sandbox(cri::StopPodSandboxRequest {
                    pod_sandbox_id: pid.clone(),
                })
                .await
                .map_err(|s| anyhow::anyhow!("stop pod {pid}: {}", s.message()))?;
            c.runtime
                .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                    pod_sandbox_id: pid.clone(),
                })
                .await
                .map_err(|s| anyhow::anyhow!("remove pod {pid}: {}", s.message()))?;
            println!("{pid}");
        } else {
            bail!("no container or pod {id}");
        }
    }
    Ok(())
}

/// Now, in nanoseconds since the epoch (the CRI's timestamps).
fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}
