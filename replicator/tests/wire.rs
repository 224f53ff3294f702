//! Wire protocol tests: round trips, every error variant, truncation,
//! random inputs.

use castor_replicator::wire::{
    self, Body, BodyRef, DeviceState, EpochCheck, EpochEnd, EpochTally, ErrorFrame, Frame,
    FrameIter, FrameType, Header, Heartbeat, HeldOutput, Hello, Limits, MemoryRegion, OutputItem,
    PageBatch, PageBatchWriter, PageEntry, ReadFrameError, Role, VcpuState, WireError, HEADER_LEN,
    PROTOCOL_VERSION,
};
use rand::{Rng, RngCore, SeedableRng};

fn samples() -> Vec<Frame> {
    vec![
        Frame::new(
            0,
            Body::Hello(Hello {
                protocol_version: PROTOCOL_VERSION,
                role: Role::Primary,
                vcpus: 4,
                memory_regions: vec![
                    MemoryRegion {
                        guest_addr: 0,
                        size: 0xc000_0000,
                    },
                    MemoryRegion {
                        guest_addr: 0x1_0000_0000,
                        size: 0x4000_0000,
                    },
                ],
                tracker: "kvm-dirty-log".into(),
                epoch_interval_ms: 25,
                session_id: 0xdead_beef_1234,
                resume_from_epoch: 17,
            }),
        ),
        Frame::new(
            0,
            Body::Hello(Hello {
                protocol_version: PROTOCOL_VERSION,
                role: Role::Backup,
                vcpus: 1,
                memory_regions: vec![],
                tracker: String::new(),
                epoch_interval_ms: 0,
                session_id: 0,
                resume_from_epoch: 0,
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
            Body::VcpuState(VcpuState {
                vcpu_index: 3,
                data: (0..200u8).collect(),
            }),
        ),
        Frame::new(
            5,
            Body::DeviceState(DeviceState {
                device_id: "serial0".into(),
                data: vec![9; 33],
            }),
        ),
        Frame::new(
            5,
            Body::HeldOutput(HeldOutput {
                items: vec![
                    OutputItem {
                        seq: 1,
                        data: b"hello\n".to_vec(),
                    },
                    OutputItem {
                        seq: 2,
                        data: vec![],
                    },
                ],
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
    let mut b = vec![0u8; HEADER_LEN];
    b[0..4].copy_from_slice(b"CSTR");
    b[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    b[6..8].copy_from_slice(&ty.to_le_bytes());
    b[8..16].copy_from_slice(&epoch.to_le_bytes());
    b[16..20].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    b.extend_from_slice(payload);
    reseal(&mut b);
    b
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
    assert_eq!(seen.len(), 9, "all nine frame types covered");
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
    let mut b = encode(&samples()[9]);
    b[4..6].copy_from_slice(&2u16.to_le_bytes());
    reseal(&mut b);
    assert_eq!(
        err(&b, &Limits::default()),
        WireError::UnsupportedVersion {
            got: 2,
            supported: PROTOCOL_VERSION
        }
    );
}

#[test]
fn unknown_frame_type() {
    for ty in [0u16, 10, 0xffff] {
        let b = raw_frame(ty, 1, &[]);
        assert_eq!(
            err(&b, &Limits::default()),
            WireError::UnknownFrameType { got: ty }
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
    let mut b = raw_frame(FrameType::VcpuState as u16, 1, &[]);
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
        max_regions: 1,
        max_output_items: 1,
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
    assert!(matches!(
        err(&encode(&samples()[0]), &limits),
        WireError::TooManyEntries {
            count: 2,
            cap: 1,
            ..
        }
    ));
    assert!(matches!(
        err(&encode(&samples()[6]), &limits),
        WireError::TooManyEntries {
            count: 2,
            cap: 1,
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
    let b = raw_frame(FrameType::HeldOutput as u16, 1, &p);
    assert!(matches!(
        err(&b, &Limits::default()),
        WireError::TooManyEntries { .. }
    ));
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
        err(&encode(&samples()[5]), &limits),
        WireError::StringTooLong {
            what: "device id",
            ..
        }
    ));
    assert!(matches!(
        err(&encode(&samples()[11]), &limits),
        WireError::StringTooLong {
            what: "error message",
            ..
        }
    ));
    let b = raw_frame(FrameType::DeviceState as u16, 1, &[2, 0xff, 0xfe, 1, 2]);
    assert_eq!(
        err(&b, &Limits::default()),
        WireError::InvalidUtf8 { what: "device id" }
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
    let f = Frame::new(
        0,
        Body::DeviceState(DeviceState {
            device_id: "x".repeat(300),
            data: vec![],
        }),
    );
    assert!(matches!(
        f.encode(&mut buf),
        Err(WireError::StringTooLong { .. })
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
    assert!(is_malformed(m(FrameType::Heartbeat, &[0; 15])));
    assert!(is_malformed(m(FrameType::Heartbeat, &[0; 17])));
    assert!(is_malformed(m(FrameType::VcpuState, &[0; 3])));
    assert!(is_malformed(m(FrameType::DeviceState, &[])));
    assert!(is_malformed(m(FrameType::DeviceState, &[4, b'a'])));
    assert!(is_malformed(m(FrameType::HeldOutput, &[1, 0, 0, 0, 0])));
    assert!(is_malformed(m(FrameType::Error, &[1, 0, 9, 0, b'a'])));
    let mut short_hello = [0u8; 31];
    short_hello[2] = 1;
    assert!(is_malformed(m(FrameType::Hello, &short_hello)));
    // EpochEnd: unknown flags, missing digest, trailing bytes.
    let mut e = vec![0u8; 24];
    e[12] = 2;
    assert!(is_malformed(m(FrameType::EpochEnd, &e)));
    e[12] = 1;
    assert!(is_malformed(m(FrameType::EpochEnd, &e)));
    e[12] = 0;
    e.push(0);
    assert!(is_malformed(m(FrameType::EpochEnd, &e)));
    // Hello with a region list of the wrong length.
    let mut h = encode(&samples()[0]);
    h.push(0);
    let len = (h.len() - HEADER_LEN) as u32;
    h[16..20].copy_from_slice(&len.to_le_bytes());
    reseal(&mut h);
    assert!(is_malformed(err(&h, &l)));
    // Unknown role.
    let mut h = encode(&samples()[0]);
    h[HEADER_LEN + 2] = 3;
    reseal(&mut h);
    assert_eq!(err(&h, &l), WireError::UnknownRole { got: 3 });
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
    let valid: Vec<Vec<u8>> = samples().iter().map(encode).collect();
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
    // EpochEnd/Ack are not data frames.
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
