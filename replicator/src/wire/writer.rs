//! Building frames in place: the header reservation/completion shared by all
//! encoders, and [`PageBatchWriter`].

use super::{FrameType, Header, WireError, HEADER_LEN, PAGE_ENTRY_OVERHEAD, PROTOCOL_VERSION};
use castor_parts::PartId;

/// Starts a frame in `buf`: reserves the header; returns the frame start.
pub(super) fn begin_frame(buf: &mut Vec<u8>) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; HEADER_LEN]);
    start
}

/// Completes a frame started by [`begin_frame`]: checks the length, computes
/// the CRCs and writes the header. On error `buf` is truncated to `start`.
pub(super) fn end_frame(
    buf: &mut Vec<u8>,
    start: usize,
    frame_type: FrameType,
    epoch: u64,
    version: u16,
) -> Result<Header, WireError> {
    let payload_len = buf.len() - start - HEADER_LEN;
    let Ok(len32) = u32::try_from(payload_len) else {
        buf.truncate(start);
        return Err(WireError::PayloadTooLarge {
            len: payload_len as u64,
            cap: u32::MAX.into(),
        });
    };
    let header = Header {
        version,
        frame_type,
        epoch,
        payload_len: len32,
        payload_crc: crc32fast::hash(&buf[start + HEADER_LEN..]),
    };
    buf[start..start + HEADER_LEN].copy_from_slice(&header.to_bytes());
    Ok(header)
}

/// Builds a `PageBatch` frame in place in a caller's buffer, so encoded pages
/// are written once, directly where they will be sent from.
///
/// ```
/// use castor_replicator::wire::{self, BodyRef, Limits, PageBatchWriter};
///
/// let mut buf = Vec::new();
/// let mut w = PageBatchWriter::begin(&mut buf, 3);
/// w.push(10, 0, &[]).unwrap();
/// w.push_with(11, |out| { out.extend_from_slice(&[1, 2, 3]); 2 }).unwrap();
/// let header = w.finish().unwrap();
/// assert_eq!(header.frame_len(), buf.len());
///
/// let (frame, _) = wire::decode(&buf, &Limits::default()).unwrap();
/// let BodyRef::PageBatch(batch) = frame.body else { panic!() };
/// let pages: Vec<_> = batch.iter().map(|p| (p.page_number, p.tag, p.data.len())).collect();
/// assert_eq!(pages, vec![(10, 0, 0), (11, 2, 3)]);
/// ```
#[derive(Debug)]
pub struct PageBatchWriter<'b> {
    buf: &'b mut Vec<u8>,
    start: usize,
    epoch: u64,
    count: u32,
    frame_type: FrameType,
    /// Where the entry count goes (after the `DiskBatch` flags).
    count_at: usize,
}

impl<'b> PageBatchWriter<'b> {
    /// Starts a `PageBatch` frame for `epoch` at the end of `buf`.
    pub fn begin(buf: &'b mut Vec<u8>, epoch: u64) -> Self {
        let start = begin_frame(buf);
        buf.extend_from_slice(&0u32.to_le_bytes());
        PageBatchWriter {
            buf,
            start,
            epoch,
            count: 0,
            frame_type: FrameType::PageBatch,
            count_at: start + HEADER_LEN,
        }
    }

    /// Starts a `DiskBatch` frame (protocol 4) for `epoch` with `flags`:
    /// the same entries, numbered by 4 KiB disk block.
    pub fn begin_disk(buf: &'b mut Vec<u8>, epoch: u64, flags: u32) -> Self {
        let start = begin_frame(buf);
        buf.extend_from_slice(&flags.to_le_bytes());
        buf.extend_from_slice(&0u32.to_le_bytes());
        PageBatchWriter {
            buf,
            start,
            epoch,
            count: 0,
            frame_type: FrameType::DiskBatch,
            count_at: start + HEADER_LEN + 4,
        }
    }

    /// Number of entries so far.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Current frame length in bytes (header included).
    pub fn frame_len(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Appends an entry with the given encoded data.
    pub fn push(&mut self, page_number: u64, tag: u8, data: &[u8]) -> Result<(), WireError> {
        self.push_with(page_number, |out| {
            out.extend_from_slice(data);
            tag
        })
    }

    /// Appends an entry whose data is written by `encode` (which appends the
    /// encoded bytes to the vector it is given and returns the tag). Fails,
    /// removing the entry, if the data exceeds 65535 bytes or the batch has
    /// `u32::MAX` entries.
    pub fn push_with(
        &mut self,
        page_number: u64,
        encode: impl FnOnce(&mut Vec<u8>) -> u8,
    ) -> Result<(), WireError> {
        if self.count == u32::MAX {
            return Err(WireError::TooManyEntries {
                what: "page batch",
                count: u64::from(self.count) + 1,
                cap: u32::MAX.into(),
            });
        }
        let entry = self.buf.len();
        self.buf.extend_from_slice(&page_number.to_le_bytes());
        self.buf.extend_from_slice(&[0u8; 3]);
        let tag = encode(self.buf);
        let data_len = self.buf.len() - entry - PAGE_ENTRY_OVERHEAD;
        let Ok(len16) = u16::try_from(data_len) else {
            self.buf.truncate(entry);
            return Err(WireError::PayloadTooLarge {
                len: data_len as u64,
                cap: u16::MAX.into(),
            });
        };
        self.buf[entry + 8] = tag;
        self.buf[entry + 9..entry + 11].copy_from_slice(&len16.to_le_bytes());
        self.count += 1;
        Ok(())
    }

    /// Writes the entry count and header; returns the header.
    pub fn finish(self) -> Result<Header, WireError> {
        let at = self.count_at;
        self.buf[at..at + 4].copy_from_slice(&self.count.to_le_bytes());
        end_frame(
            self.buf,
            self.start,
            self.frame_type,
            self.epoch,
            PROTOCOL_VERSION,
        )
    }

    /// Abandons the batch, removing it from the buffer.
    pub fn abort(self) {
        self.buf.truncate(self.start);
    }
}

/// Builds a `Section` frame in place: the part's staged state encodes itself
/// straight into the buffer it will be sent from.
#[derive(Debug)]
pub struct SectionWriter<'b> {
    buf: &'b mut Vec<u8>,
    start: usize,
    epoch: u64,
}

impl<'b> SectionWriter<'b> {
    /// Starts the section of `part`, format `version`, for `epoch`.
    pub fn begin(buf: &'b mut Vec<u8>, epoch: u64, part: PartId, version: u16) -> Self {
        let start = begin_frame(buf);
        buf.extend_from_slice(&part.kind.as_u16().to_le_bytes());
        buf.extend_from_slice(&part.instance.to_le_bytes());
        buf.extend_from_slice(&version.to_le_bytes());
        SectionWriter { buf, start, epoch }
    }

    /// The buffer to append the section's data to.
    pub fn data(&mut self) -> &mut Vec<u8> {
        self.buf
    }

    /// Completes the frame; returns its header.
    pub fn finish(self) -> Result<Header, WireError> {
        end_frame(
            self.buf,
            self.start,
            FrameType::Section,
            self.epoch,
            PROTOCOL_VERSION,
        )
    }

    /// Abandons the section, removing it from the buffer.
    pub fn abort(self) {
        self.buf.truncate(self.start);
    }
}

/// Rewrites the protocol version of every frame in `buf` (whole frames, as
/// encoded by this crate) to `version`, recomputing each header's CRC: frames
/// are built in the newest version and re-stamped for a peer that negotiated
/// an older one whose layout of these frames is the same. Frames whose layout
/// differs by version (`Heartbeat`) are encoded with [`super::Frame::encode_at`].
pub fn restamp(buf: &mut [u8], version: u16) {
    let mut off = 0;
    while off + HEADER_LEN <= buf.len() {
        let len = u32::from_le_bytes([buf[off + 16], buf[off + 17], buf[off + 18], buf[off + 19]]);
        buf[off + 4..off + 6].copy_from_slice(&version.to_le_bytes());
        let crc = crc32fast::hash(&buf[off..off + 28]);
        buf[off + 28..off + 32].copy_from_slice(&crc.to_le_bytes());
        off += HEADER_LEN + len as usize;
    }
}
