//! Transport tests over real QUIC + mTLS connections on 127.0.0.1.

use std::net::SocketAddr;
use std::time::Duration;

use castor_parts::{PartId, PartKind};
use castor_replicator::codec::{PageEncoder, PAGE_SIZE};
use castor_replicator::transport::{
    self, data_stream_for_page, Connection, Identity, Listener, PeerCert, TransportConfig,
    TransportError,
};
use castor_replicator::wire::{
    self, Body, EpochCheck, EpochEnd, EpochTally, ErrorFrame, Frame, Heartbeat, Hello, PageBatch,
    PageBatchWriter, PageEntry, Role, Section, SectionWriter, WireError, PROTOCOL_VERSIONS,
};

const TIMEOUT: Duration = Duration::from_secs(20);

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn config() -> TransportConfig {
    TransportConfig {
        socket_buffer_bytes: 1 << 20,
        ..TransportConfig::default()
    }
}

async fn dial(
    addr: SocketAddr,
    id: &Identity,
    peer: PeerCert,
) -> Result<Connection, TransportError> {
    transport::connect(loopback(), addr, id, &peer, &config()).await
}

struct Pair {
    _listener: Listener,
    server: Connection,
    client: Connection,
}

async fn pair() -> Pair {
    let primary = Identity::generate("primary").unwrap();
    let backup = Identity::generate("backup").unwrap();
    let listener = transport::listen(loopback(), &backup, &primary.cert(), &config()).unwrap();
    let addr = listener.local_addr().unwrap();
    let (server, client) = tokio::join!(listener.accept(), dial(addr, &primary, backup.cert()));
    Pair {
        _listener: listener,
        server: server.unwrap(),
        client: client.unwrap(),
    }
}

fn all_frames() -> Vec<Frame> {
    vec![
        Frame::new(
            0,
            Body::Hello(Hello {
                versions: PROTOCOL_VERSIONS,
                role: Role::Primary,
                tracker: "kvm-dirty-log".into(),
                epoch_interval_ms: 25,
                session_id: 99,
                resume_from_epoch: 0,
                generation: 4,
                manifest: vec![5; 300],
            }),
        ),
        Frame::new(
            1,
            Body::PageBatch(PageBatch {
                pages: vec![
                    PageEntry {
                        page_number: 1,
                        tag: 0,
                        data: vec![],
                    },
                    PageEntry {
                        page_number: 2,
                        tag: 1,
                        data: vec![0x42; PAGE_SIZE],
                    },
                ],
            }),
        ),
        Frame::new(
            1,
            Body::Section(Section {
                part: PartId::new(PartKind::Vcpu, 1),
                version: 1,
                data: vec![1; 1000],
            }),
        ),
        Frame::new(
            1,
            Body::Section(Section {
                part: PartId::new(PartKind::Legacy, 0),
                version: 1,
                data: vec![2; 100],
            }),
        ),
        Frame::new(
            1,
            Body::Section(Section {
                part: PartId::new(PartKind::Output, 0),
                version: 1,
                data: b"login: ".to_vec(),
            }),
        ),
        Frame::new(
            1,
            Body::EpochEnd(EpochEnd {
                page_count: 2,
                data_frames: 4,
                content_digest: 1234,
                memory_digest: Some([7; 32]),
            }),
        ),
        Frame::new(1, Body::Ack),
        Frame::new(
            1,
            Body::Heartbeat(Heartbeat {
                sent_at_nanos: 5,
                last_committed_epoch: 1,
                generation: 6,
            }),
        ),
        Frame::new(
            1,
            Body::Error(ErrorFrame {
                code: 3,
                message: "bye".into(),
            }),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_frame_type_round_trips_over_mtls() {
    tokio::time::timeout(TIMEOUT, async {
        let p = pair().await;
        // Control stream, both directions.
        let (mut tx, mut rx) = p.client.open_control().await.unwrap();
        for f in all_frames() {
            tx.send(&f).await.unwrap();
        }
        let (mut stx, mut srx) = p.server.accept_control().await.unwrap();
        for f in all_frames() {
            assert_eq!(srx.recv_owned().await.unwrap(), Some(f));
        }
        for f in all_frames().into_iter().rev() {
            stx.send(&f).await.unwrap();
        }
        for f in all_frames().into_iter().rev() {
            assert_eq!(rx.recv_owned().await.unwrap(), Some(f));
        }
        // A data stream, finished at the end.
        let mut data = p.client.open_data().await.unwrap();
        for f in all_frames() {
            data.send(&f).await.unwrap();
        }
        data.finish().unwrap();
        let mut drx = p.server.accept_data().await.unwrap();
        for f in all_frames() {
            assert_eq!(drx.recv_owned().await.unwrap(), Some(f));
        }
        assert_eq!(drx.recv_owned().await.unwrap(), None);
        // Heartbeat as a datagram.
        let hb = Frame::new(
            3,
            Body::Heartbeat(Heartbeat {
                sent_at_nanos: 1,
                last_committed_epoch: 2,
                generation: 3,
            }),
        );
        p.server.send_datagram_frame(&hb).unwrap();
        assert_eq!(p.client.recv_datagram_frame().await.unwrap(), hb);
        // Negotiated down to version 2, the generation does not travel.
        p.server.set_version(2);
        p.server.send_datagram_frame(&hb).unwrap();
        let Body::Heartbeat(got) = p.client.recv_datagram_frame().await.unwrap().body else {
            panic!("expected a heartbeat");
        };
        assert_eq!(
            got,
            Heartbeat {
                sent_at_nanos: 1,
                last_committed_epoch: 2,
                generation: 0
            }
        );
        // A stream sender set to version 2 sends version-2 frames.
        let mut old = p.client.open_data().await.unwrap();
        old.set_version(2);
        let h = old.send(&hb).await.unwrap();
        assert_eq!((h.version, h.payload_len), (2, 16));
        old.send(&all_frames()[2]).await.unwrap();
        old.finish().unwrap();
        let mut orx = p.server.accept_data().await.unwrap();
        let f = orx.recv().await.unwrap().unwrap();
        assert_eq!(f.header.version, 2);
        assert_eq!(
            f.to_owned().body,
            Body::Heartbeat(Heartbeat {
                generation: 0,
                ..got
            })
        );
        let f = orx.recv().await.unwrap().unwrap();
        assert_eq!(f.header.version, 2);
        assert_eq!(f.to_owned(), all_frames()[2]);
        p.client.close(transport::CLOSE_OK, "done");
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epoch_split_across_data_streams() {
    tokio::time::timeout(TIMEOUT, async {
        let p = pair().await;
        const STREAMS: usize = 3;
        const EPOCH: u64 = 4;

        // Backup: accept the control stream and three data streams, tally frames.
        let server = p.server;
        let backup = tokio::spawn(async move {
            let (mut ack_tx, mut ctl) = server.accept_control().await.unwrap();
            let Some(Frame {
                body: Body::Hello(_),
                ..
            }) = ctl.recv_owned().await.unwrap()
            else {
                panic!("expected hello");
            };
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            for _ in 0..STREAMS {
                let mut s = server.accept_data().await.unwrap();
                let tx = tx.clone();
                tokio::spawn(async move {
                    while let Some(f) = s.recv().await.unwrap() {
                        tx.send((f.header, f.page_count())).unwrap();
                    }
                });
            }
            drop(tx);
            let Some(Frame {
                epoch,
                body: Body::EpochEnd(end),
            }) = ctl.recv_owned().await.unwrap()
            else {
                panic!("expected epoch end");
            };
            assert_eq!(epoch, EPOCH);
            let mut tally = EpochTally::new(EPOCH);
            while let EpochCheck::Pending { .. } = tally.check(&end) {
                let (h, pages) = rx.recv().await.unwrap();
                assert_eq!(h.epoch, EPOCH);
                tally.add(&h, pages);
            }
            assert_eq!(tally.check(&end), EpochCheck::Complete);
            ack_tx.send(&Frame::new(EPOCH, Body::Ack)).await.unwrap();
            tally.pages
        });

        // Primary: hello on control, pages spread by page number, EpochEnd last.
        let (mut ctl, mut acks) = p.client.open_control().await.unwrap();
        ctl.send(&all_frames()[0]).await.unwrap();
        let mut streams = Vec::new();
        for _ in 0..STREAMS {
            streams.push(p.client.open_data().await.unwrap());
        }
        let mut encoder = PageEncoder::with_cache_bytes(1 << 20);
        let mut tally = EpochTally::new(EPOCH);
        let mut bufs = vec![Vec::new(); STREAMS];
        let mut writers: Vec<PageBatchWriter<'_>> = bufs
            .iter_mut()
            .map(|b| PageBatchWriter::begin(b, EPOCH))
            .collect();
        for pn in 0..100u64 {
            let mut page = [0u8; PAGE_SIZE];
            page[(pn as usize * 13) % PAGE_SIZE] = pn as u8 | 1;
            let w = &mut writers[data_stream_for_page(pn, STREAMS)];
            w.push_with(pn, |out| encoder.encode_page(pn, &page, out) as u8)
                .unwrap();
        }
        let headers: Vec<_> = writers.into_iter().map(|w| w.finish().unwrap()).collect();
        for ((s, b), h) in streams.iter_mut().zip(&bufs).zip(&headers) {
            s.send_encoded(b).await.unwrap();
            let pages = wire::decode(b, p.client.limits()).unwrap().0.page_count();
            tally.add(h, pages);
        }
        // Also some part state on stream 0, owned and built in place.
        let dev = Frame::new(
            EPOCH,
            Body::Section(Section {
                part: PartId::new(PartKind::KvmVm, 0),
                version: 1,
                data: vec![1, 2, 3],
            }),
        );
        let h = streams[0].send(&dev).await.unwrap();
        tally.add(&h, 0);
        let mut sbuf = Vec::new();
        let mut w = SectionWriter::begin(&mut sbuf, EPOCH, PartId::new(PartKind::Vcpu, 0), 1);
        w.data().extend_from_slice(&[4; 500]);
        let h = w.finish().unwrap();
        streams[1].send_encoded(&sbuf).await.unwrap();
        tally.add(&h, 0);
        ctl.send(&Frame::new(EPOCH, Body::EpochEnd(tally.epoch_end(None))))
            .await
            .unwrap();
        let ack = acks.recv_owned().await.unwrap().unwrap();
        assert_eq!(ack, Frame::new(EPOCH, Body::Ack));
        assert_eq!(backup.await.unwrap(), 100);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_frame_in_flight_gives_typed_error() {
    tokio::time::timeout(TIMEOUT, async {
        let p = pair().await;
        let mut tx = p.client.open_data().await.unwrap();
        let mut bytes = Vec::new();
        all_frames()[2].encode(&mut bytes).unwrap();
        bytes[wire::HEADER_LEN + 10] ^= 0x80; // flip a payload bit "in flight"
        tx.send_encoded(&bytes).await.unwrap();
        let mut rx = p.server.accept_data().await.unwrap();
        let e = rx.recv().await.unwrap_err();
        assert!(
            matches!(e.wire_error(), Some(WireError::PayloadChecksum { .. })),
            "{e}"
        );
        // The receiver resets the connection; the sender sees it closed.
        p.server.close_for_protocol_error(e.wire_error().unwrap());
        let closed = p.client.closed().await;
        assert!(closed.to_string().contains("checksum"), "{closed}");

        // Same bytes through the plain decoder.
        assert!(matches!(
            wire::decode(&bytes, &Default::default()),
            Err(WireError::PayloadChecksum { .. })
        ));
        let mut garbage = bytes.clone();
        garbage[0] = b'X';
        assert!(matches!(
            wire::decode(&garbage, &Default::default()),
            Err(WireError::BadMagic { .. })
        ));
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_refuses_wrong_client_certificate() {
    captured_logs();
    tokio::time::timeout(TIMEOUT, async {
        let primary = Identity::generate("primary").unwrap();
        let impostor = Identity::generate("primary").unwrap();
        let backup = Identity::generate("backup").unwrap();
        let listener = transport::listen(loopback(), &backup, &primary.cert(), &config()).unwrap();
        let addr = listener.local_addr().unwrap();
        let (server, client) =
            tokio::join!(listener.accept(), dial(addr, &impostor, backup.cert()));
        let server_err = server.unwrap_err();
        assert!(
            matches!(server_err, TransportError::Connection(_)),
            "{server_err}"
        );
        // With TLS 1.3 the client may finish its side of the handshake before
        // the server rejects its certificate; it then sees the close.
        let client_err = match client {
            Err(e) => e,
            Ok(conn) => conn.closed().await,
        };
        let msg = client_err.to_string();
        assert!(
            msg.contains("certificate") || msg.contains("crypto"),
            "{msg}"
        );
        let refused = impostor.cert().fingerprint();
        let expected = primary.cert().fingerprint();
        assert!(
            captured_logs()
                .iter()
                .any(|l| l.contains("refusing client certificate")
                    && l.contains(&refused)
                    && l.contains(&expected)),
            "{:?}",
            captured_logs()
        );

        // The listener is still usable by the right client.
        let (server, client) = tokio::join!(listener.accept(), dial(addr, &primary, backup.cert()));
        server.unwrap();
        client.unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refuses_wrong_server_certificate() {
    tokio::time::timeout(TIMEOUT, async {
        let primary = Identity::generate("primary").unwrap();
        let backup = Identity::generate("backup").unwrap();
        let impostor = Identity::generate("backup").unwrap();
        let listener =
            transport::listen(loopback(), &impostor, &primary.cert(), &config()).unwrap();
        let addr = listener.local_addr().unwrap();
        let (server, client) = tokio::join!(listener.accept(), dial(addr, &primary, backup.cert()));
        let client_err = client.unwrap_err();
        let msg = client_err.to_string();
        assert!(msg.contains("certificate"), "{msg}");
        assert!(server.is_err());
    })
    .await
    .unwrap();
}

#[test]
fn keygen_writes_pinnable_identity_files() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("castor-keygen-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (cert, key) = transport::write_identity(&dir, "node-a").unwrap();
    assert_eq!(cert, dir.join("node-a.crt"));
    assert_eq!(key, dir.join("node-a.key"));
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&key), 0o600);
    assert_eq!(mode(&cert), 0o644);
    let id = Identity::load(&cert, &key).unwrap();
    let peer = PeerCert::load(&cert).unwrap();
    assert_eq!(id.cert(), peer);
    assert!(peer.fingerprint().starts_with("sha256:"));
    assert_eq!(peer.fingerprint().len(), 7 + 64);
    // No silent overwrite of an existing key.
    assert!(transport::write_identity(&dir, "node-a").is_err());
    assert!(PeerCert::from_pem(b"not a certificate").is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn window_sizing() {
    let c = TransportConfig::default();
    assert_eq!(c.bdp_bytes(), 1_250_000);
    assert_eq!(c.stream_window_bytes(), 8 << 20);
    let fast = TransportConfig {
        bandwidth_bits_per_sec: 100_000_000_000,
        ..TransportConfig::default()
    };
    assert_eq!(fast.stream_window_bytes(), 50_000_000);
    assert_eq!(fast.connection_window_bytes(), 100_000_000);
}

/// Captures log lines so tests can check the refusal warning.
struct Capture(std::sync::Mutex<Vec<String>>);

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        if record.level() <= log::Level::Warn {
            self.0.lock().unwrap().push(record.args().to_string());
        }
    }
    fn flush(&self) {}
}

static CAPTURE: Capture = Capture(std::sync::Mutex::new(Vec::new()));

fn captured_logs() -> Vec<String> {
    let _ = log::set_logger(&CAPTURE);
    log::set_max_level(log::LevelFilter::Warn);
    CAPTURE.0.lock().unwrap().clone()
}
