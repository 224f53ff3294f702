//! The conformance test every part runs (crosvm's snapshot test macro is the
//! model): stage, encode, check, restore, stage again, compare; and the
//! refusals every part owes an untrusted peer.

use crate::part::Part;

/// What a conformance run found wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConformanceFailure {
    /// An operation that must succeed failed.
    #[error("{step}: {source}")]
    Step {
        /// Which step.
        step: &'static str,
        /// The part's error.
        #[source]
        source: crate::PartError,
    },
    /// Source and destination describe different parts.
    #[error("the destination describes {dst:?}, the source {src:?}")]
    Descriptor {
        /// Source descriptor.
        src: Box<crate::PartDescriptor>,
        /// Destination descriptor.
        dst: Box<crate::PartDescriptor>,
    },
    /// The restored part re-stages to a different state.
    #[error("the restored part's state differs: {0}")]
    Differs(String),
    /// A malformed section was accepted.
    #[error("a malformed section was accepted: {0}")]
    Accepted(&'static str),
}

/// Stages and encodes `part`.
pub fn stage_bytes(part: &dyn Part) -> Result<(u16, Vec<u8>), crate::PartError> {
    let staged = part.stage()?;
    let mut out = Vec::new();
    staged.encode(&mut out)?;
    Ok((staged.version(), out))
}

/// Runs the conformance sequence from `src` into `dst` (two live objects of
/// the same part, `dst` freshly built as a backup would build it):
///
/// 1. `src` stages and encodes a section; `dst` checks and restores it, twice
///    (restore is idempotent: a dry run followed by the takeover);
/// 2. `dst` stages again and `same(original, restored)` must hold (parts whose
///    state includes a running clock compare with that masked);
/// 3. `dst` refuses the section truncated by one byte, with a byte appended,
///    and under a version it does not speak, without changing anything.
pub fn run(
    src: &dyn Part,
    dst: &dyn Part,
    same: impl Fn(&[u8], &[u8]) -> Result<(), String>,
) -> Result<(), ConformanceFailure> {
    let step = |step: &'static str| move |source| ConformanceFailure::Step { step, source };
    let (sd, dd) = (src.descriptor(), dst.descriptor());
    if sd.id != dd.id
        || sd.identity != dd.identity
        || dd.versions.common_max(&sd.versions).is_none()
    {
        return Err(ConformanceFailure::Descriptor {
            src: Box::new(sd),
            dst: Box::new(dd),
        });
    }
    let (version, bytes) = stage_bytes(src).map_err(step("stage/encode"))?;
    let checked = dst.check(version, &bytes).map_err(step("check"))?;
    dst.restore(&checked).map_err(step("restore (dry run)"))?;
    dst.restore(&checked).map_err(step("restore (again)"))?;
    let (v2, again) = stage_bytes(dst).map_err(step("stage/encode after restore"))?;
    if v2 != version {
        return Err(ConformanceFailure::Differs(format!(
            "re-staged as version {v2}, sent as {version}"
        )));
    }
    same(&bytes, &again).map_err(ConformanceFailure::Differs)?;
    if !bytes.is_empty() && dst.check(version, &bytes[..bytes.len() - 1]).is_ok() {
        return Err(ConformanceFailure::Accepted("truncated by one byte"));
    }
    let mut longer = bytes.clone();
    longer.push(0);
    if dst.check(version, &longer).is_ok() {
        return Err(ConformanceFailure::Accepted("one byte appended"));
    }
    let accepted = dst.descriptor().versions;
    if accepted.max < u16::MAX && dst.check(accepted.max + 1, &bytes).is_ok() {
        return Err(ConformanceFailure::Accepted("a version from the future"));
    }
    if accepted.min > 0 && dst.check(accepted.min - 1, &bytes).is_ok() {
        return Err(ConformanceFailure::Accepted(
            "a version older than supported",
        ));
    }
    Ok(())
}

/// Declares a conformance test for one part: `part_conformance!(name, || (src,
/// dst))` where the closure builds a source part and a fresh destination part
/// (each an `Arc<dyn Part>` or anything that derefs to `dyn Part`), and an
/// optional comparator `|sent: &[u8], restaged: &[u8]| -> Result<(), String>`.
#[macro_export]
macro_rules! part_conformance {
    ($name:ident, $setup:expr) => {
        $crate::part_conformance!($name, $setup, |a: &[u8], b: &[u8]| {
            if a == b {
                Ok(())
            } else {
                Err(format!(
                    "{} bytes sent, {} re-staged, contents differ",
                    a.len(),
                    b.len()
                ))
            }
        });
    };
    ($name:ident, $setup:expr, $same:expr) => {
        #[test]
        fn $name() {
            let (src, dst) = ($setup)();
            if let Err(e) = $crate::conformance::run(&*src, &*dst, $same) {
                panic!("part conformance failed: {e}");
            }
        }
    };
}
