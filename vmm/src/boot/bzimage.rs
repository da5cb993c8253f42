//! The parts of a bzImage the vmm reads itself to boot it without the kernel's own
//! decompressor: the setup header (boot protocol 2.08 or later) and the compressed
//! payload it points at.
//!
//! Layout: the real-mode setup code is `setup_sects + 1` sectors of 512 bytes (0 meaning
//! 4); the protected-mode code follows, and the payload lies `payload_offset` bytes into
//! it, `payload_length` bytes long.

use linux_loader::loader::bootparam::setup_header;
use vm_memory::ByteValued;

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
