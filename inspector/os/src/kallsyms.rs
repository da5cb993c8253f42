//! Decoding the kernel's own symbol table (kallsyms) into name → address.
//!
//! Layout (scripts/kallsyms.c, Linux 6.x with CONFIG_KALLSYMS_BASE_RELATIVE):
//! `kallsyms_num_syms` (u32); `kallsyms_names`, one entry per symbol: a length
//! byte (two bytes when its top bit is set: `(b0 & 0x7f) | b1 << 7`, "big"
//! symbols, 6.1+) then that many token numbers; `kallsyms_token_index`, 256
//! u16 offsets into `kallsyms_token_table`, NUL-terminated token strings. A
//! name is its tokens concatenated; its first character is the symbol type
//! (`T`, `t`, `D`, `b`, ...). `kallsyms_offsets` (i32 per symbol) with
//! `kallsyms_relative_base`: with CONFIG_KALLSYMS_ABSOLUTE_PERCPU (x86-64 SMP)
//! a non-negative offset is an absolute value and a negative one means
//! `relative_base - 1 - offset`; without it every offset is unsigned and
//! added to the base. Which applies is decided from the table itself (kernel
//! text symbols are negative offsets with absolute per-CPU, never otherwise).
//! The addresses of all these tables are in VMCOREINFO since Linux 6.0.
//!
//! Bounds: [`MAX_SYMBOLS`] symbols, [`MAX_NAMES_BYTES`] of compressed names,
//! names of at most [`MAX_NAME_LEN`] bytes, [`MAX_EXPANDED_BYTES`] in all; any entry that runs past its table
//! is an error.

use alloc::string::String;
use alloc::vec::Vec;

use crate::paging::VirtMem;
use crate::Error;

/// Most symbols decoded (a distribution kernel has ~150 000 with KALLSYMS_ALL).
pub const MAX_SYMBOLS: u32 = 1 << 21;
/// Most bytes of `kallsyms_names` read.
pub const MAX_NAMES_BYTES: u64 = 32 << 20;
/// Longest expanded name (the kernel's KSYM_NAME_LEN is 512).
pub const MAX_NAME_LEN: usize = 512;
/// Most bytes of all expanded names together.
pub const MAX_EXPANDED_BYTES: usize = 64 << 20;
/// Bytes of `kallsyms_token_table` read past the largest token offset.
const TOKEN_SLACK: usize = 256;

/// Where the kallsyms tables are (kernel virtual addresses, from VMCOREINFO).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KallsymsAddrs {
    pub names: u64,
    pub num_syms: u64,
    pub token_table: u64,
    pub token_index: u64,
    pub offsets: u64,
    pub relative_base: u64,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    name_off: u32,
    name_len: u16,
    kind: u8,
    addr: u64,
}

/// A decoded symbol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Symbol<'a> {
    pub name: &'a str,
    /// The nm-style type character (`T` text, `D` data, `B` bss, `R` rodata; lower case when local).
    pub kind: char,
    pub address: u64,
}

/// The kernel's symbol table.
pub struct Kallsyms {
    names: String,
    entries: Vec<Entry>,
    /// Indices into `entries`, sorted by name.
    by_name: Vec<u32>,
    absolute_percpu: bool,
}

impl Kallsyms {
    /// Reads and decodes the tables from kernel memory.
    pub fn read<V: VirtMem + ?Sized>(kernel: &V, at: &KallsymsAddrs) -> Result<Self, Error> {
        let num = kernel.read_u32(at.num_syms)?;
        if num == 0 || num > MAX_SYMBOLS {
            return Err(Error::TooLarge { what: "kallsyms_num_syms", value: num.into(), max: MAX_SYMBOLS.into() });
        }
        let mut index = [0u8; 512];
        kernel.read_virt(at.token_index, &mut index)?;
        let max_tok = index.chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]])).max().unwrap_or(0);
        let mut tokens = alloc::vec![0u8; usize::from(max_tok) + TOKEN_SLACK];
        kernel.read_virt(at.token_table, &mut tokens)?;
        let names_len = at.token_table.checked_sub(at.names).filter(|&l| l > 0).ok_or_else(|| {
            Error::Kallsyms(alloc::format!(
                "kallsyms_token_table {:#x} does not follow kallsyms_names {:#x}",
                at.token_table,
                at.names
            ))
        })?;
        if names_len > MAX_NAMES_BYTES {
            return Err(Error::TooLarge { what: "kallsyms_names bytes", value: names_len, max: MAX_NAMES_BYTES });
        }
        let mut names = alloc::vec![0u8; names_len as usize];
        kernel.read_virt(at.names, &mut names)?;
        let mut offsets = alloc::vec![0u8; num as usize * 4];
        kernel.read_virt(at.offsets, &mut offsets)?;
        let base = kernel.read_u64(at.relative_base)?;
        Self::decode(num, &names, &tokens, &index, &offsets, base)
    }

    /// Decodes tables already read: `names` (at least the entries), the token
    /// table (every token NUL-terminated inside it), the 512-byte token index,
    /// `4 * num` bytes of offsets and the relative base.
    pub fn decode(
        num: u32,
        names: &[u8],
        token_table: &[u8],
        token_index: &[u8],
        offsets: &[u8],
        relative_base: u64,
    ) -> Result<Self, Error> {
        if num == 0 || num > MAX_SYMBOLS {
            return Err(Error::TooLarge { what: "kallsyms_num_syms", value: num.into(), max: MAX_SYMBOLS.into() });
        }
        if token_index.len() < 512 || offsets.len() < num as usize * 4 {
            return Err(Error::Kallsyms("token index or offsets table too short".into()));
        }
        if names.len() as u64 > MAX_NAMES_BYTES {
            return Err(Error::TooLarge {
                what: "kallsyms_names bytes",
                value: names.len() as u64,
                max: MAX_NAMES_BYTES,
            });
        }
        // Expand each of the 256 tokens once.
        let mut tok: Vec<&[u8]> = Vec::with_capacity(256);
        for i in 0..256 {
            let start = usize::from(u16::from_le_bytes([token_index[2 * i], token_index[2 * i + 1]]));
            let rest = token_table.get(start..).unwrap_or(&[]);
            let len = rest.iter().position(|&b| b == 0).ok_or_else(|| {
                Error::Kallsyms(alloc::format!("token {i} at offset {start} has no terminator in the token table"))
            })?;
            tok.push(&rest[..len]);
        }
        let raw_offsets: Vec<i32> =
            offsets[..num as usize * 4].chunks(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();

        let mut text = String::new();
        let mut entries = Vec::with_capacity(num as usize);
        let mut pos = 0usize;
        let mut name = Vec::with_capacity(MAX_NAME_LEN + 64);
        for i in 0..num as usize {
            let short = |what| Error::Kallsyms(alloc::format!("kallsyms_names ends inside symbol {i}'s {what}"));
            let b0 = *names.get(pos).ok_or_else(|| short("length"))?;
            pos += 1;
            let mut len = usize::from(b0);
            if b0 & 0x80 != 0 {
                let b1 = *names.get(pos).ok_or_else(|| short("length"))?;
                pos += 1;
                len = usize::from(b0 & 0x7f) | (usize::from(b1) << 7);
            }
            if len == 0 {
                return Err(Error::Kallsyms(alloc::format!("symbol {i} has an empty name")));
            }
            let data = names.get(pos..pos + len).ok_or_else(|| short("tokens"))?;
            pos += len;
            name.clear();
            for &t in data {
                name.extend_from_slice(tok[usize::from(t)]);
                if name.len() > MAX_NAME_LEN + 1 {
                    return Err(Error::TooLarge {
                        what: "kallsyms name length",
                        value: name.len() as u64,
                        max: MAX_NAME_LEN as u64,
                    });
                }
            }
            let (&kind, rest) =
                name.split_first().ok_or_else(|| Error::Kallsyms(alloc::format!("symbol {i} expands to nothing")))?;
            let rest = core::str::from_utf8(rest)
                .map_err(|_| Error::Kallsyms(alloc::format!("symbol {i}'s name is not UTF-8")))?;
            if !kind.is_ascii_alphabetic() && kind != b'?' {
                return Err(Error::Kallsyms(alloc::format!("symbol {i} has type {kind:#x}, not a letter")));
            }
            if text.len() + rest.len() > MAX_EXPANDED_BYTES {
                let value = (text.len() + rest.len()) as u64;
                return Err(Error::TooLarge { what: "expanded kallsyms names", value, max: MAX_EXPANDED_BYTES as u64 });
            }
            entries.push(Entry { name_off: text.len() as u32, name_len: rest.len() as u16, kind, addr: 0 });
            text.push_str(rest);
        }
        // Absolute per-CPU mode shows as negative offsets for kernel text; in
        // the unsigned mode they are all small positive numbers from the base.
        let negative = raw_offsets.iter().filter(|&&o| o < 0).count();
        let absolute_percpu = negative * 2 > raw_offsets.len();
        for (e, &o) in entries.iter_mut().zip(&raw_offsets) {
            e.addr = if !absolute_percpu {
                relative_base.wrapping_add(u64::from(o as u32))
            } else if o >= 0 {
                o as u64
            } else {
                relative_base.wrapping_sub(1).wrapping_sub(o as i64 as u64)
            };
        }
        let mut by_name: Vec<u32> = (0..entries.len() as u32).collect();
        let name_of = |e: &Entry| &text[e.name_off as usize..e.name_off as usize + usize::from(e.name_len)];
        by_name.sort_by(|&a, &b| name_of(&entries[a as usize]).cmp(name_of(&entries[b as usize])).then(a.cmp(&b)));
        Ok(Kallsyms { names: text, entries, by_name, absolute_percpu })
    }

    fn name_of(&self, e: &Entry) -> &str {
        &self.names[e.name_off as usize..e.name_off as usize + usize::from(e.name_len)]
    }

    fn symbol(&self, e: &Entry) -> Symbol<'_> {
        Symbol { name: self.name_of(e), kind: char::from(e.kind), address: e.addr }
    }

    /// Number of symbols.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether the offsets were decoded as CONFIG_KALLSYMS_ABSOLUTE_PERCPU.
    pub fn absolute_percpu(&self) -> bool {
        self.absolute_percpu
    }

    /// Every symbol named `name` (several locals may share one), in table order.
    pub fn lookup_all(&self, name: &str) -> impl Iterator<Item = Symbol<'_>> + '_ {
        let key = |i: &u32| self.name_of(&self.entries[*i as usize]);
        let first = self.by_name.partition_point(|i| key(i) < name);
        let end = self.by_name.partition_point(|i| key(i) <= name);
        self.by_name[first..end].iter().map(|&i| self.symbol(&self.entries[i as usize]))
    }

    /// The symbol named `name`, preferring a global one.
    pub fn lookup(&self, name: &str) -> Result<Symbol<'_>, Error> {
        let mut best: Option<Symbol<'_>> = None;
        for s in self.lookup_all(name) {
            if best.is_none() || (s.kind.is_ascii_uppercase() && !best.unwrap().kind.is_ascii_uppercase()) {
                best = Some(s);
            }
        }
        best.ok_or_else(|| Error::SymbolNotFound(name.into()))
    }

    /// The address of `name` (see [`Kallsyms::lookup`]).
    pub fn address(&self, name: &str) -> Result<u64, Error> {
        Ok(self.lookup(name)?.address)
    }

    /// The lowest symbol address above `after`: where the object at `after` ends at the
    /// latest (tables and functions have no size in kallsyms).
    pub fn next_address(&self, after: u64) -> Option<u64> {
        self.iter().map(|s| s.address).filter(|&a| a > after).min()
    }

    /// Every symbol in table (address) order.
    pub fn iter(&self) -> impl Iterator<Item = Symbol<'_>> {
        self.entries.iter().map(|e| self.symbol(e))
    }
}

impl core::fmt::Debug for Kallsyms {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Kallsyms")
            .field("symbols", &self.entries.len())
            .field("absolute_percpu", &self.absolute_percpu)
            .finish()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    /// Builds tables for `syms` (type+name, offset) with one token per byte.
    pub(crate) fn build(syms: &[(&str, i32)]) -> (Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>) {
        let mut table = Vec::new();
        let mut index = vec![0u8; 512];
        for b in 0..=255u8 {
            let off = table.len() as u16;
            index[2 * usize::from(b)..2 * usize::from(b) + 2].copy_from_slice(&off.to_le_bytes());
            table.extend_from_slice(&[b, 0]);
        }
        let mut names = Vec::new();
        let mut offsets = Vec::new();
        for (n, o) in syms {
            if n.len() >= 0x80 {
                names.push(0x80 | (n.len() & 0x7f) as u8);
                names.push((n.len() >> 7) as u8);
            } else {
                names.push(n.len() as u8);
            }
            names.extend_from_slice(n.as_bytes());
            offsets.extend_from_slice(&o.to_le_bytes());
        }
        (names, table, index, offsets)
    }

    #[test]
    fn decodes_names_and_absolute_percpu_offsets() {
        let long = alloc::format!("T{}", "x".repeat(200));
        let syms = [
            ("Tstartup_64", -1),
            ("Tsomething", -0x100),
            ("dfixed_percpu_data", 0),
            ("Dinit_task", -0x2000),
            (long.as_str(), -0x10),
        ];
        let (names, table, index, offsets) = build(&syms);
        let base = 0xffff_ffff_8100_0000;
        let k = Kallsyms::decode(syms.len() as u32, &names, &table, &index, &offsets, base).unwrap();
        assert!(k.absolute_percpu());
        assert_eq!(k.address("startup_64").unwrap(), base);
        assert_eq!(k.address("something").unwrap(), base + 0xff);
        assert_eq!(k.address("fixed_percpu_data").unwrap(), 0);
        assert_eq!(k.lookup("init_task").unwrap().kind, 'D');
        assert_eq!(k.address(&long[1..]).unwrap(), base + 0xf);
        assert!(matches!(k.lookup("nope"), Err(Error::SymbolNotFound(_))));
    }

    #[test]
    fn unsigned_offsets_are_relative() {
        let syms = [("Ta", 0), ("Tb", 0x10), ("Tc", 0x7fff_ffff)];
        let (names, table, index, offsets) = build(&syms);
        let k = Kallsyms::decode(3, &names, &table, &index, &offsets, 0x1000).unwrap();
        assert!(!k.absolute_percpu());
        assert_eq!(k.address("c").unwrap(), 0x1000 + 0x7fff_ffff);
    }

    #[test]
    fn garbage_is_an_error() {
        let (names, table, index, offsets) = build(&[("Ta", -1), ("Tb", -2)]);
        // More symbols than names.
        let mut off3 = offsets.clone();
        off3.extend_from_slice(&[0; 4]);
        assert!(Kallsyms::decode(3, &names, &table, &index, &off3, 0).unwrap_err().to_string().contains("ends inside"));
        // A token without terminator.
        assert!(Kallsyms::decode(2, &names, &table[..511], &index, &offsets, 0).is_err());
        // Absurd counts.
        assert!(matches!(Kallsyms::decode(u32::MAX, &names, &table, &index, &offsets, 0), Err(Error::TooLarge { .. })));
        // A name that expands past KSYM_NAME_LEN: long tokens.
        let mut big_table = Vec::new();
        big_table.extend_from_slice(&[b'T'; 300]);
        big_table.push(0);
        let zero_index = vec![0u8; 512];
        let names = [3u8, 0, 0, 0];
        assert!(matches!(
            Kallsyms::decode(1, &names, &big_table, &zero_index, &[0; 4], 0),
            Err(Error::TooLarge { .. })
        ));
        // A type that is not a letter.
        let (names, table, index, offsets) = build(&[("\x01a", -1)]);
        assert!(Kallsyms::decode(1, &names, &table, &index, &offsets, 0).is_err());
    }
}
