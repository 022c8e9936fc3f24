//! A desktop through the broker, end to end, with every real piece:
//!
//! `pleiades-broker serve` (HTTPS, SQLite) with a user, an image of the test guest and a pool;
//! `pleiades-host serve` registers with a one-time token (the broker's certificate pinned),
//! heartbeats, and boots the desktop the broker asks for (`--vmm qemu`, one `run` process);
//! the user logs in over the REST API, gets a desktop, asks for a connection, and the headless
//! client `pleiades connect` reaches the desktop with the broker's ticket and types into its
//! shell. The ticket is one-time, a ticket for another host is refused, and SIGTERM to the
//! daemon powers its desktops off.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pleiades_protocol::pinning::PinnedCertVerifier;
use pleiades_tests::image::GuestImage;
use pleiades_tests::qemu::{BASE_CMDLINE, boot_timeout};
use pleiades_tests::workspace_binary;
use serde_json::{Value, json};

/// A child process killed (and reaped) when the test ends, however it ends.
struct Daemon {
    child: Child,
    name: &'static str,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    fn spawn(name: &'static str, command: &mut Command, log: &Path) -> Self {
        let out = std::fs::File::create(log).unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("{name} starts: {e}"));
        Self { child, name }
    }

    fn assert_running(&mut self, log: &Path) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} ended ({status}):\n{}", self.name, std::fs::read_to_string(log).unwrap_or_default());
        }
    }
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Runs `pleiades-broker -c CONFIG ARGS…`, returns (stdout, stderr).
fn broker_cli(config: &Path, args: &[&str], password: Option<&str>) -> (String, String) {
    let mut cmd = Command::new(workspace_binary("pleiades-broker").unwrap());
    cmd.arg("--config").arg(config).args(args);
    if let Some(p) = password {
        cmd.env("PLEIADES_PASSWORD", p);
    }
    let out = cmd.output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "pleiades-broker {args:?}: {stdout}{stderr}");
    (stdout, stderr)
}

/// An API client that trusts exactly the broker's certificate.
fn api_client(pin: &str) -> reqwest::blocking::Client {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = PinnedCertVerifier::new(pin, provider.clone()).unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    reqwest::blocking::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Polls `f` every 250 ms until it gives a value or `timeout` passes.
fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn connect(file: &Path, record: &Path, script: &str) -> std::process::Output {
    let script_path = record.with_extension("script");
    std::fs::write(&script_path, script).unwrap();
    Command::new(workspace_binary("pleiades").unwrap())
        .arg("connect")
        .arg(file)
        .args(["--headless", "--duration", "12", "--record"])
        .arg(record)
        .arg("--input")
        .arg(&script_path)
        .output()
        .unwrap()
}

#[test]
fn a_user_gets_a_desktop_from_a_pool_and_the_client_reaches_it_with_the_brokers_ticket() {
    let image = GuestImage::locate().expect("test guest image");
    let dir = tempfile::tempdir().unwrap();
    let port = free_tcp_port();
    let config = dir.path().join("broker.toml");
    std::fs::write(
        &config,
        format!(
            "database = \"sqlite://{}/broker.db\"\nlisten = \"127.0.0.1:{port}\"\nstate_dir = \"{}\"\n\
             [broker]\nheartbeat_interval_secs = 1\n",
            dir.path().display(),
            dir.path().display()
        ),
    )
    .unwrap();

    // The admin's side, with the CLI.
    broker_cli(&config, &["user", "add", "alice"], Some("alice-password-1"));
    let kernel = image.kernel.display().to_string();
    let initrd = image.initramfs.display().to_string();
    broker_cli(
        &config,
        &[
            "image",
            "add",
            "testdesk",
            "--kernel",
            &kernel,
            "--initrd",
            &initrd,
            "--cmdline",
            BASE_CMDLINE,
            "--vcpus",
            "1",
            "--memory-mib",
            "512",
        ],
        None,
    );
    broker_cli(&config, &["pool", "create", "desks", "--image", "testdesk", "--max", "2"], None);
    broker_cli(&config, &["pool", "entitle", "desks", "--user", "alice"], None);
    let broker_log = dir.path().join("broker.log");
    let mut broker = Daemon::spawn(
        "pleiades-broker",
        Command::new(workspace_binary("pleiades-broker").unwrap()).arg("--config").arg(&config).arg("serve"),
        &broker_log,
    );
    let base = format!("https://127.0.0.1:{port}");
    // Serving makes the broker's certificate; then the token's hint names its pin.
    wait_for("the broker to serve", Duration::from_secs(60), || {
        broker.assert_running(&broker_log);
        std::fs::read_to_string(&broker_log).unwrap_or_default().contains("broker serving").then_some(())
    });

    let (token, hint) = broker_cli(&config, &["host", "token", "create", "--description", "e2e"], None);
    let token = token.trim().to_owned();
    // The hint names the pin the host needs.
    let pin = hint
        .split_whitespace()
        .skip_while(|w| *w != "--broker-cert-sha256")
        .nth(1)
        .unwrap_or_else(|| panic!("no pin in the hint: {hint}"))
        .to_owned();
    assert!(!hint.contains(&token), "the hint must not repeat the token");

    let http = api_client(&pin);
    wait_for("the broker to answer", Duration::from_secs(60), || {
        broker.assert_running(&broker_log);
        http.get(format!("{base}/healthz")).send().ok().filter(|r| r.status().is_success())
    });

    // The host daemon registers with the token and pins the broker.
    let state = dir.path().join("host");
    let host_log = dir.path().join("host.log");
    let session_port = free_tcp_port(); // A free TCP port is very likely a free UDP port too.
    let mut host = Daemon::spawn(
        "pleiades-host serve",
        Command::new(workspace_binary("pleiades-host").unwrap())
            .args(["serve", "--broker", &base, "--broker-cert-sha256", &pin, "--name", "e2e-host"])
            .args([
                "--address",
                "127.0.0.1",
                "--listen-ip",
                "127.0.0.1",
                "--vmm",
                "qemu",
                "--image",
                "testdesk",
            ])
            .args(["--ports", &format!("{session_port}-{}", session_port.saturating_add(9))])
            .arg("--state-dir")
            .arg(&state)
            .env("PLEIADES_HOST_TOKEN", &token),
        &host_log,
    );
    let hosts = wait_for("the host to register", Duration::from_secs(60), || {
        host.assert_running(&host_log);
        let (out, _) = broker_cli(&config, &["host", "list"], None);
        out.contains("e2e-host").then_some(out)
    });
    assert!(hosts.contains("online"), "{hosts}");
    let mode = std::fs::metadata(state.join("registration.json")).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600,
        "the credential file is private"
    );

    // The user's side, with the REST API.
    let login: Value = http
        .post(format!("{base}/api/v1/login"))
        .json(&json!({"name": "alice", "password": "alice-password-1"}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let bearer = login["token"].as_str().expect("a token").to_owned();
    let pools: Value =
        http.get(format!("{base}/api/v1/pools")).bearer_auth(&bearer).send().unwrap().json().unwrap();
    let pool_id = pools[0]["id"].as_str().expect("alice's pool").to_owned();
    let desktop: Value = http
        .post(format!("{base}/api/v1/pools/{pool_id}/desktop"))
        .bearer_auth(&bearer)
        .send()
        .unwrap()
        .json()
        .unwrap();
    let desktop_id = desktop["id"].as_str().unwrap_or_else(|| panic!("a desktop: {desktop}")).to_owned();
    wait_for("the desktop to be in use", boot_timeout(), || {
        host.assert_running(&host_log);
        let mine: Value =
            http.get(format!("{base}/api/v1/desktops")).bearer_auth(&bearer).send().ok()?.json().ok()?;
        let state =
            mine.as_array()?.iter().find(|d| d["id"] == desktop_id.as_str())?["state"].as_str()?.to_owned();
        assert_ne!(state, "failed", "the desktop failed: {}", std::fs::read_to_string(&host_log).unwrap());
        (state == "in_use").then_some(())
    });
    // The VM process of the desktop, with its serial console in the daemon's state directory.
    let serial = state.join("desktops").join(&desktop_id).join("serial.log");
    wait_for("the guest to boot", boot_timeout(), || {
        let text = std::fs::read_to_string(&serial).unwrap_or_default();
        text.contains("PLEIADES-READY").then_some(())
    });

    let connection: Value = http
        .post(format!("{base}/api/v1/desktops/{desktop_id}/connect"))
        .bearer_auth(&bearer)
        .send()
        .unwrap()
        .json()
        .unwrap();
    let file = dir.path().join("desk.pleiades");
    std::fs::write(&file, connection["file"].as_str().expect("a connection file")).unwrap();
    assert_eq!(connection["connection"]["cert_sha256"].as_str().map(str::len), Some(64));
    let port_given = connection["connection"]["port"].as_u64().unwrap();
    assert!((u64::from(session_port)..u64::from(session_port) + 10).contains(&port_given), "{connection}");

    let record = dir.path().join("rec");
    let output =
        connect(&file, &record, "wait 2000\ntype echo PLEIADES-BROKER-$((6*7)) > /dev/ttyS0\\n\nwait 3000\n");
    let text =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "the client reaches the desktop: {text}");
    wait_for("the typed command on the guest's serial console", Duration::from_secs(30), || {
        std::fs::read_to_string(&serial).unwrap_or_default().contains("PLEIADES-BROKER-42").then_some(())
    });
    let summary: Value =
        serde_json::from_slice(&std::fs::read(record.join("summary.json")).unwrap()).unwrap();
    assert!(summary["frames"].as_u64().unwrap_or(0) > 0, "{summary}");

    // The ticket was one-time: the same file is refused, and the desktop goes on.
    let again = connect(&file, &dir.path().join("rec2"), "wait 100\n");
    let again_text =
        format!("{}{}", String::from_utf8_lossy(&again.stdout), String::from_utf8_lossy(&again.stderr));
    assert!(!again.status.success(), "a used ticket must be refused: {again_text}");
    assert!(again_text.contains("ticket"), "{again_text}");

    // The broker saw the session: its audit has the connect, never the ticket itself.
    let (audit, _) = broker_cli(&config, &["audit", "--limit", "200"], None);
    assert!(audit.contains("desktop.connect") && audit.contains("host.register"), "{audit}");
    let ticket = connection["connection"]["ticket"].as_str().unwrap();
    assert!(!audit.contains(ticket) && !std::fs::read_to_string(&host_log).unwrap().contains(ticket));
    assert!(!std::fs::read_to_string(&broker_log).unwrap().contains(&token), "no token in the broker's log");

    // SIGTERM: the daemon powers its desktops off and ends.
    let pid = host.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status =
        wait_for("the daemon to stop", Duration::from_secs(90), || host.child.try_wait().ok().flatten());
    assert!(status.success(), "{}", std::fs::read_to_string(&host_log).unwrap());
    let vm_log = std::fs::read_to_string(state.join("desktops").join(&desktop_id).join("vm.log")).unwrap();
    assert!(!vm_log.contains("panicked"), "{vm_log}");
    drop(broker);
}
