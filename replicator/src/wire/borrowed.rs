//! Decoding into borrowed views ([`FrameRef`], [`BodyRef`], [`PageBatchRef`],
//! [`SectionRef`]) that point into the input buffer, and [`FrameIter`].

use std::fmt;

use super::{
    Body, DiskBatch, EpochEnd, ErrorFrame, Frame, FrameType, Header, Heartbeat, Hello, Limits,
    PageBatch, PageEntry, Role, Section, WireError, DISK_FLAG_FLUSH, DISK_PROTOCOL_VERSION,
    HEADER_LEN, MEMORY_DIGEST_LEN,
};

const HELLO_FIXED_LEN: usize = 40;
/// Most bytes of a manifest in a `Hello`.
const MAX_MANIFEST_LEN: usize = 64 << 10;
const EPOCH_END_FIXED_LEN: usize = 24;

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or(WireError::Malformed { what })?;
        let s = self
            .buf
            .get(self.pos..end)
            .ok_or(WireError::Malformed { what })?;
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N, what)?);
        Ok(a)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.array::<1>(what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }

    fn str(&mut self, len: usize, what: &'static str) -> Result<&'a str, WireError> {
        let b = self.bytes(len, what)?;
        std::str::from_utf8(b).map_err(|_| WireError::InvalidUtf8 { what })
    }

    fn finish(&self, what: &'static str) -> Result<(), WireError> {
        if self.remaining() == 0 {
            Ok(())
        } else {
            Err(WireError::Malformed { what })
        }
    }
}

/// One page entry of a borrowed `PageBatch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageEntryRef<'a> {
    /// Guest page frame number (`< Limits::max_page_count`).
    pub page_number: u64,
    /// Codec tag.
    pub tag: u8,
    /// Encoded data.
    pub data: &'a [u8],
}

/// A validated, borrowed `PageBatch` payload; iterate with [`PageBatchRef::iter`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PageBatchRef<'a> {
    count: u32,
    entries: &'a [u8],
}

impl fmt::Debug for PageBatchRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageBatchRef")
            .field("count", &self.count)
            .field("bytes", &self.entries.len())
            .finish()
    }
}

impl<'a> PageBatchRef<'a> {
    fn parse(payload: &'a [u8], limits: &Limits) -> Result<Self, WireError> {
        Self::parse_with(payload, limits, limits.max_page_count)
    }

    /// Entries numbered below `max_index` (guest pages; for disk blocks the
    /// receiver checks the range against its disk).
    fn parse_with(payload: &'a [u8], limits: &Limits, max_index: u64) -> Result<Self, WireError> {
        let mut c = Cursor::new(payload);
        let count = c.u32("page batch count")?;
        if count > limits.max_batch_entries {
            return Err(WireError::TooManyEntries {
                what: "page batch",
                count: count.into(),
                cap: limits.max_batch_entries.into(),
            });
        }
        let entries = c.rest();
        // Validate every entry once so iteration is infallible.
        let mut e = Cursor::new(entries);
        for _ in 0..count {
            let page = e.u64("page entry")?;
            if page >= max_index {
                return Err(WireError::PageOutOfRange {
                    page,
                    limit: max_index,
                });
            }
            let _tag = e.u8("page entry")?;
            let len = e.u16("page entry")?;
            e.bytes(len.into(), "page entry data")?;
        }
        e.finish("trailing bytes after page batch")?;
        Ok(PageBatchRef { count, entries })
    }

    /// Number of entries.
    pub fn len(&self) -> u32 {
        self.count
    }

    /// True if the batch has no entries.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Iterates over the entries without copying.
    pub fn iter(&self) -> PageIter<'a> {
        PageIter {
            cursor: Cursor::new(self.entries),
            left: self.count,
        }
    }

    /// Copies the batch into its owned form.
    pub fn to_owned(&self) -> PageBatch {
        PageBatch {
            pages: self
                .iter()
                .map(|p| PageEntry {
                    page_number: p.page_number,
                    tag: p.tag,
                    data: p.data.to_vec(),
                })
                .collect(),
        }
    }
}

impl<'a> IntoIterator for PageBatchRef<'a> {
    type Item = PageEntryRef<'a>;
    type IntoIter = PageIter<'a>;
    fn into_iter(self) -> PageIter<'a> {
        self.iter()
    }
}

/// Iterator over a [`PageBatchRef`].
pub struct PageIter<'a> {
    cursor: Cursor<'a>,
    left: u32,
}

impl<'a> Iterator for PageIter<'a> {
    type Item = PageEntryRef<'a>;

    fn next(&mut self) -> Option<PageEntryRef<'a>> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let c = &mut self.cursor;
        // Validated at parse time; `ok()?` only guards against the impossible.
        let page_number = c.u64("").ok()?;
        let tag = c.u8("").ok()?;
        let len = c.u16("").ok()?;
        let data = c.bytes(len.into(), "").ok()?;
        Some(PageEntryRef {
            page_number,
            tag,
            data,
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left as usize, Some(self.left as usize))
    }
}

/// A borrowed `DiskBatch` payload: its flags and its block entries (block
/// number in `page_number`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskBatchRef<'a> {
    /// `DISK_FLAG_FLUSH` or 0.
    pub flags: u32,
    /// The entries.
    pub blocks: PageBatchRef<'a>,
}

impl DiskBatchRef<'_> {
    /// Whether the guest flushed during the epoch.
    pub fn flushed(&self) -> bool {
        self.flags & DISK_FLAG_FLUSH != 0
    }
}

/// A borrowed `Section` payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SectionRef<'a> {
    /// Whose state.
    pub part: castor_parts::PartId,
    /// The section's format version.
    pub version: u16,
    /// The encoded state.
    pub data: &'a [u8],
}

/// A decoded frame body, borrowing bulk data from the input buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyRef<'a> {
    /// Handshake (small; decoded into the owned form, bounded by the limits).
    Hello(Hello),
    /// Pages.
    PageBatch(PageBatchRef<'a>),
    /// One part's state.
    Section(SectionRef<'a>),
    /// Disk blocks.
    DiskBatch(DiskBatchRef<'a>),
    /// End of epoch.
    EpochEnd(EpochEnd),
    /// Ack of the header's epoch.
    Ack,
    /// Heartbeat.
    Heartbeat(Heartbeat),
    /// Error report.
    Error {
        /// Error code.
        code: u16,
        /// Message.
        message: &'a str,
    },
}

/// A decoded frame borrowing from the input buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameRef<'a> {
    /// The validated header.
    pub header: Header,
    /// The body.
    pub body: BodyRef<'a>,
}

impl FrameRef<'_> {
    /// The frame's epoch.
    pub fn epoch(&self) -> u64 {
        self.header.epoch
    }

    /// Copies into an owned [`Frame`].
    pub fn to_owned(&self) -> Frame {
        let body = match &self.body {
            BodyRef::Hello(h) => Body::Hello(h.clone()),
            BodyRef::PageBatch(b) => Body::PageBatch(b.to_owned()),
            BodyRef::Section(sec) => Body::Section(Section {
                part: sec.part,
                version: sec.version,
                data: sec.data.to_vec(),
            }),
            BodyRef::DiskBatch(d) => Body::DiskBatch(DiskBatch {
                flags: d.flags,
                blocks: d.blocks.to_owned(),
            }),
            BodyRef::EpochEnd(e) => Body::EpochEnd(*e),
            BodyRef::Ack => Body::Ack,
            BodyRef::Heartbeat(h) => Body::Heartbeat(*h),
            BodyRef::Error { code, message } => Body::Error(ErrorFrame {
                code: *code,
                message: (*message).to_owned(),
            }),
        };
        Frame {
            epoch: self.header.epoch,
            body,
        }
    }

    /// Number of page entries (0 for non-`PageBatch` frames).
    pub fn page_count(&self) -> u64 {
        match &self.body {
            BodyRef::PageBatch(b) => b.len().into(),
            _ => 0,
        }
    }
}

/// Decodes one frame from the start of `bytes`; returns it and the number of
/// bytes it occupies.
///
/// Total: every input yields a frame or a [`WireError`];
/// [`WireError::Incomplete`] means "read more and retry".
pub fn decode<'a>(bytes: &'a [u8], limits: &Limits) -> Result<(FrameRef<'a>, usize), WireError> {
    let header = Header::parse(bytes, limits)?;
    let total = header.frame_len();
    let Some(payload) = bytes.get(HEADER_LEN..total) else {
        return Err(WireError::Incomplete {
            needed: total - bytes.len(),
        });
    };
    let body = decode_payload(&header, payload, limits)?;
    Ok((FrameRef { header, body }, total))
}

/// Like [`decode`], returning an owned frame.
pub fn decode_owned(bytes: &[u8], limits: &Limits) -> Result<(Frame, usize), WireError> {
    decode(bytes, limits).map(|(f, n)| (f.to_owned(), n))
}

/// Verifies the payload CRC and parses `payload` according to `header`
/// (which must come from [`Header::parse`]). For stream readers that read the
/// header and payload separately.
pub fn decode_payload<'a>(
    header: &Header,
    payload: &'a [u8],
    limits: &Limits,
) -> Result<BodyRef<'a>, WireError> {
    if payload.len() != header.payload_len as usize {
        return Err(WireError::Malformed {
            what: "payload length differs from header",
        });
    }
    let actual = crc32fast::hash(payload);
    if actual != header.payload_crc {
        return Err(WireError::PayloadChecksum {
            expected: header.payload_crc,
            actual,
        });
    }
    parse_body(header.frame_type, header.version, payload, limits)
}

fn parse_body<'a>(
    ty: FrameType,
    version: u16,
    payload: &'a [u8],
    limits: &Limits,
) -> Result<BodyRef<'a>, WireError> {
    let mut c = Cursor::new(payload);
    let body = match ty {
        FrameType::Hello => {
            let min = c.u16("hello")?;
            let max = c.u16("hello")?;
            let role = Role::from_u8(c.u8("hello")?)?;
            let tracker_len = usize::from(c.u8("hello")?);
            if c.u16("hello")? != 0 {
                return Err(WireError::Malformed {
                    what: "hello reserved field is not zero",
                });
            }
            let epoch_interval_ms = c.u32("hello")?;
            let session_id = c.u64("hello")?;
            let resume_from_epoch = c.u64("hello")?;
            let generation = c.u64("hello")?;
            let manifest_len = c.u32("hello")? as usize;
            debug_assert_eq!(c.pos, HELLO_FIXED_LEN);
            if min > max {
                return Err(WireError::Malformed {
                    what: "hello version range is empty",
                });
            }
            if tracker_len > limits.max_name_len {
                return Err(WireError::StringTooLong {
                    what: "tracker name",
                    len: tracker_len,
                    cap: limits.max_name_len,
                });
            }
            let tracker = c.str(tracker_len, "hello tracker name")?.to_owned();
            if manifest_len > MAX_MANIFEST_LEN {
                return Err(WireError::TooManyEntries {
                    what: "manifest bytes",
                    count: manifest_len as u64,
                    cap: MAX_MANIFEST_LEN as u64,
                });
            }
            // Exact size check before allocating.
            if c.remaining() != manifest_len {
                return Err(WireError::Malformed {
                    what: "hello manifest length",
                });
            }
            let manifest = c.rest().to_vec();
            BodyRef::Hello(Hello {
                versions: castor_parts::VersionRange::new(min, max),
                role,
                tracker,
                epoch_interval_ms,
                session_id,
                resume_from_epoch,
                generation,
                manifest,
            })
        }
        FrameType::PageBatch => BodyRef::PageBatch(PageBatchRef::parse(payload, limits)?),
        FrameType::DiskBatch => {
            if version < DISK_PROTOCOL_VERSION {
                return Err(WireError::UnknownFrameType {
                    got: FrameType::DiskBatch as u16,
                });
            }
            let flags = c.u32("disk batch flags")?;
            if flags & !DISK_FLAG_FLUSH != 0 {
                return Err(WireError::Malformed {
                    what: "unknown disk batch flags",
                });
            }
            BodyRef::DiskBatch(DiskBatchRef {
                flags,
                blocks: PageBatchRef::parse_with(c.rest(), limits, u64::MAX)?,
            })
        }
        FrameType::Section => {
            let kind = c.u16("section")?;
            let instance = c.u32("section")?;
            let version = c.u16("section")?;
            let kind = castor_parts::PartKind::from_u16(kind).ok_or(WireError::Malformed {
                what: "unknown part kind",
            })?;
            BodyRef::Section(SectionRef {
                part: castor_parts::PartId::new(kind, instance),
                version,
                data: c.rest(),
            })
        }
        FrameType::EpochEnd => {
            let page_count = c.u64("epoch end")?;
            let data_frames = c.u32("epoch end")?;
            let flags = c.u32("epoch end")?;
            let content_digest = c.u64("epoch end")?;
            debug_assert_eq!(c.pos, EPOCH_END_FIXED_LEN);
            let memory_digest = match flags {
                0 => None,
                1 => Some(c.array::<MEMORY_DIGEST_LEN>("epoch end memory digest")?),
                _ => {
                    return Err(WireError::Malformed {
                        what: "unknown epoch end flags",
                    })
                }
            };
            c.finish("trailing bytes after epoch end")?;
            BodyRef::EpochEnd(EpochEnd {
                page_count,
                data_frames,
                content_digest,
                memory_digest,
            })
        }
        FrameType::Ack => {
            c.finish("ack carries a payload")?;
            BodyRef::Ack
        }
        FrameType::Heartbeat => {
            let sent_at_nanos = c.u64("heartbeat")?;
            let last_committed_epoch = c.u64("heartbeat")?;
            let generation = if version >= 3 { c.u64("heartbeat")? } else { 0 };
            c.finish("trailing bytes after heartbeat")?;
            BodyRef::Heartbeat(Heartbeat {
                sent_at_nanos,
                last_committed_epoch,
                generation,
            })
        }
        FrameType::Error => {
            let code = c.u16("error frame")?;
            let len = usize::from(c.u16("error frame")?);
            if len > limits.max_message_len {
                return Err(WireError::StringTooLong {
                    what: "error message",
                    len,
                    cap: limits.max_message_len,
                });
            }
            let message = c.str(len, "error message")?;
            c.finish("trailing bytes after error message")?;
            BodyRef::Error { code, message }
        }
    };
    Ok(body)
}

/// Iterates over consecutive frames in a byte buffer. Stops after the first
/// error (an `Incomplete` error at the end means the buffer ends mid-frame).
///
/// ```
/// use castor_replicator::wire::{Body, Frame, FrameIter, Limits};
///
/// let mut buf = Vec::new();
/// Frame::new(1, Body::Ack).encode(&mut buf).unwrap();
/// Frame::new(2, Body::Ack).encode(&mut buf).unwrap();
/// let limits = Limits::default();
/// let epochs: Vec<u64> = FrameIter::new(&buf, &limits).map(|f| f.unwrap().epoch()).collect();
/// assert_eq!(epochs, vec![1, 2]);
/// ```
pub struct FrameIter<'a, 'l> {
    rest: &'a [u8],
    limits: &'l Limits,
    failed: bool,
}

impl<'a, 'l> FrameIter<'a, 'l> {
    /// Iterates over the frames in `bytes`.
    pub fn new(bytes: &'a [u8], limits: &'l Limits) -> Self {
        FrameIter {
            rest: bytes,
            limits,
            failed: false,
        }
    }

    /// Bytes not yet consumed.
    pub fn remainder(&self) -> &'a [u8] {
        self.rest
    }
}

impl<'a> Iterator for FrameIter<'a, '_> {
    type Item = Result<FrameRef<'a>, WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.rest.is_empty() {
            return None;
        }
        match decode(self.rest, self.limits) {
            Ok((f, n)) => {
                self.rest = &self.rest[n..];
                Some(Ok(f))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}
