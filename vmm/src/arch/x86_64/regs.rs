//! Boot register state: general registers, segments and control registers,
//! boot page tables, and the FPU.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::gdt::{gdt_entry, kvm_segment_from_gdt};
use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START, PVH_INFO_START,
    ZERO_PAGE_START,
};

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// Failures while setting boot registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("KVM_GET_SREGS failed")]
    GetSregs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_SREGS failed")]
    SetSregs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_REGS failed")]
    SetRegs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_FPU failed")]
    SetFpu(#[source] kvm_ioctls::Error),
    #[error("cannot write the boot GDT, IDT or page tables into guest memory")]
    WriteTables(#[source] vm_memory::GuestMemoryError),
}

/// Which boot protocol the entry point expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootProtocol {
    /// Linux 64-bit boot protocol: long mode, paging on, RSI = boot_params.
    Linux64,
    /// PVH: 32-bit protected mode, paging off, EBX = hvm_start_info.
    Pvh,
}

/// Sets RIP, RSP, RFLAGS and the protocol's pointer register.
pub fn setup_regs(vcpu: &VcpuFd, entry: u64, protocol: BootProtocol) -> Result<(), RegsError> {
    let regs = match protocol {
        BootProtocol::Linux64 => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        },
        BootProtocol::Pvh => kvm_regs { rflags: 0x2, rip: entry, rbx: PVH_INFO_START, ..Default::default() },
    };
    vcpu.set_regs(&regs).map_err(RegsError::SetRegs)
}

/// Writes the boot GDT (and, for Linux, page tables) and sets the segment and control registers.
pub fn setup_sregs(mem: &GuestMemoryMmap, vcpu: &VcpuFd, protocol: BootProtocol) -> Result<(), RegsError> {
    let mut sregs = vcpu.get_sregs().map_err(RegsError::GetSregs)?;
    configure_segments_and_sregs(mem, &mut sregs, protocol)?;
    if protocol == BootProtocol::Linux64 {
        setup_page_tables(mem, &mut sregs)?;
    }
    vcpu.set_sregs(&sregs).map_err(RegsError::SetSregs)
}

/// The boot GDT: null, code, data, TSS. Long-mode code for Linux, 32-bit code for PVH.
fn boot_gdt(protocol: BootProtocol) -> [u64; 4] {
    let code = match protocol {
        BootProtocol::Linux64 => gdt_entry(0xa09b, 0, 0xfffff),
        BootProtocol::Pvh => gdt_entry(0xc09b, 0, 0xfffff),
    };
    [gdt_entry(0, 0, 0), code, gdt_entry(0xc093, 0, 0xfffff), gdt_entry(0x808b, 0, 0xfffff)]
}

fn configure_segments_and_sregs(
    mem: &GuestMemoryMmap,
    sregs: &mut kvm_sregs,
    protocol: BootProtocol,
) -> Result<(), RegsError> {
    let gdt = boot_gdt(protocol);
    for (index, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + index as u64 * 8)).map_err(RegsError::WriteTables)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START)).map_err(RegsError::WriteTables)?;

    let code = kvm_segment_from_gdt(gdt[1], 1);
    let data = kvm_segment_from_gdt(gdt[2], 2);
    let tss = kvm_segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match protocol {
        BootProtocol::Linux64 => {
            sregs.cr0 |= X86_CR0_PE;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        BootProtocol::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    Ok(())
}

/// Identity-maps the first 1 GiB with 2 MiB pages, as the Linux 64-bit entry expects.
fn setup_page_tables(mem: &GuestMemoryMmap, sregs: &mut kvm_sregs) -> Result<(), RegsError> {
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START)).map_err(RegsError::WriteTables)?;
    mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START)).map_err(RegsError::WriteTables)?;
    let mut pd = [0u8; 4096];
    for (i, chunk) in pd.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&(((i as u64) << 21) | 0x83).to_le_bytes());
    }
    mem.write_slice(&pd, GuestAddress(PDE_START)).map_err(RegsError::WriteTables)?;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PG;
    Ok(())
}

/// Sets the FPU control word and MXCSR to their power-on values.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(RegsError::SetFpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvh_gdt_has_32_bit_code_and_linux_gdt_has_long_mode_code() {
        let pvh = kvm_segment_from_gdt(boot_gdt(BootProtocol::Pvh)[1], 1);
        assert_eq!((pvh.l, pvh.db), (0, 1));
        let linux = kvm_segment_from_gdt(boot_gdt(BootProtocol::Linux64)[1], 1);
        assert_eq!((linux.l, linux.db), (1, 0));
    }

    #[test]
    fn page_tables_identity_map_the_first_gigabyte() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut sregs = kvm_sregs::default();
        setup_page_tables(&mem, &mut sregs).unwrap();
        assert_eq!(sregs.cr3, PML4_START);
        let pde: u64 = mem.read_obj(GuestAddress(PDE_START + 8 * 511)).unwrap();
        assert_eq!(pde, (511 << 21) | 0x83);
        assert_ne!(sregs.cr0 & X86_CR0_PG, 0);
    }
}
