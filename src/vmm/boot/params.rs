//! What the kernel is told at entry: the PVH start info (PVH entry) or the zero page (Linux 64-bit
//! boot protocol), each with the memory map, the command line and the initramfs.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use vm_memory::GuestAddress;

use crate::memory::{
    memory_map, GuestMemory, MemoryMapEntry, CMDLINE_START, PVH_INFO_START, PVH_MEMMAP_START, PVH_MODLIST_START,
    ZERO_PAGE_START,
};

/// Where the initramfs was loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdLocation {
    pub addr: u64,
    pub size: u64,
}

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const E820_MAX_ENTRIES: usize = 128;

/// Writes the PVH start info, its memory map and module list (the initramfs).
pub fn write_pvh_start_info(
    mem: &GuestMemory,
    mem_bytes: u64,
    initrd: Option<InitrdLocation>,
) -> Result<(), linux_loader::configurator::Error> {
    let memmap: Vec<hvm_memmap_table_entry> = memory_map(mem_bytes)
        .iter()
        .map(|e: &MemoryMapEntry| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        })
        .collect();
    let modules: Vec<hvm_modlist_entry> =
        initrd.map(|i| hvm_modlist_entry { paddr: i.addr, size: i.size, ..Default::default() }).into_iter().collect();
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() { 0 } else { PVH_MODLIST_START },
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemory>(&params, mem)
}

/// Builds the zero page for the Linux 64-bit boot protocol. `header` is the kernel's own setup header
/// (bzImage) or `None` (an ELF vmlinux without a PVH note).
pub fn zero_page(
    header: Option<setup_header>,
    mem_bytes: u64,
    cmdline_size: usize,
    initrd: Option<InitrdLocation>,
) -> boot_params {
    let mut params = boot_params::default();
    if let Some(h) = header {
        params.hdr = h;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_size as u32;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    if let Some(i) = initrd {
        params.hdr.ramdisk_image = i.addr as u32;
        params.hdr.ramdisk_size = i.size as u32;
    }
    let map = memory_map(mem_bytes);
    for (slot, e) in params.e820_table.iter_mut().zip(map.iter()).take(E820_MAX_ENTRIES) {
        *slot = boot_e820_entry { addr: e.addr, size: e.size, r#type: e.kind as u32 };
    }
    params.e820_entries = map.len().min(params.e820_table.len()) as u8;
    params
}

/// Writes the zero page.
pub fn write_zero_page(mem: &GuestMemory, params: &boot_params) -> Result<(), linux_loader::configurator::Error> {
    let bp = BootParams::new(params, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams::<GuestMemory>(&bp, mem)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{create_guest_memory, MIB};
    use vm_memory::Bytes;

    #[test]
    fn zero_page_fields() {
        let initrd = InitrdLocation { addr: 0x700_0000, size: 0x1234 };
        let p = zero_page(None, 128 * MIB, 100, Some(initrd));
        let hdr = p.hdr;
        assert_eq!({ hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ hdr.cmdline_size }, 100);
        assert_eq!({ hdr.ramdisk_image }, 0x700_0000);
        assert_eq!({ hdr.ramdisk_size }, 0x1234);
        assert_eq!(p.e820_entries, 4, "low RAM, EBDA, RAM, mailbox");
        let last = p.e820_table[2];
        assert_eq!(({ last.addr }, { last.size }, { last.r#type }), (0x10_0000, 127 * MIB, 1));
    }

    #[test]
    fn pvh_start_info_is_written() {
        let mem = create_guest_memory(32 * MIB).unwrap();
        let initrd = InitrdLocation { addr: 0x100_0000, size: 4096 };
        write_pvh_start_info(&mem, 32 * MIB, Some(initrd)).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.memmap_entries, 4, "low RAM, EBDA, RAM, mailbox");
        assert_eq!(info.nr_modules, 1);
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0x100_0000, 4096));
        let e: hvm_memmap_table_entry = mem.read_obj(GuestAddress(info.memmap_paddr + 2 * 24)).unwrap();
        assert_eq!((e.addr, e.size, e.type_), (0x10_0000, 31 * MIB, 1));
    }
}
