//! Page encoding: each dirty 4 KiB page is sent as the cheapest of
//!
//! | Tag | Name        | Data                                                                 |
//! |----:|-------------|----------------------------------------------------------------------|
//! | 0   | `Zero`      | none: the page is all zero                                           |
//! | 1   | `Raw`       | exactly 4096 bytes                                                   |
//! | 2   | `XorLz4`    | `lz4_flex` block (no size prefix) of `page XOR base`; decompresses to exactly 4096 bytes |
//! | 3   | `Lz4`       | `lz4_flex` block of the page itself; decompresses to exactly 4096 bytes |
//! | 4   | `Unchanged` | none: the page equals the base                                       |
//!
//! The *base* of a page is the content last sent for it. The primary keeps
//! copies of recently sent pages in a bounded [`SentCache`]; the backup needs
//! no cache because its replica memory already holds the base: decoding
//! XORs into the caller's replica page.
//!
//! **Invariant:** the encoder's cached copy of a page must equal the page the
//! decoder will use as base. [`PageEncoder::encode_page`] updates the cache
//! as soon as it returns, assuming the encoded bytes will be delivered and
//! applied in order (per page number). Consequently:
//! * frames for the same page must be decoded in the order they were encoded
//!   (send all entries for one page number on the same stream, and apply an
//!   epoch's pages on top of the previous epoch's);
//! * if encoded data is lost or not applied (connection reset, resync, a
//!   backup that discarded an uncommitted epoch), call
//!   [`PageEncoder::invalidate_all`] before encoding anything else.
//!
//! Decoding checks every length exactly and never writes a partially decoded
//! page into the base: data is decoded into a scratch page and applied only
//! once it is known to be complete and valid.
//!
//! ```
//! use castor_replicator::codec::{decode_page, PageEncoder, PageTag, PAGE_SIZE};
//!
//! let mut enc = PageEncoder::with_cache_bytes(64 * PAGE_SIZE);
//! let mut replica = [0u8; PAGE_SIZE]; // backup's copy of page 7
//!
//! let mut page = [0u8; PAGE_SIZE];
//! page[100] = 1;
//! let mut out = Vec::new();
//! let tag = enc.encode_page(7, &page, &mut out);
//! decode_page(tag as u8, &out, &mut replica).unwrap();
//! assert_eq!(replica, page);
//!
//! page[200] = 2; // a small change: XOR against the cached copy compresses well
//! out.clear();
//! assert_eq!(enc.encode_page(7, &page, &mut out), PageTag::XorLz4);
//! assert!(out.len() < 64);
//! decode_page(PageTag::XorLz4 as u8, &out, &mut replica).unwrap();
//! assert_eq!(replica, page);
//! ```

use std::collections::HashMap;

use thiserror::Error;

pub use crate::wire::PAGE_SIZE;

/// A guest page.
pub type Page = [u8; PAGE_SIZE];

/// Page encodings (the `tag` byte of a `PageBatch` entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PageTag {
    /// All-zero page; no data.
    Zero = 0,
    /// Uncompressed page; 4096 bytes.
    Raw = 1,
    /// LZ4 block of the XOR with the base page.
    XorLz4 = 2,
    /// LZ4 block of the page.
    Lz4 = 3,
    /// Same as the base page; no data.
    Unchanged = 4,
}

impl PageTag {
    /// Maps a tag byte to a tag.
    pub fn from_u8(tag: u8) -> Option<Self> {
        Some(match tag {
            0 => PageTag::Zero,
            1 => PageTag::Raw,
            2 => PageTag::XorLz4,
            3 => PageTag::Lz4,
            4 => PageTag::Unchanged,
            _ => return None,
        })
    }
}

/// Page decoding errors. On error the base page is left untouched.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CodecError {
    /// Unknown tag byte.
    #[error("unknown page encoding tag {tag}")]
    UnknownTag {
        /// The tag.
        tag: u8,
    },
    /// The encoded data has the wrong length for its tag.
    #[error("{tag:?} page data must be {expected} bytes, got {got}")]
    WrongDataLength {
        /// The encoding.
        tag: PageTag,
        /// Required length.
        expected: usize,
        /// Actual length.
        got: usize,
    },
    /// The compressed data is invalid (or decompresses to more than a page).
    #[error("{tag:?} page data does not decompress: {source}")]
    Decompress {
        /// The encoding.
        tag: PageTag,
        /// What the decompressor found.
        #[source]
        source: Lz4Fault,
    },
    /// The compressed data decompresses to fewer than 4096 bytes.
    #[error("{tag:?} page data decompresses to {got} bytes instead of 4096")]
    WrongDecompressedLength {
        /// The encoding.
        tag: PageTag,
        /// Decompressed length.
        got: usize,
    },
    /// The base slice is not exactly one page.
    #[error("base page slice is {got} bytes, expected 4096")]
    BadBaseLength {
        /// Slice length.
        got: usize,
    },
}

/// True if every byte of `page` is zero (OR-folds 8-byte words, 256 bytes at a time).
pub fn is_zero_page(page: &Page) -> bool {
    page.chunks_exact(256).all(|block| {
        block.chunks_exact(8).fold(0u64, |acc, w| {
            let mut a = [0u8; 8];
            a.copy_from_slice(w);
            acc | u64::from_ne_bytes(a)
        }) == 0
    })
}

/// `out = a ^ b`, page-wide (vectorized by the compiler).
pub fn xor_pages(a: &Page, b: &Page, out: &mut Page) {
    for ((o, x), y) in out.iter_mut().zip(a.iter()).zip(b.iter()) {
        *o = x ^ y;
    }
}

fn xor_in_place(dst: &mut Page, src: &Page) {
    for (d, s) in dst.iter_mut().zip(src.iter()) {
        *d ^= s;
    }
}

/// LZ4-compresses a page into `out` (sized for the worst case); `Some(len)`
/// only if that saves space.
fn compress_page(page: &Page, out: &mut [u8]) -> Option<usize> {
    let n = lz4_flex::block::compress_into(page, out).ok()?;
    (n < PAGE_SIZE).then_some(n)
}

fn zeroed_page() -> Box<Page> {
    Box::new([0u8; PAGE_SIZE])
}

// ---------------------------------------------------------------------------
// Sent-page cache
// ---------------------------------------------------------------------------

/// Hasher for page-number keys: one multiply-xorshift round (page numbers
/// are not attacker-chosen on the primary).
#[derive(Debug, Default, Clone, Copy)]
struct BuildPageHasher;

#[derive(Debug, Default)]
struct PageHasher(u64);

impl std::hash::BuildHasher for BuildPageHasher {
    type Hasher = PageHasher;
    fn build_hasher(&self) -> PageHasher {
        PageHasher(0)
    }
}

impl std::hash::Hasher for PageHasher {
    fn finish(&self) -> u64 {
        let z = self.0.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z ^ (z >> 29)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 ^= v;
    }
}

#[derive(Debug)]
struct Slot {
    page_number: u64,
    live: bool,
    referenced: bool,
    data: Box<Page>,
}

/// Bounded cache of the last copy sent for each page, with CLOCK
/// (second-chance) eviction. Page buffers are allocated lazily, up to the
/// capacity, and reused after eviction or [`SentCache::clear`].
#[derive(Debug)]
pub struct SentCache {
    capacity: usize,
    index: HashMap<u64, usize, BuildPageHasher>,
    slots: Vec<Slot>,
    free: Vec<usize>,
    hand: usize,
}

impl SentCache {
    /// A cache holding at most `pages` pages (0 disables caching).
    pub fn with_capacity_pages(pages: usize) -> Self {
        SentCache {
            capacity: pages,
            index: HashMap::default(),
            slots: Vec::new(),
            free: Vec::new(),
            hand: 0,
        }
    }

    /// A cache using at most `bytes` bytes of page data (rounded down to pages).
    pub fn with_capacity_bytes(bytes: usize) -> Self {
        Self::with_capacity_pages(bytes / PAGE_SIZE)
    }

    /// Maximum number of pages.
    pub fn capacity_pages(&self) -> usize {
        self.capacity
    }

    /// Number of cached pages.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// True if nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// True if `page_number` is cached (does not count as a use).
    pub fn contains(&self, page_number: u64) -> bool {
        self.index.contains_key(&page_number)
    }

    /// The cached copy of `page_number`, marking it recently used.
    pub fn get(&mut self, page_number: u64) -> Option<&Page> {
        let i = *self.index.get(&page_number)?;
        let slot = self.slots.get_mut(i)?;
        slot.referenced = true;
        Some(&slot.data)
    }

    /// Mutable cached copy, marking it recently used.
    fn get_mut(&mut self, page_number: u64) -> Option<&mut Page> {
        let i = *self.index.get(&page_number)?;
        let slot = self.slots.get_mut(i)?;
        slot.referenced = true;
        Some(&mut slot.data)
    }

    /// Stores `data` as the last sent copy of `page_number`, evicting another
    /// page if the cache is full.
    pub fn insert(&mut self, page_number: u64, data: &Page) {
        if let Some(slot) = self
            .index
            .get(&page_number)
            .and_then(|&i| self.slots.get_mut(i))
        {
            slot.data.copy_from_slice(data);
            slot.referenced = true;
            return;
        }
        let Some(i) = self.take_slot() else {
            return;
        };
        if let Some(slot) = self.slots.get_mut(i) {
            slot.page_number = page_number;
            slot.live = true;
            slot.referenced = false;
            slot.data.copy_from_slice(data);
            self.index.insert(page_number, i);
        }
    }

    /// Forgets `page_number`.
    pub fn remove(&mut self, page_number: u64) {
        if let Some(i) = self.index.remove(&page_number) {
            if let Some(slot) = self.slots.get_mut(i) {
                slot.live = false;
                self.free.push(i);
            }
        }
    }

    /// Forgets everything (keeps the allocated buffers for reuse).
    pub fn clear(&mut self) {
        self.index.clear();
        self.free.clear();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            slot.live = false;
            self.free.push(i);
        }
        self.hand = 0;
    }

    /// A free slot index: a released one, a new one, or a CLOCK victim.
    fn take_slot(&mut self) -> Option<usize> {
        if let Some(i) = self.free.pop() {
            return Some(i);
        }
        if self.slots.len() < self.capacity {
            self.slots.push(Slot {
                page_number: 0,
                live: false,
                referenced: false,
                data: zeroed_page(),
            });
            return Some(self.slots.len() - 1);
        }
        if self.slots.is_empty() {
            return None;
        }
        // CLOCK: all slots are live here (no free ones). At most two sweeps.
        for _ in 0..2 * self.slots.len() {
            let i = self.hand % self.slots.len();
            self.hand = (i + 1) % self.slots.len();
            let slot = &mut self.slots[i];
            if slot.referenced {
                slot.referenced = false;
                continue;
            }
            let victim = slot.page_number;
            slot.live = false;
            self.index.remove(&victim);
            return Some(i);
        }
        None
    }
}

// ---------------------------------------------------------------------------
// Encoder
// ---------------------------------------------------------------------------

/// Counters kept by [`PageEncoder`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EncodeStats {
    /// Pages encoded per tag (indexed by tag byte).
    pub pages_by_tag: [u64; 5],
    /// Encoded bytes produced (data only, no entry headers).
    pub encoded_bytes: u64,
}

impl EncodeStats {
    /// Total pages encoded.
    pub fn pages(&self) -> u64 {
        self.pages_by_tag.iter().sum()
    }
}

/// Primary-side page encoder with its [`SentCache`].
#[derive(Debug)]
pub struct PageEncoder {
    cache: SentCache,
    scratch: Box<Page>,
    lz4_out: Vec<u8>,
    compress_uncached: bool,
    stats: EncodeStats,
}

impl PageEncoder {
    /// An encoder using `cache`. Uncached pages are tried with plain LZ4.
    pub fn new(cache: SentCache) -> Self {
        PageEncoder {
            cache,
            scratch: zeroed_page(),
            lz4_out: vec![0u8; lz4_flex::block::get_maximum_output_size(PAGE_SIZE)],
            compress_uncached: true,
            stats: EncodeStats::default(),
        }
    }

    /// An encoder with a cache of `bytes` bytes.
    pub fn with_cache_bytes(bytes: usize) -> Self {
        Self::new(SentCache::with_capacity_bytes(bytes))
    }

    /// Whether pages without a cached base are tried with plain LZ4 before
    /// falling back to `Raw` (default: true).
    pub fn set_compress_uncached(&mut self, on: bool) {
        self.compress_uncached = on;
    }

    /// Encodes `page` (the current content of `page_number`), appending the
    /// data to `out`, and returns the tag. Updates the cache (see the module
    /// docs for the invariant this relies on). Never writes more than
    /// [`PAGE_SIZE`] bytes.
    pub fn encode_page(&mut self, page_number: u64, page: &Page, out: &mut Vec<u8>) -> PageTag {
        let before = out.len();
        let tag = self.encode_inner(page_number, page, out);
        self.stats.pages_by_tag[tag as usize] += 1;
        self.stats.encoded_bytes += (out.len() - before) as u64;
        tag
    }

    fn encode_inner(&mut self, page_number: u64, page: &Page, out: &mut Vec<u8>) -> PageTag {
        if let Some(base) = self.cache.get_mut(page_number) {
            xor_pages(page, base, &mut self.scratch);
            if is_zero_page(&self.scratch) {
                return PageTag::Unchanged;
            }
            if is_zero_page(page) {
                self.cache.remove(page_number);
                return PageTag::Zero;
            }
            let tag = match compress_page(&self.scratch, &mut self.lz4_out) {
                Some(n) => {
                    out.extend_from_slice(&self.lz4_out[..n]);
                    PageTag::XorLz4
                }
                None => {
                    out.extend_from_slice(page);
                    PageTag::Raw
                }
            };
            base.copy_from_slice(page);
            return tag;
        }
        if is_zero_page(page) {
            // The backup's page becomes zero; nothing worth caching.
            return PageTag::Zero;
        }
        let compressed = if self.compress_uncached {
            compress_page(page, &mut self.lz4_out)
        } else {
            None
        };
        let tag = match compressed {
            Some(n) => {
                out.extend_from_slice(&self.lz4_out[..n]);
                PageTag::Lz4
            }
            None => {
                out.extend_from_slice(page);
                PageTag::Raw
            }
        };
        self.cache.insert(page_number, page);
        tag
    }

    /// Forgets the cached copy of one page (e.g. it was not delivered).
    pub fn invalidate(&mut self, page_number: u64) {
        self.cache.remove(page_number);
    }

    /// Forgets all cached copies: call after a reconnection, a resync, or
    /// any loss of encoded data.
    pub fn invalidate_all(&mut self) {
        self.cache.clear();
    }

    /// The cache.
    pub fn cache(&self) -> &SentCache {
        &self.cache
    }

    /// Counters.
    pub fn stats(&self) -> EncodeStats {
        self.stats
    }
}

// ---------------------------------------------------------------------------
// Decoder
// ---------------------------------------------------------------------------

/// What made untrusted LZ4 data fail to decompress (lz4_flex's error,
/// as a comparable value).
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum Lz4Fault {
    /// It decompresses to more than a page.
    #[error("output would exceed a page ({expected} bytes needed)")]
    TooLong {
        /// Bytes it needed.
        expected: usize,
    },
    /// A literal runs past the input.
    #[error("literal out of bounds")]
    LiteralOutOfBounds,
    /// The input ends inside a sequence.
    #[error("input ends inside a sequence")]
    Truncated,
    /// A match refers to offset 0 or before the start of the output.
    #[error("match offset out of bounds")]
    BadOffset,
    /// Any other malformation lz4_flex reports.
    #[error("malformed LZ4 data")]
    Malformed,
}

impl From<lz4_flex::block::DecompressError> for Lz4Fault {
    fn from(e: lz4_flex::block::DecompressError) -> Self {
        use lz4_flex::block::DecompressError as D;
        match e {
            D::OutputTooSmall { expected, .. } => Lz4Fault::TooLong { expected },
            D::LiteralOutOfBounds => Lz4Fault::LiteralOutOfBounds,
            D::ExpectedAnotherByte => Lz4Fault::Truncated,
            D::OffsetZero | D::OffsetOutOfBounds => Lz4Fault::BadOffset,
            #[allow(unreachable_patterns)]
            _ => Lz4Fault::Malformed,
        }
    }
}

fn lz4_page(tag: PageTag, data: &[u8], out: &mut Page) -> Result<(), CodecError> {
    let n = lz4_flex::block::decompress_into(data, out).map_err(|e| CodecError::Decompress {
        tag,
        source: Lz4Fault::from(e),
    })?;
    if n != PAGE_SIZE {
        return Err(CodecError::WrongDecompressedLength { tag, got: n });
    }
    Ok(())
}

fn expect_len(tag: PageTag, data: &[u8], expected: usize) -> Result<(), CodecError> {
    if data.len() == expected {
        Ok(())
    } else {
        Err(CodecError::WrongDataLength {
            tag,
            expected,
            got: data.len(),
        })
    }
}

/// Checks an entry whose tag carries no data (zero, unchanged) and returns
/// its tag; `None` for a tag that carries page data (decode it). Lets a
/// backup stage such entries without a page buffer.
pub fn check_dataless(tag: u8, data: &[u8]) -> Result<Option<PageTag>, CodecError> {
    let tag = PageTag::from_u8(tag).ok_or(CodecError::UnknownTag { tag })?;
    match tag {
        PageTag::Zero | PageTag::Unchanged => {
            expect_len(tag, data, 0)?;
            Ok(Some(tag))
        }
        PageTag::Raw | PageTag::Lz4 | PageTag::XorLz4 => Ok(None),
    }
}

/// Decodes one page entry into `base` (the replica's current copy of the
/// page, which is also the XOR base). On error `base` is unchanged.
pub fn decode_page(tag: u8, data: &[u8], base: &mut Page) -> Result<PageTag, CodecError> {
    let tag = PageTag::from_u8(tag).ok_or(CodecError::UnknownTag { tag })?;
    match tag {
        PageTag::Zero => {
            expect_len(tag, data, 0)?;
            base.fill(0);
        }
        PageTag::Unchanged => expect_len(tag, data, 0)?,
        PageTag::Raw => {
            expect_len(tag, data, PAGE_SIZE)?;
            base.copy_from_slice(data);
        }
        PageTag::Lz4 => {
            let mut scratch = [0u8; PAGE_SIZE];
            lz4_page(tag, data, &mut scratch)?;
            base.copy_from_slice(&scratch);
        }
        PageTag::XorLz4 => {
            let mut scratch = [0u8; PAGE_SIZE];
            lz4_page(tag, data, &mut scratch)?;
            xor_in_place(base, &scratch);
        }
    }
    Ok(tag)
}

/// Like [`decode_page`] for a page given as a slice (must be 4096 bytes).
pub fn decode_page_slice(tag: u8, data: &[u8], base: &mut [u8]) -> Result<PageTag, CodecError> {
    let got = base.len();
    let base: &mut Page = base
        .try_into()
        .map_err(|_| CodecError::BadBaseLength { got })?;
    decode_page(tag, data, base)
}

/// Decodes one page entry against `base` into `out`, leaving `base` alone
/// (for a backup that stages an epoch before committing it). On error `out`
/// is unchanged.
pub fn decode_page_to(
    tag: u8,
    data: &[u8],
    base: &Page,
    out: &mut Page,
) -> Result<PageTag, CodecError> {
    let tag = PageTag::from_u8(tag).ok_or(CodecError::UnknownTag { tag })?;
    match tag {
        PageTag::XorLz4 => {
            let mut scratch = [0u8; PAGE_SIZE];
            lz4_page(tag, data, &mut scratch)?;
            xor_pages(base, &scratch, out);
        }
        PageTag::Unchanged => {
            expect_len(tag, data, 0)?;
            out.copy_from_slice(base);
        }
        _ => {
            decode_page(tag as u8, data, out)?;
        }
    }
    Ok(tag)
}
