//! Where passwords are checked: one [`PasswordBackend`] per account source (`users.source`).
//!
//! Local accounts (argon2id hashes in the database) are built in. An LDAP backend would bind
//! as the user in [`PasswordBackend::verify`] and be registered with
//! [`crate::Broker::with_password_backend`]; its accounts are `users` rows with
//! `source = 'ldap'` and no hash (created by an import or on first login). OIDC does not check
//! passwords at all: it will be a redirect login route that maps the provider's subject to a
//! `source = 'oidc'` user and then creates the same session as a password login.

use crate::secret;

/// Checks a password for accounts of one source. Called on a blocking thread (argon2 and
/// directory binds block).
pub trait PasswordBackend: Send + Sync + std::fmt::Debug {
    /// The `users.source` value this backend serves.
    fn source(&self) -> &'static str;

    /// Whether `password` is right for the account `name`, whose stored hash (local accounts
    /// only) is `stored_hash`.
    fn verify(&self, name: &str, stored_hash: Option<&str>, password: &str) -> bool;
}

/// Local accounts: argon2id PHC strings in `users.password_hash`.
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalPasswords;

impl PasswordBackend for LocalPasswords {
    fn source(&self) -> &'static str {
        "local"
    }

    fn verify(&self, _name: &str, stored_hash: Option<&str>, password: &str) -> bool {
        // An account without a password costs the same time as a wrong password.
        let hash = stored_hash.unwrap_or(secret::dummy_hash());
        secret::verify_password(password, hash) && stored_hash.is_some()
    }
}
