//! The QEMU backend's command line (q35, memfd shared memory for vhost-user,
//! PCIe root ports for disk hot-plug); `qmp.rs` talks to the running VM.
//!
//! Why q35 and not microvm: microvm has no PCI and no hot-plug, and under
//! TCG it hangs in TSC calibration in ~5% of boots without HPET/PM timer.
//! q35 boots ~0.1 s slower here, never hung, and takes `device_add` of
//! virtio-blk disks on pre-made `pcie-root-port`s (native PCIe hot-plug:
//! ACPI hot-plug is switched off so the guest's pciehp handles the slots).

pub(super) mod launch;
mod net;
pub mod qmp;

use std::path::Path;

use crate::config::Accel;

pub use super::host::{find_binary, hw_virt, kvm_opens};

/// What a QEMU VM is started with.
pub struct QemuSpec<'a> {
    pub binary: &'a Path,
    pub accel: Accel,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub cmdline: &'a str,
    /// The serial console's file; `None`: QEMU's stdout (`-serial stdio`), used as the
    /// inherited fd, never reopened by path (a jailed QEMU may not open huskd's pipe).
    pub console: Option<&'a Path>,
    pub vhost_user_vsock: &'a Path,
    /// husk-vmm's virtio-fs server for the pod share (`husk-vmm vhost-user fs`) and its tag.
    pub vhost_user_fs: Option<(&'a Path, &'a str)>,
    pub qmp: &'a Path,
    pub hotplug_slots: u32,
    pub name: &'a str,
    /// TCG's translation cache, MiB (0: QEMU's default, up to 1 GiB of host memory).
    pub tcg_tb_mib: u32,
    /// A virtio-balloon with free page reporting: pages the guest frees go back to the host.
    pub free_page_reporting: bool,
}

/// QEMU's seccomp policy: no obsolete calls, no set*id, no fork/exec, no scheduler or
/// affinity changes.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// Root port `i` for hot-plugged disks.
pub fn slot_bus(i: u32) -> String {
    format!("hp{i}")
}

/// QEMU's arguments for `spec` (accel already resolved: Kvm or Tcg).
pub fn args(spec: &QemuSpec<'_>) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    let (accel, cpu) = match spec.accel {
        Accel::Kvm => ("kvm".to_string(), "host"),
        _ if spec.tcg_tb_mib > 0 => (format!("tcg,tb-size={}", spec.tcg_tb_mib), "max"),
        _ => ("tcg".to_string(), "max"),
    };
    push(&["-name", &format!("{},debug-threads=on", spec.name)]);
    push(&[
        "-machine",
        "q35,memory-backend=mem",
        "-accel",
        &accel,
        "-cpu",
        cpu,
    ]);
    push(&[
        "-smp",
        &spec.vcpus.to_string(),
        "-m",
        &format!("{}M", spec.memory_mib),
    ]);
    // vhost-user devices map guest memory: it must be a shareable fd.
    push(&[
        "-object",
        &format!(
            "memory-backend-memfd,id=mem,size={}M,share=on,dump=off",
            spec.memory_mib
        ),
    ]);
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]);
    push(&[
        "-global",
        "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off",
    ]);
    // QEMU's own seccomp filter (on top of the jail it runs in: see `jail.rs`).
    push(&["-sandbox", SANDBOX]);
    let serial = match spec.console {
        Some(p) => format!("file:{}", p.display()),
        None => "stdio".to_string(),
    };
    push(&["-serial", &serial]);
    push(&["-kernel", &spec.kernel.display().to_string()]);
    push(&["-initrd", &spec.initrd.display().to_string()]);
    push(&["-append", spec.cmdline]);
    push(&[
        "-chardev",
        &format!("socket,id=vsock,path={}", spec.vhost_user_vsock.display()),
        "-device",
        "vhost-user-vsock-pci,chardev=vsock",
    ]);
    if let Some((sock, tag)) = spec.vhost_user_fs {
        push(&[
            "-chardev",
            &format!("socket,id=fs,path={}", sock.display()),
            "-device",
            &format!("vhost-user-fs-pci,chardev=fs,tag={tag}"),
        ]);
    }
    if spec.free_page_reporting {
        push(&["-device", "virtio-balloon-pci,free-page-reporting=on"]);
    }
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", spec.qmp.display()),
    ]);
    for i in 0..spec.hotplug_slots {
        push(&[
            "-device",
            &format!(
                "pcie-root-port,id={},bus=pcie.0,chassis={},slot={}",
                slot_bus(i),
                i + 1,
                i + 1
            ),
        ]);
    }
    a
}

/// Resolves `auto`: KVM when the CPU has hardware virtualisation and
/// /dev/kvm opens, else TCG. (`kvm-pvm` hosts have /dev/kvm without VMX/SVM;
/// Linux guests do not reach user space there.)
pub fn resolve_accel(accel: Accel) -> Accel {
    match accel {
        Accel::Auto => {
            if hw_virt() && kvm_opens() {
                Accel::Kvm
            } else {
                Accel::Tcg
            }
        }
        a => a,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line() {
        let p = Path::new;
        let a = args(&QemuSpec {
            binary: p("qemu-system-x86_64"),
            accel: Accel::Tcg,
            vcpus: 2,
            memory_mib: 384,
            kernel: p("/k"),
            initrd: p("/i"),
            cmdline: "console=ttyS0",
            console: Some(p("/d/console.log")),
            vhost_user_vsock: p("/d/vu.sock"),
            vhost_user_fs: Some((p("/d/fs.sock"), "husk-share")),
            qmp: p("/d/qmp.sock"),
            hotplug_slots: 2,
            name: "husk-x",
            tcg_tb_mib: 0,
            free_page_reporting: false,
        });
        let s = a.join(" ");
        assert!(s.contains("-accel tcg -cpu max"), "{s}");
        assert!(s.contains("-smp 2 -m 384M"), "{s}");
        assert!(
            s.contains("memory-backend-memfd,id=mem,size=384M,share=on,dump=off"),
            "{s}"
        );
        assert!(s.contains("vhost-user-vsock-pci,chardev=vsock"), "{s}");
        assert!(
            s.contains(
                "socket,id=fs,path=/d/fs.sock -device vhost-user-fs-pci,chardev=fs,tag=husk-share"
            ),
            "{s}"
        );
        assert!(
            s.contains("pcie-root-port,id=hp1,bus=pcie.0,chassis=2,slot=2"),
            "{s}"
        );
        assert!(!s.contains("hp2"), "{s}");
        assert!(s.contains("-append console=ttyS0"), "{s}");
        assert!(
            s.contains(
                "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
            ),
            "{s}"
        );
        assert!(!s.contains("balloon"), "{s}");
        assert_eq!(resolve_accel(Accel::Tcg), Accel::Tcg);
        let a = args(&QemuSpec {
            binary: p("qemu-system-x86_64"),
            accel: Accel::Tcg,
            vcpus: 1,
            memory_mib: 256,
            kernel: p("/k"),
            initrd: p("/i"),
            cmdline: "",
            console: None,
            vhost_user_vsock: p("/d/vu.sock"),
            vhost_user_fs: None,
            qmp: p("/d/qmp.sock"),
            hotplug_slots: 0,
            name: "husk-y",
            tcg_tb_mib: 24,
            free_page_reporting: true,
        })
        .join(" ");
        assert!(a.contains("-accel tcg,tb-size=24 -cpu max"), "{a}");
        assert!(
            a.contains("-device virtio-balloon-pci,free-page-reporting=on"),
            "{a}"
        );
    }
}
