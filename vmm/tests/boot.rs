//! Boots the bare-metal test guest: entry modes, SMP, exit codes, SIGTERM, and config errors.

mod common;
use common::*;

#[test]
fn pvh_entry_boots_and_guest_reset_exits_zero() {
    if !kvm_usable() {
        return;
    }
    let mut vm = Vm::spawn(&args(GUEST_PVH, "console=ttyS0 husk.serialirq", &[]));
    vm.expect_line("entry=pvh");
    let l = vm.expect_line("cmdline:");
    assert!(
        l.contains("console=ttyS0"),
        "cmdline reached the guest: {l}"
    );
    // The 8250's THR-empty interrupt reaches the guest through the IOAPIC.
    let l = vm.expect_line("serial: irq");
    let n: u32 = l
        .rsplit('=')
        .next()
        .and_then(|v| v.parse().ok())
        .expect("count");
    assert!(n >= 1, "{l}");
    vm.expect_line("HUSK_GUEST_DONE");
    let (code, err) = vm.wait();
    assert_eq!(code, 0, "stderr: {err}");
}

#[test]
fn linux64_entry_boots_through_zero_page() {
    if !kvm_usable() {
        return;
    }
    let mut vm = Vm::spawn(&args(GUEST_64, "hello-zero-page", &[]));
    vm.expect_line("entry=linux64");
    assert!(vm.expect_line("cmdline:").contains("hello-zero-page"));
    vm.expect_line("HUSK_GUEST_DONE");
    assert_eq!(vm.wait().0, 0);
}

#[test]
fn smp_two_vcpus_mptable_and_ap_startup() {
    if !kvm_usable() {
        return;
    }
    let mut vm = Vm::spawn(&args(GUEST_PVH, "husk.smp", &["--vcpus", "2"]));
    assert!(vm.expect_line("smp: mptable cpus=").ends_with("cpus=2"));
    vm.expect_line("smp: ap 1 started");
    assert_eq!(vm.wait().0, 0);
}

#[test]
fn triple_fault_is_a_clear_error() {
    if !kvm_usable() {
        return;
    }
    let mut vm = Vm::spawn(&args(GUEST_PVH, "husk.crash", &[]));
    vm.expect_line("crash:");
    let (code, err) = vm.wait();
    assert_ne!(code, 0);
    assert!(
        err.contains("triple fault") || err.contains("internal error"),
        "stderr: {err}"
    );
    assert_eq!(
        err.lines()
            .filter(|l| l.starts_with("husk-vmm: error"))
            .count(),
        1,
        "one-line error: {err}"
    );
}

#[test]
fn sigterm_sends_ctrl_alt_del_and_guest_shuts_down() {
    if !kvm_usable() {
        return;
    }
    let mut vm = Vm::spawn(&args(GUEST_PVH, "husk.wait", &[]));
    vm.expect_line("waiting for ctrl-alt-del");
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(vm.child.id() as i32, libc::SIGTERM) };
    vm.expect_line("got ctrl-alt-del by interrupt");
    let (code, err) = vm.wait();
    assert_eq!(code, 0, "stderr: {err}");
}

fn run_err(a: Vec<String>) -> String {
    let out = std::process::Command::new(VMM)
        .args(&a)
        .output()
        .expect("run husk-vmm");
    assert!(!out.status.success(), "expected failure for {a:?}");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(err.lines().count(), 1, "one-line error, got: {err}");
    err
}

#[test]
fn bad_configs_fail_with_one_line_errors() {
    if !kvm_usable() {
        return;
    }
    let dir = tempdir();
    let missing = path_str(&dir.path().join("nope"));
    assert!(run_err(args(&missing, "", &[])).contains("cannot be opened"));

    let text = tmp_path(&dir, "text");
    std::fs::write(
        &text,
        b"this is not a kernel at all, just some text to be long enough ...".repeat(20),
    )
    .expect("w");
    assert!(run_err(args(&path_str(&text), "", &[])).contains("not an ELF vmlinux or a bzImage"));

    // An ELF whose segment is larger than guest memory.
    let mut elf = std::fs::read(GUEST_PVH).expect("guest");
    let phoff = u64::from_le_bytes(elf[32..40].try_into().expect("8")) as usize;
    elf[phoff + 40..phoff + 48].copy_from_slice(&(64u64 << 20).to_le_bytes());
    let big = tmp_path(&dir, "big.elf");
    std::fs::write(&big, &elf).expect("w");
    assert!(run_err(args(&path_str(&big), "", &[])).contains("too small for the kernel"));

    // A bzImage whose decompressed kernel (init_size) needs more than guest memory.
    let mut bz = std::fs::read(env!("HUSK_TEST_GUEST_BZIMAGE")).expect("bz");
    bz[0x260..0x264].copy_from_slice(&(64u32 << 20).to_le_bytes());
    let bigbz = tmp_path(&dir, "big.bz");
    std::fs::write(&bigbz, &bz).expect("w");
    assert!(run_err(args(&path_str(&bigbz), "", &[])).contains("too small for the kernel"));

    let initrd = tmp_path(&dir, "initrd");
    std::fs::write(&initrd, vec![0u8; 40 << 20]).expect("w");
    let e = run_err(args(GUEST_PVH, "", &["--initrd", &path_str(&initrd)]));
    assert!(e.contains("too small for the kernel and initrd"), "{e}");

    assert!(run_err(args(GUEST_PVH, "", &["--vcpus", "0"])).contains("vcpus"));
    // An existing non-tap interface cannot be attached as a tap (nothing is created).
    let e = run_err(args(GUEST_PVH, "", &["--net", "tap=lo"]));
    assert!(
        e.contains("cannot open tap lo") || e.contains("cannot open /dev/net/tun"),
        "{e}"
    );

    let cfg = tmp_path(&dir, "vm.json");
    std::fs::write(&cfg, br#"{"kernel": "/k", "bogus": 1}"#).expect("w");
    assert!(run_err(vec!["--config".into(), path_str(&cfg)]).contains("invalid config file"));
}

#[test]
fn config_file_boots() {
    if !kvm_usable() {
        return;
    }
    let dir = tempdir();
    let serial = tmp_path(&dir, "serial.log");
    let cfg = tmp_path(&dir, "vm.json");
    let json = format!(
        r#"{{"kernel": "{GUEST_PVH}", "cmdline": "from-json", "vcpus": 1, "memory_mib": 16,
            "serial": {{"kind": "file", "path": "{}"}}}}"#,
        serial.display()
    );
    std::fs::write(&cfg, json).expect("w");
    let out = std::process::Command::new(VMM)
        .arg("--config")
        .arg(&cfg)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = std::fs::read_to_string(&serial).expect("serial log");
    assert!(
        log.contains("cmdline: from-json") && log.contains("HUSK_GUEST_DONE"),
        "{log}"
    );
}

#[test]
fn bzimage_boots_through_64bit_entry() {
    if !kvm_usable() {
        return;
    }
    let mut vm = Vm::spawn(&args(env!("HUSK_TEST_GUEST_BZIMAGE"), "from-bzimage", &[]));
    vm.expect_line("entry=linux64");
    assert!(vm.expect_line("cmdline:").contains("from-bzimage"));
    vm.expect_line("HUSK_GUEST_DONE");
    assert_eq!(vm.wait().0, 0);
}

#[test]
fn control_socket_status_stop_and_kill() {
    if !kvm_usable() {
        return;
    }
    use std::io::{BufRead, BufReader, Write};
    let dir = tempdir();
    let sock = tmp_path(&dir, "ctl.sock");
    let ask = |cmd: &str| {
        let mut s = std::os::unix::net::UnixStream::connect(&sock).expect("connect control socket");
        s.write_all(format!("{cmd}\n").as_bytes()).expect("w");
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).expect("reply");
        line
    };
    let mut vm = Vm::spawn(&args(
        GUEST_PVH,
        "husk.wait",
        &["--control-socket", &path_str(&sock), "--vcpus", "2"],
    ));
    vm.expect_line("waiting for ctrl-alt-del");
    assert_eq!(ask("status"), "running vcpus=2 memory_mib=32\n");
    assert!(ask("bogus").starts_with("error"));
    assert_eq!(ask("stop"), "ok\n");
    vm.expect_line("got ctrl-alt-del by interrupt");
    assert_eq!(vm.wait().0, 0);

    let mut vm = Vm::spawn(&args(
        GUEST_PVH,
        "husk.wait",
        &["--control-socket", &path_str(&sock)],
    ));
    vm.expect_line("waiting for ctrl-alt-del");
    assert_eq!(ask("kill"), "ok\n");
    let (code, _) = vm.wait();
    assert_eq!(code, 143, "killed through the API");
    assert!(!sock.exists(), "control socket removed at exit");
}

/// husk-vmm jailed (`husk-vmm jail … -- husk-vmm …`): the guest boots and stops over the
/// control socket; the VMM runs as the jail's uid with no capability, its seccomp allow list,
/// no_new_privs, in a root holding /usr, its binary, its kernel, /dev (with kvm) and /proc.
#[test]
fn jailed_vmm_boots_and_stops() {
    jailed_vmm(false);
}

/// The same with the in-process virtio-fs server (`--keep-fs-caps`, `--fs`): the event-loop
/// thread, which serves the file system, keeps `FS_CAPS` and nothing more; the vCPU threads,
/// where the guest's MMIO and port writes are decoded, hold no capability at all.
#[test]
fn jailed_vmm_keeps_file_capabilities_off_its_vcpu_threads() {
    jailed_vmm(true);
}

fn jailed_vmm(fs: bool) {
    if !kvm_usable() {
        return;
    }
    if !is_root() {
        println!("skipped: the jail needs root (mount namespace, setuid)");
        return;
    }
    use std::io::{BufRead, BufReader, Write};
    const UID: u32 = 0x7000_0000 + 4343;
    let dir = tempdir();
    let socks = tmp_path(&dir, "sock");
    let root = tmp_path(&dir, "root");
    std::fs::create_dir(&socks).expect("sock dir");
    std::fs::create_dir(&root).expect("root dir");
    std::os::unix::fs::chown(&socks, Some(UID), Some(UID)).expect("chown");
    let sock = socks.join("ctl.sock");
    let mut cmd = std::process::Command::new(VMM);
    cmd.args(["jail", "--uid", &UID.to_string(), "--gid", &UID.to_string()])
        .arg("--root")
        .arg(&root)
        .args(["--ro", GUEST_PVH, "--dev", "kvm"])
        .arg("--rw")
        .arg(&socks);
    let share = tmp_path(&dir, "share");
    let fs_spec = format!("tag=share0,dir={}", share.display());
    let mut extra = vec!["--control-socket".to_string(), path_str(&sock)];
    if fs {
        std::fs::create_dir(&share).expect("share dir");
        std::os::unix::fs::chown(&share, Some(UID), Some(UID)).expect("chown");
        cmd.arg("--keep-fs-caps").arg("--rw").arg(&share);
        extra.extend(["--fs".to_string(), fs_spec]);
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    cmd.args(["--", VMM])
        .args(args(GUEST_PVH, "husk.wait", &extra));
    let mut vm = Vm::spawn_cmd(&mut cmd);
    vm.expect_line("waiting for ctrl-alt-del");
    let j = common::jail_of(vm.child.id());
    assert_eq!(j.uids, format!("{UID}\t{UID}\t{UID}\t{UID}"), "{j:?}");
    assert_eq!(
        (
            j.no_new_privs.as_str(),
            j.seccomp.as_str(),
            j.cap_eff.as_str()
        ),
        (
            "1",
            "2",
            if fs {
                "000000000000001f"
            } else {
                "0000000000000000"
            }
        ),
        "{j:?}"
    );
    common::assert_jail_root(&j);
    // Every thread has one filter, its own: the vCPU thread's list is not stacked on the main
    // thread's (which allows no KVM ioctl), and no thread runs unfiltered.
    let pid = vm.child.id();
    let filters = |task: &str| {
        let st = std::fs::read_to_string(format!("/proc/{pid}/task/{task}/status"))
            .expect("task status");
        let f = |k: &str| {
            st.lines()
                .find(|l| l.starts_with(k))
                .map(|l| l[k.len()..].trim().to_string())
                .unwrap_or_default()
        };
        (
            f("Name:"),
            f("Seccomp_filters:"),
            f("Seccomp:"),
            f("CapEff:"),
        )
    };
    let tasks: Vec<(String, String, String, String)> =
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .expect("tasks")
            .flatten()
            .map(|e| filters(&e.file_name().to_string_lossy()))
            .collect();
    let vcpu = tasks
        .iter()
        .find(|t| t.0 == "vcpu0")
        .expect("a vcpu0 thread");
    assert_eq!((vcpu.1.as_str(), vcpu.2.as_str()), ("1", "2"), "{tasks:?}");
    assert_eq!(
        vcpu.3, "0000000000000000",
        "a vCPU thread holds no capability: {tasks:?}"
    );
    assert!(tasks.iter().all(|t| t.1 == "1" && t.2 == "2"), "{tasks:?}");
    assert_eq!(filters(&pid.to_string()).1, "1", "{tasks:?}");
    let mut s = std::os::unix::net::UnixStream::connect(&sock).expect("connect control socket");
    s.write_all(b"stop\n").expect("w");
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("reply");
    assert_eq!(line, "ok\n");
    vm.expect_line("got ctrl-alt-del by interrupt");
    assert_eq!(vm.wait().0, 0);
}

#[test]
fn missing_kvm_is_a_clear_error() {
    if !kvm_usable() {
        return;
    }
    if !is_root() || !std::path::Path::new("/usr/bin/unshare").exists() {
        println!("skipped: needs root and unshare to hide /dev/kvm in a mount namespace");
        return;
    }
    // Hide /dev/kvm in a private mount namespace: bind /dev/null over it (unusable), then
    // over-mount /dev with an empty tmpfs (missing).
    for (setup, want) in [
        ("mount --bind /dev/null /dev/kvm", "/dev/kvm is unusable"),
        ("mount -t tmpfs none /dev", "/dev/kvm is missing"),
    ] {
        let script = format!("{setup} && exec \"$0\" \"$@\"");
        let mut cmd = std::process::Command::new("unshare");
        cmd.args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
            VMM,
        ])
        .args(args(GUEST_PVH, "", &[]));
        let out = cmd.output().expect("run");
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "want {want:?}, got {err}");
    }
}

#[test]
fn memory_map_and_initrd_reach_the_guest_both_entry_modes() {
    if !kvm_usable() {
        return;
    }
    let dir = tempdir();
    let initrd = tmp_path(&dir, "initrd");
    let mut data = b"HUSKINRD".to_vec();
    data.resize(3 * 4096 + 17, 0x5a);
    std::fs::write(&initrd, &data).expect("w");
    for guest in [GUEST_PVH, GUEST_64] {
        let mut vm = Vm::spawn(&args(
            guest,
            "husk.bootinfo",
            &["--initrd", &path_str(&initrd)],
        ));
        let l = vm.expect_line("bootinfo:");
        // 32 MiB minus the legacy hole 0x9fc00..0x100000.
        let ram = 32 * 1024 * 1024 - (0x10_0000 - 0x9_fc00);
        assert!(l.contains(&format!("ram={ram} ")), "{l}");
        assert!(l.contains(&format!("initrd_size={} ", data.len())), "{l}");
        assert!(l.ends_with("initrd_head=4855534b494e5244"), "{l}");
        let addr = u64::from_str_radix(
            l.split("initrd_addr=")
                .nth(1)
                .and_then(|s| s.split(' ').next())
                .expect("addr"),
            16,
        )
        .expect("hex");
        assert_eq!(addr % 4096, 0, "page aligned");
        assert!(addr + data.len() as u64 <= 32 << 20, "inside RAM");
        assert_eq!(vm.wait().0, 0);
    }
}

#[test]
fn sigterm_with_unresponsive_guest_exits_after_grace() {
    if !kvm_usable() {
        return;
    }
    let mut vm = Vm::spawn(&args(GUEST_PVH, "husk.hang", &["--stop-grace-ms", "300"]));
    vm.expect_line("hang: ignoring everything");
    let t0 = std::time::Instant::now();
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(vm.child.id() as i32, libc::SIGTERM) };
    let (code, err) = vm.wait();
    assert_eq!(code, 143, "stderr: {err}");
    assert!(err.contains("stopped before the guest shut down"), "{err}");
    let waited = t0.elapsed();
    assert!(
        waited >= std::time::Duration::from_millis(300)
            && waited < std::time::Duration::from_secs(10),
        "{waited:?}"
    );
}
