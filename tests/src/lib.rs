//! The Pleiades end-to-end test kit.
//!
//! - [`image`]: where the test guest image lives (`target/guest/`, built by
//!   `cargo xtask guest-image`).
//! - [`accel`]: KVM where the CPU has hardware virtualization, TCG otherwise, forced with
//!   `PLEIADES_ACCEL=kvm|tcg`.
//! - [`postgres`]: a private PostgreSQL server on loopback for database tests.
//! - [`qemu`]: boots the image under Debian's `qemu-system-x86_64`, talks to the serial console
//!   and waits for the guest's `PLEIADES-READY` line.
//! - [`testguest`]: boots the no_std test guest (`testguest.elf`) under QEMU and parses its
//!   `PLEIADES-TESTGUEST` result line.
//!
//! The tests in `tests/` use these to run the real pieces together.

pub use pleiades_host::accel;
pub mod image;
pub mod linkem;
pub mod postgres;
pub mod qemu;
pub mod testguest;
