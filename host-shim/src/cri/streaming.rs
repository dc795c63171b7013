//! Exec, Attach and PortForward: validate, register the request with the
//! streaming server, answer its one-time URL.

use husk_proto::cri;
use tonic::Status;

use super::Services;
use crate::streaming::{AttachParams, ExecParams, Pending};

fn streams_ok(
    stdin: bool,
    stdout: bool,
    stderr: bool,
    tty: bool,
    what: &str,
) -> Result<(), Status> {
    if !stdin && !stdout && !stderr {
        return Err(Status::invalid_argument(format!(
            "{what}: one of stdin, stdout and stderr must be set"
        )));
    }
    if tty && stderr {
        return Err(Status::invalid_argument(format!(
            "{what}: stderr cannot be set with tty (a terminal has one output stream)"
        )));
    }
    Ok(())
}

pub fn exec(s: &Services, r: cri::ExecRequest) -> Result<cri::ExecResponse, Status> {
    super::observe::ids("", &r.container_id);
    tracing::debug!(cmd = ?r.cmd, tty = r.tty, "Exec");
    if r.cmd.is_empty() {
        return Err(Status::invalid_argument("Exec: cmd is empty"));
    }
    streams_ok(r.stdin, r.stdout, r.stderr, r.tty, "Exec")?;
    let t = s.runtime.stream_target(&r.container_id)?;
    let url = s.streaming.url(Pending::Exec(ExecParams {
        container_id: t.container_id,
        cmd: r.cmd,
        tty: r.tty,
        stdin: r.stdin,
        stdout: r.stdout,
        stderr: r.stderr,
    }))?;
    Ok(cri::ExecResponse { url })
}

pub fn attach(s: &Services, r: cri::AttachRequest) -> Result<cri::AttachResponse, Status> {
    super::observe::ids("", &r.container_id);
    tracing::debug!(tty = r.tty, "Attach");
    streams_ok(r.stdin, r.stdout, r.stderr, r.tty, "Attach")?;
    let t = s.runtime.stream_target(&r.container_id)?;
    if r.stdin && !t.stdin {
        return Err(Status::failed_precondition(format!(
            "Attach: container {} was not created with stdin open",
            r.container_id
        )));
    }
    if r.tty && !t.tty {
        return Err(Status::failed_precondition(format!(
            "Attach: container {} has no tty",
            r.container_id
        )));
    }
    let url = s.streaming.url(Pending::Attach(AttachParams {
        container_id: t.container_id,
        tty: r.tty,
        stdin: r.stdin,
        stdout: r.stdout,
        stderr: r.stderr,
    }))?;
    Ok(cri::AttachResponse { url })
}

pub fn port_forward(
    s: &Services,
    r: cri::PortForwardRequest,
) -> Result<cri::PortForwardResponse, Status> {
    super::observe::ids(&r.pod_sandbox_id, "");
    tracing::debug!(ports = ?r.port, "PortForward");
    let mut ports = Vec::with_capacity(r.port.len());
    for p in &r.port {
        match u16::try_from(*p) {
            Ok(p) if p > 0 => ports.push(p),
            _ => {
                return Err(Status::invalid_argument(format!(
                    "PortForward: port {p} is out of range 1-65535"
                )));
            }
        }
    }
    let pod_id = s.runtime.port_forward_target(&r.pod_sandbox_id)?;
    let url = s.streaming.url(Pending::PortForward { pod_id, ports })?;
    Ok(cri::PortForwardResponse { url })
}
