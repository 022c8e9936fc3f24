//! vCPUs: the CPUID the guest sees, the boot register state, and the thread that runs each one.

pub mod cpuid;
pub mod regs;
pub mod vcpu;
