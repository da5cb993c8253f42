//! The port-I/O bus: devices registered on disjoint port ranges, found by port on
//! every `in` and `out` a vCPU makes.
//!
//! The bus is built before the vCPUs start and never changes after: lookups take no
//! lock. Devices take `&self` and lock what they own themselves, so a device that
//! blocks its vCPU (the agent doorbell) holds up no other device.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// The number of I/O ports (0 to 0xffff).
const PORT_SPACE: u32 = 1 << 16;

/// What a port write asks of the vCPU that made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PioAction {
    /// Carry on running.
    Continue,
    /// End the VM with this status.
    Exit(u8),
    /// Stop this vCPU until the VM ends.
    Park,
    /// The guest entered ACPI S5: power the machine off.
    PowerOff,
    /// The guest wrote the ACPI reset value: reset the machine.
    Reset,
}

/// A run of `len` ports from `base`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    base: u16,
    len: u16,
}

impl PortRange {
    /// `len` ports from `base`; the bus refuses an empty range or one past 0xffff.
    pub const fn new(base: u16, len: u16) -> Self {
        Self { base, len }
    }

    /// One port.
    pub const fn port(port: u16) -> Self {
        Self::new(port, 1)
    }

    /// The first port.
    pub fn base(&self) -> u16 {
        self.base
    }

    /// The number of ports.
    pub fn len(&self) -> u16 {
        self.len
    }

    /// Whether the range has no port.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// One past the last port (0x10000 for a range that ends at 0xffff).
    fn end(&self) -> u32 {
        u32::from(self.base) + u32::from(self.len)
    }

    /// Whether `port` is in the range.
    pub fn contains(&self, port: u16) -> bool {
        (u32::from(self.base)..self.end()).contains(&u32::from(port))
    }

    /// Whether the two ranges share a port.
    fn overlaps(&self, other: &PortRange) -> bool {
        u32::from(self.base) < other.end() && u32::from(other.base) < self.end()
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.len {
            0 => write!(f, "{:#x} (empty)", self.base),
            1 => write!(f, "{:#x}", self.base),
            _ => write!(f, "{:#x}-{:#x}", self.base, self.end() - 1),
        }
    }
}

/// What a device may learn about the vCPU whose access it handles.
pub struct PioContext<'a> {
    interrupted: &'a dyn Fn() -> bool,
}

impl<'a> PioContext<'a> {
    /// A context whose vCPU must give way when `interrupted` returns true.
    pub fn new(interrupted: &'a dyn Fn() -> bool) -> Self {
        Self { interrupted }
    }

    /// Whether the vCPU must give way now (the VM is stopping or pausing): a device
    /// that blocks the vCPU in a write looks at this and returns when it holds.
    pub fn interrupted(&self) -> bool {
        (self.interrupted)()
    }
}

/// A device on the port-I/O bus. Accesses come from the vCPU threads at once, so a
/// device locks its own state; `base` is the start of the range it was registered on,
/// `offset` the port's distance from it, and `data` holds at least one byte.
pub trait PioDevice: Send + Sync {
    /// A short name, for logs and bus errors.
    fn name(&self) -> &str;

    /// Handles an `in`: fills `data`, which arrives as all ones (an open bus).
    fn read(&self, base: u16, offset: u16, data: &mut [u8]);

    /// Handles an `out` of `data`; returns what the vCPU must do next.
    fn write(&self, base: u16, offset: u16, data: &[u8], context: &PioContext<'_>) -> PioAction;
}

impl fmt::Debug for dyn PioDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PioDevice({})", self.name())
    }
}

/// A device that cannot join the bus.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PioBusError {
    #[error("{device} asks for an empty port range at {base:#x}")]
    EmptyRange { device: String, base: u16 },
    #[error("ports {range} of {device} run past port 0xffff")]
    PastLastPort { device: String, range: PortRange },
    #[error("ports {range} of {device} overlap ports {taken} of {owner}")]
    Overlap { device: String, range: PortRange, owner: String, taken: PortRange },
}

/// Devices by the first port of their range.
#[derive(Debug, Default)]
pub struct PioBus {
    devices: BTreeMap<u16, (PortRange, Arc<dyn PioDevice>)>,
}

impl PioBus {
    /// A bus with no device: every port reads as all ones and ignores writes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `device` on `range`, which must be non-empty, end by port 0xffff and
    /// share no port with a device already there.
    pub fn insert(&mut self, range: PortRange, device: Arc<dyn PioDevice>) -> Result<(), PioBusError> {
        let name = || device.name().to_string();
        if range.is_empty() {
            return Err(PioBusError::EmptyRange { device: name(), base: range.base });
        }
        if range.end() > PORT_SPACE {
            return Err(PioBusError::PastLastPort { device: name(), range });
        }
        if let Some((taken, owner)) = self.devices.values().find(|(taken, _)| taken.overlaps(&range)) {
            return Err(PioBusError::Overlap { device: name(), range, owner: owner.name().to_string(), taken: *taken });
        }
        self.devices.insert(range.base, (range, device));
        Ok(())
    }

    /// The device whose range holds `port`, with that range.
    fn find(&self, port: u16) -> Option<(PortRange, &dyn PioDevice)> {
        let (_, (range, device)) = self.devices.range(..=port).next_back()?;
        range.contains(port).then_some((*range, device.as_ref()))
    }

    /// Handles an `in` from `port`; unclaimed ports read as all ones, like an open bus.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        if data.is_empty() {
            return;
        }
        if let Some((range, device)) = self.find(port) {
            device.read(range.base, port - range.base, data);
        }
    }

    /// Handles an `out` to `port`; writes to unclaimed ports are dropped.
    pub fn write(&self, port: u16, data: &[u8], context: &PioContext<'_>) -> PioAction {
        if data.is_empty() {
            return PioAction::Continue;
        }
        match self.find(port) {
            Some((range, device)) => device.write(range.base, port - range.base, data, context),
            None => PioAction::Continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records the accesses it gets; reads answer the offset.
    struct Probe {
        name: &'static str,
        seen: Mutex<Vec<(u16, u16, u8)>>,
    }

    impl Probe {
        fn new(name: &'static str) -> Arc<Self> {
            Arc::new(Self { name, seen: Mutex::new(Vec::new()) })
        }
    }

    impl PioDevice for Probe {
        fn name(&self) -> &str {
            self.name
        }

        fn read(&self, _base: u16, offset: u16, data: &mut [u8]) {
            data[0] = offset as u8;
        }

        fn write(&self, base: u16, offset: u16, data: &[u8], _context: &PioContext<'_>) -> PioAction {
            self.seen.lock().unwrap().push((base, offset, data[0]));
            PioAction::Exit(data[0])
        }
    }

    fn running() -> bool {
        false
    }

    #[test]
    fn accesses_reach_the_device_that_holds_the_port() {
        let (low, high) = (Probe::new("low"), Probe::new("high"));
        let mut bus = PioBus::new();
        bus.insert(PortRange::new(0x10, 4), low.clone()).unwrap();
        bus.insert(PortRange::new(0x14, 2), high.clone()).unwrap();
        let context = PioContext::new(&running);
        assert_eq!(bus.write(0x13, &[7], &context), PioAction::Exit(7));
        assert_eq!(bus.write(0x14, &[8], &context), PioAction::Exit(8));
        assert_eq!(bus.write(0x16, &[9], &context), PioAction::Continue, "past the last range");
        assert_eq!(bus.write(0x0f, &[9], &context), PioAction::Continue, "before the first range");
        assert_eq!(*low.seen.lock().unwrap(), [(0x10, 3, 7)]);
        assert_eq!(*high.seen.lock().unwrap(), [(0x14, 0, 8)]);
        let mut data = [0u8; 2];
        bus.read(0x15, &mut data);
        assert_eq!(data, [1, 0xff], "the device fills what it answers; the rest reads as an open bus");
        bus.read(0x16, &mut data);
        assert_eq!(data, [0xff, 0xff]);
    }

    #[test]
    fn overlapping_empty_and_out_of_space_ranges_are_refused_by_name() {
        let mut bus = PioBus::new();
        bus.insert(PortRange::new(0x3f8, 8), Probe::new("com1")).unwrap();
        let error = bus.insert(PortRange::new(0x3f0, 9), Probe::new("fdc")).unwrap_err();
        assert_eq!(error.to_string(), "ports 0x3f0-0x3f8 of fdc overlap ports 0x3f8-0x3ff of com1");
        assert!(matches!(bus.insert(PortRange::port(0x3ff), Probe::new("x")), Err(PioBusError::Overlap { .. })));
        assert!(matches!(
            bus.insert(PortRange::new(0x3f9, 0), Probe::new("none")),
            Err(PioBusError::EmptyRange { base: 0x3f9, .. })
        ));
        assert!(matches!(
            bus.insert(PortRange::new(0xfffe, 3), Probe::new("wrap")),
            Err(PioBusError::PastLastPort { .. })
        ));
        bus.insert(PortRange::new(0xfffe, 2), Probe::new("top")).unwrap();
        bus.insert(PortRange::new(0x3f0, 8), Probe::new("fdc")).unwrap();
        let mut data = [0];
        bus.read(0xffff, &mut data);
        assert_eq!(data, [1], "the range that ends at the last port is found");
    }
}
