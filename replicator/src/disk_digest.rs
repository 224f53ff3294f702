//! Test-only hook (feature `fault-injection`): with
//! `CASTOR_TEST_DISK_DIGESTS=FILE` in its environment, a primary appends
//! `primary EPOCH DIGEST` to FILE at every pause (the BLAKE3 of its whole
//! disk image as that checkpoint captures it) and a backup appends
//! `takeover EPOCH DIGEST` when it takes over (its image, before the guest
//! resumes), so a test compares the two byte for byte. Never in a
//! production build: it reads the whole image inside the pause.

use std::io::Write;

/// The file named by `CASTOR_TEST_DISK_DIGESTS`, if any.
fn target() -> Option<std::path::PathBuf> {
    std::env::var_os("CASTOR_TEST_DISK_DIGESTS").map(Into::into)
}

/// Appends `what epoch digest-of-image` (a missing hook does nothing; a
/// failure is logged, never fatal).
pub(crate) fn record(what: &str, epoch: u64, image: &std::fs::File) {
    let Some(path) = target() else {
        return;
    };
    use std::os::unix::fs::FileExt;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    loop {
        match image.read_at(&mut buf, off) {
            Ok(0) => break,
            Ok(n) => {
                h.update(&buf[..n]);
                off += n as u64;
            }
            Err(e) => {
                log::warn!("disk digest hook: reading the image: {e}");
                return;
            }
        }
    }
    let line = format!("{what} {epoch} {}\n", h.finalize().to_hex());
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        log::warn!("disk digest hook: {}: {e}", path.display());
    }
}
