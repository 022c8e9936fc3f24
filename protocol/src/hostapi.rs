//! The host API's messages: what `pleiades-host serve` and the broker say to each other (JSON
//! over HTTPS under `/api/v1/hosts`; docs/broker.md, "Hosts"). One definition for both sides.
//!
//! 1. `POST /hosts/register` [`HostRegistration`] → [`HostRegistered`];
//! 2. `POST /hosts/heartbeat` [`Heartbeat`] (bearer credential) → [`HeartbeatReply`], which
//!    hands out the queued [`HostCommand`]s once;
//! 3. `POST /hosts/commands/{id}/ack` [`CommandAck`] when a command is done.

use serde::{Deserialize, Serialize};

/// The subject (and, self-signed, issuer) common name of every host's identity certificate:
/// the TLS client certificate `pleiades-host serve` presents to its broker, whose SHA-256 the
/// broker pins at registration. The broker names it in its certificate request, so that a
/// browser on the same port offers none of its user's own client certificates (and asks
/// nothing).
pub const HOST_IDENTITY_NAME: &str = "pleiades-host identity";

/// The DER of the X.500 name `CN=`[`HOST_IDENTITY_NAME`] without its outer SEQUENCE header
/// (one RDN: `SET { SEQUENCE { id-at-commonName, UTF8String } }`), as rustls'
/// `DistinguishedName::in_sequence` takes it and as it appears in a host's certificate.
pub fn host_identity_rdns_der() -> Vec<u8> {
    // Short enough for single-byte DER lengths (a const, checked by the tests).
    let name = HOST_IDENTITY_NAME.as_bytes();
    let attribute_len = 5 + 2 + name.len();
    let mut der = vec![0x31, (attribute_len + 2) as u8, 0x30, attribute_len as u8];
    der.extend_from_slice(&[0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, name.len() as u8]);
    der.extend_from_slice(name);
    der
}

/// Host registration request.
///
/// A new host name needs a registration token made for that name. A name that is registered
/// already takes either that host's current `credential` (the host itself, updating its
/// address, certificate or images; the credential stays valid) or a token an admin made to
/// replace that host (its credential is then replaced).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRegistration {
    /// The registration token an admin created (`pleiades-broker host token create --name`);
    /// empty when the host re-registers with its `credential`.
    #[serde(default)]
    pub token: String,
    /// The host's current credential, when it re-registers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
    pub name: String,
    /// Where clients reach the host's session servers.
    pub address: String,
    /// The host's default session port (a desktop may report its own, [`RunningDesktop::port`]).
    pub session_port: u16,
    /// SHA-256 of the session servers' certificate, lowercase hex (pinned by connection files).
    #[serde(default)]
    pub cert_sha256: String,
    pub cores: i64,
    pub memory_mib: i64,
    /// Names of the images this host can boot.
    #[serde(default)]
    pub images: Vec<String>,
}

impl std::fmt::Debug for HostRegistration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token or the credential.
        f.debug_struct("HostRegistration")
            .field("name", &self.name)
            .field("address", &self.address)
            .field("session_port", &self.session_port)
            .field("cert_sha256", &self.cert_sha256)
            .field("cores", &self.cores)
            .field("memory_mib", &self.memory_mib)
            .field("images", &self.images)
            .finish_non_exhaustive()
    }
}

/// The broker's answer to a registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRegistered {
    pub host_id: String,
    /// Bearer credential for every later host call. Shown once.
    pub credential: String,
    /// The broker's Ed25519 ticket key, base64url.
    pub ticket_public_key: String,
    pub heartbeat_interval_secs: u64,
    pub heartbeat_timeout_secs: u64,
}

/// What a host reports every heartbeat interval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub cores: i64,
    pub memory_mib: i64,
    #[serde(default)]
    pub images: Vec<String>,
    /// The desktops (VMs) running on the host now.
    #[serde(default)]
    pub desktops: Vec<RunningDesktop>,
}

/// One running desktop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningDesktop {
    pub id: String,
    /// A client is connected to the desktop's session server.
    #[serde(default)]
    pub connected: bool,
    /// The UDP port of this desktop's session server, when it is not the host's
    /// `session_port` (one session server per VM process).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Bytes the desktop's own disk (its overlay) takes on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_bytes: Option<u64>,
    /// What the guest agent inside reports, while it is connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<GuestReport>,
    /// What the VM process's clipboard relay let through or kept back since it started
    /// (counted by the host, not the guest: the broker audits each new denial).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clipboard: Option<ClipboardCounts>,
    /// What the VM process's file transfer let through or refused since it started (counted
    /// by the host, not the guest: the broker audits each new denial).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<FileCounts>,
    /// What the VM process's USB relay attached or refused since it started (counted by the
    /// host, not the guest: the broker audits each new attach and each new denial).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usb: Option<UsbCounts>,
}

/// A VM process's clipboard counters (`ctl status`'s `agent.clipboard`); they start at zero
/// with each VM process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClipboardCounts {
    /// Copies the pool's policy kept on the client's side, and on the guest's.
    pub denied_to_guest: u64,
    pub denied_from_guest: u64,
    /// Pastes that crossed.
    pub pasted_to_guest: u64,
    pub pasted_from_guest: u64,
}

/// A VM process's file-transfer counters (`ctl status`'s `agent.files`); they start at zero
/// with each VM process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileCounts {
    /// Offers of files that the pool's policy refused.
    pub denied: u64,
    /// Files that arrived in the guest whole.
    pub completed: u64,
    /// Bytes relayed to the guest.
    pub bytes_to_guest: u64,
}

/// A VM process's USB counters (`ctl status`'s `agent.usb`, whose other fields are left out
/// here); they start at zero with each VM process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsbCounts {
    /// Devices attached in the guest.
    pub attached: u64,
    /// Devices the pool's policy refused.
    pub denied: u64,
}

/// What a desktop's guest agent says about it (relayed by its VM process; the guest is not
/// trusted: the broker checks [`GuestReport::check`] and only shows it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestReport {
    pub agent_version: String,
    pub hostname: String,
    pub os: String,
    pub kernel: String,
    #[serde(default)]
    pub addresses: Vec<String>,
    /// `no-user`, `active` or `locked`, once the agent reported a session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Seconds since the guest user's last input, as the guest counts them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_secs: Option<u64>,
}

impl GuestReport {
    /// Within the agent channel's own limits (text of at most 255 bytes without control
    /// characters, at most 32 addresses of at most 64 bytes, a known session state).
    pub fn check(&self) -> Result<(), String> {
        use crate::wire::{MAX_ADDRESS_LEN, MAX_ADDRESSES, MAX_AGENT_TEXT};
        let text_ok = |t: &str, max: usize| t.len() <= max && !t.chars().any(char::is_control);
        let texts = [&self.agent_version, &self.hostname, &self.os, &self.kernel];
        if !texts.iter().all(|t| text_ok(t, MAX_AGENT_TEXT))
            || !self.user.as_deref().is_none_or(|u| text_ok(u, MAX_AGENT_TEXT))
        {
            return Err("guest report: text over 255 bytes or with control characters".into());
        }
        if self.addresses.len() > MAX_ADDRESSES || !self.addresses.iter().all(|a| text_ok(a, MAX_ADDRESS_LEN))
        {
            return Err(format!(
                "guest report: at most {MAX_ADDRESSES} addresses of at most {MAX_ADDRESS_LEN} bytes"
            ));
        }
        if !self.session.as_deref().is_none_or(|s| ["no-user", "active", "locked"].contains(&s)) {
            return Err("guest report: session is no-user, active or locked".into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatReply {
    pub commands: Vec<HostCommand>,
    pub heartbeat_interval_secs: u64,
}

/// Work the broker asks a host to do. Delivered once; the host acknowledges by id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCommand {
    pub id: String,
    pub kind: CommandKind,
    pub desktop_id: String,
    pub desktop_name: String,
    /// What to boot (the kinds that [boot](CommandKind::boots)).
    pub image: Option<VmImage>,
    /// The desktop's network, from its pool (the kinds that boot); `None`: no network card.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<DesktopNetwork>,
    /// The kinds that boot: the desktop's generation the new VM process is for. The process
    /// accepts only tickets that name it (`pleiades-host run --ticket-generation`), so a ticket
    /// issued before a restart or recycle does not open the desktop again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// The kinds that boot: lock the guest's screen while no client is connected (the pool's
    /// policy; the host passes `run --lock-on-disconnect` when the desktop has a guest agent).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lock_on_disconnect: bool,
    /// The kinds that boot: which ways the clipboard may carry content (the pool's policy;
    /// the host passes `run --clipboard`). `None`: both ways (a broker that predates it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clipboard: Option<crate::clipboard::ClipboardPolicy>,
    /// The kinds that boot: whether the client may send files into the guest (the pool's
    /// policy; the host passes `run --file-transfer`). `None`: allowed (a broker that
    /// predates it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_transfer: Option<bool>,
    /// The kinds that boot: which of the client's USB devices may be redirected into the guest
    /// (the pool's policy, as [`crate::usb::UsbPolicy::parse`] reads it: `none`, `all`, or a
    /// list of `class=HH` and `VVVV:PPPP`; the host passes `run --usb`). `None`: `none`, no
    /// device at all (a broker that predates it: USB stays off unless a pool turns it on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usb: Option<String>,
}

/// A desktop's network: a NIC with DHCP, DNS and outbound NAT, kept from the host's own
/// services and from other desktops except what is listed here.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesktopNetwork {
    /// TCP ports of services on the host's loopback that the desktop may reach (at the host's
    /// services address, 10.213.0.1).
    #[serde(default)]
    pub host_tcp_ports: Vec<u16>,
}

/// What a [`HostCommand`] asks for. On the wire, and in the broker's database, the lowercase
/// name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CommandKind {
    /// Boot the desktop's VM.
    Start,
    /// Stop the VM.
    Stop,
    /// Stop the VM and boot it again.
    Restart,
    /// Revert the desktop to its image and boot it clean, for the pool's next user.
    Recycle,
    /// Drop the desktop's client; the VM keeps running.
    Disconnect,
    /// A kind from a newer broker: the host refuses that one command instead of failing to
    /// read the whole heartbeat reply. The broker never sends it.
    #[serde(other)]
    Unknown,
}

impl CommandKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Stop => "stop",
            Self::Restart => "restart",
            Self::Recycle => "recycle",
            Self::Disconnect => "disconnect",
            Self::Unknown => "unknown",
        }
    }

    /// The kind named `s`, as [`Self::as_str`] writes it; [`Self::Unknown`] for a name this
    /// version does not know, as when it comes over the wire.
    pub fn from_name(s: &str) -> Self {
        match s {
            "start" => Self::Start,
            "stop" => Self::Stop,
            "restart" => Self::Restart,
            "recycle" => Self::Recycle,
            "disconnect" => Self::Disconnect,
            _ => Self::Unknown,
        }
    }

    /// Boots the VM, so the command carries the image.
    pub fn boots(self) -> bool {
        matches!(self, Self::Start | Self::Restart | Self::Recycle)
    }
}

impl std::fmt::Display for CommandKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A desktop image as hosts boot it. Paths are on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmImage {
    #[serde(default)]
    pub id: String,
    pub name: String,
    pub kernel: String,
    pub initrd: String,
    pub cmdline: String,
    /// The disk template (qcow2 or raw) on a path the host can read; each desktop boots from
    /// a copy-on-write overlay on it.
    #[serde(default)]
    pub disk: Option<String>,
    /// The template's content hash ([`template_sha256`]): the host keeps a copy only if it
    /// matches.
    #[serde(default)]
    pub disk_sha256: Option<String>,
    pub vcpus: i64,
    pub memory_mib: i64,
}

/// The content hash that names a disk template: SHA-256 of its bytes, lowercase hex. Reads
/// `from` to its end and writes every byte to `to` as well, so a host hashes the very copy it
/// keeps (pass [`std::io::sink`] to only hash).
pub fn template_sha256(
    from: &mut impl std::io::Read,
    to: &mut impl std::io::Write,
) -> std::io::Result<String> {
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = match from.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        digest.update(&buffer[..n]);
        to.write_all(&buffer[..n])?;
    }
    Ok(digest.finish().as_ref().iter().map(|b| format!("{b:02x}")).collect())
}

/// A host's answer to a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandAck {
    pub ok: bool,
    #[serde(default)]
    pub error: Option<String>,
    /// `start`/`restart`/`recycle`: the UDP port of the desktop's session server, when it is
    /// not the host's `session_port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_identity_name_is_one_common_name_in_der() {
        let der = host_identity_rdns_der();
        assert!(HOST_IDENTITY_NAME.len() < 100, "single-byte DER lengths");
        assert_eq!(der.len(), 2 + 2 + 7 + HOST_IDENTITY_NAME.len());
        assert_eq!(&der[..4], &[0x31, der.len() as u8 - 2, 0x30, der.len() as u8 - 4]);
        assert!(der.ends_with(HOST_IDENTITY_NAME.as_bytes()));
    }

    #[test]
    fn template_hash_is_sha256_and_copies_every_byte() {
        let mut copy = Vec::new();
        let sha = template_sha256(&mut &b"abc"[..], &mut copy).unwrap();
        assert_eq!(sha, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(copy, b"abc");
        let big = vec![9u8; (1 << 20) * 3 + 17];
        let mut copy = Vec::new();
        template_sha256(&mut &big[..], &mut copy).unwrap();
        assert_eq!(copy, big);
    }

    #[test]
    fn a_heartbeat_without_ports_or_desktops_still_decodes() {
        let beat: Heartbeat = serde_json::from_str(r#"{"cores":4,"memory_mib":8192}"#).unwrap();
        assert!(beat.desktops.is_empty() && beat.images.is_empty());
        let d: RunningDesktop = serde_json::from_str(r#"{"id":"d1"}"#).unwrap();
        assert_eq!(
            d,
            RunningDesktop {
                id: "d1".into(),
                connected: false,
                port: None,
                disk_bytes: None,
                guest: None,
                clipboard: None,
                files: None,
                usb: None,
            }
        );
        let with_port = RunningDesktop { port: Some(47001), ..d };
        let json = serde_json::to_string(&with_port).unwrap();
        assert!(!json.contains("files") && !json.contains("usb"), "no counts, no field: {json}");
        assert_eq!(serde_json::from_str::<RunningDesktop>(&json).unwrap(), with_port);
        let with_files = RunningDesktop {
            files: Some(FileCounts { denied: 2, completed: 3, bytes_to_guest: 1 << 33 }),
            ..with_port
        };
        let json = serde_json::to_string(&with_files).unwrap();
        assert!(json.contains(r#""files":{"denied":2,"completed":3,"bytes_to_guest":8589934592}"#), "{json}");
        assert_eq!(serde_json::from_str::<RunningDesktop>(&json).unwrap(), with_files);
        let with_usb = RunningDesktop { usb: Some(UsbCounts { attached: 3, denied: 1 << 40 }), ..with_files };
        let json = serde_json::to_string(&with_usb).unwrap();
        assert!(json.contains(r#""usb":{"attached":3,"denied":1099511627776}"#), "{json}");
        assert_eq!(serde_json::from_str::<RunningDesktop>(&json).unwrap(), with_usb);
        // The host fills it from `ctl status`'s `agent.usb`, which says more.
        let status = r#"{"policy":"class=08","devices":[],"attached":2,"denied":5,"failed":1,"bytes_to_guest":9,"bytes_from_guest":7}"#;
        assert_eq!(serde_json::from_str::<UsbCounts>(status).unwrap(), UsbCounts { attached: 2, denied: 5 });
    }

    #[test]
    fn a_boot_command_carries_the_file_transfer_policy_only_when_told() {
        let old = r#"{"id":"c1","kind":"start","desktop_id":"d1","desktop_name":"n","image":null}"#;
        let command: HostCommand = serde_json::from_str(old).unwrap();
        assert_eq!(command.file_transfer, None, "a broker that predates it");
        assert!(!serde_json::to_string(&command).unwrap().contains("file_transfer"));
        for allowed in [true, false] {
            let told = HostCommand { file_transfer: Some(allowed), ..command.clone() };
            let json = serde_json::to_string(&told).unwrap();
            assert!(json.contains(&format!(r#""file_transfer":{allowed}"#)), "{json}");
            assert_eq!(serde_json::from_str::<HostCommand>(&json).unwrap(), told);
        }
    }

    #[test]
    fn a_boot_command_carries_the_usb_policy_only_when_told() {
        let old = r#"{"id":"c1","kind":"start","desktop_id":"d1","desktop_name":"n","image":null}"#;
        let command: HostCommand = serde_json::from_str(old).unwrap();
        assert_eq!(command.usb, None, "a broker that predates it: no device allowed");
        assert!(!serde_json::to_string(&command).unwrap().contains("usb"));
        for policy in ["none", "all", "class=03,class=0b,0525:a4a5"] {
            let told = HostCommand { usb: Some(policy.into()), ..command.clone() };
            let json = serde_json::to_string(&told).unwrap();
            assert!(json.contains(&format!(r#""usb":"{policy}""#)), "{json}");
            assert_eq!(serde_json::from_str::<HostCommand>(&json).unwrap(), told);
            let parsed = crate::usb::UsbPolicy::parse(told.usb.as_deref().unwrap()).unwrap();
            assert_eq!(parsed.to_string(), policy, "the broker sends the canonical text");
        }
    }

    #[test]
    fn a_guest_report_is_held_to_the_agent_channels_limits() {
        let good = GuestReport {
            agent_version: "0.1.0".into(),
            hostname: "desk".into(),
            os: "Linux".into(),
            kernel: "6.12".into(),
            addresses: vec!["10.0.2.15/24".into()],
            session: Some("active".into()),
            user: Some("alice".into()),
            idle_secs: Some(3),
        };
        assert_eq!(good.check(), Ok(()));
        assert!(GuestReport { hostname: "x".repeat(256), ..good.clone() }.check().is_err());
        assert!(GuestReport { user: Some("a\u{1b}[2J".into()), ..good.clone() }.check().is_err());
        assert!(GuestReport { addresses: vec!["a".into(); 33], ..good.clone() }.check().is_err());
        assert!(GuestReport { session: Some("asleep".into()), ..good }.check().is_err());
    }

    #[test]
    fn command_kinds_are_their_lowercase_names_on_the_wire() {
        for (kind, name) in [
            (CommandKind::Start, "start"),
            (CommandKind::Stop, "stop"),
            (CommandKind::Restart, "restart"),
            (CommandKind::Recycle, "recycle"),
            (CommandKind::Disconnect, "disconnect"),
        ] {
            assert_eq!(serde_json::to_string(&kind).unwrap(), format!("\"{name}\""));
            assert_eq!(serde_json::from_str::<CommandKind>(&format!("\"{name}\"")).unwrap(), kind);
            assert_eq!((kind.as_str(), CommandKind::from_name(name)), (name, kind));
        }
        assert_eq!(CommandKind::from_name("snapshot"), CommandKind::Unknown);
        let reply: HeartbeatReply = serde_json::from_str(
            r#"{"commands":[{"id":"c1","kind":"snapshot","desktop_id":"d1","desktop_name":"n","image":null}],"heartbeat_interval_secs":5}"#,
        )
        .unwrap();
        assert_eq!(reply.commands[0].kind, CommandKind::Unknown);
    }
}
