//! Shared test setup: a broker on SQLite or PostgreSQL served on 127.0.0.1 (plain HTTP, or
//! HTTPS with its self-signed certificate: [`Env::over_tls`]), a manual clock, and a test double
//! of `pleiades-host` that speaks the host API over real HTTP, presenting a client certificate
//! of its own over HTTPS as the real host does.

#![allow(dead_code)]

pub mod directory;

use std::collections::BTreeMap;
use std::sync::Arc;

use pleiades_broker::auth::ldap::Directory;
use pleiades_broker::broker::{Broker, BrokerSettings, HostRegistered};
use pleiades_broker::clock::ManualClock;
use pleiades_broker::config::Config;
use pleiades_broker::db::Db;
use pleiades_broker::http::{AppState, router};
use pleiades_broker::model::{Actor, HostTokenSpec, Image, PoolKind, PoolSpec, PrincipalKind, User};
use pleiades_broker::server;
use pleiades_testkit::postgres::PgServer;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Runs one scenario on both databases (two tests: `<name>::sqlite`, `<name>::postgres`).
#[macro_export]
macro_rules! on_both_databases {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                $crate::common::bounded(super::$name(super::common::Backend::Sqlite)).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                $crate::common::bounded(super::$name(super::common::Backend::Postgres)).await
            }
        }
    )*};
}

/// Every scenario ends within 5 minutes or fails (a hang is a bug, not a slow machine).
pub async fn bounded(scenario: impl std::future::Future<Output = ()>) {
    tokio::time::timeout(std::time::Duration::from_secs(300), scenario)
        .await
        .expect("scenario hung for 5 minutes");
}

pub const START: u64 = 1_800_000_000;

/// A broker serving on a loopback port, its database and its clock.
#[derive(Debug)]
pub struct Env {
    pub broker: Arc<Broker>,
    pub clock: ManualClock,
    pub base: String,
    pub http: reqwest::Client,
    pub backend: Backend,
    /// The database URL, for a second broker on the same database.
    pub db_url: String,
    /// Over HTTPS: the SHA-256 of the broker's certificate (what hosts pin).
    pub broker_pin: Option<String>,
    _pg: Option<PgServer>,
    _dir: tempfile::TempDir,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

pub fn system() -> Actor {
    Actor::system()
}

/// A one-time registration token's request for host `name`, valid an hour.
pub fn host_token(name: &str) -> HostTokenSpec {
    HostTokenSpec {
        name: name.into(),
        description: String::new(),
        one_time: true,
        replace: false,
        lifetime_secs: 3600,
    }
}

impl Env {
    pub async fn new(backend: Backend) -> Self {
        Self::with_settings(
            backend,
            BrokerSettings { heartbeat_timeout_secs: 30, ..BrokerSettings::default() },
        )
        .await
    }

    /// A broker serving HTTPS (its self-signed certificate, client certificates asked for and
    /// not required) as `pleiades-broker serve` does by default. `http` is a client without a
    /// client certificate, like a browser; hosts get one each ([`HostDouble::register`]).
    pub async fn over_tls(backend: Backend) -> Self {
        let settings = BrokerSettings { heartbeat_timeout_secs: 30, ..BrokerSettings::default() };
        Self::build(backend, settings, None, true).await
    }

    /// A broker with other tunables (the allocation benchmark lifts the login rate limit).
    pub async fn with_settings(backend: Backend, settings: BrokerSettings) -> Self {
        Self::build(backend, settings, None, false).await
    }

    /// A broker whose directory's users may sign in too.
    pub async fn with_directory(backend: Backend, directory: Arc<Directory>) -> Self {
        let settings = BrokerSettings { heartbeat_timeout_secs: 30, ..BrokerSettings::default() };
        Self::build(backend, settings, Some(directory), false).await
    }

    async fn build(
        backend: Backend,
        settings: BrokerSettings,
        directory: Option<Arc<Directory>>,
        tls: bool,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (url, pg) = match backend {
            Backend::Sqlite => (format!("sqlite://{}/broker.db", dir.path().display()), None),
            Backend::Postgres => {
                let pg = tokio::task::spawn_blocking(PgServer::start)
                    .await
                    .unwrap()
                    .expect("PostgreSQL for tests");
                let url = pg.create_database("broker").expect("create database");
                (url, Some(pg))
            }
        };
        let db = Db::connect(&url).await.expect("connect");
        let db_url = url.clone();
        let clock = ManualClock::new(START);
        let mut broker = Broker::open(db, Arc::new(clock.clone()), settings, dir.path()).await.unwrap();
        if let Some(directory) = directory {
            broker = broker.with_directory(directory);
        }
        let broker = Arc::new(broker);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (tls, broker_pin) = if tls {
            let config = Config { state_dir: Some(dir.path().join("https")), ..Config::default() };
            let tls = server::tls_config(&config).expect("the broker's HTTPS");
            (Some(tls), Some(server::certificate_sha256(&config).expect("the broker's certificate")))
        } else {
            (None, None)
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let base = format!("{scheme}://{}", listener.local_addr().unwrap());
        let app = router(AppState { broker: broker.clone(), secure_cookies: tls.is_some() });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(server::serve(listener, app, tls, async {
            let _ = rx.await;
        }));
        let http = http_client(broker_pin.as_deref(), None);
        Self { broker, clock, base, http, backend, db_url, broker_pin, _pg: pg, _dir: dir, _shutdown: tx }
    }

    /// A client of this broker; over HTTPS it pins the broker's certificate and presents
    /// `cert`, if given.
    pub fn client(&self, cert: Option<&ClientCert>) -> reqwest::Client {
        http_client(self.broker_pin.as_deref(), cert)
    }

    /// The broker's state directory (its ticket signing key).
    pub fn state_dir(&self) -> &std::path::Path {
        self._dir.path()
    }

    /// `GET path` with a bearer token: the JSON answer (the test fails if there is none).
    pub async fn get_json(&self, token: &str, path: &str) -> Value {
        let response = self.http.get(self.url(path)).bearer_auth(token).send().await.unwrap();
        response.json().await.unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Another broker on the same database and clock (scale-out).
    pub async fn second_broker(&self) -> Arc<Broker> {
        let db = Db::connect(&self.db_url).await.expect("connect");
        let settings = self.broker.settings.clone();
        Arc::new(Broker::open(db, Arc::new(self.clock.clone()), settings, self.state_dir()).await.unwrap())
    }

    pub async fn user(&self, name: &str) -> (User, Actor) {
        let user = self
            .broker
            .create_user(&system(), name, "", Some(&format!("{name}-password")), false)
            .await
            .unwrap();
        let actor = Actor { user_id: user.id.clone(), name: user.name.clone(), is_admin: false };
        (user, actor)
    }

    pub async fn admin(&self, name: &str) -> (User, Actor) {
        let user = self
            .broker
            .create_user(&system(), name, "", Some(&format!("{name}-password")), true)
            .await
            .unwrap();
        let actor = Actor { user_id: user.id.clone(), name: user.name.clone(), is_admin: true };
        (user, actor)
    }

    pub async fn image(&self, name: &str, memory_mib: i64) {
        let image = Image {
            id: String::new(),
            name: name.into(),
            kernel: "/images/vmlinuz".into(),
            initrd: "/images/initramfs.cpio".into(),
            cmdline: "console=ttyS0".into(),
            disk: None,
            disk_sha256: None,
            vcpus: 1,
            memory_mib,
        };
        self.broker.create_image(&system(), &image).await.unwrap();
    }

    /// A pool entitled to `group` (created if needed).
    pub async fn pool(&self, name: &str, kind: PoolKind, image: &str, max: i64, spares: i64) -> String {
        self.labelled_pool(name, "", kind, image, max, spares).await
    }

    /// A pool with a display name (what the portal shows).
    pub async fn labelled_pool(
        &self,
        name: &str,
        display_name: &str,
        kind: PoolKind,
        image: &str,
        max: i64,
        spares: i64,
    ) -> String {
        let spec = PoolSpec {
            name: name.into(),
            display_name: display_name.into(),
            kind,
            image: image.into(),
            min_size: 0,
            max_size: max,
            spares,
            idle_timeout_secs: 600,
            disconnect_timeout_secs: 300,
            network: Default::default(),
            lock_on_disconnect: true,
            clipboard_to_guest: true,
            clipboard_from_guest: true,
            file_transfer: true,
            usb: "none".into(),
            usb_auto: "none".into(),
        };
        self.broker.create_pool(&system(), &spec).await.unwrap().id
    }

    pub async fn entitle_user(&self, pool: &str, user: &str) {
        self.broker.entitle(&system(), pool, PrincipalKind::User, user).await.unwrap();
    }

    /// An API bearer token for the user (through `POST /api/v1/login`).
    pub async fn api_login(&self, name: &str) -> String {
        let res = self
            .http
            .post(self.url("/api/v1/login"))
            .json(&json!({ "name": name, "password": format!("{name}-password") }))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "login of {name}");
        res.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_owned()
    }
}

fn http_client(broker_pin: Option<&str>, cert: Option<&ClientCert>) -> reqwest::Client {
    let builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(std::time::Duration::from_secs(60));
    let builder = match broker_pin {
        None => builder,
        Some(pin) => {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let verifier =
                pleiades_protocol::pinning::PinnedCertVerifier::new(pin, provider.clone()).unwrap();
            let tls = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier));
            let tls = match cert {
                Some(cert) => {
                    tls.with_client_auth_cert(vec![cert.cert.clone()], cert.key.clone_key()).unwrap()
                }
                None => tls.with_no_client_auth(),
            };
            builder.use_preconfigured_tls(tls)
        }
    };
    builder.build().unwrap()
}

/// A TLS client certificate made as `pleiades-host serve` makes its identity: self-signed,
/// `CN=pleiades-host identity`, its own ECDSA key.
#[derive(Debug)]
pub struct ClientCert {
    pub cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    /// What the broker pins.
    pub sha256: String,
}

impl ClientCert {
    pub fn generate() -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, pleiades_protocol::hostapi::HOST_IDENTITY_NAME);
        let cert = params.self_signed(&key).unwrap().der().clone();
        let sha256 = pleiades_protocol::pinning::cert_sha256(&cert);
        Self { cert, key: PrivateKeyDer::Pkcs8(key.serialize_der().into()), sha256 }
    }
}

/// What the host double knows about one VM it runs.
#[derive(Debug, Clone)]
pub struct Vm {
    pub connected: bool,
    /// Seconds since the guest user's last input, as its agent would report them (`None`: no
    /// agent connected).
    pub guest_idle: Option<u64>,
    pub starts: u32,
    /// The generation its last start, restart or recycle command carried (what the VM process
    /// would be started with).
    pub generation: Option<u64>,
    /// While set, the VM process reports these clipboard denials (to the guest, from the
    /// guest) since it started.
    pub clipboard_denied: Option<(u64, u64)>,
    /// While set, the VM process reports this many files refused by the pool's policy since
    /// it started.
    pub files_denied: Option<u64>,
    /// While set, the VM process reports these USB devices (attached in the guest, refused by
    /// the pool's policy) since it started.
    pub usb: Option<(u64, u64)>,
}

/// What a [`HostDouble`] reports as every desktop's disk usage.
pub const DISK_BYTES: i64 = 196_608;

/// A stand-in for `pleiades-host serve`: registers, heartbeats, and "runs" VMs by
/// acknowledging the broker's commands. Talks to the broker over HTTP like the real host.
#[derive(Debug)]
pub struct HostDouble {
    pub name: String,
    pub reg: HostRegistered,
    pub memory_mib: i64,
    pub images: Vec<String>,
    pub vms: BTreeMap<String, Vm>,
    pub commands_seen: Vec<(String, String)>,
    /// (kind, desktop id, image name) of every command that booted a VM.
    pub booted: Vec<(String, String, String)>,
    /// While set, every start fails with this reason (an image the host cannot boot).
    pub fail_starts: Option<String>,
    /// While set, commands are taken and never answered (a hung daemon); they are kept in
    /// `held`.
    pub hang: bool,
    pub held: Vec<Value>,
    /// While set, every VM's guest agent reports this idle time (unless the VM's own
    /// `guest_idle` says otherwise).
    pub guest_idle: Option<u64>,
    /// Per desktop: whether its last boot command asked to lock the screen on disconnect.
    pub lock_on_disconnect: BTreeMap<String, bool>,
    /// Per desktop: the clipboard policy its last boot command carried (`null`: none).
    pub clipboard: BTreeMap<String, Value>,
    /// Per desktop: the file-transfer policy its last boot command carried (`null`: none).
    pub file_transfer: BTreeMap<String, Value>,
    /// Per desktop: the USB policy its last boot command carried (`null`: none).
    pub usb: BTreeMap<String, Value>,
    /// Over HTTPS: the client certificate this host presents (its identity, pinned at
    /// registration).
    pub cert: Option<ClientCert>,
    base: String,
    /// This host's client (presenting `cert` over HTTPS).
    pub http: reqwest::Client,
}

impl HostDouble {
    pub async fn register(env: &Env, name: &str, memory_mib: i64, images: &[&str]) -> Self {
        let token = env.broker.create_host_token(&system(), &host_token(name)).await.unwrap();
        let cert = env.broker_pin.is_some().then(ClientCert::generate);
        let http = env.client(cert.as_ref());
        let res = http
            .post(env.url("/api/v1/hosts/register"))
            .json(&json!({
                "token": token, "name": name, "address": format!("{name}.example"), "session_port": 4433,
                "cert_sha256": "", "cores": 8, "memory_mib": memory_mib, "images": images,
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201, "registration of {name}");
        let reg: HostRegistered = res.json().await.unwrap();
        Self {
            name: name.into(),
            reg,
            memory_mib,
            images: images.iter().map(|s| s.to_string()).collect(),
            vms: BTreeMap::new(),
            commands_seen: Vec::new(),
            booted: Vec::new(),
            fail_starts: None,
            hang: false,
            guest_idle: None,
            lock_on_disconnect: BTreeMap::new(),
            clipboard: BTreeMap::new(),
            file_transfer: BTreeMap::new(),
            usb: BTreeMap::new(),
            held: Vec::new(),
            cert,
            base: env.base.clone(),
            http,
        }
    }

    /// One heartbeat; carries out and acknowledges every command it gets. Returns how many.
    pub async fn tick(&mut self) -> usize {
        let desktops: Vec<Value> = self
            .vms
            .iter()
            .map(|(id, vm)| {
                let mut d = json!({ "id": id, "connected": vm.connected, "disk_bytes": DISK_BYTES });
                if let Some(idle) = vm.guest_idle.or(self.guest_idle) {
                    d["guest"] = json!({
                        "agent_version": "0.1.0", "hostname": "desk", "os": "Linux", "kernel": "6.12",
                        "addresses": ["10.0.2.15/24"], "session": "active", "user": "alice", "idle_secs": idle
                    });
                }
                if let Some((to_guest, from_guest)) = vm.clipboard_denied {
                    d["clipboard"] = json!({
                        "denied_to_guest": to_guest, "denied_from_guest": from_guest,
                        "pasted_to_guest": 0, "pasted_from_guest": 0
                    });
                }
                if let Some(denied) = vm.files_denied {
                    d["files"] = json!({ "denied": denied, "completed": 0, "bytes_to_guest": 0 });
                }
                if let Some((attached, denied)) = vm.usb {
                    // As `ctl status`'s `agent.usb` has it (the host passes the counts on).
                    d["usb"] = json!({ "attached": attached, "denied": denied });
                }
                d
            })
            .collect();
        let res = self
            .http
            .post(format!("{}/api/v1/hosts/heartbeat", self.base))
            .bearer_auth(&self.reg.credential)
            .json(&json!({ "cores": 8, "memory_mib": self.memory_mib, "images": self.images, "desktops": desktops }))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "heartbeat of {}", self.name);
        let reply: Value = res.json().await.unwrap();
        let commands = reply["commands"].as_array().cloned().unwrap_or_default();
        if self.hang {
            self.held.extend(commands.iter().cloned());
            return commands.len();
        }
        for c in &commands {
            let (id, kind, desktop) = (
                c["id"].as_str().unwrap(),
                c["kind"].as_str().unwrap(),
                c["desktop_id"].as_str().unwrap().to_owned(),
            );
            self.commands_seen.push((kind.to_owned(), desktop.clone()));
            let mut ack = json!({ "ok": true });
            match kind {
                "start" | "restart" | "recycle" if self.fail_starts.is_some() => {
                    self.vms.remove(&desktop);
                    ack = json!({ "ok": false, "error": self.fail_starts });
                }
                "start" | "restart" | "recycle" => {
                    assert!(c["image"]["kernel"].is_string(), "start commands carry the image");
                    let image = c["image"]["name"].as_str().unwrap_or_default().to_owned();
                    self.booted.push((kind.to_owned(), desktop.clone(), image));
                    self.lock_on_disconnect.insert(desktop.clone(), c["lock_on_disconnect"] == true);
                    self.clipboard.insert(desktop.clone(), c["clipboard"].clone());
                    self.file_transfer.insert(desktop.clone(), c["file_transfer"].clone());
                    self.usb.insert(desktop.clone(), c["usb"].clone());
                    let vm = self.vms.entry(desktop).or_insert(Vm {
                        connected: false,
                        guest_idle: None,
                        starts: 0,
                        generation: None,
                        clipboard_denied: None,
                        files_denied: None,
                        usb: None,
                    });
                    vm.starts += 1;
                    vm.connected = false;
                    // A new VM process: its clipboard, file-transfer and USB counters start again.
                    vm.clipboard_denied = vm.clipboard_denied.map(|_| (0, 0));
                    vm.files_denied = vm.files_denied.map(|_| 0);
                    vm.usb = vm.usb.map(|_| (0, 0));
                    vm.generation = c["generation"].as_u64();
                    assert!(vm.generation.is_some(), "commands that boot carry the generation: {c}");
                }
                "stop" => {
                    self.vms.remove(&desktop);
                }
                "disconnect" => {
                    if let Some(vm) = self.vms.get_mut(&desktop) {
                        vm.connected = false;
                    }
                }
                other => panic!("unknown command {other}"),
            }
            let ack = self
                .http
                .post(format!("{}/api/v1/hosts/commands/{id}/ack", self.base))
                .bearer_auth(&self.reg.credential)
                .json(&ack)
                .send()
                .await
                .unwrap();
            assert_eq!(ack.status(), 204);
        }
        commands.len()
    }

    /// Answers a command (`POST …/commands/{id}/ack`): the HTTP status, from a future that
    /// holds nothing of `self` (to be spawned).
    pub fn ack(&self, id: &str, ack: &Value) -> impl Future<Output = reqwest::StatusCode> + Send + 'static {
        let request = self
            .http
            .post(format!("{}/api/v1/hosts/commands/{id}/ack", self.base))
            .bearer_auth(&self.reg.credential)
            .json(ack);
        async move { request.send().await.unwrap().status() }
    }

    /// How the VM process of `desktop` checks tickets, as `pleiades-host run` does: the
    /// broker's key, this host's id, the generation its command carried, a replay cache of its
    /// own.
    pub fn vm_verifier(
        &self,
        desktop: &str,
        key: pleiades_protocol::ticket::PublicKey,
    ) -> pleiades_protocol::ticket::TicketVerifier {
        let generation = self.vms[desktop].generation;
        pleiades_protocol::ticket::TicketVerifier::new(key, &self.reg.host_id).with_generation(generation)
    }

    /// Heartbeats until no command comes (bounded).
    pub async fn settle(&mut self) {
        for _ in 0..10 {
            if self.tick().await == 0 {
                return;
            }
        }
        panic!("host {} kept getting commands", self.name);
    }
}

/// A browser-like session: the cookie and the page's CSRF token.
pub struct Browser {
    pub cookie: String,
    pub csrf: String,
}

pub fn hidden_csrf(html: &str) -> String {
    let at = html.find("name=\"csrf\" value=\"").expect("a csrf field") + "name=\"csrf\" value=\"".len();
    html[at..].split('"').next().unwrap().to_owned()
}

pub fn set_cookie_value(res: &reqwest::Response, name: &str) -> Option<String> {
    res.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(|v| v.split(';').next().unwrap().split_once('=').unwrap().1.to_owned())
}

/// Logs in through the login page as a browser does (the password is `NAME-password`).
pub async fn browser_login(env: &Env, name: &str) -> Browser {
    let page = env.http.get(env.url("/login")).send().await.unwrap();
    let login_cookie = set_cookie_value(&page, "pleiades_login_csrf").unwrap();
    let csrf = hidden_csrf(&page.text().await.unwrap());
    let password = format!("{name}-password");
    let res = env
        .http
        .post(env.url("/login"))
        .header("cookie", format!("pleiades_login_csrf={login_cookie}"))
        .form(&[("csrf", csrf.as_str()), ("name", name), ("password", &password)])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), reqwest::StatusCode::SEE_OTHER, "login of {name}");
    let flags = res
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect::<Vec<_>>();
    assert!(flags.iter().any(|c| c.starts_with("pleiades_session=")
        && c.contains("HttpOnly")
        && c.contains("SameSite=Strict")));
    let cookie = format!("pleiades_session={}", set_cookie_value(&res, "pleiades_session").unwrap());
    let home = env.http.get(env.url("/")).header("cookie", &cookie).send().await.unwrap();
    assert_eq!(home.status(), 200);
    Browser { cookie, csrf: hidden_csrf(&home.text().await.unwrap()) }
}
