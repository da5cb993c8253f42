//! Memory dump formats `specula dump` writes: an ELF core as QEMU's
//! `dump-guest-memory` and the kernel's kdump write it (one `PT_LOAD` per RAM
//! range, physical addresses in `p_paddr`, a `VMCOREINFO` note), which
//! Volatility, drgn and crash open; and LiME (a 32-byte header before each
//! range), which Volatility and most memory tools read.
//!
//! Only the headers are built here; the caller streams each range's bytes
//! after them, in order, so that a dump of any size never sits in memory.

/// One range of guest-physical memory in the dump.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub gpa: u64,
    pub len: u64,
}

/// How the copy was made, recorded in the dump's `SPECULA` note.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consistency {
    /// The source's vCPUs were paused for the whole copy.
    Paused,
    /// The source kept running: structures may be torn.
    Live,
}

const EHDR: usize = 64;
const PHDR: usize = 56;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const ET_CORE: u16 = 4;
const EM_X86_64: u16 = 62;
/// Where the first range's bytes start: page-aligned, as tools that mmap a core expect.
const DATA_ALIGN: u64 = 4096;
/// The LiME header's magic and version.
const LIME_MAGIC: u32 = 0x4C69_4D45;
const LIME_VERSION: u32 = 1;
pub const LIME_HEADER: usize = 32;

fn note(out: &mut Vec<u8>, name: &str, kind: u32, desc: &[u8]) {
    let name = [name.as_bytes(), b"\0"].concat();
    out.extend_from_slice(&(name.len() as u32).to_le_bytes());
    out.extend_from_slice(&(desc.len() as u32).to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    for part in [&name[..], desc] {
        out.extend_from_slice(part);
        out.resize(out.len().next_multiple_of(4), 0);
    }
}

/// The ELF core's header, program headers and notes, padded so that the first
/// range's bytes follow at the returned length; the ranges follow back to back.
/// `vmcoreinfo` is the kernel's VMCOREINFO text, where the guest runs Linux.
pub fn elf_header(ranges: &[Range], vmcoreinfo: Option<&[u8]>, consistency: Consistency) -> Vec<u8> {
    let mut notes = Vec::new();
    if let Some(text) = vmcoreinfo {
        // kdump's convention: name "VMCOREINFO", type 0, the text as the descriptor.
        note(&mut notes, "VMCOREINFO", 0, text);
    }
    let how: &[u8] = match consistency {
        Consistency::Paused => b"paused",
        Consistency::Live => b"live",
    };
    note(&mut notes, "SPECULA", 1, how);
    let phnum = 1 + ranges.len();
    let notes_at = (EHDR + PHDR * phnum) as u64;
    let data_at = (notes_at + notes.len() as u64).next_multiple_of(DATA_ALIGN);

    let mut out = Vec::with_capacity(data_at as usize);
    out.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&ET_CORE.to_le_bytes());
    out.extend_from_slice(&EM_X86_64.to_le_bytes());
    out.extend_from_slice(&1u32.to_le_bytes()); // e_version
    out.extend_from_slice(&0u64.to_le_bytes()); // e_entry
    out.extend_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    out.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    out.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    out.extend_from_slice(&(EHDR as u16).to_le_bytes());
    out.extend_from_slice(&(PHDR as u16).to_le_bytes());
    out.extend_from_slice(&(phnum as u16).to_le_bytes());
    out.extend_from_slice(&[0; 6]); // no section headers

    let phdr = |out: &mut Vec<u8>, kind: u32, flags: u32, offset: u64, paddr: u64, size: u64, align: u64| {
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes()); // p_vaddr: physical dump, as QEMU's without paging
        out.extend_from_slice(&paddr.to_le_bytes());
        out.extend_from_slice(&size.to_le_bytes()); // p_filesz
        out.extend_from_slice(&size.to_le_bytes()); // p_memsz
        out.extend_from_slice(&align.to_le_bytes());
    };
    phdr(&mut out, PT_NOTE, 0, notes_at, 0, notes.len() as u64, 4);
    let mut offset = data_at;
    for r in ranges {
        phdr(&mut out, PT_LOAD, 7, offset, r.gpa, r.len, 0);
        offset += r.len;
    }
    out.extend_from_slice(&notes);
    out.resize(data_at as usize, 0);
    out
}

/// The LiME header of one range (`end` is inclusive in LiME).
pub fn lime_header(range: Range) -> [u8; LIME_HEADER] {
    let mut h = [0u8; LIME_HEADER];
    h[0..4].copy_from_slice(&LIME_MAGIC.to_le_bytes());
    h[4..8].copy_from_slice(&LIME_VERSION.to_le_bytes());
    h[8..16].copy_from_slice(&range.gpa.to_le_bytes());
    h[16..24].copy_from_slice(&(range.gpa + range.len - 1).to_le_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn the_elf_header_places_each_range_after_the_last() {
        let ranges = [Range { gpa: 0, len: 0xa0000 }, Range { gpa: 0x100000, len: 0x1ff0_0000 }];
        let info = b"OSRELEASE=6.1.0\nPAGESIZE=4096\n";
        let h = elf_header(&ranges, Some(info), Consistency::Paused);
        assert_eq!(&h[..4], b"\x7fELF");
        assert_eq!((u16_at(&h, 16), u16_at(&h, 18), u16_at(&h, 56)), (ET_CORE, EM_X86_64, 3));
        assert_eq!(h.len() % DATA_ALIGN as usize, 0);
        // PT_NOTE, then the loads at consecutive offsets from the end of the header.
        let ph = |i: usize| EHDR + PHDR * i;
        assert_eq!(u32_at(&h, ph(0)), PT_NOTE);
        let (notes_at, notes_len) = (u64_at(&h, ph(0) + 8) as usize, u64_at(&h, ph(0) + 32) as usize);
        let notes = &h[notes_at..notes_at + notes_len];
        assert_eq!((u32_at(notes, 0), u32_at(notes, 4), u32_at(notes, 8)), (11, info.len() as u32, 0));
        assert_eq!(&notes[12..23], b"VMCOREINFO\0");
        assert_eq!(&notes[24..24 + info.len()], info);
        assert!(notes.windows(8).any(|w| w == b"SPECULA\0") && notes.windows(6).any(|w| w == b"paused"));
        for (i, r) in ranges.iter().enumerate() {
            let p = ph(1 + i);
            assert_eq!(u32_at(&h, p), PT_LOAD);
            assert_eq!((u64_at(&h, p + 24), u64_at(&h, p + 32), u64_at(&h, p + 40)), (r.gpa, r.len, r.len));
        }
        assert_eq!(u64_at(&h, ph(1) + 8), h.len() as u64);
        assert_eq!(u64_at(&h, ph(2) + 8), h.len() as u64 + 0xa0000);
        assert!(elf_header(&ranges, None, Consistency::Live).windows(4).any(|w| w == b"live"));
    }

    #[test]
    fn a_lime_header_has_an_inclusive_end() {
        let h = lime_header(Range { gpa: 0x100000, len: 0x1000 });
        assert_eq!((u32_at(&h, 0), u32_at(&h, 4)), (LIME_MAGIC, 1));
        assert_eq!((u64_at(&h, 8), u64_at(&h, 16), u64_at(&h, 24)), (0x100000, 0x100fff, 0));
    }
}
