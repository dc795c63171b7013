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

/// The guest kernel and initramfs a VM bench boots, when it can run here (root,
/// docker-registry, HUSK_GUEST_KERNEL / HUSK_GUEST_INITRD set); prints why not.
pub fn vm_guest() -> Option<(String, String)> {
    let (Ok(k), Ok(i)) = (
        std::env::var("HUSK_GUEST_KERNEL"),
        std::env::var("HUSK_GUEST_INITRD"),
    ) else {
        println!("skipped: HUSK_GUEST_KERNEL / HUSK_GUEST_INITRD not set");
        return None;
    };
    if !crate::is_root() || !crate::registry::available() {
        println!("skipped: needs root and docker-registry");
        return None;
    }
    Some((k, i))
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
