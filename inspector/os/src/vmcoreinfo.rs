//! Finding and parsing the kernel's VMCOREINFO text in physical memory.
//!
//! Linux (CONFIG_CRASH_CORE, on in distribution kernels) keeps a page of
//! `KEY=VALUE` lines for crash-dump tools, in two copies: `vmcoreinfo_data`
//! and the ELF note `vmcoreinfo_note`. It starts with `OSRELEASE=` and holds,
//! among others, `PAGESIZE`, `SYMBOL(swapper_pg_dir)`, `KERNELOFFSET` (the
//! KASLR slide), `NUMBER(phys_base)`, `NUMBER(pgtable_l5_enabled)` and, since
//! Linux 6.0, the addresses of the kallsyms tables.
//!
//! [`scan`] looks for `OSRELEASE=` in every RAM range, reads at most
//! [`MAX_TEXT_BYTES`] from each hit and keeps at most [`MAX_CANDIDATES`] that
//! parse; the caller validates them (a process can write the same text into its
//! own memory, so a candidate is only believed once the page tables it names
//! translate the kernel's own addresses).

use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::{Error, PhysMem};

/// Most bytes of one VMCOREINFO text (the kernel's own buffer is one page).
pub const MAX_TEXT_BYTES: usize = 4096;
/// Most lines kept from one text.
pub const MAX_LINES: usize = 512;
/// Most candidates [`scan`] returns.
pub const MAX_CANDIDATES: usize = 64;
/// Bytes read per step of the scan.
pub const SCAN_CHUNK: usize = 1 << 20;
const NEEDLE: &[u8] = b"OSRELEASE=";

/// `__START_KERNEL_map`: where the kernel image is mapped on x86-64 (before KASLR).
pub const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;

/// One parsed VMCOREINFO text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmcoreInfo {
    /// Guest-physical address where the text was found.
    pub found_at: u64,
    lines: Vec<(String, String)>,
}

impl VmcoreInfo {
    /// Parses a text (up to its first NUL). Lines without `=` are skipped;
    /// at most [`MAX_LINES`] lines and [`MAX_TEXT_BYTES`] bytes.
    pub fn parse(text: &[u8], found_at: u64) -> Result<Self, Error> {
        let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
        if end > MAX_TEXT_BYTES {
            return Err(Error::TooLarge { what: "VMCOREINFO text", value: end as u64, max: MAX_TEXT_BYTES as u64 });
        }
        let text = core::str::from_utf8(&text[..end])
            .map_err(|_| Error::Vmcoreinfo(alloc::format!("text at {found_at:#x} is not UTF-8")))?;
        let mut lines = Vec::new();
        for line in text.split('\n').filter(|l| !l.is_empty()) {
            if lines.len() == MAX_LINES {
                return Err(Error::TooLarge {
                    what: "VMCOREINFO lines",
                    value: MAX_LINES as u64 + 1,
                    max: MAX_LINES as u64,
                });
            }
            if let Some((k, v)) = line.split_once('=') {
                lines.push((k.to_string(), v.to_string()));
            }
        }
        let info = VmcoreInfo { found_at, lines };
        // The keys everything else needs must be there and parse.
        info.release()?;
        info.symbol("swapper_pg_dir")?;
        info.phys_base()?;
        info.kernel_offset()?;
        Ok(info)
    }

    /// The raw value of `key` (`OSRELEASE`, `SYMBOL(swapper_pg_dir)`, ...).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.lines.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Every `(key, value)` line, in order.
    pub fn lines(&self) -> impl Iterator<Item = (&str, &str)> {
        self.lines.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    fn need(&self, key: &str) -> Result<&str, Error> {
        self.get(key).ok_or_else(|| Error::Vmcoreinfo(alloc::format!("no {key} line")))
    }

    /// `OSRELEASE` (`uname -r`).
    pub fn release(&self) -> Result<&str, Error> {
        let r = self.need("OSRELEASE")?;
        if r.is_empty() || r.len() > 64 || r.contains('%') {
            return Err(Error::Vmcoreinfo(alloc::format!("OSRELEASE {r:?} is not a release")));
        }
        Ok(r)
    }

    /// `SYMBOL(name)`, a hexadecimal address.
    pub fn symbol(&self, name: &str) -> Result<u64, Error> {
        let key = alloc::format!("SYMBOL({name})");
        let v = self.need(&key)?;
        u64::from_str_radix(v, 16).map_err(|_| Error::Vmcoreinfo(alloc::format!("{key}={v} is not hexadecimal")))
    }

    /// `NUMBER(name)`, a signed decimal.
    pub fn number(&self, name: &str) -> Result<i64, Error> {
        let key = alloc::format!("NUMBER({name})");
        let v = self.need(&key)?;
        v.parse().map_err(|_| Error::Vmcoreinfo(alloc::format!("{key}={v} is not a number")))
    }

    /// `KERNELOFFSET`: the KASLR slide of the kernel image (hexadecimal).
    pub fn kernel_offset(&self) -> Result<u64, Error> {
        let v = self.need("KERNELOFFSET")?;
        u64::from_str_radix(v, 16).map_err(|_| Error::Vmcoreinfo(alloc::format!("KERNELOFFSET={v} is not hexadecimal")))
    }

    /// `NUMBER(phys_base)`: physical minus link-time address of the image (may be negative).
    pub fn phys_base(&self) -> Result<i64, Error> {
        self.number("phys_base")
    }

    /// `PAGESIZE` (4096 on x86-64).
    pub fn page_size(&self) -> Option<u64> {
        self.get("PAGESIZE")?.parse().ok()
    }

    /// `NUMBER(pgtable_l5_enabled)` (absent on kernels without 5-level support: false).
    pub fn l5_enabled(&self) -> bool {
        self.number("pgtable_l5_enabled").is_ok_and(|n| n != 0)
    }

    /// Physical address of a kernel-image virtual address (`__START_KERNEL_map` + phys_base).
    pub fn image_virt_to_phys(&self, va: u64) -> Result<u64, Error> {
        if va < START_KERNEL_MAP {
            return Err(Error::Vmcoreinfo(alloc::format!("{va:#x} is not in the kernel image mapping")));
        }
        Ok((va - START_KERNEL_MAP).wrapping_add(self.phys_base()? as u64))
    }

    /// Physical address of `swapper_pg_dir` (the kernel's page-table root).
    pub fn kernel_pgd_phys(&self) -> Result<u64, Error> {
        self.image_virt_to_phys(self.symbol("swapper_pg_dir")?)
    }
}

/// Finds every text that starts with `OSRELEASE=` and parses as VMCOREINFO,
/// in physical order. Returns the candidates (at most [`MAX_CANDIDATES`]), how
/// many hits were seen, and why the last rejected hit was rejected.
pub fn scan<M: PhysMem + ?Sized>(mem: &M) -> (Vec<VmcoreInfo>, u32, Option<String>) {
    let mut found = Vec::new();
    let mut hits = 0u32;
    let mut last_err = None;
    let mut chunk = alloc::vec![0u8; SCAN_CHUNK];
    let mut text = alloc::vec![0u8; MAX_TEXT_BYTES + 1];
    for range in mem.ram_ranges() {
        let mut at = range.start;
        while at < range.end && found.len() < MAX_CANDIDATES {
            let n = (range.end - at).min(SCAN_CHUNK as u64) as usize;
            if mem.read(at, &mut chunk[..n]).is_err() {
                at += n as u64;
                continue;
            }
            let mut i = 0;
            while let Some(off) = find(&chunk[i..n], NEEDLE) {
                let pa = at + (i + off) as u64;
                i += off + 1;
                hits = hits.saturating_add(1);
                let len = (range.end - pa).min(text.len() as u64) as usize;
                let parsed = mem.read(pa, &mut text[..len]).and_then(|()| VmcoreInfo::parse(&text[..len], pa));
                match parsed {
                    Ok(info) => {
                        found.push(info);
                        if found.len() == MAX_CANDIDATES {
                            break;
                        }
                    }
                    Err(e) => last_err = Some(e.to_string()),
                }
            }
            // Overlap so a needle across the chunk boundary is seen once.
            at += if n == SCAN_CHUNK { (n - (NEEDLE.len() - 1)) as u64 } else { n as u64 };
        }
    }
    (found, hits, last_err)
}

/// First occurrence of `needle` (non-empty) in `hay`.
pub(crate) fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let first = needle[0];
    let mut from = 0;
    while from + needle.len() <= hay.len() {
        let p = hay[from..=hay.len() - needle.len()].iter().position(|&b| b == first)? + from;
        if &hay[p..p + needle.len()] == needle {
            return Some(p);
        }
        from = p + 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testmem::TestMem;

    const TEXT: &str = "OSRELEASE=6.1.0-test\nPAGESIZE=4096\nSYMBOL(swapper_pg_dir)=ffffffff82010000\n\
        NUMBER(phys_base)=-654311424\nKERNELOFFSET=1000000\nNUMBER(pgtable_l5_enabled)=1\n";

    #[test]
    fn parses_the_keys() {
        let info = VmcoreInfo::parse(TEXT.as_bytes(), 0).unwrap();
        assert_eq!(info.release().unwrap(), "6.1.0-test");
        assert_eq!(info.kernel_offset().unwrap(), 0x100_0000);
        assert_eq!(info.phys_base().unwrap(), -654311424);
        assert!(info.l5_enabled());
        assert_eq!(info.page_size(), Some(4096));
        // 0x2010000 - 0x27000000 wraps: a negative phys_base is applied as two's complement.
        assert_eq!(info.kernel_pgd_phys().unwrap(), 0x0201_0000u64.wrapping_sub(0x2700_0000));
    }

    #[test]
    fn rejects_format_strings_and_missing_keys() {
        assert!(VmcoreInfo::parse(b"OSRELEASE=%s\n", 0).is_err());
        let e = VmcoreInfo::parse(b"OSRELEASE=6.1\nPAGESIZE=4096\n", 0).unwrap_err();
        assert!(e.to_string().contains("SYMBOL(swapper_pg_dir)"), "{e}");
        let bad = TEXT.replace("ffffffff82010000", "zz");
        assert!(VmcoreInfo::parse(bad.as_bytes(), 0).unwrap_err().to_string().contains("hexadecimal"));
    }

    #[test]
    fn absurd_texts_are_bounded() {
        let mut long = alloc::vec![b'A'; MAX_TEXT_BYTES * 4];
        long[..10].copy_from_slice(b"OSRELEASE=");
        assert!(matches!(VmcoreInfo::parse(&long, 0), Err(Error::TooLarge { .. })));
        let many = "a=b\n".repeat(MAX_LINES + 10);
        assert!(VmcoreInfo::parse(many.as_bytes(), 0).is_err());
    }

    #[test]
    fn scan_finds_texts_across_chunk_boundaries() {
        let mut mem = TestMem::new(0, 3 * SCAN_CHUNK);
        let at = SCAN_CHUNK - 4; // straddles the first chunk boundary
        mem.write(at as u64, TEXT.as_bytes());
        mem.write(2 * SCAN_CHUNK as u64 + 100, b"OSRELEASE=%s\0");
        let (found, hits, last) = scan(&mem);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].found_at, at as u64);
        assert_eq!(hits, 2);
        assert!(last.unwrap().contains("not a release"));
    }

    #[test]
    fn find_works() {
        assert_eq!(find(b"xxOSRELEASE=", NEEDLE), Some(2));
        assert_eq!(find(b"OSRELEASE", NEEDLE), None);
        assert_eq!(find(b"OOSRELEASE=", NEEDLE), Some(1));
    }
}
