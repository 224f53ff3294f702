//! Wire protocol tests: round trips, every error variant, truncation,
//! random inputs.

use castor_parts::{PartId, PartKind, VersionRange};
use castor_replicator::wire::{
    self, Body, BodyRef, EpochCheck, EpochEnd, EpochTally, ErrorFrame, Frame, FrameIter, FrameType,
    Header, Heartbeat, Hello, Limits, PageBatch, PageBatchWriter, PageEntry, ReadFrameError, Role,
    Section, SectionRef, SectionWriter, WireError, HEADER_LEN, MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION, PROTOCOL_VERSIONS,
};
use rand::{Rng, RngCore, SeedableRng};

fn samples() -> Vec<Frame> {
    vec![
        Frame::new(
            0,
            Body::Hello(Hello {
                versions: PROTOCOL_VERSIONS,
                role: Role::Primary,
                tracker: "kvm-dirty-log".into(),
                epoch_interval_ms: 25,
                session_id: 0xdead_beef_1234,
                resume_from_epoch: 17,
                generation: 0x0102_0304_0506_0708,
                manifest: (0..=255u8).cycle().take(700).collect(),
            }),
        ),
        Frame::new(
            0,
            Body::Hello(Hello {
                versions: VersionRange::only(PROTOCOL_VERSION),
                role: Role::Backup,
                tracker: String::new(),
                epoch_interval_ms: 0,
                session_id: 0,
                resume_from_epoch: 0,
                generation: 0,
                manifest: vec![],
            }),
        ),
        Frame::new(
            5,
            Body::PageBatch(PageBatch {
                pages: vec![
                    PageEntry {
                        page_number: 0,
                        tag: 0,
                        data: vec![],
                    },
                    PageEntry {
                        page_number: 12345,
                        tag: 1,
                        data: vec![0xab; 4096],
                    },
                    PageEntry {
                        page_number: 7,
                        tag: 2,
                        data: vec![1, 2, 3, 4, 5],
                    },
                ],
            }),
        ),
        Frame::new(5, Body::PageBatch(PageBatch::default())),
        Frame::new(
            5,
            Body::Section(Section {
                part: PartId::new(PartKind::Vcpu, 3),
                version: 1,
                data: (0..200u8).collect(),
            }),
        ),
        Frame::new(
            5,
            Body::Section(Section {
                part: PartId::new(PartKind::Mmio, 0xdead_beef),
                version: 0xfffe,
                data: vec![9; 33],
            }),
        ),
        Frame::new(
            5,
            Body::Section(Section {
                part: PartId::new(PartKind::Output, 0),
                version: 0,
                data: vec![],
            }),
        ),
        Frame::new(
            5,
            Body::EpochEnd(EpochEnd {
                page_count: 3,
                data_frames: 4,
                content_digest: 0x0123_4567_89ab_cdef,
                memory_digest: None,
            }),
        ),
        Frame::new(
            5,
            Body::EpochEnd(EpochEnd {
                page_count: 0,
                data_frames: 0,
                content_digest: 0,
                memory_digest: Some([0x5a; 32]),
            }),
        ),
        Frame::new(5, Body::Ack),
        Frame::new(
            6,
            Body::Heartbeat(Heartbeat {
                sent_at_nanos: 123_456_789,
                last_committed_epoch: 5,
                generation: 0xfeed_0000_0000_0042,
            }),
        ),
        Frame::new(
            6,
            Body::Error(ErrorFrame {
                code: 42,
                message: "memory layout mismatch".into(),
            }),
        ),
    ]
}

fn encode(f: &Frame) -> Vec<u8> {
    let mut b = Vec::new();
    f.encode(&mut b).unwrap();
    b
}

/// Recomputes both CRCs after a test modified a frame.
fn reseal(frame: &mut [u8]) {
    let pcrc = crc32fast::hash(&frame[HEADER_LEN..]);
    frame[20..24].copy_from_slice(&pcrc.to_le_bytes());
    let hcrc = crc32fast::hash(&frame[..28]);
    frame[28..32].copy_from_slice(&hcrc.to_le_bytes());
}

/// Builds a frame with an arbitrary payload and correct CRCs.
fn raw_frame(ty: u16, epoch: u64, payload: &[u8]) -> Vec<u8> {
    raw_frame_at(PROTOCOL_VERSION, ty, epoch, payload)
}

/// [`raw_frame`] with an arbitrary header version.
fn raw_frame_at(version: u16, ty: u16, epoch: u64, payload: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; HEADER_LEN];
    b[0..4].copy_from_slice(b"CSTR");
    b[4..6].copy_from_slice(&version.to_le_bytes());
    b[6..8].copy_from_slice(&ty.to_le_bytes());
    b[8..16].copy_from_slice(&epoch.to_le_bytes());
    b[16..20].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    b.extend_from_slice(payload);
    reseal(&mut b);
    b
}

/// A `Hello` payload laid out by hand: the 40-byte fixed prefix, the tracker
/// name, then `manifest` (whose declared length is `manifest_len`).
fn hello_payload(
    min: u16,
    max: u16,
    tracker: &[u8],
    manifest_len: u32,
    manifest: &[u8],
) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&min.to_le_bytes());
    p.extend_from_slice(&max.to_le_bytes());
    p.push(1); // primary
    p.push(tracker.len() as u8);
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(&25u32.to_le_bytes());
    p.extend_from_slice(&7u64.to_le_bytes());
    p.extend_from_slice(&3u64.to_le_bytes());
    p.extend_from_slice(&9u64.to_le_bytes());
    p.extend_from_slice(&manifest_len.to_le_bytes());
    assert_eq!(p.len(), 40);
    p.extend_from_slice(tracker);
    p.extend_from_slice(manifest);
    p
}

fn err(bytes: &[u8], limits: &Limits) -> WireError {
    wire::decode(bytes, limits).unwrap_err()
}

#[test]
fn round_trip_every_frame_type() {
    let limits = Limits::default();
    let mut seen = std::collections::HashSet::new();
    let mut all = Vec::new();
    for f in samples() {
        let bytes = encode(&f);
        let (decoded, used) = wire::decode(&bytes, &limits).unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(decoded.header.frame_type, f.body.frame_type());
        assert_eq!(decoded.epoch(), f.epoch);
        assert_eq!(decoded.to_owned(), f);
        assert_eq!(wire::decode_owned(&bytes, &limits).unwrap().0, f);
        seen.insert(f.body.frame_type() as u16);
        all.extend_from_slice(&bytes);
    }
    assert_eq!(seen.len(), 7, "all seven frame types covered");
    // Back to back in one buffer.
    let frames: Vec<Frame> = FrameIter::new(&all, &limits)
        .map(|f| f.unwrap().to_owned())
        .collect();
    assert_eq!(frames, samples());
}

#[test]
fn encode_appends_and_header_matches() {
    let mut buf = b"prefix".to_vec();
    let f = &samples()[2];
    let h = f.encode(&mut buf).unwrap();
    assert_eq!(&buf[..6], b"prefix");
    assert_eq!(h.frame_len(), buf.len() - 6);
    assert_eq!(Header::parse(&buf[6..], &Limits::default()).unwrap(), h);
}

#[test]
fn page_batch_writer_matches_owned_encoding() {
    let Body::PageBatch(batch) = &samples()[2].body else {
        unreachable!()
    };
    let mut buf = Vec::new();
    let mut w = PageBatchWriter::begin(&mut buf, 5);
    for p in &batch.pages {
        w.push(p.page_number, p.tag, &p.data).unwrap();
    }
    assert_eq!(w.count(), 3);
    w.finish().unwrap();
    assert_eq!(buf, encode(&samples()[2]));

    // Borrowed iteration sees the same entries without copying.
    let (f, _) = wire::decode(&buf, &Limits::default()).unwrap();
    let BodyRef::PageBatch(b) = f.body else {
        unreachable!()
    };
    assert_eq!(b.len(), 3);
    for (e, p) in b.iter().zip(&batch.pages) {
        assert_eq!(
            (e.page_number, e.tag, e.data),
            (p.page_number, p.tag, &p.data[..])
        );
        // The data is a view into the buffer.
        let start = buf.as_ptr() as usize;
        let at = e.data.as_ptr() as usize;
        assert!(e.data.is_empty() || (at >= start && at < start + buf.len()));
    }

    // Oversized entry is refused and removed; abort removes the frame.
    let mut buf = b"x".to_vec();
    let mut w = PageBatchWriter::begin(&mut buf, 1);
    w.push(1, 0, &[]).unwrap();
    let before = w.frame_len();
    assert!(matches!(
        w.push(2, 1, &vec![0; 70_000]),
        Err(WireError::PayloadTooLarge { .. })
    ));
    assert_eq!(w.frame_len(), before);
    w.abort();
    assert_eq!(buf, b"x");
}

#[test]
fn truncation_at_every_offset_is_incomplete() {
    let limits = Limits::default();
    for f in samples() {
        let bytes = encode(&f);
        for cut in 0..bytes.len() {
            let e = err(&bytes[..cut], &limits);
            let expected = if cut < HEADER_LEN {
                HEADER_LEN - cut
            } else {
                bytes.len() - cut
            };
            assert_eq!(
                e,
                WireError::Incomplete { needed: expected },
                "cut at {cut} of {:?}",
                f.body.frame_type()
            );
        }
    }
}

#[test]
fn bad_magic() {
    let limits = Limits::default();
    let mut b = encode(&samples()[9]);
    b[0] = b'X';
    assert!(matches!(err(&b, &limits), WireError::BadMagic { got } if &got == b"XSTR"));
    // Detected on a partial header too.
    assert_eq!(err(b"CSX", &limits), WireError::BadMagic { got: *b"CSX\0" });
    assert_eq!(err(b"C", &limits), WireError::Incomplete { needed: 31 });
}

#[test]
fn unsupported_version() {
    assert_eq!((MIN_PROTOCOL_VERSION, PROTOCOL_VERSION), (2, 4));
    assert_eq!(PROTOCOL_VERSIONS, VersionRange::new(2, 4));
    for got in [0u16, 1, 5, 0xffff] {
        let mut b = encode(&samples()[9]);
        b[4..6].copy_from_slice(&got.to_le_bytes());
        reseal(&mut b);
        assert_eq!(
            err(&b, &Limits::default()),
            WireError::UnsupportedVersion {
                got,
                min: 2,
                max: 4
            },
            "version {got}"
        );
    }
    // Version 1 is refused whatever its frame type, also an otherwise valid one.
    let b = raw_frame_at(1, FrameType::Ack as u16, 1, &[]);
    assert!(matches!(
        err(&b, &Limits::default()),
        WireError::UnsupportedVersion {
            got: 1,
            min: 2,
            max: 4
        }
    ));
    let msg = err(&b, &Limits::default()).to_string();
    assert!(msg.contains("version 1") && msg.contains("2 to 4"), "{msg}");
    // Every spoken version is accepted.
    for v in [2u16, 3, 4] {
        let b = raw_frame_at(v, FrameType::Ack as u16, 1, &[]);
        let (f, _) = wire::decode(&b, &Limits::default()).unwrap();
        assert_eq!((f.header.version, f.body), (v, BodyRef::Ack));
    }
}

#[test]
fn unknown_frame_type() {
    // 3, 4 and 5 (protocol 1's state frames) are retired.
    for ty in [0u16, 3, 4, 5, 12, 0xffff] {
        let b = raw_frame(ty, 1, &[]);
        assert_eq!(
            err(&b, &Limits::default()),
            WireError::UnknownFrameType { got: ty }
        );
    }
    // DiskBatch (11) exists from protocol 4 on only.
    for v in [2u16, 3] {
        let b = raw_frame_at(v, 11, 1, &[0; 8]);
        assert_eq!(
            err(&b, &Limits::default()),
            WireError::UnknownFrameType { got: 11 }
        );
    }
}

#[test]
fn header_checksum() {
    let limits = Limits::default();
    let good = encode(&samples()[10]);
    for i in 4..HEADER_LEN {
        let mut b = good.clone();
        b[i] ^= 0x10;
        assert!(
            matches!(err(&b, &limits), WireError::HeaderChecksum { .. }),
            "flip at {i}"
        );
    }
}

#[test]
fn payload_checksum() {
    let limits = Limits::default();
    let good = encode(&samples()[2]);
    for i in (HEADER_LEN..good.len()).step_by(97) {
        let mut b = good.clone();
        b[i] ^= 1;
        assert!(
            matches!(err(&b, &limits), WireError::PayloadChecksum { .. }),
            "flip at {i}"
        );
    }
}

#[test]
fn reserved_header_field_must_be_zero() {
    let mut b = encode(&samples()[9]);
    b[24] = 1;
    reseal(&mut b);
    assert!(matches!(
        err(&b, &Limits::default()),
        WireError::Malformed { .. }
    ));
}

#[test]
fn payload_too_large_without_allocating() {
    // A header announcing 4 GiB, followed by nothing: refused from the header alone.
    let mut b = raw_frame(FrameType::Section as u16, 1, &[]);
    b[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    let h = crc32fast::hash(&b[..28]);
    b[28..32].copy_from_slice(&h.to_le_bytes());
    assert_eq!(
        err(&b, &Limits::default()),
        WireError::PayloadTooLarge {
            len: u32::MAX.into(),
            cap: (16 << 20)
        }
    );
    // The async reader refuses before allocating the payload buffer.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut buf = Vec::new();
        let mut r: &[u8] = &b;
        let e = wire::read_frame(&mut r, &mut buf, &Limits::default())
            .await
            .unwrap_err();
        assert!(matches!(
            e,
            ReadFrameError::Wire(WireError::PayloadTooLarge { .. })
        ));
        assert_eq!(buf.capacity(), 0);
    });
    // A small cap applies to otherwise valid frames.
    let limits = Limits {
        max_payload: 100,
        ..Limits::default()
    };
    assert!(matches!(
        err(&encode(&samples()[2]), &limits),
        WireError::PayloadTooLarge { cap: 100, .. }
    ));
}

#[test]
fn page_number_out_of_range() {
    let limits = Limits::for_guest_pages(12345);
    let b = encode(&samples()[2]); // contains page 12345
    assert_eq!(
        err(&b, &limits),
        WireError::PageOutOfRange {
            page: 12345,
            limit: 12345
        }
    );
    assert!(wire::decode(&b, &Limits::for_guest_pages(12346)).is_ok());
}

#[test]
fn too_many_entries() {
    let limits = Limits {
        max_batch_entries: 2,
        ..Limits::default()
    };
    assert!(matches!(
        err(&encode(&samples()[2]), &limits),
        WireError::TooManyEntries {
            count: 3,
            cap: 2,
            ..
        }
    ));
    // A huge declared count with a tiny payload: refused, nothing allocated.
    let mut p = u32::MAX.to_le_bytes().to_vec();
    p.extend_from_slice(&[0; 11]);
    let b = raw_frame(FrameType::PageBatch as u16, 1, &p);
    assert!(matches!(
        err(&b, &Limits::default()),
        WireError::TooManyEntries { .. }
    ));
    // A Hello declaring a 4 GiB manifest in a 40-byte payload: the same.
    let b = raw_frame(
        FrameType::Hello as u16,
        0,
        &hello_payload(2, 3, b"", u32::MAX, &[]),
    );
    assert_eq!(
        err(&b, &Limits::default()),
        WireError::TooManyEntries {
            what: "manifest bytes",
            count: u32::MAX.into(),
            cap: 64 << 10
        }
    );
}

#[test]
fn strings_too_long_and_invalid_utf8() {
    let limits = Limits {
        max_name_len: 5,
        max_message_len: 5,
        ..Limits::default()
    };
    assert!(matches!(
        err(&encode(&samples()[0]), &limits),
        WireError::StringTooLong {
            what: "tracker name",
            len: 13,
            cap: 5
        }
    ));
    assert!(matches!(
        err(&encode(&samples()[11]), &limits),
        WireError::StringTooLong {
            what: "error message",
            ..
        }
    ));
    let b = raw_frame(
        FrameType::Hello as u16,
        0,
        &hello_payload(2, 3, &[0xff, 0xfe], 0, &[]),
    );
    assert_eq!(
        err(&b, &Limits::default()),
        WireError::InvalidUtf8 {
            what: "hello tracker name"
        }
    );
    let b = raw_frame(FrameType::Error as u16, 1, &[1, 0, 1, 0, 0x80]);
    assert_eq!(
        err(&b, &Limits::default()),
        WireError::InvalidUtf8 {
            what: "error message"
        }
    );
    // Encoding refuses strings the format cannot carry and leaves the buffer alone.
    let mut buf = vec![1, 2, 3];
    let Body::Hello(mut hello) = samples()[0].body.clone() else {
        unreachable!()
    };
    hello.tracker = "x".repeat(300);
    let f = Frame::new(0, Body::Hello(hello));
    assert!(matches!(
        f.encode(&mut buf),
        Err(WireError::StringTooLong {
            what: "tracker name",
            ..
        })
    ));
    assert_eq!(buf, vec![1, 2, 3]);
    let f = Frame::new(
        0,
        Body::Error(ErrorFrame {
            code: 1,
            message: "y".repeat(70_000),
        }),
    );
    assert!(matches!(
        f.encode(&mut buf),
        Err(WireError::StringTooLong {
            what: "error message",
            ..
        })
    ));
    assert_eq!(buf, vec![1, 2, 3]);
}

#[test]
fn malformed_payloads() {
    let l = Limits::default();
    let m = |ty: FrameType, p: &[u8]| err(&raw_frame(ty as u16, 1, p), &l);
    let is_malformed = |e: WireError| matches!(e, WireError::Malformed { .. });
    // Batch announcing two entries but holding one.
    let mut p = 2u32.to_le_bytes().to_vec();
    p.extend_from_slice(&5u64.to_le_bytes());
    p.extend_from_slice(&[0, 0, 0]);
    assert!(is_malformed(m(FrameType::PageBatch, &p)));
    // Trailing bytes after the announced entries.
    let mut p2 = 1u32.to_le_bytes().to_vec();
    p2.extend_from_slice(&p[4..]);
    p2.push(0);
    assert!(is_malformed(m(FrameType::PageBatch, &p2)));
    // Entry data longer than the payload.
    let mut p3 = 1u32.to_le_bytes().to_vec();
    p3.extend_from_slice(&5u64.to_le_bytes());
    p3.extend_from_slice(&[1, 0xff, 0xff]);
    assert!(is_malformed(m(FrameType::PageBatch, &p3)));
    assert!(is_malformed(m(FrameType::PageBatch, &[1, 0])));
    assert!(is_malformed(m(FrameType::Ack, &[0])));
    // Heartbeat: 24 bytes in version 3 (16 in version 2, see below).
    for n in [0, 15, 16, 17, 23, 25] {
        assert!(is_malformed(m(FrameType::Heartbeat, &vec![0; n])), "{n}");
    }
    for n in [15, 17, 24] {
        let b = raw_frame_at(2, FrameType::Heartbeat as u16, 1, &vec![0; n]);
        assert!(is_malformed(err(&b, &l)), "version 2, {n} bytes");
    }
    // Section: shorter than its 8-byte prefix.
    for n in 0..8 {
        let mut p = vec![0u8; n];
        if n > 0 {
            p[0] = PartKind::Vcpu as u8;
        }
        assert!(is_malformed(m(FrameType::Section, &p)), "{n}");
    }
    assert!(is_malformed(m(FrameType::Error, &[1, 0, 9, 0, b'a'])));
    // Hello shorter than its 40-byte fixed prefix, at every length.
    let full = hello_payload(2, 3, b"", 0, &[]);
    for n in 0..full.len() {
        assert!(is_malformed(m(FrameType::Hello, &full[..n])), "{n}");
    }
    assert!(wire::decode(&raw_frame(FrameType::Hello as u16, 0, &full), &l).is_ok());
    // Hello's reserved field must be zero.
    let mut h = full.clone();
    h[6] = 1;
    assert!(is_malformed(m(FrameType::Hello, &h)));
    // Hello: tracker name longer than the payload.
    let mut h = full.clone();
    h[5] = 10;
    assert!(is_malformed(m(FrameType::Hello, &h)));
    // EpochEnd: unknown flags, missing digest, trailing bytes.
    let mut e = vec![0u8; 24];
    e[12] = 2;
    assert!(is_malformed(m(FrameType::EpochEnd, &e)));
    e[12] = 1;
    assert!(is_malformed(m(FrameType::EpochEnd, &e)));
    e[12] = 0;
    e.push(0);
    assert!(is_malformed(m(FrameType::EpochEnd, &e)));
    // Hello with a manifest one byte longer / shorter than declared.
    for delta in [1i64, -1] {
        let mut h = encode(&samples()[0]);
        if delta > 0 {
            h.push(0);
        } else {
            h.pop();
        }
        let len = (h.len() - HEADER_LEN) as u32;
        h[16..20].copy_from_slice(&len.to_le_bytes());
        reseal(&mut h);
        assert_eq!(
            err(&h, &l),
            WireError::Malformed {
                what: "hello manifest length"
            },
            "{delta}"
        );
    }
    // Unknown role (0 and 3).
    for role in [0u8, 3] {
        let mut h = encode(&samples()[0]);
        h[HEADER_LEN + 4] = role;
        reseal(&mut h);
        assert_eq!(err(&h, &l), WireError::UnknownRole { got: role });
    }
}

#[test]
fn decode_payload_checks_length() {
    let b = encode(&samples()[10]);
    let h = Header::parse(&b, &Limits::default()).unwrap();
    assert!(matches!(
        wire::decode_payload(&h, &b[HEADER_LEN..b.len() - 1], &Limits::default()),
        Err(WireError::Malformed { .. })
    ));
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xC057_0001);
    let limits = Limits {
        max_page_count: 1 << 20,
        ..Limits::default()
    };
    let mut valid: Vec<Vec<u8>> = samples().iter().map(encode).collect();
    // The same frames in protocol version 2.
    for f in samples() {
        let mut b = Vec::new();
        f.encode_at(MIN_PROTOCOL_VERSION, &mut b).unwrap();
        valid.push(b);
    }
    let mut outcomes = std::collections::HashMap::<String, u32>::new();
    for i in 0..30_000 {
        let bytes: Vec<u8> = match i % 3 {
            // Pure noise, sometimes starting with a valid magic.
            0 => {
                let n = rng.gen_range(0..300);
                let mut b = vec![0u8; n];
                rng.fill_bytes(&mut b);
                if n >= 4 && rng.gen_bool(0.5) {
                    b[..4].copy_from_slice(b"CSTR");
                }
                b
            }
            // Mutated valid frames, resealed so the payload parser is reached.
            _ => {
                let mut b = valid[rng.gen_range(0..valid.len())].clone();
                for _ in 0..rng.gen_range(1..6) {
                    let at = rng.gen_range(HEADER_LEN..b.len().max(HEADER_LEN + 1));
                    match rng.gen_range(0..3) {
                        0 if at < b.len() => b[at] = rng.gen(),
                        1 if at < b.len() => {
                            b.truncate(at);
                        }
                        _ => b.push(rng.gen()),
                    }
                }
                if b.len() >= HEADER_LEN {
                    let len = (b.len() - HEADER_LEN) as u32;
                    b[16..20].copy_from_slice(&len.to_le_bytes());
                    if i % 3 == 1 {
                        reseal(&mut b);
                    }
                }
                b
            }
        };
        let r = wire::decode(&bytes, &limits);
        if let Ok((f, used)) = &r {
            assert!(*used <= bytes.len());
            // Iterating and copying must not panic either.
            let _ = f.to_owned();
            if let BodyRef::PageBatch(b) = &f.body {
                assert_eq!(b.iter().count() as u32, b.len());
            }
        }
        let key = match r {
            Ok((f, _)) => format!("ok {:?}", f.header.frame_type),
            Err(e) => format!("{e:?}")
                .split([' ', '{', '('])
                .next()
                .unwrap_or("")
                .to_owned(),
        };
        *outcomes.entry(key).or_default() += 1;
    }
    // The mutations reach deep into the payload parser.
    assert!(outcomes.contains_key("Malformed"), "{outcomes:?}");
    assert!(
        outcomes.keys().any(|k| k.starts_with("ok ")),
        "{outcomes:?}"
    );
}

#[test]
fn epoch_tally_is_order_independent() {
    let frames: Vec<Frame> = samples().into_iter().filter(|f| f.epoch == 5).collect();
    let mut sent = EpochTally::new(5);
    let mut encoded = Vec::new();
    for f in &frames {
        let mut b = Vec::new();
        let h = f.encode(&mut b).unwrap();
        let pages = match &f.body {
            Body::PageBatch(p) => p.pages.len() as u64,
            _ => 0,
        };
        sent.add(&h, pages);
        encoded.push(b);
    }
    // EpochEnd/Ack are not data frames; page batches and sections are.
    assert_eq!(sent.data_frames, 5);
    assert_eq!(sent.pages, 3);
    let end = sent.epoch_end(None);

    let limits = Limits::default();
    let mut recv = EpochTally::new(5);
    for b in encoded.iter().rev() {
        assert!(matches!(recv.check(&end), EpochCheck::Pending { .. }));
        recv.add_frame(&wire::decode(b, &limits).unwrap().0);
    }
    assert_eq!(recv.check(&end), EpochCheck::Complete);
    // A duplicate is detected.
    recv.add_frame(&wire::decode(&encoded[0], &limits).unwrap().0);
    assert_eq!(recv.check(&end), EpochCheck::Mismatch);
    // A substituted frame with the same count is detected.
    let mut other = EpochTally::new(5);
    for b in &encoded[1..] {
        other.add_frame(&wire::decode(b, &limits).unwrap().0);
    }
    other.add_frame(&wire::decode(&encoded[1], &limits).unwrap().0);
    assert_eq!(other.check(&end), EpochCheck::Mismatch);
}

#[test]
fn section_round_trip_owned_and_borrowed() {
    let l = Limits::default();
    let sections = &samples()[4..7];
    for f in sections {
        let Body::Section(sec) = &f.body else {
            unreachable!()
        };
        let b = encode(f);
        // kind u16, instance u32, version u16, then the data.
        assert_eq!(b.len(), HEADER_LEN + 8 + sec.data.len());
        let (d, used) = wire::decode(&b, &l).unwrap();
        assert_eq!(used, b.len());
        assert_eq!(d.header.frame_type, FrameType::Section);
        assert!(FrameType::Section.is_epoch_data());
        assert_eq!(d.epoch(), f.epoch);
        let BodyRef::Section(r) = d.body else {
            panic!("{:?}", d.body)
        };
        assert_eq!(
            r,
            SectionRef {
                part: sec.part,
                version: sec.version,
                data: &sec.data,
            }
        );
        // The data is a view into the buffer, not a copy.
        assert_eq!(r.data.as_ptr(), b[HEADER_LEN + 8..].as_ptr());
        assert_eq!(d.to_owned(), *f);
        assert_eq!(wire::decode_owned(&b, &l).unwrap().0, *f);
    }
    // The payload layout, little-endian.
    let b = encode(&samples()[5]);
    assert_eq!(
        b[HEADER_LEN..HEADER_LEN + 8],
        [2, 0, 0xef, 0xbe, 0xad, 0xde, 0xfe, 0xff]
    );
    // A large section.
    let big = Frame::new(
        9,
        Body::Section(Section {
            part: PartId::new(PartKind::KvmVm, 0),
            version: 3,
            data: (0..1_000_000u32).map(|i| i as u8).collect(),
        }),
    );
    assert_eq!(wire::decode_owned(&encode(&big), &l).unwrap().0, big);
}

#[test]
fn section_unknown_part_kind_refused() {
    let l = Limits::default();
    for kind in [0u16, 6, 0x100, 0xffff] {
        let mut p = kind.to_le_bytes().to_vec();
        p.extend_from_slice(&[1, 0, 0, 0, 1, 0]);
        p.extend_from_slice(b"state");
        assert_eq!(
            err(&raw_frame(FrameType::Section as u16, 5, &p), &l),
            WireError::Malformed {
                what: "unknown part kind"
            },
            "kind {kind}"
        );
    }
    // Every known kind is accepted.
    for kind in 1..=5u16 {
        let mut p = kind.to_le_bytes().to_vec();
        p.extend_from_slice(&[1, 0, 0, 0, 1, 0]);
        let b = raw_frame(FrameType::Section as u16, 5, &p);
        let (f, _) = wire::decode(&b, &l).unwrap();
        let BodyRef::Section(r) = f.body else {
            panic!("{:?}", f.body)
        };
        assert_eq!(r.part.kind.as_u16(), kind);
        assert_eq!(PartKind::from_u16(kind), Some(r.part.kind));
        assert_eq!((r.part.instance, r.version, r.data), (1, 1, &[][..]));
    }
}

#[test]
fn section_writer_matches_owned_encoding() {
    let l = Limits::default();
    for f in &samples()[4..7] {
        let Body::Section(sec) = &f.body else {
            unreachable!()
        };
        let mut buf = b"prefix".to_vec();
        let mut w = SectionWriter::begin(&mut buf, f.epoch, sec.part, sec.version);
        // Written in pieces, straight into the buffer.
        let (a, z) = sec.data.split_at(sec.data.len() / 2);
        w.data().extend_from_slice(a);
        w.data().extend_from_slice(z);
        let h = w.finish().unwrap();
        assert_eq!(&buf[..6], b"prefix");
        assert_eq!(buf[6..], encode(f)[..]);
        assert_eq!(h.frame_len(), buf.len() - 6);
        assert_eq!(Header::parse(&buf[6..], &l).unwrap(), h);
        assert_eq!(h.version, PROTOCOL_VERSION);
    }
    // Back to back in one buffer, as an epoch is sent.
    let mut buf = Vec::new();
    let mut expected = Vec::new();
    for f in &samples()[4..7] {
        let Body::Section(sec) = &f.body else {
            unreachable!()
        };
        let mut w = SectionWriter::begin(&mut buf, f.epoch, sec.part, sec.version);
        w.data().extend_from_slice(&sec.data);
        w.finish().unwrap();
        f.encode(&mut expected).unwrap();
    }
    assert_eq!(buf, expected);
    let frames: Vec<Frame> = FrameIter::new(&buf, &l)
        .map(|f| f.unwrap().to_owned())
        .collect();
    assert_eq!(frames, samples()[4..7]);
    // Abort removes the frame.
    let mut buf = b"x".to_vec();
    let mut w = SectionWriter::begin(&mut buf, 1, PartId::new(PartKind::KvmVm, 0), 1);
    w.data().extend_from_slice(&[1; 100]);
    w.abort();
    assert_eq!(buf, b"x");
}

#[test]
fn hello_manifest_round_trip_and_limits() {
    let l = Limits::default();
    let f = &samples()[0];
    let Body::Hello(hello) = &f.body else {
        unreachable!()
    };
    let b = encode(f);
    // The 40-byte fixed prefix, the tracker name, the manifest.
    assert_eq!(b.len(), HEADER_LEN + 40 + 13 + 700);
    assert_eq!(&b[b.len() - 700..], &hello.manifest[..]);
    let (d, _) = wire::decode(&b, &l).unwrap();
    let BodyRef::Hello(h) = &d.body else {
        panic!("{:?}", d.body)
    };
    assert_eq!(h, hello);
    assert_eq!(h.versions, VersionRange::new(2, 4));
    // Hello's layout is the same in version 2 (so peers can negotiate).
    let mut b2 = Vec::new();
    f.encode_at(2, &mut b2).unwrap();
    assert_eq!(b2[HEADER_LEN..], b[HEADER_LEN..]);
    let (d2, _) = wire::decode(&b2, &l).unwrap();
    assert_eq!((d2.header.version, d2.to_owned()), (2, f.clone()));

    // A manifest of exactly 64 KiB is accepted, one byte more is refused.
    let with_manifest = |n: usize| {
        Frame::new(
            0,
            Body::Hello(Hello {
                manifest: vec![0xa5; n],
                ..hello.clone()
            }),
        )
    };
    let max = with_manifest(64 << 10);
    assert_eq!(wire::decode_owned(&encode(&max), &l).unwrap().0, max);
    assert_eq!(
        err(&encode(&with_manifest((64 << 10) + 1)), &l),
        WireError::TooManyEntries {
            what: "manifest bytes",
            count: (64 << 10) + 1,
            cap: 64 << 10
        }
    );

    // The declared manifest length must match the bytes present.
    let hello_frame = |p: Vec<u8>| -> Vec<u8> { raw_frame(FrameType::Hello as u16, 0, &p) };
    assert!(wire::decode(
        &hello_frame(hello_payload(2, 3, b"bitmap", 4, &[1, 2, 3, 4])),
        &l
    )
    .is_ok());
    for declared in [0u32, 3, 5, 1000] {
        assert_eq!(
            err(
                &hello_frame(hello_payload(2, 3, b"bitmap", declared, &[1, 2, 3, 4])),
                &l
            ),
            WireError::Malformed {
                what: "hello manifest length"
            },
            "declared {declared}"
        );
    }

    // An empty version range (min > max) is refused; a single version is fine.
    for (min, max) in [(3u16, 2u16), (0xffff, 0), (4, 3)] {
        assert_eq!(
            err(&hello_frame(hello_payload(min, max, b"", 0, &[])), &l),
            WireError::Malformed {
                what: "hello version range is empty"
            },
            "{min}..={max}"
        );
    }
    let empty = Frame::new(
        0,
        Body::Hello(Hello {
            versions: VersionRange::new(3, 2),
            ..hello.clone()
        }),
    );
    assert!(matches!(
        err(&encode(&empty), &l),
        WireError::Malformed {
            what: "hello version range is empty"
        }
    ));
    let b = hello_frame(hello_payload(3, 3, b"", 0, &[]));
    let (d, _) = wire::decode(&b, &l).unwrap();
    let BodyRef::Hello(h) = d.body else {
        panic!("{:?}", d.body)
    };
    assert_eq!(h.versions, VersionRange::only(3));
    assert_eq!((h.generation, h.session_id, h.resume_from_epoch), (9, 7, 3));
}

#[test]
fn restamp_to_version_2_keeps_bodies_and_digests() {
    let l = Limits::default();
    // Heartbeat's layout differs by version; everything else is re-stamped.
    let frames: Vec<Frame> = samples()
        .into_iter()
        .filter(|f| !matches!(f.body, Body::Heartbeat(_)))
        .collect();
    let mut buf = Vec::new();
    let mut w = PageBatchWriter::begin(&mut buf, 5);
    w.push(99, 0, &[]).unwrap();
    w.finish().unwrap();
    let mut frames_all = wire::decode_owned(&buf, &l).map(|(f, _)| vec![f]).unwrap();
    for f in &frames {
        f.encode(&mut buf).unwrap();
    }
    frames_all.extend(frames.iter().cloned());
    let original = buf.clone();
    let tally = |bytes: &[u8]| {
        let mut t = EpochTally::new(5);
        let mut digests = Vec::new();
        for f in FrameIter::new(bytes, &l) {
            let f = f.unwrap();
            t.add_frame(&f);
            digests.push(wire::frame_digest(&f.header));
        }
        (t, digests)
    };
    let before = tally(&buf);
    assert_eq!(before.0.data_frames, 6);

    wire::restamp(&mut buf, 2);
    assert_eq!(buf.len(), original.len());
    let decoded: Vec<_> = FrameIter::new(&buf, &l).map(|f| f.unwrap()).collect();
    assert_eq!(decoded.len(), frames_all.len());
    for (d, f) in decoded.iter().zip(&frames_all) {
        assert_eq!(d.header.version, 2);
        assert_eq!(d.to_owned(), *f);
    }
    // Only the headers changed: payloads, counts and digests are the same.
    let after = tally(&buf);
    assert_eq!(after, before);
    assert_eq!(
        after.0.check(&before.0.epoch_end(None)),
        EpochCheck::Complete
    );
    // Identical to encoding in version 2 directly.
    let mut at2 = Vec::new();
    for f in &frames_all {
        f.encode_at(2, &mut at2).unwrap();
    }
    assert_eq!(buf, at2);
    // And back.
    wire::restamp(&mut buf, PROTOCOL_VERSION);
    assert_eq!(buf, original);
    // Re-stamped to a version nobody speaks, the frames are refused.
    wire::restamp(&mut buf, 1);
    assert!(matches!(
        err(&buf, &l),
        WireError::UnsupportedVersion { got: 1, .. }
    ));
    // An empty buffer is left alone.
    let mut empty: [u8; 0] = [];
    wire::restamp(&mut empty, 2);
}

#[test]
fn heartbeat_generation_is_version_3_only() {
    let l = Limits::default();
    let hb = Heartbeat {
        sent_at_nanos: 11,
        last_committed_epoch: 10,
        generation: 77,
    };
    let f = Frame::new(12, Body::Heartbeat(hb));
    // Version 2: 16 payload bytes, read back with generation 0.
    let mut b2 = Vec::new();
    let h2 = f.encode_at(2, &mut b2).unwrap();
    assert_eq!((h2.version, h2.payload_len), (2, 16));
    assert_eq!(b2.len(), HEADER_LEN + 16);
    let (d, used) = wire::decode(&b2, &l).unwrap();
    assert_eq!(used, b2.len());
    assert_eq!(d.header, h2);
    assert_eq!(
        d.body,
        BodyRef::Heartbeat(Heartbeat {
            generation: 0,
            ..hb
        })
    );
    // Version 3: 24 bytes, the generation round-trips.
    let mut b3 = Vec::new();
    let h3 = f.encode_at(3, &mut b3).unwrap();
    assert_eq!((h3.version, h3.payload_len), (3, 24));
    let (d, _) = wire::decode(&b3, &l).unwrap();
    assert_eq!(d.body, BodyRef::Heartbeat(hb));
    assert_eq!(d.to_owned(), f);
    // `encode` writes the newest version (4: the heartbeat of version 3).
    assert_eq!(encode(&f)[HEADER_LEN..], b3[HEADER_LEN..]);
    // Version 2's payload is version 3's without the generation.
    assert_eq!(b2[HEADER_LEN..], b3[HEADER_LEN..HEADER_LEN + 16]);
    // No other frame's payload depends on the version.
    for f in samples() {
        let mut a = Vec::new();
        let ha = f.encode_at(2, &mut a).unwrap();
        let b = encode(&f);
        let (d, _) = wire::decode(&a, &l).unwrap();
        assert_eq!(d.header, ha);
        if let Body::Heartbeat(h) = f.body {
            assert_eq!(d.body, BodyRef::Heartbeat(Heartbeat { generation: 0, ..h }));
        } else {
            assert_eq!(a[HEADER_LEN..], b[HEADER_LEN..]);
            assert_eq!(d.to_owned(), f);
        }
    }
}

#[tokio::test]
async fn async_reader_streams_frames() {
    let limits = Limits::default();
    let mut all = Vec::new();
    for f in samples() {
        f.encode(&mut all).unwrap();
    }
    let (mut w, mut r) = tokio::io::duplex(64);
    let data = all.clone();
    let writer = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        // Dribble the bytes in odd-sized pieces.
        for chunk in data.chunks(37) {
            w.write_all(chunk).await.unwrap();
        }
    });
    let mut buf = Vec::new();
    let mut got = Vec::new();
    while let Some(f) = wire::read_frame(&mut r, &mut buf, &limits).await.unwrap() {
        got.push(f.to_owned());
    }
    writer.await.unwrap();
    assert_eq!(got, samples());

    // Truncated stream.
    let mut short: &[u8] = &all[..all.len() - 1];
    let mut n = 0;
    let e = loop {
        match wire::read_frame(&mut short, &mut buf, &limits).await {
            Ok(Some(_)) => n += 1,
            Ok(None) => panic!("clean EOF on a truncated stream"),
            Err(e) => break e,
        }
    };
    assert_eq!(n, samples().len() - 1);
    assert!(matches!(e, ReadFrameError::UnexpectedEof { .. }));
    // Truncated header, and garbage.
    let mut r: &[u8] = b"CSTR\x01";
    assert!(matches!(
        wire::read_frame(&mut r, &mut buf, &limits).await,
        Err(ReadFrameError::UnexpectedEof {
            got: 5,
            expected: 32
        })
    ));
    let mut r: &[u8] = b"GET / HTTP/1.1\r\n";
    assert!(matches!(
        wire::read_frame(&mut r, &mut buf, &limits).await,
        Err(ReadFrameError::Wire(WireError::BadMagic { .. }))
    ));
}
