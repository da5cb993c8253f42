//! The HTTP API's OS views are specula-os's own types (serialized with its `serde`
//! and `openapi` features, no twins here), with the rows the CLI prints of them; and
//! the models of YARA scans and of the OS routes' queries.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

pub use specula_os::wire::{DecodedProcess, SymbolRecord};
pub use specula_os::{CheckReport, CheckRun, Finding, KernelInfo, Module, PagingMode, SyscallCheck, SyscallEntry, Vma};

use crate::models::{hex, Rows};

impl Rows for KernelInfo {
    fn header() -> &'static [&'static str] {
        &["RELEASE", "KASLR OFFSET", "PHYS BASE", "PAGING", "KERNEL PGD", "CPUS", "SYMBOLS", "BTF TYPES", "ANCHORED"]
    }
    fn row(&self) -> Vec<String> {
        vec![
            self.release.clone(),
            hex(self.kaslr_offset),
            // Signed: below the link address, phys_base is negative.
            if self.phys_base < 0 {
                format!("-{:#x}", self.phys_base.unsigned_abs())
            } else {
                format!("{:#x}", self.phys_base)
            },
            match self.paging_mode {
                PagingMode::Level4 => "4-level".into(),
                PagingMode::Level5 => "5-level".into(),
            },
            hex(self.kernel_pgd),
            self.online_cpus.map_or("?".into(), |c| c.to_string()),
            self.symbols.to_string(),
            self.btf_types.to_string(),
            match (&self.unanchored_reason, self.anchored) {
                (_, true) => {
                    let mut anchors: Vec<&str> = self.anchors.iter().map(|a| a.anchor.as_str()).collect();
                    anchors.sort_unstable();
                    anchors.dedup();
                    format!("yes ({})", anchors.join(", "))
                }
                (Some(why), false) => format!("no: {why}"),
                (None, false) => "no".into(),
            },
        ]
    }
}

impl Rows for DecodedProcess {
    fn header() -> &'static [&'static str] {
        &["PID", "PPID", "UID", "COMM", "ARGS"]
    }
    fn row(&self) -> Vec<String> {
        let p = &self.process;
        let comm = if p.kernel_thread { format!("[{}]", p.comm) } else { p.comm.clone() };
        vec![p.pid.to_string(), p.ppid.to_string(), p.uid.to_string(), comm, p.args().join(" ")]
    }
}

impl Rows for Vma {
    fn header() -> &'static [&'static str] {
        &["START", "END", "PERMS", "OFFSET", "FILE"]
    }
    fn row(&self) -> Vec<String> {
        vec![
            format!("{:x}", self.start),
            format!("{:x}", self.end),
            self.perms(),
            format!("{:08x}", self.pgoff * 4096),
            self.file_name.clone().unwrap_or_default(),
        ]
    }
}

impl Rows for Module {
    fn header() -> &'static [&'static str] {
        &["MODULE", "BASE", "SIZE", "STATE"]
    }
    fn row(&self) -> Vec<String> {
        vec![self.name.clone(), hex(self.base), self.size.to_string(), self.state_name.clone().unwrap_or_default()]
    }
}

impl Rows for SyscallEntry {
    fn header() -> &'static [&'static str] {
        &["NR", "TARGET", "MODULE"]
    }
    fn row(&self) -> Vec<String> {
        vec![self.nr.to_string(), hex(self.target), self.module.clone().unwrap_or_default()]
    }
}

impl Rows for SymbolRecord {
    fn header() -> &'static [&'static str] {
        &["ADDRESS", "KIND", "NAME"]
    }
    fn row(&self) -> Vec<String> {
        vec![format!("{:016x}", self.address), self.kind.to_string(), self.name.clone()]
    }
}

impl Rows for CheckRun {
    fn header() -> &'static [&'static str] {
        &["CHECK", "EXAMINED", "ERROR"]
    }
    fn row(&self) -> Vec<String> {
        vec![self.check.clone(), self.examined.to_string(), self.error.clone().unwrap_or_default()]
    }
}

impl Rows for Finding {
    fn header() -> &'static [&'static str] {
        &["FINDING", "ID", "NAME", "ADDRESS", "DETAIL"]
    }
    fn row(&self) -> Vec<String> {
        vec![
            self.kind.name().into(),
            if self.id >= 0 { self.id.to_string() } else { String::new() },
            self.name.clone().unwrap_or_default(),
            hex(self.address),
            self.detail.clone().unwrap_or_default(),
        ]
    }
}

/// A YARA scan request.
#[derive(Serialize, Deserialize, ToSchema, Debug, Clone, PartialEq)]
pub struct YaraRequest {
    /// YARA rules source (at most 1 MiB).
    pub rules: String,
    /// `physical` (every granted range; default), `process` (needs `pid`) or `kernel`.
    pub target: Option<String>,
    pub pid: Option<u32>,
}

/// A YARA scan's matches.
#[derive(Serialize, Deserialize, ToSchema, Debug, Default, Clone, PartialEq)]
pub struct YaraReportView {
    pub scanned_bytes: u64,
    pub matches: Vec<YaraMatchView>,
    /// More than 10 000 matches: the rest are not listed.
    pub truncated: bool,
}

/// One string of one rule matched at one place.
#[derive(Serialize, Deserialize, ToSchema, Debug, Clone, PartialEq)]
pub struct YaraMatchView {
    pub rule: String,
    pub namespace: String,
    pub tags: Vec<String>,
    /// The string's identifier (`$name`).
    pub string: String,
    pub length: u64,
    /// Guest-physical address (physical scans).
    pub gpa: Option<u64>,
    /// Process id (process scans; 0 for kernel scans).
    pub pid: Option<u32>,
    /// Virtual address (process and kernel scans).
    pub va: Option<u64>,
}

impl Rows for YaraMatchView {
    fn header() -> &'static [&'static str] {
        &["RULE", "STRING", "PID", "VA", "GPA", "LENGTH"]
    }
    fn row(&self) -> Vec<String> {
        vec![
            self.rule.clone(),
            self.string.clone(),
            self.pid.map_or(String::new(), |p| p.to_string()),
            self.va.map_or(String::new(), hex),
            self.gpa.map_or(String::new(), hex),
            self.length.to_string(),
        ]
    }
}

/// Which rootkit checks to run.
#[derive(Serialize, Deserialize, IntoParams, Debug)]
pub struct ChecksQuery {
    /// Comma-separated checks: `processes`, `modules`, `syscalls`, `interrupts`,
    /// `kernel_text`, `forgery` (valid kernel structures the vCPUs contradict, and the
    /// process holding them; needs an anchored kernel), `msrs` (default: all but
    /// `msrs`, which reads each vCPU's LSTAR;
    /// on a QEMU source that takes a device-state snapshot, pausing the guest for a
    /// few milliseconds).
    pub only: Option<String>,
}

/// A virtual range of a process.
#[derive(Serialize, Deserialize, IntoParams, Debug)]
pub struct VirtualQuery {
    /// Virtual address.
    pub va: String,
    /// Length (at most 1 MiB).
    pub len: String,
}
