//! The inspector's control socket: one request per line, one reply line each
//! (`ok ...` or `error ...`), served by [`line_server`] with its limits: the
//! socket is mode 0600 from the start; only peers with the inspector's own uid
//! are served; at most [`line_server::MAX_CLIENTS`] (16) at once; a client has
//! [`line_server::IDLE_TIMEOUT`] (30 s) to send each request; requests are at most
//! 1024 bytes (`MAX_LINE`). Requests (addresses are source GPAs):
//!
//! - `read GPA LEN`             `ok HEX`
//! - `audit-read GPA LEN`       `ok HEX`: what the agent reads in the window, granted or not
//!   (revoked ranges read as zeros); audits what a compromised agent could see
//! - `hash GPA LEN`             `ok xxh64=HEX sha256=HEX`
//! - `scan GPA LEN HEXPATTERN`  `ok hits=N gpas=GPA,GPA,...` (at most 1000 listed)
//! - `watch GPA LEN`            `ok id=N`
//! - `check ID`                 `ok changed=N gpas=GPA,...`
//! - `grants`                   `ok ID:GPA:LEN ...`
//! - `status`                   `ok source=attached|gone kind=specula|qemu grants=N memslots=N window=LEN`
//!   (memslots: every KVM memslot of the agent VM, its RAM included)
//! - `vcpus`                    `ok INDEX:rip=..:cr3=..:gs_base=.. ...`
//! - `pause` / `resume`         stop or continue the source's vCPUs (QEMU sources: `stop`/`cont`)
//! - `write-probe GPA BYTE`     `ok read-back=BYTE` (the agent tries to write the window)
//! - `kernel`                   `ok release=.. kaslr=.. ...` (Linux sources: found in RAM, no symbols)
//! - `ps`                       `ok PID:PPID:UID:COMM ...`
//! - `lsmod`                    `ok NAME:BASE:SIZE ...`
//! - `check-syscalls`           `ok entries=N table=VA table_pa=PA redirected=NR:TARGET:MODULE,...`
//! - `checks [CHECK...]`        `ok CHECK=N ... findings=KIND:ID:NAME:ADDR:DETAIL,...` (a check that
//!   could not run shows `CHECK=error(TEXT)`)
//! - `vread PID VA LEN`         `ok HEX` (a process's virtual memory; PID 0: the kernel's)
//! - `latency GPA COUNT MS`     `ok samples=N cycles=C,C,...` (coherence latency in TSC cycles, signed;
//!   see the benchmark)

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

use vmm::line_server::{self, parse_number as number, Limits};

use crate::daemon::Inspector;

/// Longest request line (a 256-byte pattern in hex plus the rest).
const MAX_LINE: u64 = 1024;
/// Scan hits listed in a reply.
const MAX_LISTED_HITS: usize = 1000;

/// Binds `path` (mode 0600) and answers requests from our own uid, on a thread per client.
pub fn serve(path: &Path, inspector: Arc<Inspector>) -> std::io::Result<()> {
    // SAFETY: getuid cannot fail.
    let own_uid = unsafe { libc::getuid() };
    let handler = Arc::new(move |line: &str| execute(line, &inspector));
    line_server::serve(path, "control", &[own_uid], Limits::new(MAX_LINE), handler)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Decodes a hex string: ASCII hex digits only, an even number of them.
pub fn unhex(text: &str) -> Result<Vec<u8>, String> {
    if let Some(bad) = text.chars().find(|c| !c.is_ascii_hexdigit()) {
        return Err(format!("bad hex digit '{bad}'"));
    }
    if !text.len().is_multiple_of(2) {
        return Err("hex needs an even number of digits".into());
    }
    Ok(text.as_bytes().chunks_exact(2).map(|pair| nibble(pair[0]) << 4 | nibble(pair[1])).collect())
}

/// The value of an ASCII hex digit (checked by the caller).
fn nibble(digit: u8) -> u8 {
    char::from(digit).to_digit(16).map_or(0, |value| value as u8)
}

fn gpa_list(gpas: &[u64]) -> String {
    gpas.iter().take(MAX_LISTED_HITS).map(|g| format!("{g:#x}")).collect::<Vec<_>>().join(",")
}

/// Runs one request.
pub fn execute(line: &str, inspector: &Inspector) -> Result<String, String> {
    let mut words = line.split_whitespace();
    let e = |err: crate::daemon::InspectError| err.to_string();
    match words.next().unwrap_or("") {
        "read" => {
            let gpa = number(words.next(), "GPA")?;
            let len = number(words.next(), "LEN")?;
            Ok(hex(&inspector.read(gpa, len).map_err(e)?))
        }
        "audit-read" => {
            let gpa = number(words.next(), "GPA")?;
            let len = number(words.next(), "LEN")?;
            Ok(hex(&inspector.audit_read(gpa, len).map_err(e)?))
        }
        "hash" => {
            let gpa = number(words.next(), "GPA")?;
            let len = number(words.next(), "LEN")?;
            let (xxh, sha) = inspector.hash(gpa, len).map_err(e)?;
            Ok(format!("xxh64={xxh:016x} sha256={}", hex(&sha)))
        }
        "scan" => {
            let gpa = number(words.next(), "GPA")?;
            let len = number(words.next(), "LEN")?;
            let pattern = unhex(words.next().ok_or("missing HEXPATTERN")?)?;
            let (total, hits) = inspector.scan(gpa, len, &pattern).map_err(e)?;
            Ok(format!("hits={total} gpas={}", gpa_list(&hits)))
        }
        "watch" => {
            let gpa = number(words.next(), "GPA")?;
            let len = number(words.next(), "LEN")?;
            Ok(format!("id={}", inspector.watch(gpa, len, false).map_err(e)?))
        }
        "check" => {
            let id = number(words.next(), "ID")? as usize;
            let pages = inspector.check(id).map_err(e)?;
            Ok(format!("changed={} gpas={}", pages.len(), gpa_list(&pages)))
        }
        "grants" => Ok(inspector
            .grants()
            .iter()
            .map(|(id, gpa, len)| format!("{id}:{gpa:#x}:{len:#x}"))
            .collect::<Vec<_>>()
            .join(" ")),
        "status" => Ok(format!(
            "source={} kind={} grants={} memslots={} window={:#x} dirty={}",
            if inspector.source_gone() { "gone" } else { "attached" },
            inspector.source_kind(),
            inspector.grants().len(),
            inspector.memslots(),
            inspector.window_len(),
            inspector.dirty_feed().map_or("none", |m| m.token())
        )),
        "vcpus" => Ok(inspector
            .vcpus()
            .map_err(e)?
            .iter()
            .map(|v| format!("{}:rip={:#x}:cr3={:#x}:gs_base={:#x}", v.index, v.rip, v.cr3, v.gs_base))
            .collect::<Vec<_>>()
            .join(" ")),
        "pause" => inspector.set_paused(true).map(|()| String::new()).map_err(e),
        "resume" => inspector.set_paused(false).map(|()| String::new()).map_err(e),
        "write-probe" => {
            let gpa = number(words.next(), "GPA")?;
            let byte = number(words.next(), "BYTE")?;
            let byte = u8::try_from(byte).map_err(|_| "BYTE must be 0..=255".to_string())?;
            Ok(format!("read-back={:#04x}", inspector.write_probe(gpa, byte).map_err(e)?))
        }
        "latency" => {
            let gpa = number(words.next(), "GPA")?;
            let count = number(words.next(), "COUNT")?;
            let ms = number(words.next(), "MS")?;
            let samples = inspector.latency(gpa, count, ms).map_err(e)?;
            let list: Vec<String> = samples.iter().map(i64::to_string).collect();
            Ok(format!("samples={} cycles={}", samples.len(), list.join(",")))
        }
        "kernel" => {
            let k = inspector.os_kernel().map_err(e)?;
            Ok(format!(
                "release={} kaslr={:#x} phys_base={:#x} pgd={:#x} cpus={} symbols={} btf_types={}",
                k.release,
                k.kaslr_offset,
                k.phys_base,
                k.kernel_pgd,
                k.online_cpus.map_or("?".into(), |c| c.to_string()),
                k.symbols,
                k.btf_types
            ))
        }
        "ps" => Ok(inspector
            .os_processes()
            .map_err(e)?
            .iter()
            .map(|d| format!("{}:{}:{}:{}", d.process.pid, d.process.ppid, d.process.uid, d.process.comm))
            .collect::<Vec<_>>()
            .join(" ")),
        "lsmod" => Ok(inspector
            .os_modules()
            .map_err(e)?
            .iter()
            .map(|m| format!("{}:{:#x}:{}", m.name, m.base, m.size))
            .collect::<Vec<_>>()
            .join(" ")),
        "check-syscalls" => {
            let c = inspector.os_syscall_check().map_err(e)?;
            let list: Vec<String> = c
                .redirected
                .iter()
                .map(|r| format!("{}:{:#x}:{}", r.nr, r.target, r.module.as_deref().unwrap_or("?")))
                .collect();
            Ok(format!(
                "entries={} table={:#x} table_pa={:#x} redirected={}",
                c.entries,
                c.table,
                c.table_pa,
                list.join(",")
            ))
        }
        "checks" => {
            let mut which = 0u64;
            for word in words.by_ref() {
                let bit = specula_os::checks::select::NAMES.iter().position(|n| *n == word).ok_or_else(|| {
                    format!("unknown check {word:?} (checks are {})", specula_os::checks::select::NAMES.join(", "))
                })?;
                which |= 1 << bit;
            }
            let report =
                inspector.os_checks(if which == 0 { specula_os::checks::select::DEFAULT } else { which }).map_err(e)?;
            let mut line: Vec<String> = report
                .runs
                .iter()
                .map(|r| match &r.error {
                    None => format!("{}={}", r.check, r.examined),
                    Some(why) => format!("{}=error({})", r.check, why.replace(' ', "_")),
                })
                .collect();
            let findings: Vec<String> = report
                .findings
                .iter()
                .map(|f| {
                    format!(
                        "{}:{}:{}:{:#x}:{}",
                        f.kind.name(),
                        f.id,
                        f.name.as_deref().unwrap_or("?").replace([' ', ',', ':'], "_"),
                        f.address,
                        f.detail.as_deref().unwrap_or("").replace([' ', ',', ':'], "_")
                    )
                })
                .collect();
            line.push(format!("findings={}", findings.join(",")));
            Ok(line.join(" "))
        }
        "vread" => {
            let pid = number(words.next(), "PID")?;
            let va = number(words.next(), "VA")?;
            let len = number(words.next(), "LEN")?;
            let pid = u32::try_from(pid).map_err(|_| "PID out of range".to_string())?;
            Ok(hex(&inspector.os_read_virtual(pid, va, len).map_err(e)?))
        }
        "" => Err("empty request".into()),
        other => Err(format!("unknown request '{other}'")),
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

    #[test]
    fn unhex_decodes_hex_digits() {
        assert_eq!(unhex("00ffA57e"), Ok(vec![0x00, 0xff, 0xa5, 0x7e]));
        assert_eq!(unhex(""), Ok(Vec::new()));
    }

    #[test]
    fn unhex_rejects_anything_but_ascii_hex_digits_without_panicking() {
        // Multibyte characters used to be sliced through the middle (a panic).
        assert_eq!(unhex("a\u{e9}0"), Err("bad hex digit '\u{e9}'".into()));
        assert_eq!(unhex("\u{e9}0"), Err("bad hex digit '\u{e9}'".into()));
        assert_eq!(unhex("0\u{1f600}0"), Err("bad hex digit '\u{1f600}'".into()));
        // from_str_radix would take a sign.
        assert_eq!(unhex("+f"), Err("bad hex digit '+'".into()));
        assert_eq!(unhex("0g"), Err("bad hex digit 'g'".into()));
        assert_eq!(unhex("abc"), Err("hex needs an even number of digits".into()));
    }
}
