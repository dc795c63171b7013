//! Small helpers shared by the benchmarks (husk vs containerd).

use std::path::Path;

/// True when a husk-vs-containerd bench can run here; prints why not.
pub fn baseline_ready() -> bool {
    let ok = crate::is_root()
        && crate::registry::available()
        && Path::new("/usr/bin/containerd").exists();
    if !ok {
        println!(
            "skipped: needs root, docker-registry and containerd + runc (tests/run.sh installs them)"
        );
    }
    ok
}

/// A count from the environment, or `default`.
pub fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The median (upper median for even counts); 0 for no samples.
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}
