//! The vCPU registers QEMU does not show through QMP, from its own migration stream.
//!
//! `info registers` has no LSTAR, STAR, CSTAR or FMASK, and QMP has no MSR query; the
//! only place QEMU writes them is a device-state (migration) stream. With the
//! `x-ignore-shared` capability a stream of a VM whose RAM is shared memory carries
//! no guest RAM, so it is small (under a megabyte, mostly ROM and video RAM) and
//! quick (milliseconds, the guest paused for its last few). [`cpu_msrs`] reads the
//! `cpu` sections of such a stream.
//!
//! The stream is parsed, not searched: a search for a `cpu` section header could be
//! fooled by bytes the guest controls (its video RAM is in the stream). The walk
//! follows the stream's own framing from the header to the end-of-file marker: the
//! configuration section, the RAM sections page by page, and each device section at
//! the length that QEMU's JSON description of the stream (the "vmdesc", at its end)
//! gives it, checked against the section footer QEMU writes after it. Anything else
//! (another QEMU stream format, compression, postcopy) is an error that says so.
//! Every length is bounded by the stream, every count by a constant.

use serde_json::Value;

/// Longest stream accepted (RAM is not in it: ROMs, video RAM and device state).
pub const MAX_STREAM: usize = 256 << 20;
/// Most devices, fields and subsections followed in the description.
const MAX_DESCRIBED: usize = 1 << 16;
/// Deepest nesting of structures and subsections followed in the description.
const MAX_DEPTH: usize = 16;

const MAGIC: u32 = 0x5145_564d; // "QEVM"
const VERSION: u32 = 3;
const SECTION_START: u8 = 0x01;
const SECTION_PART: u8 = 0x02;
const SECTION_END: u8 = 0x03;
const SECTION_FULL: u8 = 0x04;
const SUBSECTION: u8 = 0x05;
const VMDESCRIPTION: u8 = 0x06;
const CONFIGURATION: u8 = 0x07;
const EOF: u8 = 0x00;
const FOOTER: u8 = 0x7e;

const RAM_FLAG_ZERO: u64 = 0x02;
const RAM_FLAG_MEM_SIZE: u64 = 0x04;
const RAM_FLAG_PAGE: u64 = 0x08;
const RAM_FLAG_EOS: u64 = 0x10;
const RAM_FLAG_CONTINUE: u64 = 0x20;

/// The system-call MSRs of one vCPU, as QEMU holds them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuMsrs {
    /// The vCPU (the `cpu` section's instance).
    pub cpu: u32,
    pub efer: u64,
    pub star: u64,
    /// Where `syscall` enters the kernel.
    pub lstar: u64,
    pub cstar: u64,
    pub fmask: u64,
    pub kernel_gs_base: u64,
}

/// What is wrong with a stream.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error("QEMU's device-state stream is {0} bytes, more than the {MAX_STREAM} accepted")]
    TooLong(usize),
    #[error("QEMU's device-state stream has no description (vmdesc) at its end")]
    NoDescription,
    #[error("QEMU's description of its device-state stream is unusable: {0}")]
    BadDescription(String),
    #[error("QEMU's device-state stream is malformed at byte {at}: {what}")]
    Malformed { at: usize, what: String },
    #[error("QEMU's device-state stream uses {0}, which Specula does not read")]
    Unsupported(String),
    #[error("QEMU's device-state stream has no cpu sections")]
    NoCpus,
}

/// The MSRs of every vCPU in `stream`, a whole QEMU migration stream (version 3, with
/// section footers and its description), by vCPU index.
pub fn cpu_msrs(stream: &[u8]) -> Result<Vec<CpuMsrs>, StateError> {
    if stream.len() > MAX_STREAM {
        return Err(StateError::TooLong(stream.len()));
    }
    let (desc_at, desc) = description(stream)?;
    let mut devices = devices(&desc)?.into_iter();
    let mut r = Reader { data: &stream[..desc_at], at: 0 };
    if r.be32()? != MAGIC || r.be32()? != VERSION {
        return Err(r.malformed("not a version 3 QEMU migration stream"));
    }
    let mut cpus = Vec::new();
    let mut ram_section = None;
    loop {
        let kind = r.u8()?;
        match kind {
            CONFIGURATION => configuration(&mut r)?,
            SECTION_START | SECTION_FULL => {
                let id = r.be32()?;
                let name = r.short_string()?;
                let instance = r.be32()?;
                let version = r.be32()?;
                if kind == SECTION_START {
                    if name != "ram" {
                        return Err(StateError::Unsupported(format!("an iterative section {name:?}")));
                    }
                    ram_start(&mut r)?;
                    ram_section = Some(id);
                } else {
                    let device = devices
                        .next()
                        .ok_or_else(|| r.malformed(&format!("section {name:?} is not in the description")))?;
                    if device.name != name
                        || device.instance != instance
                        || device.version.is_some_and(|v| v != version)
                    {
                        return Err(r.malformed(&format!(
                            "section {name:?}/{instance} v{version} where the description has {:?}/{} v{:?}",
                            device.name, device.instance, device.version
                        )));
                    }
                    let data = r.bytes(device.len)?;
                    if name == "cpu" {
                        cpus.push(device.msrs(instance, data)?);
                    }
                }
                footer(&mut r, id)?;
            }
            SECTION_PART | SECTION_END => {
                let id = r.be32()?;
                if Some(id) != ram_section {
                    return Err(r.malformed(&format!("a part of section {id}, which never started")));
                }
                ram_pages(&mut r)?;
                footer(&mut r, id)?;
            }
            EOF => break,
            other => return Err(r.malformed(&format!("section type {other:#x}"))),
        }
    }
    if r.at != r.data.len() {
        return Err(r.malformed("bytes between the end-of-file marker and the description"));
    }
    if cpus.is_empty() {
        return Err(StateError::NoCpus);
    }
    Ok(cpus)
}

/// The description at the stream's end: `0x06`, a big-endian length, that much JSON,
/// then nothing. JSON text never holds a 0x06 byte, so the last candidate is the one.
fn description(stream: &[u8]) -> Result<(usize, Value), StateError> {
    let at = (0..stream.len().saturating_sub(4))
        .rev()
        .find(|&p| {
            stream[p] == VMDESCRIPTION
                && u32::from_be_bytes(stream[p + 1..p + 5].try_into().expect("4 bytes")) as usize
                    == stream.len() - p - 5
        })
        .ok_or(StateError::NoDescription)?;
    let json = serde_json::from_slice(&stream[at + 5..]).map_err(|e| StateError::BadDescription(e.to_string()))?;
    // The end-of-file marker sits right before the description.
    if at == 0 || stream[at - 1] != EOF {
        return Err(StateError::NoDescription);
    }
    Ok((at, json))
}

/// A device section as the description has it.
struct Device {
    name: String,
    instance: u32,
    /// Absent for the few sections QEMU saves without a vmstate description of
    /// their own (their fields are still described).
    version: Option<u32>,
    /// Bytes of its data in the stream.
    len: usize,
    /// Where each top-level field starts in its data, with its size.
    fields: Vec<(String, usize, usize)>,
}

impl Device {
    fn msrs(&self, cpu: u32, data: &[u8]) -> Result<CpuMsrs, StateError> {
        let field = |name: &str| -> Result<u64, StateError> {
            let (_, at, size) = self
                .fields
                .iter()
                .find(|(n, _, _)| n == name)
                .ok_or_else(|| StateError::BadDescription(format!("cpu {cpu} has no field {name}")))?;
            if *size != 8 {
                return Err(StateError::BadDescription(format!("cpu field {name} is {size} bytes, not 8")));
            }
            let bytes =
                data.get(*at..at + 8).ok_or_else(|| StateError::BadDescription(format!("{name} past the data")))?;
            Ok(u64::from_be_bytes(bytes.try_into().expect("8 bytes")))
        };
        Ok(CpuMsrs {
            cpu,
            efer: field("env.efer")?,
            star: field("env.star")?,
            lstar: field("env.lstar")?,
            cstar: field("env.cstar")?,
            fmask: field("env.fmask")?,
            kernel_gs_base: field("env.kernelgsbase")?,
        })
    }
}

fn bad(what: impl Into<String>) -> StateError {
    StateError::BadDescription(what.into())
}

/// The described devices, in stream order.
fn devices(desc: &Value) -> Result<Vec<Device>, StateError> {
    let list = desc.get("devices").and_then(Value::as_array).ok_or_else(|| bad("no device list"))?;
    if list.len() > MAX_DESCRIBED {
        return Err(bad(format!("{} devices", list.len())));
    }
    let mut budget = MAX_DESCRIBED;
    list.iter()
        .map(|d| {
            let text = |key: &str| d.get(key).and_then(Value::as_str).map(str::to_string);
            let number = |key: &str| d.get(key).and_then(Value::as_u64).and_then(|n| u32::try_from(n).ok());
            let name = text("name").ok_or_else(|| bad("a device without a name"))?;
            let instance = number("instance_id").ok_or_else(|| bad(format!("{name} has no instance_id")))?;
            let version = number("version");
            let mut fields = Vec::new();
            let len = described_len(d, 0, &mut budget, Some(&mut fields))?;
            Ok(Device { name, instance, version, len, fields })
        })
        .collect()
}

/// Bytes a described state (its fields, then its subsections, each with its header)
/// takes in the stream; `top` collects the offsets of the top-level fields.
fn described_len(
    state: &Value,
    depth: usize,
    budget: &mut usize,
    mut top: Option<&mut Vec<(String, usize, usize)>>,
) -> Result<usize, StateError> {
    if depth > MAX_DEPTH {
        return Err(bad("nested too deep"));
    }
    let mut len = 0usize;
    let empty = Vec::new();
    let fields = state.get("fields").and_then(Value::as_array).unwrap_or(&empty);
    for f in fields {
        *budget = budget.checked_sub(1).ok_or_else(|| bad("too many fields"))?;
        let size = f.get("size").and_then(Value::as_u64).ok_or_else(|| bad("a field without a size"))?;
        let count = f.get("array_len").and_then(Value::as_u64).unwrap_or(1);
        let bytes =
            size.checked_mul(count).filter(|&b| b <= MAX_STREAM as u64).ok_or_else(|| bad("a field too large"))?;
        if let Some(top) = top.as_deref_mut() {
            let name = f.get("name").and_then(Value::as_str).unwrap_or("").to_string();
            top.push((name, len, size as usize));
        }
        len = len.checked_add(bytes as usize).filter(|&l| l <= MAX_STREAM).ok_or_else(|| bad("a state too large"))?;
    }
    let subsections = state.get("subsections").and_then(Value::as_array).unwrap_or(&empty);
    for s in subsections {
        *budget = budget.checked_sub(1).ok_or_else(|| bad("too many subsections"))?;
        let name = s.get("vmsd_name").and_then(Value::as_str).ok_or_else(|| bad("a subsection without a name"))?;
        if name.len() > 255 {
            return Err(bad("a subsection name longer than 255 bytes"));
        }
        // 0x05, the name's length and the name, its version.
        let header = 2 + name.len() + 4;
        let body = described_len(s, depth + 1, budget, None)?;
        len = len.checked_add(header + body).filter(|&l| l <= MAX_STREAM).ok_or_else(|| bad("a state too large"))?;
    }
    Ok(len)
}

/// The configuration section: the machine type, then the subsections QEMU 7–9 write.
fn configuration(r: &mut Reader<'_>) -> Result<(), StateError> {
    let len = r.be32()? as usize;
    r.bytes(len)?;
    while r.peek() == Some(SUBSECTION) {
        r.u8()?;
        let name = r.short_string()?;
        r.be32()?; // its version
        match name.as_str() {
            "configuration/capabilities" => {
                let count = r.be32()?;
                if count > 256 {
                    return Err(r.malformed(&format!("{count} capabilities")));
                }
                for _ in 0..count {
                    r.short_string()?;
                }
            }
            "configuration/target-page-bits" => {
                r.be32()?;
            }
            "configuration/uuid" => {
                r.bytes(16)?;
            }
            other => return Err(StateError::Unsupported(format!("the configuration subsection {other:?}"))),
        }
    }
    Ok(())
}

/// The RAM section's start: the blocks and their sizes (and, under `x-ignore-shared`,
/// their addresses), up to the end-of-section flag.
fn ram_start(r: &mut Reader<'_>) -> Result<(), StateError> {
    let header = r.be64()?;
    if header & 0xfff != RAM_FLAG_MEM_SIZE {
        return Err(r.malformed(&format!("RAM header flags {:#x}", header & 0xfff)));
    }
    let total = header & !0xfff;
    let mut seen = 0u64;
    while seen < total {
        r.short_string()?;
        let used = r.be64()?;
        seen =
            seen.checked_add(used).filter(|&s| s <= total).ok_or_else(|| r.malformed("RAM blocks past the total"))?;
        // `x-ignore-shared` adds each block's address, which the stream this module
        // asks for always has; a block of zero bytes would loop forever otherwise.
        r.be64()?;
        if used == 0 {
            return Err(r.malformed("an empty RAM block"));
        }
    }
    if r.be64()? != RAM_FLAG_EOS {
        return Err(r.malformed("RAM blocks without an end-of-section flag"));
    }
    Ok(())
}

/// RAM pages (of RAM that is not shared: ROMs, video RAM) up to the end-of-section flag.
fn ram_pages(r: &mut Reader<'_>) -> Result<(), StateError> {
    loop {
        let word = r.be64()?;
        let flags = word & 0xfff;
        if flags == RAM_FLAG_EOS {
            return Ok(());
        }
        let data = flags & !RAM_FLAG_CONTINUE;
        if data != RAM_FLAG_ZERO && data != RAM_FLAG_PAGE {
            return Err(StateError::Unsupported(format!("RAM page flags {flags:#x} (compression or RDMA)")));
        }
        if flags & RAM_FLAG_CONTINUE == 0 {
            r.short_string()?;
        }
        r.bytes(if data == RAM_FLAG_ZERO { 1 } else { 4096 })?;
    }
}

fn footer(r: &mut Reader<'_>, id: u32) -> Result<(), StateError> {
    if r.u8()? != FOOTER || r.be32()? != id {
        return Err(
            r.malformed(&format!("section {id} does not end with its footer (a length in the description is wrong)"))
        );
    }
    Ok(())
}

/// A bounds-checked big-endian reader.
struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn malformed(&self, what: &str) -> StateError {
        StateError::Malformed { at: self.at, what: what.to_string() }
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        let end =
            self.at.checked_add(n).filter(|&e| e <= self.data.len()).ok_or_else(|| self.malformed("truncated"))?;
        let out = &self.data[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn peek(&self) -> Option<u8> {
        self.data.get(self.at).copied()
    }

    fn u8(&mut self) -> Result<u8, StateError> {
        Ok(self.bytes(1)?[0])
    }

    fn be32(&mut self) -> Result<u32, StateError> {
        Ok(u32::from_be_bytes(self.bytes(4)?.try_into().expect("4 bytes")))
    }

    fn be64(&mut self) -> Result<u64, StateError> {
        Ok(u64::from_be_bytes(self.bytes(8)?.try_into().expect("8 bytes")))
    }

    /// A string with a one-byte length.
    fn short_string(&mut self) -> Result<String, StateError> {
        let len = self.u8()? as usize;
        Ok(String::from_utf8_lossy(self.bytes(len)?).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream as QEMU 7.2 writes it for a two-vCPU pc machine with shared RAM: a
    /// configuration, RAM blocks and pages, a timer section, two cpu sections (one with
    /// a subsection) and the description.
    fn stream(lstar: [u64; 2], tamper: impl FnOnce(&mut Vec<u8>, &mut Value)) -> Vec<u8> {
        let mut s = Vec::new();
        s.extend(MAGIC.to_be_bytes());
        s.extend(VERSION.to_be_bytes());
        s.push(CONFIGURATION);
        s.extend(13u32.to_be_bytes());
        s.extend(b"pc-i440fx-7.2");
        s.push(SUBSECTION);
        s.push(26);
        s.extend(b"configuration/capabilities");
        s.extend(1u32.to_be_bytes());
        s.extend(1u32.to_be_bytes());
        s.push(15);
        s.extend(b"x-ignore-shared");
        let header = |s: &mut Vec<u8>, kind: u8, id: u32, name: &str, instance: u32, version: u32| {
            s.push(kind);
            s.extend(id.to_be_bytes());
            s.push(name.len() as u8);
            s.extend(name.as_bytes());
            s.extend(instance.to_be_bytes());
            s.extend(version.to_be_bytes());
        };
        let footer = |s: &mut Vec<u8>, id: u32| {
            s.push(FOOTER);
            s.extend(id.to_be_bytes());
        };
        header(&mut s, SECTION_START, 2, "ram", 0, 4);
        s.extend(((0x1000_0000u64 + 0x2000) | RAM_FLAG_MEM_SIZE).to_be_bytes());
        for (name, len) in [("ram0", 0x1000_0000u64), ("vga.vram", 0x2000)] {
            s.push(name.len() as u8);
            s.extend(name.as_bytes());
            s.extend(len.to_be_bytes());
            s.extend(0u64.to_be_bytes());
        }
        s.extend(RAM_FLAG_EOS.to_be_bytes());
        footer(&mut s, 2);
        header(&mut s, SECTION_PART, 2, "", 0, 0);
        s.truncate(s.len() - 9); // a part has only the section id
                                 // A page of video RAM that looks like a cpu section (the guest draws it).
        s.extend(RAM_FLAG_PAGE.to_be_bytes());
        s.push(8);
        s.extend(b"vga.vram");
        let mut fake = vec![0u8; 4096];
        fake[..4].copy_from_slice(&[SECTION_FULL, 0, 0, 0]);
        fake[100..104].copy_from_slice(b"\x03cpu");
        s.extend(&fake);
        s.extend((0x1000 | RAM_FLAG_ZERO | RAM_FLAG_CONTINUE).to_be_bytes());
        s.push(0);
        s.extend(RAM_FLAG_EOS.to_be_bytes());
        footer(&mut s, 2);
        s.push(SECTION_END);
        s.extend(2u32.to_be_bytes());
        s.extend(RAM_FLAG_EOS.to_be_bytes());
        footer(&mut s, 2);
        header(&mut s, SECTION_FULL, 3, "timer", 0, 2);
        s.extend([0u8; 24]);
        footer(&mut s, 3);
        for cpu in 0..2u32 {
            header(&mut s, SECTION_FULL, 4 + cpu, "cpu", cpu, 12);
            s.extend(0x1122u64.to_be_bytes()); // env.regs[0] only, for brevity
            s.extend([0u8; 10]); // env.fpregs[0]
            for v in [0xd01u64, 0x0023_0010_0000_0000, lstar[cpu as usize], 0xffff_ffff_8120_0040, 0x47700, 0] {
                s.extend(v.to_be_bytes());
            }
            if cpu == 0 {
                s.push(SUBSECTION);
                s.push(20);
                s.extend(b"cpu/poll_control_msr");
                s.extend(1u32.to_be_bytes());
                s.extend(1u64.to_be_bytes());
            }
            footer(&mut s, 4 + cpu);
        }
        s.push(EOF);
        let u64_field = |name: &str| serde_json::json!({"name": name, "type": "uint64", "size": 8});
        let cpu = |instance: u32, sub: bool| {
            let mut fields = vec![serde_json::json!({"name": "env.regs", "array_len": 1, "type": "uint64", "size": 8})];
            fields.push(serde_json::json!({"name": "env.fpregs", "array_len": 1, "type": "struct", "size": 10,
                "struct": {"vmsd_name": "fpreg", "fields": [{"name": "tmp", "size": 10}]}}));
            for n in ["env.efer", "env.star", "env.lstar", "env.cstar", "env.fmask", "env.kernelgsbase"] {
                fields.push(u64_field(n));
            }
            let subsections = if sub {
                serde_json::json!([{"vmsd_name": "cpu/poll_control_msr", "version": 1, "fields": [u64_field("env.poll_control_msr")]}])
            } else {
                serde_json::json!([])
            };
            serde_json::json!({"name": "cpu", "instance_id": instance, "vmsd_name": "cpu", "version": 12,
                "fields": fields, "subsections": subsections})
        };
        let mut desc = serde_json::json!({"page_size": 4096, "devices": [
            {"name": "timer", "instance_id": 0, "vmsd_name": "timer", "version": 2,
             "fields": [u64_field("a"), u64_field("b"), u64_field("c")]},
            cpu(0, true), cpu(1, false)
        ]});
        tamper(&mut s, &mut desc);
        let json = desc.to_string();
        s.push(VMDESCRIPTION);
        s.extend((json.len() as u32).to_be_bytes());
        s.extend(json.as_bytes());
        s
    }

    #[test]
    fn the_msrs_of_every_cpu_are_read_from_their_sections() {
        let msrs = cpu_msrs(&stream([0xffff_ffff_8120_0000, 0xffff_ffff_c012_3450], |_, _| {})).unwrap();
        assert_eq!(msrs.len(), 2);
        assert_eq!((msrs[0].cpu, msrs[0].lstar, msrs[0].efer), (0, 0xffff_ffff_8120_0000, 0xd01));
        assert_eq!((msrs[1].cpu, msrs[1].lstar, msrs[1].fmask), (1, 0xffff_ffff_c012_3450, 0x47700));
        assert_eq!(msrs[1].star, 0x0023_0010_0000_0000);
    }

    #[test]
    fn a_description_that_disagrees_with_the_stream_is_an_error_not_a_guess() {
        // A field one byte longer: the cpu section no longer ends at its footer.
        let longer = stream([1, 2], |_, desc| desc["devices"][1]["fields"][0]["size"] = 9.into());
        assert!(matches!(cpu_msrs(&longer), Err(StateError::Malformed { .. })), "{:?}", cpu_msrs(&longer));
        // A device the stream does not have.
        let renamed = stream([1, 2], |_, desc| desc["devices"][0]["name"] = "hpet".into());
        assert!(matches!(cpu_msrs(&renamed), Err(StateError::Malformed { .. })));
        // Absurd sizes and nesting are refused while the description is read.
        let huge = stream([1, 2], |_, desc| desc["devices"][0]["fields"][0]["array_len"] = u64::MAX.into());
        assert!(matches!(cpu_msrs(&huge), Err(StateError::BadDescription(_))));
        let mut deep = serde_json::json!({"vmsd_name": "x", "fields": []});
        for _ in 0..40 {
            deep = serde_json::json!({"vmsd_name": "x", "fields": [], "subsections": [deep]});
        }
        let nested = stream([1, 2], move |_, desc| desc["devices"][0]["subsections"] = serde_json::json!([deep]));
        assert!(matches!(cpu_msrs(&nested), Err(StateError::BadDescription(_))));
    }

    #[test]
    fn truncated_garbled_and_foreign_streams_are_errors() {
        let good = stream([1, 2], |_, _| {});
        // Every truncation ends in an error (most lose the description), never a panic.
        for cut in (0..good.len()).step_by(7) {
            assert!(cpu_msrs(&good[..cut]).is_err(), "cut at {cut}");
        }
        // Every single-byte corruption of the framing is an error or, where it only hits
        // data, still two cpus: never a panic.
        let desc_at = good.len() - good.iter().rev().position(|&b| b == VMDESCRIPTION).unwrap() - 1;
        for at in 0..desc_at {
            let mut bad = good.clone();
            bad[at] ^= 0x5a;
            if let Ok(msrs) = cpu_msrs(&bad) {
                assert_eq!(msrs.len(), 2, "byte {at}");
            }
        }
        let compressed = stream([1, 2], |s, _| {
            // A compressed page where the video RAM page was.
            let at = s.windows(8).position(|w| w == b"vga.vram").unwrap();
            let at = s[at + 8..].windows(8).position(|w| w == RAM_FLAG_PAGE.to_be_bytes()).unwrap() + at + 8;
            s[at..at + 8].copy_from_slice(&0x100u64.to_be_bytes());
        });
        assert!(matches!(cpu_msrs(&compressed), Err(StateError::Unsupported(_))), "{:?}", cpu_msrs(&compressed));
        assert_eq!(cpu_msrs(b"not a stream at all"), Err(StateError::NoDescription));
        assert!(matches!(cpu_msrs(&vec![0u8; MAX_STREAM + 1]), Err(StateError::TooLong(_))));
    }
}
