//! A client of the network guest's TCP counter service, as an outside
//! client sees it: it connects to `ip:port`, reads the stream of 8-byte
//! big-endian numbers 1, 2, 3, ... and checks that it never resets, skips
//! or repeats a number, and measures how long the stream stalled. Used by
//! `castor drill` on a network guest and by `castor demo --network`.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What broke the stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamFault {
    /// The connection could not be made.
    #[error("cannot connect to the counter service at {addr}: {error}")]
    Connect {
        /// The service.
        addr: SocketAddr,
        /// The socket error.
        error: std::io::ErrorKind,
    },
    /// The guest side closed the connection.
    #[error("the connection was closed by the guest side after value {after}")]
    Closed {
        /// Last value received.
        after: u64,
    },
    /// A socket error (a reset: the connection's state was lost).
    #[error("connection error after value {after}: {error}")]
    Reset {
        /// Last value received.
        after: u64,
        /// The socket error.
        error: std::io::ErrorKind,
    },
    /// A value out of sequence.
    #[error("got {got}, expected {expected} ({})", if got < expected { "a duplicate" } else { "a gap" })]
    OutOfSequence {
        /// The value received.
        got: u64,
        /// The value expected.
        expected: u64,
    },
}

#[derive(Default)]
struct Shared {
    values: AtomicU64,
    stop: AtomicBool,
    fault: Mutex<Option<StreamFault>>,
    /// (since start, gap) of every stall longer than [`STALL`].
    stalls: Mutex<Vec<(Duration, Duration)>>,
    last_read: Mutex<Option<Duration>>,
}

/// A pause in the stream at least this long is recorded as a stall.
pub const STALL: Duration = Duration::from_millis(50);

/// A running counter client.
pub struct CounterClient {
    addr: SocketAddr,
    start: Instant,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// One stall of the stream.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Stall {
    /// When the stream stopped, seconds since the client started.
    pub at_s: f64,
    /// For how long, ms.
    pub ms: f64,
}

impl CounterClient {
    /// Connects to `addr` (retrying for up to `connect_for`) and starts reading.
    pub fn start(addr: SocketAddr, connect_for: Duration) -> Result<CounterClient, StreamFault> {
        let end = Instant::now() + connect_for;
        let stream = loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= end => {
                    return Err(StreamFault::Connect {
                        addr,
                        error: e.kind(),
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
        let shared = Arc::new(Shared::default());
        let start = Instant::now();
        let s2 = shared.clone();
        let thread = std::thread::Builder::new()
            .name("counter-client".into())
            .spawn(move || read_loop(stream, &s2, start))
            .map_err(|e| StreamFault::Connect {
                addr,
                error: e.kind(),
            })?;
        Ok(CounterClient {
            addr,
            start,
            shared,
            thread: Some(thread),
        })
    }

    /// The service's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Values received so far (the last one is this number).
    pub fn values(&self) -> u64 {
        self.shared.values.load(Ordering::Relaxed)
    }

    /// The first fault, if any.
    pub fn fault(&self) -> Option<StreamFault> {
        self.shared
            .fault
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Seconds since the client started.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Every stall so far (the current one too, if the stream is stalled now).
    pub fn stalls(&self) -> Vec<Stall> {
        let mut v: Vec<Stall> = self
            .shared
            .stalls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(at, gap)| Stall {
                at_s: at.as_secs_f64(),
                ms: gap.as_secs_f64() * 1e3,
            })
            .collect();
        if let Some(last) = *self
            .shared
            .last_read
            .lock()
            .unwrap_or_else(|e| e.into_inner())
        {
            let gap = self.start.elapsed().saturating_sub(last);
            if gap >= STALL {
                v.push(Stall {
                    at_s: last.as_secs_f64(),
                    ms: gap.as_secs_f64() * 1e3,
                });
            }
        }
        v
    }

    /// Stops reading.
    pub fn stop(mut self) -> (u64, Option<StreamFault>, Vec<Stall>) {
        let stalls = self.stalls();
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        (self.values(), self.fault(), stalls)
    }
}

impl Drop for CounterClient {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

fn read_loop(mut s: TcpStream, sh: &Shared, start: Instant) {
    let fail = |f: StreamFault| {
        let mut g = sh.fault.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            *g = Some(f);
        }
    };
    let mut buf = vec![0u8; 64 << 10];
    let mut pending: Vec<u8> = Vec::new();
    let mut next = 1u64;
    let mut last: Option<Duration> = None;
    while !sh.stop.load(Ordering::Relaxed) {
        let n = match s.read(&mut buf) {
            Ok(0) => return fail(StreamFault::Closed { after: next - 1 }),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => {
                return fail(StreamFault::Reset {
                    after: next - 1,
                    error: e.kind(),
                })
            }
        };
        let now = start.elapsed();
        if let Some(prev) = last {
            let gap = now.saturating_sub(prev);
            if gap >= STALL {
                sh.stalls
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((prev, gap));
            }
        }
        last = Some(now);
        *sh.last_read.lock().unwrap_or_else(|e| e.into_inner()) = Some(now);
        pending.extend_from_slice(&buf[..n]);
        let whole = pending.len() / 8 * 8;
        for w in pending[..whole].chunks_exact(8) {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            let v = u64::from_be_bytes(b);
            if v != next {
                return fail(StreamFault::OutOfSequence {
                    got: v,
                    expected: next,
                });
            }
            next += 1;
        }
        pending.drain(..whole);
        sh.values.store(next - 1, Ordering::Relaxed);
    }
}
