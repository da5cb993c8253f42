//! A bounded parser for BTF, the kernel's own type information
//! (CONFIG_DEBUG_INFO_BTF: the `.BTF` section between `__start_BTF` and
//! `__stop_BTF`), and lookups of struct members by name.
//!
//! Format (include/uapi/linux/btf.h): a header (magic 0xeb9f, version 1,
//! flags, hdr_len, then type_off/type_len and str_off/str_len relative to the
//! header's end); a type section of `struct btf_type` records (name_off, info
//! with vlen in bits 0..15, kind in 24..28 and kind_flag in 31, size_or_type),
//! each followed by kind-specific data; a string section of NUL-terminated
//! names. Type id 0 is `void`; the n-th record is id n. Every kind up to
//! ENUM64 (19) is understood; any other kind is an error, since its record
//! length would be unknown.
//!
//! Bounds: at most [`MAX_BTF_BYTES`] of blob and [`MAX_TYPES`] types; every
//! offset and length is checked against the blob; type chains (typedefs,
//! modifiers, arrays) are followed at most [`MAX_TYPE_DEPTH`] steps and
//! anonymous members at most [`MAX_ANON_DEPTH`] deep; sizes are computed with
//! checked arithmetic.

use alloc::string::String;
use alloc::vec::Vec;

use crate::Error;

/// Most bytes of a BTF blob (vmlinux's is ~5 MiB).
pub const MAX_BTF_BYTES: usize = 64 << 20;
/// Most types (vmlinux has ~130 000).
pub const MAX_TYPES: usize = 1 << 21;
/// Most typedef/modifier/array steps followed when resolving a type.
pub const MAX_TYPE_DEPTH: usize = 32;
/// Most levels of anonymous struct/union members searched for a member.
pub const MAX_ANON_DEPTH: usize = 8;
const HEADER_LEN: usize = 24;
const TYPE_LEN: usize = 12;

/// A BTF kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Int = 1,
    Ptr = 2,
    Array = 3,
    Struct = 4,
    Union = 5,
    Enum = 6,
    Fwd = 7,
    Typedef = 8,
    Volatile = 9,
    Const = 10,
    Restrict = 11,
    Func = 12,
    FuncProto = 13,
    Var = 14,
    Datasec = 15,
    Float = 16,
    DeclTag = 17,
    TypeTag = 18,
    Enum64 = 19,
}

impl Kind {
    fn from_u32(k: u32) -> Option<Kind> {
        use Kind::*;
        Some(match k {
            1 => Int,
            2 => Ptr,
            3 => Array,
            4 => Struct,
            5 => Union,
            6 => Enum,
            7 => Fwd,
            8 => Typedef,
            9 => Volatile,
            10 => Const,
            11 => Restrict,
            12 => Func,
            13 => FuncProto,
            14 => Var,
            15 => Datasec,
            16 => Float,
            17 => DeclTag,
            18 => TypeTag,
            19 => Enum64,
            _ => return None,
        })
    }

    /// Bytes of kind-specific data after the record, for `vlen` entries.
    fn extra_len(self, vlen: usize) -> usize {
        use Kind::*;
        match self {
            Int | Var | DeclTag => 4,
            Array => 12,
            Struct | Union | Datasec | Enum64 => 12 * vlen,
            Enum | FuncProto => 8 * vlen,
            Ptr | Fwd | Typedef | Volatile | Const | Restrict | Func | Float | TypeTag => 0,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Record {
    kind: Kind,
    name_off: u32,
    info: u32,
    size_or_type: u32,
    /// Offset of the kind-specific data in the blob.
    extra: u32,
}

/// A type as stored.
#[derive(Clone, Copy, Debug)]
pub struct Type<'a> {
    pub id: u32,
    pub kind: Kind,
    /// Empty for anonymous types.
    pub name: &'a str,
    /// `size` for INT, STRUCT, UNION, ENUM, ENUM64, FLOAT, DATASEC; `type` for
    /// PTR, TYPEDEF, modifiers, FUNC, FUNC_PROTO (return), VAR, DECL_TAG, TYPE_TAG.
    pub size_or_type: u32,
    /// Members, enumerators, parameters or variables.
    pub vlen: u16,
    pub kind_flag: bool,
}

/// A struct or union member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member<'a> {
    pub name: &'a str,
    pub type_id: u32,
    /// Offset in bits from the start of the enclosing struct.
    pub bit_offset: u32,
    /// Bit-field width; 0 when not a bit-field.
    pub bitfield_size: u32,
}

/// A member found by [`Btf::member`], with its offset from the outermost struct.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    /// Byte offset (of the containing storage unit for a bit-field).
    pub offset: u64,
    /// Offset in bits from the start of the outermost struct.
    pub bit_offset: u64,
    /// Bit-field width; 0 when not a bit-field.
    pub bitfield_size: u32,
    pub type_id: u32,
}

/// A parsed BTF blob.
pub struct Btf {
    data: Vec<u8>,
    strs: core::ops::Range<usize>,
    /// Record of type id `i + 1`.
    types: Vec<Record>,
}

fn rd_u32(d: &[u8], at: usize) -> Result<u32, Error> {
    d.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| Error::Btf(alloc::format!("read of 4 bytes at {at} past the end ({})", d.len())))
}

fn lookup_err(args: core::fmt::Arguments<'_>) -> Error {
    Error::BtfLookup(alloc::fmt::format(args))
}

impl Btf {
    /// Parses a blob (the bytes from `__start_BTF` to `__stop_BTF`).
    pub fn parse(data: Vec<u8>) -> Result<Self, Error> {
        if data.len() > MAX_BTF_BYTES {
            return Err(Error::TooLarge {
                what: "BTF blob bytes",
                value: data.len() as u64,
                max: MAX_BTF_BYTES as u64,
            });
        }
        if data.len() < HEADER_LEN {
            return Err(Error::Btf(alloc::format!("blob of {} bytes is shorter than a header", data.len())));
        }
        let magic = u16::from_le_bytes([data[0], data[1]]);
        if magic != 0xeb9f {
            return Err(Error::Btf(alloc::format!("bad magic {magic:#06x} (want 0xeb9f, little-endian)")));
        }
        if data[2] != 1 {
            return Err(Error::Btf(alloc::format!("version {} (want 1)", data[2])));
        }
        let hdr_len = rd_u32(&data, 4)? as usize;
        let [type_off, type_len, str_off, str_len] = [8, 12, 16, 20].map(|at| rd_u32(&data, at).map(|v| v as usize));
        let (type_off, type_len, str_off, str_len) = (type_off?, type_len?, str_off?, str_len?);
        if hdr_len < HEADER_LEN || hdr_len > data.len() {
            return Err(Error::Btf(alloc::format!("header length {hdr_len} outside 24..={}", data.len())));
        }
        let section = |off: usize, len: usize, what: &str| {
            let start = hdr_len.checked_add(off);
            let end = start.and_then(|s| s.checked_add(len));
            match (start, end) {
                (Some(s), Some(e)) if e <= data.len() => Ok(s..e),
                _ => Err(Error::Btf(alloc::format!(
                    "{what} section (offset {off}, length {len}) runs past the blob ({} bytes)",
                    data.len()
                ))),
            }
        };
        let types_range = section(type_off, type_len, "type")?;
        let strs = section(str_off, str_len, "string")?;
        if strs.is_empty() || data[strs.start] != 0 {
            return Err(Error::Btf("string section does not start with the empty string".into()));
        }
        let mut types = Vec::new();
        let mut pos = types_range.start;
        while pos < types_range.end {
            if types.len() == MAX_TYPES {
                return Err(Error::TooLarge {
                    what: "BTF types",
                    value: types.len() as u64 + 1,
                    max: MAX_TYPES as u64,
                });
            }
            if pos + TYPE_LEN > types_range.end {
                return Err(Error::Btf(alloc::format!("type {} at {pos} is cut off", types.len() + 1)));
            }
            let name_off = rd_u32(&data, pos)?;
            let info = rd_u32(&data, pos + 4)?;
            let size_or_type = rd_u32(&data, pos + 8)?;
            let kind = Kind::from_u32((info >> 24) & 0x1f).ok_or_else(|| {
                Error::Btf(alloc::format!("type {} has unknown kind {}", types.len() + 1, (info >> 24) & 0x1f))
            })?;
            let extra = pos + TYPE_LEN;
            let end = extra + kind.extra_len((info & 0xffff) as usize);
            if end > types_range.end {
                return Err(Error::Btf(alloc::format!(
                    "type {} ({kind:?}) runs past the type section",
                    types.len() + 1
                )));
            }
            types.push(Record { kind, name_off, info, size_or_type, extra: extra as u32 });
            pos = end;
        }
        Ok(Btf { data, strs, types })
    }

    /// Number of types (ids 1..=len).
    pub fn len(&self) -> usize {
        self.types.len()
    }

    pub fn is_empty(&self) -> bool {
        self.types.is_empty()
    }

    /// The string at `off` in the string section.
    pub fn string(&self, off: u32) -> Result<&str, Error> {
        let s = &self.data[self.strs.clone()];
        let rest = s
            .get(off as usize..)
            .ok_or_else(|| Error::Btf(alloc::format!("string offset {off} past the string section")))?;
        let len = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| Error::Btf(alloc::format!("string at {off} has no terminator")))?;
        core::str::from_utf8(&rest[..len]).map_err(|_| Error::Btf(alloc::format!("string at {off} is not UTF-8")))
    }

    fn record(&self, id: u32) -> Result<&Record, Error> {
        if id == 0 {
            return Err(lookup_err(format_args!("type 0 is void")));
        }
        self.types
            .get(id as usize - 1)
            .ok_or_else(|| Error::Btf(alloc::format!("type id {id} past the last ({})", self.types.len())))
    }

    /// The type with this id (1..=len).
    pub fn type_by_id(&self, id: u32) -> Result<Type<'_>, Error> {
        let r = self.record(id)?;
        Ok(Type {
            id,
            kind: r.kind,
            name: self.string(r.name_off)?,
            size_or_type: r.size_or_type,
            vlen: (r.info & 0xffff) as u16,
            kind_flag: r.info >> 31 != 0,
        })
    }

    fn extra_u32(&self, id: u32, index: usize) -> Result<u32, Error> {
        rd_u32(&self.data, self.record(id)?.extra as usize + 4 * index)
    }

    /// The first type of `kind` named `name` (a struct, a typedef, ...).
    pub fn find(&self, kind: Kind, name: &str) -> Result<u32, Error> {
        for (i, r) in self.types.iter().enumerate() {
            if r.kind == kind && self.string(r.name_off).is_ok_and(|n| n == name) {
                return Ok(i as u32 + 1);
            }
        }
        Err(lookup_err(format_args!("no {kind:?} named {name}")))
    }

    /// The struct (or, failing that, union) named `name`.
    pub fn struct_id(&self, name: &str) -> Result<u32, Error> {
        self.find(Kind::Struct, name)
            .or_else(|_| self.find(Kind::Union, name))
            .map_err(|_| lookup_err(format_args!("no struct or union named {name}")))
    }

    /// Follows typedefs and const/volatile/restrict/type-tag modifiers.
    pub fn resolve(&self, mut id: u32) -> Result<u32, Error> {
        for _ in 0..MAX_TYPE_DEPTH {
            if id == 0 {
                return Ok(0);
            }
            let r = self.record(id)?;
            match r.kind {
                Kind::Typedef | Kind::Volatile | Kind::Const | Kind::Restrict | Kind::TypeTag => id = r.size_or_type,
                _ => return Ok(id),
            }
        }
        Err(Error::Btf(alloc::format!("type chain from {id} longer than {MAX_TYPE_DEPTH} (a cycle?)")))
    }

    /// Size in bytes of a type (pointers are 8 bytes).
    pub fn size_of(&self, id: u32) -> Result<u64, Error> {
        let mut id = id;
        let mut mult: u64 = 1;
        for _ in 0..MAX_TYPE_DEPTH {
            let id2 = self.resolve(id)?;
            if id2 == 0 {
                return Err(lookup_err(format_args!("void has no size")));
            }
            let r = self.record(id2)?;
            let size = match r.kind {
                Kind::Int | Kind::Struct | Kind::Union | Kind::Enum | Kind::Enum64 | Kind::Float | Kind::Datasec => {
                    u64::from(r.size_or_type)
                }
                Kind::Ptr => 8,
                Kind::Array => {
                    let (elem, n) = self.array(id2)?;
                    mult = mult.checked_mul(u64::from(n)).ok_or_else(|| Error::Btf("array size overflows".into()))?;
                    id = elem;
                    continue;
                }
                k => return Err(lookup_err(format_args!("type {id2} ({k:?}) has no size"))),
            };
            return mult.checked_mul(size).ok_or_else(|| Error::Btf("type size overflows".into()));
        }
        Err(Error::Btf(alloc::format!("array nesting from type {id} deeper than {MAX_TYPE_DEPTH}")))
    }

    /// `(element type, number of elements)` of an ARRAY.
    pub fn array(&self, id: u32) -> Result<(u32, u32), Error> {
        let r = self.record(id)?;
        if r.kind != Kind::Array {
            return Err(lookup_err(format_args!("type {id} is {:?}, not an array", r.kind)));
        }
        Ok((self.extra_u32(id, 0)?, self.extra_u32(id, 2)?))
    }

    /// The members of a STRUCT or UNION.
    pub fn members(&self, id: u32) -> Result<Vec<Member<'_>>, Error> {
        let t = self.type_by_id(id)?;
        if !matches!(t.kind, Kind::Struct | Kind::Union) {
            return Err(lookup_err(format_args!("type {id} ({:?} {}) is not a struct or union", t.kind, t.name)));
        }
        let mut out = Vec::with_capacity(usize::from(t.vlen));
        for i in 0..usize::from(t.vlen) {
            let name = self.string(self.extra_u32(id, 3 * i)?)?;
            let type_id = self.extra_u32(id, 3 * i + 1)?;
            let off = self.extra_u32(id, 3 * i + 2)?;
            let (bit_offset, bitfield_size) = if t.kind_flag { (off & 0xff_ffff, off >> 24) } else { (off, 0) };
            out.push(Member { name, type_id, bit_offset, bitfield_size });
        }
        Ok(out)
    }

    /// Finds `name` among the members of struct/union `id`, descending into
    /// anonymous struct/union members; the offset is from the start of `id`.
    fn find_member(&self, id: u32, name: &str, depth: usize) -> Result<Option<Field>, Error> {
        if depth > MAX_ANON_DEPTH {
            return Err(Error::Btf(alloc::format!("anonymous members nested deeper than {MAX_ANON_DEPTH}")));
        }
        for m in self.members(id)? {
            if m.name == name {
                return Ok(Some(Field {
                    offset: u64::from(m.bit_offset / 8),
                    bit_offset: u64::from(m.bit_offset),
                    bitfield_size: m.bitfield_size,
                    type_id: m.type_id,
                }));
            }
            if m.name.is_empty() {
                let inner = self.resolve(m.type_id)?;
                if inner != 0 && matches!(self.record(inner)?.kind, Kind::Struct | Kind::Union) {
                    if let Some(f) = self.find_member(inner, name, depth + 1)? {
                        let bit_offset = f.bit_offset + u64::from(m.bit_offset);
                        return Ok(Some(Field { offset: bit_offset / 8, bit_offset, ..f }));
                    }
                }
            }
        }
        Ok(None)
    }

    /// The member at `path` (`tasks`, `core_layout.size`, `name.release`) of the
    /// struct named `struct_name`: each component is looked up in the previous
    /// one's type (typedefs and modifiers followed), anonymous members searched.
    pub fn member(&self, struct_name: &str, path: &str) -> Result<Field, Error> {
        let id = self.struct_id(struct_name)?;
        self.member_of(id, path).map_err(|e| match e {
            Error::BtfLookup(why) => lookup_err(format_args!("struct {struct_name}: {why}")),
            e => e,
        })
    }

    /// [`Btf::member`] from a struct/union type id.
    pub fn member_of(&self, id: u32, path: &str) -> Result<Field, Error> {
        let mut cur = self.resolve(id)?;
        let mut total: Option<Field> = None;
        for part in path.split('.') {
            if let Some(f) = total {
                cur = self.resolve(f.type_id)?;
            }
            if cur == 0 || !matches!(self.record(cur)?.kind, Kind::Struct | Kind::Union) {
                return Err(lookup_err(format_args!("{path}: cannot look up {part} in a non-struct")));
            }
            let f = self
                .find_member(cur, part, 0)?
                .ok_or_else(|| lookup_err(format_args!("no member {part} (in {path})")))?;
            let base = total.map_or(0, |t| t.bit_offset);
            let bit_offset = base + f.bit_offset;
            total = Some(Field { offset: bit_offset / 8, bit_offset, ..f });
        }
        total.ok_or_else(|| lookup_err(format_args!("empty member path")))
    }

    /// Whether struct `struct_name` has member `path`.
    pub fn has_member(&self, struct_name: &str, path: &str) -> bool {
        self.member(struct_name, path).is_ok()
    }

    /// The value of the enumerator `name` in any ENUM or ENUM64.
    pub fn enum_value(&self, name: &str) -> Result<i64, Error> {
        for (i, r) in self.types.iter().enumerate() {
            if let Some(v) = self.enumerators(i as u32 + 1, r)?.into_iter().find(|(n, _)| *n == name) {
                return Ok(v.1);
            }
        }
        Err(lookup_err(format_args!("no enumerator {name}")))
    }

    /// The name of `value` in the ENUM/ENUM64 type `id`.
    pub fn enum_name(&self, id: u32, value: i64) -> Result<Option<&str>, Error> {
        let id = self.resolve(id)?;
        let r = self.record(id)?;
        Ok(self.enumerators(id, r)?.into_iter().find(|(_, v)| *v == value).map(|(n, _)| n))
    }

    /// The enumerators of the ENUM/ENUM64 type `id` (empty for other kinds).
    pub fn enum_values(&self, id: u32) -> Result<Vec<(&str, i64)>, Error> {
        self.enumerators(id, self.record(id)?)
    }

    /// Whether the INT type `id` is signed (`BTF_INT_SIGNED` in its encoding).
    pub fn int_signed(&self, id: u32) -> Result<bool, Error> {
        match self.record(id)?.kind {
            Kind::Int => Ok((self.extra_u32(id, 0)? >> 24) & 1 != 0),
            _ => Err(lookup_err(format_args!("type {id} is not an integer"))),
        }
    }

    fn enumerators(&self, id: u32, r: &Record) -> Result<Vec<(&str, i64)>, Error> {
        let vlen = (r.info & 0xffff) as usize;
        let signed = r.info >> 31 != 0;
        let mut out = Vec::new();
        match r.kind {
            Kind::Enum => {
                for i in 0..vlen {
                    let v = self.extra_u32(id, 2 * i + 1)?;
                    let v = if signed { i64::from(v as i32) } else { i64::from(v) };
                    out.push((self.string(self.extra_u32(id, 2 * i)?)?, v));
                }
            }
            Kind::Enum64 => {
                for i in 0..vlen {
                    let lo = u64::from(self.extra_u32(id, 3 * i + 1)?);
                    let hi = u64::from(self.extra_u32(id, 3 * i + 2)?);
                    out.push((self.string(self.extra_u32(id, 3 * i)?)?, (hi << 32 | lo) as i64));
                }
            }
            _ => {}
        }
        Ok(out)
    }

    /// A short description of a type (`struct list_head`, `u64 *`, `char[16]`), for messages.
    pub fn describe(&self, id: u32) -> String {
        let mut out = String::new();
        let mut id = id;
        let mut suffix = String::new();
        for _ in 0..MAX_TYPE_DEPTH {
            let Ok(t) = self.type_by_id(id) else {
                out.push_str(if id == 0 { "void" } else { "?" });
                break;
            };
            match t.kind {
                Kind::Ptr => {
                    suffix.insert_str(0, " *");
                    id = t.size_or_type;
                }
                Kind::Array => {
                    let n = self.array(id).map(|a| a.1).unwrap_or(0);
                    suffix.push_str(&alloc::format!("[{n}]"));
                    id = self.array(id).map(|a| a.0).unwrap_or(0);
                }
                Kind::Const | Kind::Volatile | Kind::Restrict | Kind::TypeTag => id = t.size_or_type,
                Kind::Struct => {
                    out.push_str("struct ");
                    out.push_str(t.name);
                    break;
                }
                Kind::Union => {
                    out.push_str("union ");
                    out.push_str(t.name);
                    break;
                }
                _ => {
                    out.push_str(t.name);
                    break;
                }
            }
        }
        out.push_str(&suffix);
        out
    }
}

impl core::fmt::Debug for Btf {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Btf").field("types", &self.types.len()).field("bytes", &self.data.len()).finish()
    }
}

#[cfg(test)]
pub(crate) mod build;
#[cfg(test)]
mod tests;
