//! Replays every file of the fuzz corpora (`host-shim/fuzz/corpus/<target>/`) through the same
//! entry points the cargo-fuzz targets use, on stable: each seed and each input a fuzzing run
//! kept (crash reproducers included) stays a regression test. docs/fuzzing.md says how to
//! fuzz; `write_seed_corpora` (ignored) regenerates the seeds from real encoders.

use std::path::PathBuf;

use husk_host::fuzzing;

fn corpus(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

fn replay(target: &str, run: fn(&[u8])) {
    let dir = corpus(target);
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

macro_rules! replay_tests {
    ($($name:ident => $target:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                replay(stringify!($target), fuzzing::$target);
            }
        )*
    };
}

replay_tests! {
    spdy_frames_corpus => spdy_frames,
    spdy_headers_corpus => spdy_headers,
    spdy_conn_corpus => spdy_conn,
    websocket_corpus => websocket,
    line_readers_corpus => line_readers,
    tar_layer_corpus => tar_layer,
    manifest_corpus => manifest,
    hosts_toml_corpus => hosts_toml,
    cri_oci_corpus => cri_oci,
    agent_replies_corpus => agent_replies,
}

#[path = "fuzz_seeds/mod.rs"]
mod seeds;

#[test]
#[ignore = "writes the seed corpora: cargo test -p husk-host --test fuzz_corpus -- --ignored"]
fn write_seed_corpora() {
    seeds::write_all(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus"));
}
