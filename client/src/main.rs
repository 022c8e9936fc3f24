//! `pleiades`: the Pleiades thin client. `pleiades connect TARGET` opens the desktop in windows;
//! `--headless` is the recorder that tests and benchmarks drive (docs/client.md).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use pleiades_client::audio::{Audio, AudioOptions};
use pleiades_client::clipboard::ClipboardBridge;
use pleiades_client::recorder::{self, RecordOptions};
use pleiades_client::session::{Session, SessionOptions};
use pleiades_client::usb::UsbDevice;
use pleiades_client::usb::emulated::EmulatedDisk;
use pleiades_client::usb::libusb;
use pleiades_client::usb::redirect::UsbDevices;
use pleiades_client::{connect, script};
use pleiades_protocol::connfile::Connection;
use pleiades_protocol::handshake::Capabilities;
use pleiades_protocol::usb::UsbPolicy;
use std::sync::Arc;

/// The longest `--duration` (one day).
const MAX_DURATION_S: f64 = 86_400.0;
/// The shortest `--snapshot-every`.
const MIN_SNAPSHOT_EVERY_S: f64 = 0.1;

#[derive(Debug, Parser)]
#[command(name = "pleiades", version, about = "The Pleiades thin client")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Connect to a desktop with a connection file (.pleiades) or a pleiades:// URI.
    Connect {
        /// The connection file's path, or a pleiades:// URI.
        target: String,
        /// Run without a window: decode, ack and record.
        #[arg(long)]
        headless: bool,
        /// Write frames.jsonl, summary.json and PNGs into this directory.
        #[arg(long, value_name = "DIR")]
        record: Option<PathBuf>,
        /// End the session after this many seconds (default: when the input script is done, else
        /// when the server ends it, or Ctrl-C).
        #[arg(long, value_name = "S")]
        duration: Option<f64>,
        /// Replay this input script (docs/client.md).
        #[arg(long, value_name = "SCRIPT")]
        input: Option<PathBuf>,
        /// Write scanout-N-<ms>.png every S seconds.
        #[arg(long, value_name = "S")]
        snapshot_every: Option<f64>,
        /// The name the server logs for this client.
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
        /// Do not offer H.264: every frame arrives as lossless tiles (pixel-exact recordings).
        #[arg(long)]
        no_h264: bool,
        /// Do not offer the cursor channel: the server draws the cursor into the frames.
        #[arg(long)]
        server_cursor: bool,
        /// Send this WAV file (48 kHz, 16-bit, mono or stereo; looped) as the microphone.
        #[arg(long, value_name = "FILE.wav")]
        mic: Option<PathBuf>,
        /// Do not offer audio.
        #[arg(long)]
        no_audio: bool,
        /// Do not share the clipboard with the desktop (it is shared, as the desktop's pool
        /// allows, whenever an X display is reachable).
        #[arg(long)]
        no_clipboard: bool,
        /// Also play through the sound card (PulseAudio, else the default device); the WAV is
        /// written either way.
        #[arg(long)]
        play: bool,
        /// Use the sound card's microphone (unless --mic gives a file).
        #[arg(long)]
        mic_device: bool,
        /// Send this file into the desktop's Downloads once connected (repeat for more; files
        /// dropped on the window go too). Headless: use `pleiades send`.
        #[arg(long, value_name = "FILE")]
        send: Vec<PathBuf>,
        /// Redirect an emulated USB stick backed by this file (a disk image; its size rounded
        /// down to 512-byte blocks) into the desktop, as the desktop's pool allows (repeat for
        /// more). Handy for demos and machines without USB devices.
        #[arg(long, value_name = "FILE")]
        usb_emulated_disk: Vec<PathBuf>,
        /// Redirect this machine's USB devices that match RULES into the desktop: those
        /// plugged in now and those plugged in while connected. RULES: comma-separated
        /// `VVVV:PPPP` (vendor and product id, hex) and `class=HH` (every class of the device
        /// one of these: 08 mass storage, 03 HID, 0b smart card…), or `all`; repeat to add.
        /// `pleiades usb-list` shows the ids. The desktop's pool decides what it accepts.
        #[arg(long, value_name = "RULES")]
        usb: Vec<String>,
        /// Ignore the connection file's `usb_auto` rules (the devices the desktop's pool
        /// redirects by itself); only --usb's are used.
        #[arg(long)]
        no_usb_auto: bool,
    },
    /// List this machine's USB devices (hubs left out) with the ids `--usb` takes.
    UsbList {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Send files into the desktop's Downloads (the desktop's user's, through its guest agent).
    /// Resumes after a lost connection; running it again for the same file continues where
    /// the desktop's copy stopped. Exits 0 when every file arrived, its SHA-256 checked.
    Send {
        /// The connection file's path, or a pleiades:// URI.
        target: String,
        /// The files to send.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// Also write what happened to each file, as JSON, here.
        #[arg(long, value_name = "FILE.json")]
        report: Option<PathBuf>,
        /// The name the server logs for this client.
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
    },
    /// Check the sound card: play a 440 Hz tone (and record) for a while and print how many
    /// frames went through, as JSON.
    AudioTest {
        #[arg(long, default_value_t = 1.0)]
        seconds: f64,
        /// Also record from the default input device.
        #[arg(long)]
        record: bool,
    },
}

fn seconds(value: Option<f64>, flag: &str, min: f64) -> anyhow::Result<Option<Duration>> {
    match value {
        None => Ok(None),
        Some(s) if s.is_finite() && (min..=MAX_DURATION_S).contains(&s) => {
            Ok(Some(Duration::from_secs_f64(s)))
        }
        Some(s) => bail!("{flag} {s} is not within {min}..={MAX_DURATION_S} seconds"),
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,quinn=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Cmd::AudioTest { seconds, record } => audio_test(seconds, record),
        Cmd::UsbList { json } => usb_list(json),
        Cmd::Send { target, files, report, name } => send(&target, &files, report.as_deref(), name),
        Cmd::Connect {
            headless: false,
            target,
            name,
            no_h264,
            server_cursor,
            record,
            duration,
            input,
            snapshot_every,
            mic,
            no_audio,
            no_clipboard,
            play: _,
            mic_device,
            send,
            usb_emulated_disk,
            usb,
            no_usb_auto,
        } => {
            if record.is_some() || duration.is_some() || input.is_some() || snapshot_every.is_some() {
                eprintln!("pleiades: --record, --duration, --input and --snapshot-every need --headless");
                return ExitCode::from(2);
            }
            let run = || -> anyhow::Result<()> {
                let connection = connect::load(&target)?;
                let options = session_options(name, no_h264, server_cursor, no_audio, no_clipboard);
                // A window plays through the sound card; the microphone is opt-in.
                let audio =
                    AudioOptions { playback_wav: None, mic_wav: mic, speaker: true, microphone: mic_device };
                let files = pleiades_client::files::FileQueue::new();
                for path in &send {
                    files.push(
                        pleiades_client::files::OutgoingFile::prepare(path).map_err(anyhow::Error::msg)?,
                    );
                }
                let usb = usb_devices(&usb_emulated_disk, &usb_rules(&usb, &connection, no_usb_auto))?;
                pleiades_client::window::run(connection, options, audio, files, usb)
            };
            match run() {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("pleiades: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Connect {
            target,
            record,
            duration,
            input,
            snapshot_every,
            name,
            no_h264,
            server_cursor,
            mic,
            no_audio,
            no_clipboard,
            play,
            mic_device,
            send,
            usb_emulated_disk,
            usb,
            no_usb_auto,
            headless: true,
        } => {
            if !send.is_empty() {
                eprintln!("pleiades: --send needs a window; headless, use `pleiades send TARGET FILE...`");
                return ExitCode::from(2);
            }
            let run = || -> anyhow::Result<()> {
                let duration = seconds(duration, "--duration", 0.0)?;
                let snapshot_every = seconds(snapshot_every, "--snapshot-every", MIN_SNAPSHOT_EVERY_S)?;
                let script = match &input {
                    Some(path) => {
                        let text = read_script(path)?;
                        script::parse(&text).with_context(|| format!("input script {}", path.display()))?
                    }
                    None => Vec::new(),
                };
                let connection = connect::load(&target)?;
                let options = session_options(name, no_h264, server_cursor, no_audio, no_clipboard);
                let audio_options = AudioOptions {
                    playback_wav: record.as_ref().map(|dir| dir.join("playback.wav")),
                    mic_wav: mic,
                    speaker: play,
                    microphone: mic_device,
                };
                if let Some(dir) = &record {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("cannot create {}", dir.display()))?;
                }
                let audio_json = record.as_ref().map(|dir| dir.join("audio.json"));
                let clipboard_json = record.as_ref().map(|dir| dir.join("clipboard.json"));
                let usb_json = record.as_ref().map(|dir| dir.join("usb.json"));
                let usb_devices =
                    usb_devices(&usb_emulated_disk, &usb_rules(&usb, &connection, no_usb_auto))?;
                let record_options = RecordOptions { dir: record, duration, snapshot_every, script };
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .context("cannot start the async runtime")?;
                runtime.block_on(async {
                    tracing::info!(host = %connection.host, port = connection.port, desktop = %connection.desktop, "connecting");
                    let connected = connect::connect(&connection).await?;
                    let session = Session::start(connected, &connection.ticket, options).await?;
                    let audio = Audio::start(&session.handle, audio_options)?;
                    let clipboard = ClipboardBridge::start(&session.handle);
                    let mut usb_devices = usb_devices;
                    let usb = usb_devices.redirect(&session.handle);
                    let recorded = recorder::record(session, record_options).await;
                    if let Some(usb) = usb {
                        let (reports, _) = tokio::task::spawn_blocking(move || usb.finish()).await?;
                        if let Some(path) = &usb_json {
                            std::fs::write(path, serde_json::to_string_pretty(&reports)?)
                                .with_context(|| format!("cannot write {}", path.display()))?;
                        }
                    }
                    if let Some(clipboard) = clipboard {
                        let summary = tokio::task::spawn_blocking(move || clipboard.finish()).await?;
                        if let Some(path) = &clipboard_json {
                            std::fs::write(path, serde_json::to_string_pretty(&summary)?)
                                .with_context(|| format!("cannot write {}", path.display()))?;
                        }
                    }
                    if let Some(audio) = audio {
                        let summary = audio.finish().await?;
                        if let Some(path) = &audio_json {
                            std::fs::write(path, serde_json::to_string_pretty(&summary)?)
                                .with_context(|| format!("cannot write {}", path.display()))?;
                        }
                    }
                    match recorded {
                        Ok(summary) => {
                            println!("{}", serde_json::to_string_pretty(&summary)?);
                            Ok(())
                        }
                        Err((summary, error)) => {
                            println!("{}", serde_json::to_string_pretty(&summary)?);
                            Err(error.into())
                        }
                    }
                })
            };
            match run() {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("pleiades: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// The rules of `--usb`, with the connection file's `usb_auto` unless `--no-usb-auto`.
fn usb_rules(flags: &[String], connection: &Connection, no_auto: bool) -> Vec<String> {
    let mut rules = flags.to_vec();
    if !no_auto && !connection.usb_auto.is_empty() && connection.usb_auto != "none" {
        tracing::info!(
            rules = connection.usb_auto,
            "the desktop's pool redirects these USB devices by itself"
        );
        rules.push(connection.usb_auto.clone());
    }
    rules
}

/// The devices to redirect: the `--usb-emulated-disk` files as emulated sticks, this
/// machine's devices that the `--usb` rules select, and a watcher for those plugged in later.
fn usb_devices(disks: &[PathBuf], rules: &[String]) -> anyhow::Result<UsbDevices> {
    let mut present = disks
        .iter()
        .map(|path| {
            let disk = EmulatedDisk::open(path, false).with_context(|| {
                format!("--usb-emulated-disk {}: cannot open it for reading and writing", path.display())
            })?;
            Ok(Box::new(disk) as Box<dyn UsbDevice>)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if rules.is_empty() {
        return Ok(UsbDevices { present, ..UsbDevices::default() });
    }
    let mut merged = UsbPolicy::NONE;
    for rule in rules {
        let policy = UsbPolicy::parse(rule).map_err(|e| anyhow::anyhow!("--usb {rule}: {e}"))?;
        merged.all |= policy.all;
        merged.classes.extend(policy.classes);
        merged.devices.extend(policy.devices);
    }
    let rules = merged;
    let found = libusb::open_matching(&rules).context("cannot list this machine's USB devices")?;
    if found.is_empty() {
        tracing::info!(%rules, "no USB device present matches --usb; devices plugged in later will be redirected");
    }
    present.extend(found.into_iter().map(|d| Box::new(d) as Box<dyn UsbDevice>));
    Ok(UsbDevices { present, watcher: libusb::Watcher::start(rules).map(Arc::new), ..UsbDevices::default() })
}

/// `pleiades usb-list`.
fn usb_list(json: bool) -> ExitCode {
    let present = match libusb::list() {
        Ok(present) => present,
        Err(e) => {
            eprintln!("pleiades: cannot list USB devices: {e}");
            return ExitCode::FAILURE;
        }
    };
    if json {
        let rows: Vec<serde_json::Value> = present
            .iter()
            .map(|p| {
                serde_json::json!({
                    "bus": p.bus,
                    "address": p.address,
                    "usb_id": format!("{:04x}:{:04x}", p.info.vendor_id, p.info.product_id),
                    "class": format!("{:02x}", p.info.class),
                    "interfaces": p.info.interfaces.iter().map(|c| format!("{c:02x}")).collect::<Vec<_>>(),
                    "speed": format!("{:?}", p.info.speed).to_lowercase(),
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(rows));
    } else if present.is_empty() {
        println!("no USB devices (hubs are not listed)");
    } else {
        println!("{:<8} {:<10} {:<12} {:<7} SPEED", "BUS/ADDR", "ID", "INTERFACES", "CLASS");
        for p in &present {
            let interfaces: Vec<String> = p.info.interfaces.iter().map(|c| format!("{c:02x}")).collect();
            println!(
                "{:03}/{:03}  {:04x}:{:04x}  {:<12} {:<7} {:?}",
                p.bus,
                p.address,
                p.info.vendor_id,
                p.info.product_id,
                interfaces.join(","),
                format!("{:02x}", p.info.class),
                p.info.speed
            );
        }
    }
    ExitCode::SUCCESS
}

fn session_options(
    name: Option<String>,
    no_h264: bool,
    server_cursor: bool,
    no_audio: bool,
    no_clipboard: bool,
) -> SessionOptions {
    let mut options = SessionOptions::default();
    if let Some(name) = name {
        options.client_name = name;
    }
    if no_h264 {
        options.capabilities = options.capabilities.difference(Capabilities::H264);
    }
    if server_cursor {
        options.capabilities =
            options.capabilities.difference(Capabilities::CURSOR_CHANNEL | Capabilities::CURSOR_DATAGRAMS);
    }
    if no_audio {
        options.capabilities = options.capabilities.difference(Capabilities::AUDIO);
    }
    if no_clipboard {
        options.capabilities = options.capabilities.difference(Capabilities::CLIPBOARD);
    }
    options
}

/// `pleiades send`: the files' SHA-256 first, then one session (resumed as needed) that sends
/// them, with a progress bar on a terminal.
fn send(target: &str, paths: &[PathBuf], report: Option<&std::path::Path>, name: Option<String>) -> ExitCode {
    use pleiades_client::files::{FileQueue, FileState, OutgoingFile};
    let run = || -> anyhow::Result<bool> {
        let connection = connect::load(target)?;
        let queue = FileQueue::new();
        for path in paths {
            let file = OutgoingFile::prepare(path).map_err(anyhow::Error::msg)?;
            tracing::info!(name = file.name, size = file.size, sha256 = file.sha256, "to send");
            queue.push(file);
        }
        let total: u64 = queue.snapshot().iter().map(|f| f.size).sum();
        let bar = indicatif::ProgressBar::new(total).with_style(
            indicatif::ProgressStyle::with_template(
                "{msg} {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        let options = session_options(name, true, true, true, true);
        let sent = runtime.block_on(async {
            let watch = {
                let (queue, bar) = (queue.clone(), bar.clone());
                tokio::spawn(async move {
                    let mut last_logged = 0u64;
                    loop {
                        let files = queue.snapshot();
                        let received: u64 = files.iter().map(|f| f.received).sum();
                        bar.set_position(received);
                        if let Some(f) = files.iter().find(|f| f.state == FileState::Sending) {
                            bar.set_message(f.name.clone());
                        }
                        // A line per 10 % for logs (the bar is hidden without a terminal).
                        if total > 0 && received * 10 / total > last_logged * 10 / total {
                            tracing::info!(received, total, "{} %", received * 100 / total);
                            last_logged = received;
                        }
                        tokio::select! {
                            () = queue.changed() => {}
                            () = tokio::time::sleep(Duration::from_millis(500)) => {}
                        }
                    }
                })
            };
            let result = pleiades_client::files::send_until_done(&connection, options, &queue).await;
            watch.abort();
            result
        });
        bar.finish_and_clear();
        let files = queue.snapshot();
        let json = serde_json::to_string_pretty(&files)?;
        println!("{json}");
        if let Some(path) = report {
            std::fs::write(path, &json).with_context(|| format!("cannot write {}", path.display()))?;
        }
        for file in &files {
            match &file.state {
                FileState::Done { stored_as } => eprintln!("pleiades: {} → Downloads/{stored_as}", file.name),
                FileState::Failed { reason } => eprintln!("pleiades: {} not sent: {reason}", file.name),
                _ => eprintln!(
                    "pleiades: {} not sent ({} of {} bytes arrived)",
                    file.name, file.received, file.size
                ),
            }
        }
        sent?;
        Ok(files.iter().all(|f| matches!(f.state, FileState::Done { .. })))
    };
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("pleiades: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Reads a script, refusing files far larger than 10 000 lines could need.
fn read_script(path: &std::path::Path) -> anyhow::Result<String> {
    const MAX_SCRIPT_BYTES: u64 = 16 << 20;
    let metadata = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if metadata.len() > MAX_SCRIPT_BYTES {
        bail!("input script {} is larger than {} MiB", path.display(), MAX_SCRIPT_BYTES >> 20);
    }
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// `pleiades audio-test`: the sound card plays (and records) for `seconds`.
fn audio_test(seconds: f64, record: bool) -> ExitCode {
    use pleiades_client::audio::device::{Microphone, Speaker};
    let run = || -> Result<serde_json::Value, String> {
        let seconds = seconds.clamp(0.1, 60.0);
        let speaker = Speaker::open()?;
        let microphone = if record { Some(Microphone::open()?) } else { None };
        let frames = (seconds * 48_000.0) as usize;
        let tone: Vec<i16> = (0..frames)
            .flat_map(|i| {
                let v = (8000.0 * (2.0 * std::f64::consts::PI * 440.0 * i as f64 / 48_000.0).sin()) as i16;
                [v, v]
            })
            .collect();
        let started = std::time::Instant::now();
        for chunk in tone.chunks(1920) {
            speaker.play(chunk);
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(300));
        Ok(serde_json::json!({
            "seconds": started.elapsed().as_secs_f64(),
            "played_frames": speaker.frames_played(),
            "captured_frames": microphone.as_ref().map_or(0, Microphone::frames_captured),
        }))
    };
    match run() {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pleiades: {e}");
            ExitCode::FAILURE
        }
    }
}
