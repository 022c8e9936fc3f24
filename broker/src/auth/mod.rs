//! Who may sign in, and how the broker learns who someone is.
//!
//! Accounts have a source (`users.source`):
//! - `local`: the broker's own accounts, argon2id hashes in `users.password_hash`, checked in
//!   [`crate::Broker::login`].
//! - `ldap`: a directory's accounts ([`ldap::Directory`], the `[ldap]` table of broker.toml). The
//!   directory checks the password (a bind as the user) and says who the user is and which
//!   groups they are in; the broker keeps a row without a hash, made at the first sign-in and
//!   brought up to date at every one after.
//!
//! Every way of proving who someone is ends in one [`ExternalIdentity`], which
//! [`crate::Broker::sign_in_external`] turns into a user row, group memberships and then the
//! same browser session or API token a local login gets. That is where OpenID Connect plugs in:
//! an OIDC login is a redirect to the provider and a callback route that checks the ID token
//! (issuer, audience, nonce, signature against the provider's keys) and maps its `sub`,
//! `preferred_username`, `name` and a groups claim to an [`ExternalIdentity`] with
//! `source = "oidc"`; nothing below the HTTP layer changes. See docs/security.md, "Sign-in".

pub mod ldap;

/// Who a directory (or, later, an OpenID provider) says a signed-in person is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalIdentity {
    /// The account source (`users.source`): `ldap`, later `oidc`.
    pub source: &'static str,
    /// The source's stable name for the person: the entry's DN, an OIDC `sub`.
    pub external_id: String,
    /// The broker's user name (the directory's spelling of it).
    pub name: String,
    pub display_name: String,
    /// The groups the source puts the person in. Groups of this source are created in the
    /// broker as they are first seen, and the person's memberships of them follow this list.
    pub groups: Vec<String>,
    /// Whether the source makes the person a broker administrator; `None`: the source does not
    /// say (no admin group configured), the broker's own flag stands.
    pub is_admin: Option<bool>,
}
