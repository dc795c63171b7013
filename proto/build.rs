//! Generates the wire code: husk.proto with tonic (needs `protoc`), agent.proto
//! with ttrpc-codegen (pure Rust). Output stays in OUT_DIR.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=protos");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));

    if std::env::var_os("CARGO_FEATURE_CRI").is_some() {
        tonic_prost_build::configure()
            .compile_protos(&["protos/husk.proto"], &["protos"])
            .expect("compile husk.proto (is protoc installed? apt-get install protobuf-compiler)");
    }

    if std::env::var_os("CARGO_FEATURE_AGENT").is_some() {
        let dir = out.join("ttrpc");
        std::fs::create_dir_all(&dir).expect("create ttrpc out dir");
        ttrpc_codegen::Codegen::new()
            .out_dir(&dir)
            .inputs(["protos/agent.proto"])
            .include("protos")
            .rust_protobuf()
            .customize(ttrpc_codegen::Customize {
                async_all: true,
                ..Default::default()
            })
            .rust_protobuf_customize(ttrpc_codegen::ProtobufCustomize::default().gen_mod_rs(false))
            .run()
            .expect("ttrpc codegen for agent.proto");
        std::fs::write(dir.join("mod.rs"), "pub mod agent;\npub mod agent_ttrpc;\n")
            .expect("write ttrpc mod.rs");
    }
}
