//! `pleiades-host serve`: the host daemon. It registers with a broker, heartbeats, and runs
//! the broker's desktops (docs/host.md, "The host daemon"; the API: docs/broker.md, "Hosts").
//!
//! - [`broker`]: HTTPS to the broker with its certificate pinned (or a CA), the host API's
//!   calls, each presenting the host's [`identity`] as the TLS client certificate.
//! - [`identity`]: the host's own key and certificate towards the broker (`STATE_DIR`,
//!   mode 0600), pinned by the broker at registration; never given to a VM process.
//! - [`desktops`]: one `pleiades-host run` process per desktop, each with its own session server on
//!   a port of the host's range; all serve the host's one certificate (`STATE_DIR/tls/`), whose
//!   fingerprint the broker puts in connection files, and accept only tickets signed by the
//!   broker's key for this host and that desktop.
//!
//! The loop: register (or reuse the stored registration, `STATE_DIR/registration.json`, mode
//! 0600), then every heartbeat interval report capacity, images and the running desktops (with
//! whether a client is connected and the desktop's port), and carry out the commands the reply
//! hands over: `start`, `stop`, `restart`, `recycle`, `disconnect`, each acknowledged when done.
//! One desktop's commands run in order; different desktops' run concurrently, so a VM that is
//! slow to start never delays the heartbeat. SIGTERM or SIGINT stops every VM, then the daemon.

pub mod broker;
pub mod desktops;
pub mod disks;
pub mod identity;
pub mod jails;
pub mod network;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use pleiades_protocol::hostapi::{CommandAck, CommandKind, Heartbeat, HostCommand, HostRegistration};
use serde::{Deserialize, Serialize};

use self::broker::{BrokerClient, BrokerError, Trust};
use self::desktops::{Boot, Desktops, PortRange, Spawner, VmSettings};
use crate::jail;

/// `pleiades-host serve` options. Each may also come from the `--config` TOML file (same names
/// with `_`, e.g. `broker_cert_sha256 = "…"`, `images = ["desktop"]`); the command line wins.
#[derive(Debug, Default, clap::Args)]
pub struct ServeArgs {
    /// Configuration file (TOML).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The broker's URL, e.g. `https://broker.example:8443`.
    #[arg(long, env = "PLEIADES_BROKER")]
    pub broker: Option<String>,
    /// Trust the broker's certificate with this SHA-256 (printed by `pleiades-broker host token
    /// create`).
    #[arg(long)]
    pub broker_cert_sha256: Option<String>,
    /// Trust the broker's certificate through this CA (PEM) instead of a pin.
    #[arg(long, conflicts_with = "broker_cert_sha256")]
    pub broker_ca: Option<PathBuf>,
    /// Registration token (`pleiades-broker host token create`). Only needed until the host is
    /// registered; prefer the environment or --token-file to the command line.
    #[arg(long, env = "PLEIADES_HOST_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Read the registration token from this file.
    #[arg(long, conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// This host's name at the broker (default: the machine's hostname).
    #[arg(long)]
    pub name: Option<String>,
    /// Where clients reach this host (default: the machine's hostname).
    #[arg(long)]
    pub address: Option<String>,
    /// The address session servers listen on (default 0.0.0.0).
    #[arg(long)]
    pub listen_ip: Option<IpAddr>,
    /// UDP ports for the desktops' session servers, one per desktop (default 47000-47099).
    #[arg(long)]
    pub ports: Option<PortRange>,
    /// Where the daemon keeps its registration, certificate and per-desktop logs (default
    /// /var/lib/pleiades-host).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Which VMM runs the desktops (`pleiades` or `qemu`; default: as `run` chooses).
    #[arg(long)]
    pub vmm: Option<String>,
    /// An image this host can boot (its name at the broker). Repeat for several.
    #[arg(long = "image")]
    pub images: Vec<String>,
    /// A device every desktop gets (as `run --device`). Default: gpu, keyboard, tablet, sound, vsock.
    #[arg(long = "device")]
    pub devices: Vec<String>,
    /// A directory whose files may boot as desktops' kernels, initrds and disk templates
    /// (repeat for several; default /var/lib/pleiades/images). Whatever the broker names
    /// elsewhere (`/etc/shadow`, the host's own keys) is refused.
    #[arg(long = "image-dir")]
    pub image_dirs: Vec<PathBuf>,
    /// Run every desktop in its own jail (user, namespaces, root, cgroup, seccomp; see
    /// docs/security.md): `on` (needs root), `off`, or `auto` (on when run as root; default).
    #[arg(long, value_enum)]
    pub jail: Option<JailMode>,
    /// The first desktop's user and group id in the jail; desktop N of the port range gets
    /// this + N (default 900000: clear of people's and system users).
    #[arg(long)]
    pub jail_uid_base: Option<u32>,
    /// The daemon's cgroup, relative to /sys/fs/cgroup (default `pleiades`); each desktop gets
    /// `desktop-<id>` under it. Under systemd, name a group in the unit's delegated subtree.
    #[arg(long)]
    pub cgroup_root: Option<PathBuf>,
    /// The share of one CPU core (percent) each desktop's H.264 encoding may use, as `run
    /// --encoder-cpu-budget` (default 50; 0: no limit).
    #[arg(long)]
    pub encoder_cpu_budget: Option<u32>,
}

/// `serve --jail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum JailMode {
    Auto,
    On,
    Off,
}

/// The TOML form of [`ServeArgs`].
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ServeFile {
    broker: Option<String>,
    broker_cert_sha256: Option<String>,
    broker_ca: Option<PathBuf>,
    token_file: Option<PathBuf>,
    name: Option<String>,
    address: Option<String>,
    listen_ip: Option<IpAddr>,
    ports: Option<String>,
    state_dir: Option<PathBuf>,
    vmm: Option<String>,
    images: Vec<String>,
    devices: Vec<String>,
    jail: Option<JailMode>,
    jail_uid_base: Option<u32>,
    cgroup_root: Option<PathBuf>,
    image_dirs: Vec<PathBuf>,
    encoder_cpu_budget: Option<u32>,
}

/// The daemon's settings, resolved.
#[derive(Clone)]
pub struct ServeConfig {
    pub broker: String,
    pub trust: Trust,
    pub token: Option<String>,
    pub name: String,
    pub address: String,
    pub listen_ip: IpAddr,
    pub ports: PortRange,
    pub state_dir: PathBuf,
    pub vmm: Option<String>,
    pub images: Vec<String>,
    pub devices: Vec<String>,
    pub jail: Option<jails::JailSettings>,
    /// Where images' files may be (canonical paths).
    pub image_dirs: Vec<PathBuf>,
    /// `run --encoder-cpu-budget` for every desktop.
    pub encoder_cpu_budget: u32,
}

impl std::fmt::Debug for ServeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("ServeConfig")
            .field("broker", &self.broker)
            .field("name", &self.name)
            .field("address", &self.address)
            .field("ports", &self.ports)
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

impl ServeArgs {
    /// Merges the config file under the command line and fills in defaults.
    pub fn resolve(self) -> Result<ServeConfig> {
        let file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                toml::from_str::<ServeFile>(&text)
                    .with_context(|| format!("{} is not a valid host config", path.display()))?
            }
            None => ServeFile::default(),
        };
        let hostname = || {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "localhost".into())
        };
        let broker =
            self.broker.or(file.broker).context("give the broker's URL: --broker https://broker:8443")?;
        let trust = match (
            self.broker_cert_sha256.or(file.broker_cert_sha256),
            self.broker_ca.or(file.broker_ca),
        ) {
            (Some(pin), _) => Trust::Pin(pin),
            (None, Some(ca)) => Trust::Ca(ca),
            (None, None) if broker.starts_with("http://") => Trust::LoopbackHttp,
            (None, None) => bail!(
                "say how to trust the broker: --broker-cert-sha256 (printed by `pleiades-broker host token create`) or --broker-ca FILE"
            ),
        };
        let token = match (self.token, self.token_file.or(file.token_file)) {
            (Some(token), _) => Some(token),
            (None, Some(path)) => Some(
                std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read the token file {}", path.display()))?
                    .trim()
                    .to_owned(),
            ),
            (None, None) => None,
        };
        let ports = match (self.ports, file.ports) {
            (Some(p), _) => p,
            (None, Some(p)) => p.parse().map_err(anyhow::Error::msg)?,
            (None, None) => PortRange { first: 47000, last: 47099 },
        };
        let devices = [self.devices, file.devices]
            .into_iter()
            .find(|d| !d.is_empty())
            .unwrap_or_else(|| ["gpu", "keyboard", "tablet", "sound", "vsock"].map(String::from).to_vec());
        if !devices.iter().any(|d| d.split(',').next() == Some("gpu")) {
            bail!("desktops need a GPU: add --device gpu");
        }
        let jail = match self.jail.or(file.jail).unwrap_or(JailMode::Auto) {
            JailMode::Off => None,
            JailMode::Auto if !nix::unistd::Uid::effective().is_root() => {
                tracing::warn!("not running as root: desktops run without a jail (docs/security.md)");
                None
            }
            JailMode::On if !nix::unistd::Uid::effective().is_root() => {
                bail!(
                    "--jail on needs root (the jail makes namespaces, cgroups and mounts); run as root or with --jail off"
                )
            }
            JailMode::Auto | JailMode::On => {
                let uid_base = self.jail_uid_base.or(file.jail_uid_base).unwrap_or(900_000);
                let span = u32::from(ports.last - ports.first);
                if uid_base == 0 || uid_base.checked_add(span).is_none() {
                    bail!(
                        "--jail-uid-base {uid_base} leaves no unprivileged id for every port of {}-{}",
                        ports.first,
                        ports.last
                    );
                }
                let parent = self.cgroup_root.or(file.cgroup_root).unwrap_or_else(|| "pleiades".into());
                let cgroup = match jail::cgroup::Version::detect() {
                    Some(version) => Some((version, parent)),
                    None => {
                        tracing::warn!(
                            "no cgroup hierarchy with the memory, cpu and pids controllers under /sys/fs/cgroup: desktops run without resource limits"
                        );
                        None
                    }
                };
                Some(jails::JailSettings { uid_base, cgroup })
            }
        };
        let image_dirs = [self.image_dirs, file.image_dirs]
            .into_iter()
            .find(|d| !d.is_empty())
            .unwrap_or_else(|| vec!["/var/lib/pleiades/images".into()])
            .into_iter()
            .map(|d| {
                if !d.is_absolute() {
                    bail!("--image-dir {} is not an absolute path", d.display());
                }
                // A directory that does not exist yet holds nothing to boot: kept as given.
                Ok(d.canonicalize().unwrap_or(d))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ServeConfig {
            broker,
            trust,
            token,
            name: self.name.or(file.name).unwrap_or_else(hostname),
            address: self.address.or(file.address).unwrap_or_else(hostname),
            listen_ip: self.listen_ip.or(file.listen_ip).unwrap_or(IpAddr::from([0, 0, 0, 0])),
            ports,
            state_dir: self.state_dir.or(file.state_dir).unwrap_or_else(|| "/var/lib/pleiades-host".into()),
            vmm: self.vmm.or(file.vmm),
            images: [self.images, file.images].into_iter().find(|i| !i.is_empty()).unwrap_or_default(),
            devices,
            jail,
            image_dirs,
            encoder_cpu_budget: self
                .encoder_cpu_budget
                .or(file.encoder_cpu_budget)
                .unwrap_or(crate::run::DEFAULT_ENCODER_CPU_BUDGET),
        })
    }
}

/// What the daemon keeps of its registration (mode 0600: it holds the credential).
#[derive(Serialize, Deserialize)]
struct StoredRegistration {
    broker: String,
    name: String,
    host_id: String,
    credential: String,
    ticket_public_key: String,
    heartbeat_interval_secs: u64,
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(config: ServeConfig) -> Result<()> {
    let spawner = Spawner::start()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("serve")
        .enable_all()
        .build()?;
    runtime.block_on(daemon(config, spawner))
}

async fn daemon(config: ServeConfig, spawner: Spawner) -> Result<()> {
    create_private_dir(&config.state_dir)?;
    let identity = pleiades_session::tls::Identity::load_or_create(
        &config.state_dir.join("tls"),
        &[config.address.clone(), config.name.clone()],
    )
    .map_err(anyhow::Error::msg)?;
    let host_identity = identity::HostIdentity::load_or_create(&config.state_dir)?;
    if config.trust == Trust::LoopbackHttp {
        tracing::warn!(
            "plain HTTP to the broker: the host's client certificate cannot be presented, so the broker knows \
             this host by its credential alone"
        );
    }
    let (cores, memory_mib) = capacity();
    let mut client = BrokerClient::new(&config.broker, &config.trust, &host_identity)?;
    let registration_path = config.state_dir.join("registration.json");
    let registration = HostRegistration {
        token: config.token.clone().unwrap_or_default(),
        credential: None,
        name: config.name.clone(),
        address: config.address.clone(),
        session_port: config.ports.first,
        cert_sha256: identity.fingerprint(),
        cores,
        memory_mib,
        images: config.images.clone(),
    };
    let mut stored = match load_registration(&registration_path, &config) {
        Some(stored) => register_again(&client, &registration, stored, &registration_path).await,
        None => register(&client, &registration, &registration_path, &config).await?,
    };
    client.set_credential(&stored.credential);
    tracing::info!(
        host = %config.name, id = %stored.host_id, broker = %config.broker,
        cert_sha256 = %identity.fingerprint(), client_cert_sha256 = %host_identity.fingerprint(),
        "registered with the broker"
    );
    // Desktops of an earlier daemon that did not stop cleanly: their VMs died with it (the
    // parent-death signal), their network namespaces did not.
    if let Ok(entries) = std::fs::read_dir(config.state_dir.join("desktops")) {
        let ids: Vec<String> = entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
        network::remove_stale(ids.iter().map(String::as_str));
        if let Some(jail) = &config.jail {
            jail.clean_stale(ids.iter().map(String::as_str));
        }
    }
    let desktops = Arc::new(Desktops::new(
        VmSettings {
            exe: std::env::current_exe().context("cannot find this program's path")?,
            vmm: config.vmm.clone(),
            devices: config.devices.clone(),
            listen_ip: config.listen_ip,
            ports: config.ports,
            address: config.address.clone(),
            host_id: stored.host_id.clone(),
            ticket_key: stored.ticket_public_key.clone(),
            state_dir: config.state_dir.clone(),
            cores,
            memory_mib,
            jail: config.jail.clone(),
            image_dirs: config.image_dirs.clone(),
            encoder_cpu_budget: config.encoder_cpu_budget,
        },
        spawner,
    ));
    let client = Arc::new(tokio::sync::RwLock::new(client));
    let mut interval = Duration::from_secs(stored.heartbeat_interval_secs.clamp(1, 300));
    let mut shutdown = std::pin::pin!(shutdown_signal());
    loop {
        let beat =
            Heartbeat { cores, memory_mib, images: config.images.clone(), desktops: desktops.report().await };
        let reply = client.read().await.heartbeat(&beat).await;
        match reply {
            Ok(reply) => {
                interval = Duration::from_secs(reply.heartbeat_interval_secs.clamp(1, 300));
                dispatch(&desktops, &client, reply.commands);
            }
            Err(BrokerError::Unauthorized(why)) if config.token.is_some() => {
                tracing::warn!("the broker refused the stored credential ({why}); registering again");
                match register(&*client.read().await, &registration, &registration_path, &config).await {
                    Ok(fresh) => {
                        if fresh.host_id != stored.host_id
                            || fresh.ticket_public_key != stored.ticket_public_key
                        {
                            tracing::warn!(
                                "the broker gave a new host id or ticket key: desktops started from now on use it"
                            );
                        }
                        client.write().await.set_credential(&fresh.credential);
                        stored = fresh;
                    }
                    Err(e) => tracing::error!("registering again failed: {e:#}"),
                }
            }
            Err(e) => tracing::warn!("heartbeat failed: {e} (retrying in {} s)", interval.as_secs()),
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = &mut shutdown => break,
        }
    }
    tracing::info!("stopping every desktop");
    desktops.stop_all().await;
    Ok(())
}

/// Runs the commands of one heartbeat reply: one task per desktop, its commands in order.
fn dispatch(
    desktops: &Arc<Desktops>,
    client: &Arc<tokio::sync::RwLock<BrokerClient>>,
    commands: Vec<HostCommand>,
) {
    let mut by_desktop: BTreeMap<String, Vec<HostCommand>> = BTreeMap::new();
    for command in commands {
        by_desktop.entry(command.desktop_id.clone()).or_default().push(command);
    }
    for (desktop, commands) in by_desktop {
        let (desktops, client) = (desktops.clone(), client.clone());
        let order = desktops.desktop_lock(&desktop);
        tokio::spawn(async move {
            let _turn = order.lock().await;
            for command in commands {
                let ack = execute(&desktops, &command).await;
                if let Some(error) = &ack.error {
                    tracing::warn!(desktop = %command.desktop_name, kind = %command.kind, "command failed: {error}");
                }
                acknowledge(&client, &command.id, &ack).await;
            }
        });
    }
}

async fn execute(desktops: &Arc<Desktops>, command: &HostCommand) -> CommandAck {
    tracing::info!(desktop = %command.desktop_name, id = %command.desktop_id, kind = %command.kind, "command");
    let image = || command.image.as_ref().ok_or_else(|| format!("{} without an image", command.kind));
    let result = match command.kind {
        CommandKind::Start => match image().and_then(|image| Ok((image, Boot::of(command)?))) {
            Ok((image, boot)) => desktops
                .start(&command.desktop_id, image, false, command.network.as_ref(), boot)
                .await
                .map(Some),
            Err(e) => Err(e),
        },
        // A restart keeps the desktop's disk; a recycle reverts it: a fresh overlay on the
        // template of the image the command names (the pool's current one). A command that
        // cannot boot (a USB policy the host cannot read) leaves the running VM alone.
        CommandKind::Restart | CommandKind::Recycle => {
            match image().and_then(|image| Ok((image, Boot::of(command)?))) {
                Ok((image, boot)) => match desktops.stop(&command.desktop_id).await {
                    Ok(()) => {
                        let fresh = command.kind == CommandKind::Recycle;
                        desktops
                            .start(&command.desktop_id, image, fresh, command.network.as_ref(), boot)
                            .await
                            .map(Some)
                    }
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            }
        }
        CommandKind::Stop => desktops.stop(&command.desktop_id).await.map(|()| None),
        CommandKind::Disconnect => desktops.disconnect(&command.desktop_id).await.map(|()| None),
        CommandKind::Unknown => Err("unknown command kind: the broker is newer than this host".to_owned()),
    };
    match result {
        Ok(port) => CommandAck { ok: true, error: None, port },
        Err(error) => CommandAck { ok: false, error: Some(error), port: None },
    }
}

/// Acknowledges a command, retrying a few times when the broker is unreachable.
async fn acknowledge(client: &tokio::sync::RwLock<BrokerClient>, id: &str, ack: &CommandAck) {
    for attempt in 1..=5u64 {
        match client.read().await.ack(id, ack).await {
            Ok(()) => return,
            Err(BrokerError::Unreachable { error, .. }) => {
                tracing::warn!("acknowledging command {id} failed (attempt {attempt}): {error}");
                tokio::time::sleep(Duration::from_secs(attempt)).await;
            }
            Err(e) => {
                tracing::warn!("the broker refused the acknowledgement of command {id}: {e}");
                return;
            }
        }
    }
}

async fn register(
    client: &BrokerClient,
    registration: &HostRegistration,
    path: &Path,
    config: &ServeConfig,
) -> Result<StoredRegistration> {
    if registration.token.is_empty() {
        bail!(
            "this host is not registered with {}: give a registration token (--token-file FILE or \
             PLEIADES_HOST_TOKEN; an admin makes one for this host with `pleiades-broker host token create --name {}`)",
            config.broker,
            config.name
        );
    }
    let registered = client.register(registration).await.context("registering with the broker")?;
    let stored = StoredRegistration {
        broker: config.broker.clone(),
        name: config.name.clone(),
        host_id: registered.host_id,
        credential: registered.credential,
        ticket_public_key: registered.ticket_public_key,
        heartbeat_interval_secs: registered.heartbeat_interval_secs,
    };
    pleiades_session::write_private(path, &serde_json::to_vec_pretty(&stored)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(stored)
}

/// A restarted daemon registers again with its stored credential (no token), so that the
/// broker learns its address, ports, certificate and images as they are now; the credential
/// stays valid. When the broker cannot be reached or refuses, the daemon goes on with what it
/// stored (its heartbeats say whether the credential still works).
async fn register_again(
    client: &BrokerClient,
    registration: &HostRegistration,
    stored: StoredRegistration,
    path: &Path,
) -> StoredRegistration {
    let again = HostRegistration {
        token: String::new(),
        credential: Some(stored.credential.clone()),
        ..registration.clone()
    };
    match client.register(&again).await {
        Ok(registered) => {
            let fresh = StoredRegistration {
                host_id: registered.host_id,
                credential: registered.credential,
                ticket_public_key: registered.ticket_public_key,
                heartbeat_interval_secs: registered.heartbeat_interval_secs,
                ..stored
            };
            let written = serde_json::to_vec_pretty(&fresh)
                .map_err(std::io::Error::other)
                .and_then(|json| pleiades_session::write_private(path, &json));
            if let Err(e) = written {
                tracing::warn!("cannot write {}: {e}", path.display());
            }
            fresh
        }
        Err(e) => {
            tracing::warn!("registering again with the stored credential failed ({e}); going on with it");
            stored
        }
    }
}

/// The stored registration, when it is for this broker and name.
fn load_registration(path: &Path, config: &ServeConfig) -> Option<StoredRegistration> {
    let stored: StoredRegistration = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    (stored.broker == config.broker && stored.name == config.name).then_some(stored)
}

fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create the state directory {}", dir.display()))
}

/// Cores and memory (MiB) of this machine.
fn capacity() -> (i64, i64) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as i64);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok())
        .unwrap_or(0);
    (cores, kib / 1024)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> ServeArgs {
        ServeArgs {
            broker: Some("https://broker:8443".into()),
            broker_cert_sha256: Some("ab".repeat(32)),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_give_a_gpu_desktop_on_the_default_ports() {
        let c = args().resolve().unwrap();
        assert_eq!(c.devices, ["gpu", "keyboard", "tablet", "sound", "vsock"]);
        assert_eq!(c.ports, PortRange { first: 47000, last: 47099 });
        assert_eq!(c.trust, Trust::Pin("ab".repeat(32)));
        assert!(c.token.is_none());
    }

    #[test]
    fn the_config_file_fills_what_the_command_line_leaves_out() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("host.toml");
        std::fs::write(
            &file,
            "name = \"h1\"\nports = \"5000-5009\"\nimages = [\"desktop\"]\nstate_dir = \"/tmp/x\"\n",
        )
        .unwrap();
        let c =
            ServeArgs { config: Some(file.clone()), name: Some("cli".into()), ..args() }.resolve().unwrap();
        assert_eq!(
            (c.name.as_str(), c.ports.first, c.images.as_slice()),
            ("cli", 5000, &["desktop".to_owned()][..])
        );
        std::fs::write(&file, "colour = \"blue\"\n").unwrap();
        let e = ServeArgs { config: Some(file), ..args() }.resolve().unwrap_err();
        assert!(format!("{e:#}").contains("colour"), "{e:#}");
    }

    #[test]
    fn refusals_say_what_to_do() {
        let e = ServeArgs { broker_cert_sha256: None, ..args() }.resolve().unwrap_err();
        assert!(e.to_string().contains("--broker-cert-sha256"), "{e}");
        let e = ServeArgs { devices: vec!["keyboard".into()], ..args() }.resolve().unwrap_err();
        assert!(e.to_string().contains("--device gpu"), "{e}");
        let e = ServeArgs { broker: None, ..args() }.resolve().unwrap_err();
        assert!(e.to_string().contains("--broker"), "{e}");
    }

    /// A boot command whose USB policy the host cannot read fails, with the reason in its
    /// acknowledgement, before anything is stopped or started.
    #[tokio::test]
    async fn a_boot_command_with_a_bad_usb_policy_fails_before_booting() {
        let dir = tempfile::tempdir().unwrap();
        let settings = VmSettings {
            exe: "/bin/false".into(),
            vmm: None,
            devices: vec!["gpu".into()],
            listen_ip: IpAddr::from([127, 0, 0, 1]),
            ports: PortRange { first: 47000, last: 47001 },
            address: "127.0.0.1".into(),
            host_id: "h".into(),
            ticket_key: String::new(),
            state_dir: dir.path().to_owned(),
            cores: 2,
            memory_mib: 4096,
            jail: None,
            image_dirs: vec![dir.path().to_owned()],
            encoder_cpu_budget: 50,
        };
        let desktops = Arc::new(Desktops::new(settings, Spawner::start().unwrap()));
        let command: HostCommand = serde_json::from_value(serde_json::json!({
            "id": "c1", "kind": "start", "desktop_id": "d1", "desktop_name": "n", "generation": 1,
            "image": {
                "id": "i", "name": "debian", "kernel": "/nowhere/vmlinuz", "initrd": "/nowhere/initrd",
                "cmdline": "", "vcpus": 1, "memory_mib": 256
            },
            "usb": "class=08,everything"
        }))
        .unwrap();
        for kind in [CommandKind::Start, CommandKind::Restart, CommandKind::Recycle] {
            let ack = execute(&desktops, &HostCommand { kind, ..command.clone() }).await;
            let error = ack.error.unwrap_or_default();
            assert!(!ack.ok && error.contains(r#"USB policy "class=08,everything""#), "{kind}: {error}");
            assert!(error.contains("not a USB rule"), "the policy's own words: {error}");
        }
        assert!(!dir.path().join("desktops").exists(), "nothing was prepared for a boot");
        // The same command with a policy it can read goes on to boot (and fails later, here,
        // on the image).
        let ack = execute(&desktops, &HostCommand { usb: Some("class=08".into()), ..command }).await;
        assert!(!ack.error.unwrap_or_default().contains("USB"));
    }

    #[test]
    fn the_token_never_shows_in_debug_output() {
        let c = ServeArgs { token: Some("secret-token-123".into()), ..args() }.resolve().unwrap();
        assert!(!format!("{c:?}").contains("secret-token"));
    }
}
