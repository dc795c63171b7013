#![allow(clippy::unwrap_used)]
//! husk's CRI conformance suite (tests/src/conformance): the same cases in the
//! namespace sandbox (`husk-ns`) and in a VM pod on QEMU/TCG (`husk-qemu`).
//! The VM run reuses one pod for every case (TCG is slow) and checks the
//! by-design exclusions of VM pods (`VM_EXCLUSIONS`, listed in docs/vm.md).
//!
//! `containerd_reference` runs the same cases on Debian's containerd 1.6 + runc (its CRI
//! plugin, a CNI bridge network of its own) to show that the expectations are containerd's
//! semantics; what containerd 1.6 lacks is skipped by name and reason
//! (`CONTAINERD_1_6_GAPS`).
//!
//! Not here, with their own suites: port mappings and pod IPs need a CNI
//! network (tests/tests/network.rs), stats (runtime_ns.rs, runtime_vm.rs).
//!
//! The VM test needs HUSK_GUEST_KERNEL / HUSK_GUEST_INITRD (tests/run.sh
//! builds them) and qemu-system-x86_64, and prints `skipped: <reason>` otherwise.

use husk_tests::conformance::{self as conf, Kind, Suite, runtime, security, storage};
use husk_tests::require;
use husk_tests::runtime::{NS_NEEDS, ns_env_ok};
use husk_tests::runtime::{VM_HANDLERS, VM_NEEDS, guest, vm_env_ok as vm_ok, vm_handler};

async fn ns_suite() -> Suite {
    Suite::start(Kind::Namespace, "").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ns_runtime() {
    require!(ns_env_ok(), NS_NEEDS);
    let s = ns_suite().await;
    runtime::runtime_info(&s).await;
    runtime::hostname_and_dns(&s).await;
    runtime::lifecycle_and_id_prefixes(&s).await;
    runtime::exec_sync(&s).await;
    runtime::logs_and_reopen(&s).await;
    runtime::image_references(&s).await;
    runtime::streaming(&s).await;
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ns_security() {
    require!(ns_env_ok(), NS_NEEDS);
    let s = ns_suite().await;
    security::users_and_groups(&s).await;
    security::capabilities(&s).await;
    security::paths_and_no_new_privs(&s).await;
    security::seccomp(&s).await;
    security::sysctls(&s).await;
    security::privileged_needs_privileged_pod(&s).await;
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ns_storage() {
    require!(ns_env_ok(), NS_NEEDS);
    let s = ns_suite().await;
    storage::volumes(&s).await;
    storage::mount_propagation(&s).await;
    s.finish().await;
}

/// The same cases on the reference, containerd 1.6 + runc (Debian's), but for
/// [`conf::CONTAINERD_1_6_GAPS`]: the suite's expectations are containerd's semantics.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn containerd_reference() {
    require!(ns_env_ok(), NS_NEEDS);
    require!(
        containerd_ok(),
        "needs Debian's containerd, runc and containernetworking-plugins (tests/install-deps.sh installs them)"
    );
    let s = Suite::start(Kind::Containerd, "").await;
    runtime::runtime_info(&s).await;
    runtime::hostname_and_dns(&s).await;
    runtime::lifecycle_and_id_prefixes(&s).await;
    runtime::exec_sync(&s).await;
    runtime::logs_and_reopen(&s).await;
    runtime::image_references(&s).await;
    runtime::streaming(&s).await;
    security::users_and_groups(&s).await;
    security::capabilities(&s).await;
    security::paths_and_no_new_privs(&s).await;
    security::seccomp(&s).await;
    security::sysctls(&s).await;
    security::privileged_needs_privileged_pod(&s).await;
    storage::volumes(&s).await;
    storage::mount_propagation(&s).await;
    s.finish().await;
}

fn containerd_ok() -> bool {
    [
        "/usr/bin/containerd",
        "/usr/sbin/runc",
        "/usr/lib/cni/bridge",
        "/usr/lib/cni/host-local",
    ]
    .iter()
    .all(|p| std::path::Path::new(p).exists())
}

/// Every case in one VM pod, then the exclusions.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn vm_conformance() {
    require!(vm_ok(), VM_NEEDS);
    let (k, i) = guest().unwrap();
    let cfg = format!(
        "[runtime]\ndefault_handler = \"{q}\"\n[runtime.handlers]\n{VM_HANDLERS}husk-ns = \"namespace\"\n\
         [runtime.vm]\nkernel = \"{k}\"\ninitrd = \"{i}\"\nboot_timeout_ms = 90000\nmemory_mib = 256\n",
        q = vm_handler()
    );
    let s = Suite::start(Kind::Vm, &cfg).await;
    let t = std::time::Instant::now();
    runtime::runtime_info(&s).await;
    runtime::hostname_and_dns(&s).await;
    security::users_and_groups(&s).await;
    security::capabilities(&s).await;
    storage::guest_kernel_networking(&s).await;
    storage::volumes(&s).await;
    conf::vm_exclusions(&s).await;
    runtime::lifecycle_and_id_prefixes(&s).await;
    runtime::exec_sync(&s).await;
    runtime::logs_and_reopen(&s).await;
    runtime::image_references(&s).await;
    runtime::streaming(&s).await;
    security::paths_and_no_new_privs(&s).await;
    security::seccomp(&s).await;
    security::sysctls(&s).await;
    storage::mount_propagation(&s).await;
    println!("VM conformance cases: {:?}", t.elapsed());
    s.finish().await;
}
