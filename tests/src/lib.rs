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
//! - [`disk`]: ext4 disk templates (qcow2) for desktops' disks.
//! - [`evdev`]: a guest's input events read back through its evdev nodes.
//! - [`audio`]: tone analysis (Goertzel scan, RMS, gaps) and WAV helpers for the audio tests.
//! - [`linkem`]: a link emulator (delay, loss, rate, down/up) for QUIC between client and host.
//! - [`spice`]: SPICE as a reference for the display benchmark: QEMU's SPICE server, `remote-viewer`
//!   under Xvfb, and a TCP relay that counts the bytes each way (delay and rate, no loss).
//! - [`pcap`]: `tcpdump` on loopback and a pcap reader: the IP bytes each way of one port, the
//!   display benchmark's byte count for QUIC and TCP alike.
//! - [`xwd`]: reads `xwd -root` dumps of an X screen (Xvfb) without ImageMagick.
//!
//! The tests in `tests/` use these to run the real pieces together.

pub use pleiades_testkit::{image, postgres, prerequisite, wait_for, xvfb};
pub use pleiades_vmm::accel;

/// A binary of the workspace (`pleiades-host`, `pleiades`, `pleiades-broker`), next to the
/// running test's own executable (`target/<profile>/`). `cargo test --workspace` builds them
/// before any test runs; `cargo test -p pleiades-tests` alone does not, so a binary older than
/// a source file of the crates it is built from is refused as stale, never tested by mistake.
pub fn workspace_binary(name: &str) -> Result<std::path::PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir =
        exe.parent().and_then(|deps| deps.parent()).ok_or("the test executable has no target directory")?;
    let path = dir.join(name);
    if !path.is_file() {
        return Err(format!("{} is missing: build it first (`cargo build --workspace`)", path.display()));
    }
    let built = std::fs::metadata(&path).and_then(|m| m.modified()).map_err(|e| e.to_string())?;
    let root = pleiades_testkit::workspace_root();
    if let Some(newer) = binary_sources(name).iter().find_map(|c| newer_source(&root.join(c), built)) {
        return Err(format!(
            "{} is older than {}: build it again (`cargo build --workspace`, or `cargo test --workspace`)",
            path.display(),
            newer.display()
        ));
    }
    Ok(path)
}

/// The crates (folders) a workspace binary is built from.
fn binary_sources(name: &str) -> &'static [&'static str] {
    match name {
        "pleiades-host" => {
            &["host", "session", "control", "vmm", "virtio", "protocol", "guest-agent", "clipboard"]
        }
        "pleiades" => &["client", "protocol", "clipboard"],
        "pleiades-broker" => &["broker", "protocol"],
        _ => &[],
    }
}

/// A source file (`src/**/*.rs`, `Cargo.toml`) of the crate at `dir` modified after `built`.
fn newer_source(dir: &std::path::Path, built: std::time::SystemTime) -> Option<std::path::PathBuf> {
    let mut stack = vec![dir.join("src")];
    let manifest = dir.join("Cargo.toml");
    let is_newer =
        |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).is_ok_and(|t| t > built);
    if is_newer(&manifest) {
        return Some(manifest);
    }
    while let Some(folder) = stack.pop() {
        for entry in std::fs::read_dir(&folder).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") && is_newer(&path) {
                return Some(path);
            }
        }
    }
    None
}

/// Keeps a screen as `<target>/artifacts/GROUP/NAME.png`, for a person to look at after a run
/// (what a window showed, what a guest's screen showed when a test failed). Returns where it is,
/// or `None` (said on stderr) where it could not be written.
pub fn save_artifact(
    group: &str,
    name: &str,
    frame: &pleiades_virtio::gpu::Framebuffer,
) -> Option<std::path::PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let target = exe.parent()?.parent()?.parent()?;
    let dir = target.join("artifacts").join(group);
    let path = dir.join(format!("{name}.png"));
    let written =
        pleiades_control::screenshot::encode_png(frame).map_err(|e| e.to_string()).and_then(|png| {
            std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, png)).map_err(|e| e.to_string())
        });
    match written {
        Ok(()) => Some(path),
        Err(e) => {
            eprintln!("could not keep the screenshot {}: {e}", path.display());
            None
        }
    }
}

/// `len` (a multiple of 8) incompressible bytes from `seed` (a xorshift stream): file contents
/// whose every byte matters and that no layer can shrink.
pub fn incompressible(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len / 8)
        .flat_map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()
        })
        .collect()
}

pub mod audio;
pub mod desktop;
pub mod disk;
pub mod evdev;
pub mod kvm_host;
pub mod linkem;
pub mod netns;
pub mod pcap;
pub mod qemu;
pub mod served;
pub mod spice;
pub mod stack;
pub mod testguest;
pub mod thin_client;
pub mod xwd;

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    #[test]
    fn a_binary_older_than_a_source_of_its_crates_is_stale() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("src/deep")).unwrap();
        std::fs::write(dir.path().join("Cargo.toml"), "[package]\n").unwrap();
        std::fs::write(dir.path().join("src/deep/device.rs"), "// edited\n").unwrap();
        let written = SystemTime::now();
        let before = written - Duration::from_secs(3600);
        let after = written + Duration::from_secs(3600);
        assert!(super::newer_source(dir.path(), before).is_some(), "built before the edit: stale");
        assert_eq!(super::newer_source(dir.path(), after), None, "built after the edit: fresh");
        // The binaries the tests run are checked against their own crates.
        assert!(super::binary_sources("pleiades-host").contains(&"virtio"));
        assert!(super::binary_sources("pleiades").contains(&"client"));
    }
}
