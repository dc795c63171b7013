//! Builds the bare-metal test guest (vmm/test-guest) with the host rustc, twice: with the PVH
//! ELF note and without it (64-bit Linux-boot-protocol entry). Tests and benches find them
//! through `HUSK_TEST_GUEST_PVH` / `HUSK_TEST_GUEST_64`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn build(out: &Path, src: &Path, pvh: bool) -> PathBuf {
    let template = std::fs::read_to_string(src.join("link.ld")).expect("read link.ld");
    let script = if pvh {
        template
            .replace("PVH_NOTE", "note PT_NOTE;")
            .replace("PVH_SECTION", ".note.pvh : { KEEP(*(.husk_pvh_note)) } :text :note")
            .replace("PVH_DISCARD", "")
    } else {
        template.replace("PVH_NOTE", "").replace("PVH_SECTION", "").replace("PVH_DISCARD", "*(.husk_pvh_note)")
    };
    let name = if pvh { "guest-pvh" } else { "guest-64" };
    let ld = out.join(format!("{name}.ld"));
    std::fs::write(&ld, script).expect("write linker script");
    let elf = out.join(format!("{name}.elf"));
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let status = Command::new(rustc)
        .args(["--edition", "2024", "--crate-type", "bin", "--crate-name", "husk_test_guest"])
        .args(["-C", "panic=abort", "-C", "opt-level=s", "-C", "relocation-model=static"])
        .args(["-C", "code-model=small", "-C", "debuginfo=0", "-C", "no-vectorize-loops", "-C", "no-vectorize-slp"])
        .args(["-C", "target-cpu=x86-64", "-C", "target-feature=-sse,-sse2,-mmx,+soft-float"])
        .args(["-C", "link-arg=-nostartfiles", "-C", "link-arg=-nostdlib", "-C", "link-arg=-static"])
        .args(["-C", "link-arg=-no-pie", "-C", "link-arg=-Wl,--build-id=none"])
        .arg("-C")
        .arg(format!("link-arg=-Wl,-T,{}", ld.display()))
        .arg("-o")
        .arg(&elf)
        .arg(src.join("main.rs"))
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .expect("run rustc for the test guest");
    assert!(status.success(), "building the test guest failed");
    elf
}

fn main() {
    let src = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("manifest dir")).join("test-guest");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("out dir"));
    println!("cargo:rerun-if-changed=test-guest");
    println!("cargo:rerun-if-changed=build.rs");
    let pvh = build(&out, &src, true);
    let g64 = build(&out, &src, false);
    println!("cargo:rustc-env=HUSK_TEST_GUEST_PVH={}", pvh.display());
    println!("cargo:rustc-env=HUSK_TEST_GUEST_64={}", g64.display());
}
