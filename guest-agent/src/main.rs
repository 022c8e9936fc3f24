//! `pleiades-agent`: the Pleiades guest agent.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pleiades_agent::ready::GuestInfo;

#[derive(Debug, Parser)]
#[command(name = "pleiades-agent", version, about = "Pleiades guest agent (runs inside the desktop VM)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the guest's facts as the one `PLEIADES-READY {json}` line the host waits for.
    Ready {
        /// Root of the filesystem to read /proc and /sys from.
        #[arg(long, default_value = "/", hide = true)]
        root: PathBuf,
    },
    /// Draw a test/benchmark workload on the framebuffer (/dev/fb0): idle, typing, scroll,
    /// video or motion.
    Workload {
        workload: pleiades_agent::workload::Workload,
        /// How long to draw.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
    },
    /// Play a sine tone on the first sound card (/dev/snd/pcmC0D0p), then print
    /// `PLEIADES-TONE {json}` (frames and RMS written).
    Tone {
        #[arg(long, default_value_t = 440.0)]
        freq: f64,
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Peak level, 0 to 1 of full scale.
        #[arg(long, default_value_t = 0.5)]
        amplitude: f64,
        #[arg(long, default_value = "/dev/snd/pcmC0D0p")]
        device: PathBuf,
    },
    /// Record from the first sound card (/dev/snd/pcmC0D0c) and print the left channel as a
    /// mono WAV in base64 between PLEIADES-WAV-BEGIN and PLEIADES-WAV-END lines.
    Record {
        #[arg(long, default_value_t = 1.0)]
        seconds: f64,
        #[arg(long, default_value = "/dev/snd/pcmC0D0c")]
        device: PathBuf,
    },
    /// Measure how fast a block device reads (sequential MB/s, random 4 KiB reads a second)
    /// and print `PLEIADES-DISK {json}`: the benchmarks compare a redirected USB stick with the
    /// same image as a virtio disk.
    DiskBench {
        device: PathBuf,
        /// Bytes read sequentially from the start, in MiB.
        #[arg(long, default_value_t = 32)]
        sequential_mib: u64,
        /// Random 4 KiB reads.
        #[arg(long, default_value_t = 1000)]
        random: u64,
    },
    /// The agent's service: keep a link to the VM process over vsock (guest facts, session
    /// state, the host's lock and power requests), connecting again whenever it ends.
    Run {
        /// Root of the filesystem to read the guest's facts from.
        #[arg(long, default_value = "/", hide = true)]
        root: PathBuf,
        /// Command line for the host's shutdown request.
        #[arg(long, default_value = "/bin/poweroff")]
        poweroff: String,
        /// Command line for the host's restart request.
        #[arg(long, default_value = "/bin/reboot")]
        reboot: String,
        /// Command line that locks the graphical session's screen (none: lock requests are
        /// logged), e.g. "loginctl lock-sessions".
        #[arg(long)]
        lock: Option<String>,
        /// Command line that unlocks it, e.g. "loginctl unlock-sessions".
        #[arg(long)]
        unlock: Option<String>,
    },
    /// The agent's per-user part, inside the graphical session: report its idle time and lock
    /// state to the service, share the clipboard, receive files.
    Session {
        /// The service's socket.
        #[arg(long, default_value = pleiades_agent::session::SOCKET)]
        socket: PathBuf,
        /// Where files sent from the client land (default: $XDG_DOWNLOAD_DIR, else ~/Downloads).
        #[arg(long, value_name = "DIR")]
        downloads: Option<PathBuf>,
    },
    /// Wait for the ACPI power button and then run `poweroff` (the host's clean shutdown).
    PowerButton {
        /// Command to run when the button is pressed.
        #[arg(long, default_value = "/bin/poweroff")]
        action: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Ready { root } => match GuestInfo::collect(&root) {
            Ok(info) => {
                println!("{}", info.ready_line());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("pleiades-agent: cannot report readiness: {e}");
                ExitCode::FAILURE
            }
        },
        Command::PowerButton { action } => power_button(&action),
        Command::DiskBench { device, sequential_mib, random } => {
            match pleiades_agent::disk::bench(&device, sequential_mib << 20, random) {
                Ok(report) => {
                    println!("PLEIADES-DISK {}", serde_json::to_string(&report).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("pleiades-agent: cannot read {}: {e}", device.display());
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run { root, poweroff, reboot, lock, unlock } => {
            let sessions = match pleiades_agent::session::SessionReports::listen(std::path::Path::new(
                pleiades_agent::session::SOCKET,
            )) {
                Ok(reports) => Some(reports),
                Err(e) => {
                    eprintln!(
                        "pleiades-agent: cannot listen on {} ({e}); no session reports",
                        pleiades_agent::session::SOCKET
                    );
                    None
                }
            };
            let actions = pleiades_agent::service::Actions { poweroff, reboot, lock, unlock };
            pleiades_agent::service::run(&root, &actions, sessions.as_ref())
        }
        Command::Session { socket, downloads } => {
            pleiades_agent::session::run_session_part(&socket, downloads)
        }
        Command::Tone { freq, seconds, amplitude, device } => {
            match pleiades_agent::sound::tone(&device, freq, amplitude.clamp(0.0, 1.0), seconds) {
                Ok(report) => {
                    println!("PLEIADES-TONE {}", serde_json::to_string(&report).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("pleiades-agent: cannot play on {}: {e}", device.display());
                    ExitCode::FAILURE
                }
            }
        }
        Command::Record { seconds, device } => match pleiades_agent::sound::record(&device, seconds) {
            Ok(samples) => {
                let text = pleiades_agent::sound::base64(&pleiades_agent::sound::wav(&samples));
                println!("PLEIADES-WAV-BEGIN");
                for line in text.as_bytes().chunks(76) {
                    println!("{}", String::from_utf8_lossy(line));
                }
                println!("PLEIADES-WAV-END");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("pleiades-agent: cannot record from {}: {e}", device.display());
                ExitCode::FAILURE
            }
        },
        Command::Workload { workload, seconds } => {
            let run = || -> std::io::Result<u64> {
                let mut fb = pleiades_agent::workload::FbDev::open(std::path::Path::new("/"), 0)?;
                let until = std::time::Instant::now()
                    + std::time::Duration::from_secs_f64(seconds.clamp(0.0, 86_400.0));
                pleiades_agent::workload::run(workload, &mut fb, until, &|| false)
            };
            match run() {
                Ok(frames) => {
                    println!("pleiades-agent: {workload:?} drew {frames} frames");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("pleiades-agent: the workload cannot draw: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn power_button(action: &std::path::Path) -> ExitCode {
    let devices = pleiades_agent::power::power_button_devices(std::path::Path::new("/"));
    if devices.is_empty() {
        eprintln!("pleiades-agent: no ACPI power button in this guest (is the `button` module loaded?)");
        return ExitCode::FAILURE;
    }
    // One thread per button (there is usually one); the first press wins.
    let (tx, rx) = std::sync::mpsc::channel();
    for device in devices {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let result = pleiades_agent::power::wait_for_press(&device);
            let _ = tx.send((device, result));
        });
    }
    drop(tx);
    for (device, result) in rx {
        match result {
            Ok(()) => {
                println!("pleiades-agent: power button pressed: powering off");
                return match std::process::Command::new(action).status() {
                    Ok(s) if s.success() => ExitCode::SUCCESS,
                    Ok(s) => {
                        eprintln!("pleiades-agent: {} exited with {s}", action.display());
                        ExitCode::FAILURE
                    }
                    Err(e) => {
                        eprintln!("pleiades-agent: cannot run {}: {e}", action.display());
                        ExitCode::FAILURE
                    }
                };
            }
            Err(e) => eprintln!("pleiades-agent: reading {}: {e}", device.display()),
        }
    }
    ExitCode::FAILURE
}
