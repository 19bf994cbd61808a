//! Framing for the control channel: each message is a 4-byte big-endian length followed by that
//! many bytes of JSON. A frame larger than [`MAX_FRAME`] is refused before it is read.

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest frame either side accepts: 16 MiB, enough for a netmap of tens of thousands of peers.
pub const MAX_FRAME: usize = 16 << 20;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream failed.
    #[error("control stream i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The peer announced a frame above the limit.
    #[error("frame of {0} bytes is over the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    /// The frame is not a valid message.
    #[error("malformed control message: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// Encodes one message as a frame.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Writes one message.
pub async fn write<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    msg: &T,
) -> Result<(), FrameError> {
    let bytes = encode(msg)?;
    w.write_all(&bytes).await?;
    Ok(())
}

/// Reads one message; `Ok(None)` when the stream ended cleanly between frames.
pub async fn read<R: AsyncRead + Unpin, T: DeserializeOwned>(
    r: &mut R,
) -> Result<Option<T>, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(Some(serde_json::from_slice(&body)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_oversize_is_refused() {
        let bytes = encode(&vec![1u32, 2, 3]).expect("encodes");
        let mut r = &bytes[..];
        let v: Option<Vec<u32>> = read(&mut r).await.expect("reads");
        assert_eq!(v, Some(vec![1, 2, 3]));
        let end: Option<Vec<u32>> = read(&mut r).await.expect("clean end");
        assert_eq!(end, None);

        let huge = ((MAX_FRAME + 1) as u32).to_be_bytes();
        let mut r = &huge[..];
        assert!(matches!(
            read::<_, u32>(&mut r).await,
            Err(FrameError::TooLarge(_))
        ));
    }
}
