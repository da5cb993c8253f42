//! The inspector's line socket, a thin debugging front end over the core: one
//! request per line, one reply line each (`ok ...` or `error ...`), served by
//! [`line_server`] with its limits: the socket is mode 0600 from the start; only
//! peers with the inspector's own uid are served; at most
//! [`line_server::MAX_CLIENTS`] (16) at once; a client has
//! [`line_server::IDLE_TIMEOUT`] (30 s) to send each request; requests are at most
//! 1024 bytes (`MAX_LINE`).
//!
//! Requests are [`Request`]s in their clap syntax (`status`, `kernel`, `ps`, `lsmod`,
//! `checks [CHECK...]`, `vread PID VA LEN`, ...; addresses are source GPAs, numbers
//! decimal or `0x` hex), plus the requests only this socket serves:
//!
//! - `read GPA LEN`             `ok HEX`
//! - `audit-read GPA LEN`       `ok HEX`: what the agent reads in the window, granted or not
//!   (revoked ranges read as zeros); audits what a compromised agent could see
//! - `scan GPA LEN HEXPATTERN`  `ok hits=N gpas=GPA,GPA,...` (at most 1000 listed)
//! - `watch GPA LEN`            `ok id=N` (checked on request, not polled)
//! - `check ID`                 `ok changed=N gpas=GPA,...`
//! - `write-probe GPA BYTE`     `ok read-back=BYTE` (the agent tries to write the window)
//! - `latency GPA COUNT MS`     `ok samples=N cycles=C,C,...` (coherence latency in TSC
//!   cycles, signed; see the benchmark)
//!
//! Replies keep the one-line forms scripts read (`status`: `source=attached|gone
//! kind=specula|qemu grants=N memslots=N window=LEN dirty=ring|bitmap|...|none`;
//! `ps`: `PID:PPID:UID:COMM ...`; `lsmod`: `NAME:BASE:SIZE ...`; `vcpus`:
//! `INDEX:rip=..:cr3=..:gs_base=.. ...`); a reply with no line form of its own is
//! its JSON.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

use clap::Parser;
use specula_api::{Reply, Request};
use specula_common::parse::{number, ParseError};
use vmm::line_server::{self, Limits};

use crate::core::{InspectError, Inspector};

/// Longest request line (a 256-byte pattern in hex plus the rest).
const MAX_LINE: u64 = 1024;
/// Scan hits listed in a reply.
const MAX_LISTED_HITS: usize = 1000;

/// Why a request line got no answer.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// The request's words are not a request (clap's first line says why).
    #[error("{0}")]
    Syntax(String),
    #[error(transparent)]
    Inspect(#[from] InspectError),
}

/// Binds `path` (mode 0600) and answers requests from our own uid, on a thread per client.
pub fn serve(path: &Path, inspector: Arc<Inspector>) -> std::io::Result<()> {
    // SAFETY: getuid cannot fail.
    let own_uid = unsafe { libc::getuid() };
    let handler = Arc::new(move |line: &str| execute(line, &inspector));
    line_server::serve(path, "control", &[own_uid], Limits::new(MAX_LINE), handler)
}

/// Runs one request line.
pub fn execute(line: &str, inspector: &Inspector) -> Result<String, LineError> {
    let request = parse(line)?;
    let reply = inspector.handle(request)?;
    Ok(line_of(reply))
}

/// The requests only this socket serves, with syntax of its own (the others are
/// [`Request`]'s clap subcommands).
pub const LINE_ONLY_REQUESTS: &[&str] = &["read", "audit-read", "scan", "watch", "check", "write-probe", "latency"];

/// The request a line asks for.
pub fn parse(line: &str) -> Result<Request, LineError> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let mut args = words.iter().copied().skip(1);
    let mut next = |what: &str| number(args.next(), what);
    Ok(match words.first().copied().unwrap_or("") {
        "" => return Err(LineError::Syntax("empty request".into())),
        "read" => Request::Read { gpa: next("GPA")?, len: next("LEN")? },
        "audit-read" => Request::AuditRead { gpa: next("GPA")?, len: next("LEN")? },
        "scan" => {
            let (gpa, len) = (next("GPA")?, next("LEN")?);
            let pattern = words.get(3).ok_or(ParseError::Missing { what: "HEXPATTERN".into() })?;
            Request::Scan { gpa, len, pattern: specula_common::hex::decode(pattern)? }
        }
        "watch" => Request::Watch { gpa: next("GPA")?, len: next("LEN")?, polled: false },
        "check" => Request::Check { id: next("ID")? as usize },
        "write-probe" => {
            let gpa = next("GPA")?;
            let byte = next("BYTE")?;
            let byte = u8::try_from(byte).map_err(|_| LineError::Syntax("BYTE must be 0..=255".into()))?;
            Request::WriteProbe { gpa, byte }
        }
        "latency" => Request::Latency { gpa: next("GPA")?, count: next("COUNT")?, ms: next("MS")? },
        _ => Words::try_parse_from(&words).map_err(|e| LineError::Syntax(first_line(&e)))?.request,
    })
}

/// The requests that have a clap syntax.
#[derive(Parser)]
#[command(no_binary_name = true, disable_help_subcommand = true)]
struct Words {
    #[command(subcommand)]
    request: Request,
}

/// clap's error, on one line and without its `error: ` prefix (the line socket's
/// refusals, and the `inspector` binary's own usage errors).
pub fn first_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let first = text.lines().next().unwrap_or("bad request");
    first.strip_prefix("error: ").unwrap_or(first).to_string()
}

fn gpa_list(gpas: &[u64]) -> String {
    gpas.iter().take(MAX_LISTED_HITS).map(|g| format!("{g:#x}")).collect::<Vec<_>>().join(",")
}

/// Items joined by spaces.
fn spaced<T>(items: &[T], each: impl Fn(&T) -> String) -> String {
    items.iter().map(each).collect::<Vec<_>>().join(" ")
}

/// A reply as the text after `ok`.
fn line_of(reply: Reply) -> String {
    let hex = specula_common::hex::encode;
    match reply {
        Reply::Bytes(bytes) => hex(&bytes),
        Reply::Digests(d) => format!("xxh64={} sha256={}", d.xxh64, d.sha256),
        Reply::Hits { total, hits } => format!("hits={total} gpas={}", gpa_list(&hits)),
        Reply::Watch(w) => format!("id={}", w.id),
        Reply::Changed(pages) => format!("changed={} gpas={}", pages.len(), gpa_list(&pages)),
        Reply::Grants(grants) => spaced(&grants, |g| format!("{}:{:#x}:{:#x}", g.id, g.gpa, g.len)),
        Reply::Status(s) => format!(
            "source={} kind={} grants={} memslots={} window={:#x} dirty={}",
            s.source,
            s.kind,
            s.grants,
            s.memslots,
            s.window_len,
            s.dirty_log_token.as_deref().unwrap_or("none")
        ),
        Reply::Views(v) => format!(
            "hits={} revalidated={} walks={} invalidated={} not_kept={} hit_us={} revalidated_us={} walk_us={} \
             syncs={} sync_us={}",
            v.hits,
            v.revalidated,
            v.walks,
            v.invalidated,
            v.not_kept,
            v.hit_us,
            v.revalidated_us,
            v.walk_us,
            v.syncs,
            v.sync_us
        ),
        Reply::Vcpus(vcpus) => {
            spaced(&vcpus, |v| format!("{}:rip={:#x}:cr3={:#x}:gs_base={:#x}", v.index, v.rip, v.cr3, v.gs_base))
        }
        Reply::ReadBack(byte) => format!("read-back={byte:#04x}"),
        Reply::Samples(samples) => {
            let list: Vec<String> = samples.iter().map(i64::to_string).collect();
            format!("samples={} cycles={}", samples.len(), list.join(","))
        }
        Reply::Kernel(k) => format!(
            "release={} kaslr={:#x} phys_base={:#x} pgd={:#x} cpus={} symbols={} btf_types={} anchored={}",
            k.release,
            k.kaslr_offset,
            k.phys_base,
            k.kernel_pgd,
            k.online_cpus.map_or("?".into(), |c| c.to_string()),
            k.symbols,
            k.btf_types,
            k.anchored
        ),
        Reply::Processes(ps) => {
            spaced(&ps, |d| format!("{}:{}:{}:{}", d.process.pid, d.process.ppid, d.process.uid, d.process.comm))
        }
        Reply::Modules(ms) => spaced(&ms, |m| format!("{}:{:#x}:{}", m.name, m.base, m.size)),
        Reply::SyscallCheck(c) => {
            let list: Vec<String> = c
                .redirected
                .iter()
                .map(|r| format!("{}:{:#x}:{}", r.nr, r.target, r.module.as_deref().unwrap_or("?")))
                .collect();
            format!(
                "entries={} table={:#x} table_pa={:#x} redirected={}",
                c.entries,
                c.table,
                c.table_pa,
                list.join(",")
            )
        }
        Reply::Checks(report) => {
            let mut line: Vec<String> = report
                .runs
                .iter()
                .map(|r| match &r.error {
                    None => format!("{}={}", r.check, r.examined),
                    Some(why) => format!("{}=error({})", r.check, why.replace(' ', "_")),
                })
                .collect();
            let word = |text: Option<&str>, none: &str| text.unwrap_or(none).replace([' ', ',', ':'], "_");
            let findings: Vec<String> = report
                .findings
                .iter()
                .map(|f| {
                    format!(
                        "{}:{}:{}:{:#x}:{}",
                        f.kind.name(),
                        f.id,
                        word(f.name.as_deref(), "?"),
                        f.address,
                        word(f.detail.as_deref(), "")
                    )
                })
                .collect();
            line.push(format!("findings={}", findings.join(",")));
            line.join(" ")
        }
        Reply::Done => String::new(),
        other => serde_json::to_string(&other).unwrap_or_default(),
    }
}

/// Client side: sends one request line to a control socket and returns the reply line.
///
/// A server that refuses us (uid, too many clients) replies and closes without
/// reading, so sending may fail while its reply is there to read: the reply wins.
pub fn request(path: &Path, line: &str) -> std::io::Result<String> {
    let mut stream = UnixStream::connect(path)?;
    let sent = writeln!(stream, "{line}");
    let mut reply = String::new();
    let read = BufReader::new(stream).read_line(&mut reply);
    if reply.is_empty() {
        sent?;
        read?;
    }
    Ok(reply.trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `inspector --help` lists these as the socket's own: each is one `parse` knows
    /// (its missing arguments are named, not the request).
    #[test]
    fn the_line_only_requests_are_the_ones_parse_serves_by_hand() {
        for name in LINE_ONLY_REQUESTS {
            match parse(name) {
                Err(LineError::Parse(ParseError::Missing { .. })) => {}
                other => panic!("{name}: {other:?}"),
            }
        }
        assert!(matches!(parse("no-such-request"), Err(LineError::Syntax(_))));
    }

    #[test]
    fn line_requests_parse_into_the_requests_they_name() {
        assert_eq!(parse("read 0x1000 16").unwrap(), Request::Read { gpa: 0x1000, len: 16 });
        assert_eq!(
            parse("scan 0 4096 73736864").unwrap(),
            Request::Scan { gpa: 0, len: 4096, pattern: b"sshd".to_vec() }
        );
        assert_eq!(parse("watch 0x1000 0x1000").unwrap(), Request::Watch { gpa: 0x1000, len: 0x1000, polled: false });
        assert_eq!(
            parse("checks modules msrs").unwrap(),
            Request::Checks { only: vec!["modules".into(), "msrs".into()] }
        );
        assert_eq!(parse("vread 1 0xffff0000 16").unwrap(), Request::Vread { pid: 1, va: 0xffff_0000, len: 16 });
        assert_eq!(parse("status").unwrap(), Request::Status);
    }

    #[test]
    fn bad_lines_are_refused_on_one_line_naming_what_was_wrong() {
        let e = parse("read 0x10zz 16").unwrap_err().to_string();
        assert!(e.contains("0x10zz"), "{e}");
        let e = parse("scan 0 16 a\u{e9}0").unwrap_err().to_string();
        assert!(e.contains("hex digit"), "{e}");
        let e = parse("no-such-request").unwrap_err().to_string();
        assert!(!e.contains('\n') && e.contains("no-such-request"), "{e}");
        let e = parse("vread 1 zz 16").unwrap_err().to_string();
        assert!(!e.contains('\n') && e.contains("zz"), "{e}");
        assert!(matches!(parse(""), Err(LineError::Syntax(_))));
    }
}
