//! Epoch accounting: the order-independent content digest and
//! [`EpochTally`].

use super::{EpochEnd, FrameRef, Header, MEMORY_DIGEST_LEN};

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Contribution of one data frame to an epoch's content digest.
pub fn frame_digest(header: &Header) -> u64 {
    let x = u64::from(header.payload_crc) | (u64::from(header.payload_len) << 32);
    mix64(mix64(x) ^ u64::from(header.frame_type as u16))
}

/// Result of comparing an [`EpochTally`] with the epoch's `EpochEnd`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpochCheck {
    /// All data frames arrived and the digest matches.
    Complete,
    /// Fewer data frames than announced have arrived so far.
    Pending {
        /// Frames still missing.
        missing_frames: u32,
    },
    /// More frames than announced, or counts/digest disagree.
    Mismatch,
}

/// Running count and digest of an epoch's data frames, kept by the sender
/// (to fill `EpochEnd`) and by the receiver (to know when the epoch is
/// complete, whatever streams the frames used).
///
/// ```
/// use castor_parts::{PartId, PartKind};
/// use castor_replicator::wire::{Body, EpochCheck, EpochTally, Frame, Section};
///
/// let mut sent = EpochTally::new(5);
/// let mut buf = Vec::new();
/// let part = PartId::new(PartKind::Vcpu, 0);
/// let h = Frame::new(5, Body::Section(Section { part, version: 1, data: vec![1] }))
///     .encode(&mut buf).unwrap();
/// sent.add(&h, 0);
/// let end = sent.epoch_end(None);
///
/// let mut received = EpochTally::new(5);
/// assert_eq!(received.check(&end), EpochCheck::Pending { missing_frames: 1 });
/// received.add(&h, 0);
/// assert_eq!(received.check(&end), EpochCheck::Complete);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochTally {
    /// The epoch tallied.
    pub epoch: u64,
    /// Data frames counted.
    pub data_frames: u32,
    /// Page entries counted.
    pub pages: u64,
    /// Digest so far.
    pub digest: u64,
}

impl EpochTally {
    /// An empty tally for `epoch`.
    pub fn new(epoch: u64) -> Self {
        EpochTally {
            epoch,
            data_frames: 0,
            pages: 0,
            digest: 0,
        }
    }

    /// Counts a data frame (other frame types are ignored) with `pages` page entries.
    pub fn add(&mut self, header: &Header, pages: u64) {
        if !header.frame_type.is_epoch_data() {
            return;
        }
        self.data_frames = self.data_frames.wrapping_add(1);
        self.pages = self.pages.wrapping_add(pages);
        self.digest = self.digest.wrapping_add(frame_digest(header));
    }

    /// Counts a received frame.
    pub fn add_frame(&mut self, frame: &FrameRef<'_>) {
        self.add(&frame.header, frame.page_count());
    }

    /// Builds the `EpochEnd` body for this tally.
    pub fn epoch_end(&self, memory_digest: Option<[u8; MEMORY_DIGEST_LEN]>) -> EpochEnd {
        EpochEnd {
            page_count: self.pages,
            data_frames: self.data_frames,
            content_digest: self.digest,
            memory_digest,
        }
    }

    /// Compares with the announced `EpochEnd`.
    pub fn check(&self, end: &EpochEnd) -> EpochCheck {
        if self.data_frames < end.data_frames {
            EpochCheck::Pending {
                missing_frames: end.data_frames - self.data_frames,
            }
        } else if self.data_frames == end.data_frames
            && self.pages == end.page_count
            && self.digest == end.content_digest
        {
            EpochCheck::Complete
        } else {
            EpochCheck::Mismatch
        }
    }
}
