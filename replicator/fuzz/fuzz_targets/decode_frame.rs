//! Feeds arbitrary bytes to the wire decoder and, for `PageBatch` frames, to
//! the page decoder against a scratch base page.
//!
//! Each input is decoded twice: as is (exercising the header checks and
//! CRCs), and "resealed" (if at least a header long: the first header's
//! payload length and both CRCs rewritten to match the input) so that the
//! fuzzer reaches the payload parsers and the page decoder without having to
//! forge CRC-32s.
#![no_main]

use castor_replicator::codec::{self, PAGE_SIZE};
use castor_replicator::wire::{self, BodyRef, FrameIter, Limits, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fn exercise(data: &[u8], limits: &Limits) {
    let mut base = [0u8; PAGE_SIZE];
    for frame in FrameIter::new(data, limits) {
        let Ok(frame) = frame else { break };
        let _ = frame.to_owned();
        if let BodyRef::PageBatch(batch) = frame.body {
            let mut n = 0u32;
            for page in batch.iter() {
                assert!(page.page_number < limits.max_page_count);
                let before = base;
                if codec::decode_page(page.tag, page.data, &mut base).is_err() {
                    assert_eq!(before, base, "base modified on error");
                }
                n += 1;
            }
            assert_eq!(n, batch.len());
        }
    }
    // A valid frame re-encodes to the same bytes (in its own protocol version).
    if let Ok((frame, used)) = wire::decode(data, limits) {
        let mut buf = Vec::new();
        if frame
            .to_owned()
            .encode_at(frame.header.version, &mut buf)
            .is_ok()
        {
            assert_eq!(&buf[..], &data[..used]);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_page_count: 1 << 20,
        max_payload: 1 << 20,
        ..Limits::default()
    };
    exercise(data, &limits);
    if data.len() >= HEADER_LEN {
        let mut sealed = data.to_vec();
        sealed[0..4].copy_from_slice(&wire::MAGIC);
        let len = (sealed.len() - HEADER_LEN) as u32;
        sealed[16..20].copy_from_slice(&len.to_le_bytes());
        let pcrc = crc32fast::hash(&sealed[HEADER_LEN..]);
        sealed[20..24].copy_from_slice(&pcrc.to_le_bytes());
        let hcrc = crc32fast::hash(&sealed[..28]);
        sealed[28..32].copy_from_slice(&hcrc.to_le_bytes());
        exercise(&sealed, &limits);
    }
});
