//! Every operation an inspector serves ([`Request`]), what each answers ([`Reply`]),
//! and where each lives in the HTTP API ([`Request::route`]).
//!
//! Adding an operation: a `Request` variant (with its CLI and line syntax, from clap),
//! its route and reply decoding here, its handling in the inspector's core, and its
//! HTTP route; the line socket, the CLI and the tables need nothing more.

use serde::{Deserialize, Serialize};

use crate::models::*;
use crate::os_models::*;

/// A number argument: decimal, or hex with `0x`.
fn num(text: &str) -> Result<u64, crate::ParseError> {
    specula_common::parse::number(Some(text), "number")
}

/// Every operation an inspector serves. The clap form is the syntax of the line socket
/// and of the `specula` CLI; variants marked `skip` are built by the front ends
/// themselves (their syntax differs between the two, or they take a file or a body).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Subcommand)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Source and inspector status.
    Status,
    /// Granted ranges of source RAM.
    Grants,
    /// The source's vCPU registers.
    Vcpus,
    /// How the OS view cache has fared.
    Views,
    /// xxh64 and SHA-256 of a granted range, computed by the agent.
    Hash {
        #[arg(value_parser = num)]
        gpa: u64,
        #[arg(value_parser = num)]
        len: u64,
    },
    /// Pause the source's vCPUs.
    Pause,
    /// Resume them.
    Resume,
    /// The source's Linux kernel (found in its RAM, no symbols).
    Kernel,
    /// Find the source's kernel again (after it rebooted, say).
    Discover,
    /// The source's processes.
    Ps,
    /// One process of the source, by pid.
    Process { pid: i32 },
    /// The source's kernel modules.
    Lsmod,
    /// A process's memory areas.
    Maps { pid: u32 },
    /// The system call table check.
    CheckSyscalls,
    /// Rootkit checks: hidden processes and modules, redirected system calls and
    /// interrupts, kernel text changed since attach, forged kernel structures.
    Checks {
        /// Only these checks (processes, modules, syscalls, interrupts, kernel_text,
        /// forgery; msrs, which reads each vCPU's LSTAR and may pause a QEMU guest for
        /// milliseconds, runs only when named).
        #[arg(value_delimiter = ',')]
        only: Vec<String>,
    },
    /// Every kernel symbol (kallsyms, decoded in the agent).
    Symbols,
    /// A process's virtual memory (pid 0: the kernel's).
    Vread {
        pid: u32,
        #[arg(value_parser = num)]
        va: u64,
        #[arg(value_parser = num)]
        len: u64,
    },
    /// Trace the source's guest (a Specula vmm started with --mirror-allow-trace): the
    /// kinds named (msr_writes, exec, exit, module_load, kernel_writes; every kind when none is named)
    /// are reported on the event stream as trace.* events, addresses resolved to kernel
    /// symbols or modules.
    TraceStart {
        #[arg(value_delimiter = ',')]
        kinds: Vec<String>,
        /// Break with int3 over no-op instructions instead of the debug registers
        /// (where those do not work, as under QEMU's TCG; the guest can see the int3).
        #[arg(long)]
        software_breakpoints: bool,
    },
    /// Stop tracing (the source disarms what no inspector traces: no cost left).
    TraceStop,
    /// What is traced, and how many events were reported and dropped.
    TraceStatus,
    /// Bytes of a granted range, read by the agent.
    #[command(skip)]
    Read { gpa: u64, len: u64 },
    /// The window's bytes as the agent reads them, granted or revoked (an audit).
    #[command(skip)]
    AuditRead { gpa: u64, len: u64 },
    /// Every GPA in a range where `pattern` occurs.
    #[command(skip)]
    Scan { gpa: u64, len: u64, pattern: Vec<u8> },
    /// A new integrity watch; `polled` ones are checked by the inspector every interval.
    #[command(skip)]
    Watch { gpa: u64, len: u64, polled: bool },
    /// Every live watch.
    #[command(skip)]
    Watches,
    /// Stops a watch.
    #[command(skip)]
    DeleteWatch { id: usize },
    /// The findings kept for a polled watch.
    #[command(skip)]
    Findings { id: usize },
    /// Pages of a watch that changed since its last check.
    #[command(skip)]
    Check { id: usize },
    /// Has the agent try to write the window (a security probe).
    #[command(skip)]
    WriteProbe { gpa: u64, byte: u8 },
    /// Coherence latency samples, in TSC cycles.
    #[command(skip)]
    Latency { gpa: u64, count: u64, ms: u64 },
    /// The kernel's BTF blob.
    #[command(skip)]
    Btf,
    /// A YARA scan.
    #[command(skip)]
    Yara(YaraRequest),
}

/// What a request answers.
#[derive(Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Reply {
    Status(Status),
    Grants(Vec<GrantInfo>),
    Vcpus(Vec<Vcpu>),
    Views(ViewCacheStats),
    /// Memory contents (reads, virtual reads, BTF).
    Bytes(Vec<u8>),
    Digests(Digests),
    /// Scan matches: how many in all, and the first ones' GPAs.
    Hits {
        total: u64,
        hits: Vec<u64>,
    },
    Watch(WatchInfo),
    Watches(Vec<WatchInfo>),
    Findings(Vec<FindingInfo>),
    /// Pages that changed.
    Changed(Vec<u64>),
    /// What the agent read back after its write attempt.
    ReadBack(u8),
    /// Latency samples in TSC cycles.
    Samples(Vec<i64>),
    Kernel(KernelInfo),
    Processes(Vec<DecodedProcess>),
    Process(DecodedProcess),
    Modules(Vec<Module>),
    Vmas(Vec<Vma>),
    SyscallCheck(SyscallCheck),
    Checks(CheckReport),
    Symbols(Vec<SymbolRecord>),
    Yara(YaraReportView),
    Trace(TraceStatus),
    /// Done, nothing to say.
    Done,
}

/// Where a request goes in the HTTP API.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub method: &'static str,
    /// Path and query.
    pub path: String,
    /// A JSON body, for POSTs that take one.
    pub body: Option<serde_json::Value>,
}

impl Route {
    fn get(path: String) -> Option<Self> {
        Some(Route { method: "GET", path, body: None })
    }
    fn post(path: &str, body: Option<serde_json::Value>) -> Option<Self> {
        Some(Route { method: "POST", path: path.into(), body })
    }
}

impl Request {
    /// The HTTP route that serves this request, or `None` where only the line socket
    /// does (security probes and measurements).
    pub fn route(&self) -> Option<Route> {
        use serde_json::json;
        match self {
            Request::Status | Request::Views => Route::get("/v1/status".into()),
            Request::Grants => Route::get("/v1/grants".into()),
            Request::Vcpus => Route::get("/v1/vcpus".into()),
            Request::Hash { gpa, len } => {
                Route::post("/v1/hash", Some(json!({"gpa": gpa.to_string(), "len": len.to_string()})))
            }
            Request::Pause => Route::post("/v1/source/pause", None),
            Request::Resume => Route::post("/v1/source/resume", None),
            Request::Kernel => Route::get("/v1/os/kernel".into()),
            Request::Discover => Route::post("/v1/os/discover", None),
            Request::Ps => Route::get("/v1/os/processes".into()),
            Request::Process { pid } => Route::get(format!("/v1/os/processes/{pid}")),
            Request::Lsmod => Route::get("/v1/os/modules".into()),
            Request::Maps { pid } => Route::get(format!("/v1/os/processes/{pid}/maps")),
            Request::CheckSyscalls => Route::get("/v1/os/checks/syscalls".into()),
            Request::Checks { only } if only.is_empty() => Route::get("/v1/os/checks".into()),
            Request::Checks { only } => Route::get(format!("/v1/os/checks?only={}", only.join(","))),
            Request::Symbols => Route::get("/v1/os/symbols".into()),
            Request::Vread { pid, va, len } => Route::get(format!("/v1/os/processes/{pid}/memory?va={va}&len={len}")),
            Request::Read { gpa, len } => Route::get(format!("/v1/memory/physical?gpa={gpa}&len={len}")),
            Request::Scan { gpa, len, pattern } => Route::post(
                "/v1/scan",
                Some(
                    json!({"gpa": gpa.to_string(), "len": len.to_string(), "pattern": specula_common::hex::encode(pattern)}),
                ),
            ),
            Request::Watch { gpa, len, polled: true } => {
                Route::post("/v1/watches", Some(json!({"gpa": gpa.to_string(), "len": len.to_string()})))
            }
            Request::Watches => Route::get("/v1/watches".into()),
            Request::DeleteWatch { id } => {
                Some(Route { method: "DELETE", path: format!("/v1/watches/{id}"), body: None })
            }
            Request::Findings { id } => Route::get(format!("/v1/watches/{id}/findings")),
            Request::Btf => Route::get("/v1/os/btf".into()),
            Request::Yara(request) => Route::post("/v1/yara", serde_json::to_value(request).ok()),
            Request::TraceStart { kinds, software_breakpoints } => {
                Route::post("/v1/trace", Some(json!({ "kinds": kinds, "software_breakpoints": software_breakpoints })))
            }
            Request::TraceStop => Some(Route { method: "DELETE", path: "/v1/trace".into(), body: None }),
            Request::TraceStatus => Route::get("/v1/trace".into()),
            Request::Watch { polled: false, .. }
            | Request::AuditRead { .. }
            | Request::Check { .. }
            | Request::WriteProbe { .. }
            | Request::Latency { .. } => None,
        }
    }

    /// The reply to this request from the body of a successful HTTP reply on its
    /// [`Request::route`] (JSON, or the bytes themselves for binary routes).
    pub fn reply_from_http(&self, body: &[u8]) -> Result<Reply, serde_json::Error> {
        use serde_json::from_slice as json;
        Ok(match self {
            Request::Status => Reply::Status(json(body)?),
            Request::Views => Reply::Views(json::<Status>(body)?.view_cache),
            Request::Grants => Reply::Grants(json(body)?),
            Request::Vcpus => Reply::Vcpus(json(body)?),
            Request::Hash { .. } => Reply::Digests(json(body)?),
            Request::Kernel | Request::Discover => Reply::Kernel(json(body)?),
            Request::Ps => Reply::Processes(json(body)?),
            Request::Process { .. } => Reply::Process(json(body)?),
            Request::Lsmod => Reply::Modules(json(body)?),
            Request::Maps { .. } => Reply::Vmas(json(body)?),
            Request::CheckSyscalls => Reply::SyscallCheck(json(body)?),
            Request::Checks { .. } => Reply::Checks(json(body)?),
            Request::Symbols => Reply::Symbols(json(body)?),
            Request::Scan { .. } => {
                let page: ScanResult = json(body)?;
                Reply::Hits { total: page.total, hits: page.hits }
            }
            Request::Watch { .. } => Reply::Watch(json(body)?),
            Request::Watches => Reply::Watches(json(body)?),
            Request::Findings { .. } => Reply::Findings(json(body)?),
            Request::Yara(_) => Reply::Yara(json(body)?),
            Request::TraceStart { .. } | Request::TraceStop | Request::TraceStatus => Reply::Trace(json(body)?),
            Request::Vread { .. } | Request::Read { .. } | Request::AuditRead { .. } | Request::Btf => {
                Reply::Bytes(body.to_vec())
            }
            Request::Pause | Request::Resume | Request::DeleteWatch { .. } => Reply::Done,
            Request::Check { .. } => Reply::Changed(json(body)?),
            Request::WriteProbe { .. } => Reply::ReadBack(json(body)?),
            Request::Latency { .. } => Reply::Samples(json(body)?),
        })
    }
}

/// A table: the header, then one row per item.
pub type Table = Vec<Vec<String>>;

fn table_of<T: Rows>(items: &[T]) -> Table {
    let mut rows = vec![T::header().iter().map(|h| h.to_string()).collect()];
    rows.extend(items.iter().map(Rows::row));
    rows
}

impl Reply {
    /// The reply as tables for people (the CLI prints them one after another); bytes
    /// and `Done` have none.
    pub fn tables(&self) -> Vec<Table> {
        let one = |t: Table| vec![t];
        match self {
            Reply::Status(s) => one(table_of(std::slice::from_ref(s))),
            Reply::Grants(g) => one(table_of(g)),
            Reply::Vcpus(v) => one(table_of(v)),
            Reply::Views(v) => one(table_of(std::slice::from_ref(v))),
            Reply::Digests(d) => one(table_of(std::slice::from_ref(d))),
            Reply::Hits { total, hits } => {
                let mut rows = vec![vec![format!("{total} MATCH(ES)")]];
                rows.extend(hits.iter().map(|h| vec![format!("{h:#x}")]));
                one(rows)
            }
            Reply::Watch(w) => one(table_of(std::slice::from_ref(w))),
            Reply::Watches(w) => one(table_of(w)),
            Reply::Findings(f) => one(table_of(f)),
            Reply::Changed(pages) => {
                let mut rows = vec![vec![format!("{} CHANGED", pages.len())]];
                rows.extend(pages.iter().map(|p| vec![format!("{p:#x}")]));
                one(rows)
            }
            Reply::ReadBack(b) => one(vec![vec!["READ BACK".into()], vec![format!("{b:#04x}")]]),
            Reply::Samples(s) => {
                one(std::iter::once(vec!["CYCLES".into()]).chain(s.iter().map(|c| vec![c.to_string()])).collect())
            }
            Reply::Kernel(k) => one(table_of(std::slice::from_ref(k))),
            Reply::Processes(p) => one(table_of(p)),
            Reply::Process(p) => one(table_of(std::slice::from_ref(p))),
            Reply::Modules(m) => one(table_of(m)),
            Reply::Vmas(v) => one(table_of(v)),
            Reply::SyscallCheck(c) => {
                let summary = vec![
                    vec!["ENTRIES".into(), "TABLE".into(), "REDIRECTED".into()],
                    vec![c.entries.to_string(), format!("{:#x}", c.table), c.redirected.len().to_string()],
                ];
                vec![summary, table_of(&c.redirected)]
            }
            Reply::Checks(c) => vec![table_of(&c.runs), table_of(&c.findings)],
            Reply::Symbols(s) => one(table_of(s)),
            Reply::Yara(y) => one(table_of(&y.matches)),
            Reply::Trace(t) => one(table_of(std::slice::from_ref(t))),
            Reply::Bytes(_) | Reply::Done => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    #[command(no_binary_name = true)]
    struct Line {
        #[command(subcommand)]
        request: Request,
    }

    fn parse(words: &[&str]) -> Result<Request, clap::Error> {
        Line::try_parse_from(words).map(|l| l.request)
    }

    #[test]
    fn requests_parse_from_words_with_hex_or_decimal_numbers() {
        assert_eq!(parse(&["hash", "0x1000", "4096"]).unwrap(), Request::Hash { gpa: 0x1000, len: 4096 });
        assert_eq!(
            parse(&["checks", "modules", "msrs"]).unwrap(),
            Request::Checks { only: vec!["modules".into(), "msrs".into()] }
        );
        assert_eq!(
            parse(&["checks", "modules,msrs"]).unwrap(),
            Request::Checks { only: vec!["modules".into(), "msrs".into()] }
        );
        assert_eq!(parse(&["check-syscalls"]).unwrap(), Request::CheckSyscalls);
        assert_eq!(parse(&["process", "7"]).unwrap(), Request::Process { pid: 7 });
        assert_eq!(
            parse(&["trace-start", "msr_writes,exec"]).unwrap(),
            Request::TraceStart { kinds: vec!["msr_writes".into(), "exec".into()], software_breakpoints: false }
        );
        assert_eq!(
            parse(&["trace-start", "--software-breakpoints"]).unwrap(),
            Request::TraceStart { kinds: vec![], software_breakpoints: true }
        );
    }

    #[test]
    fn bad_words_are_refused_by_name() {
        let e = parse(&["hash", "0x10zz", "1"]).unwrap_err().to_string();
        assert!(e.contains("0x10zz"), "{e}");
        assert!(parse(&["no-such-request"]).is_err());
        assert!(parse(&["hash", "-1", "1"]).is_err(), "no signs");
        // Requests the front ends build themselves are not words.
        assert!(parse(&["btf"]).is_err());
    }

    #[test]
    fn a_reply_comes_back_from_its_route_as_the_same_reply() {
        let request = Request::Lsmod;
        assert_eq!(request.route().unwrap().path, "/v1/os/modules");
        let view = Module {
            module: 0xffff_ffff_c000_1000,
            name: "ext4".into(),
            state: 0,
            state_name: Some("live".into()),
            base: 0xffff_ffff_c000_0000,
            size: 4096,
        };
        let body = serde_json::to_vec(&Reply::Modules(vec![view])).unwrap();
        let back = request.reply_from_http(&body).unwrap();
        let Reply::Modules(m) = &back else { panic!("{back:?}") };
        assert_eq!(m[0].name, "ext4");
        assert_eq!(back.tables()[0][1], vec!["ext4", "0xffffffffc0000000", "4096", "live"]);
    }
}
