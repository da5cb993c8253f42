//! Builds BTF blobs for tests and fuzz seeds.

use alloc::vec::Vec;

pub struct Builder {
    pub types: Vec<u8>,
    pub strs: Vec<u8>,
    pub next_id: u32,
}

impl Builder {
    pub fn new() -> Self {
        Builder { types: Vec::new(), strs: alloc::vec![0], next_id: 1 }
    }
    pub fn s(&mut self, name: &str) -> u32 {
        if name.is_empty() {
            return 0;
        }
        let off = self.strs.len() as u32;
        self.strs.extend_from_slice(name.as_bytes());
        self.strs.push(0);
        off
    }
    pub fn raw(&mut self, name: &str, kind: u32, vlen: u32, kflag: bool, st: u32, extra: &[u32]) -> u32 {
        let n = self.s(name);
        let info = (kind << 24) | vlen | if kflag { 1 << 31 } else { 0 };
        for w in [n, info, st].iter().chain(extra) {
            self.types.extend_from_slice(&w.to_le_bytes());
        }
        self.next_id += 1;
        self.next_id - 1
    }
    pub fn int(&mut self, name: &str, size: u32) -> u32 {
        self.raw(name, 1, 0, false, size, &[size * 8])
    }
    pub fn ptr(&mut self, to: u32) -> u32 {
        self.raw("", 2, 0, false, to, &[])
    }
    /// Members: (name, type, bit offset, bitfield size).
    pub fn strukt(&mut self, name: &str, size: u32, members: &[(&str, u32, u32, u32)]) -> u32 {
        let kflag = members.iter().any(|m| m.3 != 0);
        let mut extra = Vec::new();
        for &(n, t, off, bits) in members {
            extra.push(self.s(n));
            extra.push(t);
            extra.push(if kflag { bits << 24 | off } else { off });
        }
        self.raw(name, 4, members.len() as u32, kflag, size, &extra)
    }
    pub fn blob(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&0xeb9fu16.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for w in [24u32, 0, self.types.len() as u32, self.types.len() as u32, self.strs.len() as u32] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&self.types);
        out.extend_from_slice(&self.strs);
        out
    }
}
