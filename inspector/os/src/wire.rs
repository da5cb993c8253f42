//! How the agent hands OS views to the inspector: a compact little-endian encoding
//! of [`KernelInfo`], [`Process`], [`Module`] and [`Vma`] lists, written by the agent
//! into its reply area and decoded by the host with every count and length bounded
//! (the agent is not trusted: a malformed reply is an error, never a panic).

use alloc::string::String;
use alloc::vec::Vec;

use crate::checks::{CheckReport, CheckRun, Finding, FindingKind};
use crate::{Error, KernelInfo, Module, PagingMode, Process, SyscallCheck, SyscallEntry, Vma};

/// Most records in one reply.
pub const MAX_RECORDS: usize = 65_536;
/// Longest string or byte field.
pub const MAX_FIELD: usize = 8192;

const MAGIC_KERNEL: u32 = 0x4b52_4e4c; // "LNRK"
const MAGIC_PROCESSES: u32 = 0x5052_4f43; // "CORP"
const MAGIC_MODULES: u32 = 0x4d4f_4453; // "SDOM"
const MAGIC_VMAS: u32 = 0x564d_4153; // "SAMV"
const MAGIC_SYSCALLS: u32 = 0x5359_5343; // "CSYS"
const MAGIC_CHECKS: u32 = 0x434b_5452; // "RTKC"
const MAGIC_SYMBOLS: u32 = 0x5359_4d53; // "SMYS"

/// Writes fields; reports whether they fit in the reply area.
pub struct Writer<'a> {
    out: &'a mut [u8],
    at: usize,
    overflow: bool,
}

impl<'a> Writer<'a> {
    pub fn new(out: &'a mut [u8]) -> Self {
        Writer { out, at: 0, overflow: false }
    }

    fn put(&mut self, bytes: &[u8]) {
        match self.out.get_mut(self.at..self.at + bytes.len()) {
            Some(dst) if !self.overflow => {
                dst.copy_from_slice(bytes);
                self.at += bytes.len();
            }
            _ => self.overflow = true,
        }
    }
    fn u8(&mut self, v: u8) {
        self.put(&[v]);
    }
    fn u32(&mut self, v: u32) {
        self.put(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.put(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        let b = &b[..b.len().min(MAX_FIELD)];
        self.u32(b.len() as u32);
        self.put(b);
    }
    fn opt_str(&mut self, s: Option<&str>) {
        match s {
            Some(s) => {
                self.u8(1);
                self.bytes(s.as_bytes());
            }
            None => self.u8(0),
        }
    }

    /// Bytes written, or `None` if the reply did not fit.
    pub fn finish(self) -> Option<usize> {
        (!self.overflow).then_some(self.at)
    }
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.data.len()).ok_or(Error::BadReply("truncated"))?;
        let out = &self.data[self.at..end];
        self.at = end;
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, Error> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, Error> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn bytes(&mut self) -> Result<Vec<u8>, Error> {
        let n = self.u32()? as usize;
        if n > MAX_FIELD {
            return Err(Error::BadReply("field too long"));
        }
        Ok(self.take(n)?.to_vec())
    }
    fn string(&mut self) -> Result<String, Error> {
        String::from_utf8(self.bytes()?).map_err(|_| Error::BadReply("a string is not UTF-8"))
    }
    fn opt_string(&mut self) -> Result<Option<String>, Error> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.string()?)),
            _ => Err(Error::BadReply("bad option tag")),
        }
    }
    fn count(&mut self, magic: u32) -> Result<usize, Error> {
        if self.u32()? != magic {
            return Err(Error::BadReply("wrong record kind"));
        }
        let n = self.u32()? as usize;
        if n > MAX_RECORDS {
            return Err(Error::BadReply("too many records"));
        }
        Ok(n)
    }
    fn finish(self) -> Result<(), Error> {
        if self.at == self.data.len() {
            Ok(())
        } else {
            Err(Error::BadReply("trailing bytes"))
        }
    }
}

/// Encodes the kernel view.
pub fn encode_kernel(k: &KernelInfo, w: &mut Writer) {
    w.u32(MAGIC_KERNEL);
    w.u32(1);
    w.bytes(k.release.as_bytes());
    w.opt_str(k.uts_release.as_deref());
    w.u64(k.kaslr_offset);
    w.u64(k.phys_base as u64);
    w.u8(match k.paging_mode {
        PagingMode::Level4 => 4,
        PagingMode::Level5 => 5,
    });
    w.u64(k.kernel_pgd);
    w.u64(k.online_cpus.map_or(u64::MAX, u64::from));
    w.u64(k.nr_cpu_ids.map_or(u64::MAX, u64::from));
    w.u64(k.vmcoreinfo_at);
    w.u32(k.conflicting_vmcoreinfo);
    w.u64(k.symbols as u64);
    w.u64(k.btf_types as u64);
}

/// Decodes the kernel view.
pub fn decode_kernel(data: &[u8]) -> Result<KernelInfo, Error> {
    let mut r = Reader { data, at: 0 };
    if r.count(MAGIC_KERNEL)? != 1 {
        return Err(Error::BadReply("one kernel"));
    }
    let opt_u32 = |v: u64| {
        if v == u64::MAX {
            Ok(None)
        } else {
            u32::try_from(v).map(Some).map_err(|_| Error::BadReply("cpu count"))
        }
    };
    let k = KernelInfo {
        release: r.string()?,
        uts_release: r.opt_string()?,
        kaslr_offset: r.u64()?,
        phys_base: r.u64()? as i64,
        paging_mode: match r.u8()? {
            4 => PagingMode::Level4,
            5 => PagingMode::Level5,
            _ => return Err(Error::BadReply("paging mode")),
        },
        kernel_pgd: r.u64()?,
        online_cpus: opt_u32(r.u64()?)?,
        nr_cpu_ids: opt_u32(r.u64()?)?,
        vmcoreinfo_at: r.u64()?,
        conflicting_vmcoreinfo: r.u32()?,
        symbols: r.u64()? as usize,
        btf_types: r.u64()? as usize,
    };
    r.finish()?;
    Ok(k)
}

/// Encodes a process list (command lines as read; errors as text).
pub fn encode_processes(ps: &[Process], w: &mut Writer) {
    w.u32(MAGIC_PROCESSES);
    w.u32(ps.len() as u32);
    for p in ps {
        w.u64(p.task);
        for v in [p.pid, p.tgid, p.ppid] {
            w.u32(v as u32);
        }
        for v in [p.uid, p.euid, p.gid] {
            w.u32(v);
        }
        w.bytes(p.comm.as_bytes());
        for v in [p.state, p.start_time, p.flags, p.exit_state, p.mm, p.arg_start, p.arg_end] {
            w.u64(v);
        }
        w.u8(u8::from(p.kernel_thread) | (u8::from(p.cmdline_truncated) << 1) | (u8::from(p.pgd.is_some()) << 2));
        w.u64(p.pgd.unwrap_or(0));
        w.bytes(&p.cmdline);
        let error = p.cmdline_error.as_ref().map(alloc::string::ToString::to_string);
        w.opt_str(error.as_deref());
    }
}

/// A process as decoded on the host: the view, and why its command line could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodedProcess {
    pub process: Process,
    pub cmdline_error: Option<String>,
}

/// Decodes a process list.
pub fn decode_processes(data: &[u8]) -> Result<Vec<DecodedProcess>, Error> {
    let mut r = Reader { data, at: 0 };
    let n = r.count(MAGIC_PROCESSES)?;
    let mut out = Vec::with_capacity(n.min(4096));
    for _ in 0..n {
        let task = r.u64()?;
        let (pid, tgid, ppid) = (r.u32()? as i32, r.u32()? as i32, r.u32()? as i32);
        let (uid, euid, gid) = (r.u32()?, r.u32()?, r.u32()?);
        let comm = r.string()?;
        let (state, start_time, flags, exit_state, mm, arg_start, arg_end) =
            (r.u64()?, r.u64()?, r.u64()?, r.u64()?, r.u64()?, r.u64()?, r.u64()?);
        let bits = r.u8()?;
        let pgd = r.u64()?;
        let cmdline = r.bytes()?;
        let cmdline_error = r.opt_string()?;
        out.push(DecodedProcess {
            process: Process {
                task,
                pid,
                tgid,
                ppid,
                uid,
                euid,
                gid,
                comm,
                state,
                start_time,
                flags,
                kernel_thread: bits & 1 != 0,
                exit_state,
                mm,
                pgd: (bits & 4 != 0).then_some(pgd),
                arg_start,
                arg_end,
                cmdline,
                cmdline_truncated: bits & 2 != 0,
                cmdline_error: None,
            },
            cmdline_error,
        });
    }
    r.finish()?;
    Ok(out)
}

/// Encodes a module list.
pub fn encode_modules(ms: &[Module], w: &mut Writer) {
    w.u32(MAGIC_MODULES);
    w.u32(ms.len() as u32);
    for m in ms {
        w.u64(m.module);
        w.bytes(m.name.as_bytes());
        w.u64(m.state as u64);
        w.opt_str(m.state_name.as_deref());
        w.u64(m.base);
        w.u64(m.size);
    }
}

/// Decodes a module list.
pub fn decode_modules(data: &[u8]) -> Result<Vec<Module>, Error> {
    let mut r = Reader { data, at: 0 };
    let n = r.count(MAGIC_MODULES)?;
    let mut out = Vec::with_capacity(n.min(4096));
    for _ in 0..n {
        out.push(Module {
            module: r.u64()?,
            name: r.string()?,
            state: r.u64()? as i64,
            state_name: r.opt_string()?,
            base: r.u64()?,
            size: r.u64()?,
        });
    }
    r.finish()?;
    Ok(out)
}

/// Encodes a VMA list.
pub fn encode_vmas(vs: &[Vma], w: &mut Writer) {
    w.u32(MAGIC_VMAS);
    w.u32(vs.len() as u32);
    for v in vs {
        for x in [v.vma, v.start, v.end, v.flags, v.pgoff, v.file] {
            w.u64(x);
        }
        w.opt_str(v.file_name.as_deref());
    }
}

/// Decodes a VMA list.
pub fn decode_vmas(data: &[u8]) -> Result<Vec<Vma>, Error> {
    let mut r = Reader { data, at: 0 };
    let n = r.count(MAGIC_VMAS)?;
    let mut out = Vec::with_capacity(n.min(4096));
    for _ in 0..n {
        out.push(Vma {
            vma: r.u64()?,
            start: r.u64()?,
            end: r.u64()?,
            flags: r.u64()?,
            pgoff: r.u64()?,
            file: r.u64()?,
            file_name: r.opt_string()?,
        });
    }
    r.finish()?;
    Ok(out)
}

/// Encodes a system call table check.
pub fn encode_syscalls(c: &SyscallCheck, w: &mut Writer) {
    w.u32(MAGIC_SYSCALLS);
    w.u32(c.redirected.len() as u32);
    for x in [c.table, c.table_pa, u64::from(c.entries), c.text_start, c.text_end] {
        w.u64(x);
    }
    for e in &c.redirected {
        w.u32(e.nr);
        w.u64(e.target);
        w.opt_str(e.module.as_deref());
    }
}

/// Decodes a system call table check.
pub fn decode_syscalls(data: &[u8]) -> Result<SyscallCheck, Error> {
    let mut r = Reader { data, at: 0 };
    let n = r.count(MAGIC_SYSCALLS)?;
    let (table, table_pa, entries, text_start, text_end) = (r.u64()?, r.u64()?, r.u64()?, r.u64()?, r.u64()?);
    let entries = u32::try_from(entries).map_err(|_| Error::BadReply("entry count"))?;
    if n > entries as usize {
        return Err(Error::BadReply("more redirected entries than entries"));
    }
    let mut redirected = Vec::with_capacity(n);
    for _ in 0..n {
        redirected.push(SyscallEntry { nr: r.u32()?, target: r.u64()?, module: r.opt_string()? });
    }
    r.finish()?;
    Ok(SyscallCheck { table, table_pa, entries, text_start, text_end, redirected })
}

/// One kallsyms entry as the agent hands it over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SymbolRecord {
    pub name: String,
    /// nm-style type character (`T`, `d`, ...).
    pub kind: char,
    pub address: u64,
}

/// Encodes the kernel's symbols `start..start+max` (as many as fit), with the total count.
pub fn encode_symbols(k: &crate::Kallsyms, start: usize, max: usize, w: &mut Writer) {
    let page: Vec<_> = k.iter().skip(start).take(max.min(MAX_RECORDS)).collect();
    w.u32(MAGIC_SYMBOLS);
    w.u32(page.len() as u32);
    w.u64(k.len() as u64);
    for s in page {
        w.u8(s.kind as u8);
        w.u64(s.address);
        w.bytes(s.name.as_bytes());
    }
}

/// Decodes a page of symbols and the total count.
pub fn decode_symbols(data: &[u8]) -> Result<(Vec<SymbolRecord>, u64), Error> {
    let mut r = Reader { data, at: 0 };
    let n = r.count(MAGIC_SYMBOLS)?;
    let total = r.u64()?;
    if total > u64::from(crate::kallsyms::MAX_SYMBOLS) || n as u64 > total {
        return Err(Error::BadReply("symbol count"));
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let kind = r.u8()?;
        if !kind.is_ascii_graphic() {
            return Err(Error::BadReply("symbol type is not a letter"));
        }
        let address = r.u64()?;
        let name = r.string()?;
        if name.len() > 512 || name.is_empty() {
            return Err(Error::BadReply("symbol name length"));
        }
        out.push(SymbolRecord { name, kind: kind as char, address });
    }
    r.finish()?;
    Ok((out, total))
}

/// Encodes a rootkit check report.
pub fn encode_checks(c: &CheckReport, w: &mut Writer) {
    w.u32(MAGIC_CHECKS);
    w.u32(c.runs.len() as u32);
    for r in &c.runs {
        w.bytes(r.check.as_bytes());
        w.u64(r.examined);
        w.opt_str(r.error.as_deref());
    }
    w.u32(c.findings.len() as u32);
    for f in &c.findings {
        w.u8(f.kind as u8);
        w.u64(f.id as u64);
        w.opt_str(f.name.as_deref());
        w.u64(f.address);
        w.opt_str(f.detail.as_deref());
    }
}

/// Decodes a rootkit check report.
pub fn decode_checks(data: &[u8]) -> Result<CheckReport, Error> {
    let mut r = Reader { data, at: 0 };
    let n = r.count(MAGIC_CHECKS)?;
    if n > crate::checks::select::NAMES.len() {
        return Err(Error::BadReply("more check runs than checks"));
    }
    let mut runs = Vec::with_capacity(n);
    for _ in 0..n {
        let check = r.string()?;
        if !crate::checks::select::NAMES.contains(&check.as_str()) {
            return Err(Error::BadReply("unknown check name"));
        }
        runs.push(CheckRun { check, examined: r.u64()?, error: r.opt_string()? });
    }
    let n = r.u32()? as usize;
    if n > runs.len() * crate::checks::MAX_FINDINGS {
        return Err(Error::BadReply("more findings than the checks report"));
    }
    let mut findings = Vec::with_capacity(n);
    for _ in 0..n {
        findings.push(Finding {
            kind: FindingKind::from_u8(r.u8()?).ok_or(Error::BadReply("unknown finding kind"))?,
            id: r.u64()? as i64,
            name: r.opt_string()?,
            address: r.u64()?,
            detail: r.opt_string()?,
        });
    }
    r.finish()?;
    Ok(CheckReport { runs, findings })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn module(name: &str) -> Module {
        Module {
            module: 1,
            name: name.into(),
            state: 0,
            state_name: Some("MODULE_STATE_LIVE".into()),
            base: 2,
            size: 3,
        }
    }

    #[test]
    fn views_round_trip_and_overflow_is_reported() {
        let ms = vec![module("dummy"), module("crc7")];
        let mut buf = vec![0u8; 4096];
        let mut w = Writer::new(&mut buf);
        encode_modules(&ms, &mut w);
        let n = w.finish().unwrap();
        assert_eq!(decode_modules(&buf[..n]).unwrap(), ms);
        let mut small = vec![0u8; 16];
        let mut w = Writer::new(&mut small);
        encode_modules(&ms, &mut w);
        assert_eq!(w.finish(), None, "a reply that does not fit says so");
    }

    #[test]
    fn check_reports_round_trip_and_hostile_ones_are_errors() {
        let report = CheckReport {
            runs: vec![
                CheckRun { check: "processes".into(), examined: 80, error: None },
                CheckRun { check: "interrupts".into(), examined: 0, error: Some("no idt_table".into()) },
            ],
            findings: vec![Finding {
                kind: FindingKind::HiddenProcess,
                id: 77,
                name: Some("evil".into()),
                address: 0xffff_8880_0000_1000,
                detail: None,
            }],
        };
        let mut buf = vec![0u8; 4096];
        let mut w = Writer::new(&mut buf);
        encode_checks(&report, &mut w);
        let n = w.finish().unwrap();
        assert_eq!(decode_checks(&buf[..n]).unwrap(), report);
        for cut in 0..n {
            assert!(decode_checks(&buf[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad_kind = buf[..n].to_vec();
        let kind_at = n - (1 + 8 + 1 + 4 + 4 + 8 + 1);
        assert_eq!(bad_kind[kind_at], 1);
        bad_kind[kind_at] = 99;
        assert_eq!(decode_checks(&bad_kind), Err(Error::BadReply("unknown finding kind")));
        // More findings than two runs can hold.
        let mut many = MAGIC_CHECKS.to_le_bytes().to_vec();
        many.extend_from_slice(&0u32.to_le_bytes());
        many.extend_from_slice(&1u32.to_le_bytes());
        assert!(decode_checks(&many).is_err());
    }

    #[test]
    fn hostile_replies_are_errors() {
        let ms = vec![module("dummy")];
        let mut buf = vec![0u8; 4096];
        let mut w = Writer::new(&mut buf);
        encode_modules(&ms, &mut w);
        let n = w.finish().unwrap();
        for cut in 0..n {
            assert!(decode_modules(&buf[..cut]).is_err(), "cut at {cut}");
        }
        let mut huge = MAGIC_MODULES.to_le_bytes().to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_modules(&huge).is_err());
        assert!(decode_processes(&buf[..n]).is_err(), "the wrong kind of record");
        let mut long = MAGIC_MODULES.to_le_bytes().to_vec();
        long.extend_from_slice(&1u32.to_le_bytes());
        long.extend_from_slice(&1u64.to_le_bytes());
        long.extend_from_slice(&(MAX_FIELD as u32 + 1).to_le_bytes());
        assert!(decode_modules(&long).is_err());
    }
}
