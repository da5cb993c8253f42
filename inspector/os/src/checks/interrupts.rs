//! The interrupt check: present `idt_table` gates against the core kernel text.

use alloc::vec::Vec;

use super::{Finding, FindingKind, Run};
use crate::linux::Module;
use crate::paging::VirtMem;
use crate::{Error, PhysMem};

/// Gates in the IDT.
const IDT_ENTRIES: u64 = 256;

impl<M: PhysMem + ?Sized> Run<'_, '_, M> {
    /// Present interrupt gates outside the core kernel text; returns the gates checked.
    pub(super) fn check_interrupts(
        &self,
        listed: &[Module],
        hidden: &[Finding],
        out: &mut Vec<Finding>,
    ) -> Result<u64, Error> {
        let table = self.kallsyms.address("idt_table")?;
        let (text_start, text_end) = (self.kallsyms.address("_stext")?, self.kallsyms.address("_etext")?);
        let mut raw = alloc::vec![0u8; (IDT_ENTRIES * 16) as usize];
        self.kernel.read_virt(table, &mut raw)?;
        // Vectors the kernel never installs a handler for (reserved exceptions) keep
        // the one set up at boot: entry `vector` of `early_idt_handler_array`
        // (32 stubs of equal size, in init text). Only that exact address is accepted.
        let early = self.kallsyms.address("early_idt_handler_array").ok().and_then(|base| {
            let end = self.kallsyms.next_address(base)?;
            let stride = (end - base) / 32;
            (stride > 0).then_some((base, stride))
        });
        let mut present = 0;
        for (vector, gate) in raw.chunks_exact(16).enumerate() {
            // struct gate_struct: offset_low u16, segment u16, bits u16 (P is bit 15),
            // offset_middle u16, offset_high u32, reserved u32.
            let word = |i: usize| u64::from(u16::from_le_bytes([gate[i], gate[i + 1]]));
            if word(4) & 0x8000 == 0 {
                continue;
            }
            present += 1;
            let high = u64::from(u32::from_le_bytes(gate[8..12].try_into().expect("4 bytes")));
            let target = word(0) | word(6) << 16 | high << 32;
            let boot_stub = early.is_some_and(|(base, stride)| vector < 32 && target == base + vector as u64 * stride);
            if (text_start..text_end).contains(&target) || boot_stub {
                continue;
            }
            out.push(Finding {
                kind: FindingKind::InterruptHooked,
                id: vector as i64,
                name: None,
                address: target,
                detail: self.module_holding(listed, hidden, target),
            });
        }
        Ok(present)
    }
}
