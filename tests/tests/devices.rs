//! virtio devices driven by the built-in guest on real KVM: the disk
//! workload against a raw image, the TCP services over a tap to a client in
//! a network namespace, and a serving guest captured and restored mid-stream.

use castor_guest_abi::{disk_pattern, DISK_BLOCK_BYTES};
use castor_tests::require_kvm;
use castor_vmm::devices::{BlkConfig, NetConfig, Tap, VirtioBlk, VirtioNet};
use castor_vmm::{
    DiskParams, GuestBoot, NetParams, NullSink, StopReason, VcpuRunState, Vm, VmConfig, Workload,
};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MEM: u64 = 64 << 20;

fn vm() -> Vm {
    Vm::new(
        &VmConfig {
            vcpus: 1,
            mem_bytes: MEM,
            ..Default::default()
        },
        Arc::new(NullSink),
    )
    .expect("create VM")
}

fn wait_stopped(vm: &Vm, timeout: Duration) -> VcpuRunState {
    let end = Instant::now() + timeout;
    loop {
        let s = vm.vcpu_states()[0].clone();
        if matches!(s, VcpuRunState::Stopped(_)) || Instant::now() > end {
            return s;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A temporary file removed on drop.
struct TempFile(std::path::PathBuf);
impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The disk guest writes numbered blocks, flushes, reads them back; then it
/// sends virtio-blk malformed requests from the guest itself (buffers outside
/// guest memory, a write-only header, an unknown type, a partial sector, a
/// read into a read-only buffer, no status descriptor) and a corrupt avail
/// ring: it reports DONE only if each got an error (and the device kept
/// serving valid requests, then asked for a reset), and the VMM survives.
#[test]
fn disk_blocks_read_back_from_the_host_image() {
    require_kvm();
    let path = std::env::temp_dir().join(format!("castor-disk-{}.img", std::process::id()));
    let _guard = TempFile(path.clone());
    std::fs::write(&path, vec![0u8; 1 << 20]).expect("create image");
    let vm = vm();
    let blk = VirtioBlk::open(&BlkConfig {
        path: path.clone(),
        read_only: false,
    })
    .expect("open image");
    vm.devices().add_virtio_blk(blk).expect("add blk");
    let blocks = 64;
    vm.boot(&GuestBoot {
        workload: Workload::Disk(DiskParams {
            blocks,
            continuous: false,
            rate: 0,
            ops: 0,
            sequential: false,
        }),
        seed: 7,
    })
    .expect("boot");
    vm.resume();
    let s = wait_stopped(&vm, Duration::from_secs(30));
    assert_eq!(
        s,
        VcpuRunState::Stopped(StopReason::GuestDone),
        "disk workload did not finish cleanly"
    );
    let data = std::fs::read(&path).expect("read image");
    for b in 0..blocks {
        for i in 0..DISK_BLOCK_BYTES {
            let at = (b * DISK_BLOCK_BYTES + i) as usize;
            assert_eq!(
                data[at],
                disk_pattern(7, b, i),
                "block {b} byte {i} differs on the host"
            );
        }
    }
    assert!(
        data[(blocks * DISK_BLOCK_BYTES) as usize..]
            .iter()
            .all(|&x| x == 0),
        "writes past the blocks"
    );
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A tap moved into a network namespace of its own, with the host side's
/// address; removed (namespace and tap) on drop, even when the test fails.
struct NetEnv {
    ns: String,
    tap: Arc<Tap>,
    guest_ip: [u8; 4],
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl NetEnv {
    fn new() -> NetEnv {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = std::process::id() % 100_000;
        let ns = format!("castor-t{id}-{n}");
        let name = format!("ct{id}x{n}");
        let subnet = (id % 200 + n * 7 % 50) as u8 + 1;
        let tap = Arc::new(Tap::open(&name).expect("create tap (needs root)"));
        let env = NetEnv {
            ns: ns.clone(),
            tap,
            guest_ip: [10, 213, subnet, 2],
        };
        ip(&["netns", "add", &ns]);
        ip(&["link", "set", &name, "netns", &ns]);
        let host = format!("10.213.{subnet}.1/24");
        ip(&["-n", &ns, "addr", "add", &host, "dev", &name]);
        ip(&["-n", &ns, "link", "set", &name, "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        env
    }

    fn params(&self, rate: u64) -> NetParams {
        NetParams {
            ip: self.guest_ip,
            prefix_len: 24,
            gateway: None,
            mac: [0x02, 0xca, 0x57, 0, 0, 2],
            port: 7000,
            rate,
        }
    }

    fn add_net(&self, vm: &Vm) {
        let net = VirtioNet::new(NetConfig {
            tap: self.tap.clone(),
            mac: [0x02, 0xca, 0x57, 0, 0, 2],
            tx_sink: None,
        });
        vm.devices().add_virtio_net(net).expect("add net");
    }

    /// Connects from inside the namespace (a thread joins it; the socket stays in it).
    fn connect(&self, port: u16) -> TcpStream {
        let ns = self.ns.clone();
        let addr = SocketAddr::from((self.guest_ip, port));
        std::thread::spawn(move || {
            let f = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("open netns");
            // SAFETY: setns on this thread only, with a valid namespace fd.
            let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            let end = Instant::now() + Duration::from_secs(20);
            loop {
                match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                    Ok(s) => return s,
                    Err(e) if Instant::now() > end => panic!("connect to the guest at {addr}: {e}"),
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        })
        .join()
        .expect("connect thread")
    }
}

impl Drop for NetEnv {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
        let _ = Command::new("ip")
            .args(["link", "del", self.tap.name()])
            .output();
    }
}

/// Reads `n` sequence numbers and checks they continue from `*next`.
fn read_seq(s: &mut TcpStream, next: &mut u64, n: u64) {
    let mut b = [0u8; 8];
    for _ in 0..n {
        s.read_exact(&mut b).expect("read the counter stream");
        let v = u64::from_be_bytes(b);
        assert_eq!(v, *next, "gap or duplicate in the stream");
        *next += 1;
    }
}

fn no_fault(vm: &Vm) {
    if let VcpuRunState::Stopped(r) = &vm.vcpu_states()[0] {
        panic!("guest stopped: {r}");
    }
}

#[test]
fn net_counter_stream_and_echo_over_tap() {
    require_kvm();
    let env = NetEnv::new();
    let vm = vm();
    env.add_net(&vm);
    vm.boot(&GuestBoot {
        workload: Workload::Net(env.params(0)),
        seed: 3,
    })
    .expect("boot");
    vm.resume();
    let mut s = env.connect(7000);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut next = 1;
    read_seq(&mut s, &mut next, 200_000);
    no_fault(&vm);

    let mut e = env.connect(7001);
    e.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let msg: Vec<u8> = (0..100_000u32).map(|i| (i * 31 % 251) as u8).collect();
    let w = {
        let mut e2 = e.try_clone().unwrap();
        let m = msg.clone();
        std::thread::spawn(move || e2.write_all(&m).expect("write to echo"))
    };
    let mut back = vec![0u8; msg.len()];
    e.read_exact(&mut back).expect("read the echo");
    w.join().unwrap();
    assert_eq!(back, msg, "echo differs");
    // The counter stream is still going, unbroken.
    read_seq(&mut s, &mut next, 10_000);
    no_fault(&vm);
}

#[test]
fn net_stream_continues_after_capture_and_restore_into_a_fresh_vm() {
    require_kvm();
    let env = NetEnv::new();
    let vm1 = vm();
    env.add_net(&vm1);
    vm1.boot(&GuestBoot {
        workload: Workload::Net(env.params(20_000)),
        seed: 5,
    })
    .expect("boot");
    vm1.resume();
    let mut s = env.connect(7000);
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut next = 1;
    read_seq(&mut s, &mut next, 5_000);

    // Mid-stream: pause, capture, hand the tap over to a fresh VM.
    vm1.pause();
    let state = vm1.capture_state().expect("capture");
    let memory = vm1.read_memory().expect("read memory");
    drop(vm1);
    let vm2 = vm();
    env.add_net(&vm2);
    vm2.write_memory(&memory).expect("write memory");
    vm2.restore_state(&state).expect("restore");
    vm2.resume();

    // Everything the first VM sent before capture and everything the second
    // sends after, with no gap and no duplicate.
    read_seq(&mut s, &mut next, 20_000);
    no_fault(&vm2);
}
