//! bzImages: loaded whole for the kernel's own decompressor ([`load_compressed`]), or
//! taken apart by the vmm ([`load_decompressed`]), which reads the setup header (boot
//! protocol 2.08 or later) and the compressed payload it points at itself.
//!
//! Layout: the real-mode setup code is `setup_sects + 1` sectors of 512 bytes (0 meaning
//! 4); the protected-mode code follows, and the payload lies `payload_offset` bytes into
//! it, `payload_length` bytes long.

use std::fs::File;
use std::io::{Cursor, Read, Seek};
use std::path::Path;

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{self, Elf, KernelLoader};
use vm_memory::{ByteValued, GuestAddress};

use super::elf::{check_segments_fit, elf_entry, scan_elf_program_headers, ElfFacts, SpeculaNotes, ELF_MAGIC};
use super::{decompress, loader_error, BootError, LoadedKernel, MAX_DECOMPRESSED_KERNEL};
use crate::arch::x86_64::layout::HIMEM_START;
use crate::arch::x86_64::regs::BootProtocol;
use crate::memory::GuestRam;

/// The setup header's offset in the image.
const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// "HdrS", the setup header magic.
pub const HDRS_MAGIC: u32 = 0x5372_6448;
/// Boot protocol 2.08 added `payload_offset` and `payload_length`.
const MIN_PAYLOAD_PROTOCOL: u16 = 0x0208;
/// `setup_sects == 0` means 4, for very old kernels.
const DEFAULT_SETUP_SECTS: u8 = 4;
const SECTOR_SIZE: u64 = 512;
/// loadflags bit the kernel's decompressor sets when it randomized the load address.
const KASLR_FLAG: u8 = 1 << 1;

/// A setup header that cannot be used to find the payload.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SetupHeaderError {
    #[error("the image ({len} bytes) is too short for a setup header")]
    TooShort { len: usize },
    #[error("no HdrS magic at offset 0x202")]
    NoMagic,
    #[error("boot protocol {}.{:02} predates 2.08, which added the payload fields; use --kernel-decompress guest", .0 >> 8, .0 & 0xff)]
    ProtocolTooOld(u16),
    #[error("the payload ({length} bytes at offset {offset:#x}) lies outside the {len}-byte image")]
    PayloadOutOfBounds { offset: u64, length: u64, len: usize },
    #[error("the payload is empty (payload_length 0)")]
    EmptyPayload,
}

/// A bzImage's setup header and compressed payload.
pub struct BzImage<'a> {
    pub header: setup_header,
    pub payload: &'a [u8],
}

/// Finds the setup header and the payload in `image`, bounds-checked.
pub fn parse(image: &[u8]) -> Result<BzImage<'_>, SetupHeaderError> {
    let header = read_setup_header(image)?;
    let payload = payload(image, &header)?;
    Ok(BzImage { header, payload })
}

fn read_setup_header(image: &[u8]) -> Result<setup_header, SetupHeaderError> {
    let mut header = setup_header::default();
    let bytes = image
        .get(SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + std::mem::size_of::<setup_header>())
        .ok_or(SetupHeaderError::TooShort { len: image.len() })?;
    header.as_mut_slice().copy_from_slice(bytes);
    if header.header != HDRS_MAGIC {
        return Err(SetupHeaderError::NoMagic);
    }
    if header.version < MIN_PAYLOAD_PROTOCOL {
        return Err(SetupHeaderError::ProtocolTooOld(header.version));
    }
    Ok(header)
}

/// The offset of the protected-mode code, which the payload offset is relative to.
fn protected_mode_offset(header: &setup_header) -> u64 {
    let sects = match header.setup_sects {
        0 => DEFAULT_SETUP_SECTS,
        n => n,
    };
    (u64::from(sects) + 1) * SECTOR_SIZE
}

fn payload<'a>(image: &'a [u8], header: &setup_header) -> Result<&'a [u8], SetupHeaderError> {
    let offset = protected_mode_offset(header) + u64::from(header.payload_offset);
    let length = u64::from(header.payload_length);
    if length == 0 {
        return Err(SetupHeaderError::EmptyPayload);
    }
    let out_of_bounds = SetupHeaderError::PayloadOutOfBounds { offset, length, len: image.len() };
    let end = usize::try_from(offset + length).map_err(|_| out_of_bounds.clone())?;
    image.get(offset as usize..end).ok_or(out_of_bounds)
}

/// The setup header as the zero page should carry it when the vmm enters the
/// uncompressed kernel at its link address: no decompressor ran, so nothing was
/// randomized (KASLR_FLAG clear).
pub fn header_for_direct_entry(mut header: setup_header) -> setup_header {
    header.loadflags &= !KASLR_FLAG;
    header
}

/// xloadflags bit: the kernel has a 64-bit entry point at load address + 0x200.
const XLF_KERNEL_64: u16 = 1;
/// Offset of the 64-bit entry point in a bzImage's protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// A bzImage whose compressed kernel is entered: the guest runs its decompressor.
pub(super) fn load_compressed(ram: &GuestRam, kernel: &mut File, path: &Path) -> Result<LoadedKernel, BootError> {
    let result = loader::BzImage::load(ram.memory(), None, kernel, Some(GuestAddress(HIMEM_START)))
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
pub(super) fn load_decompressed(ram: &GuestRam, kernel: &mut File, path: &Path) -> Result<LoadedKernel, BootError> {
    let image = read_bounded_image(kernel, path)?;
    let bz = parse(&image).map_err(|e| BootError::SetupHeader { path: path.to_path_buf(), source: e })?;
    if bz.header.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::No64BitEntry { path: path.to_path_buf() });
    }
    let limit = MAX_DECOMPRESSED_KERNEL.min(ram.size()) as usize;
    let (codec, vmlinux) = decompress::decompress(bz.payload, limit)
        .map_err(|e| BootError::Decompress { path: path.to_path_buf(), source: e })?;
    let header = header_for_direct_entry(bz.header);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal bzImage: `setup_sects` sectors of setup, then `pm` bytes of protected-mode
    /// code with the payload at `payload_offset`.
    fn image(setup_sects: u8, version: u16, payload_offset: u32, payload: &[u8]) -> Vec<u8> {
        let pm_start = (u64::from(if setup_sects == 0 { 4 } else { setup_sects }) + 1) * 512;
        let mut img = vec![0u8; pm_start as usize + payload_offset as usize];
        img[0x1f1] = setup_sects;
        img[0x202..0x206].copy_from_slice(&HDRS_MAGIC.to_le_bytes());
        img[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        img[0x248..0x24c].copy_from_slice(&payload_offset.to_le_bytes());
        img[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        img.extend_from_slice(payload);
        img
    }

    #[test]
    fn the_payload_is_found_after_the_setup_sectors() {
        let img = image(39, 0x020f, 0x2cc, b"\x28\xb5\x2f\xfdpayload");
        let bz = parse(&img).unwrap();
        assert_eq!(bz.payload, b"\x28\xb5\x2f\xfdpayload");
        assert_eq!({ bz.header.setup_sects }, 39);
        // setup_sects 0 means 4.
        let img = image(0, 0x0208, 16, b"abc");
        assert_eq!(parse(&img).unwrap().payload, b"abc");
    }

    #[test]
    fn bad_headers_are_named() {
        assert_eq!(parse(&[0u8; 100]).err(), Some(SetupHeaderError::TooShort { len: 100 }));
        let mut img = image(4, 0x020f, 0, b"x");
        img[0x202] = b'X';
        assert_eq!(parse(&img).err(), Some(SetupHeaderError::NoMagic));
        let err = parse(&image(4, 0x0207, 0, b"x")).err().unwrap();
        assert_eq!(err, SetupHeaderError::ProtocolTooOld(0x0207));
        assert!(err.to_string().contains("2.07"), "{err}");
        assert_eq!(parse(&image(4, 0x020f, 0, b"")).err(), Some(SetupHeaderError::EmptyPayload));
    }

    #[test]
    fn payload_fields_pointing_outside_the_image_are_refused() {
        let mut img = image(4, 0x020f, 0, b"payload");
        img[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(parse(&img), Err(SetupHeaderError::PayloadOutOfBounds { .. })));
        let mut img = image(4, 0x020f, 0, b"payload");
        img[0x248..0x24c].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(parse(&img), Err(SetupHeaderError::PayloadOutOfBounds { .. })));
        img[0x1f1] = 0xff;
        assert!(matches!(parse(&img), Err(SetupHeaderError::PayloadOutOfBounds { .. })));
    }

    #[test]
    fn direct_entry_clears_the_kaslr_flag_only() {
        let header = setup_header { loadflags: 0x83, ..Default::default() };
        assert_eq!({ header_for_direct_entry(header).loadflags }, 0x81);
    }
}
