//! The register state a vCPU starts the kernel in.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use super::gdt::{segment, GDT_64BIT, GDT_PVH};
use super::EntryPoint;
use crate::memory::{
    GuestMemory, BOOT_STACK_POINTER, GDT_START, IDT_START, PDPT_START, PD_START, PML4_START, PVH_INFO_START,
    ZERO_PAGE_START,
};

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// General-purpose registers at kernel entry.
pub fn boot_regs(entry: EntryPoint) -> kvm_regs {
    match entry {
        EntryPoint::Pvh(rip) => kvm_regs { rflags: 0x2, rip, rbx: PVH_INFO_START, ..Default::default() },
        EntryPoint::Linux64(rip) => kvm_regs {
            rflags: 0x2,
            rip,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        },
    }
}

/// The x87/SSE state Linux expects: FCW 0x37f, MXCSR 0x1f80.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() }
}

/// Writes the boot GDT (and an empty IDT) for `entry` and, for 64-bit entry, identity page tables for
/// the first GiB.
pub fn write_boot_tables(mem: &GuestMemory, entry: EntryPoint) -> Result<(), vm_memory::GuestMemoryError> {
    let gdt: &[u64; 4] = match entry {
        EntryPoint::Pvh(_) => &GDT_PVH,
        EntryPoint::Linux64(_) => &GDT_64BIT,
    };
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_START + i as u64 * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_START))?;
    if let EntryPoint::Linux64(_) = entry {
        mem.write_obj(PDPT_START | 0x3, GuestAddress(PML4_START))?;
        mem.write_obj(PD_START | 0x3, GuestAddress(PDPT_START))?;
        for i in 0..512u64 {
            // 2 MiB pages: present, writable, page size.
            mem.write_obj((i << 21) | 0x83, GuestAddress(PD_START + i * 8))?;
        }
    }
    Ok(())
}

/// Special registers at kernel entry, on top of the vCPU's current ones.
pub fn boot_sregs(mut sregs: kvm_sregs, entry: EntryPoint) -> kvm_sregs {
    let gdt: &[u64; 4] = match entry {
        EntryPoint::Pvh(_) => &GDT_PVH,
        EntryPoint::Linux64(_) => &GDT_64BIT,
    };
    let code = segment(gdt[1], 1);
    let data = segment(gdt[2], 2);
    let tss = segment(gdt[3], 3);
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match entry {
        EntryPoint::Pvh(_) => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        EntryPoint::Linux64(_) => {
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
    }
    sregs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{create_guest_memory, MIB};

    #[test]
    fn pvh_entry_state() {
        let r = boot_regs(EntryPoint::Pvh(0x100_0000));
        assert_eq!((r.rip, r.rbx, r.rflags), (0x100_0000, PVH_INFO_START, 2));
        let s = boot_sregs(kvm_sregs::default(), EntryPoint::Pvh(0));
        assert_eq!(s.cr0 & X86_CR0_PG, 0);
        assert_eq!(s.cr0 & X86_CR0_PE, 1);
        assert_eq!((s.cs.db, s.cs.l, s.cs.selector), (1, 0, 8));
    }

    #[test]
    fn long_mode_entry_state_and_page_tables() {
        let s = boot_sregs(kvm_sregs::default(), EntryPoint::Linux64(0x100_0000));
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!((s.cs.l, s.cr3), (1, PML4_START));
        let mem = create_guest_memory(16 * MIB).unwrap();
        write_boot_tables(&mem, EntryPoint::Linux64(0)).unwrap();
        let pde: u64 = mem.read_obj(GuestAddress(PD_START + 8)).unwrap();
        assert_eq!(pde, (1 << 21) | 0x83);
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPT_START | 3);
    }
}
