//! The register state a vCPU starts with: 64-bit long mode per the boot contract for the boot
//! vCPU; MSRs, FPU and local APIC for all; application processors wait for INIT/SIPI.

use kvm_bindings::{
    KVM_MP_STATE_UNINITIALIZED, Msrs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_segment, kvm_sregs,
};
use kvm_ioctls::VcpuFd;

use crate::boot::EntryPoint;
use crate::boot::layout::{CODE_SELECTOR, DATA_SELECTOR, GDT, GDT_ADDR, IDT_ADDR, PML4_ADDR, TSS_SELECTOR};

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// A stack below the page tables, for guests that use one before setting their own.
const BOOT_STACK: u64 = 0x8ff0;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Sets up the state every vCPU needs: MSRs, FPU, LAPIC LINT0/LINT1.
pub fn setup_common(vcpu: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    setup_msrs(vcpu)?;
    vcpu.set_fpu(&kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() })?;
    setup_lapic(vcpu)
}

/// Puts the boot vCPU in 64-bit mode at `entry`.
pub fn setup_boot_cpu(vcpu: &VcpuFd, entry: EntryPoint) -> Result<(), kvm_ioctls::Error> {
    let mut sregs = vcpu.get_sregs()?;
    long_mode_sregs(&mut sregs);
    vcpu.set_sregs(&sregs)?;
    vcpu.set_regs(&kvm_regs {
        rflags: 0x2,
        rip: entry.rip.0,
        rsi: entry.rsi.0,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        ..Default::default()
    })
}

/// Application processors wait for INIT/SIPI from the boot CPU, which the in-kernel LAPIC
/// handles.
pub fn setup_application_cpu(vcpu: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    vcpu.set_mp_state(kvm_mp_state { mp_state: KVM_MP_STATE_UNINITIALIZED })
}

fn segment(selector: u16) -> kvm_segment {
    let descriptor = GDT[usize::from(selector >> 3)];
    let flags = (descriptor >> 40) & 0xf0ff;
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: (flags & 0xf) as u8,
        present: ((flags >> 7) & 1) as u8,
        dpl: ((flags >> 5) & 3) as u8,
        db: ((flags >> 14) & 1) as u8,
        s: ((flags >> 4) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        g: ((flags >> 15) & 1) as u8,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The long-mode system registers of the boot contract.
pub fn long_mode_sregs(sregs: &mut kvm_sregs) {
    sregs.gdt.base = GDT_ADDR.0;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR.0;
    sregs.idt.limit = 7;
    sregs.cs = segment(CODE_SELECTOR);
    let data = segment(DATA_SELECTOR);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(TSS_SELECTOR);
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG;
    sregs.cr3 = PML4_ADDR.0;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
}

fn setup_msrs(vcpu: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry { index, data, ..Default::default() })
    .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| kvm_ioctls::Error::new(libc::E2BIG))?;
    let set = vcpu.set_msrs(&msrs)?;
    if set != entries.len() {
        // KVM stops at the first MSR it refuses; the guest copes without the rest.
        tracing::debug!("vmm: KVM accepted {set} of {} boot MSRs", entries.len());
    }
    Ok(())
}

fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let b = &lapic.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().iter().enumerate() {
        lapic.regs[offset + i] = *byte as _;
    }
}

fn delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// LINT0 delivers the 8259's ExtINT, LINT1 NMIs, as a BIOS would leave them.
fn setup_lapic(vcpu: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    let mut lapic = vcpu.get_lapic()?;
    let lint0 = lapic_reg(&lapic, APIC_LVT_LINT0);
    set_lapic_reg(&mut lapic, APIC_LVT_LINT0, delivery_mode(lint0, APIC_MODE_EXTINT));
    let lint1 = lapic_reg(&lapic, APIC_LVT_LINT1);
    set_lapic_reg(&mut lapic, APIC_LVT_LINT1, delivery_mode(lint1, APIC_MODE_NMI));
    vcpu.set_lapic(&lapic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_segments_follow_the_gdt() {
        let mut sregs = kvm_sregs::default();
        long_mode_sregs(&mut sregs);
        assert_eq!((sregs.cs.selector, sregs.cs.l, sregs.cs.db, sregs.cs.type_), (8, 1, 0, 0xb));
        assert_eq!((sregs.ds.selector, sregs.ds.l, sregs.ds.db, sregs.ds.type_), (0x10, 0, 1, 3));
        assert_eq!((sregs.tr.selector, sregs.tr.s, sregs.tr.type_), (0x18, 0, 0xb));
        assert_eq!(sregs.cr0 & 0x8000_0001, 0x8000_0001);
        assert_eq!(sregs.efer, 0x500);
        assert_eq!(sregs.cr3, 0x9000);
    }

    #[test]
    fn lapic_delivery_modes() {
        let mut lapic = kvm_lapic_state::default();
        set_lapic_reg(&mut lapic, APIC_LVT_LINT0, 0x1_0000);
        let v = delivery_mode(lapic_reg(&lapic, APIC_LVT_LINT0), APIC_MODE_EXTINT);
        assert_eq!(v, 0x1_0700);
        assert_eq!(delivery_mode(0x700, APIC_MODE_NMI), 0x400);
    }
}
