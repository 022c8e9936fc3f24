//! Runs shell commands inside the test kit's KVM host (`pleiades_tests::kvm_host`): a VM under
//! QEMU TCG `-cpu max` with `kvm_amd` loaded and this machine's root over 9p, where Linux guests
//! run on Pleiades' VMM. For looking into what the tests and benchmarks measure there:
//!
//! ```sh
//! cargo run -p pleiades-tests --example kvm_host -- 'ls /dev/kvm' 'cat /proc/cpuinfo | grep -c svm'
//! ```
//!
//! Each argument runs in turn (10 minutes at most each); its output is printed here. The
//! shared scratch directory (the same path inside and here) is printed first and removed at
//! the end.

use std::time::Duration;

use pleiades_tests::kvm_host::{KvmHost, KvmHostConfig, KvmHostParts};

fn main() {
    let commands: Vec<String> = std::env::args().skip(1).collect();
    if commands.is_empty() || commands.iter().any(|c| c == "--help" || c == "-h") {
        eprintln!("usage: kvm_host COMMAND...  (each a shell command run inside the KVM host)");
        std::process::exit(2);
    }
    let parts = KvmHostParts::locate().unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(1)
    });
    let mut host = KvmHost::boot(parts, &KvmHostConfig::default()).unwrap_or_else(|e| {
        eprintln!("error: the KVM host did not start: {e}");
        std::process::exit(1)
    });
    println!(
        "KVM host READY after {:.1} s; scratch {}",
        host.boot_times().ready.as_secs_f64(),
        host.scratch().display()
    );
    for command in &commands {
        println!("$ {command}");
        match host.run_status(command, Duration::from_secs(600)) {
            Ok((status, lines)) => {
                for line in lines {
                    println!("{line}");
                }
                if status != 0 {
                    println!("(exit status {status})");
                }
            }
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        }
    }
}
