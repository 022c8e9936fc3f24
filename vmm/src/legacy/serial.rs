//! COM1: vm-superio's 16550 with its interrupt on an irqfd (GSI 4), output to stdout or a file.

use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialOut {
    /// The VMM's stdout (and stdin as input when it is a terminal).
    Stdio,
    /// Appended to a file (created if missing).
    File(PathBuf),
    /// Nowhere.
    Null,
}

impl std::str::FromStr for SerialOut {
    type Err = String;
    /// `stdio`, `null`, or a file path (as `--serial` takes it).
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" => Err("--serial needs `stdio`, `null` or a file path".into()),
            "stdio" => Ok(Self::Stdio),
            "null" => Ok(Self::Null),
            path => Ok(Self::File(PathBuf::from(path))),
        }
    }
}

/// The serial interrupt: an eventfd registered as an irqfd for GSI 4.
#[derive(Debug)]
pub struct IrqfdTrigger(pub EventFd);

impl Trigger for IrqfdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Opens `path` for appending, creating it if missing.
pub fn open_append(path: &std::path::Path) -> io::Result<File> {
    File::options().create(true).append(true).open(path)
}

/// Serial output sink.
pub type SerialWriter = Box<dyn Write + Send>;

/// Opens the output of `out`.
pub fn open_writer(out: &SerialOut, file: Option<&File>) -> io::Result<SerialWriter> {
    Ok(match (out, file) {
        (SerialOut::File(_), Some(file)) => Box::new(file.try_clone()?),
        (SerialOut::File(path), None) => Box::new(open_append(path)?),
        (SerialOut::Stdio, _) => Box::new(io::stdout()),
        (SerialOut::Null, _) => Box::new(io::sink()),
    })
}

/// COM1 on the bus.
pub struct SerialPort {
    serial: Serial<IrqfdTrigger, vm_superio::serial::NoEvents, SerialWriter>,
}

impl std::fmt::Debug for SerialPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialPort").finish_non_exhaustive()
    }
}

impl SerialPort {
    pub fn new(interrupt: EventFd, out: SerialWriter) -> Self {
        Self { serial: Serial::new(IrqfdTrigger(interrupt), out) }
    }

    /// Queues input bytes for the guest (from stdin). Returns how many fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.serial.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl BusDevice for SerialPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Ok(offset), Some(first)) = (u8::try_from(offset), data.first_mut()) {
            *first = self.serial.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), Some(&value)) = (u8::try_from(offset), data.first()) {
            if let Err(e) = self.serial.write(offset, value) {
                tracing::debug!("serial: write failed: {e}");
            }
            if offset == 0 {
                let _ = self.serial.writer_mut().flush();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pleiades_virtio::test_utils::SharedWriter;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn transmitted_bytes_reach_the_writer_and_input_raises_the_irq() {
        let out = SharedWriter::default();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut port = SerialPort::new(irq.try_clone().unwrap(), Box::new(out.clone()));
        port.write(0, b"O");
        port.write(0, b"K");
        assert_eq!(out.bytes(), b"OK");
        // Enable the received-data interrupt, then feed a byte.
        port.write(1, &[1]);
        port.enqueue_input(b"x");
        assert_eq!(irq.read().unwrap(), 1);
        let mut data = [0u8; 1];
        port.read(0, &mut data);
        assert_eq!(&data, b"x");
        // Garbage offsets and widths are harmless.
        port.write(0x1234, &[1, 2, 3, 4]);
        port.read(u64::MAX, &mut [0u8; 8]);
    }
}
