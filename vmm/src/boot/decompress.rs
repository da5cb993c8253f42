//! Decompressing a bzImage's payload (the compressed `vmlinux`) in the vmm, so that the
//! guest enters the uncompressed kernel instead of running its own decompressor.
//!
//! The kernel's build compresses `vmlinux.bin` (plus relocations) with one of gzip, xz
//! (with the x86 BCJ filter), zstd, lz4 (the *legacy* frame format), bzip2, lzma or lzo,
//! and appends the uncompressed size as a little-endian u32. The codec is told by its
//! magic bytes; the appended size is only a capacity hint, never trusted. Every path is
//! bounded by a caller-given output limit, and a truncated or corrupt payload is an
//! error, never a panic.

use std::io::Read;

/// gzip member magic.
const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
/// xz stream magic.
const XZ_MAGIC: &[u8] = &[0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00];
/// zstd frame magic (0xFD2FB528, little-endian).
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];
/// lz4 legacy frame magic (0x184C2102, little-endian), as `lz4 -l` writes it.
const LZ4_LEGACY_MAGIC: u32 = 0x184c_2102;
/// bzip2 stream magic ("BZh").
const BZIP2_MAGIC: &[u8] = b"BZh";
/// lzma-alone header: the properties byte the kernel's `lzma -9` writes, then the dictionary size.
const LZMA_MAGIC: &[u8] = &[0x5d, 0x00, 0x00];
/// lzop file magic.
const LZO_MAGIC: &[u8] = &[0x89, 0x4c, 0x5a, 0x4f, 0x00];
/// Uncompressed size of one lz4 legacy block (the last one may be shorter).
pub const LZ4_LEGACY_BLOCK_MAX: usize = 8 << 20;
/// LZ4_compressBound(LZ4_LEGACY_BLOCK_MAX): no valid block's compressed size exceeds it.
const LZ4_LEGACY_COMPRESSED_MAX: usize = LZ4_LEGACY_BLOCK_MAX + LZ4_LEGACY_BLOCK_MAX / 255 + 16;
/// xz decoders may allocate at most this much (KiB) for one block's dictionary.
const XZ_MEM_LIMIT_KIB: u32 = 256 << 10;

/// A payload compression, as told by its magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Gzip,
    Xz,
    Zstd,
    Lz4Legacy,
    Bzip2,
    Lzma,
    Lzo,
}

impl Codec {
    /// The name the kernel's `CONFIG_KERNEL_*` options use.
    pub fn name(self) -> &'static str {
        match self {
            Codec::Gzip => "gzip",
            Codec::Xz => "xz",
            Codec::Zstd => "zstd",
            Codec::Lz4Legacy => "lz4",
            Codec::Bzip2 => "bzip2",
            Codec::Lzma => "lzma",
            Codec::Lzo => "lzo",
        }
    }

    /// Whether the vmm can decompress this codec.
    pub fn supported(self) -> bool {
        matches!(self, Codec::Gzip | Codec::Xz | Codec::Zstd | Codec::Lz4Legacy)
    }
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a payload could not be decompressed.
#[derive(Debug, thiserror::Error)]
pub enum DecompressError {
    #[error("the payload is empty")]
    Empty,
    #[error("the payload starts with {magic}, the magic of no known kernel compression")]
    UnknownCodec { magic: String },
    #[error("unsupported compression {0}: the vmm decompresses gzip, xz, zstd and lz4 (use --kernel-decompress guest to run the kernel's own decompressor)")]
    Unsupported(Codec),
    #[error("the {codec} payload decompresses to more than {limit} bytes (the bound is the smaller of 512 MiB and guest RAM)")]
    TooLarge { codec: Codec, limit: usize },
    #[error("the {codec} payload declares {declared} decompressed bytes, more than the {limit}-byte bound (the smaller of 512 MiB and guest RAM)")]
    DeclaredTooLarge { codec: Codec, declared: u64, limit: usize },
    #[error("the {codec} payload is truncated or corrupt")]
    Corrupt {
        codec: Codec,
        #[source]
        source: std::io::Error,
    },
    #[error("the {codec} payload ends before its end (truncated)")]
    Truncated { codec: Codec },
    #[error("the {codec} payload decompresses to nothing")]
    EmptyOutput { codec: Codec },
    #[error("the zstd payload declares {declared} decompressed bytes but holds {got}")]
    ZstdSizeMismatch { declared: u64, got: usize },
    #[error("the zstd payload's checksum {stored:#010x} does not match its contents ({computed:#010x})")]
    ZstdChecksum { stored: u32, computed: u32 },
    #[error("lz4 block header at payload offset {offset} is cut short ({remaining} bytes left)")]
    Lz4TruncatedHeader { offset: usize, remaining: usize },
    #[error("lz4 block at payload offset {offset} declares {declared} compressed bytes, more than the {max} a legacy block can have")]
    Lz4BlockTooBig { offset: usize, declared: usize, max: usize },
    #[error("lz4 block at payload offset {offset} declares {declared} compressed bytes but only {remaining} remain (truncated)")]
    Lz4TruncatedBlock { offset: usize, declared: usize, remaining: usize },
    #[error("lz4 block at payload offset {offset} is corrupt")]
    Lz4Block {
        offset: usize,
        #[source]
        source: lz4_flex::block::DecompressError,
    },
}

/// Tells the codec from the payload's first bytes.
pub fn detect(payload: &[u8]) -> Result<Codec, DecompressError> {
    if payload.is_empty() {
        return Err(DecompressError::Empty);
    }
    let magics: [(&[u8], Codec); 6] = [
        (GZIP_MAGIC, Codec::Gzip),
        (XZ_MAGIC, Codec::Xz),
        (ZSTD_MAGIC, Codec::Zstd),
        (BZIP2_MAGIC, Codec::Bzip2),
        (LZMA_MAGIC, Codec::Lzma),
        (LZO_MAGIC, Codec::Lzo),
    ];
    if let Some((_, codec)) = magics.iter().find(|(magic, _)| payload.starts_with(magic)) {
        return Ok(*codec);
    }
    if read_u32(payload, 0) == Some(LZ4_LEGACY_MAGIC) {
        return Ok(Codec::Lz4Legacy);
    }
    let magic = payload.iter().take(6).map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ");
    Err(DecompressError::UnknownCodec { magic })
}

/// Decompresses a bzImage payload into at most `limit` bytes; returns the codec and the
/// uncompressed image.
pub fn decompress(payload: &[u8], limit: usize) -> Result<(Codec, Vec<u8>), DecompressError> {
    let codec = detect(payload)?;
    let hint = size_hint(payload, limit);
    let out = match codec {
        Codec::Gzip => read_bounded(codec, flate2::read::GzDecoder::new(payload), limit, hint)?,
        Codec::Xz => read_bounded(codec, xz_reader(payload), limit, hint)?,
        Codec::Zstd => decompress_zstd(payload, limit, hint)?,
        Codec::Lz4Legacy => decompress_lz4_legacy(payload, limit, hint)?,
        unsupported => return Err(DecompressError::Unsupported(unsupported)),
    };
    if out.is_empty() {
        return Err(DecompressError::EmptyOutput { codec });
    }
    Ok((codec, out))
}

/// The uncompressed size the kernel's build appends to the payload, as a capacity hint
/// only: capped at `limit`, and never used to decide what is valid.
fn size_hint(payload: &[u8], limit: usize) -> usize {
    let tail = payload.len().saturating_sub(4);
    read_u32(payload, tail).map_or(0, |size| (size as usize).min(limit))
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let word = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(word.try_into().ok()?))
}

/// Reads `reader` to its end into at most `limit` bytes.
fn read_bounded(codec: Codec, reader: impl Read, limit: usize, hint: usize) -> Result<Vec<u8>, DecompressError> {
    let mut out = Vec::with_capacity(hint);
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    reader.take(cap).read_to_end(&mut out).map_err(|source| DecompressError::Corrupt { codec, source })?;
    if out.len() > limit {
        return Err(DecompressError::TooLarge { codec, limit });
    }
    Ok(out)
}

/// One xz stream (the kernel's build writes one, with the x86 BCJ filter and CRC32); the
/// appended size after it is not read.
fn xz_reader(payload: &[u8]) -> impl Read + '_ {
    lzma_rust2::XzReader::new_mem_limit(payload, false, XZ_MEM_LIMIT_KIB)
}

/// One zstd frame; its declared content size (when present) and checksum (when present)
/// are checked.
fn decompress_zstd(payload: &[u8], limit: usize, hint: usize) -> Result<Vec<u8>, DecompressError> {
    let codec = Codec::Zstd;
    let corrupt = |e: ruzstd::decoding::errors::FrameDecoderError| DecompressError::Corrupt {
        codec,
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    };
    let mut decoder = ruzstd::decoding::StreamingDecoder::new(payload).map_err(corrupt)?;
    let declared = decoder.decoder.content_size();
    if declared > limit as u64 {
        return Err(DecompressError::DeclaredTooLarge { codec, declared, limit });
    }
    let out = read_bounded(codec, &mut decoder, limit, hint)?;
    let frame = &decoder.decoder;
    if !frame.is_finished() {
        return Err(DecompressError::Truncated { codec });
    }
    if declared != 0 && declared != out.len() as u64 {
        return Err(DecompressError::ZstdSizeMismatch { declared, got: out.len() });
    }
    if let (Some(stored), Some(computed)) = (frame.get_checksum_from_data(), frame.get_calculated_checksum()) {
        if stored != computed {
            return Err(DecompressError::ZstdChecksum { stored, computed });
        }
    }
    Ok(out)
}

/// The lz4 legacy frame: the magic, then blocks of `[u32 LE compressed size][block]`,
/// each up to 8 MiB uncompressed; a further magic may start a concatenated frame. The
/// format has no end marker and no checksum, so the size the kernel's build appends is
/// required as the last u32 and must equal the bytes decompressed: a payload cut at a
/// block boundary is then an error rather than a shorter kernel.
fn decompress_lz4_legacy(payload: &[u8], limit: usize, hint: usize) -> Result<Vec<u8>, DecompressError> {
    let codec = Codec::Lz4Legacy;
    let mut out = Vec::with_capacity(hint);
    let mut block = vec![0u8; LZ4_LEGACY_BLOCK_MAX];
    let mut at = 4;
    while at < payload.len() {
        let remaining = payload.len() - at;
        let word = read_u32(payload, at).ok_or(DecompressError::Lz4TruncatedHeader { offset: at, remaining })?;
        if word == LZ4_LEGACY_MAGIC {
            at += 4;
            continue;
        }
        if remaining == 4 && !out.is_empty() && word as usize == out.len() {
            return Ok(out);
        }
        let declared = word as usize;
        let n = decompress_lz4_block(payload, at, declared, &mut block)?;
        if out.len() + n > limit {
            return Err(DecompressError::TooLarge { codec, limit });
        }
        out.extend_from_slice(&block[..n]);
        at += 4 + declared;
    }
    if out.is_empty() {
        return Err(DecompressError::EmptyOutput { codec });
    }
    Err(DecompressError::Truncated { codec })
}

/// Decompresses the lz4 block of `declared` compressed bytes whose header is at
/// `payload[at..]` into `block`; returns its uncompressed length.
fn decompress_lz4_block(
    payload: &[u8],
    at: usize,
    declared: usize,
    block: &mut [u8],
) -> Result<usize, DecompressError> {
    let data_start = at + 4;
    let remaining = payload.len().saturating_sub(data_start);
    if declared == 0 || declared > LZ4_LEGACY_COMPRESSED_MAX {
        return Err(DecompressError::Lz4BlockTooBig { offset: at, declared, max: LZ4_LEGACY_COMPRESSED_MAX });
    }
    if declared > remaining {
        return Err(DecompressError::Lz4TruncatedBlock { offset: at, declared, remaining });
    }
    lz4_flex::block::decompress_into(&payload[data_start..data_start + declared], block)
        .map_err(|source| DecompressError::Lz4Block { offset: at, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const LIMIT: usize = 64 << 20;

    /// Compressible, not trivial: a repeating text with a counter.
    fn sample(len: usize) -> Vec<u8> {
        (0..len).map(|i| b"Linux version 6.12 (specula)\n"[i % 29] ^ ((i / 4096) as u8 & 3)).collect()
    }

    /// What the kernel's build appends after the compressed data.
    fn with_size(mut payload: Vec<u8>, size: usize) -> Vec<u8> {
        payload.extend_from_slice(&(size as u32).to_le_bytes());
        payload
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(data).unwrap();
        with_size(enc.finish().unwrap(), data.len())
    }

    fn xz(data: &[u8]) -> Vec<u8> {
        let mut options = lzma_rust2::XzOptions::with_preset(1);
        options.set_check_sum_type(lzma_rust2::CheckType::Crc32);
        options.prepend_pre_filter(lzma_rust2::FilterType::BcjX86, 0);
        let mut enc = lzma_rust2::XzWriter::new(Vec::new(), options).unwrap();
        enc.write_all(data).unwrap();
        with_size(enc.finish().unwrap(), data.len())
    }

    fn zstd(data: &[u8]) -> Vec<u8> {
        let frame = ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest);
        with_size(frame, data.len())
    }

    /// `lz4 -l` framing around lz4_flex blocks of `block_len` uncompressed bytes.
    fn lz4_legacy(data: &[u8], block_len: usize) -> Vec<u8> {
        let mut out = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for chunk in data.chunks(block_len) {
            let block = lz4_flex::block::compress(chunk);
            out.extend_from_slice(&(block.len() as u32).to_le_bytes());
            out.extend_from_slice(&block);
        }
        with_size(out, data.len())
    }

    fn all_codecs(data: &[u8]) -> [(Codec, Vec<u8>); 4] {
        [
            (Codec::Gzip, gzip(data)),
            (Codec::Xz, xz(data)),
            (Codec::Zstd, zstd(data)),
            (Codec::Lz4Legacy, lz4_legacy(data, 64 << 10)),
        ]
    }

    #[test]
    fn every_codec_round_trips_with_the_appended_size() {
        let data = sample(300_000);
        for (codec, payload) in all_codecs(&data) {
            assert_eq!(detect(&payload).unwrap(), codec);
            let (got_codec, out) = decompress(&payload, LIMIT).unwrap_or_else(|e| panic!("{codec}: {e}"));
            assert_eq!(got_codec, codec);
            assert!(out == data, "{codec} round trip");
        }
    }

    #[test]
    fn output_beyond_the_limit_is_refused() {
        let data = sample(200_000);
        for (codec, payload) in all_codecs(&data) {
            let err = decompress(&payload, 100_000).unwrap_err();
            assert!(
                matches!(err, DecompressError::TooLarge { .. } | DecompressError::DeclaredTooLarge { .. }),
                "{codec}: {err}"
            );
        }
        // Exactly at the limit is fine.
        assert_eq!(decompress(&gzip(&data), data.len()).unwrap().1.len(), data.len());
    }

    #[test]
    fn a_lying_appended_size_is_only_a_hint() {
        let data = sample(50_000);
        let mut payload = zstd(&data);
        let n = payload.len();
        payload[n - 4..].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decompress(&payload, LIMIT).unwrap().1, data);
        assert!(matches!(decompress(&payload, 1000), Err(DecompressError::TooLarge { .. })));
    }

    #[test]
    fn an_oversized_declared_content_size_is_refused_before_decoding() {
        // A hand-built zstd frame: single segment, 8-byte content size of 1 MiB, then one
        // empty raw last block.
        let mut frame = ZSTD_MAGIC.to_vec();
        frame.push(0xe0);
        frame.extend_from_slice(&(1u64 << 20).to_le_bytes());
        frame.extend_from_slice(&[0x01, 0x00, 0x00]);
        let err = decompress(&frame, 1000).unwrap_err();
        assert!(matches!(err, DecompressError::DeclaredTooLarge { declared: 0x10_0000, .. }), "{err}");
        // Within the bound, its one empty block falls short of what it declares.
        let err = decompress(&frame, LIMIT).unwrap_err();
        assert!(matches!(err, DecompressError::ZstdSizeMismatch { got: 0, .. }), "{err}");
    }

    #[test]
    fn truncated_payloads_are_errors_at_every_cut() {
        let data = sample(40_000);
        for (codec, payload) in all_codecs(&data) {
            // Cuts inside the compressed data, and the whole payload less its appended size.
            for cut in (1..payload.len() - 4).step_by(37).chain([payload.len() - 5]) {
                if let Ok((_, out)) = decompress(&payload[..cut], LIMIT) {
                    panic!("{codec} cut at {cut} of {} decoded to {} bytes", payload.len(), out.len());
                }
            }
        }
    }

    #[test]
    fn corrupt_payloads_are_errors() {
        let data = sample(100_000);
        // gzip, xz and zstd carry checksums: damage anywhere in the middle is caught.
        for (codec, payload) in all_codecs(&data).into_iter().take(3) {
            let mut bad = payload.clone();
            let mid = bad.len() / 2;
            for b in &mut bad[mid..mid + 64] {
                *b ^= 0x5a;
            }
            if let Ok((_, out)) = decompress(&bad, LIMIT) {
                panic!("{codec}: corrupt payload decoded to {} bytes", out.len());
            }
        }
        // lz4 legacy has no checksum (nor does the kernel's own decoder check one): damage
        // to its framing or sequences is caught, damage to literal bytes cannot be.
        let mut bad = lz4_legacy(&data, 16 << 10);
        bad[4..8].copy_from_slice(&3u32.to_le_bytes());
        assert!(decompress(&bad, LIMIT).is_err());
    }

    #[test]
    fn lz4_block_framing_is_checked() {
        let data = sample(100_000);
        let good = lz4_legacy(&data, 32 << 10);
        // A block header cut after two of its four bytes.
        let err = decompress(&good[..4 + 2], LIMIT).unwrap_err();
        assert!(matches!(err, DecompressError::Lz4TruncatedHeader { .. }), "{err}");
        // A block whose declared compressed size runs past the end.
        let first = read_u32(&good, 4).unwrap() as usize;
        let err = decompress(&good[..8 + first - 1], LIMIT).unwrap_err();
        assert!(matches!(err, DecompressError::Lz4TruncatedBlock { .. }), "{err}");
        // A declared compressed size larger than any legacy block.
        let mut huge = good.clone();
        huge[4..8].copy_from_slice(&(LZ4_LEGACY_COMPRESSED_MAX as u32 + 1).to_le_bytes());
        assert!(matches!(decompress(&huge, LIMIT), Err(DecompressError::Lz4BlockTooBig { .. })));
        // A block of more than 8 MiB uncompressed does not fit the block buffer.
        let big = vec![7u8; LZ4_LEGACY_BLOCK_MAX + 1];
        assert!(matches!(decompress(&lz4_legacy(&big, big.len()), LIMIT), Err(DecompressError::Lz4Block { .. })));
        // A wrong trailing size is not taken for the end marker.
        let mut wrong_tail = good.clone();
        let n = wrong_tail.len();
        wrong_tail[n - 4..].copy_from_slice(&12345u32.to_le_bytes());
        assert!(decompress(&wrong_tail, LIMIT).is_err());
        // Concatenated frames decode as one.
        let mut two = lz4_legacy(&data[..50_000], 16 << 10);
        two.truncate(two.len() - 4);
        two.extend_from_slice(&lz4_legacy(&data[50_000..], 16 << 10)[..]);
        let n = two.len();
        two[n - 4..].copy_from_slice(&(data.len() as u32).to_le_bytes());
        assert_eq!(decompress(&two, LIMIT).unwrap().1, data);
    }

    #[test]
    fn unknown_and_unsupported_codecs_are_named() {
        let err = decompress(b"BZh91AY&SY....", LIMIT).unwrap_err();
        assert!(err.to_string().contains("unsupported compression bzip2"), "{err}");
        let err = decompress(&[0x5d, 0, 0, 0x80, 0], LIMIT).unwrap_err();
        assert!(err.to_string().contains("unsupported compression lzma"), "{err}");
        let err = decompress(&[0x89, b'L', b'Z', b'O', 0, 0x0d], LIMIT).unwrap_err();
        assert!(err.to_string().contains("unsupported compression lzo"), "{err}");
        let err = decompress(&[0xde, 0xad, 0xbe, 0xef], LIMIT).unwrap_err();
        assert!(err.to_string().contains("de ad be ef"), "{err}");
        assert!(matches!(decompress(&[], LIMIT), Err(DecompressError::Empty)));
        // A magic alone, with nothing after it.
        for magic in [GZIP_MAGIC, XZ_MAGIC, ZSTD_MAGIC, &LZ4_LEGACY_MAGIC.to_le_bytes()] {
            assert!(decompress(magic, LIMIT).is_err(), "{magic:02x?}");
        }
    }
}
