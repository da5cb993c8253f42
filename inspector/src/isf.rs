//! Volatility 3 symbol tables (ISF, schema 6.2) built from a live guest's own
//! BTF and kallsyms, so that Volatility runs with no dwarf2json and no debug
//! package.
//!
//! - Types come from BTF: structs and unions (anonymous members flattened into
//!   their parent, as C lets code name them), enums, base types; typedefs and
//!   qualifiers are looked through; bit-fields keep their storage unit.
//! - Symbols come from kallsyms, moved back to their link-time addresses (the
//!   KASLR slide subtracted), as a System.map would have them: Volatility finds
//!   the slide itself. BTF has no types for ordinary global variables, so the
//!   ones Volatility's Linux plugins dereference are given theirs
//!   ([`KNOWN_VARIABLES`]).
//! - `linux_banner` carries its bytes (`constant_data`), which is how
//!   Volatility matches a table to the memory it is looking at.
//!
//! The BTF comes from guest memory and is parsed by `specula_os::Btf`, which
//! bounds everything; this module adds no unbounded walk (type references are
//! followed through at most [`specula_os::btf::MAX_TYPE_DEPTH`] qualifiers).

use std::collections::{BTreeMap, HashMap};

use base64::Engine;
use serde_json::{json, Map, Value};
use specula_os::btf::{Kind, MAX_ANON_DEPTH, MAX_TYPE_DEPTH};
use specula_os::wire::SymbolRecord;
use specula_os::Btf;

/// Lowest address of the kernel image mapping (`__START_KERNEL_map`): symbols
/// at or above it move with the KASLR slide, per-CPU offsets below it do not.
const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;

/// What a global variable is, for the ones Volatility's Linux plugins read by symbol.
#[derive(Clone, Copy, Debug)]
pub enum VarType {
    Struct(&'static str),
    PointerTo(&'static str),
    Base(&'static str),
    /// An array of structs, as long as the gap to the next symbol holds.
    ArrayOf(&'static str),
}

/// Global variables Volatility's Linux support dereferences by symbol (BTF has
/// types only for per-CPU variables).
pub const KNOWN_VARIABLES: [(&str, VarType); 23] = [
    ("init_task", VarType::Struct("task_struct")),
    ("init_mm", VarType::Struct("mm_struct")),
    ("init_files", VarType::Struct("files_struct")),
    ("modules", VarType::Struct("list_head")),
    ("init_pid_ns", VarType::Struct("pid_namespace")),
    ("init_uts_ns", VarType::Struct("uts_namespace")),
    ("mod_tree", VarType::Struct("mod_tree_root")),
    ("net_namespace_list", VarType::Struct("list_head")),
    ("tty_drivers", VarType::Struct("list_head")),
    ("prog_idr", VarType::Struct("idr")),
    ("keyboard_notifier_list", VarType::Struct("atomic_notifier_head")),
    ("socket_file_ops", VarType::Struct("file_operations")),
    ("sockfs_dentry_operations", VarType::Struct("dentry_operations")),
    ("module_kset", VarType::PointerTo("kset")),
    ("prb", VarType::PointerTo("printk_ringbuffer")),
    ("ftrace_ops_list", VarType::PointerTo("ftrace_ops")),
    ("taint_flags", VarType::ArrayOf("taint_flag")),
    ("idt_table", VarType::ArrayOf("gate_struct")),
    ("tainted_mask", VarType::Base("long unsigned int")),
    ("vmemmap_base", VarType::Base("long unsigned int")),
    ("page_offset_base", VarType::Base("long unsigned int")),
    ("log_buf_len", VarType::Base("unsigned int")),
    ("cap_last_cap", VarType::Base("int")),
];

/// Why no ISF could be built.
#[derive(Debug, thiserror::Error)]
pub enum IsfError {
    #[error("BTF type {id}: {why}")]
    Type { id: u32, why: String },
}

/// What the generator needs from the guest.
pub struct IsfInput<'a> {
    pub btf: &'a Btf,
    pub symbols: &'a [SymbolRecord],
    /// The KASLR slide (`KERNELOFFSET`).
    pub kaslr_offset: u64,
    /// `linux_banner`'s bytes up to and without its NUL.
    pub banner: &'a [u8],
}

struct Gen<'a> {
    btf: &'a Btf,
    /// ISF name of every struct, union and enum type id.
    names: HashMap<u32, String>,
    base_types: BTreeMap<String, Value>,
}

impl<'a> Gen<'a> {
    fn err(id: u32, why: impl std::fmt::Display) -> IsfError {
        IsfError::Type { id, why: why.to_string() }
    }

    /// Names every aggregate and enum: its own, or `unnamed_<kind>_<id>`; a name
    /// taken by a different type of the same kind gets `_<id>`.
    fn new(btf: &'a Btf) -> Self {
        let mut names = HashMap::new();
        let mut taken: HashMap<(bool, String), u32> = HashMap::new();
        for id in 1..=btf.len() as u32 {
            let Ok(t) = btf.type_by_id(id) else { continue };
            let (is_enum, prefix) = match t.kind {
                Kind::Struct => (false, "struct"),
                Kind::Union => (false, "union"),
                Kind::Enum | Kind::Enum64 => (true, "enum"),
                _ => continue,
            };
            let name = if t.name.is_empty() {
                format!("unnamed_{prefix}_{id}")
            } else if taken.contains_key(&(is_enum, t.name.to_string())) {
                format!("{}_{id}", t.name)
            } else {
                t.name.to_string()
            };
            taken.insert((is_enum, name.clone()), id);
            names.insert(id, name);
        }
        let mut base_types = BTreeMap::new();
        base_types.insert("pointer".into(), json!({"size": 8, "signed": false, "kind": "int", "endian": "little"}));
        base_types.insert("void".into(), json!({"size": 0, "signed": false, "kind": "void", "endian": "little"}));
        Gen { btf, names, base_types }
    }

    /// The id behind typedefs and qualifiers.
    fn strip(&self, mut id: u32) -> Result<u32, IsfError> {
        for _ in 0..MAX_TYPE_DEPTH {
            if id == 0 {
                return Ok(0);
            }
            let t = self.btf.type_by_id(id).map_err(|e| Self::err(id, e))?;
            match t.kind {
                Kind::Typedef | Kind::Const | Kind::Volatile | Kind::Restrict | Kind::TypeTag => id = t.size_or_type,
                _ => return Ok(id),
            }
        }
        Err(Self::err(id, "qualifier chain too deep"))
    }

    /// A base type's ISF entry, recorded in `base_types`; returns its name.
    fn base(&mut self, id: u32) -> Result<String, IsfError> {
        let t = self.btf.type_by_id(id).map_err(|e| Self::err(id, e))?;
        let name = t.name.to_string();
        let kind = match (t.kind, name.as_str()) {
            (Kind::Float, _) => "float",
            (_, "_Bool") => "bool",
            (_, "char" | "signed char" | "unsigned char") => "char",
            _ => "int",
        };
        let signed = t.kind == Kind::Int && self.btf.int_signed(id).map_err(|e| Self::err(id, e))?;
        self.base_types
            .entry(name.clone())
            .or_insert_with(|| json!({"size": t.size_or_type, "signed": signed, "kind": kind, "endian": "little"}));
        Ok(name)
    }

    /// The ISF type descriptor of BTF type `id`.
    fn type_ref(&mut self, id: u32, depth: usize) -> Result<Value, IsfError> {
        if depth > MAX_TYPE_DEPTH {
            return Err(Self::err(id, "type nests too deeply"));
        }
        let id = self.strip(id)?;
        if id == 0 {
            return Ok(json!({"kind": "base", "name": "void"}));
        }
        let t = self.btf.type_by_id(id).map_err(|e| Self::err(id, e))?;
        Ok(match t.kind {
            Kind::Int | Kind::Float => json!({"kind": "base", "name": self.base(id)?}),
            Kind::Ptr => json!({"kind": "pointer", "subtype": self.type_ref(t.size_or_type, depth + 1)?}),
            Kind::Array => {
                let (elem, count) = self.btf.array(id).map_err(|e| Self::err(id, e))?;
                json!({"kind": "array", "count": count, "subtype": self.type_ref(elem, depth + 1)?})
            }
            Kind::Struct => json!({"kind": "struct", "name": self.names[&id]}),
            Kind::Union => json!({"kind": "union", "name": self.names[&id]}),
            Kind::Fwd if t.kind_flag => json!({"kind": "union", "name": t.name}),
            Kind::Fwd => json!({"kind": "struct", "name": t.name}),
            Kind::Enum | Kind::Enum64 => json!({"kind": "enum", "name": self.names[&id]}),
            Kind::Func | Kind::FuncProto => json!({"kind": "function"}),
            other => return Err(Self::err(id, format!("a {other:?} cannot be a member's type"))),
        })
    }

    /// The fields of aggregate `id` at `base` bytes, anonymous members flattened.
    fn fields(&mut self, id: u32, base: u64, depth: usize, out: &mut Map<String, Value>) -> Result<(), IsfError> {
        if depth > MAX_ANON_DEPTH {
            return Err(Self::err(id, "anonymous members nest too deeply"));
        }
        let members: Vec<_> = self
            .btf
            .members(id)
            .map_err(|e| Self::err(id, e))?
            .into_iter()
            .map(|m| (m.name.to_string(), m.type_id, m.bit_offset, m.bitfield_size))
            .collect();
        for (name, type_id, bit_offset, bits) in members {
            let bit = base * 8 + u64::from(bit_offset);
            if name.is_empty() {
                let inner = self.strip(type_id)?;
                let kind = self.btf.type_by_id(inner).map_err(|e| Self::err(inner, e))?.kind;
                if matches!(kind, Kind::Struct | Kind::Union) {
                    self.fields(inner, bit / 8, depth + 1, out)?;
                }
                continue;
            }
            let field = if bits == 0 {
                json!({"offset": bit / 8, "type": self.type_ref(type_id, 0)?})
            } else {
                // Volatility reads a bit-field from its storage unit: the base type's size.
                let storage = self.strip(type_id)?;
                let unit = self.btf.size_of(storage).map_err(|e| Self::err(storage, e))?.clamp(1, 8);
                let offset = bit / 8 / unit * unit;
                json!({
                    "offset": offset,
                    "type": {
                        "kind": "bitfield",
                        "bit_position": bit - offset * 8,
                        "bit_length": bits,
                        "type": self.type_ref(type_id, 0)?,
                    }
                })
            };
            out.entry(name).or_insert(field);
        }
        Ok(())
    }

    fn enum_entry(&mut self, id: u32) -> Result<Value, IsfError> {
        let t = self.btf.type_by_id(id).map_err(|e| Self::err(id, e))?;
        let size = t.size_or_type;
        let constants: Map<String, Value> = self
            .btf
            .enum_values(id)
            .map_err(|e| Self::err(id, e))?
            .into_iter()
            .map(|(n, v)| (n.to_string(), if t.kind_flag { json!(v) } else { json!(v as u64 & mask(size)) }))
            .collect();
        let (base, signed) = match (size, t.kind_flag) {
            (1, false) => ("unsigned char", false),
            (1, true) => ("signed char", true),
            (2, false) => ("short unsigned int", false),
            (2, true) => ("short int", true),
            (8, false) => ("long unsigned int", false),
            (8, true) => ("long int", true),
            (_, false) => ("unsigned int", false),
            (_, true) => ("int", true),
        };
        let kind = if size == 1 { "char" } else { "int" };
        self.base_types
            .entry(base.into())
            .or_insert_with(|| json!({"size": size.clamp(1, 8), "signed": signed, "kind": kind, "endian": "little"}));
        Ok(json!({"size": size, "base": base, "constants": constants}))
    }
}

/// The ISF type of a known variable; `None` where this kernel's BTF lacks the struct.
fn var_type(btf: &Btf, gen: &mut Gen, var: VarType, gap: Option<u64>) -> Option<Value> {
    let named = |st: &str| btf.struct_id(st).ok().map(|id| json!({"kind": "struct", "name": gen.names[&id]}));
    Some(match var {
        VarType::Struct(st) => named(st)?,
        VarType::PointerTo(st) => json!({"kind": "pointer", "subtype": named(st)?}),
        VarType::Base(name) => {
            let size = if name.contains("long") { 8 } else { 4 };
            gen.base_types.entry(name.into()).or_insert_with(
                || json!({"size": size, "signed": !name.contains("unsigned"), "kind": "int", "endian": "little"}),
            );
            json!({"kind": "base", "name": name})
        }
        VarType::ArrayOf(st) => {
            let id = btf.struct_id(st).ok()?;
            let size = btf.size_of(id).ok().filter(|&s| s > 0)?;
            let count = (gap? / size).clamp(1, 4096);
            json!({"kind": "array", "count": count, "subtype": named(st)?})
        }
    })
}

fn mask(size: u32) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (size * 8)) - 1
    }
}

/// Builds the ISF document.
pub fn generate(input: &IsfInput) -> Result<Value, IsfError> {
    let btf = input.btf;
    let mut gen = Gen::new(btf);
    let mut user_types = Map::new();
    let mut enums = Map::new();
    for id in 1..=btf.len() as u32 {
        let Ok(t) = btf.type_by_id(id) else { continue };
        match t.kind {
            Kind::Struct | Kind::Union => {
                let mut fields = Map::new();
                gen.fields(id, 0, 0, &mut fields)?;
                let kind = if t.kind == Kind::Struct { "struct" } else { "union" };
                user_types
                    .insert(gen.names[&id].clone(), json!({"kind": kind, "size": t.size_or_type, "fields": fields}));
            }
            Kind::Enum | Kind::Enum64 => {
                enums.insert(gen.names[&id].clone(), gen.enum_entry(id)?);
            }
            Kind::Int | Kind::Float => {
                gen.base(id)?;
            }
            _ => {}
        }
    }
    let symbols = symbols(input, &mut gen)?;
    Ok(json!({
        "metadata": {
            "format": "6.2.0",
            "producer": {"name": "specula", "version": env!("CARGO_PKG_VERSION")},
        },
        "base_types": gen.base_types,
        "user_types": user_types,
        "enums": enums,
        "symbols": symbols,
    }))
}

/// Every kallsyms name at its link-time address (the first of duplicate local names).
fn symbols(input: &IsfInput, gen: &mut Gen) -> Result<Map<String, Value>, IsfError> {
    let unslide = |a: u64| if a >= START_KERNEL_MAP { a.wrapping_sub(input.kaslr_offset) } else { a };
    let mut out = Map::new();
    let mut sorted: Vec<u64> = input.symbols.iter().map(|s| s.address).collect();
    sorted.sort_unstable();
    for s in input.symbols {
        if out.contains_key(&s.name) {
            continue;
        }
        let mut entry = Map::new();
        entry.insert("address".into(), json!(unslide(s.address)));
        if let Some((_, var)) = KNOWN_VARIABLES.iter().find(|(n, _)| *n == s.name) {
            let next = sorted.iter().copied().find(|&a| a > s.address);
            if let Some(t) = var_type(input.btf, gen, *var, next.map(|n| n - s.address)) {
                entry.insert("type".into(), t);
            }
        }
        if s.name == "sys_call_table" {
            // Its length: up to the next symbol, as System.map-based tools infer it.
            let next = sorted.iter().copied().find(|&a| a > s.address).unwrap_or(s.address + 8);
            let count = ((next - s.address) / 8).clamp(1, specula_os::linux::MAX_SYSCALLS);
            entry.insert(
                "type".into(),
                json!({"kind": "array", "count": count, "subtype": {"kind": "pointer", "subtype": {"kind": "function"}}}),
            );
        }
        if s.name == "linux_banner" {
            let mut bytes = input.banner.to_vec();
            bytes.push(0);
            entry.insert("constant_data".into(), json!(base64::engine::general_purpose::STANDARD.encode(&bytes)));
            gen.base_types
                .entry("char".into())
                .or_insert_with(|| json!({"size": 1, "signed": true, "kind": "char", "endian": "little"}));
            entry.insert(
                "type".into(),
                json!({"kind": "array", "count": bytes.len(), "subtype": {"kind": "base", "name": "char"}}),
            );
        }
        out.insert(s.name.clone(), Value::Object(entry));
    }
    Ok(out)
}
