//! ELF kernels: Specula's own guests and vmlinux images (PVH or the Linux 64-bit
//! entry), and the program headers and Specula notes the loader reads itself.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::loader::{Elf, KernelLoader, PvhBootCapability};
use vm_memory::GuestAddress;

use super::{loader_error, page_tables, BootError, LoadedKernel};
use crate::arch::x86_64::layout::HIMEM_START;
use crate::arch::x86_64::regs::BootProtocol;
use crate::memory::GuestRam;

/// The first bytes of every ELF file.
pub(super) const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
/// Bound on the PT_NOTE bytes scanned for the Specula note.
const MAX_NOTE_BYTES: u64 = 64 << 10;
/// Specula's ELF note: every vCPU may start at the PVH entry; desc = max vCPUs.
const SPECULA_NOTE_NAME: &[u8] = b"Specula\0";
const SPECULA_NOTE_SMP_ENTRY: u32 = 1;
/// Specula's ELF note: the vmm may build the identity page tables; desc = where (see
/// [`page_tables`]).
const SPECULA_NOTE_PAGE_TABLES: u32 = 2;

/// An ELF image: PVH if it has the note, else the Linux 64-bit entry.
pub(super) fn load_elf(ram: &GuestRam, kernel: &mut File, path: &Path) -> Result<LoadedKernel, BootError> {
    let result = Elf::load(ram.memory(), None, kernel, Some(GuestAddress(HIMEM_START)))
        .map_err(|e| loader_error(e, path, ram))?;
    let facts = scan_elf_program_headers(kernel, path)?;
    // linux-loader copies p_filesz; the zero-filled rest (bss) must fit in RAM too.
    check_segments_fit(ram, &facts, path)?;
    let (entry, protocol, notes) = match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(pvh_entry) => (pvh_entry.0, BootProtocol::Pvh, facts.notes),
        _ => (result.kernel_load.0, BootProtocol::Linux64, SpeculaNotes::default()),
    };
    Ok(LoadedKernel { entry, protocol, kernel_end: result.kernel_end, header: None, notes })
}

/// Every PT_LOAD segment, bss included, lies in guest RAM.
pub(super) fn check_segments_fit(ram: &GuestRam, facts: &ElfFacts, path: &Path) -> Result<(), BootError> {
    if facts.load_segments.iter().any(|&(paddr, memsz)| !ram.contains_range(paddr, memsz)) {
        return Err(BootError::KernelTooBig { path: path.to_path_buf(), mem_mib: ram.size() >> 20 });
    }
    Ok(())
}

/// The ELF header's e_entry.
pub(super) fn elf_entry(elf: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(elf.get(24..32)?.try_into().ok()?))
}

/// What the loader needs from an ELF's program headers beyond what linux-loader reports.
pub(super) struct ElfFacts {
    /// (physical address, size in memory) of every PT_LOAD segment.
    pub(super) load_segments: Vec<(u64, u64)>,
    /// The Specula notes, if the image has them.
    pub(super) notes: SpeculaNotes,
}

/// What an image's Specula notes ask for.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct SpeculaNotes {
    /// Every vCPU may start at the PVH entry; the image's vCPU limit.
    pub(super) smp_entry_max_cpus: Option<u32>,
    /// The vmm may build the identity page tables, there.
    pub(super) page_tables: Option<page_tables::TableNote>,
}

/// Reads the program headers: PT_LOAD extents and (bounded) PT_NOTE contents.
pub(super) fn scan_elf_program_headers<R: Read + Seek>(kernel: &mut R, path: &Path) -> Result<ElfFacts, BootError> {
    let corrupt = |detail: &str| BootError::CorruptKernel { path: path.to_path_buf(), detail: detail.to_string() };
    let mut ehdr = [0u8; 64];
    kernel.rewind().map_err(|_| corrupt("cannot seek to the ELF header"))?;
    kernel.read_exact(&mut ehdr).map_err(|_| corrupt("short ELF header"))?;
    let phoff = u64::from_le_bytes(ehdr[32..40].try_into().expect("8 bytes"));
    let phentsize = u16::from_le_bytes([ehdr[54], ehdr[55]]) as u64;
    let phnum = u16::from_le_bytes([ehdr[56], ehdr[57]]) as u64;
    if phentsize < 56 {
        return Err(corrupt("program header entries are too small"));
    }
    let mut facts = ElfFacts { load_segments: Vec::new(), notes: SpeculaNotes::default() };
    for i in 0..phnum {
        let mut phdr = [0u8; 56];
        let at = phoff.checked_add(i * phentsize).ok_or_else(|| corrupt("program header offset overflows"))?;
        kernel.seek(SeekFrom::Start(at)).map_err(|_| corrupt("cannot seek to a program header"))?;
        kernel.read_exact(&mut phdr).map_err(|_| corrupt("short program header"))?;
        const PT_LOAD: u32 = 1;
        const PT_NOTE: u32 = 4;
        let p_type = u32::from_le_bytes(phdr[0..4].try_into().expect("4 bytes"));
        if p_type == PT_LOAD {
            let paddr = u64::from_le_bytes(phdr[24..32].try_into().expect("8 bytes"));
            let memsz = u64::from_le_bytes(phdr[40..48].try_into().expect("8 bytes"));
            facts.load_segments.push((paddr, memsz));
            continue;
        }
        if p_type != PT_NOTE || facts.notes != SpeculaNotes::default() {
            continue;
        }
        let offset = u64::from_le_bytes(phdr[8..16].try_into().expect("8 bytes"));
        let size = u64::from_le_bytes(phdr[32..40].try_into().expect("8 bytes")).min(MAX_NOTE_BYTES);
        let mut notes = vec![0u8; size as usize];
        kernel.seek(SeekFrom::Start(offset)).map_err(|_| corrupt("cannot seek to a note segment"))?;
        kernel.read_exact(&mut notes).map_err(|_| corrupt("short note segment"))?;
        facts.notes = parse_specula_notes(&notes);
    }
    Ok(facts)
}

/// Walks ELF notes in `notes`, bounded by its length; returns what the Specula notes ask
/// for (nothing past a truncated note).
fn parse_specula_notes(notes: &[u8]) -> SpeculaNotes {
    let align4 = |n: usize| n.checked_add(3).map(|v| v & !3);
    let mut found = SpeculaNotes::default();
    let mut at = 0usize;
    while at + 12 <= notes.len() {
        let word = |o: usize| u32::from_le_bytes(notes[o..o + 4].try_into().expect("4 bytes")) as usize;
        let (namesz, descsz, kind) = (word(at), word(at + 4), word(at + 8) as u32);
        let name_start = at + 12;
        let Some(desc_start) = align4(namesz).and_then(|n| name_start.checked_add(n)) else { break };
        let Some(next) = align4(descsz).and_then(|n| desc_start.checked_add(n)) else { break };
        if next > notes.len() {
            break;
        }
        if &notes[name_start..name_start + namesz] == SPECULA_NOTE_NAME {
            let desc = &notes[desc_start..desc_start + descsz];
            match kind {
                SPECULA_NOTE_SMP_ENTRY if descsz >= 4 => found.smp_entry_max_cpus = Some(word(desc_start) as u32),
                SPECULA_NOTE_PAGE_TABLES => found.page_tables = page_tables::TableNote::parse(desc),
                _ => {}
            }
        }
        at = next;
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(name.len() as u32).to_le_bytes());
        v.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        v.extend_from_slice(&kind.to_le_bytes());
        v.extend_from_slice(name);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v.extend_from_slice(desc);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }

    #[test]
    fn specula_note_is_found_after_other_notes() {
        let mut notes = note(b"Xen\0", 18, &0x100000u32.to_le_bytes());
        notes.extend(note(SPECULA_NOTE_NAME, SPECULA_NOTE_SMP_ENTRY, &32u32.to_le_bytes()));
        assert_eq!(parse_specula_notes(&notes), SpeculaNotes { smp_entry_max_cpus: Some(32), page_tables: None });
        let desc: Vec<u8> =
            [0x10_1000u32, 0x10_2000, 0x10_3000, 0x20_0000, 0x10_1004].iter().flat_map(|w| w.to_le_bytes()).collect();
        notes.extend(note(SPECULA_NOTE_NAME, SPECULA_NOTE_PAGE_TABLES, &desc));
        let tables = parse_specula_notes(&notes).page_tables.expect("the page-table note");
        assert_eq!((tables.pml4, tables.pd_base, tables.mapped_gib), (0x10_2000, 0x20_0000, 0x10_1004));
    }

    #[test]
    fn truncated_or_hostile_notes_are_rejected_without_panicking() {
        let notes = note(SPECULA_NOTE_NAME, SPECULA_NOTE_SMP_ENTRY, &32u32.to_le_bytes());
        for cut in 0..notes.len() {
            assert_eq!(parse_specula_notes(&notes[..cut]), SpeculaNotes::default());
        }
        let mut huge = vec![0u8; 12];
        huge[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(parse_specula_notes(&huge), SpeculaNotes::default());
        // A page-table note too short for its five addresses asks for nothing.
        let short = note(SPECULA_NOTE_NAME, SPECULA_NOTE_PAGE_TABLES, &[0; 16]);
        assert_eq!(parse_specula_notes(&short), SpeculaNotes::default());
    }
}
