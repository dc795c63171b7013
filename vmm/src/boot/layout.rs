//! Fixed guest-physical addresses of the boot structures (the Firecracker-style low-memory map).

/// GDT and (empty) IDT used by the boot vCPU state.
pub const BOOT_GDT_START: u64 = 0x500;
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`, its module list, and its memory map.
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MODLIST_START: u64 = 0x6040;
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Linux zero page (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables: PML4, PDPT, then four page directories covering 4 GiB with 2 MiB pages.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Extended BIOS data area: holds the MP table; reserved in the E820 map.
pub const EBDA_START: u64 = 0x9fc00;
pub const EBDA_END: u64 = 0xa0000;
/// Kernels load at 1 MiB and up.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// Highest address an initrd may end at (Linux's default `initrd_addr_max`).
pub const INITRD_ADDR_MAX: u64 = 0x3800_0000;
/// LAPIC and IOAPIC MMIO windows.
pub const APIC_START: u64 = 0xfee0_0000;
pub const IOAPIC_START: u64 = 0xfec0_0000;
