//! Model-specific registers set at boot, as Linux expects to find them.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

/// Failures while setting boot MSRs.
#[derive(Debug, thiserror::Error)]
pub enum MsrError {
    #[error("cannot build the boot MSR list")]
    Build(#[source] vmm_sys_util::fam::Error),
    #[error("KVM_SET_MSRS failed")]
    Set(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_MSRS set only {set} of {wanted} boot MSRs")]
    Partial { set: usize, wanted: usize },
}

fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry { index, data, ..Default::default() })
    .collect()
}

/// The MSRs an introspector asks about: where `syscall` enters the kernel, and the
/// kernel's GS base while the user's is loaded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyscallMsrs {
    pub kernel_gs_base: u64,
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub fmask: u64,
}

/// Reads a vCPU's [`SyscallMsrs`] (KVM_GET_MSRS); None if KVM returns fewer than asked.
pub fn syscall_msrs(vcpu: &VcpuFd) -> Option<SyscallMsrs> {
    const WANTED: [u32; 5] = [MSR_KERNEL_GS_BASE, MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SYSCALL_MASK];
    let entries: Vec<kvm_msr_entry> =
        WANTED.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
    let mut msrs = Msrs::from_entries(&entries).ok()?;
    if vcpu.get_msrs(&mut msrs).ok()? != WANTED.len() {
        return None;
    }
    let value = |i: usize| msrs.as_slice()[i].data;
    Some(SyscallMsrs { kernel_gs_base: value(0), star: value(1), lstar: value(2), cstar: value(3), fmask: value(4) })
}

/// Sets the boot MSRs; every one must be accepted.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), MsrError> {
    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).map_err(MsrError::Build)?;
    let set = vcpu.set_msrs(&msrs).map_err(MsrError::Set)?;
    if set != entries.len() {
        return Err(MsrError::Partial { set, wanted: entries.len() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vcpus_syscall_msrs_read_back_what_it_holds() {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm (these tests need KVM)");
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        setup_msrs(&vcpu).unwrap();
        assert_eq!(syscall_msrs(&vcpu), Some(SyscallMsrs::default()), "the boot values");
        let values = [
            (MSR_KERNEL_GS_BASE, 0xffff_8880_7fc0_0000u64),
            (MSR_STAR, 0x0023_0010_0000_0000),
            (MSR_LSTAR, 0xffff_ffff_8120_0040),
            (MSR_CSTAR, 0xffff_ffff_8120_1600),
            (MSR_SYSCALL_MASK, 0x47700),
        ];
        let entries: Vec<kvm_msr_entry> =
            values.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
        assert_eq!(vcpu.set_msrs(&Msrs::from_entries(&entries).unwrap()).unwrap(), values.len());
        let got = syscall_msrs(&vcpu).unwrap();
        assert_eq!(
            got,
            SyscallMsrs {
                kernel_gs_base: 0xffff_8880_7fc0_0000,
                star: 0x0023_0010_0000_0000,
                lstar: 0xffff_ffff_8120_0040,
                cstar: 0xffff_ffff_8120_1600,
                fmask: 0x47700,
            }
        );
    }
}
