//! Loading a kernel into guest RAM and writing what its boot protocol needs.
//!
//! ELF images with a PVH note (Specula's own guests, PVH-capable vmlinux) boot
//! through PVH; other ELF vmlinux images and bzImages boot through the Linux
//! 64-bit entry with a zero page. Both get the command line, the initramfs and
//! an e820 map of guest RAM.
//!
//! A bzImage's payload is decompressed by the vmm by default ([`decompress`]): the
//! resulting vmlinux is loaded at its link address and entered at its 64-bit entry,
//! with the zero page built from the bzImage's setup header. The kernel's own
//! decompressor is slow where guest kernel code is emulated (PVM: ~50 s for Debian's
//! 6.1) and may not run at all (Debian's 6.12 zstd decompressor uses BMI2, which KVM's
//! instruction emulator lacks); [`KernelDecompress::Guest`] still runs it when asked.

pub mod bzimage;
pub mod decompress;
pub mod page_tables;

use std::fs::File;
use std::io::{Cursor, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::{
    linux::LinuxBootConfigurator, pvh::PvhBootConfigurator, BootConfigurator, BootParams,
};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use linux_loader::loader::{self, BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress};

use crate::arch::x86_64::layout::*;
use crate::arch::x86_64::regs::BootProtocol;
use crate::memory::GuestRam;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// "HdrS" at offset 0x202 marks a Linux setup header.
const BZIMAGE_MAGIC: u32 = bzimage::HDRS_MAGIC;
/// Bound on a bzImage file read whole, and on its decompressed payload (which must also
/// fit in guest RAM).
pub const MAX_DECOMPRESSED_KERNEL: u64 = 512 << 20;
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
/// xloadflags bit: the kernel has a 64-bit entry point at load address + 0x200.
const XLF_KERNEL_64: u16 = 1;
/// Offset of the 64-bit entry point in a bzImage's protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Initramfs must stay below this so 32-bit-addressing kernels can read it.
const INITRAMFS_MAX_END: u64 = 0x3800_0000;
/// Bound on the PT_NOTE bytes scanned for the Specula note.
const MAX_NOTE_BYTES: u64 = 64 << 10;
/// Specula's ELF note: every vCPU may start at the PVH entry; desc = max vCPUs.
const SPECULA_NOTE_NAME: &[u8] = b"Specula\0";
const SPECULA_NOTE_SMP_ENTRY: u32 = 1;
/// Specula's ELF note: the vmm may build the identity page tables; desc = where (see
/// [`page_tables`]).
const SPECULA_NOTE_PAGE_TABLES: u32 = 2;

/// What to boot.
#[derive(Debug, Clone)]
pub struct BootSource {
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub cmdline: String,
    /// Extra memory-map entries (guest address, length, e820 type) beyond RAM, such as
    /// the inspector's mirror window.
    pub extra_memmap: Vec<(u64, u64, u32)>,
}

/// Who decompresses a bzImage's payload.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum KernelDecompress {
    /// The vmm decompresses it and enters the uncompressed kernel (`--kernel-decompress vmm`).
    #[default]
    Vmm,
    /// The kernel's own decompressor runs in the guest (`--kernel-decompress guest`).
    Guest,
}

impl std::str::FromStr for KernelDecompress {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "vmm" => Ok(KernelDecompress::Vmm),
            "guest" => Ok(KernelDecompress::Guest),
            _ => Err("expected vmm or guest".into()),
        }
    }
}

/// Where and how the vCPUs start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelEntry {
    pub entry: u64,
    pub protocol: BootProtocol,
    /// The image starts every vCPU at its entry (Specula SMP note); holds its vCPU limit.
    pub smp_entry_max_cpus: Option<u32>,
    /// Where the image takes page tables built by the vmm (Specula page-table note).
    pub page_tables: Option<page_tables::TableNote>,
}

/// Failures while loading a kernel.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot build the page tables of {path}")]
    PageTables {
        path: PathBuf,
        #[source]
        source: page_tables::PageTableError,
    },
    #[error("cannot open kernel image {path}")]
    OpenKernel {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read kernel image {path}")]
    ReadKernel {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel image {path} is empty")]
    EmptyKernel { path: PathBuf },
    #[error("kernel image {path} is neither an ELF nor a bzImage (no ELF magic, no HdrS setup header)")]
    UnknownFormat { path: PathBuf },
    #[error("kernel image {path} is truncated or corrupt: {detail}")]
    CorruptKernel { path: PathBuf, detail: String },
    #[error("kernel image {path} does not fit in {mem_mib} MiB of guest memory; give the VM more --memory")]
    KernelTooBig { path: PathBuf, mem_mib: u64 },
    #[error("bzImage {path} has no 64-bit entry point (xloadflags lacks XLF_KERNEL_64)")]
    No64BitEntry { path: PathBuf },
    #[error("bzImage {path} is {size} bytes, more than the {max}-byte bound")]
    BzImageTooBig { path: PathBuf, size: u64, max: u64 },
    #[error("bzImage {path} has an unusable setup header")]
    SetupHeader {
        path: PathBuf,
        #[source]
        source: bzimage::SetupHeaderError,
    },
    #[error("cannot decompress the payload of bzImage {path}")]
    Decompress {
        path: PathBuf,
        #[source]
        source: decompress::DecompressError,
    },
    #[error("the decompressed {codec} payload of bzImage {path} is not a vmlinux: {detail}")]
    BadVmlinux { path: PathBuf, codec: decompress::Codec, detail: String },
    #[error("cannot open initramfs {path}")]
    OpenInitramfs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read initramfs {path}")]
    ReadInitramfs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("initramfs {path} ({size} bytes) does not fit in guest memory between the kernel end {kernel_end:#x} and {limit:#x}; give the VM more --memory")]
    InitramfsTooBig { path: PathBuf, size: u64, kernel_end: u64, limit: u64 },
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    #[error("cannot write boot data into guest memory: {0}")]
    WriteBootData(String),
}

/// Loads `source` into `ram`, decompressing a bzImage in the vmm; returns the entry point
/// and boot protocol. `rsdp` is the address of the ACPI RSDP, handed to the kernel
/// through its boot protocol.
pub fn load(ram: &GuestRam, source: &BootSource, rsdp: Option<u64>) -> Result<KernelEntry, BootError> {
    load_with(ram, source, rsdp, KernelDecompress::default())
}

/// [`load`], with the choice of who decompresses a bzImage.
pub fn load_with(
    ram: &GuestRam,
    source: &BootSource,
    rsdp: Option<u64>,
    decompress: KernelDecompress,
) -> Result<KernelEntry, BootError> {
    let path = &source.kernel;
    let mut kernel = File::open(path).map_err(|e| BootError::OpenKernel { path: path.clone(), source: e })?;
    let loaded = match (detect_format(&mut kernel, path)?, decompress) {
        (KernelFormat::Elf, _) => load_elf(ram, &mut kernel, path)?,
        (KernelFormat::BzImage, KernelDecompress::Vmm) => load_bzimage_decompressed(ram, &mut kernel, path)?,
        (KernelFormat::BzImage, KernelDecompress::Guest) => load_bzimage_compressed(ram, &mut kernel, path)?,
    };

    let initramfs = match &source.initramfs {
        Some(initramfs_path) => Some(load_initramfs(ram, initramfs_path, loaded.kernel_end)?),
        None => None,
    };
    let cmdline = build_cmdline(&source.cmdline)?;
    loader::load_cmdline(ram.memory(), GuestAddress(CMDLINE_START), &cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    let cmdline_size = cmdline.as_cstring().map(|c| c.as_bytes_with_nul().len()).unwrap_or(1);

    let extra = &source.extra_memmap;
    match loaded.protocol {
        BootProtocol::Pvh => write_pvh_start_info(ram, initramfs, rsdp, extra)?,
        BootProtocol::Linux64 => write_zero_page(ram, loaded.header, initramfs, cmdline_size, rsdp, extra)?,
    }
    Ok(KernelEntry {
        entry: loaded.entry,
        protocol: loaded.protocol,
        smp_entry_max_cpus: loaded.notes.smp_entry_max_cpus,
        page_tables: loaded.notes.page_tables,
    })
}

/// A kernel in guest RAM, before the boot data around it is written.
struct LoadedKernel {
    entry: u64,
    protocol: BootProtocol,
    /// End of the kernel's memory (bss included); the initramfs goes above it.
    kernel_end: u64,
    /// The bzImage's setup header, for the zero page.
    header: Option<setup_header>,
    notes: SpeculaNotes,
}

/// An ELF image: PVH if it has the note, else the Linux 64-bit entry.
fn load_elf(ram: &GuestRam, kernel: &mut File, path: &Path) -> Result<LoadedKernel, BootError> {
    let result = Elf::load(ram.memory(), None, kernel, Some(GuestAddress(HIMEM_START)))
        .map_err(|e| loader_error(e, path, ram))?;
    let facts = scan_elf_program_headers(kernel, path)?;
    // linux-loader copies p_filesz; the zero-filled rest (bss) must fit in RAM too.
    check_segments_fit(ram, &facts, path)?;
    let (entry, protocol, notes) = match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(pvh_entry) => (pvh_entry.0, BootProtocol::Pvh, facts.notes),
        _ => (result.kernel_load.0, BootProtocol::Linux64, SpeculaNotes::default()),
    };
    Ok(LoadedKernel { entry, protocol, kernel_end: result.kernel_end, header: None, notes })
}

/// Every PT_LOAD segment, bss included, lies in guest RAM.
fn check_segments_fit(ram: &GuestRam, facts: &ElfFacts, path: &Path) -> Result<(), BootError> {
    if facts.load_segments.iter().any(|&(paddr, memsz)| !ram.contains_range(paddr, memsz)) {
        return Err(BootError::KernelTooBig { path: path.to_path_buf(), mem_mib: ram.size() >> 20 });
    }
    Ok(())
}

/// A bzImage whose compressed kernel is entered: the guest runs its decompressor.
fn load_bzimage_compressed(ram: &GuestRam, kernel: &mut File, path: &Path) -> Result<LoadedKernel, BootError> {
    let result = BzImage::load(ram.memory(), None, kernel, Some(GuestAddress(HIMEM_START)))
        .map_err(|e| loader_error(e, path, ram))?;
    let header = result
        .setup_header
        .ok_or_else(|| BootError::CorruptKernel { path: path.to_path_buf(), detail: "no setup header".into() })?;
    if header.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::No64BitEntry { path: path.to_path_buf() });
    }
    Ok(LoadedKernel {
        entry: result.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
        protocol: BootProtocol::Linux64,
        kernel_end: result.kernel_end,
        header: Some(header),
        notes: SpeculaNotes::default(),
    })
}

/// A bzImage whose payload the vmm decompresses: the vmlinux inside is loaded at its
/// link address (its PT_LOAD physical addresses; nothing to relocate, no KASLR) and
/// entered at its 64-bit entry, with the zero page built from the bzImage's setup header.
fn load_bzimage_decompressed(ram: &GuestRam, kernel: &mut File, path: &Path) -> Result<LoadedKernel, BootError> {
    let image = read_bounded_image(kernel, path)?;
    let bz = bzimage::parse(&image).map_err(|e| BootError::SetupHeader { path: path.to_path_buf(), source: e })?;
    if bz.header.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::No64BitEntry { path: path.to_path_buf() });
    }
    let limit = MAX_DECOMPRESSED_KERNEL.min(ram.size()) as usize;
    let (codec, vmlinux) = decompress::decompress(bz.payload, limit)
        .map_err(|e| BootError::Decompress { path: path.to_path_buf(), source: e })?;
    let header = bzimage::header_for_direct_entry(bz.header);
    drop(image);
    log::debug!("{}: {codec} payload decompressed to {} bytes", path.display(), vmlinux.len());

    let bad = |detail: &str| BootError::BadVmlinux { path: path.to_path_buf(), codec, detail: detail.to_string() };
    if !vmlinux.starts_with(ELF_MAGIC) {
        return Err(bad("no ELF magic"));
    }
    let mut reader = Cursor::new(vmlinux.as_slice());
    let facts = scan_elf_program_headers(&mut reader, path)?;
    check_segments_fit(ram, &facts, path)?;
    let entry = elf_entry(&vmlinux).ok_or_else(|| bad("short ELF header"))?;
    check_link_address(&facts, entry, &header).map_err(bad)?;
    let result = Elf::load(ram.memory(), None, &mut reader, Some(GuestAddress(HIMEM_START)))
        .map_err(|e| loader_error(e, path, ram))?;
    Ok(LoadedKernel {
        entry: result.kernel_load.0,
        protocol: BootProtocol::Linux64,
        kernel_end: result.kernel_end,
        header: Some(header),
        notes: SpeculaNotes::default(),
    })
}

/// Reads a whole kernel image of at most [`MAX_DECOMPRESSED_KERNEL`] bytes.
fn read_bounded_image(kernel: &mut File, path: &Path) -> Result<Vec<u8>, BootError> {
    let read_err = |e| BootError::ReadKernel { path: path.to_path_buf(), source: e };
    let size = kernel.metadata().map_err(read_err)?.len();
    if size > MAX_DECOMPRESSED_KERNEL {
        return Err(BootError::BzImageTooBig { path: path.to_path_buf(), size, max: MAX_DECOMPRESSED_KERNEL });
    }
    let mut image = Vec::with_capacity(size as usize);
    kernel.rewind().map_err(read_err)?;
    kernel.take(MAX_DECOMPRESSED_KERNEL).read_to_end(&mut image).map_err(read_err)?;
    Ok(image)
}

/// The ELF header's e_entry.
fn elf_entry(elf: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(elf.get(24..32)?.try_into().ok()?))
}

/// The vmlinux runs where it was linked: its entry lies in a loaded segment, and every
/// segment's physical address is at or above 1 MiB and below 4 GiB (a virtual address
/// there, such as 0xffffffff81000000, means the image is not a loadable vmlinux).
/// A kernel linked away from the bzImage's preferred address is logged, not refused:
/// loading it at its own link address needs no relocation either way.
fn check_link_address(facts: &ElfFacts, entry: u64, header: &setup_header) -> Result<(), &'static str> {
    if facts.load_segments.is_empty() {
        return Err("no PT_LOAD segment");
    }
    let physical = |paddr: u64| (HIMEM_START..1 << 32).contains(&paddr);
    if !facts.load_segments.iter().all(|&(paddr, _)| physical(paddr)) {
        return Err("a PT_LOAD physical address lies outside 1 MiB..4 GiB");
    }
    let in_segment = |&(paddr, memsz): &(u64, u64)| entry >= paddr && entry - paddr < memsz;
    if !facts.load_segments.iter().any(in_segment) {
        return Err("the entry point lies outside every PT_LOAD segment");
    }
    let lowest = facts.load_segments.iter().map(|&(paddr, _)| paddr).min().unwrap_or(0);
    let preferred = header.pref_address;
    if lowest != preferred {
        log::warn!("vmlinux is linked at {lowest:#x}, not the bzImage's preferred {preferred:#x}; loading it there");
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KernelFormat {
    Elf,
    BzImage,
}

/// Tells ELF from bzImage by their magic numbers.
fn detect_format(kernel: &mut File, path: &Path) -> Result<KernelFormat, BootError> {
    let read_err = |e| BootError::ReadKernel { path: path.to_path_buf(), source: e };
    let len = kernel.metadata().map_err(read_err)?.len();
    if len == 0 {
        return Err(BootError::EmptyKernel { path: path.to_path_buf() });
    }
    let mut head = [0u8; 0x206];
    let got = read_up_to(kernel, &mut head).map_err(read_err)?;
    kernel.rewind().map_err(read_err)?;
    if got >= 4 && &head[..4] == ELF_MAGIC {
        return Ok(KernelFormat::Elf);
    }
    if got >= 0x206 && u32::from_le_bytes(head[0x202..0x206].try_into().expect("4 bytes")) == BZIMAGE_MAGIC {
        return Ok(KernelFormat::BzImage);
    }
    Err(BootError::UnknownFormat { path: path.to_path_buf() })
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Maps linux-loader's errors onto what the user can act on.
fn loader_error(error: loader::Error, path: &Path, ram: &GuestRam) -> BootError {
    let too_big = || BootError::KernelTooBig { path: path.to_path_buf(), mem_mib: ram.size() >> 20 };
    match error {
        loader::Error::MemoryOverflow | loader::Error::InvalidKernelStartAddress => too_big(),
        loader::Error::Elf(loader::elf::Error::InvalidProgramHeaderAddress) => too_big(),
        other => BootError::CorruptKernel { path: path.to_path_buf(), detail: other.to_string() },
    }
}

/// What the loader needs from an ELF's program headers beyond what linux-loader reports.
struct ElfFacts {
    /// (physical address, size in memory) of every PT_LOAD segment.
    load_segments: Vec<(u64, u64)>,
    /// The Specula notes, if the image has them.
    notes: SpeculaNotes,
}

/// What an image's Specula notes ask for.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct SpeculaNotes {
    /// Every vCPU may start at the PVH entry; the image's vCPU limit.
    smp_entry_max_cpus: Option<u32>,
    /// The vmm may build the identity page tables, there.
    page_tables: Option<page_tables::TableNote>,
}

/// Reads the program headers: PT_LOAD extents and (bounded) PT_NOTE contents.
fn scan_elf_program_headers<R: Read + Seek>(kernel: &mut R, path: &Path) -> Result<ElfFacts, BootError> {
    let corrupt = |detail: &str| BootError::CorruptKernel { path: path.to_path_buf(), detail: detail.to_string() };
    let mut ehdr = [0u8; 64];
    kernel.rewind().map_err(|_| corrupt("cannot seek to the ELF header"))?;
    kernel.read_exact(&mut ehdr).map_err(|_| corrupt("short ELF header"))?;
    let phoff = u64::from_le_bytes(ehdr[32..40].try_into().expect("8 bytes"));
    let phentsize = u16::from_le_bytes([ehdr[54], ehdr[55]]) as u64;
    let phnum = u16::from_le_bytes([ehdr[56], ehdr[57]]) as u64;
    if phentsize < 56 {
        return Err(corrupt("program header entries are too small"));
    }
    let mut facts = ElfFacts { load_segments: Vec::new(), notes: SpeculaNotes::default() };
    for i in 0..phnum {
        let mut phdr = [0u8; 56];
        let at = phoff.checked_add(i * phentsize).ok_or_else(|| corrupt("program header offset overflows"))?;
        kernel.seek(SeekFrom::Start(at)).map_err(|_| corrupt("cannot seek to a program header"))?;
        kernel.read_exact(&mut phdr).map_err(|_| corrupt("short program header"))?;
        const PT_LOAD: u32 = 1;
        const PT_NOTE: u32 = 4;
        let p_type = u32::from_le_bytes(phdr[0..4].try_into().expect("4 bytes"));
        if p_type == PT_LOAD {
            let paddr = u64::from_le_bytes(phdr[24..32].try_into().expect("8 bytes"));
            let memsz = u64::from_le_bytes(phdr[40..48].try_into().expect("8 bytes"));
            facts.load_segments.push((paddr, memsz));
            continue;
        }
        if p_type != PT_NOTE || facts.notes != SpeculaNotes::default() {
            continue;
        }
        let offset = u64::from_le_bytes(phdr[8..16].try_into().expect("8 bytes"));
        let size = u64::from_le_bytes(phdr[32..40].try_into().expect("8 bytes")).min(MAX_NOTE_BYTES);
        let mut notes = vec![0u8; size as usize];
        kernel.seek(SeekFrom::Start(offset)).map_err(|_| corrupt("cannot seek to a note segment"))?;
        kernel.read_exact(&mut notes).map_err(|_| corrupt("short note segment"))?;
        facts.notes = parse_specula_notes(&notes);
    }
    Ok(facts)
}

/// Walks ELF notes in `notes`, bounded by its length; returns what the Specula notes ask
/// for (nothing past a truncated note).
fn parse_specula_notes(notes: &[u8]) -> SpeculaNotes {
    let align4 = |n: usize| n.checked_add(3).map(|v| v & !3);
    let mut found = SpeculaNotes::default();
    let mut at = 0usize;
    while at + 12 <= notes.len() {
        let word = |o: usize| u32::from_le_bytes(notes[o..o + 4].try_into().expect("4 bytes")) as usize;
        let (namesz, descsz, kind) = (word(at), word(at + 4), word(at + 8) as u32);
        let name_start = at + 12;
        let Some(desc_start) = align4(namesz).and_then(|n| name_start.checked_add(n)) else { break };
        let Some(next) = align4(descsz).and_then(|n| desc_start.checked_add(n)) else { break };
        if next > notes.len() {
            break;
        }
        if &notes[name_start..name_start + namesz] == SPECULA_NOTE_NAME {
            let desc = &notes[desc_start..desc_start + descsz];
            match kind {
                SPECULA_NOTE_SMP_ENTRY if descsz >= 4 => found.smp_entry_max_cpus = Some(word(desc_start) as u32),
                SPECULA_NOTE_PAGE_TABLES => found.page_tables = page_tables::TableNote::parse(desc),
                _ => {}
            }
        }
        at = next;
    }
    found
}

/// The PVH memory map the guest is given: [`e820_map`] and the caller's extra entries.
pub fn pvh_memmap(ram: &GuestRam, extra: &[(u64, u64, u32)]) -> Vec<(u64, u64, u32)> {
    e820_map(ram).into_iter().chain(extra.iter().copied()).collect()
}

/// Loads the initramfs page-aligned at the top of low RAM.
fn load_initramfs(ram: &GuestRam, path: &Path, kernel_end: u64) -> Result<(u64, u64), BootError> {
    let mut file = File::open(path).map_err(|e| BootError::OpenInitramfs { path: path.to_path_buf(), source: e })?;
    let size = file.metadata().map_err(|e| BootError::ReadInitramfs { path: path.to_path_buf(), source: e })?.len();
    let limit = ram.low_ram_end().min(INITRAMFS_MAX_END);
    let too_big = || BootError::InitramfsTooBig { path: path.to_path_buf(), size, kernel_end, limit };
    let start = limit.checked_sub(size).ok_or_else(too_big)? & !0xfff;
    if start < kernel_end.max(HIMEM_START) {
        return Err(too_big());
    }
    ram.memory().read_exact_volatile_from(GuestAddress(start), &mut file, size as usize).map_err(|e| {
        BootError::ReadInitramfs { path: path.to_path_buf(), source: std::io::Error::other(e.to_string()) }
    })?;
    Ok((start, size))
}

fn build_cmdline(text: &str) -> Result<Cmdline, BootError> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    if !text.is_empty() {
        cmdline
            .insert_str(text)
            .map_err(|e| BootError::Cmdline(format!("{e} (at most {} bytes)", CMDLINE_MAX_SIZE - 1)))?;
    }
    Ok(cmdline)
}

/// The e820 map of guest RAM: low RAM, the reserved EBDA/BIOS area, RAM from
/// 1 MiB to the MMIO gap, and RAM above 4 GiB.
pub fn e820_map(ram: &GuestRam) -> Vec<(u64, u64, u32)> {
    let mut map = vec![(0, EBDA_START, E820_RAM), (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED)];
    for (base, size) in crate::memory::split_around_mmio_gap(ram.size()) {
        let start = base.max(HIMEM_START);
        let end = base + size;
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map
}

fn write_pvh_start_info(
    ram: &GuestRam,
    initramfs: Option<(u64, u64)>,
    rsdp: Option<u64>,
    extra: &[(u64, u64, u32)],
) -> Result<(), BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = pvh_memmap(ram, extra)
        .into_iter()
        .map(|(addr, size, type_)| hvm_memmap_table_entry { addr, size, type_, reserved: 0 })
        .collect();
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        rsdp_paddr: rsdp.unwrap_or(0),
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
    if let Some((paddr, size)) = initramfs {
        start_info.nr_modules = 1;
        start_info.modlist_paddr = PVH_MODLIST_START;
        params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
        params.set_modules(&[hvm_modlist_entry { paddr, size, ..Default::default() }], GuestAddress(PVH_MODLIST_START));
    }
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    PvhBootConfigurator::write_bootparams(&params, ram.memory()).map_err(|e| BootError::WriteBootData(e.to_string()))
}

fn write_zero_page(
    ram: &GuestRam,
    header: Option<setup_header>,
    initramfs: Option<(u64, u64)>,
    cmdline_size: usize,
    rsdp: Option<u64>,
    extra: &[(u64, u64, u32)],
) -> Result<(), BootError> {
    let mut params = boot_params { acpi_rsdp_addr: rsdp.unwrap_or(0), ..Default::default() };
    if let Some(header) = header {
        params.hdr = header;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = BZIMAGE_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_size as u32;
    params.hdr.kernel_alignment = 0x0100_0000;
    if let Some((start, size)) = initramfs {
        params.hdr.ramdisk_image = start as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let mut map = e820_map(ram);
    map.extend_from_slice(extra);
    if map.len() > params.e820_table.len() {
        return Err(BootError::WriteBootData(format!("{} e820 entries exceed the zero page's table", map.len())));
    }
    for (slot, (addr, size, type_)) in params.e820_table.iter_mut().zip(&map) {
        slot.addr = *addr;
        slot.size = *size;
        slot.r#type = *type_;
    }
    params.e820_entries = map.len() as u8;
    let boot = BootParams::new(&params, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams(&boot, ram.memory()).map_err(|e| BootError::WriteBootData(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(name.len() as u32).to_le_bytes());
        v.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        v.extend_from_slice(&kind.to_le_bytes());
        v.extend_from_slice(name);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v.extend_from_slice(desc);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }

    #[test]
    fn specula_note_is_found_after_other_notes() {
        let mut notes = note(b"Xen\0", 18, &0x100000u32.to_le_bytes());
        notes.extend(note(SPECULA_NOTE_NAME, SPECULA_NOTE_SMP_ENTRY, &32u32.to_le_bytes()));
        assert_eq!(parse_specula_notes(&notes), SpeculaNotes { smp_entry_max_cpus: Some(32), page_tables: None });
        let desc: Vec<u8> =
            [0x10_1000u32, 0x10_2000, 0x10_3000, 0x20_0000, 0x10_1004].iter().flat_map(|w| w.to_le_bytes()).collect();
        notes.extend(note(SPECULA_NOTE_NAME, SPECULA_NOTE_PAGE_TABLES, &desc));
        let tables = parse_specula_notes(&notes).page_tables.expect("the page-table note");
        assert_eq!((tables.pml4, tables.pd_base, tables.mapped_gib), (0x10_2000, 0x20_0000, 0x10_1004));
    }

    #[test]
    fn truncated_or_hostile_notes_are_rejected_without_panicking() {
        let notes = note(SPECULA_NOTE_NAME, SPECULA_NOTE_SMP_ENTRY, &32u32.to_le_bytes());
        for cut in 0..notes.len() {
            assert_eq!(parse_specula_notes(&notes[..cut]), SpeculaNotes::default());
        }
        let mut huge = vec![0u8; 12];
        huge[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(parse_specula_notes(&huge), SpeculaNotes::default());
        // A page-table note too short for its five addresses asks for nothing.
        let short = note(SPECULA_NOTE_NAME, SPECULA_NOTE_PAGE_TABLES, &[0; 16]);
        assert_eq!(parse_specula_notes(&short), SpeculaNotes::default());
    }

    #[test]
    fn e820_reserves_the_bios_area_and_skips_the_mmio_gap() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let map = e820_map(&ram);
        assert_eq!(map[0], (0, EBDA_START, E820_RAM));
        assert_eq!(map[1].2, E820_RESERVED);
        assert_eq!(map[2], (HIMEM_START, (64 << 20) - HIMEM_START, E820_RAM));
    }

    #[test]
    fn overlong_cmdline_is_refused() {
        assert!(matches!(build_cmdline(&"x".repeat(CMDLINE_MAX_SIZE + 1)), Err(BootError::Cmdline(_))));
        assert!(build_cmdline("console=ttyS0").is_ok());
    }
}
