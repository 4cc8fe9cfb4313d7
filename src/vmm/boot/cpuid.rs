//! CPUID for a vCPU: KVM's supported list, normalised for the vCPU's place in the VM.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_PERFMON: u32 = 0xa;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_AMD_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;
/// "AuthenticAMD": leaf 0's EBX.
const AMD_EBX: u32 = u32::from_le_bytes(*b"Auth");
const ECX_CMP_LEGACY: u32 = 1 << 1;

const ECX_HYPERVISOR: u32 = 1 << 31;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const EDX_HTT: u32 = 1 << 28;

/// Normalises `cpuid` (from KVM_GET_SUPPORTED_CPUID) for vCPU `index` of `count`: APIC IDs and
/// topology (one socket, one thread per core), the hypervisor bit, and no PMU.
pub fn normalize(cpuid: &mut CpuId, index: u8, count: u8) {
    let amd = cpuid.as_slice().iter().any(|e| e.function == 0 && e.ebx == AMD_EBX);
    for e in cpuid.as_mut_slice() {
        match e.function {
            // AMD describes the package through its extended leaves: without this each vCPU looks
            // like a package of its own (Linux: "Max logical packages: N").
            LEAF_AMD_EXT_FEATURES if amd => {
                if count > 1 {
                    e.ecx |= ECX_CMP_LEGACY;
                } else {
                    e.ecx &= !ECX_CMP_LEGACY;
                }
            }
            LEAF_AMD_SIZES if amd => {
                // ECX[15:12]: APIC-id bits for cores; ECX[7:0]: cores in the package - 1.
                e.ecx = (e.ecx & !0xf0ff) | (bits_for(count) << 12) | u32::from(count.saturating_sub(1));
            }
            LEAF_AMD_TOPOLOGY if amd => {
                // Extended APIC id; compute unit id with one thread per unit; node 0 of 1.
                e.eax = u32::from(index);
                e.ebx = u32::from(index);
                e.ecx = 0;
                e.edx = 0;
            }
            LEAF_FEATURES => {
                // EBX: initial APIC id [31:24], logical processors [23:16], CLFLUSH line size / 8 [15:8].
                e.ebx = (u32::from(index) << 24) | (u32::from(count) << 16) | (8 << 8);
                e.ecx |= ECX_HYPERVISOR | ECX_TSC_DEADLINE;
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing the cache - 1.
                e.eax &= 0x3fff;
                e.eax |= (u32::from(count.saturating_sub(1)) & 0x3f) << 26;
            }
            LEAF_PERFMON => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            LEAF_EXT_TOPOLOGY => {
                // Sub-leaf 0: SMT level (1 thread per core); sub-leaf 1: core level (count cores).
                e.edx = u32::from(index);
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = bits_for(count);
                        e.ebx = u32::from(count);
                        e.ecx = (2 << 8) | 1;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            _ => {}
        }
    }
}

/// The CPUID vCPU `index` of `count` boots with: `supported` (KVM_GET_SUPPORTED_CPUID), normalised.
pub fn for_vcpu(supported: &CpuId, index: u8, count: u8) -> CpuId {
    let mut cpuid = supported.clone();
    normalize(&mut cpuid, index, count);
    cpuid
}

/// The CPUID bits KVM derives from a vCPU's state rather than from what the VMM set, as
/// (leaf, sub-leaf, register, mask) with registers numbered EAX..EDX as 0..3: the APIC bit
/// (APIC base MSR), OSXSAVE and OSPKE (CR4), the XSAVE area sizes (XCR0, IA32_XSS). KVM
/// recomputes them whenever that state is set, so a vCPU loaded with either of two CPUIDs that
/// differ only here ends up with the same one once its registers and MSRs are.
const DERIVED: [(u32, u32, usize, u32); 5] = [
    (LEAF_FEATURES, 0, 3, 1 << 9),
    (LEAF_FEATURES, 0, 2, 1 << 27),
    (0x7, 0, 2, 1 << 4),
    (0xd, 0, 1, u32::MAX),
    (0xd, 1, 1, u32::MAX),
];

/// Whether a vCPU given CPUID `loaded` and then a saved vCPU's registers and MSRs holds the CPUID
/// `saved` (what KVM_GET_CPUID2 gave for it): the same entries, in the same order, but for the
/// bits KVM derives from that state ([`DERIVED`]).
pub fn holds(loaded: &[kvm_cpuid_entry2], saved: &[kvm_cpuid_entry2]) -> bool {
    let regs = |e: &kvm_cpuid_entry2| [e.eax, e.ebx, e.ecx, e.edx];
    loaded.len() == saved.len()
        && loaded.iter().zip(saved).all(|(a, b)| {
            let (ra, rb) = (regs(a), regs(b));
            (a.function, a.index, a.flags) == (b.function, b.index, b.flags)
                && (0..4).all(|r| {
                    let derived = DERIVED
                        .iter()
                        .filter(|&&(f, i, reg, _)| f == a.function && i == a.index && reg == r)
                        .fold(0, |m, &(.., mask)| m | mask);
                    ra[r] & !derived == rb[r] & !derived
                })
        })
}

/// The number of APIC-id bits needed to number `count` cores.
fn bits_for(count: u8) -> u32 {
    let n = u32::from(count.max(1));
    32 - (n - 1).leading_zeros()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, ..Default::default() }
    }

    #[test]
    fn apic_id_and_topology() {
        let mut c = CpuId::from_entries(&[entry(1, 0), entry(0xb, 0), entry(0xb, 1), entry(0xa, 0)]).unwrap();
        normalize(&mut c, 3, 4);
        let s = c.as_slice();
        assert_eq!(s[0].ebx >> 24, 3);
        assert_eq!((s[0].ebx >> 16) & 0xff, 4);
        assert_ne!(s[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(s[0].edx & EDX_HTT, 0);
        assert_eq!(s[1].edx, 3);
        assert_eq!(s[2].ebx, 4);
        assert_eq!(s[2].eax, 2);
        assert_eq!(s[3].eax, 0);
    }

    #[test]
    fn holds_ignores_only_the_derived_bits() {
        let loaded = [entry(1, 0), entry(7, 0), entry(0xd, 0), entry(0xd, 1), entry(0x8000_0001, 0)];
        let mut saved = loaded;
        saved[0].ecx |= 1 << 27;
        saved[0].edx |= 1 << 9;
        saved[1].ecx |= 1 << 4;
        saved[2].ebx = 0x340;
        saved[3].ebx = 0x240;
        assert!(holds(&loaded, &saved));
        // Any other bit, entry or order differs.
        let mut other = saved;
        other[0].ecx |= 1 << 26;
        assert!(!holds(&loaded, &other));
        let mut other = saved;
        other[2].eax = 7;
        assert!(!holds(&loaded, &other));
        let mut other = saved;
        other[4].edx = 1 << 9;
        assert!(!holds(&loaded, &other));
        assert!(!holds(&loaded, &saved[..4]));
        let mut other = saved;
        other.swap(2, 3);
        assert!(!holds(&loaded, &other));
    }

    #[test]
    fn amd_package_leaves() {
        let vendor = kvm_cpuid_entry2 { function: 0, ebx: AMD_EBX, ..Default::default() };
        let mut c = CpuId::from_entries(&[
            vendor,
            entry(LEAF_AMD_EXT_FEATURES, 0),
            entry(LEAF_AMD_SIZES, 0),
            entry(LEAF_AMD_TOPOLOGY, 0),
        ])
        .unwrap();
        normalize(&mut c, 2, 4);
        let s = c.as_slice();
        assert_ne!(s[1].ecx & ECX_CMP_LEGACY, 0);
        assert_eq!(s[2].ecx & 0xff, 3);
        assert_eq!((s[2].ecx >> 12) & 0xf, 2);
        assert_eq!((s[3].eax, s[3].ebx, s[3].ecx), (2, 2, 0));
        // Not AMD: the AMD leaves are left alone.
        let mut c = CpuId::from_entries(&[entry(LEAF_AMD_SIZES, 0)]).unwrap();
        normalize(&mut c, 2, 4);
        assert_eq!(c.as_slice()[0].ecx, 0);
    }

    #[test]
    fn topology_bits() {
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(3), 2);
        assert_eq!(bits_for(4), 2);
        assert_eq!(bits_for(5), 3);
    }
}
