//! Sign-in against an LDAP directory (OpenLDAP, 389-DS, Active Directory): search, then bind.
//!
//! A sign-in as `name` with `password`:
//! 1. connects (LDAPS, or StartTLS on `ldap://`; plain LDAP only when `insecure = true`) and
//!    binds as the search account (`bind_dn` + the password in `bind_password_file`), or
//!    searches anonymously when no `bind_dn` is given;
//! 2. finds the one entry under `user_base` that `user_filter` matches, `{name}` replaced by
//!    the typed name escaped per RFC 4515 (no entry, or more than one: the sign-in fails);
//! 3. binds as that entry's DN with the password on a second connection: the directory checks
//!    it, the broker never sees a hash. An empty password is refused before any bind (an LDAP
//!    bind with a DN and no password is an *unauthenticated* bind that servers answer with
//!    success);
//! 4. lists the entry's groups with `group_filter` under `group_base` (`{dn}` the entry's DN,
//!    `{name}` its name, both escaped), by `group_name_attribute`, on the search connection.
//!
//! The entry's `name_attribute` is the broker user name (the directory's spelling: `Alice`
//! typed signs in as `alice`), `display_name_attribute` its display name, and membership of
//! `admin_group` (when set) makes the user a broker administrator, at every sign-in.
//!
//! Directory answers are untrusted input all the same: every step runs under one timeout, in a
//! task of its own (the LDAP decoder may panic on malformed BER; a panic fails that sign-in
//! only), result sizes are capped, and names the broker cannot hold are skipped with a warning.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ldap3::{LdapConnAsync, LdapConnSettings, Scope, SearchEntry, SearchOptions, ldap_escape};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};

use super::ExternalIdentity;
use crate::model::valid_name;

/// The `[ldap]` table of broker.toml.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LdapConfig {
    /// `ldaps://host[:port]` or `ldap://host[:port]` (then `starttls = true`, or `insecure`).
    pub url: String,
    /// Upgrade an `ldap://` connection with StartTLS before anything is sent.
    #[serde(default)]
    pub starttls: bool,
    /// Accept a directory without TLS (`ldap://` without StartTLS): passwords cross the
    /// network in clear. Only for a directory on the same machine.
    #[serde(default)]
    pub insecure: bool,
    /// CA certificates (PEM) the directory's certificate must chain to; default: the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The search account's DN; none: search anonymously.
    #[serde(default)]
    pub bind_dn: Option<String>,
    /// A file holding the search account's password (kept out of broker.toml; mode 0600).
    #[serde(default)]
    pub bind_password_file: Option<PathBuf>,
    /// Where users are searched (the whole subtree).
    pub user_base: String,
    /// The filter that finds a user; `{name}` is the typed name, escaped.
    #[serde(default = "default_user_filter")]
    pub user_filter: String,
    #[serde(default = "default_name_attribute")]
    pub name_attribute: String,
    #[serde(default = "default_display_name_attribute")]
    pub display_name_attribute: String,
    /// Where groups are searched (the whole subtree); none: directory users are in no group.
    #[serde(default)]
    pub group_base: Option<String>,
    /// The filter that finds a user's groups; `{dn}` is the user's DN, `{name}` the user name.
    #[serde(default = "default_group_filter")]
    pub group_filter: String,
    #[serde(default = "default_group_name_attribute")]
    pub group_name_attribute: String,
    /// Members of this directory group are broker administrators; none: the directory does
    /// not decide (an administrator sets the flag on the broker's side).
    #[serde(default)]
    pub admin_group: Option<String>,
    /// Every sign-in's directory work (connect, binds, searches) ends within this.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
}

impl LdapConfig {
    /// A directory at `url` whose users are under `user_base`, everything else by default.
    pub fn new(url: &str, user_base: &str) -> Self {
        Self {
            url: url.into(),
            starttls: false,
            insecure: false,
            ca_file: None,
            bind_dn: None,
            bind_password_file: None,
            user_base: user_base.into(),
            user_filter: default_user_filter(),
            name_attribute: default_name_attribute(),
            display_name_attribute: default_display_name_attribute(),
            group_base: None,
            group_filter: default_group_filter(),
            group_name_attribute: default_group_name_attribute(),
            admin_group: None,
            timeout_secs: default_timeout_secs(),
        }
    }
}

fn default_user_filter() -> String {
    "(&(objectClass=inetOrgPerson)(uid={name}))".into()
}
fn default_name_attribute() -> String {
    "uid".into()
}
fn default_display_name_attribute() -> String {
    "cn".into()
}
fn default_group_filter() -> String {
    "(|(&(objectClass=groupOfNames)(member={dn}))(&(objectClass=groupOfUniqueNames)(uniqueMember={dn}))(&(objectClass=posixGroup)(memberUid={name})))".into()
}
fn default_group_name_attribute() -> String {
    "cn".into()
}
fn default_timeout_secs() -> u64 {
    10
}

/// The most groups one user's sign-in takes from the directory.
pub const MAX_GROUPS: i32 = 1000;

/// What went wrong talking to the directory (not a wrong password: that is `Ok(None)`).
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    #[error("LDAP configuration: {0}")]
    Config(String),
    #[error("the directory {url} did not answer within {secs} s")]
    Timeout { url: String, secs: u64 },
    #[error("the directory {url}: {detail}")]
    Ldap { url: String, detail: String },
    #[error("the directory has {0} or more entries for one user name: fix user_filter or the directory")]
    Ambiguous(usize),
    #[error(
        "the directory's entry {dn} has no usable {attribute} (a broker user name is 1-64 letters, digits, '-', '_', '.', '@')"
    )]
    BadName { dn: String, attribute: String },
    #[error("a directory sign-in failed inside: {0}")]
    Internal(String),
}

/// A configured directory. Cheap to share; connects anew for every sign-in.
#[derive(Debug)]
pub struct Directory {
    config: LdapConfig,
    bind_password: Option<String>,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Directory {
    /// Checks the configuration and reads the search account's password and the CA file.
    pub fn new(config: LdapConfig) -> Result<Self, DirectoryError> {
        let bad = |m: String| DirectoryError::Config(m);
        let scheme = config.url.split("://").next().unwrap_or_default().to_ascii_lowercase();
        match (scheme.as_str(), config.starttls, config.insecure) {
            ("ldaps", false, _) | ("ldap", true, _) | ("ldap", false, true) => {}
            ("ldaps", true, _) => return Err(bad("url: ldaps:// is TLS already; drop starttls".into())),
            ("ldap", false, false) => {
                return Err(bad(format!(
                    "url {}: plain LDAP would send passwords in clear. Use ldaps://, or starttls = true, \
                     or (a directory on this machine only) insecure = true",
                    config.url
                )));
            }
            _ => return Err(bad(format!("url {}: give ldaps://host or ldap://host", config.url))),
        }
        if !config.user_filter.contains("{name}") {
            return Err(bad("user_filter must contain {name}".into()));
        }
        for (what, filter) in [("user_filter", &config.user_filter), ("group_filter", &config.group_filter)] {
            if !filter.starts_with('(') || !filter.ends_with(')') {
                return Err(bad(format!("{what} {filter:?}: an LDAP filter is written in parentheses")));
            }
        }
        let bind_password = match (&config.bind_dn, &config.bind_password_file) {
            (Some(_), Some(file)) => Some(
                std::fs::read_to_string(file)
                    .map_err(|e| bad(format!("bind_password_file {}: {e}", file.display())))?
                    .trim_end_matches(['\r', '\n'])
                    .to_owned(),
            ),
            (Some(dn), None) => {
                return Err(bad(format!(
                    "bind_dn {dn} needs bind_password_file (the password is kept out of broker.toml)"
                )));
            }
            (None, Some(_)) => return Err(bad("bind_password_file without bind_dn".into())),
            (None, None) => None,
        };
        let tls =
            if scheme == "ldaps" || config.starttls { Some(Arc::new(tls_config(&config)?)) } else { None };
        Ok(Self { config, bind_password, tls })
    }

    pub fn config(&self) -> &LdapConfig {
        &self.config
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.config.timeout_secs.clamp(1, 300))
    }

    /// Checks `password` for `name`: who the user is when it is right; `None` when the
    /// directory has no such user or the password is wrong.
    pub async fn authenticate(
        self: &Arc<Self>,
        name: &str,
        password: &str,
    ) -> Result<Option<ExternalIdentity>, DirectoryError> {
        if password.is_empty() || !valid_name(name) {
            return Ok(None);
        }
        let (me, name, password) = (self.clone(), name.to_owned(), password.to_owned());
        self.bounded(async move { me.authenticate_inner(&name, Some(&password)).await }).await
    }

    /// Who `name` is in the directory, without a password (`pleiades-broker directory lookup`).
    pub async fn lookup(self: &Arc<Self>, name: &str) -> Result<Option<ExternalIdentity>, DirectoryError> {
        if !valid_name(name) {
            return Ok(None);
        }
        let (me, name) = (self.clone(), name.to_owned());
        self.bounded(async move { me.authenticate_inner(&name, None).await }).await
    }

    /// Whether the directory has a group named `name` (under `group_base`).
    pub async fn group_exists(self: &Arc<Self>, name: &str) -> Result<bool, DirectoryError> {
        let Some(base) = self.config.group_base.clone() else { return Ok(false) };
        let me = self.clone();
        let filter = format!("({}={})", self.config.group_name_attribute, ldap_escape(name));
        self.bounded(async move {
            let mut ldap = me.connect_as_searcher().await?;
            let (entries, more) = me.search(&mut ldap, &base, &filter, &["dn"], 1).await?;
            let _ = ldap.unbind().await;
            Ok(!entries.is_empty() || more)
        })
        .await
    }

    /// Runs `work` under the timeout, in its own task (a panic fails only this call).
    async fn bounded<T: Send + 'static>(
        &self,
        work: impl Future<Output = Result<T, DirectoryError>> + Send + 'static,
    ) -> Result<T, DirectoryError> {
        let task = tokio::spawn(tokio::time::timeout(self.timeout(), work));
        match task.await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => {
                Err(DirectoryError::Timeout { url: self.config.url.clone(), secs: self.timeout().as_secs() })
            }
            Err(e) => Err(DirectoryError::Internal(e.to_string())),
        }
    }

    async fn authenticate_inner(
        &self,
        name: &str,
        password: Option<&str>,
    ) -> Result<Option<ExternalIdentity>, DirectoryError> {
        let c = &self.config;
        let mut searcher = self.connect_as_searcher().await?;
        let filter = c.user_filter.replace("{name}", &ldap_escape(name));
        let attrs = [c.name_attribute.as_str(), c.display_name_attribute.as_str()];
        let (found, more) = self.search(&mut searcher, &c.user_base, &filter, &attrs, 2).await?;
        let entry = match (found.as_slice(), more) {
            ([], false) => return Ok(None),
            ([one], false) => one,
            (some, _) => return Err(DirectoryError::Ambiguous(some.len().max(2))),
        };
        if let Some(password) = password {
            let mut user = self.connect().await?;
            let bound = user.simple_bind(&entry.dn, password).await.map_err(|e| self.ldap_error(e))?;
            let _ = user.unbind().await;
            match bound.rc {
                0 => {}
                // invalidCredentials; also a locked or expired account on most servers.
                49 => return Ok(None),
                rc => {
                    return Err(DirectoryError::Ldap {
                        url: c.url.clone(),
                        detail: format!("binding as the user answered {rc}: {}", bound.text),
                    });
                }
            }
        }
        let first = |attribute: &str| {
            entry
                .attrs
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(attribute))
                .and_then(|(_, v)| v.first())
                .cloned()
        };
        // The directory's spelling of the name, when it is the typed name in another case.
        let canonical =
            first(&c.name_attribute).filter(|n| n.eq_ignore_ascii_case(name) && valid_name(n)).ok_or_else(
                || DirectoryError::BadName { dn: entry.dn.clone(), attribute: c.name_attribute.clone() },
            )?;
        let display_name = first(&c.display_name_attribute).unwrap_or_else(|| canonical.clone());
        let mut groups = Vec::new();
        if let Some(base) = &c.group_base {
            let filter = c
                .group_filter
                .replace("{dn}", &ldap_escape(&entry.dn))
                .replace("{name}", &ldap_escape(&canonical));
            let attrs = [c.group_name_attribute.as_str()];
            let (found, more) = self.search(&mut searcher, base, &filter, &attrs, MAX_GROUPS).await?;
            if more {
                tracing::warn!(user = %entry.dn, "the user is in more than {MAX_GROUPS} groups; the rest are left out");
            }
            for group in found {
                let names = group
                    .attrs
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(&c.group_name_attribute))
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default();
                match names.into_iter().find(|n| valid_name(n)) {
                    Some(n) if !groups.contains(&n) => groups.push(n),
                    Some(_) => {}
                    None => {
                        tracing::warn!(group = %group.dn, "a directory group without a usable name is left out")
                    }
                }
            }
        }
        let _ = searcher.unbind().await;
        let is_admin = c.admin_group.as_ref().map(|admins| groups.iter().any(|g| g == admins));
        Ok(Some(ExternalIdentity {
            source: "ldap",
            external_id: entry.dn.clone(),
            name: canonical,
            display_name: display_name.chars().take(200).collect(),
            groups,
            is_admin,
        }))
    }

    async fn connect(&self) -> Result<ldap3::Ldap, DirectoryError> {
        let mut settings =
            LdapConnSettings::new().set_conn_timeout(self.timeout()).set_starttls(self.config.starttls);
        if let Some(tls) = &self.tls {
            settings = settings.set_config(tls.clone());
        }
        let (conn, ldap) =
            LdapConnAsync::with_settings(settings, &self.config.url).await.map_err(|e| self.ldap_error(e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.drive().await {
                tracing::debug!("LDAP connection ended: {e}");
            }
        });
        Ok(ldap)
    }

    async fn connect_as_searcher(&self) -> Result<ldap3::Ldap, DirectoryError> {
        let mut ldap = self.connect().await?;
        if let (Some(dn), Some(password)) = (&self.config.bind_dn, &self.bind_password) {
            let bound = ldap.simple_bind(dn, password).await.map_err(|e| self.ldap_error(e))?;
            if bound.rc != 0 {
                return Err(DirectoryError::Ldap {
                    url: self.config.url.clone(),
                    detail: format!(
                        "the search account {dn} cannot bind ({}: {}): check bind_dn and bind_password_file",
                        bound.rc, bound.text
                    ),
                });
            }
        }
        Ok(ldap)
    }

    /// Entries under `base` (subtree) that `filter` matches, at most `limit`, and whether
    /// there were more (sizeLimitExceeded comes back with the entries so far).
    async fn search(
        &self,
        ldap: &mut ldap3::Ldap,
        base: &str,
        filter: &str,
        attrs: &[&str],
        limit: i32,
    ) -> Result<(Vec<SearchEntry>, bool), DirectoryError> {
        let ldap3::SearchResult(entries, result) = ldap
            .with_search_options(SearchOptions::new().sizelimit(limit))
            .search(base, Scope::Subtree, filter, attrs.to_vec())
            .await
            .map_err(|e| self.ldap_error(e))?;
        match result.rc {
            // success, sizeLimitExceeded, noSuchObject (the base is not there: nothing found).
            0 | 4 | 32 => {}
            rc => {
                return Err(DirectoryError::Ldap {
                    url: self.config.url.clone(),
                    detail: format!("searching {base} with {filter} answered {rc}: {}", result.text),
                });
            }
        }
        let mut found: Vec<SearchEntry> = entries.into_iter().map(SearchEntry::construct).collect();
        // Search references carry no DN: they are not entries.
        found.retain(|e| !e.dn.is_empty());
        Ok((found, result.rc == 4))
    }

    fn ldap_error(&self, e: ldap3::LdapError) -> DirectoryError {
        DirectoryError::Ldap { url: self.config.url.clone(), detail: e.to_string() }
    }
}

/// TLS to the directory: TLS 1.2+ (ring), the CA file's certificates or the system's roots.
fn tls_config(config: &LdapConfig) -> Result<rustls::ClientConfig, DirectoryError> {
    let bad = |m: String| DirectoryError::Config(m);
    let mut roots = rustls::RootCertStore::empty();
    match &config.ca_file {
        Some(file) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(file)
                .map_err(|e| bad(format!("ca_file {}: {e}", file.display())))?
                .collect::<Result<_, _>>()
                .map_err(|e| bad(format!("ca_file {}: {e}", file.display())))?;
            if certs.is_empty() {
                return Err(bad(format!("ca_file {}: no certificate in it", file.display())));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| bad(format!("ca_file {}: {e}", file.display())))?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for cert in native.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(bad(
                    "no system CA certificates found (install ca-certificates) and no ca_file given".into(),
                ));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: &str) -> LdapConfig {
        let c: LdapConfig = toml::from_str(&format!(
            "url = \"{url}\"\nuser_base = \"ou=people\"\nca_file = \"/nonexistent\""
        ))
        .unwrap();
        // The serde defaults and the constructor's agree.
        assert_eq!(
            c,
            LdapConfig { ca_file: Some("/nonexistent".into()), ..LdapConfig::new(url, "ou=people") }
        );
        c
    }

    #[test]
    fn plain_ldap_needs_starttls_or_an_explicit_insecure() {
        let e = Directory::new(config("ldap://directory")).unwrap_err().to_string();
        assert!(e.contains("in clear"), "{e}");
        let mut c = config("ldap://directory");
        c.insecure = true;
        Directory::new(c).unwrap();
        // With TLS the CA file is read, and a missing one is named.
        let e = Directory::new(config("ldaps://directory")).unwrap_err().to_string();
        assert!(e.contains("ca_file /nonexistent"), "{e}");
        let e = Directory::new(config("http://directory")).unwrap_err().to_string();
        assert!(e.contains("ldaps://host"), "{e}");
    }

    #[test]
    fn a_search_account_needs_its_password_file_and_filters_their_parentheses() {
        let mut c = config("ldap://directory");
        c.insecure = true;
        c.bind_dn = Some("cn=search,dc=example,dc=org".into());
        assert!(Directory::new(c.clone()).unwrap_err().to_string().contains("bind_password_file"));
        c.bind_dn = None;
        c.user_filter = "uid={name}".into();
        assert!(Directory::new(c.clone()).unwrap_err().to_string().contains("parentheses"));
        c.user_filter = "(uid=alice)".into();
        assert!(Directory::new(c).unwrap_err().to_string().contains("{name}"));
    }

    #[test]
    fn the_defaults_find_inetorgpersons_by_uid_and_their_groups_of_every_kind() {
        let c = config("ldaps://directory");
        assert_eq!(
            c.user_filter.replace("{name}", &ldap_escape("a*)(uid=*")),
            "(&(objectClass=inetOrgPerson)(uid=a\\2a\\29\\28uid=\\2a))"
        );
        for class in ["groupOfNames", "groupOfUniqueNames", "posixGroup"] {
            assert!(c.group_filter.contains(class), "{class}");
        }
        assert_eq!(c.timeout_secs, 10);
    }
}
