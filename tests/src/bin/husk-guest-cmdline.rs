//! Prints huskd's guest kernel command line for a VM handler kind, `vm` (husk-vmm) or `qemu`,
//! before the operator's `kernel_params`: what the nested scripts (tests/nested/bootratio-l1.sh)
//! boot guests with, so they measure huskd's own tuning.

use husk_host::config::HandlerKind;
use husk_host::sandbox::vm::guest_cmdline;

fn main() -> anyhow::Result<()> {
    let kind = match std::env::args().nth(1).as_deref() {
        Some("vm") => HandlerKind::Vm,
        Some("qemu") => HandlerKind::Qemu,
        _ => anyhow::bail!("usage: husk-guest-cmdline vm|qemu"),
    };
    println!("{}", guest_cmdline(kind));
    Ok(())
}
