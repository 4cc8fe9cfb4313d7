//! The boot GDT and the KVM segment registers derived from it.

use kvm_bindings::kvm_segment;

/// A GDT entry from its flags (access byte in bits 0-7, flags in bits 12-15), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The GDT for the 64-bit Linux boot protocol: null, 64-bit code, data, TSS.
pub const GDT_64BIT: [u64; 4] =
    [gdt_entry(0, 0, 0), gdt_entry(0xa09b, 0, 0xfffff), gdt_entry(0xc093, 0, 0xfffff), gdt_entry(0x808b, 0, 0xfffff)];

/// The GDT for PVH entry (32-bit protected mode, flat): null, 32-bit code, data, TSS.
pub const GDT_PVH: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xc09b, 0, 0xffff_ffff),
    gdt_entry(0xc093, 0, 0xffff_ffff),
    gdt_entry(0x008b, 0, 0x67),
];

fn base(entry: u64) -> u64 {
    ((entry & 0xff00_0000_0000_0000) >> 32)
        | ((entry & 0x0000_00ff_0000_0000) >> 16)
        | ((entry & 0x0000_0000_ffff_0000) >> 16)
}

fn limit(entry: u64) -> u32 {
    let limit = (((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0xffff)) as u32;
    if bit(entry, 55) == 1 {
        (limit << 12) | 0xfff
    } else {
        limit
    }
}

fn bit(entry: u64, n: u32) -> u8 {
    ((entry >> n) & 1) as u8
}

/// The segment register that loading selector `index * 8` from this GDT entry produces.
pub fn segment(entry: u64, index: u8) -> kvm_segment {
    let present = bit(entry, 47);
    kvm_segment {
        base: base(entry),
        limit: limit(entry),
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(entry, 54),
        s: bit(entry, 44),
        l: bit(entry, 53),
        g: bit(entry, 55),
        avl: bit(entry, 52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code64_segment() {
        let s = segment(GDT_64BIT[1], 1);
        assert_eq!((s.selector, s.type_, s.present, s.l, s.db, s.s, s.g), (8, 0xb, 1, 1, 0, 1, 1));
        assert_eq!((s.base, s.limit), (0, 0xffff_ffff));
    }

    #[test]
    fn data_segment() {
        let s = segment(GDT_64BIT[2], 2);
        assert_eq!((s.selector, s.type_, s.present, s.l, s.db, s.s), (16, 0x3, 1, 0, 1, 1));
    }

    #[test]
    fn pvh_code32_segment_is_flat() {
        let s = segment(GDT_PVH[1], 1);
        assert_eq!((s.base, s.limit, s.db, s.l, s.type_), (0, 0xffff_ffff, 1, 0, 0xb));
    }

    #[test]
    fn tss_and_null_segments() {
        let t = segment(GDT_PVH[3], 3);
        assert_eq!((t.type_, t.s, t.limit, t.present), (0xb, 0, 0x67, 1));
        assert_eq!(segment(0, 0).unusable, 1);
    }

    #[test]
    fn known_encoding() {
        // The classic flat 64-bit code descriptor.
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
    }
}
