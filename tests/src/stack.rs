//! The whole Pleiades stack on one machine, from the real binaries: `pleiades-broker serve`
//! (HTTPS, SQLite) with users, the test guest image and a pool, and `pleiades-host serve`
//! registered with it. `./dev demo` and `tests/tests/broker_e2e.rs` both bring it up with
//! [`Stack::start`]; the REST API is reached with the broker's certificate pinned.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use pleiades_protocol::pinning::PinnedCertVerifier;
use serde_json::{Value, json};

use crate::image::GuestImage;
use crate::qemu::{BASE_CMDLINE, boot_timeout};

/// A child process killed (and reaped) when dropped.
#[derive(Debug)]
pub struct Daemon {
    pub child: Child,
    pub name: &'static str,
    pub log: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// Starts `command` with stdout and stderr to `log`.
    pub fn spawn(name: &'static str, command: &mut Command, log: &Path) -> Result<Self, String> {
        let out = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        Ok(Self { child, name, log: log.to_owned() })
    }

    /// An error with the log when the process has ended.
    pub fn check_running(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(format!(
                "{} ended ({status}):\n{}",
                self.name,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            )),
            _ => Ok(()),
        }
    }

    /// SIGTERM, then waits up to `timeout` for the process to end.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().map_err(|e| e.to_string())?;
        wait_for(&format!("{} to stop", self.name), timeout, || self.child.try_wait().ok().flatten())
    }
}

pub use pleiades_testkit::wait_for;

/// An HTTPS client that trusts exactly the certificate with SHA-256 `pin`.
pub fn pinned_https_client(pin: &str) -> Result<reqwest::blocking::Client, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = PinnedCertVerifier::new(pin, provider.clone()).ok_or("a pin is 64 hex digits")?;
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    reqwest::blocking::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| e.to_string())
}

/// What to bring up.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Where everything lives: the broker's database, certificate and log, the host's state.
    pub dir: PathBuf,
    /// The directory with `pleiades-broker` and `pleiades-host`.
    pub bin_dir: PathBuf,
    /// The broker's HTTPS port on 127.0.0.1.
    pub broker_port: u16,
    /// The host's session ports (UDP, on 127.0.0.1), first..=first+count-1.
    pub first_session_port: u16,
    pub session_ports: u16,
    /// `--vmm` for the host (`None`: as `run` chooses).
    pub vmm: Option<String>,
    /// A user (`name`, `password`) entitled to the pool through the group `staff`.
    pub user: (String, String),
    /// An admin (`name`, `password`).
    pub admin: (String, String),
    /// Ready desktops the pool keeps running for the next user.
    pub spares: u32,
    /// The broker's ticket signing key (PKCS#8 Ed25519), imported before anything else;
    /// `None`: the broker makes its own.
    pub ticket_key: Option<PathBuf>,
    /// The image's kernel, if not the test image's (a test of a desktop that cannot start).
    pub kernel: Option<PathBuf>,
    /// The image's initramfs and kernel command line, if not the test image's.
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    /// The image's vCPUs and memory.
    pub vcpus: u32,
    pub memory_mib: u32,
    /// The image's disk template (`image add --disk`): each desktop gets an overlay on it.
    pub disk: Option<PathBuf>,
    /// `floating` or `persistent`.
    pub pool_kind: &'static str,
    /// The pool's maximum size.
    pub max: u32,
    /// `pool create --network` (`nat` or `none`).
    pub network: &'static str,
    /// `pool create --host-port`: host loopback services the desktops may reach.
    pub host_ports: Vec<u16>,
    /// `serve --jail`: `auto` (jailed when root), `on` or `off`.
    pub jail: &'static str,
    /// `pool create --clipboard-to-guest`, `--clipboard-from-guest`: the pool's clipboard policy.
    pub clipboard: (bool, bool),
    /// `pool create --file-transfer`: whether clients may send files into the desktops.
    pub file_transfer: bool,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            dir: PathBuf::new(),
            bin_dir: PathBuf::new(),
            broker_port: 0,
            first_session_port: 0,
            session_ports: 10,
            vmm: None,
            user: ("demo".into(), "demo-password".into()),
            admin: ("admin".into(), "admin-password".into()),
            spares: 1,
            ticket_key: None,
            kernel: None,
            initrd: None,
            cmdline: None,
            vcpus: 1,
            memory_mib: 512,
            disk: None,
            pool_kind: "floating",
            max: 4,
            network: "nat",
            host_ports: Vec::new(),
            jail: "auto",
            clipboard: (true, true),
            file_transfer: true,
        }
    }
}

/// A free TCP port on loopback now (a free TCP port is very likely a free UDP port too).
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

impl StackOptions {
    /// What the end-to-end tests share: a stack in `dir` with this workspace's binaries, free
    /// ports on loopback, `--vmm qemu`, the user `alice` (entitled to the pool) and the admin
    /// `root`.
    pub fn local(dir: &Path) -> Result<Self, String> {
        let host_bin = crate::workspace_binary("pleiades-host")?;
        Ok(Self {
            dir: dir.to_owned(),
            bin_dir: host_bin.parent().map(Path::to_path_buf).unwrap_or_default(),
            broker_port: free_tcp_port(),
            first_session_port: free_tcp_port(),
            vmm: Some("qemu".into()),
            user: ("alice".into(), "alice-password-1".into()),
            admin: ("root".into(), "root-password-1".into()),
            ..Self::default()
        })
    }

    /// The pool's image is the desktop image (`cargo xtask desktop-image`): its kernel,
    /// initramfs, command line and disk template, with 2 vCPUs and 2 GiB.
    pub fn with_desktop_image(self, image: &crate::image::DesktopImage) -> Self {
        Self {
            kernel: Some(image.kernel.clone()),
            initrd: Some(image.initrd.clone()),
            cmdline: Some(image.cmdline.clone()),
            disk: Some(image.disk.clone()),
            vcpus: 2,
            memory_mib: 2048,
            ..self
        }
    }
}

/// The pool's and the image's names.
pub const POOL: &str = "desktops";
pub const IMAGE: &str = "testdesk";

/// A running broker and host.
#[derive(Debug)]
pub struct Stack {
    pub options: StackOptions,
    pub config: PathBuf,
    pub base: String,
    /// SHA-256 of the broker's certificate.
    pub pin: String,
    pub http: reqwest::blocking::Client,
    pub host_state: PathBuf,
    // Dropped in this order: the host (its VMs with it), then the broker.
    pub host: Daemon,
    pub broker: Daemon,
}

/// The host daemon is killed (as a crash would: SIGKILL), its VMs with it; what it cannot
/// clean up then, its desktops' network namespaces, is removed here.
impl Drop for Stack {
    fn drop(&mut self) {
        let _ = self.host.child.kill();
        let _ = self.host.child.wait();
        let Ok(entries) = std::fs::read_dir(self.host_state.join("desktops")) else { return };
        for id in entries.filter_map(|e| e.ok()?.file_name().into_string().ok()) {
            let netns = format!("pleiades-{id}");
            if Path::new("/run/netns").join(&netns).exists() {
                let _ = Command::new("ip").args(["netns", "del", &netns]).status();
            }
            remove_desktop_cgroups(&id);
        }
    }
}

/// The jail's cgroups of a desktop whose daemon was killed (it would have removed them):
/// under cgroup v2 and the v1 hierarchies, once their processes are gone.
fn remove_desktop_cgroups(desktop: &str) {
    for hierarchy in ["", "memory", "cpu", "pids"] {
        let dir =
            Path::new("/sys/fs/cgroup").join(hierarchy).join("pleiades").join(format!("desktop-{desktop}"));
        for _ in 0..100 {
            match std::fs::remove_dir(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => break,
            }
        }
    }
}

impl Stack {
    /// Sets the broker up with the CLI (users, group, image of `image`, pool, entitlement),
    /// serves it, and registers a host daemon with a one-time token.
    pub fn start(mut options: StackOptions, image: &GuestImage) -> Result<Self, String> {
        options.kernel.get_or_insert_with(|| image.kernel.clone());
        options.initrd.get_or_insert_with(|| image.initramfs.clone());
        let o = &options;
        std::fs::create_dir_all(&o.dir).map_err(|e| e.to_string())?;
        let config = o.dir.join("broker.toml");
        let toml = format!(
            "database = \"sqlite://{dir}/broker.db\"\nlisten = \"127.0.0.1:{port}\"\nstate_dir = \"{dir}\"\n\
             [broker]\nheartbeat_interval_secs = 1\n",
            dir = o.dir.display(),
            port = o.broker_port
        );
        std::fs::write(&config, toml).map_err(|e| e.to_string())?;
        let cli = |args: &[&str], password: Option<&str>| broker_cli(&o.bin_dir, &config, args, password);
        if let Some(key) = &o.ticket_key {
            cli(&["ticket-key", &format!("--import={}", key.display())], None)?;
        }
        cli(&["user", "add", &o.user.0, "--display-name", "Demo User"], Some(&o.user.1))?;
        cli(&["user", "add", &o.admin.0, "--admin"], Some(&o.admin.1))?;
        cli(&["group", "add", "staff"], None)?;
        cli(&["group", "member", "add", "staff", &o.user.0], None)?;
        let kernel = o.kernel.as_ref().unwrap_or(&image.kernel).display().to_string();
        let initrd = o.initrd.as_ref().unwrap_or(&image.initramfs).display().to_string();
        let (vcpus, memory) = (o.vcpus.to_string(), o.memory_mib.to_string());
        #[rustfmt::skip]
        let mut image_args = vec!["image", "add", IMAGE, "--kernel", &kernel, "--initrd", &initrd,
                                  "--cmdline", o.cmdline.as_deref().unwrap_or(BASE_CMDLINE),
                                  "--vcpus", &vcpus, "--memory-mib", &memory];
        let disk = o.disk.as_ref().map(|d| d.display().to_string());
        if let Some(disk) = &disk {
            image_args.extend(["--disk", disk]);
        }
        cli(&image_args, None)?;
        let (spares, max) = (o.spares.to_string(), o.max.to_string());
        #[rustfmt::skip]
        let mut pool_args = vec!["pool", "create", POOL, "--image", IMAGE, "--display-name", "Test desktops",
                                 "--max", &max, "--spares", &spares, "--kind", o.pool_kind, "--network", o.network];
        let ports: Vec<String> = o.host_ports.iter().map(|p| format!("--host-port={p}")).collect();
        pool_args.extend(ports.iter().map(String::as_str));
        let clipboard = [
            format!("--clipboard-to-guest={}", o.clipboard.0),
            format!("--clipboard-from-guest={}", o.clipboard.1),
            format!("--file-transfer={}", o.file_transfer),
        ];
        pool_args.extend(clipboard.iter().map(String::as_str));
        cli(&pool_args, None)?;
        cli(&["pool", "entitle", POOL, "--group", "staff"], None)?;

        let mut broker = Daemon::spawn(
            "pleiades-broker serve",
            Command::new(o.bin_dir.join("pleiades-broker")).arg("--config").arg(&config).arg("serve"),
            &o.dir.join("broker.log"),
        )?;
        wait_for("the broker to serve", Duration::from_secs(60), || {
            broker.check_running().err().map(Err).or_else(|| {
                std::fs::read_to_string(&broker.log)
                    .unwrap_or_default()
                    .contains("broker serving")
                    .then_some(Ok(()))
            })
        })??;
        // The token goes to stdout; how a host registers (with the pin) to stderr.
        let (token, hint) =
            cli(&["host", "token", "create", "--name", "host-1", "--description", "demo host"], None)?;
        let token = token.trim().to_owned();
        let pin = hint
            .split_whitespace()
            .skip_while(|w| *w != "--broker-cert-sha256")
            .nth(1)
            .ok_or_else(|| format!("no certificate pin in {hint:?}"))?
            .to_owned();
        let base = format!("https://127.0.0.1:{}", o.broker_port);
        let http = pinned_https_client(&pin)?;
        wait_for("the broker's API", Duration::from_secs(60), || {
            http.get(format!("{base}/healthz")).send().ok().filter(|r| r.status().is_success())
        })?;

        let host_state = o.dir.join("host");
        let mut command = host_command(o, &base, &pin, &host_state);
        command.env("PLEIADES_HOST_TOKEN", &token);
        let mut host = Daemon::spawn("pleiades-host serve", &mut command, &o.dir.join("host.log"))?;
        wait_for("the host to register", Duration::from_secs(60), || {
            if let Err(e) = host.check_running() {
                return Some(Err(e));
            }
            let (hosts, _) = broker_cli(&o.bin_dir, &config, &["host", "list"], None).ok()?;
            // Registered on both sides: the broker lists it online, and the daemon stored the
            // credential the broker answered with (it writes the file after the answer, so the
            // broker's side alone left a window in which the file was not there yet).
            let online = hosts.lines().any(|l| l.starts_with("host-1\t") && l.contains("online"));
            (online && host_state.join("registration.json").exists()).then_some(Ok(()))
        })??;
        Ok(Self { options, config, base, pin, http, host_state, host, broker })
    }

    /// Stops the host daemon (SIGTERM: it powers its desktops off) and starts it again on the
    /// same state directory (its stored registration, templates and disks); the new daemon's
    /// log is `host-N.log`. Returns when the new daemon has sent a heartbeat.
    pub fn restart_host(&mut self, n: u32) -> Result<(), String> {
        let status = self.host.terminate(Duration::from_secs(90))?;
        if !status.success() {
            return Err(format!("the host daemon ended with {status}"));
        }
        let mut command = host_command(&self.options, &self.base, &self.pin, &self.host_state);
        let log = self.options.dir.join(format!("host-{n}.log"));
        self.host = Daemon::spawn("pleiades-host serve", &mut command, &log)?;
        let host = &mut self.host;
        wait_for("the restarted host to report to the broker", Duration::from_secs(60), || {
            if let Err(e) = host.check_running() {
                return Some(Err(e));
            }
            std::fs::read_to_string(&host.log)
                .unwrap_or_default()
                .contains("registered with the broker")
                .then_some(Ok(()))
        })?
    }

    /// `pleiades-broker --config … ARGS`: (stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> Result<(String, String), String> {
        broker_cli(&self.options.bin_dir, &self.config, args, None)
    }

    /// Logs in over the REST API: a bearer token.
    pub fn login(&self, name: &str, password: &str) -> Result<String, String> {
        let answer = self.post(
            &format!("{}/api/v1/login", self.base),
            None,
            &json!({"name": name, "password": password}),
        )?;
        answer["token"].as_str().map(str::to_owned).ok_or_else(|| format!("login refused: {answer}"))
    }

    /// The user asks for a desktop from [`POOL`]: its id.
    pub fn request_desktop(&self, bearer: &str) -> Result<String, String> {
        let pools = self.get("/api/v1/pools", bearer)?;
        let pool = pools
            .as_array()
            .and_then(|p| p.iter().find(|p| p["name"] == POOL))
            .and_then(|p| p["id"].as_str())
            .ok_or_else(|| format!("the user is not entitled to {POOL}: {pools}"))?
            .to_owned();
        let desktop =
            self.post(&format!("{}/api/v1/pools/{pool}/desktop", self.base), Some(bearer), &json!({}))?;
        desktop["id"].as_str().map(str::to_owned).ok_or_else(|| format!("no desktop: {desktop}"))
    }

    /// Waits until the user's desktop runs and is theirs (`in_use`). A desktop that fails to
    /// start ends the wait with the host's reason, as the broker reports it.
    pub fn wait_in_use(&mut self, bearer: &str, desktop: &str, timeout: Duration) -> Result<(), String> {
        wait_for("the desktop to start", timeout, || {
            if let Err(e) = self.host.check_running() {
                return Some(Err(e));
            }
            let mine = self.get("/api/v1/desktops", bearer).ok()?;
            let found = mine.as_array()?.iter().find(|d| d["id"] == desktop)?.clone();
            match found["state"].as_str()? {
                "in_use" => Some(Ok(())),
                "failed" => Some(Err(format!(
                    "the desktop failed to start: {} (host log: {})",
                    found["last_error"].as_str().unwrap_or("no reason given"),
                    self.host.log.display()
                ))),
                _ => None,
            }
        })?
    }

    /// A connection for the user's desktop (one-time ticket): the JSON the API answers
    /// (`connection`, `file`, `uri`).
    pub fn connect(&self, bearer: &str, desktop: &str) -> Result<Value, String> {
        self.post(&format!("{}/api/v1/desktops/{desktop}/connect", self.base), Some(bearer), &json!({}))
    }

    /// Runs the headless client on a connection file for 12 s with an input script, recording
    /// into `record`: whether it succeeded, and what it printed.
    pub fn run_client(&self, file: &Path, record: &Path, script: &str) -> (bool, String) {
        run_headless_client(file, record, script, &["--duration", "12"])
    }

    /// The serial console log of a desktop's VM.
    pub fn serial_log(&self, desktop: &str) -> PathBuf {
        self.host_state.join("desktops").join(desktop).join("serial.log")
    }

    /// The desktop's serial console so far.
    pub fn serial(&self, desktop: &str) -> String {
        std::fs::read_to_string(self.serial_log(desktop)).unwrap_or_default()
    }

    /// Types `command` on the desktop's keyboard until `marker` appears on its serial console
    /// (the first keystrokes can come before the console's shell reads them). `command` must
    /// be harmless to repeat; the typed command line itself must not contain `marker`.
    pub fn run_in_guest(&self, desktop: &str, command: &str, marker: &str) {
        assert!(!command.contains(marker), "the echo of {command:?} would match {marker:?}");
        let control = self.host_state.join("desktops").join(desktop).join("control.sock");
        let deadline = std::time::Instant::now() + boot_timeout();
        while std::time::Instant::now() < deadline {
            let text = format!("{command}\n");
            let request = pleiades_control::Request::Type { text };
            let _ = pleiades_control::request(&control, &request, Duration::from_secs(10));
            if wait_for("the command's answer", Duration::from_secs(15), || {
                self.serial(desktop).contains(marker).then_some(())
            })
            .is_ok()
            {
                return;
            }
        }
        panic!("{marker:?} never came from {command:?}; serial console:\n{}", self.serial(desktop));
    }

    /// Runs the shell expression `expr` in the guest and returns what it printed (one line):
    /// the guest echoes `ANS-label=…=END` on its serial console. `label` names the question;
    /// each must be asked once per desktop.
    pub fn ask_guest(&self, desktop: &str, label: &str, expr: &str) -> String {
        let open = format!("ANS-{label}=");
        let answer = |serial: &str| {
            serial.match_indices(&open).find_map(|(at, _)| {
                let rest = &serial[at + open.len()..];
                let text = &rest[..rest.find("=END")?];
                (!text.starts_with("$(")).then(|| text.to_owned())
            })
        };
        let command = format!("echo \"{open}$({expr})=END\" > /dev/ttyS0");
        let control = self.host_state.join("desktops").join(desktop).join("control.sock");
        let deadline = std::time::Instant::now() + boot_timeout();
        while std::time::Instant::now() < deadline {
            let request = pleiades_control::Request::Type { text: format!("{command}\n") };
            let _ = pleiades_control::request(&control, &request, Duration::from_secs(10));
            if let Ok(text) =
                wait_for("the guest's answer", Duration::from_secs(20), || answer(&self.serial(desktop)))
            {
                return text;
            }
        }
        panic!("no answer to {command:?}; serial console:\n{}", self.serial(desktop));
    }

    /// Waits until the desktop's guest has booted `n` times (its READY lines on the serial log).
    pub fn wait_booted(&self, desktop: &str, n: usize) {
        wait_for("the guest to boot", boot_timeout(), || {
            (self.serial(desktop).matches("PLEIADES-READY").count() >= n).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}; serial console:\n{}\n{}", self.serial(desktop), self.logs_tail()));
    }

    /// The last lines of the host daemon's and the broker's logs.
    pub fn logs_tail(&self) -> String {
        let tail = |path: &Path| {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        };
        format!("host log:\n{}\nbroker log:\n{}", tail(&self.host.log), tail(&self.broker.log))
    }

    /// `GET path` of the REST API with a bearer token: the JSON answer.
    pub fn get(&self, path: &str, bearer: &str) -> Result<Value, String> {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(bearer)
            .send()
            .map_err(|e| e.to_string())?;
        response.json().map_err(|e| e.to_string())
    }

    /// `POST path` of the REST API (`/api/v1/…`) with a bearer token and an empty JSON body.
    pub fn act(&self, path: &str, bearer: &str) -> Result<Value, String> {
        self.post(&format!("{}{path}", self.base), Some(bearer), &json!({}))
    }

    fn post(&self, url: &str, bearer: Option<&str>, body: &Value) -> Result<Value, String> {
        let mut request = self.http.post(url).json(body);
        if let Some(b) = bearer {
            request = request.bearer_auth(b);
        }
        let response = request.send().map_err(|e| format!("{url}: {e}"))?;
        let status = response.status();
        let answer: Value = response.json().unwrap_or(Value::Null);
        if status.is_success() { Ok(answer) } else { Err(format!("{url}: HTTP {status}: {answer}")) }
    }
}

/// Runs `pleiades connect FILE --headless --record RECORD --input SCRIPT` with `args` (the
/// script is written beside `record`): whether it succeeded, and what it printed.
pub fn run_headless_client(file: &Path, record: &Path, script: &str, args: &[&str]) -> (bool, String) {
    let script_path = record.with_extension("script");
    std::fs::write(&script_path, script).unwrap();
    let output = Command::new(crate::workspace_binary("pleiades").unwrap())
        // No X display: the client shares no clipboard (a test that wants one gives its own).
        .env_remove("DISPLAY")
        .arg("connect")
        .arg(file)
        .arg("--headless")
        .args(args)
        .arg("--record")
        .arg(record)
        .arg("--input")
        .arg(&script_path)
        .output()
        .unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

/// `pleiades-host serve` for the stack's broker, on `state`.
fn host_command(o: &StackOptions, base: &str, pin: &str, state: &Path) -> Command {
    let last_port = o.first_session_port.saturating_add(o.session_ports.saturating_sub(1));
    let mut command = Command::new(o.bin_dir.join("pleiades-host"));
    command
        .args(["serve", "--broker", base, "--broker-cert-sha256", pin, "--name", "host-1"])
        .args(["--address", "127.0.0.1", "--listen-ip", "127.0.0.1", "--image", IMAGE])
        .args(["--ports", &format!("{}-{last_port}", o.first_session_port)])
        .args(["--jail", o.jail])
        .arg("--state-dir")
        .arg(state);
    if let Some(vmm) = &o.vmm {
        command.args(["--vmm", vmm]);
    }
    // The directories of the image's files (the host boots nothing else).
    let files = [&o.kernel, &o.initrd, &o.disk];
    let mut dirs: Vec<&Path> = files.iter().filter_map(|f| f.as_deref()?.parent()).collect();
    dirs.dedup();
    for dir in dirs {
        command.arg("--image-dir").arg(dir);
    }
    command
}

/// Runs `pleiades-broker --config CONFIG ARGS…`: (stdout, stderr), or an error with both.
fn broker_cli(
    bin_dir: &Path,
    config: &Path,
    args: &[&str],
    password: Option<&str>,
) -> Result<(String, String), String> {
    let mut cmd = Command::new(bin_dir.join("pleiades-broker"));
    cmd.arg("--config").arg(config).args(args);
    if let Some(p) = password {
        cmd.env("PLEIADES_PASSWORD", p);
    }
    let out = cmd.output().map_err(|e| format!("cannot run pleiades-broker: {e}"))?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    if out.status.success() {
        Ok((stdout, stderr))
    } else {
        Err(format!("pleiades-broker {}: {stdout}{stderr}", args.join(" ")))
    }
}
