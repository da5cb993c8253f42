//! Guest-physical memory layout of a Specula x86_64 VM.

/// Start of the boot GDT.
pub const BOOT_GDT_START: u64 = 0x500;
/// Start of the (empty) boot IDT.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initramfs).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map.
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Linux zero page (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Boot page tables: PML4, PDPT and PD identity-mapping the first 1 GiB.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest kernel command line accepted (Linux x86's COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// End of usable low RAM: the EBDA starts here.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables (RSDP first) in the BIOS area, where Linux also scans for the RSDP.
pub const ACPI_START: u64 = 0xe0000;
/// The MP table lives in the BIOS area, where Linux scans for it.
pub const MPTABLE_START: u64 = 0xf0000;
/// The real-mode reset vector (F000:FFF0), where a BIOS reboot lands.
pub const RESET_VECTOR_START: u64 = 0xffff0;
/// Kernels are loaded from 1 MiB up.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap below 4 GiB (LAPIC, IOAPIC and device windows).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap: RAM resumes here.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Identity-mapped TSS required by KVM on Intel, inside the MMIO gap.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// IOAPIC and LAPIC default bases (for the MP table).
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;
