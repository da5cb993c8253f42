//! The crate's error type: every failure says what was being read and why it
//! was refused.

use alloc::string::String;
use core::fmt;

/// Everything that can go wrong while reading guest memory or parsing what is
/// found there. Every bounded walk ends in one of these rather than a hang.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// A physical read outside guest RAM (or one the [`crate::PhysMem`] refused).
    PhysRead { pa: u64, len: u64 },
    /// A virtual address that is not canonical for the paging mode.
    NonCanonical { va: u64 },
    /// A virtual address whose translation hit a non-present entry at `level`
    /// (5 = PML5, 4 = PML4, 3 = PDPT, 2 = PD, 1 = PT).
    NotMapped { va: u64, level: u8 },
    /// A page-table entry with bits set that must be zero (PS in a PML4/PML5 entry).
    BadPageTableEntry { va: u64, level: u8, entry: u64 },
    /// A length, count or size beyond the documented cap.
    TooLarge { what: &'static str, value: u64, max: u64 },
    /// A linked list that came back to an entry already visited (not its head).
    ListCycle { list: &'static str, at: u64 },
    /// A linked list longer than its cap.
    ListTooLong { list: &'static str, max: u64 },
    /// No VMCOREINFO text in RAM that passed validation.
    VmcoreinfoNotFound { candidates: u32, last: Option<String> },
    /// A VMCOREINFO key missing or with a value that does not parse.
    Vmcoreinfo(String),
    /// The kallsyms tables are not what they should be.
    Kallsyms(String),
    /// A kernel symbol that kallsyms does not have.
    SymbolNotFound(String),
    /// The BTF blob is malformed.
    Btf(String),
    /// A type, member or enumerator that BTF does not have (or not of the kind asked for).
    BtfLookup(String),
    /// A kernel structure with contents that make no sense (a string without
    /// its terminator, a pointer outside the kernel, ...).
    Corrupt(String),
    /// A reply from the agent that does not decode.
    BadReply(&'static str),
    /// A request to the agent that does not decode ([`crate::wire::OsRequest::decode`]).
    BadRequest(&'static str),
    /// What needs the kernel anchored to the vCPUs' state, asked of one that is not
    /// (the reason).
    Unanchored(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::PhysRead { pa, len } => {
                write!(f, "physical read of {len} bytes at {pa:#x} is outside guest RAM")
            }
            Error::NonCanonical { va } => write!(f, "virtual address {va:#x} is not canonical"),
            Error::NotMapped { va, level } => {
                write!(f, "virtual address {va:#x} is not mapped (level-{level} entry not present)")
            }
            Error::BadPageTableEntry { va, level, entry } => {
                write!(f, "translating {va:#x}: level-{level} entry {entry:#x} has reserved bits set")
            }
            Error::TooLarge { what, value, max } => write!(f, "{what} is {value}, more than the cap of {max}"),
            Error::ListCycle { list, at } => write!(f, "{list} list cycles back to {at:#x} without reaching its head"),
            Error::ListTooLong { list, max } => write!(f, "{list} list has more than {max} entries"),
            Error::VmcoreinfoNotFound { candidates, last } => {
                write!(f, "no valid VMCOREINFO in guest RAM ({candidates} candidates")?;
                if let Some(why) = last {
                    write!(f, "; last rejected: {why}")?;
                }
                write!(f, ")")
            }
            Error::Vmcoreinfo(why) => write!(f, "VMCOREINFO: {why}"),
            Error::Kallsyms(why) => write!(f, "kallsyms: {why}"),
            Error::SymbolNotFound(name) => write!(f, "kernel symbol {name} not found in kallsyms"),
            Error::Btf(why) => write!(f, "BTF: {why}"),
            Error::BtfLookup(why) => write!(f, "BTF lookup: {why}"),
            Error::Corrupt(why) => write!(f, "corrupt kernel data: {why}"),
            Error::BadReply(why) => write!(f, "the agent's reply does not decode: {why}"),
            Error::BadRequest(why) => write!(f, "the request to the agent does not decode: {why}"),
            Error::Unanchored(why) => write!(f, "the kernel is not anchored to the vCPUs: {why}"),
        }
    }
}

impl Error {
    /// Whether this error can come from guest memory that changed while it was read:
    /// a pointer followed after the guest freed (and reused) what it pointed at, a
    /// count read before the list it counts was cut. A running guest changes its
    /// lists under every walk, so such a walk is worth repeating
    /// ([`crate::linux::walked_until_consistent`]); the errors about the kernel
    /// itself (its symbols, types, VMCOREINFO) or about a request are not.
    pub fn may_come_from_a_change_under_the_walk(&self) -> bool {
        match self {
            Error::PhysRead { .. }
            | Error::NonCanonical { .. }
            | Error::NotMapped { .. }
            | Error::BadPageTableEntry { .. }
            | Error::TooLarge { .. }
            | Error::ListCycle { .. }
            | Error::ListTooLong { .. }
            | Error::Corrupt(_) => true,
            Error::VmcoreinfoNotFound { .. }
            | Error::Vmcoreinfo(_)
            | Error::Kallsyms(_)
            | Error::SymbolNotFound(_)
            | Error::Btf(_)
            | Error::BtfLookup(_)
            | Error::BadReply(_)
            | Error::BadRequest(_)
            | Error::Unanchored(_) => false,
        }
    }
}
