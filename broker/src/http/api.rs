//! REST API under `/api/v1` (JSON), described by `openapi.json`.
//!
//! Users authenticate with a bearer token from `POST /api/v1/login` (or the portal's session
//! cookie plus an `X-CSRF-Token` header); hosts with the credential they got at registration.

use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{AppState, Auth, Client};
use crate::broker::{CommandAck, Heartbeat, HostRegistration, Transport};
use crate::error::{Error, Result};
use crate::model::{Host, HostTokenSpec, Image, PoolSpec, PrincipalKind};

const OPENAPI: &str = include_str!("openapi.json");

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/openapi.json", get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }))
        .route("/login", post(login))
        .route("/logout", post(logout))
        .route("/me", get(me))
        .route("/pools", get(my_pools))
        .route("/pools/{id}/desktop", post(request_desktop))
        .route("/desktops", get(my_desktops))
        .route("/desktops/{id}/connect", post(connect))
        .route("/desktops/{id}/restart", post(restart))
        .route("/desktops/{id}/release", post(release))
        .route("/desktops/{id}/reset", post(reset))
        .route("/admin/desktops/{id}/recompose", post(recompose))
        .route("/admin/users", get(list_users).post(create_user))
        .route("/admin/groups", get(list_groups).post(create_group))
        .route("/admin/groups/{name}/members", post(add_member))
        .route("/admin/images", get(list_images).post(create_image))
        .route("/admin/pools", get(list_pools).post(create_pool))
        .route("/admin/pools/{id}", put(update_pool))
        .route("/admin/pools/{id}/entitlements", get(entitlements).post(entitle))
        .route("/admin/hosts", get(list_hosts))
        .route("/admin/host-tokens", post(create_host_token))
        .route("/admin/desktops", get(list_desktops))
        .route("/admin/sessions", get(list_sessions))
        .route("/admin/sessions/{id}/disconnect", post(disconnect_session))
        .route("/admin/audit", get(audit))
        .route("/hosts/register", post(register_host))
        .route("/hosts/heartbeat", post(heartbeat))
        .route("/hosts/commands/{id}/ack", post(ack_command))
}

/// A state-changing API call: authenticated, and CSRF-checked when it comes with a browser's
/// session cookie (header `X-CSRF-Token`).
#[derive(Debug)]
struct Mutating(Auth);

impl FromRequestParts<AppState> for Mutating {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self> {
        let auth = Auth::from_request_parts(parts, state).await?;
        auth.check_csrf(parts.headers.get("x-csrf-token").and_then(|v| v.to_str().ok()))?;
        Ok(Self(auth))
    }
}

#[derive(Debug, Deserialize)]
struct LoginBody {
    name: String,
    password: String,
}

async fn login(
    State(s): State<AppState>,
    Client(client): Client,
    Json(body): Json<LoginBody>,
) -> Result<Json<Value>> {
    let user = s.broker.login(&body.name, &body.password, &client).await?;
    let (token, _) = s.broker.create_auth_token(&user, "api").await?;
    Ok(Json(json!({ "token": token, "expires_in": s.broker.settings.api_token_secs, "user": user })))
}

async fn logout(State(s): State<AppState>, Mutating(auth): Mutating) -> Result<StatusCode> {
    s.broker.logout(&auth.actor, &auth.token).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn me(State(s): State<AppState>, auth: Auth) -> Result<Json<Value>> {
    let user = s.broker.user_by_id(&auth.actor.user_id).await?;
    Ok(Json(json!(user)))
}

async fn my_pools(State(s): State<AppState>, auth: Auth) -> Result<Json<Value>> {
    Ok(Json(json!(s.broker.entitled_pools(&auth.actor).await?)))
}

async fn request_desktop(
    State(s): State<AppState>,
    Mutating(auth): Mutating,
    Path(id): Path<String>,
) -> Result<Json<Value>> {
    Ok(Json(json!(s.broker.request_desktop(&auth.actor, &id).await?)))
}

async fn my_desktops(State(s): State<AppState>, auth: Auth) -> Result<Json<Value>> {
    Ok(Json(json!(s.broker.my_desktops(&auth.actor).await?)))
}

async fn connect(
    State(s): State<AppState>,
    Mutating(auth): Mutating,
    Path(id): Path<String>,
) -> Result<Json<Value>> {
    let conn = s.broker.connect(&auth.actor, &id).await?;
    Ok(Json(json!({ "connection": conn, "file": conn.to_toml(), "uri": conn.to_uri() })))
}

async fn restart(
    State(s): State<AppState>,
    Mutating(auth): Mutating,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    s.broker.restart(&auth.actor, &id).await?;
    Ok(StatusCode::ACCEPTED)
}

async fn reset(
    State(s): State<AppState>,
    Mutating(auth): Mutating,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    s.broker.reset(&auth.actor, &id).await?;
    Ok(StatusCode::ACCEPTED)
}

async fn recompose(
    State(s): State<AppState>,
    Mutating(auth): Mutating,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    s.broker.recompose(&auth.actor, &id).await?;
    Ok(StatusCode::ACCEPTED)
}

async fn release(
    State(s): State<AppState>,
    Mutating(auth): Mutating,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    s.broker.release(&auth.actor, &id).await?;
    Ok(StatusCode::ACCEPTED)
}

async fn list_users(State(s): State<AppState>, auth: Auth) -> Result<Json<Value>> {
    Ok(Json(json!(s.broker.list_users(&auth.actor).await?)))
}

#[derive(Debug, Deserialize)]
struct NewUser {
    name: String,
    #[serde(default)]
    display_name: String,
    password: Option<String>,
    #[serde(default)]
    admin: bool,
}

async fn create_user(
    State(s): State<AppState>,
    Mutating(auth): Mutating,
    Json(u): Json<NewUser>,
) -> Result<(StatusCode, Json<Value>)> {
    let user =
        s.broker.create_user(&auth.actor, &u.name, &u.display_name, u.password.as_deref(), u.admin).await?;
    Ok((StatusCode::CREATED, Json(json!(user))))
}

async fn list_groups(State(s): State<AppState>, auth: Auth) -> Result<Json<Value>> {
    Ok(Json(json!(s.broker.list_groups(&auth.actor).await?)))
}

#[derive(Debug, Deserialize)]
struct Named {
    name: String,
}

async fn create_group(
    State(s): State<AppState>,
    Mutating(auth): Mutating,
    Json(g): Json<Named>,
) -> Result<StatusCode> {
    s.broker.create_group(&auth.actor, &g.name).await?;
    Ok(StatusCode::CREATED)
}

#[derive(Debug, Deserialize)]
struct Member {
    user: String,
}

async fn add_member(
    State(s): State<AppState>,
    Mutating(auth): Mutating,
    Path(group): Path<String>,
    Json(m): Json<Member>,
) -> Result<StatusCode> {
    s.broker.add_group_member(&auth.actor, &group, &m.user).await?;
    Ok(StatusCode::CREATED)
}

async fn list_images(State(s): State<AppState>, auth: Auth) -> Result<Json<Value>> {
    auth.actor.require_admin()?;
    Ok(Json(json!(s.broker.list_images().await?)))
}

async fn create_image(
    State(s): State<AppState>,
    Mutating(auth): Mutating,
    Json(image): Json<Image>,
) -> Result<(StatusCode, Json<Value>)> {
    Ok((StatusCode::CREATED, Json(json!(s.broker.create_image(&auth.actor, &image).await?))))
}

async fn list_pools(State(s): State<AppState>, auth: Auth) -> Result<Json<Value>> {
    auth.actor.require_admin()?;
    Ok(Json(json!(s.broker.list_pools().await?)))
}

async fn create_pool(
    State(s): State<AppState>,
    Mutating(auth): Mutating,
    Json(spec): Json<PoolSpec>,
) -> Result<(StatusCode, Json<Value>)> {
    Ok((StatusCode::CREATED, Json(json!(s.broker.create_pool(&auth.actor, &spec).await?))))
}

#[derive(Debug, Deserialize)]
struct PoolUpdate {
    #[serde(flatten)]
    spec: PoolSpec,
    #[serde(default = "yes")]
    enabled: bool,
}

fn yes() -> bool {
    true
}

async fn update_pool(
    State(s): State<AppState>,
    Mutating(auth): Mutating,
    Path(id): Path<String>,
    Json(u): Json<PoolUpdate>,
) -> Result<Json<Value>> {
    Ok(Json(json!(s.broker.update_pool(&auth.actor, &id, &u.spec, u.enabled).await?)))
}

async fn entitlements(State(s): State<AppState>, auth: Auth, Path(id): Path<String>) -> Result<Json<Value>> {
    auth.actor.require_admin()?;
    Ok(Json(json!(s.broker.entitlements(&id).await?)))
}

#[derive(Debug, Deserialize)]
struct EntitleBody {
    kind: PrincipalKind,
    name: String,
}

async fn entitle(
    State(s): State<AppState>,
    Mutating(auth): Mutating,
    Path(id): Path<String>,
    Json(e): Json<EntitleBody>,
) -> Result<StatusCode> {
    s.broker.entitle(&auth.actor, &id, e.kind, &e.name).await?;
    Ok(StatusCode::CREATED)
}

async fn list_hosts(State(s): State<AppState>, auth: Auth) -> Result<Json<Value>> {
    Ok(Json(json!(s.broker.list_hosts(&auth.actor).await?)))
}

async fn create_host_token(
    State(s): State<AppState>,
    Mutating(auth): Mutating,
    Json(spec): Json<HostTokenSpec>,
) -> Result<(StatusCode, Json<Value>)> {
    let token = s.broker.create_host_token(&auth.actor, &spec).await?;
    Ok((StatusCode::CREATED, Json(json!({ "token": token }))))
}

async fn list_desktops(State(s): State<AppState>, auth: Auth) -> Result<Json<Value>> {
    Ok(Json(json!(s.broker.list_desktops(&auth.actor).await?)))
}

async fn list_sessions(State(s): State<AppState>, auth: Auth) -> Result<Json<Value>> {
    Ok(Json(json!(s.broker.list_sessions(&auth.actor, false).await?)))
}

async fn disconnect_session(
    State(s): State<AppState>,
    Mutating(auth): Mutating,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    s.broker.disconnect_session(&auth.actor, &id).await?;
    Ok(StatusCode::ACCEPTED)
}

async fn audit(State(s): State<AppState>, auth: Auth) -> Result<Json<Value>> {
    Ok(Json(json!(s.broker.list_audit(&auth.actor, 1000).await?)))
}

// ----- host API ---------------------------------------------------------------------------

/// The host whose credential the request carries, over a connection that may use it (its
/// pinned client certificate).
async fn host_auth(s: &AppState, headers: &HeaderMap, transport: &Transport) -> Result<Host> {
    let credential = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .filter(|c| c.starts_with("hcr_"))
        .ok_or(Error::Unauthenticated)?;
    s.broker.host_by_credential(credential.trim(), transport).await
}

/// How the request reached the broker (`server::serve` sets it on every request). Without it,
/// HTTPS without a client certificate: a pinned host is refused rather than let through.
#[derive(Debug)]
struct Connection(Transport);

impl<S: Send + Sync> FromRequestParts<S> for Connection {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> std::result::Result<Self, Self::Rejection> {
        Ok(Self(
            parts
                .extensions
                .get::<Transport>()
                .cloned()
                .unwrap_or(Transport::Https { client_cert_sha256: None }),
        ))
    }
}

async fn register_host(
    State(s): State<AppState>,
    Client(client): Client,
    Connection(transport): Connection,
    Json(reg): Json<HostRegistration>,
) -> Result<Response> {
    let registered = s.broker.register_host(&reg, &client, &transport).await?;
    Ok((StatusCode::CREATED, Json(registered)).into_response())
}

async fn heartbeat(
    State(s): State<AppState>,
    headers: HeaderMap,
    Connection(transport): Connection,
    Json(beat): Json<Heartbeat>,
) -> Result<Json<Value>> {
    let host = host_auth(&s, &headers, &transport).await?;
    Ok(Json(json!(s.broker.heartbeat(&host, &beat).await?)))
}

async fn ack_command(
    State(s): State<AppState>,
    headers: HeaderMap,
    Connection(transport): Connection,
    Path(id): Path<String>,
    Json(ack): Json<CommandAck>,
) -> Result<StatusCode> {
    let host = host_auth(&s, &headers, &transport).await?;
    s.broker.ack_command(&host, &id, &ack).await?;
    Ok(StatusCode::NO_CONTENT)
}
