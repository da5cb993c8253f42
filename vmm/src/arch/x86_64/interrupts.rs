//! Local APIC setup: LINT0 as ExtINT (the legacy PIC) and LINT1 as NMI.

use kvm_bindings::kvm_lapic_state;
use kvm_ioctls::VcpuFd;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Failures while configuring the local APIC.
#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    #[error("KVM_GET_LAPIC failed")]
    GetLapic(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_LAPIC failed")]
    SetLapic(#[source] kvm_ioctls::Error),
}

fn get_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let bytes: Vec<u8> = lapic.regs[offset..offset + 4].iter().map(|&b| b as u8).collect();
    u32::from_le_bytes(bytes.try_into().expect("4 bytes"))
}

fn set_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (dst, src) in lapic.regs[offset..offset + 4].iter_mut().zip(value.to_le_bytes()) {
        *dst = src as _;
    }
}

/// Sets the delivery mode (bits 10:8) of an LVT register.
fn set_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Programs LINT0 and LINT1 as a PC-compatible local APIC has them at boot.
pub fn set_lint(vcpu: &VcpuFd) -> Result<(), InterruptError> {
    let mut lapic = vcpu.get_lapic().map_err(InterruptError::GetLapic)?;
    let lvt0 = get_reg(&lapic, APIC_LVT0);
    set_reg(&mut lapic, APIC_LVT0, set_delivery_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = get_reg(&lapic, APIC_LVT1);
    set_reg(&mut lapic, APIC_LVT1, set_delivery_mode(lvt1, APIC_MODE_NMI));
    vcpu.set_lapic(&lapic).map_err(InterruptError::SetLapic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_mode_replaces_only_bits_8_to_10() {
        assert_eq!(set_delivery_mode(0xffff_ffff, APIC_MODE_NMI), 0xffff_fcff);
        assert_eq!(set_delivery_mode(0, APIC_MODE_EXTINT), 0x700);
    }

    #[test]
    fn lapic_registers_round_trip() {
        let mut lapic = kvm_lapic_state::default();
        set_reg(&mut lapic, APIC_LVT1, 0x1234_5678);
        assert_eq!(get_reg(&lapic, APIC_LVT1), 0x1234_5678);
    }
}
