//! Checkpoints as a property of the parts.
//!
//! Every piece of replicated state (a vCPU, the VM-wide KVM devices, each
//! MMIO device, the output buffer, a disk) is a [`Part`]. A part takes part in
//! every epoch through one seam:
//!
//! * **primary, inside the pause**: [`Part::stage`] copies the part's state
//!   aside (no encoding, no allocation it can avoid);
//! * **primary, after resume**: the [`Staged`] value encodes itself into a
//!   [`Section`] of its own format version;
//! * **backup, at commit**: [`Part::check`] decodes an untrusted section and
//!   validates it against the live object it would be restored into, giving a
//!   [`Checked`] state (virtio-queue's `TryFrom<QueueState>` is the model:
//!   nothing unvalidated ever becomes a live object);
//! * **backup, at takeover** (and once per session as a dry run that proves the
//!   replica restorable): [`Part::restore`] applies a checked state.
//!
//! Parts are identified by a typed [`PartId`] (kind + instance), never by a
//! string, and announce themselves with a [`PartDescriptor`] (identity and the
//! section versions they speak) in the Hello manifest. The epoch loop and the
//! commit iterate over parts; adding a part touches no loop. Cloud
//! Hypervisor's `Snapshottable` device tree and Firecracker's `Persist` (with a
//! versioned header per snapshot) are the anchors.
//!
//! Sections are encoded with `postcard` (a documented, stable wire format;
//! bincode 1.3 is unmaintained, RUSTSEC-2025-0141) under a hard size cap, and
//! each carries its format version: a part decodes the current version and the
//! one before it, so a pair can be upgraded one host at a time.
//!
//! ```
//! use castor_parts::{encode_section, decode_section, PartId, PartKind};
//! #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
//! struct Counter { value: u64 }
//! let id = PartId::new(PartKind::Output, 0);
//! let mut bytes = Vec::new();
//! encode_section(id, &Counter { value: 7 }, &mut bytes).unwrap();
//! let back: Counter = decode_section(id, 1, &bytes).unwrap();
//! assert_eq!(back, Counter { value: 7 });
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod conformance;
mod error;
mod id;
mod part;
mod section;

pub use error::PartError;
pub use id::{PartDescriptor, PartId, PartIdentity, PartKind, VersionRange};
pub use part::{Checked, Part, PartSet, Staged};
pub use section::{decode_section, encode_section, MAX_SECTION_BYTES};
