//! Vec-backed physical memory for unit tests.

use alloc::vec::Vec;
use core::ops::Range;

use crate::{Error, PhysMem};

#[derive(Clone)]
pub struct TestMem {
    pub base: u64,
    pub data: Vec<u8>,
}

impl TestMem {
    pub fn new(base: u64, len: usize) -> Self {
        TestMem { base, data: alloc::vec![0; len] }
    }

    pub fn write(&mut self, pa: u64, bytes: &[u8]) {
        let off = (pa - self.base) as usize;
        self.data[off..off + bytes.len()].copy_from_slice(bytes);
    }

    pub fn write_u64(&mut self, pa: u64, v: u64) {
        self.write(pa, &v.to_le_bytes());
    }

    pub fn write_u32(&mut self, pa: u64, v: u32) {
        self.write(pa, &v.to_le_bytes());
    }
}

impl PhysMem for TestMem {
    fn read(&self, pa: u64, buf: &mut [u8]) -> Result<(), Error> {
        let err = Error::PhysRead { pa, len: buf.len() as u64 };
        let off = pa.checked_sub(self.base).ok_or(err.clone())? as usize;
        let src = self.data.get(off..off.checked_add(buf.len()).ok_or(err.clone())?).ok_or(err)?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn ram_ranges(&self) -> Vec<Range<u64>> {
        alloc::vec![self.base..self.base + self.data.len() as u64]
    }
}
