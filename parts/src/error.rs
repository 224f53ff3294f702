//! The one error type of part operations.

use crate::id::{PartId, VersionRange};

/// A part's own error (a vCPU ioctl, a device state mismatch, ...), kept typed.
pub type PartSource = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors of staging, encoding, checking and restoring a part.
#[derive(Debug, thiserror::Error)]
pub enum PartError {
    /// The part's state could not be captured (inside the pause).
    #[error("{id}: capture failed: {source}")]
    Capture {
        /// The part.
        id: PartId,
        /// Why.
        #[source]
        source: PartSource,
    },
    /// The state could not be serialized.
    #[error("{id}: encoding failed: {source}")]
    Encode {
        /// The part.
        id: PartId,
        /// Why.
        #[source]
        source: postcard::Error,
    },
    /// A section did not decode.
    #[error("{id}: section version {version} does not decode: {source}")]
    Decode {
        /// The part.
        id: PartId,
        /// The section's format version.
        version: u16,
        /// Why.
        #[source]
        source: postcard::Error,
    },
    /// A section carries bytes after its state.
    #[error("{id}: section version {version} has {extra} bytes after its state")]
    TrailingBytes {
        /// The part.
        id: PartId,
        /// The section's format version.
        version: u16,
        /// Bytes left over.
        extra: usize,
    },
    /// A section is longer than any part may write.
    #[error("{id}: section of {len} bytes exceeds the cap of {max}")]
    TooLarge {
        /// The part.
        id: PartId,
        /// Its length.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// A section of a format version this build does not read.
    #[error("{id}: section version {version} is not one this build reads ({accepted})")]
    UnsupportedVersion {
        /// The part.
        id: PartId,
        /// The section's version.
        version: u16,
        /// What this build reads.
        accepted: VersionRange,
    },
    /// The decoded state does not fit the live object it would restore into.
    #[error("{id}: state does not fit this VM: {source}")]
    Invalid {
        /// The part.
        id: PartId,
        /// Why (the part's own error).
        #[source]
        source: PartSource,
    },
    /// Restoring a checked state into the live object failed.
    #[error("{id}: restore failed: {source}")]
    Restore {
        /// The part.
        id: PartId,
        /// Why (the part's own error).
        #[source]
        source: PartSource,
    },
    /// A checked state of another part was handed to this one (a bug).
    #[error("{id}: restore was given the checked state of {got}")]
    WrongState {
        /// The part restoring.
        id: PartId,
        /// Whose state it was given.
        got: PartId,
    },
}

impl PartError {
    /// The part the error is about.
    pub fn part(&self) -> PartId {
        match self {
            PartError::Capture { id, .. }
            | PartError::Encode { id, .. }
            | PartError::Decode { id, .. }
            | PartError::TrailingBytes { id, .. }
            | PartError::TooLarge { id, .. }
            | PartError::UnsupportedVersion { id, .. }
            | PartError::Invalid { id, .. }
            | PartError::Restore { id, .. }
            | PartError::WrongState { id, .. } => *id,
        }
    }
}
