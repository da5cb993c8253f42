//! Devices on the port-I/O bus ([`bus`]): COM1, the i8042 (for reset), the ACPI sleep
//! and reset registers, the debug-exit port and the vCPU park port, and whatever an
//! embedding program adds (the inspector's agent [`doorbell`]).

pub mod bus;
pub mod doorbell;
pub mod legacy;
pub mod serial;
pub mod virtio;

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

pub use bus::{PioAction, PioBus, PioBusError, PioContext, PioDevice, PortRange};
use serial::SerialPort;

/// COM1 base port and its span.
pub const COM1_PORT: u16 = 0x3f8;
const COM1_SPAN: u16 = 8;
/// i8042 data and command ports.
pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// Debug-exit port (QEMU isa-debug-exit's default base): a byte written ends the VM with that status.
pub const DEBUG_EXIT_PORT: u16 = 0x501;
/// A write parks the vCPU until the VM stops (ring-3 guests cannot `hlt`).
pub const PARK_PORT: u16 = 0x502;
/// ACPI sleep control register (the FADT's SLEEP_CONTROL_REG, hardware-reduced ACPI).
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
/// ACPI sleep status register (SLEEP_STATUS_REG): reads 0, the guest never wakes.
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
/// ACPI reset register (RESET_REG), and the value that resets.
pub const ACPI_RESET_PORT: u16 = 0x602;
pub const ACPI_RESET_VALUE: u8 = 0x01;
/// The sleep type that means S5 (soft off): the DSDT's `_S5_` package names it.
pub const ACPI_S5_SLEEP_TYPE: u8 = 5;
/// COM1's interrupt line.
pub const COM1_IRQ: u32 = 4;

/// The bus with every device the vmm always has: `serial` as COM1, and an i8042 whose
/// reset command fires `reset_evt`.
pub fn legacy_bus(serial: Arc<SerialPort>, reset_evt: EventFd) -> Result<PioBus, PioBusError> {
    let i8042: Arc<dyn PioDevice> = Arc::new(legacy::I8042::new(reset_evt));
    let mut bus = PioBus::new();
    bus.insert(PortRange::new(COM1_PORT, COM1_SPAN), serial)?;
    bus.insert(PortRange::port(I8042_DATA_PORT), i8042.clone())?;
    bus.insert(PortRange::port(I8042_COMMAND_PORT), i8042)?;
    bus.insert(PortRange::new(ACPI_SLEEP_CONTROL_PORT, 3), Arc::new(legacy::AcpiPm))?;
    bus.insert(PortRange::port(DEBUG_EXIT_PORT), Arc::new(legacy::DebugExit))?;
    bus.insert(PortRange::port(PARK_PORT), Arc::new(legacy::ParkPort))?;
    Ok(bus)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn bus() -> (PioBus, Arc<Mutex<Vec<u8>>>, EventFd) {
        let (serial, out) = serial::capturing().unwrap();
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (legacy_bus(Arc::new(SerialPort::new(serial)), reset.try_clone().unwrap()).unwrap(), out, reset)
    }

    fn write(bus: &PioBus, port: u16, data: &[u8]) -> PioAction {
        bus.write(port, data, &PioContext::new(&|| false))
    }

    #[test]
    fn serial_writes_reach_the_output() {
        let (bus, out, _) = bus();
        for b in b"hi" {
            assert_eq!(write(&bus, COM1_PORT, &[*b]), PioAction::Continue);
        }
        assert_eq!(&*out.lock().unwrap(), b"hi");
    }

    #[test]
    fn debug_exit_and_park_ports() {
        let (bus, _, _) = bus();
        assert_eq!(write(&bus, DEBUG_EXIT_PORT, &[42]), PioAction::Exit(42));
        assert_eq!(write(&bus, PARK_PORT, &[0]), PioAction::Park);
        assert_eq!(write(&bus, 0x80, &[1]), PioAction::Continue);
        assert_eq!(write(&bus, DEBUG_EXIT_PORT, &[]), PioAction::Continue, "an empty access does nothing");
    }

    #[test]
    fn i8042_reset_command_fires_the_reset_event() {
        let (bus, _, reset) = bus();
        write(&bus, I8042_COMMAND_PORT, &[0xfe]);
        assert_eq!(reset.read().unwrap(), 1);
    }

    #[test]
    fn acpi_s5_with_sleep_enable_powers_off_and_the_reset_value_resets() {
        let (bus, _, _) = bus();
        // What Linux's acpi_hw_extended_sleep writes for S5: SLP_TYP 5 in bits 2-4, SLP_EN.
        assert_eq!(write(&bus, ACPI_SLEEP_CONTROL_PORT, &[(5 << 2) | (1 << 5)]), PioAction::PowerOff);
        assert_eq!(write(&bus, ACPI_SLEEP_CONTROL_PORT, &[5 << 2]), PioAction::Continue, "no SLP_EN");
        assert_eq!(write(&bus, ACPI_SLEEP_CONTROL_PORT, &[(3 << 2) | (1 << 5)]), PioAction::Continue, "S3");
        assert_eq!(write(&bus, ACPI_RESET_PORT, &[ACPI_RESET_VALUE]), PioAction::Reset);
        assert_eq!(write(&bus, ACPI_RESET_PORT, &[0x06]), PioAction::Continue, "not the FADT's reset value");
        let mut status = [0xaa];
        bus.read(ACPI_SLEEP_STATUS_PORT, &mut status);
        assert_eq!(status, [0]);
        bus.read(ACPI_RESET_PORT, &mut status);
        assert_eq!(status, [0xff], "the reset register reads as an open bus");
    }

    #[test]
    fn unclaimed_ports_read_as_all_ones() {
        let (bus, _, _) = bus();
        let mut data = [0u8; 2];
        bus.read(0x1234, &mut data);
        assert_eq!(data, [0xff, 0xff]);
        bus.read(0x61, &mut data);
        assert_eq!(data, [0xff, 0xff], "between the i8042's two ports");
    }

    #[test]
    fn an_embedder_cannot_take_a_port_the_vmm_uses() {
        let (mut bus, _, _) = bus();
        let bell = Arc::new(doorbell::Doorbell::new());
        assert!(matches!(bus.insert(PortRange::new(0x5f0, 0x11), bell.clone()), Err(PioBusError::Overlap { .. })));
        bus.insert(doorbell::PORTS, bell).unwrap();
    }
}
