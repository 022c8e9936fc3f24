//! Every authorization failure, over real HTTP, on SQLite and PostgreSQL: missing or wrong
//! credentials, users on admin endpoints, other users' desktops, pools without entitlement,
//! CSRF, cross-origin posts, login rate limits, expired sessions, host credentials, and over
//! HTTPS the hosts' pinned client certificates.

mod common;

use common::{Backend, Browser, ClientCert, Env, HostDouble, browser_login, host_token, system};
use pleiades_broker::broker::{HostRegistered, Transport};
use pleiades_broker::model::HostTokenSpec;
use pleiades_broker::model::PoolKind;
use reqwest::StatusCode;
use serde_json::{Value, json};

on_both_databases!(
    api_authorization,
    web_sessions_and_csrf,
    host_api_authorization,
    host_names_cannot_be_taken_over,
    stolen_host_credentials_need_the_host_certificate,
    registration_over_https_takes_a_client_certificate,
    a_pinned_host_registers_again_only_with_its_certificate,
    login_rate_limits,
    parallel_password_guessing_is_bounded,
    a_new_password_ends_the_old_sessions,
    old_rows_are_pruned,
    a_host_cannot_claim_impossible_capacity,
    registration_flooding_is_bounded,
    secrets_stay_out_of_logs_and_audit,
    ticket_key_stays_out_of_the_database,
    tickets_do_not_outlive_a_recycle
);

/// Pool "office" entitled to alice only, with alice's desktop running on a host.
async fn setup(env: &Env) -> (String, String, HostDouble) {
    env.image("debian", 1024).await;
    let mut host = HostDouble::register(env, "host-a", 8192, &["debian"]).await;
    let pool = env.pool("office", PoolKind::Floating, "debian", 3, 0).await;
    let (_, alice) = env.user("alice").await;
    env.user("mallory").await;
    env.admin("root").await;
    env.entitle_user(&pool, "alice").await;
    let d = env.broker.request_desktop(&alice, &pool).await.unwrap();
    host.settle().await;
    (pool, d.id, host)
}

async fn api_authorization(backend: Backend) {
    let env = Env::new(backend).await;
    let (pool, desktop, _host) = setup(&env).await;
    let alice = env.api_login("alice").await;
    let mallory = env.api_login("mallory").await;
    let root = env.api_login("root").await;
    let get = |path: &str, token: Option<&str>| {
        let mut r = env.http.get(env.url(path));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    // No credentials, a made-up token.
    for path in ["/api/v1/me", "/api/v1/desktops", "/api/v1/pools", "/api/v1/admin/users"] {
        assert_eq!(get(path, None).await.unwrap().status(), 401, "{path}");
        assert_eq!(get(path, Some("forged")).await.unwrap().status(), 401, "{path}");
    }
    // Users on admin endpoints; admins get through.
    for path in [
        "/api/v1/admin/users",
        "/api/v1/admin/groups",
        "/api/v1/admin/images",
        "/api/v1/admin/pools",
        "/api/v1/admin/hosts",
        "/api/v1/admin/desktops",
        "/api/v1/admin/sessions",
        "/api/v1/admin/audit",
    ] {
        assert_eq!(get(path, Some(&alice)).await.unwrap().status(), 403, "{path}");
        assert_eq!(get(path, Some(&root)).await.unwrap().status(), 200, "{path}");
    }
    let post = |path: &str, token: &str, body: Value| {
        env.http.post(env.url(path)).bearer_auth(token).json(&body).send()
    };
    for (path, body) in [
        ("/api/v1/admin/users", json!({"name": "eve", "password": "12345678"})),
        ("/api/v1/admin/groups", json!({"name": "g"})),
        ("/api/v1/admin/pools", json!({"name": "p", "kind": "floating", "image": "debian", "max_size": 1})),
        (&format!("/api/v1/admin/pools/{pool}/entitlements"), json!({"kind": "user", "name": "mallory"})),
        ("/api/v1/admin/host-tokens", json!({"name": "h9"})),
    ] {
        assert_eq!(post(path, &alice, body).await.unwrap().status(), 403, "{path}");
    }
    // Mallory: not entitled, not her desktop.
    assert_eq!(
        post(&format!("/api/v1/pools/{pool}/desktop"), &mallory, json!({})).await.unwrap().status(),
        403
    );
    for action in ["connect", "restart", "release"] {
        let path = format!("/api/v1/desktops/{desktop}/{action}");
        assert_eq!(post(&path, &mallory, json!({})).await.unwrap().status(), 403, "{path}");
        // Not even an admin gets a ticket for someone else's desktop.
        assert_eq!(post(&path, &root, json!({})).await.unwrap().status(), 403, "{path}");
        assert_eq!(
            post(&format!("/api/v1/desktops/nope/{action}"), &mallory, json!({})).await.unwrap().status(),
            403
        );
    }
    let pools: Value = get("/api/v1/pools", Some(&mallory)).await.unwrap().json().await.unwrap();
    assert_eq!(pools, json!([]));
    let desktops: Value = get("/api/v1/desktops", Some(&mallory)).await.unwrap().json().await.unwrap();
    assert_eq!(desktops, json!([]));
    // Alice does get her ticket.
    let res = post(&format!("/api/v1/desktops/{desktop}/connect"), &alice, json!({})).await.unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert!(body["uri"].as_str().unwrap().starts_with("pleiades://host-a.example:4433/?ticket=pt1."));
    // Denials are audited.
    let audit = env.broker.list_audit(&system(), 1000).await.unwrap();
    assert!(audit.iter().any(|e| e.actor == "mallory" && e.action == "desktop.connect.denied"));
    assert!(audit.iter().any(|e| e.actor == "mallory" && e.action == "desktop.request.denied"));
    // Expired tokens stop working; logged-out tokens too.
    let res = env.http.post(env.url("/api/v1/logout")).bearer_auth(&mallory).send().await.unwrap();
    assert_eq!(res.status(), 204);
    assert_eq!(get("/api/v1/me", Some(&mallory)).await.unwrap().status(), 401);
    env.clock.advance(env.broker.settings.api_token_secs + 1);
    assert_eq!(get("/api/v1/me", Some(&alice)).await.unwrap().status(), 401);
}

async fn web_sessions_and_csrf(backend: Backend) {
    let env = Env::new(backend).await;
    let (pool, desktop, _host) = setup(&env).await;
    // Pages need a session.
    for path in ["/", "/admin/hosts", "/admin/pools", "/admin/audit"] {
        let res = env.http.get(env.url(path)).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::SEE_OTHER, "{path}");
        assert_eq!(res.headers()["location"], "/login");
    }
    // Login without the login-CSRF cookie is refused.
    let res = env
        .http
        .post(env.url("/login"))
        .form(&[("csrf", "x"), ("name", "alice"), ("password", "alice-password")])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    let alice = browser_login(&env, "alice").await;
    let mallory = browser_login(&env, "mallory").await;
    let post = |b: &Browser, path: &str, csrf: Option<&str>| {
        let mut form = vec![];
        if let Some(c) = csrf {
            form.push(("csrf", c.to_owned()));
        }
        env.http.post(env.url(path)).header("cookie", &b.cookie).form(&form).send()
    };
    let connect = format!("/desktops/{desktop}/connect");
    // No CSRF token, a wrong one, another session's one.
    assert_eq!(post(&alice, &connect, None).await.unwrap().status(), 403);
    assert_eq!(post(&alice, &connect, Some("wrong")).await.unwrap().status(), 403);
    assert_eq!(post(&alice, &connect, Some(&mallory.csrf)).await.unwrap().status(), 403);
    // The right one works and the page carries the connection.
    let res = post(&alice, &connect, Some(&alice.csrf)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.text().await.unwrap().contains("pleiades://host-a.example:4433/?ticket=pt1."));
    // Cross-origin: refused even with the token.
    let res = env
        .http
        .post(env.url(&connect))
        .header("cookie", &alice.cookie)
        .header("origin", "https://evil.example")
        .form(&[("csrf", alice.csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    // Mallory, with her own valid token, on Alice's desktop and pool, and on admin pages.
    assert_eq!(post(&mallory, &connect, Some(&mallory.csrf)).await.unwrap().status(), 403);
    assert_eq!(
        post(&mallory, &format!("/desktops/{desktop}/restart"), Some(&mallory.csrf)).await.unwrap().status(),
        403
    );
    assert_eq!(
        post(&mallory, &format!("/pools/{pool}/desktop"), Some(&mallory.csrf)).await.unwrap().status(),
        403
    );
    for path in
        ["/admin/hosts", "/admin/images", "/admin/pools", "/admin/users", "/admin/sessions", "/admin/audit"]
    {
        let res = env.http.get(env.url(path)).header("cookie", &mallory.cookie).send().await.unwrap();
        assert_eq!(res.status(), 403, "{path}");
    }
    assert_eq!(post(&mallory, "/admin/pools", Some(&mallory.csrf)).await.unwrap().status(), 403);
    // The API through a session cookie needs the CSRF header.
    let res = env
        .http
        .post(env.url(&format!("/api/v1/desktops/{desktop}/connect")))
        .header("cookie", &alice.cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    let res = env
        .http
        .post(env.url(&format!("/api/v1/desktops/{desktop}/connect")))
        .header("cookie", &alice.cookie)
        .header("x-csrf-token", &alice.csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    // A session cookie is not a bearer token.
    let token = alice.cookie.split_once('=').unwrap().1;
    assert_eq!(env.http.get(env.url("/api/v1/me")).bearer_auth(token).send().await.unwrap().status(), 401);
    // Logout ends the session.
    let res = post(&alice, "/logout", Some(&alice.csrf)).await.unwrap();
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        env.http.get(env.url("/")).header("cookie", &alice.cookie).send().await.unwrap().status(),
        StatusCode::SEE_OTHER
    );
    // Sessions expire.
    env.clock.advance(env.broker.settings.web_session_secs + 1);
    assert_eq!(
        env.http.get(env.url("/")).header("cookie", &mallory.cookie).send().await.unwrap().status(),
        StatusCode::SEE_OTHER
    );
}

async fn host_api_authorization(backend: Backend) {
    let env = Env::new(backend).await;
    let (_, _, host) = setup(&env).await;
    let beat = json!({"cores": 1, "memory_mib": 1024});
    // No credential, a user token, a forged credential.
    let alice = env.api_login("alice").await;
    for auth in [None, Some(alice.as_str()), Some("hcr_forged")] {
        let mut r = env.http.post(env.url("/api/v1/hosts/heartbeat")).json(&beat);
        if let Some(a) = auth {
            r = r.bearer_auth(a);
        }
        assert_eq!(r.send().await.unwrap().status(), 401, "{auth:?}");
    }
    // A host credential is no user token.
    assert_eq!(
        env.http.get(env.url("/api/v1/me")).bearer_auth(&host.reg.credential).send().await.unwrap().status(),
        401
    );
    // Registration: a wrong token, a spent one-time token, an expired token.
    let reg = |token: &str, name: &str| {
        env.http
            .post(env.url("/api/v1/hosts/register"))
            .json(&json!({"token": token, "name": name, "address": "10.0.0.9", "session_port": 4433, "cores": 4, "memory_mib": 4096}))
            .send()
    };
    assert_eq!(reg("hrt_wrong", "h1").await.unwrap().status(), 401);
    let token = |name: &str, one_time: bool, replace: bool| {
        make_token(&env, HostTokenSpec { one_time, replace, lifetime_secs: 60, ..host_token(name) })
    };
    let once = token("h1", true, false).await;
    assert_eq!(reg(&once, "h2").await.unwrap().status(), 401, "a token registers its own name only");
    assert_eq!(reg(&once, "h1").await.unwrap().status(), 201);
    assert_eq!(reg(&once, "h1").await.unwrap().status(), 401, "spent");
    // A reusable replacement token: the same name again and again, never another.
    let reusable = token("h3", false, true).await;
    assert_eq!(reg(&reusable, "h3").await.unwrap().status(), 201);
    assert_eq!(reg(&reusable, "h3").await.unwrap().status(), 201);
    assert_eq!(reg(&reusable, "h4").await.unwrap().status(), 401);
    env.clock.advance(61);
    assert_eq!(reg(&reusable, "h3").await.unwrap().status(), 401, "expired");
    // Acknowledging another host's command.
    let other = HostDouble::register(&env, "host-b", 8192, &["debian"]).await;
    let (_, bob) = env.user("bob").await;
    let pool = env.broker.pool_by_name("office").await.unwrap();
    env.entitle_user(&pool.id, "bob").await;
    let d = env.broker.request_desktop(&bob, &pool.id).await.unwrap();
    let owner = if d.host_id.as_deref() == Some(host.reg.host_id.as_str()) { &host } else { &other };
    let thief = if std::ptr::eq(owner, &host) { &other } else { &host };
    let reply: Value = env
        .http
        .post(env.url("/api/v1/hosts/heartbeat"))
        .bearer_auth(&owner.reg.credential)
        .json(&beat)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = reply["commands"][0]["id"].as_str().unwrap();
    let res = env
        .http
        .post(env.url(&format!("/api/v1/hosts/commands/{id}/ack")))
        .bearer_auth(&thief.reg.credential)
        .json(&json!({"ok": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
}

async fn make_token(env: &Env, spec: HostTokenSpec) -> String {
    env.broker.create_host_token(&system(), &spec).await.unwrap()
}

/// The host row of `name`: (id, address, cert_sha256, credential_hash).
async fn host_row(env: &Env, name: &str) -> (String, String, String, String) {
    use sqlx::Row as _;
    let row = sqlx::query("SELECT id, address, cert_sha256, credential_hash FROM hosts WHERE name = $1")
        .bind(name)
        .fetch_one(&env.broker.db.pool)
        .await
        .unwrap();
    (row.get("id"), row.get("address"), row.get("cert_sha256"), row.get("credential_hash"))
}

/// Security review finding: a registration token made for a new machine registered under an
/// existing host's name, and the broker gave the intruder that host's identity (same id, its
/// address and certificate replaced, the real host's credential revoked).
async fn host_names_cannot_be_taken_over(backend: Backend) {
    let env = Env::new(backend).await;
    let (_, _, mut host) = setup(&env).await;
    let other = HostDouble::register(&env, "host-b", 8192, &["debian"]).await;
    let before = host_row(&env, "host-a").await;
    let register = |body: Value| env.http.post(env.url("/api/v1/hosts/register")).json(&body).send();
    let as_host_a = |token: &str, credential: Option<&str>, address: &str| {
        json!({"token": token, "credential": credential, "name": "host-a", "address": address,
               "session_port": 4433, "cert_sha256": "ee".repeat(32), "cores": 4, "memory_mib": 4096})
    };
    let token = |name: &str, one_time: bool, replace: bool| {
        make_token(&env, HostTokenSpec { one_time, replace, ..host_token(name) })
    };
    // Fresh tokens made for other machines, one-time and reusable (even a replacement token
    // for another name), a token made for host-a that does not replace it, a wrong credential.
    for (what, token, credential, status) in [
        ("a new machine's token", token("host-new", true, false).await, None, 401),
        ("a fleet's reusable token", token("host-fleet", false, false).await, None, 401),
        ("another host's replacement token", token("host-b", true, true).await, None, 401),
        ("a token for host-a without --replace", token("host-a", true, false).await, None, 409),
        ("a forged credential", String::new(), Some("hcr_forged"), 401),
        ("another host's credential", String::new(), Some(other.reg.credential.as_str()), 401),
    ] {
        let res = register(as_host_a(&token, credential, "evil.example")).await.unwrap();
        assert_eq!(res.status(), status, "{what}");
        // The real host keeps its identity and its credential, and still works.
        assert_eq!(host_row(&env, "host-a").await, before, "{what}");
        host.tick().await;
    }
    let audit = env.broker.list_audit(&system(), 100).await.unwrap();
    assert_eq!(audit.iter().filter(|e| e.action == "host.register.denied").count(), 6);

    // The host itself re-registers with its credential (a new address, say): same id, and its
    // credential stays valid.
    let res = register(as_host_a("", Some(&host.reg.credential), "host-a.new.example")).await.unwrap();
    assert_eq!(res.status(), 201);
    let again: HostRegistered = res.json().await.unwrap();
    assert_eq!((&again.host_id, &again.credential), (&host.reg.host_id, &host.reg.credential));
    let (id, address, _, hash) = host_row(&env, "host-a").await;
    assert_eq!((id, address.as_str(), hash), (before.0.clone(), "host-a.new.example", before.3.clone()));
    host.tick().await;

    // An admin replaces the host (a reinstalled machine): a token made with --replace gives the
    // new machine host-a's id, and the old credential stops working.
    let replace = token("host-a", true, true).await;
    let res = register(as_host_a(&replace, None, "host-a.reinstalled.example")).await.unwrap();
    assert_eq!(res.status(), 201);
    let replaced: HostRegistered = res.json().await.unwrap();
    assert_eq!(replaced.host_id, host.reg.host_id);
    assert_ne!(replaced.credential, host.reg.credential);
    let beat = json!({"cores": 4, "memory_mib": 4096});
    let heartbeat = |credential: String| {
        env.http.post(env.url("/api/v1/hosts/heartbeat")).bearer_auth(credential).json(&beat).send()
    };
    assert_eq!(heartbeat(host.reg.credential.clone()).await.unwrap().status(), 401);
    assert_eq!(heartbeat(replaced.credential.clone()).await.unwrap().status(), 200);
    assert_eq!(host_row(&env, "host-a").await.1, "host-a.reinstalled.example");
}

/// The pinned client certificate of `name` (`hosts.client_cert_sha256`).
async fn host_pin(env: &Env, name: &str) -> Option<String> {
    sqlx::query_scalar("SELECT client_cert_sha256 FROM hosts WHERE name = $1")
        .bind(name)
        .fetch_one(&env.broker.db.pool)
        .await
        .unwrap()
}

/// A refusal's status and message (`{"error": …}`).
async fn refusal(res: reqwest::Response) -> (StatusCode, String) {
    let status = res.status();
    let body: Value = res.json().await.unwrap_or_default();
    (status, body["error"].as_str().unwrap_or_default().to_owned())
}

/// Security review finding: a host's credential alone (copied off the machine, out of a backup
/// or a log) let anyone act as that host: take its commands, report its desktops gone, ack
/// starts it never made. Over HTTPS a host's credential now works only over a connection that
/// presents the client certificate the host registered with.
async fn stolen_host_credentials_need_the_host_certificate(backend: Backend) {
    let env = Env::over_tls(backend).await;
    let (_, desktop, mut host) = setup(&env).await;
    // A user's API works over the same HTTPS port without any client certificate.
    let alice = env.api_login("alice").await;
    let restart = env
        .http
        .post(env.url(&format!("/api/v1/desktops/{desktop}/restart")))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(restart.status(), 202);
    let beat = json!({"cores": 8, "memory_mib": 8192, "images": ["debian"], "desktops": []});
    let thieves = [
        ("no client certificate", env.client(None)),
        ("a certificate of its own", env.client(Some(&ClientCert::generate()))),
    ];
    let mut refused = 0;
    for (what, thief) in &thieves {
        let res = thief
            .post(env.url("/api/v1/hosts/heartbeat"))
            .bearer_auth(&host.reg.credential)
            .json(&beat)
            .send()
            .await
            .unwrap();
        let (status, message) = refusal(res).await;
        eprintln!("refused: a heartbeat with host-a's stolen credential and {what}: {status}: {message}");
        assert_eq!(status, StatusCode::FORBIDDEN, "{what}");
        assert!(
            message.contains("pinned TLS client certificate") && message.contains("--replace"),
            "{message}"
        );
        let res = thief
            .post(env.url("/api/v1/hosts/commands/c-anything/ack"))
            .bearer_auth(&host.reg.credential)
            .json(&json!({"ok": false, "error": "stolen"}))
            .send()
            .await
            .unwrap();
        let (status, message) = refusal(res).await;
        eprintln!(
            "refused: an acknowledgement with host-a's stolen credential and {what}: {status}: {message}"
        );
        assert_eq!(status, StatusCode::FORBIDDEN, "{what}");
        refused += 2;
    }
    // The thieves took nothing: the real host gets the restart, and its desktop still runs.
    assert_eq!(host.tick().await, 1, "the restart command waited for the real host");
    assert_eq!(host.commands_seen.last().map(|(kind, _)| kind.as_str()), Some("restart"));
    host.settle().await;
    let d = env.broker.list_desktops(&system()).await.unwrap();
    assert_eq!(d.iter().find(|d| d.id == desktop).map(|d| d.state.as_str()), Some("in_use"));
    let pinned = host_pin(&env, "host-a").await;
    assert_eq!(
        pinned.as_deref(),
        Some(host.cert.as_ref().unwrap().sha256.as_str()),
        "registration pinned it"
    );
    eprintln!(
        "stolen host credential: {refused} requests from {} other clients refused, the host went on",
        thieves.len()
    );
}

/// Over HTTPS, registration takes the host's client certificate (what the broker pins); a
/// registration without one is refused and its token is not spent.
async fn registration_over_https_takes_a_client_certificate(backend: Backend) {
    let env = Env::over_tls(backend).await;
    let token = make_token(&env, host_token("host-new")).await;
    let body = json!({"token": token, "name": "host-new", "address": "host-new.example", "session_port": 4433,
                      "cert_sha256": "", "cores": 4, "memory_mib": 4096});
    let res = env.client(None).post(env.url("/api/v1/hosts/register")).json(&body).send().await.unwrap();
    let (status, message) = refusal(res).await;
    eprintln!("refused: a registration over HTTPS without a client certificate: {status}: {message}");
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(message.contains("client certificate"), "{message}");
    let hosts: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM hosts").fetch_one(&env.broker.db.pool).await.unwrap();
    assert_eq!(hosts, 0);
    let audit = env.broker.list_audit(&system(), 100).await.unwrap();
    assert!(
        audit
            .iter()
            .any(|e| e.action == "host.register.denied" && e.detail.contains("no client certificate")),
        "audited"
    );
    // The same token with a certificate: registered, that certificate pinned.
    let cert = ClientCert::generate();
    let res =
        env.client(Some(&cert)).post(env.url("/api/v1/hosts/register")).json(&body).send().await.unwrap();
    assert_eq!(res.status(), 201, "the refused token was not spent");
    assert_eq!(host_pin(&env, "host-new").await, Some(cert.sha256.clone()));
}

/// A pinned host registers again with its credential only from its own certificate; a new
/// certificate takes a replacement token, which moves the pin (and the credential) to it.
async fn a_pinned_host_registers_again_only_with_its_certificate(backend: Backend) {
    let env = Env::over_tls(backend).await;
    let (_, _, mut host) = setup(&env).await;
    let before = host_row(&env, "host-a").await;
    let pinned = host_pin(&env, "host-a").await;
    let again = |credential: &str, address: &str| {
        json!({"token": "", "credential": credential, "name": "host-a", "address": address,
               "session_port": 4433, "cert_sha256": "ee".repeat(32), "cores": 4, "memory_mib": 4096})
    };
    for (what, client) in [
        ("another certificate", env.client(Some(&ClientCert::generate()))),
        ("no certificate", env.client(None)),
    ] {
        let res = client
            .post(env.url("/api/v1/hosts/register"))
            .json(&again(&host.reg.credential, "evil.example"))
            .send()
            .await
            .unwrap();
        let (status, message) = refusal(res).await;
        eprintln!("refused: host-a's credential registering again with {what}: {status}: {message}");
        assert_eq!(status, StatusCode::FORBIDDEN, "{what}");
        assert!(message.contains("client certificate"), "{message}");
        assert_eq!(
            (host_row(&env, "host-a").await, host_pin(&env, "host-a").await),
            (before.clone(), pinned.clone())
        );
        host.tick().await;
    }
    // The host itself, from its certificate: accepted, same credential, same pin.
    let res = host
        .http
        .post(env.url("/api/v1/hosts/register"))
        .json(&again(&host.reg.credential, "host-a.new.example"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(host_pin(&env, "host-a").await, pinned);
    assert_eq!(host_row(&env, "host-a").await.1, "host-a.new.example");
    // A reinstalled machine with a new identity: an admin's replacement token pins it.
    let fresh = ClientCert::generate();
    let replace = make_token(&env, HostTokenSpec { replace: true, ..host_token("host-a") }).await;
    let res = env
        .client(Some(&fresh))
        .post(env.url("/api/v1/hosts/register"))
        .json(&json!({"token": replace, "name": "host-a", "address": "host-a.reinstalled.example",
                      "session_port": 4433, "cert_sha256": "ee".repeat(32), "cores": 4, "memory_mib": 4096}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let replaced: HostRegistered = res.json().await.unwrap();
    assert_eq!(host_pin(&env, "host-a").await, Some(fresh.sha256.clone()));
    let beat = json!({"cores": 4, "memory_mib": 4096});
    let heartbeat = |client: reqwest::Client, credential: String| {
        let url = env.url("/api/v1/hosts/heartbeat");
        let beat = beat.clone();
        async move { client.post(url).bearer_auth(credential).json(&beat).send().await.unwrap().status() }
    };
    assert_eq!(heartbeat(host.http.clone(), host.reg.credential.clone()).await, 401, "the old credential");
    assert_eq!(heartbeat(host.http.clone(), replaced.credential.clone()).await, 403, "the old certificate");
    assert_eq!(heartbeat(env.client(Some(&fresh)), replaced.credential.clone()).await, 200);

    // A host registered before pins (NULL) is known by its credential alone, and registering
    // again with it does not pin anything: a pin takes a replacement token.
    sqlx::query("UPDATE hosts SET client_cert_sha256 = NULL WHERE name = 'host-a'")
        .execute(&env.broker.db.pool)
        .await
        .unwrap();
    assert_eq!(
        heartbeat(env.client(None), replaced.credential.clone()).await,
        200,
        "unpinned: credential alone"
    );
    let res = env
        .client(Some(&ClientCert::generate()))
        .post(env.url("/api/v1/hosts/register"))
        .json(&again(&replaced.credential, "host-a.reinstalled.example"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(host_pin(&env, "host-a").await, None, "no pin without a replacement token");
}

async fn login_rate_limits(backend: Backend) {
    let env = Env::new(backend).await;
    env.user("alice").await;
    env.user("bob").await;
    let login = |name: &str, password: &str| {
        env.http.post(env.url("/api/v1/login")).json(&json!({"name": name, "password": password})).send()
    };
    for _ in 0..5 {
        assert_eq!(login("alice", "wrong-password").await.unwrap().status(), 401);
    }
    // Locked: even the right password is refused for this user name, for the window.
    assert_eq!(login("alice", "alice-password").await.unwrap().status(), 429);
    assert_eq!(login("bob", "bob-password").await.unwrap().status(), 200);
    env.clock.advance(env.broker.settings.login_window_secs + 1);
    assert_eq!(login("alice", "alice-password").await.unwrap().status(), 200);
    // Per address: 30 attempts per window, whatever the names.
    let mut limited = false;
    for i in 0..40 {
        if login(&format!("nobody{i}"), "x").await.unwrap().status() == 429 {
            limited = true;
            break;
        }
    }
    assert!(limited, "per-address limit");
    let audit = env.broker.list_audit(&system(), 1000).await.unwrap();
    assert!(audit.iter().filter(|e| e.action == "login.failed").count() >= 5);
}

/// Issue #14's password-guessing burst: 50 guesses for Alice at once from one address. Only
/// the per-source limit's worth reach the password check (the attempt counts before the check,
/// not after); the rest are turned away; the guesser's address is locked out of the name, while
/// Alice, from her own address, still signs in.
async fn parallel_password_guessing_is_bounded(backend: Backend) {
    use pleiades_broker::error::Error;
    let env = Env::new(backend).await;
    env.user("alice").await;
    let started = std::time::Instant::now();
    let guesses: Vec<_> = (0..50)
        .map(|i| {
            let broker = env.broker.clone();
            tokio::spawn(async move { broker.login("alice", &format!("guess-{i}"), "192.0.2.1").await })
        })
        .collect();
    let (mut checked, mut limited) = (0, 0);
    for guess in guesses {
        match guess.await.unwrap() {
            Err(Error::Unauthenticated) => checked += 1,
            Err(Error::RateLimited) => limited += 1,
            other => panic!("{other:?}"),
        }
    }
    eprintln!(
        "50 parallel guesses: {checked} checked, {limited} turned away, in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(checked, env.broker.settings.login_failures_per_user as usize);
    assert_eq!(limited, 50 - checked);
    assert!(matches!(
        env.broker.login("alice", "alice-password", "192.0.2.1").await,
        Err(Error::RateLimited)
    ));
    env.broker.login("alice", "alice-password", "198.51.100.7").await.unwrap();
    // The audit names the user, and never what was typed for an unknown one.
    let _ = env.broker.login("hunter2-typed-as-a-name", "x", "198.51.100.8").await;
    let audit = env.broker.list_audit(&system(), 1000).await.unwrap();
    assert_eq!(audit.iter().filter(|e| e.action == "login.failed" && e.target == "alice").count(), checked);
    assert!(audit.iter().all(|e| !e.target.contains("hunter2") && !e.actor.contains("hunter2")));
}

/// Security review (Low): a password change kept the sessions of the old password.
async fn a_new_password_ends_the_old_sessions(backend: Backend) {
    let env = Env::new(backend).await;
    env.user("alice").await;
    let token = env.api_login("alice").await;
    let desktops = || env.http.get(env.url("/api/v1/desktops")).bearer_auth(&token).send();
    assert_eq!(desktops().await.unwrap().status(), 200);
    env.broker.set_password(&system(), "alice", "a-brand-new-password").await.unwrap();
    assert_eq!(desktops().await.unwrap().status(), 401, "the old session goes with the old password");
}

/// Security review (Medium): audit, tokens, commands and sessions were never pruned.
async fn old_rows_are_pruned(backend: Backend) {
    let env = Env::new(backend).await;
    env.user("alice").await;
    let token = env.api_login("alice").await;
    let audit = || async { env.broker.list_audit(&system(), 1000).await.unwrap().len() };
    let logged = audit().await;
    assert!(logged > 0);
    assert_eq!(env.broker.prune().await.unwrap(), 0, "nothing is due yet");
    env.clock.advance(env.broker.settings.api_token_secs + 1);
    assert!(env.broker.prune().await.unwrap() >= 1, "the expired token goes");
    let res = env.http.get(env.url("/api/v1/desktops")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(audit().await, logged, "the audit is kept for its retention");
    env.clock.advance(env.broker.settings.audit_retention_secs);
    env.broker.prune().await.unwrap();
    assert_eq!(audit().await, 0);
}

/// Security review (Medium): a host's self-reported capacity and lists were unchecked.
async fn a_host_cannot_claim_impossible_capacity(backend: Backend) {
    let env = Env::new(backend).await;
    let host = HostDouble::register(&env, "host-a", 8192, &[]).await;
    let beat = |body: Value| {
        env.http.post(env.url("/api/v1/hosts/heartbeat")).bearer_auth(&host.reg.credential).json(&body).send()
    };
    assert_eq!(beat(json!({"cores": 8, "memory_mib": 8192})).await.unwrap().status(), 200);
    for bad in [
        json!({"cores": 1_000_000, "memory_mib": 8192}),
        json!({"cores": 0, "memory_mib": 8192}),
        json!({"cores": 8, "memory_mib": i64::MAX}),
        json!({"cores": 8, "memory_mib": 8192, "images": vec!["x"; 5000]}),
    ] {
        assert_eq!(beat(bad.clone()).await.unwrap().status(), 400, "{bad}");
    }
    use sqlx::Row as _;
    let row = sqlx::query("SELECT cores, memory_mib FROM hosts WHERE name = 'host-a'")
        .fetch_one(&env.broker.db.pool)
        .await
        .unwrap();
    assert_eq!(
        (row.get::<i64, _>("cores"), row.get::<i64, _>("memory_mib")),
        (8, 8192),
        "kept the last good values"
    );
}

/// Issue #14's registration flood: 200 registrations with made-up tokens from one address. The
/// first refusals are audited; past the per-source limit the broker turns the address away
/// before touching the database; a host with a real token from elsewhere registers meanwhile.
async fn registration_flooding_is_bounded(backend: Backend) {
    use pleiades_broker::error::Error;
    use pleiades_protocol::hostapi::HostRegistration;
    let env = Env::new(backend).await;
    let registration = |name: &str, token: &str| HostRegistration {
        token: token.to_owned(),
        credential: None,
        name: name.to_owned(),
        address: format!("{name}.example"),
        session_port: 4433,
        cert_sha256: String::new(),
        cores: 4,
        memory_mib: 4096,
        images: vec![],
    };
    let flood: Vec<_> = (0..200)
        .map(|i| {
            let (broker, reg) =
                (env.broker.clone(), registration(&format!("flood-{i}"), &format!("hrt_made-up-{i}")));
            tokio::spawn(async move { broker.register_host(&reg, "192.0.2.66", &Transport::PlainHttp).await })
        })
        .collect();
    let (mut refused, mut limited) = (0, 0);
    for attempt in flood {
        match attempt.await.unwrap() {
            Err(Error::Unauthenticated) => refused += 1,
            Err(Error::RateLimited) => limited += 1,
            other => panic!("{other:?}"),
        }
    }
    let token = make_token(&env, host_token("real-host")).await;
    env.broker
        .register_host(&registration("real-host", &token), "198.51.100.20", &Transport::PlainHttp)
        .await
        .unwrap();
    let audit = env.broker.list_audit(&system(), 1000).await.unwrap();
    let audited = audit.iter().filter(|e| e.action == "host.register.denied").count();
    eprintln!("200 made-up registrations: {refused} refused and audited, {limited} turned away unread");
    assert!(refused <= 20 && refused > 0, "{refused}");
    assert_eq!(refused + limited, 200);
    assert_eq!(audited, refused);
    let hosts: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM hosts").fetch_one(&env.broker.db.pool).await.unwrap();
    assert_eq!(hosts, 1, "only the real host");
}

/// Everything logged by this test binary at debug level and above.
fn captured_logs() -> &'static std::sync::Mutex<Vec<u8>> {
    static LOGS: std::sync::OnceLock<&'static std::sync::Mutex<Vec<u8>>> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs: &'static std::sync::Mutex<Vec<u8>> = Box::leak(Box::default());
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || LogWriter(logs))
            .try_init();
        logs
    })
}

struct LogWriter(&'static std::sync::Mutex<Vec<u8>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn secrets_stay_out_of_logs_and_audit(backend: Backend) {
    let logs = captured_logs();
    let env = Env::new(backend).await;
    let (_, desktop, host) = setup(&env).await;
    let alice = env.api_login("alice").await;
    let body: Value = env
        .http
        .post(env.url(&format!("/api/v1/desktops/{desktop}/connect")))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ticket = body["connection"]["ticket"].as_str().unwrap().to_owned();
    let audit = env.broker.list_audit(&system(), 1000).await.unwrap();
    let text = format!("{audit:?}");
    // Log something for sure, so that an empty capture cannot pass silently.
    tracing::info!("secrets test ran");
    let logged = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(logged.contains("secrets test ran"));
    for secret in [ticket.as_str(), &alice, &host.reg.credential, "alice-password"] {
        assert!(!text.contains(secret), "a secret in the audit log");
        assert!(!logged.contains(secret), "a secret in the logs");
    }
    assert!(audit.iter().any(|e| e.action == "desktop.connect" && e.detail.starts_with("ticket=")));
    // The database keeps hashes only.
    let users = sqlx::query("SELECT password_hash FROM users").fetch_all(&env.broker.db.pool).await.unwrap();
    for row in &users {
        let hash: Option<String> = sqlx::Row::try_get(row, "password_hash").unwrap();
        assert!(hash.unwrap().starts_with("$argon2id$"));
    }
    let tokens =
        sqlx::query("SELECT token_hash FROM auth_tokens").fetch_all(&env.broker.db.pool).await.unwrap();
    for row in &tokens {
        let hash: String = sqlx::Row::try_get(row, "token_hash").unwrap();
        assert_ne!(hash, alice);
    }
}

/// Whether any value of the settings table holds the private key (its PKCS#8 bytes as base64,
/// or its seed as hex or base64).
async fn settings_hold_key(env: &Env, pkcs8: &[u8]) -> bool {
    use base64::Engine as _;
    let forms = [
        base64::engine::general_purpose::STANDARD.encode(pkcs8),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(pkcs8),
        base64::engine::general_purpose::STANDARD.encode(&pkcs8[16..48]),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&pkcs8[16..48]),
        pkcs8[16..48].iter().map(|b| format!("{b:02x}")).collect(),
    ];
    let rows = sqlx::query("SELECT value FROM settings").fetch_all(&env.broker.db.pool).await.unwrap();
    rows.iter().any(|r| {
        let value: String = sqlx::Row::get(r, "value");
        forms.iter().any(|f| value.contains(f.as_str()))
    })
}

/// Security review finding: the ticket signing key was kept in clear in the database. It is a
/// file in the state directory now; the database knows its public key only, and a key an older
/// broker kept there moves out (checked on PostgreSQL too; the SQLite files are scanned byte by
/// byte in http.rs).
async fn ticket_key_stays_out_of_the_database(backend: Backend) {
    use base64::Engine as _;
    let env = Env::new(backend).await;
    let key_file = env.state_dir().join(pleiades_broker::broker::TICKET_KEY_FILE);
    let pkcs8 = std::fs::read(&key_file).unwrap();
    let signer = pleiades_protocol::ticket::TicketSigner::from_pkcs8(&pkcs8).unwrap();
    assert_eq!(signer.public_key(), env.broker.ticket_public_key());
    assert!(!settings_hold_key(&env, &pkcs8).await);

    // A database as an older broker left it: the private key in `settings`.
    let legacy = pleiades_protocol::ticket::TicketSigner::generate_pkcs8().unwrap();
    let legacy_public = pleiades_protocol::ticket::TicketSigner::from_pkcs8(&legacy).unwrap().public_key();
    sqlx::query("DELETE FROM settings").execute(&env.broker.db.pool).await.unwrap();
    sqlx::query("INSERT INTO settings (key, value) VALUES ('ticket_signing_key_pkcs8', $1)")
        .bind(base64::engine::general_purpose::STANDARD.encode(&legacy))
        .execute(&env.broker.db.pool)
        .await
        .unwrap();
    assert!(settings_hold_key(&env, &legacy).await, "the test's own check sees a key in the database");
    let open = |state: std::path::PathBuf| {
        let (url, clock, settings) = (env.db_url.clone(), env.clock.clone(), env.broker.settings.clone());
        async move {
            let db = pleiades_broker::db::Db::connect(&url).await.unwrap();
            pleiades_broker::Broker::open(db, std::sync::Arc::new(clock), settings, &state).await
        }
    };
    let filenode = || async {
        let row = sqlx::query("SELECT CAST(pg_relation_filenode('settings') AS BIGINT) AS n")
            .fetch_one(&env.broker.db.pool)
            .await
            .unwrap();
        sqlx::Row::get::<i64, _>(&row, "n")
    };
    let before = if backend == Backend::Postgres { filenode().await } else { 0 };
    let state = tempfile::tempdir().unwrap();
    let upgraded = open(state.path().to_owned()).await.unwrap();
    assert_eq!(upgraded.ticket_public_key(), legacy_public, "the same key signs on");
    assert!(!settings_hold_key(&env, &legacy).await, "the key left the database");
    if backend == Backend::Postgres {
        assert_ne!(filenode().await, before, "the table was rewritten without the dead row (VACUUM FULL)");
    }
    assert_eq!(std::fs::read(state.path().join("ticket-key.pk8")).unwrap(), legacy);
    // Opened again: the same key, from the file.
    assert_eq!(open(state.path().to_owned()).await.unwrap().ticket_public_key(), legacy_public);
    // A broker without the key file, or with another key, does not start on this database.
    let empty = tempfile::tempdir().unwrap();
    let refused = open(empty.path().to_owned()).await.unwrap_err().to_string();
    assert!(refused.contains("ticket-key.pk8") && refused.contains(&legacy_public.to_base64()), "{refused}");
    let refused = open(env.state_dir().to_owned()).await.unwrap_err().to_string();
    assert!(refused.contains(&legacy_public.to_base64()), "{refused}");
}

/// Security review finding: a ticket carried nothing of the VM process it was issued for, and
/// the replay cache lives in that process. Alice's ticket, unused (or used: the cache went with
/// her VM), opened the desktop again after its recycle, when the new process served Bob.
async fn tickets_do_not_outlive_a_recycle(backend: Backend) {
    let env = Env::new(backend).await;
    env.image("debian", 1024).await;
    let mut host = HostDouble::register(&env, "host-a", 8192, &["debian"]).await;
    let pool = env.pool("office", PoolKind::Floating, "debian", 1, 0).await;
    let (_, alice) = env.user("alice").await;
    let (_, bob) = env.user("bob").await;
    env.entitle_user(&pool, "alice").await;
    env.entitle_user(&pool, "bob").await;
    let desktop = env.broker.request_desktop(&alice, &pool).await.unwrap().id;
    host.settle().await;
    let alice_ticket = env.broker.connect(&alice, &desktop).await.unwrap().ticket;
    let alice_vm = host.vm_verifier(&desktop, env.broker.ticket_public_key());
    let first = host.vms[&desktop].generation;
    let claims = pleiades_protocol::ticket::decode_unverified(&alice_ticket).unwrap().0;
    assert_eq!((claims.generation, first), (Some(1), Some(1)), "the start's generation, in the ticket");
    // Alice leaves; the floating desktop is recycled (a new VM process) and goes to Bob.
    env.broker.release(&alice, &desktop).await.unwrap();
    host.settle().await;
    assert_eq!(host.vms[&desktop].generation, Some(2), "the recycle started generation 2");
    assert_eq!(env.broker.request_desktop(&bob, &pool).await.unwrap().id, desktop);
    let bob_ticket = env.broker.connect(&bob, &desktop).await.unwrap().ticket;
    // The recycled desktop's VM process checks tickets as `pleiades-host run` does.
    let mut bob_vm = host.vm_verifier(&desktop, env.broker.ticket_public_key());
    let now = pleiades_broker::clock::Clock::now(&env.clock);
    assert_eq!(
        bob_vm.verify(&alice_ticket, now),
        Err(pleiades_protocol::ticket::TicketError::WrongGeneration),
        "Alice's ticket must not open Bob's session"
    );
    assert_eq!(bob_vm.verify(&bob_ticket, now).unwrap().user, "bob");
    // Alice's own VM process took her ticket.
    let mut alice_vm = alice_vm;
    assert_eq!(alice_vm.verify(&alice_ticket, now).unwrap().user, "alice");
}
