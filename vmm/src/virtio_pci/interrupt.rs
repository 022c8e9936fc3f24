//! The [`Interrupt`] a virtio-pci device's worker raises: MSI-X through the vector's irqfd,
//! held as pending while the vector or the function is masked.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::common_cfg::NO_VECTOR;
use crate::interrupts::MsiVector;
use crate::pci::msix::Msix;
use pleiades_virtio::worker::Interrupt;

/// ISR status bits.
pub const ISR_QUEUE: u8 = 1;
pub const ISR_CONFIG: u8 = 2;

/// Interrupt counters, for `status()`.
#[derive(Debug, Default)]
pub struct InterruptMetrics {
    pub queue_interrupts: AtomicU64,
    pub config_interrupts: AtomicU64,
    pub masked_interrupts: AtomicU64,
}

/// The interrupt state shared by the transport (vCPU threads) and the worker.
#[derive(Debug)]
pub struct InterruptLines {
    pub msix: Mutex<Msix>,
    pub vectors: Vec<MsiVector>,
    pub isr: AtomicU8,
    pub config_vector: AtomicU16,
    pub needs_reset: AtomicBool,
    pub metrics: InterruptMetrics,
}

impl InterruptLines {
    pub fn new(msix: Msix, vectors: Vec<MsiVector>) -> Self {
        Self {
            msix: Mutex::new(msix),
            vectors,
            isr: AtomicU8::new(0),
            config_vector: AtomicU16::new(NO_VECTOR),
            needs_reset: AtomicBool::new(false),
            metrics: InterruptMetrics::default(),
        }
    }

    /// Raises `vector` (or records it as pending), setting `isr_bit` in the ISR.
    pub fn trigger(&self, vector: u16, isr_bit: u8) -> io::Result<()> {
        self.isr.fetch_or(isr_bit, Ordering::SeqCst);
        if vector == NO_VECTOR {
            return Ok(());
        }
        let mut msix = self.msix.lock().unwrap_or_else(|e| e.into_inner());
        if msix.can_fire(vector) {
            drop(msix);
            self.fire(vector)
        } else {
            msix.set_pending(vector);
            self.metrics.masked_interrupts.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }

    /// Writes the irqfd of `vector`.
    pub fn fire(&self, vector: u16) -> io::Result<()> {
        match self.vectors.get(usize::from(vector)) {
            Some(v) => v.irqfd.write(1),
            None => Ok(()),
        }
    }

    pub fn signal_config(&self) -> io::Result<()> {
        self.metrics.config_interrupts.fetch_add(1, Ordering::Relaxed);
        self.trigger(self.config_vector.load(Ordering::SeqCst), ISR_CONFIG)
    }
}

/// The worker's view: the queue vectors as the driver set them before DRIVER_OK.
#[derive(Debug)]
pub struct WorkerInterrupt {
    pub lines: Arc<InterruptLines>,
    pub queue_vectors: Vec<u16>,
}

impl Interrupt for WorkerInterrupt {
    fn signal_queue(&self, queue: usize) -> io::Result<()> {
        self.lines.metrics.queue_interrupts.fetch_add(1, Ordering::Relaxed);
        let vector = self.queue_vectors.get(queue).copied().unwrap_or(NO_VECTOR);
        self.lines.trigger(vector, ISR_QUEUE)
    }

    fn signal_config(&self) -> io::Result<()> {
        self.lines.signal_config()
    }

    fn needs_reset(&self) -> io::Result<()> {
        self.lines.needs_reset.store(true, Ordering::SeqCst);
        self.lines.signal_config()
    }
}
