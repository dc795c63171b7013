//! cgroup v2 device filter: an eBPF program of type CGROUP_DEVICE generated
//! from the device rules (what the v1 `devices` controller does with files).
//!
//! ```text
//!   r2 = ctx.access_type & 0xffff   (1 block, 2 char)
//!   r3 = ctx.access_type >> 16      (1 mknod, 2 read, 4 write)
//!   r4 = ctx.major; r5 = ctx.minor
//!   per rule, last rule first: on match return allow (1) or deny (0)
//!   return 0
//! ```

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use super::devices::DeviceRule;

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("load device program: {0}{1}")]
    Load(#[source] std::io::Error, String),
    #[error("attach device program to {0}: {1}")]
    Attach(String, #[source] std::io::Error),
    #[error("open cgroup {0}: {1}")]
    Open(String, #[source] std::io::Error),
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub code: u8,
    /// dst in the low nibble, src in the high nibble.
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

const LDX_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
const AND_K: u8 = 0x57; // BPF_ALU64 | BPF_AND | BPF_K
const RSH_K: u8 = 0x77; // BPF_ALU64 | BPF_RSH | BPF_K
const MOV_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
const MOV_X: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
const JNE_K: u8 = 0x55; // BPF_JMP | BPF_JNE | BPF_K
const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT

const DEV_BLOCK: i32 = 1;
const DEV_CHAR: i32 = 2;
const ACC_MKNOD: i32 = 1;
const ACC_READ: i32 = 2;
const ACC_WRITE: i32 = 4;

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | dst,
        off,
        imm,
    }
}

fn access_bits(access: &str) -> i32 {
    let a = if access.is_empty() { "rwm" } else { access };
    a.chars().fold(0, |bits, c| {
        bits | match c {
            'r' => ACC_READ,
            'w' => ACC_WRITE,
            'm' => ACC_MKNOD,
            _ => 0,
        }
    })
}

/// The program for `rules` (v1 order: later rules override earlier ones).
pub fn program(rules: &[DeviceRule]) -> Vec<Insn> {
    let mut p = vec![
        insn(LDX_W, 2, 1, 0, 0),
        insn(AND_K, 2, 0, 0, 0xffff),
        insn(LDX_W, 3, 1, 0, 0),
        insn(RSH_K, 3, 0, 0, 16),
        insn(LDX_W, 4, 1, 4, 0),
        insn(LDX_W, 5, 1, 8, 0),
    ];
    for r in rules.iter().rev() {
        // Jumps to "next rule" are patched once the block length is known.
        let mut block: Vec<(Insn, bool)> = Vec::new();
        match r.typ {
            'b' => block.push((insn(JNE_K, 2, 0, 0, DEV_BLOCK), true)),
            'c' => block.push((insn(JNE_K, 2, 0, 0, DEV_CHAR), true)),
            _ => {}
        }
        let acc = access_bits(&r.access);
        if acc != ACC_READ | ACC_WRITE | ACC_MKNOD {
            block.push((insn(MOV_X, 0, 3, 0, 0), false));
            block.push((insn(AND_K, 0, 0, 0, !acc & 7), false));
            block.push((insn(JNE_K, 0, 0, 0, 0), true));
        }
        if let Some(m) = r.major {
            block.push((insn(JNE_K, 4, 0, 0, m as i32), true));
        }
        if let Some(m) = r.minor {
            block.push((insn(JNE_K, 5, 0, 0, m as i32), true));
        }
        block.push((insn(MOV_K, 0, 0, 0, i32::from(r.allow)), false));
        block.push((insn(EXIT, 0, 0, 0, 0), false));
        let len = block.len();
        let unconditional = !block.iter().any(|(_, to_next)| *to_next);
        for (i, (mut ins, to_next)) in block.into_iter().enumerate() {
            if to_next {
                ins.off = (len - i - 1) as i16;
            }
            p.push(ins);
        }
        if unconditional {
            // Matches everything: earlier rules are dead code, which the
            // verifier rejects.
            return p;
        }
    }
    p.push(insn(MOV_K, 0, 0, 0, 0));
    p.push(insn(EXIT, 0, 0, 0, 0));
    p
}

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
#[derive(Default)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
const BPF_F_ALLOW_MULTI: u32 = 2;

/// Loads `prog`. The verifier writes its log only when asked, and writing it costs more than
/// checking a program this small: the first try asks for none, a failed one is loaded again
/// with the log for the error message.
fn load(prog: &[Insn]) -> Result<OwnedFd, BpfError> {
    match load_with_log(prog, false) {
        Ok(fd) => Ok(fd),
        Err(_) => load_with_log(prog, true),
    }
}

fn load_with_log(prog: &[Insn], with_log: bool) -> Result<OwnedFd, BpfError> {
    let license = c"Apache-2.0";
    let mut log = vec![0u8; if with_log { 1 << 16 } else { 0 }];
    let mut name = [0u8; 16];
    name[..10].copy_from_slice(b"husk_devcg");
    let attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: prog.len() as u32,
        insns: prog.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: u32::from(with_log),
        log_size: log.len() as u32,
        log_buf: if with_log { log.as_mut_ptr() as u64 } else { 0 },
        prog_name: name,
        expected_attach_type: BPF_CGROUP_DEVICE,
        ..Default::default()
    };
    // SAFETY: attr points at live buffers (program, license, log) for the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const ProgLoadAttr,
            std::mem::size_of::<ProgLoadAttr>(),
        )
    };
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        let msg = String::from_utf8_lossy(&log[..log.iter().position(|b| *b == 0).unwrap_or(0)])
            .into_owned();
        return Err(BpfError::Load(
            err,
            if msg.is_empty() {
                msg
            } else {
                format!(": {msg}")
            },
        ));
    }
    // SAFETY: the kernel returned a new fd that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Programs already loaded, by their instructions: nearly every container has the same
/// device rules (the defaults), and one loaded program may be attached to any number of
/// cgroups. At most [`CACHED`] programs are kept (a program is a few hundred bytes of
/// kernel memory); the oldest goes first.
static LOADED: std::sync::Mutex<Vec<(Vec<Insn>, std::sync::Arc<OwnedFd>)>> =
    std::sync::Mutex::new(Vec::new());
const CACHED: usize = 8;

fn loaded(prog: Vec<Insn>) -> Result<std::sync::Arc<OwnedFd>, BpfError> {
    let mut cache = LOADED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, fd)) = cache.iter().find(|(p, _)| *p == prog) {
        return Ok(fd.clone());
    }
    let fd = std::sync::Arc::new(load(&prog)?);
    if cache.len() >= CACHED {
        cache.remove(0);
    }
    cache.push((prog, fd.clone()));
    Ok(fd)
}

/// Load the filter for `rules` and attach it to the cgroup directory `dir`.
pub fn attach(dir: &Path, rules: &[DeviceRule]) -> Result<(), BpfError> {
    let prog = loaded(program(rules))?;
    let cgroup =
        std::fs::File::open(dir).map_err(|e| BpfError::Open(dir.display().to_string(), e))?;
    let attr = ProgAttachAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: BPF_F_ALLOW_MULTI,
        replace_bpf_fd: 0,
    };
    // SAFETY: attr is a valid BPF_PROG_ATTACH argument for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_ATTACH,
            &attr as *const ProgAttachAttr,
            std::mem::size_of::<ProgAttachAttr>(),
        )
    };
    if r < 0 {
        return Err(BpfError::Attach(
            dir.display().to_string(),
            std::io::Error::last_os_error(),
        ));
    }
    // The attachment holds the program; our fds may close.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run the program on (type, access, major, minor) with a tiny eBPF interpreter.
    fn run(p: &[Insn], typ: i32, access: i32, major: u32, minor: u32) -> u64 {
        let ctx = [((access as u32) << 16) | typ as u32, major, minor];
        let mut r = [0u64; 11];
        let mut pc = 0usize;
        loop {
            let i = p[pc];
            let (dst, src) = ((i.regs & 0xf) as usize, (i.regs >> 4) as usize);
            pc += 1;
            match i.code {
                LDX_W => {
                    assert_eq!(src, 1, "loads only from ctx");
                    r[dst] = u64::from(ctx[i.off as usize / 4]);
                }
                AND_K => r[dst] &= i.imm as i64 as u64,
                RSH_K => r[dst] >>= i.imm,
                MOV_K => r[dst] = i.imm as i64 as u64,
                MOV_X => r[dst] = r[src],
                JNE_K => {
                    if r[dst] != i.imm as i64 as u64 {
                        pc += i.off as usize;
                    }
                }
                EXIT => return r[0],
                c => panic!("op {c:#x}"),
            }
        }
    }

    fn rule(
        allow: bool,
        typ: char,
        major: Option<i64>,
        minor: Option<i64>,
        access: &str,
    ) -> DeviceRule {
        DeviceRule {
            allow,
            typ,
            major,
            minor,
            access: access.into(),
        }
    }

    #[test]
    fn later_rules_win_and_access_is_a_subset() {
        let rules = [
            rule(false, 'a', None, None, "rwm"),
            rule(true, 'c', None, None, "m"),
            rule(true, 'c', Some(1), Some(3), "rwm"),
            rule(true, 'c', Some(136), None, "rw"),
            rule(false, 'c', Some(1), Some(3), "w"),
        ];
        let p = program(&rules);
        assert_eq!(run(&p, DEV_CHAR, ACC_READ, 1, 3), 1, "null readable");
        assert_eq!(
            run(&p, DEV_CHAR, ACC_WRITE, 1, 3),
            0,
            "null write denied by the later rule"
        );
        assert_eq!(run(&p, DEV_CHAR, ACC_MKNOD, 8, 0), 1, "mknod any char");
        assert_eq!(run(&p, DEV_BLOCK, ACC_MKNOD, 8, 0), 0, "no block mknod");
        assert_eq!(run(&p, DEV_BLOCK, ACC_READ, 8, 0), 0, "disk denied");
        assert_eq!(run(&p, DEV_CHAR, ACC_WRITE, 136, 7), 1, "pts");
        assert_eq!(
            run(&p, DEV_CHAR, ACC_MKNOD, 136, 7),
            1,
            "mknod via the char rule"
        );
        assert_eq!(run(&p, DEV_CHAR, ACC_READ, 1, 5), 0, "zero not listed");
    }

    #[test]
    fn default_rules_through_the_program() {
        let spec: oci_spec::runtime::Spec =
            serde_json::from_value(serde_json::json!({"ociVersion": "1.0.2"})).expect("spec");
        let p = program(&super::super::devices::rules(&spec));
        assert_eq!(run(&p, DEV_CHAR, ACC_READ, 1, 9), 1, "urandom");
        assert_eq!(run(&p, DEV_BLOCK, ACC_READ, 7, 0), 0, "loop0");
        assert_eq!(
            run(&p, DEV_BLOCK, ACC_MKNOD, 7, 0),
            1,
            "mknod is fine, use is not"
        );
    }

    /// For real: a child in a cgroup2 cgroup with the filter can open
    /// /dev/null but not /dev/zero. Needs root and a cgroup2 mount.
    #[test]
    fn kernel_enforces_the_filter() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: not root");
            return;
        }
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let Some(root) = mountinfo.lines().find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            post.starts_with("cgroup2 ")
                .then(|| pre.split_whitespace().nth(4).map(std::path::PathBuf::from))?
        }) else {
            eprintln!("skipped: no cgroup2 mount");
            return;
        };
        // The verifier takes the full default program too.
        let spec: oci_spec::runtime::Spec =
            serde_json::from_value(serde_json::json!({"ociVersion": "1.0.2",
            "linux": {"devices": [{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}]}}))
            .expect("spec");
        load(&program(&super::super::devices::rules(&spec))).expect("default program loads");
        // Loaded once, attached many times.
        let a = loaded(program(&super::super::devices::rules(&spec))).expect("load");
        let b = loaded(program(&super::super::devices::rules(&spec))).expect("cached");
        assert!(
            std::sync::Arc::ptr_eq(&a, &b),
            "the same rules, the same program"
        );
        // A program the verifier refuses: its reason comes back (the load is retried with
        // the log the first try does without).
        match load(&[insn(MOV_K, 0, 0, 0, 1)]) {
            Err(BpfError::Load(_, why)) => assert!(why.len() > 2, "no verifier log: {why:?}"),
            other => panic!("a program without exit loaded: {other:?}"),
        }

        let dir = root.join(format!("husk-bpf-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir cgroup");
        struct Rmdir(std::path::PathBuf);
        impl Drop for Rmdir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir(&self.0);
            }
        }
        let _cleanup = Rmdir(dir.clone());
        let rules = [
            rule(false, 'a', None, None, "rwm"),
            rule(true, 'c', Some(1), Some(3), "rwm"),
        ];
        attach(&dir, &rules).expect("attach");
        let procs =
            std::ffi::CString::new(dir.join("cgroup.procs").display().to_string()).expect("path");
        // SAFETY: the child only makes raw syscalls on prepared C strings, then _exits.
        let pid = match unsafe { nix::unistd::fork() }.expect("fork") {
            // SAFETY: open, write and _exit on C strings made before the fork:
            // async-signal-safe.
            nix::unistd::ForkResult::Child => unsafe {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    libc::_exit(10);
                }
                let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
                let zero = libc::open(c"/dev/zero".as_ptr(), libc::O_RDONLY);
                let eperm = zero < 0 && *libc::__errno_location() == libc::EPERM;
                libc::_exit(if null >= 0 && eperm {
                    0
                } else if null < 0 {
                    11
                } else {
                    12
                });
            },
            nix::unistd::ForkResult::Parent { child } => child,
        };
        let status = nix::sys::wait::waitpid(pid, None).expect("wait");
        assert_eq!(
            status,
            nix::sys::wait::WaitStatus::Exited(pid, 0),
            "10: join, 11: /dev/null denied, 12: /dev/zero allowed"
        );
    }
}
