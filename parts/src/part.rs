//! The seam: what every piece of replicated state implements.

use crate::error::PartError;
use crate::id::{PartDescriptor, PartId, VersionRange};
use std::any::Any;
use std::collections::BTreeMap;
use std::sync::Arc;

/// A part's state copied aside inside the pause, encoded after resume.
pub trait Staged: Send {
    /// The format version [`Staged::encode`] writes.
    fn version(&self) -> u16;
    /// Appends the section's bytes to `out`.
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), PartError>;
}

/// A section decoded and validated against the live object it would restore
/// into: the only form in which replicated state may become live.
pub struct Checked {
    id: PartId,
    version: u16,
    state: Box<dyn Any + Send + Sync>,
}

impl std::fmt::Debug for Checked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checked")
            .field("id", &self.id)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl Checked {
    /// Wraps the validated state of part `id`, decoded from `version`.
    pub fn new<T: Any + Send + Sync>(id: PartId, version: u16, state: T) -> Self {
        Checked {
            id,
            version,
            state: Box::new(state),
        }
    }

    /// Whose state it is.
    pub fn id(&self) -> PartId {
        self.id
    }

    /// The section version it was decoded from.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// The state, as the part that checked it knows it. `restore` uses this;
    /// a mismatch (another part's state) is [`PartError::WrongState`].
    pub fn get<T: Any>(&self, me: PartId) -> Result<&T, PartError> {
        if self.id != me {
            return Err(PartError::WrongState {
                id: me,
                got: self.id,
            });
        }
        self.state.downcast_ref::<T>().ok_or(PartError::WrongState {
            id: me,
            got: self.id,
        })
    }
}

/// One piece of replicated state. Implemented beside the object it
/// describes (a `persist.rs`-style module next to each device), walked by
/// the VM and the replicator; neither loop knows the concrete parts.
pub trait Part: Send + Sync {
    /// Identity, device identity and the section versions it speaks: the
    /// part's entry in the Hello manifest.
    fn descriptor(&self) -> PartDescriptor;

    /// Primary, inside the pause (the VM's vCPUs are out of `KVM_RUN` and
    /// its devices quiescent): copies the state aside.
    fn stage(&self) -> Result<Box<dyn Staged>, PartError>;

    /// Backup, at commit: decodes an untrusted section of `version` and
    /// validates it against this (paused) live object. Nothing is applied.
    fn check(&self, version: u16, data: &[u8]) -> Result<Checked, PartError>;

    /// Backup, at takeover (and in the restorability dry run): applies a
    /// state this part checked. The VM is paused.
    fn restore(&self, state: &Checked) -> Result<(), PartError>;

    /// The part's id (from its descriptor).
    fn id(&self) -> PartId {
        self.descriptor().id
    }

    /// The section versions it reads (from its descriptor).
    fn versions(&self) -> VersionRange {
        self.descriptor().versions
    }
}

/// The parts of one VM, in restore order, with their ids indexed.
#[derive(Clone, Default)]
pub struct PartSet {
    parts: Vec<Arc<dyn Part>>,
    index: BTreeMap<PartId, usize>,
}

impl std::fmt::Debug for PartSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.index.keys()).finish()
    }
}

impl PartSet {
    /// An empty set.
    pub fn new() -> Self {
        PartSet::default()
    }

    /// Adds `part` after the others (restore order is insertion order).
    /// Returns `false` (and adds nothing) if a part with its id is present.
    pub fn push(&mut self, part: Arc<dyn Part>) -> bool {
        let id = part.id();
        if self.index.contains_key(&id) {
            return false;
        }
        self.index.insert(id, self.parts.len());
        self.parts.push(part);
        true
    }

    /// The parts, in restore order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Part>> + '_ {
        self.parts.iter()
    }

    /// The position of part `id` in restore order.
    pub fn position(&self, id: PartId) -> Option<usize> {
        self.index.get(&id).copied()
    }

    /// The part `id`.
    pub fn get(&self, id: PartId) -> Option<&Arc<dyn Part>> {
        self.position(id).map(|i| &self.parts[i])
    }

    /// How many parts.
    pub fn len(&self) -> usize {
        self.parts.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// Every part's descriptor, in restore order (the Hello manifest).
    pub fn descriptors(&self) -> Vec<PartDescriptor> {
        self.parts.iter().map(|p| p.descriptor()).collect()
    }

    /// Restores `states` (one per part, in restore order, as produced by
    /// [`Part::check`] of these parts) into the live objects.
    pub fn restore_all(&self, states: &[Checked]) -> Result<(), PartError> {
        for (part, state) in self.parts.iter().zip(states) {
            part.restore(state)?;
        }
        Ok(())
    }
}
