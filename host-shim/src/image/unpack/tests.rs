#![allow(clippy::unwrap_used)]

use std::os::unix::fs::{FileTypeExt, MetadataExt};

use super::*;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("skipped: needs root (chown, mknod, trusted xattrs)");
            return;
        }
    };
}

/// A header with a raw (unvalidated) name, so tests can write `..` paths.
fn raw_header(name: &[u8], kind: EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_600_000_000);
    h.set_cksum();
    h
}

fn file(b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8], mode: u32, uid: u64) {
    let mut h = raw_header(name.as_bytes(), EntryType::Regular, data.len() as u64, mode);
    h.set_uid(uid);
    h.set_gid(uid + 1);
    h.set_cksum();
    b.append(&h, data).unwrap();
}

fn link(b: &mut tar::Builder<Vec<u8>>, name: &str, target: &str, kind: EntryType) {
    let mut h = raw_header(name.as_bytes(), kind, 0, 0o777);
    h.set_link_name(target).unwrap_or_else(|_| {
        h.as_old_mut().linkname[..target.len()].copy_from_slice(target.as_bytes());
    });
    h.set_cksum();
    b.append(&h, &[][..]).unwrap();
}

fn unpack(
    b: tar::Builder<Vec<u8>>,
) -> (tempfile::TempDir, PathBuf, Result<UnpackStats, UnpackError>) {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("layer");
    fs::create_dir(&dest).unwrap();
    let data = b.into_inner().unwrap();
    let r = unpack_layer(&data[..], &dest);
    (tmp, dest, r)
}

#[test]
fn files_dirs_links_devices_and_metadata() {
    require_root!();
    let mut b = tar::Builder::new(Vec::new());
    b.append(
        &raw_header(b"etc/", EntryType::Directory, 0, 0o750),
        &[][..],
    )
    .unwrap();
    file(
        &mut b,
        "etc/passwd",
        b"root:x:0:0::/root:/bin/sh\n",
        0o644,
        0,
    );
    file(&mut b, "bin/tool", b"#!/bin/sh\n", 0o4755, 1000);
    link(&mut b, "bin/sh", "/bin/busybox", EntryType::Symlink);
    link(&mut b, "bin/tool2", "bin/tool", EntryType::Link);
    let mut dev = raw_header(b"dev/null", EntryType::Char, 0, 0o666);
    dev.set_device_major(1).unwrap();
    dev.set_device_minor(3).unwrap();
    dev.set_cksum();
    b.append(&dev, &[][..]).unwrap();
    b.append(&raw_header(b"run/fifo", EntryType::Fifo, 0, 0o600), &[][..])
        .unwrap();
    // An xattr through a PAX header.
    b.append_pax_extensions([("SCHILY.xattr.user.husk", b"yes".as_slice())])
        .unwrap();
    file(&mut b, "etc/x", b"x", 0o600, 0);

    let (_t, d, r) = unpack(b);
    let stats = r.unwrap();
    assert!(stats.entries >= 7, "{stats:?}");
    let m = fs::metadata(d.join("etc")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o750);
    assert_eq!(m.mtime(), 1_600_000_000, "dir mtime set after children");
    assert_eq!(
        fs::read_to_string(d.join("etc/passwd")).unwrap(),
        "root:x:0:0::/root:/bin/sh\n"
    );
    let tool = fs::metadata(d.join("bin/tool")).unwrap();
    assert_eq!(tool.mode() & 0o7777, 0o4755, "setuid kept after chown");
    assert_eq!((tool.uid(), tool.gid()), (1000, 1001));
    assert_eq!(
        fs::read_link(d.join("bin/sh")).unwrap(),
        Path::new("/bin/busybox")
    );
    assert_eq!(
        fs::metadata(d.join("bin/tool2")).unwrap().ino(),
        tool.ino(),
        "hard link shares the inode"
    );
    let dm = fs::symlink_metadata(d.join("dev/null")).unwrap();
    assert!(dm.file_type().is_char_device());
    assert_eq!(dm.rdev(), libc::makedev(1, 3));
    assert!(
        fs::symlink_metadata(d.join("run/fifo"))
            .unwrap()
            .file_type()
            .is_fifo()
    );
    let mut buf = [0u8; 8];
    let c = cpath(&d.join("etc/x")).unwrap();
    let n = CString::new("user.husk").unwrap();
    // SAFETY: valid strings and buffer.
    let len =
        unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert_eq!(&buf[..len as usize], b"yes");
}

#[test]
fn whiteouts_and_opaque_dirs_become_overlay_markers() {
    require_root!();
    let mut b = tar::Builder::new(Vec::new());
    b.append(
        &raw_header(b"etc/", EntryType::Directory, 0, 0o755),
        &[][..],
    )
    .unwrap();
    file(&mut b, "etc/.wh.motd", b"", 0o644, 0);
    file(&mut b, "var/.wh..wh..opq", b"", 0o644, 0);
    file(&mut b, "var/new", b"n", 0o644, 0);
    let (_t, d, r) = unpack(b);
    r.unwrap();
    let w = fs::symlink_metadata(d.join("etc/motd")).unwrap();
    assert!(w.file_type().is_char_device());
    assert_eq!(w.rdev(), 0);
    assert!(!d.join("etc/.wh.motd").exists());
    let c = cpath(&d.join("var")).unwrap();
    let n = CString::new("trusted.overlay.opaque").unwrap();
    let mut buf = [0u8; 4];
    // SAFETY: valid strings and buffer.
    let len =
        unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert_eq!(&buf[..len.max(0) as usize], b"y");
    assert!(d.join("var/new").exists());
}

#[test]
fn dotdot_paths_are_rejected() {
    let mut b = tar::Builder::new(Vec::new());
    file(&mut b, "../escape", b"bad", 0o644, 0);
    let (t, _d, r) = unpack(b);
    let e = r.unwrap_err().to_string();
    assert!(e.contains("'..'"), "{e}");
    assert!(!t.path().join("escape").exists());
}

#[test]
fn absolute_paths_are_contained() {
    require_root!();
    let mut b = tar::Builder::new(Vec::new());
    file(&mut b, "/etc/hostname", b"inside", 0o644, 0);
    let (_t, d, r) = unpack(b);
    r.unwrap();
    assert_eq!(
        fs::read_to_string(d.join("etc/hostname")).unwrap(),
        "inside"
    );
}

#[test]
fn writes_through_escaping_symlinks_are_rejected() {
    require_root!();
    let outside = tempfile::tempdir().unwrap();
    let mut b = tar::Builder::new(Vec::new());
    link(
        &mut b,
        "evil",
        outside.path().to_str().unwrap(),
        EntryType::Symlink,
    );
    file(&mut b, "evil/owned", b"pwned", 0o644, 0);
    let (_t, d, r) = unpack(b);
    let e = r.unwrap_err().to_string();
    assert!(e.contains("symlink"), "{e}");
    assert!(
        !outside.path().join("owned").exists(),
        "wrote through a symlink"
    );
    // The symlink itself is kept as data, pointing where it said.
    assert_eq!(fs::read_link(d.join("evil")).unwrap(), outside.path());

    // A file entry over an existing symlink replaces the link, never follows it.
    let target = outside.path().join("victim");
    fs::write(&target, "original").unwrap();
    let mut b = tar::Builder::new(Vec::new());
    link(&mut b, "f", target.to_str().unwrap(), EntryType::Symlink);
    file(&mut b, "f", b"new", 0o644, 0);
    let (_t, d, r) = unpack(b);
    r.unwrap();
    assert_eq!(fs::read_to_string(&target).unwrap(), "original");
    assert_eq!(fs::read_to_string(d.join("f")).unwrap(), "new");
}

#[test]
fn hard_links_out_of_the_layer_are_rejected() {
    let mut b = tar::Builder::new(Vec::new());
    link(&mut b, "passwd", "../../../../etc/passwd", EntryType::Link);
    let (_t, _d, r) = unpack(b);
    assert!(r.unwrap_err().to_string().contains("'..'"));

    let mut b = tar::Builder::new(Vec::new());
    link(&mut b, "passwd", "/etc/passwd", EntryType::Link);
    let (_t, _d, r) = unpack(b);
    assert!(r.unwrap_err().to_string().contains("not in this layer"));
}

#[test]
fn giant_pax_headers_are_rejected() {
    let mut b = tar::Builder::new(Vec::new());
    let big = vec![b'a'; (MAX_PAX + 10) as usize];
    b.append_pax_extensions([("SCHILY.xattr.user.big", big.as_slice())])
        .unwrap();
    file(&mut b, "f", b"x", 0o644, 0);
    let (_t, _d, r) = unpack(b);
    let e = r.unwrap_err().to_string();
    assert!(e.contains("too large"), "{e}");
}

#[test]
fn truncated_and_garbage_streams_fail() {
    let mut b = tar::Builder::new(Vec::new());
    file(&mut b, "f", &[7u8; 5000], 0o644, 0);
    let data = b.into_inner().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let r = unpack_layer(&data[..2000], tmp.path());
    assert!(r.is_err(), "truncated tar must fail");
    let garbage = vec![0x5au8; 4096];
    let tmp2 = tempfile::tempdir().unwrap();
    assert!(unpack_layer(&garbage[..], tmp2.path()).is_err());
}
