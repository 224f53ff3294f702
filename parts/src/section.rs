//! Section encoding: postcard under a hard cap, with the version beside it.

use crate::error::PartError;
use crate::id::PartId;
use serde::{de::DeserializeOwned, Serialize};

/// Most bytes one section may take (the state of one part at one pause).
/// Held output, the largest part, is bounded by the output buffer's own cap,
/// which a primary validates against this at start.
pub const MAX_SECTION_BYTES: usize = 16 << 20;

/// Appends `value`'s encoding to `out`.
pub fn encode_section<T: Serialize>(
    id: PartId,
    value: &T,
    out: &mut Vec<u8>,
) -> Result<(), PartError> {
    let start = out.len();
    let written = postcard::to_extend(value, std::mem::take(out))
        .map_err(|source| PartError::Encode { id, source })?;
    *out = written;
    let len = out.len() - start;
    if len > MAX_SECTION_BYTES {
        out.truncate(start);
        return Err(PartError::TooLarge {
            id,
            len,
            max: MAX_SECTION_BYTES,
        });
    }
    Ok(())
}

/// Decodes an untrusted section of format `version` as a `T`: the whole input
/// must be consumed, and no length in it can make the decoder allocate more
/// than the input could fill (postcard reads every element from the input;
/// serde caps preallocation).
pub fn decode_section<T: DeserializeOwned>(
    id: PartId,
    version: u16,
    bytes: &[u8],
) -> Result<T, PartError> {
    if bytes.len() > MAX_SECTION_BYTES {
        return Err(PartError::TooLarge {
            id,
            len: bytes.len(),
            max: MAX_SECTION_BYTES,
        });
    }
    let (value, rest) =
        postcard::take_from_bytes::<T>(bytes).map_err(|source| PartError::Decode {
            id,
            version,
            source,
        })?;
    if !rest.is_empty() {
        return Err(PartError::TrailingBytes {
            id,
            version,
            extra: rest.len(),
        });
    }
    Ok(value)
}
