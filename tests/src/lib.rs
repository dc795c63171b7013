//! Harness for husk's end-to-end tests: a real `docker-registry` on
//! loopback, test images built and pushed by our own code, and a real
//! huskd process driven through the CRI client.

pub mod bench;
pub mod conformance;
pub mod containerd;
pub mod cri_env;
pub mod huskd;
pub mod nested;
pub mod oci;
pub mod registry;
pub mod runtime;

use std::path::PathBuf;

/// Path of a workspace binary (`cargo build --workspace --bins` first).
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> or target/<profile>/<bin>
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not found: run `cargo build --workspace --bins` before the tests",
        p.display()
    );
    p
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A free loopback TCP port.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Skips (with the reason printed) unless `cond` holds.
#[macro_export]
macro_rules! require {
    ($cond:expr, $why:expr) => {
        if !$cond {
            $crate::skipped(&$why);
            return;
        }
    };
}

/// Says that the running test did not run and why: on stderr, and as a line (`test: why`) in
/// the file `HUSK_SKIP_LOG` names, which tests/run.sh lists at the end as not run (libtest
/// counts a test that returned early as passed, and hides its output).
pub fn skipped(why: &dyn std::fmt::Display) {
    eprintln!("skipped: {why}");
    if let Some(path) = std::env::var_os("HUSK_SKIP_LOG") {
        use std::io::Write;
        let test = std::thread::current().name().unwrap_or("?").to_string();
        let exe = std::env::current_exe().ok();
        let bin = exe
            .as_ref()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let bin = bin
            .rsplit_once('-')
            .map_or(bin.as_str(), |(b, _)| b)
            .to_string();
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{bin}::{test}: {why}");
        }
    }
}
