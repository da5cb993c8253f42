//! What the kernel is handed beside itself: the command line, the initramfs, the
//! e820 memory map, and the PVH start info or the Linux zero page that point at them.

use std::fs::File;
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::{
    linux::LinuxBootConfigurator, pvh::PvhBootConfigurator, BootConfigurator, BootParams,
};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use vm_memory::{Bytes, GuestAddress};

use super::{BootError, BZIMAGE_MAGIC};
use crate::arch::x86_64::layout::*;
use crate::memory::GuestRam;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// Initramfs must stay below this so 32-bit-addressing kernels can read it.
const INITRAMFS_MAX_END: u64 = 0x3800_0000;

/// The PVH memory map the guest is given: [`e820_map`] and the caller's extra entries.
pub fn pvh_memmap(ram: &GuestRam, extra: &[(u64, u64, u32)]) -> Vec<(u64, u64, u32)> {
    e820_map(ram).into_iter().chain(extra.iter().copied()).collect()
}

/// Loads the initramfs page-aligned at the top of low RAM.
pub(super) fn load_initramfs(ram: &GuestRam, path: &Path, kernel_end: u64) -> Result<(u64, u64), BootError> {
    let mut file = File::open(path).map_err(|e| BootError::OpenInitramfs { path: path.to_path_buf(), source: e })?;
    let size = file.metadata().map_err(|e| BootError::ReadInitramfs { path: path.to_path_buf(), source: e })?.len();
    let limit = ram.low_ram_end().min(INITRAMFS_MAX_END);
    let too_big = || BootError::InitramfsTooBig { path: path.to_path_buf(), size, kernel_end, limit };
    let start = limit.checked_sub(size).ok_or_else(too_big)? & !0xfff;
    if start < kernel_end.max(HIMEM_START) {
        return Err(too_big());
    }
    ram.memory().read_exact_volatile_from(GuestAddress(start), &mut file, size as usize).map_err(|e| {
        BootError::ReadInitramfs { path: path.to_path_buf(), source: std::io::Error::other(e.to_string()) }
    })?;
    Ok((start, size))
}

/// The command line `text`, within Linux's COMMAND_LINE_SIZE.
pub(super) fn build_cmdline(text: &str) -> Result<Cmdline, BootError> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    if !text.is_empty() {
        cmdline.insert_str(text).map_err(BootError::Cmdline)?;
    }
    Ok(cmdline)
}

/// The e820 map of guest RAM: low RAM, the reserved EBDA/BIOS area, RAM from
/// 1 MiB to the MMIO gap, and RAM above 4 GiB.
pub fn e820_map(ram: &GuestRam) -> Vec<(u64, u64, u32)> {
    let mut map = vec![(0, EBDA_START, E820_RAM), (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED)];
    for (base, size) in crate::memory::split_around_mmio_gap(ram.size()) {
        let start = base.max(HIMEM_START);
        let end = base + size;
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map
}

/// Writes the PVH start info, its memory map and the initramfs module entry.
pub(super) fn write_pvh_start_info(
    ram: &GuestRam,
    initramfs: Option<(u64, u64)>,
    rsdp: Option<u64>,
    extra: &[(u64, u64, u32)],
) -> Result<(), BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = pvh_memmap(ram, extra)
        .into_iter()
        .map(|(addr, size, type_)| hvm_memmap_table_entry { addr, size, type_, reserved: 0 })
        .collect();
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        rsdp_paddr: rsdp.unwrap_or(0),
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
    if let Some((paddr, size)) = initramfs {
        start_info.nr_modules = 1;
        start_info.modlist_paddr = PVH_MODLIST_START;
        params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
        params.set_modules(&[hvm_modlist_entry { paddr, size, ..Default::default() }], GuestAddress(PVH_MODLIST_START));
    }
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    PvhBootConfigurator::write_bootparams(&params, ram.memory())
        .map_err(|source| BootError::WriteBootData { what: "PVH start info", source })
}

/// Writes the Linux zero page: the setup header (the bzImage's, if any), the command
/// line, the initramfs and the e820 map.
pub(super) fn write_zero_page(
    ram: &GuestRam,
    header: Option<setup_header>,
    initramfs: Option<(u64, u64)>,
    cmdline_size: usize,
    rsdp: Option<u64>,
    extra: &[(u64, u64, u32)],
) -> Result<(), BootError> {
    let mut params = boot_params { acpi_rsdp_addr: rsdp.unwrap_or(0), ..Default::default() };
    if let Some(header) = header {
        params.hdr = header;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = BZIMAGE_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_size as u32;
    params.hdr.kernel_alignment = 0x0100_0000;
    if let Some((start, size)) = initramfs {
        params.hdr.ramdisk_image = start as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let mut map = e820_map(ram);
    map.extend_from_slice(extra);
    if map.len() > params.e820_table.len() {
        return Err(BootError::TooManyE820Entries { entries: map.len(), max: params.e820_table.len() });
    }
    for (slot, (addr, size, type_)) in params.e820_table.iter_mut().zip(&map) {
        slot.addr = *addr;
        slot.size = *size;
        slot.r#type = *type_;
    }
    params.e820_entries = map.len() as u8;
    let boot = BootParams::new(&params, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams(&boot, ram.memory())
        .map_err(|source| BootError::WriteBootData { what: "zero page", source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_reserves_the_bios_area_and_skips_the_mmio_gap() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let map = e820_map(&ram);
        assert_eq!(map[0], (0, EBDA_START, E820_RAM));
        assert_eq!(map[1].2, E820_RESERVED);
        assert_eq!(map[2], (HIMEM_START, (64 << 20) - HIMEM_START, E820_RAM));
    }

    #[test]
    fn overlong_cmdline_is_refused() {
        assert!(matches!(build_cmdline(&"x".repeat(CMDLINE_MAX_SIZE + 1)), Err(BootError::Cmdline(_))));
        assert!(build_cmdline("console=ttyS0").is_ok());
    }
}
