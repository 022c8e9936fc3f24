//! Allocation on SQLite and PostgreSQL: floating and persistent pools, exhaustion, spares,
//! 50 parallel requests, lost hosts, idle and disconnect policy.

mod common;

use std::collections::HashSet;

use common::{Backend, Env, HostDouble, START, system};
use pleiades_broker::Error;
use pleiades_broker::model::{DesktopState, HostState, PoolKind, SessionState};
use pleiades_protocol::ticket::{PublicKey, TicketError, TicketVerifier};

on_both_databases!(
    floating,
    persistent,
    pool_exhausted,
    spares_refilled,
    parallel_requests_never_double_assign,
    host_lost_fails_desktops_and_reallocates,
    idle_and_disconnected_desktops_are_recycled,
    a_connected_desktop_whose_guest_is_idle_is_disconnected_and_recycled,
    admin_disconnect_then_resume,
    restart_and_vanished_vm,
    two_brokers_share_one_database,
    least_loaded_host_with_the_image,
    each_desktop_has_its_own_session_port,
    failing_starts_back_off_within_the_pool,
    recompose,
    commands_a_host_never_answers_time_out,
    an_answer_sent_twice_counts_once,
    clipboard_policy_reaches_the_host_and_denials_are_audited,
    file_transfer_policy_reaches_the_host_and_denials_are_audited,
    usb_policy_reaches_the_host_and_attaches_and_denials_are_audited,
    usb_auto_rules_reach_the_connection_file,
);

async fn floating(backend: Backend) {
    let env = Env::new(backend).await;
    env.image("debian", 1024).await;
    let mut host = HostDouble::register(&env, "host-a", 8192, &["debian"]).await;
    let pool = env.pool("office", PoolKind::Floating, "debian", 3, 0).await;
    let (_, alice) = env.user("alice").await;
    let (_, bob) = env.user("bob").await;
    env.entitle_user(&pool, "alice").await;
    env.entitle_user(&pool, "bob").await;

    let d = env.broker.request_desktop(&alice, &pool).await.unwrap();
    assert_eq!(d.state, DesktopState::Provisioning);
    assert!(matches!(env.broker.connect(&alice, &d.id).await, Err(Error::NotReady(_))));
    host.settle().await;
    assert_eq!(env.broker.desktop(&d.id).await.unwrap().state, DesktopState::InUse);
    assert_eq!(
        host.lock_on_disconnect.get(&d.id),
        Some(&true),
        "pools lock screens on disconnect by default"
    );
    assert_eq!(
        host.clipboard.get(&d.id),
        Some(&serde_json::json!({ "to_guest": true, "from_guest": true })),
        "pools let the clipboard carry both ways by default"
    );
    assert_eq!(
        host.file_transfer.get(&d.id),
        Some(&serde_json::json!(true)),
        "pools let the client send files by default"
    );
    assert_eq!(
        host.usb.get(&d.id),
        Some(&serde_json::json!("none")),
        "pools let no USB device in by default, and say so"
    );

    // A ticket that the host verifies once, bound to user, desktop and host.
    let conn = env.broker.connect(&alice, &d.id).await.unwrap();
    assert_eq!((conn.host.as_str(), conn.port), ("host-a.example", 4433));
    let key = PublicKey::from_base64(&host.reg.ticket_public_key).unwrap();
    let mut verifier = TicketVerifier::new(key, &host.reg.host_id);
    let claims = verifier.verify(&conn.ticket, START + 1).unwrap();
    assert_eq!((claims.user.as_str(), claims.desktop.as_str()), ("alice", d.id.as_str()));
    assert_eq!(verifier.verify(&conn.ticket, START + 2), Err(TicketError::Replayed));
    assert_eq!(
        TicketVerifier::new(key, "another-host").verify(&conn.ticket, START + 1),
        Err(TicketError::WrongHost)
    );
    assert_eq!(key.verify_stateless(&conn.ticket, &host.reg.host_id, START + 61), Err(TicketError::Expired));

    // Asking again gives the same desktop.
    assert_eq!(env.broker.request_desktop(&alice, &pool).await.unwrap().id, d.id);
    // The admin turns the screen lock off: the desktop's next boot is told so.
    let unlocked =
        pleiades_broker::model::PoolSpec { lock_on_disconnect: false, ..spec(&env, &pool, 3, 0).await };
    env.broker.update_pool(&system(), &pool, &unlocked, true).await.unwrap();
    // Logging off reverts it; the next user gets it fresh.
    env.broker.release(&alice, &d.id).await.unwrap();
    assert_eq!(env.broker.desktop(&d.id).await.unwrap().state, DesktopState::Recycling);
    host.settle().await;
    assert!(host.commands_seen.contains(&("recycle".into(), d.id.clone())));
    assert_eq!(host.lock_on_disconnect.get(&d.id), Some(&false));
    let ready = env.broker.desktop(&d.id).await.unwrap();
    assert_eq!((ready.state, ready.user_id), (DesktopState::Ready, None));
    let for_bob = env.broker.request_desktop(&bob, &pool).await.unwrap();
    assert_eq!((for_bob.id.as_str(), for_bob.state), (d.id.as_str(), DesktopState::InUse));
    assert!(matches!(env.broker.connect(&alice, &d.id).await, Err(Error::Forbidden)));
}

async fn persistent(backend: Backend) {
    let env = Env::new(backend).await;
    env.image("debian", 1024).await;
    let mut host = HostDouble::register(&env, "host-a", 8192, &["debian"]).await;
    let pool = env.pool("dev", PoolKind::Persistent, "debian", 5, 1).await;
    let (_, alice) = env.user("alice").await;
    let (_, bob) = env.user("bob").await;
    env.entitle_user(&pool, "alice").await;
    env.entitle_user(&pool, "bob").await;
    env.broker.maintain().await.unwrap();
    host.settle().await;

    let a = env.broker.request_desktop(&alice, &pool).await.unwrap();
    assert_eq!(a.owner_id.as_deref(), Some(alice.user_id.as_str()));
    assert_eq!(a.state, DesktopState::InUse, "the spare was ready");
    env.broker.release(&alice, &a.id).await.unwrap();
    let kept = env.broker.desktop(&a.id).await.unwrap();
    assert_eq!((kept.state, kept.owner_id.as_deref()), (DesktopState::Ready, Some(alice.user_id.as_str())));
    // Bob never gets Alice's desktop, even while it is ready and unused.
    host.settle().await;
    let b = env.broker.request_desktop(&bob, &pool).await.unwrap();
    assert_ne!(b.id, a.id);
    assert!(matches!(env.broker.connect(&bob, &a.id).await, Err(Error::Forbidden)));
    // Alice comes back to hers.
    assert_eq!(env.broker.request_desktop(&alice, &pool).await.unwrap().id, a.id);
    assert_eq!(env.broker.my_desktops(&alice).await.unwrap().len(), 1);
}

async fn pool_exhausted(backend: Backend) {
    let env = Env::new(backend).await;
    env.image("debian", 1024).await;
    let mut host = HostDouble::register(&env, "host-a", 8192, &["debian"]).await;
    let pool = env.pool("small", PoolKind::Floating, "debian", 1, 0).await;
    let (_, alice) = env.user("alice").await;
    let (_, bob) = env.user("bob").await;
    env.entitle_user(&pool, "alice").await;
    env.entitle_user(&pool, "bob").await;
    env.broker.request_desktop(&alice, &pool).await.unwrap();
    host.settle().await;
    assert!(matches!(env.broker.request_desktop(&bob, &pool).await, Err(Error::PoolExhausted(_))));
    // Over the API: 409 with a message.
    let token = env.api_login("bob").await;
    let res = env
        .http
        .post(env.url(&format!("/api/v1/pools/{pool}/desktop")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 409);
    // A host without room: a big image on a small host.
    env.image("huge", 65536).await;
    let big = env.pool("big", PoolKind::Floating, "huge", 2, 0).await;
    env.entitle_user(&big, "bob").await;
    assert!(matches!(env.broker.request_desktop(&bob, &big).await, Err(Error::NoCapacity(_))));
}

async fn spares_refilled(backend: Backend) {
    let env = Env::new(backend).await;
    env.image("debian", 512).await;
    let mut host = HostDouble::register(&env, "host-a", 8192, &["debian"]).await;
    let pool = env.pool("office", PoolKind::Floating, "debian", 5, 2).await;
    let (_, alice) = env.user("alice").await;
    env.entitle_user(&pool, "alice").await;
    env.broker.maintain().await.unwrap();
    host.settle().await;
    let ready =
        |ds: &[pleiades_broker::model::Desktop]| ds.iter().filter(|d| d.state == DesktopState::Ready).count();
    let all = env.broker.list_desktops(&system()).await.unwrap();
    assert_eq!((all.len(), ready(&all)), (2, 2));
    let mine = env.broker.request_desktop(&alice, &pool).await.unwrap();
    assert_eq!(mine.state, DesktopState::InUse);
    host.settle().await;
    let all = env.broker.list_desktops(&system()).await.unwrap();
    assert_eq!((all.len(), ready(&all)), (3, 2), "a spare replaced the one taken");
    // maintain() is idempotent.
    env.broker.maintain().await.unwrap();
    assert_eq!(env.broker.list_desktops(&system()).await.unwrap().len(), 3);
}

async fn parallel_requests_never_double_assign(backend: Backend) {
    let env = Env::new(backend).await;
    env.image("debian", 256).await;
    let mut host = HostDouble::register(&env, "host-a", 1 << 20, &["debian"]).await;
    // 20 ready desktops, room for 30 more: 50 users race for them.
    let pool = env.pool("race", PoolKind::Floating, "debian", 50, 20).await;
    env.broker.create_group(&system(), "everyone").await.unwrap();
    env.broker
        .entitle(&system(), &pool, pleiades_broker::model::PrincipalKind::Group, "everyone")
        .await
        .unwrap();
    let mut actors = Vec::new();
    for i in 0..50 {
        let name = format!("user{i:02}");
        // No password: these users never log in, and argon2 would dominate the test.
        let user = env.broker.create_user(&system(), &name, "", None, false).await.unwrap();
        env.broker.add_group_member(&system(), "everyone", &name).await.unwrap();
        actors.push(pleiades_broker::model::Actor { user_id: user.id, name, is_admin: false });
    }
    env.broker.maintain().await.unwrap();
    host.settle().await;
    // Spares are refilled after each allocation; stop that from racing the test's counts.
    env.broker.update_pool(&system(), &pool, &spec(&env, &pool, 50, 0).await, true).await.unwrap();

    let broker = env.broker.clone();
    let started = std::time::Instant::now();
    let tasks: Vec<_> = actors
        .iter()
        .cloned()
        .map(|a| {
            let broker = broker.clone();
            let pool = pool.clone();
            tokio::spawn(async move { (a.user_id.clone(), broker.request_desktop(&a, &pool).await) })
        })
        .collect();
    let mut given = HashSet::new();
    for t in tasks {
        let (user, result) = t.await.unwrap();
        let d = result.unwrap_or_else(|e| panic!("{user}: {e}"));
        assert_eq!(d.user_id.as_deref(), Some(user.as_str()));
        assert!(given.insert(d.id.clone()), "desktop {} given twice", d.id);
    }
    assert_eq!(given.len(), 50);
    // A figure for the record, never asserted on.
    eprintln!("{backend:?}: 50 parallel allocations (20 claimed, 30 provisioned) in {:?}", started.elapsed());
    assert_in_db_each_desktop_has_one_user(&env).await;

    // A full pool: 50 more users race for 0 desktops; one user racing with themself.
    let second = env.pool("tight", PoolKind::Floating, "debian", 10, 0).await;
    env.broker
        .entitle(&system(), &second, pleiades_broker::model::PrincipalKind::Group, "everyone")
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for a in actors.iter().cloned().chain(std::iter::repeat_n(actors[0].clone(), 9)) {
        let broker = broker.clone();
        let pool = second.clone();
        tasks.push(tokio::spawn(async move { (a.user_id.clone(), broker.request_desktop(&a, &pool).await) }));
    }
    let (mut won, mut exhausted) = (HashSet::new(), 0);
    let mut first_user = HashSet::new();
    for t in tasks {
        let (user, result) = t.await.unwrap();
        match result {
            Ok(d) => {
                if user == actors[0].user_id {
                    first_user.insert(d.id.clone());
                } else {
                    assert!(won.insert(d.id.clone()), "desktop {} given twice", d.id);
                }
            }
            Err(Error::PoolExhausted(_)) => exhausted += 1,
            Err(e) => panic!("{user}: {e}"),
        }
    }
    assert!(first_user.len() <= 1, "one user, one desktop: {first_user:?}");
    assert!(won.is_disjoint(&first_user));
    assert_eq!(won.len() + first_user.len(), 10);
    assert!(exhausted >= 40);
    assert_in_db_each_desktop_has_one_user(&env).await;
}

async fn spec(env: &Env, pool: &str, max: i64, spares: i64) -> pleiades_broker::model::PoolSpec {
    let p = env.broker.pool(pool).await.unwrap();
    pleiades_broker::model::PoolSpec {
        name: p.name,
        display_name: p.display_name,
        kind: p.kind,
        image: "debian".into(),
        min_size: 0,
        max_size: max,
        spares,
        idle_timeout_secs: p.idle_timeout_secs,
        disconnect_timeout_secs: p.disconnect_timeout_secs,
        network: p.network.clone(),
        lock_on_disconnect: p.lock_on_disconnect,
        clipboard_to_guest: p.clipboard_to_guest,
        clipboard_from_guest: p.clipboard_from_guest,
        file_transfer: p.file_transfer,
        usb: p.usb,
        usb_auto: p.usb_auto,
    }
}

async fn assert_in_db_each_desktop_has_one_user(env: &Env) {
    let all = env.broker.list_desktops(&system()).await.unwrap();
    let mut per_pool_user = HashSet::new();
    for d in all.iter().filter(|d| d.user_id.is_some()) {
        assert!(
            per_pool_user.insert((d.pool_id.clone(), d.user_id.clone())),
            "a user holds two desktops of one pool"
        );
    }
    let active: Vec<_> = env.broker.list_sessions(&system(), true).await.unwrap();
    let mut desktops = HashSet::new();
    for s in &active {
        assert!(desktops.insert(s.desktop_id.clone()), "two live sessions on {}", s.desktop_name);
    }
}

async fn host_lost_fails_desktops_and_reallocates(backend: Backend) {
    let env = Env::new(backend).await;
    env.image("debian", 1024).await;
    let mut a = HostDouble::register(&env, "host-a", 8192, &["debian"]).await;
    let mut b = HostDouble::register(&env, "host-b", 8192, &["debian"]).await;
    let floating = env.pool("office", PoolKind::Floating, "debian", 4, 0).await;
    let persistent = env.pool("dev", PoolKind::Persistent, "debian", 4, 0).await;
    let (_, alice) = env.user("alice").await;
    for p in [&floating, &persistent] {
        env.entitle_user(p, "alice").await;
    }
    let d1 = env.broker.request_desktop(&alice, &floating).await.unwrap();
    let d2 = env.broker.request_desktop(&alice, &persistent).await.unwrap();
    a.settle().await;
    b.settle().await;
    let lost_host = d1.host_id.clone().unwrap();
    // d1 went to the emptier host; that one will go silent.
    let (mut lost, mut alive) = if lost_host == a.reg.host_id { (a, b) } else { (b, a) };
    env.clock.advance(20);
    alive.tick().await;
    lost.tick().await;
    env.clock.advance(20);
    alive.tick().await; // `lost` stays silent from here on
    env.broker.maintain().await.unwrap();
    assert_eq!(
        env.broker.host(&lost.reg.host_id).await.unwrap().state,
        HostState::Online,
        "20 s < 30 s timeout"
    );
    env.clock.advance(15);
    alive.tick().await;
    env.broker.maintain().await.unwrap();
    assert_eq!(env.broker.host(&lost.reg.host_id).await.unwrap().state, HostState::Lost);
    for d in [&d1, &d2] {
        let now = env.broker.desktop(&d.id).await.unwrap();
        let expected = if d.host_id.as_deref() == Some(lost.reg.host_id.as_str()) {
            DesktopState::Failed
        } else {
            DesktopState::InUse
        };
        assert_eq!(now.state, expected, "{}", d.name);
    }
    assert!(
        env.broker
            .list_sessions(&system(), false)
            .await
            .unwrap()
            .iter()
            .any(|s| s.end_reason.as_deref() == Some("host_lost"))
    );
    // The user asks again: the same desktop, started again on the live host, for both pool
    // kinds (a persistent desktop is the user's own, a failed one is never replaced by another).
    for (p, old) in [(&floating, &d1), (&persistent, &d2)] {
        let again = env.broker.request_desktop(&alice, p).await.unwrap();
        assert_eq!(again.id, old.id);
        if old.host_id.as_deref() == Some(lost.reg.host_id.as_str()) {
            assert_eq!(again.host_id.as_deref(), Some(alive.reg.host_id.as_str()));
            assert_eq!(again.state, DesktopState::Provisioning);
            assert!(again.last_error.as_deref().is_some_and(|e| e.contains("was lost")), "{again:?}");
        }
    }
    alive.settle().await;
    // The lost host comes back: VMs of failed desktops are stopped.
    lost.tick().await;
    lost.settle().await;
    assert!(lost.vms.is_empty(), "stale VMs stopped: {:?}", lost.vms);
    assert_eq!(env.broker.host(&lost.reg.host_id).await.unwrap().state, HostState::Online);
}

async fn idle_and_disconnected_desktops_are_recycled(backend: Backend) {
    let env = Env::new(backend).await;
    env.image("debian", 1024).await;
    let mut host = HostDouble::register(&env, "host-a", 8192, &["debian"]).await;
    let pool = env.pool("office", PoolKind::Floating, "debian", 3, 0).await; // idle 600 s, disconnected 300 s
    let (_, alice) = env.user("alice").await;
    env.entitle_user(&pool, "alice").await;
    let d = env.broker.request_desktop(&alice, &pool).await.unwrap();
    host.settle().await;
    // Connected clients keep the desktop busy.
    host.vms.get_mut(&d.id).unwrap().connected = true;
    for _ in 0..4 {
        env.clock.advance(200);
        host.tick().await;
        env.broker.maintain().await.unwrap();
    }
    assert_eq!(env.broker.desktop(&d.id).await.unwrap().state, DesktopState::InUse);
    // The client goes away: idle → disconnected; the user resumes the same desktop.
    host.vms.get_mut(&d.id).unwrap().connected = false;
    for _ in 0..4 {
        env.clock.advance(200);
        host.tick().await;
        env.broker.maintain().await.unwrap();
    }
    assert_eq!(env.broker.desktop(&d.id).await.unwrap().state, DesktopState::Disconnected);
    assert_eq!(env.broker.request_desktop(&alice, &pool).await.unwrap().id, d.id);
    assert_eq!(env.broker.desktop(&d.id).await.unwrap().state, DesktopState::InUse);
    // Idle again, then disconnected too long: recycled for the next user.
    for _ in 0..7 {
        env.clock.advance(100);
        host.tick().await;
        env.broker.maintain().await.unwrap();
    }
    assert_eq!(env.broker.desktop(&d.id).await.unwrap().state, DesktopState::Disconnected);
    for _ in 0..4 {
        env.clock.advance(100);
        host.tick().await;
        env.broker.maintain().await.unwrap();
    }
    assert_eq!(env.broker.desktop(&d.id).await.unwrap().state, DesktopState::Recycling);
    host.settle().await;
    let d = env.broker.desktop(&d.id).await.unwrap();
    assert_eq!((d.state, d.user_id), (DesktopState::Ready, None));
}

async fn a_connected_desktop_whose_guest_is_idle_is_disconnected_and_recycled(backend: Backend) {
    let env = Env::new(backend).await;
    env.image("debian", 1024).await;
    let mut host = HostDouble::register(&env, "host-a", 8192, &["debian"]).await;
    let pool = env.pool("office", PoolKind::Floating, "debian", 3, 0).await; // idle 600 s, disconnected 300 s
    let (_, alice) = env.user("alice").await;
    let (_, root) = env.admin("root").await;
    env.entitle_user(&pool, "alice").await;
    let d = env.broker.request_desktop(&alice, &pool).await.unwrap();
    host.settle().await;
    // A client stays connected, and the user types now and then: busy.
    let vm = host.vms.get_mut(&d.id).unwrap();
    (vm.connected, vm.guest_idle) = (true, Some(30));
    for _ in 0..6 {
        env.clock.advance(200);
        host.tick().await;
        env.broker.maintain().await.unwrap();
    }
    let busy = env.broker.desktop(&d.id).await.unwrap();
    assert_eq!(busy.state, DesktopState::InUse);
    let guest = busy.guest.expect("the guest's report is kept");
    assert_eq!((guest.user.as_deref(), guest.idle_secs), (Some("alice"), Some(30)));
    // The guest's log-in is audited once, however many heartbeats report it.
    let audit = env.broker.list_audit(&root, 100).await.unwrap();
    let logins: Vec<_> = audit.iter().filter(|e| e.action == "guest.login").collect();
    assert_eq!(logins.len(), 1, "{audit:?}");
    assert_eq!((logins[0].target.as_str(), logins[0].detail.as_str()), (d.id.as_str(), "alice"));
    // The client stays connected but nobody touches the guest: the guest's idle time, not the
    // connection, decides. Disconnected (the client is sent away), then recycled.
    let mut idle = 30;
    for _ in 0..4 {
        env.clock.advance(200);
        idle += 200;
        host.vms.get_mut(&d.id).unwrap().guest_idle = Some(idle);
        host.tick().await;
        env.broker.maintain().await.unwrap();
    }
    assert_eq!(env.broker.desktop(&d.id).await.unwrap().state, DesktopState::Disconnected);
    host.settle().await;
    assert!(host.commands_seen.contains(&("disconnect".into(), d.id.clone())), "the client was sent away");
    assert!(!host.vms[&d.id].connected);
    let audit = env.broker.list_audit(&root, 100).await.unwrap();
    assert!(audit.iter().any(|e| e.action == "desktop.idle" && e.target == d.id), "{audit:?}");
    for _ in 0..4 {
        env.clock.advance(100);
        host.tick().await;
        env.broker.maintain().await.unwrap();
    }
    host.settle().await;
    let recycled = env.broker.desktop(&d.id).await.unwrap();
    assert_eq!((recycled.state, recycled.user_id), (DesktopState::Ready, None));
    assert!(host.booted.iter().any(|(kind, id, _)| kind == "recycle" && *id == d.id), "{:?}", host.booted);
}

async fn admin_disconnect_then_resume(backend: Backend) {
    let env = Env::new(backend).await;
    env.image("debian", 1024).await;
    let mut host = HostDouble::register(&env, "host-a", 8192, &["debian"]).await;
    let pool = env.pool("office", PoolKind::Floating, "debian", 3, 0).await;
    let (_, alice) = env.user("alice").await;
    let (_, root) = env.admin("root").await;
    env.entitle_user(&pool, "alice").await;
    let d = env.broker.request_desktop(&alice, &pool).await.unwrap();
    host.settle().await;
    host.vms.get_mut(&d.id).unwrap().connected = true;
    let sessions = env.broker.list_sessions(&root, true).await.unwrap();
    assert_eq!(sessions.len(), 1);
    env.broker.disconnect_session(&root, &sessions[0].id).await.unwrap();
    host.settle().await;
    assert!(host.commands_seen.contains(&("disconnect".into(), d.id.clone())));
    assert!(!host.vms[&d.id].connected);
    assert_eq!(env.broker.desktop(&d.id).await.unwrap().state, DesktopState::Disconnected);
    // Resuming: the same desktop, the same session.
    let conn = env.broker.connect(&alice, &d.id).await.unwrap();
    assert_eq!(conn.desktop, d.name);
    let sessions = env.broker.list_sessions(&root, true).await.unwrap();
    assert_eq!((sessions.len(), sessions[0].state), (1, SessionState::Active));
    let audit = env.broker.list_audit(&root, 100).await.unwrap();
    assert!(audit.iter().any(|e| e.action == "session.disconnect" && e.actor == "root"));
}

async fn least_loaded_host_with_the_image(backend: Backend) {
    let env = Env::new(backend).await;
    env.image("debian", 1024).await;
    env.image("windows", 1024).await;
    let mut a = HostDouble::register(&env, "host-a", 4096, &["debian"]).await;
    let mut b = HostDouble::register(&env, "host-b", 16384, &["debian", "windows"]).await;
    let deb = env.pool("deb", PoolKind::Floating, "debian", 10, 0).await;
    let win = env.pool("win", PoolKind::Floating, "windows", 10, 0).await;
    let mut on = std::collections::HashMap::<String, usize>::new();
    for i in 0..6 {
        let (_, u) = env.user(&format!("u{i}")).await;
        env.entitle_user(&deb, &u.name).await;
        let d = env.broker.request_desktop(&u, &deb).await.unwrap();
        *on.entry(d.host_id.unwrap()).or_default() += 1;
    }
    // 4 GiB vs 16 GiB: by memory load, b takes most of them.
    assert!(on[&b.reg.host_id] > on.get(&a.reg.host_id).copied().unwrap_or(0), "{on:?}");
    let (_, w) = env.user("w").await;
    env.entitle_user(&win, "w").await;
    let d = env.broker.request_desktop(&w, &win).await.unwrap();
    assert_eq!(d.host_id.as_deref(), Some(b.reg.host_id.as_str()), "only b has the image");
    a.settle().await;
    b.settle().await;
    let hosts = env.broker.list_hosts(&system()).await.unwrap();
    assert_eq!(hosts.iter().map(|h| h.desktops).sum::<i64>(), 7);
}

async fn restart_and_vanished_vm(backend: Backend) {
    let env = Env::new(backend).await;
    env.image("debian", 1024).await;
    let mut host = HostDouble::register(&env, "host-a", 8192, &["debian"]).await;
    let pool = env.pool("dev", PoolKind::Persistent, "debian", 3, 0).await;
    let (_, alice) = env.user("alice").await;
    env.entitle_user(&pool, "alice").await;
    let d = env.broker.request_desktop(&alice, &pool).await.unwrap();
    host.settle().await;
    // Restart: the host stops and starts the VM; the desktop comes back in use.
    env.broker.restart(&alice, &d.id).await.unwrap();
    assert_eq!(env.broker.desktop(&d.id).await.unwrap().state, DesktopState::Provisioning);
    host.settle().await;
    assert!(host.commands_seen.contains(&("restart".into(), d.id.clone())));
    assert_eq!(host.vms[&d.id].starts, 2);
    assert_eq!(env.broker.desktop(&d.id).await.unwrap().state, DesktopState::InUse);
    // Heartbeats that miss a just-settled desktop do not fail it (a start ack may race them)…
    host.vms.clear();
    host.tick().await;
    assert_eq!(env.broker.desktop(&d.id).await.unwrap().state, DesktopState::InUse);
    // …but a VM gone for good does: failed, with the reason, and started again for its owner.
    env.clock.advance(11);
    host.tick().await;
    let failed = env.broker.desktop(&d.id).await.unwrap();
    assert_eq!(failed.state, DesktopState::Failed);
    assert!(failed.last_error.as_deref().is_some_and(|e| e.contains("no longer runs")), "{failed:?}");
    let again = env.broker.request_desktop(&alice, &pool).await.unwrap();
    assert_eq!((again.id.as_str(), again.state), (d.id.as_str(), DesktopState::Provisioning));
    host.settle().await;
    let back = env.broker.desktop(&d.id).await.unwrap();
    assert_eq!((back.state, back.start_failures, back.last_error), (DesktopState::InUse, 0, None));
    let audit = env.broker.list_audit(&system(), 100).await.unwrap();
    assert!(audit.iter().any(|e| e.action == "desktop.vanished" && e.target == d.name));
}

async fn two_brokers_share_one_database(backend: Backend) {
    let env = Env::new(backend).await;
    let other = env.second_broker().await;
    // One signing key for all brokers on a database: hosts verify either's tickets.
    assert_eq!(other.ticket_public_key(), env.broker.ticket_public_key());
    env.image("debian", 256).await;
    let mut host = HostDouble::register(&env, "host-a", 1 << 20, &["debian"]).await;
    let pool = env.pool("shared", PoolKind::Floating, "debian", 30, 4).await;
    env.broker.create_group(&system(), "all").await.unwrap();
    env.broker.entitle(&system(), &pool, pleiades_broker::model::PrincipalKind::Group, "all").await.unwrap();
    let mut actors = Vec::new();
    for i in 0..24 {
        let name = format!("u{i:02}");
        let user = env.broker.create_user(&system(), &name, "", None, false).await.unwrap();
        env.broker.add_group_member(&system(), "all", &name).await.unwrap();
        actors.push(pleiades_broker::model::Actor { user_id: user.id, name, is_admin: false });
    }
    // Both brokers run maintenance at once: spares are not provisioned twice.
    let (a, b) = tokio::join!(env.broker.maintain(), other.maintain());
    a.unwrap();
    b.unwrap();
    assert_eq!(env.broker.list_desktops(&system()).await.unwrap().len(), 4);
    host.settle().await;
    // Requests split across both brokers never share a desktop.
    let tasks: Vec<_> = actors
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, actor)| {
            let broker = if i % 2 == 0 { env.broker.clone() } else { other.clone() };
            let pool = pool.clone();
            tokio::spawn(async move { broker.request_desktop(&actor, &pool).await })
        })
        .collect();
    let mut given = HashSet::new();
    for t in tasks {
        let d = t.await.unwrap().unwrap();
        assert!(given.insert(d.id.clone()), "desktop {} given twice", d.id);
    }
    assert_eq!(given.len(), 24);
    assert!(env.broker.list_desktops(&system()).await.unwrap().len() <= 30);
    assert_in_db_each_desktop_has_one_user(&env).await;
}

/// `pleiades-host serve` runs one session server per desktop: heartbeats and start
/// acknowledgements carry the desktop's port, connections use it, and a host cannot set the
/// port of another host's desktop.
async fn each_desktop_has_its_own_session_port(backend: Backend) {
    let env = Env::new(backend).await;
    env.image("debian", 1024).await;
    let mut host = HostDouble::register(&env, "host-a", 8192, &["debian"]).await;
    let other = HostDouble::register(&env, "host-b", 8192, &["other"]).await;
    let pool = env.pool("office", PoolKind::Floating, "debian", 3, 0).await;
    let (_, alice) = env.user("alice").await;
    let (_, bob) = env.user("bob").await;
    env.entitle_user(&pool, "alice").await;
    env.entitle_user(&pool, "bob").await;
    let a = env.broker.request_desktop(&alice, &pool).await.unwrap();
    let b = env.broker.request_desktop(&bob, &pool).await.unwrap();
    host.settle().await;
    // No port reported: the host's session_port.
    assert_eq!(env.broker.connect(&alice, &a.id).await.unwrap().port, 4433);

    let post = |path: String, credential: String, body: serde_json::Value| {
        let http = env.http.clone();
        let url = env.url(&path);
        async move {
            let res = http.post(url).bearer_auth(credential).json(&body).send().await.unwrap();
            assert!(res.status().is_success(), "{path}: {}", res.status());
            res.text().await.unwrap()
        }
    };
    let beat = |desktops: serde_json::Value| serde_json::json!({ "cores": 8, "memory_mib": 8192, "images": ["debian"], "desktops": desktops });
    let cred = host.reg.credential.clone();
    post(
        "/api/v1/hosts/heartbeat".into(),
        cred.clone(),
        beat(serde_json::json!([{ "id": a.id, "port": 47001 }, { "id": b.id, "port": 47002 }])),
    )
    .await;
    assert_eq!(env.broker.connect(&alice, &a.id).await.unwrap().port, 47001);
    assert_eq!(env.broker.connect(&bob, &b.id).await.unwrap().port, 47002);

    // A restart's acknowledgement carries the new port.
    env.broker.restart(&alice, &a.id).await.unwrap();
    let reply = post(
        "/api/v1/hosts/heartbeat".into(),
        cred.clone(),
        beat(serde_json::json!([{ "id": a.id, "port": 47001 }, { "id": b.id, "port": 47002 }])),
    )
    .await;
    let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
    let restart = reply["commands"].as_array().unwrap().iter().find(|c| c["kind"] == "restart").unwrap();
    let ack = format!("/api/v1/hosts/commands/{}/ack", restart["id"].as_str().unwrap());
    post(ack, cred, serde_json::json!({ "ok": true, "port": 47005 })).await;
    assert_eq!(env.broker.desktop(&a.id).await.unwrap().state, DesktopState::InUse);
    assert_eq!(env.broker.connect(&alice, &a.id).await.unwrap().port, 47005);

    // Another host reporting the desktop changes nothing (and is told to stop it).
    let reply = post(
        "/api/v1/hosts/heartbeat".into(),
        other.reg.credential.clone(),
        serde_json::json!({ "cores": 8, "memory_mib": 8192, "desktops": [{ "id": a.id, "port": 1 }] }),
    )
    .await;
    assert!(reply.contains("\"stop\""), "{reply}");
    assert_eq!(env.broker.connect(&alice, &a.id).await.unwrap().port, 47005);
}

/// An image the host cannot start: every start fails. The pool never holds more desktops than
/// its maximum, each is retried with a doubling wait (not in a loop), the host's reason reaches
/// the API, and once the host can start them they come up and their failure count resets.
async fn failing_starts_back_off_within_the_pool(backend: Backend) {
    let env = Env::new(backend).await;
    env.image("broken", 512).await;
    let mut host = HostDouble::register(&env, "host-a", 8192, &["broken"]).await;
    let reason = "pleiades-host: cannot load the kernel /images/vmlinuz: not a bzImage";
    host.fail_starts = Some(reason.into());
    let pool = env.pool("office", PoolKind::Floating, "broken", 3, 2).await;
    let (_, alice) = env.user("alice").await;
    env.entitle_user(&pool, "alice").await;
    let in_pool = |all: Vec<pleiades_broker::model::Desktop>| -> Vec<_> {
        all.into_iter().filter(|d| d.pool_id == pool).collect()
    };
    // Ten minutes of maintenance rounds, five seconds apart, the host answering each.
    for _ in 0..120 {
        env.broker.maintain().await.unwrap();
        host.settle().await;
        let desktops = in_pool(env.broker.list_desktops(&system()).await.unwrap());
        assert!(desktops.len() <= 3, "the pool's maximum bounds failed desktops too: {}", desktops.len());
        env.clock.advance(5);
    }
    let starts = host.commands_seen.iter().filter(|(kind, _)| kind == "start").count();
    // Waits of 0, 5, 10, 20, … 300 s: at most 9 starts each in 600 s (120 without a wait).
    assert!((3 * 3..=3 * 10).contains(&starts), "{starts} starts of 3 desktops in 10 minutes");
    let desktops = in_pool(env.broker.list_desktops(&system()).await.unwrap());
    assert_eq!(desktops.len(), 3);
    for d in &desktops {
        assert_eq!(d.state, DesktopState::Failed);
        assert_eq!(d.last_error.as_deref(), Some(reason));
        assert!(d.start_failures >= 3, "{d:?}");
    }
    // The user is told why, over the API too (503), instead of waiting for a desktop.
    env.broker.maintain().await.unwrap();
    host.settle().await;
    match env.broker.request_desktop(&alice, &pool).await {
        Err(Error::StartFailing { reason: why, retry_in_secs, .. }) => {
            assert_eq!(why, reason);
            assert!(retry_in_secs > 0);
        }
        other => panic!("expected the host's reason, got {other:?}"),
    }
    let token = env.api_login("alice").await;
    let res = env
        .http
        .post(env.url(&format!("/api/v1/pools/{pool}/desktop")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert!(res.text().await.unwrap().contains("not a bzImage"));
    let (_, admin) = env.admin("root").await;
    let hosts = env.broker.list_hosts(&admin).await.unwrap();
    assert!(hosts[0].last_error.as_deref().is_some_and(|e| e.contains("not a bzImage")), "{hosts:?}");

    // The image is fixed: the desktops start at their next try and forget their failures.
    host.fail_starts = None;
    env.clock.advance(300);
    host.tick().await; // Still online after the wait.
    env.broker.maintain().await.unwrap();
    host.settle().await;
    let desktops = in_pool(env.broker.list_desktops(&system()).await.unwrap());
    assert_eq!(desktops.len(), 3);
    for d in &desktops {
        assert_eq!((d.state, d.start_failures, d.last_error.as_deref()), (DesktopState::Ready, 0, None));
    }
    let mine = env.broker.request_desktop(&alice, &pool).await.unwrap();
    assert_eq!(mine.state, DesktopState::InUse);
}

/// A pool's new image reaches its floating desktops at their next recycle; a persistent
/// desktop keeps its image across restarts until an admin recomposes it or its owner resets it.
async fn recompose(backend: Backend) {
    let env = Env::new(backend).await;
    env.image("debian", 1024).await;
    env.image("debian-v2", 1024).await;
    let mut host = HostDouble::register(&env, "host-a", 8192, &["debian", "debian-v2"]).await;
    let office = env.pool("office", PoolKind::Floating, "debian", 3, 0).await;
    let dev = env.pool("dev", PoolKind::Persistent, "debian", 3, 0).await;
    let (_, alice) = env.user("alice").await;
    let (_, bob) = env.user("bob").await;
    let (_, admin) = env.admin("root").await;
    env.entitle_user(&office, "alice").await;
    env.entitle_user(&dev, "bob").await;
    let f = env.broker.request_desktop(&alice, &office).await.unwrap();
    let p = env.broker.request_desktop(&bob, &dev).await.unwrap();
    host.settle().await;
    let booted = |host: &HostDouble, id: &str| -> Vec<(String, String)> {
        host.booted.iter().filter(|(_, d, _)| d == id).map(|(k, _, i)| (k.clone(), i.clone())).collect()
    };
    assert_eq!(booted(&host, &f.id), [("start".into(), "debian".into())]);
    // The heartbeat's disk usage is kept for the admin console and the portal.
    assert_eq!(env.broker.desktop(&f.id).await.unwrap().disk_bytes, Some(common::DISK_BYTES));

    for pool in [&office, &dev] {
        let spec =
            pleiades_broker::model::PoolSpec { image: "debian-v2".into(), ..spec(&env, pool, 3, 0).await };
        env.broker.update_pool(&admin, pool, &spec, true).await.unwrap();
    }
    // Floating: the next recycle boots the new image.
    assert!(matches!(env.broker.reset(&alice, &f.id).await, Err(Error::Invalid(_))), "floating: no reset");
    env.broker.release(&alice, &f.id).await.unwrap();
    host.settle().await;
    assert_eq!(booted(&host, &f.id)[1], ("recycle".into(), "debian-v2".into()));

    // Persistent: a restart keeps the desktop's own image.
    env.broker.restart(&bob, &p.id).await.unwrap();
    host.settle().await;
    assert_eq!(booted(&host, &p.id)[1], ("restart".into(), "debian".into()));
    // Only the owner resets, only an admin recomposes.
    assert!(matches!(env.broker.reset(&alice, &p.id).await, Err(Error::Forbidden)));
    assert!(matches!(env.broker.recompose(&bob, &p.id).await, Err(Error::Forbidden)));
    env.broker.recompose(&admin, &p.id).await.unwrap();
    assert_eq!(env.broker.desktop(&p.id).await.unwrap().state, DesktopState::Recycling);
    host.settle().await;
    assert_eq!(booted(&host, &p.id)[2], ("recycle".into(), "debian-v2".into()));
    let after = env.broker.desktop(&p.id).await.unwrap();
    assert_eq!((after.state, after.owner_id.as_deref()), (DesktopState::Ready, Some(bob.user_id.as_str())));
    // The owner's reset: a fresh disk on the pool's image, and the desktop stays theirs.
    env.broker.reset(&bob, &p.id).await.unwrap();
    host.settle().await;
    assert_eq!(booted(&host, &p.id)[3], ("recycle".into(), "debian-v2".into()));
    assert_eq!(env.broker.request_desktop(&bob, &dev).await.unwrap().id, p.id);
    let audit = env.broker.list_audit(&admin, 100).await.unwrap();
    let actions: Vec<&str> = audit.iter().map(|a| a.action.as_str()).collect();
    for wanted in ["pool.recompose", "desktop.recompose", "desktop.reset", "desktop.reset.denied"] {
        assert!(actions.contains(&wanted), "{wanted} in {actions:?}");
    }
}

/// Security review (Medium): a command the host never answered left its desktop
/// `provisioning` forever.
async fn commands_a_host_never_answers_time_out(backend: Backend) {
    let env = Env::new(backend).await;
    env.image("debian", 1024).await;
    let mut host = HostDouble::register(&env, "host-a", 8192, &["debian"]).await;
    let pool = env.pool("office", PoolKind::Floating, "debian", 1, 0).await;
    let (_, alice) = env.user("alice").await;
    env.entitle_user(&pool, "alice").await;
    host.hang = true;
    let d = env.broker.request_desktop(&alice, &pool).await.unwrap();
    assert_eq!(host.tick().await, 1, "the host takes the start");
    env.broker.maintain().await.unwrap();
    assert_eq!(env.broker.desktop(&d.id).await.unwrap().state, DesktopState::Provisioning);
    // The host goes on heartbeating, and never answers.
    env.clock.advance(env.broker.settings.command_timeout_secs + 1);
    host.tick().await;
    env.broker.maintain().await.unwrap();
    let failed = env.broker.desktop(&d.id).await.unwrap();
    assert_eq!(failed.state, DesktopState::Failed);
    assert!(
        failed.last_error.as_deref().unwrap_or_default().contains("did not answer the start command"),
        "{failed:?}"
    );
    // A host that answers again: the desktop starts on the user's next request.
    host.hang = false;
    env.broker.request_desktop(&alice, &pool).await.unwrap();
    host.settle().await;
    assert_eq!(env.broker.desktop(&d.id).await.unwrap().state, DesktopState::InUse);
}

/// A host that answers a command twice at once (a retried request): one answer counts, the
/// other changes nothing. Checked in a read, then written, the two could both pass the check
/// (PostgreSQL's read committed) and a failed start would count twice.
async fn an_answer_sent_twice_counts_once(backend: Backend) {
    let env = Env::new(backend).await;
    env.image("debian", 512).await;
    let mut host = HostDouble::register(&env, "host-a", 16384, &["debian"]).await;
    let pool = env.pool("office", PoolKind::Floating, "debian", 6, 6).await;
    env.broker.maintain().await.unwrap();
    host.hang = true;
    host.tick().await;
    let starts: Vec<(String, String)> = host
        .held
        .iter()
        .filter(|c| c["kind"] == "start")
        .map(|c| (c["id"].as_str().unwrap().to_owned(), c["desktop_id"].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(starts.len(), 6, "{:?}", host.held);
    let failed = serde_json::json!({ "ok": false, "error": "no such image" });
    let mut answers = tokio::task::JoinSet::new();
    for (id, _) in &starts {
        for _ in 0..2 {
            answers.spawn(host.ack(id, &failed));
        }
    }
    let statuses: Vec<reqwest::StatusCode> = answers.join_all().await;
    let counted = statuses.iter().filter(|s| s.as_u16() == 204).count();
    assert_eq!(counted, 6, "one answer of each pair counts: {statuses:?}");
    assert!(statuses.iter().all(|s| matches!(s.as_u16(), 204 | 404)), "{statuses:?}");
    for (_, desktop) in &starts {
        let row: (i64,) = sqlx::query_as("SELECT start_failures FROM desktops WHERE id = $1")
            .bind(desktop)
            .fetch_one(&env.broker.db.pool)
            .await
            .unwrap();
        assert_eq!(row.0, 1, "desktop {desktop} failed once, not once per answer");
    }
    let _ = pool;
}

async fn clipboard_policy_reaches_the_host_and_denials_are_audited(backend: Backend) {
    let env = Env::new(backend).await;
    env.image("debian", 1024).await;
    let mut host = HostDouble::register(&env, "host-a", 8192, &["debian"]).await;
    let (_, alice) = env.user("alice").await;
    let (_, root) = env.admin("root").await;
    // Nothing copied in the desktop leaves it.
    let pool = env.pool("vault", PoolKind::Persistent, "debian", 3, 0).await;
    let sealed =
        pleiades_broker::model::PoolSpec { clipboard_from_guest: false, ..spec(&env, &pool, 3, 0).await };
    env.broker.update_pool(&root, &pool, &sealed, true).await.unwrap();
    let p = env.broker.pool(&pool).await.unwrap();
    assert_eq!((p.clipboard_to_guest, p.clipboard_from_guest), (true, false));
    env.entitle_user(&pool, "alice").await;
    let d = env.broker.request_desktop(&alice, &pool).await.unwrap();
    host.settle().await;
    assert_eq!(
        host.clipboard.get(&d.id),
        Some(&serde_json::json!({ "to_guest": true, "from_guest": false })),
        "the start command carries the pool's policy"
    );

    // The host's running totals of denials (to the guest, from the guest): each heartbeat's
    // news is audited once, a total that drops is a new VM process.
    let denials = |audit: &[pleiades_broker::model::AuditEntry]| -> Vec<(String, String, String)> {
        let mut found: Vec<_> = audit
            .iter()
            .filter(|e| e.action == "clipboard.denied")
            .map(|e| (e.actor.clone(), e.target.clone(), e.detail.clone()))
            .collect();
        found.reverse(); // oldest first
        found
    };
    let copies = |n: u32, from: &str, way: &str| {
        let noun = if n == 1 { "copy" } else { "copies" };
        (
            "host-a".to_owned(),
            d.name.clone(),
            format!("{n} {noun} from {from} kept back by the pool's policy ({way})"),
        )
    };
    let mut expected = Vec::new();
    for (to_guest, from_guest, new) in [
        (0, 0, vec![]),
        (2, 0, vec![copies(2, "the client", "to-guest")]),
        (2, 0, vec![]),
        (5, 1, vec![copies(3, "the client", "to-guest"), copies(1, "the desktop", "from-guest")]),
        (5, 1, vec![]),
        // The VM process restarted on its own: its counters began again.
        (1, 0, vec![copies(1, "the client", "to-guest")]),
    ] {
        host.vms.get_mut(&d.id).unwrap().clipboard_denied = Some((to_guest, from_guest));
        host.tick().await;
        expected.extend(new);
        assert_eq!(
            denials(&env.broker.list_audit(&root, 100).await.unwrap()),
            expected,
            "after {to_guest}/{from_guest}"
        );
    }
    // A restart the broker commands starts the count again too: all 4 of the new process are new.
    env.broker.restart(&alice, &d.id).await.unwrap();
    host.settle().await;
    assert_eq!(host.vms[&d.id].clipboard_denied, Some((0, 0)));
    host.vms.get_mut(&d.id).unwrap().clipboard_denied = Some((4, 0));
    host.tick().await;
    expected.push(copies(4, "the client", "to-guest"));
    assert_eq!(denials(&env.broker.list_audit(&root, 100).await.unwrap()), expected);
}

async fn file_transfer_policy_reaches_the_host_and_denials_are_audited(backend: Backend) {
    let env = Env::new(backend).await;
    env.image("debian", 1024).await;
    let mut host = HostDouble::register(&env, "host-a", 8192, &["debian"]).await;
    let (_, alice) = env.user("alice").await;
    let (_, root) = env.admin("root").await;
    let pool = env.pool("vault", PoolKind::Persistent, "debian", 3, 0).await;
    env.entitle_user(&pool, "alice").await;
    let d = env.broker.request_desktop(&alice, &pool).await.unwrap();
    host.settle().await;
    assert_eq!(
        host.file_transfer.get(&d.id),
        Some(&serde_json::json!(true)),
        "the start command carries the pool's policy: allowed"
    );

    // No file from the user's computer gets in: the desktop's next boot is told so.
    let sealed = pleiades_broker::model::PoolSpec { file_transfer: false, ..spec(&env, &pool, 3, 0).await };
    env.broker.update_pool(&root, &pool, &sealed, true).await.unwrap();
    assert!(!env.broker.pool(&pool).await.unwrap().file_transfer);
    let stored: (i64,) = sqlx::query_as("SELECT file_transfer FROM pools WHERE id = $1")
        .bind(&pool)
        .fetch_one(&env.broker.db.pool)
        .await
        .unwrap();
    assert_eq!(stored.0, 0);
    env.broker.restart(&alice, &d.id).await.unwrap();
    host.settle().await;
    assert_eq!(
        host.file_transfer.get(&d.id),
        Some(&serde_json::json!(false)),
        "the restart command carries the pool's new policy: denied"
    );

    // The host's running total of refused files: each heartbeat's news is audited once, a
    // total that drops is a new VM process.
    let denials = |audit: &[pleiades_broker::model::AuditEntry]| -> Vec<(String, String, String)> {
        let mut found: Vec<_> = audit
            .iter()
            .filter(|e| e.action == "files.denied")
            .map(|e| (e.actor.clone(), e.target.clone(), e.detail.clone()))
            .collect();
        found.reverse(); // oldest first
        found
    };
    let files = |n: u32| {
        let noun = if n == 1 { "file" } else { "files" };
        (
            "host-a".to_owned(),
            d.name.clone(),
            format!("{n} {noun} from the client refused by the pool's policy"),
        )
    };
    let audited = |env: &Env| {
        let query =
            sqlx::query_as::<_, (i64,)>("SELECT files_denied FROM desktops WHERE id = $1").bind(d.id.clone());
        let pool = env.broker.db.pool.clone();
        async move { query.fetch_one(&pool).await.unwrap().0 }
    };
    let mut expected = Vec::new();
    for (total, new) in [
        (0, None),
        (1, Some(files(1))),
        (1, None),
        (4, Some(files(3))),
        (4, None),
        // The VM process restarted on its own: its counter began again.
        (2, Some(files(2))),
        (2, None),
    ] {
        host.vms.get_mut(&d.id).unwrap().files_denied = Some(total);
        host.tick().await;
        expected.extend(new);
        assert_eq!(denials(&env.broker.list_audit(&root, 100).await.unwrap()), expected, "after {total}");
        assert_eq!(audited(&env).await, total as i64, "the desktop row keeps the audited total");
    }
    // A report without file counts (a host that predates them) audits nothing and keeps the count.
    host.vms.get_mut(&d.id).unwrap().files_denied = None;
    host.tick().await;
    assert_eq!(denials(&env.broker.list_audit(&root, 100).await.unwrap()), expected);
    assert_eq!(audited(&env).await, 2);
    // A restart the broker commands starts the count again too: all 3 of the new process are new.
    host.vms.get_mut(&d.id).unwrap().files_denied = Some(2);
    env.broker.restart(&alice, &d.id).await.unwrap();
    host.settle().await;
    assert_eq!(host.vms[&d.id].files_denied, Some(0));
    assert_eq!(audited(&env).await, 0, "reset when the boot is acknowledged");
    assert_eq!(host.file_transfer.get(&d.id), Some(&serde_json::json!(false)));
    host.vms.get_mut(&d.id).unwrap().files_denied = Some(3);
    host.tick().await;
    expected.push(files(3));
    assert_eq!(denials(&env.broker.list_audit(&root, 100).await.unwrap()), expected);
    // Clipboard denials are a different matter: none were reported, none audited.
    let audit = env.broker.list_audit(&root, 100).await.unwrap();
    assert!(!audit.iter().any(|e| e.action == "clipboard.denied"), "{audit:?}");
}

async fn usb_policy_reaches_the_host_and_attaches_and_denials_are_audited(backend: Backend) {
    let env = Env::new(backend).await;
    env.image("debian", 1024).await;
    let mut host = HostDouble::register(&env, "host-a", 8192, &["debian"]).await;
    let (_, alice) = env.user("alice").await;
    let (_, root) = env.admin("root").await;
    let pool = env.pool("lab", PoolKind::Persistent, "debian", 3, 0).await;
    env.entitle_user(&pool, "alice").await;
    let d = env.broker.request_desktop(&alice, &pool).await.unwrap();
    host.settle().await;
    assert_eq!(
        host.usb.get(&d.id),
        Some(&serde_json::json!("none")),
        "the start command carries the pool's policy: no device"
    );

    // Keyboards, mice and sticks, and one smart-card reader by its ids: stored as the policy
    // writes itself, and the desktop's next boot is told so.
    let lab = pleiades_broker::model::PoolSpec {
        usb: " class=03, class=08,076B:3021 ".into(),
        ..spec(&env, &pool, 3, 0).await
    };
    let updated = env.broker.update_pool(&root, &pool, &lab, true).await.unwrap();
    assert_eq!(updated.usb, "class=03,class=08,076b:3021");
    let stored: (String,) = sqlx::query_as("SELECT usb FROM pools WHERE id = $1")
        .bind(&pool)
        .fetch_one(&env.broker.db.pool)
        .await
        .unwrap();
    assert_eq!(stored.0, "class=03,class=08,076b:3021");
    // A policy that does not parse is refused with the reason, and changes nothing.
    let bad = pleiades_broker::model::PoolSpec { usb: "class=03,sticks".into(), ..lab.clone() };
    match env.broker.update_pool(&root, &pool, &bad, true).await {
        Err(Error::Invalid(reason)) => {
            assert!(reason.contains("USB policy") && reason.contains("sticks"), "{reason}")
        }
        other => panic!("a bad USB policy: {other:?}"),
    }
    assert_eq!(env.broker.pool(&pool).await.unwrap().usb, "class=03,class=08,076b:3021");
    env.broker.restart(&alice, &d.id).await.unwrap();
    host.settle().await;
    assert_eq!(
        host.usb.get(&d.id),
        Some(&serde_json::json!("class=03,class=08,076b:3021")),
        "the restart command carries the pool's new policy"
    );

    // The host's running totals of attached and refused devices: each heartbeat's news is
    // audited once per kind, a total that drops is a new VM process.
    let usb_audit = |audit: &[pleiades_broker::model::AuditEntry]| -> Vec<(String, String, String, String)> {
        let mut found: Vec<_> = audit
            .iter()
            .filter(|e| e.action.starts_with("usb."))
            .map(|e| (e.actor.clone(), e.action.clone(), e.target.clone(), e.detail.clone()))
            .collect();
        found.reverse(); // oldest first
        found
    };
    let event = |action: &str, n: u32| {
        let noun = if n == 1 { "USB device" } else { "USB devices" };
        let what =
            if action == "usb.attached" { "attached in the desktop" } else { "refused by the pool's policy" };
        ("host-a".to_owned(), action.to_owned(), d.name.clone(), format!("{n} {noun} from the client {what}"))
    };
    let audited = |env: &Env| {
        let query =
            sqlx::query_as::<_, (i64, i64)>("SELECT usb_attached, usb_denied FROM desktops WHERE id = $1")
                .bind(d.id.clone());
        let pool = env.broker.db.pool.clone();
        async move { query.fetch_one(&pool).await.unwrap() }
    };
    let mut expected = Vec::new();
    for ((attached, denied), new) in [
        ((0, 0), vec![]),
        ((1, 0), vec![event("usb.attached", 1)]),
        ((1, 0), vec![]),
        ((1, 2), vec![event("usb.denied", 2)]),
        ((3, 3), vec![event("usb.attached", 2), event("usb.denied", 1)]),
        ((3, 3), vec![]),
        // The VM process restarted on its own: its counters began again.
        ((1, 0), vec![event("usb.attached", 1)]),
        ((1, 0), vec![]),
    ] {
        host.vms.get_mut(&d.id).unwrap().usb = Some((attached, denied));
        host.tick().await;
        expected.extend(new);
        assert_eq!(
            usb_audit(&env.broker.list_audit(&root, 100).await.unwrap()),
            expected,
            "after {attached} attached, {denied} denied"
        );
        assert_eq!(
            audited(&env).await,
            (attached as i64, denied as i64),
            "the desktop row keeps the audited totals"
        );
    }
    // A report without USB counts (a host that predates them) audits nothing and keeps them.
    host.vms.get_mut(&d.id).unwrap().usb = None;
    host.tick().await;
    assert_eq!(usb_audit(&env.broker.list_audit(&root, 100).await.unwrap()), expected);
    assert_eq!(audited(&env).await, (1, 0));
    // A restart the broker commands starts the counts again too: all of the new process's are new.
    host.vms.get_mut(&d.id).unwrap().usb = Some((1, 0));
    env.broker.restart(&alice, &d.id).await.unwrap();
    host.settle().await;
    assert_eq!(host.vms[&d.id].usb, Some((0, 0)));
    assert_eq!(audited(&env).await, (0, 0), "reset when the boot is acknowledged");
    host.vms.get_mut(&d.id).unwrap().usb = Some((1, 1));
    host.tick().await;
    expected.extend([event("usb.attached", 1), event("usb.denied", 1)]);
    assert_eq!(usb_audit(&env.broker.list_audit(&root, 100).await.unwrap()), expected);
    // Clipboard and file denials are other matters: none were reported, none audited.
    let audit = env.broker.list_audit(&root, 100).await.unwrap();
    assert!(!audit.iter().any(|e| e.action == "clipboard.denied" || e.action == "files.denied"), "{audit:?}");
    assert!(
        audit
            .iter()
            .any(|e| e.action == "pool.update" && e.detail.contains("usb=class=03,class=08,076b:3021")),
        "{audit:?}"
    );
}

async fn usb_auto_rules_reach_the_connection_file(backend: Backend) {
    use pleiades_protocol::connfile::Connection;
    let env = Env::new(backend).await;
    env.image("debian", 1024).await;
    let mut host = HostDouble::register(&env, "host-a", 8192, &["debian"]).await;
    let (_, alice) = env.user("alice").await;
    let (_, root) = env.admin("root").await;
    let pool = env.pool("lab", PoolKind::Persistent, "debian", 3, 0).await;
    env.entitle_user(&pool, "alice").await;
    let d = env.broker.request_desktop(&alice, &pool).await.unwrap();
    host.settle().await;
    // No rules by default: the connection file has none (as files from before them), and the
    // client redirects nothing by itself.
    assert_eq!(env.broker.pool(&pool).await.unwrap().usb_auto, "none");
    let conn = env.broker.connect(&alice, &d.id).await.unwrap();
    assert_eq!(conn.usb_auto, "");
    assert!(!conn.to_toml().contains("usb_auto") && !conn.to_uri().contains("usb_auto"), "{conn:?}");

    // Sticks, redirected on connect: stored, audited and carried as the rules write themselves,
    // in the file and in the URI alike, from the next connection on.
    let lab = pleiades_broker::model::PoolSpec {
        usb: "class=08".into(),
        usb_auto: " class=08 ".into(),
        ..spec(&env, &pool, 3, 0).await
    };
    let updated = env.broker.update_pool(&root, &pool, &lab, true).await.unwrap();
    assert_eq!((updated.usb.as_str(), updated.usb_auto.as_str()), ("class=08", "class=08"));
    let stored: (String,) = sqlx::query_as("SELECT usb_auto FROM pools WHERE id = $1")
        .bind(&pool)
        .fetch_one(&env.broker.db.pool)
        .await
        .unwrap();
    assert_eq!(stored.0, "class=08");
    let conn = env.broker.connect(&alice, &d.id).await.unwrap();
    assert_eq!(conn.usb_auto, "class=08");
    assert_eq!(Connection::from_toml(&conn.to_toml()).unwrap().usb_auto, "class=08");
    assert_eq!(Connection::from_uri(&conn.to_uri()).unwrap().usb_auto, "class=08");
    // The rules are the client's, not the host's: boot commands carry the policy alone.
    env.broker.restart(&alice, &d.id).await.unwrap();
    host.settle().await;
    assert_eq!(host.usb.get(&d.id), Some(&serde_json::json!("class=08")));

    // Rules that do not parse are refused with the reason, and change nothing.
    let bad = pleiades_broker::model::PoolSpec { usb_auto: "class=8".into(), ..lab.clone() };
    match env.broker.update_pool(&root, &pool, &bad, true).await {
        Err(Error::Invalid(reason)) => assert!(
            reason.contains("USB auto-redirect rules") && reason.contains("two hex digits"),
            "{reason}"
        ),
        other => panic!("bad USB auto-redirect rules: {other:?}"),
    }
    assert_eq!(env.broker.pool(&pool).await.unwrap().usb_auto, "class=08");
    let many = (0..65).map(|c| format!("class={c:02x}")).collect::<Vec<_>>().join(",");
    let too_many = pleiades_broker::model::PoolSpec { usb_auto: many, ..lab.clone() };
    assert!(matches!(
        env.broker.update_pool(&root, &pool, &too_many, true).await,
        Err(Error::Invalid(reason)) if reason.contains("at most 64 rules")
    ));
    // A pool made with rules has them from the start; `all` is carried as is, even where the
    // policy lets no device in (the host refuses them then: the rules are no authority).
    let kiosk = pleiades_broker::model::PoolSpec {
        name: "kiosk".into(),
        usb: "none".into(),
        usb_auto: "all".into(),
        ..spec(&env, &pool, 3, 0).await
    };
    let kiosk = env.broker.create_pool(&root, &kiosk).await.unwrap();
    assert_eq!((kiosk.usb.as_str(), kiosk.usb_auto.as_str()), ("none", "all"));
    env.entitle_user(&kiosk.id, "alice").await;
    let k = env.broker.request_desktop(&alice, &kiosk.id).await.unwrap();
    host.settle().await;
    assert_eq!(env.broker.connect(&alice, &k.id).await.unwrap().usb_auto, "all");
    // Back to none: the next connection file has none again.
    let none = pleiades_broker::model::PoolSpec { usb_auto: "none".into(), ..lab.clone() };
    env.broker.update_pool(&root, &pool, &none, true).await.unwrap();
    assert_eq!(env.broker.connect(&alice, &d.id).await.unwrap().usb_auto, "");
    let audit = env.broker.list_audit(&root, 100).await.unwrap();
    for (action, target, detail) in [
        ("pool.update", "lab", "usb=class=08 usb_auto=class=08"),
        ("pool.update", "lab", "usb=class=08 usb_auto=none"),
        ("pool.create", "kiosk", "usb=none usb_auto=all"),
    ] {
        assert!(
            audit.iter().any(|e| e.action == action && e.target == target && e.detail.contains(detail)),
            "{action} {target} {detail}: {audit:?}"
        );
    }
}
