//! File transfer messages: files the client's user sends into the desktop (dropped on the
//! window, or `pleiades send`), which land in the guest user's Downloads. The same seven
//! messages travel on the session's files channel (client ↔ VM process) and, wrapped in
//! [`super::AgentMessage`], on the agent link (VM process ↔ guest agent). The VM process relays
//! between the two ([`crate::files::FileRelay`]), enforces the pool's policy and the window.
//!
//! ```text
//! client                                   guest (through the VM process)
//!   Offer{id, size, sha256, name}   ──▶
//!                                   ◀──   Accept{id, offset}      (bytes it already has)
//!   Data{id, offset, bytes} …       ──▶                           (at most FILE_WINDOW ahead)
//!                                   ◀──   Progress{id, received}  (written to its disk)
//!                                   ◀──   Done{id, name} | Refused{id, reason}
//!   Cancel{id, reason}              ──▶   (the user gave up; the VM process: the client left)
//! ```
//!
//! A transfer is resumable: the guest keeps what arrived of a file in a partial file named
//! after the file's name and SHA-256, and answers a later offer of the same file (by any
//! connection) with the offset it has. The SHA-256 is checked on the whole file before it
//! takes its name.

use super::codec::{Put, Reader};
use super::{Channel, ChannelMessage, types};

/// Most bytes in one [`FileData`] chunk: fits the agent channel's 64 KiB body limit.
pub const MAX_FILE_CHUNK: usize = 48 * 1024;
/// How far a sender may run ahead of the receiver's last [`FileProgress`] (or of the accepted
/// offset), per transfer: what the VM process may hold for the guest, and enough to keep a
/// 100 Mbit/s, 100 ms path busy.
pub const FILE_WINDOW: u64 = 4 * 1024 * 1024;
/// Transfers in progress at once per session (the VM process refuses more, [`FileRefuseReason::Busy`]).
pub const MAX_FILE_TRANSFERS: usize = 4;
/// The largest file offered: 64 GiB.
pub const MAX_FILE_BYTES: u64 = 64 << 30;
/// Longest file name, in bytes (ext4's and most file systems' own limit).
pub const MAX_FILE_NAME: usize = 255;

/// "I have this file for you." `id` names the transfer on this connection; `name` is the
/// file's own name (no directory, see [`file_name_ok`]); `sha256` is of its whole content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileOffer {
    pub id: u32,
    pub size: u64,
    pub sha256: [u8; 32],
    pub name: String,
}

/// One chunk of a file: 1..=[`MAX_FILE_CHUNK`] bytes at `offset`, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileData {
    pub id: u32,
    pub offset: u64,
    pub bytes: Vec<u8>,
}

/// Why a transfer did not end with the file in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FileRefuseReason {
    /// The desktop's pool does not allow files into it.
    Policy = 0,
    /// No user is logged in to the desktop (or no agent runs in it) to receive the file.
    NoSession = 1,
    /// Not enough free space in the guest.
    NoSpace = 2,
    /// The name is not a plain file name.
    BadName = 3,
    /// The file arrived but its SHA-256 differs (what arrived is deleted).
    Checksum = 4,
    /// Writing failed in the guest.
    Failed = 5,
    /// Too many transfers at once; offer it again when one ended.
    Busy = 6,
    /// The receiving side went away mid-transfer (the agent restarted, the user's session
    /// ended): what arrived is kept, offer it again to resume.
    Interrupted = 7,
    /// The sender broke the transfer's rules (gaps, beyond the window or the size).
    Protocol = 8,
    /// The file is larger than [`MAX_FILE_BYTES`].
    TooLarge = 9,
}

impl FileRefuseReason {
    const ALL: [FileRefuseReason; 10] = [
        FileRefuseReason::Policy,
        FileRefuseReason::NoSession,
        FileRefuseReason::NoSpace,
        FileRefuseReason::BadName,
        FileRefuseReason::Checksum,
        FileRefuseReason::Failed,
        FileRefuseReason::Busy,
        FileRefuseReason::Interrupted,
        FileRefuseReason::Protocol,
        FileRefuseReason::TooLarge,
    ];

    pub fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|r| *r as u8 == v)
    }

    /// Whether offering the same file again later may work without anyone doing anything.
    pub fn retry_later(self) -> bool {
        matches!(self, FileRefuseReason::Busy | FileRefuseReason::Interrupted)
    }

    /// What to tell the user.
    pub fn describe(self) -> &'static str {
        match self {
            FileRefuseReason::Policy => "the desktop's pool does not allow file transfer",
            FileRefuseReason::NoSession => "nobody is logged in to the desktop to receive it",
            FileRefuseReason::NoSpace => "not enough free space in the desktop",
            FileRefuseReason::BadName => "the desktop does not accept that file name",
            FileRefuseReason::Checksum => "the file arrived damaged (its SHA-256 differs)",
            FileRefuseReason::Failed => "the desktop could not write the file",
            FileRefuseReason::Busy => "too many transfers at once",
            FileRefuseReason::Interrupted => "the desktop's side went away; it resumes when offered again",
            FileRefuseReason::Protocol => "the transfer broke the protocol's rules",
            FileRefuseReason::TooLarge => "the file is over the 64 GiB limit",
        }
    }
}

/// Why a sender gives a transfer up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CancelReason {
    /// The user cancelled: what arrived is deleted.
    User = 0,
    /// The sender went away (the VM process says so when the client's connection ends): what
    /// arrived is kept for a later offer of the same file.
    Interrupted = 1,
}

/// Everything the files channel carries. `Offer`, `Data` and `Cancel` go from the sender (the
/// client) to the receiver (the guest), the others back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileMessage {
    Offer(FileOffer),
    /// "Send from `offset`": the receiver already has the bytes before it.
    Accept {
        id: u32,
        offset: u64,
    },
    Data(FileData),
    /// The receiver has written `received` bytes (from the file's start).
    Progress {
        id: u32,
        received: u64,
    },
    /// The whole file is in place, its SHA-256 checked, under `name` (the offered name, or
    /// "name (2).ext" when one existed).
    Done {
        id: u32,
        name: String,
    },
    Refused {
        id: u32,
        reason: FileRefuseReason,
    },
    Cancel {
        id: u32,
        reason: CancelReason,
    },
}

/// Whether `name` is a plain file name a receiver may create in a directory: not empty, not
/// `.` or `..`, no `/`, no NUL or other control character, at most [`MAX_FILE_NAME`] bytes.
pub fn file_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_FILE_NAME
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.chars().any(char::is_control)
}

impl FileMessage {
    /// The transfer this message is about.
    pub fn id(&self) -> u32 {
        match self {
            FileMessage::Offer(o) => o.id,
            FileMessage::Data(d) => d.id,
            FileMessage::Accept { id, .. }
            | FileMessage::Progress { id, .. }
            | FileMessage::Done { id, .. }
            | FileMessage::Refused { id, .. }
            | FileMessage::Cancel { id, .. } => *id,
        }
    }

    /// Whether the sender of files (the client) sends this message; the others come from the
    /// receiver (the guest).
    pub fn from_sender(&self) -> bool {
        matches!(self, FileMessage::Offer(_) | FileMessage::Data(_) | FileMessage::Cancel { .. })
    }

    /// The memory this message takes while it waits in a queue.
    pub fn queued_size(&self) -> usize {
        std::mem::size_of::<Self>()
            + match self {
                FileMessage::Offer(o) => o.name.len(),
                FileMessage::Data(d) => d.bytes.len(),
                FileMessage::Done { name, .. } => name.len(),
                _ => 0,
            }
    }

    /// The index of each message within its channel's seven consecutive type numbers.
    fn index(&self) -> u16 {
        match self {
            FileMessage::Offer(_) => 0,
            FileMessage::Accept { .. } => 1,
            FileMessage::Data(_) => 2,
            FileMessage::Progress { .. } => 3,
            FileMessage::Done { .. } => 4,
            FileMessage::Refused { .. } => 5,
            FileMessage::Cancel { .. } => 6,
        }
    }

    pub(crate) fn check(&self) -> Result<(), &'static str> {
        match self {
            FileMessage::Offer(o) => {
                if !file_name_ok(&o.name) {
                    return Err("not a plain file name");
                }
                if o.size > MAX_FILE_BYTES {
                    return Err("file over the size limit");
                }
            }
            FileMessage::Data(d) => {
                if d.bytes.is_empty() || d.bytes.len() > MAX_FILE_CHUNK {
                    return Err("file chunk empty or over the limit");
                }
                if d.offset.checked_add(d.bytes.len() as u64).is_none_or(|end| end > MAX_FILE_BYTES) {
                    return Err("file chunk beyond the size limit");
                }
            }
            FileMessage::Accept { offset: at, .. } | FileMessage::Progress { received: at, .. } => {
                if *at > MAX_FILE_BYTES {
                    return Err("file offset beyond the size limit");
                }
            }
            FileMessage::Done { name, .. } => {
                if !file_name_ok(name) {
                    return Err("not a plain file name");
                }
            }
            FileMessage::Refused { .. } | FileMessage::Cancel { .. } => {}
        }
        Ok(())
    }

    /// Every field but the data chunk's bytes (the payload).
    pub(crate) fn put_fields(&self, out: &mut Vec<u8>) {
        out.put_u32(self.id());
        match self {
            FileMessage::Offer(o) => {
                out.put_u64(o.size);
                out.extend_from_slice(&o.sha256);
                out.put_str(&o.name);
            }
            FileMessage::Accept { offset, .. } => out.put_u64(*offset),
            FileMessage::Data(d) => out.put_u64(d.offset),
            FileMessage::Progress { received, .. } => out.put_u64(*received),
            FileMessage::Done { name, .. } => out.put_str(name),
            FileMessage::Refused { reason, .. } => out.put_u8(*reason as u8),
            FileMessage::Cancel { reason, .. } => out.put_u8(*reason as u8),
        }
    }

    pub(crate) fn payload_bytes(&self) -> &[u8] {
        match self {
            FileMessage::Data(d) => &d.bytes,
            _ => &[],
        }
    }

    /// Reads the message at `index` (0 offer … 6 cancel).
    pub(crate) fn read(index: u16, r: &mut Reader<'_>) -> Result<Option<Self>, &'static str> {
        let id = r.u32()?;
        Ok(Some(match index {
            0 => {
                let size = r.u64()?;
                let mut sha256 = [0u8; 32];
                for byte in &mut sha256 {
                    *byte = r.u8()?;
                }
                FileMessage::Offer(FileOffer { id, size, sha256, name: r.string(MAX_FILE_NAME)? })
            }
            1 => FileMessage::Accept { id, offset: r.u64()? },
            2 => FileMessage::Data(FileData { id, offset: r.u64()?, bytes: r.rest() }),
            3 => FileMessage::Progress { id, received: r.u64()? },
            4 => FileMessage::Done { id, name: r.string(MAX_FILE_NAME)? },
            5 => {
                let reason = FileRefuseReason::from_u8(r.u8()?).ok_or("unknown file refusal reason")?;
                FileMessage::Refused { id, reason }
            }
            6 => {
                let reason = match r.u8()? {
                    0 => CancelReason::User,
                    1 => CancelReason::Interrupted,
                    _ => return Err("unknown cancel reason"),
                };
                FileMessage::Cancel { id, reason }
            }
            _ => return Ok(None),
        }))
    }
}

impl ChannelMessage for FileMessage {
    const CHANNEL: Channel = Channel::Files;

    fn message_type(&self) -> u16 {
        types::FILE_OFFER + self.index()
    }

    fn validate(&self) -> Result<(), &'static str> {
        self.check()
    }

    fn encode_fields(&self, out: &mut Vec<u8>) {
        self.put_fields(out);
    }

    fn payload(&self) -> &[u8] {
        self.payload_bytes()
    }

    fn decode_body(ty: u16, r: &mut Reader<'_>) -> Result<Option<Self>, &'static str> {
        match ty.checked_sub(types::FILE_OFFER) {
            Some(index) if index < 7 => Self::read(index, r),
            _ => Ok(None),
        }
    }
}
