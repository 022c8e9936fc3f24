//! Browser tests in headless Chromium (Playwright, `tests/browser/portal.mjs`): a user logs in,
//! gets a desktop and downloads a connection file whose ticket verifies against the broker's
//! key; an admin creates a pool and entitles a group. Screenshots land in
//! `<target>/artifacts/browser/`.
//!
//! Needs `/usr/bin/chromium` (`./dev deps`) and `tests/browser/node_modules` (`./dev test`
//! runs `npm ci` there; by hand: `npm ci --prefix broker/tests/browser`).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Backend, Env, HostDouble, START, system};
use pleiades_broker::model::{PoolKind, PrincipalKind};
use pleiades_protocol::connfile::Connection;
use pleiades_protocol::ticket::{PublicKey, TicketVerifier};
use serde_json::Value;

fn artifacts_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("artifacts/browser")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn portal_connect_and_admin_pool_in_chromium() {
    common::bounded(scenario()).await
}

async fn scenario() {
    let script_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(
        script_dir.join("node_modules/playwright-core").exists(),
        "playwright-core is not installed: run `./dev test` (it runs `npm ci`) or `npm ci --prefix broker/tests/browser`"
    );
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(Path::new(&chromium).exists(), "{chromium} is missing: run `./dev deps` (group chromium)");

    let env = Env::new(Backend::Sqlite).await;
    env.image("debian", 1024).await;
    let mut host = HostDouble::register(&env, "host-a", 8192, &["debian"]).await;
    let pool = env.pool("office", PoolKind::Floating, "debian", 4, 0).await;
    let mut spec = env.broker.pool(&pool).await.unwrap();
    spec.display_name = "Office desktops".into();
    env.broker
        .update_pool(
            &system(),
            &pool,
            &pleiades_broker::model::PoolSpec {
                name: spec.name.clone(),
                display_name: spec.display_name.clone(),
                kind: spec.kind,
                image: "debian".into(),
                min_size: 0,
                max_size: 4,
                spares: 0,
                idle_timeout_secs: 3600,
                disconnect_timeout_secs: 900,
                network: Default::default(),
            },
            true,
        )
        .await
        .unwrap();
    env.user("alice").await;
    env.admin("root").await;
    env.broker.create_group(&system(), "engineering").await.unwrap();
    env.broker.add_group_member(&system(), "engineering", "alice").await.unwrap();
    env.broker.entitle(&system(), &pool, PrincipalKind::Group, "engineering").await.unwrap();
    let key = PublicKey::from_base64(&host.reg.ticket_public_key).unwrap();
    let host_id = host.reg.host_id.clone();

    // The host double works in the background while the browser clicks.
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let ticker = tokio::spawn(async move {
        for _ in 0..2400 {
            host.tick().await;
            tokio::select! {
                _ = &mut stop_rx => break,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        host
    });

    let shots = artifacts_dir();
    let _ = std::fs::remove_dir_all(&shots);
    let work = tempfile::tempdir().unwrap();
    let result_file = work.path().join("result.json");
    let output = tokio::process::Command::new("node")
        .arg(script_dir.join("portal.mjs"))
        .current_dir(&script_dir)
        .env("BASE_URL", &env.base)
        .env("USER_NAME", "alice")
        .env("USER_PASSWORD", "alice-password")
        .env("ADMIN_NAME", "root")
        .env("ADMIN_PASSWORD", "root-password")
        .env("POOL_LABEL", "Office desktops")
        .env("IMAGE_NAME", "debian")
        .env("GROUP_NAME", "engineering")
        .env("SHOTS_DIR", &shots)
        .env("DOWNLOAD_DIR", work.path().join("downloads"))
        .env("RESULT_FILE", &result_file)
        .env("CHROMIUM", &chromium)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(240), output)
        .await
        .expect("browser run took over 4 minutes")
        .unwrap();
    let _ = stop_tx.send(());
    ticker.await.unwrap();
    let result: Value = serde_json::from_str(&std::fs::read_to_string(&result_file).unwrap_or_else(|_| {
        panic!(
            "no result from portal.mjs: {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    }))
    .unwrap();
    assert!(
        output.status.success() && result["ok"] == true,
        "portal.mjs failed: {result:#}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // The downloaded connection file parses, and its ticket verifies once on the right host.
    let file = std::fs::read_to_string(result["connection_file"].as_str().unwrap()).unwrap();
    let conn = Connection::from_toml(&file).unwrap();
    assert_eq!((conn.host.as_str(), conn.port), ("host-a.example", 4433));
    assert!(result["suggested_filename"].as_str().unwrap().ends_with(".pleiades"));
    let mut verifier = TicketVerifier::new(key, &host_id);
    let claims = verifier.verify(&conn.ticket, START + 1).unwrap();
    assert_eq!(claims.user, "alice");
    assert!(verifier.verify(&conn.ticket, START + 1).is_err(), "one-time");
    // The pleiades:// link carries the same connection.
    assert_eq!(Connection::from_uri(result["uri"].as_str().unwrap()).unwrap(), conn);

    // The admin's pool and entitlement are in the database.
    let design = env.broker.pool_by_name("design").await.unwrap();
    assert_eq!(
        (design.kind, design.max_size, design.spares, design.display_name.as_str()),
        (PoolKind::Persistent, 4, 1, "Design studio")
    );
    let ents = env.broker.entitlements(&design.id).await.unwrap();
    assert_eq!(ents.len(), 1);
    assert_eq!((ents[0].kind, ents[0].name.as_str()), (PrincipalKind::Group, "engineering"));
    assert!(
        result["entitlements"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e.as_str().unwrap().contains("engineering"))
    );
    let audit = env.broker.list_audit(&system(), 1000).await.unwrap();
    assert!(audit.iter().any(|e| e.actor == "root" && e.action == "pool.create" && e.target == "design"));
    assert!(audit.iter().any(|e| e.actor == "alice" && e.action == "desktop.connect"));
    for name in [
        "01-login",
        "02-portal-pools",
        "03-portal-desktop-ready",
        "04-connect",
        "05-admin-hosts",
        "07-admin-pool-entitled",
        "09-admin-audit",
    ] {
        assert!(shots.join(format!("{name}.png")).exists(), "screenshot {name}");
    }
}
