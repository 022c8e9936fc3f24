//! Why a guest stops, and the latch that the first reason is recorded in.
//!
//! Devices (the power-off port, the reset ports), vCPU threads (triple fault, a KVM error) and
//! the [`super::VmHandle`] all post to one [`ExitLatch`]; the first reason wins, every vCPU
//! sees `stopping()` and leaves its run loop, and the thread in `Vm::run` wakes up.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};

/// How a boot of the guest ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off (ACPI PM1a_CNT with SLP_EN): the VMM process should exit 0.
    PowerOff,
    /// The guest asked for a reset (triple fault, i8042 0xFE, 0xCF9) or `VmHandle::reboot`.
    /// [`super::Vm::run`] restarts the guest unless the config says otherwise.
    Reboot,
    /// `VmHandle::shutdown` stopped the VM.
    Shutdown,
}

impl ExitReason {
    /// The exit status of a VMM process that ends this way: 0 for a power-off or a requested
    /// shutdown, 1 for a reset the VMM was told not to handle.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::PowerOff | Self::Shutdown => 0,
            Self::Reboot => 1,
        }
    }
}

/// What was posted: an exit or a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopRequest {
    Exit(ExitReason),
    /// A vCPU failed (KVM internal error, entry failure, an ioctl error).
    Error(String),
}

/// Where the first stop request is recorded.
#[derive(Debug, Default)]
pub struct ExitLatch {
    stopping: AtomicBool,
    request: Mutex<Option<StopRequest>>,
    posted: Condvar,
}

impl ExitLatch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `request` unless one is already recorded; returns whether it was recorded.
    pub fn post(&self, request: StopRequest) -> bool {
        let mut slot = self.request.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() {
            return false;
        }
        tracing::debug!("vmm: stop requested: {request:?}");
        *slot = Some(request);
        self.stopping.store(true, Ordering::SeqCst);
        self.posted.notify_all();
        true
    }

    /// Shorthand for posting an exit; returns whether it was recorded.
    pub fn exit(&self, reason: ExitReason) -> bool {
        self.post(StopRequest::Exit(reason))
    }

    /// Whether vCPUs should leave their run loops.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Blocks until a request is posted or `timeout` passes.
    pub fn wait_timeout(&self, timeout: std::time::Duration) -> Option<StopRequest> {
        let slot = self.request.lock().unwrap_or_else(|e| e.into_inner());
        let (slot, _) =
            self.posted.wait_timeout_while(slot, timeout, |s| s.is_none()).unwrap_or_else(|e| e.into_inner());
        slot.clone()
    }

    /// Blocks until a request is posted and returns it.
    pub fn wait(&self) -> StopRequest {
        let mut slot = self.request.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(request) = slot.clone() {
                return request;
            }
            slot = self.posted.wait(slot).unwrap_or_else(|e| e.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_request_wins() {
        let latch = ExitLatch::new();
        assert!(!latch.stopping());
        latch.exit(ExitReason::PowerOff);
        latch.exit(ExitReason::Reboot);
        assert!(latch.stopping());
        assert_eq!(latch.wait(), StopRequest::Exit(ExitReason::PowerOff));
    }
}
