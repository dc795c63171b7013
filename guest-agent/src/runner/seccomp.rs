//! A small seccomp BPF generator for OCI `linux.seccomp` profiles (x86_64),
//! without libseccomp. The program:
//!
//! ```text
//!   ld arch; x86_64 -> ja x86_64 section; i386 (if listed) -> ja i386 section; ret default
//!   section: ld nr; [x86_64: jge X32_SYSCALL_BIT -> default]
//!            per rule: jne nr -> next rule; [argument checks -> next rule]; ret action; [ld nr]
//!            ret default
//! ```
//! Rules match in profile order (first match wins). Unknown syscall names are
//! skipped, as runc does. x32 syscalls get the default action.

use oci_spec::runtime::{LinuxSeccomp, LinuxSeccompAction, LinuxSeccompOperator};

use super::syscall_table::SYSCALLS_X86_64;
use super::syscall_table_i386::SYSCALLS_I386;
use oci_spec::runtime::Arch;

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("unsupported seccomp action {0:?}")]
    Action(LinuxSeccompAction),
    #[error("program too long ({0} instructions)")]
    TooLong(usize),
    #[error("argument index {0} out of range")]
    ArgIndex(usize),
    #[error("load filter: {0}")]
    Load(#[source] std::io::Error),
}

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const AUDIT_ARCH_I386: u32 = 0x4000_0003;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const OFF_ARGS: u32 = 16;

const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_KILL_THREAD: u32 = 0;
const RET_TRAP: u32 = 0x0003_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_TRACE: u32 = 0x7ff0_0000;
const RET_LOG: u32 = 0x7ffc_0000;
const RET_ALLOW: u32 = 0x7fff_0000;

const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const JGT_K: u16 = (libc::BPF_JMP | libc::BPF_JGT | libc::BPF_K) as u16;
const JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
const AND_K: u16 = (libc::BPF_ALU | libc::BPF_AND | libc::BPF_K) as u16;
const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
const JA: u16 = (libc::BPF_JMP | libc::BPF_JA) as u16;

pub fn syscall_number(name: &str) -> Option<i64> {
    lookup(SYSCALLS_X86_64, name)
}

fn lookup(table: &[(&str, i64)], name: &str) -> Option<i64> {
    table.iter().find(|(n, _)| *n == name).map(|(_, nr)| *nr)
}

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

pub fn action_value(action: LinuxSeccompAction, errno: Option<u32>) -> Result<u32, SeccompError> {
    Ok(match action {
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => RET_KILL_THREAD,
        LinuxSeccompAction::ScmpActKillProcess => RET_KILL_PROCESS,
        LinuxSeccompAction::ScmpActTrap => RET_TRAP,
        LinuxSeccompAction::ScmpActErrno => {
            RET_ERRNO | (errno.unwrap_or(libc::EPERM as u32) & 0xffff)
        }
        LinuxSeccompAction::ScmpActTrace => {
            RET_TRACE | (errno.unwrap_or(libc::EPERM as u32) & 0xffff)
        }
        LinuxSeccompAction::ScmpActLog => RET_LOG,
        LinuxSeccompAction::ScmpActAllow => RET_ALLOW,
        other => return Err(SeccompError::Action(other)),
    })
}

/// Where a conditional jump of an argument check goes.
#[derive(Clone, Copy)]
enum To {
    /// Skip n instructions forward inside the check.
    Skip(u8),
    /// The rule does not match: go to the next rule.
    Fail,
}

struct Insn {
    code: u16,
    k: u32,
    jt: To,
    jf: To,
}

fn check(
    index: usize,
    op: LinuxSeccompOperator,
    value: u64,
    value_two: u64,
) -> Result<Vec<Insn>, SeccompError> {
    if index > 5 {
        return Err(SeccompError::ArgIndex(index));
    }
    let lo_off = OFF_ARGS + 8 * index as u32;
    let hi_off = lo_off + 4;
    let ld = |off| Insn {
        code: LD_W_ABS,
        k: off,
        jt: To::Skip(0),
        jf: To::Skip(0),
    };
    let j = |code, k, jt, jf| Insn { code, k, jt, jf };
    let (vhi, vlo) = ((value >> 32) as u32, value as u32);
    use To::{Fail, Skip};
    Ok(match op {
        LinuxSeccompOperator::ScmpCmpEq => {
            vec![
                ld(hi_off),
                j(JEQ_K, vhi, Skip(0), Fail),
                ld(lo_off),
                j(JEQ_K, vlo, Skip(0), Fail),
            ]
        }
        LinuxSeccompOperator::ScmpCmpNe => {
            vec![
                ld(hi_off),
                j(JEQ_K, vhi, Skip(0), Skip(2)),
                ld(lo_off),
                j(JEQ_K, vlo, Fail, Skip(0)),
            ]
        }
        LinuxSeccompOperator::ScmpCmpGt | LinuxSeccompOperator::ScmpCmpGe => {
            let lo_code = if op == LinuxSeccompOperator::ScmpCmpGt {
                JGT_K
            } else {
                JGE_K
            };
            vec![
                ld(hi_off),
                j(JGT_K, vhi, Skip(3), Skip(0)),
                j(JEQ_K, vhi, Skip(0), Fail),
                ld(lo_off),
                j(lo_code, vlo, Skip(0), Fail),
            ]
        }
        LinuxSeccompOperator::ScmpCmpLt | LinuxSeccompOperator::ScmpCmpLe => {
            let lo_code = if op == LinuxSeccompOperator::ScmpCmpLt {
                JGE_K
            } else {
                JGT_K
            };
            vec![
                ld(hi_off),
                j(JGT_K, vhi, Fail, Skip(0)),
                j(JEQ_K, vhi, Skip(0), Skip(2)),
                ld(lo_off),
                j(lo_code, vlo, Fail, Skip(0)),
            ]
        }
        LinuxSeccompOperator::ScmpCmpMaskedEq => {
            let (ehi, elo) = ((value_two >> 32) as u32, value_two as u32);
            vec![
                ld(hi_off),
                j(AND_K, vhi, Skip(0), Skip(0)),
                j(JEQ_K, ehi, Skip(0), Fail),
                ld(lo_off),
                j(AND_K, vlo, Skip(0), Skip(0)),
                j(JEQ_K, elo, Skip(0), Fail),
            ]
        }
    })
}

/// Compile a profile into a BPF program.
pub fn compile(profile: &LinuxSeccomp) -> Result<Vec<libc::sock_filter>, SeccompError> {
    let default = action_value(profile.default_action(), profile.default_errno_ret())?;
    let x64 = section(profile, SYSCALLS_X86_64, default, true)?;
    let i386 = match profile.architectures() {
        Some(archs) if archs.contains(&Arch::ScmpArchX86) => {
            Some(section(profile, SYSCALLS_I386, default, false)?)
        }
        _ => None,
    };
    // Dispatch on the architecture; sections are too long for 8-bit jumps.
    let mut prog = vec![
        stmt(LD_W_ABS, OFF_ARCH),
        jump(JEQ_K, AUDIT_ARCH_X86_64, 0, 1),
    ];
    let x64_at = prog.len();
    prog.push(stmt(JA, 0));
    let mut i386_at = None;
    if i386.is_some() {
        prog.push(jump(JEQ_K, AUDIT_ARCH_I386, 0, 1));
        i386_at = Some(prog.len());
        prog.push(stmt(JA, 0));
    }
    prog.push(stmt(RET_K, default));
    prog[x64_at].k = (prog.len() - x64_at - 1) as u32;
    prog.extend(x64);
    if let (Some(at), Some(section)) = (i386_at, i386) {
        prog[at].k = (prog.len() - at - 1) as u32;
        prog.extend(section);
    }
    if prog.len() > 4096 {
        return Err(SeccompError::TooLong(prog.len()));
    }
    Ok(prog)
}

/// The rules of one architecture: `ld nr`, rule blocks, `ret default`.
fn section(
    profile: &LinuxSeccomp,
    table: &[(&str, i64)],
    default: u32,
    x64: bool,
) -> Result<Vec<libc::sock_filter>, SeccompError> {
    let mut prog = vec![stmt(LD_W_ABS, OFF_NR)];
    if x64 {
        prog.push(jump(JGE_K, X32_SYSCALL_BIT, 0, 1));
        prog.push(stmt(RET_K, default));
    }
    for rule in profile.syscalls().iter().flatten() {
        let action = action_value(rule.action(), rule.errno_ret())?;
        if action == default && rule.args().as_ref().is_none_or(|a| a.is_empty()) {
            continue;
        }
        let mut checks = Vec::new();
        for a in rule.args().iter().flatten() {
            checks.extend(check(
                a.index(),
                a.op(),
                a.value(),
                a.value_two().unwrap_or(0),
            )?);
        }
        for name in rule.names() {
            let Some(nr) = lookup(table, name) else {
                tracing::debug!(name, "seccomp: unknown syscall skipped");
                continue;
            };
            // Block: jeq nr (fall / skip block), checks..., ret action, [ld nr].
            let reload = !checks.is_empty();
            let body = checks.len() + 1 + usize::from(reload);
            if body > 255 {
                return Err(SeccompError::TooLong(body));
            }
            prog.push(jump(JEQ_K, nr as u32, 0, body as u8));
            // The fail target is the `ld nr` after `ret action` (or next rule).
            let fail_at = checks.len() + 1; // relative to the first check
            for (i, c) in checks.iter().enumerate() {
                let resolve = |t: To| match t {
                    To::Skip(n) => n,
                    To::Fail => (fail_at - i - 1) as u8,
                };
                prog.push(libc::sock_filter {
                    code: c.code,
                    jt: resolve(c.jt),
                    jf: resolve(c.jf),
                    k: c.k,
                });
            }
            prog.push(stmt(RET_K, action));
            if reload {
                prog.push(stmt(LD_W_ABS, OFF_NR));
            }
        }
    }
    prog.push(stmt(RET_K, default));
    Ok(prog)
}

/// seccomp(2) filter flags of a profile (LOG, TSYNC, SPEC_ALLOW).
pub fn flags(profile: &LinuxSeccomp) -> u32 {
    use oci_spec::runtime::LinuxSeccompFilterFlag as F;
    profile.flags().iter().flatten().fold(0, |acc, f| {
        acc | match f {
            F::SeccompFilterFlagTsync => 1,
            F::SeccompFilterFlagLog => 2,
            F::SeccompFilterFlagSpecAllow => 4,
            // Only meaningful with user notification, which is not supported.
            F::SeccompFilterFlagWaitKillableRecv => 0,
        }
    })
}

/// Install the filter for this thread (and its future children).
pub fn load(prog: &[libc::sock_filter], flags: u32) -> Result<(), SeccompError> {
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    const SECCOMP_SET_MODE_FILTER: libc::c_ulong = 1;
    // SAFETY: fprog points at `prog`, which outlives the call; the kernel copies it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            SECCOMP_SET_MODE_FILTER,
            flags as libc::c_ulong,
            &fprog as *const libc::sock_fprog,
        )
    };
    if r < 0 {
        Err(SeccompError::Load(std::io::Error::last_os_error()))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny classic-BPF interpreter over seccomp_data, to check the program.
    fn run(prog: &[libc::sock_filter], arch: u32, nr: i64, args: [u64; 6]) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&(nr as u32).to_le_bytes());
        data[4..8].copy_from_slice(&arch.to_le_bytes());
        for (i, a) in args.iter().enumerate() {
            data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
        }
        let (mut acc, mut pc) = (0u32, 0usize);
        loop {
            let ins = prog[pc];
            pc += 1;
            match ins.code {
                LD_W_ABS => {
                    let k = ins.k as usize;
                    acc = u32::from_le_bytes(data[k..k + 4].try_into().expect("4 bytes"));
                }
                AND_K => acc &= ins.k,
                RET_K => return ins.k,
                JA => pc += ins.k as usize,
                JEQ_K | JGT_K | JGE_K => {
                    let t = match ins.code {
                        JEQ_K => acc == ins.k,
                        JGT_K => acc > ins.k,
                        _ => acc >= ins.k,
                    };
                    pc += usize::from(if t { ins.jt } else { ins.jf });
                }
                c => panic!("unknown op {c}"),
            }
        }
    }

    fn profile(json: serde_json::Value) -> LinuxSeccomp {
        serde_json::from_value(json).expect("profile")
    }

    #[test]
    fn allow_list_with_errno_default() {
        let p = profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [{"names": ["read", "write", "no_such_call"], "action": "SCMP_ACT_ALLOW"}]
        }));
        let prog = compile(&p).expect("compile");
        let read = syscall_number("read").expect("read");
        let mkdir = syscall_number("mkdir").expect("mkdir");
        assert_eq!(run(&prog, AUDIT_ARCH_X86_64, read, [0; 6]), RET_ALLOW);
        assert_eq!(run(&prog, AUDIT_ARCH_X86_64, mkdir, [0; 6]), RET_ERRNO | 1);
        assert_eq!(
            run(&prog, 0x4000_0003, read, [0; 6]),
            RET_ERRNO | 1,
            "foreign arch gets the default"
        );
        assert_eq!(
            run(&prog, AUDIT_ARCH_X86_64, read | 0x4000_0000, [0; 6]),
            RET_ERRNO | 1,
            "x32"
        );
    }

    #[test]
    fn i386_only_when_listed() {
        let rules =
            serde_json::json!([{"names": ["read", "socketcall"], "action": "SCMP_ACT_ALLOW"}]);
        let with = profile(
            serde_json::json!({"defaultAction": "SCMP_ACT_ERRNO", "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"], "syscalls": rules}),
        );
        let without =
            profile(serde_json::json!({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": rules}));
        let (read32, socketcall) = (
            lookup(SYSCALLS_I386, "read").expect("read"),
            lookup(SYSCALLS_I386, "socketcall").expect("sc"),
        );
        let read64 = syscall_number("read").expect("read");
        let p = compile(&with).expect("compile");
        assert_eq!(run(&p, AUDIT_ARCH_I386, read32, [0; 6]), RET_ALLOW);
        assert_eq!(
            run(&p, AUDIT_ARCH_I386, socketcall, [0; 6]),
            RET_ALLOW,
            "i386-only syscall"
        );
        assert_eq!(
            run(&p, AUDIT_ARCH_I386, read64, [0; 6]),
            RET_ERRNO | 1,
            "x86_64 number 0 is restart_syscall on i386"
        );
        assert_eq!(run(&p, AUDIT_ARCH_X86_64, read64, [0; 6]), RET_ALLOW);
        let p = compile(&without).expect("compile");
        assert_eq!(run(&p, AUDIT_ARCH_I386, read32, [0; 6]), RET_ERRNO | 1);
        assert_eq!(run(&p, AUDIT_ARCH_X86_64, read64, [0; 6]), RET_ALLOW);
    }

    #[test]
    fn argument_operators_compare_64_bits() {
        let nr = syscall_number("personality").expect("nr");
        let cases = [
            (
                "SCMP_CMP_EQ",
                0x1_0000_0005u64,
                0u64,
                vec![(0x1_0000_0005u64, true), (5, false), (0x1_0000_0006, false)],
            ),
            (
                "SCMP_CMP_NE",
                8,
                0,
                vec![(8, false), (9, true), (0x1_0000_0008, true)],
            ),
            (
                "SCMP_CMP_GT",
                0x1_0000_0000,
                0,
                vec![
                    (0x1_0000_0001, true),
                    (0x1_0000_0000, false),
                    (0xffff_ffff, false),
                    (0x2_0000_0000, true),
                ],
            ),
            (
                "SCMP_CMP_GE",
                10,
                0,
                vec![(10, true), (9, false), (0x1_0000_0000, true)],
            ),
            (
                "SCMP_CMP_LT",
                0x1_0000_0000,
                0,
                vec![
                    (0xffff_ffff, true),
                    (0x1_0000_0000, false),
                    (0x2_0000_0000, false),
                ],
            ),
            (
                "SCMP_CMP_LE",
                10,
                0,
                vec![(10, true), (11, false), (0, true), (0x1_0000_0000, false)],
            ),
            (
                "SCMP_CMP_MASKED_EQ",
                0xff,
                0x08,
                vec![(0x108, true), (0x109, false)],
            ),
        ];
        for (op, value, value_two, probes) in cases {
            let p = profile(serde_json::json!({
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": ["personality"], "action": "SCMP_ACT_ERRNO", "errnoRet": 22,
                              "args": [{"index": 0, "value": value, "valueTwo": value_two, "op": op}]},
                             {"names": ["personality"], "action": "SCMP_ACT_KILL_PROCESS"}]
            }));
            let prog = compile(&p).expect("compile");
            for (arg, matches) in probes {
                let want = if matches {
                    RET_ERRNO | 22
                } else {
                    RET_KILL_PROCESS
                };
                assert_eq!(
                    run(&prog, AUDIT_ARCH_X86_64, nr, [arg, 0, 0, 0, 0, 0]),
                    want,
                    "{op} {value:#x} vs {arg:#x}"
                );
            }
        }
    }
}
