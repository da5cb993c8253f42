//! Port-I/O interface between Specula guests and the VMM that runs them.
//!
//! Shared by the guests (compiled `no_std`) and by host code, so it only holds
//! constants. The VMM's device manager owns the other side of each port.

/// COM1 8250 UART base port.
pub const COM1_PORT: u16 = 0x3f8;
/// Debug-exit port in the style of QEMU's isa-debug-exit: a byte written here
/// ends the VM, and the `vmm` exits with that byte as its status.
pub const DEBUG_EXIT_PORT: u16 = 0x501;
/// Writing any byte here parks the calling vCPU until the VM stops (ring 3
/// cannot `hlt`, and spinning would steal host cores from the working vCPUs).
pub const PARK_PORT: u16 = 0x502;
/// The most vCPUs a Specula guest image supports (one TSS and stack each).
pub const MAX_CPUS: u32 = 32;
/// Magic of the PVH `hvm_start_info` structure.
pub const HVM_START_MAGIC: u32 = 0x336e_c578;
