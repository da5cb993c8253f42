//! x86_64 boot: registers, GDT, page tables, CPUID, MSRs, LAPIC, the MP table, ACPI and
//! the reset vector.

pub mod acpi;
pub mod cpuid;
pub mod gdt;
pub mod interrupts;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
pub mod reset_vector;
