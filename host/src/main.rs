//! `pleiades-host`: runs desktop VMs and their devices.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use pleiades_host::devices::virtio::VirtioDevice;
use pleiades_host::devices::virtio::rng::Rng;

#[derive(Debug, Parser)]
#[command(name = "pleiades-host", version, about = "Pleiades host: desktop VMs and their devices")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve one virtio device as a vhost-user backend on a Unix socket (for Pleiades' VMM or
    /// QEMU's `-device vhost-user-<kind>-pci`). Exits when the frontend disconnects.
    Device {
        /// The device to serve.
        kind: DeviceKind,
        /// Unix socket to listen on (created; removed when done).
        #[arg(long)]
        socket: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DeviceKind {
    /// virtio-rng: entropy from the host's /dev/urandom.
    Rng,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PLEIADES_LOG").unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pleiades-host: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Device { kind, socket } => {
            let device: Box<dyn VirtioDevice> = match kind {
                DeviceKind::Rng => Box::new(Rng::new()?),
            };
            pleiades_host::devices::vhost_user::serve(device, &socket)
        }
    }
}
