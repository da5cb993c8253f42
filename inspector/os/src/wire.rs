//! The host↔agent encodings of the OS views: what the host asks ([`OsRequest`], after
//! the granted ranges of [`encode_granted`]) and what the agent answers, a compact
//! little-endian encoding of [`KernelInfo`], [`Process`], [`Module`] and [`Vma`]
//! lists, the system call and rootkit checks and kallsyms pages, written by the
//! agent into its reply area. Each side decodes with every count and length bounded
//! (neither trusts the other: a malformed message is an error, never a panic).
//!
//! [`KernelInfo`]: crate::KernelInfo
//! [`Process`]: crate::Process
//! [`Module`]: crate::Module
//! [`Vma`]: crate::Vma

mod request;
#[cfg(test)]
mod tests;
mod views;

use alloc::string::String;
use alloc::vec::Vec;

use crate::Error;

pub use request::{
    decode_granted, encode_granted, op, GrantedRange, OsRequest, ReadRecord, MAX_GRANTED_RANGES, MAX_LSTARS,
    MAX_READ_RECORDS, READ_RECORD_BYTES,
};
pub use views::{
    decode_checks, decode_kernel, decode_modules, decode_processes, decode_symbols, decode_syscalls, decode_vmas,
    encode_checks, encode_kernel, encode_modules, encode_processes, encode_symbols, encode_syscalls, encode_vmas,
    DecodedProcess, SymbolRecord,
};

/// Most records in one reply.
pub const MAX_RECORDS: usize = 65_536;
/// Longest string or byte field.
pub const MAX_FIELD: usize = 8192;

const MAGIC_KERNEL: u32 = 0x4b52_4e4c; // "LNRK"
const MAGIC_PROCESSES: u32 = 0x5052_4f43; // "CORP"
const MAGIC_MODULES: u32 = 0x4d4f_4453; // "SDOM"
const MAGIC_VMAS: u32 = 0x564d_4153; // "SAMV"
const MAGIC_SYSCALLS: u32 = 0x5359_5343; // "CSYS"
const MAGIC_CHECKS: u32 = 0x434b_5452; // "RTKC"
const MAGIC_SYMBOLS: u32 = 0x5359_4d53; // "SMYS"

/// Writes fields; reports whether they fit in the reply area.
pub struct Writer<'a> {
    out: &'a mut [u8],
    at: usize,
    overflow: bool,
}

impl<'a> Writer<'a> {
    /// A writer into `out` (the reply area), from its start.
    pub fn new(out: &'a mut [u8]) -> Self {
        Writer { out, at: 0, overflow: false }
    }

    fn put(&mut self, bytes: &[u8]) {
        match self.out.get_mut(self.at..self.at + bytes.len()) {
            Some(dst) if !self.overflow => {
                dst.copy_from_slice(bytes);
                self.at += bytes.len();
            }
            _ => self.overflow = true,
        }
    }
    fn u8(&mut self, v: u8) {
        self.put(&[v]);
    }
    fn u32(&mut self, v: u32) {
        self.put(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.put(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        let b = &b[..b.len().min(MAX_FIELD)];
        self.u32(b.len() as u32);
        self.put(b);
    }
    fn opt_str(&mut self, s: Option<&str>) {
        match s {
            Some(s) => {
                self.u8(1);
                self.bytes(s.as_bytes());
            }
            None => self.u8(0),
        }
    }

    /// Bytes written, or `None` if the reply did not fit.
    pub fn finish(self) -> Option<usize> {
        (!self.overflow).then_some(self.at)
    }
}

/// Reads fields of a message from the other side, each read checked against the
/// bytes there are; failures are `Error::BadReply` (replies) or `Error::BadRequest`
/// (requests), so that each side's errors say which way the bad message went.
struct Reader<'a> {
    data: &'a [u8],
    at: usize,
    bad: fn(&'static str) -> Error,
}

impl<'a> Reader<'a> {
    /// A reader of a reply from the agent.
    fn reply(data: &'a [u8]) -> Self {
        Reader { data, at: 0, bad: Error::BadReply }
    }

    /// A reader of a request from the host.
    fn request(data: &'a [u8]) -> Self {
        Reader { data, at: 0, bad: Error::BadRequest }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.data.len()).ok_or((self.bad)("truncated"))?;
        let out = &self.data[self.at..end];
        self.at = end;
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, Error> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, Error> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn bytes(&mut self) -> Result<Vec<u8>, Error> {
        let n = self.u32()? as usize;
        if n > MAX_FIELD {
            return Err((self.bad)("field too long"));
        }
        Ok(self.take(n)?.to_vec())
    }
    fn string(&mut self) -> Result<String, Error> {
        String::from_utf8(self.bytes()?).map_err(|_| (self.bad)("a string is not UTF-8"))
    }
    fn opt_string(&mut self) -> Result<Option<String>, Error> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.string()?)),
            _ => Err((self.bad)("bad option tag")),
        }
    }
    fn count(&mut self, magic: u32) -> Result<usize, Error> {
        if self.u32()? != magic {
            return Err((self.bad)("wrong record kind"));
        }
        let n = self.u32()? as usize;
        if n > MAX_RECORDS {
            return Err((self.bad)("too many records"));
        }
        Ok(n)
    }
    fn finish(self) -> Result<(), Error> {
        if self.at == self.data.len() {
            Ok(())
        } else {
            Err((self.bad)("trailing bytes"))
        }
    }
}
