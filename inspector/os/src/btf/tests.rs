use super::build::Builder;
use super::*;
use alloc::string::ToString;

fn sample() -> Btf {
    let mut b = Builder::new();
    let int = b.int("int", 4); // 1
    let ulong = b.int("long unsigned int", 8); // 2
    let lh = b.strukt("list_head", 16, &[]); // 3: filled below via a second record? keep simple
    let lh_ptr = b.ptr(lh); // 4
    let _ = lh_ptr;
    let chr = b.int("char", 1); // 5
    let arr = b.raw("", 3, 0, false, 0, &[chr, int, 16]); // 6: char[16]
    let kuid = b.strukt("", 4, &[("val", int, 0, 0)]); // 7
    let kuid_t = b.raw("kuid_t", 8, 0, false, kuid, &[]); // 8 typedef
    let cnst = b.raw("", 10, 0, false, kuid_t, &[]); // 9 const kuid_t
    let anon = b.strukt("", 16, &[("pgd", ulong, 0, 0), ("arg_start", ulong, 64, 0)]); // 10
    let bits = b.strukt("", 4, &[("lo", int, 0, 3), ("hi", int, 3, 5)]); // 11 bitfields
    let (a, c) = (b.s("MOD_TEXT"), b.s("MOD_DATA"));
    b.raw("mod_mem_type", 6, 2, false, 4, &[a, 0, c, 1]); // 12
    let _task = b.strukt(
        "task_struct",
        128,
        &[
            ("tasks", lh, 64, 0),
            ("comm", arr, 256, 0),
            ("uid", cnst, 384, 0),
            ("", anon, 512, 0),
            ("flags", bits, 640, 0),
        ],
    );
    let big = b.s("BIG");
    b.raw("", 19, 1, false, 8, &[big, 0x2, 0x1]); // ENUM64 BIG = 1<<32|2
    Btf::parse(b.blob()).unwrap()
}

#[test]
fn members_modifiers_and_anonymous_structs() {
    let btf = sample();
    assert_eq!(btf.member("task_struct", "tasks").unwrap().offset, 8);
    let comm = btf.member("task_struct", "comm").unwrap();
    assert_eq!((comm.offset, btf.size_of(comm.type_id).unwrap()), (32, 16));
    assert_eq!(btf.describe(comm.type_id), "char[16]");
    // Through const and typedef into the anonymous struct's member.
    assert_eq!(btf.member("task_struct", "uid.val").unwrap().offset, 48);
    assert_eq!(btf.member("task_struct", "arg_start").unwrap().offset, 72);
    let hi = btf.member("task_struct", "flags.hi").unwrap();
    assert_eq!((hi.bit_offset, hi.bitfield_size), (643, 5));
    assert!(btf.member("task_struct", "nope").unwrap_err().to_string().contains("no member nope"));
    assert!(btf.member("task_struct", "tasks.x").is_err());
    assert_eq!(btf.enum_value("BIG").unwrap(), (1 << 32) | 2);
    assert_eq!(btf.enum_value("MOD_DATA").unwrap(), 1);
    assert_eq!(btf.enum_name(12, 0).unwrap(), Some("MOD_TEXT"));
    assert!(btf.struct_id("mm_struct").is_err());
}

#[test]
fn hostile_blobs_are_errors() {
    let good = sample();
    let blob = {
        let mut b = Builder::new();
        b.int("int", 4);
        b.blob()
    };
    assert!(Btf::parse(blob.clone()).is_ok());
    for cut in 0..blob.len() {
        let _ = Btf::parse(blob[..cut].to_vec()); // never panics
    }
    let mut bad = blob.clone();
    bad[0] = 0;
    assert!(Btf::parse(bad).unwrap_err().to_string().contains("magic"));
    let mut bad = blob.clone();
    bad[12..16].copy_from_slice(&u32::MAX.to_le_bytes()); // type_len absurd
    assert!(Btf::parse(bad).unwrap_err().to_string().contains("runs past"));
    let mut bad = blob.clone();
    bad[24 + 7] = 31; // kind 31
    assert!(Btf::parse(bad).unwrap_err().to_string().contains("unknown kind"));
    // A typedef cycle: 1 -> 2 -> 1.
    let mut b = Builder::new();
    b.raw("a", 8, 0, false, 2, &[]);
    b.raw("b", 8, 0, false, 1, &[]);
    let cyc = Btf::parse(b.blob()).unwrap();
    assert!(cyc.resolve(1).is_err());
    assert!(cyc.size_of(1).is_err());
    // A struct with a huge vlen runs past the section.
    let mut b = Builder::new();
    b.raw("s", 4, 0xffff, false, 8, &[]);
    assert!(Btf::parse(b.blob()).is_err());
    // Dangling type ids and string offsets are lookup errors, not panics.
    let mut b = Builder::new();
    b.raw("", 4, 1, false, 8, &[99999, 77, 0]);
    b.raw("p", 2, 0, false, 12345, &[]);
    let d = Btf::parse(b.blob()).unwrap();
    assert!(d.members(1).is_err());
    assert!(d.size_of(2).is_ok()); // a pointer's size does not need its target
    assert!(d.member_of(1, "x").is_err());
    let _ = d.describe(2);
    let _ = good.describe(999);
    // Self-nested anonymous struct: bounded.
    let mut b = Builder::new();
    b.raw("", 4, 1, false, 8, &[0, 1, 0]);
    let selfish = Btf::parse(b.blob()).unwrap();
    assert!(selfish.member_of(1, "x").is_err());
    // Array of arrays that overflows.
    let mut b = Builder::new();
    b.int("int", 4);
    b.raw("", 3, 0, false, 0, &[1, 1, u32::MAX]);
    b.raw("", 3, 0, false, 0, &[2, 1, u32::MAX]);
    b.raw("", 3, 0, false, 0, &[3, 1, u32::MAX]);
    assert!(Btf::parse(b.blob()).unwrap().size_of(4).is_err());
}
