//! GDT entries and their KVM segment equivalents.

use kvm_bindings::kvm_segment;

/// Packs a GDT descriptor from its flags (type, S, DPL, P, AVL, L, D/B, G), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn get_base(entry: u64) -> u64 {
    (((entry) & 0xff00_0000_0000_0000) >> 32)
        | (((entry) & 0x0000_00ff_0000_0000) >> 16)
        | (((entry) & 0x0000_0000_ffff_0000) >> 16)
}

fn get_limit(entry: u64) -> u32 {
    let limit = ((((entry) & 0x000f_0000_0000_0000) >> 32) | ((entry) & 0x0000_0000_0000_ffff)) as u32;
    // With 4 KiB granularity the limit counts pages.
    if get_g(entry) == 1 {
        (limit << 12) | 0xfff
    } else {
        limit
    }
}

fn get_g(entry: u64) -> u8 {
    ((entry & 0x0080_0000_0000_0000) >> 55) as u8
}

/// The KVM segment register state that loading `entry` at `table_index` would produce.
pub fn kvm_segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    kvm_segment {
        base: get_base(entry),
        limit: get_limit(entry),
        selector: u16::from(table_index) * 8,
        type_: ((entry & 0x0000_0f00_0000_0000) >> 40) as u8,
        present: ((entry & 0x0000_8000_0000_0000) >> 47) as u8,
        dpl: ((entry & 0x0000_6000_0000_0000) >> 45) as u8,
        db: ((entry & 0x0040_0000_0000_0000) >> 54) as u8,
        s: ((entry & 0x0000_1000_0000_0000) >> 44) as u8,
        l: ((entry & 0x0020_0000_0000_0000) >> 53) as u8,
        g: get_g(entry),
        avl: ((entry & 0x0010_0000_0000_0000) >> 52) as u8,
        padding: 0,
        unusable: u8::from((entry & 0x0000_8000_0000_0000) == 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_code_segment_round_trips() {
        let seg = kvm_segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!((seg.selector, seg.type_, seg.l, seg.db, seg.g, seg.present, seg.s), (8, 0xb, 1, 0, 1, 1, 1));
        assert_eq!(seg.limit, 0xffff_ffff);
    }

    #[test]
    fn system_segments_decode_base_type_and_granularity() {
        let seg = kvm_segment_from_gdt(gdt_entry(0x808b, 0x1234_5678, 0xfffff), 3);
        assert_eq!((seg.base, seg.type_, seg.s, seg.g), (0x1234_5678, 0xb, 0, 1));
        assert_eq!(seg.limit, 0xffff_ffff, "page granularity scales the limit");
        let bytes = kvm_segment_from_gdt(gdt_entry(0x0089, 0x1000, 0x67), 5);
        assert_eq!((bytes.limit, bytes.g, bytes.selector), (0x67, 0, 40));
    }
}
