//! The virtio devices against a fake driver in real guest memory (the same
//! `GuestMemoryMmap<AtomicBitmap>` a VM uses, no vCPU): malformed requests
//! get device errors, never panics, and every path where the VMM writes
//! guest memory (used ring, block reads, GET_ID, RX buffers, the device
//! config page) marks the page dirty in the VMM-side bitmap.

use castor_guest_abi::{layout, pv};
use castor_vmm::devices::virtio::blk::{S_IOERR, S_OK, S_UNSUPP, T_FLUSH, T_GET_ID, T_IN, T_OUT};
use castor_vmm::devices::virtio::mmio::reg;
use castor_vmm::devices::virtio::status;
use castor_vmm::devices::{
    BlkConfig, DeviceBus, NetConfig, Tap, TxOutcome, TxSink, VirtioBlk, VirtioNet,
};
use castor_vmm::{memory, GuestMemoryMmap, NetParams};
use std::sync::{Arc, Mutex};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

const VERSION_1: u64 = 1 << 32;
const EVENT_IDX: u64 = 1 << 29;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const QSIZE: u16 = 16;

struct Fake {
    mem: GuestMemoryMmap,
    bus: DeviceBus,
    base: u64,
}

struct Q {
    base: u64,
    avail_idx: u16,
    used_seen: u16,
}

impl Q {
    fn desc(&self) -> u64 {
        self.base
    }
    fn avail(&self) -> u64 {
        self.base + 0x1000
    }
    fn used(&self) -> u64 {
        self.base + 0x2000
    }
}

impl Fake {
    fn new(mem: GuestMemoryMmap) -> Fake {
        let bus = DeviceBus::new(mem.clone());
        Fake {
            mem,
            bus,
            base: pv::DEVICES_BASE,
        }
    }

    fn w(&self, r: u64, v: u32) {
        assert!(self.bus.write(self.base + r, &v.to_le_bytes()));
    }

    fn r(&self, r: u64) -> u32 {
        let mut b = [0u8; 4];
        assert!(self.bus.read(self.base + r, &mut b));
        u32::from_le_bytes(b)
    }

    fn init(&self, features: u64, queues: &[(u32, u64)]) -> Vec<Q> {
        assert_eq!(self.r(reg::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(self.r(reg::VERSION), 2);
        self.w(reg::STATUS, 0);
        self.w(reg::STATUS, 3);
        self.w(reg::DRIVER_FEATURES_SEL, 0);
        self.w(reg::DRIVER_FEATURES, features as u32);
        self.w(reg::DRIVER_FEATURES_SEL, 1);
        self.w(reg::DRIVER_FEATURES, (features >> 32) as u32);
        self.w(reg::STATUS, 3 | 8);
        assert_ne!(self.r(reg::STATUS) & 8, 0, "FEATURES_OK refused");
        let mut out = Vec::new();
        for &(idx, base) in queues {
            self.mem
                .write_slice(&[0u8; 0x3000], GuestAddress(base))
                .unwrap();
            self.w(reg::QUEUE_SEL, idx);
            self.w(reg::QUEUE_NUM, QSIZE as u32);
            self.w(reg::QUEUE_DESC_LOW, base as u32);
            self.w(reg::QUEUE_DESC_HIGH, (base >> 32) as u32);
            self.w(reg::QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
            self.w(reg::QUEUE_DRIVER_HIGH, 0);
            self.w(reg::QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
            self.w(reg::QUEUE_DEVICE_HIGH, 0);
            self.w(reg::QUEUE_READY, 1);
            out.push(Q {
                base,
                avail_idx: 0,
                used_seen: 0,
            });
        }
        self.w(reg::STATUS, 3 | 8 | 4);
        out
    }

    fn set_desc(&self, q: &Q, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = q.desc() + 16 * i as u64;
        self.mem.write_obj(addr, GuestAddress(d)).unwrap();
        self.mem.write_obj(len, GuestAddress(d + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(d + 14)).unwrap();
    }

    fn publish(&self, q: &mut Q, head: u16) {
        let slot = q.avail() + 4 + 2 * (q.avail_idx % QSIZE) as u64;
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        q.avail_idx = q.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(q.avail_idx, GuestAddress(q.avail() + 2))
            .unwrap();
    }

    fn pop_used(&self, q: &mut Q) -> Option<(u32, u32)> {
        let idx: u16 = self.mem.read_obj(GuestAddress(q.used() + 2)).unwrap();
        if idx == q.used_seen {
            return None;
        }
        let e = q.used() + 4 + 8 * (q.used_seen % QSIZE) as u64;
        q.used_seen = q.used_seen.wrapping_add(1);
        Some((
            self.mem.read_obj(GuestAddress(e)).unwrap(),
            self.mem.read_obj(GuestAddress(e + 4)).unwrap(),
        ))
    }

    fn clear_dirty(&self) {
        for r in self.mem.iter() {
            std::ops::Deref::deref(r).bitmap().reset();
        }
    }

    fn dirty(&self, addr: u64) -> bool {
        let r = self.mem.find_region(GuestAddress(addr)).unwrap();
        std::ops::Deref::deref(r)
            .bitmap()
            .dirty_at((addr - r.start_addr().0) as usize)
    }
}

const Q0: u64 = 0x40_0000;
const HDR: u64 = 0x50_0000;
const STATUS_AT: u64 = 0x50_0100;
const DATA: u64 = 0x51_0000;

struct Disk {
    f: Fake,
    q: Q,
    _path: TempPath,
}

struct TempPath(std::path::PathBuf);
impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn disk(name: &str) -> Disk {
    let path =
        std::env::temp_dir().join(format!("castor-virtio-{}-{name}.img", std::process::id()));
    let content: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(&path, content).unwrap();
    let f = Fake::new(memory::create(32 << 20).unwrap());
    let blk = VirtioBlk::open(&BlkConfig {
        path: path.clone(),
        read_only: false,
    })
    .unwrap();
    f.bus.add_virtio_blk(blk).unwrap();
    let mut qs = f.init(VERSION_1 | EVENT_IDX | (1 << 9), &[(0, Q0)]);
    let q = qs.remove(0);
    Disk {
        f,
        q,
        _path: TempPath(path),
    }
}

impl Disk {
    /// Submits header(ty, sector) -> data(len, flags) -> status; returns (status, used len).
    fn req(
        &mut self,
        ty: u32,
        sector: u64,
        data_addr: u64,
        len: u32,
        data_flags: u16,
    ) -> (u8, u32) {
        let f = &self.f;
        f.mem.write_obj(ty, GuestAddress(HDR)).unwrap();
        f.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        f.mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
        f.mem.write_obj(0xffu8, GuestAddress(STATUS_AT)).unwrap();
        f.set_desc(&self.q, 0, HDR, 16, F_NEXT, 1);
        f.set_desc(&self.q, 1, data_addr, len, data_flags | F_NEXT, 2);
        f.set_desc(&self.q, 2, STATUS_AT, 1, F_WRITE, 0);
        self.submit(0)
    }

    fn submit(&mut self, head: u16) -> (u8, u32) {
        self.f.publish(&mut self.q, head);
        self.f.w(reg::QUEUE_NOTIFY, 0);
        let (_, len) = self
            .f
            .pop_used(&mut self.q)
            .expect("the device completed the request");
        (self.f.mem.read_obj(GuestAddress(STATUS_AT)).unwrap(), len)
    }
}

#[test]
fn blk_read_write_flush_get_id() {
    let mut d = disk("rw");
    let (st, len) = d.req(T_IN, 2, DATA, 1024, F_WRITE);
    assert_eq!((st, len), (S_OK, 1025));
    let mut got = vec![0u8; 1024];
    d.f.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    let want: Vec<u8> = (1024..2048u32).map(|i| (i % 253) as u8).collect();
    assert_eq!(got, want);
    d.f.mem
        .write_slice(&[0xabu8; 512], GuestAddress(DATA))
        .unwrap();
    assert_eq!(d.req(T_OUT, 10, DATA, 512, 0).0, S_OK);
    assert_eq!(d.req(T_FLUSH, 0, DATA, 0, 0).0, S_OK);
    let file = std::fs::read(&d._path.0).unwrap();
    assert!(file[5120..5632].iter().all(|&b| b == 0xab));
    let (st, len) = d.req(T_GET_ID, 0, DATA, 20, F_WRITE);
    assert_eq!(st, S_OK);
    assert_eq!(len, 21);
}

#[test]
fn blk_malformed_requests_get_errors_not_panics() {
    let mut d = disk("bad");
    let sectors = 64 * 1024 / 512;
    // Out of range, and straddling the end.
    assert_eq!(d.req(T_IN, sectors, DATA, 512, F_WRITE).0, S_IOERR);
    assert_eq!(d.req(T_OUT, sectors - 1, DATA, 1024, 0).0, S_IOERR);
    assert_eq!(d.req(T_IN, u64::MAX / 256, DATA, 512, F_WRITE).0, S_IOERR);
    // Unknown type.
    assert_eq!(d.req(99, 0, DATA, 512, F_WRITE).0, S_UNSUPP);
    // Not a multiple of the sector size; absurd length.
    assert_eq!(d.req(T_IN, 0, DATA, 100, F_WRITE).0, S_IOERR);
    assert_eq!(d.req(T_IN, 0, DATA, 8 << 20, F_WRITE).0, S_IOERR);
    // A length that runs past guest memory: virtio-queue ends the chain at the
    // bad descriptor, so no status byte is left to write: a zero-length
    // completion, the status untouched.
    assert_eq!(d.req(T_IN, 0, DATA, u32::MAX, F_WRITE), (0xff, 0));
    // Data outside guest memory.
    assert_eq!(d.req(T_IN, 0, 1 << 40, 512, F_WRITE), (S_IOERR, 1));
    // Read into a driver-readable buffer.
    assert_eq!(d.req(T_IN, 0, DATA, 512, 0).0, S_IOERR);
    // Write-only header.
    d.f.set_desc(&d.q, 0, HDR, 16, F_NEXT | F_WRITE, 1);
    d.f.set_desc(&d.q, 1, STATUS_AT, 1, F_WRITE, 0);
    d.f.mem.write_obj(0xffu8, GuestAddress(STATUS_AT)).unwrap();
    assert_eq!(d.submit(0).0, S_IOERR);
    // A lone descriptor: no status byte to write; a zero-length completion.
    d.f.set_desc(&d.q, 3, HDR, 16, 0, 0);
    d.f.publish(&mut d.q, 3);
    d.f.w(reg::QUEUE_NOTIFY, 0);
    assert_eq!(d.f.pop_used(&mut d.q), Some((3, 0)));
    // A descriptor loop.
    d.f.set_desc(&d.q, 4, HDR, 16, F_NEXT, 4);
    d.f.publish(&mut d.q, 4);
    d.f.w(reg::QUEUE_NOTIFY, 0);
    let _ = d.f.pop_used(&mut d.q);
    // Notify of a queue that does not exist.
    d.f.w(reg::QUEUE_NOTIFY, 7);
    // After all that, the device still works.
    assert_eq!(d.f.r(reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    assert_eq!(d.req(T_IN, 0, DATA, 512, F_WRITE), (S_OK, 513));
    // A head index past the queue size: the ring is corrupt; the device stops
    // using it (DEVICE_NEEDS_RESET) and ignores further notifications.
    d.f.publish(&mut d.q, 999);
    d.f.w(reg::QUEUE_NOTIFY, 0);
    assert_ne!(d.f.r(reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    d.f.w(reg::QUEUE_NOTIFY, 0);
}

#[test]
fn blk_queue_outside_memory_needs_reset() {
    let f = Fake::new(memory::create(32 << 20).unwrap());
    let path = std::env::temp_dir().join(format!("castor-virtio-{}-oom.img", std::process::id()));
    let _g = TempPath(path.clone());
    std::fs::write(&path, vec![0u8; 4096]).unwrap();
    f.bus
        .add_virtio_blk(
            VirtioBlk::open(&BlkConfig {
                path,
                read_only: false,
            })
            .unwrap(),
        )
        .unwrap();
    f.w(reg::STATUS, 3);
    f.w(reg::DRIVER_FEATURES_SEL, 1);
    f.w(reg::DRIVER_FEATURES, 1);
    f.w(reg::STATUS, 3 | 8);
    f.w(reg::QUEUE_SEL, 0);
    f.w(reg::QUEUE_NUM, 16);
    f.w(reg::QUEUE_DESC_LOW, 0);
    f.w(reg::QUEUE_DESC_HIGH, 0x100);
    f.w(reg::QUEUE_READY, 1);
    f.w(reg::STATUS, 3 | 8 | 4);
    assert_ne!(f.r(reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    f.w(reg::QUEUE_NOTIFY, 0); // ignored, no panic
}

#[test]
fn blk_dirty_marks_used_ring_read_data_and_get_id() {
    let mut d = disk("dirty");
    let used_page = d.q.used();
    d.f.mem.write_obj(T_IN, GuestAddress(HDR)).unwrap();
    d.f.mem.write_obj(1u64, GuestAddress(HDR + 8)).unwrap();
    d.f.set_desc(&d.q, 0, HDR, 16, F_NEXT, 1);
    d.f.set_desc(&d.q, 1, DATA, 512, F_WRITE | F_NEXT, 2);
    d.f.set_desc(&d.q, 2, STATUS_AT, 1, F_WRITE, 0);
    d.f.publish(&mut d.q, 0);
    d.f.clear_dirty();
    d.f.w(reg::QUEUE_NOTIFY, 0);
    assert!(d.f.pop_used(&mut d.q).is_some());
    assert!(d.f.dirty(used_page), "used ring page not marked dirty");
    assert!(d.f.dirty(DATA), "block read data page not marked dirty");
    assert!(d.f.dirty(STATUS_AT), "status byte page not marked dirty");

    d.f.mem.write_obj(T_GET_ID, GuestAddress(HDR)).unwrap();
    let id_buf = 0x60_0000;
    d.f.set_desc(&d.q, 1, id_buf, 20, F_WRITE | F_NEXT, 2);
    d.f.publish(&mut d.q, 0);
    d.f.clear_dirty();
    d.f.w(reg::QUEUE_NOTIFY, 0);
    assert!(d.f.pop_used(&mut d.q).is_some());
    assert!(d.f.dirty(id_buf), "GET_ID buffer page not marked dirty");
}

#[test]
fn boot_config_page_is_marked_dirty() {
    let f = Fake::new(memory::create(32 << 20).unwrap());
    let name = format!("cv{}c", std::process::id() % 100_000);
    let tap = Arc::new(Tap::open(&name).expect("create tap (needs root)"));
    f.bus
        .add_virtio_net(VirtioNet::new(NetConfig {
            tap,
            mac: [2, 0, 0, 0, 0, 1],
            tx_sink: None,
        }))
        .unwrap();
    f.clear_dirty();
    NetParams::default().write_config(&f.mem, &f.bus).unwrap();
    assert!(f.dirty(layout::DEVICE_CONFIG_ADDR));
}

#[derive(Default)]
struct Recording(Mutex<Vec<Vec<u8>>>);
impl TxSink for Recording {
    fn transmit(&self, frame: &[u8]) -> TxOutcome {
        self.0.lock().unwrap().push(frame.to_vec());
        TxOutcome::Sent
    }
}

fn inject(tap: &Tap, frame: &[u8]) {
    let cname = std::ffi::CString::new(tap.name()).unwrap();
    // SAFETY: test-only raw socket calls with valid buffers.
    unsafe {
        let idx = libc::if_nametoindex(cname.as_ptr());
        assert_ne!(idx, 0);
        let s = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        assert!(
            s >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = idx as i32;
        sll.sll_halen = 6;
        let n = libc::sendto(
            s,
            frame.as_ptr() as *const libc::c_void,
            frame.len(),
            0,
            &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        assert_eq!(
            n,
            frame.len() as isize,
            "inject: {}",
            std::io::Error::last_os_error()
        );
        libc::close(s);
    }
}

#[test]
fn net_tx_goes_through_the_sink_and_rx_marks_buffers_dirty() {
    let f = Fake::new(memory::create(32 << 20).unwrap());
    let name = format!("cv{}n", std::process::id() % 100_000);
    let tap = Arc::new(Tap::open(&name).expect("create tap (needs root)"));
    struct Del(String);
    impl Drop for Del {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["link", "del", &self.0])
                .output();
        }
    }
    let _del = Del(name);
    tap.set_up().unwrap();
    let sink = Arc::new(Recording::default());
    let net = VirtioNet::new(NetConfig {
        tap: tap.clone(),
        mac: [2, 0, 0, 0, 0, 1],
        tx_sink: Some(sink.clone()),
    });
    f.bus.add_virtio_net(net).unwrap();
    let mut mac = [0u8; 6];
    for (i, m) in mac.iter_mut().enumerate() {
        let mut b = [0u8; 1];
        assert!(f.bus.read(f.base + reg::CONFIG + i as u64, &mut b));
        *m = b[0];
    }
    assert_eq!(mac, [2, 0, 0, 0, 0, 1]);
    let mut qs = f.init(
        VERSION_1 | EVENT_IDX | (1 << 5),
        &[(0, 0x40_0000), (1, 0x40_4000)],
    );
    let (mut rx, mut tx) = {
        let tx = qs.pop().unwrap();
        (qs.pop().unwrap(), tx)
    };

    // TX: one good frame (header + 60 bytes) and one malformed chain.
    let frame: Vec<u8> = (0..60u8).collect();
    f.mem
        .write_slice(&[0u8; 12], GuestAddress(0x48_0000))
        .unwrap();
    f.mem.write_slice(&frame, GuestAddress(0x48_000c)).unwrap();
    f.set_desc(&tx, 0, 0x48_0000, 72, 0, 0);
    f.publish(&mut tx, 0);
    f.set_desc(&tx, 1, 0x48_1000, 72, F_WRITE, 0);
    f.publish(&mut tx, 1);
    f.w(reg::QUEUE_NOTIFY, 1);
    assert_eq!(f.pop_used(&mut tx), Some((0, 0)));
    assert_eq!(f.pop_used(&mut tx), Some((1, 0)));
    assert_eq!(sink.0.lock().unwrap().clone(), vec![frame]);

    // RX: post buffers, inject a frame from the host side, poll.
    for i in 0..4u16 {
        f.set_desc(&rx, i, 0x70_0000 + i as u64 * 0x1000, 2048, F_WRITE, 0);
        f.publish(&mut rx, i);
    }
    let mut eth = vec![0xffu8; 6];
    eth.extend_from_slice(&[2, 0, 0, 0, 0, 9, 0x88, 0xb5]);
    eth.extend(std::iter::repeat_n(0x5a, 50));
    inject(&tap, &eth);
    // Kick until the kernel has queued it (no fixed wait: a loaded host
    // only takes longer). The tap may also carry frames of its own (IPv6
    // router solicitations): find ours, giving each other buffer back.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut found = false;
    while !found {
        assert!(
            std::time::Instant::now() < deadline,
            "the injected frame did not reach the RX ring in 20 s"
        );
        f.clear_dirty();
        f.w(reg::QUEUE_NOTIFY, 0);
        let mut used = 0;
        while let Some((id, len)) = f.pop_used(&mut rx) {
            used += 1;
            let addr = 0x70_0000 + id as u64 * 0x1000;
            let mut buf = vec![0u8; len as usize];
            f.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
            assert!(f.dirty(addr), "RX buffer page not marked dirty");
            assert_eq!(buf[10], 1, "num_buffers");
            if buf[12..] == eth[..] {
                found = true;
            } else {
                f.set_desc(&rx, id as u16, addr, 2048, F_WRITE, 0);
                f.publish(&mut rx, id as u16);
            }
        }
        if found {
            assert!(f.dirty(rx.used()), "RX used ring page not marked dirty");
        } else if used == 0 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

/// A sink that refuses (Full) until `open` is set, then records.
#[derive(Default)]
struct Gate {
    open: std::sync::atomic::AtomicBool,
    refused: std::sync::atomic::AtomicU32,
    frames: Mutex<Vec<Vec<u8>>>,
}
impl TxSink for Gate {
    fn transmit(&self, frame: &[u8]) -> TxOutcome {
        if !self.open.load(std::sync::atomic::Ordering::Relaxed) {
            self.refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return TxOutcome::Full;
        }
        self.frames.lock().unwrap().push(frame.to_vec());
        TxOutcome::Sent
    }
}

#[test]
fn net_tx_full_sink_leaves_frames_in_the_ring_and_retries_in_order() {
    let f = Fake::new(memory::create(32 << 20).unwrap());
    let name = format!("cv{}f", std::process::id() % 100_000);
    let tap = Arc::new(Tap::open(&name).expect("create tap (needs root)"));
    struct Del(String);
    impl Drop for Del {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["link", "del", &self.0])
                .output();
        }
    }
    let _del = Del(name);
    let sink = Arc::new(Gate::default());
    f.bus
        .add_virtio_net(VirtioNet::new(NetConfig {
            tap,
            mac: [2, 0, 0, 0, 0, 1],
            tx_sink: Some(sink.clone()),
        }))
        .unwrap();
    let mut qs = f.init(
        VERSION_1 | EVENT_IDX | (1 << 5),
        &[(0, 0x40_0000), (1, 0x40_4000)],
    );
    let mut tx = qs.pop().unwrap();
    let frames: Vec<Vec<u8>> = (0..3u8).map(|k| vec![k; 60]).collect();
    for (i, fr) in frames.iter().enumerate() {
        let a = 0x48_0000 + i as u64 * 0x1000;
        f.mem.write_slice(&[0u8; 12], GuestAddress(a)).unwrap();
        f.mem.write_slice(fr, GuestAddress(a + 12)).unwrap();
        f.set_desc(&tx, i as u16, a, 72, 0, 0);
        f.publish(&mut tx, i as u16);
    }
    // Full: nothing consumed, nothing dropped, the ring stays full.
    f.w(reg::QUEUE_NOTIFY, 1);
    f.w(reg::QUEUE_NOTIFY, 0);
    assert_eq!(f.pop_used(&mut tx), None, "a refused frame was consumed");
    assert!(sink.refused.load(std::sync::atomic::Ordering::Relaxed) >= 2);
    assert!(sink.frames.lock().unwrap().is_empty());
    // Room again: the next kick (of either queue) sends all three, in order.
    sink.open.store(true, std::sync::atomic::Ordering::Relaxed);
    f.w(reg::QUEUE_NOTIFY, 0);
    for i in 0..3u32 {
        assert_eq!(f.pop_used(&mut tx), Some((i, 0)));
    }
    assert_eq!(sink.frames.lock().unwrap().clone(), frames);
}
