//! The portal (users) and the admin console: server-rendered HTML, no JavaScript.
//!
//! Every form posts a `csrf` field checked against the session; pages that change state
//! answer with a redirect (303) to a page with a fixed notice code, never echoing input.

use std::collections::HashMap;

use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use base64::Engine as _;
use maud::{DOCTYPE, Markup, html};

use super::{AppState, Auth, Client, LOGIN_CSRF_COOKIE, SESSION_COOKIE, cookie, set_cookie};
use crate::error::Error;
use crate::model::{DesktopState, Image, PoolKind, PoolNetwork, PoolSpec, PrincipalKind, SessionState};
use crate::secret;

const CSS: &str = include_str!("style.css");

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/style.css",
            get(|| async {
                ([(header::CONTENT_TYPE, "text/css"), (header::CACHE_CONTROL, "max-age=3600")], CSS)
            }),
        )
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/", get(portal))
        .route("/pools/{id}/desktop", post(request_desktop))
        .route("/desktops/{id}/connect", post(connect))
        .route("/desktops/{id}/restart", post(restart))
        .route("/desktops/{id}/release", post(release))
        .route("/desktops/{id}/reset", post(reset))
        .route("/admin/desktops/{id}/recompose", post(admin_recompose))
        .route("/admin", get(|| async { Redirect::to("/admin/hosts") }))
        .route("/admin/hosts", get(admin_hosts))
        .route("/admin/images", get(admin_images).post(admin_create_image))
        .route("/admin/pools", get(admin_pools).post(admin_create_pool))
        .route("/admin/pools/{id}", get(admin_pool).post(admin_update_pool))
        .route("/admin/pools/{id}/entitlements", post(admin_entitle))
        .route("/admin/pools/{id}/entitlements/remove", post(admin_unentitle))
        .route("/admin/users", get(admin_users).post(admin_create_user))
        .route("/admin/groups", post(admin_create_group))
        .route("/admin/groups/members", post(admin_add_member))
        .route("/admin/sessions", get(admin_sessions))
        .route("/admin/sessions/{id}/disconnect", post(admin_disconnect))
        .route("/admin/audit", get(admin_audit))
}

type Fields = HashMap<String, String>;

/// Errors on pages: a readable page, or the login form when the session is gone.
#[derive(Debug)]
struct PageError(Error);

impl From<Error> for PageError {
    fn from(e: Error) -> Self {
        Self(e)
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        if matches!(self.0, Error::Unauthenticated) {
            return Redirect::to("/login").into_response();
        }
        let status = self.0.status();
        let body = layout(
            "Error",
            None,
            html! {
                h1 { (status.canonical_reason().unwrap_or("Error")) }
                p.notice.error role="alert" { (self.0.public_message()) }
                p { a href="/" { "Back to my desktops" } }
            },
        );
        (status, body).into_response()
    }
}

type PageResult = Result<Response, PageError>;

/// A form posted from our own pages: the session, and the fields once their `csrf` matched.
#[derive(Debug)]
struct Posted {
    auth: Auth,
    f: Fields,
}

impl FromRequest<AppState> for Posted {
    type Rejection = PageError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let (mut parts, body) = req.into_parts();
        let auth = Auth::from_request_parts(&mut parts, state).await?;
        let Form(f) = Form::<Fields>::from_request(Request::from_parts(parts, body), state)
            .await
            .map_err(|_| Error::Invalid("the form could not be read".into()))?;
        auth.check_csrf(f.get("csrf").map(String::as_str))?;
        Ok(Self { auth, f })
    }
}

/// [`Auth`] for pages: a missing or expired session sends the browser to the login form.
#[derive(Debug)]
struct Session(Auth);

impl FromRequestParts<AppState> for Session {
    type Rejection = PageError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        Ok(Self(Auth::from_request_parts(parts, state).await?))
    }
}

fn field<'a>(f: &'a Fields, name: &str) -> &'a str {
    f.get(name).map(String::as_str).unwrap_or("")
}

fn int_field(f: &Fields, name: &str, default: i64) -> Result<i64, Error> {
    match field(f, name).trim() {
        "" => Ok(default),
        v => v.parse().map_err(|_| Error::Invalid(format!("{name} must be a whole number"))),
    }
}

fn see_other(to: &str) -> PageResult {
    Ok(Redirect::to(to).into_response())
}

/// Fixed notices, chosen by code so that nothing from the query string is echoed.
fn notice(q: &HashMap<String, String>) -> Option<&'static str> {
    Some(match q.get("notice")?.as_str() {
        "allocated" => "Your desktop is assigned. Connect when it is ready.",
        "restarting" => "Your desktop is restarting.",
        "released" => "You logged off the desktop.",
        "reset" => "Your desktop is being reset to a fresh copy of its image.",
        "recomposing" => "The desktop is being recomposed to the pool's image.",
        "saved" => "Saved.",
        "created" => "Created.",
        "entitled" => "Entitlement added.",
        "removed" => "Entitlement removed.",
        "disconnected" => "Session disconnected.",
        _ => return None,
    })
}

fn layout(title: &str, auth: Option<&Auth>, body: Markup) -> Html<String> {
    layout_refreshing(title, auth, body, None)
}

/// `refresh`: reload the page after this many seconds (the portal, while a desktop starts).
fn layout_refreshing(title: &str, auth: Option<&Auth>, body: Markup, refresh: Option<u32>) -> Html<String> {
    Html(
        html! {
            (DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    meta name="viewport" content="width=device-width, initial-scale=1";
                @if let Some(secs) = refresh { meta http-equiv="refresh" content=(secs); }
                    title { (title) " · Pleiades" }
                    link rel="stylesheet" href="/style.css";
                }
                body {
                    a.skip href="#main" { "Skip to content" }
                    header.top {
                        a.brand href="/" { span aria-hidden="true" { "✦" } " Pleiades" }
                        @if let Some(a) = auth {
                            nav aria-label="Main" {
                                a href="/" { "My desktops" }
                                @if a.actor.is_admin {
                                    a href="/admin/hosts" { "Hosts" }
                                    a href="/admin/images" { "Images" }
                                    a href="/admin/pools" { "Pools" }
                                    a href="/admin/users" { "Users" }
                                    a href="/admin/sessions" { "Sessions" }
                                    a href="/admin/audit" { "Audit log" }
                                }
                            }
                            form.logout method="post" action="/logout" {
                                input type="hidden" name="csrf" value=(a.csrf);
                                span.who { (a.actor.name) }
                                button.secondary type="submit" { "Log out" }
                            }
                        }
                    }
                    main id="main" { (body) }
                }
            }
        }
        .into_string(),
    )
}

fn page(title: &str, auth: &Auth, q: &HashMap<String, String>, body: Markup) -> Response {
    page_refreshing(title, auth, q, body, None)
}

fn page_refreshing(
    title: &str,
    auth: &Auth,
    q: &HashMap<String, String>,
    body: Markup,
    refresh: Option<u32>,
) -> Response {
    layout_refreshing(
        title,
        Some(auth),
        html! {
            @if let Some(n) = notice(q) { p.notice role="status" { (n) } }
            (body)
        },
        refresh,
    )
    .into_response()
}

fn csrf_input(auth: &Auth) -> Markup {
    html! { input type="hidden" name="csrf" value=(auth.csrf); }
}

fn when(t: i64) -> String {
    // UTC, minute precision: readable without a time zone database.
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", secs / 3600, secs % 3600 / 60, secs % 60)
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

// ----- login --------------------------------------------------------------------------------

fn login_form(csrf: &str, error: Option<&str>) -> Html<String> {
    layout(
        "Log in",
        None,
        html! {
            section.card.narrow {
                h1 { "Log in" }
                p.muted { "Sign in to reach your desktops." }
                @if let Some(e) = error { p.notice.error role="alert" { (e) } }
                form method="post" action="/login" {
                    input type="hidden" name="csrf" value=(csrf);
                    label for="name" { "User name" }
                    input id="name" name="name" type="text" autocomplete="username" required autofocus;
                    label for="password" { "Password" }
                    input id="password" name="password" type="password" autocomplete="current-password" required;
                    button type="submit" { "Log in" }
                }
            }
        },
    )
}

/// Login CSRF: a random value in a cookie and in the form (double submit), so that another
/// site cannot log the browser in to an account of its choosing.
async fn login_page(State(s): State<AppState>) -> Response {
    let csrf = secret::new_token();
    let mut res = login_form(&csrf, None).into_response();
    res.headers_mut()
        .insert(header::SET_COOKIE, set_cookie(LOGIN_CSRF_COOKIE, &csrf, 3600, s.secure_cookies));
    res
}

async fn login(
    State(s): State<AppState>,
    Client(client): Client,
    headers: HeaderMap,
    Form(f): Form<Fields>,
) -> Response {
    let cookie_csrf = cookie(&headers, LOGIN_CSRF_COOKIE).unwrap_or("");
    let form_csrf = field(&f, "csrf");
    let fresh = secret::new_token();
    let fail = |status: StatusCode, msg: &str| {
        let mut res = (status, login_form(&fresh, Some(msg))).into_response();
        res.headers_mut()
            .insert(header::SET_COOKIE, set_cookie(LOGIN_CSRF_COOKIE, &fresh, 3600, s.secure_cookies));
        res
    };
    if cookie_csrf.is_empty() || !secret::constant_time_eq(cookie_csrf.as_bytes(), form_csrf.as_bytes()) {
        return fail(StatusCode::FORBIDDEN, "Your login form expired. Please try again.");
    }
    let user = match s.broker.login(field(&f, "name"), field(&f, "password"), &client).await {
        Ok(u) => u,
        Err(Error::RateLimited) => {
            return fail(
                StatusCode::TOO_MANY_REQUESTS,
                "Too many attempts. Wait a few minutes and try again.",
            );
        }
        Err(Error::Unauthenticated) => {
            return fail(StatusCode::UNAUTHORIZED, "User name or password is wrong.");
        }
        Err(Error::Unavailable(_)) => {
            return fail(
                StatusCode::SERVICE_UNAVAILABLE,
                "Sign-in with your directory account is unavailable right now. Try again in a few minutes, \
                 or tell your administrator.",
            );
        }
        Err(e) => return PageError(e).into_response(),
    };
    let token = match s.broker.create_auth_token(&user, "web").await {
        Ok((t, _)) => t,
        Err(e) => return PageError(e).into_response(),
    };
    let mut res = Redirect::to("/").into_response();
    let h = res.headers_mut();
    h.append(
        header::SET_COOKIE,
        set_cookie(SESSION_COOKIE, &token, s.broker.settings.web_session_secs as i64, s.secure_cookies),
    );
    h.append(header::SET_COOKIE, set_cookie(LOGIN_CSRF_COOKIE, "", 0, s.secure_cookies));
    res
}

async fn logout(State(s): State<AppState>, Posted { auth, .. }: Posted) -> PageResult {
    s.broker.logout(&auth.actor, &auth.token).await?;
    let mut res = Redirect::to("/login").into_response();
    res.headers_mut().insert(header::SET_COOKIE, set_cookie(SESSION_COOKIE, "", 0, s.secure_cookies));
    Ok(res)
}

// ----- portal -------------------------------------------------------------------------------

async fn portal(
    State(s): State<AppState>,
    Session(auth): Session,
    Query(q): Query<HashMap<String, String>>,
) -> PageResult {
    let pools = s.broker.entitled_pools(&auth.actor).await?;
    let desktops = s.broker.my_desktops(&auth.actor).await?;
    let pool_name =
        |id: &str| pools.iter().find(|p| p.id == id).map(|p| p.display_name.clone()).unwrap_or_default();
    let persistent = |id: &str| pools.iter().any(|p| p.id == id && p.kind == PoolKind::Persistent);
    // Without scripts, a starting desktop is followed by reloading the page.
    let starting =
        desktops.iter().any(|d| matches!(d.state, DesktopState::Provisioning | DesktopState::Recycling));
    Ok(page_refreshing(
        "My desktops",
        &auth,
        &q,
        html! {
            h1 { "My desktops" }
            @if desktops.is_empty() {
                p.muted { "You have no desktop yet. Pick one from a pool below." }
            } @else {
                table {
                    caption.visually-hidden { "Your desktops" }
                    thead { tr { th scope="col" { "Desktop" } th scope="col" { "Pool" } th scope="col" { "State" } th scope="col" { "Actions" } } }
                    tbody {
                        @for d in &desktops {
                            tr {
                                td { (d.name) }
                                td { (pool_name(&d.pool_id)) }
                                td {
                                    span class={"state state-" (d.state.as_str())} { (d.state.label()) }
                                    @if let (DesktopState::Failed, Some(why)) = (d.state, &d.last_error) {
                                        div.muted.reason { "Could not start: " (why) }
                                    }
                                }
                                td { div.actions {
                                    form method="post" action={"/desktops/" (d.id) "/connect"} {
                                        (csrf_input(&auth))
                                        button type="submit" aria-label={"Connect to " (d.name)} { "Connect" }
                                    }
                                    form method="post" action={"/desktops/" (d.id) "/restart"} {
                                        (csrf_input(&auth))
                                        button.secondary type="submit" aria-label={"Restart " (d.name)} { "Restart" }
                                    }
                                    form method="post" action={"/desktops/" (d.id) "/release"} {
                                        (csrf_input(&auth))
                                        button.secondary type="submit" aria-label={"Log off " (d.name)} { "Log off" }
                                    }
                                    @if persistent(&d.pool_id) {
                                        form method="post" action={"/desktops/" (d.id) "/reset"} {
                                            (csrf_input(&auth))
                                            button.secondary type="submit" aria-label={"Reset " (d.name) " to a fresh copy of its image: its files are lost"} { "Reset" }
                                        }
                                    }
                                } }
                            }
                        }
                    }
                }
            }
            h2 { "Pools" }
            @if pools.is_empty() {
                p.muted { "No pool is available to you. Ask your administrator." }
            }
            ul.cards {
                @for p in &pools {
                    li.card {
                        h3 { (p.display_name) }
                        p.muted { @if p.kind == PoolKind::Persistent { "Personal desktop: yours to keep." } @else { "Shared desktops: a fresh one each time." } }
                        form method="post" action={"/pools/" (p.id) "/desktop"} {
                            (csrf_input(&auth))
                            button type="submit" aria-label={"Get a desktop from " (p.display_name)} { "Get desktop" }
                        }
                    }
                }
            }
        },
        starting.then_some(5),
    ))
}

async fn request_desktop(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Posted { auth, .. }: Posted,
) -> PageResult {
    s.broker.request_desktop(&auth.actor, &id).await?;
    see_other("/?notice=allocated")
}

async fn connect(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Posted { auth, .. }: Posted,
) -> PageResult {
    let conn = s.broker.connect(&auth.actor, &id).await?;
    let file = conn.to_toml();
    let data = base64::engine::general_purpose::STANDARD.encode(file.as_bytes());
    let lifetime = s.broker.settings.ticket_lifetime_secs;
    Ok(page(
        "Connect",
        &auth,
        &HashMap::new(),
        html! {
            h1 { "Connect to " (conn.desktop) }
            section.card {
                p { "Open the desktop in the Pleiades client. This link works once, within " (lifetime) " seconds." }
                p.buttons {
                    a.button id="open-link" href=(conn.to_uri()) { "Open in Pleiades" }
                    a.button.secondary id="download-file" href={"data:application/x-pleiades;base64," (data)} download={(conn.desktop) ".pleiades"} { "Download connection file" }
                }
                p.muted { "If nothing opens, download the connection file and open it with the Pleiades client." }
            }
            p { a href="/" { "Back to my desktops" } }
        },
    ))
}

async fn restart(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Posted { auth, .. }: Posted,
) -> PageResult {
    s.broker.restart(&auth.actor, &id).await?;
    see_other("/?notice=restarting")
}

async fn reset(State(s): State<AppState>, Path(id): Path<String>, Posted { auth, .. }: Posted) -> PageResult {
    s.broker.reset(&auth.actor, &id).await?;
    see_other("/?notice=reset")
}

async fn admin_recompose(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Posted { auth, .. }: Posted,
) -> PageResult {
    auth.actor.require_admin()?;
    let desktop = s.broker.desktop(&id).await?;
    s.broker.recompose(&auth.actor, &id).await?;
    see_other(&format!("/admin/pools/{}?notice=recomposing", desktop.pool_id))
}

async fn release(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Posted { auth, .. }: Posted,
) -> PageResult {
    s.broker.release(&auth.actor, &id).await?;
    see_other("/?notice=released")
}

// ----- admin --------------------------------------------------------------------------------

async fn admin_hosts(
    State(s): State<AppState>,
    Session(auth): Session,
    Query(q): Query<HashMap<String, String>>,
) -> PageResult {
    let hosts = s.broker.list_hosts(&auth.actor).await?;
    Ok(page(
        "Hosts",
        &auth,
        &q,
        html! {
            h1 { "Hosts" }
            p.muted { "A host registers with a token made for its name: " code { "pleiades-broker host token create --name HOST" } " (add " code { "--replace" } " to replace a registered host)." }
            table {
                thead { tr { th scope="col" { "Name" } th scope="col" { "Address" } th scope="col" { "State" } th scope="col" { "Cores" } th scope="col" { "Memory" } th scope="col" { "Desktops" } th scope="col" { "Images" } th scope="col" { "Last heartbeat" } th scope="col" { "Last error" } } }
                tbody {
                    @for h in &hosts {
                        tr {
                            td { (h.name) }
                            td { (h.address) ":" (h.session_port) }
                            td { span class={"state state-" (h.state.as_str())} { (h.state.as_str()) } }
                            td { (h.cores) }
                            td { (h.memory_mib) " MiB" }
                            td { (h.desktops) }
                            td { (h.images.join(", ")) }
                            td { (when(h.last_heartbeat)) }
                            td.reason { (h.last_error.as_deref().unwrap_or("")) }
                        }
                    }
                    @if hosts.is_empty() { tr { td colspan="9" { "No host has registered yet." } } }
                }
            }
        },
    ))
}

async fn admin_images(
    State(s): State<AppState>,
    Session(auth): Session,
    Query(q): Query<HashMap<String, String>>,
) -> PageResult {
    auth.actor.require_admin()?;
    let images = s.broker.list_images().await?;
    Ok(page(
        "Images",
        &auth,
        &q,
        html! {
            h1 { "Images" }
            table {
                thead { tr { th scope="col" { "Name" } th scope="col" { "Kernel" } th scope="col" { "Initrd" } th scope="col" { "Disk template" } th scope="col" { "vCPUs" } th scope="col" { "Memory" } } }
                tbody {
                    @for i in &images {
                        tr {
                            td { (i.name) } td { code { (i.kernel) } } td { code { (i.initrd) } }
                            td {
                                @if let Some(disk) = &i.disk {
                                    code { (disk) } br; small { "sha256 " (i.disk_sha256.as_deref().map_or("", |s| &s[..s.len().min(12)])) }
                                } @else { "none (initramfs only)" }
                            }
                            td { (i.vcpus) } td { (i.memory_mib) " MiB" }
                        }
                    }
                }
            }
            section.card {
                h2 { "Add an image" }
                form.grid method="post" action="/admin/images" {
                    (csrf_input(&auth))
                    label for="img-name" { "Name" } input id="img-name" name="name" required;
                    label for="img-kernel" { "Kernel path" } input id="img-kernel" name="kernel" required;
                    label for="img-initrd" { "Initrd path" } input id="img-initrd" name="initrd" required;
                    label for="img-disk" { "Disk template (optional)" } input id="img-disk" name="disk" placeholder="/srv/pleiades/desktop-v1.qcow2";
                    label for="img-cmdline" { "Kernel command line" } input id="img-cmdline" name="cmdline" value="console=ttyS0 quiet";
                    label for="img-vcpus" { "vCPUs" } input id="img-vcpus" name="vcpus" type="number" min="1" value="2";
                    label for="img-mem" { "Memory (MiB)" } input id="img-mem" name="memory_mib" type="number" min="64" value="2048";
                    button type="submit" { "Add image" }
                }
            }
        },
    ))
}

async fn admin_create_image(State(s): State<AppState>, Posted { auth, f }: Posted) -> PageResult {
    auth.actor.require_admin()?;
    let image = Image {
        id: String::new(),
        name: field(&f, "name").trim().to_owned(),
        kernel: field(&f, "kernel").trim().to_owned(),
        initrd: field(&f, "initrd").trim().to_owned(),
        cmdline: field(&f, "cmdline").trim().to_owned(),
        disk: Some(field(&f, "disk").trim().to_owned()).filter(|d| !d.is_empty()),
        disk_sha256: None,
        vcpus: int_field(&f, "vcpus", 2)?,
        memory_mib: int_field(&f, "memory_mib", 2048)?,
    };
    s.broker.create_image(&auth.actor, &image).await?;
    see_other("/admin/images?notice=created")
}

fn pool_form(auth: &Auth, action: &str, spec: Option<(&PoolSpec, bool)>, images: &[Image]) -> Markup {
    let (s, enabled) = match spec {
        Some((s, e)) => (s.clone(), e),
        None => (
            PoolSpec {
                name: String::new(),
                display_name: String::new(),
                kind: PoolKind::Floating,
                image: String::new(),
                min_size: 0,
                max_size: 10,
                spares: 1,
                idle_timeout_secs: 3600,
                disconnect_timeout_secs: 900,
                network: PoolNetwork::default(),
                lock_on_disconnect: true,
                clipboard_to_guest: true,
                clipboard_from_guest: true,
                file_transfer: true,
                usb: "none".into(),
                usb_auto: "none".into(),
            },
            true,
        ),
    };
    let editing = spec.is_some();
    html! {
        form.grid method="post" action=(action) {
            (csrf_input(auth))
            label for="pool-name" { "Name" }
            input id="pool-name" name="name" value=(s.name) required pattern="[A-Za-z0-9._@-]{1,64}" readonly[editing] aria-describedby="pool-name-help";
            small id="pool-name-help" { "Letters, digits, '.', '_', '-'." }
            label for="pool-display" { "Display name" } input id="pool-display" name="display_name" value=(s.display_name);
            label for="pool-kind" { "Kind" }
            select id="pool-kind" name="kind" disabled[editing] {
                option value="floating" selected[s.kind == PoolKind::Floating] { "Floating (reverted after logout)" }
                option value="persistent" selected[s.kind == PoolKind::Persistent] { "Persistent (a user keeps one desktop)" }
            }
            label for="pool-image" { "Image" }
            select id="pool-image" name="image" aria-describedby=[editing.then_some("pool-image-help")] {
                @for i in images { option value=(i.name) selected[i.name == s.image] { (i.name) } }
            }
            @if editing {
                small id="pool-image-help" {
                    "A new image recomposes the pool: floating desktops move to it at their next recycle, "
                    "persistent ones when you recompose them in the list of desktops below (or their owner resets them)."
                }
            }
            label for="pool-min" { "Minimum size" } input id="pool-min" name="min_size" type="number" min="0" value=(s.min_size);
            label for="pool-max" { "Maximum size" } input id="pool-max" name="max_size" type="number" min="1" value=(s.max_size);
            label for="pool-spares" { "Spare desktops kept running" } input id="pool-spares" name="spares" type="number" min="0" value=(s.spares);
            label for="pool-idle" { "Idle timeout (s)" } input id="pool-idle" name="idle_timeout_secs" type="number" min="0" value=(s.idle_timeout_secs);
            label for="pool-disc" { "Disconnected timeout (s)" } input id="pool-disc" name="disconnect_timeout_secs" type="number" min="0" value=(s.disconnect_timeout_secs);
            label for="pool-network" { "Network" }
            select id="pool-network" name="network" {
                option value="nat" selected[s.network.nat] { "NAT (DHCP, DNS, outbound; no host services, no other desktops)" }
                option value="none" selected[!s.network.nat] { "None (no network card)" }
            }
            label for="pool-ports" { "Host services (TCP ports)" }
            input id="pool-ports" name="host_ports" value=(s.network.ports_text()) pattern="[0-9, ]*" aria-describedby="pool-ports-help";
            small id="pool-ports-help" { "Services on the host's loopback that the desktops may reach at 10.213.0.1, e.g. 3128, 8080." }
            label for="pool-lock" { "Lock screens on disconnect" }
            input id="pool-lock" name="lock_on_disconnect" type="checkbox" value="1" checked[s.lock_on_disconnect] aria-describedby="pool-lock-help";
            small id="pool-lock-help" { "The guest agent locks a desktop's screen while no client is connected, and unlocks it for the user's next connection." }
            label for="pool-clip-to" { "Clipboard: client → desktop" }
            input id="pool-clip-to" name="clipboard_to_guest" type="checkbox" value="1" checked[s.clipboard_to_guest] aria-describedby="pool-clip-help";
            label for="pool-clip-from" { "Clipboard: desktop → client" }
            input id="pool-clip-from" name="clipboard_from_guest" type="checkbox" value="1" checked[s.clipboard_from_guest] aria-describedby="pool-clip-help";
            small id="pool-clip-help" {
                "Data loss prevention: which way copy and paste may carry content between the user's computer and the desktops. "
                "The host enforces it, whatever the guest or the client does, and audits every copy it keeps back (clipboard.denied). "
                "Changes apply from each desktop's next start."
            }
            label for="pool-files" { "File transfer into the desktop" }
            input id="pool-files" name="file_transfer" type="checkbox" value="1" checked[s.file_transfer] aria-describedby="pool-files-help";
            small id="pool-files-help" {
                "Data loss prevention: whether users may send files from their computer into the desktops (their Downloads folder). "
                "The host enforces it and audits every file it refuses (files.denied). "
                "Changes apply from each desktop's next start."
            }
            label for="pool-usb" { "USB devices allowed into the desktop" }
            input id="pool-usb" name="usb" value=(s.usb) spellcheck="false" autocomplete="off" aria-describedby="pool-usb-help";
            small id="pool-usb-help" {
                "Which of the user's USB devices may be redirected into the desktops: "
                code { "none" } " (no device), " code { "all" } ", or a comma-separated list of "
                code { "class=HH" } " (a USB class in hex, e.g. 03 keyboards and mice, 08 storage, 0b smart cards: "
                "every class of a device must be listed) and " code { "VVVV:PPPP" } " (a vendor and product id in hex), "
                "e.g. " code { "class=03,class=0b,0525:a4a5" } ". "
                "The host enforces it and audits every device it attaches (usb.attached) or refuses (usb.denied). "
                "Changes apply from each desktop's next start."
            }
            label for="pool-usb-auto" { "USB devices redirected on connect" }
            input id="pool-usb-auto" name="usb_auto" value=(s.usb_auto) spellcheck="false" autocomplete="off" aria-describedby="pool-usb-auto-help";
            small id="pool-usb-auto-help" {
                "USB devices the client redirects by itself when it connects (same rules), e.g. "
                code { "class=03,class=0b" } " for keyboards and smart-card readers; " code { "none" } " redirects none by itself. "
                "The policy above still decides what the desktop takes: the host refuses the others (usb.denied). "
                "Changes apply from each user's next connection."
            }
            @if editing {
                label for="pool-enabled" { "Enabled" }
                input id="pool-enabled" name="enabled" type="checkbox" value="1" checked[enabled];
            }
            button type="submit" { @if editing { "Save pool" } @else { "Create pool" } }
        }
    }
}

async fn admin_pools(
    State(s): State<AppState>,
    Session(auth): Session,
    Query(q): Query<HashMap<String, String>>,
) -> PageResult {
    auth.actor.require_admin()?;
    let pools = s.broker.list_pools().await?;
    let images = s.broker.list_images().await?;
    let desktops = s.broker.list_desktops(&auth.actor).await?;
    Ok(page(
        "Pools",
        &auth,
        &q,
        html! {
            h1 { "Pools" }
            table {
                thead { tr { th scope="col" { "Pool" } th scope="col" { "Kind" } th scope="col" { "Image" } th scope="col" { "Size (min–max)" } th scope="col" { "Spares" } th scope="col" { "Network" } th scope="col" { "Clipboard" } th scope="col" { "File transfer" } th scope="col" { "USB" } th scope="col" { "USB on connect" } th scope="col" { "Desktops" } th scope="col" { "Enabled" } } }
                tbody {
                    @for p in &pools {
                        tr {
                            td { a href={"/admin/pools/" (p.id)} { (p.display_name) } " " span.muted { "(" (p.name) ")" } }
                            td { (p.kind.as_str()) }
                            td { (images.iter().find(|i| i.id == p.image_id).map(|i| i.name.as_str()).unwrap_or("?")) }
                            td { (p.min_size) "–" (p.max_size) }
                            td { (p.spares) }
                            td { @if !p.network.nat { "none" } @else if p.network.host_ports.is_empty() { "NAT" } @else { "NAT, host ports " (p.network.ports_text()) } }
                            td { (p.clipboard_text()) }
                            td { (p.file_transfer_text()) }
                            td { (p.usb) }
                            td { (p.usb_auto) }
                            td { (desktops.iter().filter(|d| d.pool_id == p.id && d.state != DesktopState::Failed).count()) }
                            td { @if p.enabled { "yes" } @else { "no" } }
                        }
                    }
                }
            }
            section.card {
                h2 { "Create a pool" }
                @if images.is_empty() { p.notice.error { "Add an image first." } }
                (pool_form(&auth, "/admin/pools", None, &images))
            }
        },
    ))
}

fn pool_spec_from(f: &Fields, fixed: Option<&PoolSpec>) -> Result<PoolSpec, Error> {
    let kind = match fixed {
        Some(p) => p.kind,
        None => PoolKind::parse(field(f, "kind"))?,
    };
    Ok(PoolSpec {
        name: fixed.map(|p| p.name.clone()).unwrap_or_else(|| field(f, "name").trim().to_owned()),
        display_name: field(f, "display_name").trim().to_owned(),
        kind,
        image: match field(f, "image") {
            "" => fixed.map(|p| p.image.clone()).unwrap_or_default(),
            image => image.to_owned(),
        },
        min_size: int_field(f, "min_size", 0)?,
        max_size: int_field(f, "max_size", 10)?,
        spares: int_field(f, "spares", 0)?,
        idle_timeout_secs: int_field(f, "idle_timeout_secs", 3600)?,
        disconnect_timeout_secs: int_field(f, "disconnect_timeout_secs", 900)?,
        network: PoolNetwork {
            nat: field(f, "network") != "none",
            host_ports: PoolNetwork::parse_ports(field(f, "host_ports"))?,
        },
        // A form always shows the boxes: absent means unchecked.
        lock_on_disconnect: field(f, "lock_on_disconnect") == "1",
        clipboard_to_guest: field(f, "clipboard_to_guest") == "1",
        clipboard_from_guest: field(f, "clipboard_from_guest") == "1",
        file_transfer: field(f, "file_transfer") == "1",
        // Empty: no device.
        usb: field(f, "usb").trim().to_owned(),
        // Empty: none redirected by the client itself.
        usb_auto: field(f, "usb_auto").trim().to_owned(),
    })
}

async fn admin_create_pool(State(s): State<AppState>, Posted { auth, f }: Posted) -> PageResult {
    auth.actor.require_admin()?;
    let pool = s.broker.create_pool(&auth.actor, &pool_spec_from(&f, None)?).await?;
    see_other(&format!("/admin/pools/{}?notice=created", pool.id))
}

async fn current_spec(s: &AppState, id: &str) -> Result<(PoolSpec, bool), Error> {
    let pool = s.broker.pool(id).await?;
    let image = s
        .broker
        .list_images()
        .await?
        .into_iter()
        .find(|i| i.id == pool.image_id)
        .map(|i| i.name)
        .unwrap_or_default();
    let spec = PoolSpec {
        name: pool.name,
        display_name: pool.display_name,
        kind: pool.kind,
        image,
        min_size: pool.min_size,
        max_size: pool.max_size,
        spares: pool.spares,
        idle_timeout_secs: pool.idle_timeout_secs,
        disconnect_timeout_secs: pool.disconnect_timeout_secs,
        network: pool.network,
        lock_on_disconnect: pool.lock_on_disconnect,
        clipboard_to_guest: pool.clipboard_to_guest,
        clipboard_from_guest: pool.clipboard_from_guest,
        file_transfer: pool.file_transfer,
        usb: pool.usb,
        usb_auto: pool.usb_auto,
    };
    Ok((spec, pool.enabled))
}

async fn admin_pool(
    State(s): State<AppState>,
    Session(auth): Session,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> PageResult {
    auth.actor.require_admin()?;
    let (spec, enabled) = current_spec(&s, &id).await?;
    let images = s.broker.list_images().await?;
    let entitlements = s.broker.entitlements(&id).await?;
    let desktops: Vec<_> =
        s.broker.list_desktops(&auth.actor).await?.into_iter().filter(|d| d.pool_id == id).collect();
    let hosts = s.broker.list_hosts(&auth.actor).await?;
    let users = s.broker.list_users(&auth.actor).await?;
    let host_name = |id: &Option<String>| {
        hosts.iter().find(|h| Some(&h.id) == id.as_ref()).map(|h| h.name.clone()).unwrap_or_default()
    };
    let user_name = |id: &Option<String>| {
        users.iter().find(|u| Some(&u.id) == id.as_ref()).map(|u| u.name.clone()).unwrap_or_default()
    };
    let image_name = |id: &Option<String>| {
        images
            .iter()
            .find(|i| Some(&i.id) == id.as_ref())
            .map_or_else(|| spec.image.clone(), |i| i.name.clone())
    };
    let now = s.broker.now();
    Ok(page(
        "Pool",
        &auth,
        &q,
        html! {
            h1 { "Pool " (spec.display_name) }
            div.columns {
                section.card {
                    h2 { "Settings" }
                    (pool_form(&auth, &format!("/admin/pools/{id}"), Some((&spec, enabled)), &images))
                }
                section.card {
                    h2 { "Entitlements" }
                    @if entitlements.is_empty() { p.muted { "Nobody is entitled yet." } }
                    ul.plain id="entitlements" {
                        @for e in &entitlements {
                            li {
                                span.tag { (e.kind.as_str()) } " " (e.name)
                                form.inline method="post" action={"/admin/pools/" (id) "/entitlements/remove"} {
                                    (csrf_input(&auth))
                                    input type="hidden" name="kind" value=(e.kind.as_str());
                                    input type="hidden" name="name" value=(e.name);
                                    button.secondary.small type="submit" aria-label={"Remove " (e.name)} { "Remove" }
                                }
                            }
                        }
                    }
                    h3 { "Entitle a user or group" }
                    form.grid method="post" action={"/admin/pools/" (id) "/entitlements"} {
                        (csrf_input(&auth))
                        label for="ent-kind" { "Kind" }
                        select id="ent-kind" name="kind" { option value="group" { "Group" } option value="user" { "User" } }
                        label for="ent-name" { "Name" } input id="ent-name" name="name" required;
                        button type="submit" { "Entitle" }
                    }
                }
            }
            section.card {
                h2 { "Desktops" }
                @if desktops.is_empty() { p.muted { "The pool has no desktop yet." } }
                @else {
                    table id="desktops" {
                        caption.visually-hidden { "The pool's desktops" }
                        thead { tr { th scope="col" { "Name" } th scope="col" { "Host" } th scope="col" { "State" } th scope="col" { "User" } th scope="col" { "Owner" } th scope="col" { "Guest" } th scope="col" { "Image" } th scope="col" { "Own disk" } th scope="col" { "Failed starts" } th scope="col" { "Last error" } } }
                        tbody {
                            @for d in &desktops {
                                tr {
                                    td { (d.name) }
                                    td { (host_name(&d.host_id)) }
                                    td {
                                        span class={"state state-" (d.state.as_str())} { (d.state.label()) }
                                        @if d.state == DesktopState::Failed && d.retry_at > now {
                                            div.muted { "next try in " (d.retry_at - now) " s" }
                                        }
                                    }
                                    td { (user_name(&d.user_id)) }
                                    td { (user_name(&d.owner_id)) }
                                    td.guest {
                                        @if let Some(g) = &d.guest {
                                            div { (g.user.as_deref().unwrap_or("nobody logged in")) " on " (g.hostname) }
                                            @if let (Some(session), Some(idle)) = (&g.session, g.idle_secs) {
                                                div.muted { (session) " · idle " (idle) " s" }
                                            }
                                            div.muted { (g.addresses.join(", ")) }
                                            div.muted { (g.os) " · agent " (g.agent_version) }
                                        } @else {
                                            span.muted { "no agent" }
                                        }
                                    }
                                    td {
                                        (image_name(&d.image_id))
                                        @if spec.kind == PoolKind::Persistent && image_name(&d.image_id) != spec.image {
                                            form.inline method="post" action={"/admin/desktops/" (d.id) "/recompose"} {
                                                (csrf_input(&auth))
                                                button.secondary.small type="submit" aria-label={"Recompose " (d.name) " to " (spec.image)} { "Recompose" }
                                            }
                                        }
                                    }
                                    td { (d.disk_bytes.map(|b| format!("{:.1} MiB", b as f64 / 1048576.0)).unwrap_or_default()) }
                                    td { (d.start_failures) }
                                    td.reason { (d.last_error.as_deref().unwrap_or("")) }
                                }
                            }
                        }
                    }
                }
            }
        },
    ))
}

async fn admin_update_pool(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Posted { auth, f }: Posted,
) -> PageResult {
    auth.actor.require_admin()?;
    let (current, _) = current_spec(&s, &id).await?;
    let spec = pool_spec_from(&f, Some(&current))?;
    s.broker.update_pool(&auth.actor, &id, &spec, f.contains_key("enabled")).await?;
    see_other(&format!("/admin/pools/{id}?notice=saved"))
}

fn principal(f: &Fields) -> Result<PrincipalKind, Error> {
    match field(f, "kind") {
        "user" => Ok(PrincipalKind::User),
        "group" => Ok(PrincipalKind::Group),
        _ => Err(Error::Invalid("kind must be user or group".into())),
    }
}

async fn admin_entitle(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Posted { auth, f }: Posted,
) -> PageResult {
    auth.actor.require_admin()?;
    s.broker.entitle(&auth.actor, &id, principal(&f)?, field(&f, "name").trim()).await?;
    see_other(&format!("/admin/pools/{id}?notice=entitled"))
}

async fn admin_unentitle(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Posted { auth, f }: Posted,
) -> PageResult {
    auth.actor.require_admin()?;
    s.broker.unentitle(&auth.actor, &id, principal(&f)?, field(&f, "name")).await?;
    see_other(&format!("/admin/pools/{id}?notice=removed"))
}

async fn admin_users(
    State(s): State<AppState>,
    Session(auth): Session,
    Query(q): Query<HashMap<String, String>>,
) -> PageResult {
    let users = s.broker.list_users(&auth.actor).await?;
    let groups = s.broker.list_groups(&auth.actor).await?;
    Ok(page(
        "Users",
        &auth,
        &q,
        html! {
            h1 { "Users and groups" }
            div.columns {
                section {
                    table {
                        caption { "Users" }
                        thead { tr { th scope="col" { "Name" } th scope="col" { "Display name" } th scope="col" { "Role" } th scope="col" { "Source" } } }
                        tbody { @for u in &users { tr { td { (u.name) } td { (u.display_name) } td { @if u.is_admin { "admin" } @else { "user" } } td { (u.source) } } } }
                    }
                    table {
                        caption { "Groups" }
                        thead { tr { th scope="col" { "Group" } th scope="col" { "Members" } th scope="col" { "Source" } } }
                        tbody { @for g in &groups { tr { td { (g.name) } td { (g.members.join(", ")) } td { (g.source) } } } }
                    }
                }
                section.card {
                    h2 { "Add a user" }
                    form.grid method="post" action="/admin/users" {
                        (csrf_input(&auth))
                        label for="u-name" { "User name" } input id="u-name" name="name" required autocomplete="off";
                        label for="u-display" { "Display name" } input id="u-display" name="display_name";
                        label for="u-password" { "Password (8+ characters)" } input id="u-password" name="password" type="password" minlength="8" required autocomplete="new-password";
                        label for="u-admin" { "Administrator" } input id="u-admin" name="admin" type="checkbox" value="1";
                        button type="submit" { "Add user" }
                    }
                    h2 { "Add a group" }
                    form.grid method="post" action="/admin/groups" {
                        (csrf_input(&auth))
                        label for="g-name" { "Group name" } input id="g-name" name="name" required;
                        button type="submit" { "Add group" }
                    }
                    h2 { "Add a member" }
                    form.grid method="post" action="/admin/groups/members" {
                        (csrf_input(&auth))
                        label for="m-group" { "Group" } input id="m-group" name="group" required;
                        label for="m-user" { "User" } input id="m-user" name="user" required;
                        button type="submit" { "Add member" }
                    }
                }
            }
        },
    ))
}

async fn admin_create_user(State(s): State<AppState>, Posted { auth, f }: Posted) -> PageResult {
    auth.actor.require_admin()?;
    s.broker
        .create_user(
            &auth.actor,
            field(&f, "name").trim(),
            field(&f, "display_name").trim(),
            Some(field(&f, "password")),
            f.contains_key("admin"),
        )
        .await?;
    see_other("/admin/users?notice=created")
}

async fn admin_create_group(State(s): State<AppState>, Posted { auth, f }: Posted) -> PageResult {
    auth.actor.require_admin()?;
    s.broker.create_group(&auth.actor, field(&f, "name").trim()).await?;
    see_other("/admin/users?notice=created")
}

async fn admin_add_member(State(s): State<AppState>, Posted { auth, f }: Posted) -> PageResult {
    auth.actor.require_admin()?;
    s.broker.add_group_member(&auth.actor, field(&f, "group").trim(), field(&f, "user").trim()).await?;
    see_other("/admin/users?notice=saved")
}

async fn admin_sessions(
    State(s): State<AppState>,
    Session(auth): Session,
    Query(q): Query<HashMap<String, String>>,
) -> PageResult {
    let sessions = s.broker.list_sessions(&auth.actor, true).await?;
    Ok(page(
        "Sessions",
        &auth,
        &q,
        html! {
            h1 { "Live sessions" }
            table {
                thead { tr { th scope="col" { "User" } th scope="col" { "Desktop" } th scope="col" { "State" } th scope="col" { "Started" } th scope="col" { "Action" } } }
                tbody {
                    @for x in &sessions {
                        tr {
                            td { (x.user_name) } td { (x.desktop_name) } td { (x.state.as_str()) } td { (when(x.started_at)) }
                            td {
                                @if x.state == SessionState::Active {
                                    form method="post" action={"/admin/sessions/" (x.id) "/disconnect"} {
                                        (csrf_input(&auth))
                                        button.secondary type="submit" aria-label={"Disconnect " (x.user_name) " from " (x.desktop_name)} { "Disconnect" }
                                    }
                                }
                            }
                        }
                    }
                    @if sessions.is_empty() { tr { td colspan="5" { "No live session." } } }
                }
            }
        },
    ))
}

async fn admin_disconnect(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Posted { auth, .. }: Posted,
) -> PageResult {
    auth.actor.require_admin()?;
    s.broker.disconnect_session(&auth.actor, &id).await?;
    see_other("/admin/sessions?notice=disconnected")
}

async fn admin_audit(
    State(s): State<AppState>,
    Session(auth): Session,
    Query(q): Query<HashMap<String, String>>,
) -> PageResult {
    let entries = s.broker.list_audit(&auth.actor, 500).await?;
    Ok(page(
        "Audit log",
        &auth,
        &q,
        html! {
            h1 { "Audit log" }
            p.muted { "The newest 500 entries. The full log: " code { "GET /api/v1/admin/audit" } "." }
            table.dense {
                thead { tr { th scope="col" { "Time" } th scope="col" { "Actor" } th scope="col" { "Action" } th scope="col" { "Target" } th scope="col" { "Detail" } } }
                tbody { @for e in &entries { tr { td.nowrap { (when(e.at)) } td { (e.actor) } td { code { (e.action) } } td { (e.target) } td { (e.detail) } } } }
            }
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_utc_calendar_dates() {
        assert_eq!(when(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(when(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(when(1_800_000_000), "2027-01-15 08:00:00 UTC");
    }

    #[test]
    fn notices_never_echo_input() {
        let q = HashMap::from([("notice".to_owned(), "<script>".to_owned())]);
        assert_eq!(notice(&q), None);
    }
}
