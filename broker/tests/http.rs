//! The HTTP surface itself: the OpenAPI document matches the router, HTTPS serving with the
//! generated certificate, security headers, and the CLI over the same operations.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Backend, Env, HostDouble, browser_login};
use pleiades_broker::config::Config;
use pleiades_broker::server;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_matches_the_router() {
    let env = Env::new(Backend::Sqlite).await;
    let doc: Value =
        env.http.get(env.url("/api/v1/openapi.json")).send().await.unwrap().json().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 25);
    for (path, ops) in paths {
        for method in ops.as_object().unwrap().keys() {
            let url = env.url(&format!("/api/v1{}", path.replace('{', "x").replace('}', "")));
            let req = env.http.request(method.to_uppercase().parse().unwrap(), &url);
            let res = req.header("content-type", "application/json").body("{}").send().await.unwrap();
            // Routed: anything but the router's own 404/405 (which have empty bodies).
            let status = res.status();
            let body = res.text().await.unwrap();
            assert!(
                !(status == 405 || (status == 404 && body.is_empty())),
                "{method} {path} is documented but not routed ({status})"
            );
        }
    }
    // And the other way: every route of the router's source is in the document.
    let documented: std::collections::BTreeSet<(String, String)> = paths
        .iter()
        .flat_map(|(path, ops)| ops.as_object().unwrap().keys().map(move |m| (m.clone(), path.clone())))
        .collect();
    let routed = routes_in_source(include_str!("../src/http/api.rs"));
    assert!(routed.len() >= 25, "the router's routes were found: {routed:?}");
    let undocumented: Vec<_> = routed.difference(&documented).collect();
    assert!(undocumented.is_empty(), "routed but not in openapi.json: {undocumented:?}");
}

/// `(method, path)` of every `.route("PATH", get(..).post(..))` in the router's source.
fn routes_in_source(source: &str) -> std::collections::BTreeSet<(String, String)> {
    let mut routes = std::collections::BTreeSet::new();
    for chunk in source.split(".route(\"").skip(1) {
        let Some((path, rest)) = chunk.split_once('"') else { continue };
        // The handlers, up to the end of this `.route(...)` call (its line).
        let call = rest.lines().next().unwrap_or_default();
        for method in ["get", "post", "put", "delete", "patch"] {
            let needle = format!("{method}(");
            // A method router (`get(h)` or `.post(h)`), not a part of a longer name.
            let found = call
                .match_indices(&needle)
                .any(|(at, _)| call[..at].chars().last().is_none_or(|c| !(c.is_alphanumeric() || c == '_')));
            if found {
                routes.insert((method.to_owned(), path.to_owned()));
            }
        }
    }
    routes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_headers_on_pages_and_api() {
    let env = Env::new(Backend::Sqlite).await;
    for path in ["/login", "/api/v1/openapi.json", "/healthz"] {
        let res = env.http.get(env.url(path)).send().await.unwrap();
        let h = res.headers();
        assert!(h["content-security-policy"].to_str().unwrap().contains("frame-ancestors 'none'"), "{path}");
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert_eq!(h["x-frame-options"], "DENY");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_by_default_with_a_generated_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config { state_dir: Some(dir.path().to_owned()), ..Config::default() };
    assert!(config.cookies_secure());
    let tls = server::tls_config(&config).unwrap();
    assert!(dir.path().join("broker-cert.pem").exists());
    // The key file is private.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.path().join("broker-key.pem")).unwrap().permissions(),
    );
    assert_eq!(mode & 0o077, 0);
    // A second start reuses the certificate.
    let cert = std::fs::read(dir.path().join("broker-cert.pem")).unwrap();
    server::tls_config(&config).unwrap();
    assert_eq!(std::fs::read(dir.path().join("broker-cert.pem")).unwrap(), cert);

    let env = Env::new(Backend::Sqlite).await;
    let app = pleiades_broker::http::router(pleiades_broker::http::AppState {
        broker: env.broker.clone(),
        secure_cookies: true,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server::serve(listener, app, Some(tls), async {
        let _ = rx.await;
    }));
    // A TLS client that trusts exactly this certificate.
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(&cert) {
        roots.add(c.unwrap()).unwrap();
    }
    use rustls::pki_types::pem::PemObject as _;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut tls = tokio::time::timeout(
        Duration::from_secs(10),
        connector.connect("localhost".try_into().unwrap(), tcp),
    )
    .await
    .unwrap()
    .unwrap();
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    tls.write_all(b"GET /login HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut response)).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let cookie = text
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie: pleiades_login_csrf="))
        .unwrap();
    assert!(
        cookie.contains("; Secure") && cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let _ = tx.send(());
}

/// The pool's clipboard switches (data loss prevention) through the JSON API, the admin form
/// (an unchecked box is off) and the admin's list of pools.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_clipboard_switches_round_trip_through_the_api_and_the_admin_form() {
    let env = Env::new(Backend::Sqlite).await;
    env.image("debian", 1024).await;
    env.admin("root").await;
    let token = env.api_login("root").await;
    let created: Value = env
        .http
        .post(env.url("/api/v1/admin/pools"))
        .bearer_auth(&token)
        .json(&serde_json::json!({ "name": "office", "kind": "floating", "image": "debian", "max_size": 2, "clipboard_to_guest": false }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (&created["clipboard_to_guest"], &created["clipboard_from_guest"]),
        (&false.into(), &true.into()),
        "{created}"
    );
    let id = created["id"].as_str().unwrap().to_owned();
    let updated: Value = env
        .http
        .put(env.url(&format!("/api/v1/admin/pools/{id}")))
        .bearer_auth(&token)
        .json(&serde_json::json!({
            "name": "office", "kind": "floating", "image": "debian", "max_size": 2,
            "clipboard_to_guest": true, "clipboard_from_guest": false
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (&updated["clipboard_to_guest"], &updated["clipboard_from_guest"]),
        (&true.into(), &false.into()),
        "{updated}"
    );

    // The form shows the switches as stored, and saves what it is sent back.
    let root = browser_login(&env, "root").await;
    let page = |path: String| {
        let request = env.http.get(env.url(&path)).header("cookie", &root.cookie);
        async move { request.send().await.unwrap().text().await.unwrap() }
    };
    let form = page(format!("/admin/pools/{id}")).await;
    assert!(form.contains(r#"name="clipboard_to_guest" type="checkbox" value="1" checked"#), "{form}");
    assert!(
        form.contains(r#"name="clipboard_from_guest" type="checkbox" value="1" aria-describedby"#),
        "{form}"
    );
    assert!(form.contains("Data loss prevention"));
    assert!(page("/admin/pools".into()).await.contains("client → desktop only"));
    let post = |path: String, fields: Vec<(&'static str, &'static str)>| {
        let mut form: Vec<(&str, String)> = fields.into_iter().map(|(k, v)| (k, v.to_owned())).collect();
        form.push(("csrf", root.csrf.clone()));
        let request = env.http.post(env.url(&path)).header("cookie", &root.cookie).form(&form);
        async move { request.send().await.unwrap().status() }
    };
    let saved = post(
        format!("/admin/pools/{id}"),
        vec![("max_size", "2"), ("enabled", "1"), ("clipboard_from_guest", "1")],
    )
    .await;
    assert_eq!(saved, 303);
    let pool = env.broker.pool(&id).await.unwrap();
    assert_eq!((pool.clipboard_to_guest, pool.clipboard_from_guest), (false, true));
    assert!(page("/admin/pools".into()).await.contains("desktop → client only"));
    let made = post(
        "/admin/pools".into(),
        vec![("name", "sealed"), ("kind", "persistent"), ("image", "debian"), ("max_size", "1")],
    )
    .await;
    assert_eq!(made, 303);
    let sealed = env.broker.pool_by_name("sealed").await.unwrap();
    assert_eq!((sealed.clipboard_to_guest, sealed.clipboard_from_guest), (false, false));
    let audit = env.broker.list_audit(&common::system(), 100).await.unwrap();
    assert!(
        audit.iter().any(|e| e.action == "pool.update"
            && e.detail.contains("clipboard_to_guest=false clipboard_from_guest=true")),
        "{audit:?}"
    );
}

/// The pool's file-transfer switch (data loss prevention) through the JSON API (create, update,
/// list, the OpenAPI document), the admin form (an unchecked box is off) and the admin's list of
/// pools.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_file_transfer_switch_round_trips_through_the_api_and_the_admin_form() {
    let env = Env::new(Backend::Sqlite).await;
    env.image("debian", 1024).await;
    env.admin("root").await;
    let token = env.api_login("root").await;
    let doc: Value =
        env.http.get(env.url("/api/v1/openapi.json")).send().await.unwrap().json().await.unwrap();
    let documented = &doc["components"]["schemas"]["PoolSpec"]["properties"]["file_transfer"];
    assert_eq!(
        (&documented["type"], &documented["default"]),
        (&"boolean".into(), &true.into()),
        "{documented}"
    );
    let create = |body: Value| {
        let request = env.http.post(env.url("/api/v1/admin/pools")).bearer_auth(&token).json(&body);
        async move {
            let res = request.send().await.unwrap();
            assert_eq!(res.status(), 201, "create");
            res.json::<Value>().await.unwrap()
        }
    };
    let open =
        create(serde_json::json!({ "name": "open", "kind": "floating", "image": "debian", "max_size": 2 }))
            .await;
    assert_eq!(open["file_transfer"], true, "on by default: {open}");
    let closed = create(serde_json::json!({
        "name": "closed", "kind": "floating", "image": "debian", "max_size": 2, "file_transfer": false
    }))
    .await;
    assert_eq!(closed["file_transfer"], false, "{closed}");
    assert_eq!(
        (closed["clipboard_to_guest"].clone(), closed["clipboard_from_guest"].clone()),
        (true.into(), true.into()),
        "the clipboard is another switch"
    );
    let id = open["id"].as_str().unwrap().to_owned();
    let update = |file_transfer: bool| {
        let request = env
            .http
            .put(env.url(&format!("/api/v1/admin/pools/{id}")))
            .bearer_auth(&token)
            .json(&serde_json::json!({
                "name": "open", "kind": "floating", "image": "debian", "max_size": 2, "file_transfer": file_transfer
            }));
        async move { request.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    assert_eq!(update(false).await["file_transfer"], false);
    assert!(!env.broker.pool(&id).await.unwrap().file_transfer);
    assert_eq!(update(true).await["file_transfer"], true);
    assert!(env.broker.pool(&id).await.unwrap().file_transfer);
    let listed = pool_field(&env.get_json(&token, "/api/v1/admin/pools").await, "file_transfer");
    assert_eq!(listed, [("closed".to_owned(), false.into()), ("open".to_owned(), true.into())]);

    // The form shows the switch as stored, and saves what it is sent back.
    let root = browser_login(&env, "root").await;
    let page = |path: String| {
        let request = env.http.get(env.url(&path)).header("cookie", &root.cookie);
        async move { request.send().await.unwrap().text().await.unwrap() }
    };
    let form = page(format!("/admin/pools/{id}")).await;
    assert!(form.contains("File transfer into the desktop"), "{form}");
    assert!(form.contains(r#"name="file_transfer" type="checkbox" value="1" checked"#), "{form}");
    let closed_id = closed["id"].as_str().unwrap();
    let form = page(format!("/admin/pools/{closed_id}")).await;
    assert!(form.contains(r#"name="file_transfer" type="checkbox" value="1" aria-describedby"#), "{form}");
    let list = page("/admin/pools".into()).await;
    assert!(list.contains("File transfer") && list.contains("allowed"), "{list}");
    let post = |path: String, fields: Vec<(&'static str, &'static str)>| {
        let mut form: Vec<(&str, String)> = fields.into_iter().map(|(k, v)| (k, v.to_owned())).collect();
        form.push(("csrf", root.csrf.clone()));
        let request = env.http.post(env.url(&path)).header("cookie", &root.cookie).form(&form);
        async move { request.send().await.unwrap().status() }
    };
    // Saved without the box (unchecked): off; the clipboard boxes sent stay on.
    let saved = post(
        format!("/admin/pools/{id}"),
        vec![("max_size", "2"), ("enabled", "1"), ("clipboard_to_guest", "1"), ("clipboard_from_guest", "1")],
    )
    .await;
    assert_eq!(saved, 303);
    let pool = env.broker.pool(&id).await.unwrap();
    assert_eq!((pool.file_transfer, pool.clipboard_to_guest, pool.clipboard_from_guest), (false, true, true));
    // And checked again: on.
    let saved = post(
        format!("/admin/pools/{closed_id}"),
        vec![("max_size", "2"), ("enabled", "1"), ("file_transfer", "1")],
    )
    .await;
    assert_eq!(saved, 303);
    assert!(env.broker.pool(closed_id).await.unwrap().file_transfer);
    let made = post(
        "/admin/pools".into(),
        vec![("name", "sealed"), ("kind", "persistent"), ("image", "debian"), ("max_size", "1")],
    )
    .await;
    assert_eq!(made, 303);
    assert!(!env.broker.pool_by_name("sealed").await.unwrap().file_transfer);
    let audit = env.broker.list_audit(&common::system(), 100).await.unwrap();
    assert!(
        audit.iter().any(|e| e.action == "pool.update"
            && e.target == "open"
            && e.detail.contains("file_transfer=false")),
        "{audit:?}"
    );
    assert!(
        audit.iter().any(|e| e.action == "pool.create"
            && e.target == "sealed"
            && e.detail.contains("file_transfer=false")),
        "{audit:?}"
    );
}

/// The pool's USB policy through the JSON API (create, update, list, the OpenAPI document; a
/// policy that does not parse refused with the reason), the admin form (a text field, saved as
/// the policy writes itself) and the admin's list of pools.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_usb_policy_round_trips_through_the_api_and_the_admin_form() {
    let env = Env::new(Backend::Sqlite).await;
    env.image("debian", 1024).await;
    env.admin("root").await;
    let token = env.api_login("root").await;
    let doc: Value =
        env.http.get(env.url("/api/v1/openapi.json")).send().await.unwrap().json().await.unwrap();
    let documented = &doc["components"]["schemas"]["PoolSpec"]["properties"]["usb"];
    assert_eq!(
        (&documented["type"], &documented["default"]),
        (&"string".into(), &"none".into()),
        "{documented}"
    );
    let create = |body: Value| {
        let request = env.http.post(env.url("/api/v1/admin/pools")).bearer_auth(&token).json(&body);
        async move {
            let res = request.send().await.unwrap();
            (res.status().as_u16(), res.json::<Value>().await.unwrap())
        }
    };
    let (status, closed) =
        create(serde_json::json!({ "name": "closed", "kind": "floating", "image": "debian", "max_size": 2 }))
            .await;
    assert_eq!((status, &closed["usb"]), (201, &"none".into()), "no device by default: {closed}");
    let (status, lab) = create(serde_json::json!({
        "name": "lab", "kind": "floating", "image": "debian", "max_size": 2, "usb": "class=0B, 0525:A4A5"
    }))
    .await;
    assert_eq!(
        (status, &lab["usb"]),
        (201, &"class=0b,0525:a4a5".into()),
        "as the policy writes itself: {lab}"
    );
    assert_eq!(lab["file_transfer"], true, "files are another switch");
    for (bad, says) in [
        ("usb-sticks", "is not a USB rule"),
        ("class=8", "two hex digits"),
        ("0525:a4a", "VVVV:PPPP"),
        ("all,class=08", "is not a USB rule"),
    ] {
        let (status, body) = create(serde_json::json!({
            "name": "bad", "kind": "floating", "image": "debian", "max_size": 2, "usb": bad
        }))
        .await;
        let error = body["error"].as_str().unwrap_or_default();
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(error.contains("USB policy") && error.contains(says), "{bad}: {error}");
    }
    let many = (0..65).map(|c| format!("class={c:02x}")).collect::<Vec<_>>().join(",");
    let (status, body) =
        create(serde_json::json!({ "name": "bad", "kind": "floating", "image": "debian", "max_size": 2, "usb": many }))
            .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap_or_default().contains("at most 64 rules"), "{body}");
    assert!(env.broker.pool_by_name("bad").await.is_err(), "no pool made from a bad policy");
    let id = closed["id"].as_str().unwrap().to_owned();
    let update = |usb: &str| {
        let request = env.http.put(env.url(&format!("/api/v1/admin/pools/{id}"))).bearer_auth(&token).json(
            &serde_json::json!({
                "name": "closed", "kind": "floating", "image": "debian", "max_size": 2, "usb": usb
            }),
        );
        async move {
            let res = request.send().await.unwrap();
            (res.status().as_u16(), res.json::<Value>().await.unwrap())
        }
    };
    let (status, body) = update("all").await;
    assert_eq!((status, &body["usb"]), (200, &"all".into()), "{body}");
    assert_eq!(env.broker.pool(&id).await.unwrap().usb, "all");
    let (status, body) = update("class=03;class=08").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(env.broker.pool(&id).await.unwrap().usb, "all", "a refused update changes nothing");
    assert_eq!(update("none").await.1["usb"], "none");
    let listed = pool_field(&env.get_json(&token, "/api/v1/admin/pools").await, "usb");
    assert_eq!(
        listed,
        [("closed".to_owned(), "none".into()), ("lab".to_owned(), "class=0b,0525:a4a5".into())]
    );

    // The form shows the policy as stored, and saves what it is sent back.
    let root = browser_login(&env, "root").await;
    let page = |path: String| {
        let request = env.http.get(env.url(&path)).header("cookie", &root.cookie);
        async move { request.send().await.unwrap().text().await.unwrap() }
    };
    let lab_id = lab["id"].as_str().unwrap();
    let form = page(format!("/admin/pools/{lab_id}")).await;
    assert!(form.contains("USB devices allowed into the desktop"), "{form}");
    assert!(form.contains(r#"name="usb" value="class=0b,0525:a4a5""#), "{form}");
    assert!(form.contains("class=HH") && form.contains("VVVV:PPPP"), "the help says how: {form}");
    let form = page("/admin/pools".into()).await;
    assert!(form.contains(r#"name="usb" value="none""#), "a new pool's form starts at none: {form}");
    assert!(
        form.contains(r#"<th scope="col">USB</th>"#) && form.contains("<td>class=0b,0525:a4a5</td>"),
        "{form}"
    );
    let post = |path: String, fields: Vec<(&'static str, &'static str)>| {
        let mut form: Vec<(&str, String)> = fields.into_iter().map(|(k, v)| (k, v.to_owned())).collect();
        form.push(("csrf", root.csrf.clone()));
        let request = env.http.post(env.url(&path)).header("cookie", &root.cookie).form(&form);
        async move {
            let res = request.send().await.unwrap();
            (res.status().as_u16(), res.text().await.unwrap())
        }
    };
    let (saved, _) = post(
        format!("/admin/pools/{id}"),
        vec![("max_size", "2"), ("enabled", "1"), ("usb", " class=03 ,076B:3021")],
    )
    .await;
    assert_eq!(saved, 303);
    assert_eq!(env.broker.pool(&id).await.unwrap().usb, "class=03,076b:3021");
    // A policy the form cannot save: a readable page that says why, nothing changed.
    let (refused, body) =
        post(format!("/admin/pools/{id}"), vec![("max_size", "2"), ("enabled", "1"), ("usb", "keyboards")])
            .await;
    assert_eq!(refused, 400);
    assert!(body.contains("USB policy") && body.contains("is not a USB rule"), "{body}");
    assert_eq!(env.broker.pool(&id).await.unwrap().usb, "class=03,076b:3021");
    // Emptied: no device.
    let (saved, _) =
        post(format!("/admin/pools/{id}"), vec![("max_size", "2"), ("enabled", "1"), ("usb", "")]).await;
    assert_eq!(saved, 303);
    assert_eq!(env.broker.pool(&id).await.unwrap().usb, "none");
    let (made, _) = post(
        "/admin/pools".into(),
        vec![
            ("name", "kiosk"),
            ("kind", "persistent"),
            ("image", "debian"),
            ("max_size", "1"),
            ("usb", "all"),
        ],
    )
    .await;
    assert_eq!(made, 303);
    assert_eq!(env.broker.pool_by_name("kiosk").await.unwrap().usb, "all");
    let audit = env.broker.list_audit(&common::system(), 100).await.unwrap();
    assert!(
        audit.iter().any(|e| e.action == "pool.update"
            && e.target == "closed"
            && e.detail.contains("usb=class=03,076b:3021")),
        "{audit:?}"
    );
    assert!(
        audit.iter().any(|e| e.action == "pool.create"
            && e.target == "lab"
            && e.detail.contains("usb=class=0b,0525:a4a5")),
        "{audit:?}"
    );
}

/// The pool's USB auto-redirect rules through the JSON API (create, update, list, the OpenAPI
/// document; rules that do not parse refused with the reason), the connection the user gets
/// (`POST /desktops/{id}/connect`: its file and URI carry them, or nothing when there are none;
/// the portal's connect page too), the admin form and the admin's list of pools.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_usb_auto_rules_reach_the_connection_file_through_the_api_and_the_admin_form() {
    use pleiades_protocol::connfile::Connection;
    let env = Env::new(Backend::Sqlite).await;
    env.image("debian", 1024).await;
    env.admin("root").await;
    env.user("alice").await;
    let mut host = HostDouble::register(&env, "host-a", 8192, &["debian"]).await;
    let token = env.api_login("root").await;
    let alice = env.api_login("alice").await;
    let doc: Value =
        env.http.get(env.url("/api/v1/openapi.json")).send().await.unwrap().json().await.unwrap();
    let documented = &doc["components"]["schemas"]["PoolSpec"]["properties"]["usb_auto"];
    assert_eq!(
        (&documented["type"], &documented["default"]),
        (&"string".into(), &"none".into()),
        "{documented}"
    );
    assert_eq!(doc["components"]["schemas"]["Connection"]["properties"]["usb_auto"]["type"], "string");
    let create = |body: Value| {
        let request = env.http.post(env.url("/api/v1/admin/pools")).bearer_auth(&token).json(&body);
        async move {
            let res = request.send().await.unwrap();
            (res.status().as_u16(), res.json::<Value>().await.unwrap())
        }
    };
    let (status, plain) = create(
        serde_json::json!({ "name": "plain", "kind": "persistent", "image": "debian", "max_size": 2 }),
    )
    .await;
    assert_eq!((status, &plain["usb_auto"]), (201, &"none".into()), "none by default: {plain}");
    let (status, sticks) = create(serde_json::json!({
        "name": "sticks", "kind": "persistent", "image": "debian", "max_size": 2,
        "usb": "class=08", "usb_auto": " class=08 "
    }))
    .await;
    assert_eq!(
        (status, &sticks["usb"], &sticks["usb_auto"]),
        (201, &"class=08".into(), &"class=08".into()),
        "as the rules write themselves: {sticks}"
    );
    for (bad, says) in
        [("class=8", "two hex digits"), ("sticks", "is not a USB rule"), ("0525:a4a", "VVVV:PPPP")]
    {
        let (status, body) = create(serde_json::json!({
            "name": "bad", "kind": "floating", "image": "debian", "max_size": 2, "usb_auto": bad
        }))
        .await;
        let error = body["error"].as_str().unwrap_or_default();
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(error.contains("USB auto-redirect rules") && error.contains(says), "{bad}: {error}");
    }
    assert!(env.broker.pool_by_name("bad").await.is_err(), "no pool made from bad rules");

    // Alice's desktops in both pools, and the connections she gets for them.
    let (plain_id, sticks_id) =
        (plain["id"].as_str().unwrap().to_owned(), sticks["id"].as_str().unwrap().to_owned());
    for pool in [&plain_id, &sticks_id] {
        env.entitle_user(pool, "alice").await;
    }
    let desktop = |pool: &str| {
        let request = env.http.post(env.url(&format!("/api/v1/pools/{pool}/desktop"))).bearer_auth(&alice);
        async move {
            let res = request.send().await.unwrap();
            assert!(res.status().is_success(), "{}", res.status());
            res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned()
        }
    };
    let (on_plain, on_sticks) = (desktop(&plain_id).await, desktop(&sticks_id).await);
    host.settle().await;
    let connect = |desktop: &str| {
        let request =
            env.http.post(env.url(&format!("/api/v1/desktops/{desktop}/connect"))).bearer_auth(&alice);
        async move {
            let res = request.send().await.unwrap();
            assert_eq!(res.status(), 200, "connect");
            let body: Value = res.json().await.unwrap();
            let file = body["file"].as_str().unwrap().to_owned();
            let from_file = Connection::from_toml(&file).unwrap();
            let from_uri = Connection::from_uri(body["uri"].as_str().unwrap()).unwrap();
            assert_eq!(from_file.usb_auto, from_uri.usb_auto, "{body}");
            assert_eq!(body["connection"]["usb_auto"].as_str().unwrap_or_default(), from_file.usb_auto);
            (from_file.usb_auto, file)
        }
    };
    let (rules, file) = connect(&on_sticks).await;
    assert_eq!(rules, "class=08");
    assert!(file.contains(r#"usb_auto = "class=08""#), "{file}");
    let (rules, file) = connect(&on_plain).await;
    assert_eq!(rules, "", "none: nothing redirected by itself");
    assert!(!file.contains("usb_auto"), "{file}");

    // An update changes what the next connection carries; bad rules change nothing.
    let update = |usb_auto: &str| {
        let request = env
            .http
            .put(env.url(&format!("/api/v1/admin/pools/{plain_id}")))
            .bearer_auth(&token)
            .json(&serde_json::json!({
                "name": "plain", "kind": "persistent", "image": "debian", "max_size": 2, "usb_auto": usb_auto
            }));
        async move {
            let res = request.send().await.unwrap();
            (res.status().as_u16(), res.json::<Value>().await.unwrap())
        }
    };
    let (status, body) = update("class=03,class=0B").await;
    assert_eq!((status, &body["usb_auto"]), (200, &"class=03,class=0b".into()), "{body}");
    assert_eq!(connect(&on_plain).await.0, "class=03,class=0b");
    let (status, body) = update("class=8").await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap_or_default().contains("USB auto-redirect rules"), "{body}");
    assert_eq!(env.broker.pool(&plain_id).await.unwrap().usb_auto, "class=03,class=0b");
    let listed = pool_field(&env.get_json(&token, "/api/v1/admin/pools").await, "usb_auto");
    assert_eq!(
        listed,
        vec![("plain".to_owned(), "class=03,class=0b".into()), ("sticks".to_owned(), "class=08".into())]
    );

    // The form shows the rules as stored, and saves what it is sent back.
    let root = browser_login(&env, "root").await;
    let page = |path: String| {
        let request = env.http.get(env.url(&path)).header("cookie", &root.cookie);
        async move { request.send().await.unwrap().text().await.unwrap() }
    };
    let form = page(format!("/admin/pools/{sticks_id}")).await;
    assert!(form.contains("USB devices redirected on connect"), "{form}");
    assert!(form.contains(r#"id="pool-usb-auto" name="usb_auto" value="class=08""#), "{form}");
    assert!(form.contains("the client redirects by itself when it connects (same rules)"), "{form}");
    let form = page("/admin/pools".into()).await;
    assert!(form.contains(r#"name="usb_auto" value="none""#), "a new pool's form starts at none: {form}");
    assert!(
        form.contains(r#"<th scope="col">USB on connect</th>"#)
            && form.contains("<td>class=08</td><td>class=08</td>"),
        "{form}"
    );
    let post = |path: String, fields: Vec<(&'static str, &'static str)>| {
        let mut form: Vec<(&str, String)> = fields.into_iter().map(|(k, v)| (k, v.to_owned())).collect();
        form.push(("csrf", root.csrf.clone()));
        let request = env.http.post(env.url(&path)).header("cookie", &root.cookie).form(&form);
        async move {
            let res = request.send().await.unwrap();
            (res.status().as_u16(), res.text().await.unwrap())
        }
    };
    let (saved, _) = post(
        format!("/admin/pools/{sticks_id}"),
        vec![("max_size", "2"), ("enabled", "1"), ("usb", "class=08"), ("usb_auto", " class=0B ,0525:A4A5")],
    )
    .await;
    assert_eq!(saved, 303);
    let pool = env.broker.pool(&sticks_id).await.unwrap();
    assert_eq!((pool.usb.as_str(), pool.usb_auto.as_str()), ("class=08", "class=0b,0525:a4a5"));
    // Rules the form cannot save: a readable page that says why, nothing changed.
    let (refused, body) = post(
        format!("/admin/pools/{sticks_id}"),
        vec![("max_size", "2"), ("enabled", "1"), ("usb", "class=08"), ("usb_auto", "class=8")],
    )
    .await;
    assert_eq!(refused, 400);
    assert!(body.contains("USB auto-redirect rules") && body.contains("two hex digits"), "{body}");
    assert_eq!(env.broker.pool(&sticks_id).await.unwrap().usb_auto, "class=0b,0525:a4a5");
    // The portal's connect page: its link and its file carry the rules.
    let alice_browser = browser_login(&env, "alice").await;
    let res = env
        .http
        .post(env.url(&format!("/desktops/{on_sticks}/connect")))
        .header("cookie", &alice_browser.cookie)
        .form(&[("csrf", alice_browser.csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let portal = res.text().await.unwrap();
    assert!(portal.contains("usb_auto=class%3D0b%2C0525%3Aa4a5"), "{portal}");
    // Emptied: none.
    let (saved, _) = post(
        format!("/admin/pools/{sticks_id}"),
        vec![("max_size", "2"), ("enabled", "1"), ("usb", "class=08"), ("usb_auto", "")],
    )
    .await;
    assert_eq!(saved, 303);
    assert_eq!(env.broker.pool(&sticks_id).await.unwrap().usb_auto, "none");
    assert_eq!(connect(&on_sticks).await.0, "");
    let audit = env.broker.list_audit(&common::system(), 100).await.unwrap();
    assert!(
        audit.iter().any(|e| e.action == "pool.create"
            && e.target == "sticks"
            && e.detail.contains("usb=class=08 usb_auto=class=08")),
        "{audit:?}"
    );
    assert!(
        audit.iter().any(|e| e.action == "pool.update"
            && e.target == "plain"
            && e.detail.contains("usb_auto=class=03,class=0b")),
        "{audit:?}"
    );
}

#[test]
fn cli_administers_the_same_database() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/cli.db", dir.path().display());
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_pleiades-broker"))
            .arg("--db")
            .arg(&db)
            .args(args)
            .env("PLEIADES_PASSWORD", "correct horse battery")
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    run(&["user", "add", "alice", "--display-name", "Alice A."]);
    run(&["user", "add", "root", "--admin"]);
    run(&["group", "add", "engineering"]);
    run(&["group", "member", "add", "engineering", "alice"]);
    run(&[
        "image",
        "add",
        "debian",
        "--kernel",
        "/srv/vmlinuz",
        "--initrd",
        "/srv/initrd",
        "--memory-mib",
        "1024",
    ]);
    run(&[
        "pool",
        "create",
        "office",
        "--image",
        "debian",
        "--kind",
        "persistent",
        "--max",
        "5",
        "--spares",
        "1",
        "--clipboard-from-guest",
        "false",
        "--file-transfer",
        "false",
        "--usb",
        "class=08, 0525:A4A5",
        "--usb-auto",
        "class=08",
    ]);
    run(&["pool", "entitle", "office", "--group", "engineering"]);
    let token = run(&["host", "token", "create", "--name", "rack1-host1", "--description", "rack 1"]);
    assert!(token.trim().starts_with("hrt_"));
    assert!(run(&["user", "list"]).contains("root\tadmin"));
    assert!(run(&["group", "list"]).contains("engineering\talice"));
    let pools = run(&["pool", "list"]);
    assert!(
        pools.contains("office\tpersistent")
            && pools.contains("clipboard client → desktop only")
            && pools.contains("file transfer off")
            && pools.contains("\tusb class=08,0525:a4a5\tusb auto class=08\t"),
        "{pools}"
    );
    // A policy that does not parse is refused with the reason; no pool is made.
    let refused = Command::new(env!("CARGO_BIN_EXE_pleiades-broker"))
        .arg("--db")
        .arg(&db)
        .args(["pool", "create", "lab", "--image", "debian", "--max", "2", "--usb", "class=8"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("USB policy") && stderr.contains("class=08"),
        "{stderr}"
    );
    assert!(!run(&["pool", "list"]).contains("lab\t"));
    // So are auto-redirect rules that do not parse.
    let refused = Command::new(env!("CARGO_BIN_EXE_pleiades-broker"))
        .arg("--db")
        .arg(&db)
        .args(["pool", "create", "lab", "--image", "debian", "--max", "2", "--usb-auto", "class=8"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success()
            && stderr.contains("USB auto-redirect rules")
            && stderr.contains("class=08"),
        "{stderr}"
    );
    assert!(!run(&["pool", "list"]).contains("lab\t"));
    let key = run(&["ticket-key"]);
    assert!(pleiades_protocol::ticket::PublicKey::from_base64(key.trim()).is_ok());
    let audit = run(&["audit"]);
    assert!(audit.contains("pool.entitle") && audit.contains("host.token.create"));
    assert!(!audit.contains("correct horse battery") && !audit.contains(token.trim()));
}

/// `pleiades-broker serve` on a free loopback port, plain HTTP: the process and its port, once
/// `/healthz` answers.
async fn serve_plain(dir: &std::path::Path) -> (tokio::process::Child, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = dir.join("broker.toml");
    std::fs::write(
        &config,
        format!(
            "database = \"sqlite://{}/b.db\"\nlisten = \"127.0.0.1:{port}\"\nstate_dir = \"{}\"\ninsecure_http = true\n[broker]\nticket_lifetime_secs = 30\n",
            dir.display(),
            dir.display()
        ),
    )
    .unwrap();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pleiades-broker"))
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let mut up = false;
    for _ in 0..120 {
        if let Ok(res) = http.get(format!("http://127.0.0.1:{port}/healthz")).send().await {
            up = res.status() == 200;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(up, "the broker did not answer on 127.0.0.1:{port}");
    (child, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_binary_answers_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, port) = serve_plain(dir.path()).await;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let login = http.get(format!("http://127.0.0.1:{port}/login")).send().await.unwrap();
    assert_eq!(login.status(), 200);
    // Plain HTTP: the cookie cannot be Secure (the browser would never send it back).
    let cookie = login.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(!cookie.contains("Secure") && cookie.contains("HttpOnly"));
    child.kill().await.unwrap();
}

/// The memory (KiB) a process holds (`VmRSS`).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Issue #14's slow-loris attack: 200 connections that send their headers a byte at a time,
/// and 100 that send nothing. The broker serves other requests meanwhile, and closes every
/// slow connection once its header time is up (`HEADER_TIMEOUT`, 10 s), not when the client
/// gives up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_and_others_are_served_meanwhile() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let (mut child, port) = serve_plain(dir.path()).await;
    let pid = child.id().unwrap();
    let before = rss_kib(pid);
    let started = std::time::Instant::now();
    let mut slow = tokio::task::JoinSet::new();
    for i in 0..300 {
        slow.spawn(async move {
            let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            let header = b"GET /healthz HTTP/1.1\r\nHost: broker\r\nX-Slow: ";
            let mut buf = [0u8; 256];
            // A byte every 500 ms (the 100 idle ones send nothing), for up to a minute: the
            // broker must close the connection (read gives 0 or an error) long before.
            for n in 0..120 {
                if i < 200 {
                    let _ = tcp.write_all(&header[n % header.len()..][..1]).await;
                }
                match tokio::time::timeout(Duration::from_millis(500), tcp.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
                    Ok(Ok(_)) => return None, // an answer: the header was not slow enough
                    Err(_) => {}
                }
            }
            None
        });
    }
    // Meanwhile, requests are served.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = rss_kib(pid);
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let mut served = 0;
    for _ in 0..20 {
        let res = http.get(format!("http://127.0.0.1:{port}/healthz")).send().await.unwrap();
        assert_eq!(res.status(), 200);
        served += 1;
    }
    let mut closed_after = Vec::new();
    while let Some(result) = slow.join_next().await {
        closed_after.push(result.unwrap().expect("the broker never closed a slow connection"));
    }
    let last = closed_after.iter().max().unwrap();
    eprintln!(
        "300 slow connections: {served} requests served meanwhile; all cut off within {:.1} s; broker RSS {} MiB before, {} MiB during",
        last.as_secs_f64(),
        before / 1024,
        during / 1024
    );
    assert!(*last < Duration::from_secs(30), "the last slow connection lasted {last:?}");
    assert!(closed_after.iter().all(|t| *t >= Duration::from_secs(5)), "cut off too early: {closed_after:?}");
    child.kill().await.unwrap();
}

/// The signing key as the database might hold it: the PKCS#8 document, its base64 (how older
/// brokers stored it) and the 32-byte private seed inside it.
fn key_forms(pkcs8: &[u8]) -> Vec<Vec<u8>> {
    use base64::Engine as _;
    assert_eq!(&pkcs8[14..16], &[0x04, 0x20], "ring's Ed25519 PKCS#8 v2: the seed follows");
    vec![
        pkcs8.to_vec(),
        base64::engine::general_purpose::STANDARD.encode(pkcs8).into_bytes(),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(pkcs8).into_bytes(),
        pkcs8[16..48].to_vec(),
    ]
}

/// Fails if any file of the SQLite database (main file, WAL, shared memory) holds the key.
fn assert_database_lacks_key(db: &std::path::Path, pkcs8: &[u8]) {
    let mut scanned = 0;
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut name = db.as_os_str().to_owned();
        name.push(suffix);
        let Ok(bytes) = std::fs::read(&name) else { continue };
        scanned += 1;
        for (i, form) in key_forms(pkcs8).iter().enumerate() {
            assert!(
                !bytes.windows(form.len()).any(|w| w == form.as_slice()),
                "{} holds the ticket signing key (form {i})",
                std::path::Path::new(&name).display()
            );
        }
    }
    assert!(scanned > 0, "no database file at {}", db.display());
}

fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o777
}

/// `pleiades-broker --config CONFIG ARGS`: its output, or its error.
fn broker_with(config: &std::path::Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_pleiades-broker"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env("PLEIADES_PASSWORD", "correct horse battery")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn config_file(
    dir: &std::path::Path,
    name: &str,
    db: &std::path::Path,
    state: &std::path::Path,
) -> std::path::PathBuf {
    let config = dir.join(name);
    std::fs::write(
        &config,
        format!("database = \"sqlite://{}\"\nstate_dir = \"{}\"\n", db.display(), state.display()),
    )
    .unwrap();
    config
}

/// Security review finding: the ticket signing key was stored in clear in the database, and
/// the state directory and database were made with the default permissions. Anyone who could
/// read the database (a backup, a dump) could sign tickets for every desktop.
#[test]
fn the_ticket_key_stays_out_of_the_database_and_the_state_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let db = state.join("broker.db");
    let config = config_file(dir.path(), "broker.toml", &db, &state);
    let pkcs8 = pleiades_protocol::ticket::TicketSigner::generate_pkcs8().unwrap();
    let signer = pleiades_protocol::ticket::TicketSigner::from_pkcs8(&pkcs8).unwrap();
    let key_path = dir.path().join("ticket.pk8");
    std::fs::write(&key_path, &pkcs8).unwrap();
    let public = broker_with(&config, &["ticket-key", &format!("--import={}", key_path.display())]).unwrap();
    assert_eq!(public.trim(), signer.public_key().to_base64());
    broker_with(&config, &["user", "add", "root", "--admin"]).unwrap();
    assert_eq!(broker_with(&config, &["ticket-key"]).unwrap().trim(), signer.public_key().to_base64());

    assert_database_lacks_key(&db, &pkcs8);
    assert_eq!(mode(&state), 0o700, "the state directory");
    assert_eq!(mode(&db), 0o600, "the database");
    let kept = state.join("ticket-key.pk8");
    assert_eq!(mode(&kept), 0o600, "the key file");
    assert_eq!(std::fs::read(&kept).unwrap(), pkcs8);

    // A fresh database makes its own key, also only in the state directory.
    let other_state = dir.path().join("other");
    let other_db = other_state.join("broker.db");
    let other = config_file(dir.path(), "other.toml", &other_db, &other_state);
    broker_with(&other, &["user", "add", "root", "--admin"]).unwrap();
    let made = std::fs::read(other_state.join("ticket-key.pk8")).unwrap();
    assert_database_lacks_key(&other_db, &made);
    assert_eq!((mode(&other_state), mode(&other_db)), (0o700, 0o600));

    // A key file others may read is refused, unless the admin imports that very file (it is
    // made private then).
    use std::os::unix::fs::PermissionsExt as _;
    let dropped = dir.path().join("dropped");
    std::fs::create_dir(&dropped).unwrap();
    let key_file = dropped.join("ticket-key.pk8");
    std::fs::write(&key_file, &pkcs8).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let third = config_file(dir.path(), "third.toml", &dropped.join("broker.db"), &dropped);
    let refused = broker_with(&third, &["ticket-key"]).unwrap_err();
    assert!(refused.contains("chmod 600"), "{refused}");
    let imported = broker_with(&third, &["ticket-key", &format!("--import={}", key_file.display())]).unwrap();
    assert_eq!(imported.trim(), signer.public_key().to_base64());
    assert_eq!(mode(&key_file), 0o600);
}

/// A database from before: its key moves out of the database into the state directory, and a
/// broker without that key file refuses to start on the database instead of signing with
/// another key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_key_kept_in_the_database_moves_to_the_state_directory() {
    use base64::Engine as _;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("legacy.db");
    let pkcs8 = pleiades_protocol::ticket::TicketSigner::generate_pkcs8().unwrap();
    let public = pleiades_protocol::ticket::TicketSigner::from_pkcs8(&pkcs8).unwrap().public_key();
    {
        let legacy = pleiades_broker::db::Db::connect(&format!("sqlite://{}", db.display())).await.unwrap();
        sqlx::query("INSERT INTO settings (key, value) VALUES ('ticket_signing_key_pkcs8', $1)")
            .bind(base64::engine::general_purpose::STANDARD.encode(&pkcs8))
            .execute(&legacy.pool)
            .await
            .unwrap();
        legacy.pool.close().await;
    }
    let state = dir.path().join("state");
    let config = config_file(dir.path(), "broker.toml", &db, &state);
    let printed = tokio::task::spawn_blocking(move || broker_with(&config, &["ticket-key"])).await.unwrap();
    assert_eq!(printed.unwrap().trim(), public.to_base64(), "the same key signs on");
    assert_database_lacks_key(&db, &pkcs8);
    assert_eq!(std::fs::read(state.join("ticket-key.pk8")).unwrap(), pkcs8);
    assert_eq!((mode(&state), mode(&state.join("ticket-key.pk8"))), (0o700, 0o600));

    // Another broker on this database without the key file: refused, with what to do.
    let elsewhere = config_file(dir.path(), "elsewhere.toml", &db, &dir.path().join("elsewhere"));
    let refused =
        tokio::task::spawn_blocking(move || broker_with(&elsewhere, &["ticket-key"])).await.unwrap();
    let why = refused.unwrap_err();
    assert!(why.contains("ticket-key.pk8") && why.contains(&public.to_base64()), "{why}");
}

/// Each pool of an admin pool listing by name, with its `field`.
fn pool_field(listed: &Value, field: &str) -> Vec<(String, Value)> {
    let pools = listed.as_array().expect("a list of pools");
    pools.iter().map(|p| (p["name"].as_str().unwrap().to_owned(), p[field].clone())).collect()
}
