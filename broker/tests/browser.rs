//! Browser tests in headless Chromium (Playwright, `tests/browser/*.mjs`):
//! - `portal.mjs`: a user logs in, gets a desktop and downloads a connection file whose ticket
//!   verifies against the broker's key; an admin creates a pool and entitles a group;
//! - `directory.mjs`: directory (LDAP, a real slapd) users sign in; a directory group entitled
//!   in the admin console gives its members the pool.
//!
//! Screenshots land in `<target>/artifacts/browser/portal/` and `…/browser/directory/`.
//!
//! Needs `/usr/bin/chromium` (`./dev deps`) and `tests/browser/node_modules` (`./dev test`
//! runs `npm ci` there; by hand: `npm ci --prefix broker/tests/browser`).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::directory::{TestDirectory, password};
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

/// Whether the list `key` of a script's result has an entry containing `needle`.
fn lists(result: &Value, key: &str, needle: &str) -> bool {
    result[key]
        .as_array()
        .is_some_and(|entries| entries.iter().any(|e| e.as_str().is_some_and(|e| e.contains(needle))))
}

fn script_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// `node SCRIPT` against the broker of `env`, screenshots into `shots` (emptied first), its
/// result file in `work`. The caller adds the script's own variables.
fn browser_script(env: &Env, script: &str, shots: &Path, work: &Path) -> tokio::process::Command {
    let script_dir = script_dir();
    assert!(
        script_dir.join("node_modules/playwright-core").exists(),
        "playwright-core is not installed: run `./dev test` (it runs `npm ci`) or `npm ci --prefix broker/tests/browser`"
    );
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(Path::new(&chromium).exists(), "{chromium} is missing: run `./dev deps` (group chromium)");
    let _ = std::fs::remove_dir_all(shots);
    let mut node = tokio::process::Command::new("node");
    node.arg(script_dir.join(script))
        .current_dir(&script_dir)
        .env("BASE_URL", &env.base)
        .env("SHOTS_DIR", shots)
        .env("RESULT_FILE", work.join("result.json"))
        .env("CHROMIUM", &chromium)
        .kill_on_drop(true);
    node
}

/// Runs a browser script (at most 4 minutes) and returns its result, which must say `ok`.
async fn run_browser_script(node: &mut tokio::process::Command, script: &str, work: &Path) -> Value {
    let output = tokio::time::timeout(Duration::from_secs(240), node.output())
        .await
        .unwrap_or_else(|_| panic!("{script} took over 4 minutes"))
        .unwrap();
    let result: Value =
        serde_json::from_str(&std::fs::read_to_string(work.join("result.json")).unwrap_or_else(|_| {
            panic!(
                "no result from {script}: {}\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )
        }))
        .unwrap();
    assert!(
        output.status.success() && result["ok"] == true,
        "{script} failed: {result:#}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    result
}

async fn scenario() {
    // HTTPS as deployed: the broker asks every client for a certificate (hosts have one);
    // Chromium, with none, must go on without asking anything.
    let env = Env::over_tls(Backend::Sqlite).await;
    assert!(env.base.starts_with("https://"), "{}", env.base);
    env.image("debian", 1024).await;
    let mut host = HostDouble::register(&env, "host-a", 8192, &["debian"]).await;
    let pool = env.labelled_pool("office", "Office desktops", PoolKind::Floating, "debian", 4, 0).await;
    env.user("alice").await;
    env.admin("root").await;
    env.broker.create_group(&system(), "engineering").await.unwrap();
    env.broker.add_group_member(&system(), "engineering", "alice").await.unwrap();
    env.broker.entitle(&system(), &pool, PrincipalKind::Group, "engineering").await.unwrap();
    let key = PublicKey::from_base64(&host.reg.ticket_public_key).unwrap();
    let host_id = host.reg.host_id.clone();
    // Its desktops' guest agents report (the admin's pool page shows it).
    host.guest_idle = Some(5);

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

    let shots = artifacts_dir().join("portal");
    let work = tempfile::tempdir().unwrap();
    let mut node = browser_script(&env, "portal.mjs", &shots, work.path());
    node.env("USER_NAME", "alice")
        .env("USER_PASSWORD", "alice-password")
        .env("ADMIN_NAME", "root")
        .env("ADMIN_PASSWORD", "root-password")
        .env("POOL_LABEL", "Office desktops")
        .env("IMAGE_NAME", "debian")
        .env("GROUP_NAME", "engineering")
        .env("POOL_URL", env.url(&format!("/admin/pools/{pool}")))
        .env("DOWNLOAD_DIR", work.path().join("downloads"));
    let result = run_browser_script(&mut node, "portal.mjs", work.path()).await;
    let _ = stop_tx.send(());
    ticker.await.unwrap();

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
    assert_eq!(
        (design.clipboard_to_guest, design.clipboard_from_guest),
        (true, false),
        "the form's clipboard switches"
    );
    assert!(!design.file_transfer, "the form's file-transfer switch");
    assert_eq!(
        (&result["form_file_transfer"], &result["form_clipboard_from_guest"]),
        (&false.into(), &false.into()),
        "the pool's page shows the switches as stored"
    );
    let row = result["pool_rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .find(|r| r.starts_with("Design studio"))
        .unwrap_or_else(|| panic!("the pool list shows the pool: {}", result["pool_rows"]));
    assert!(row.contains("client → desktop only off"), "clipboard, then file transfer: {row}");
    assert!(row.contains("off class=03,0525:a4a5"), "file transfer, then USB: {row}");
    assert_eq!(design.usb, "class=03,0525:a4a5", "the form's USB policy, as the policy writes itself");
    assert_eq!(result["form_usb"], "class=03,0525:a4a5", "the pool's page shows the policy as stored");
    let stored: (i64,) = sqlx::query_as("SELECT file_transfer FROM pools WHERE name = 'design'")
        .fetch_one(&env.broker.db.pool)
        .await
        .unwrap();
    assert_eq!(stored.0, 0);
    let ents = env.broker.entitlements(&design.id).await.unwrap();
    assert_eq!(ents.len(), 1);
    assert_eq!((ents[0].kind, ents[0].name.as_str()), (PrincipalKind::Group, "engineering"));
    assert!(lists(&result, "entitlements", "engineering"), "{}", result["entitlements"]);
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
        "10-admin-pool-desktops",
    ] {
        assert!(shots.join(format!("{name}.png")).exists(), "screenshot {name}");
    }
    // The pool's desktop list shows what Alice's guest agent reported.
    assert!(
        lists(&result, "desktop_rows", "alice on desk")
            && lists(&result, "desktop_rows", "active · idle 5 s")
            && lists(&result, "desktop_rows", "10.0.2.15/24")
            && lists(&result, "desktop_rows", "Linux · agent 0.1.0"),
        "{}",
        result["desktop_rows"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn directory_sign_in_in_chromium() {
    common::bounded(directory_scenario()).await
}

async fn directory_scenario() {
    let Some(dir) = TestDirectory::start("directory_sign_in_in_chromium") else { return };
    let env = Env::with_directory(Backend::Sqlite, dir.directory()).await;
    env.image("debian", 1024).await;
    let pool = env.labelled_pool("office", "Office desktops", PoolKind::Floating, "debian", 4, 0).await;
    env.admin("root").await;

    let shots = artifacts_dir().join("directory");
    let work = tempfile::tempdir().unwrap();
    let mut node = browser_script(&env, "directory.mjs", &shots, work.path());
    node.env("ADMIN_NAME", "root")
        .env("ADMIN_PASSWORD", "root-password")
        .env("POOL_URL", env.url(&format!("/admin/pools/{pool}")))
        .env("POOL_LABEL", "Office desktops")
        .env("GROUP_NAME", "engineering")
        .env("MEMBER_NAME", "alice")
        .env("MEMBER_PASSWORD", password("alice"))
        .env("OUTSIDER_NAME", "bob")
        .env("OUTSIDER_PASSWORD", password("bob"));
    let result = run_browser_script(&mut node, "directory.mjs", work.path()).await;

    // What the pages showed.
    assert!(lists(&result, "entitlements", "engineering"), "{}", result["entitlements"]);
    assert_eq!(result["wrong_password"], "User name or password is wrong.");
    assert_eq!(result["member_pools"], serde_json::json!(["Get a desktop from Office desktops"]));
    assert!(result["member_header"].as_str().unwrap().contains("alice"), "{}", result["member_header"]);
    assert_eq!(result["outsider_pools"], 0);
    assert!(result["outsider_text"].as_str().unwrap().contains("No pool is available to you"));
    let rows = |key: &str| -> Vec<String> {
        result[key].as_array().unwrap().iter().map(|r| r.as_str().unwrap().to_owned()).collect()
    };
    assert!(
        rows("user_rows")
            .iter()
            .any(|r| r.contains("alice") && r.contains("Alice Liddell") && r.ends_with("ldap")),
        "{:?}",
        rows("user_rows")
    );
    assert!(
        rows("group_rows")
            .iter()
            .any(|r| r.starts_with("engineering") && r.contains("alice") && r.ends_with("ldap")),
        "{:?}",
        rows("group_rows")
    );
    // ... and the database agrees.
    let users = env.broker.list_users(&system()).await.unwrap();
    let sources: Vec<(&str, &str)> = users.iter().map(|u| (u.name.as_str(), u.source.as_str())).collect();
    assert_eq!(sources, [("alice", "ldap"), ("bob", "ldap"), ("root", "local")]);
    for name in [
        "d1-admin-entitles-directory-group",
        "d2-directory-wrong-password",
        "d3-directory-member-portal",
        "d4-directory-outsider-portal",
        "d5-admin-users-and-groups",
    ] {
        assert!(shots.join(format!("{name}.png")).exists(), "screenshot {name}");
    }
}
