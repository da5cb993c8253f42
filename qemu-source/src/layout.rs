//! Where guest RAM lies: QEMU's memory backends (`query-memdev`) and the system
//! address space's flat view (`info mtree -f`), parsed with bounds.

use serde_json::Value;

use crate::error::{clip, parse_error, QemuError};

/// Most flat-view lines and RAM ranges considered.
const MAX_FLATVIEW_LINES: usize = 100_000;
const MAX_RAM_RANGES: usize = 1024;

/// A memory backend as `query-memdev` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub id: String,
    pub size: u64,
    pub share: bool,
}

/// Guest-physical RAM backed by `backend` at `offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamRange {
    pub gpa: u64,
    pub len: u64,
    pub backend: String,
    pub offset: u64,
}

/// Parses `query-memdev`.
pub fn parse_memdevs(reply: &Value) -> Result<Vec<Backend>, QemuError> {
    let list = reply.as_array().ok_or_else(|| parse_error("query-memdev", "not a list"))?;
    list.iter()
        .take(MAX_RAM_RANGES)
        .map(|b| {
            let id = b.get("id").and_then(Value::as_str).ok_or_else(|| parse_error("query-memdev", "no id"))?;
            let size = b.get("size").and_then(Value::as_u64).ok_or_else(|| parse_error("query-memdev", "no size"))?;
            let share = b.get("share").and_then(Value::as_bool).unwrap_or(false);
            Ok(Backend { id: id.to_string(), size, share })
        })
        .collect()
}

/// The RAM ranges of the system address space in `info mtree -f` output whose memory
/// region is one of `backends`, merged where contiguous in both spaces.
///
/// Lines look like `  0000000000100000-000000000fffffff (prio 0, ram): m0 @0000000000100000 KVM`.
/// Only the first flat view whose root is `system` is read: the CPU's view of memory.
pub fn parse_flatview(text: &str, backends: &[Backend]) -> Result<Vec<RamRange>, QemuError> {
    let mut ranges: Vec<RamRange> = Vec::new();
    let mut in_system = false;
    for line in text.lines().take(MAX_FLATVIEW_LINES) {
        let trimmed = line.trim();
        if trimmed.starts_with("FlatView #") {
            if in_system {
                break;
            }
            continue;
        }
        if let Some(root) = trimmed.strip_prefix("Root memory region:") {
            in_system = root.trim() == "system";
            continue;
        }
        if !in_system {
            continue;
        }
        let Some(range) = parse_flatview_line(trimmed, backends)? else { continue };
        match ranges.last_mut() {
            Some(last)
                if last.backend == range.backend
                    && last.gpa + last.len == range.gpa
                    && last.offset + last.len == range.offset =>
            {
                last.len += range.len
            }
            _ => ranges.push(range),
        }
        if ranges.len() > MAX_RAM_RANGES {
            return Err(parse_error("memory tree", format!("more than {MAX_RAM_RANGES} RAM ranges")));
        }
    }
    Ok(ranges)
}

fn parse_flatview_line(line: &str, backends: &[Backend]) -> Result<Option<RamRange>, QemuError> {
    let Some((span, rest)) = line.split_once(' ') else { return Ok(None) };
    let Some((start, end)) = span.split_once('-') else { return Ok(None) };
    let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16)) else {
        return Ok(None);
    };
    let Some((attributes, target)) = rest.split_once("): ") else { return Ok(None) };
    if !(attributes.ends_with(", ram") || attributes.ends_with(", rom")) {
        return Ok(None);
    }
    let mut words = target.split_whitespace();
    let name = words.next().unwrap_or("");
    if !backends.iter().any(|b| b.id == name) {
        return Ok(None);
    }
    let offset = match words.next().and_then(|w| w.strip_prefix('@')) {
        Some(hex) => u64::from_str_radix(hex, 16).map_err(|_| parse_error("memory tree", clip(line)))?,
        None => 0,
    };
    let len =
        end.checked_sub(start).and_then(|l| l.checked_add(1)).ok_or_else(|| parse_error("memory tree", clip(line)))?;
    Ok(Some(RamRange { gpa: start, len, backend: name.to_string(), offset }))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const MTREE_PC: &str = "FlatView #0
 AS \"cpu-smm-0\", root: memory
 Root memory region: memory
  0000000000000000-00000000000bffff (prio 0, ram): m0

FlatView #1
 AS \"memory\", root: system
 AS \"cpu-memory-0\", root: system
 Root memory region: system
  0000000000000000-00000000000bffff (prio 0, ram): m0
  00000000000c0000-00000000000cafff (prio 0, rom): m0 @00000000000c0000
  00000000000cb000-00000000000cdfff (prio 0, ram): m0 @00000000000cb000
  0000000000100000-00000000bfffffff (prio 0, ram): m0 @0000000000100000
  00000000fd000000-00000000fdffffff (prio 1, ram): vga.vram
  00000000febc0000-00000000febdffff (prio 1, i/o): e1000-mmio
  00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios
  0000000100000000-000000013fffffff (prio 0, ram): m0 @00000000c0000000

FlatView #2
 AS \"I/O\", root: io
 Root memory region: io
  0000000000000000-0000000000000007 (prio 0, i/o): dma-chan
";

    fn m0(size: u64) -> Vec<Backend> {
        vec![Backend { id: "m0".into(), size, share: true }]
    }

    #[test]
    fn the_system_flat_view_gives_ram_below_and_above_the_hole() {
        let ranges = parse_flatview(MTREE_PC, &m0(4 << 30)).unwrap();
        assert_eq!(
            ranges,
            vec![
                RamRange { gpa: 0, len: 0xce000, backend: "m0".into(), offset: 0 },
                RamRange { gpa: 0x100000, len: 0xbff0_0000, backend: "m0".into(), offset: 0x100000 },
                RamRange { gpa: 1 << 32, len: 1 << 30, backend: "m0".into(), offset: 0xc000_0000 },
            ]
        );
    }

    #[test]
    fn memory_regions_that_are_no_backend_are_ignored() {
        assert!(parse_flatview(MTREE_PC, &[Backend { id: "other".into(), size: 1, share: true }]).unwrap().is_empty());
        assert!(parse_flatview("garbage\n\u{1F600}\n-\n(prio", &m0(1)).unwrap().is_empty());
    }

    #[test]
    fn hostile_flat_views_fail_cleanly() {
        let huge = "Root memory region: system\n".to_string()
            + &(0..2000)
                .map(|i| format!("  {:016x}-{:016x} (prio 0, ram): m0 @{:016x}\n", i * 0x2000, i * 0x2000, i * 0x5000))
                .collect::<String>();
        assert!(matches!(parse_flatview(&huge, &m0(1)), Err(QemuError::Parse { .. })), "too many ranges");
        let inverted = "Root memory region: system\n  0000000000002000-0000000000001000 (prio 0, ram): m0\n";
        assert!(parse_flatview(inverted, &m0(1)).is_err());
        let wrap = "Root memory region: system\n  0000000000000000-ffffffffffffffff (prio 0, ram): m0\n";
        assert!(parse_flatview(wrap, &m0(1)).is_err());
    }

    #[test]
    fn memdevs_parse_and_refuse_garbage() {
        let reply =
            json!([{"id": "m0", "size": 268435456u64, "share": true}, {"id": "m1", "size": 4096, "share": false}]);
        let backends = parse_memdevs(&reply).unwrap();
        assert_eq!(backends[1], Backend { id: "m1".into(), size: 4096, share: false });
        assert!(parse_memdevs(&json!({"id": 1})).is_err());
        assert!(parse_memdevs(&json!([{"size": 1}])).is_err());
    }
}
