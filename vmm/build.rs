//! Builds the bare-metal test guest (vmm/test-guest) with the host rustc, twice: with the PVH
//! ELF note and without it (64-bit Linux-boot-protocol entry). Tests and benches find them
//! through `HUSK_TEST_GUEST_PVH` / `HUSK_TEST_GUEST_64`.

use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Clone, Copy, PartialEq)]
enum Variant {
    Pvh,
    Elf64,
    BzImage,
}

fn build(out: &Path, src: &Path, variant: Variant) -> PathBuf {
    let pvh = variant == Variant::Pvh;
    let template = std::fs::read_to_string(src.join("link.ld")).expect("read link.ld");
    let text = match variant {
        Variant::BzImage => ". += 0x200; KEEP(*(.text.start64)) *(.text.entry) *(.text .text.*)",
        _ => "*(.text.entry) *(.text.start64) *(.text .text.*)",
    };
    let template = template.replace("TEXT_START", text);
    let script = if pvh {
        template
            .replace("PVH_NOTE", "note PT_NOTE;")
            .replace(
                "PVH_SECTION",
                ".note.pvh : { KEEP(*(.husk_pvh_note)) } :text :note",
            )
            .replace("PVH_DISCARD", "")
    } else {
        template
            .replace("PVH_NOTE", "")
            .replace("PVH_SECTION", "")
            .replace("PVH_DISCARD", "*(.husk_pvh_note)")
    };
    let name = match variant {
        Variant::Pvh => "guest-pvh",
        Variant::Elf64 => "guest-64",
        Variant::BzImage => "guest-bz",
    };
    let ld = out.join(format!("{name}.ld"));
    std::fs::write(&ld, script).expect("write linker script");
    let elf = out.join(format!("{name}.elf"));
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let status = Command::new(rustc)
        .args([
            "--edition",
            "2024",
            "--crate-type",
            "bin",
            "--crate-name",
            "husk_test_guest",
        ])
        .args([
            "-C",
            "panic=abort",
            "-C",
            "opt-level=s",
            "-C",
            "relocation-model=static",
        ])
        .args([
            "-C",
            "code-model=small",
            "-C",
            "debuginfo=0",
            "-C",
            "no-vectorize-loops",
            "-C",
            "no-vectorize-slp",
        ])
        .args([
            "-C",
            "target-cpu=x86-64",
            "-C",
            "target-feature=-sse,-sse2,-mmx,+soft-float",
        ])
        .args([
            "-C",
            "link-arg=-nostartfiles",
            "-C",
            "link-arg=-nostdlib",
            "-C",
            "link-arg=-static",
        ])
        .args([
            "-C",
            "link-arg=-no-pie",
            "-C",
            "link-arg=-Wl,--build-id=none",
        ])
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

/// Wraps the (single PT_LOAD) ELF's loaded bytes as a minimal bzImage: one setup sector with
/// the boot-protocol header, then the protected-mode image that loads at 1 MiB.
fn bzimage(elf: &[u8]) -> Vec<u8> {
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().expect("8 bytes"));
    let phoff = u64_at(32) as usize;
    let (off, filesz) = (u64_at(phoff + 8) as usize, u64_at(phoff + 32) as usize);
    let mut img = vec![0u8; 1024];
    img[0x1f1] = 1; // setup_sects
    img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020cu16.to_le_bytes()); // protocol 2.12
    img[0x211] = 0x01; // LOADED_HIGH
    img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    img[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes()); // kernel_alignment
    img[0x236..0x238].copy_from_slice(&1u16.to_le_bytes()); // XLF_KERNEL_64
    img.extend_from_slice(&elf[off..off + filesz]);
    img
}

fn main() {
    let src = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("manifest dir"))
        .join("test-guest");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("out dir"));
    println!("cargo:rerun-if-changed=test-guest");
    println!("cargo:rerun-if-changed=build.rs");
    let pvh = build(&out, &src, Variant::Pvh);
    let g64 = build(&out, &src, Variant::Elf64);
    let bz_elf = build(&out, &src, Variant::BzImage);
    let bz = out.join("guest.bzImage");
    std::fs::write(&bz, bzimage(&std::fs::read(&bz_elf).expect("read bz elf")))
        .expect("write bzImage");
    println!("cargo:rustc-env=HUSK_TEST_GUEST_PVH={}", pvh.display());
    println!("cargo:rustc-env=HUSK_TEST_GUEST_64={}", g64.display());
    println!("cargo:rustc-env=HUSK_TEST_GUEST_BZIMAGE={}", bz.display());
}
