//! The small fixed devices of the port-I/O bus: the i8042 (for its reset line), the
//! ACPI power-management registers, the debug-exit port and the vCPU park port.

use std::sync::Mutex;

use specula_common::sync::lock;
use vm_superio::I8042Device;
use vmm_sys_util::eventfd::EventFd;

use super::bus::{PioAction, PioContext, PioDevice};
use super::serial::EventFdTrigger;
use super::{
    ACPI_RESET_PORT, ACPI_RESET_VALUE, ACPI_S5_SLEEP_TYPE, ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_STATUS_PORT,
    I8042_DATA_PORT,
};

/// SLP_EN in the sleep control register; SLP_TYPx sits in bits 2-4.
const ACPI_SLEEP_ENABLE: u8 = 1 << 5;

/// The i8042 controller, on its data and command ports; its reset command fires an
/// eventfd that the event loop turns into a reset.
pub struct I8042(Mutex<I8042Device<EventFdTrigger>>);

impl I8042 {
    /// The controller; `reset_evt` fires when the guest pulses the reset line.
    pub fn new(reset_evt: EventFd) -> Self {
        Self(Mutex::new(I8042Device::new(EventFdTrigger(reset_evt))))
    }
}

impl PioDevice for I8042 {
    fn name(&self) -> &str {
        "i8042"
    }

    fn read(&self, base: u16, offset: u16, data: &mut [u8]) {
        // vm-superio numbers the registers from the data port: 0 data, 4 command.
        data[0] = lock(&self.0).read((base + offset - I8042_DATA_PORT) as u8);
    }

    fn write(&self, base: u16, offset: u16, data: &[u8], _context: &PioContext<'_>) -> PioAction {
        if let Err(e) = lock(&self.0).write((base + offset - I8042_DATA_PORT) as u8, data[0]) {
            log::warn!("i8042 write failed: {e:?}");
        }
        PioAction::Continue
    }
}

/// The ACPI sleep control, sleep status and reset registers of the hardware-reduced
/// FADT, on consecutive ports from [`ACPI_SLEEP_CONTROL_PORT`].
pub struct AcpiPm;

impl PioDevice for AcpiPm {
    fn name(&self) -> &str {
        "acpi-pm"
    }

    fn read(&self, base: u16, offset: u16, data: &mut [u8]) {
        // No sleep state ever completes (the guest never wakes): WAK_STS stays clear.
        // The reset register reads as an open bus.
        if matches!(base + offset, ACPI_SLEEP_CONTROL_PORT | ACPI_SLEEP_STATUS_PORT) {
            data[0] = 0;
        }
    }

    fn write(&self, base: u16, offset: u16, data: &[u8], _context: &PioContext<'_>) -> PioAction {
        match base + offset {
            ACPI_SLEEP_CONTROL_PORT => sleep_control_action(data[0]),
            ACPI_RESET_PORT if data[0] == ACPI_RESET_VALUE => PioAction::Reset,
            _ => PioAction::Continue,
        }
    }
}

/// What a write of `value` to the ACPI sleep control register asks: S5 with SLP_EN set
/// powers off; other sleep states are not offered (the DSDT names only `_S5_`), so
/// they and writes without SLP_EN change nothing.
fn sleep_control_action(value: u8) -> PioAction {
    let sleep_type = (value >> 2) & 0b111;
    if value & ACPI_SLEEP_ENABLE != 0 && sleep_type == ACPI_S5_SLEEP_TYPE {
        PioAction::PowerOff
    } else {
        PioAction::Continue
    }
}

/// QEMU's isa-debug-exit: a byte written ends the VM with that status.
pub struct DebugExit;

impl PioDevice for DebugExit {
    fn name(&self) -> &str {
        "debug-exit"
    }

    fn read(&self, _base: u16, _offset: u16, _data: &mut [u8]) {}

    fn write(&self, _base: u16, _offset: u16, data: &[u8], _context: &PioContext<'_>) -> PioAction {
        PioAction::Exit(data[0])
    }
}

/// A write parks the vCPU until the VM stops (ring-3 guests cannot `hlt`).
pub struct ParkPort;

impl PioDevice for ParkPort {
    fn name(&self) -> &str {
        "park"
    }

    fn read(&self, _base: u16, _offset: u16, _data: &mut [u8]) {}

    fn write(&self, _base: u16, _offset: u16, _data: &[u8], _context: &PioContext<'_>) -> PioAction {
        PioAction::Park
    }
}
