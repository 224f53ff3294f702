//! Reading frames from an async byte stream: [`read_frame`].

use thiserror::Error;

use super::{decode_payload, FrameRef, Header, Limits, WireError, HEADER_LEN};

/// Errors from [`read_frame`].
#[derive(Debug, Error)]
pub enum ReadFrameError {
    /// I/O error from the reader.
    #[error("I/O error reading frame: {0}")]
    Io(#[from] std::io::Error),
    /// The bytes read are not a valid frame.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({got} of {expected} bytes)")]
    UnexpectedEof {
        /// Bytes of the frame read.
        got: usize,
        /// Frame length (or header length, if the header was incomplete).
        expected: usize,
    },
}

/// Reads one frame from `reader` into `buf` (reused between calls: it holds
/// the payload afterwards) and decodes it.
///
/// Returns `Ok(None)` on a clean end of stream at a frame boundary. Reads the
/// header first and allocates at most `limits.max_payload` bytes.
pub async fn read_frame<'b, R>(
    reader: &mut R,
    buf: &'b mut Vec<u8>,
    limits: &Limits,
) -> Result<Option<FrameRef<'b>>, ReadFrameError>
where
    R: tokio::io::AsyncRead + Unpin + ?Sized,
{
    use tokio::io::AsyncReadExt;

    let mut hdr = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        let n = reader.read(&mut hdr[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            // Report bad magic on a partial header in preference to EOF.
            if let Err(e @ WireError::BadMagic { .. }) = Header::parse(&hdr[..got], limits) {
                return Err(e.into());
            }
            return Err(ReadFrameError::UnexpectedEof {
                got,
                expected: HEADER_LEN,
            });
        }
        got += n;
        // Fail fast on garbage.
        if got < HEADER_LEN {
            if let Err(e @ WireError::BadMagic { .. }) = Header::parse(&hdr[..got], limits) {
                return Err(e.into());
            }
        }
    }
    let header = Header::parse(&hdr, limits)?;
    let len = header.payload_len as usize;
    buf.clear();
    buf.resize(len, 0);
    let mut filled = 0;
    while filled < len {
        let n = reader.read(&mut buf[filled..]).await?;
        if n == 0 {
            return Err(ReadFrameError::UnexpectedEof {
                got: HEADER_LEN + filled,
                expected: header.frame_len(),
            });
        }
        filled += n;
    }
    let body = decode_payload(&header, buf, limits)?;
    Ok(Some(FrameRef { header, body }))
}
