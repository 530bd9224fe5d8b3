//! Length-prefixed framing.
use std::io::{self, Read, Write};

use serde::{de::DeserializeOwned, Serialize};

use crate::{VersionRange, MAX_FRAME};

/// Bytes in a frame header (the big-endian payload length).
pub const HEADER_LEN: usize = 4;

/// Everything that can go wrong reading or writing the protocol.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { len: u64, max: u32 },
    #[error("empty frame")]
    EmptyFrame,
    #[error("stream ended inside a frame ({got} of {expected} bytes)")]
    Truncated { expected: usize, got: usize },
    #[error("malformed message")]
    Malformed(#[source] postcard::Error),
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
    #[error("no common protocol version (ours {ours}, theirs {theirs})")]
    NoCommonVersion {
        ours: VersionRange,
        theirs: VersionRange,
    },
    #[error("i/o error on the control stream")]
    Io(#[source] io::Error),
}

/// Validate a header and return the payload length it announces.
pub fn frame_len(header: [u8; HEADER_LEN], max: u32) -> Result<usize, ProtoError> {
    let len = u32::from_be_bytes(header);
    if len > max.min(MAX_FRAME) {
        return Err(ProtoError::FrameTooLarge {
            len: len as u64,
            max: max.min(MAX_FRAME),
        });
    }
    if len == 0 {
        return Err(ProtoError::EmptyFrame);
    }
    Ok(len as usize)
}

/// Serialize `msg` as one whole frame (header included).
pub fn encode<M: Serialize>(msg: &M) -> Result<Vec<u8>, ProtoError> {
    let mut out = Vec::with_capacity(64);
    encode_into(msg, &mut out)?;
    Ok(out)
}

/// Append one whole frame for `msg` to `out`.
pub fn encode_into<M: Serialize>(msg: &M, out: &mut Vec<u8>) -> Result<(), ProtoError> {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    let res = postcard::to_io(msg, &mut *out).map(|_| ());
    if let Err(e) = res {
        out.truncate(start);
        return Err(ProtoError::Malformed(e));
    }
    let len = out.len() - start - HEADER_LEN;
    if len as u64 > MAX_FRAME as u64 {
        out.truncate(start);
        return Err(ProtoError::FrameTooLarge {
            len: len as u64,
            max: MAX_FRAME,
        });
    }
    out[start..start + HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// Deserialize one payload (without header). The whole payload must be used.
pub fn decode<M: DeserializeOwned>(payload: &[u8]) -> Result<M, ProtoError> {
    let (msg, rest) = postcard::take_from_bytes(payload).map_err(ProtoError::Malformed)?;
    if !rest.is_empty() {
        return Err(ProtoError::TrailingBytes(rest.len()));
    }
    Ok(msg)
}

/// Read one frame's payload. `Ok(None)` on a clean end of stream between
/// frames; an end inside a frame is [`ProtoError::Truncated`].
pub fn read_frame<R: Read>(r: &mut R, max: u32) -> Result<Option<Vec<u8>>, ProtoError> {
    let mut header = [0u8; HEADER_LEN];
    let got = read_full(r, &mut header)?;
    if got == 0 {
        return Ok(None);
    }
    if got < HEADER_LEN {
        return Err(ProtoError::Truncated {
            expected: HEADER_LEN,
            got,
        });
    }
    let len = frame_len(header, max)?;
    let mut payload = vec![0u8; len];
    let got = read_full(r, &mut payload)?;
    if got < len {
        return Err(ProtoError::Truncated { expected: len, got });
    }
    Ok(Some(payload))
}

/// Write one message as a frame.
pub fn write_frame<W: Write, M: Serialize>(w: &mut W, msg: &M) -> Result<(), ProtoError> {
    let buf = encode(msg)?;
    w.write_all(&buf).map_err(ProtoError::Io)
}

fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<usize, ProtoError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ProtoError::Io(e)),
        }
    }
    Ok(got)
}
