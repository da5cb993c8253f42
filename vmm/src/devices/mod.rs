//! Legacy devices on the port-I/O bus: COM1, the i8042 (for reset), the ACPI
//! sleep and reset registers, the debug-exit port and the vCPU park port.

pub mod doorbell;
pub mod serial;

use std::sync::Mutex;

use vm_superio::I8042Device;
use vmm_sys_util::eventfd::EventFd;

use serial::{EventFdTrigger, SerialDevice};

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
/// SLP_EN in the sleep control register; SLP_TYPx sits in bits 2-4.
const ACPI_SLEEP_ENABLE: u8 = 1 << 5;
/// COM1's interrupt line.
pub const COM1_IRQ: u32 = 4;

/// What a port write asks of the vCPU that made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PioAction {
    /// Carry on running.
    Continue,
    /// End the VM with this status.
    Exit(u8),
    /// Stop this vCPU until the VM ends.
    Park,
    /// Block this vCPU until the host rings the doorbell.
    DoorbellWait,
    /// The guest entered ACPI S5: power the machine off.
    PowerOff,
    /// The guest wrote the ACPI reset value: reset the machine.
    Reset,
}

/// The devices a vCPU reaches through port I/O.
pub struct PioBus {
    serial: Mutex<SerialDevice>,
    i8042: Mutex<I8042Device<EventFdTrigger>>,
    doorbell: Option<std::sync::Arc<doorbell::Doorbell>>,
}

impl PioBus {
    /// Builds the bus; `reset_evt` fires when the guest resets through the i8042.
    pub fn new(serial: SerialDevice, reset_evt: EventFd) -> Self {
        Self {
            serial: Mutex::new(serial),
            i8042: Mutex::new(I8042Device::new(EventFdTrigger(reset_evt))),
            doorbell: None,
        }
    }

    /// Adds a doorbell on [`doorbell::WAIT_PORT`] and [`doorbell::DONE_PORT`].
    pub fn with_doorbell(mut self, bell: std::sync::Arc<doorbell::Doorbell>) -> Self {
        self.doorbell = Some(bell);
        self
    }

    /// The doorbell, if this bus has one.
    pub fn doorbell(&self) -> Option<&doorbell::Doorbell> {
        self.doorbell.as_deref()
    }

    /// The serial device, for the input path.
    pub fn serial(&self) -> &Mutex<SerialDevice> {
        &self.serial
    }

    /// Handles an `in` from `port`; unclaimed ports read as all ones, like an open bus.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        let value = match port {
            p if (COM1_PORT..COM1_PORT + COM1_SPAN).contains(&p) => lock(&self.serial).read((p - COM1_PORT) as u8),
            I8042_DATA_PORT | I8042_COMMAND_PORT => lock(&self.i8042).read((port - I8042_DATA_PORT) as u8),
            // No sleep state ever completes (the guest never wakes): WAK_STS stays clear.
            ACPI_SLEEP_STATUS_PORT | ACPI_SLEEP_CONTROL_PORT => 0,
            _ => 0xff,
        };
        data.fill(0xff);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    /// Handles an `out` to `port`.
    pub fn write(&self, port: u16, data: &[u8]) -> PioAction {
        let Some(&value) = data.first() else {
            return PioAction::Continue;
        };
        match port {
            p if (COM1_PORT..COM1_PORT + COM1_SPAN).contains(&p) => {
                if let Err(e) = lock(&self.serial).write((p - COM1_PORT) as u8, value) {
                    log::warn!("serial write failed: {e:?}");
                }
                PioAction::Continue
            }
            I8042_DATA_PORT | I8042_COMMAND_PORT => {
                if let Err(e) = lock(&self.i8042).write((port - I8042_DATA_PORT) as u8, value) {
                    log::warn!("i8042 write failed: {e:?}");
                }
                PioAction::Continue
            }
            ACPI_SLEEP_CONTROL_PORT => sleep_control_action(value),
            ACPI_RESET_PORT if value == ACPI_RESET_VALUE => PioAction::Reset,
            DEBUG_EXIT_PORT => PioAction::Exit(value),
            PARK_PORT => PioAction::Park,
            doorbell::WAIT_PORT if self.doorbell.is_some() => PioAction::DoorbellWait,
            doorbell::DONE_PORT => {
                if let Some(bell) = &self.doorbell {
                    bell.guest_done();
                }
                PioAction::Continue
            }
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

/// Locks a device, recovering it if a vCPU thread panicked while holding it.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex as StdMutex};

    fn bus() -> (PioBus, Arc<StdMutex<Vec<u8>>>, EventFd) {
        let (serial, out) = serial::capturing().unwrap();
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (PioBus::new(serial, reset.try_clone().unwrap()), out, reset)
    }

    #[test]
    fn serial_writes_reach_the_output() {
        let (bus, out, _) = bus();
        for b in b"hi" {
            assert_eq!(bus.write(COM1_PORT, &[*b]), PioAction::Continue);
        }
        assert_eq!(&*out.lock().unwrap(), b"hi");
    }

    #[test]
    fn debug_exit_and_park_ports() {
        let (bus, _, _) = bus();
        assert_eq!(bus.write(DEBUG_EXIT_PORT, &[42]), PioAction::Exit(42));
        assert_eq!(bus.write(PARK_PORT, &[0]), PioAction::Park);
        assert_eq!(bus.write(0x80, &[1]), PioAction::Continue);
    }

    #[test]
    fn i8042_reset_command_fires_the_reset_event() {
        let (bus, _, reset) = bus();
        bus.write(I8042_COMMAND_PORT, &[0xfe]);
        assert_eq!(reset.read().unwrap(), 1);
    }

    #[test]
    fn acpi_s5_with_sleep_enable_powers_off_and_the_reset_value_resets() {
        let (bus, _, _) = bus();
        // What Linux's acpi_hw_extended_sleep writes for S5: SLP_TYP 5 in bits 2-4, SLP_EN.
        assert_eq!(bus.write(ACPI_SLEEP_CONTROL_PORT, &[(5 << 2) | (1 << 5)]), PioAction::PowerOff);
        assert_eq!(bus.write(ACPI_SLEEP_CONTROL_PORT, &[5 << 2]), PioAction::Continue, "no SLP_EN");
        assert_eq!(bus.write(ACPI_SLEEP_CONTROL_PORT, &[(3 << 2) | (1 << 5)]), PioAction::Continue, "S3");
        assert_eq!(bus.write(ACPI_RESET_PORT, &[ACPI_RESET_VALUE]), PioAction::Reset);
        assert_eq!(bus.write(ACPI_RESET_PORT, &[0x06]), PioAction::Continue, "not the FADT's reset value");
        let mut status = [0xaa];
        bus.read(ACPI_SLEEP_STATUS_PORT, &mut status);
        assert_eq!(status, [0]);
    }

    #[test]
    fn unclaimed_ports_read_as_all_ones() {
        let (bus, _, _) = bus();
        let mut data = [0u8; 2];
        bus.read(0x1234, &mut data);
        assert_eq!(data, [0xff, 0xff]);
    }
}
