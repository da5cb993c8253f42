//! CPUID: KVM's supported set, normalized for each vCPU (APIC IDs, topology,
//! hypervisor bit) so that guests see a consistent single-socket machine.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;

const ECX_HYPERVISOR_BIT: u32 = 1 << 31;
const EDX_HTT_BIT: u32 = 1 << 28;

/// Topology level types in leaf 0xB/0x1F ECX[15:8].
const LEVEL_TYPE_THREAD: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Adjusts `cpuid` (KVM_GET_SUPPORTED_CPUID output) for vCPU `cpu_index` of `cpu_count`:
/// one socket, one thread per core, APIC ID = vCPU index.
pub fn normalize(cpuid: &mut CpuId, cpu_index: u8, cpu_count: u8) {
    let core_bits = bits_for(u32::from(cpu_count));
    for entry in cpuid.as_mut_slice() {
        normalize_entry(entry, u32::from(cpu_index), u32::from(cpu_count), core_bits);
    }
}

/// Number of bits needed to hold IDs `0..count`.
fn bits_for(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

fn normalize_entry(entry: &mut kvm_cpuid_entry2, cpu_index: u32, cpu_count: u32, core_bits: u32) {
    match entry.function {
        LEAF_FEATURES => {
            // EBX[31:24] initial APIC ID, EBX[23:16] logical processors per package.
            entry.ebx = (entry.ebx & 0x0000_ffff) | (cpu_index << 24) | ((cpu_count & 0xff) << 16);
            entry.ecx |= ECX_HYPERVISOR_BIT;
            if cpu_count > 1 {
                entry.edx |= EDX_HTT_BIT;
            } else {
                entry.edx &= !EDX_HTT_BIT;
            }
        }
        LEAF_CACHE_PARAMS => {
            // EAX[31:26] cores per package - 1; EAX[25:14] threads sharing this cache - 1.
            let cache_level = (entry.eax >> 5) & 0x7;
            let sharing = if cache_level >= 3 { cpu_count - 1 } else { 0 };
            entry.eax = (entry.eax & 0x0000_3fff) | ((cpu_count - 1) << 26) | ((sharing & 0xfff) << 14);
        }
        LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
            entry.edx = cpu_index;
            match entry.index {
                0 => {
                    entry.eax = 0;
                    entry.ebx = 1;
                    entry.ecx = (LEVEL_TYPE_THREAD << 8) | entry.index;
                }
                1 => {
                    entry.eax = core_bits;
                    entry.ebx = cpu_count;
                    entry.ecx = (LEVEL_TYPE_CORE << 8) | entry.index;
                }
                _ => {
                    entry.eax = 0;
                    entry.ebx = 0;
                    entry.ecx = entry.index;
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, ebx: 0x0000_0800, ..Default::default() }
    }

    #[test]
    fn apic_id_and_hypervisor_bit_are_per_vcpu() {
        let mut cpuid = CpuId::from_entries(&[entry(1, 0), entry(0xb, 0), entry(0xb, 1)]).unwrap();
        normalize(&mut cpuid, 3, 4);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_eq!(e[0].ebx & 0xffff, 0x0800, "low EBX bits are kept");
        assert_ne!(e[0].ecx & ECX_HYPERVISOR_BIT, 0);
        assert_ne!(e[0].edx & EDX_HTT_BIT, 0);
        assert_eq!(e[1].edx, 3);
        assert_eq!((e[2].eax, e[2].ebx, e[2].ecx >> 8), (2, 4, LEVEL_TYPE_CORE));
    }

    #[test]
    fn topology_bits_round_up() {
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(3), 2);
        assert_eq!(bits_for(4), 2);
        assert_eq!(bits_for(5), 3);
    }
}
