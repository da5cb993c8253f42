//! The agent's replies: each OS view encoded into the reply area by the agent and
//! decoded by the host.

use alloc::string::String;
use alloc::vec::Vec;

use super::{
    Reader, Writer, MAGIC_CHECKS, MAGIC_KERNEL, MAGIC_MODULES, MAGIC_PROCESSES, MAGIC_SYMBOLS, MAGIC_SYSCALLS,
    MAGIC_VMAS, MAX_RECORDS,
};
use crate::anchors::AnchorCheck;
use crate::checks::{CheckReport, CheckRun, Finding, FindingKind};
use crate::{Error, KernelInfo, Module, PagingMode, Process, SyscallCheck, SyscallEntry, Vma};

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
    w.u8(u8::from(k.anchored));
    w.opt_str(k.unanchored_reason.as_deref());
    w.u32(k.anchors.len() as u32);
    for a in &k.anchors {
        w.bytes(a.anchor.as_bytes());
        w.u32(a.cpu);
        w.u8(u8::from(a.agrees));
        w.bytes(a.detail.as_bytes());
    }
    w.u32(k.forged_vmcoreinfo.len() as u32);
    for &at in &k.forged_vmcoreinfo {
        w.u64(at);
    }
}

/// Most anchor checks one kernel view carries (three per vCPU).
const MAX_ANCHOR_CHECKS: usize = 3 * crate::anchors::MAX_ANCHOR_CPUS;

/// Decodes the kernel view.
pub fn decode_kernel(data: &[u8]) -> Result<KernelInfo, Error> {
    let mut r = Reader::reply(data);
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
        anchored: match r.u8()? {
            0 => false,
            1 => true,
            _ => return Err(Error::BadReply("anchored is neither 0 nor 1")),
        },
        unanchored_reason: r.opt_string()?,
        anchors: Vec::new(),
        forged_vmcoreinfo: Vec::new(),
    };
    let mut k = k;
    let checks = r.u32()? as usize;
    if checks > MAX_ANCHOR_CHECKS {
        return Err(Error::BadReply("too many anchor checks"));
    }
    for _ in 0..checks {
        let anchor = r.string()?;
        let cpu = r.u32()?;
        let agrees = r.u8()? == 1;
        k.anchors.push(AnchorCheck { anchor, cpu, agrees, detail: r.string()? });
    }
    let forged = r.u32()? as usize;
    if forged > crate::linux::MAX_CANDIDATES {
        return Err(Error::BadReply("too many forged candidates"));
    }
    for _ in 0..forged {
        k.forged_vmcoreinfo.push(r.u64()?);
    }
    // A view that says it is anchored with a disagreeing anchor, or no page-table
    // anchor, is not believed.
    if k.anchored && (k.anchors.iter().any(|a| !a.agrees) || !k.anchors.iter().any(|a| a.anchor == "cr3")) {
        return Err(Error::BadReply("an anchored view whose anchors do not agree"));
    }
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

/// A process as decoded on the host: the view, and why its command line could not be
/// read. Its JSON is the process's, with this `cmdline_error`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(into = "crate::json::ProcessJson", from = "crate::json::ProcessJson")
)]
pub struct DecodedProcess {
    /// The view (its own `cmdline_error` is `None`: the agent sent the error as text).
    pub process: Process,
    /// Why the command line could not be read, as the agent said.
    pub cmdline_error: Option<String>,
}

/// Decodes a process list.
pub fn decode_processes(data: &[u8]) -> Result<Vec<DecodedProcess>, Error> {
    let mut r = Reader::reply(data);
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
    let mut r = Reader::reply(data);
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
    let mut r = Reader::reply(data);
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
    let mut r = Reader::reply(data);
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
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SymbolRecord {
    /// The symbol's name.
    pub name: String,
    /// nm-style type character (`T`, `d`, ...).
    pub kind: char,
    /// Its running (KASLR-slid) address.
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
    let mut r = Reader::reply(data);
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
    let mut r = Reader::reply(data);
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
