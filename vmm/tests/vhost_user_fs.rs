//! husk-vmm's virtio-fs server as QEMU's vhost-user-fs backend (`husk-vmm vhost-user fs`),
//! exercised by the guest's own virtio-fs driver: the real guest image (linux 6.12 +
//! husk-agent as PID 1) under QEMU TCG, the agent reached over `husk-vmm vhost-user vsock`.
//!
//! The agent mounts the share as a sandbox mount (`fstype virtiofs`); a container whose
//! rootfs is a static busybox inside the share gets the share at /data through a
//! `sandbox:share` spec mount. Checked both ways: host files (mode, owner, mtime, content)
//! as the guest sees them, guest writes (content, chown, chmod, touch, 1 MiB file, symlink)
//! as the host sees them, a ConfigMap-style atomic `..data` symlink swap on the host seen in
//! the guest, and symlinks pointing out of the share (absolute host path, `../..`) that never
//! reach the host file.
//!
//! Needs HUSK_GUEST_KERNEL, HUSK_GUEST_INITRD, qemu-system-x86_64 and a static busybox at
//! /usr/bin/busybox; prints `skipped: <reason>` otherwise.

mod common;
mod fs_guest;

use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::time::Duration;

use fs_guest::{boot, connect_agent, create_sandbox, guest_image, guest_rootfs, make_rootfs, run};

/// `share/`: busybox rootfs under `rootfs/`, test data at the top; `secret` next to it.
fn make_share(outer: &Path) -> (PathBuf, PathBuf) {
    let share = outer.join("share");
    make_rootfs(&share.join("rootfs"));
    let secret = outer.join("secret");
    std::fs::write(&secret, b"host secret\n").expect("secret");
    let f = share.join("host.txt");
    std::fs::write(&f, b"written on the host\n").expect("write");
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    std::os::unix::fs::chown(&f, Some(1001), Some(1002)).expect("chown");
    let t = std::fs::FileTimes::new()
        .set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1_600_000_000));
    std::fs::File::options()
        .write(true)
        .open(&f)
        .expect("open")
        .set_times(t)
        .expect("times");
    // ConfigMap layout: key -> ..data/key, ..data -> ..v1.
    let cfg = share.join("cfg");
    std::fs::create_dir_all(cfg.join("..v1")).expect("mkdir");
    std::fs::write(cfg.join("..v1/key"), b"v1").expect("write");
    symlink("..v1", cfg.join("..data")).expect("symlink");
    symlink("..data/key", cfg.join("key")).expect("symlink");
    // Ways out that must not work.
    symlink(&secret, share.join("abs")).expect("symlink");
    symlink("../secret", share.join("rel")).expect("symlink");
    (share, secret)
}

/// The kubelet's atomic update: new dir, new symlink, rename over `..data`.
fn swap_configmap(share: &Path) {
    let cfg = share.join("cfg");
    std::fs::create_dir_all(cfg.join("..v2")).expect("mkdir");
    std::fs::write(cfg.join("..v2/key"), b"v2").expect("write");
    symlink("..v2", cfg.join("..data_tmp")).expect("symlink");
    std::fs::rename(cfg.join("..data_tmp"), cfg.join("..data")).expect("rename");
}

#[test]
fn guest_and_host_share_files_through_husk_virtio_fs() {
    let Some((kernel, initrd)) = guest_image() else {
        return;
    };
    let dir = common::tempdir();
    let (share, secret) = make_share(dir.path());
    let mut g = boot(&kernel, &initrd, dir, &share);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio");
    let _in_rt = rt.enter();
    let client = connect_agent(&mut g);
    let rootfs = guest_rootfs();
    let first = rt.block_on(async {
        create_sandbox(&client).await;
        run(
            &client,
            "c1",
            &rootfs,
            "cd /data; cat host.txt; stat -c 'attr %a %u %g %Y %s' host.txt; echo cfg=$(cat cfg/key); \
             echo from the guest > guest.txt; chown 1234:5678 guest.txt; chmod 600 guest.txt; \
             touch -d @1700000000 guest.txt; mkdir -p newdir; dd if=/dev/zero of=newdir/big bs=64k count=16 2>/dev/null; \
             ln -s target guestlink; \
             cat abs; echo abs=$?; cat rel; echo rel=$?; cat ../../secret; echo up=$?; \
             echo planted > /data/../../../planted; ls /",
            &[],
        )
        .await
    });
    // The server process is confined: no new privileges, seccomp filter, five capabilities.
    assert_eq!(
        common::confinement(g.backends[0].id()),
        ("1".into(), "2".into(), "000000000000001f".into())
    );
    let Some((code, out)) = first else { return };
    let ok = |cond: bool, what: &str| {
        assert!(
            cond,
            "{what}\ncontainer output:\n{out}\n{}",
            g.diagnostics()
        )
    };
    ok(code == 0, "container exit");
    ok(
        out.contains("written on the host"),
        "host content in the guest",
    );
    ok(
        out.contains("attr 640 1001 1002 1600000000 20"),
        "mode, uid, gid, mtime, size in the guest",
    );
    ok(
        out.contains("cfg=v1"),
        "configmap through the ..data symlink",
    );
    ok(!out.contains("host secret"), "no way out of the share");
    ok(
        out.contains("abs=1") && out.contains("rel=1") && out.contains("up=1"),
        "escape attempts fail",
    );

    let gf = share.join("guest.txt");
    let m = std::fs::symlink_metadata(&gf).expect("guest.txt on the host");
    assert_eq!(std::fs::read(&gf).expect("read"), b"from the guest\n");
    assert_eq!(
        (m.uid(), m.gid(), m.mode() & 0o777, m.mtime()),
        (1234, 5678, 0o600, 1_700_000_000)
    );
    assert_eq!(
        std::fs::metadata(share.join("newdir/big"))
            .expect("big")
            .len(),
        1 << 20
    );
    assert_eq!(
        std::fs::read_link(share.join("guestlink")).expect("link"),
        Path::new("target")
    );
    assert_eq!(std::fs::read(&secret).expect("secret"), b"host secret\n");
    assert!(!dir_of(&share).join("planted").exists() && !Path::new("/planted").exists());

    swap_configmap(&share);
    let (code, out) = rt
        .block_on(run(
        &client,
        "c2",
        &rootfs,
        "for i in $(seq 1 50); do v=$(cat /config/key); [ \"$v\" = v2 ] && break; sleep 0.1; done; echo cfg=$v; \
         cat /data/guest.txt; cat /etc/config.txt; echo ro > /etc/config.txt; echo ro=$?",
        // CRI-style mounts from subpaths of the share: a ConfigMap directory, a single file.
        &[
            serde_json::json!({"destination": "/config", "type": "bind", "source": "sandbox:share/cfg", "options": ["rbind", "ro"]}),
            serde_json::json!({"destination": "/etc/config.txt", "type": "bind", "source": "sandbox:share/host.txt", "options": ["bind", "ro"]}),
        ],
    ))
        .expect("second container");
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("cfg=v2"),
        "the swap is seen in the guest: {out}\n{}",
        g.diagnostics()
    );
    assert!(out.contains("from the guest"), "{out}");
    assert!(
        out.contains("written on the host"),
        "single-file mount: {out}"
    );
    assert!(out.contains("ro=1"), "read-only single-file mount: {out}");
}

fn dir_of(share: &Path) -> PathBuf {
    share.parent().expect("parent").to_path_buf()
}
