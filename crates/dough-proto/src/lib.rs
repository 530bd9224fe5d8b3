//! The control protocol spoken between the orchestrator (host, vsock CID 2)
//! and `dough-agent` (PID 1 in the guest).
//!
//! # Wire format
//! A stream of frames. Each frame is a `u32` big-endian payload length followed
//! by that many bytes: one [`GuestMsg`] or [`HostMsg`] serialized with
//! `postcard`. A frame longer than the reader's limit (at most [`MAX_FRAME`]) is
//! rejected *before* anything is allocated for it, so a hostile guest cannot
//! make the host allocate more than one frame's worth of memory.
//!
//! # Conversation
//! ```text
//! guest                                   host
//!   Hello{versions, boot_ms, kernel} ───▶
//!                                   ◀─── Welcome{version}   (or close: no common version)
//!                                   ◀─── Assign{command, env, user, repo?, ...}
//!   [Cloned{commit} | CloneFailed]  ───▶  (when the task has a repo)
//!   Started{pid} ───▶
//!   Output{stdout|stderr, bytes}* ───▶   (interleaved with Heartbeat every second)
//!                                   ◀─── Signal{signo}      (timeout, cancel)
//!   [BundleData* Work{..}] ───▶           (repo tasks that exited with a code)
//!   Exit{status} ───▶
//!                                   ◀─── Shutdown
//! ```
#![forbid(unsafe_code)]

mod codec;
mod msg;

pub use codec::{
    decode, encode, encode_into, frame_len, read_frame, write_frame, ProtoError, HEADER_LEN,
};
pub use msg::*;

/// The newest protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 3;
/// The oldest protocol version this build still speaks. Version 2 added
/// repositories to Assign; version 3 the snapshot messages (Quiesce,
/// Restore), which the host sends only to VMs of its own image; postcard is not self-describing, so version 1
/// peers cannot be understood (an image older than its host is refused at
/// Hello with both ranges named).
pub const MIN_PROTOCOL_VERSION: u16 = 2;
/// The largest frame payload either side accepts (1 MiB).
pub const MAX_FRAME: u32 = 1 << 20;
/// The largest output chunk the agent sends in one frame; well under
/// [`MAX_FRAME`] so that a chunk plus its envelope always fits.
pub const MAX_OUTPUT_CHUNK: usize = 64 * 1024;
/// The vsock port on the host (CID 2) the agent dials.
pub const CONTROL_PORT: u32 = 1024;
/// vsock CID of the host.
pub const HOST_CID: u32 = 2;
/// How often the agent sends a heartbeat.
pub const HEARTBEAT_INTERVAL_MS: u64 = 1000;

/// Versions this build supports.
pub fn supported_versions() -> VersionRange {
    VersionRange {
        min: MIN_PROTOCOL_VERSION,
        max: PROTOCOL_VERSION,
    }
}

/// The version both sides speak: the newest one in both ranges.
pub fn negotiate(ours: VersionRange, theirs: VersionRange) -> Result<u16, ProtoError> {
    let hi = ours.max.min(theirs.max);
    let lo = ours.min.max(theirs.min);
    if hi >= lo && ours.min <= ours.max && theirs.min <= theirs.max {
        Ok(hi)
    } else {
        Err(ProtoError::NoCommonVersion { ours, theirs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_picks_newest_common_version() {
        let a = VersionRange { min: 1, max: 3 };
        let b = VersionRange { min: 2, max: 5 };
        assert_eq!(negotiate(a, b).unwrap(), 3);
        assert_eq!(negotiate(b, a).unwrap(), 3);
    }

    #[test]
    fn negotiation_fails_without_overlap() {
        let a = VersionRange { min: 1, max: 1 };
        let b = VersionRange { min: 2, max: 2 };
        let err = negotiate(a, b).unwrap_err();
        assert!(
            err.to_string().contains("no common protocol version"),
            "{err}"
        );
        // An inverted range is never valid.
        let bad = VersionRange { min: 3, max: 1 };
        assert!(negotiate(a, bad).is_err());
    }
}
