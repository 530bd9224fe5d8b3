//! The host's end of the control connection. A reader task turns frames
//! into messages on a channel (so the supervisor's `select!` never loses a
//! half-read frame); writes go straight to the socket.
use dough_proto::{GuestMsg, HostMsg, ProtoError, HEADER_LEN, MAX_FRAME};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// What the reader task delivers.
#[derive(Debug)]
pub enum Incoming {
    Msg(GuestMsg),
    /// The stream ended between frames.
    Closed,
    /// The stream broke, or the guest sent something invalid.
    Failed(ProtoError),
}

/// Read one frame's payload; `Ok(None)` on a clean end between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Vec<u8>>, ProtoError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        let n = r.read(&mut header[got..]).await.map_err(ProtoError::Io)?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(ProtoError::Truncated {
                    expected: HEADER_LEN,
                    got,
                })
            };
        }
        got += n;
    }
    let len = dough_proto::frame_len(header, MAX_FRAME)?;
    let mut payload = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = r.read(&mut payload[got..]).await.map_err(ProtoError::Io)?;
        if n == 0 {
            return Err(ProtoError::Truncated { expected: len, got });
        }
        got += n;
    }
    Ok(Some(payload))
}

/// Spawn the reader; the channel is bounded so a flooding guest is slowed
/// by TCP-like backpressure rather than buffered without limit.
pub fn spawn_reader<R: AsyncRead + Unpin + Send + 'static>(mut r: R) -> mpsc::Receiver<Incoming> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let item = match read_frame(&mut r).await {
                Ok(Some(p)) => match dough_proto::decode::<GuestMsg>(&p) {
                    Ok(m) => Incoming::Msg(m),
                    Err(e) => Incoming::Failed(e),
                },
                Ok(None) => Incoming::Closed,
                Err(e) => Incoming::Failed(e),
            };
            let last = !matches!(item, Incoming::Msg(_));
            if tx.send(item).await.is_err() || last {
                return;
            }
        }
    });
    rx
}

pub async fn send<W: AsyncWrite + Unpin>(w: &mut W, msg: &HostMsg) -> Result<(), ProtoError> {
    let frame = dough_proto::encode(msg)?;
    w.write_all(&frame).await.map_err(ProtoError::Io)?;
    w.flush().await.map_err(ProtoError::Io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reader_delivers_messages_then_reports_the_bad_frame() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut rx = spawn_reader(a);
        b.write_all(&dough_proto::encode(&GuestMsg::Heartbeat { seq: 3 }).unwrap())
            .await
            .unwrap();
        b.write_all(&[0xff, 0xff, 0xff, 0xff]).await.unwrap();
        assert!(matches!(
            rx.recv().await,
            Some(Incoming::Msg(GuestMsg::Heartbeat { seq: 3 }))
        ));
        assert!(matches!(
            rx.recv().await,
            Some(Incoming::Failed(ProtoError::FrameTooLarge { .. }))
        ));
        assert!(rx.recv().await.is_none(), "reader stops after a failure");
    }

    #[tokio::test]
    async fn truncated_stream_is_an_error_and_clean_eof_is_closed() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut rx = spawn_reader(a);
        b.write_all(&[0, 0, 0, 10, 1, 2]).await.unwrap();
        drop(b);
        assert!(matches!(
            rx.recv().await,
            Some(Incoming::Failed(ProtoError::Truncated {
                expected: 10,
                got: 2
            }))
        ));
        let (a, b) = tokio::io::duplex(64);
        let mut rx = spawn_reader(a);
        drop(b);
        assert!(matches!(rx.recv().await, Some(Incoming::Closed)));
    }
}
