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
    }
}
