//! A desktop through the broker, end to end, with every real piece
//! ([`pleiades_tests::stack`]):
//!
//! `pleiades-broker serve` (HTTPS, SQLite) with a user, an image of the test guest and a pool;
//! `pleiades-host serve` registers with a one-time token (the broker's certificate pinned),
//! heartbeats, and boots the desktop the broker asks for (`--vmm qemu`, one `run` process,
//! unjailed here: `--jail off`; the jailed path is `desktop_jail`'s); the
//! user logs in over the REST API, gets a desktop and a connection, and the headless client
//! `pleiades connect` reaches the desktop with the broker's ticket and types into its shell.
//! The ticket is one-time, a ticket from before the desktop's recycle is refused by the
//! recycled desktop, no secret reaches a log, and SIGTERM to the daemon powers its desktops
//! off. The broker's ticket key begins with `-` (one broker in 64 draws such a key;
//! here it always does), which must reach every VM process intact.
//!
//! A second scenario gives the pool an image the host cannot start: the broker retries with a
//! growing wait, never holds more desktops than the pool's maximum, shows the host's reason, and
//! the host keeps no state of the failed starts.

use std::path::Path;
use std::time::Duration;

use pleiades_tests::image::GuestImage;
use pleiades_tests::qemu::boot_timeout;
use pleiades_tests::stack::{Stack, StackOptions, wait_for};
use serde_json::Value;

/// A ticket signing key (PKCS#8) whose base64url public key begins with `-`, in a file.
fn dash_ticket_key(dir: &Path) -> (std::path::PathBuf, String) {
    use pleiades_protocol::ticket::TicketSigner;
    for _ in 0..10_000 {
        let pkcs8 = TicketSigner::generate_pkcs8().unwrap();
        let public = TicketSigner::from_pkcs8(&pkcs8).unwrap().public_key().to_base64();
        if public.starts_with('-') {
            let file = dir.join("ticket-key.pk8");
            std::fs::write(&file, &pkcs8).unwrap();
            return (file, public);
        }
    }
    panic!("no key beginning with '-' in 10,000 draws (1 in 64 each)");
}

#[test]
fn a_user_gets_a_desktop_from_a_pool_and_the_client_reaches_it_with_the_brokers_ticket() {
    let image = GuestImage::locate().expect("test guest image");
    let dir = tempfile::tempdir().unwrap();
    let (ticket_key, public_key) = dash_ticket_key(dir.path());
    let options = StackOptions {
        session_ports: 10,
        spares: 0,
        ticket_key: Some(ticket_key),
        max: 1,
        // Unjailed (the jailed path is desktop_jail's): the daemon still binds the session port
        // and hands the socket over.
        jail: "off",
        // No clipboard either way, no files (the pool's data loss prevention switches).
        clipboard: (false, false),
        file_transfer: false,
        ..StackOptions::local(dir.path()).unwrap()
    };
    let session_port = options.first_session_port;
    let mut stack = Stack::start(options, &image).unwrap();
    let (key, _) = stack.cli(&["ticket-key"]).unwrap();
    assert_eq!(key.trim(), public_key, "the broker signs with the imported key");
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

    // The guest agent's report reaches the admin's desktop list: over vsock to the VM
    // process, in the host's heartbeat, into the broker.
    let admin = stack.login("root", "root-password-1").unwrap();
    let guest = wait_for("the guest agent's report in the broker", Duration::from_secs(60), || {
        let desktops = stack.get("/api/v1/admin/desktops", &admin).ok()?;
        let d = desktops.as_array()?.iter().find(|d| d["id"] == desktop.as_str())?.clone();
        d["guest"].is_object().then(|| d["guest"].clone())
    })
    .unwrap();
    assert_eq!(guest["agent_version"], env!("CARGO_PKG_VERSION"), "{guest}");
    assert_eq!(guest["hostname"], "pleiades-guest", "{guest}");
    assert!(guest["kernel"].as_str().is_some_and(|k| k.contains("amd64")), "{guest}");

    let connection = stack.connect(&bearer, &desktop).unwrap();
    let file = dir.path().join("desk.pleiades");
    std::fs::write(&file, connection["file"].as_str().expect("a connection file")).unwrap();
    assert_eq!(connection["connection"]["cert_sha256"].as_str().map(str::len), Some(64));
    // The desktop's own session server, on a port of the host's range.
    let port = connection["connection"]["port"].as_u64().unwrap();
    assert!((u64::from(session_port)..u64::from(session_port) + 10).contains(&port), "{connection}");

    let record = dir.path().join("rec");
    let script = "wait 2000\ntype echo PLEIADES-BROKER-$((6*7)) > /dev/ttyS0\\n\nwait 3000\n";
    let (ok, text) = stack.run_client(&file, &record, script);
    assert!(ok, "the client reaches the desktop: {text}");
    wait_for("the typed command on the guest's serial console", Duration::from_secs(30), || {
        std::fs::read_to_string(&serial).unwrap_or_default().contains("PLEIADES-BROKER-42").then_some(())
    })
    .unwrap();
    let summary: Value =
        serde_json::from_slice(&std::fs::read(record.join("summary.json")).unwrap()).unwrap();
    assert!(summary["frames"].as_u64().unwrap_or(0) > 0, "{summary}");

    // The pool allows no clipboard: a client whose user copied something (on its own X
    // display) connects; the host keeps the copy from the guest, the client learns why, and the
    // broker audits the attempt.
    clipboard_is_kept_back_and_audited(&stack, &bearer, &desktop, dir.path());
    // Nor files: `pleiades send` is refused by the host and the broker audits it.
    files_are_kept_out_and_audited(&stack, &bearer, &desktop, dir.path());

    // The ticket was one-time: the same file is refused, and the desktop goes on.
    let (ok, text) = stack.run_client(&file, &dir.path().join("rec2"), "wait 100\n");
    assert!(!ok, "a used ticket must be refused: {text}");
    assert!(text.contains("ticket"), "{text}");
    // A fresh ticket works again.
    let again = stack.connect(&bearer, &desktop).unwrap();
    std::fs::write(&file, again["file"].as_str().unwrap()).unwrap();
    let (ok, text) = stack.run_client(&file, &dir.path().join("rec3"), "wait 500\n");
    assert!(ok, "a fresh ticket is accepted: {text}");

    // A ticket from before a recycle does not open the recycled desktop (security review):
    // the recycle starts a new VM process, with an empty replay cache, for the desktop's next
    // generation, and the process refuses the earlier generation's tickets.
    let before = stack.connect(&bearer, &desktop).unwrap();
    let before_file = dir.path().join("before-recycle.pleiades");
    std::fs::write(&before_file, before["file"].as_str().unwrap()).unwrap();
    let boots = std::fs::read_to_string(&serial).unwrap().matches("PLEIADES-READY").count();
    stack.act(&format!("/api/v1/desktops/{desktop}/release"), &bearer).unwrap();
    let recycled =
        wait_for("the recycled desktop", boot_timeout(), || stack.request_desktop(&bearer).ok()).unwrap();
    assert_eq!(recycled, desktop, "the pool has one desktop");
    stack.wait_in_use(&bearer, &desktop, boot_timeout()).unwrap();
    wait_for("the recycled guest to boot", boot_timeout(), || {
        let text = std::fs::read_to_string(&serial).unwrap_or_default();
        (text.matches("PLEIADES-READY").count() > boots).then_some(())
    })
    .unwrap();
    let (ok, text) = stack.run_client(&before_file, &dir.path().join("rec4"), "wait 100\n");
    assert!(!ok, "a ticket from before the recycle must be refused: {text}");
    assert!(text.contains("ExpiredTicket") && text.contains("another start of this desktop"), "{text}");
    let after = stack.connect(&bearer, &desktop).unwrap();
    std::fs::write(&file, after["file"].as_str().unwrap()).unwrap();
    let (ok, text) = stack.run_client(&file, &dir.path().join("rec5"), "wait 500\n");
    assert!(ok, "the recycled desktop's own ticket is accepted: {text}");

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

#[test]
fn an_image_the_host_cannot_start_is_retried_with_a_growing_wait_and_the_reason_is_shown() {
    let image = GuestImage::locate().expect("test guest image");
    let dir = tempfile::tempdir().unwrap();
    // A "kernel" that is a text file: `pleiades-host run` cannot load it.
    let bad_kernel = dir.path().join("not-a-kernel");
    std::fs::write(&bad_kernel, "this is not a bzImage\n").unwrap();
    let options =
        StackOptions { spares: 2, kernel: Some(bad_kernel), ..StackOptions::local(dir.path()).unwrap() };
    let stack = Stack::start(options, &image).unwrap();
    let bearer = stack.login("alice", "alice-password-1").unwrap();
    // The user is told why, instead of waiting for a desktop that never comes.
    let refused =
        wait_for("the broker to report the failing image", Duration::from_secs(120), || {
            match stack.request_desktop(&bearer) {
                Err(e) if e.contains("503") => Some(e),
                _ => None,
            }
        })
        .unwrap();
    assert!(refused.contains("fail to start"), "{refused}");
    let admin = stack.login("root", "root-password-1").unwrap();
    let failures = |desktops: &Value| -> Vec<i64> {
        desktops.as_array().unwrap().iter().map(|d| d["start_failures"].as_i64().unwrap()).collect()
    };
    // Let the broker and host go on for a while: the pool's maximum (4) bounds every desktop,
    // failed ones too, and each waits longer before its next try.
    // A desktop is `failed` between tries and `provisioning` while one runs: every desktop must
    // be seen failed, with the host's reason, at some sample.
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    let mut desktops = Value::Null;
    let mut seen_failed = std::collections::BTreeSet::new();
    while std::time::Instant::now() < deadline {
        desktops = stack.get("/api/v1/admin/desktops", &admin).unwrap();
        assert!(desktops.as_array().unwrap().len() <= 4, "more desktops than the pool's maximum: {desktops}");
        for d in desktops.as_array().unwrap() {
            let state = d["state"].as_str().unwrap_or_default();
            assert!(matches!(state, "failed" | "provisioning"), "{d}");
            if state == "failed" {
                let reason = d["last_error"].as_str().unwrap_or_default();
                assert!(reason.contains("neither a Linux bzImage nor an ELF"), "the host's reason: {d}");
                seen_failed.insert(d["id"].as_str().unwrap_or_default().to_owned());
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let counts = failures(&desktops);
    // Waits of 0, 5, 10, 20 s: at most 5 starts each in 40 s (one every heartbeat without them).
    assert!(counts.iter().all(|&n| (1..=5).contains(&n)), "{counts:?}: {desktops}");
    for d in desktops.as_array().unwrap() {
        assert!(seen_failed.contains(d["id"].as_str().unwrap_or_default()), "never seen failed: {d}");
        assert!(d["last_error"].as_str().is_some_and(|e| !e.is_empty()), "no reason kept: {d}");
    }
    let hosts = stack.get("/api/v1/admin/hosts", &admin).unwrap();
    assert!(hosts[0]["last_error"].as_str().is_some_and(|e| e.starts_with("start ")), "{hosts}");
    // The host keeps nothing of the failed starts (between tries: one may be under way).
    let left = || -> Vec<_> {
        std::fs::read_dir(stack.host_state.join("desktops"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default()
    };
    let cleaned = wait_for("the host to remove failed desktops' state", Duration::from_secs(30), || {
        left().is_empty().then_some(())
    });
    assert!(cleaned.is_ok(), "state of failed desktops left on the host: {:?}", left());
}

fn files_are_kept_out_and_audited(stack: &Stack, bearer: &str, desktop: &str, dir: &Path) {
    let connection = stack.connect(bearer, desktop).unwrap();
    let file = dir.join("send.pleiades");
    std::fs::write(&file, connection["file"].as_str().unwrap()).unwrap();
    let secret = dir.join("quarterly-figures.csv");
    std::fs::write(&secret, "region,revenue\nnorth,42\n").unwrap();
    let report = dir.join("send.json");
    let output = std::process::Command::new(pleiades_tests::workspace_binary("pleiades").unwrap())
        .arg("send")
        .arg(&file)
        .arg(&secret)
        .arg("--report")
        .arg(&report)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the file must not be sent: {text}");
    let files: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(files[0]["state"], "failed", "{files}");
    assert_eq!(files[0]["reason"], "the desktop's pool does not allow file transfer", "{files}");
    assert_eq!(files[0]["sent"], 0, "no byte left the client: {files}");
    assert!(text.contains("not sent: the desktop's pool does not allow file transfer"), "{text}");
    let audit = wait_for("the denial in the audit log", Duration::from_secs(60), || {
        let (audit, _) = stack.cli(&["audit", "--limit", "50"]).ok()?;
        audit.contains("files.denied").then_some(audit)
    })
    .unwrap();
    let line = audit.lines().find(|l| l.contains("files.denied")).unwrap();
    assert!(line.contains("host-1"), "{line}");
}

fn clipboard_is_kept_back_and_audited(stack: &Stack, bearer: &str, desktop: &str, dir: &Path) {
    use std::io::Write;
    let prerequisites = pleiades_tests::prerequisite::command("xclip")
        .and_then(|_| pleiades_tests::xvfb::Xvfb::start(320, 240));
    let x = match prerequisites {
        Ok(x) => x,
        Err(e) => match pleiades_tests::prerequisite::missing("broker_e2e (clipboard)", &e) {
            pleiades_tests::prerequisite::Missing::Skip => return,
            pleiades_tests::prerequisite::Missing::Fail(why) => panic!("{why}"),
        },
    };
    let mut holder = x
        .command("xclip")
        .args(["-quiet", "-selection", "clipboard"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    holder.stdin.take().unwrap().write_all(b"the quarterly figures").unwrap();
    let connection = stack.connect(bearer, desktop).unwrap();
    let file = dir.join("clip.pleiades");
    std::fs::write(&file, connection["file"].as_str().unwrap()).unwrap();
    let record = dir.join("rec-clip");
    let output = std::process::Command::new(pleiades_tests::workspace_binary("pleiades").unwrap())
        .env("DISPLAY", x.display())
        .arg("connect")
        .arg(&file)
        .args(["--headless", "--no-h264", "--no-audio", "--duration", "8", "--record"])
        .arg(&record)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{text}");
    let summary: Value =
        serde_json::from_slice(&std::fs::read(record.join("clipboard.json")).unwrap()).unwrap();
    assert_eq!(
        (summary["copied"].as_u64(), summary["denied"].as_u64()),
        (Some(1), Some(1)),
        "{summary}; {text}"
    );
    assert!(text.contains("policy does not let what you copied into it"), "{text}");
    // The copy stayed the client's own: its holder still has the selection.
    assert!(holder.try_wait().unwrap().is_none(), "the client's selection was taken");
    let _ = holder.kill();
    let audit = wait_for("the denial in the audit log", Duration::from_secs(60), || {
        let (audit, _) = stack.cli(&["audit", "--limit", "50"]).ok()?;
        audit.contains("clipboard.denied").then_some(audit)
    })
    .unwrap();
    let line = audit.lines().find(|l| l.contains("clipboard.denied")).unwrap();
    assert!(line.contains("to-guest") && line.contains("host-1"), "{line}");
}
