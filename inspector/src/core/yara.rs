//! YARA rules over guest memory, with libyara (vendored 4.5, through the `yara`
//! crate): all of granted physical memory, one process's virtual memory (its
//! VMAs, read through its own page tables by the agent), or the kernel image
//! (`_text.._end`, through the kernel's page tables).
//!
//! Physical memory is copied out of the inspector's read-only mappings in
//! [`PHYSICAL_CHUNK`] pieces that overlap by [`CHUNK_OVERLAP`], so a string
//! shorter than the overlap is found wherever it lies and reported once.
//! Virtual memory is scanned one VMA at a time; pages the process has not
//! populated read as zeros. Rules see each piece as its own buffer (`filesize`
//! is the piece's size).
//!
//! Bounds: rules text [`MAX_RULES_BYTES`], [`MAX_MATCHES`] matches (the report
//! says when more were left out), [`MAX_VIRTUAL_BYTES`] of virtual memory per
//! scan, [`SCAN_TIMEOUT_S`] per buffer.

#[cfg(feature = "yara")]
use specula_api::YaraMatchView as YaraMatch;
use specula_api::{YaraReportView as YaraReport, YaraRequest};

#[cfg(feature = "yara")]
use super::kernel_symbol;
use super::{InspectError, Inspector};

/// Largest rules text accepted.
pub const MAX_RULES_BYTES: usize = 1 << 20;
/// Most matches reported.
pub const MAX_MATCHES: usize = 10_000;
/// Most virtual memory scanned for one process or the kernel.
pub const MAX_VIRTUAL_BYTES: u64 = 4 << 30;
/// libyara's time limit for one buffer, in seconds.
pub const SCAN_TIMEOUT_S: i32 = 60;
/// Physical memory is scanned in pieces this large...
pub const PHYSICAL_CHUNK: u64 = 64 << 20;
/// ...that overlap by this much.
pub const CHUNK_OVERLAP: u64 = 64 << 10;
#[cfg(feature = "yara")]
const PAGE: u64 = 4096;

/// What to scan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum YaraTarget {
    Physical,
    Process(u32),
    Kernel,
}

/// Compiles `rules`; a syntax error is a bad request naming it.
#[cfg(feature = "yara")]
pub fn compile(rules: &str) -> Result<yara::Rules, InspectError> {
    if rules.len() > MAX_RULES_BYTES {
        return Err(InspectError::BadRequest(format!("rules are limited to {MAX_RULES_BYTES} bytes")));
    }
    let compiler = yara::Compiler::new().map_err(|e| InspectError::BadRequest(format!("libyara: {e}")))?;
    let compiler = compiler
        .add_rules_str(rules)
        .map_err(|e| InspectError::BadRequest(format!("the YARA rules do not compile: {e}")))?;
    compiler.compile_rules().map_err(|e| InspectError::BadRequest(format!("the YARA rules do not compile: {e}")))
}

/// Where a buffer came from, to place its matches.
#[cfg(feature = "yara")]
#[derive(Clone, Copy)]
enum Origin {
    Physical { gpa: u64 },
    Virtual { pid: u32, va: u64 },
}

/// Scans `buf`, adding matches that start before `report_below` (an offset in `buf`).
#[cfg(feature = "yara")]
fn scan_buffer(
    rules: &yara::Rules,
    buf: &[u8],
    origin: Origin,
    report_below: u64,
    report: &mut YaraReport,
) -> Result<(), InspectError> {
    let found = rules
        .scan_mem(buf, SCAN_TIMEOUT_S)
        .map_err(|e| InspectError::BadRequest(format!("the YARA scan failed: {e}")))?;
    for rule in found {
        for string in &rule.strings {
            for m in &string.matches {
                let offset = m.offset as u64;
                if offset >= report_below {
                    continue;
                }
                if report.matches.len() == MAX_MATCHES {
                    report.truncated = true;
                    return Ok(());
                }
                let (gpa, pid, va) = match origin {
                    Origin::Physical { gpa } => (Some(gpa + offset), None, None),
                    Origin::Virtual { pid, va } => (None, Some(pid), Some(va + offset)),
                };
                report.matches.push(YaraMatch {
                    rule: rule.identifier.to_string(),
                    namespace: rule.namespace.to_string(),
                    tags: rule.tags.iter().map(|t| t.to_string()).collect(),
                    string: string.identifier.to_string(),
                    length: m.length as u64,
                    gpa,
                    pid,
                    va,
                });
            }
        }
    }
    Ok(())
}

impl Inspector {
    /// Runs the scan a request asks for.
    pub(super) fn yara_scan_request(&self, request: &YaraRequest) -> Result<YaraReport, InspectError> {
        let target = match (request.target.as_deref().unwrap_or("physical"), request.pid) {
            ("physical", None) => YaraTarget::Physical,
            ("kernel", None) => YaraTarget::Kernel,
            ("process", Some(pid)) => YaraTarget::Process(pid),
            ("process", None) => return Err(InspectError::BadRequest("a process scan needs a pid".into())),
            (other, _) => {
                return Err(InspectError::BadRequest(format!(
                    "unknown target {other:?} (physical, process with a pid, or kernel)"
                )))
            }
        };
        self.yara_scan(&request.rules, target)
    }
}

#[cfg(not(feature = "yara"))]
impl Inspector {
    /// This build has no libyara (the `yara` feature is off).
    pub fn yara_scan(&self, _rules: &str, _target: YaraTarget) -> Result<YaraReport, InspectError> {
        Err(InspectError::BadRequest("this inspector was built without YARA (the `yara` feature)".into()))
    }
}

#[cfg(feature = "yara")]
impl Inspector {
    /// Scans `target` with `rules` (YARA source).
    pub fn yara_scan(&self, rules: &str, target: YaraTarget) -> Result<YaraReport, InspectError> {
        let rules = compile(rules)?;
        let mut report = YaraReport::default();
        match target {
            YaraTarget::Physical => {
                let ranges: Vec<(u64, u64)> = self.grants().into_iter().map(|g| (g.gpa, g.len)).collect();
                for (gpa, len) in ranges {
                    let mut at = gpa;
                    while at < gpa + len && !report.truncated {
                        let n = (gpa + len - at).min(PHYSICAL_CHUNK + CHUNK_OVERLAP);
                        let buf = self.read_granted(at, n)?;
                        // The overlap is reported by the next piece, where it starts.
                        let last = at + n == gpa + len;
                        let below = if last { n } else { PHYSICAL_CHUNK };
                        scan_buffer(&rules, &buf, Origin::Physical { gpa: at }, below, &mut report)?;
                        report.scanned_bytes += below;
                        at += below;
                    }
                }
            }
            YaraTarget::Process(pid) => {
                let areas: Vec<(u64, u64)> = self.os_vmas(pid)?.iter().map(|v| (v.start, v.end)).collect();
                self.scan_virtual(&rules, pid, &areas, &mut report)?;
            }
            YaraTarget::Kernel => {
                let symbols = self.os_symbols()?;
                let (start, end) = (kernel_symbol(&symbols, "_text")?, kernel_symbol(&symbols, "_end")?);
                if end <= start {
                    return Err(InspectError::Os(format!("_text {start:#x} is not below _end {end:#x}")));
                }
                self.scan_virtual(&rules, 0, &[(start, end)], &mut report)?;
            }
        }
        Ok(report)
    }

    /// A granted physical range of any length, copied out in pieces.
    fn read_granted(&self, gpa: u64, len: u64) -> Result<Vec<u8>, InspectError> {
        let mut out = Vec::with_capacity(len as usize);
        while (out.len() as u64) < len {
            let n = (len - out.len() as u64).min(super::MAX_MAPPED_READ);
            out.extend(self.read_mapped(gpa + out.len() as u64, n)?);
        }
        Ok(out)
    }

    /// Scans the virtual ranges `areas` of process `pid` (0: the kernel) one at a time.
    fn scan_virtual(
        &self,
        rules: &yara::Rules,
        pid: u32,
        areas: &[(u64, u64)],
        report: &mut YaraReport,
    ) -> Result<(), InspectError> {
        let total: u64 = areas.iter().map(|(s, e)| e.saturating_sub(*s)).sum();
        if total > MAX_VIRTUAL_BYTES {
            return Err(InspectError::BadRequest(format!(
                "{total} bytes of virtual memory: scans are limited to {MAX_VIRTUAL_BYTES}"
            )));
        }
        for &(start, end) in areas {
            let mut buf = Vec::with_capacity((end - start) as usize);
            let mut at = start;
            while at < end {
                let n = (end - at).min(super::MAX_READ);
                match self.os_read_virtual(pid, at, n) {
                    Ok(bytes) => buf.extend(bytes),
                    // Something in this piece is not mapped: page by page, zeros where not.
                    Err(InspectError::Os(_)) => {
                        for page in (at..at + n).step_by(PAGE as usize) {
                            let k = (at + n - page).min(PAGE);
                            match self.os_read_virtual(pid, page, k) {
                                Ok(bytes) => buf.extend(bytes),
                                Err(InspectError::Os(_)) => buf.resize(buf.len() + k as usize, 0),
                                Err(e) => return Err(e),
                            }
                        }
                    }
                    Err(e) => return Err(e),
                }
                at += n;
            }
            let len = buf.len() as u64;
            scan_buffer(rules, &buf, Origin::Virtual { pid, va: start }, len, report)?;
            report.scanned_bytes += len;
            if report.truncated {
                break;
            }
        }
        Ok(())
    }
}

#[cfg(all(test, feature = "yara"))]
mod tests {
    use super::*;

    const RULES: &str = r#"rule marker : test { strings: $m = "SPECULA-MARKER" condition: $m }"#;

    #[test]
    fn matches_are_placed_and_the_overlap_is_reported_once() {
        let rules = compile(RULES).unwrap();
        let mut buf = vec![0u8; 8192];
        buf[100..114].copy_from_slice(b"SPECULA-MARKER");
        buf[5000..5014].copy_from_slice(b"SPECULA-MARKER");
        let mut report = YaraReport::default();
        scan_buffer(&rules, &buf, Origin::Physical { gpa: 0x10_0000 }, 4096, &mut report).unwrap();
        assert_eq!(report.matches.len(), 1, "the match past report_below belongs to the next piece");
        let m = &report.matches[0];
        assert_eq!((m.rule.as_str(), m.string.as_str(), m.gpa, m.length), ("marker", "$m", Some(0x10_0064), 14));
        assert_eq!(m.tags, ["test"]);
        let mut report = YaraReport::default();
        scan_buffer(&rules, &buf, Origin::Virtual { pid: 7, va: 0x40_0000 }, 8192, &mut report).unwrap();
        let places: Vec<_> = report.matches.iter().map(|m| (m.pid, m.va)).collect();
        assert_eq!(places, [(Some(7), Some(0x40_0064)), (Some(7), Some(0x40_1388))]);
    }

    #[test]
    fn bad_rules_are_a_bad_request_naming_the_error() {
        let Err(e) = compile("rule broken { condition: $nothing }") else { panic!("broken rules compiled") };
        assert!(matches!(&e, InspectError::BadRequest(m) if m.contains("do not compile")), "{e}");
        let huge = "a".repeat(MAX_RULES_BYTES + 1);
        assert!(matches!(compile(&huge), Err(InspectError::BadRequest(_))));
    }

    #[test]
    fn matches_beyond_the_cap_are_counted_as_truncated() {
        let rules = compile(RULES).unwrap();
        let buf = b"SPECULA-MARKER".repeat(8);
        let mut report = YaraReport {
            matches: vec![
                YaraMatch {
                    rule: String::new(),
                    namespace: String::new(),
                    tags: vec![],
                    string: String::new(),
                    length: 0,
                    gpa: None,
                    pid: None,
                    va: None,
                };
                MAX_MATCHES - 3
            ],
            ..Default::default()
        };
        scan_buffer(&rules, &buf, Origin::Physical { gpa: 0 }, buf.len() as u64, &mut report).unwrap();
        assert_eq!(report.matches.len(), MAX_MATCHES);
        assert!(report.truncated);
    }
}
