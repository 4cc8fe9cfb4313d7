//! The Intel MultiProcessor table (MP spec 1.4): how a guest without ACPI finds its vCPUs, its I/O APIC
//! and how ISA interrupts are wired. Written at the EBDA, where Linux looks for it.

use thiserror::Error;

/// The local APIC and I/O APIC addresses.
pub const APIC_DEFAULT_PHYS_BASE: u32 = 0xfee0_0000;
pub const IO_APIC_DEFAULT_PHYS_BASE: u32 = 0xfec0_0000;
/// The I/O APIC has 24 pins; KVM's in-kernel irqchip routes GSIs 0-23 to them.
pub const IOAPIC_PINS: u8 = 24;
pub use crate::memory::MAX_VCPUS;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;

const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum MpTableError {
    #[error("{0} vCPUs: the MP table supports 1 to {MAX_VCPUS}")]
    VcpuCount(u8),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b)).wrapping_neg()
}

/// Builds the MP floating pointer structure followed by the configuration table, for a table that
/// will be written at guest physical address `base`.
pub fn build(base: u64, vcpus: u8) -> Result<Vec<u8>, MpTableError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(MpTableError::VcpuCount(vcpus));
    }
    let ioapic_id = vcpus + 1;
    // Configuration table entries.
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..vcpus {
        entries.extend_from_slice(&[MP_PROCESSOR, cpu, APIC_VERSION]);
        entries.push(CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 });
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[MP_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[MP_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IO_APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    count += 1;
    for irq in 0..IOAPIC_PINS {
        // ISA IRQ n -> I/O APIC pin n, conforming polarity and trigger.
        entries.extend_from_slice(&[MP_INTSRC, MP_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0 of every local APIC is ExtINT (the PIC), LINT1 is NMI.
    entries.extend_from_slice(&[MP_LINTSRC, MP_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[MP_LINTSRC, MP_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    const MPF_SIZE: usize = 16;
    const MPC_HEADER_SIZE: usize = 44;
    let table_addr = base + MPF_SIZE as u64;
    let table_len = MPC_HEADER_SIZE + entries.len();

    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"EMBER   ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // extended table length + checksum + reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut mpf = Vec::with_capacity(MPF_SIZE + table_len);
    mpf.extend_from_slice(b"_MP_");
    mpf.extend_from_slice(&(table_addr as u32).to_le_bytes());
    mpf.push(1); // length in 16-byte units
    mpf.push(4); // spec revision 1.4
    mpf.push(0); // checksum, below
    mpf.extend_from_slice(&[0; 5]); // features: a configuration table is present
    mpf[10] = checksum(&mpf);
    mpf.extend_from_slice(&table);
    Ok(mpf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_pointers() {
        let base = 0x9fc00;
        for n in [1, 2, 8, MAX_VCPUS] {
            let t = build(base, n).unwrap();
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[0..16]), 0);
            let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
            assert_eq!(ptr, base + 16);
            let table = &t[16..];
            assert_eq!(&table[0..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0);
            let count = u16::from_le_bytes([table[34], table[35]]);
            assert_eq!(count as usize, n as usize + 2 + IOAPIC_PINS as usize + 2);
            assert!(t.len() <= 1024, "{n} vCPUs: {} bytes do not fit the EBDA", t.len());
        }
    }

    #[test]
    fn processors_are_listed_with_one_bsp() {
        let t = build(0, 4).unwrap();
        let entries = &t[16 + 44..];
        for cpu in 0..4 {
            let e = &entries[cpu * 20..cpu * 20 + 20];
            assert_eq!(e[0], MP_PROCESSOR);
            assert_eq!(e[1], cpu as u8);
            assert_eq!(e[3] & CPU_BOOTPROCESSOR != 0, cpu == 0);
        }
    }

    #[test]
    fn rejects_bad_counts() {
        assert_eq!(build(0, 0), Err(MpTableError::VcpuCount(0)));
        assert_eq!(build(0, MAX_VCPUS + 1), Err(MpTableError::VcpuCount(MAX_VCPUS + 1)));
    }
}
