//! One thread per vCPU: run, dispatch the exit, repeat until the VM stops.
//!
//! Port I/O and MMIO go through the buses; everything else is either handled by KVM (HLT,
//! INIT/SIPI with the in-kernel irqchip) or ends the VM through the [`ExitLatch`]. A guest can
//! only end its own VM: every exit maps to a result, never to a panic.
//!
//! Stopping: the VM thread posts to the latch, then [`kick`]s each vCPU thread with a signal
//! until it has left `KVM_RUN` (the signal interrupts the ioctl with EINTR).

use std::sync::{Arc, Once};
use std::thread::JoinHandle;

use kvm_bindings::{KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use vm_memory::{Bytes, GuestAddress};

use crate::bus::Bus;
use crate::exit::{ExitLatch, ExitReason, StopRequest};
use crate::memory::GuestMemory;

/// What a vCPU thread needs besides its fd.
#[derive(Debug, Clone)]
pub struct VcpuContext {
    pub io_bus: Arc<Bus>,
    pub mmio_bus: Arc<Bus>,
    pub latch: Arc<ExitLatch>,
    /// For error reports only (the instruction bytes at `rip`).
    pub mem: GuestMemory,
}

/// The signal that kicks a vCPU out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn ignore_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

static KICK_HANDLER: Once = Once::new();

/// Installs the (empty) kick handler once per process: its only job is to make `KVM_RUN`
/// return EINTR instead of killing the process.
pub fn install_kick_handler() {
    KICK_HANDLER.call_once(|| {
        if let Err(e) = register_signal_handler(kick_signal(), ignore_kick) {
            tracing::error!("vmm: cannot install the vCPU kick signal handler: {e}");
        }
    });
}

/// Interrupts a vCPU thread's `KVM_RUN`.
pub fn kick<T>(thread: &JoinHandle<T>) {
    let _ = thread.kill(kick_signal());
}

/// Starts the thread of vCPU `id`.
pub fn spawn(id: u8, vcpu: VcpuFd, ctx: VcpuContext) -> std::io::Result<JoinHandle<()>> {
    install_kick_handler();
    std::thread::Builder::new().name(format!("vcpu{id}")).spawn(move || run(id, vcpu, &ctx))
}

fn run(id: u8, mut vcpu: VcpuFd, ctx: &VcpuContext) {
    while !ctx.latch.stopping() {
        match vcpu.run() {
            // A triple fault: a PC resets. The guest said nothing (no handler ran), so what the
            // CPU held is the only trace of why.
            Ok(VcpuExit::Shutdown) => {
                tracing::warn!(
                    "vmm: vCPU {id} triple-faulted (shutdown exit): resetting;{}{}",
                    where_the_guest_was(&vcpu, &ctx.mem),
                    control_state(&vcpu)
                );
                ctx.latch.post(StopRequest::Exit(ExitReason::Reboot));
            }
            Ok(exit) => match handle_exit(id, exit, ctx) {
                // Where the guest was helps whoever reads the error.
                Some(StopRequest::Error(e)) => {
                    let at = where_the_guest_was(&vcpu, &ctx.mem);
                    ctx.latch.post(StopRequest::Error(format!("{e}{at}")));
                }
                Some(request) => {
                    ctx.latch.post(request);
                }
                None => {}
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
            }
            Err(e) => {
                ctx.latch.post(StopRequest::Error(format!("vCPU {id}: KVM_RUN failed: {e}")));
            }
        }
    }
}

/// " at rip X (bytes …)": where a failed vCPU was and the instruction bytes there.
fn where_the_guest_was(vcpu: &VcpuFd, mem: &GuestMemory) -> String {
    let Ok(regs) = vcpu.get_regs() else { return String::new() };
    let physical = vcpu.translate_gva(regs.rip).ok().filter(|t| t.valid != 0).map(|t| t.physical_address);
    let mut bytes = [0u8; 16];
    let code = physical
        .and_then(|pa| mem.read_slice(&mut bytes, GuestAddress(pa)).ok())
        .map(|()| {
            format!(" (bytes {})", bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" "))
        })
        .unwrap_or_default();
    format!(" at rip {:#x}{code}", regs.rip)
}

/// ", rsp …, cr0 … cr2 … cr3 … cr4 … efer …, idt …": the state a triple fault leaves.
fn control_state(vcpu: &VcpuFd) -> String {
    let (Ok(regs), Ok(sregs)) = (vcpu.get_regs(), vcpu.get_sregs()) else { return String::new() };
    format!(
        ", rsp {:#x}, rflags {:#x}, cs {:#x}, cr0 {:#x}, cr2 {:#x}, cr3 {:#x}, cr4 {:#x}, efer {:#x}, idt {:#x}+{:#x}, gdt {:#x}+{:#x}",
        regs.rsp,
        regs.rflags,
        sregs.cs.selector,
        sregs.cr0,
        sregs.cr2,
        sregs.cr3,
        sregs.cr4,
        sregs.efer,
        sregs.idt.base,
        sregs.idt.limit,
        sregs.gdt.base,
        sregs.gdt.limit
    )
}

/// Handles one exit; returns a stop request when the exit ends the VM.
fn handle_exit(id: u8, exit: VcpuExit<'_>, ctx: &VcpuContext) -> Option<StopRequest> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            ctx.io_bus.read(u64::from(port), data);
            None
        }
        VcpuExit::IoOut(port, data) => {
            ctx.io_bus.write(u64::from(port), data);
            None
        }
        VcpuExit::MmioRead(addr, data) => {
            ctx.mmio_bus.read(addr, data);
            None
        }
        VcpuExit::MmioWrite(addr, data) => {
            ctx.mmio_bus.write(addr, data);
            None
        }
        // With the in-kernel irqchip HLT stays in KVM; an exit here means "nothing to do".
        VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen => None,
        // A triple fault (logged with the CPU's state by `run`): a PC resets.
        VcpuExit::Shutdown => Some(StopRequest::Exit(ExitReason::Reboot)),
        VcpuExit::SystemEvent(kind, _) => Some(match kind {
            KVM_SYSTEM_EVENT_SHUTDOWN => StopRequest::Exit(ExitReason::PowerOff),
            KVM_SYSTEM_EVENT_RESET => StopRequest::Exit(ExitReason::Reboot),
            other => StopRequest::Error(format!("vCPU {id}: guest system event {other} (crash?)")),
        }),
        VcpuExit::FailEntry(reason, cpu) => Some(StopRequest::Error(format!(
            "vCPU {id}: KVM could not enter the guest (hardware entry failure reason {reason:#x} on host CPU {cpu}); the register state is invalid for this host"
        ))),
        VcpuExit::InternalError => Some(StopRequest::Error(format!(
            "vCPU {id}: KVM internal error (an instruction KVM could not emulate); on a nested KVM without vmx/svm this is a known limit, run the guest with hardware virtualization"
        ))),
        other => Some(StopRequest::Error(format!("vCPU {id}: unexpected KVM exit {other:?}"))),
    }
}
