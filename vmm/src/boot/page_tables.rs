//! Identity page tables for Specula's own guests, built by the vmm before boot.
//!
//! A Specula guest's CPL0 stub identity-maps every GiB that holds RAM or a mirror
//! window. PVM emulates CPL0 code instruction by instruction and offers no 1 GiB pages,
//! so the stub's loop of one store per 2 MiB took about 2 s for an inspector whose
//! window mirrors 256 GiB. An image that carries the Specula page-table note lets the
//! vmm write the same tables into guest RAM (a copy, well under a millisecond) and set a
//! flag that makes the stub skip its loop.
//!
//! Note desc (five little-endian u32 guest-physical addresses, all inside the image):
//! the "tables are built" flag (u32), the PML4 page, the PDPT page, the first page of
//! the page directories (2 MiB pages only, one per mapped GiB), and the mapped-GiB count
//! (u32) the stub would have stored.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// e820 type of RAM.
const E820_RAM: u32 = 1;
/// e820 type the Specula inspector gives its mirror window (the guest stub maps it too).
pub const SPECULA_E820_MIRROR: u32 = 0x5350_0001;
/// The stub maps at most this many GiB (one PDPT).
pub const MAX_GIB: u64 = 512;
/// The stub reads at most this many memory-map entries.
const MAX_MEMMAP_ENTRIES: usize = 128;
const GIB: u64 = 1 << 30;
const PAGE: u64 = 4096;
/// Present, writable, user.
const TABLE_FLAGS: u64 = 0x7;
/// Present, writable, user, large page.
const LEAF_FLAGS: u64 = 0x87;

/// Where an image wants its page tables (the Specula page-table note).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableNote {
    pub built_flag: u64,
    pub pml4: u64,
    pub pdpt: u64,
    pub pd_base: u64,
    pub mapped_gib: u64,
}

impl TableNote {
    /// The note's desc: five u32 addresses; None if it is shorter.
    pub fn parse(desc: &[u8]) -> Option<Self> {
        let word = |i: usize| desc.get(i * 4..i * 4 + 4).map(|b| u64::from(u32::from_le_bytes(b.try_into().unwrap())));
        Some(Self { built_flag: word(0)?, pml4: word(1)?, pdpt: word(2)?, pd_base: word(3)?, mapped_gib: word(4)? })
    }
}

/// Failures while writing a guest's page tables.
#[derive(Debug, thiserror::Error)]
pub enum PageTableError {
    #[error("the image's page-table note puts the {what} at {addr:#x}, which is not page-aligned")]
    Misaligned { what: &'static str, addr: u64 },
    #[error("the image's page-table note puts the {what} at {addr:#x} (+{len:#x}), outside guest RAM")]
    OutsideRam { what: &'static str, addr: u64, len: u64 },
}

/// The GiBs the stub maps for `memmap`: every GiB up to the end of the highest RAM or
/// mirror entry among the first 128, at least 1 and at most 512. (An entry whose end
/// overflows 64 bits counts as the top of the address space here, where the stub's
/// 32-bit arithmetic would wrap; no memory map this vmm writes has one.)
pub fn mapped_gib(memmap: &[(u64, u64, u32)]) -> u64 {
    memmap
        .iter()
        .take(MAX_MEMMAP_ENTRIES)
        .filter(|(_, _, kind)| *kind == E820_RAM || *kind == SPECULA_E820_MIRROR)
        .map(|(addr, size, _)| addr.saturating_add(*size).div_ceil(GIB))
        .fold(1, u64::max)
        .min(MAX_GIB)
}

/// Writes the identity map the stub would build for `memmap` (1 GiB pages where the
/// guest's CPUID offers them, else 2 MiB pages) and sets the note's flag; returns the
/// GiBs mapped. `contains(gpa, len)` says whether a range is guest RAM.
pub fn prebuild(
    memory: &GuestMemoryMmap,
    contains: impl Fn(u64, u64) -> bool,
    note: &TableNote,
    memmap: &[(u64, u64, u32)],
    gib_pages: bool,
) -> Result<u64, PageTableError> {
    let gib = mapped_gib(memmap);
    let pd_len = if gib_pages { 0 } else { gib * PAGE };
    let places = [
        ("PML4", note.pml4, PAGE, true),
        ("PDPT", note.pdpt, PAGE, true),
        ("page directories", note.pd_base, pd_len, true),
        ("built flag", note.built_flag, 4, false),
        ("mapped-GiB count", note.mapped_gib, 4, false),
    ];
    for (what, addr, len, aligned) in places {
        if aligned && addr % PAGE != 0 {
            return Err(PageTableError::Misaligned { what, addr });
        }
        if len > 0 && !contains(addr, len) {
            return Err(PageTableError::OutsideRam { what, addr, len });
        }
    }
    let write = |addr: u64, bytes: &[u8], what: &'static str| {
        memory.write_slice(bytes, GuestAddress(addr)).map_err(|_| PageTableError::OutsideRam {
            what,
            addr,
            len: bytes.len() as u64,
        })
    };
    write(note.pml4, &(note.pdpt | TABLE_FLAGS).to_le_bytes(), "PML4")?;
    let pdpt: Vec<u8> = (0..gib)
        .map(|g| if gib_pages { (g * GIB) | LEAF_FLAGS } else { (note.pd_base + g * PAGE) | TABLE_FLAGS })
        .flat_map(u64::to_le_bytes)
        .collect();
    write(note.pdpt, &pdpt, "PDPT")?;
    if !gib_pages {
        let directories: Vec<u8> = (0..gib * 512).map(|i| (i << 21) | LEAF_FLAGS).flat_map(u64::to_le_bytes).collect();
        write(note.pd_base, &directories, "page directories")?;
    }
    write(note.mapped_gib, &(gib as u32).to_le_bytes(), "mapped-GiB count")?;
    write(note.built_flag, &1u32.to_le_bytes(), "built flag")?;
    Ok(gib)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap()
    }

    fn u64_at(memory: &GuestMemoryMmap, addr: u64) -> u64 {
        memory.read_obj(GuestAddress(addr)).unwrap()
    }

    fn u32_at(memory: &GuestMemoryMmap, addr: u64) -> u32 {
        memory.read_obj(GuestAddress(addr)).unwrap()
    }

    const NOTE: TableNote = TableNote {
        built_flag: 0x10_0000,
        pml4: 0x20_0000,
        pdpt: 0x20_1000,
        pd_base: 0x30_0000,
        mapped_gib: 0x10_0004,
    };

    #[test]
    fn the_mapped_gibs_cover_ram_and_mirror_windows_as_the_stub_counts_them() {
        assert_eq!(mapped_gib(&[]), 1);
        assert_eq!(mapped_gib(&[(0, 0xa0000, 1), (0x10_0000, 255 << 20, 1)]), 1);
        assert_eq!(mapped_gib(&[(0, 0xa0000, 1), (0x1_0000_0000, 1 << 30, 1)]), 5);
        // A mirror window counts, a reserved range does not.
        let window = (0x1_0000_0000, 256 * GIB + 1, SPECULA_E820_MIRROR);
        assert_eq!(mapped_gib(&[(0, 1 << 30, 1), window, (0xfff0_0000_0000, 1, 2)]), 261);
        assert_eq!(mapped_gib(&[(0, u64::MAX, 1)]), MAX_GIB);
        // Entries past the stub's 128 are not mapped by it either.
        let mut many = vec![(0, 4096, 2); 128];
        many.push((0, 8 * GIB, 1));
        assert_eq!(mapped_gib(&many), 1);
    }

    #[test]
    fn two_mib_tables_map_every_gib_identically_and_set_the_flag() {
        let mem = memory(8 << 20);
        let memmap = [(0, 256 << 20, 1), (0x1_0000_0000, 2 * GIB, SPECULA_E820_MIRROR)];
        let gib = prebuild(&mem, |a, l| a + l <= 8 << 20, &NOTE, &memmap, false).unwrap();
        assert_eq!(gib, 6);
        assert_eq!(u64_at(&mem, NOTE.pml4), NOTE.pdpt | 7);
        for g in 0..6 {
            assert_eq!(u64_at(&mem, NOTE.pdpt + g * 8), (NOTE.pd_base + g * PAGE) | 7);
        }
        assert_eq!(u64_at(&mem, NOTE.pdpt + 6 * 8), 0, "nothing past the mapped GiBs");
        // The identity map: 2 MiB page i maps physical i * 2 MiB.
        for i in [0u64, 1, 511, 512, 6 * 512 - 1] {
            assert_eq!(u64_at(&mem, NOTE.pd_base + i * 8), (i << 21) | 0x87, "PDE {i}");
        }
        assert_eq!((u32_at(&mem, NOTE.mapped_gib), u32_at(&mem, NOTE.built_flag)), (6, 1));
    }

    #[test]
    fn one_gib_pages_need_no_directories() {
        let mem = memory(4 << 20);
        let note = TableNote { pd_base: 0x7fff_f000_0000, ..NOTE };
        let gib = prebuild(&mem, |a, l| a + l <= 4 << 20, &note, &[(0, 3 * GIB, 1)], true).unwrap();
        assert_eq!(gib, 3);
        assert_eq!(u64_at(&mem, NOTE.pdpt + 2 * 8), (2 * GIB) | 0x87);
        assert_eq!(u32_at(&mem, NOTE.built_flag), 1);
    }

    #[test]
    fn a_note_pointing_outside_ram_or_off_a_page_is_refused_and_nothing_is_flagged() {
        let mem = memory(4 << 20);
        let inside = |a: u64, l: u64| a.checked_add(l).is_some_and(|end| end <= 4 << 20);
        let memmap = [(0, 4 << 20, 1)];
        let cases = [
            (TableNote { pml4: 0x20_0008, ..NOTE }, "not page-aligned"),
            (TableNote { pdpt: 0xffff_f000, ..NOTE }, "outside guest RAM"),
            (TableNote { pd_base: 0x40_0000, ..NOTE }, "outside guest RAM"),
            (TableNote { built_flag: 0xffff_fffe, ..NOTE }, "outside guest RAM"),
        ];
        for (note, message) in cases {
            let error = prebuild(&mem, inside, &note, &memmap, false).unwrap_err().to_string();
            assert!(error.contains(message), "{note:?}: {error}");
            assert_eq!(u32_at(&mem, NOTE.built_flag), 0, "{note:?}");
        }
        assert_eq!(TableNote::parse(&[0; 19]), None);
        assert_eq!(TableNote::parse(&[0; 20]).map(|n| n.pml4), Some(0));
    }
}
