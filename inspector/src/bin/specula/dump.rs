//! `specula dump`: the source's memory as an ELF core (with the kernel's VMCOREINFO)
//! or LiME.

use std::io::Write;
use std::path::{Path, PathBuf};

use hyper::Method;
use inspector::dump::{Consistency, Range};
use specula_api::{Reply, Request};

use crate::client::{ask, call, success, CliError};

/// Bytes fetched per request while dumping.
const DUMP_CHUNK: u64 = 32 << 20;

/// What a dump wrote.
#[derive(serde::Serialize)]
pub struct DumpSummary {
    pub path: PathBuf,
    pub format: String,
    pub ranges: usize,
    pub bytes: u64,
    pub consistency: &'static str,
}

/// Pauses the source (unless `live`), streams every granted range into `output` after
/// the format's headers, resumes the source whatever happened.
pub async fn dump(s: &Path, output: &Path, format: &str, live: bool) -> Result<DumpSummary, CliError> {
    if format != "elf" && format != "lime" {
        return Err(CliError::Usage(format!("unknown dump format {format:?} (elf or lime)")));
    }
    let Reply::Grants(grants) = ask(s, &Request::Grants).await? else { unreachable!("grants answer grants") };
    let mut ranges: Vec<Range> =
        grants.iter().map(|g| Range { gpa: g.gpa, len: g.len }).filter(|r| r.len > 0).collect();
    ranges.sort_by_key(|r| r.gpa);
    // Adjacent grants are one range of RAM.
    let mut merged: Vec<Range> = Vec::new();
    for r in ranges {
        match merged.last_mut() {
            Some(last) if last.gpa + last.len == r.gpa => last.len += r.len,
            _ => merged.push(r),
        }
    }
    if merged.is_empty() {
        return Err(CliError::Usage("the inspector has no granted memory to dump".into()));
    }
    let consistency = if live {
        Consistency::Live
    } else {
        match ask(s, &Request::Pause).await {
            Ok(_) => Consistency::Paused,
            Err(e) => {
                eprintln!("specula: the source cannot be paused ({e}): the dump is live");
                Consistency::Live
            }
        }
    };
    let written = write_dump(s, output, format, &merged, consistency).await;
    if consistency == Consistency::Paused {
        if let Err(e) = ask(s, &Request::Resume).await {
            eprintln!("specula: resuming the source failed: {e}");
        }
    }
    Ok(DumpSummary {
        path: output.to_path_buf(),
        format: format.into(),
        ranges: merged.len(),
        bytes: written?,
        consistency: if consistency == Consistency::Paused { "paused" } else { "live" },
    })
}

/// Writes the dump file; returns the guest bytes written. The file is written under a
/// temporary name and renamed when complete: a failed dump leaves nothing that looks whole.
async fn write_dump(
    s: &Path,
    output: &Path,
    format: &str,
    ranges: &[Range],
    consistency: Consistency,
) -> Result<u64, CliError> {
    use std::io::IsTerminal;
    let partial = output.with_extension("partial");
    let fail = |source: std::io::Error| CliError::File { path: partial.clone(), source };
    let file = std::fs::File::create(&partial).map_err(fail)?;
    let mut out = std::io::BufWriter::with_capacity(8 << 20, file);
    if format == "elf" {
        let vmcoreinfo = vmcoreinfo_text(s).await;
        if vmcoreinfo.is_none() {
            eprintln!("specula: no Linux kernel found in the source: the core has no VMCOREINFO note");
        }
        out.write_all(&inspector::dump::elf_header(ranges, vmcoreinfo.as_deref(), consistency)).map_err(fail)?;
    }
    let total: u64 = ranges.iter().map(|r| r.len).sum();
    let progress = std::io::stderr().is_terminal();
    let mut done = 0u64;
    for r in ranges {
        if format == "lime" {
            out.write_all(&inspector::dump::lime_header(*r)).map_err(fail)?;
        }
        let mut at = r.gpa;
        while at < r.gpa + r.len {
            let n = (r.gpa + r.len - at).min(DUMP_CHUNK);
            let path = format!("/v1/memory/physical?gpa={at}&len={n}");
            let body = match call(s, Method::GET, &path, None).await.and_then(|reply| success(reply, &path)) {
                Ok(body) if body.len() as u64 == n => body,
                outcome => {
                    let _ = std::fs::remove_file(&partial);
                    return Err(outcome.err().unwrap_or_else(|| {
                        CliError::Usage(format!("a short read at {at:#x}: fewer than the {n} bytes asked for"))
                    }));
                }
            };
            out.write_all(&body).map_err(fail)?;
            at += n;
            done += n;
            if progress {
                eprint!("\rdump: {} / {} MiB ({}%)", done >> 20, total >> 20, done * 100 / total.max(1));
            }
        }
    }
    if progress {
        eprintln!();
    }
    out.flush().map_err(fail)?;
    drop(out);
    std::fs::rename(&partial, output).map_err(|source| CliError::File { path: output.to_path_buf(), source })?;
    Ok(done)
}

/// The kernel's VMCOREINFO text, if the inspector found a Linux kernel.
async fn vmcoreinfo_text(s: &Path) -> Option<Vec<u8>> {
    let Reply::Kernel(kernel) = ask(s, &Request::Kernel).await.ok()? else { return None };
    let path = format!("/v1/memory/physical?gpa={}&len=4096", kernel.vmcoreinfo_at);
    let body = success(call(s, Method::GET, &path, None).await.ok()?, &path).ok()?;
    Some(body.iter().copied().take_while(|&b| b != 0).collect())
}
