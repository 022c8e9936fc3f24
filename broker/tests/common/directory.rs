//! A test LDAP directory: a real slapd (`pleiades_testkit::slapd`) with LDAPS from a test CA,
//! a search account, people and groups.
//!
//! People (password `<uid>-directory`): `alice` (Alice Liddell; engineering, staff), `bob` (no
//! group), `carol` (pleiades-admins), `dave` (also a local account in some tests), and two
//! entries that share `uid=twin`. Groups: `engineering` and `pleiades-admins` (groupOfNames),
//! `staff` (posixGroup, by memberUid), `design` (a posixGroup without members).

use std::path::PathBuf;
use std::sync::Arc;

use pleiades_broker::auth::ldap::{Directory, LdapConfig};
use pleiades_testkit::prerequisite::{Missing, missing};
use pleiades_testkit::slapd::{ADMIN_DN, ServerTls, Slapd, hash_password, installed};

pub const PEOPLE: &str = "ou=people,dc=example,dc=org";
pub const GROUPS: &str = "ou=groups,dc=example,dc=org";
pub const SEARCH_DN: &str = "cn=pleiades,ou=services,dc=example,dc=org";
pub const SEARCH_PASSWORD: &str = "search-account-password";

/// A person's DN.
pub fn person(uid: &str) -> String {
    format!("uid={uid},{PEOPLE}")
}

/// A person's directory password.
pub fn password(uid: &str) -> String {
    format!("{uid}-directory")
}

#[derive(Debug)]
pub struct TestDirectory {
    pub slapd: Slapd,
    /// The CA (PEM file) that signed slapd's certificate.
    pub ca_file: PathBuf,
    /// A CA that did not.
    pub other_ca_file: PathBuf,
    pub password_file: PathBuf,
    _files: tempfile::TempDir,
}

/// A CA and a certificate it signed for 127.0.0.1: `(ca_pem, server)`.
fn test_pki() -> (String, ServerTls) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "Pleiades test directory CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, "127.0.0.1");
    let cert = params.signed_by(&key, &ca).unwrap();
    (ca.pem(), ServerTls { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

impl TestDirectory {
    /// Starts the directory, or `None` when slapd is not installed and this is not CI (the
    /// skip is announced; under CI it panics).
    pub fn start(test: &str) -> Option<Self> {
        if let Err(e) = installed() {
            match missing(test, &e.to_string()) {
                Missing::Skip => return None,
                Missing::Fail(m) => panic!("{m}"),
            }
        }
        let mut ldif = String::new();
        ldif += &format!("dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n\n");
        ldif += &format!("dn: {GROUPS}\nobjectClass: organizationalUnit\nou: groups\n\n");
        ldif += "dn: ou=services,dc=example,dc=org\nobjectClass: organizationalUnit\nou: services\n\n";
        ldif += &format!(
            "dn: {SEARCH_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\ncn: pleiades\nuserPassword: {}\n\n",
            hash_password(SEARCH_PASSWORD).unwrap()
        );
        for (uid, cn, number) in [
            ("alice", "Alice Liddell", 2001),
            ("bob", "Bob Marley", 2002),
            ("carol", "Carol Danvers", 2003),
            ("dave", "Dave Bowman", 2004),
        ] {
            ldif += &format!(
                "dn: {}\nobjectClass: inetOrgPerson\nobjectClass: posixAccount\nuid: {uid}\ncn: {cn}\nsn: {}\n\
                 uidNumber: {number}\ngidNumber: {number}\nhomeDirectory: /home/{uid}\nuserPassword: {}\n\n",
                person(uid),
                cn.split(' ').nth(1).unwrap_or(cn),
                hash_password(&password(uid)).unwrap()
            );
        }
        for ou in ["one", "two"] {
            ldif += &format!("dn: ou={ou},{PEOPLE}\nobjectClass: organizationalUnit\nou: {ou}\n\n");
            ldif += &format!(
                "dn: uid=twin,ou={ou},{PEOPLE}\nobjectClass: inetOrgPerson\nuid: twin\ncn: Twin {ou}\nsn: Twin\nuserPassword: {}\n\n",
                hash_password(&password("twin")).unwrap()
            );
        }
        ldif += &format!(
            "dn: cn=engineering,{GROUPS}\nobjectClass: groupOfNames\ncn: engineering\nmember: {}\n\n",
            person("alice")
        );
        ldif += &format!(
            "dn: cn=pleiades-admins,{GROUPS}\nobjectClass: groupOfNames\ncn: pleiades-admins\nmember: {}\n\n",
            person("carol")
        );
        ldif += &format!(
            "dn: cn=staff,{GROUPS}\nobjectClass: posixGroup\ncn: staff\ngidNumber: 3000\nmemberUid: alice\n\n"
        );
        ldif += &format!("dn: cn=design,{GROUPS}\nobjectClass: posixGroup\ncn: design\ngidNumber: 3001\n\n");
        let (ca_pem, tls) = test_pki();
        let slapd = Slapd::start(&ldif, Some(&tls)).unwrap_or_else(|e| panic!("{test}: slapd: {e}"));
        let files = tempfile::tempdir().unwrap();
        let ca_file = files.path().join("ca.pem");
        std::fs::write(&ca_file, ca_pem).unwrap();
        let other_ca_file = files.path().join("other-ca.pem");
        std::fs::write(&other_ca_file, test_pki().0).unwrap();
        let password_file = files.path().join("search-password");
        std::fs::write(&password_file, format!("{SEARCH_PASSWORD}\n")).unwrap();
        Some(Self { slapd, ca_file, other_ca_file, password_file, _files: files })
    }

    /// The broker's `[ldap]` table for this directory: LDAPS, the test CA, the search account,
    /// groups, `pleiades-admins` as the administrators' group.
    pub fn config(&self) -> LdapConfig {
        LdapConfig {
            ca_file: Some(self.ca_file.clone()),
            bind_dn: Some(SEARCH_DN.into()),
            bind_password_file: Some(self.password_file.clone()),
            user_base: PEOPLE.into(),
            group_base: Some(GROUPS.into()),
            admin_group: Some("pleiades-admins".into()),
            ..LdapConfig::new(&self.slapd.tls_url().unwrap(), PEOPLE)
        }
    }

    pub fn directory(&self) -> Arc<Directory> {
        Arc::new(Directory::new(self.config()).unwrap())
    }

    /// Changes the directory as its administrator would (an LDAP modify over the plain port).
    pub async fn modify(&self, dn: &str, mods: Vec<ldap3::Mod<&str>>) {
        let (conn, mut ldap) = ldap3::LdapConnAsync::new(&self.slapd.url()).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.drive().await;
        });
        ldap.simple_bind(ADMIN_DN, self.slapd.admin_password()).await.unwrap().success().unwrap();
        ldap.modify(dn, mods).await.unwrap().success().unwrap();
        let _ = ldap.unbind().await;
    }
}
