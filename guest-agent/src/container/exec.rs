//! ExecProcess: a new process in a running container's namespaces and cgroup.

use std::sync::Arc;
use std::time::SystemTime;

use oci_spec::runtime::Process as OciProcess;

use super::{Process, Status, spawn, stdio};
use crate::agent::{Agent, validate_id};
use crate::error::{AgentError, Result};
use crate::runner::config::{ExecInit, InitConfig, InitMode, Ns, NsJoin};
use crate::sync::lock;

#[derive(Debug, Clone)]
pub struct ExecRequest {
    pub container_id: String,
    pub exec_id: String,
    pub process_json: Vec<u8>,
    pub stdin: bool,
    pub tty: bool,
}

/// The exec request's top-level keys over the container's process.
pub fn merge_process(base: Option<&OciProcess>, json: &[u8]) -> Result<OciProcess> {
    let bad = |e: serde_json::Error| AgentError::InvalidArgument(format!("oci process: {e}"));
    let overlay: serde_json::Value = serde_json::from_slice(json).map_err(bad)?;
    let serde_json::Value::Object(overlay) = overlay else {
        return Err(AgentError::InvalidArgument(
            "oci process: not a JSON object".into(),
        ));
    };
    let mut merged = match base.map(serde_json::to_value).transpose().map_err(bad)? {
        Some(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    merged.extend(overlay);
    serde_json::from_value(serde_json::Value::Object(merged)).map_err(bad)
}

/// RemoveProcess: forget an exited exec.
pub fn do_remove_process(agent: &Arc<Agent>, container_id: &str, exec_id: &str) -> Result<()> {
    if exec_id.is_empty() {
        return Err(AgentError::InvalidArgument(
            "exec_id is empty (use RemoveContainer)".into(),
        ));
    }
    let c = agent.container(container_id)?;
    let p = c.process(exec_id)?;
    if p.exited().is_none() {
        return Err(AgentError::FailedPrecondition(format!(
            "exec {exec_id} is still running"
        )));
    }
    lock(&c.inner).execs.remove(exec_id);
    Ok(())
}

pub async fn do_exec(agent: &Arc<Agent>, req: ExecRequest) -> Result<Arc<Process>> {
    validate_id("exec", &req.exec_id)?;
    let c = agent.container(&req.container_id)?;
    if c.status() != Status::Running {
        return Err(AgentError::FailedPrecondition(format!(
            "container {} is not running",
            c.id
        )));
    }
    let process = merge_process(c.spec.process().as_ref(), &req.process_json)?;
    super::create::validate_process(&process, c.spec.linux().as_ref())?;
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(AgentError::InvalidArgument("process.args is empty".into()));
    }
    let key = format!("{}/{}", c.id, req.exec_id);
    if lock(&c.inner).execs.contains_key(&req.exec_id) || !lock(&agent.busy).insert(key.clone()) {
        return Err(AgentError::AlreadyExists(format!(
            "exec {} in container {}",
            req.exec_id, c.id
        )));
    }
    let result = async {
        let mut join: Vec<NsJoin> = [Ns::Ipc, Ns::Uts, Ns::Net, Ns::Pid, Ns::Mnt]
            .into_iter()
            .map(|ns| NsJoin {
                ns,
                path: format!("/proc/{}/ns/{}", c.init.pid, ns.proc_name()).into(),
            })
            .collect();
        if c.spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().as_ref())
            .is_some_and(|n| {
                n.iter()
                    .any(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Cgroup)
            })
        {
            join.push(NsJoin {
                ns: Ns::Cgroup,
                path: format!("/proc/{}/ns/cgroup", c.init.pid).into(),
            });
        }
        let config = InitConfig {
            cgroup_procs: c.cgroup.procs_files(),
            join,
            unshare: Vec::new(),
            mode: InitMode::Exec(ExecInit {
                process,
                linux: c.spec.linux().clone(),
                tty: req.tty,
            }),
        };
        let (child, io) = stdio::make(req.stdin, req.tty)?;
        let mut spawned = spawn::spawn(&agent.exe, &agent.reaper, &config, child, false).await?;
        let io = match io.finish().await {
            Ok(io) => io,
            Err(e) => {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(spawned.pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                return Err(e.into());
            }
        };
        spawned.sync.wait_exec().await?;
        let p = Arc::new(Process::new(
            req.exec_id.clone(),
            spawned.pid,
            io,
            spawned.exit,
        ));
        *lock(&p.started_at) = Some(SystemTime::now());
        Ok::<_, AgentError>(p)
    }
    .await;
    if let Ok(p) = &result {
        lock(&c.inner).execs.insert(req.exec_id.clone(), p.clone());
        tracing::info!(container = %c.id, exec = %req.exec_id, pid = p.pid, "exec started");
    }
    lock(&agent.busy).remove(&key);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_process_inherits_unset_keys() {
        let base: OciProcess = serde_json::from_value(serde_json::json!({
            "args": ["sleep", "1"], "env": ["A=1"], "cwd": "/srv", "user": {"uid": 7, "gid": 8},
            "noNewPrivileges": true
        }))
        .expect("base");
        let p = merge_process(Some(&base), br#"{"args": ["ls"], "env": ["B=2"]}"#).expect("merge");
        assert_eq!(p.args().as_deref(), Some(&["ls".to_string()][..]));
        assert_eq!(p.env().as_deref(), Some(&["B=2".to_string()][..]));
        assert_eq!(p.cwd(), std::path::Path::new("/srv"));
        assert_eq!((p.user().uid(), p.user().gid()), (7, 8));
        assert_eq!(p.no_new_privileges(), Some(true));
        assert!(matches!(
            merge_process(Some(&base), b"[1]"),
            Err(AgentError::InvalidArgument(_))
        ));
        assert!(matches!(
            merge_process(None, br#"{"args": 5}"#),
            Err(AgentError::InvalidArgument(_))
        ));
    }
}
