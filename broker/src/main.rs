//! `pleiades-broker`: serve the broker, or administer it from the command line.
//!
//! Every subcommand but `serve` opens the database directly and runs the same library
//! operations as the API, as the `system` actor (audited as such).

use std::io::BufRead as _;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use pleiades_broker::broker::Broker;
use pleiades_broker::clock::SystemClock;
use pleiades_broker::config::Config;
use pleiades_broker::db::Db;
use pleiades_broker::http::{AppState, router};
use pleiades_broker::model::{Actor, HostTokenSpec, Image, PoolKind, PoolNetwork, PoolSpec, PrincipalKind};
use pleiades_broker::server;

#[derive(Debug, Parser)]
#[command(name = "pleiades-broker", version, about = "Pleiades connection broker")]
struct Cli {
    /// Configuration file (TOML).
    #[arg(long, short, global = true, env = "PLEIADES_BROKER_CONFIG")]
    config: Option<PathBuf>,
    /// Database URL (overrides the config): sqlite:///path/broker.db or postgres://user@host/db.
    #[arg(long, global = true, env = "PLEIADES_BROKER_DB")]
    db: Option<String>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve the portal, admin console, REST API and host API.
    Serve {
        /// Address to listen on (overrides the config).
        #[arg(long)]
        listen: Option<String>,
        /// Serve plain HTTP (loopback tests, or behind a TLS-terminating proxy).
        #[arg(long)]
        insecure_http: bool,
    },
    /// Users.
    #[command(subcommand)]
    User(UserCmd),
    /// Groups.
    #[command(subcommand)]
    Group(GroupCmd),
    /// Images.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Pools and entitlements.
    #[command(subcommand)]
    Pool(PoolCmd),
    /// Hosts and host registration tokens.
    #[command(subcommand)]
    Host(HostCmd),
    /// Print the newest audit entries.
    Audit {
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Print the ticket public key (base64url Ed25519) that hosts verify tickets with. The
    /// private key is STATE_DIR/ticket-key.pk8 (mode 0600), not in the database.
    TicketKey {
        /// First install this signing key (Ed25519, PKCS#8 DER file): into a new database, or
        /// into this broker's state directory for a database that signs with it already.
        #[arg(long, value_name = "FILE")]
        import: Option<std::path::PathBuf>,
    },
    /// Run one maintenance round (lost hosts, idle desktops, spares) and exit.
    Maintain,
    /// The LDAP directory of the `[ldap]` table.
    #[command(subcommand)]
    Directory(DirectoryCmd),
}

#[derive(Debug, Subcommand)]
enum DirectoryCmd {
    /// Show who NAME is in the directory (DN, display name, groups, administrator) as a
    /// sign-in would see them, without a password: a check of the `[ldap]` settings.
    Lookup { name: String },
}

#[derive(Debug, Subcommand)]
enum UserCmd {
    /// Add a local user. The password is read from PLEIADES_PASSWORD or the first line of stdin.
    Add {
        name: String,
        #[arg(long, default_value = "")]
        display_name: String,
        #[arg(long)]
        admin: bool,
    },
    /// Set a user's password (read like `user add`).
    Passwd {
        name: String,
    },
    List,
}

#[derive(Debug, Subcommand)]
enum GroupCmd {
    Add {
        name: String,
    },
    /// Group membership.
    #[command(subcommand)]
    Member(MemberCmd),
    List,
}

#[derive(Debug, Subcommand)]
enum MemberCmd {
    Add { group: String, user: String },
}

#[derive(Debug, Subcommand)]
enum ImageCmd {
    Add {
        name: String,
        #[arg(long)]
        kernel: String,
        #[arg(long)]
        initrd: String,
        #[arg(long, default_value = "console=ttyS0 quiet")]
        cmdline: String,
        /// A disk template (qcow2 or raw) on a path the hosts can read too: each desktop gets a
        /// copy-on-write overlay on it. Its SHA-256 is computed now; hosts check it.
        #[arg(long)]
        disk: Option<std::path::PathBuf>,
        #[arg(long, default_value_t = 2)]
        vcpus: i64,
        #[arg(long, default_value_t = 2048)]
        memory_mib: i64,
    },
    List,
}

#[derive(Debug, Args)]
struct PoolArgs {
    name: String,
    #[arg(long)]
    image: String,
    #[arg(long, value_parser = ["floating", "persistent"], default_value = "floating")]
    kind: String,
    #[arg(long, default_value = "")]
    display_name: String,
    #[arg(long, default_value_t = 0)]
    min: i64,
    #[arg(long)]
    max: i64,
    #[arg(long, default_value_t = 0)]
    spares: i64,
    #[arg(long, default_value_t = 3600)]
    idle_timeout: i64,
    #[arg(long, default_value_t = 900)]
    disconnect_timeout: i64,
    /// The desktops' network: `nat` (a network card with DHCP, DNS and outbound NAT, kept from
    /// the host's services and other desktops) or `none`.
    #[arg(long, value_parser = ["nat", "none"], default_value = "nat")]
    network: String,
    /// A TCP port of a service on the host's loopback that the desktops may reach, at
    /// 10.213.0.1. Repeat for several.
    #[arg(long = "host-port")]
    host_ports: Vec<u16>,
    /// Whether the desktops' screens lock while no client is connected (their guest agent
    /// locks them, and unlocks them for the user's next connection).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    lock_on_disconnect: bool,
    /// Whether the clipboard carries content from the client into the desktops (a data loss
    /// prevention control, enforced by the host).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    clipboard_to_guest: bool,
    /// Whether the clipboard carries content from the desktops out to the client.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    clipboard_from_guest: bool,
    /// Whether the client may send files into the desktops (a data loss prevention control,
    /// enforced by the host).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    file_transfer: bool,
    /// Which of the client's USB devices may be redirected into the desktops (enforced by the
    /// host): `none` (no device), `all`, or a comma-separated list of `class=HH` (a USB class in
    /// hex; every class of a device must be listed) and `VVVV:PPPP` (a vendor and product id in
    /// hex), e.g. `class=03,class=0b,0525:a4a5`.
    #[arg(long, value_name = "POLICY", default_value = "none")]
    usb: String,
    /// Which of the client's USB devices the client redirects by itself as soon as it connects
    /// to one of the desktops (carried in their connection files), in the same grammar as
    /// `--usb`, e.g. `class=03,class=0b` for keyboards and smart-card readers. `--usb` still
    /// decides what the desktops take.
    #[arg(long, value_name = "RULES", default_value = "none")]
    usb_auto: String,
}

#[derive(Debug, Subcommand)]
enum PoolCmd {
    Create(PoolArgs),
    /// Entitle a user or a group to a pool.
    Entitle {
        pool: String,
        #[arg(long, conflicts_with = "group", required_unless_present = "group")]
        user: Option<String>,
        #[arg(long)]
        group: Option<String>,
    },
    List,
    /// Recompose: give the pool a new image. Floating desktops move to it at their next
    /// recycle, persistent ones when an admin recomposes them (REST API or admin console).
    Recompose {
        pool: String,
        #[arg(long)]
        image: String,
    },
}

#[derive(Debug, Subcommand)]
enum HostCmd {
    /// Host registration tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    List,
}

#[derive(Debug, Subcommand)]
enum TokenCmd {
    /// Create a registration token for one host name (printed once; one-time unless
    /// --reusable).
    Create {
        /// The host's name (`pleiades-host serve --name`): the token registers this name only.
        #[arg(long)]
        name: String,
        /// Replace the host registered under this name (a reinstalled machine that lost its
        /// credential): whoever registers with the token gets that host's identity, and the
        /// old credential stops working. Without it, a registered host re-registers only with
        /// its own credential.
        #[arg(long)]
        replace: bool,
        #[arg(long, default_value = "")]
        description: String,
        #[arg(long)]
        reusable: bool,
        #[arg(long, default_value_t = 86_400)]
        lifetime_secs: i64,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut config = match &cli.config {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            Config::from_toml(&text)
                .with_context(|| format!("{} is not a valid broker config", path.display()))?
        }
        None => Config::default(),
    };
    if let Some(db) = cli.db {
        config.database = db;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(run(config, cli.command))
}

async fn open(config: &Config) -> Result<Arc<Broker>> {
    let db = Db::connect(&config.database)
        .await
        .with_context(|| format!("cannot open the database {}", redact(&config.database)))?;
    let mut broker =
        Broker::open(db, Arc::new(SystemClock), config.broker.clone(), &config.state_dir()).await?;
    if let Some(ldap) = &config.ldap {
        let directory = pleiades_broker::auth::ldap::Directory::new(ldap.clone())?;
        tracing::info!(url = %ldap.url, "directory users may sign in");
        broker = broker.with_directory(Arc::new(directory));
    }
    Ok(Arc::new(broker))
}

/// Database URLs may carry a password: never print it.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_owned(),
    }
}

fn read_password() -> Result<String> {
    if let Ok(p) = std::env::var("PLEIADES_PASSWORD") {
        return Ok(p);
    }
    eprintln!("password (one line on stdin):");
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let p = line.trim_end_matches(['\r', '\n']).to_owned();
    if p.is_empty() {
        bail!("no password given (set PLEIADES_PASSWORD or pipe it on stdin)");
    }
    Ok(p)
}

async fn run(mut config: Config, command: Cmd) -> Result<()> {
    let system = Actor::system();
    match command {
        Cmd::Serve { listen, insecure_http } => {
            if let Some(l) = listen {
                config.listen = l;
            }
            config.insecure_http |= insecure_http;
            let broker = open(&config).await?;
            let tls = if config.insecure_http { None } else { Some(server::tls_config(&config)?) };
            if tls.is_none() {
                tracing::warn!(
                    "plain HTTP: hosts cannot present their TLS client certificates, so a host's identity rests \
                     on its credential alone (docs/broker.md, \"Hosts\")"
                );
            }
            let listener = tokio::net::TcpListener::bind(&config.listen)
                .await
                .with_context(|| format!("cannot listen on {}", config.listen))?;
            tracing::info!(
                address = %listener.local_addr()?,
                database = %redact(&config.database),
                scheme = if tls.is_some() { "https" } else { "http" },
                "broker serving"
            );
            tokio::spawn(server::maintenance_loop(broker.clone()));
            let app = router(AppState { broker, secure_cookies: config.cookies_secure() });
            let shutdown = async {
                let _ = tokio::signal::ctrl_c().await;
            };
            server::serve(listener, app, tls, shutdown).await?;
        }
        Cmd::User(UserCmd::Add { name, display_name, admin }) => {
            let broker = open(&config).await?;
            let password = read_password()?;
            let user = broker.create_user(&system, &name, &display_name, Some(&password), admin).await?;
            println!("user {} created ({})", user.name, if admin { "admin" } else { "user" });
        }
        Cmd::User(UserCmd::Passwd { name }) => {
            let broker = open(&config).await?;
            broker.set_password(&system, &name, &read_password()?).await?;
            println!("password of {name} changed");
        }
        Cmd::User(UserCmd::List) => {
            for u in open(&config).await?.list_users(&system).await? {
                println!("{}\t{}\t{}", u.name, if u.is_admin { "admin" } else { "user" }, u.display_name);
            }
        }
        Cmd::Group(GroupCmd::Add { name }) => {
            open(&config).await?.create_group(&system, &name).await?;
            println!("group {name} created");
        }
        Cmd::Group(GroupCmd::Member(MemberCmd::Add { group, user })) => {
            open(&config).await?.add_group_member(&system, &group, &user).await?;
            println!("{user} added to {group}");
        }
        Cmd::Group(GroupCmd::List) => {
            for g in open(&config).await?.list_groups(&system).await? {
                println!("{}\t{}", g.name, g.members.join(","));
            }
        }
        Cmd::Image(ImageCmd::Add { name, kernel, initrd, cmdline, disk, vcpus, memory_mib }) => {
            let disk = disk.map(|d| std::path::absolute(&d).unwrap_or(d).display().to_string());
            let image = Image {
                id: String::new(),
                name,
                kernel,
                initrd,
                cmdline,
                disk,
                disk_sha256: None,
                vcpus,
                memory_mib,
            };
            let image = open(&config).await?.create_image(&system, &image).await?;
            println!("image {} added", image.name);
        }
        Cmd::Image(ImageCmd::List) => {
            for i in open(&config).await?.list_images().await? {
                let disk = match (&i.disk, &i.disk_sha256) {
                    (Some(d), Some(sha)) => format!("{d} (sha256 {})", &sha[..sha.len().min(12)]),
                    _ => "no disk".into(),
                };
                println!(
                    "{}\t{}\t{}\t{disk}\t{} vCPU\t{} MiB",
                    i.name, i.kernel, i.initrd, i.vcpus, i.memory_mib
                );
            }
        }
        Cmd::Pool(PoolCmd::Create(a)) => {
            let spec = PoolSpec {
                name: a.name,
                display_name: a.display_name,
                kind: PoolKind::parse(&a.kind)?,
                image: a.image,
                min_size: a.min,
                max_size: a.max,
                spares: a.spares,
                idle_timeout_secs: a.idle_timeout,
                disconnect_timeout_secs: a.disconnect_timeout,
                network: PoolNetwork { nat: a.network == "nat", host_ports: a.host_ports },
                lock_on_disconnect: a.lock_on_disconnect,
                clipboard_to_guest: a.clipboard_to_guest,
                clipboard_from_guest: a.clipboard_from_guest,
                file_transfer: a.file_transfer,
                usb: a.usb,
                usb_auto: a.usb_auto,
            };
            let pool = open(&config).await?.create_pool(&system, &spec).await?;
            println!("pool {} created ({})", pool.name, pool.id);
        }
        Cmd::Pool(PoolCmd::Entitle { pool, user, group }) => {
            let broker = open(&config).await?;
            let pool = broker.pool_by_name(&pool).await?;
            let (kind, name) = match (user, group) {
                (Some(u), _) => (PrincipalKind::User, u),
                (None, Some(g)) => (PrincipalKind::Group, g),
                (None, None) => bail!("give --user or --group"),
            };
            broker.entitle(&system, &pool.id, kind, &name).await?;
            println!("{} {name} entitled to {}", kind.as_str(), pool.name);
        }
        Cmd::Pool(PoolCmd::Recompose { pool, image }) => {
            let broker = open(&config).await?;
            let pool = broker.pool_by_name(&pool).await?;
            broker.recompose_pool(&system, &pool.id, &image).await?;
            println!(
                "pool {} recomposed: its desktops move to image {image} at their next recycle",
                pool.name
            );
        }
        Cmd::Pool(PoolCmd::List) => {
            for p in open(&config).await?.list_pools().await? {
                let network = match (p.network.nat, p.network.host_ports.is_empty()) {
                    (false, _) => "no network".to_owned(),
                    (true, true) => "nat".to_owned(),
                    (true, false) => format!("nat, host ports {}", p.network.ports_text()),
                };
                println!(
                    "{}\t{}\tmin {} max {} spares {}\t{network}\tclipboard {}\tfile transfer {}\tusb {}\tusb auto {}\t{}",
                    p.name,
                    p.kind.as_str(),
                    p.min_size,
                    p.max_size,
                    p.spares,
                    p.clipboard_text(),
                    p.file_transfer_text(),
                    p.usb,
                    p.usb_auto,
                    if p.enabled { "enabled" } else { "disabled" }
                );
            }
        }
        Cmd::Host(HostCmd::Token(TokenCmd::Create {
            name,
            replace,
            description,
            reusable,
            lifetime_secs,
        })) => {
            let spec = HostTokenSpec { name, description, one_time: !reusable, replace, lifetime_secs };
            let token = open(&config).await?.create_host_token(&system, &spec).await?;
            // The one place a secret is printed: on request, to the admin's terminal.
            println!("{token}");
            // How a host uses it (on stderr, so that scripts read only the token).
            let (scheme, trust) = match (config.insecure_http, server::certificate_sha256(&config)) {
                (true, _) => ("http", String::new()),
                (false, Some(pin)) => ("https", format!(" --broker-cert-sha256 {pin}")),
                // The self-signed certificate is made when the broker first serves.
                (false, None) => {
                    ("https", " --broker-cert-sha256 <see `pleiades-broker serve`'s log>".to_owned())
                }
            };
            eprintln!(
                "register the host with: PLEIADES_HOST_TOKEN=<the token> pleiades-host serve --broker {scheme}://{}{trust} --name {} --image <name>",
                config.listen, spec.name
            );
        }
        Cmd::Host(HostCmd::List) => {
            for h in open(&config).await?.list_hosts(&system).await? {
                let state = h.state.as_str();
                println!(
                    "{}\t{}:{}\t{state}\t{} cores\t{} MiB\t{} desktops",
                    h.name, h.address, h.session_port, h.cores, h.memory_mib, h.desktops
                );
            }
        }
        Cmd::Audit { limit } => {
            let mut entries = open(&config).await?.list_audit(&system, limit).await?;
            entries.reverse();
            for e in entries {
                println!("{}\t{}\t{}\t{}\t{}", e.at, e.actor, e.action, e.target, e.detail);
            }
        }
        Cmd::TicketKey { import: Some(file) } => {
            let pkcs8 = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let db = Db::connect(&config.database)
                .await
                .with_context(|| format!("cannot open the database {}", redact(&config.database)))?;
            let public = pleiades_broker::broker::import_ticket_key(&db, &config.state_dir(), &pkcs8).await?;
            println!("{}", public.to_base64());
        }
        Cmd::TicketKey { import: None } => {
            println!("{}", open(&config).await?.ticket_public_key().to_base64())
        }
        Cmd::Maintain => open(&config).await?.maintain().await?,
        Cmd::Directory(DirectoryCmd::Lookup { name }) => {
            let broker = open(&config).await?;
            let directory = broker.directory().context("no [ldap] table in the configuration")?;
            match directory.lookup(&name).await? {
                None => bail!("the directory has no user {name} (under {})", directory.config().user_base),
                Some(who) => {
                    println!(
                        "dn\t{}\nname\t{}\ndisplay name\t{}",
                        who.external_id, who.name, who.display_name
                    );
                    println!("groups\t{}", who.groups.join(" "));
                    if let Some(admin) = who.is_admin {
                        println!("administrator\t{}", if admin { "yes" } else { "no" });
                    }
                }
            }
        }
    }
    Ok(())
}
