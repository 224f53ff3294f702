//! Epoch-tagged, bounded output buffer implementing Remus-style *output commit*.
//!
//! Every output the speculatively-running primary emits during epoch `e`
//! (paravirtual records today, Ethernet frames later) is pushed into an
//! [`OutputBuffer`], tagged with a global sequence number and with the
//! currently *open* epoch. At the epoch boundary the caller [`seals`] the open
//! epoch, which fixes its items and hands back a cheap [`SealedEpoch`] view to
//! be serialized into the checkpoint. When the backup acknowledges epoch `e`,
//! [`release_through`] hands back every held item of sealed epochs `<= e`, in
//! sequence order, so it can finally be written to the outside world.
//!
//! The crate is a plain library: it knows nothing about KVM, devices or the
//! replicator. Payloads are any `T: AsRef<[u8]>` (default `Vec<u8>`); the byte
//! cap counts `data.as_ref().len()`.
//!
//! ```
//! use castor_net_buffer::{Config, OutputBuffer, Pushed};
//!
//! let buf: OutputBuffer = OutputBuffer::new(Config::default());
//!
//! // Epoch 0 is open: the guest emits two records.
//! let a = buf.try_push(b"hello".to_vec()).unwrap();
//! let b = buf.try_push(b"world".to_vec()).unwrap();
//! assert!(matches!(a, Pushed::Held(0)));
//! assert_eq!(b.seq(), 1);
//!
//! // Epoch boundary (VM paused): seal epoch 0, epoch 1 opens.
//! let sealed = buf.seal(0).unwrap();
//! assert_eq!(sealed.len(), 2); // goes into checkpoint 0's held output
//! drop(sealed); // once serialized
//!
//! // Output of epoch 1 stays held while epoch 0 is acked.
//! assert!(buf.try_push(b"later".to_vec()).unwrap().is_held());
//!
//! // Ack(0) from the backup: release epoch 0's output, in order.
//! let released = buf.release_through(0).unwrap().into_items();
//! let data: Vec<&[u8]> = released.iter().map(|i| i.data.as_slice()).collect();
//! assert_eq!(data, [&b"hello"[..], &b"world"[..]]);
//! assert_eq!(buf.stats().held_items, 1); // "later" is still held
//! ```
//!
//! [`seals`]: OutputBuffer::seal
//! [`release_through`]: OutputBuffer::release_through

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod persist;

pub use persist::{
    HeldItem, HeldOutput, HeldOutputError, OutputPart, OUTPUT_PART, OUTPUT_SECTION_VERSION,
};

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Global, monotonically increasing sequence number of an output item.
pub type Seq = u64;
/// Epoch number, chosen by the caller (the replicator), strictly increasing.
pub type Epoch = u64;

/// Sentinel used in the atomic gauges for "none".
const NONE: u64 = u64::MAX;

/// One output item: a payload tagged with its sequence number and the epoch
/// during which it was emitted.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Item<T = Vec<u8>> {
    /// Global sequence number (unique, increasing in push order).
    pub seq: Seq,
    /// Epoch during which the item was emitted.
    pub epoch: Epoch,
    /// The payload (record, frame, ...).
    pub data: T,
}

impl<T: AsRef<[u8]>> Item<T> {
    /// Payload size in bytes (what the byte cap counts).
    pub fn byte_len(&self) -> usize {
        self.data.as_ref().len()
    }
}

/// Buffer configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Cap on payload bytes held (open + sealed, not yet released).
    pub max_bytes: usize,
    /// Cap on the number of items held; `usize::MAX` for no item cap.
    pub max_items: usize,
    /// Number of the epoch that is open when the buffer is created.
    pub first_epoch: Epoch,
    /// Sequence number given to the first pushed item.
    pub first_seq: Seq,
}

impl Default for Config {
    /// 4 MiB byte cap, no item cap, epoch 0, sequence 0.
    fn default() -> Self {
        Config {
            max_bytes: 4 << 20,
            max_items: usize::MAX,
            first_epoch: 0,
            first_seq: 0,
        }
    }
}

impl Config {
    /// Default configuration with the given byte cap.
    pub fn with_max_bytes(max_bytes: usize) -> Self {
        Config {
            max_bytes,
            ..Config::default()
        }
    }
}

/// Outcome of a successful push.
#[must_use = "a PassThrough item must be emitted by the caller"]
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed<T = Vec<u8>> {
    /// Protected mode: the item is held until its epoch is acknowledged.
    Held(Seq),
    /// Unprotected mode: the item was not held; the caller must emit it now.
    PassThrough(Item<T>),
}

impl<T> Pushed<T> {
    /// Sequence number assigned to the pushed item.
    pub fn seq(&self) -> Seq {
        match self {
            Pushed::Held(seq) => *seq,
            Pushed::PassThrough(item) => item.seq,
        }
    }

    /// Whether the item is being held (protected mode).
    pub fn is_held(&self) -> bool {
        matches!(self, Pushed::Held(_))
    }
}

/// A rejected push. The payload is handed back so nothing is dropped: the
/// device reports "busy" to the guest, which retries.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PushError<T = Vec<u8>> {
    /// The byte or item cap would be exceeded; retry after a release.
    #[error("output buffer full")]
    Full(T),
    /// The item alone is larger than the byte cap and can never fit.
    #[error("item of {len} bytes exceeds the output buffer byte cap of {max_bytes}")]
    TooLarge {
        /// The rejected payload.
        data: T,
        /// Its size in bytes.
        len: usize,
        /// The configured byte cap.
        max_bytes: usize,
    },
}

impl<T> PushError<T> {
    /// Recover the rejected payload.
    pub fn into_inner(self) -> T {
        match self {
            PushError::Full(data) | PushError::TooLarge { data, .. } => data,
        }
    }
}

/// Misuse of the epoch / ack / restore API.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// `seal(epoch)` with an epoch older than the open one (epochs must increase).
    #[error("cannot seal epoch {epoch}: epoch {open_epoch} is open and epochs must increase")]
    EpochNotIncreasing {
        /// Requested epoch.
        epoch: Epoch,
        /// Currently open epoch.
        open_epoch: Epoch,
    },
    /// `seal(u64::MAX)` or `discard_after(u64::MAX)`: no next epoch to open.
    #[error("epoch number overflow")]
    EpochOverflow,
    /// Ack (release) of an epoch that has not been sealed yet.
    #[error("cannot release epoch {epoch}: not sealed yet (open epoch is {open_epoch})")]
    NotSealed {
        /// Requested epoch.
        epoch: Epoch,
        /// Currently open epoch.
        open_epoch: Epoch,
    },
    /// `discard_after(epoch)` although a later epoch was already released.
    #[error(
        "cannot discard after epoch {epoch}: output through epoch {released} was already released"
    )]
    AlreadyReleased {
        /// Requested epoch.
        epoch: Epoch,
        /// Release watermark.
        released: Epoch,
    },
    /// `restore` input is not in strictly increasing sequence order (or its
    /// epochs decrease).
    #[error("restore: item seq {seq} (epoch {epoch}) is out of order")]
    RestoreOutOfOrder {
        /// Offending item's sequence number.
        seq: Seq,
        /// Offending item's epoch.
        epoch: Epoch,
    },
    /// `restore` input has an item whose seq is not below `next_seq`.
    #[error("restore: item seq {seq} is not below next_seq {next_seq}")]
    RestoreSeqOutOfRange {
        /// Offending item's sequence number.
        seq: Seq,
        /// The `next_seq` given.
        next_seq: Seq,
    },
    /// `restore` input has an item whose epoch is not below `open_epoch`.
    #[error("restore: item epoch {epoch} is not below open_epoch {open_epoch}")]
    RestoreEpochOutOfRange {
        /// Offending item's epoch.
        epoch: Epoch,
        /// The `open_epoch` given.
        open_epoch: Epoch,
    },
}

/// Cheap, immutable view of one sealed epoch's items (an `Arc`, no copy).
///
/// Handed out by [`OutputBuffer::seal`] for serialization into the
/// checkpoint. Drop it once serialized: while a view is alive, releasing that
/// epoch with [`Released::into_items`] has to clone the payloads.
#[derive(Debug)]
pub struct SealedEpoch<T = Vec<u8>> {
    epoch: Epoch,
    items: Arc<Vec<Item<T>>>,
    bytes: usize,
}

impl<T> Clone for SealedEpoch<T> {
    fn clone(&self) -> Self {
        SealedEpoch {
            epoch: self.epoch,
            items: Arc::clone(&self.items),
            bytes: self.bytes,
        }
    }
}

impl<T> SealedEpoch<T> {
    /// The sealed epoch's number.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }
    /// Its items, in sequence order.
    pub fn items(&self) -> &[Item<T>] {
        &self.items
    }
    /// Number of items.
    pub fn len(&self) -> usize {
        self.items.len()
    }
    /// Whether the epoch emitted no output.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
    /// Total payload bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    /// Iterate over the items in sequence order.
    pub fn iter(&self) -> std::slice::Iter<'_, Item<T>> {
        self.items.iter()
    }
}

/// Items released by an ack (or by going unprotected), in sequence order.
///
/// Produced outside the buffer's lock: writing them to a sink does not block
/// producers.
#[derive(Debug)]
pub struct Released<T = Vec<u8>> {
    batches: Vec<Arc<Vec<Item<T>>>>,
    items: usize,
    bytes: usize,
}

impl<T> Default for Released<T> {
    fn default() -> Self {
        Released {
            batches: Vec::new(),
            items: 0,
            bytes: 0,
        }
    }
}

impl<T> Released<T> {
    fn add(&mut self, items: Arc<Vec<Item<T>>>, bytes: usize) {
        if !items.is_empty() {
            self.items += items.len();
            self.bytes += bytes;
            self.batches.push(items);
        }
    }
    /// Number of released items.
    pub fn len(&self) -> usize {
        self.items
    }
    /// Whether nothing was released.
    pub fn is_empty(&self) -> bool {
        self.items == 0
    }
    /// Total released payload bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    /// Iterate over the released items in sequence order (no copy).
    pub fn iter(&self) -> impl Iterator<Item = &Item<T>> + '_ {
        self.batches.iter().flat_map(|b| b.iter())
    }
}

impl<T: Clone> Released<T> {
    /// Owned items in sequence order. Moves the items out without copying
    /// when no [`SealedEpoch`] view of their epoch is still alive; otherwise
    /// clones them.
    pub fn into_items(self) -> Vec<Item<T>> {
        let mut out = Vec::with_capacity(self.items);
        for batch in self.batches {
            match Arc::try_unwrap(batch) {
                Ok(v) => out.extend(v),
                Err(shared) => out.extend(shared.iter().cloned()),
            }
        }
        out
    }
}

impl<T: Clone> IntoIterator for Released<T> {
    type Item = Item<T>;
    type IntoIter = std::vec::IntoIter<Item<T>>;
    fn into_iter(self) -> Self::IntoIter {
        self.into_items().into_iter()
    }
}

/// What a discard dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Discarded {
    /// Items dropped.
    pub items: usize,
    /// Payload bytes dropped.
    pub bytes: usize,
}

/// Snapshot of the buffer's metrics (read from atomics, lock-free).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Payload bytes held (open + sealed, not released).
    pub held_bytes: u64,
    /// Items held (open + sealed, not released).
    pub held_items: u64,
    /// Sealed epochs (empty ones included) awaiting their ack.
    pub sealed_epochs_pending: u64,
    /// Epoch of the oldest held item, if any.
    pub oldest_held_epoch: Option<Epoch>,
    /// Currently open epoch.
    pub open_epoch: Epoch,
    /// Highest epoch released through (ack watermark), if any.
    pub released_through: Option<Epoch>,
    /// Items accepted by pushes (held or passed through).
    pub total_pushed: u64,
    /// Items released to the outside (acked, forced, or passed through).
    pub total_released_items: u64,
    /// Payload bytes released to the outside.
    pub total_released_bytes: u64,
    /// Items passed straight through in unprotected mode (part of released).
    pub total_passthrough: u64,
    /// Items dropped by `discard_*`.
    pub total_discarded_items: u64,
    /// Pushes rejected with [`PushError::Full`] (a timed-out `push_timeout`
    /// counts once).
    pub full_rejections: u64,
    /// High-water mark of `held_bytes`.
    pub max_held_bytes: u64,
    /// Whether the buffer is in unprotected (pass-through) mode.
    pub unprotected: bool,
}

#[derive(Default)]
struct Counters {
    held_bytes: AtomicU64,
    held_items: AtomicU64,
    sealed_pending: AtomicU64,
    oldest_held_epoch: AtomicU64,
    open_epoch: AtomicU64,
    released_through: AtomicU64,
    total_pushed: AtomicU64,
    total_released_items: AtomicU64,
    total_released_bytes: AtomicU64,
    total_passthrough: AtomicU64,
    total_discarded_items: AtomicU64,
    full_rejections: AtomicU64,
    max_held_bytes: AtomicU64,
    unprotected: AtomicBool,
}

struct Batch<T> {
    epoch: Epoch,
    items: Arc<Vec<Item<T>>>,
    bytes: usize,
}

struct Inner<T> {
    open: Vec<Item<T>>,
    open_bytes: usize,
    open_epoch: Epoch,
    sealed: VecDeque<Batch<T>>,
    held_bytes: usize,
    held_items: usize,
    next_seq: Seq,
    released_through: Option<Epoch>,
    unprotected: bool,
    /// Threads in [`OutputBuffer::wait_for_open_output`] (a push only
    /// signals when someone waits: no syscall on the hot path otherwise).
    output_waiters: usize,
}

impl<T> Inner<T> {
    fn alloc_seq(&mut self) -> Seq {
        let seq = self.next_seq;
        self.next_seq = seq.wrapping_add(1);
        seq
    }

    fn oldest_held_epoch(&self) -> Option<Epoch> {
        self.sealed
            .iter()
            .find(|b| !b.items.is_empty())
            .map(|b| b.epoch)
            .or_else(|| (!self.open.is_empty()).then_some(self.open_epoch))
    }

    fn raise_watermark(&mut self, epoch: Epoch) {
        self.released_through = Some(self.released_through.map_or(epoch, |w| w.max(epoch)));
    }

    fn take_open(&mut self) -> (Vec<Item<T>>, usize) {
        let items = std::mem::take(&mut self.open);
        let bytes = std::mem::take(&mut self.open_bytes);
        self.held_bytes -= bytes;
        self.held_items -= items.len();
        (items, bytes)
    }
}

/// Thread-safe, bounded, epoch-tagged output buffer.
///
/// Typically shared as `Arc<OutputBuffer>` between the producer (vCPU/device
/// thread: [`try_push`](Self::try_push)), the epoch loop
/// ([`seal`](Self::seal)) and the ack path
/// ([`release_through`](Self::release_through)). All methods take `&self`;
/// each is one short mutex section, and metrics are atomics.
///
/// ```
/// use castor_net_buffer::{Config, OutputBuffer, PushError};
///
/// let buf = OutputBuffer::new(Config::with_max_bytes(8));
/// assert!(buf.try_push(vec![1u8; 6]).unwrap().is_held());
/// // Back-pressure: the payload comes back, nothing is dropped.
/// let rejected = buf.try_push(vec![2u8; 6]).unwrap_err();
/// assert!(matches!(rejected, PushError::Full(_)));
/// buf.seal(0).unwrap();
/// assert_eq!(buf.release_through(0).unwrap().len(), 1);
/// assert!(buf.try_push(rejected.into_inner()).unwrap().is_held()); // space freed
/// ```
pub struct OutputBuffer<T = Vec<u8>> {
    config: Config,
    inner: Mutex<Inner<T>>,
    space: Condvar,
    /// Signalled when the open epoch receives its first item and someone waits.
    output: Condvar,
    stats: Counters,
}

impl<T> std::fmt::Debug for OutputBuffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputBuffer")
            .field("config", &self.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl<T: AsRef<[u8]>> Default for OutputBuffer<T> {
    fn default() -> Self {
        Self::new(Config::default())
    }
}

impl<T: AsRef<[u8]>> OutputBuffer<T> {
    /// Empty buffer in protected mode, epoch `config.first_epoch` open.
    pub fn new(config: Config) -> Self {
        let inner = Inner {
            open: Vec::new(),
            open_bytes: 0,
            open_epoch: config.first_epoch,
            sealed: VecDeque::new(),
            held_bytes: 0,
            held_items: 0,
            next_seq: config.first_seq,
            released_through: None,
            unprotected: false,
            output_waiters: 0,
        };
        let buf = OutputBuffer {
            config,
            inner: Mutex::new(inner),
            space: Condvar::new(),
            output: Condvar::new(),
            stats: Counters::default(),
        };
        buf.stats.oldest_held_epoch.store(NONE, Relaxed);
        buf.stats.released_through.store(NONE, Relaxed);
        buf.stats.open_epoch.store(config.first_epoch, Relaxed);
        buf
    }

    /// Rebuild a buffer from a checkpoint's held output (failover: the new
    /// primary re-emits it; duplicates are harmless since items carry `seq`).
    ///
    /// `items` must be in strictly increasing `seq` order with non-decreasing
    /// epochs, every `seq < next_seq` and every `epoch < open_epoch`. They are
    /// restored as *sealed* (unreleased) epochs, grouped by their epoch; the
    /// open epoch is `open_epoch` and the next push gets `next_seq`
    /// (`config.first_epoch`/`first_seq` are ignored). Re-emit them with
    /// [`release_through`](Self::release_through) or
    /// [`release_all_unprotected`](Self::release_all_unprotected). Restored
    /// items may exceed the caps; pushes then get `Full` until released.
    pub fn restore(
        config: Config,
        items: Vec<Item<T>>,
        next_seq: Seq,
        open_epoch: Epoch,
    ) -> Result<Self, Error> {
        let mut prev: Option<(Seq, Epoch)> = None;
        for it in &items {
            if let Some((ps, pe)) = prev {
                if it.seq <= ps || it.epoch < pe {
                    return Err(Error::RestoreOutOfOrder {
                        seq: it.seq,
                        epoch: it.epoch,
                    });
                }
            }
            if it.seq >= next_seq {
                return Err(Error::RestoreSeqOutOfRange {
                    seq: it.seq,
                    next_seq,
                });
            }
            if it.epoch >= open_epoch {
                return Err(Error::RestoreEpochOutOfRange {
                    epoch: it.epoch,
                    open_epoch,
                });
            }
            prev = Some((it.seq, it.epoch));
        }

        let buf = Self::new(Config {
            first_epoch: open_epoch,
            first_seq: next_seq,
            ..config
        });
        {
            let mut g = buf.lock();
            let mut cur: Vec<Item<T>> = Vec::new();
            let mut cur_bytes = 0usize;
            for it in items {
                if cur.last().is_some_and(|l| l.epoch != it.epoch) {
                    let epoch = cur[0].epoch;
                    let batch = std::mem::take(&mut cur);
                    Self::push_restored(&mut g, epoch, batch, std::mem::take(&mut cur_bytes));
                }
                cur_bytes += it.byte_len();
                cur.push(it);
            }
            if let Some(first) = cur.first() {
                let epoch = first.epoch;
                Self::push_restored(&mut g, epoch, cur, cur_bytes);
            }
            buf.publish(&g);
        }
        Ok(buf)
    }

    fn push_restored(g: &mut Inner<T>, epoch: Epoch, items: Vec<Item<T>>, bytes: usize) {
        g.held_bytes += bytes;
        g.held_items += items.len();
        g.sealed.push_back(Batch {
            epoch,
            items: Arc::new(items),
            bytes,
        });
    }

    /// The configuration the buffer was built with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Non-blocking push of one output item, tagged with the open epoch.
    ///
    /// Protected mode: returns [`Pushed::Held`] with the item's sequence
    /// number, or [`PushError::Full`] (payload handed back) when the byte or
    /// item cap would be exceeded, or [`PushError::TooLarge`] when the item
    /// alone exceeds the byte cap. Unprotected mode: never fails; returns
    /// [`Pushed::PassThrough`] and the caller must emit the item itself.
    pub fn try_push(&self, data: T) -> Result<Pushed<T>, PushError<T>> {
        let len = data.as_ref().len();
        let mut g = self.lock();
        let r = self.push_locked(&mut g, data, len);
        drop(g);
        if matches!(r, Err(PushError::Full(_))) {
            self.stats.full_rejections.fetch_add(1, Relaxed);
        }
        r
    }

    /// Like [`try_push`](Self::try_push) but waits up to `timeout` for space
    /// (woken by releases, discards and switching to unprotected mode).
    /// Returns [`PushError::Full`] if still full at the deadline.
    pub fn push_timeout(&self, data: T, timeout: Duration) -> Result<Pushed<T>, PushError<T>> {
        let deadline = Instant::now().checked_add(timeout);
        let len = data.as_ref().len();
        let mut data = data;
        let mut g = self.lock();
        loop {
            match self.push_locked(&mut g, data, len) {
                Err(PushError::Full(d)) => data = d,
                other => return other,
            }
            let wait = match deadline {
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        drop(g);
                        self.stats.full_rejections.fetch_add(1, Relaxed);
                        return Err(PushError::Full(data));
                    }
                    d - now
                }
                // Effectively infinite timeout.
                None => Duration::from_secs(3600),
            };
            g = self
                .space
                .wait_timeout(g, wait)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    fn push_locked(
        &self,
        g: &mut Inner<T>,
        data: T,
        len: usize,
    ) -> Result<Pushed<T>, PushError<T>> {
        let s = &self.stats;
        if g.unprotected {
            let seq = g.alloc_seq();
            s.total_pushed.fetch_add(1, Relaxed);
            s.total_passthrough.fetch_add(1, Relaxed);
            s.total_released_items.fetch_add(1, Relaxed);
            s.total_released_bytes.fetch_add(len as u64, Relaxed);
            return Ok(Pushed::PassThrough(Item {
                seq,
                epoch: g.open_epoch,
                data,
            }));
        }
        let max_bytes = self.config.max_bytes;
        if len > max_bytes {
            return Err(PushError::TooLarge {
                data,
                len,
                max_bytes,
            });
        }
        if len > max_bytes.saturating_sub(g.held_bytes) || g.held_items >= self.config.max_items {
            return Err(PushError::Full(data));
        }
        let seq = g.alloc_seq();
        g.open.push(Item {
            seq,
            epoch: g.open_epoch,
            data,
        });
        g.open_bytes += len;
        g.held_bytes += len;
        g.held_items += 1;
        if g.open.len() == 1 && g.output_waiters > 0 {
            self.output.notify_all();
        }
        if g.held_items == 1 {
            s.oldest_held_epoch.store(g.open_epoch, Relaxed);
        }
        s.held_bytes.store(g.held_bytes as u64, Relaxed);
        s.held_items.store(g.held_items as u64, Relaxed);
        s.max_held_bytes.fetch_max(g.held_bytes as u64, Relaxed);
        s.total_pushed.fetch_add(1, Relaxed);
        Ok(Pushed::Held(seq))
    }

    /// Epoch boundary (VM paused): close the open epoch as `epoch`, open
    /// `epoch + 1`, and return a view of the closed epoch's items for the
    /// checkpoint. O(1): the epoch's `Vec` is moved into an `Arc`, no payload
    /// is copied.
    ///
    /// `epoch` must be `>=` the open epoch (see [`open_epoch`](Self::open_epoch));
    /// if it is greater (the caller skipped numbers) the items are re-tagged
    /// with `epoch`, which is O(items). Smaller is
    /// [`Error::EpochNotIncreasing`]. Sealing in unprotected mode is allowed
    /// and yields an empty epoch.
    pub fn seal(&self, epoch: Epoch) -> Result<SealedEpoch<T>, Error> {
        let mut g = self.lock();
        if epoch < g.open_epoch {
            return Err(Error::EpochNotIncreasing {
                epoch,
                open_epoch: g.open_epoch,
            });
        }
        let next = epoch.checked_add(1).ok_or(Error::EpochOverflow)?;
        // Pre-size the next epoch like this one to avoid regrowth on the push path.
        let hint = g.open.len();
        let mut items = std::mem::replace(&mut g.open, Vec::with_capacity(hint));
        let bytes = std::mem::take(&mut g.open_bytes);
        if epoch != g.open_epoch {
            for it in &mut items {
                it.epoch = epoch;
            }
        }
        let items = Arc::new(items);
        g.sealed.push_back(Batch {
            epoch,
            items: Arc::clone(&items),
            bytes,
        });
        g.open_epoch = next;
        self.publish(&g);
        Ok(SealedEpoch {
            epoch,
            items,
            bytes,
        })
    }

    /// Ack of `epoch` from the backup: release every held item of sealed
    /// epochs `<= epoch`, in sequence order, freeing their capacity and
    /// waking blocked producers. The items are returned outside the lock.
    ///
    /// `epoch` not yet sealed (`>=` the open epoch) is [`Error::NotSealed`].
    /// Duplicate, stale or out-of-order acks (epochs already released) are
    /// harmless no-ops returning an empty [`Released`].
    pub fn release_through(&self, epoch: Epoch) -> Result<Released<T>, Error> {
        let mut g = self.lock();
        if epoch >= g.open_epoch {
            return Err(Error::NotSealed {
                epoch,
                open_epoch: g.open_epoch,
            });
        }
        let mut out = Released::default();
        while g.sealed.front().is_some_and(|b| b.epoch <= epoch) {
            if let Some(b) = g.sealed.pop_front() {
                g.held_bytes -= b.bytes;
                g.held_items -= b.items.len();
                out.add(b.items, b.bytes);
            }
        }
        g.raise_watermark(epoch);
        self.finish_release(g, &out);
        Ok(out)
    }

    /// Copies of every held item of sealed epochs `<= epoch`, in sequence
    /// order, *without* releasing them: write these to the outside world,
    /// then [`release_through`](Self::release_through). Until then they stay
    /// held, so every checkpoint staged meanwhile still carries them and a
    /// backup that takes over re-emits them: output leaves the checkpoint
    /// only after it was written out.
    pub fn peek_through(&self, epoch: Epoch) -> Vec<Item<T>>
    where
        T: Clone,
    {
        let g = self.lock();
        g.sealed
            .iter()
            .take_while(|b| b.epoch <= epoch)
            .flat_map(|b| b.items.iter().cloned())
            .collect()
    }

    /// "Backup lost, continue unprotected": release everything held, sealed
    /// epochs *and* the open epoch's items, in sequence order. The mode is
    /// unchanged (see [`set_unprotected`](Self::set_unprotected)). Later acks
    /// for the released epochs are no-ops.
    pub fn release_all_unprotected(&self) -> Released<T> {
        let g = self.lock();
        self.release_all_locked(g)
    }

    /// Switch pass-through mode. Entering unprotected mode (`true`)
    /// atomically releases everything held (as
    /// [`release_all_unprotected`](Self::release_all_unprotected)) and returns
    /// it; emit it before any [`Pushed::PassThrough`] item to keep order.
    /// Blocked producers are woken and pass through. Leaving it (`false`)
    /// returns an empty [`Released`]; subsequent pushes are held in the open
    /// epoch again.
    pub fn set_unprotected(&self, unprotected: bool) -> Released<T> {
        let mut g = self.lock();
        g.unprotected = unprotected;
        self.stats.unprotected.store(unprotected, Relaxed);
        if unprotected {
            self.release_all_locked(g)
        } else {
            Released::default()
        }
    }

    /// Whether the buffer is in unprotected (pass-through) mode.
    pub fn is_unprotected(&self) -> bool {
        self.stats.unprotected.load(Relaxed)
    }

    fn release_all_locked(&self, mut g: MutexGuard<'_, Inner<T>>) -> Released<T> {
        let mut out = Released::default();
        while let Some(b) = g.sealed.pop_front() {
            g.held_bytes -= b.bytes;
            g.held_items -= b.items.len();
            out.add(b.items, b.bytes);
        }
        let (items, bytes) = g.take_open();
        out.add(Arc::new(items), bytes);
        if let Some(last_sealed) = g.open_epoch.checked_sub(1) {
            g.raise_watermark(last_sealed);
        }
        self.finish_release(g, &out);
        out
    }

    fn finish_release(&self, g: MutexGuard<'_, Inner<T>>, out: &Released<T>) {
        self.publish(&g);
        drop(g);
        let s = &self.stats;
        s.total_released_items.fetch_add(out.len() as u64, Relaxed);
        s.total_released_bytes
            .fetch_add(out.bytes() as u64, Relaxed);
        // Also wake on an empty release: a mode switch may unblock producers.
        self.space.notify_all();
    }

    /// Blocks until the open epoch holds at least one item (output is
    /// waiting for a checkpoint) or `deadline` passes; returns whether output
    /// is waiting. The wake-up for output-triggered epochs: a push that makes
    /// the open epoch non-empty wakes the waiter at once.
    pub fn wait_for_open_output(&self, deadline: Instant) -> bool {
        let mut g = self.lock();
        loop {
            if !g.open.is_empty() {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g.output_waiters += 1;
            g = self
                .output
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            g.output_waiters -= 1;
        }
    }

    /// Drop the open epoch's (unsealed, speculative) items. Sealed epochs and
    /// the open epoch number are unchanged; sequence numbers are not reused.
    pub fn discard_unsealed(&self) -> Discarded {
        let mut g = self.lock();
        let (items, bytes) = g.take_open();
        self.finish_discard(g, items.len(), bytes)
    }

    /// Failover helper: drop the open epoch's items and every sealed epoch
    /// `> epoch`, then make `epoch + 1` the open epoch (so its number can be
    /// reused). Sequence numbers are not reused. Fails with
    /// [`Error::AlreadyReleased`] if output beyond `epoch` was already
    /// released.
    pub fn discard_after(&self, epoch: Epoch) -> Result<Discarded, Error> {
        let mut g = self.lock();
        if let Some(released) = g.released_through.filter(|&w| w > epoch) {
            return Err(Error::AlreadyReleased { epoch, released });
        }
        let next = epoch.checked_add(1).ok_or(Error::EpochOverflow)?;
        let (open_items, mut bytes) = g.take_open();
        let mut items = open_items.len();
        while g.sealed.back().is_some_and(|b| b.epoch > epoch) {
            if let Some(b) = g.sealed.pop_back() {
                g.held_bytes -= b.bytes;
                g.held_items -= b.items.len();
                items += b.items.len();
                bytes += b.bytes;
            }
        }
        g.open_epoch = next;
        Ok(self.finish_discard(g, items, bytes))
    }

    fn finish_discard(&self, g: MutexGuard<'_, Inner<T>>, items: usize, bytes: usize) -> Discarded {
        self.publish(&g);
        drop(g);
        self.stats
            .total_discarded_items
            .fetch_add(items as u64, Relaxed);
        self.space.notify_all();
        Discarded { items, bytes }
    }
}

impl<T> OutputBuffer<T> {
    /// Views of all sealed epochs not yet released, oldest first (cheap
    /// `Arc` clones). Useful to put *all* unacknowledged output into a
    /// checkpoint, not only the last epoch's.
    pub fn pending_sealed(&self) -> Vec<SealedEpoch<T>> {
        let g = self.lock();
        g.sealed
            .iter()
            .map(|b| SealedEpoch {
                epoch: b.epoch,
                items: Arc::clone(&b.items),
                bytes: b.bytes,
            })
            .collect()
    }

    /// The currently open epoch (the one new items are tagged with).
    pub fn open_epoch(&self) -> Epoch {
        self.stats.open_epoch.load(Relaxed)
    }

    /// The sequence number the next pushed item will get.
    pub fn next_seq(&self) -> Seq {
        self.lock().next_seq
    }

    /// Payload bytes currently held.
    pub fn held_bytes(&self) -> u64 {
        self.stats.held_bytes.load(Relaxed)
    }

    /// Items currently held.
    pub fn held_items(&self) -> u64 {
        self.stats.held_items.load(Relaxed)
    }

    /// Lock-free metrics snapshot (fields are individually, not mutually,
    /// consistent).
    pub fn stats(&self) -> Stats {
        let s = &self.stats;
        let opt = |v: u64| (v != NONE).then_some(v);
        Stats {
            held_bytes: s.held_bytes.load(Relaxed),
            held_items: s.held_items.load(Relaxed),
            sealed_epochs_pending: s.sealed_pending.load(Relaxed),
            oldest_held_epoch: opt(s.oldest_held_epoch.load(Relaxed)),
            open_epoch: s.open_epoch.load(Relaxed),
            released_through: opt(s.released_through.load(Relaxed)),
            total_pushed: s.total_pushed.load(Relaxed),
            total_released_items: s.total_released_items.load(Relaxed),
            total_released_bytes: s.total_released_bytes.load(Relaxed),
            total_passthrough: s.total_passthrough.load(Relaxed),
            total_discarded_items: s.total_discarded_items.load(Relaxed),
            full_rejections: s.full_rejections.load(Relaxed),
            max_held_bytes: s.max_held_bytes.load(Relaxed),
            unprotected: s.unprotected.load(Relaxed),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<T>> {
        // Critical sections leave `Inner` consistent even if a panic occurred
        // elsewhere while holding the guard, so poisoning is ignored.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Publish the gauges derived from `Inner` (called under the lock).
    fn publish(&self, g: &Inner<T>) {
        let s = &self.stats;
        s.held_bytes.store(g.held_bytes as u64, Relaxed);
        s.held_items.store(g.held_items as u64, Relaxed);
        s.max_held_bytes.fetch_max(g.held_bytes as u64, Relaxed);
        s.sealed_pending.store(g.sealed.len() as u64, Relaxed);
        s.oldest_held_epoch
            .store(g.oldest_held_epoch().unwrap_or(NONE), Relaxed);
        s.open_epoch.store(g.open_epoch, Relaxed);
        s.released_through
            .store(g.released_through.unwrap_or(NONE), Relaxed);
    }
}
