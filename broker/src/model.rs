//! The broker's data model, as stored.

use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;

use crate::db::{get_i64, get_opt_i64, get_opt_str, get_str};
use crate::error::{Error, Result};
use pleiades_protocol::clipboard::ClipboardPolicy;
use pleiades_protocol::hostapi::GuestReport;
use pleiades_protocol::usb::UsbPolicy;

#[derive(Debug, Clone, Serialize)]
pub struct User {
    pub id: String,
    pub name: String,
    pub display_name: String,
    /// `local`, or `ldap` (later `oidc`): directory accounts carry no password hash.
    pub source: String,
    pub is_admin: bool,
    pub created_at: i64,
}

impl User {
    pub(crate) fn from_row(r: &AnyRow) -> Result<Self> {
        Ok(Self {
            id: get_str(r, "id")?,
            name: get_str(r, "name")?,
            display_name: get_str(r, "display_name")?,
            source: get_str(r, "source")?,
            is_admin: get_i64(r, "is_admin")? != 0,
            created_at: get_i64(r, "created_at")?,
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Group {
    pub id: String,
    pub name: String,
    /// `local`, or the identity source (`ldap`) whose sign-ins keep its members.
    pub source: String,
    pub members: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Image {
    pub id: String,
    pub name: String,
    pub kernel: String,
    pub initrd: String,
    pub cmdline: String,
    /// A disk template (qcow2 or raw) on a path the broker and the hosts share.
    #[serde(default)]
    pub disk: Option<String>,
    /// The template's SHA-256, which the broker computes when the image is added (a value
    /// given by a client is ignored): hosts keep a copy only if it matches.
    #[serde(default)]
    pub disk_sha256: Option<String>,
    pub vcpus: i64,
    pub memory_mib: i64,
}

impl From<Image> for pleiades_protocol::hostapi::VmImage {
    fn from(i: Image) -> Self {
        Self {
            id: i.id,
            name: i.name,
            kernel: i.kernel,
            initrd: i.initrd,
            cmdline: i.cmdline,
            disk: i.disk,
            disk_sha256: i.disk_sha256,
            vcpus: i.vcpus,
            memory_mib: i.memory_mib,
        }
    }
}

impl Image {
    pub(crate) fn from_row(r: &AnyRow) -> Result<Self> {
        Ok(Self {
            id: get_str(r, "id")?,
            name: get_str(r, "name")?,
            kernel: get_str(r, "kernel")?,
            initrd: get_str(r, "initrd")?,
            cmdline: get_str(r, "cmdline")?,
            disk: get_opt_str(r, "disk")?,
            disk_sha256: get_opt_str(r, "disk_sha256")?,
            vcpus: get_i64(r, "vcpus")?,
            memory_mib: get_i64(r, "memory_mib")?,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolKind {
    /// Any ready desktop; reverted (recycled) after the user leaves.
    Floating,
    /// A user keeps one dedicated desktop.
    Persistent,
}

impl PoolKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Floating => "floating",
            Self::Persistent => "persistent",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "floating" => Ok(Self::Floating),
            "persistent" => Ok(Self::Persistent),
            _ => Err(Error::Invalid(format!("pool kind must be floating or persistent, not {s:?}"))),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Pool {
    pub id: String,
    pub name: String,
    pub display_name: String,
    pub kind: PoolKind,
    pub image_id: String,
    pub min_size: i64,
    pub max_size: i64,
    pub spares: i64,
    pub idle_timeout_secs: i64,
    pub disconnect_timeout_secs: i64,
    pub enabled: bool,
    pub network: PoolNetwork,
    /// The desktops' screens lock while no client is connected.
    pub lock_on_disconnect: bool,
    /// The clipboard carries content from the client into the desktops (data loss
    /// prevention: the host keeps it back when off).
    pub clipboard_to_guest: bool,
    /// The clipboard carries content from the desktops out to the client.
    pub clipboard_from_guest: bool,
    /// The client may send files into the desktops (data loss prevention: the host refuses
    /// them when off).
    pub file_transfer: bool,
    /// Which of the client's USB devices the desktops take (the host refuses the others):
    /// `none`, `all`, or `class=HH` and `VVVV:PPPP` rules, as [`UsbPolicy`] writes them.
    pub usb: String,
    /// Which of the client's USB devices the client redirects by itself when it connects (the
    /// connection file's `usb_auto`), in the same grammar; `usb` still decides what the
    /// desktops take.
    pub usb_auto: String,
}

impl Pool {
    pub(crate) fn from_row(r: &AnyRow) -> Result<Self> {
        Ok(Self {
            id: get_str(r, "id")?,
            name: get_str(r, "name")?,
            display_name: get_str(r, "display_name")?,
            kind: PoolKind::parse(&get_str(r, "kind")?)?,
            image_id: get_str(r, "image_id")?,
            min_size: get_i64(r, "min_size")?,
            max_size: get_i64(r, "max_size")?,
            spares: get_i64(r, "spares")?,
            idle_timeout_secs: get_i64(r, "idle_timeout_secs")?,
            disconnect_timeout_secs: get_i64(r, "disconnect_timeout_secs")?,
            enabled: get_i64(r, "enabled")? != 0,
            network: PoolNetwork::from_columns(&get_str(r, "network")?, &get_str(r, "host_ports")?)?,
            lock_on_disconnect: get_i64(r, "lock_on_disconnect")? != 0,
            clipboard_to_guest: get_i64(r, "clipboard_to_guest")? != 0,
            clipboard_from_guest: get_i64(r, "clipboard_from_guest")? != 0,
            file_transfer: get_i64(r, "file_transfer")? != 0,
            usb: get_str(r, "usb")?,
            usb_auto: get_str(r, "usb_auto")?,
        })
    }

    /// What the host is told to let the desktops' clipboards carry.
    pub fn clipboard(&self) -> ClipboardPolicy {
        ClipboardPolicy { to_guest: self.clipboard_to_guest, from_guest: self.clipboard_from_guest }
    }

    /// The clipboard policy in a few words (the admin's pool list, `pool list`).
    pub fn clipboard_text(&self) -> &'static str {
        match (self.clipboard_to_guest, self.clipboard_from_guest) {
            (true, true) => "both ways",
            (true, false) => "client → desktop only",
            (false, true) => "desktop → client only",
            (false, false) => "off",
        }
    }

    /// The file-transfer policy in a word (the admin's pool list, `pool list`).
    pub fn file_transfer_text(&self) -> &'static str {
        if self.file_transfer { "allowed" } else { "off" }
    }
}

/// A pool's desktops' network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolNetwork {
    /// A network card with DHCP, DNS and outbound NAT (the default); `false`: none.
    #[serde(default = "yes")]
    pub nat: bool,
    /// TCP ports of services on the host's loopback that the desktops may reach (at the
    /// host's services address, 10.213.0.1); nothing else of the host is reachable.
    #[serde(default)]
    pub host_ports: Vec<u16>,
}

/// A host registration token as an admin asks for it (`host token create`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostTokenSpec {
    /// The one host name the token registers.
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Spent by its first registration (else reusable until it expires).
    #[serde(default = "yes")]
    pub one_time: bool,
    /// May register the name although a host has it already: that host's address, certificate
    /// and credential are replaced (a reinstalled machine). Without it, an existing host
    /// re-registers only with its own credential.
    #[serde(default)]
    pub replace: bool,
    #[serde(default = "day")]
    pub lifetime_secs: i64,
}

fn yes() -> bool {
    true
}

impl Default for PoolNetwork {
    fn default() -> Self {
        Self { nat: true, host_ports: Vec::new() }
    }
}

impl PoolNetwork {
    /// At most this many host ports per pool.
    pub const MAX_HOST_PORTS: usize = 32;

    /// From the `network` (`nat` or `none`) and `host_ports` (comma-separated) columns.
    pub(crate) fn from_columns(network: &str, host_ports: &str) -> Result<Self> {
        let nat = match network {
            "nat" => true,
            "none" => false,
            _ => return Err(Error::Invalid(format!("pool network must be nat or none, not {network:?}"))),
        };
        Ok(Self { nat, host_ports: Self::parse_ports(host_ports)? })
    }

    /// The `network` column.
    pub fn mode(&self) -> &'static str {
        if self.nat { "nat" } else { "none" }
    }

    /// The `host_ports` column (and how forms show them): `8080,9000`.
    pub fn ports_text(&self) -> String {
        self.host_ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",")
    }

    /// Ports as an admin writes them: numbers 1-65535 separated by commas or spaces.
    pub fn parse_ports(text: &str) -> Result<Vec<u16>> {
        let mut ports: Vec<u16> = text
            .split([',', ' '])
            .filter(|p| !p.trim().is_empty())
            .map(|p| {
                p.trim().parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(|| {
                    Error::Invalid(format!("host port {:?}: give a TCP port from 1 to 65535", p.trim()))
                })
            })
            .collect::<Result<_>>()?;
        ports.sort_unstable();
        ports.dedup();
        Ok(ports)
    }

    pub fn validate(&self) -> Result<()> {
        if self.host_ports.contains(&0) {
            return Err(Error::Invalid("host ports are TCP ports from 1 to 65535".into()));
        }
        if self.host_ports.len() > Self::MAX_HOST_PORTS {
            return Err(Error::Invalid(format!("at most {} host ports per pool", Self::MAX_HOST_PORTS)));
        }
        if !self.nat && !self.host_ports.is_empty() {
            return Err(Error::Invalid("host ports need the pool's network (nat)".into()));
        }
        Ok(())
    }

    /// What the host is told to give a desktop of the pool.
    pub fn for_host(&self) -> Option<pleiades_protocol::hostapi::DesktopNetwork> {
        self.nat
            .then(|| pleiades_protocol::hostapi::DesktopNetwork { host_tcp_ports: self.host_ports.clone() })
    }
}

fn day() -> i64 {
    86_400
}

/// What an admin sets when creating or editing a pool.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolSpec {
    pub name: String,
    #[serde(default)]
    pub display_name: String,
    pub kind: PoolKind,
    pub image: String,
    #[serde(default)]
    pub min_size: i64,
    pub max_size: i64,
    #[serde(default)]
    pub spares: i64,
    #[serde(default = "default_idle")]
    pub idle_timeout_secs: i64,
    #[serde(default = "default_disconnect")]
    pub disconnect_timeout_secs: i64,
    #[serde(default)]
    pub network: PoolNetwork,
    /// The desktops' screens lock while no client is connected (their guest agent locks them,
    /// and unlocks them for the user's next connection). On by default.
    #[serde(default = "yes")]
    pub lock_on_disconnect: bool,
    /// The clipboard carries content from the client into the desktops. On by default; off,
    /// the host keeps the client's copies out (a data loss prevention control).
    #[serde(default = "yes")]
    pub clipboard_to_guest: bool,
    /// The clipboard carries content from the desktops out to the client. On by default; off,
    /// the host keeps the desktops' copies in.
    #[serde(default = "yes")]
    pub clipboard_from_guest: bool,
    /// The client may send files into the desktops (their Downloads). On by default; off, the
    /// host refuses every file the client offers (a data loss prevention control).
    #[serde(default = "yes")]
    pub file_transfer: bool,
    /// Which of the client's USB devices may be redirected into the desktops, as
    /// [`UsbPolicy::parse`] reads it: `none` (the default: no device), `all`, or a
    /// comma-separated list of `class=HH` (a USB class in hex; every class of a device must be
    /// listed) and `VVVV:PPPP` (a vendor and product id in hex). Stored as [`UsbPolicy`]
    /// writes it; the host enforces it.
    #[serde(default = "usb_none")]
    pub usb: String,
    /// Which of the client's USB devices the client redirects by itself as soon as it connects
    /// to one of the desktops (the connection file's `usb_auto`), in the same grammar as `usb`:
    /// `none` (the default: none), `all`, or `class=HH` and `VVVV:PPPP` rules. Stored as
    /// [`UsbPolicy`] writes it; `usb` still decides what the desktops take (the host refuses a
    /// device it does not allow).
    #[serde(default = "usb_none")]
    pub usb_auto: String,
}

fn usb_none() -> String {
    UsbPolicy::NONE.to_string()
}

/// A pool's stored auto-redirect rules as its desktops' connection files carry them
/// (`usb_auto`): empty for `none`, which is what older clients and files have too.
pub(crate) fn usb_auto_for_client(stored: &str) -> String {
    match UsbPolicy::parse(stored) {
        Ok(rules) if rules == UsbPolicy::NONE => String::new(),
        Ok(rules) => rules.to_string(),
        // Only valid rules are stored; anything else redirects nothing.
        Err(_) => String::new(),
    }
}

fn default_idle() -> i64 {
    3600
}
fn default_disconnect() -> i64 {
    900
}

impl PoolSpec {
    /// At most this many rules in a pool's USB policy (classes and devices together).
    pub const MAX_USB_RULES: usize = 64;

    /// The pool's USB policy, read as the host will read it; a policy it cannot read, or one
    /// over [`Self::MAX_USB_RULES`], is refused with the reason.
    pub fn usb_policy(&self) -> Result<UsbPolicy> {
        let policy = UsbPolicy::parse(&self.usb).map_err(|e| Error::Invalid(format!("USB policy: {e}")))?;
        if policy.classes.len() + policy.devices.len() > Self::MAX_USB_RULES {
            return Err(Error::Invalid(format!("USB policy: at most {} rules", Self::MAX_USB_RULES)));
        }
        Ok(policy)
    }

    /// The pool's USB auto-redirect rules, read as the client will read them; rules it cannot
    /// read, or over [`Self::MAX_USB_RULES`], are refused with the reason.
    pub fn usb_auto_rules(&self) -> Result<UsbPolicy> {
        let rules = UsbPolicy::parse(&self.usb_auto)
            .map_err(|e| Error::Invalid(format!("USB auto-redirect rules: {e}")))?;
        if rules.classes.len() + rules.devices.len() > Self::MAX_USB_RULES {
            return Err(Error::Invalid(format!(
                "USB auto-redirect rules: at most {} rules",
                Self::MAX_USB_RULES
            )));
        }
        Ok(rules)
    }

    pub fn validate(&self) -> Result<()> {
        if !valid_name(&self.name) {
            return Err(Error::Invalid("pool name: 1-64 letters, digits, '-', '_', '.'".into()));
        }
        if self.max_size < 1
            || self.min_size < 0
            || self.spares < 0
            || self.min_size > self.max_size
            || self.spares > self.max_size
        {
            return Err(Error::Invalid("sizes: 0 <= min <= max, 0 <= spares <= max, max >= 1".into()));
        }
        if self.idle_timeout_secs < 0 || self.disconnect_timeout_secs < 0 {
            return Err(Error::Invalid("timeouts must not be negative".into()));
        }
        self.usb_policy()?;
        self.usb_auto_rules()?;
        self.network.validate()
    }
}

/// Names of users, groups, pools, images and hosts.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DesktopState {
    Provisioning,
    Ready,
    InUse,
    Disconnected,
    Recycling,
    Failed,
}

impl DesktopState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Provisioning => "provisioning",
            Self::Ready => "ready",
            Self::InUse => "in_use",
            Self::Disconnected => "disconnected",
            Self::Recycling => "recycling",
            Self::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "provisioning" => Self::Provisioning,
            "ready" => Self::Ready,
            "in_use" => Self::InUse,
            "disconnected" => Self::Disconnected,
            "recycling" => Self::Recycling,
            "failed" => Self::Failed,
            _ => return Err(Error::Internal(format!("unknown desktop state {s:?}"))),
        })
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Provisioning => "Starting",
            Self::Ready => "Ready",
            Self::InUse => "In use",
            Self::Disconnected => "Disconnected",
            Self::Recycling => "Recycling",
            Self::Failed => "Failed",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Desktop {
    pub id: String,
    pub pool_id: String,
    pub name: String,
    pub host_id: Option<String>,
    pub state: DesktopState,
    /// Persistent pools: the user this desktop belongs to.
    pub owner_id: Option<String>,
    /// The user currently assigned (in use or disconnected).
    pub user_id: Option<String>,
    pub state_since: i64,
    pub last_activity: i64,
    /// Why the last start failed or the VM was lost (the host's words), until a start succeeds.
    pub last_error: Option<String>,
    /// Starts failed in a row; each doubles the wait before the next (up to a maximum).
    pub start_failures: i64,
    /// A failed desktop is not started again before this time (Unix seconds).
    pub retry_at: i64,
    /// The image it boots (`None`: its pool's): a floating desktop takes the pool's at every
    /// recycle, a persistent one keeps its own until it is recomposed or reset.
    pub image_id: Option<String>,
    /// Bytes its own disk (the overlay on the template) takes on its host, as last reported.
    pub disk_bytes: Option<i64>,
    /// Which start of its VM this is: bumped by every start, restart and recycle command, which
    /// carries it to the host's VM process; tickets name it.
    pub generation: i64,
    /// What its guest agent last reported (through the host's heartbeat), while one is
    /// connected.
    pub guest: Option<GuestReport>,
}

impl Desktop {
    pub(crate) fn from_row(r: &AnyRow) -> Result<Self> {
        Ok(Self {
            id: get_str(r, "id")?,
            pool_id: get_str(r, "pool_id")?,
            name: get_str(r, "name")?,
            host_id: get_opt_str(r, "host_id")?,
            state: DesktopState::parse(&get_str(r, "state")?)?,
            owner_id: get_opt_str(r, "owner_id")?,
            user_id: get_opt_str(r, "user_id")?,
            state_since: get_i64(r, "state_since")?,
            last_activity: get_i64(r, "last_activity")?,
            last_error: get_opt_str(r, "last_error")?,
            start_failures: get_i64(r, "start_failures")?,
            retry_at: get_i64(r, "retry_at")?,
            image_id: get_opt_str(r, "image_id")?,
            disk_bytes: get_opt_i64(r, "disk_bytes")?,
            generation: get_i64(r, "generation")?,
            // A report that no longer parses (an older shape) is as good as none.
            guest: get_opt_str(r, "guest")?.and_then(|json| serde_json::from_str(&json).ok()),
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Host {
    pub id: String,
    pub name: String,
    pub address: String,
    pub session_port: i64,
    pub cert_sha256: String,
    /// SHA-256 of the TLS client certificate the host registered with (its identity towards
    /// the broker; not the session certificate above). `None`: registered before mutual TLS or
    /// over plain HTTP, known by its credential alone.
    pub client_cert_sha256: Option<String>,
    pub cores: i64,
    pub memory_mib: i64,
    pub state: HostState,
    pub last_heartbeat: i64,
    /// The last command this host failed, and why (its own words).
    pub last_error: Option<String>,
    pub images: Vec<String>,
    pub desktops: i64,
}

impl Host {
    pub(crate) fn from_row(r: &AnyRow) -> Result<Self> {
        Ok(Self {
            id: get_str(r, "id")?,
            name: get_str(r, "name")?,
            address: get_str(r, "address")?,
            session_port: get_i64(r, "session_port")?,
            cert_sha256: get_str(r, "cert_sha256")?,
            client_cert_sha256: get_opt_str(r, "client_cert_sha256")?,
            cores: get_i64(r, "cores")?,
            memory_mib: get_i64(r, "memory_mib")?,
            state: HostState::parse(&get_str(r, "state")?)?,
            last_heartbeat: get_i64(r, "last_heartbeat")?,
            last_error: get_opt_str(r, "last_error")?,
            images: Vec::new(),
            desktops: 0,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HostState {
    /// Heartbeating: desktops are placed on it.
    Online,
    /// Silent for longer than the heartbeat timeout: its desktops were failed. Its next
    /// heartbeat brings it back online.
    Lost,
}

impl HostState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Online => "online",
            Self::Lost => "lost",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "online" => Ok(Self::Online),
            "lost" => Ok(Self::Lost),
            _ => Err(Error::Internal(format!("unknown host state {s:?}"))),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Session {
    pub id: String,
    pub desktop_id: String,
    pub desktop_name: String,
    pub user_id: String,
    pub user_name: String,
    pub state: SessionState,
    pub started_at: i64,
    pub ended_at: Option<i64>,
    pub end_reason: Option<String>,
}

/// A user's use of a desktop, from allocation to release (or loss).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionState {
    /// The user holds the desktop, connected or about to connect.
    Active,
    /// The client was dropped (idle, or by an admin); the user may resume.
    Disconnected,
    /// Over: released, recycled, or the desktop failed.
    Ended,
}

impl SessionState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Disconnected => "disconnected",
            Self::Ended => "ended",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "active" => Ok(Self::Active),
            "disconnected" => Ok(Self::Disconnected),
            "ended" => Ok(Self::Ended),
            _ => Err(Error::Internal(format!("unknown session state {s:?}"))),
        }
    }
}

/// Where a queued host command is (the `host_commands` table; hosts never see it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandState {
    /// Queued, not yet handed to the host.
    Pending,
    /// Handed out in a heartbeat reply, not yet acknowledged.
    Sent,
    /// Acknowledged as done.
    Done,
    /// Acknowledged as failed; the host's reason is kept.
    Failed,
    /// Never to be done: the host was lost first.
    Dropped,
}

impl CommandState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Sent => "sent",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Dropped => "dropped",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditEntry {
    pub at: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrincipalKind {
    User,
    Group,
}

impl PrincipalKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Group => "group",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Entitlement {
    pub kind: PrincipalKind,
    pub name: String,
}

/// Who is acting: audit entries and authorization checks use this.
#[derive(Debug, Clone)]
pub struct Actor {
    pub user_id: String,
    pub name: String,
    pub is_admin: bool,
}

impl Actor {
    /// The CLI and background tasks act as `system`.
    pub fn system() -> Self {
        Self { user_id: String::new(), name: "system".into(), is_admin: true }
    }

    pub fn require_admin(&self) -> Result<()> {
        if self.is_admin { Ok(()) } else { Err(Error::Forbidden) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The API's JSON and the database spell a state the same way: serde and `as_str` agree.
    #[test]
    fn states_are_their_stored_names_in_json() {
        use DesktopState as D;
        for s in [D::Provisioning, D::Ready, D::InUse, D::Disconnected, D::Recycling, D::Failed] {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
            assert_eq!(DesktopState::parse(s.as_str()).unwrap(), s);
        }
        for s in [HostState::Online, HostState::Lost] {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
            assert_eq!(HostState::parse(s.as_str()).unwrap(), s);
        }
        for s in [SessionState::Active, SessionState::Disconnected, SessionState::Ended] {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
            assert_eq!(SessionState::parse(s.as_str()).unwrap(), s);
        }
        assert!(HostState::parse("offline").is_err());
    }
}
