//! ExecProcess: a new process in a running container's namespaces and cgroup.

use std::sync::Arc;
use std::time::SystemTime;

use oci_spec::runtime::Process as OciProcess;

use super::{Process, Status, spawn, stdio};
use crate::agent::{Agent, AgentError, Result, lock, validate_id};
use crate::runner::config::{ExecInit, InitConfig, InitMode, Ns, NsJoin};

#[derive(Debug, Clone)]
pub struct ExecRequest {
    pub container_id: String,
    pub exec_id: String,
    pub process_json: Vec<u8>,
    pub stdin: bool,
    pub tty: bool,
}

pub async fn do_exec(agent: &Arc<Agent>, req: ExecRequest) -> Result<Arc<Process>> {
    validate_id("exec", &req.exec_id)?;
    let c = agent.container(&req.container_id)?;
    if c.status() != Status::Running {
        return Err(AgentError::FailedPrecondition(format!("container {} is not running", c.id)));
    }
    let process: OciProcess = serde_json::from_slice(&req.process_json)
        .map_err(|e| AgentError::InvalidArgument(format!("oci process: {e}")))?;
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(AgentError::InvalidArgument("process.args is empty".into()));
    }
    let key = format!("{}/{}", c.id, req.exec_id);
    if lock(&c.inner).execs.contains_key(&req.exec_id) || !lock(&agent.busy).insert(key.clone()) {
        return Err(AgentError::AlreadyExists(format!("exec {} in container {}", req.exec_id, c.id)));
    }
    let result = async {
        let mut join: Vec<NsJoin> = [Ns::Ipc, Ns::Uts, Ns::Net, Ns::Pid, Ns::Mnt]
            .into_iter()
            .map(|ns| NsJoin { ns, path: format!("/proc/{}/ns/{}", c.init.pid, ns.proc_name()).into() })
            .collect();
        if c.spec.linux().as_ref().and_then(|l| l.namespaces().as_ref()).is_some_and(|n| {
            n.iter().any(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Cgroup)
        }) {
            join.push(NsJoin { ns: Ns::Cgroup, path: format!("/proc/{}/ns/cgroup", c.init.pid).into() });
        }
        let config = InitConfig {
            cgroup_procs: c.cgroup.procs_files(),
            join,
            unshare: Vec::new(),
            mode: InitMode::Exec(ExecInit { process, linux: c.spec.linux().clone(), tty: req.tty }),
        };
        let (child, io) = stdio::make(req.stdin, req.tty)?;
        let mut spawned = spawn::spawn(&agent.exe, &agent.reaper, &config, child, false).await?;
        spawned.sync.wait_exec().await?;
        let p = Arc::new(Process::new(req.exec_id.clone(), spawned.pid, io, spawned.exit));
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
