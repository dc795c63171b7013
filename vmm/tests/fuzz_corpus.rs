//! Replays every file of the fuzz corpora (`vmm/fuzz/corpus/<target>/`) through the same entry
//! points the cargo-fuzz targets use, on stable: each seed and each input a fuzzing run kept
//! (crash reproducers included) stays a regression test. docs/fuzzing.md says how to fuzz.

use std::path::PathBuf;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "corpus {} is empty", dir.display());
    for f in &files {
        let data = std::fs::read(f).expect("corpus file");
        eprintln!("{target}: {}", f.display());
        run(&data);
    }
    eprintln!("{target}: {} inputs replayed", files.len());
}

#[test]
fn virtio_vsock_corpus() {
    replay("virtio_vsock", husk_vmm::fuzzing::virtio_vsock);
}

#[test]
fn vsock_muxer_corpus() {
    replay("vsock_muxer", husk_vmm::fuzzing::vsock_muxer);
}

#[test]
fn virtio_blk_corpus() {
    replay("virtio_blk", husk_vmm::fuzzing::virtio_blk);
}

#[test]
fn virtio_net_corpus() {
    replay("virtio_net", husk_vmm::fuzzing::virtio_net);
}

#[test]
fn virtio_fs_corpus() {
    replay("virtio_fs", husk_vmm::fuzzing::virtio_fs);
}

#[test]
fn fuse_server_corpus() {
    replay("fuse_server", husk_vmm::fuzzing::fuse_server);
}

/// Inputs of earlier findings (`fuzz/known/<target>/`, listed in SPECIFICATION.md's fuzzing
/// table): the vsock muxer's control queue grew without bound while the guest posted no RX
/// buffers, until the muxer's queue limits (`MAX_CTRL_RX`, `MAX_CONNECTIONS`).
#[test]
fn known_findings_stay_fixed() {
    // vsock_muxer: the unbounded control queue (MAX_CTRL_RX). virtio_blk: a harness false
    // positive (a writable buffer the guest aimed at its own used ring), kept so the
    // harness's raw mode goes on telling the guest's doing from the device's.
    type Target = fn(&[u8]);
    let targets: [(&str, Target); 2] = [
        ("vsock_muxer", husk_vmm::fuzzing::vsock_muxer),
        ("virtio_blk", husk_vmm::fuzzing::virtio_blk),
    ];
    for (target, run) in targets {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/known")
            .join(target);
        for e in std::fs::read_dir(dir).expect("known") {
            let data = std::fs::read(e.expect("entry").path()).expect("read");
            run(&data);
        }
    }
}
