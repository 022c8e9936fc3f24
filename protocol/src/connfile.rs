//! Connection files (`.pleiades`, TOML) and `pleiades://` URIs.
//!
//! Both carry the same fields: where the desktop's session server listens, the SHA-256
//! fingerprint of its certificate (pinned by the client), the one-time ticket and a display name.
//!
//! ```toml
//! [connection]
//! version = 1
//! host = "10.0.0.5"
//! port = 4433
//! cert_sha256 = "…64 hex digits, or empty until hosts publish certificates…"
//! ticket = "pt1.…"
//! desktop = "Engineering desktop"
//! usb_auto = "class=08"   # optional: the USB devices to redirect as soon as it connects
//! ```
//!
//! `pleiades://10.0.0.5:4433/?ticket=pt1.…&desktop=Engineering%20desktop&cert_sha256=…`
//! (IPv6 hosts in brackets). Parsing never panics; unknown URI parameters are ignored so that
//! later versions can add some.

use serde::{Deserialize, Serialize};

pub const URI_SCHEME: &str = "pleiades://";
pub const FORMAT_VERSION: u32 = 1;
/// Longest URI or file accepted.
pub const MAX_LEN: usize = 8192;

/// Everything a client needs to reach one desktop once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connection {
    pub version: u32,
    pub host: String,
    pub port: u16,
    /// Lowercase hex SHA-256 of the session server's certificate; empty while unknown.
    #[serde(default)]
    pub cert_sha256: String,
    pub ticket: String,
    pub desktop: String,
    /// The USB devices the client redirects by itself (the desktop's pool's auto-redirect
    /// rules, [`crate::usb::UsbPolicy`]'s grammar: `class=08,0525:a4a5`); empty: none. The
    /// pool's policy still decides what the desktop takes.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub usb_auto: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionError {
    #[error("connection data longer than {MAX_LEN} bytes")]
    TooLong,
    #[error("connection file is not valid: {0}")]
    File(String),
    #[error("URI is not valid: {0}")]
    Uri(&'static str),
    #[error("unsupported connection format version {0}")]
    Version(u32),
}

#[derive(Serialize, Deserialize)]
struct FileDoc {
    connection: Connection,
}

impl Connection {
    pub fn to_toml(&self) -> String {
        toml::to_string(&FileDoc { connection: self.clone() }).expect("plain strings and integers serialize")
    }

    pub fn from_toml(text: &str) -> Result<Self, ConnectionError> {
        if text.len() > MAX_LEN {
            return Err(ConnectionError::TooLong);
        }
        let doc: FileDoc = toml::from_str(text).map_err(|e| ConnectionError::File(e.message().to_owned()))?;
        doc.connection.validated().map_err(|e| match e {
            ConnectionError::Uri(m) => ConnectionError::File(m.to_owned()),
            other => other,
        })
    }

    pub fn to_uri(&self) -> String {
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        let mut uri = format!("{URI_SCHEME}{host}:{}/?ticket={}", self.port, percent_encode(&self.ticket));
        uri.push_str(&format!("&desktop={}", percent_encode(&self.desktop)));
        if !self.cert_sha256.is_empty() {
            uri.push_str(&format!("&cert_sha256={}", percent_encode(&self.cert_sha256)));
        }
        if !self.usb_auto.is_empty() {
            uri.push_str(&format!("&usb_auto={}", percent_encode(&self.usb_auto)));
        }
        uri
    }

    pub fn from_uri(uri: &str) -> Result<Self, ConnectionError> {
        if uri.len() > MAX_LEN {
            return Err(ConnectionError::TooLong);
        }
        let rest = uri.strip_prefix(URI_SCHEME).ok_or(ConnectionError::Uri("scheme is not pleiades://"))?;
        let (authority, query) = match rest.split_once('/') {
            Some((a, path_query)) => {
                let query =
                    path_query.strip_prefix('?').unwrap_or(if path_query.is_empty() { "" } else { "\0" });
                if query == "\0" {
                    return Err(ConnectionError::Uri("unexpected path"));
                }
                (a, query)
            }
            None => match rest.split_once('?') {
                Some((a, q)) => (a, q),
                None => (rest, ""),
            },
        };
        let (host, port) = split_host_port(authority)?;
        let mut conn = Connection {
            version: FORMAT_VERSION,
            host,
            port,
            cert_sha256: String::new(),
            ticket: String::new(),
            desktop: String::new(),
            usb_auto: String::new(),
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(value)?;
            match key {
                "ticket" => conn.ticket = value,
                "desktop" => conn.desktop = value,
                "cert_sha256" => conn.cert_sha256 = value,
                "usb_auto" => conn.usb_auto = value,
                _ => {}
            }
        }
        conn.validated()
    }

    fn validated(self) -> Result<Self, ConnectionError> {
        if self.version != FORMAT_VERSION {
            return Err(ConnectionError::Version(self.version));
        }
        if self.host.is_empty() || self.host.chars().any(|c| c.is_whitespace() || "/?#@[]".contains(c)) {
            return Err(ConnectionError::Uri("bad host"));
        }
        if self.port == 0 {
            return Err(ConnectionError::Uri("port 0"));
        }
        if self.ticket.is_empty() {
            return Err(ConnectionError::Uri("missing ticket"));
        }
        if !self.cert_sha256.is_empty()
            && (self.cert_sha256.len() != 64 || !self.cert_sha256.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(ConnectionError::Uri("cert_sha256 is not 64 hex digits"));
        }
        if crate::usb::UsbPolicy::parse(&self.usb_auto).is_err() {
            return Err(ConnectionError::Uri(
                "usb_auto is not a list of USB rules (class=HH, VVVV:PPPP, all)",
            ));
        }
        // Both of its own forms must fit the limit the parsers enforce: percent-encoding can
        // make a URI up to three times as long as what it decodes to, so a connection read
        // from a long file (or a URI with raw bytes) could otherwise not be passed on.
        if self.to_uri().len() > MAX_LEN || self.to_toml().len() > MAX_LEN {
            return Err(ConnectionError::TooLong);
        }
        Ok(self)
    }
}

fn split_host_port(authority: &str) -> Result<(String, u16), ConnectionError> {
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, rest) = v6.split_once(']').ok_or(ConnectionError::Uri("unclosed ["))?;
        let port = rest.strip_prefix(':').ok_or(ConnectionError::Uri("missing port"))?;
        (host, port)
    } else {
        authority.rsplit_once(':').ok_or(ConnectionError::Uri("missing port"))?
    };
    let port: u16 = port.parse().map_err(|_| ConnectionError::Uri("bad port"))?;
    Ok((host.to_owned(), port))
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub fn percent_decode(text: &str) -> Result<String, ConnectionError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or(ConnectionError::Uri("truncated %-escape"))?;
                let hex = std::str::from_utf8(hex).map_err(|_| ConnectionError::Uri("bad %-escape"))?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| ConnectionError::Uri("bad %-escape"))?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| ConnectionError::Uri("not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_whose_own_uri_would_be_too_long_is_refused() {
        // Found by the protocol_parsers fuzz target: a URI with raw bytes parsed, and its
        // percent-encoded form was longer than MAX_LEN, so it did not parse back.
        let raw = "\u{ff}".repeat(MAX_LEN / 4);
        let uri = format!("{URI_SCHEME}host:4433/?ticket={raw}");
        assert!(uri.len() <= MAX_LEN);
        assert_eq!(Connection::from_uri(&uri), Err(ConnectionError::TooLong));
        let fits = format!("{URI_SCHEME}host:4433/?ticket={}", "\u{ff}".repeat(MAX_LEN / 16));
        let parsed = Connection::from_uri(&fits).unwrap();
        assert_eq!(Connection::from_uri(&parsed.to_uri()).unwrap(), parsed);
    }
    use proptest::prelude::*;

    fn sample() -> Connection {
        Connection {
            version: 1,
            host: "10.0.0.5".into(),
            port: 4433,
            cert_sha256: String::new(),
            ticket: "pt1.abc_-".into(),
            desktop: "Engineering desktop #1".into(),
            usb_auto: String::new(),
        }
    }

    #[test]
    fn toml_and_uri_round_trip() {
        let c = sample();
        assert_eq!(Connection::from_toml(&c.to_toml()).unwrap(), c);
        let uri = c.to_uri();
        assert_eq!(uri, "pleiades://10.0.0.5:4433/?ticket=pt1.abc_-&desktop=Engineering%20desktop%20%231");
        assert_eq!(Connection::from_uri(&uri).unwrap(), c);
    }

    #[test]
    fn usb_auto_rules_travel_in_both_forms_and_bad_ones_are_refused() {
        let c = Connection { usb_auto: "class=08,0525:a4a5".into(), ..sample() };
        let toml = c.to_toml();
        assert!(toml.contains("usb_auto = \"class=08,0525:a4a5\""), "{toml}");
        assert_eq!(Connection::from_toml(&toml).unwrap(), c);
        assert!(c.to_uri().ends_with("&usb_auto=class%3D08%2C0525%3Aa4a5"), "{}", c.to_uri());
        assert_eq!(Connection::from_uri(&c.to_uri()).unwrap(), c);
        // Older files have none: nothing is redirected by itself.
        assert!(!sample().to_toml().contains("usb_auto"));
        let bad = Connection { usb_auto: "class=8".into(), ..sample() };
        assert!(Connection::from_toml(&bad.to_toml()).is_err());
        assert!(Connection::from_uri(&format!("{}&usb_auto=everything", sample().to_uri())).is_err());
    }

    #[test]
    fn ipv6_and_refusals() {
        let c = Connection { host: "::1".into(), cert_sha256: "ab".repeat(32), ..sample() };
        assert_eq!(Connection::from_uri(&c.to_uri()).unwrap(), c);
        for bad in [
            "http://h:1/?ticket=t",
            "pleiades://h/?ticket=t",
            "pleiades://h:0/?ticket=t",
            "pleiades://h:1/?desktop=x",
            "pleiades://h:1/path?ticket=t",
            "pleiades://h:1/?ticket=%zz",
            "pleiades://[::1:1/?ticket=t",
        ] {
            assert!(Connection::from_uri(bad).is_err(), "{bad}");
        }
        assert!(
            Connection::from_toml("[connection]\nversion = 2\nhost='h'\nport=1\nticket='t'\ndesktop=''")
                .is_err()
        );
    }

    proptest! {
        #[test]
        fn uri_parse_never_panics(s in "\\PC{0,200}") {
            let _ = Connection::from_uri(&s);
            let _ = Connection::from_uri(&format!("{URI_SCHEME}{s}"));
            let _ = Connection::from_toml(&s);
        }

        #[test]
        fn round_trips(host in "[a-z0-9.-]{1,30}", port in 1u16.., ticket in "pt1\\.[A-Za-z0-9_-]{1,80}",
                       desktop in "\\PC{0,40}", cert in proptest::option::of("[0-9a-f]{64}")) {
            let c = Connection { version: 1, host, port, cert_sha256: cert.unwrap_or_default(), ticket, desktop, usb_auto: String::new() };
            prop_assert_eq!(Connection::from_uri(&c.to_uri()).unwrap(), c.clone());
            prop_assert_eq!(Connection::from_toml(&c.to_toml()).unwrap(), c);
        }
    }
}
