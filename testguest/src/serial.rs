//! COM1, a 16550 UART at I/O port 0x3F8: 115200 8N1, polled, no interrupts.

use core::fmt;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::arch::{inb, outb};

const COM1: u16 = 0x3F8;
const LSR_THRE: u8 = 1 << 5;
/// Polls of the line status register before a byte is sent anyway (a 16-byte FIFO drains in
/// about 1.4 ms at 115200 baud).
const THRE_POLLS: u32 = 20_000;

/// Set when THRE never came: the UART's line status is not emulated, so stop polling it.
static LSR_STUCK: AtomicBool = AtomicBool::new(false);

pub fn init() {
    outb(COM1 + 1, 0x00); // no interrupts
    outb(COM1 + 3, 0x80); // DLAB: divisor follows
    outb(COM1, 0x01); // divisor 1: 115200 baud
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); // 8N1
    outb(COM1 + 2, 0xC7); // FIFOs on and cleared
    outb(COM1 + 4, 0x03); // DTR | RTS
}

pub fn write_byte(byte: u8) {
    if !LSR_STUCK.load(Ordering::Relaxed) && !(0..THRE_POLLS).any(|_| inb(COM1 + 5) & LSR_THRE != 0) {
        LSR_STUCK.store(true, Ordering::Relaxed);
    }
    outb(COM1, byte);
}

/// `core::fmt` output to COM1, `\n` sent as `\r\n`.
#[derive(Debug)]
pub struct Serial;

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                write_byte(b'\r');
            }
            write_byte(b);
        }
        Ok(())
    }
}

/// A progress line for people reading the console (the result line is separate).
macro_rules! log {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = write!($crate::serial::Serial, "testguest: [{:>5} ms] ", $crate::time::ms_since_boot());
        let _ = writeln!($crate::serial::Serial, $($arg)*);
    }};
}
pub(crate) use log;
