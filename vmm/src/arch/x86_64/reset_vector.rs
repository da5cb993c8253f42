//! The code a reset reaches at the real-mode BIOS entry (F000:FFF0).
//!
//! Specula boots kernels directly, with no firmware, so nothing answers the BIOS
//! reboot path unless the vmm puts something there. Linux takes that path when its
//! other methods were passed over: on a hardware-reduced ACPI machine its default
//! reboot method is EFI (`efi_reboot_required()`), which a direct boot lacks, so it
//! falls through to `machine_real_restart()`, drops to real mode and jumps here.
//! Before this stub the vCPU then ran whatever the BIOS area held, forever: `reboot`
//! and `panic=-1` never ended the vmm. The stub writes the FADT's reset value to the
//! ACPI reset port, which the vmm turns into [`crate::VmExit::Reset`].

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::RESET_VECTOR_START;
use crate::devices::{ACPI_RESET_PORT, ACPI_RESET_VALUE};

/// Failures while writing the reset stub.
#[derive(Debug, thiserror::Error)]
pub enum ResetVectorError {
    #[error("cannot write the reset stub at {RESET_VECTOR_START:#x} into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// The stub, 16-bit real-mode code: `mov al, VALUE; mov dx, PORT; out dx, al; 1: hlt; jmp 1b`.
fn stub() -> [u8; 9] {
    let [port_lo, port_hi] = ACPI_RESET_PORT.to_le_bytes();
    [0xb0, ACPI_RESET_VALUE, 0xba, port_lo, port_hi, 0xee, 0xf4, 0xeb, 0xfd]
}

/// Writes the stub at the reset vector (in the e820-reserved BIOS area).
pub fn setup_reset_vector(mem: &GuestMemoryMmap) -> Result<(), ResetVectorError> {
    mem.write_slice(&stub(), GuestAddress(RESET_VECTOR_START)).map_err(ResetVectorError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stub_fits_before_the_end_of_the_first_mebibyte_and_names_the_reset_register() {
        let code = stub();
        assert!(RESET_VECTOR_START + code.len() as u64 <= 0x10_0000);
        assert_eq!(&code[..2], &[0xb0, ACPI_RESET_VALUE]);
        assert_eq!(u16::from_le_bytes([code[3], code[4]]), ACPI_RESET_PORT);
        // The final jmp goes back to the hlt: rel8 from the end of the jmp.
        assert_eq!(code.len() as i32 + i32::from(code[8] as i8), 6);
        assert_eq!(code[6], 0xf4);
    }
}
