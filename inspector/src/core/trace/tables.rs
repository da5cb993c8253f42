//! The `kernel_writes` trace kind: which kernel tables the source traps writes to, and
//! the `trace.kernel_write` events their writes make.
//!
//! The tables are found in the guest kernel's own kallsyms (no address per kernel):
//! its text (`_stext`..`_etext`), the system call tables and the IDT (`idt_table`,
//! which the CPU reads through a read-only alias in the CPU entry area; its physical
//! page is the same). All of them are in the kernel image, whose physical address is
//! its virtual one less `__START_KERNEL_map`, plus `phys_base`: a guest-physical
//! range the source makes read-only. Only a kernel anchored to the vCPUs' own state
//! is believed here, so a guest process cannot point the traps at a forged kernel's
//! pages and away from the real one.
//!
//! A write is named by the table it lands in, the entry (system call number, vector)
//! or the text symbol, and where the writer was: its RIP (the instruction after the
//! store, as KVM leaves it) and its callers, placed by the agent like an MSR writer.

use mirror_driver::protocol::{MemoryWrite, Range};
use serde_json::{json, Value};
use specula_os::wire::SymbolRecord;

use super::{hex, Place};
use crate::core::InspectError;

/// The base of the kernel image's virtual mapping (x86-64 `__START_KERNEL_map`).
const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;
/// The most bytes taken for a table whose end is the next symbol's address.
const MAX_TABLE: u64 = 16 << 10;

/// One trapped kernel table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Table {
    pub name: &'static str,
    pub va: u64,
    pub len: u64,
    pub gpa: u64,
    /// Bytes per entry (a system call's pointer, a gate); 0 for text.
    pub entry_size: u64,
}

/// The tables trapped, and the text symbols that name a write into text.
#[derive(Clone, Debug, Default)]
pub(super) struct TablePlan {
    pub tables: Vec<Table>,
    /// Text symbols by address.
    text_symbols: Vec<(u64, String)>,
}

fn os(e: impl std::fmt::Display) -> InspectError {
    InspectError::Os(format!("cannot plan the kernel-write traps: {e}"))
}

/// The tables of the kernel whose kallsyms are `symbols` and whose image sits at
/// `phys_base` (VMCOREINFO's, from an anchored kernel view).
pub(super) fn plan(symbols: &[SymbolRecord], phys_base: i64) -> Result<TablePlan, InspectError> {
    let mut by_address: Vec<&SymbolRecord> = symbols.iter().collect();
    by_address.sort_by_key(|s| s.address);
    let find = |name: &str| by_address.iter().find(|s| s.name == name).map(|s| s.address);
    let physical = |va: u64| -> Result<u64, InspectError> {
        va.checked_sub(START_KERNEL_MAP)
            .and_then(|offset| offset.checked_add_signed(phys_base))
            .ok_or_else(|| os(format_args!("{va:#x} is not in the kernel image")))
    };
    // A table runs to the next symbol at a higher address.
    let extent = |va: u64| -> u64 {
        by_address.iter().map(|s| s.address).find(|&a| a > va).map_or(8, |next| (next - va).min(MAX_TABLE))
    };
    let mut tables = Vec::new();
    let (stext, etext) = (find("_stext"), find("_etext"));
    let (Some(stext), Some(etext)) = (stext, etext) else { return Err(os("no _stext/_etext in kallsyms")) };
    if etext <= stext || etext - stext > 256 << 20 {
        return Err(os(format_args!("kernel text spans {stext:#x}..{etext:#x}")));
    }
    tables.push(Table { name: "kernel_text", va: stext, len: etext - stext, gpa: physical(stext)?, entry_size: 0 });
    for (name, entry_size) in
        [("sys_call_table", 8), ("ia32_sys_call_table", 8), ("x32_sys_call_table", 8), ("idt_table", 16)]
    {
        let Some(va) = find(name) else { continue };
        // idt_table is 256 gates in its own page-aligned bss page.
        let len = if name == "idt_table" { 256 * 16 } else { extent(va) };
        tables.push(Table { name, va, len, gpa: physical(va)?, entry_size });
    }
    if !tables.iter().any(|t| t.name == "sys_call_table") {
        return Err(os("no sys_call_table in kallsyms"));
    }
    let text_symbols = by_address
        .iter()
        .filter(|s| s.address >= stext && s.address < etext && matches!(s.kind, 'T' | 't'))
        .map(|s| (s.address, s.name.clone()))
        .collect();
    Ok(TablePlan { tables, text_symbols })
}

impl TablePlan {
    /// The guest-physical ranges to trap.
    pub fn ranges(&self) -> Vec<Range> {
        self.tables.iter().map(|t| Range { gpa: t.gpa, len: t.len }).collect()
    }

    /// The text symbol and offset of `va`.
    fn text_symbol(&self, va: u64) -> Option<String> {
        let i = self.text_symbols.partition_point(|(a, _)| *a <= va);
        let (at, name) = self.text_symbols.get(i.checked_sub(1)?)?;
        Some(format!("{name}+{:#x}", va - at))
    }

    /// The `trace.kernel_write` detail of `write`, or none where it touches no table.
    /// `writer` and `callers`: where the agent placed its RIP and its stack words.
    pub fn event(
        &self,
        write: &MemoryWrite,
        writer: &Place,
        callers: Vec<Value>,
        error: Option<&str>,
    ) -> Option<Value> {
        let end = write.gpa + u64::from(write.len);
        let table = self.tables.iter().find(|t| write.gpa < t.gpa + t.len && t.gpa < end)?;
        let offset = write.gpa.saturating_sub(table.gpa);
        let va = table.va + offset;
        let mut detail = json!({
            "vcpu": write.vcpu,
            "table": table.name,
            "address": hex(va),
            "offset": offset,
            "gpa": hex(write.gpa),
            "len": write.len,
            "value": hex(write.value),
            "previous": hex(write.previous),
            "rip": hex(write.rip),
            "cr3": hex(write.cr3),
            "writer": writer.json(),
            "callers": callers,
        });
        match offset.checked_div(table.entry_size) {
            Some(entry) => detail["entry"] = json!(entry),
            None => detail["symbol"] = json!(self.text_symbol(va)),
        }
        if let Some(error) = error {
            detail["resolve_error"] = json!(error);
        }
        Some(detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sym(name: &str, kind: char, address: u64) -> SymbolRecord {
        SymbolRecord { name: name.into(), kind, address }
    }

    /// A kernel slid by 0x1e00000 (virtually) whose image starts 0x2000000 past its link
    /// address physically (phys_base).
    fn symbols() -> Vec<SymbolRecord> {
        let slide = 0x1e0_0000;
        vec![
            sym("_stext", 'T', 0xffff_ffff_8100_0000 + slide),
            sym("do_one", 'T', 0xffff_ffff_8100_1000 + slide),
            sym("do_two", 't', 0xffff_ffff_8100_2000 + slide),
            sym("_etext", 'T', 0xffff_ffff_8200_0000 + slide),
            sym("sys_call_table", 'R', 0xffff_ffff_8220_0000 + slide),
            sym("after_table", 'r', 0xffff_ffff_8220_0e40 + slide),
            sym("idt_table", 'b', 0xffff_ffff_8300_0000 + slide),
        ]
    }

    #[test]
    fn the_tables_are_the_kernels_own_at_their_physical_addresses() {
        let plan = plan(&symbols(), 0x200_0000).unwrap();
        let shape: Vec<(&str, u64, u64)> = plan.tables.iter().map(|t| (t.name, t.gpa, t.len)).collect();
        assert_eq!(
            shape,
            vec![
                ("kernel_text", 0x2e0_0000 + 0x200_0000, 0x100_0000),
                ("sys_call_table", 0x600_0000, 0xe40),
                ("idt_table", 0x6e0_0000, 4096),
            ]
        );
        let mut missing = symbols();
        missing.retain(|s| s.name != "sys_call_table");
        assert!(super::plan(&missing, 0).unwrap_err().to_string().contains("sys_call_table"));
        let mut inverted = symbols();
        inverted[3].address = inverted[0].address - 1;
        assert!(super::plan(&inverted, 0).unwrap_err().to_string().contains("kernel text spans"));
    }

    #[test]
    fn a_write_is_named_by_its_table_entry_or_text_symbol() {
        let plan = plan(&symbols(), 0x200_0000).unwrap();
        let writer = Place { symbol: None, module: Some("specula_rootkit (hidden)".into()) };
        let entry62 =
            MemoryWrite { gpa: 0x600_0000 + 62 * 8, len: 8, value: 0xffff_ffff_c000_1000, ..Default::default() };
        let e = plan.event(&entry62, &writer, vec![], None).unwrap();
        assert_eq!((e["table"].clone(), e["entry"].clone()), (json!("sys_call_table"), json!(62)));
        assert_eq!(e["writer"]["module"], "specula_rootkit (hidden)");
        let text = MemoryWrite { gpa: 0x4e0_2010, len: 1, ..Default::default() };
        let e = plan.event(&text, &Place::default(), vec![], None).unwrap();
        assert_eq!((e["table"].clone(), e["symbol"].clone()), (json!("kernel_text"), json!("do_two+0x10")));
        assert_eq!(e["address"], "0xffffffff82e02010");
        // Past the table's end, on its page: not a table write.
        let beside = MemoryWrite { gpa: 0x600_0e40, len: 8, ..Default::default() };
        assert!(plan.event(&beside, &writer, vec![], None).is_none());
    }
}
