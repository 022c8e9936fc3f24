//! A thin client machine for tests: a QEMU (TCG) VM with an emulated USB stick, on which the
//! real `pleiades` client runs and redirects that stick through libusb — the path a real thin
//! client takes, on a machine that has no USB hardware.
//!
//! It is the [`KvmHost`] fixture (the test image's kernel, this machine's root read-only over
//! 9p and `chroot`ed into, a shared scratch directory) with more hardware:
//!
//! - an xHCI controller (`qemu-xhci`) with QEMU's `usb-storage` stick (id `stick`, USB id
//!   `46f4:0001`) backed by a raw image of this machine; the VM's own `xhci-pci`, `usb-storage`
//!   and `sd_mod` drive it, as a thin client's kernel would;
//! - QEMU's USB keyboard (`usb-kbd`, id `kbd`, USB id `0627:0001`), which the VM's `usbhid`
//!   drives; [`ThinClient::key`] presses its keys (interrupt transfers, waiting in flight
//!   until a key is pressed);
//! - QEMU's USB sound card (`usb-audio`, id `audio`, USB id `46f4:0002`, 48 kHz stereo
//!   playback: isochronous OUT transfers), its sound written to [`ThinClient::speaker_wav`];
//! - a second drive (`spare`) with no device yet, for [`ThinClient::plug`]: hot-plug;
//! - user-mode networking: the VM reaches this machine's loopback as [`HOST_FROM_INSIDE`]
//!   (slirp forwards TCP and UDP there), so the client inside connects to a session server
//!   listening on `127.0.0.1` here;
//! - a QMP socket, to plug and pull USB devices while the client runs ([`ThinClient::pull`]).
//!
//! Everything inside runs under TCG: a test's timings here say nothing about speed.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::kvm_host::{KvmHost, KvmHostConfig, KvmHostError, KvmHostParts, shell_quote};
use crate::qemu::GuestError;

/// This machine's loopback, seen from inside (slirp's gateway).
pub const HOST_FROM_INSIDE: &str = "10.0.2.2";
/// QEMU's `usb-storage` ids.
pub const STICK_USB_ID: &str = "46f4:0001";
/// QEMU's `usb-audio` ids.
pub const AUDIO_USB_ID: &str = "46f4:0002";
/// QEMU's `usb-kbd` ids.
pub const KEYBOARD_USB_ID: &str = "0627:0001";

/// How long one command inside may take (see [`crate::kvm_host`]: generous, under TCG).
const STEP: Duration = Duration::from_secs(180);

/// The thin client VM. Dropping it kills QEMU.
#[derive(Debug)]
pub struct ThinClient {
    // Dropped first: QEMU dies before the QMP socket's directory goes.
    host: KvmHost,
    qmp: PathBuf,
    speaker: PathBuf,
    _qmp_dir: tempfile::TempDir,
}

impl ThinClient {
    /// Boots the thin client with `stick` (a raw image) plugged in and `spare` (another raw
    /// image) ready for [`ThinClient::plug`], its network up.
    pub fn boot(stick: &Path, spare: &Path) -> Result<Self, KvmHostError> {
        let parts = KvmHostParts::locate().map_err(|e| KvmHostError::Setup {
            step: "finding the thin client's parts".into(),
            output: e,
            dmesg: String::new(),
        })?;
        let qmp_dir = tempfile::Builder::new()
            .prefix("pleiades-thin-client-")
            .tempdir()
            .map_err(KvmHostError::Scratch)?;
        let qmp = qmp_dir.path().join("qmp.sock");
        let speaker = qmp_dir.path().join("speaker.wav");
        let drive = |id: &str, path: &Path| {
            format!("if=none,id={id},format=raw,file={}", path.display().to_string().replace(',', ",,"))
        };
        let qemu_args = [
            "-device",
            "qemu-xhci,id=xhci",
            "-drive",
            &drive("stick-drive", stick),
            "-device",
            "usb-storage,bus=xhci.0,drive=stick-drive,id=stick",
            "-device",
            "usb-kbd,bus=xhci.0,id=kbd",
            "-audiodev",
            &format!(
                "wav,id=speaker,path={},out.frequency=48000,out.channels=2,out.format=s16",
                speaker.display().to_string().replace(',', ",,")
            ),
            "-device",
            "usb-audio,bus=xhci.0,audiodev=speaker,id=audio",
            "-drive",
            &drive("spare-drive", spare),
            "-netdev",
            "user,id=net0",
            "-device",
            "virtio-net-pci,netdev=net0",
            "-qmp",
            &format!("unix:{},server=on,wait=off", qmp.display()),
        ]
        .map(str::to_owned)
        .to_vec();
        let config = KvmHostConfig { memory_mib: 1536, qemu_args, ..KvmHostConfig::default() };
        let mut host = KvmHost::boot(parts, &config)?;
        for (what, command) in [
            (
                "bringing up the network",
                "ip link set eth0 up && ip addr replace 10.0.2.15/24 dev eth0 && ip route replace default via 10.0.2.2",
            ),
            (
                "waiting for the USB stick",
                "i=0; until [ -e /dev/sda ] || [ $i -gt 600 ]; do i=$((i+1)); sleep 0.1; done; [ -e /dev/sda ]",
            ),
        ] {
            let (status, output) = host.run_status(command, STEP)?;
            if status != 0 {
                return Err(KvmHostError::Setup {
                    step: what.into(),
                    output: format!("{}\n(exit status {status})", output.join("\n")),
                    dmesg: host.dmesg(30),
                });
            }
        }
        Ok(Self { host, qmp, speaker, _qmp_dir: qmp_dir })
    }

    /// Runs a shell command inside (this machine's root, as root); a non-zero exit is an error.
    pub fn run(&mut self, command: &str) -> Result<Vec<String>, GuestError> {
        self.host.run(command, STEP)
    }

    /// Runs a shell command inside; its exit status and output.
    pub fn run_status(&mut self, command: &str) -> Result<(i32, Vec<String>), GuestError> {
        self.host.run_status(command, STEP)
    }

    /// The scratch directory, the same path here and inside.
    pub fn scratch(&self) -> &Path {
        self.host.scratch()
    }

    /// The VM's kernel log, last lines.
    pub fn dmesg(&mut self, lines: usize) -> String {
        self.host.dmesg(lines)
    }

    /// What the USB sound card played so far: 48 kHz stereo 16-bit samples (QEMU writes the
    /// WAV's header sizes only when it exits; the samples are read from after the header).
    pub fn speaker_samples(&self) -> Vec<i16> {
        let bytes = std::fs::read(&self.speaker).unwrap_or_default();
        bytes
            .get(44..)
            .unwrap_or_default()
            .chunks_exact(2)
            .map(|b| i16::from_le_bytes([b[0], b[1]]))
            .collect()
    }

    /// Whether the VM's own `usb-storage` driver has an interface of a device bound.
    pub fn usb_storage_bound(&mut self) -> Result<bool, GuestError> {
        let (status, _) = self.run_status("ls /sys/bus/usb/drivers/usb-storage/ | grep -q :")?;
        Ok(status == 0)
    }

    /// Starts `pleiades` inside in the background with `args` (each shell-quoted), its output
    /// in the scratch directory's `name.log`; its pid inside.
    pub fn spawn_client(&mut self, client: &Path, args: &[&str], name: &str) -> Result<u32, GuestError> {
        let log = self.scratch().join(format!("{name}.log"));
        let args: Vec<String> = args.iter().map(|a| shell_quote(a)).collect();
        let out = self.run(&format!(
            "RUST_LOG=info,quinn=warn {} {} > {} 2>&1 < /dev/null & echo PID=$!",
            shell_quote(&client.display().to_string()),
            args.join(" "),
            shell_quote(&log.display().to_string())
        ))?;
        out.iter().find_map(|l| l.trim().strip_prefix("PID=").and_then(|p| p.parse().ok())).ok_or_else(|| {
            GuestError::CommandFailed { command: "spawn".into(), status: -1, output: out.join("\n") }
        })
    }

    /// Sends SIGTERM to `pid` inside and waits (bounded) for it to end; false when it did not.
    pub fn stop_client(&mut self, pid: u32) -> Result<bool, GuestError> {
        let (status, _) = self.run_status(&format!(
            "kill -TERM {pid}; i=0; while kill -0 {pid} 2>/dev/null && [ $i -lt 600 ]; do i=$((i+1)); sleep 0.1; done; \
             ! kill -0 {pid} 2>/dev/null"
        ))?;
        Ok(status == 0)
    }

    /// Plugs a second stick (the `spare` image) into the xHCI controller: hot-plug.
    pub fn plug(&self) -> Result<serde_json::Value, String> {
        self.qmp(
            "device_add",
            serde_json::json!({"driver": "usb-storage", "bus": "xhci.0", "drive": "spare-drive", "id": "spare"}),
        )
    }

    /// Presses and releases key `qcode` (QEMU's key names: `a`, `ret`, `shift`) on the USB
    /// keyboard.
    pub fn key(&self, qcode: &str) -> Result<(), String> {
        for down in [true, false] {
            self.qmp(
                "input-send-event",
                serde_json::json!({"events": [{"type": "key", "data": {"down": down, "key": {"type": "qcode", "data": qcode}}}]}),
            )?;
        }
        Ok(())
    }

    /// Pulls device `id` (`stick`, `spare`, `kbd`) out.
    pub fn pull(&self, id: &str) -> Result<serde_json::Value, String> {
        self.qmp("device_del", serde_json::json!({ "id": id }))
    }

    /// One QMP command; its `return`, or its error as text.
    fn qmp(&self, command: &str, arguments: serde_json::Value) -> Result<serde_json::Value, String> {
        let stream =
            UnixStream::connect(&self.qmp).map_err(|e| format!("QMP {}: {e}", self.qmp.display()))?;
        stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
        let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut reader = BufReader::new(stream);
        let deadline = Instant::now() + Duration::from_secs(60);
        // The greeting, then the answers to our two commands (events may come between).
        let answer = |reader: &mut BufReader<UnixStream>| -> Result<serde_json::Value, String> {
            loop {
                if Instant::now() > deadline {
                    return Err("QMP: no answer".into());
                }
                let mut line = String::new();
                if reader.read_line(&mut line).map_err(|e| format!("QMP: {e}"))? == 0 {
                    return Err("QMP: QEMU closed the socket".into());
                }
                let value: serde_json::Value =
                    serde_json::from_str(&line).map_err(|e| format!("QMP said {line:?}: {e}"))?;
                if let Some(error) = value.get("error") {
                    return Err(format!("QMP: {error}"));
                }
                if value.get("return").is_some() || value.get("QMP").is_some() {
                    return Ok(value);
                }
            }
        };
        answer(&mut reader)?;
        writeln!(writer, "{}", serde_json::json!({"execute": "qmp_capabilities"}))
            .map_err(|e| e.to_string())?;
        answer(&mut reader)?;
        writeln!(writer, "{}", serde_json::json!({"execute": command, "arguments": arguments}))
            .map_err(|e| e.to_string())?;
        answer(&mut reader).map(|v| v["return"].clone())
    }
}
