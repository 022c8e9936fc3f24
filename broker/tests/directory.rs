//! Directory sign-in against a real OpenLDAP server (Debian's slapd, started by the test on
//! loopback with LDAPS from a test CA): users and groups come from the directory, groups are
//! usable in entitlements, and a directory that is wrong, unreachable or hostile to the
//! broker's assumptions is refused or contained. Needs the `slapd` package (`./dev deps`).

mod common;

use std::sync::Arc;

use common::directory::{GROUPS, TestDirectory, password, person};
use common::{Backend, Env, system};
use pleiades_broker::auth::ldap::{Directory, LdapConfig};
use pleiades_broker::error::Error;
use pleiades_broker::model::{PoolKind, PrincipalKind};
use serde_json::{Value, json};

on_both_databases!(directory_users_sign_in_with_their_groups);

async fn directory_users_sign_in_with_their_groups(backend: Backend) {
    let Some(dir) = TestDirectory::start("directory_users_sign_in_with_their_groups") else { return };
    let env = Env::with_directory(backend, dir.directory()).await;
    env.image("debian", 1024).await;
    let pool = env.pool("office", PoolKind::Floating, "debian", 4, 0).await;

    // An administrator entitles a directory group before any of its members has signed in:
    // the broker finds it in the directory and keeps it as the directory's.
    env.broker.entitle(&system(), &pool, PrincipalKind::Group, "engineering").await.unwrap();
    let e = env.broker.entitle(&system(), &pool, PrincipalKind::Group, "no-such-group").await.unwrap_err();
    assert!(matches!(e, Error::NotFound(ref m) if m.contains("neither the broker nor the directory")), "{e}");
    // A local group that shares a directory group's name stays local.
    env.broker.create_group(&system(), "staff").await.unwrap();

    // Alice signs in through the API with her directory password.
    let res = env
        .http
        .post(env.url("/api/v1/login"))
        .json(&json!({ "name": "alice", "password": password("alice") }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["user"]["source"], "ldap");
    assert_eq!(body["user"]["display_name"], "Alice Liddell");
    let token = body["token"].as_str().unwrap().to_owned();
    let pools: Value = env
        .http
        .get(env.url("/api/v1/pools"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = pools.as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["office"], "alice is entitled through the directory's engineering group");
    let row: (Option<String>, Option<String>) =
        sqlx::query_as("SELECT external_id, password_hash FROM users WHERE name = 'alice'")
            .fetch_one(&env.broker.db.pool)
            .await
            .unwrap();
    assert_eq!(row, (Some(person("alice")), None), "the DN is kept, no password hash ever");
    let groups = env.broker.list_groups(&system()).await.unwrap();
    let group = |name: &str| groups.iter().find(|g| g.name == name).unwrap().clone();
    assert_eq!(
        (group("engineering").source.as_str(), group("engineering").members.clone()),
        ("ldap", vec!["alice".to_owned()])
    );
    assert!(
        group("staff").members.is_empty(),
        "alice's directory posixGroup 'staff' must not fill the local 'staff'"
    );
    // The directory decides who is in its groups; the broker's administrators do not.
    let e = env.broker.add_group_member(&system(), "engineering", "bob").await;
    assert!(matches!(e, Err(Error::Invalid(ref m)) if m.contains("from the directory")), "{e:?}");

    // Bob is in the directory but in no entitled group: he signs in and sees no pool.
    let bob = env.broker.login("bob", &password("bob"), "192.0.2.10").await.unwrap();
    let bob_actor =
        pleiades_broker::model::Actor { user_id: bob.id.clone(), name: bob.name.clone(), is_admin: false };
    assert!(env.broker.entitled_pools(&bob_actor).await.unwrap().is_empty());
    assert!(!bob.is_admin);
    // Carol is in pleiades-admins: an administrator, as long as she is in it.
    let carol = env.broker.login("carol", &password("carol"), "192.0.2.11").await.unwrap();
    assert!(carol.is_admin);

    // The directory's spelling wins: ALICE is alice, not a second account.
    assert_eq!(
        env.broker.login("ALICE", &password("alice"), "192.0.2.12").await.unwrap().id,
        body["user"]["id"].as_str().unwrap()
    );

    // Refused: a wrong password, an empty one (an LDAP bind without a password "succeeds" as
    // an anonymous bind), an unknown name, an ambiguous one, filter syntax in the name.
    for (name, pw, what) in [
        ("alice", "wrong", "a wrong password"),
        ("alice", "", "an empty password"),
        ("nobody", "whatever", "an unknown name"),
        ("twin", &password("twin"), "a name two entries share"),
        ("*", &password("alice"), "a wildcard"),
        ("alice)(uid=*", &password("alice"), "filter syntax"),
    ] {
        match env.broker.login(name, pw, "192.0.2.20").await {
            Err(Error::Unauthenticated) => {}
            Err(Error::Unavailable(_)) if name == "twin" => {}
            other => panic!("{what}: {other:?}"),
        }
    }
    eprintln!(
        "refused: wrong password, empty password, unknown name, ambiguous name, wildcard, filter syntax"
    );

    // The directory changes: alice leaves engineering and joins design; carol leaves the
    // administrators. Their next sign-in follows.
    // (groupOfNames must keep a member: one who never signs in here.)
    let twin = format!("uid=twin,ou=one,{}", common::directory::PEOPLE);
    dir.modify(
        &format!("cn=engineering,{GROUPS}"),
        vec![ldap3::Mod::Replace("member", [twin.as_str()].into())],
    )
    .await;
    dir.modify(&format!("cn=design,{GROUPS}"), vec![ldap3::Mod::Add("memberUid", ["alice"].into())]).await;
    dir.modify(
        &format!("cn=pleiades-admins,{GROUPS}"),
        vec![ldap3::Mod::Replace("member", [person("bob").as_str()].into())],
    )
    .await;
    let alice = env.broker.login("alice", &password("alice"), "192.0.2.13").await.unwrap();
    let alice_actor = pleiades_broker::model::Actor {
        user_id: alice.id.clone(),
        name: alice.name.clone(),
        is_admin: false,
    };
    assert!(env.broker.entitled_pools(&alice_actor).await.unwrap().is_empty(), "no longer entitled");
    let groups = env.broker.list_groups(&system()).await.unwrap();
    let members =
        |name: &str| groups.iter().find(|g| g.name == name).map(|g| g.members.clone()).unwrap_or_default();
    assert_eq!(members("design"), ["alice"]);
    assert!(members("engineering").is_empty());
    assert!(!env.broker.login("carol", &password("carol"), "192.0.2.14").await.unwrap().is_admin);
    assert!(env.broker.login("bob", &password("bob"), "192.0.2.15").await.unwrap().is_admin);

    // A local account is never taken over by the directory's user of the same name.
    env.broker
        .create_user(&system(), "dave", "Local Dave", Some("dave-local-password"), false)
        .await
        .unwrap();
    assert!(env.broker.login("dave", &password("dave"), "192.0.2.16").await.is_err());
    assert_eq!(env.broker.login("dave", "dave-local-password", "192.0.2.16").await.unwrap().source, "local");

    let audit = env.broker.list_audit(&system(), 1000).await.unwrap();
    assert!(
        audit.iter().any(|e| e.action == "login" && e.actor == "alice" && e.detail.contains("directory"))
    );
    assert!(!audit.iter().any(|e| e.detail.contains(&password("alice"))), "no password in the audit log");
}

/// A broker on `config`'s directory, SQLite.
async fn broker_on(config: LdapConfig) -> Env {
    Env::with_directory(Backend::Sqlite, Arc::new(Directory::new(config).unwrap())).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_directory_that_is_wrong_or_gone_is_refused_and_counts_against_nobody() {
    common::bounded(async {
        let Some(dir) = TestDirectory::start("a_directory_that_is_wrong_or_gone_is_refused") else { return };
        // StartTLS on the plain port works as LDAPS does.
        let starttls = LdapConfig { url: dir.slapd.url(), starttls: true, ..dir.config() };
        let env = broker_on(starttls).await;
        assert_eq!(env.broker.login("alice", &password("alice"), "192.0.2.1").await.unwrap().name, "alice");

        // A directory whose certificate the configured CA did not sign: no password is sent.
        let env = broker_on(LdapConfig { ca_file: Some(dir.other_ca_file.clone()), ..dir.config() }).await;
        // A search account whose password is wrong.
        let wrong_search = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(wrong_search.path(), "not-the-password").unwrap();
        let env2 =
            broker_on(LdapConfig { bind_password_file: Some(wrong_search.path().into()), ..dir.config() })
                .await;
        // Nothing listens.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let env3 = broker_on(LdapConfig { url: format!("ldaps://127.0.0.1:{closed}"), ..dir.config() }).await;
        let limit = env.broker.settings.login_failures_per_user;
        for (broker, what) in [
            (&env.broker, "an untrusted certificate"),
            (&env2.broker, "a wrong search password"),
            (&env3.broker, "a closed port"),
        ] {
            // More attempts than the failure limit: each is "unavailable", none is rate-limited,
            // because an unreachable directory is not the user's failure.
            for _ in 0..=limit {
                match broker.login("alice", &password("alice"), "192.0.2.2").await {
                    Err(Error::Unavailable(_)) => {}
                    other => panic!("{what}: {other:?}"),
                }
            }
            let audit = broker.list_audit(&system(), 100).await.unwrap();
            assert!(audit.iter().any(|e| e.action == "login.error"), "{what}: audited");
        }
        // The portal says so, with 503.
        let res = env3
            .http
            .post(env3.url("/api/v1/login"))
            .json(&json!({ "name": "alice", "password": "x-directory" }))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 503);
        eprintln!("refused as unavailable: an untrusted certificate, a wrong search password, a closed port");
        // Local accounts go on when the directory is gone.
        env3.user("erin").await;
        assert!(env3.broker.login("erin", "erin-password", "192.0.2.3").await.is_ok());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn directory_guessing_is_rate_limited_like_local_guessing() {
    common::bounded(async {
        let Some(dir) = TestDirectory::start("directory_guessing_is_rate_limited_like_local_guessing") else {
            return;
        };
        let env = Env::with_directory(Backend::Sqlite, dir.directory()).await;
        let limit = env.broker.settings.login_failures_per_user;
        let mut refused = 0;
        for i in 0..limit + 5 {
            match env.broker.login("alice", &format!("guess-{i}"), "198.51.100.1").await {
                Err(Error::Unauthenticated) => {}
                Err(Error::RateLimited) => refused += 1,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(refused, 5, "the guesser's source is locked out of alice after {limit} failures");
        // ... and alice, from her own address, is not.
        assert!(env.broker.login("alice", &password("alice"), "198.51.100.2").await.is_ok());
    })
    .await
}
