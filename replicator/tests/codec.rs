//! Page codec tests.

use castor_replicator::codec::{
    decode_page, decode_page_slice, decode_page_to, is_zero_page, CodecError, Page, PageEncoder,
    PageTag, SentCache, PAGE_SIZE,
};
use rand::{Rng, RngCore, SeedableRng};

fn rng() -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(0xC0DEC)
}

fn random_page(rng: &mut impl RngCore) -> Box<Page> {
    let mut p = Box::new([0u8; PAGE_SIZE]);
    rng.fill_bytes(&mut p[..]);
    p
}

fn text_page() -> Box<Page> {
    let mut p = Box::new([0u8; PAGE_SIZE]);
    for (i, b) in p.iter_mut().enumerate() {
        *b = b"the quick brown fox "[i % 20];
    }
    p
}

fn enc(e: &mut PageEncoder, n: u64, page: &Page) -> (PageTag, Vec<u8>) {
    let mut out = Vec::new();
    let t = e.encode_page(n, page, &mut out);
    (t, out)
}

#[test]
fn zero_detection() {
    let mut p = [0u8; PAGE_SIZE];
    assert!(is_zero_page(&p));
    for at in [0, 1, 255, 256, 2048, 4095] {
        p[at] = 1;
        assert!(!is_zero_page(&p), "byte {at}");
        p[at] = 0;
    }
}

#[test]
fn round_trip_each_encoding() {
    let mut r = rng();
    let mut e = PageEncoder::with_cache_bytes(16 * PAGE_SIZE);
    let mut replica = random_page(&mut r); // garbage before the first send

    // Zero: no data, and the replica becomes zero.
    let zero = [0u8; PAGE_SIZE];
    let (t, d) = enc(&mut e, 1, &zero);
    assert_eq!((t, d.len()), (PageTag::Zero, 0));
    decode_page(t as u8, &d, &mut replica).unwrap();
    assert!(is_zero_page(&replica));

    // Incompressible, uncached: raw.
    let page = random_page(&mut r);
    let (t, d) = enc(&mut e, 1, &page);
    assert_eq!((t, d.len()), (PageTag::Raw, PAGE_SIZE));
    decode_page(t as u8, &d, &mut replica).unwrap();
    assert_eq!(replica, page);

    // Small change: XOR + LZ4 against the cached copy.
    let mut page2 = page.clone();
    page2[10..74].copy_from_slice(&[0x77; 64]);
    let (t, d) = enc(&mut e, 1, &page2);
    assert_eq!(t, PageTag::XorLz4);
    assert!(d.len() < 128, "{} bytes", d.len());
    decode_page(t as u8, &d, &mut replica).unwrap();
    assert_eq!(replica, page2);

    // Unchanged.
    let (t, d) = enc(&mut e, 1, &page2);
    assert_eq!((t, d.len()), (PageTag::Unchanged, 0));
    decode_page(t as u8, &d, &mut replica).unwrap();
    assert_eq!(replica, page2);

    // Zero again with a cached base; then a compressible uncached page.
    let (t, _) = enc(&mut e, 1, &zero);
    assert_eq!(t, PageTag::Zero);
    assert!(!e.cache().contains(1));
    let text = text_page();
    let (t, d) = enc(&mut e, 1, &text);
    assert_eq!(t, PageTag::Lz4);
    assert!(d.len() < 200);
    decode_page(t as u8, &d, &mut replica).unwrap();
    assert_eq!(replica, text);

    // Completely rewritten cached page: XOR does not compress, so raw.
    let page3 = random_page(&mut r);
    let (t, d) = enc(&mut e, 1, &page3);
    assert_eq!(t, PageTag::Raw);
    decode_page(t as u8, &d, &mut replica).unwrap();
    assert_eq!(replica, page3);

    let s = e.stats();
    assert_eq!(s.pages(), 7);
    assert_eq!(s.pages_by_tag[PageTag::Zero as usize], 2);
}

#[test]
fn decode_page_to_leaves_base_alone() {
    let mut r = rng();
    let mut e = PageEncoder::with_cache_bytes(PAGE_SIZE);
    let base = random_page(&mut r);
    enc(&mut e, 3, &base);
    let mut next = base.clone();
    next[4000] ^= 0xff;
    let (t, d) = enc(&mut e, 3, &next);
    assert_eq!(t, PageTag::XorLz4);
    let mut out = [0u8; PAGE_SIZE];
    decode_page_to(t as u8, &d, &base, &mut out).unwrap();
    assert_eq!(&out, &*next);
    decode_page_to(PageTag::Unchanged as u8, &[], &base, &mut out).unwrap();
    assert_eq!(&out, &*base);
    decode_page_to(PageTag::Zero as u8, &[], &base, &mut out).unwrap();
    assert!(is_zero_page(&out));
}

#[test]
fn clock_eviction() {
    let p = [1u8; PAGE_SIZE];
    let mut c = SentCache::with_capacity_pages(2);
    c.insert(1, &p);
    c.insert(2, &p);
    assert_eq!(c.len(), 2);
    assert!(c.get(1).is_some()); // 1 gets a second chance
    c.insert(3, &p);
    assert_eq!(c.len(), 2);
    assert!(c.contains(1) && c.contains(3) && !c.contains(2));
    // Re-inserting an existing page does not evict.
    c.insert(3, &[2u8; PAGE_SIZE]);
    assert_eq!(c.len(), 2);
    assert_eq!(c.get(3).unwrap()[0], 2);
    c.remove(1);
    assert_eq!(c.len(), 1);
    c.insert(4, &p);
    assert!(c.contains(3) && c.contains(4));
    c.clear();
    assert!(c.is_empty());
    c.insert(5, &p);
    assert_eq!(c.len(), 1);

    // Byte capacity rounds down; zero capacity caches nothing.
    assert_eq!(
        SentCache::with_capacity_bytes(3 * PAGE_SIZE + 5).capacity_pages(),
        3
    );
    let mut none = SentCache::with_capacity_pages(0);
    none.insert(1, &p);
    assert!(none.is_empty());
}

#[test]
fn encoder_falls_back_when_evicted_or_invalidated() {
    let mut r = rng();
    let mut e = PageEncoder::with_cache_bytes(2 * PAGE_SIZE);
    e.set_compress_uncached(false);
    let pages: Vec<_> = (0..3).map(|_| random_page(&mut r)).collect();
    for (n, p) in pages.iter().enumerate() {
        assert_eq!(enc(&mut e, n as u64, p).0, PageTag::Raw);
    }
    assert_eq!(e.cache().len(), 2);
    let evicted = (0..3u64).find(|n| !e.cache().contains(*n)).unwrap();
    let mut changed = pages[evicted as usize].clone();
    changed[0] ^= 1;
    assert_eq!(enc(&mut e, evicted, &changed).0, PageTag::Raw);

    let cached = (0..3u64).find(|n| e.cache().contains(*n)).unwrap();
    e.invalidate_all();
    assert!(e.cache().is_empty());
    assert_eq!(enc(&mut e, cached, &pages[cached as usize]).0, PageTag::Raw);
    e.invalidate(cached);
    assert!(!e.cache().contains(cached));
}

#[test]
fn replica_tracks_primary_over_many_epochs() {
    // 64 pages, a cache of 16: XOR, raw, zero, unchanged and eviction all mix.
    let mut r = rng();
    let n = 64usize;
    let mut primary: Vec<Box<Page>> = (0..n).map(|_| Box::new([0u8; PAGE_SIZE])).collect();
    let mut replica: Vec<Box<Page>> = (0..n).map(|_| Box::new([0u8; PAGE_SIZE])).collect();
    let mut e = PageEncoder::with_cache_bytes(16 * PAGE_SIZE);
    for epoch in 0..200 {
        let mut dirty = Vec::new();
        for _ in 0..r.gen_range(1..20) {
            let p = r.gen_range(0..n);
            match r.gen_range(0..10) {
                0 => primary[p].fill(0),
                1 => r.fill_bytes(&mut primary[p][..]),
                _ => {
                    let at = r.gen_range(0..PAGE_SIZE - 64);
                    let len = r.gen_range(1..64);
                    r.fill_bytes(&mut primary[p][at..at + len]);
                }
            }
            dirty.push(p);
        }
        if epoch % 50 == 49 {
            e.invalidate_all(); // e.g. reconnection
        }
        for &p in &dirty {
            let mut out = Vec::new();
            let t = e.encode_page(p as u64, &primary[p], &mut out);
            decode_page(t as u8, &out, &mut replica[p]).unwrap();
        }
        for p in 0..n {
            assert_eq!(primary[p], replica[p], "epoch {epoch} page {p}");
        }
    }
    let s = e.stats();
    for tag in [
        PageTag::Zero,
        PageTag::Raw,
        PageTag::XorLz4,
        PageTag::Unchanged,
    ] {
        assert!(
            s.pages_by_tag[tag as usize] > 0,
            "{tag:?} never used: {s:?}"
        );
    }
}

fn assert_untouched(tag: u8, data: &[u8], expect: impl Fn(&CodecError) -> bool) {
    let mut r = rng();
    let orig = random_page(&mut r);
    let mut base = orig.clone();
    let e = decode_page(tag, data, &mut base).unwrap_err();
    assert!(expect(&e), "unexpected error {e:?}");
    assert_eq!(base, orig, "base modified on error {e:?}");
    let mut out = orig.clone();
    let e2 = decode_page_to(tag, data, &random_page(&mut r), &mut out).unwrap_err();
    assert_eq!(e, e2);
    assert_eq!(out, orig);
}

#[test]
fn corrupted_encodings_are_rejected_without_touching_the_base() {
    let unknown = |e: &CodecError| matches!(e, CodecError::UnknownTag { .. });
    let wrong_len = |e: &CodecError| matches!(e, CodecError::WrongDataLength { .. });
    let bad_lz4 = |e: &CodecError| matches!(e, CodecError::Decompress { .. });
    let short = |e: &CodecError| matches!(e, CodecError::WrongDecompressedLength { got: 100, .. });

    assert_untouched(5, &[], unknown);
    assert_untouched(255, &[1, 2], unknown);
    assert_untouched(PageTag::Zero as u8, &[0], wrong_len);
    assert_untouched(PageTag::Unchanged as u8, &[0], wrong_len);
    assert_untouched(PageTag::Raw as u8, &[0; PAGE_SIZE - 1], wrong_len);
    assert_untouched(PageTag::Raw as u8, &[0; PAGE_SIZE + 1], wrong_len);

    // A valid XOR encoding, truncated at every length.
    let mut e = PageEncoder::with_cache_bytes(PAGE_SIZE);
    let mut r = rng();
    let p = random_page(&mut r);
    enc(&mut e, 0, &p);
    let mut p2 = p.clone();
    p2[100..300].fill(3);
    let (t, d) = enc(&mut e, 0, &p2);
    assert_eq!(t, PageTag::XorLz4);
    for cut in 0..d.len() {
        assert_untouched(t as u8, &d[..cut], |e| {
            matches!(
                e,
                CodecError::Decompress { .. } | CodecError::WrongDecompressedLength { .. }
            )
        });
    }
    // Decompresses to too few / too many bytes.
    let small = lz4_flex::block::compress(&[7u8; 100]);
    assert_untouched(PageTag::XorLz4 as u8, &small, short);
    assert_untouched(PageTag::Lz4 as u8, &small, short);
    let big = lz4_flex::block::compress(&[7u8; PAGE_SIZE + 1]);
    assert_untouched(PageTag::XorLz4 as u8, &big, bad_lz4);
    assert_untouched(PageTag::Lz4 as u8, &big, bad_lz4);

    let mut wrong = [0u8; 100];
    assert_eq!(
        decode_page_slice(0, &[], &mut wrong),
        Err(CodecError::BadBaseLength { got: 100 })
    );
    let mut right = [1u8; PAGE_SIZE];
    decode_page_slice(0, &[], &mut right).unwrap();
    assert!(is_zero_page(&right));
}

#[test]
fn random_compressed_data_never_panics() {
    let mut r = rng();
    let mut base = [0u8; PAGE_SIZE];
    for i in 0..5000 {
        let n = r.gen_range(0..600);
        let mut d = vec![0u8; n];
        r.fill_bytes(&mut d);
        let tag = [PageTag::XorLz4 as u8, PageTag::Lz4 as u8][i % 2];
        let before = base;
        if decode_page(tag, &d, &mut base).is_err() {
            assert_eq!(base, before);
        }
    }
}

/// Cheap self-timing; run with `cargo test --release -- --ignored --nocapture`.
#[test]
#[ignore]
fn encode_throughput() {
    let mut r = rng();
    let n = 4096;
    let mut pages: Vec<Box<Page>> = (0..n).map(|_| random_page(&mut r)).collect();
    let mut e = PageEncoder::with_cache_bytes(n * PAGE_SIZE);
    let mut out = Vec::with_capacity(n * PAGE_SIZE);
    for (i, p) in pages.iter().enumerate() {
        e.encode_page(i as u64, p, &mut out);
    }
    let mut best = f64::MAX;
    for _ in 0..5 {
        for p in pages.iter_mut() {
            let at = r.gen_range(0..PAGE_SIZE - 64);
            r.fill_bytes(&mut p[at..at + 64]);
        }
        out.clear();
        let t = std::time::Instant::now();
        for (i, p) in pages.iter().enumerate() {
            e.encode_page(i as u64, p, &mut out);
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "XorLz4 encode (64 changed bytes/page, 16 MiB working set): {:.2} GB/s, {} B/page",
        (n * PAGE_SIZE) as f64 / best / 1e9,
        out.len() / n
    );
}
