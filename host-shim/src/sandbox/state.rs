//! Persisted records and the explicit state machines of pods and containers.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::HandlerKind;

/// Pod sandbox lifecycle: `Creating → Ready → NotReady`, or `Creating →
/// NotReady` when the start failed half way (recovery then cleans it up).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PodState {
    Creating,
    Ready,
    NotReady,
}

impl PodState {
    pub fn can_become(self, to: PodState) -> bool {
        use PodState::*;
        matches!(
            (self, to),
            (Creating, Ready) | (Creating, NotReady) | (Ready, NotReady) | (NotReady, NotReady)
        )
    }
}

/// Container lifecycle: `Created → Running → Exited`, `Created → Exited`
/// (the sandbox went away before the start). `Unknown` is only set when the
/// agent lost a container huskd still had a record of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContainerState {
    Created,
    Running,
    Exited,
    Unknown,
}

impl ContainerState {
    pub fn can_become(self, to: ContainerState) -> bool {
        use ContainerState::*;
        matches!(
            (self, to),
            (Created, Running)
                | (Created, Exited)
                | (Running, Exited)
                | (Created, Unknown)
                | (Running, Unknown)
                | (Unknown, Exited)
        )
    }
}

/// How to find a pod's agent process again (after a huskd restart).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentProcess {
    /// Host pid of the process huskd started (`unshare` for husk-ns).
    pub pid: i32,
    /// Its start time (clock ticks since boot, /proc/PID/stat field 22): guards against pid reuse.
    pub start_time: u64,
    /// The agent's ttrpc socket (husk-ns), or the VM's hybrid-vsock socket.
    pub socket: PathBuf,
    /// VM sandbox: the VMM's helper processes and run dir.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmProcess>,
}

/// A process found again by pid and start time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcRef {
    pub pid: i32,
    pub start_time: u64,
}

/// What a VM pod runs besides the VMM (`AgentProcess::pid`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmProcess {
    /// `Vm` (husk-vmm) or `Qemu`.
    pub backend: HandlerKind,
    /// E.g. the vhost-user vsock server QEMU uses.
    pub helpers: Vec<ProcRef>,
    /// Run dir: console.log, the VMM's control/QMP socket, vhost-user sockets.
    pub dir: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodRecord {
    pub id: String,
    pub handler: String,
    pub kind: HandlerKind,
    pub state: PodState,
    /// Unix nanoseconds.
    pub created_at: i64,
    /// The CRI PodSandboxConfig, protobuf-encoded.
    #[serde(with = "b64")]
    pub config: Vec<u8>,
    /// Relative to the cgroup root.
    pub cgroup_parent: String,
    /// huskd chose `cgroup_parent` (and removes it); else the CRI gave it.
    #[serde(default)]
    pub owns_cgroup: bool,
    pub agent: Option<AgentProcess>,
    /// Why the pod is NotReady ("" when stopped on request).
    #[serde(default)]
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub id: String,
    pub pod_id: String,
    /// The CRI ContainerConfig, protobuf-encoded.
    #[serde(with = "b64")]
    pub config: Vec<u8>,
    /// Image id (`sha256:<config digest>`) and the reference it was resolved from.
    pub image_id: String,
    pub image_ref: String,
    pub state: ContainerState,
    pub created_at: i64,
    pub started_at: i64,
    pub finished_at: i64,
    pub exit_code: i32,
    pub reason: String,
    pub message: String,
    /// Absolute log path (log_directory/log_path), if the CRI asked for one.
    pub log_path: Option<PathBuf>,
    /// Current LinuxContainerResources, protobuf-encoded.
    #[serde(with = "b64")]
    pub resources: Vec<u8>,
    /// Host-visible pid reported by the agent (0 if unknown).
    pub pid: u32,
    /// The image's StopSignal (0 = SIGTERM).
    #[serde(default)]
    pub stop_signal: i32,
}

impl ContainerRecord {
    /// Moves to `to` if the transition is legal; returns whether it moved.
    pub fn transition(&mut self, to: ContainerState) -> bool {
        if self.state.can_become(to) {
            self.state = to;
            true
        } else {
            false
        }
    }

    /// Marks the container exited (once). `finished_at` may come from a guest's clock
    /// (skewed, or hostile): it is kept between the container's start (or creation) and
    /// now, so a CRI client never sees an exit before the start.
    pub fn exited(&mut self, code: i32, finished_at: i64, reason: &str, message: &str) -> bool {
        if !self.transition(ContainerState::Exited) {
            return false;
        }
        let earliest = self.started_at.max(self.created_at);
        self.exit_code = code;
        self.finished_at = finished_at.min(now_ns()).max(earliest);
        self.reason = reason.into();
        self.message = message.into();
        true
    }
}

mod b64 {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}

pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// A fresh 64-hex id, like containerd's.
pub fn new_id() -> String {
    let a: [u8; 32] = rand::random();
    hex::encode(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legal_transitions_only() {
        use ContainerState::*;
        assert!(Created.can_become(Running));
        assert!(Running.can_become(Exited));
        assert!(!Exited.can_become(Running));
        assert!(!Running.can_become(Created));
        assert!(!Exited.can_become(Exited));
        assert!(PodState::Ready.can_become(PodState::NotReady));
        assert!(!PodState::NotReady.can_become(PodState::Ready));
    }

    fn back_to_running(r: &ContainerRecord) -> ContainerRecord {
        let mut r = r.clone();
        r.state = ContainerState::Running;
        r
    }

    #[test]
    fn exit_recorded_once() {
        let mut r = ContainerRecord {
            id: "c".into(),
            pod_id: "p".into(),
            config: vec![1, 2, 255],
            image_id: String::new(),
            image_ref: String::new(),
            state: ContainerState::Running,
            created_at: 1,
            started_at: 2,
            finished_at: 0,
            exit_code: 0,
            reason: String::new(),
            message: String::new(),
            log_path: None,
            resources: vec![],
            pid: 0,
            stop_signal: 0,
        };
        assert!(r.exited(3, 5, "Error", ""));
        assert!(!r.exited(137, 6, "Killed", ""));
        assert_eq!((r.exit_code, r.finished_at), (3, 5));
        // A guest clock behind the host's: the exit is not before the start.
        let mut skewed = back_to_running(&r);
        skewed.started_at = now_ns();
        assert!(skewed.exited(0, 7, "Completed", ""));
        assert_eq!(skewed.finished_at, skewed.started_at);
        let mut ahead = back_to_running(&r);
        assert!(ahead.exited(0, i64::MAX, "Completed", ""));
        assert!(ahead.finished_at <= now_ns());
        let back: ContainerRecord =
            serde_json::from_str(&serde_json::to_string(&r).unwrap_or_default()).expect("json");
        assert_eq!(back.config, vec![1, 2, 255]);
    }
}
