//! The `/dev/kvm` handle and the capability checks made before anything else.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm};

#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("/dev/kvm is missing (no KVM on this host)")]
    Missing,
    #[error("/dev/kvm is unusable: {0}")]
    Open(#[source] kvm_ioctls::Error),
    #[error("/dev/kvm is unusable: KVM_GET_API_VERSION failed (not a KVM device?)")]
    NotKvm,
    #[error("unsupported KVM API version {0} (want 12)")]
    ApiVersion(i32),
    #[error("KVM lacks a required capability: {0:?}")]
    MissingCap(Cap),
    #[error("cannot query supported CPUID: {0}")]
    Cpuid(#[source] kvm_ioctls::Error),
}

/// The capabilities this VMM relies on.
const REQUIRED_CAPS: [Cap; 6] = [
    Cap::Irqchip,
    Cap::Ioeventfd,
    Cap::Irqfd,
    Cap::UserMemory,
    Cap::SetTssAddr,
    Cap::Pit2,
];

pub struct KvmContext {
    pub kvm: Kvm,
    pub supported_cpuid: CpuId,
    /// The in-kernel LAPIC has the TSC-deadline timer mode (`KVM_CAP_TSC_DEADLINE_TIMER`).
    /// KVM_GET_SUPPORTED_CPUID never reports it: the VMM advertises it in CPUID itself.
    pub tsc_deadline: bool,
}

impl KvmContext {
    pub fn new() -> Result<Self, KvmError> {
        if !std::path::Path::new("/dev/kvm").exists() {
            return Err(KvmError::Missing);
        }
        let kvm = Kvm::new().map_err(KvmError::Open)?;
        let v = kvm.get_api_version();
        if v < 0 {
            return Err(KvmError::NotKvm);
        }
        if v != 12 {
            return Err(KvmError::ApiVersion(v));
        }
        for cap in REQUIRED_CAPS {
            if !kvm.check_extension(cap) {
                return Err(KvmError::MissingCap(cap));
            }
        }
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(KvmError::Cpuid)?;
        let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
        Ok(Self {
            kvm,
            supported_cpuid,
            tsc_deadline,
        })
    }
}
