//! HTTP: the portal and admin console (server-rendered HTML), the REST API and the host API.
//!
//! Every handler authenticates (session cookie or bearer token) and authorizes through the
//! [`Broker`] methods, which check roles and ownership themselves. State-changing requests
//! from a browser session carry a CSRF token (form field `csrf` or header `X-CSRF-Token`) and,
//! when the browser sends one, an `Origin` that matches `Host`.

mod api;
mod web;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};

use crate::broker::Broker;
use crate::error::Error;
use crate::model::Actor;
use crate::secret;

pub const SESSION_COOKIE: &str = "pleiades_session";
pub const LOGIN_CSRF_COOKIE: &str = "pleiades_login_csrf";

/// What every handler gets.
#[derive(Debug, Clone)]
pub struct AppState {
    pub broker: Arc<Broker>,
    /// Mark cookies `Secure` (always, unless serving plain HTTP for tests or behind a proxy).
    pub secure_cookies: bool,
}

/// The whole HTTP surface.
pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(web::routes())
        .nest("/api/v1", api::routes())
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .layer(middleware::from_fn(security_headers))
        .layer(middleware::from_fn(same_origin))
        .with_state(state)
}

/// Adds security headers to every response. `Referrer-Policy: same-origin`, not `no-referrer`:
/// with `no-referrer` browsers send `Origin: null` on form posts, which [`same_origin`] refuses.
async fn security_headers(req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.entry(header::CACHE_CONTROL).or_insert(HeaderValue::from_static("no-store"));
    res
}

/// Refuses cross-origin state changes: a browser's `Origin` must name this server.
async fn same_origin(req: Request, next: Next) -> Response {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let origin = req.headers().get(header::ORIGIN).and_then(|v| v.to_str().ok());
        let host = req.headers().get(header::HOST).and_then(|v| v.to_str().ok());
        if let (Some(origin), Some(host)) = (origin, host) {
            let origin_host = origin.split_once("://").map(|(_, h)| h).unwrap_or(origin);
            if origin_host != host {
                return (StatusCode::FORBIDDEN, "cross-origin request refused").into_response();
            }
        }
    }
    next.run(req).await
}

/// The caller's client address, for rate limits and the audit log.
fn client_addr(parts: &Parts) -> String {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string())
        .unwrap_or_else(|| "unknown".into())
}

pub(crate) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

pub(crate) fn set_cookie(name: &str, value: &str, max_age: i64, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
    ))
    .expect("cookie text is ASCII")
}

/// How the caller authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Cookie,
    Bearer,
}

/// An authenticated user (session cookie or `Authorization: Bearer`).
#[derive(Debug, Clone)]
pub struct Auth {
    pub actor: Actor,
    pub csrf: String,
    pub token: String,
    pub via: Via,
    pub client: String,
}

impl Auth {
    /// State changes through a cookie session must prove they come from our pages.
    pub fn check_csrf(&self, presented: Option<&str>) -> Result<(), Error> {
        match self.via {
            Via::Bearer => Ok(()),
            Via::Cookie
                if presented
                    .is_some_and(|p| secret::constant_time_eq(p.as_bytes(), self.csrf.as_bytes())) =>
            {
                Ok(())
            }
            Via::Cookie => Err(Error::Forbidden),
        }
    }
}

impl FromRequestParts<AppState> for Auth {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let bearer = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let (token, via) = match (bearer, cookie(&parts.headers, SESSION_COOKIE)) {
            (Some(t), _) => (t.trim().to_owned(), Via::Bearer),
            (None, Some(c)) => (c.to_owned(), Via::Cookie),
            (None, None) => return Err(Error::Unauthenticated),
        };
        let (actor, csrf, kind) = state.broker.authenticate_token(&token).await?;
        // A browser session cookie is not an API bearer token and vice versa.
        if (via == Via::Bearer) != (kind == "api") {
            return Err(Error::Unauthenticated);
        }
        Ok(Self { actor, csrf, token, via, client: client_addr(parts) })
    }
}

/// The client address alone (login, host registration).
#[derive(Debug, Clone)]
pub struct Client(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Client {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(client_addr(parts)))
    }
}

impl Error {
    pub fn status(&self) -> StatusCode {
        match self {
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Forbidden | Error::HostCertificate(_) => StatusCode::FORBIDDEN,
            Error::Unauthenticated => StatusCode::UNAUTHORIZED,
            Error::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Error::Invalid(_) | Error::Ticket(_) => StatusCode::BAD_REQUEST,
            Error::Conflict(_) | Error::PoolExhausted(_) | Error::NotReady(_) => StatusCode::CONFLICT,
            Error::NoCapacity(_) | Error::StartFailing { .. } | Error::Unavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Error::Db(_) | Error::Internal(_) | Error::TicketKey(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// What the caller may see: internal details stay in the server log.
    pub fn public_message(&self) -> String {
        match self {
            Error::Db(_) | Error::Internal(_) | Error::TicketKey(_) => {
                tracing::error!("request failed: {self}");
                "internal error".into()
            }
            other => other.to_string(),
        }
    }
}

/// JSON error body for the API: `{"error": "..."}`.
impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status();
        (status, axum::Json(serde_json::json!({ "error": self.public_message() }))).into_response()
    }
}
