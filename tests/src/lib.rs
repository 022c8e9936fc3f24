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
//! - [`kvm_host`]: a "KVM host" VM under QEMU TCG `-cpu max` (svm + npt, `kvm_amd` loaded) with
//!   this machine's root read-only over virtio-9p and a shared scratch directory, where Linux
//!   guests run on Pleiades' own VMM.
//!
//! - [`served`]: a Linux test guest served with `run --listen`, its control socket, connection
//!   files and screenshots (the session, audio and window end-to-end tests).
//! - [`stack`]: the broker and a host daemon from the real binaries, with users, the test
//!   image and a pool (the demo and `broker_e2e`).
//! - [`audio`]: tone analysis (Goertzel scan, RMS, gaps) and WAV helpers for the audio tests.
//! - [`linkem`]: a link emulator (delay, loss, rate, down/up) for QUIC between client and host.
//! - [`xwd`]: reads `xwd -root` dumps of an X screen (Xvfb) without ImageMagick.
//!
//! The tests in `tests/` use these to run the real pieces together.

pub use pleiades_testkit::{image, postgres, prerequisite, wait_for};
pub use pleiades_vmm::accel;

/// A binary of the workspace (`pleiades-host`, `pleiades`), next to the running test's own
/// executable (`target/<profile>/`). `cargo test --workspace` builds them before any test runs.
pub fn workspace_binary(name: &str) -> Result<std::path::PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir =
        exe.parent().and_then(|deps| deps.parent()).ok_or("the test executable has no target directory")?;
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!("{} is missing: build it first (`cargo build --workspace`)", path.display()))
    }
}
pub mod audio;
pub mod kvm_host;
pub mod linkem;
pub mod qemu;
pub mod served;
pub mod stack;
pub mod testguest;
pub mod xwd;
