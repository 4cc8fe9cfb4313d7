//! Guest physical memory: the x86_64 layout ember gives every guest, and the RAM backing it.
//!
//! ```text
//! 0x0000_0500  GDT                      0x0000_9000  PML4 (64-bit boot)
//! 0x0000_0520  IDT (empty)              0x0000_a000  PDPT
//! 0x0000_6000  PVH start info           0x0000_b000  PD (first GiB, 2 MiB pages)
//! 0x0000_6040  PVH module list          0x0002_0000  kernel command line
//! 0x0000_7000  zero page / PVH memmap   0x0009_fc00  MP table (EBDA, reserved)
//! 0x0000_8ff0  boot stack               0x0010_0000  kernel (1 MiB)
//! 0xd000_0000 .. 0xffff_ffff  MMIO gap: ember's MMIO devices, and the mailbox (0xd010_0000, 1 MiB,
//!                             reserved in the e820 map); RAM resumes at 4 GiB
//! ```

pub use ember_abi::mailbox::{MAILBOX_ADDR, MAILBOX_SIZE};
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Guest RAM as ember maps it: anonymous, private, lazily populated.
pub type GuestMemory = GuestMemoryMmap<()>;

pub const PAGE_SIZE: u64 = 4096;
pub const MIB: u64 = 1 << 20;

pub const GDT_START: u64 = 0x500;
pub const IDT_START: u64 = 0x520;
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MODLIST_START: u64 = 0x6040;
pub const PVH_MEMMAP_START: u64 = 0x7000;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
pub const PD_START: u64 = 0xb000;
pub const CMDLINE_START: u64 = 0x2_0000;
/// Linux's COMMAND_LINE_SIZE on x86, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// The extended BIOS data area: the MP table lives here and the range up to 640 KiB is reserved.
pub const EBDA_START: u64 = 0x9_fc00;
pub const LOW_MEM_END: u64 = 0xa_0000;
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO gap; RAM above it is moved to 4 GiB.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
pub const MMIO_GAP_END: u64 = 1 << 32;
/// The boot timer (Firecracker's address and protocol: the guest writes 123 at offset 0).
pub const BOOT_TIMER_ADDR: u64 = MMIO_GAP_START;
pub const BOOT_TIMER_SIZE: u64 = 0x1000;

/// ember's control page (clone id, seed, doorbells), right after the boot timer.
pub const CONTROL_ADDR: u64 = ember_abi::control::CONTROL_ADDR;
pub const CONTROL_SIZE: u64 = ember_abi::control::CONTROL_SIZE;
/// virtio-mmio devices: one 4 KiB window each, from here, after the control page.
pub const VIRTIO_MMIO_BASE: u64 = MMIO_GAP_START + 0x2000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The first virtio device's GSI (IOAPIC pin); COM1 has 4. Device `i` has `VIRTIO_FIRST_IRQ + i`.
pub const VIRTIO_FIRST_IRQ: u32 = 5;
/// How many virtio devices a VM can have: one IOAPIC pin each, up to pin 23.
pub const MAX_VIRTIO_DEVICES: usize = 24 - VIRTIO_FIRST_IRQ as usize;

/// Where virtio device `index` lives: its MMIO window's base and its GSI.
pub const fn virtio_slot(index: usize) -> (u64, u32) {
    (VIRTIO_MMIO_BASE + index as u64 * VIRTIO_MMIO_SIZE, VIRTIO_FIRST_IRQ + index as u32)
}

/// The most vCPUs ember's machine has (its MP table lives in the 1 KiB EBDA).
pub const MAX_VCPUS: u8 = 32;

const _: () = assert!(CONTROL_ADDR == BOOT_TIMER_ADDR + BOOT_TIMER_SIZE);
const _: () = assert!(VIRTIO_MMIO_BASE >= CONTROL_ADDR + CONTROL_SIZE);
const _: () = assert!(VIRTIO_MMIO_BASE + MAX_VIRTIO_DEVICES as u64 * VIRTIO_MMIO_SIZE <= MAILBOX_ADDR);
const _: () = assert!(MAILBOX_ADDR >= BOOT_TIMER_ADDR + 0x10_0000 && MAILBOX_ADDR + MAILBOX_SIZE <= MMIO_GAP_END);

/// The smallest guest ember accepts; the kernel and initramfs must also fit (checked when loading).
pub const MIN_MEM_MIB: u64 = 16;

// The fixed boot structures must not overlap (checked at compile time).
const _: () = assert!(GDT_START + 4 * 8 <= IDT_START);
const _: () = assert!(PVH_MODLIST_START >= PVH_INFO_START + 56);
const _: () = assert!(ZERO_PAGE_START + PAGE_SIZE <= BOOT_STACK_POINTER + 16);
const _: () = assert!(PD_START + PAGE_SIZE <= CMDLINE_START);
const _: () = assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);

/// The RAM ranges of a guest of `mem_bytes`: one below the MMIO gap and, for large guests, one above
/// 4 GiB.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(GuestAddress, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(GuestAddress(0), mem_bytes)]
    } else {
        vec![(GuestAddress(0), MMIO_GAP_START), (GuestAddress(MMIO_GAP_END), mem_bytes - MMIO_GAP_START)]
    }
}

/// The kind of an e820 / PVH memory map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryKind {
    Ram = 1,
    Reserved = 2,
}

/// One entry of the guest's memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryMapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: MemoryKind,
}

/// The memory map the guest is told about (e820 for the Linux boot protocol, the PVH memmap):
/// low RAM up to the EBDA, the EBDA reserved, RAM from 1 MiB with the MMIO gap left out, and the
/// mailbox reserved (the guest kernel never uses it; the agent maps it through /dev/mem).
pub fn memory_map(mem_bytes: u64) -> Vec<MemoryMapEntry> {
    let mut map = vec![
        MemoryMapEntry { addr: 0, size: EBDA_START, kind: MemoryKind::Ram },
        MemoryMapEntry { addr: EBDA_START, size: LOW_MEM_END - EBDA_START, kind: MemoryKind::Reserved },
    ];
    for (start, size) in ram_ranges(mem_bytes) {
        let start = start.0.max(HIMEM_START);
        let end = if start >= MMIO_GAP_END { start + size } else { size };
        if end > start {
            map.push(MemoryMapEntry { addr: start, size: end - start, kind: MemoryKind::Ram });
        }
    }
    let mailbox = MemoryMapEntry { addr: MAILBOX_ADDR, size: MAILBOX_SIZE, kind: MemoryKind::Reserved };
    let at = map.partition_point(|e| e.addr < MAILBOX_ADDR);
    map.insert(at, mailbox);
    map
}

/// Allocates guest RAM (anonymous, MAP_NORESERVE: pages cost nothing until touched).
pub fn create_guest_memory(mem_bytes: u64) -> Result<GuestMemory, vm_memory::mmap::FromRangesError> {
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(mem_bytes).into_iter().map(|(a, s)| (a, s as usize)).collect();
    GuestMemory::from_ranges(&ranges)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_range() {
        assert_eq!(ram_ranges(128 * MIB), vec![(GuestAddress(0), 128 * MIB)]);
    }

    #[test]
    fn large_guest_skips_the_mmio_gap() {
        let r = ram_ranges(4096 * MIB);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START));
        assert_eq!(r[1].0, GuestAddress(MMIO_GAP_END));
        assert_eq!(r[0].1 + r[1].1, 4096 * MIB);
    }

    #[test]
    fn memory_map_of_a_small_guest() {
        let m = memory_map(128 * MIB);
        assert_eq!(
            m,
            vec![
                MemoryMapEntry { addr: 0, size: EBDA_START, kind: MemoryKind::Ram },
                MemoryMapEntry { addr: EBDA_START, size: 0x400, kind: MemoryKind::Reserved },
                MemoryMapEntry { addr: HIMEM_START, size: 128 * MIB - HIMEM_START, kind: MemoryKind::Ram },
                MemoryMapEntry { addr: MAILBOX_ADDR, size: MAILBOX_SIZE, kind: MemoryKind::Reserved },
            ]
        );
    }

    #[test]
    fn memory_map_never_covers_the_mmio_gap() {
        for mib in [16, 128, 3328, 3329, 8192] {
            for e in memory_map(mib * MIB).into_iter().filter(|e| e.kind == MemoryKind::Ram) {
                let end = e.addr + e.size;
                assert!(end <= MMIO_GAP_START || e.addr >= MMIO_GAP_END, "{mib} MiB: {e:?}");
            }
            let ram: u64 = memory_map(mib * MIB).iter().filter(|e| e.kind == MemoryKind::Ram).map(|e| e.size).sum();
            assert_eq!(ram, mib * MIB - (HIMEM_START - EBDA_START));
            let m = memory_map(mib * MIB);
            assert!(m.windows(2).all(|w| w[0].addr + w[0].size <= w[1].addr), "{mib} MiB: sorted, disjoint");
        }
    }
}
