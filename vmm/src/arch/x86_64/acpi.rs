//! Minimal hardware-reduced ACPI tables (RSDP, XSDT, FADT, DSDT, MADT), the way
//! Firecracker and Cloud Hypervisor provide them: kernels built without MP-table
//! support (Debian's cloud kernel among them) find their CPUs, IOAPIC and interrupt
//! overrides only through the MADT.
//!
//! Hardware-reduced ACPI has no legacy PIC, so Linux creates no ISA interrupts of
//! its own: COM1's IRQ 4 exists only because the DSDT describes the port (PNP0501)
//! with its interrupt. Without it the 8250 driver finds the port but cannot request
//! its IRQ, and every open of the console fails with EIO. Power-off and reset go
//! through the FADT's sleep control and reset registers (ports on the PIO bus).

use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{ACPI_START, APIC_START, IOAPIC_START};
use crate::devices::{
    ACPI_RESET_PORT, ACPI_RESET_VALUE, ACPI_S5_SLEEP_TYPE, ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_STATUS_PORT, COM1_IRQ,
    COM1_PORT,
};

const OEM_ID: &[u8; 6] = b"SPECUL";
const OEM_TABLE_ID: &[u8; 8] = b"SPECULA ";
const CREATOR_ID: &[u8; 4] = b"SPCL";
const HEADER_LEN: usize = 36;
/// FADT flags: HW_REDUCED_ACPI (bit 20): no PM timer, no GPE blocks, no legacy hardware.
const FADT_HW_REDUCED_ACPI: u32 = 1 << 20;
/// FADT flags: RESET_REG_SUP (bit 10): the reset register is valid.
const FADT_RESET_REG_SUP: u32 = 1 << 10;
/// Generic Address Structure: system I/O space, byte access.
const GAS_SYSTEM_IO: u8 = 1;
const GAS_ACCESS_BYTE: u8 = 1;
/// IA-PC boot architecture flags: no VGA (bit 2), no MSI is fine, no CMOS RTC (bit 5).
const FADT_IAPC_NO_VGA: u16 = 1 << 2;
const FADT_IAPC_NO_CMOS_RTC: u16 = 1 << 5;
/// MADT flags: PC-AT compatible dual 8259 PICs present.
const MADT_PCAT_COMPAT: u32 = 1;

/// Failures while writing ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("cannot write the ACPI tables into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)).wrapping_neg()
}

/// A System Description Table: header, then `body`, with length and checksum filled in.
fn sdt(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(HEADER_LEN + body.len());
    t.extend_from_slice(signature);
    t.extend_from_slice(&((HEADER_LEN + body.len()) as u32).to_le_bytes());
    t.push(revision);
    t.push(0); // checksum
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    t.extend_from_slice(CREATOR_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

fn madt(cpu_count: u8) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    body.extend_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    for cpu in 0..cpu_count {
        // Processor Local APIC: type 0, length 8, ACPI id, APIC id, flags (enabled).
        body.extend_from_slice(&[0, 8, cpu, cpu]);
        body.extend_from_slice(&1u32.to_le_bytes());
    }
    // I/O APIC: type 1, length 12, id, reserved, address, GSI base.
    body.extend_from_slice(&[1, 12, cpu_count, 0]);
    body.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    // Interrupt Source Override: ISA IRQ 0 (PIT) arrives on GSI 2, as on a PC.
    body.extend_from_slice(&[2, 10, 0, 0]);
    body.extend_from_slice(&2u32.to_le_bytes());
    body.extend_from_slice(&0u16.to_le_bytes());
    // Local APIC NMI: all processors, LINT1.
    body.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]);
    sdt(b"APIC", 5, &body)
}

/// A Generic Address Structure for an 8-bit register at I/O `port`.
fn gas_io_byte(port: u16) -> [u8; 12] {
    let mut gas = [0u8; 12];
    gas[0] = GAS_SYSTEM_IO;
    gas[1] = 8; // register bit width
    gas[3] = GAS_ACCESS_BYTE;
    gas[4..].copy_from_slice(&u64::from(port).to_le_bytes());
    gas
}

/// The DSDT's AML: COM1 as a PNP0501 device with its ports and IRQ (the only way
/// a hardware-reduced guest learns of the IRQ), each virtio-mmio device (`virtio`:
/// register window base and IOAPIC line) as an `LNRO0005` with its window and its
/// edge-triggered interrupt, and the S5 sleep type for power-off.
fn dsdt_aml(virtio: &[(u64, u32)]) -> Vec<u8> {
    let mut bytes = Vec::new();
    let s5_type = ACPI_S5_SLEEP_TYPE;
    // \_S5_: Package { SLP_TYPa, SLP_TYPb }, both the value the sleep control port acts on.
    aml::Name::new("_S5_".into(), &aml::Package::new(vec![&s5_type, &s5_type])).to_aml_bytes(&mut bytes);
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let interrupt = aml::Interrupt::new(true, true, false, false, COM1_IRQ);
    let ports = aml::IO::new(COM1_PORT, COM1_PORT, 1, 8);
    let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&interrupt, &ports]));
    let com1 = aml::Device::new("COM1".into(), vec![&hid, &uid, &crs]);
    let virtio_devices: Vec<VirtioAml> =
        virtio.iter().enumerate().map(|(i, &(base, irq))| VirtioAml::new(i, base, irq)).collect();
    let mut devices: Vec<&dyn Aml> = vec![&com1];
    devices.extend(virtio_devices.iter().map(|d| d as &dyn Aml));
    aml::Scope::new("\\_SB_".into(), devices).to_aml_bytes(&mut bytes);
    bytes
}

/// One virtio-mmio device in the DSDT (Linux's `virtio_mmio` matches `LNRO0005`).
struct VirtioAml {
    name: String,
    index: usize,
    window: aml::Memory32Fixed,
    interrupt: aml::Interrupt,
}

impl VirtioAml {
    fn new(index: usize, base: u64, irq: u32) -> Self {
        let window = aml::Memory32Fixed::new(true, base as u32, crate::devices::virtio::VIRTIO_MMIO_SIZE as u32);
        Self {
            name: format!("VR{index:02X}"),
            index,
            window,
            interrupt: aml::Interrupt::new(true, true, false, false, irq),
        }
    }
}

impl Aml for VirtioAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        let hid = aml::Name::new("_HID".into(), &"LNRO0005");
        let uid = aml::Name::new("_UID".into(), &self.index);
        let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&self.window, &self.interrupt]));
        aml::Device::new(self.name.as_str().into(), vec![&hid, &uid, &crs]).to_aml_bytes(sink);
    }
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    // FADT revision 6 is 276 bytes; the body starts after the 36-byte header.
    let mut body = vec![0u8; 276 - HEADER_LEN];
    let at = |offset: usize| offset - HEADER_LEN;
    body[at(40)..at(40) + 4].copy_from_slice(&(dsdt_addr as u32).to_le_bytes()); // DSDT
    body[at(109)..at(109) + 2].copy_from_slice(&(FADT_IAPC_NO_VGA | FADT_IAPC_NO_CMOS_RTC).to_le_bytes());
    body[at(112)..at(112) + 4].copy_from_slice(&(FADT_HW_REDUCED_ACPI | FADT_RESET_REG_SUP).to_le_bytes());
    body[at(116)..at(116) + 12].copy_from_slice(&gas_io_byte(ACPI_RESET_PORT)); // RESET_REG
    body[at(128)] = ACPI_RESET_VALUE;
    body[at(244)..at(244) + 12].copy_from_slice(&gas_io_byte(ACPI_SLEEP_CONTROL_PORT)); // SLEEP_CONTROL_REG
    body[at(256)..at(256) + 12].copy_from_slice(&gas_io_byte(ACPI_SLEEP_STATUS_PORT)); // SLEEP_STATUS_REG
    body[at(131)] = 1; // FADT minor version (6.1)
    body[at(140)..at(140) + 8].copy_from_slice(&dsdt_addr.to_le_bytes()); // X_DSDT
    body[at(268)..at(268) + 8].copy_from_slice(b"SPECULA\0"); // hypervisor vendor identity
    sdt(b"FACP", 6, &body)
}

fn rsdp(xsdt_addr: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(36);
    r.extend_from_slice(b"RSD PTR ");
    r.push(0); // checksum over the first 20 bytes
    r.extend_from_slice(OEM_ID);
    r.push(2); // revision: ACPI 2.0+
    r.extend_from_slice(&0u32.to_le_bytes()); // RSDT address (none; XSDT only)
    r.extend_from_slice(&36u32.to_le_bytes());
    r.extend_from_slice(&xsdt_addr.to_le_bytes());
    r.push(0); // extended checksum
    r.extend_from_slice(&[0; 3]);
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

/// The tables, laid out from [`ACPI_START`]: RSDP, DSDT, FADT, MADT, XSDT.
fn build(cpu_count: u8, virtio: &[(u64, u32)]) -> Vec<(u64, Vec<u8>)> {
    let align = |addr: u64| (addr + 15) & !15;
    let dsdt_addr = ACPI_START + 64;
    let dsdt = sdt(b"DSDT", 2, &dsdt_aml(virtio));
    let fadt_addr = align(dsdt_addr + dsdt.len() as u64);
    let fadt = fadt(dsdt_addr);
    let madt_addr = align(fadt_addr + fadt.len() as u64);
    let madt = madt(cpu_count);
    let xsdt_addr = align(madt_addr + madt.len() as u64);
    let mut entries = Vec::new();
    entries.extend_from_slice(&fadt_addr.to_le_bytes());
    entries.extend_from_slice(&madt_addr.to_le_bytes());
    let xsdt = sdt(b"XSDT", 1, &entries);
    vec![(ACPI_START, rsdp(xsdt_addr)), (dsdt_addr, dsdt), (fadt_addr, fadt), (madt_addr, madt), (xsdt_addr, xsdt)]
}

/// Writes the tables, with `virtio` (each device's register window base and IOAPIC
/// line) in the DSDT; returns the RSDP's address (for boot_params and PVH start info).
pub fn setup_acpi(mem: &GuestMemoryMmap, cpu_count: u8, virtio: &[(u64, u32)]) -> Result<u64, AcpiError> {
    for (addr, table) in build(cpu_count, virtio) {
        mem.write_slice(&table, GuestAddress(addr)).map_err(AcpiError::Write)?;
    }
    Ok(ACPI_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn every_table_checksums_to_zero_and_states_its_length() {
        let tables = build(4, &[(0xd000_0000, 5)]);
        let rsdp = &tables[0].1;
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(rsdp), 0);
        for (_, t) in &tables[1..] {
            assert_eq!(sum(t), 0, "{}", String::from_utf8_lossy(&t[..4]));
            assert_eq!(u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize, t.len());
        }
        let (xsdt_addr, xsdt) = tables.last().unwrap();
        assert_eq!(u64::from_le_bytes(rsdp[24..32].try_into().unwrap()), *xsdt_addr);
        assert_eq!(xsdt.len(), HEADER_LEN + 16);
    }

    #[test]
    fn madt_lists_every_cpu_and_the_ioapic() {
        let madt = madt(3);
        let mut at = HEADER_LEN + 8;
        let (mut cpus, mut ioapics) = (0, 0);
        while at < madt.len() {
            match madt[at] {
                0 => {
                    assert_eq!(madt[at + 3], cpus, "APIC id = vCPU index");
                    cpus += 1;
                }
                1 => ioapics += 1,
                _ => {}
            }
            at += madt[at + 1] as usize;
        }
        assert_eq!((cpus, ioapics), (3, 1));
        assert_eq!(at, madt.len(), "entries tile the table exactly");
    }

    #[test]
    fn fadt_is_hardware_reduced_and_points_at_the_dsdt() {
        let f = fadt(0x1234_5678);
        assert_eq!(f.len(), 276);
        assert_eq!(u32::from_le_bytes(f[112..116].try_into().unwrap()) & FADT_HW_REDUCED_ACPI, FADT_HW_REDUCED_ACPI);
        assert_eq!(u64::from_le_bytes(f[140..148].try_into().unwrap()), 0x1234_5678);
    }

    #[test]
    fn fadt_names_the_reset_and_sleep_registers_on_the_pio_bus() {
        let f = fadt(0);
        let flags = u32::from_le_bytes(f[112..116].try_into().unwrap());
        assert_ne!(flags & FADT_RESET_REG_SUP, 0);
        let io_port = |at: usize| {
            assert_eq!((f[at], f[at + 1], f[at + 3]), (GAS_SYSTEM_IO, 8, GAS_ACCESS_BYTE));
            u64::from_le_bytes(f[at + 4..at + 12].try_into().unwrap())
        };
        assert_eq!(io_port(116), u64::from(ACPI_RESET_PORT));
        assert_eq!(f[128], ACPI_RESET_VALUE);
        assert_eq!(io_port(244), u64::from(ACPI_SLEEP_CONTROL_PORT));
        assert_eq!(io_port(256), u64::from(ACPI_SLEEP_STATUS_PORT));
    }

    #[test]
    fn dsdt_describes_com1_with_its_irq_and_the_s5_state() {
        let aml = dsdt_aml(&[]);
        let find = |needle: &[u8]| aml.windows(needle.len()).position(|w| w == needle);
        // NameOp "_S5_" PackageOp PkgLength NumElements BytePrefix 5 BytePrefix 5.
        assert!(find(&[0x08, b'_', b'S', b'5', b'_', 0x12, 0x06, 0x02, 0x0a, 5, 0x0a, 5]).is_some(), "{aml:02x?}");
        assert!(find(b"COM1").is_some());
        // EISA id of PNP0501, compressed: 0x41d0 0x0105.
        assert!(find(&[0x0c, 0x41, 0xd0, 0x05, 0x01]).is_some(), "PNP0501");
        // Extended interrupt descriptor: consumer, edge, active high, one interrupt: IRQ 4.
        assert!(find(&[0x89, 6, 0, 0b011, 1, 4, 0, 0, 0]).is_some(), "IRQ 4");
        // I/O port descriptor: 16-bit decode, 0x3f8..0x3f8, alignment 1, 8 ports.
        assert!(find(&[0x47, 1, 0xf8, 0x03, 0xf8, 0x03, 1, 8]).is_some(), "ports 0x3f8-0x3ff");
    }

    #[test]
    fn dsdt_describes_each_virtio_device_with_its_window_and_line() {
        let aml = dsdt_aml(&[(0xd000_0000, 5), (0xd000_1000, 6)]);
        let find = |needle: &[u8]| aml.windows(needle.len()).position(|w| w == needle);
        assert!(find(b"VR00").is_some() && find(b"VR01").is_some(), "{aml:02x?}");
        assert_eq!(aml.windows(9).filter(|w| w == b"LNRO0005\0").count(), 2, "two LNRO0005 _HIDs");
        // Memory32Fixed: read-write, base, 4 KiB.
        assert!(find(&[0x86, 9, 0, 1, 0, 0x10, 0, 0xd0, 0, 0x10, 0, 0]).is_some(), "window of device 1");
        assert!(find(&[0x89, 6, 0, 0b011, 1, 6, 0, 0, 0]).is_some(), "IRQ 6, edge, active high");
    }
}
