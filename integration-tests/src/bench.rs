//! Small helpers for Specula's benchmarks: sample statistics, writing a named
//! section of BENCHMARKS.md (other sections are kept), and finding a source's
//! guest RAM in its address space (for the copying baselines).

use std::path::PathBuf;

use mirror_driver::importer::MappedGrant;
use std::time::Duration;

/// Median, p90, p99 of a set of durations.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub n: usize,
    pub median: Duration,
    pub p90: Duration,
    pub p99: Duration,
}

/// Summarizes samples (nearest-rank percentiles); panics on an empty set.
pub fn summarize(samples: &[Duration]) -> Summary {
    assert!(!samples.is_empty(), "no samples");
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = |p: f64| sorted[(((p * sorted.len() as f64).ceil() as usize).max(1) - 1).min(sorted.len() - 1)];
    Summary { n: sorted.len(), median: rank(0.5), p90: rank(0.9), p99: rank(0.99) }
}

/// Milliseconds with two decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

/// The workspace root (BENCHMARKS.md lives there).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// The `NAME=VALUE` lines of a benchmark script's output, as figures (and its `# `
/// lines echoed to stderr: what a failed run printed last).
pub fn figures_of(output: &str) -> Vec<(String, f64)> {
    output.lines().filter(|l| l.starts_with("# ")).for_each(|l| eprintln!("{l}"));
    output
        .lines()
        .filter_map(|l| {
            let (name, value) = l.trim().split_once('=')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// Replaces (or appends) the section between `<!-- bench:NAME -->` markers in BENCHMARKS.md.
pub fn write_section(name: &str, body: &str) -> std::io::Result<PathBuf> {
    let path = workspace_root().join("BENCHMARKS.md");
    let existing = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        "# Specula benchmarks\n\nFigures written by the benchmarks; see README.md for how to run them.\n".into()
    });
    let begin = format!("<!-- bench:{name} begin -->");
    let end = format!("<!-- bench:{name} end -->");
    let section = format!("{begin}\n{body}\n{end}");
    let updated = match (existing.find(&begin), existing.find(&end)) {
        (Some(b), Some(e)) if e > b => format!("{}{}{}", &existing[..b], section, &existing[e + end.len()..]),
        _ => format!("{}\n{}\n", existing.trim_end(), section),
    };
    std::fs::write(&path, updated)?;
    Ok(path)
}

/// Writes a horizontal bar chart as SVG (bars labelled with their values).
pub fn bar_chart_svg(title: &str, unit: &str, bars: &[(String, f64)]) -> String {
    let width = 760.0;
    let label_w = 300.0;
    let bar_h = 26.0;
    let top = 40.0;
    let height = top + bars.len() as f64 * (bar_h + 10.0) + 20.0;
    let max = bars.iter().map(|b| b.1).fold(f64::MIN_POSITIVE, f64::max);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"13\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"24\" font-size=\"15\" font-weight=\"bold\">{title}</text>\n"
    );
    for (i, (label, value)) in bars.iter().enumerate() {
        let y = top + i as f64 * (bar_h + 10.0);
        let w = (width - label_w - 110.0) * value / max;
        svg.push_str(&format!(
            "<text x=\"10\" y=\"{:.0}\">{label}</text>\n<rect x=\"{label_w}\" y=\"{y:.0}\" width=\"{w:.1}\" height=\"{bar_h}\" fill=\"#3b7dd8\"/>\n\
             <text x=\"{:.1}\" y=\"{:.0}\">{value:.2} {unit}</text>\n",
            y + 18.0,
            label_w + w + 6.0,
            y + 18.0
        ));
    }
    svg.push_str("</svg>\n");
    svg
}

/// Name of the source's guest RAM memfds in /proc/PID/maps.
pub const RAM_MEMFD: &str = "/memfd:specula-guest-ram";

/// One line of /proc/PID/maps.
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// File offset of `start`.
    pub offset: u64,
    /// Device and inode of the mapped file.
    pub file: (String, u64),
    /// The mapped file's path, as the kernel shows it (may be empty).
    pub path: String,
}

/// The mappings of process `pid` (a number, or `self`).
pub fn mappings(pid: &str) -> Vec<Mapping> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let hex = |x: &str| u64::from_str_radix(x, 16).unwrap();
    maps.lines()
        .map(|line| {
            let f: Vec<&str> = line.splitn(6, ' ').collect();
            let (start, end) = f[0].split_once('-').unwrap();
            Mapping {
                start: hex(start),
                end: hex(end),
                offset: hex(f[2]),
                file: (f[3].to_string(), f[4].parse().unwrap()),
                path: f.get(5).unwrap_or(&"").trim().to_string(),
            }
        })
        .collect()
}

/// Host virtual addresses in the source process `pid` of the RAM that `grants` cover, in order.
///
/// The API no longer tells host addresses, so they are found the way any copying
/// tool would: each RAM chunk is a memfd the source maps (`memfd:specula-guest-ram`
/// in its /proc/PID/maps), and each grant mapped here is a re-open of one of those
/// memfds, at file offset `grant.offset`. Our own mapping's (device, inode) names
/// the chunk; the source's mapping of that file at that offset gives the address.
pub fn source_hvas(pid: libc::pid_t, grants: &[MappedGrant]) -> Vec<(u64, u64)> {
    let ours = mappings("self");
    let theirs: Vec<Mapping> =
        mappings(&pid.to_string()).into_iter().filter(|m| m.path.starts_with(RAM_MEMFD)).collect();
    let mut out = Vec::new();
    for g in grants {
        let here = ours.iter().find(|m| (m.start..m.end).contains(&g.host_addr())).expect("our grant mapping");
        let (mut offset, end) = (g.grant.offset, g.grant.offset + g.grant.len);
        while offset < end {
            let there = theirs
                .iter()
                .find(|m| m.file == here.file && (m.offset..m.offset + (m.end - m.start)).contains(&offset))
                .unwrap_or_else(|| panic!("no source mapping of grant {} at file offset {offset:#x}", g.grant.id));
            let piece = (end - offset).min(there.offset + (there.end - there.start) - offset);
            out.push((there.start + (offset - there.offset), piece));
            offset += piece;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let samples: Vec<Duration> = (1..=10).map(Duration::from_millis).collect();
        let s = summarize(&samples);
        assert_eq!(
            (s.median, s.p90, s.p99),
            (Duration::from_millis(5), Duration::from_millis(9), Duration::from_millis(10))
        );
        let one = summarize(&[Duration::from_millis(3)]);
        assert_eq!(one.p99, Duration::from_millis(3));
    }

    #[test]
    fn bar_chart_scales_bars_to_the_largest_value() {
        let svg = bar_chart_svg("t", "GB/s", &[("a".into(), 1.0), ("b".into(), 2.0)]);
        assert_eq!(svg.matches("<rect x=").count(), 2);
        assert!(svg.contains("width=\"175.0\"") && svg.contains("width=\"350.0\""), "{svg}");
        assert!(svg.contains("2.00 GB/s"));
    }
}
