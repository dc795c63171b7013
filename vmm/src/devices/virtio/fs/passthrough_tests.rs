//! The passthrough file system against a temp dir, escape attempts included.

use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};

use super::*;

const ME: Caller = Caller {
    uid: 4242,
    gid: 4343,
};

struct T {
    _outer: tempfile::TempDir,
    share: std::path::PathBuf,
    outside: std::path::PathBuf,
    fs: PassthroughFs,
}

/// `<tmp>/share` is served; `<tmp>/secret` is a host file outside it.
fn setup() -> T {
    let outer = tempfile::tempdir().expect("tmp");
    let share = outer.path().join("share");
    std::fs::create_dir(&share).expect("mkdir");
    let outside = outer.path().join("secret");
    std::fs::write(&outside, b"host secret").expect("write");
    let fs = PassthroughFs::new(&share).expect("fs");
    T {
        share,
        outside,
        fs,
        _outer: outer,
    }
}

#[test]
fn create_write_read_attrs_and_readdir() {
    let t = setup();
    let ((id, st), fh) =
        t.fs.create(ROOT_ID, b"f", libc::O_RDWR as u32, 0o640, ME)
            .expect("create");
    assert_eq!(
        (st.st_uid, st.st_gid, st.st_mode & 0o777),
        (4242, 4343, 0o640)
    );
    assert_eq!(t.fs.write(fh, 0, b"hello world").expect("write"), 11);
    assert_eq!(t.fs.read(fh, 6, 100).expect("read"), b"world");
    t.fs.release(fh);
    assert_eq!(t.fs.read(fh, 0, 1), Err(Errno(libc::EBADF)));
    // Visible on the host with owner and mode as the guest set them.
    let m = std::fs::metadata(t.share.join("f")).expect("meta");
    assert_eq!(
        (m.uid(), m.gid(), m.mode() & 0o777, m.len()),
        (4242, 4343, 0o640, 11)
    );
    // setattr: mode, size, mtime.
    let st =
        t.fs.setattr(
            id,
            SetAttr {
                mode: Some(0o600),
                size: Some(5),
                mtime: Some((1_000_000, 5)),
                ..Default::default()
            },
        )
        .expect("setattr");
    assert_eq!(
        (
            st.st_mode & 0o777,
            st.st_size,
            st.st_mtime,
            st.st_mtime_nsec
        ),
        (0o600, 5, 1_000_000, 5)
    );
    assert_eq!(std::fs::read(t.share.join("f")).expect("read"), b"hello");
    // Same host inode, same nodeid; a hard link too.
    let (again, _) = t.fs.lookup(ROOT_ID, b"f").expect("lookup");
    assert_eq!(again, id);
    let (linked, st) = t.fs.link(id, ROOT_ID, b"g").expect("link");
    assert_eq!((linked, st.st_nlink), (id, 2));
    // mkdir + readdir.
    let (d, st) = t.fs.mkdir(ROOT_ID, b"dir", 0o755, ME).expect("mkdir");
    assert_eq!(st.st_mode & libc::S_IFMT, libc::S_IFDIR);
    t.fs.create(d, b"inner", libc::O_WRONLY as u32, 0o600, ME)
        .expect("create");
    let dh = t.fs.opendir(ROOT_ID).expect("opendir");
    let names = dirent_names(&t.fs.readdir(ROOT_ID, dh, 0, 4096, None).expect("readdir"));
    for n in [".", "..", "f", "g", "dir"] {
        assert!(names.contains(&n.to_string()), "{n} in {names:?}");
    }
    // A small buffer returns a prefix; continuing from its last offset returns the rest.
    let first = t.fs.readdir(ROOT_ID, dh, 0, 40, None).expect("readdir");
    assert_eq!(dirent_names(&first).len(), 1);
    let off = u64::from_le_bytes(first[8..16].try_into().expect("off"));
    let rest = dirent_names(&t.fs.readdir(ROOT_ID, dh, off, 4096, None).expect("readdir"));
    assert_eq!(rest.len(), names.len() - 1);
    // READDIRPLUS: each entry carries its lookup (the same nodeid LOOKUP gives).
    let plus =
        t.fs.readdir(ROOT_ID, dh, 0, 4096, Some(1))
            .expect("readdirplus");
    let mut p = 0;
    let mut seen = std::collections::HashMap::new();
    while p + 128 + 24 <= plus.len() {
        let node = u64::from_le_bytes(plus[p..p + 8].try_into().expect("node"));
        let d = &plus[p + 128..];
        let len = u32::from_le_bytes(d[16..20].try_into().expect("len")) as usize;
        seen.insert(String::from_utf8_lossy(&d[24..24 + len]).into_owned(), node);
        p += 128 + ((24 + len + 7) & !7);
    }
    assert_eq!((seen["f"], seen["g"], seen["."]), (id, id, 0));
    t.fs.forget(id, 2);
    // rename, unlink, rmdir.
    t.fs.rename(d, b"inner", ROOT_ID, b"moved", 0)
        .expect("rename");
    assert!(t.share.join("moved").exists());
    assert_eq!(t.fs.unlink(ROOT_ID, b"dir", true), Ok(()));
    t.fs.unlink(ROOT_ID, b"moved", false).expect("unlink");
    // FORGET drops inodes the guest gave back.
    let before = t.fs.known_inodes();
    t.fs.forget(id, 3);
    assert_eq!(t.fs.known_inodes(), before - 1);
    t.fs.forget(ROOT_ID, u64::MAX);
    assert!(t.fs.getattr(ROOT_ID).is_ok(), "the root is never forgotten");
}

fn dirent_names(buf: &[u8]) -> Vec<String> {
    let mut out = vec![];
    let mut p = 0;
    while p + 24 <= buf.len() {
        let len = u32::from_le_bytes(buf[p + 16..p + 20].try_into().expect("len")) as usize;
        out.push(String::from_utf8_lossy(&buf[p + 24..p + 24 + len]).into_owned());
        p += (24 + len + 7) & !7;
    }
    out
}

#[test]
fn names_that_are_not_one_component_are_refused() {
    let t = setup();
    for bad in [&b".."[..], b".", b"", b"../secret", b"a/b", b"/etc/passwd"] {
        assert_eq!(
            t.fs.lookup(ROOT_ID, bad).map(|_| ()),
            Err(Errno(libc::EPERM)),
            "{bad:?}"
        );
        assert!(t.fs.mkdir(ROOT_ID, bad, 0o755, ME).is_err());
        assert!(t.fs.create(ROOT_ID, bad, 0, 0o644, ME).is_err());
        assert!(t.fs.unlink(ROOT_ID, bad, false).is_err());
        assert!(t.fs.rename(ROOT_ID, b"x", ROOT_ID, bad, 0).is_err());
    }
    assert!(t.fs.lookup(ROOT_ID, b"a\0b").is_err());
    assert_eq!(
        t.fs.lookup(ROOT_ID, &[b'a'; 300]).map(|_| ()),
        Err(Errno(libc::ENAMETOOLONG))
    );
    // Unknown nodeids and handles.
    assert_eq!(t.fs.getattr(999).map(|_| ()), Err(Errno(libc::ENOENT)));
    assert_eq!(t.fs.lookup(999, b"x").map(|_| ()), Err(Errno(libc::ENOENT)));
    assert_eq!(t.fs.write(77, 0, b"x"), Err(Errno(libc::EBADF)));
}

#[test]
fn symlinks_are_never_followed_on_the_host() {
    let t = setup();
    // A symlink pointing out of the share, made on the host and one made by the guest.
    symlink(&t.outside, t.share.join("abs")).expect("symlink");
    symlink("../secret", t.share.join("rel")).expect("symlink");
    let (guest_link, st) =
        t.fs.symlink(ROOT_ID, b"mine", b"/etc/shadow", ME)
            .expect("symlink");
    assert_eq!(
        (st.st_mode & libc::S_IFMT, st.st_uid),
        (libc::S_IFLNK, 4242)
    );
    assert_eq!(t.fs.readlink(guest_link).expect("readlink"), b"/etc/shadow");
    for name in [&b"abs"[..], b"rel", b"mine"] {
        let (id, st) =
            t.fs.lookup(ROOT_ID, name)
                .expect("lookup gives the link itself");
        assert_eq!(st.st_mode & libc::S_IFMT, libc::S_IFLNK);
        assert_eq!(
            t.fs.open(id, libc::O_RDONLY as u32),
            Err(Errno(libc::ELOOP))
        );
        assert_eq!(t.fs.opendir(id), Err(Errno(libc::ENOTDIR)));
        assert_eq!(t.fs.lookup(id, b"x").map(|_| ()), Err(Errno(libc::ENOTDIR)));
        // Attribute changes act on the link, never on its target.
        let _ = t.fs.setattr(
            id,
            SetAttr {
                mode: Some(0o777),
                size: Some(0),
                ..Default::default()
            },
        );
    }
    assert_eq!(std::fs::read(&t.outside).expect("read"), b"host secret");
    assert_eq!(
        std::fs::metadata(&t.outside).expect("meta").mode() & 0o777,
        0o644
    );
    // CREATE over a symlink does not write through it.
    assert!(
        t.fs.create(
            ROOT_ID,
            b"abs",
            libc::O_WRONLY as u32 | libc::O_TRUNC as u32,
            0o644,
            ME
        )
        .is_err()
    );
    assert_eq!(std::fs::read(&t.outside).expect("read"), b"host secret");
    // A directory symlink cannot be used as a parent either.
    symlink(t.outside.parent().expect("parent"), t.share.join("up")).expect("symlink");
    let (up, _) = t.fs.lookup(ROOT_ID, b"up").expect("lookup");
    assert!(t.fs.lookup(up, b"secret").is_err());
    assert!(t.fs.create(up, b"planted", 0, 0o644, ME).is_err());
    assert!(t.fs.mkdir(up, b"planted", 0o755, ME).is_err());
    assert!(!t.outside.parent().expect("p").join("planted").exists());
}

#[test]
fn a_directory_moved_out_of_the_share_is_not_a_way_out() {
    // The guest holds a nodeid for share/d; the host moves d outside. Lookups under it still
    // resolve only beneath that directory (never via `..`).
    let t = setup();
    let (d, _) = t.fs.mkdir(ROOT_ID, b"d", 0o755, ME).expect("mkdir");
    let moved = t.outside.with_file_name("moved");
    std::fs::rename(t.share.join("d"), &moved).expect("rename");
    assert_eq!(t.fs.lookup(d, b"..").map(|_| ()), Err(Errno(libc::EPERM)));
    assert!(
        t.fs.lookup(d, b"secret").is_err(),
        "the secret is next to d, not beneath it"
    );
}

#[test]
fn special_files_are_not_opened_and_devices_not_made() {
    let t = setup();
    assert_eq!(
        t.fs.mknod(ROOT_ID, b"blk", libc::S_IFBLK | 0o600, ME)
            .map(|_| ()),
        Err(Errno(libc::EPERM))
    );
    assert_eq!(
        t.fs.mknod(ROOT_ID, b"chr", libc::S_IFCHR | 0o600, ME)
            .map(|_| ()),
        Err(Errno(libc::EPERM))
    );
    // Where FIFOs are allowed, one is made but never opened on the host.
    let special = PassthroughFs::new(&t.share)
        .expect("fs")
        .allow_special_files(true);
    let (fifo, st) = special
        .mknod(ROOT_ID, b"fifo", libc::S_IFIFO | 0o600, ME)
        .expect("fifo");
    assert_eq!(st.st_mode & libc::S_IFMT, libc::S_IFIFO);
    assert_eq!(
        special.open(fifo, libc::O_RDONLY as u32),
        Err(Errno(libc::EACCES))
    );
    // A device node the host put in the share is not opened either.
    if nix_mknod_null(&t.share.join("null")) {
        let (n, _) = t.fs.lookup(ROOT_ID, b"null").expect("lookup");
        assert_eq!(t.fs.open(n, libc::O_RDWR as u32), Err(Errno(libc::EACCES)));
    }
    // OPEN never creates: O_CREAT and friends are stripped.
    let (f, _) = t.fs.mkdir(ROOT_ID, b"sub", 0o755, ME).expect("mkdir");
    assert!(
        t.fs.open(f, (libc::O_RDONLY | libc::O_DIRECTORY) as u32)
            .is_ok()
    );
    std::fs::set_permissions(t.share.join("sub"), std::fs::Permissions::from_mode(0o700))
        .expect("chmod");
}

#[test]
fn set_id_files_and_fifos_are_refused_unless_allowed() {
    let t = setup();
    let eperm = Err(Errno(libc::EPERM));
    let ty = |p: &str| {
        std::fs::symlink_metadata(t.share.join(p))
            .map(|m| m.mode())
            .ok()
    };
    // Made with a set-id bit: create, mknod, mkdir (setuid).
    for (name, mode) in [(&b"suid"[..], 0o4755), (b"sgid", 0o2755), (b"both", 0o6711)] {
        assert_eq!(
            t.fs.create(ROOT_ID, name, libc::O_RDWR as u32, mode, ME)
                .map(|_| ()),
            eperm,
            "create {mode:o}"
        );
        assert_eq!(
            t.fs.mknod(ROOT_ID, name, libc::S_IFREG | mode, ME)
                .map(|_| ()),
            eperm,
            "mknod {mode:o}"
        );
        assert_eq!(ty(std::str::from_utf8(name).expect("utf8")), None);
    }
    assert_eq!(t.fs.mkdir(ROOT_ID, b"sdir", 0o4755, ME).map(|_| ()), eperm);
    assert_eq!(ty("sdir"), None);
    // A set-group-id directory is ordinary (group inheritance), not a privilege.
    t.fs.mkdir(ROOT_ID, b"gdir", 0o2775, ME)
        .expect("setgid dir");
    assert!(ty("gdir").is_some());
    // chmod to set-id afterwards: refused, the file keeps its mode.
    let ((id, _), fh) =
        t.fs.create(ROOT_ID, b"tool", libc::O_RDWR as u32, 0o755, ME)
            .expect("create");
    t.fs.release(fh);
    for m in [0o4755, 0o2755, 0o6755] {
        let sa = SetAttr {
            mode: Some(m),
            ..Default::default()
        };
        assert_eq!(t.fs.setattr(id, sa).map(|_| ()), eperm, "chmod {m:o}");
    }
    assert_eq!(ty("tool").map(|m| m & 0o7777), Some(0o755));
    // A FIFO (a host process opening it would block) is not made either.
    assert_eq!(
        t.fs.mknod(ROOT_ID, b"fifo", libc::S_IFIFO | 0o644, ME)
            .map(|_| ()),
        eperm
    );
    assert_eq!(ty("fifo"), None);
    // Sockets stay allowed (a guest bind() on the share).
    t.fs.mknod(ROOT_ID, b"sock", libc::S_IFSOCK | 0o755, ME)
        .expect("socket");

    // A share configured for them allows both.
    let special = PassthroughFs::new(&t.share)
        .expect("fs")
        .allow_special_files(true);
    let (_, st) = special
        .mknod(ROOT_ID, b"fifo", libc::S_IFIFO | 0o644, ME)
        .expect("fifo");
    assert_eq!(st.st_mode & libc::S_IFMT, libc::S_IFIFO);
    let (id, _) = special.lookup(ROOT_ID, b"tool").expect("lookup");
    let sa = SetAttr {
        mode: Some(0o4755),
        ..Default::default()
    };
    special.setattr(id, sa).expect("chmod u+s where allowed");
    assert_eq!(ty("tool").map(|m| m & 0o7777), Some(0o4755));
}

fn nix_mknod_null(p: &std::path::Path) -> bool {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("c");
    // SAFETY: mknod with a valid path; needs CAP_MKNOD (skipped without).
    unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) == 0 }
}

/// Lazily unmounts its paths on drop (also when the test fails).
struct Unmount(Vec<std::path::PathBuf>);

impl Drop for Unmount {
    fn drop(&mut self) {
        for p in self.0.iter().rev() {
            let _ = std::process::Command::new("umount")
                .arg("-R")
                .arg("-l")
                .arg(p)
                .status();
        }
    }
}

/// Two binds of one host directory (a private and a host-to-container volume of the same
/// path, say) are two nodes: a mount made later under one does not show through the other.
#[test]
fn binds_of_one_directory_are_separate_nodes() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("skipped: needs root (bind mounts)");
        return;
    }
    let t = setup();
    let src = t.share.parent().expect("parent").join("src");
    std::fs::create_dir_all(src.join("sub")).expect("mkdir");
    let mount = |args: &[&str]| {
        let st = std::process::Command::new("mount")
            .args(args)
            .status()
            .expect("mount");
        assert!(st.success(), "mount {args:?}");
    };
    let (a, b) = (t.share.join("a"), t.share.join("b"));
    let _guard = Unmount(vec![a.clone(), b.clone()]);
    for d in [&a, &b] {
        std::fs::create_dir(d).expect("mkdir");
        let d = d.to_str().expect("utf-8");
        mount(&["--bind", src.to_str().expect("utf-8"), d]);
        mount(&["--make-private", d]);
    }
    let sub = a.join("sub");
    mount(&["-t", "tmpfs", "tmpfs", sub.to_str().expect("utf-8")]);
    std::fs::write(sub.join("late"), b"late").expect("write");

    let (ia, _) = t.fs.lookup(ROOT_ID, b"a").expect("a");
    let (ib, _) = t.fs.lookup(ROOT_ID, b"b").expect("b");
    assert_ne!(ia, ib, "two mounts of one directory share a node");
    let (asub, ast) = t.fs.lookup(ia, b"sub").expect("a/sub");
    let (bsub, bst) = t.fs.lookup(ib, b"sub").expect("b/sub");
    assert_ne!(ast.st_dev, bst.st_dev, "a/sub is the tmpfs, b/sub is not");
    assert!(t.fs.lookup(asub, b"late").is_ok());
    assert_eq!(
        t.fs.lookup(bsub, b"late").map(|_| ()),
        Err(Errno(libc::ENOENT)),
        "the mount under a/ shows through b/"
    );
    // One mount's node is still found again (the same nodeid for the same inode).
    assert_eq!(t.fs.lookup(ROOT_ID, b"b").expect("b again").0, ib);
}
