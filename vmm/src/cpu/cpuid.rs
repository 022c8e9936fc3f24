//! The CPUID the guest sees: KVM's supported set, filtered per vCPU.
//!
//! What is changed and why:
//! - **APIC ids and topology** (leaf 1 EBX, leaf 4 EAX, leaves 0xB/0x1F): every vCPU is a core
//!   of one package, one thread per core, x2APIC id = vCPU index. Guests size their per-CPU
//!   data and pick the boot CPU from these.
//! - **Hypervisor bit** (leaf 1 ECX bit 31) and the **KVM signature** leaf 0x40000000
//!   ("KVMKVMKVM"): guests use the paravirtual clock and skip hardware-only quirks.
//! - **XSAVE only on hardware-backed KVM** ([`Xsave`]). Everything else KVM supports is passed
//!   through as KVM reports it (leaf 0xD included), the paravirtual leaves too (0x40000001:
//!   kvmclock, async page faults, PV EOI…). On the nested, software-assisted KVM of the build
//!   machines (kvm_pvm, no vmx/svm flag), Linux hit an emulation failure on XRSTOR during early
//!   boot; there XSAVE is hidden (leaf 1 ECX bits 26 XSAVE, 27 OSXSAVE, 28 AVX; leaf 7
//!   AVX2/AVX-512; leaf 0xD zeroed), and Linux uses FXSAVE/FXRSTOR and drops every feature that
//!   needs XSAVE.

use kvm_bindings::kvm_cpuid_entry2;

const LEAF_FEATURES: u32 = 1;
const LEAF_CACHE_PARAMS: u32 = 4;
const LEAF_EXTENDED_FEATURES: u32 = 7;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_XSAVE: u32 = 0xd;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_HYPERVISOR: u32 = 0x4000_0000;

const ECX_XSAVE: u32 = 1 << 26;
const ECX_OSXSAVE: u32 = 1 << 27;
const ECX_AVX: u32 = 1 << 28;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const LEAF7_EBX_AVX2: u32 = 1 << 5;
const LEAF7_EBX_AVX512F: u32 = 1 << 16;
const KVM_CPUID_FLAG_SIGNIFICANT_INDEX: u32 = 1;
/// The KVM feature leaf, 0x40000001, follows the signature leaf.
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;

/// Topology level types (leaf 0xB ECX[15:8]).
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Whether the guest gets XSAVE (and AVX).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Xsave {
    /// As KVM supports it: KVM is hardware-backed (the CPU has vmx/svm).
    Pass,
    /// Hidden: KVM is software-assisted (kvm_pvm), where XRSTOR cannot be emulated.
    Hide,
}

impl Xsave {
    /// [`Xsave::Pass`] where /proc/cpuinfo shows hardware virtualization.
    pub fn for_this_host() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        if crate::accel::has_hardware_virtualization(&cpuinfo) { Self::Pass } else { Self::Hide }
    }
}

/// Filters KVM's supported CPUID for vCPU `cpu` of `cpus`.
pub fn filter(supported: &[kvm_cpuid_entry2], cpu: u8, cpus: u8, xsave: Xsave) -> Vec<kvm_cpuid_entry2> {
    let hide_xsave = xsave == Xsave::Hide;
    let apic_id = u32::from(cpu);
    let cpus = u32::from(cpus.max(1));
    let mut entries: Vec<kvm_cpuid_entry2> = supported
        .iter()
        .filter(|e| e.function != LEAF_TOPOLOGY && e.function != LEAF_TOPOLOGY_V2)
        .copied()
        .collect();
    let has_v2_topology = supported.iter().any(|e| e.function == LEAF_TOPOLOGY_V2);
    for entry in &mut entries {
        match entry.function {
            LEAF_FEATURES => {
                entry.ebx = (entry.ebx & 0x0000_ffff) | (apic_id << 24) | ((cpus & 0xff) << 16);
                if hide_xsave {
                    entry.ecx &= !(ECX_XSAVE | ECX_OSXSAVE | ECX_AVX);
                }
                entry.ecx |= ECX_HYPERVISOR;
                if cpus > 1 {
                    entry.edx |= EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                entry.eax = (entry.eax & 0x03ff_ffff) | ((cpus - 1) << 26);
            }
            LEAF_EXTENDED_FEATURES if entry.index == 0 && hide_xsave => {
                entry.ebx &= !(LEAF7_EBX_AVX2 | LEAF7_EBX_AVX512F);
            }
            LEAF_XSAVE if hide_xsave => {
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            LEAF_HYPERVISOR => {
                entry.eax = KVM_CPUID_FEATURES;
                entry.ebx = u32::from_le_bytes(*b"KVMK");
                entry.ecx = u32::from_le_bytes(*b"VMKV");
                entry.edx = u32::from_le_bytes(*b"M\0\0\0");
            }
            _ => {}
        }
    }
    if !entries.iter().any(|e| e.function == LEAF_HYPERVISOR) {
        entries.push(kvm_cpuid_entry2 {
            function: LEAF_HYPERVISOR,
            eax: KVM_CPUID_FEATURES,
            ebx: u32::from_le_bytes(*b"KVMK"),
            ecx: u32::from_le_bytes(*b"VMKV"),
            edx: u32::from_le_bytes(*b"M\0\0\0"),
            ..Default::default()
        });
    }
    let mut leaves = vec![LEAF_TOPOLOGY];
    if has_v2_topology {
        leaves.push(LEAF_TOPOLOGY_V2);
    }
    for leaf in leaves {
        entries.extend(topology(leaf, apic_id, cpus));
    }
    entries
}

/// The x2APIC topology subleaves: SMT (1 thread), core (`cpus` cores), then the terminator.
fn topology(leaf: u32, apic_id: u32, cpus: u32) -> [kvm_cpuid_entry2; 3] {
    let core_shift = 32 - (cpus - 1).leading_zeros();
    let entry = |index: u32, eax: u32, ebx: u32, level: u32| kvm_cpuid_entry2 {
        function: leaf,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFICANT_INDEX,
        eax,
        ebx,
        ecx: (level << 8) | index,
        edx: apic_id,
        ..Default::default()
    };
    [entry(0, 0, 1, LEVEL_SMT), entry(1, core_shift, cpus, LEVEL_CORE), entry(2, 0, 0, 0)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, ecx: u32, ebx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, ecx, ebx, ..Default::default() }
    }

    fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *entries.iter().find(|e| e.function == function && e.index == index).expect("leaf present")
    }

    #[test]
    fn apic_ids_topology_hypervisor_and_no_xsave() {
        let supported = [
            leaf(1, 0, ECX_XSAVE | ECX_OSXSAVE | ECX_AVX | 1, 0x0800),
            leaf(7, 0, 0, LEAF7_EBX_AVX2 | LEAF7_EBX_AVX512F | 1),
            leaf(0xb, 0, 0, 7),
            leaf(0xd, 0, 0x340, 0x340),
            leaf(0xd, 1, 0, 0xf),
        ];
        let entries = filter(&supported, 2, 4, Xsave::Hide);
        let l1 = find(&entries, 1, 0);
        assert_eq!(l1.ebx >> 24, 2);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800);
        assert_eq!(l1.ecx, 1 | ECX_HYPERVISOR);
        assert_ne!(l1.edx & EDX_HTT, 0);
        assert_eq!(find(&entries, 7, 0).ebx, 1);
        assert!(entries.iter().filter(|e| e.function == 0xd).all(|e| e.eax | e.ebx | e.ecx | e.edx == 0));
        let smt = find(&entries, 0xb, 0);
        let core = find(&entries, 0xb, 1);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 4, 0x201, 2));
        assert_eq!(find(&entries, 0xb, 2).ecx, 2);
        assert_eq!(entries.iter().filter(|e| e.function == 0xb).count(), 3);
        let kvm = find(&entries, LEAF_HYPERVISOR, 0);
        let mut sig = Vec::new();
        for r in [kvm.ebx, kvm.ecx, kvm.edx] {
            sig.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&sig[..9], b"KVMKVMKVM");
    }

    #[test]
    fn hardware_backed_kvm_keeps_xsave_and_avx_as_kvm_reports_them() {
        let supported = [
            leaf(1, 0, ECX_XSAVE | ECX_AVX | 1, 0),
            leaf(7, 0, 0, LEAF7_EBX_AVX2 | 1),
            leaf(0xd, 0, 0x340, 0x340),
            kvm_cpuid_entry2 { function: KVM_CPUID_FEATURES, eax: 0x0100_00fb, ..Default::default() },
        ];
        let entries = filter(&supported, 0, 2, Xsave::Pass);
        assert_eq!(find(&entries, 1, 0).ecx, ECX_XSAVE | ECX_AVX | 1 | ECX_HYPERVISOR);
        assert_eq!(find(&entries, 7, 0).ebx, LEAF7_EBX_AVX2 | 1);
        assert_eq!(find(&entries, 0xd, 0).ebx, 0x340);
        // KVM's paravirtual features (kvmclock among them) pass through.
        assert_eq!(find(&entries, KVM_CPUID_FEATURES, 0).eax, 0x0100_00fb);
    }

    #[test]
    fn one_cpu_has_no_htt_and_a_zero_core_shift() {
        let entries = filter(&[leaf(1, 0, 0, 0)], 0, 1, Xsave::Hide);
        assert_eq!(find(&entries, 1, 0).edx & EDX_HTT, 0);
        assert_eq!(find(&entries, 0xb, 1).eax, 0);
    }
}
