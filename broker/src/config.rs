//! `broker.toml`.
//!
//! ```toml
//! database = "sqlite:///var/lib/pleiades/broker.db"   # or postgres://broker@db/pleiades
//! listen = "0.0.0.0:8443"
//! state_dir = "/var/lib/pleiades"     # mode 0700: the ticket signing key, the generated TLS
//!                                     # certificate (default: the SQLite database's directory)
//! # tls_cert = "/etc/pleiades/broker.crt"; tls_key = "/etc/pleiades/broker.key"
//! insecure_http = false               # plain HTTP: loopback tests or behind a TLS proxy
//! [broker]
//! ticket_lifetime_secs = 60
//! heartbeat_timeout_secs = 30
//! [ldap]                              # optional: directory accounts (docs/broker.md, "Directory sign-in")
//! url = "ldaps://ldap.example.org"
//! user_base = "ou=people,dc=example,dc=org"
//! group_base = "ou=groups,dc=example,dc=org"
//! ```

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::auth::ldap::LdapConfig;
use crate::broker::BrokerSettings;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub database: String,
    pub listen: String,
    /// Where the ticket signing key and the generated TLS certificate live (made 0700).
    /// Default: the directory of a SQLite database, else the working directory.
    pub state_dir: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Serve plain HTTP. Cookies then lack `Secure` unless `secure_cookies` is set (a TLS
    /// proxy in front).
    pub insecure_http: bool,
    pub secure_cookies: Option<bool>,
    pub broker: BrokerSettings,
    /// Sign-in against an LDAP directory, next to the broker's own accounts.
    pub ldap: Option<LdapConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            database: "sqlite://broker.db".into(),
            listen: "127.0.0.1:8443".into(),
            state_dir: None,
            tls_cert: None,
            tls_key: None,
            insecure_http: false,
            secure_cookies: None,
            broker: BrokerSettings::default(),
            ldap: None,
        }
    }
}

impl Config {
    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// The state directory: `state_dir`, or the SQLite database's directory, or `.`.
    pub fn state_dir(&self) -> PathBuf {
        if let Some(dir) = &self.state_dir {
            return dir.clone();
        }
        crate::db::sqlite_path(&self.database)
            .and_then(|db| {
                db.parent().map(|p| if p.as_os_str().is_empty() { ".".into() } else { p.to_owned() })
            })
            .unwrap_or_else(|| PathBuf::from("."))
    }

    pub fn cookies_secure(&self) -> bool {
        self.secure_cookies.unwrap_or(!self.insecure_http)
    }
}
