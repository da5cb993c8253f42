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
mod elf;
pub mod page_tables;
mod params;

use std::fs::File;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};

use linux_loader::loader;
use linux_loader::loader::bootparam::setup_header;
use specula_common::parse::{self, ParseError};
use vm_memory::GuestAddress;

use self::elf::SpeculaNotes;
use crate::arch::x86_64::layout::{CMDLINE_MAX_SIZE, CMDLINE_START};
use crate::arch::x86_64::regs::BootProtocol;
use crate::memory::GuestRam;

pub use params::{e820_map, pvh_memmap};

/// "HdrS" at offset 0x202 marks a Linux setup header.
const BZIMAGE_MAGIC: u32 = bzimage::HDRS_MAGIC;
/// Bound on a bzImage file read whole, and on its decompressed payload (which must also
/// fit in guest RAM).
pub const MAX_DECOMPRESSED_KERNEL: u64 = 512 << 20;

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
    type Err = ParseError;

    fn from_str(text: &str) -> Result<Self, ParseError> {
        parse::choice(text, &[("vmm", KernelDecompress::Vmm), ("guest", KernelDecompress::Guest)], "vmm or guest")
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
    #[error("invalid kernel command line (at most {} bytes)", CMDLINE_MAX_SIZE - 1)]
    Cmdline(#[source] linux_loader::cmdline::Error),
    #[error("cannot write the kernel command line into guest memory")]
    WriteCmdline(#[source] loader::Error),
    #[error("cannot write the {what} into guest memory")]
    WriteBootData {
        what: &'static str,
        #[source]
        source: linux_loader::configurator::Error,
    },
    #[error("{entries} e820 entries exceed the zero page's table of {max}")]
    TooManyE820Entries { entries: usize, max: usize },
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
        (KernelFormat::Elf, _) => elf::load_elf(ram, &mut kernel, path)?,
        (KernelFormat::BzImage, KernelDecompress::Vmm) => bzimage::load_decompressed(ram, &mut kernel, path)?,
        (KernelFormat::BzImage, KernelDecompress::Guest) => bzimage::load_compressed(ram, &mut kernel, path)?,
    };

    let initramfs = match &source.initramfs {
        Some(initramfs_path) => Some(params::load_initramfs(ram, initramfs_path, loaded.kernel_end)?),
        None => None,
    };
    let cmdline = params::build_cmdline(&source.cmdline)?;
    loader::load_cmdline(ram.memory(), GuestAddress(CMDLINE_START), &cmdline).map_err(BootError::WriteCmdline)?;
    let cmdline_size = cmdline.as_cstring().map(|c| c.as_bytes_with_nul().len()).unwrap_or(1);

    let extra = &source.extra_memmap;
    match loaded.protocol {
        BootProtocol::Pvh => params::write_pvh_start_info(ram, initramfs, rsdp, extra)?,
        BootProtocol::Linux64 => params::write_zero_page(ram, loaded.header, initramfs, cmdline_size, rsdp, extra)?,
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

/// The kinds of kernel image the loader takes.
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
    if got >= 4 && &head[..4] == elf::ELF_MAGIC {
        return Ok(KernelFormat::Elf);
    }
    if got >= 0x206 && u32::from_le_bytes(head[0x202..0x206].try_into().expect("4 bytes")) == BZIMAGE_MAGIC {
        return Ok(KernelFormat::BzImage);
    }
    Err(BootError::UnknownFormat { path: path.to_path_buf() })
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
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
