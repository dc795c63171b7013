//! Live pull progress, per image reference, for `husk pull`'s bars.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Waiting,
    Downloading,
    Unpacking,
    Done,
    /// Already in the store.
    Exists,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Waiting => "waiting",
            Phase::Downloading => "downloading",
            Phase::Unpacking => "unpacking",
            Phase::Done => "done",
            Phase::Exists => "exists",
        }
    }
}

#[derive(Debug, Clone)]
pub struct LayerState {
    pub digest: String,
    pub total: u64,
    pub done: u64,
    pub phase: Phase,
}

#[derive(Debug, Clone, Default)]
pub struct PullState {
    pub layers: Vec<LayerState>,
    pub finished: bool,
    pub error: Option<String>,
}

/// The writer side, held by the pull.
#[derive(Clone)]
pub struct Tracker {
    tx: watch::Sender<PullState>,
}

impl Tracker {
    /// A tracker nobody watches (e.g. in tests).
    pub fn detached() -> Self {
        Self {
            tx: watch::channel(PullState::default()).0,
        }
    }

    pub fn set_layers(&self, layers: impl IntoIterator<Item = (String, u64)>) {
        self.tx.send_modify(|s| {
            s.layers = layers
                .into_iter()
                .map(|(digest, total)| LayerState {
                    digest,
                    total,
                    done: 0,
                    phase: Phase::Waiting,
                })
                .collect();
        });
    }

    pub fn update(&self, digest: &str, phase: Phase, done: Option<u64>) {
        self.tx.send_if_modified(|s| {
            let Some(l) = s.layers.iter_mut().find(|l| l.digest == digest) else {
                return false;
            };
            l.phase = phase;
            if let Some(d) = done {
                l.done = d;
            }
            if matches!(phase, Phase::Done | Phase::Exists) {
                l.done = l.total;
            }
            true
        });
    }

    pub fn finish(&self, error: Option<String>) {
        self.tx.send_modify(|s| {
            s.finished = true;
            s.error = error;
        });
    }
}

/// In-flight pulls by normalized reference.
#[derive(Default)]
pub struct Registry {
    pulls: Mutex<HashMap<String, watch::Receiver<PullState>>>,
}

impl Registry {
    pub fn start(&self, key: &str) -> Tracker {
        let (tx, rx) = watch::channel(PullState::default());
        self.pulls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_string(), rx);
        Tracker { tx }
    }

    pub fn end(&self, key: &str) {
        self.pulls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    pub fn watch(&self, key: &str) -> Option<watch::Receiver<PullState>> {
        self.pulls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }
}
