//! A desktop through the broker, end to end, with every real piece
//! ([`pleiades_tests::stack`]):
//!
//! `pleiades-broker serve` (HTTPS, SQLite) with a user, an image of the test guest and a pool;
//! `pleiades-host serve` registers with a one-time token (the broker's certificate pinned),
//! heartbeats, and boots the desktop the broker asks for (`--vmm qemu`, one `run` process); the
//! user logs in over the REST API, gets a desktop and a connection, and the headless client
//! `pleiades connect` reaches the desktop with the broker's ticket and types into its shell.
//! The ticket is one-time, no secret reaches a log, and SIGTERM to the daemon powers its
//! desktops off.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use pleiades_tests::image::GuestImage;
use pleiades_tests::qemu::boot_timeout;
use pleiades_tests::stack::{Stack, StackOptions, wait_for};
use pleiades_tests::workspace_binary;
use serde_json::Value;

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn connect(file: &Path, record: &Path, script: &str) -> (bool, String) {
    let script_path = record.with_extension("script");
    std::fs::write(&script_path, script).unwrap();
    let output = Command::new(workspace_binary("pleiades").unwrap())
        .arg("connect")
        .arg(file)
        .args(["--headless", "--duration", "12", "--record"])
        .arg(record)
        .arg("--input")
        .arg(&script_path)
        .output()
        .unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

#[test]
fn a_user_gets_a_desktop_from_a_pool_and_the_client_reaches_it_with_the_brokers_ticket() {
    let image = GuestImage::locate().expect("test guest image");
    let dir = tempfile::tempdir().unwrap();
    let host_bin = workspace_binary("pleiades-host").unwrap();
    let session_port = free_tcp_port(); // A free TCP port is very likely a free UDP port too.
    let options = StackOptions {
        dir: dir.path().to_owned(),
        bin_dir: host_bin.parent().unwrap().to_owned(),
        broker_port: free_tcp_port(),
        first_session_port: session_port,
        session_ports: 10,
        vmm: Some("qemu".into()),
        user: ("alice".into(), "alice-password-1".into()),
        admin: ("root".into(), "root-password-1".into()),
        spares: 0,
    };
    let mut stack = Stack::start(options, &image).unwrap();
    let mode = std::fs::metadata(stack.host_state.join("registration.json")).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600,
        "the credential file is private"
    );

    let bearer = stack.login("alice", "alice-password-1").unwrap();
    let desktop = stack.request_desktop(&bearer).unwrap();
    stack.wait_in_use(&bearer, &desktop, boot_timeout()).unwrap();
    let serial = stack.serial_log(&desktop);
    wait_for("the guest to boot", boot_timeout(), || {
        std::fs::read_to_string(&serial).unwrap_or_default().contains("PLEIADES-READY").then_some(())
    })
    .unwrap();

    let connection = stack.connect(&bearer, &desktop).unwrap();
    let file = dir.path().join("desk.pleiades");
    std::fs::write(&file, connection["file"].as_str().expect("a connection file")).unwrap();
    assert_eq!(connection["connection"]["cert_sha256"].as_str().map(str::len), Some(64));
    // The desktop's own session server, on a port of the host's range.
    let port = connection["connection"]["port"].as_u64().unwrap();
    assert!((u64::from(session_port)..u64::from(session_port) + 10).contains(&port), "{connection}");

    let record = dir.path().join("rec");
    let script = "wait 2000\ntype echo PLEIADES-BROKER-$((6*7)) > /dev/ttyS0\\n\nwait 3000\n";
    let (ok, text) = connect(&file, &record, script);
    assert!(ok, "the client reaches the desktop: {text}");
    wait_for("the typed command on the guest's serial console", Duration::from_secs(30), || {
        std::fs::read_to_string(&serial).unwrap_or_default().contains("PLEIADES-BROKER-42").then_some(())
    })
    .unwrap();
    let summary: Value =
        serde_json::from_slice(&std::fs::read(record.join("summary.json")).unwrap()).unwrap();
    assert!(summary["frames"].as_u64().unwrap_or(0) > 0, "{summary}");

    // The ticket was one-time: the same file is refused, and the desktop goes on.
    let (ok, text) = connect(&file, &dir.path().join("rec2"), "wait 100\n");
    assert!(!ok, "a used ticket must be refused: {text}");
    assert!(text.contains("ticket"), "{text}");
    // A fresh ticket works again.
    let again = stack.connect(&bearer, &desktop).unwrap();
    std::fs::write(&file, again["file"].as_str().unwrap()).unwrap();
    let (ok, text) = connect(&file, &dir.path().join("rec3"), "wait 500\n");
    assert!(ok, "a fresh ticket is accepted: {text}");

    // The broker audited the connects, never a ticket; no log has a ticket or the token.
    let (audit, _) = stack.cli(&["audit", "--limit", "200"]).unwrap();
    assert!(audit.contains("desktop.connect") && audit.contains("host.register"), "{audit}");
    let logs = [&stack.broker.log, &stack.host.log].map(|p| std::fs::read_to_string(p).unwrap());
    for ticket in [&connection, &again].map(|c| c["connection"]["ticket"].as_str().unwrap().to_owned()) {
        assert!(!audit.contains(&ticket) && !logs.iter().any(|l| l.contains(&ticket)));
    }

    // SIGTERM: the daemon powers its desktops off and ends cleanly.
    let status = stack.host.terminate(Duration::from_secs(90)).unwrap();
    assert!(status.success(), "{}", std::fs::read_to_string(&stack.host.log).unwrap());
    let vm_log =
        std::fs::read_to_string(stack.host_state.join("desktops").join(&desktop).join("vm.log")).unwrap();
    assert!(!vm_log.contains("panicked"), "{vm_log}");
}
