//! Entry points for libFuzzer-style targets: each takes arbitrary bytes, runs
//! one parser over them and must return (with any result) without panicking,
//! hanging or allocating without bound.

use alloc::vec::Vec;

use crate::btf::Btf;
use crate::kallsyms::Kallsyms;
use crate::linux::Linux;
use crate::paging::{translate, AddressSpace, PagingMode, VirtMem};
use crate::vmcoreinfo::{self, VmcoreInfo};
use crate::{wire, SliceMem};

fn u64_at(data: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    if let Some(s) = data.get(at..at + 8) {
        b.copy_from_slice(s);
    }
    u64::from_le_bytes(b)
}

/// Parses `data` as a BTF blob and looks up the members the views use.
pub fn fuzz_btf(data: &[u8]) {
    let Ok(btf) = Btf::parse(data.to_vec()) else { return };
    for (st, path) in
        [("task_struct", "tasks"), ("module", "core_layout.size"), ("cred", "uid.val"), ("mm_struct", "pgd")]
    {
        let _ = btf.member(st, path);
    }
    let _ = btf.enum_value("MOD_TEXT");
    for id in 0..(btf.len() as u32 + 1).min(4096) {
        let _ = btf.size_of(id);
        let _ = btf.resolve(id);
        let _ = btf.members(id);
        let _ = btf.enum_name(id, 0);
        let _ = btf.describe(id);
    }
}

/// Parses `data` as VMCOREINFO text, and scans it as RAM.
pub fn fuzz_vmcoreinfo(data: &[u8]) {
    if let Ok(info) = VmcoreInfo::parse(data, 0) {
        let _ = info.kernel_pgd_phys();
        let _ = info.symbol("kallsyms_names");
    }
    let mem = SliceMem::new(alloc::vec![(0, data)]);
    let _ = vmcoreinfo::scan(&mem);
}

/// Decodes kallsyms tables cut from `data`: a u16 symbol count, the 512-byte
/// token index, 4 bytes of offset per symbol, then names and token table halves.
pub fn fuzz_kallsyms(data: &[u8]) {
    if data.len() < 2 + 512 {
        return;
    }
    let num = u32::from(u16::from_le_bytes([data[0], data[1]]));
    let index = &data[2..514];
    let rest = &data[514..];
    let off_len = (num as usize * 4).min(rest.len());
    let (offsets, rest) = rest.split_at(off_len);
    let (names, table) = rest.split_at(rest.len() / 2);
    if let Ok(k) = Kallsyms::decode(num, names, table, index, offsets, 0xffff_ffff_8100_0000) {
        let _ = k.lookup("init_task");
        let _ = k.iter().count();
    }
}

/// Treats `data` as physical memory from 0: bytes 0..8 are CR3, 8..16 a
/// virtual address, byte 16 picks 5-level paging; translates and reads.
pub fn fuzz_page_walk(data: &[u8]) {
    let root = u64_at(data, 0);
    let va = u64_at(data, 8);
    let mode = if data.get(16).is_some_and(|b| b & 1 != 0) { PagingMode::Level5 } else { PagingMode::Level4 };
    let mem = SliceMem::new(alloc::vec![(0, data)]);
    let _ = translate(&mem, root, mode, va);
    let space = AddressSpace::new(&mem, root, mode);
    let mut buf: Vec<u8> = alloc::vec![0; 3 * 4096];
    let _ = space.read_virt(va, &mut buf);
}

/// Decodes `data` as an OS command, as the agent does: bytes 0..4 the `op`, 4..36 the
/// four `args`, the rest the data area (granted ranges, then the request's input). A
/// request that decodes must encode back to itself.
pub fn fuzz_os_request(data: &[u8]) {
    let op = u32::from_le_bytes([0, 1, 2, 3].map(|i| data.get(i).copied().unwrap_or(0)));
    let args = [0, 1, 2, 3].map(|i| u64_at(data, 4 + 8 * i));
    let area = data.get(36..).unwrap_or_default();
    let Ok((_, input)) = wire::decode_granted(area) else { return };
    if let Ok(request) = wire::OsRequest::decode(op, args, input) {
        let (op, args, input) = request.encode();
        assert_eq!(wire::OsRequest::decode(op, args, &input).as_ref(), Ok(&request), "{request:?} round trip");
    }
}

/// Runs the whole discovery and every view over `data` as RAM from 0.
pub fn fuzz_discover(data: &[u8]) {
    let mem = SliceMem::new(alloc::vec![(0, data)]);
    if let Ok(linux) = Linux::discover(&mem) {
        let _ = linux.kernel_info();
        let _ = linux.processes();
        let _ = linux.modules();
        let _ = crate::checks::Checker::new(&linux).run(&linux, crate::checks::select::ALL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cheap deterministic generator, so every entry point sees many inputs.
    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn entry_points_survive_noise() {
        for seed in 0..200u64 {
            let data = noise(seed, (seed as usize * 37) % 6000);
            fuzz_btf(&data);
            fuzz_vmcoreinfo(&data);
            fuzz_kallsyms(&data);
            fuzz_page_walk(&data);
            fuzz_discover(&data);
            fuzz_os_request(&data);
            // BTF-looking noise: a valid header over random types.
            let mut btf = alloc::vec![0x9f, 0xeb, 1, 0, 24, 0, 0, 0];
            let tl = (data.len() / 2) as u32;
            for w in [0, tl, tl, data.len() as u32 - tl] {
                btf.extend_from_slice(&w.to_le_bytes());
            }
            btf.extend_from_slice(&data);
            fuzz_btf(&btf);
        }
    }
}
