//! The net workload: a polling virtio-net driver under smoltcp (no alloc)
//! and two TCP services.
//!
//! * counter on `port`: for each connected client, streams 8-byte big-endian
//!   sequence numbers 1, 2, 3, ... at `rate` per second (0: as fast as TCP
//!   takes them); input is discarded;
//! * echo on `port + 1`: sends back everything it receives.
//!
//! Given a disk (`blk_mmio`, `disk_blocks`), it also runs the continuous disk
//! workload's operations (`disk_soak::Soak`), 200 a second between polls; a
//! block that reads back wrong panics the guest (the VMM reports the text,
//! the services stop).
//!
//! The loop: poll smoltcp, run the services, then one kick of the device
//! (QueueNotify: TX if we queued frames, else RX as an idle poll). The VMM
//! sends our frames and moves waiting RX frames into our buffers within that
//! one exit, so the exit rate is one per loop, never one per packet.

use crate::mem::{
    self, NET_BUF, NET_QUEUE_SIZE, NET_RXQ, NET_RX_BUFS, NET_TXQ, NET_TX_BUFS, TCP_BUFS,
    TCP_BUF_BYTES,
};
use crate::rt;
use crate::virtq::{Mmio, Virtq, DESC_F_WRITE, F_RING_EVENT_IDX, F_VERSION_1};
use castor_guest_abi::{status, BootInfo, DeviceConfig};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet, SocketStorage};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address};

const HDR: usize = 12;
const F_MAC: u64 = 1 << 5;
const COUNTERS: usize = 2;
const ECHOS: usize = 2;

struct RxQueue {
    q: Virtq,
}

struct TxQueue {
    q: Virtq,
    free: [u16; NET_QUEUE_SIZE as usize],
    nfree: usize,
    queued: bool,
}

impl TxQueue {
    fn reclaim(&mut self) {
        while let Some((id, _)) = self.q.pop_used() {
            if self.nfree < self.free.len() {
                self.free[self.nfree] = id;
                self.nfree += 1;
            }
        }
    }
}

/// The virtio-net device as smoltcp sees it.
pub struct NetDev {
    mmio: Mmio,
    rx: RxQueue,
    tx: TxQueue,
}

pub struct RxTok<'a> {
    rx: &'a mut RxQueue,
    id: u16,
    len: usize,
}

pub struct TxTok<'a> {
    tx: &'a mut TxQueue,
}

impl phy::RxToken for RxTok<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let addr = NET_RX_BUFS + self.id as u64 * NET_BUF;
        let len = self.len.clamp(HDR, NET_BUF as usize);
        // SAFETY: RX buffer `id` is ours again (the device returned it in the used ring).
        let buf = unsafe { mem::slice(addr, len) };
        let r = f(&buf[HDR..]);
        // Post the buffer again.
        self.rx.q.push_avail(self.id);
        r
    }
}

impl phy::TxToken for TxTok<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        // transmit() checked that a buffer is free.
        self.tx.nfree -= 1;
        let id = self.tx.free[self.tx.nfree];
        let addr = NET_TX_BUFS + id as u64 * NET_BUF;
        let len = len.min(NET_BUF as usize - HDR);
        // SAFETY: TX buffer `id` is free (not in the device's hands).
        let buf = unsafe { mem::slice(addr, HDR + len) };
        buf[..HDR].fill(0);
        let r = f(&mut buf[HDR..]);
        self.tx.q.set_desc_len(id, (HDR + len) as u32);
        self.tx.q.push_avail(id);
        self.tx.queued = true;
        r
    }
}

impl Device for NetDev {
    type RxToken<'a> = RxTok<'a>;
    type TxToken<'a> = TxTok<'a>;

    fn receive(&mut self, _: Instant) -> Option<(RxTok<'_>, TxTok<'_>)> {
        self.tx.reclaim();
        if self.tx.nfree == 0 {
            return None;
        }
        let (id, len) = self.rx.q.pop_used()?;
        Some((
            RxTok {
                rx: &mut self.rx,
                id,
                len: len as usize,
            },
            TxTok { tx: &mut self.tx },
        ))
    }

    fn transmit(&mut self, _: Instant) -> Option<TxTok<'_>> {
        self.tx.reclaim();
        if self.tx.nfree == 0 {
            return None;
        }
        Some(TxTok { tx: &mut self.tx })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = 1514;
        c
    }
}

impl NetDev {
    pub fn new(base: u64) -> Self {
        let mmio = Mmio { base };
        let mut rxq = Virtq::new(NET_RXQ, NET_QUEUE_SIZE);
        let mut txq = Virtq::new(NET_TXQ, NET_QUEUE_SIZE);
        for i in 0..NET_QUEUE_SIZE {
            rxq.set_desc(
                i,
                NET_RX_BUFS + i as u64 * NET_BUF,
                NET_BUF as u32,
                DESC_F_WRITE,
                0,
            );
            txq.set_desc(i, NET_TX_BUFS + i as u64 * NET_BUF, 0, 0, 0);
        }
        mmio.init(
            1,
            F_VERSION_1 | F_RING_EVENT_IDX | F_MAC,
            &[(0, &rxq), (1, &txq)],
        );
        for i in 0..NET_QUEUE_SIZE {
            rxq.push_avail(i);
        }
        let mut free = [0u16; NET_QUEUE_SIZE as usize];
        for (i, f) in free.iter_mut().enumerate() {
            *f = i as u16;
        }
        NetDev {
            mmio,
            rx: RxQueue { q: rxq },
            tx: TxQueue {
                q: txq,
                free,
                nfree: NET_QUEUE_SIZE as usize,
                queued: false,
            },
        }
    }

    /// One exit: sends what we queued and pulls waiting RX frames.
    pub fn kick(&mut self) {
        if self.tx.queued {
            self.tx.queued = false;
            self.mmio.notify(1);
        } else {
            self.mmio.notify(0);
        }
    }
}

struct Clock {
    khz: u64,
}

impl Clock {
    fn now(&self) -> Instant {
        let us = (rt::rdtsc() as u128 * 1000 / self.khz.max(1) as u128) as i64;
        Instant::from_micros(us)
    }
}

struct Counter {
    handle: SocketHandle,
    active: bool,
    next: u64,
    start_us: i64,
}

pub fn run(vcpu: u64, info: &BootInfo, cfg: &DeviceConfig) -> ! {
    if vcpu != 0 {
        rt::stop(status::DONE);
    }
    if cfg.net_mmio == 0 {
        rt::stop(status::BAD_BOOT_INFO);
    }
    let clock = Clock { khz: info.tsc_khz };
    let mut dev = NetDev::new(cfg.net_mmio);
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&cfg.mac[..6]);
    let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
    config.random_seed = info.seed ^ rt::rdtsc();
    let mut iface = Interface::new(config, &mut dev, clock.now());
    let ip = Ipv4Address::new(cfg.ipv4[0], cfg.ipv4[1], cfg.ipv4[2], cfg.ipv4[3]);
    iface.update_ip_addrs(|a| {
        let _ = a.push(IpCidr::new(ip.into(), cfg.prefix_len as u8));
    });
    if cfg.gateway != [0; 4] {
        let gw = Ipv4Address::new(
            cfg.gateway[0],
            cfg.gateway[1],
            cfg.gateway[2],
            cfg.gateway[3],
        );
        let _ = iface.routes_mut().add_default_ipv4_route(gw);
    }

    let mut storage: [SocketStorage<'_>; COUNTERS + ECHOS] = Default::default();
    let mut sockets = SocketSet::new(&mut storage[..]);
    let mut next_buf = TCP_BUFS;
    let mut new_socket = || {
        // SAFETY: each socket gets its own two TCP_BUF_BYTES ranges of reserved RAM.
        let (rx, tx) = unsafe {
            let rx = mem::slice(next_buf, TCP_BUF_BYTES);
            let tx = mem::slice(next_buf + TCP_BUF_BYTES as u64, TCP_BUF_BYTES);
            (rx, tx)
        };
        next_buf += 2 * TCP_BUF_BYTES as u64;
        let mut s = tcp::Socket::new(tcp::SocketBuffer::new(rx), tcp::SocketBuffer::new(tx));
        s.set_nagle_enabled(false);
        s.set_ack_delay(None);
        s
    };
    let mut counters: [Option<Counter>; COUNTERS] = Default::default();
    for c in counters.iter_mut() {
        let handle = sockets.add(new_socket());
        *c = Some(Counter {
            handle,
            active: false,
            next: 1,
            start_us: 0,
        });
    }
    let mut echos: [Option<SocketHandle>; ECHOS] = [None; ECHOS];
    for e in echos.iter_mut() {
        *e = Some(sockets.add(new_socket()));
    }
    let port = cfg.port as u16;
    let rate = cfg.rate;
    let mut scratch = [0u8; 4096];
    let mut disk = if cfg.blk_mmio != 0 && cfg.disk_blocks != 0 {
        Some((
            crate::disk::Blk::new(cfg.blk_mmio),
            crate::disk_soak::Soak::new(info, cfg.disk_blocks),
        ))
    } else {
        None
    };
    let disk_ticks = info.tsc_khz.max(1) * 1000 / 200;
    let mut disk_next = rt::rdtsc();

    loop {
        let now = clock.now();
        iface.poll(now, &mut dev, &mut sockets);
        for c in counters.iter_mut().flatten() {
            let s = sockets.get_mut::<tcp::Socket>(c.handle);
            if !s.is_open() {
                let _ = s.listen(port);
                c.active = false;
                continue;
            }
            if s.is_active() && !c.active && s.may_send() {
                c.active = true;
                c.next = 1;
                c.start_us = now.total_micros();
            }
            // Discard input.
            while s.can_recv() {
                if s.recv(|b| (b.len(), ())).is_err() {
                    break;
                }
            }
            if !s.may_recv() && s.state() == tcp::State::CloseWait {
                s.close();
            }
            if c.active && s.may_send() {
                let free = (s.send_capacity() - s.send_queue()) / 8;
                let mut n = free.min(scratch.len() / 8) as u64;
                if rate != 0 {
                    let elapsed = (now.total_micros() - c.start_us).max(0) as u128;
                    let due = (elapsed * rate as u128 / 1_000_000) as u64 + 1;
                    n = n.min(due.saturating_sub(c.next - 1));
                }
                for i in 0..n as usize {
                    scratch[i * 8..i * 8 + 8].copy_from_slice(&c.next.to_be_bytes());
                    c.next += 1;
                }
                if n > 0 {
                    let _ = s.send_slice(&scratch[..n as usize * 8]);
                }
            }
        }
        for h in echos.iter().flatten() {
            let s = sockets.get_mut::<tcp::Socket>(*h);
            if !s.is_open() {
                let _ = s.listen(port + 1);
                continue;
            }
            if s.can_recv() && s.may_send() {
                let free = (s.send_capacity() - s.send_queue()).min(scratch.len());
                if let Ok(n) = s.recv_slice(&mut scratch[..free]) {
                    let _ = s.send_slice(&scratch[..n]);
                }
            }
            if !s.may_recv() && s.state() == tcp::State::CloseWait {
                s.close();
            }
        }
        if let Some((blk, soak)) = disk.as_mut() {
            let t = rt::rdtsc();
            if t >= disk_next {
                disk_next = t + disk_ticks;
                if let Err(m) = soak.step(blk) {
                    panic!(
                        "disk block {} reads back round {}, expected round {}",
                        m.block, m.found, m.want
                    );
                }
            }
        }
        iface.poll(clock.now(), &mut dev, &mut sockets);
        dev.kick();
    }
}
