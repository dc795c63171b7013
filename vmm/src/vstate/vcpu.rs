//! vCPUs: initial state (CPUID, MSRs, registers, LAPIC), and the run loop on its own thread that
//! dispatches port-I/O and MMIO exits to the buses.

use std::sync::Arc;
use std::time::Instant;

use kvm_bindings::{CpuId, Msrs, kvm_msr_entry};
use kvm_ioctls::{VcpuExit, VcpuFd};

use super::kvm::KvmContext;
use crate::boot::{EntryPoint, regs};
use crate::devices::bus::Bus;
use crate::devices::{ExitReason, ExitSignal};

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot create vCPU {id}: {source}")]
    Create {
        id: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot configure vCPU {id} ({what}): {source}")]
    Configure {
        id: u8,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    #[error("cannot spawn vCPU thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// Guest port the test guest (or any guest) writes once at entry; with `--boot-timer` the VMM
/// prints when that happened, measured from process start.
pub const BOOT_TIMER_PORT: u16 = 0x440;

/// CLOCK_MONOTONIC in nanoseconds (comparable across processes, unlike `Instant`).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The lifecycle of one vCPU thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuRunState {
    /// Created and configured, thread not started.
    Created,
    /// In the KVM_RUN loop.
    Running,
    /// Left the loop for this reason (reported to the `ExitSignal`).
    Exited(ExitReason),
}

/// What the buses and exit path need, shared by all vCPUs.
pub struct VcpuShared {
    pub pio: Bus,
    pub mmio: Bus,
    pub exit: Arc<ExitSignal>,
    pub boot_timer: Option<Instant>,
}

pub struct Vcpu {
    pub id: u8,
    fd: VcpuFd,
    pub state: VcpuRunState,
}

const CPUID_HYPERVISOR: u32 = 1 << 31;
const CPUID_MONITOR: u32 = 1 << 3;
const CPUID_HTT: u32 = 1 << 28;
const CPUID_TSC_DEADLINE: u32 = 1 << 24;

/// Filters the host-supported CPUID for vCPU `id` of `count`: APIC ids and topology, the
/// hypervisor bit, no MONITOR/MWAIT (KVM does not emulate it usefully), no PMU, and the
/// TSC-deadline timer when the in-kernel LAPIC has it (`tsc_deadline`): Linux then programs
/// its LAPIC timer in TSC ticks (the TSC frequency comes from kvmclock) and neither calibrates
/// the LAPIC timer against the PIT nor keeps the PIT as a clock event device.
pub fn filter_cpuid(supported: &CpuId, id: u8, count: u8, tsc_deadline: bool) -> CpuId {
    let mut cpuid = supported.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                e.ecx |= CPUID_HYPERVISOR;
                e.ecx &= !CPUID_MONITOR;
                if tsc_deadline {
                    e.ecx |= CPUID_TSC_DEADLINE;
                } else {
                    e.ecx &= !CPUID_TSC_DEADLINE;
                }
                if count > 1 {
                    e.edx |= CPUID_HTT;
                }
            }
            4 => {
                // Cores per package - 1 in bits 31..26; one thread per core.
                e.eax = (e.eax & 0x03ff_ffff) | (u32::from(count.saturating_sub(1)) << 26);
                e.eax &= !(0xfff << 14);
            }
            6 => e.ecx &= !1, // no APERF/MPERF
            0xa => (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0),
            0xb => {
                e.edx = u32::from(id);
                match e.index {
                    0 => (e.eax, e.ebx, e.ecx) = (0, 1, 0x100),
                    1 => (e.eax, e.ebx, e.ecx) = (8, u32::from(count), 0x201),
                    _ => (e.eax, e.ebx, e.ecx) = (0, 0, e.index),
                }
            }
            _ => {}
        }
    }
    cpuid
}

fn boot_msrs() -> Vec<kvm_msr_entry> {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    let zero = [
        MSR_IA32_SYSENTER_CS,
        MSR_IA32_SYSENTER_ESP,
        MSR_IA32_SYSENTER_EIP,
        MSR_STAR,
        MSR_CSTAR,
        MSR_KERNEL_GS_BASE,
        MSR_SYSCALL_MASK,
        MSR_LSTAR,
        MSR_IA32_TSC,
    ];
    let mut v: Vec<kvm_msr_entry> = zero
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            data: 0,
            ..Default::default()
        })
        .collect();
    v.push(kvm_msr_entry {
        index: MSR_IA32_MISC_ENABLE,
        data: 1,
        ..Default::default()
    }); // fast strings
    v
}

impl Vcpu {
    pub fn new(vm: &kvm_ioctls::VmFd, id: u8) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(|source| VcpuError::Create { id, source })?;
        Ok(Self {
            id,
            fd,
            state: VcpuRunState::Created,
        })
    }

    fn cfg_err(&self, what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VcpuError + '_ {
        move |source| VcpuError::Configure {
            id: self.id,
            what,
            source,
        }
    }

    /// Sets CPUID, MSRs and the LAPIC for every vCPU; the boot vCPU also gets the entry state.
    /// Application processors stay in wait-for-SIPI, as on real hardware.
    pub fn configure(
        &self,
        kvm: &KvmContext,
        count: u8,
        entry: EntryPoint,
    ) -> Result<(), VcpuError> {
        self.fd
            .set_cpuid2(&filter_cpuid(
                &kvm.supported_cpuid,
                self.id,
                count,
                kvm.tsc_deadline,
            ))
            .map_err(self.cfg_err("cpuid"))?;
        let msrs = Msrs::from_entries(&boot_msrs()).map_err(|_| VcpuError::Configure {
            id: self.id,
            what: "msrs",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        })?;
        self.fd.set_msrs(&msrs).map_err(self.cfg_err("msrs"))?;
        self.set_lint()?;
        if self.id != 0 {
            return Ok(());
        }
        self.fd
            .set_fpu(&regs::boot_fpu())
            .map_err(self.cfg_err("fpu"))?;
        let sregs = self.fd.get_sregs().map_err(self.cfg_err("get sregs"))?;
        let (sregs, r) = match entry {
            EntryPoint::Linux64(rip) => (regs::long_mode_sregs(sregs), regs::linux64_regs(rip)),
            EntryPoint::Pvh(rip) => (regs::protected_mode_sregs(sregs), regs::pvh_regs(rip)),
        };
        self.fd.set_sregs(&sregs).map_err(self.cfg_err("sregs"))?;
        self.fd.set_regs(&r).map_err(self.cfg_err("regs"))?;
        Ok(())
    }

    /// LINT0 = ExtINT (legacy PIC), LINT1 = NMI.
    fn set_lint(&self) -> Result<(), VcpuError> {
        const APIC_LVT0: usize = 0x350;
        const APIC_LVT1: usize = 0x360;
        const APIC_MODE_NMI: u32 = 0x4;
        const APIC_MODE_EXTINT: u32 = 0x7;
        let mut lapic = self.fd.get_lapic().map_err(self.cfg_err("get lapic"))?;
        for (off, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
            let mut b = [0u8; 4];
            for (i, x) in b.iter_mut().enumerate() {
                *x = lapic.regs[off + i] as u8;
            }
            let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
            for (i, x) in v.to_le_bytes().iter().enumerate() {
                lapic.regs[off + i] = *x as _;
            }
        }
        self.fd.set_lapic(&lapic).map_err(self.cfg_err("set lapic"))
    }

    /// Runs on its own thread until the VM must stop; reports why through the exit signal.
    pub fn start(
        mut self,
        shared: Arc<VcpuShared>,
    ) -> Result<std::thread::JoinHandle<()>, VcpuError> {
        std::thread::Builder::new()
            .name(format!("vcpu{}", self.id))
            .spawn(move || {
                // Capabilities are per thread: the event loop keeps the file server's
                // (`FS_CAPS`, with `--fs`), a vCPU thread, where the guest's port and MMIO
                // writes are decoded, keeps none, before the guest runs here.
                if let Err(e) = crate::confine::set_caps(&[], false) {
                    shared
                        .exit
                        .exit(ExitReason::Error(format!("vcpu capabilities: {e}")));
                    return;
                }
                // This thread's own list (the main thread installs its own after starting
                // the vCPUs), before the guest runs here.
                if let Err(e) = crate::seccomp::install(crate::seccomp::Role::Vcpu, false) {
                    shared
                        .exit
                        .exit(ExitReason::Error(format!("vcpu seccomp filter: {e}")));
                    return;
                }
                self.state = VcpuRunState::Running;
                let reason = self.run_loop(&shared);
                tracing::debug!(vcpu = self.id, ?reason, "vcpu exited");
                self.state = VcpuRunState::Exited(reason.clone());
                tracing::debug!(vcpu = self.id, state = ?self.state, "vcpu thread done");
                shared.exit.exit(reason);
            })
            .map_err(VcpuError::Spawn)
    }

    fn run_loop(&mut self, shared: &VcpuShared) -> ExitReason {
        let mut boot_timer_seen = false;
        let mut trail = ExitTrail::default();
        loop {
            let outcome = match self.fd.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    trail.push(Exit::Out, u64::from(port));
                    if port == BOOT_TIMER_PORT && !boot_timer_seen {
                        boot_timer_seen = true;
                        if let Some(t0) = shared.boot_timer {
                            eprintln!(
                                "husk-vmm: boot-timer guest-entry {} us after main, monotonic {} ns",
                                t0.elapsed().as_micros(),
                                monotonic_ns()
                            );
                        }
                    }
                    shared.pio.write(u64::from(port), data);
                    None
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    trail.push(Exit::In, u64::from(port));
                    shared.pio.read(u64::from(port), data);
                    None
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    trail.push(Exit::Read, addr);
                    shared.mmio.read(addr, data);
                    None
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    trail.push(Exit::Write, addr);
                    shared.mmio.write(addr, data);
                    None
                }
                Ok(VcpuExit::Hlt) => Some(ExitReason::GuestShutdown),
                Ok(VcpuExit::Shutdown) => Some(ExitReason::Error(
                    "guest triple fault (KVM_EXIT_SHUTDOWN)".into(),
                )),
                Ok(VcpuExit::SystemEvent(kind, _)) => Some(match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN
                    | kvm_bindings::KVM_SYSTEM_EVENT_RESET => ExitReason::GuestShutdown,
                    k => ExitReason::Error(format!("guest system event {k}")),
                }),
                Ok(VcpuExit::InternalError) => {
                    // SAFETY: the exit reason says the `internal` union member is the valid one.
                    let sub = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                    Some(ExitReason::Error(format!(
                        "KVM internal error, suberror {sub} (1 = instruction emulation failure)"
                    )))
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => Some(ExitReason::Error(format!(
                    "KVM entry failure, hardware reason {reason:#x} on cpu {cpu}"
                ))),
                Ok(VcpuExit::Intr) => None,
                Ok(other) => Some(ExitReason::Error(format!("unexpected KVM exit {other:?}"))),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
                Err(e) => Some(ExitReason::Error(format!("KVM_RUN failed: {e}"))),
            };
            if let Some(reason) = outcome {
                return match reason {
                    ExitReason::Error(msg) => {
                        // After a triple fault KVM has reset the vCPU (rip 0xfff0): the trail
                        // of exits is what is left of where the guest was.
                        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                        ExitReason::Error(format!(
                            "vcpu{}: {msg} at rip {rip:#x}; {trail}",
                            self.id
                        ))
                    }
                    r => r,
                };
            }
            if shared.exit.reason().is_some() {
                return ExitReason::Stopped;
            }
        }
    }
}

/// What a vCPU exit to user space was for.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Exit {
    Out,
    In,
    Read,
    Write,
}

/// How many exits the trail keeps.
const TRAIL: usize = 12;

/// The last port-I/O and MMIO exits of a vCPU (a fixed ring: nothing grows), named in the
/// error of a vCPU that stops on an error.
#[derive(Default)]
struct ExitTrail {
    last: [Option<(Exit, u64)>; TRAIL],
    count: u64,
}

impl ExitTrail {
    fn push(&mut self, kind: Exit, addr: u64) {
        self.last[(self.count % TRAIL as u64) as usize] = Some((kind, addr));
        self.count += 1;
    }
}

impl std::fmt::Display for ExitTrail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} I/O exits before", self.count)?;
        let start = self.count.saturating_sub(TRAIL as u64);
        for (n, i) in (start..self.count).enumerate() {
            if let Some((kind, addr)) = self.last[(i % TRAIL as u64) as usize] {
                let sep = if n == 0 { ", the last:" } else { "," };
                let kind = match kind {
                    Exit::Out => "out",
                    Exit::In => "in",
                    Exit::Read => "mmio-read",
                    Exit::Write => "mmio-write",
                };
                write!(f, "{sep} {kind} {addr:#x}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn cpuid_sets_apic_id_and_topology() {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xffff_ffff,
                ecx: CPUID_MONITOR,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xa,
                eax: 7,
                ..Default::default()
            },
        ];
        let c = CpuId::from_entries(&entries).expect("cpuid");
        let f = filter_cpuid(&c, 1, 2, false);
        let s = f.as_slice();
        assert_eq!(s[0].ecx & CPUID_TSC_DEADLINE, 0);
        assert_eq!(s[0].ebx >> 24, 1);
        assert_eq!((s[0].ebx >> 16) & 0xff, 2);
        assert_eq!(s[0].ebx & 0xffff, 0xffff);
        assert_ne!(s[0].ecx & CPUID_HYPERVISOR, 0);
        assert_eq!(s[0].ecx & CPUID_MONITOR, 0);
        assert_eq!((s[1].edx, s[1].ebx), (1, 2));
        assert_eq!(s[2].eax, 0);
    }

    #[test]
    fn exit_trail_keeps_the_last_exits_in_order() {
        let mut t = ExitTrail::default();
        assert_eq!(t.to_string(), "0 I/O exits before");
        t.push(Exit::Out, 0x3f8);
        t.push(Exit::Read, 0xd000_0000);
        assert_eq!(
            t.to_string(),
            "2 I/O exits before, the last: out 0x3f8, mmio-read 0xd0000000"
        );
        for port in 0..30u64 {
            t.push(Exit::In, port);
        }
        let s = t.to_string();
        assert!(
            s.starts_with("32 I/O exits before, the last: in 0x12,"),
            "{s}"
        );
        assert!(s.ends_with(", in 0x1d"), "{s}");
        assert_eq!(s.matches(", in ").count() + 1, TRAIL, "{s}");
    }

    #[test]
    fn cpuid_offers_the_tsc_deadline_timer_only_when_kvm_has_it() {
        let entries = [kvm_cpuid_entry2 {
            function: 1,
            ..Default::default()
        }];
        let c = CpuId::from_entries(&entries).expect("cpuid");
        let on = filter_cpuid(&c, 0, 1, true);
        assert_ne!(on.as_slice()[0].ecx & CPUID_TSC_DEADLINE, 0);
        let c = filter_cpuid(&on, 0, 1, false);
        assert_eq!(c.as_slice()[0].ecx & CPUID_TSC_DEADLINE, 0);
    }
}
