//! `pleiades-broker`: the connection broker.
//!
//! - [`db`]: one sqlx code path for SQLite and PostgreSQL, embedded migrations.
//! - [`model`]: users, groups, images, pools, desktops, hosts, sessions, audit entries.
//! - [`broker`]: every operation (allocation, tickets, host protocol, policy), with its
//!   authorization check and audit entry.
//! - [`http`]: the portal, the admin console, the REST API (`/api/v1`) and the host API.
//! - [`auth`]: password backends per account source (local argon2id; LDAP plugs in here).
//! - [`clock`]: injectable time, so that tests move time instead of sleeping.
//! - [`secret`]: tokens, token hashes, argon2id password hashes.
//! - [`private`]: the state directory (0700) and the secret files in it (0600).
//! - [`config`]: the `broker.toml` file.
//! - [`server`]: HTTPS (or plain HTTP) serving and the maintenance loop.

pub mod auth;
pub mod broker;
pub mod clock;
pub mod config;
pub mod db;
pub mod error;
pub mod http;
pub mod model;
pub mod private;
pub mod secret;
pub mod server;

pub use broker::{Broker, BrokerSettings};
pub use error::{Error, Result};
