//! The output buffer as a checkpoint part (`castor_parts::Part`): every
//! checkpoint carries the held output of every sealed, unacknowledged epoch
//! and the next sequence number, so a backup that takes over can re-emit
//! what the primary may not have released and number new output after it.

use crate::{OutputBuffer, Seq};
use castor_parts::{
    decode_section, encode_section, Checked, Part, PartDescriptor, PartError, PartId, PartIdentity,
    PartKind, Staged, VersionRange,
};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};

/// Format version of the output section.
pub const OUTPUT_SECTION_VERSION: u16 = 1;

/// The output part's id (one per VM).
pub const OUTPUT_PART: PartId = PartId::new(PartKind::Output, 0);

/// One held item.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldItem {
    /// Its sequence number.
    pub seq: Seq,
    /// The payload (a record, an Ethernet frame).
    pub data: Vec<u8>,
}

/// The output section, version 1: what a committed checkpoint holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldOutput {
    /// The sequence number the next output gets.
    pub next_seq: Seq,
    /// Every held, unacknowledged item, ascending by `seq`, all below `next_seq`.
    pub items: Vec<HeldItem>,
}

/// A held-output section that breaks the buffer's rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeldOutputError {
    /// Items out of sequence order or repeated.
    #[error("held output out of order: seq {seq} after {prev}")]
    OutOfOrder {
        /// The item's seq.
        seq: Seq,
        /// The one before it.
        prev: Seq,
    },
    /// An item at or beyond the output position.
    #[error("held item seq {seq} is not below the output position {next_seq}")]
    BeyondPosition {
        /// The item's seq.
        seq: Seq,
        /// The position.
        next_seq: Seq,
    },
}

impl HeldOutput {
    /// Checks the invariants a checkpoint's output must keep.
    pub fn validate(&self) -> Result<(), HeldOutputError> {
        let mut prev: Option<Seq> = None;
        for it in &self.items {
            if let Some(p) = prev {
                if it.seq <= p {
                    return Err(HeldOutputError::OutOfOrder {
                        seq: it.seq,
                        prev: p,
                    });
                }
            }
            if it.seq >= self.next_seq {
                return Err(HeldOutputError::BeyondPosition {
                    seq: it.seq,
                    next_seq: self.next_seq,
                });
            }
            prev = Some(it.seq);
        }
        Ok(())
    }
}

/// The output buffer's part. On the primary it stages the buffer's position
/// at the pause (after the epoch is sealed) and encodes every sealed,
/// unacknowledged item after resume; on the backup it checks and keeps the
/// committed held output for the takeover to re-emit.
pub struct OutputPart {
    buffer: Option<Arc<OutputBuffer>>,
    restored: Mutex<Option<HeldOutput>>,
}

impl OutputPart {
    /// The primary's part over its output buffer.
    pub fn new(buffer: Arc<OutputBuffer>) -> Self {
        OutputPart {
            buffer: Some(buffer),
            restored: Mutex::new(None),
        }
    }

    /// A replica's part: holds what the last restore gave it.
    pub fn replica() -> Self {
        OutputPart {
            buffer: None,
            restored: Mutex::new(None),
        }
    }

    /// The held output the last [`Part::restore`] applied (the takeover
    /// re-emits it and numbers new output from its `next_seq`).
    pub fn restored(&self) -> Option<HeldOutput> {
        self.restored
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

enum StagedOutput {
    /// Gather the sealed, unacknowledged items at encode time: they cannot
    /// change before the next pause (new output goes to the open epoch; an
    /// ack removes items only once they are written out).
    Live {
        buffer: Arc<OutputBuffer>,
        next_seq: Seq,
    },
    Fixed(HeldOutput),
}

impl Staged for StagedOutput {
    fn version(&self) -> u16 {
        OUTPUT_SECTION_VERSION
    }
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), PartError> {
        match self {
            StagedOutput::Fixed(h) => encode_section(OUTPUT_PART, h, out),
            StagedOutput::Live { buffer, next_seq } => {
                let mut held = HeldOutput {
                    next_seq: *next_seq,
                    items: Vec::new(),
                };
                for sealed in buffer.pending_sealed() {
                    for it in sealed.iter() {
                        held.items.push(HeldItem {
                            seq: it.seq,
                            data: it.data.clone(),
                        });
                    }
                }
                encode_section(OUTPUT_PART, &held, out)
            }
        }
    }
}

impl Part for OutputPart {
    fn id(&self) -> PartId {
        OUTPUT_PART
    }
    fn descriptor(&self) -> PartDescriptor {
        PartDescriptor {
            id: OUTPUT_PART,
            identity: PartIdentity::Output,
            versions: VersionRange::only(OUTPUT_SECTION_VERSION),
        }
    }

    fn stage(&self) -> Result<Box<dyn Staged>, PartError> {
        Ok(Box::new(match &self.buffer {
            Some(b) => StagedOutput::Live {
                buffer: b.clone(),
                next_seq: b.next_seq(),
            },
            None => StagedOutput::Fixed(self.restored().unwrap_or_default()),
        }))
    }

    fn check(&self, version: u16, data: &[u8]) -> Result<Checked, PartError> {
        if version != OUTPUT_SECTION_VERSION {
            return Err(PartError::UnsupportedVersion {
                id: OUTPUT_PART,
                version,
                accepted: VersionRange::only(OUTPUT_SECTION_VERSION),
            });
        }
        let held: HeldOutput = decode_section(OUTPUT_PART, version, data)?;
        held.validate().map_err(|e| PartError::Invalid {
            id: OUTPUT_PART,
            source: Box::new(e),
        })?;
        Ok(Checked::new(OUTPUT_PART, version, held))
    }

    fn restore(&self, state: &Checked) -> Result<(), PartError> {
        let held: &HeldOutput = state.get(OUTPUT_PART)?;
        *self.restored.lock().unwrap_or_else(|e| e.into_inner()) = Some(held.clone());
        Ok(())
    }
}
