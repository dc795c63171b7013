//! The KVM VM: memory slots, in-kernel irqchip (PIC + IOAPIC + LAPICs) and PIT.

use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::kvm::KvmContext;

/// Three pages KVM needs for the TSS on Intel; just below the 4 GiB boundary, inside the MMIO hole.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot create the VM: {0}")]
    Create(#[source] kvm_ioctls::Error),
    #[error("cannot set the TSS address: {0}")]
    Tss(#[source] kvm_ioctls::Error),
    #[error("cannot create the in-kernel irqchip: {0}")]
    Irqchip(#[source] kvm_ioctls::Error),
    #[error("cannot create the PIT: {0}")]
    Pit(#[source] kvm_ioctls::Error),
    #[error("guest memory registration thread panicked")]
    SlotThread,
    #[error("cannot register guest memory slot {slot}: {source}")]
    MemorySlot {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
}

pub struct Vm {
    pub fd: VmFd,
}

impl Vm {
    pub fn new(kvm: &KvmContext, mem: &GuestMemoryMmap) -> Result<Self, VmError> {
        let fd = kvm.kvm.create_vm().map_err(VmError::Create)?;
        let vm = Self { fd };
        // Registering memory and creating the irqchip are both slow on some hosts (milliseconds
        // each under kvm-pvm) and take different KVM locks: do them in parallel.
        std::thread::scope(|s| {
            let slots = s.spawn(|| vm.register_memory(mem));
            let chips = vm.create_chips();
            slots.join().unwrap_or(Err(VmError::SlotThread)).and(chips)
        })?;
        Ok(vm)
    }

    fn create_chips(&self) -> Result<(), VmError> {
        self.fd
            .set_tss_address(KVM_TSS_ADDRESS)
            .map_err(VmError::Tss)?;
        self.fd.create_irq_chip().map_err(VmError::Irqchip)?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd.create_pit2(pit).map_err(VmError::Pit)
    }

    fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let slot = slot as u32;
            let host = region.as_ptr() as u64;
            let r = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host,
            };
            // SAFETY: the region is a live mmap owned by `mem`, which the VMM keeps alive for as
            // long as the VM exists (it is held by the `Vmm` until process exit).
            unsafe { self.fd.set_user_memory_region(r) }
                .map_err(|source| VmError::MemorySlot { slot, source })?;
        }
        Ok(())
    }
}
