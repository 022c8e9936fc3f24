//! Allocation benchmark (issue #7): allocations per second and latency percentiles with many
//! users and concurrent API clients, SQLite and PostgreSQL side by side.
//!
//! For each backend: a broker served over real HTTP on 127.0.0.1 (the test environment of
//! `tests/common`), hosts from the host double, `--users` users in a group entitled to two
//! floating pools of `--users` desktops each, then `--clients` concurrent clients (tokio tasks,
//! each with its own reqwest client) that take users from a shared queue:
//!
//! 1. **login**: `POST /api/v1/login` for every user (argon2id: timed on its own, it would
//!    dominate the rest);
//! 2. **ready**: `POST /pools/{warm}/desktop` (every desktop started and ready beforehand) then
//!    `POST /desktops/{id}/connect` (a ticket);
//! 3. **provision**: `POST /pools/{cold}/desktop` on an empty pool: every allocation creates a
//!    desktop on the least-loaded host and queues its start; afterwards the hosts start them
//!    and every user connects (not timed).
//!
//! Each phase is checked: every user got a distinct desktop, the database agrees, and every
//! ticket verifies against the broker's key for the desktop's host. `SELECT 1` through the
//! broker's own pool is timed in the same run as a yardstick.
//!
//! `cargo bench -p pleiades-broker --bench allocation [-- --users N --clients C]`; without
//! `--bench` (as `cargo test --bench allocation` runs it) or with `--quick` it runs a small
//! smoke-sized round. `--backend sqlite|postgres` runs one.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Backend, Env, HostDouble, START, system};
use pleiades_broker::BrokerSettings;
use pleiades_broker::model::{DesktopState, PoolKind, PoolSpec, PrincipalKind};
use pleiades_protocol::ticket::PublicKey;
use serde_json::{Value, json};

const PASSWORD: &str = "bench-password";
/// Desktops' memory and how many fit on one host double.
const IMAGE_MIB: i64 = 256;
const DESKTOPS_PER_HOST: usize = 100;

#[derive(Debug, Clone)]
struct Args {
    users: usize,
    clients: usize,
    backends: Vec<Backend>,
    yardstick_queries: usize,
}

impl Args {
    fn parse() -> Self {
        let argv: Vec<String> = std::env::args().skip(1).collect();
        // `cargo bench` passes `--bench`; `cargo test --bench allocation` does not: a smoke run.
        let quick = argv.iter().any(|a| a == "--quick") || !argv.iter().any(|a| a == "--bench");
        let mut args = Self {
            users: if quick { 20 } else { 1000 },
            clients: if quick { 4 } else { 20 },
            backends: vec![Backend::Sqlite, Backend::Postgres],
            yardstick_queries: if quick { 100 } else { 2000 },
        };
        let mut it = argv.iter();
        while let Some(a) = it.next() {
            let mut value = |name: &str| {
                it.next()
                    .unwrap_or_else(|| panic!("{name} needs a value"))
                    .parse::<usize>()
                    .unwrap_or_else(|e| panic!("{name}: {e}"))
            };
            match a.as_str() {
                "--users" => args.users = value("--users"),
                "--clients" => args.clients = value("--clients"),
                "--backend" => {
                    args.backends = match it.next().map(String::as_str) {
                        Some("sqlite") => vec![Backend::Sqlite],
                        Some("postgres") => vec![Backend::Postgres],
                        other => panic!("--backend sqlite|postgres, not {other:?}"),
                    }
                }
                // Flags cargo passes to every bench.
                "--bench" | "--quick" => {}
                other if other.starts_with("--") => panic!(
                    "unknown flag {other}; usage: [--users N] [--clients C] [--backend sqlite|postgres] [--quick]"
                ),
                _ => {} // a cargo bench name filter
            }
        }
        assert!(args.users > 0 && args.clients > 0, "--users and --clients must be positive");
        args
    }
}

/// Latencies of one kind of request and the wall time of the phase they ran in.
#[derive(Debug, Clone, Default)]
struct Stats {
    latencies: Vec<Duration>,
    wall: Duration,
}

impl Stats {
    fn new(mut latencies: Vec<Duration>, wall: Duration) -> Self {
        latencies.sort();
        Self { latencies, wall }
    }

    fn per_sec(&self) -> f64 {
        self.latencies.len() as f64 / self.wall.as_secs_f64()
    }

    /// Nearest-rank percentile, in milliseconds.
    fn pct(&self, p: f64) -> f64 {
        let n = self.latencies.len();
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        self.latencies[rank.clamp(1, n) - 1].as_secs_f64() * 1e3
    }

    fn max(&self) -> f64 {
        self.latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1e3)
    }
}

/// What one backend's run measured.
#[derive(Debug)]
struct Report {
    backend: Backend,
    setup: Duration,
    login: Stats,
    /// The ready phase: allocation, connect, and both (the phase's rate is users per second).
    allocate: Stats,
    connect: Stats,
    allocate_connect: Stats,
    /// Per user: login + allocate + connect, from the two phases.
    whole: Stats,
    /// Allocations that had to create a desktop and queue its start.
    provision: Stats,
    /// `SELECT 1` through the broker's pool, one at a time.
    select1: Stats,
}

/// One user as the clients see it.
#[derive(Debug, Clone)]
struct User {
    name: String,
    id: String,
    token: String,
}

/// A desktop a user got, and the ticket for it.
#[derive(Debug, Clone)]
struct Got {
    user: usize,
    desktop: String,
    host_address: String,
    ticket: String,
}

fn main() {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let reports: Vec<Report> = args.backends.iter().map(|&b| runtime.block_on(run(b, &args))).collect();
    print_table(&args, &reports);
}

async fn run(backend: Backend, args: &Args) -> Report {
    let n = args.users;
    eprintln!("{backend:?}: setting up {n} users, {n} ready desktops…");
    let started = Instant::now();
    // Every client comes from 127.0.0.1: lift the per-address login limit.
    let settings = BrokerSettings {
        login_attempts_per_ip: u32::MAX,
        heartbeat_timeout_secs: 3600,
        ..BrokerSettings::default()
    };
    let env = Env::with_settings(backend, settings).await;
    env.image("debian", IMAGE_MIB).await;
    // Room for both pools' desktops, with slack.
    let host_count = n.div_ceil(DESKTOPS_PER_HOST);
    let host_mib = IMAGE_MIB * (DESKTOPS_PER_HOST as i64 * 5 / 2);
    let mut hosts = Vec::new();
    for h in 0..host_count {
        hosts.push(HostDouble::register(&env, &format!("host-{h:03}"), host_mib, &["debian"]).await);
    }
    let users = create_users(&env, n).await;
    let warm = pool(&env, "warm", n, n).await;
    env.broker.maintain().await.unwrap();
    for host in &mut hosts {
        host.settle().await;
    }
    // Stop refilling: the timed phase takes the ready desktops, nothing else.
    env.broker.update_pool(&system(), &warm, &spec("warm", n, 0), true).await.unwrap();
    let ready = env.broker.list_desktops(&system()).await.unwrap();
    assert_eq!(
        ready.iter().filter(|d| d.pool_id == warm && d.state == DesktopState::Ready).count(),
        n,
        "every desktop of the warm pool is ready before the timed phase"
    );
    let cold = pool(&env, "cold", n, 0).await;
    let setup = started.elapsed();
    eprintln!("{backend:?}: set up in {:.1} s", setup.as_secs_f64());

    let select1 = yardstick(&env, args.yardstick_queries).await;

    // Phase 1: logins (argon2id), on their own.
    let base = env.base.clone();
    let (login_lat, wall, tokens) = clients(args.clients, n, {
        let users = users.clone();
        move |http, i| {
            let (base, name) = (base.clone(), users[i].clone());
            async move {
                let t = Instant::now();
                let res = http
                    .post(format!("{base}/api/v1/login"))
                    .json(&json!({ "name": name, "password": PASSWORD }))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), 200, "login of {name}");
                let body: Value = res.json().await.unwrap();
                let lat = t.elapsed();
                let user = User {
                    name,
                    id: body["user"]["id"].as_str().unwrap().to_owned(),
                    token: body["token"].as_str().unwrap().to_owned(),
                };
                (vec![lat], user)
            }
        }
    })
    .await;
    let login_lat: Vec<Duration> = login_lat.into_iter().flatten().collect();
    let login = Stats::new(login_lat.clone(), wall);
    let users: Arc<Vec<User>> = Arc::new(tokens);
    eprintln!("{backend:?}: {n} logins in {:.1} s", wall.as_secs_f64());

    // Phase 2: allocate a ready desktop, then connect.
    let base = env.base.clone();
    let (lat, wall, got) = clients(args.clients, n, {
        let (users, warm) = (users.clone(), warm.clone());
        move |http, i| {
            let (base, user, warm) = (base.clone(), users[i].clone(), warm.clone());
            async move {
                let t = Instant::now();
                let desktop = allocate(&http, &base, &user, &warm).await;
                let allocated = t.elapsed();
                assert_eq!(desktop["state"], "in_use", "a ready desktop for {}", user.name);
                let got = connect(&http, &base, &user, i, desktop["id"].as_str().unwrap()).await;
                let both = t.elapsed();
                (vec![allocated, both - allocated, both], got)
            }
        }
    })
    .await;
    let column = |k: usize| lat.iter().map(|l| l[k]).collect::<Vec<_>>();
    let (ready_allocate, ready_connect, allocate_connect) =
        (Stats::new(column(0), wall), Stats::new(column(1), wall), Stats::new(column(2), wall));
    // Per user, end to end: their login plus their allocation and connect (separate phases).
    let whole = Stats::new(login_lat.iter().zip(&lat).map(|(l, ac)| *l + ac[2]).collect(), login.wall + wall);
    check(&env, &hosts, &users, &warm, &got).await;
    eprintln!("{backend:?}: {n} allocations + connects in {:.1} s, checked", wall.as_secs_f64());

    // Phase 3: allocations that provision; then the hosts start the desktops and users connect.
    let base = env.base.clone();
    let (lat, wall, desktops) = clients(args.clients, n, {
        let (users, cold) = (users.clone(), cold.clone());
        move |http, i| {
            let (base, user, cold) = (base.clone(), users[i].clone(), cold.clone());
            async move {
                let t = Instant::now();
                let desktop = allocate(&http, &base, &user, &cold).await;
                let lat = t.elapsed();
                assert_eq!(desktop["state"], "provisioning", "a new desktop for {}", user.name);
                (vec![lat], desktop["id"].as_str().unwrap().to_owned())
            }
        }
    })
    .await;
    let provision = Stats::new(lat.into_iter().flatten().collect(), wall);
    for host in &mut hosts {
        host.settle().await;
    }
    let base = env.base.clone();
    let desktops = Arc::new(desktops);
    let (_, _, got) = clients(args.clients, n, {
        let users = users.clone();
        move |http, i| {
            let (base, user, desktops) = (base.clone(), users[i].clone(), desktops.clone());
            async move { (vec![], connect(&http, &base, &user, i, &desktops[i]).await) }
        }
    })
    .await;
    check(&env, &hosts, &users, &cold, &got).await;
    eprintln!("{backend:?}: {n} provisioning allocations in {:.1} s, checked", wall.as_secs_f64());

    Report {
        backend,
        setup,
        login,
        allocate: ready_allocate,
        connect: ready_connect,
        allocate_connect,
        whole,
        provision,
        select1,
    }
}

/// `n` users (`user0000`…) in group `everyone`, all with the same password. The hash is made
/// once and copied: argon2id for every user would make the setup minutes long.
async fn create_users(env: &Env, n: usize) -> Vec<String> {
    let b = &env.broker;
    b.create_group(&system(), "everyone").await.unwrap();
    let names: Vec<String> = (0..n).map(|i| format!("user{i:04}")).collect();
    for (i, name) in names.iter().enumerate() {
        b.create_user(&system(), name, "", (i == 0).then_some(PASSWORD), false).await.unwrap();
        b.add_group_member(&system(), "everyone", name).await.unwrap();
    }
    sqlx::query(
        "UPDATE users SET password_hash = (SELECT password_hash FROM users WHERE name = $1) WHERE name <> $1",
    )
    .bind(&names[0])
    .execute(&b.db.pool)
    .await
    .unwrap();
    names
}

/// A floating pool of `max` desktops entitled to `everyone`.
async fn pool(env: &Env, name: &str, max: usize, spares: usize) -> String {
    let id = env.broker.create_pool(&system(), &spec(name, max, spares)).await.unwrap().id;
    env.broker.entitle(&system(), &id, PrincipalKind::Group, "everyone").await.unwrap();
    id
}

fn spec(name: &str, max: usize, spares: usize) -> PoolSpec {
    PoolSpec {
        name: name.into(),
        display_name: String::new(),
        kind: PoolKind::Floating,
        image: "debian".into(),
        min_size: 0,
        max_size: max as i64,
        spares: spares as i64,
        idle_timeout_secs: 3600,
        disconnect_timeout_secs: 3600,
        network: Default::default(),
        lock_on_disconnect: true,
        clipboard_to_guest: true,
        clipboard_from_guest: true,
        file_transfer: true,
        usb: "none".into(),
        usb_auto: "none".into(),
    }
}

/// `SELECT 1` through the broker's pool, one after another: the floor under every query.
async fn yardstick(env: &Env, queries: usize) -> Stats {
    let started = Instant::now();
    let mut lat = Vec::with_capacity(queries);
    for _ in 0..queries {
        let t = Instant::now();
        sqlx::query("SELECT 1").fetch_one(&env.broker.db.pool).await.unwrap();
        lat.push(t.elapsed());
    }
    Stats::new(lat, started.elapsed())
}

/// `clients` tasks, each with its own HTTP client, take the indices `0..n` from one shared
/// queue and run `job` on each. Returns the latencies and results by index, and the wall time.
async fn clients<F, Fut, T>(clients: usize, n: usize, job: F) -> (Vec<Vec<Duration>>, Duration, Vec<T>)
where
    F: Fn(reqwest::Client, usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = (Vec<Duration>, T)> + Send,
    T: Send + 'static,
{
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (next, job) = (next.clone(), job.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
                let mut done = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return done;
                    }
                    let (lat, result) = job(http.clone(), i).await;
                    done.push((i, lat, result));
                }
            })
        })
        .collect();
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await.expect("a client panicked"));
    }
    let wall = started.elapsed();
    all.sort_by_key(|(i, _, _)| *i);
    assert_eq!(all.len(), n);
    let (lat, results) = all.into_iter().map(|(_, l, r)| (l, r)).unzip();
    (lat, wall, results)
}

async fn allocate(http: &reqwest::Client, base: &str, user: &User, pool: &str) -> Value {
    let res = http
        .post(format!("{base}/api/v1/pools/{pool}/desktop"))
        .bearer_auth(&user.token)
        .send()
        .await
        .unwrap();
    let status = res.status();
    let body: Value = res.json().await.unwrap();
    assert_eq!(status, 200, "allocation for {}: {body}", user.name);
    assert_eq!(body["user_id"], user.id.as_str(), "the desktop is assigned to {}", user.name);
    body
}

async fn connect(http: &reqwest::Client, base: &str, user: &User, index: usize, desktop: &str) -> Got {
    let res = http
        .post(format!("{base}/api/v1/desktops/{desktop}/connect"))
        .bearer_auth(&user.token)
        .send()
        .await
        .unwrap();
    let status = res.status();
    let body: Value = res.json().await.unwrap();
    assert_eq!(status, 200, "connect of {} to {desktop}: {body}", user.name);
    Got {
        user: index,
        desktop: desktop.to_owned(),
        host_address: body["connection"]["host"].as_str().unwrap().to_owned(),
        ticket: body["connection"]["ticket"].as_str().unwrap().to_owned(),
    }
}

/// Every user got their own desktop of the pool, no desktop twice (in the answers and in the
/// database), and every ticket verifies against the broker's key for the desktop's host.
async fn check(env: &Env, hosts: &[HostDouble], users: &[User], pool: &str, got: &[Got]) {
    assert_eq!(got.len(), users.len());
    let distinct: HashSet<&str> = got.iter().map(|g| g.desktop.as_str()).collect();
    assert_eq!(distinct.len(), users.len(), "a desktop was given twice");
    let host_ids: HashMap<String, &str> =
        hosts.iter().map(|h| (format!("{}.example", h.name), h.reg.host_id.as_str())).collect();
    let key = PublicKey::from_base64(&hosts[0].reg.ticket_public_key).unwrap();
    assert_eq!(key, env.broker.ticket_public_key(), "hosts got the broker's key");
    let desktops: HashMap<String, _> = env
        .broker
        .list_desktops(&system())
        .await
        .unwrap()
        .into_iter()
        .filter(|d| d.pool_id == pool)
        .map(|d| (d.id.clone(), d))
        .collect();
    for g in got {
        let user = &users[g.user];
        let d = &desktops[&g.desktop];
        assert_eq!(d.user_id.as_deref(), Some(user.id.as_str()), "{} in the database", d.name);
        assert_eq!(d.state, DesktopState::InUse);
        let host = host_ids[&g.host_address];
        assert_eq!(d.host_id.as_deref(), Some(host));
        let claims = key.verify_stateless(&g.ticket, host, START + 1).expect("the ticket verifies");
        assert_eq!((claims.user.as_str(), claims.desktop.as_str()), (user.name.as_str(), d.id.as_str()));
    }
    let assigned: Vec<&str> = desktops.values().filter_map(|d| d.user_id.as_deref()).collect();
    let once: HashSet<&str> = assigned.iter().copied().collect();
    assert_eq!((assigned.len(), once.len()), (users.len(), users.len()), "one desktop per user in the pool");
}

fn print_table(args: &Args, reports: &[Report]) {
    println!();
    println!(
        "Broker allocation benchmark: {} users, {} concurrent HTTP clients, {} host doubles, 127.0.0.1 (plain HTTP)",
        args.users,
        args.clients,
        args.users.div_ceil(DESKTOPS_PER_HOST)
    );
    let mut header = format!("{:<34}", "per request, ms");
    let mut sub = format!("{:<34}", "");
    for r in reports {
        header.push_str(&cell(format!("{:?}", r.backend)));
        sub.push_str(&format!("| {:>6} {:>7} {:>7} {:>7} {:>8}  ", "/s", "p50", "p95", "p99", "max"));
    }
    println!("{header}\n{sub}");
    type Pick = fn(&Report) -> &Stats;
    let rows: [(&str, Pick, bool); 7] = [
        ("login (argon2id), separate phase", |r| &r.login, true),
        ("allocate, ready desktop", |r| &r.allocate, false),
        ("connect (ticket)", |r| &r.connect, false),
        ("allocate + connect", |r| &r.allocate_connect, true),
        ("per user: login + alloc + connect", |r| &r.whole, false),
        ("allocate, provisioning", |r| &r.provision, true),
        ("SELECT 1 (same pool, sequential)", |r| &r.select1, true),
    ];
    for (label, pick, rate) in rows {
        let mut line = format!("{label:<34}");
        for r in reports {
            let s = pick(r);
            let per_sec = if rate { format!("{:.0}", s.per_sec()) } else { "".into() };
            line.push_str(&format!(
                "| {per_sec:>6} {:>7.2} {:>7.2} {:>7.2} {:>8.2}  ",
                s.pct(50.0),
                s.pct(95.0),
                s.pct(99.0),
                s.max()
            ));
        }
        println!("{line}");
    }
    let mut line = format!("{:<34}", "allocate p50 / SELECT 1 p50");
    for r in reports {
        line.push_str(&cell(format!(
            "{:.0}x ready, {:.0}x provisioning",
            r.allocate.pct(50.0) / r.select1.pct(50.0),
            r.provision.pct(50.0) / r.select1.pct(50.0),
        )));
    }
    println!("{line}");
    let mut line = format!("{:<34}", "setup (users, 2 pools, desktops)");
    for r in reports {
        line.push_str(&cell(format!("{:.1} s", r.setup.as_secs_f64())));
    }
    println!("{line}");
}

/// One backend's column of the table.
fn cell(text: String) -> String {
    format!("| {text:<41}")
}
