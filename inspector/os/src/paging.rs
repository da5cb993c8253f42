//! x86-64 address translation over a [`PhysMem`]: 4-level and 5-level paging
//! (CR4.LA57), 4 KiB, 2 MiB and 1 GiB pages.
//!
//! A walk reads at most one entry per level (4 or 5 reads), so it always ends,
//! whatever the tables contain: tables that point at themselves or at each
//! other only produce odd translations, never a loop. Entry bits outside the
//! physical-address field are masked: NX (63), protection keys and ignored bits
//! (52..62), PAT (bit 12 in large-page entries) and the flag bits (0..11).
//! A table or page outside RAM fails on the read, as [`Error::PhysRead`].

use core::cell::Cell;

use crate::{Error, PhysMem};

/// Bits 12..51 of a table or 4 KiB page entry.
pub const ADDR_MASK_4K: u64 = 0x000f_ffff_ffff_f000;
/// Bits 21..51 of a 2 MiB page entry (bit 12 there is PAT).
pub const ADDR_MASK_2M: u64 = 0x000f_ffff_ffe0_0000;
/// Bits 30..51 of a 1 GiB page entry (bit 12 there is PAT).
pub const ADDR_MASK_1G: u64 = 0x000f_ffff_c000_0000;
const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const PAGE_SIZE_BIT: u64 = 1 << 7;
const NX: u64 = 1 << 63;

/// 4-level (48-bit) or 5-level (57-bit, CR4.LA57) paging; `4-level` or `5-level` in JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum PagingMode {
    /// 48-bit virtual addresses, four levels of tables.
    #[cfg_attr(feature = "serde", serde(rename = "4-level"))]
    Level4,
    /// 57-bit virtual addresses, five levels of tables (CR4.LA57).
    #[cfg_attr(feature = "serde", serde(rename = "5-level"))]
    Level5,
}

impl PagingMode {
    fn levels(self) -> u8 {
        match self {
            PagingMode::Level4 => 4,
            PagingMode::Level5 => 5,
        }
    }

    /// Whether `va` is canonical (bits above the top implemented bit are copies of it).
    pub fn is_canonical(self, va: u64) -> bool {
        let bits = match self {
            PagingMode::Level4 => 48,
            PagingMode::Level5 => 57,
        };
        let shifted = (va as i64) >> (bits - 1);
        shifted == 0 || shifted == -1
    }
}

/// A successful translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// The physical address `va` maps to.
    pub pa: u64,
    /// Size of the page holding it (4 KiB, 2 MiB or 1 GiB).
    pub page_size: u64,
    /// Writable at every level.
    pub writable: bool,
    /// User-accessible at every level.
    pub user: bool,
    /// No-execute at some level.
    pub nx: bool,
}

/// Where the entry for `va` sits in the table at `table` of paging level `level` (4 or
/// 5 at the top, 1 for the page table).
fn entry_address(table: u64, va: u64, level: u8) -> u64 {
    table + ((va >> (12 + 9 * u32::from(level - 1))) & 0x1ff) * 8
}

/// The address mask and size of a page mapped by a leaf entry at `level` (1: 4 KiB,
/// 2: 2 MiB, 3: 1 GiB).
fn leaf(level: u8) -> (u64, u64) {
    match level {
        1 => (ADDR_MASK_4K, 1 << 12),
        2 => (ADDR_MASK_2M, 1 << 21),
        _ => (ADDR_MASK_1G, 1 << 30),
    }
}

/// Reads `buf.len()` bytes at virtual `va`, page by page, each page placed by
/// `place(va)`: its physical address and the bytes left in its page.
fn read_pages<M: PhysMem + ?Sized>(
    mem: &M,
    va: u64,
    buf: &mut [u8],
    place: impl Fn(u64) -> Result<(u64, u64), Error>,
) -> Result<(), Error> {
    let mut done = 0usize;
    while done < buf.len() {
        let (pa, in_page) = place(va.wrapping_add(done as u64))?;
        let n = usize::try_from(in_page).unwrap_or(usize::MAX).min(buf.len() - done);
        mem.read(pa, &mut buf[done..done + n])?;
        done += n;
    }
    Ok(())
}

/// Most present page-table entries one search for a page's owner visits.
pub const MAX_MAPPING_SEARCH: usize = 1 << 20;

/// The lowest user-half virtual address whose page the page tables rooted at `root`
/// map to the physical page holding `pa` (4 KiB pages and large ones), or `None`.
/// Visits at most `budget` present entries, counting down; past that it stops with
/// `Error::TooLarge`. Used to find which process's memory holds a given page.
pub fn find_user_mapping<M: PhysMem + ?Sized>(
    mem: &M,
    root: u64,
    mode: PagingMode,
    pa: u64,
    budget: &mut usize,
) -> Result<Option<u64>, Error> {
    /// One table at `level`, whose first entry maps `base`.
    fn walk<M: PhysMem + ?Sized>(
        mem: &M,
        table: u64,
        level: u8,
        base: u64,
        entries: core::ops::Range<u64>,
        pa: u64,
        budget: &mut usize,
    ) -> Result<Option<u64>, Error> {
        let span = 1u64 << (12 + 9 * (u32::from(level) - 1));
        for i in entries {
            let mut raw = [0u8; 8];
            mem.read(table + i * 8, &mut raw)?;
            let entry = u64::from_le_bytes(raw);
            if entry & PRESENT == 0 {
                continue;
            }
            *budget = budget.checked_sub(1).ok_or(Error::TooLarge {
                what: "page-table entries searched",
                value: u64::MAX,
                max: MAX_MAPPING_SEARCH as u64,
            })?;
            let va = base + i * span;
            let large = entry & PAGE_SIZE_BIT != 0 && (level == 2 || level == 3);
            if level == 1 || large {
                let (mask, page_size) = leaf(level);
                if pa & !(page_size - 1) == entry & mask {
                    return Ok(Some(va + (pa & (page_size - 1) & !0xfff)));
                }
                continue;
            }
            if let Some(found) = walk(mem, entry & ADDR_MASK_4K, level - 1, va, 0..512, pa, budget)? {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }
    // The user half: the lower 256 entries of the top table.
    walk(mem, root & ADDR_MASK_4K, mode.levels(), 0, 0..256, pa, budget)
}

/// Translates `va` through the page tables rooted at `root` (CR3's
/// physical address; its low 12 bits, PCID or flags, are ignored).
pub fn translate<M: PhysMem + ?Sized>(mem: &M, root: u64, mode: PagingMode, va: u64) -> Result<Translation, Error> {
    if !mode.is_canonical(va) {
        return Err(Error::NonCanonical { va });
    }
    let mut table = root & ADDR_MASK_4K;
    let (mut writable, mut user, mut nx) = (true, true, false);
    let mut level = mode.levels();
    loop {
        let mut raw = [0u8; 8];
        mem.read(entry_address(table, va, level), &mut raw)?;
        let entry = u64::from_le_bytes(raw);
        if entry & PRESENT == 0 {
            return Err(Error::NotMapped { va, level });
        }
        writable &= entry & WRITABLE != 0;
        user &= entry & USER != 0;
        nx |= entry & NX != 0;
        let large = entry & PAGE_SIZE_BIT != 0;
        if large && level >= 4 {
            return Err(Error::BadPageTableEntry { va, level, entry });
        }
        if level == 1 || large {
            let (mask, page_size) = leaf(level);
            let pa = (entry & mask) | (va & (page_size - 1));
            return Ok(Translation { pa, page_size, writable, user, nx });
        }
        table = entry & ADDR_MASK_4K;
        level -= 1;
    }
}

/// Guest-virtual memory: reads by virtual address, spanning pages.
pub trait VirtMem {
    /// Reads `buf.len()` bytes at `va`; fails at the first unmapped byte.
    fn read_virt(&self, va: u64, buf: &mut [u8]) -> Result<(), Error>;

    /// A hint that `va` will be read soon (see [`PhysMem::prefetch`]): translated, if
    /// that is cheap, and passed on; never an error. The default does nothing.
    fn prefetch_virt(&self, _va: u64) {}

    /// A little-endian `u64` at `va`.
    fn read_u64(&self, va: u64) -> Result<u64, Error> {
        let mut b = [0u8; 8];
        self.read_virt(va, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// A little-endian `u32` at `va`.
    fn read_u32(&self, va: u64) -> Result<u32, Error> {
        let mut b = [0u8; 4];
        self.read_virt(va, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// An unsigned little-endian integer of `size` bytes (1, 2, 4 or 8) at `va`.
    fn read_uint(&self, va: u64, size: u64) -> Result<u64, Error> {
        if !matches!(size, 1 | 2 | 4 | 8) {
            return Err(Error::Corrupt(alloc::format!("integer of {size} bytes at {va:#x}")));
        }
        let mut b = [0u8; 8];
        self.read_virt(va, &mut b[..size as usize])?;
        Ok(u64::from_le_bytes(b))
    }
}

/// One address space: a page-table root over physical memory. The kernel's
/// (rooted at `swapper_pg_dir`) or a process's (rooted at its `mm->pgd`).
#[derive(Clone, Copy)]
pub struct AddressSpace<'a, M: PhysMem + ?Sized> {
    mem: &'a M,
    root: u64,
    mode: PagingMode,
}

impl<'a, M: PhysMem + ?Sized> AddressSpace<'a, M> {
    /// An address space rooted at the physical address `root`.
    pub fn new(mem: &'a M, root: u64, mode: PagingMode) -> Self {
        Self { mem, root, mode }
    }

    /// The page-table root's physical address.
    pub fn root(&self) -> u64 {
        self.root
    }

    /// 4- or 5-level paging.
    pub fn mode(&self) -> PagingMode {
        self.mode
    }

    /// Translates one address.
    pub fn translate(&self, va: u64) -> Result<Translation, Error> {
        translate(self.mem, self.root, self.mode, va)
    }
}

impl<M: PhysMem + ?Sized> VirtMem for AddressSpace<'_, M> {
    fn read_virt(&self, va: u64, buf: &mut [u8]) -> Result<(), Error> {
        read_pages(self.mem, va, buf, |at| {
            let t = self.translate(at)?;
            Ok((t.pa, t.page_size - (t.pa & (t.page_size - 1))))
        })
    }
}

/// Prefetches the page walks of many `(root, va)` pairs, one level at a time across
/// all of them, and then the bytes at each `va`: a walk is a chain of dependent reads,
/// so walking many one after another waits for each miss in turn, while this pass
/// keeps one miss per walk in flight. It only warms the cache: entries are read but
/// not trusted (a bad one ends that walk's prefetching), and callers still translate
/// with [`translate`]. At most `levels` reads per walk, no allocation beyond `walks`.
pub fn prefetch_walks<M: PhysMem + ?Sized>(mem: &M, mode: PagingMode, walks: &[(u64, u64)]) {
    // Per walk: the table to read next, or None once it ended (leaf, hole or junk).
    let mut tables: alloc::vec::Vec<Option<u64>> = walks.iter().map(|&(root, _)| Some(root & ADDR_MASK_4K)).collect();
    for (table, &(_, va)) in tables.iter().zip(walks) {
        if let Some(table) = table {
            mem.prefetch(entry_address(*table, va, mode.levels()));
        }
    }
    for level in (1..=mode.levels()).rev() {
        for (table, &(_, va)) in tables.iter_mut().zip(walks) {
            let Some(at) = table.map(|t| entry_address(t, va, level)) else { continue };
            let mut raw = [0u8; 8];
            let entry = mem.read(at, &mut raw).map(|()| u64::from_le_bytes(raw)).unwrap_or(0);
            *table = None;
            if entry & PRESENT == 0 {
                continue;
            }
            if level == 1 || entry & PAGE_SIZE_BIT != 0 {
                let (mask, size) = leaf(level);
                mem.prefetch((entry & mask) | (va & (size - 1)));
            } else {
                let next = entry & ADDR_MASK_4K;
                mem.prefetch(entry_address(next, va, level - 1));
                *table = Some(next);
            }
        }
    }
}

/// How many translations a [`CachedSpace`] remembers.
const CACHED_TRANSLATIONS: usize = 8;

/// An address space that remembers its last few translations, as a TLB does: a view
/// that reads many fields of the same structures walks the page tables once per page
/// instead of once per field (kernel objects mostly sit in the direct map's 1 GiB or
/// 2 MiB pages, so a handful of entries covers a whole task list).
///
/// Like a TLB it goes stale when the guest changes its page tables, so it lives for
/// one view's run only (it is built on the stack and dropped with the result); the
/// `Cell`s keep it out of shared state by making it `!Sync`.
pub struct CachedSpace<'s, 'a, M: PhysMem + ?Sized> {
    space: &'s AddressSpace<'a, M>,
    /// `(page base, page size, physical base)`; size 0 marks an empty entry.
    entries: [Cell<(u64, u64, u64)>; CACHED_TRANSLATIONS],
    /// The entry the next new translation replaces (round robin).
    next: Cell<usize>,
}

impl<'s, 'a, M: PhysMem + ?Sized> CachedSpace<'s, 'a, M> {
    /// An empty cache over `space`.
    pub fn new(space: &'s AddressSpace<'a, M>) -> Self {
        CachedSpace { space, entries: Default::default(), next: Cell::new(0) }
    }

    /// `va`'s physical address and the bytes left in its page, from a remembered
    /// translation or a fresh walk (which is then remembered).
    fn lookup(&self, va: u64) -> Result<(u64, u64), Error> {
        for entry in &self.entries {
            let (base, size, pa) = entry.get();
            if size != 0 && va & !(size - 1) == base {
                let offset = va & (size - 1);
                return Ok((pa | offset, size - offset));
            }
        }
        let t = self.space.translate(va)?;
        let size = t.page_size;
        let slot = self.next.get();
        self.entries[slot].set((va & !(size - 1), size, t.pa & !(size - 1)));
        self.next.set((slot + 1) % CACHED_TRANSLATIONS);
        Ok((t.pa, size - (t.pa & (size - 1))))
    }
}

impl<M: PhysMem + ?Sized> VirtMem for CachedSpace<'_, '_, M> {
    fn prefetch_virt(&self, va: u64) {
        if let Ok((pa, _)) = self.lookup(va) {
            self.space.mem.prefetch(pa);
        }
    }

    fn read_virt(&self, va: u64, buf: &mut [u8]) -> Result<(), Error> {
        read_pages(self.space.mem, va, buf, |at| self.lookup(at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testmem::TestMem;

    const P: u64 = 1; // present
    const RW: u64 = 2;
    const US: u64 = 4;
    const PS: u64 = 1 << 7;

    fn idx(va: u64, level: u32) -> u64 {
        (va >> (12 + 9 * (level - 1))) & 0x1ff
    }

    /// Maps `va` → 4 KiB page `pa` with tables at `tables[0..levels]` (root first).
    fn map4k(mem: &mut TestMem, tables: &[u64], va: u64, pa: u64, leaf_flags: u64) {
        let levels = tables.len() as u32;
        for (i, &t) in tables.iter().enumerate() {
            let level = levels - i as u32;
            let entry = if level == 1 { pa | leaf_flags } else { tables[i + 1] | P | RW | US };
            mem.write_u64(t + idx(va, level) * 8, entry);
        }
    }

    #[test]
    fn four_level_4k_pages_and_spanning_reads() {
        let mut mem = TestMem::new(0, 64 << 12);
        let tables = [0x1000, 0x2000, 0x3000, 0x4000];
        let va = 0x7f12_3456_7000;
        map4k(&mut mem, &tables, va, 0x10000, P | RW | US);
        map4k(&mut mem, &tables, va + 0x1000, 0x20000, P | US | NX);
        let t = translate(&mem, 0x1000, PagingMode::Level4, va + 0x123).unwrap();
        assert_eq!((t.pa, t.page_size, t.writable, t.user, t.nx), (0x10123, 4096, true, true, false));
        let t = translate(&mem, 0x1000 | 0x7, PagingMode::Level4, va + 0x1008).unwrap(); // CR3 low bits ignored
        assert_eq!((t.pa, t.writable, t.nx), (0x20008, false, true));
        mem.write(0x10ffe, b"ab");
        mem.write(0x20000, b"cd");
        let space = AddressSpace::new(&mem, 0x1000, PagingMode::Level4);
        let mut buf = [0u8; 4];
        space.read_virt(va + 0xffe, &mut buf).unwrap();
        assert_eq!(&buf, b"abcd");
        // The next page is not present: the read fails at level 1.
        assert_eq!(space.read_virt(va + 0x1ffe, &mut buf), Err(Error::NotMapped { va: va + 0x2000, level: 1 }));
        assert_eq!(translate(&mem, 0x1000, PagingMode::Level4, 0x1000), Err(Error::NotMapped { va: 0x1000, level: 4 }));
        assert_eq!(
            translate(&mem, 0x1000, PagingMode::Level4, 0x8000_0000_0000),
            Err(Error::NonCanonical { va: 0x8000_0000_0000 })
        );
    }

    #[test]
    fn five_level_paging() {
        let mut mem = TestMem::new(0, 64 << 12);
        let va = 0xff11_2233_4455_6000; // canonical only with 57 bits
        assert!(!PagingMode::Level4.is_canonical(va) && PagingMode::Level5.is_canonical(va));
        map4k(&mut mem, &[0x1000, 0x2000, 0x3000, 0x4000, 0x5000], va, 0x30000, P);
        let t = translate(&mem, 0x1000, PagingMode::Level5, va + 5).unwrap();
        assert_eq!(t.pa, 0x30005);
        assert_eq!(translate(&mem, 0x1000, PagingMode::Level4, va), Err(Error::NonCanonical { va }));
    }

    #[test]
    fn large_pages_mask_pat_and_high_bits() {
        let mut mem = TestMem::new(0, 16 << 12);
        let va2m = 0xffff_ffff_8120_0000u64;
        let va1g = 0xffff_8880_4000_0000u64;
        mem.write_u64(0x1000 + idx(va2m, 4) * 8, 0x2000 | P);
        mem.write_u64(0x2000 + idx(va2m, 3) * 8, 0x3000 | P);
        // 2 MiB page at 0x4000_0000 with PAT (bit 12), NX and protection-key bits set.
        mem.write_u64(0x3000 + idx(va2m, 2) * 8, 0x4000_0000 | (1 << 12) | NX | (0xf << 59) | PS | P | RW);
        let t = translate(&mem, 0x1000, PagingMode::Level4, va2m + 0x1_2345).unwrap();
        assert_eq!((t.pa, t.page_size, t.nx, t.writable), (0x4001_2345, 2 << 20, true, false));
        // 1 GiB page at 0x1_8000_0000 with PAT set.
        mem.write_u64(0x1000 + idx(va1g, 4) * 8, 0x5000 | P | RW);
        mem.write_u64(0x5000 + idx(va1g, 3) * 8, 0x1_8000_0000 | (1 << 12) | PS | P | RW);
        let t = translate(&mem, 0x1000, PagingMode::Level4, va1g + 0x3fff_ffff).unwrap();
        assert_eq!((t.pa, t.page_size), (0x1_bfff_ffff, 1 << 30));
        // PS in a PML4 entry is reserved.
        mem.write_u64(0x1000 + 8, 0x6000 | PS | P);
        assert!(matches!(
            translate(&mem, 0x1000, PagingMode::Level4, 1 << 39),
            Err(Error::BadPageTableEntry { level: 4, .. })
        ));
        // A page outside RAM: the read fails, the translation does not.
        let space = AddressSpace::new(&mem, 0x1000, PagingMode::Level4);
        assert!(matches!(space.read_u64(va2m), Err(Error::PhysRead { .. })));
    }

    #[test]
    fn self_referencing_and_hostile_tables_end() {
        let mut mem = TestMem::new(0, 4 << 12);
        // Every entry of the root points at the root itself.
        for i in 0..512 {
            mem.write_u64(0x1000 + i * 8, 0x1000 | P | RW);
        }
        // Four levels of "table" all at 0x1000: the leaf maps page 0x1000.
        let t = translate(&mem, 0x1000, PagingMode::Level4, 0x1234).unwrap();
        assert_eq!(t.pa, 0x1234);
        let t = translate(&mem, 0x1000, PagingMode::Level5, 0xff00_0000_0000_0000).unwrap();
        assert_eq!(t.pa, 0x1000);
        // Entries pointing far outside RAM.
        for i in 0..512 {
            mem.write_u64(0x2000 + i * 8, 0x000f_ffff_ffff_f000 | P);
        }
        assert!(matches!(translate(&mem, 0x2000, PagingMode::Level4, 0), Err(Error::PhysRead { .. })));
        // A root outside RAM.
        assert!(matches!(translate(&mem, u64::MAX, PagingMode::Level5, 0), Err(Error::PhysRead { .. })));
        // A read as long as the address space wraps is refused at the first unmapped page.
        let space = AddressSpace::new(&mem, 0x1000, PagingMode::Level4);
        let mut big = alloc::vec![0u8; 3 << 12];
        space.read_virt(0x7fff_ffff_f000, &mut big).unwrap_err();
    }

    /// Physical memory that counts its reads and records its prefetches.
    struct Recording<'m> {
        mem: &'m TestMem,
        reads: Cell<u32>,
        prefetched: core::cell::RefCell<alloc::vec::Vec<u64>>,
    }

    impl<'m> Recording<'m> {
        fn new(mem: &'m TestMem) -> Self {
            Recording { mem, reads: Cell::new(0), prefetched: Default::default() }
        }
    }

    impl PhysMem for Recording<'_> {
        fn read(&self, pa: u64, buf: &mut [u8]) -> Result<(), Error> {
            self.reads.set(self.reads.get() + 1);
            self.mem.read(pa, buf)
        }

        fn ram_ranges(&self) -> alloc::vec::Vec<core::ops::Range<u64>> {
            self.mem.ram_ranges()
        }

        fn prefetch(&self, pa: u64) {
            self.prefetched.borrow_mut().push(pa);
        }
    }

    #[test]
    fn a_cached_space_reads_what_fresh_walks_read_with_one_walk_per_page() {
        let mut mem = TestMem::new(0, 80 << 12);
        let tables = [0x1000, 0x2000, 0x3000, 0x4000];
        let va = 0x7f12_3456_7000u64;
        // Ten pages, more than the cache holds, each with its own contents.
        for page in 0..10u64 {
            map4k(&mut mem, &tables, va + page * 0x1000, 0x10000 + page * 0x1000, P | RW | US);
            mem.write_u64(0x10000 + page * 0x1000 + 0xff8, 0xa0 + page);
            mem.write_u64(0x10000 + page * 0x1000 + 0x1000, 0xb0 + page);
        }
        let recording = Recording::new(&mem);
        let plain = AddressSpace::new(&mem, 0x1000, PagingMode::Level4);
        let space = AddressSpace::new(&recording, 0x1000, PagingMode::Level4);
        let cached = CachedSpace::new(&space);
        // Fields of the same page: one walk (4 reads) and then only the data reads.
        for field in [0xff8u64, 0xff8, 0x10, 0x800] {
            assert_eq!(cached.read_u64(va + field).unwrap(), plain.read_u64(va + field).unwrap());
        }
        assert_eq!(recording.reads.get(), 4 + 4, "one walk for four reads of one page");
        // Every page, a read that crosses into the next one, then the first pages again
        // (evicted by then): always what a fresh walk reads.
        for page in (0..10u64).chain(0..3) {
            let at = va + page * 0x1000 + 0xffc;
            let mut a = [0u8; 8];
            let mut b = [0u8; 8];
            let fresh = plain.read_virt(at, &mut a);
            assert_eq!(cached.read_virt(at, &mut b), fresh, "page {page}");
            assert_eq!(a, b, "page {page}");
        }
        // An unmapped page is an error, and is not remembered as mapped.
        assert_eq!(cached.read_u64(va + 0x20_0000), Err(Error::NotMapped { va: va + 0x20_0000, level: 2 }));
        assert_eq!(cached.read_u64(va + 0x20_0000), Err(Error::NotMapped { va: va + 0x20_0000, level: 2 }));
    }

    #[test]
    fn cached_large_pages_cover_their_whole_range() {
        let mut mem = TestMem::new(0, 16 << 12);
        let va1g = 0xffff_8880_4000_0000u64;
        mem.write_u64(0x1000 + idx(va1g, 4) * 8, 0x2000 | P | RW);
        mem.write_u64(0x2000 + idx(va1g, 3) * 8, PS | P | RW); // 1 GiB page at 0
        let recording = Recording::new(&mem);
        let space = AddressSpace::new(&recording, 0x1000, PagingMode::Level4);
        let cached = CachedSpace::new(&space);
        for off in [0x5000u64, 0x8000, 0x3000, 0xa008] {
            cached.read_u64(va1g + off).unwrap();
        }
        assert_eq!(recording.reads.get(), 2 + 4, "a 1 GiB page is walked once (2 levels)");
    }

    #[test]
    fn batched_walk_prefetches_land_on_the_translated_bytes_and_stay_bounded() {
        let mut mem = TestMem::new(0, 64 << 12);
        let tables = [0x1000, 0x2000, 0x3000, 0x4000];
        let va = 0x7f12_3456_7123u64;
        map4k(&mut mem, &tables, va & !0xfff, 0x20000, P | RW | US);
        // A second address space whose root points at itself at every level.
        for i in 0..512 {
            mem.write_u64(0x8000 + i * 8, 0x8000 | P | RW);
        }
        let walks = [(0x1000, va), (0x8000, 0x1234), (0x9000, va), (u64::MAX, va)];
        let recording = Recording::new(&mem);
        prefetch_walks(&recording, PagingMode::Level4, &walks);
        let prefetched = recording.prefetched.borrow();
        let want = translate(&mem, 0x1000, PagingMode::Level4, va).unwrap().pa;
        assert!(prefetched.contains(&want), "the data of the first walk ({want:#x}) in {prefetched:x?}");
        let looped = translate(&mem, 0x8000, PagingMode::Level4, 0x1234).unwrap().pa;
        assert!(prefetched.contains(&looped), "the self-referencing tables end at level 1 too");
        // Each walk reads at most one entry per level; the empty (0x9000) and the
        // out-of-RAM root end after their first read.
        assert!(recording.reads.get() <= 4 * 4, "{} reads", recording.reads.get());
        assert_eq!(recording.reads.get(), 4 + 4 + 1 + 1);
        drop(prefetched);
        // Five-level paging reads five levels.
        let again = Recording::new(&mem);
        prefetch_walks(&again, PagingMode::Level5, &[(0x8000, 0x1234)]);
        assert_eq!(again.reads.get(), 5);
    }
}
