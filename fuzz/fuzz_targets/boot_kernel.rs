//! Fuzzes kernel loading, `vmm::boot::load`, with a fuzzed kernel image (ELF with
//! or without PVH and Specula notes, bzImage, or junk), command line, initramfs
//! size, ACPI RSDP address and extra memory-map entries, into real `GuestRam`
//! (sealed memfd chunks, as the vmm uses) of 2 MiB, 64 MiB or 4 GiB + 2 MiB.
//! The image is written to a memfd and opened by its /proc/self/fd path, as the
//! vmm opens `--kernel`; the initramfs is a sparse memfd of the chosen size.
//!
//! Checks: every input loads or fails with a `BootError`, never panics or hangs
//! (libFuzzer's -timeout), and never writes outside guest memory (vm-memory
//! bounds every access; a stray write would fault). An accepted image also left
//! what its boot protocol promises in guest RAM: the command line (less the
//! surrounding whitespace linux-loader trims) at CMDLINE_START, the PVH start
//! info (magic) or the zero page (boot flag, HdrS); and the protocol matches the
//! image (bzImages boot Linux64; the SMP-entry note only comes with PVH).
//!
//! Input: a 16-byte prefix, then `cmdline_len` bytes of command line, then the image.
//!   [0] flags: bit0 initramfs, bit1 initramfs size in 256-byte units, bit2 RSDP,
//!       bits3-4 RAM (0/3: 2 MiB, 1: 64 MiB, 2: 4 GiB + 2 MiB)
//!   [1] extra memory-map entries   [2..4] initramfs size   [4..6] cmdline_len
//!   [6..14] RSDP address           [14..16] unused
#![no_main]

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vmm::arch::x86_64::layout::{CMDLINE_START, PVH_INFO_START, ZERO_PAGE_START};
use vmm::arch::x86_64::regs::BootProtocol;
use vmm::boot::{load, BootSource};
use vmm::memory::GuestRam;

const PREFIX: usize = 16;

struct Fixture {
    rams: [GuestRam; 3],
    kernel: File,
    kernel_path: PathBuf,
    initramfs: File,
    initramfs_path: PathBuf,
}

fn memfd(name: &std::ffi::CStr) -> File {
    // SAFETY: a valid NUL-terminated name and flags; the fd is owned by the File.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: fd was just returned by memfd_create.
    unsafe { File::from_raw_fd(fd) }
}

/// SPECULA_FUZZ_DEBUG=1 prints each load's outcome (for replaying a corpus or a crash).
fn debug() -> bool {
    static DEBUG: OnceLock<bool> = OnceLock::new();
    *DEBUG.get_or_init(|| std::env::var_os("SPECULA_FUZZ_DEBUG").is_some_and(|v| v == "1"))
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let kernel = memfd(c"fuzz-kernel");
        let initramfs = memfd(c"fuzz-initramfs");
        Fixture {
            rams: [
                GuestRam::new(2 << 20).unwrap(),
                GuestRam::new(64 << 20).unwrap(),
                GuestRam::new((4 << 30) + (2 << 20)).unwrap(),
            ],
            kernel_path: format!("/proc/self/fd/{}", kernel.as_raw_fd()).into(),
            initramfs_path: format!("/proc/self/fd/{}", initramfs.as_raw_fd()).into(),
            kernel,
            initramfs,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() < PREFIX {
        return;
    }
    let f = fixture();
    let (prefix, rest) = data.split_at(PREFIX);
    let flags = prefix[0];
    let ram = &f.rams[match (flags >> 3) & 3 {
        1 => 1,
        2 => 2,
        _ => 0,
    }];
    let extra_entries = usize::from(prefix[1]);
    let initramfs_size = u64::from(u16::from_le_bytes([prefix[2], prefix[3]])) * if flags & 2 != 0 { 256 } else { 1 };
    let cmdline_len = usize::from(u16::from_le_bytes([prefix[4], prefix[5]])).min(rest.len());
    let rsdp = (flags & 4 != 0).then(|| u64::from_le_bytes(prefix[6..14].try_into().unwrap()));
    let (cmdline, image) = rest.split_at(cmdline_len);
    let cmdline = String::from_utf8_lossy(cmdline).into_owned();

    f.kernel.set_len(0).unwrap();
    f.kernel.write_all_at(image, 0).unwrap();
    let initramfs = if flags & 1 != 0 {
        f.initramfs.set_len(0).unwrap();
        f.initramfs.set_len(initramfs_size).unwrap();
        Some(f.initramfs_path.clone())
    } else {
        None
    };
    let source = BootSource {
        kernel: f.kernel_path.clone(),
        initramfs,
        cmdline: cmdline.clone(),
        extra_memmap: (0..extra_entries as u64).map(|i| ((1 << 40) + (i << 21), 1 << 21, 0x5350_0001)).collect(),
    };

    let outcome = load(ram, &source, rsdp);
    if debug() {
        eprintln!("boot::load ({} MiB RAM) -> {outcome:?}", ram.size() >> 20);
    }
    let Ok(entry) = outcome else { return };

    let is_bzimage = image.len() >= 4 && &image[..4] != b"\x7fELF";
    if is_bzimage {
        assert_eq!(entry.protocol, BootProtocol::Linux64, "a bzImage boots through the 64-bit entry");
    }
    if entry.smp_entry_max_cpus.is_some() {
        assert_eq!(entry.protocol, BootProtocol::Pvh, "the SMP-entry note only counts with PVH");
    }
    let mem = ram.memory();
    // linux-loader's Cmdline::insert_str trims surrounding (Unicode) whitespace.
    let cmdline = cmdline.trim();
    let mut stored = vec![0u8; cmdline.len() + 1];
    mem.read_slice(&mut stored, GuestAddress(CMDLINE_START)).unwrap();
    assert_eq!(&stored[..cmdline.len()], cmdline.as_bytes(), "command line in guest RAM");
    assert_eq!(stored[cmdline.len()], 0, "command line is NUL-terminated");
    match entry.protocol {
        BootProtocol::Pvh => {
            let magic: u32 = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
            assert_eq!(magic, 0x336e_c578, "PVH start info magic");
        }
        BootProtocol::Linux64 => {
            let boot_flag: u16 = mem.read_obj(GuestAddress(ZERO_PAGE_START + 0x1fe)).unwrap();
            let header: u32 = mem.read_obj(GuestAddress(ZERO_PAGE_START + 0x202)).unwrap();
            assert_eq!((boot_flag, header), (0xaa55, 0x5372_6448), "zero page setup header");
        }
    }
});
