//! What the host offers VM pods, for both backends: hardware virtualisation, a /dev/kvm
//! that opens, the binaries.

use std::path::{Path, PathBuf};

/// The CPU has hardware virtualisation (vmx or svm).
pub fn hw_virt() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| {
            c.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false)
}

pub fn kvm_opens() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// A binary by path or on $PATH.
pub fn find_binary(b: &Path) -> Option<PathBuf> {
    if b.components().count() > 1 {
        return b.is_file().then(|| b.to_path_buf());
    }
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(b))
            .find(|c| c.is_file())
    })
}
