//! Decoding into borrowed views ([`FrameRef`], [`BodyRef`], [`PageBatchRef`],
//! [`HeldOutputRef`]) that point into the input buffer, and [`FrameIter`].

use std::fmt;

use super::{
    Body, DeviceState, EpochEnd, ErrorFrame, Frame, FrameType, Header, Heartbeat, HeldOutput,
    Hello, Limits, MemoryRegion, OutputItem, PageBatch, PageEntry, Role, VcpuState, WireError,
    HEADER_LEN, MEMORY_DIGEST_LEN,
};

const HELLO_FIXED_LEN: usize = 32;
const EPOCH_END_FIXED_LEN: usize = 24;
const REGION_LEN: usize = 16;

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
            if page >= limits.max_page_count {
                return Err(WireError::PageOutOfRange {
                    page,
                    limit: limits.max_page_count,
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

/// Borrowed `HeldOutput` payload.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct HeldOutputRef<'a> {
    count: u32,
    items: &'a [u8],
}

impl fmt::Debug for HeldOutputRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeldOutputRef")
            .field("count", &self.count)
            .field("bytes", &self.items.len())
            .finish()
    }
}

impl<'a> HeldOutputRef<'a> {
    fn parse(payload: &'a [u8], limits: &Limits) -> Result<Self, WireError> {
        let mut c = Cursor::new(payload);
        let count = c.u32("held output count")?;
        if count > limits.max_output_items {
            return Err(WireError::TooManyEntries {
                what: "held output",
                count: count.into(),
                cap: limits.max_output_items.into(),
            });
        }
        let items = c.rest();
        let mut e = Cursor::new(items);
        for _ in 0..count {
            e.u64("held output item")?;
            let len = e.u32("held output item")?;
            e.bytes(len as usize, "held output item data")?;
        }
        e.finish("trailing bytes after held output")?;
        Ok(HeldOutputRef { count, items })
    }

    /// Number of items.
    pub fn len(&self) -> u32 {
        self.count
    }

    /// True if there are no items.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Iterates over `(seq, bytes)`.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &'a [u8])> + 'a {
        let mut c = Cursor::new(self.items);
        (0..self.count).map_while(move |_| {
            let seq = c.u64("").ok()?;
            let len = c.u32("").ok()?;
            let data = c.bytes(len as usize, "").ok()?;
            Some((seq, data))
        })
    }

    /// Copies into the owned form.
    pub fn to_owned(&self) -> HeldOutput {
        HeldOutput {
            items: self
                .iter()
                .map(|(seq, data)| OutputItem {
                    seq,
                    data: data.to_vec(),
                })
                .collect(),
        }
    }
}

/// A decoded frame body, borrowing bulk data from the input buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyRef<'a> {
    /// Handshake (small; decoded into the owned form, bounded by the limits).
    Hello(Hello),
    /// Pages.
    PageBatch(PageBatchRef<'a>),
    /// vCPU state.
    VcpuState {
        /// vCPU index.
        vcpu_index: u32,
        /// Serialized state.
        data: &'a [u8],
    },
    /// Device state.
    DeviceState {
        /// Device identifier.
        device_id: &'a str,
        /// Serialized state.
        data: &'a [u8],
    },
    /// Held output.
    HeldOutput(HeldOutputRef<'a>),
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
            BodyRef::VcpuState { vcpu_index, data } => Body::VcpuState(VcpuState {
                vcpu_index: *vcpu_index,
                data: data.to_vec(),
            }),
            BodyRef::DeviceState { device_id, data } => Body::DeviceState(DeviceState {
                device_id: (*device_id).to_owned(),
                data: data.to_vec(),
            }),
            BodyRef::HeldOutput(o) => Body::HeldOutput(o.to_owned()),
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
    parse_body(header.frame_type, payload, limits)
}

fn parse_body<'a>(
    ty: FrameType,
    payload: &'a [u8],
    limits: &Limits,
) -> Result<BodyRef<'a>, WireError> {
    let mut c = Cursor::new(payload);
    let body = match ty {
        FrameType::Hello => {
            let protocol_version = c.u16("hello")?;
            let role = Role::from_u8(c.u8("hello")?)?;
            let tracker_len = usize::from(c.u8("hello")?);
            let vcpus = c.u32("hello")?;
            let epoch_interval_ms = c.u32("hello")?;
            let region_count = c.u32("hello")?;
            let session_id = c.u64("hello")?;
            let resume_from_epoch = c.u64("hello")?;
            debug_assert_eq!(c.pos, HELLO_FIXED_LEN);
            if tracker_len > limits.max_name_len {
                return Err(WireError::StringTooLong {
                    what: "tracker name",
                    len: tracker_len,
                    cap: limits.max_name_len,
                });
            }
            let tracker = c.str(tracker_len, "hello tracker name")?.to_owned();
            if region_count > limits.max_regions {
                return Err(WireError::TooManyEntries {
                    what: "memory regions",
                    count: region_count.into(),
                    cap: limits.max_regions.into(),
                });
            }
            // Exact size check before allocating.
            if c.remaining() != region_count as usize * REGION_LEN {
                return Err(WireError::Malformed {
                    what: "hello region list length",
                });
            }
            let mut memory_regions = Vec::with_capacity(region_count as usize);
            for _ in 0..region_count {
                memory_regions.push(MemoryRegion {
                    guest_addr: c.u64("hello region")?,
                    size: c.u64("hello region")?,
                });
            }
            BodyRef::Hello(Hello {
                protocol_version,
                role,
                vcpus,
                memory_regions,
                tracker,
                epoch_interval_ms,
                session_id,
                resume_from_epoch,
            })
        }
        FrameType::PageBatch => BodyRef::PageBatch(PageBatchRef::parse(payload, limits)?),
        FrameType::VcpuState => {
            let vcpu_index = c.u32("vcpu state")?;
            BodyRef::VcpuState {
                vcpu_index,
                data: c.rest(),
            }
        }
        FrameType::DeviceState => {
            let len = usize::from(c.u8("device state")?);
            if len > limits.max_name_len {
                return Err(WireError::StringTooLong {
                    what: "device id",
                    len,
                    cap: limits.max_name_len,
                });
            }
            let device_id = c.str(len, "device id")?;
            BodyRef::DeviceState {
                device_id,
                data: c.rest(),
            }
        }
        FrameType::HeldOutput => BodyRef::HeldOutput(HeldOutputRef::parse(payload, limits)?),
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
            c.finish("trailing bytes after heartbeat")?;
            BodyRef::Heartbeat(Heartbeat {
                sent_at_nanos,
                last_committed_epoch,
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
