use castor_net_buffer::{
    Config, Discarded, Epoch, Error, Item, OutputBuffer, PushError, Pushed, Seq,
};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// Fixed-seed SplitMix64: deterministic, dependency-free "rand" for the
/// property-style tests.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn held(p: Pushed) -> Seq {
    match p {
        Pushed::Held(s) => s,
        Pushed::PassThrough(i) => panic!("unexpected pass-through {i:?}"),
    }
}

fn push(buf: &OutputBuffer, data: Vec<u8>) -> Seq {
    held(buf.try_push(data).unwrap())
}

type Model = VecDeque<(Epoch, Vec<(Seq, Vec<u8>)>)>;

fn seqs(items: &[Item]) -> Vec<Seq> {
    items.iter().map(|i| i.seq).collect()
}

#[test]
fn ordering_across_epochs() {
    let buf: OutputBuffer = OutputBuffer::default();
    let mut expected = Vec::new();
    for e in 0..5u64 {
        for k in 0..=e {
            let s = held(buf.try_push(vec![e as u8, k as u8]).unwrap());
            expected.push((s, e));
        }
        let sealed = buf.seal(e).unwrap();
        assert_eq!(sealed.epoch(), e);
        assert_eq!(sealed.len(), e as usize + 1);
        assert!(sealed.iter().all(|i| i.epoch == e));
    }
    assert_eq!(buf.stats().sealed_epochs_pending, 5);
    // Ack 1 releases epochs 0 and 1 only.
    let r = buf.release_through(1).unwrap().into_items();
    assert_eq!(seqs(&r), vec![0, 1, 2]);
    assert_eq!(r.iter().map(|i| i.epoch).collect::<Vec<_>>(), vec![0, 1, 1]);
    // Ack 4 releases the rest, in sequence order.
    let r = buf.release_through(4).unwrap().into_items();
    assert_eq!(seqs(&r), (3..15).collect::<Vec<_>>());
    let all: Vec<_> = expected.iter().map(|(s, _)| *s).collect();
    assert_eq!(all, (0..15).collect::<Vec<_>>());
    assert_eq!(buf.held_items(), 0);
    assert_eq!(buf.stats().oldest_held_epoch, None);
}

#[test]
fn nothing_released_before_ack_and_open_epoch_survives_ack() {
    let buf: OutputBuffer = OutputBuffer::default();
    push(&buf, vec![1]);
    buf.seal(0).unwrap();
    push(&buf, vec![2]); // epoch 1, open
    assert_eq!(buf.stats().oldest_held_epoch, Some(0));
    let r = buf.release_through(0).unwrap().into_items();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].data, vec![1]);
    assert_eq!(buf.held_items(), 1);
    assert_eq!(buf.stats().oldest_held_epoch, Some(1));
    // Epoch 1 is open: acking it is misuse.
    assert_eq!(
        buf.release_through(1).unwrap_err(),
        Error::NotSealed {
            epoch: 1,
            open_epoch: 1
        }
    );
}

/// Random interleavings of push / seal / ack (valid, stale, duplicate and
/// premature), checked against a model: released items are exactly the items
/// of acked epochs, in global seq order, each exactly once.
#[test]
fn property_random_interleavings() {
    for seed in 0..64u64 {
        let mut rng = Rng(seed);
        let max_bytes = 16 + rng.below(200) as usize;
        let max_items = if rng.below(2) == 0 {
            usize::MAX
        } else {
            1 + rng.below(20) as usize
        };
        let first_epoch = rng.below(3);
        let buf: OutputBuffer = OutputBuffer::new(Config {
            max_bytes,
            max_items,
            first_epoch,
            first_seq: 100,
        });

        // Model.
        let mut open: Vec<(Seq, Vec<u8>)> = Vec::new();
        let mut open_epoch: Epoch = first_epoch;
        let mut sealed: Model = VecDeque::new();
        let mut held_bytes = 0usize;
        let mut held_items = 0usize;
        let mut acked: Option<Epoch> = None;
        let mut pushed_all: Vec<Seq> = Vec::new();
        let mut released_all: Vec<Seq> = Vec::new();
        let mut live_views = Vec::new();

        let check_release =
            |r: Vec<Item>, expect: Vec<(Epoch, Seq, Vec<u8>)>, released_all: &mut Vec<Seq>| {
                let got: Vec<_> = r.into_iter().map(|i| (i.epoch, i.seq, i.data)).collect();
                assert_eq!(got, expect, "seed {seed}");
                for (_, s, _) in got {
                    assert!(released_all.last().map_or(true, |&l| l < s), "seed {seed}");
                    released_all.push(s);
                }
            };

        for _ in 0..3000 {
            match rng.below(100) {
                0..=54 => {
                    let len = rng.below(24) as usize;
                    let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                    match buf.try_push(data.clone()) {
                        Ok(p) => {
                            let s = held(p);
                            assert!(len <= max_bytes - held_bytes && held_items < max_items);
                            assert!(pushed_all.last().map_or(true, |&l| l < s));
                            pushed_all.push(s);
                            held_bytes += len;
                            held_items += 1;
                            open.push((s, data));
                        }
                        Err(PushError::Full(d)) => {
                            assert_eq!(d, data);
                            assert!(len > max_bytes - held_bytes || held_items >= max_items);
                        }
                        Err(PushError::TooLarge { len: l, .. }) => {
                            assert!(l > max_bytes);
                        }
                    }
                }
                55..=69 => {
                    if rng.below(10) == 0 && open_epoch > 0 {
                        assert!(matches!(
                            buf.seal(open_epoch - 1),
                            Err(Error::EpochNotIncreasing { .. })
                        ));
                        continue;
                    }
                    let e = open_epoch + if rng.below(5) == 0 { rng.below(3) } else { 0 };
                    let view = buf.seal(e).unwrap();
                    let items = std::mem::take(&mut open);
                    let got: Vec<_> = view
                        .iter()
                        .map(|i| (i.epoch, i.seq, i.data.clone()))
                        .collect();
                    let exp: Vec<_> = items.iter().map(|(s, d)| (e, *s, d.clone())).collect();
                    assert_eq!(got, exp, "seed {seed}");
                    sealed.push_back((e, items));
                    open_epoch = e + 1;
                    // Sometimes keep the view alive across the release
                    // (as a slow checkpoint serializer would).
                    if rng.below(3) == 0 {
                        live_views.push(view);
                    }
                    if rng.below(8) == 0 {
                        live_views.clear();
                    }
                }
                _ => {
                    let e = (open_epoch + 1).saturating_sub(rng.below(5));
                    match buf.release_through(e) {
                        Err(Error::NotSealed {
                            epoch,
                            open_epoch: o,
                        }) => {
                            assert_eq!((epoch, o), (e, open_epoch));
                            assert!(e >= open_epoch);
                        }
                        Err(other) => panic!("unexpected {other}"),
                        Ok(r) => {
                            assert!(e < open_epoch);
                            let mut expect = Vec::new();
                            while sealed.front().is_some_and(|(se, _)| *se <= e) {
                                let (se, items) = sealed.pop_front().unwrap();
                                for (s, d) in items {
                                    held_bytes -= d.len();
                                    held_items -= 1;
                                    expect.push((se, s, d));
                                }
                            }
                            // Nothing of an unacked epoch is released.
                            assert!(expect.iter().all(|(se, _, _)| *se <= e));
                            check_release(r.into_items(), expect, &mut released_all);
                            acked = Some(acked.map_or(e, |a| a.max(e)));
                        }
                    }
                }
            }
            let st = buf.stats();
            assert_eq!(st.held_bytes as usize, held_bytes, "seed {seed}");
            assert_eq!(st.held_items as usize, held_items, "seed {seed}");
            assert_eq!(st.open_epoch, open_epoch);
            assert_eq!(st.released_through, acked);
            assert_eq!(st.sealed_epochs_pending as usize, sealed.len());
        }
        // Drain: seal and ack everything; every pushed item released exactly once.
        buf.seal(open_epoch).unwrap();
        let mut expect = Vec::new();
        for (se, items) in sealed.drain(..) {
            expect.extend(items.into_iter().map(|(s, d)| (se, s, d)));
        }
        expect.extend(open.drain(..).map(|(s, d)| (open_epoch, s, d)));
        check_release(
            buf.release_through(open_epoch).unwrap().into_items(),
            expect,
            &mut released_all,
        );
        assert_eq!(released_all, pushed_all, "seed {seed}");
        assert_eq!(buf.held_items(), 0);
        assert_eq!(buf.held_bytes(), 0);
        assert_eq!(buf.stats().total_released_items, pushed_all.len() as u64);
    }
}

#[test]
fn capacity_back_pressure_bytes_and_items() {
    let buf: OutputBuffer = OutputBuffer::new(Config {
        max_bytes: 10,
        max_items: 3,
        ..Config::default()
    });
    push(&buf, vec![0; 6]);
    push(&buf, vec![0; 4]); // exactly at the byte cap
    match buf.try_push(vec![7; 1]) {
        Err(PushError::Full(d)) => assert_eq!(d, vec![7]),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        buf.try_push(vec![0; 11]),
        Err(PushError::TooLarge {
            len: 11,
            max_bytes: 10,
            ..
        })
    ));
    buf.seal(0).unwrap();
    // Cap counts sealed epochs too.
    assert!(matches!(buf.try_push(vec![1]), Err(PushError::Full(_))));
    assert_eq!(buf.release_through(0).unwrap().len(), 2);
    // Space freed; now the item cap bites (zero-length items).
    for _ in 0..3 {
        push(&buf, Vec::new());
    }
    assert!(matches!(buf.try_push(Vec::new()), Err(PushError::Full(_))));
    let st = buf.stats();
    assert_eq!(st.full_rejections, 3);
    assert_eq!(st.max_held_bytes, 10);
    assert_eq!(st.held_items, 3);
    assert_eq!(st.held_bytes, 0);
}

#[test]
fn blocked_push_timeout_wakes_on_release_from_other_thread() {
    let buf: Arc<OutputBuffer> = Arc::new(OutputBuffer::new(Config::with_max_bytes(8)));
    push(&buf, vec![0; 8]);
    buf.seal(0).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let (b2, d2) = (Arc::clone(&buf), Arc::clone(&done));
    let t = thread::spawn(move || {
        let start = Instant::now();
        let r = b2.push_timeout(vec![1; 4], Duration::from_secs(20));
        d2.store(true, Ordering::SeqCst);
        (r, start.elapsed())
    });
    thread::sleep(Duration::from_millis(150));
    assert!(!done.load(Ordering::SeqCst), "producer should be blocked");
    assert_eq!(buf.release_through(0).unwrap().len(), 1);
    let (r, elapsed) = t.join().unwrap();
    assert_eq!(r.unwrap().seq(), 1);
    assert!(elapsed < Duration::from_secs(10));
    assert_eq!(buf.held_bytes(), 4);
}

#[test]
fn push_timeout_times_out_and_returns_payload() {
    let buf: OutputBuffer = OutputBuffer::new(Config::with_max_bytes(4));
    push(&buf, vec![0; 4]);
    let start = Instant::now();
    let r = buf.push_timeout(vec![9; 2], Duration::from_millis(50));
    assert!(start.elapsed() >= Duration::from_millis(50));
    assert_eq!(r.unwrap_err().into_inner(), vec![9, 9]);
    assert_eq!(buf.stats().full_rejections, 1);
    // Succeeds immediately when there is room.
    buf.discard_unsealed();
    assert!(buf
        .push_timeout(vec![1], Duration::from_millis(0))
        .unwrap()
        .is_held());
}

#[test]
fn blocked_push_passes_through_when_going_unprotected() {
    let buf: Arc<OutputBuffer> = Arc::new(OutputBuffer::new(Config::with_max_bytes(4)));
    push(&buf, vec![0; 4]);
    let b2 = Arc::clone(&buf);
    let t = thread::spawn(move || b2.push_timeout(vec![5], Duration::from_secs(20)));
    thread::sleep(Duration::from_millis(100));
    let held = buf.set_unprotected(true).into_items();
    assert_eq!(seqs(&held), vec![0]);
    match t.join().unwrap().unwrap() {
        Pushed::PassThrough(i) => assert_eq!((i.seq, i.data), (1, vec![5])),
        other => panic!("{other:?}"),
    }
}

#[test]
fn unprotected_mode() {
    let buf: OutputBuffer = OutputBuffer::new(Config::with_max_bytes(16));
    push(&buf, vec![1]);
    buf.seal(0).unwrap();
    push(&buf, vec![2]);
    buf.seal(1).unwrap();
    push(&buf, vec![3]); // open epoch 2
                         // Going unprotected releases sealed AND open items, in order.
    let r = buf.set_unprotected(true).into_items();
    assert_eq!(seqs(&r), vec![0, 1, 2]);
    assert_eq!(r.iter().map(|i| i.epoch).collect::<Vec<_>>(), vec![0, 1, 2]);
    assert!(buf.is_unprotected());
    assert_eq!(buf.held_items(), 0);
    // Pushes pass straight through, ignoring the cap.
    match buf.try_push(vec![0; 100]).unwrap() {
        Pushed::PassThrough(i) => assert_eq!((i.seq, i.epoch, i.data.len()), (3, 2, 100)),
        other => panic!("{other:?}"),
    }
    // Stale acks for force-released epochs are no-ops.
    assert!(buf.release_through(1).unwrap().is_empty());
    // Sealing still works (empty epoch).
    assert!(buf.seal(2).unwrap().is_empty());
    // Re-protect: pushes are held again.
    assert!(buf.set_unprotected(false).is_empty());
    assert_eq!(held(buf.try_push(vec![4]).unwrap()), 4);
    assert_eq!(buf.held_items(), 1);
    let st = buf.stats();
    assert_eq!(st.total_passthrough, 1);
    assert_eq!(st.total_released_items, 4);
    assert_eq!(st.total_released_bytes, 103);
}

#[test]
fn release_all_unprotected_keeps_mode() {
    let buf: OutputBuffer = OutputBuffer::default();
    push(&buf, vec![1]);
    buf.seal(0).unwrap();
    push(&buf, vec![2]);
    let r = buf.release_all_unprotected();
    assert_eq!(r.len(), 2);
    assert_eq!(r.bytes(), 2);
    assert_eq!(r.iter().map(|i| i.seq).collect::<Vec<_>>(), vec![0, 1]);
    assert!(!buf.is_unprotected());
    assert!(buf.try_push(vec![3]).unwrap().is_held());
    // The open epoch (1) now only holds the new item.
    let s = buf.seal(1).unwrap();
    assert_eq!(seqs(s.items()), vec![2]);
}

#[test]
fn restore_and_reemit_on_failover() {
    // Primary: epochs 0 and 1 sealed, checkpoint 1 carries all pending output.
    let primary: OutputBuffer = OutputBuffer::default();
    push(&primary, b"a".to_vec());
    primary.seal(0).unwrap();
    push(&primary, b"b".to_vec());
    push(&primary, b"c".to_vec());
    primary.seal(1).unwrap();
    push(&primary, b"speculative".to_vec());
    let checkpoint: Vec<Item> = primary
        .pending_sealed()
        .iter()
        .flat_map(|s| s.items().to_vec())
        .collect();
    assert_eq!(seqs(&checkpoint), vec![0, 1, 2]);
    let next_seq = primary.next_seq();
    assert_eq!(next_seq, 4);

    // Backup takes over: restore and re-emit.
    let backup: OutputBuffer =
        OutputBuffer::restore(Config::default(), checkpoint.clone(), next_seq, 2).unwrap();
    let st = backup.stats();
    assert_eq!(st.held_items, 3);
    assert_eq!(st.sealed_epochs_pending, 2);
    assert_eq!(st.oldest_held_epoch, Some(0));
    assert_eq!(st.open_epoch, 2);
    let reemitted = backup.release_through(1).unwrap().into_items();
    assert_eq!(reemitted, checkpoint);
    // New output continues after the primary's sequence numbers.
    assert_eq!(held(backup.try_push(b"d".to_vec()).unwrap()), 4);
    assert_eq!(backup.seal(2).unwrap().items()[0].epoch, 2);

    // Empty restore is fine.
    let empty: OutputBuffer = OutputBuffer::restore(Config::default(), vec![], 7, 3).unwrap();
    assert_eq!(empty.next_seq(), 7);
    assert_eq!(empty.open_epoch(), 3);
}

#[test]
fn restore_rejects_bad_input() {
    let it = |seq, epoch| Item {
        seq,
        epoch,
        data: vec![0u8],
    };
    let r = |items, ns, oe| OutputBuffer::restore(Config::default(), items, ns, oe).map(|_| ());
    assert_eq!(
        r(vec![it(1, 0), it(1, 0)], 5, 1),
        Err(Error::RestoreOutOfOrder { seq: 1, epoch: 0 })
    );
    assert_eq!(
        r(vec![it(1, 1), it(2, 0)], 5, 2),
        Err(Error::RestoreOutOfOrder { seq: 2, epoch: 0 })
    );
    assert_eq!(
        r(vec![it(5, 0)], 5, 1),
        Err(Error::RestoreSeqOutOfRange {
            seq: 5,
            next_seq: 5
        })
    );
    assert_eq!(
        r(vec![it(1, 1)], 5, 1),
        Err(Error::RestoreEpochOutOfRange {
            epoch: 1,
            open_epoch: 1
        })
    );
}

#[test]
fn misuse_errors_and_duplicate_acks() {
    let buf: OutputBuffer = OutputBuffer::new(Config {
        first_epoch: 10,
        ..Config::default()
    });
    assert_eq!(
        buf.seal(9).unwrap_err(),
        Error::EpochNotIncreasing {
            epoch: 9,
            open_epoch: 10
        }
    );
    assert_eq!(
        buf.release_through(10).unwrap_err(),
        Error::NotSealed {
            epoch: 10,
            open_epoch: 10
        }
    );
    push(&buf, vec![1]);
    // Skipping numbers re-tags the items with the sealed epoch.
    let s = buf.seal(12).unwrap();
    assert_eq!(s.items()[0].epoch, 12);
    assert_eq!(buf.open_epoch(), 13);
    assert!(matches!(
        buf.seal(12),
        Err(Error::EpochNotIncreasing { .. })
    ));
    // Ack of a skipped (never explicitly sealed) epoch below the open one: no-op.
    assert!(buf.release_through(11).unwrap().is_empty());
    assert_eq!(buf.release_through(12).unwrap().len(), 1);
    // Duplicate and backwards acks are harmless no-ops.
    assert!(buf.release_through(12).unwrap().is_empty());
    assert!(buf.release_through(3).unwrap().is_empty());
    assert_eq!(buf.stats().released_through, Some(12));
    assert_eq!(
        buf.discard_after(11).unwrap_err(),
        Error::AlreadyReleased {
            epoch: 11,
            released: 12
        }
    );
    assert_eq!(buf.seal(u64::MAX).unwrap_err(), Error::EpochOverflow);
    // Display comes from thiserror.
    assert!(Error::EpochOverflow.to_string().contains("overflow"));
}

#[test]
fn discard_unsealed_and_discard_after() {
    let buf: OutputBuffer = OutputBuffer::new(Config::with_max_bytes(100));
    push(&buf, vec![0; 1]);
    buf.seal(0).unwrap();
    push(&buf, vec![0; 2]);
    buf.seal(1).unwrap();
    push(&buf, vec![0; 4]);
    buf.seal(2).unwrap();
    push(&buf, vec![0; 8]); // open epoch 3
    assert_eq!(buf.discard_unsealed(), Discarded { items: 1, bytes: 8 });
    assert_eq!(buf.open_epoch(), 3);
    assert_eq!(buf.held_bytes(), 7);
    push(&buf, vec![0; 16]);
    // Keep epochs <= 0; drop 1, 2 and the open epoch; epoch 1 reopens.
    assert_eq!(
        buf.discard_after(0).unwrap(),
        Discarded {
            items: 3,
            bytes: 22
        }
    );
    assert_eq!(buf.open_epoch(), 1);
    assert_eq!(buf.held_bytes(), 1);
    assert_eq!(buf.stats().total_discarded_items, 4);
    // Sequence numbers are not reused.
    assert_eq!(held(buf.try_push(vec![1]).unwrap()), 5);
    buf.seal(1).unwrap();
    let r = buf.release_through(1).unwrap().into_items();
    assert_eq!(seqs(&r), vec![0, 5]);
}

#[test]
fn release_moves_payloads_without_copy() {
    let buf: OutputBuffer = OutputBuffer::default();
    let data = vec![42u8; 1500];
    let ptr = data.as_ptr();
    push(&buf, data);
    let view = buf.seal(0).unwrap();
    assert_eq!(view.items()[0].data.as_ptr(), ptr); // seal: no copy
    assert_eq!(view.bytes(), 1500);
    drop(view);
    let r = buf.release_through(0).unwrap().into_items();
    assert_eq!(r[0].data.as_ptr(), ptr); // release: moved out of the Arc

    // With a view still alive, release still works (by cloning).
    push(&buf, vec![1, 2, 3]);
    let view = buf.seal(1).unwrap();
    let r: Vec<Item> = buf.release_through(1).unwrap().into_iter().collect();
    assert_eq!(r[0].data, view.items()[0].data);
}

#[test]
fn generic_payloads() {
    // Fixed-size records.
    let recs: OutputBuffer<[u8; 32]> = OutputBuffer::new(Config::with_max_bytes(64));
    assert!(recs.try_push([1; 32]).unwrap().is_held());
    assert!(recs.try_push([2; 32]).unwrap().is_held());
    assert!(matches!(recs.try_push([3; 32]), Err(PushError::Full(_))));
    recs.seal(0).unwrap();
    let r = recs.release_through(0).unwrap().into_items();
    assert_eq!(r[1].data, [2; 32]);
    // Shared payloads.
    let frames: OutputBuffer<Arc<[u8]>> = OutputBuffer::default();
    assert!(frames.try_push(Arc::from(&b"frame"[..])).unwrap().is_held());
    frames.seal(0).unwrap();
    assert_eq!(frames.release_through(0).unwrap().bytes(), 5);
}

/// Producers on two threads racing the epoch loop and the ack path: every item
/// is released exactly once, in seq order, never before its epoch is acked.
#[test]
fn concurrent_producers_sealer_and_acker() {
    const PER_THREAD: u32 = 20_000;
    let buf: Arc<OutputBuffer> = Arc::new(OutputBuffer::new(Config::with_max_bytes(4096)));
    let producers: Vec<_> = (0..2u8)
        .map(|tid| {
            let b = Arc::clone(&buf);
            thread::spawn(move || {
                for n in 0..PER_THREAD {
                    let mut d = vec![tid];
                    d.extend_from_slice(&n.to_le_bytes());
                    let mut d = Some(d);
                    while let Some(x) = d.take() {
                        match b.push_timeout(x, Duration::from_millis(5)) {
                            Ok(p) => assert!(p.is_held()),
                            Err(PushError::Full(x)) => d = Some(x),
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
            })
        })
        .collect();

    let mut released: Vec<Item> = Vec::new();
    let mut epoch = 0u64;
    let mut pending: VecDeque<Epoch> = VecDeque::new();
    let check = |r: Vec<Item>, acked: Epoch, released: &mut Vec<Item>| {
        for i in r {
            assert!(i.epoch <= acked);
            released.push(i);
        }
    };
    while producers.iter().any(|p| !p.is_finished()) {
        buf.seal(epoch).unwrap();
        pending.push_back(epoch);
        epoch += 1;
        // Ack lags one epoch behind the seal.
        if pending.len() > 1 {
            let a = pending.pop_front().unwrap();
            check(
                buf.release_through(a).unwrap().into_items(),
                a,
                &mut released,
            );
        }
        thread::yield_now();
    }
    for p in producers {
        p.join().unwrap();
    }
    buf.seal(epoch).unwrap();
    check(
        buf.release_through(epoch).unwrap().into_items(),
        epoch,
        &mut released,
    );

    assert_eq!(released.len(), 2 * PER_THREAD as usize);
    assert!(released.windows(2).all(|w| w[0].seq < w[1].seq));
    assert!(released.windows(2).all(|w| w[0].epoch <= w[1].epoch));
    let mut next = [0u32; 2];
    for i in &released {
        let tid = i.data[0] as usize;
        let n = u32::from_le_bytes([i.data[1], i.data[2], i.data[3], i.data[4]]);
        assert_eq!(n, next[tid], "per-producer order");
        next[tid] += 1;
    }
    let st = buf.stats();
    assert_eq!(st.held_items, 0);
    assert_eq!(st.total_released_items, 2 * PER_THREAD as u64);
    assert!(st.max_held_bytes <= 4096);
}

/// Micro-timing of the hot path and the pause path; run with
/// `cargo test -p castor-net-buffer --release -- --ignored --nocapture`.
#[test]
#[ignore]
fn micro_timing() {
    const N: usize = 1_000_000;
    let buf: OutputBuffer = OutputBuffer::new(Config::with_max_bytes(64 << 20));
    let payloads: Vec<Vec<u8>> = (0..N).map(|_| vec![0u8; 32]).collect();
    let t = Instant::now();
    for (i, p) in payloads.into_iter().enumerate() {
        assert!(buf.try_push(p).unwrap().is_held());
        if i % 1000 == 999 {
            let e = (i / 1000) as u64;
            drop(buf.seal(e).unwrap());
            if e > 0 {
                buf.release_through(e - 1).unwrap();
            }
        }
    }
    let per = t.elapsed() / N as u32;
    for _ in 0..1000 {
        push(&buf, vec![0u8; 32]);
    }
    let t_seal = Instant::now();
    let s = buf.seal(1_000_000).unwrap();
    let seal = t_seal.elapsed();
    drop(s);
    println!("try_push (+amortized seal/release): {per:?}/item; seal of 1000 items: {seal:?}");
}

#[test]
fn wait_for_open_output_wakes_on_the_first_push_of_an_epoch() {
    let buf: Arc<OutputBuffer> = Arc::new(OutputBuffer::new(Config::default()));
    // Nothing waiting: returns false at the deadline.
    let t0 = Instant::now();
    assert!(!buf.wait_for_open_output(t0 + Duration::from_millis(20)));
    assert!(t0.elapsed() >= Duration::from_millis(20));
    // A push from another thread wakes the waiter long before its deadline.
    let b2 = buf.clone();
    let pusher = thread::spawn(move || {
        thread::sleep(Duration::from_millis(30));
        assert!(b2.try_push(b"frame".to_vec()).unwrap().is_held());
    });
    let t1 = Instant::now();
    assert!(buf.wait_for_open_output(t1 + Duration::from_secs(10)));
    assert!(t1.elapsed() < Duration::from_secs(5));
    pusher.join().unwrap();
    // Output waiting: returns at once. Sealed output does not count.
    assert!(buf.wait_for_open_output(Instant::now()));
    let _ = buf.seal(0).unwrap();
    assert!(!buf.wait_for_open_output(Instant::now() + Duration::from_millis(5)));
    // Unprotected pushes pass through: nothing waits for a checkpoint.
    let _ = buf.set_unprotected(true);
    let _ = buf.try_push(b"x".to_vec()).unwrap();
    assert!(!buf.wait_for_open_output(Instant::now() + Duration::from_millis(5)));
}

mod output_part {
    use castor_net_buffer::{Config, HeldItem, HeldOutput, OutputBuffer, OutputPart, OUTPUT_PART};
    use castor_parts::{encode_section, part_conformance, Part, PartError};
    use std::sync::Arc;

    fn primary_with_output() -> Arc<OutputPart> {
        let buf: Arc<OutputBuffer> = Arc::new(OutputBuffer::new(Config::default()));
        for i in 0..5u8 {
            let _ = buf.try_push(vec![i; 3 + i as usize]).unwrap();
        }
        buf.seal(0).unwrap();
        let _ = buf
            .try_push(b"open epoch: not in the checkpoint".to_vec())
            .unwrap();
        Arc::new(OutputPart::new(buf))
    }

    part_conformance!(
        output_part_conforms,
        || (primary_with_output(), Arc::new(OutputPart::replica())),
        |sent: &[u8], restaged: &[u8]| {
            // The replica re-stages exactly what it restored.
            if sent == restaged {
                Ok(())
            } else {
                Err("differs".to_string())
            }
        }
    );

    #[test]
    fn staged_output_holds_sealed_items_and_position() {
        let p = primary_with_output();
        let staged = p.stage().unwrap();
        let mut bytes = Vec::new();
        staged.encode(&mut bytes).unwrap();
        let replica = OutputPart::replica();
        let c = replica.check(1, &bytes).unwrap();
        replica.restore(&c).unwrap();
        let held = replica.restored().unwrap();
        assert_eq!(held.next_seq, 6, "the open epoch's item has seq 5");
        let seqs: Vec<u64> = held.items.iter().map(|i| i.seq).collect();
        assert_eq!(seqs, [0, 1, 2, 3, 4]);
        assert_eq!(held.items[4].data, vec![4u8; 7]);
    }

    #[test]
    fn malformed_held_output_is_refused() {
        let replica = OutputPart::replica();
        let item = |seq| HeldItem { seq, data: vec![1] };
        for bad in [
            HeldOutput {
                next_seq: 5,
                items: vec![item(3), item(3)],
            },
            HeldOutput {
                next_seq: 5,
                items: vec![item(4), item(2)],
            },
            HeldOutput {
                next_seq: 5,
                items: vec![item(5)],
            },
        ] {
            let mut bytes = Vec::new();
            encode_section(OUTPUT_PART, &bad, &mut bytes).unwrap();
            assert!(
                matches!(replica.check(1, &bytes), Err(PartError::Invalid { .. })),
                "{bad:?} accepted"
            );
        }
        assert!(replica.restored().is_none(), "nothing applied");
    }
}
