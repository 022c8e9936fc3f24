//! The CMOS real-time clock (an MC146818) at ports 0x70 (index) and 0x71 (data): the guest's
//! wall clock at boot, as on a PC.
//!
//! The time registers are computed from the host's UTC clock at each read, so the clock never
//! shows an update in progress (register A's UIP bit stays clear) and needs no thread. Linux's
//! `rtc_cmos` waits for UIP to clear before it reads the time: without this device it read
//! 0xff from the empty ports and spent about 3.5 s of every boot deciding the RTC was broken.
//! Register B's format bits (binary or BCD, 12 or 24 hours) are honoured. Writes to the time
//! registers are ignored (the guest reads the host's time; `hwclock --systohc` does not move
//! it); the other 114 bytes are plain CMOS RAM. No interrupts: alarms and the periodic
//! interrupt are not offered (register C reads 0).

use std::time::{SystemTime, UNIX_EPOCH};

use crate::bus::BusDevice;

/// The index and data ports.
pub const CMOS_PORT: u64 = 0x70;

const SECONDS: u8 = 0x00;
const MINUTES: u8 = 0x02;
const HOURS: u8 = 0x04;
const WEEKDAY: u8 = 0x06;
const DAY: u8 = 0x07;
const MONTH: u8 = 0x08;
const YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const CENTURY: u8 = 0x32;

/// Register B: 24-hour mode, binary (not BCD) data.
const B_24H: u8 = 1 << 1;
const B_BINARY: u8 = 1 << 2;
/// Register A at reset: the 32.768 kHz time base, 1024 Hz rate, no update in progress.
const A_DEFAULT: u8 = 0x26;
/// Register D: the battery is good (RAM and time valid).
const D_VALID: u8 = 0x80;

/// The clock the device reads: the host's, or a fixed one in tests.
type Clock = Box<dyn Fn() -> u64 + Send>;

pub struct Cmos {
    index: u8,
    ram: [u8; 128],
    now: Clock,
}

impl std::fmt::Debug for Cmos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cmos").field("index", &self.index).finish_non_exhaustive()
    }
}

impl Default for Cmos {
    fn default() -> Self {
        Self::with_clock(Box::new(|| SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())))
    }
}

impl Cmos {
    fn with_clock(now: Clock) -> Self {
        let mut ram = [0u8; 128];
        ram[usize::from(REG_A)] = A_DEFAULT;
        ram[usize::from(REG_B)] = B_24H;
        ram[usize::from(REG_D)] = D_VALID;
        Self { index: 0, ram, now }
    }

    fn read_register(&self, index: u8) -> u8 {
        let format = self.ram[usize::from(REG_B)];
        let encode = |value: u32| -> u8 {
            let value = (value % 100) as u8;
            if format & B_BINARY != 0 { value } else { ((value / 10) << 4) | (value % 10) }
        };
        let time = || civil_time((self.now)());
        match index {
            SECONDS => encode(time().second),
            MINUTES => encode(time().minute),
            HOURS => {
                let hour = time().hour;
                if format & B_24H != 0 {
                    encode(hour)
                } else {
                    // 12-hour mode: 12, 1..11, with bit 7 for PM.
                    let twelve = if hour % 12 == 0 { 12 } else { hour % 12 };
                    encode(twelve) | if hour >= 12 { 0x80 } else { 0 }
                }
            }
            WEEKDAY => encode(time().weekday + 1),
            DAY => encode(time().day),
            MONTH => encode(time().month),
            YEAR => encode(time().year.rem_euclid(100) as u32),
            CENTURY => encode(time().year.div_euclid(100) as u32),
            REG_A => self.ram[usize::from(REG_A)] & 0x7f,
            REG_C => 0,
            REG_D => D_VALID,
            other => self.ram[usize::from(other)],
        }
    }

    fn write_register(&mut self, index: u8, value: u8) {
        match index {
            SECONDS..=YEAR | CENTURY | REG_C | REG_D => {}
            // UIP (bit 7) is read-only.
            REG_A => self.ram[usize::from(REG_A)] = value & 0x7f,
            other => self.ram[usize::from(other)] = value,
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = match offset {
                0 => self.index,
                1 => self.read_register(self.index),
                _ => 0xff,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            // Bit 7 of the index is the NMI mask on real hardware; there is no NMI to mask.
            0 => self.index = value & 0x7f,
            1 => self.write_register(self.index, value),
            _ => {}
        }
    }
}

/// A UTC date and time; `weekday` 0 is Sunday.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CivilTime {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    weekday: u32,
}

/// Seconds since the Unix epoch as a proleptic Gregorian UTC date (Howard Hinnant's
/// `civil_from_days`).
fn civil_time(unix_seconds: u64) -> CivilTime {
    let days = (unix_seconds / 86_400) as i64;
    let rest = (unix_seconds % 86_400) as u32;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    CivilTime {
        year,
        month,
        day,
        hour: rest / 3600,
        minute: rest / 60 % 60,
        second: rest % 60,
        weekday: (days + 4).rem_euclid(7) as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: u64) -> Cmos {
        Cmos::with_clock(Box::new(move || seconds))
    }

    fn get(cmos: &mut Cmos, index: u8) -> u8 {
        cmos.write(0, &[index | 0x80]); // with the NMI bit, as Linux writes it
        let mut data = [0u8];
        cmos.read(1, &mut data);
        data[0]
    }

    #[test]
    fn dates_are_right_across_eras() {
        // What QEMU's RTC told a guest in the same run: 2026-12-03T19:11:52 UTC, a Thursday.
        let t = civil_time(1_796_325_112);
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.minute, t.second, t.weekday),
            (2026, 12, 3, 19, 11, 52, 4)
        );
        assert_eq!(
            civil_time(0),
            CivilTime { year: 1970, month: 1, day: 1, hour: 0, minute: 0, second: 0, weekday: 4 }
        );
        // A leap day and the turn of a century (2000 is a leap year, 2100 is not).
        let leap = civil_time(951_782_400); // 2000-02-29
        assert_eq!((leap.year, leap.month, leap.day), (2000, 2, 29));
        let after = civil_time(4_107_542_400); // 2100-03-01
        assert_eq!((after.year, after.month, after.day), (2100, 3, 1));
    }

    #[test]
    fn the_guest_reads_bcd_by_default_and_binary_when_it_asks() {
        let mut cmos = at(1_796_325_112);
        assert_eq!(get(&mut cmos, REG_A) & 0x80, 0, "never an update in progress");
        assert_eq!(get(&mut cmos, REG_D), 0x80);
        let bcd: Vec<u8> = [SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR, CENTURY]
            .iter()
            .map(|&r| get(&mut cmos, r))
            .collect();
        assert_eq!(bcd, [0x52, 0x11, 0x19, 0x05, 0x03, 0x12, 0x26, 0x20]);
        cmos.write(0, &[REG_B]);
        cmos.write(1, &[B_24H | B_BINARY]);
        assert_eq!(get(&mut cmos, HOURS), 19);
        assert_eq!(get(&mut cmos, YEAR), 26);
        // 12-hour mode: 7 PM.
        cmos.write(0, &[REG_B]);
        cmos.write(1, &[0]);
        assert_eq!(get(&mut cmos, HOURS), 0x80 | 0x07);
    }

    #[test]
    fn the_time_cannot_be_written_and_the_ram_keeps_what_is_written() {
        let mut cmos = at(1_796_325_112);
        for index in 0..=0x7f {
            cmos.write(0, &[index]);
            cmos.write(1, &[0xa5]);
        }
        assert_eq!(get(&mut cmos, REG_B), 0xa5, "register B is the guest's");
        cmos.write(0, &[REG_B]);
        cmos.write(1, &[B_24H]);
        assert_eq!(get(&mut cmos, SECONDS), 0x52);
        assert_eq!(get(&mut cmos, REG_C), 0);
        assert_eq!(get(&mut cmos, REG_A), 0x25, "UIP is read-only");
        assert_eq!(get(&mut cmos, 0x40), 0xa5);
        // Garbage offsets and sizes are harmless.
        let mut wide = [0u8; 8];
        cmos.read(1, &mut wide);
        cmos.read(7, &mut wide);
        cmos.write(9, &[1, 2, 3]);
        cmos.write(0, &[]);
    }
}
