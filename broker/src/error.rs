//! The broker library's error type.

/// Everything a broker operation can refuse or fail with. The HTTP layer maps each kind to a
/// status code; messages never contain secrets.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("forbidden")]
    Forbidden,
    #[error("not authenticated")]
    Unauthenticated,
    /// A host request whose connection does not present the host's pinned TLS client
    /// certificate (or a registration over HTTPS that presents none).
    #[error("host certificate: {0}")]
    HostCertificate(String),
    #[error("too many attempts; try again later")]
    RateLimited,
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("already exists: {0}")]
    Conflict(String),
    #[error("pool {0} has no free desktop and is at its maximum size")]
    PoolExhausted(String),
    #[error("no online host has capacity for image {0}")]
    NoCapacity(String),
    /// The pool's desktops fail to start: the host's reason, and when the next try is.
    #[error("pool {pool}: its desktops fail to start ({reason}); the next attempt is in {retry_in_secs} s")]
    StartFailing { pool: String, reason: String, retry_in_secs: i64 },
    /// A service the request needs (the LDAP directory) cannot be reached; the reason is in the
    /// server's log.
    #[error("{0} is unavailable; try again later")]
    Unavailable(String),
    #[error("desktop {0} is not ready yet")]
    NotReady(String),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("ticket error: {0}")]
    Ticket(#[from] pleiades_protocol::ticket::TicketError),
    #[error("internal error: {0}")]
    Internal(String),
    /// The ticket signing key cannot be loaded or kept (at start, never during a request).
    #[error("ticket signing key: {0}")]
    TicketKey(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
