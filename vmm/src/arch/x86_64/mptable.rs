//! Intel MultiProcessor Specification 1.4 table, so that Linux (and Specula's
//! guests) see every vCPU, the ISA bus and the IOAPIC without ACPI.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{APIC_START, IOAPIC_START, MPTABLE_START};

/// APIC IDs 0..=253 for vCPUs; the IOAPIC takes the next one.
pub const MAX_SUPPORTED_CPUS: u8 = 254;
const MPC_SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const ISA_IRQS: u8 = 16;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

/// Failures while writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("{0} vCPUs exceed the MP table's limit of {MAX_SUPPORTED_CPUS}")]
    TooManyCpus(u8),
    #[error("cannot write the MP table into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)).wrapping_neg()
}

/// Builds the floating pointer structure followed by the configuration table.
fn build(cpu_count: u8) -> Vec<u8> {
    let ioapic_id = cpu_count;
    let mut entries = Vec::new();
    let mut entry_count: u16 = 0;
    for cpu in 0..cpu_count {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        entry_count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entry_count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, CPU_ENABLED]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    entry_count += 1;
    for irq in 0..ISA_IRQS {
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, 0, 0, irq, ioapic_id, irq]);
        entry_count += 1;
    }
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    entry_count += 2;

    let table_start = MPTABLE_START + 16;
    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.extend_from_slice(&[MPC_SPEC_REV, 0]);
    table.extend_from_slice(b"SPECULA ");
    table.extend_from_slice(b"000000000000");
    table.extend_from_slice(&0u32.to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&[0; 4]);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(16);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&(table_start as u32).to_le_bytes());
    floating.extend_from_slice(&[1, MPC_SPEC_REV, 0, 0, 0, 0, 0, 0]);
    floating[10] = checksum(&floating);

    floating.extend_from_slice(&table);
    floating
}

/// Writes the MP table for `cpu_count` vCPUs at [`MPTABLE_START`].
pub fn setup_mptable(mem: &GuestMemoryMmap, cpu_count: u8) -> Result<(), MptableError> {
    if cpu_count > MAX_SUPPORTED_CPUS {
        return Err(MptableError::TooManyCpus(cpu_count));
    }
    mem.write_slice(&build(cpu_count), GuestAddress(MPTABLE_START)).map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_are_valid_and_processors_are_listed() {
        let bytes = build(4);
        assert_eq!(&bytes[..4], b"_MP_");
        assert_eq!(bytes[..16].iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
        let table = &bytes[16..];
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(table.iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
        let count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(count, 4 + 1 + 1 + 16 + 2);
        let cpus = (0..4).map(|i| &table[44 + i * 20..44 + i * 20 + 20]).filter(|e| e[0] == ENTRY_PROCESSOR).count();
        assert_eq!(cpus, 4);
        assert_eq!(table[44 + 3] & CPU_BOOTPROCESSOR, CPU_BOOTPROCESSOR);
    }

    #[test]
    fn too_many_cpus_is_refused() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert!(matches!(setup_mptable(&mem, 255), Err(MptableError::TooManyCpus(255))));
        setup_mptable(&mem, MAX_SUPPORTED_CPUS).unwrap();
    }
}
