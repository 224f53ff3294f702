//! A Linux tap device: our own small wrapper over `/dev/net/tun`.
//!
//! Why not a crate: the crates on crates.io either wrap TUN (layer 3) only,
//! pull in an async runtime, or do not expose `IFF_VNET_HDR` and
//! `TUNSETVNETHDRSZ`, which is what lets a frame move between the tap and a
//! virtio-net queue with its 12-byte `virtio_net_hdr_v1` and no reformatting.
//! The whole thing is three ioctls, so it lives here, with the `unsafe` kept
//! to those ioctls and the read/write calls.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// Bytes of the virtio-net header (`virtio_net_hdr_v1`, VERSION_1) that
/// precede every frame read from or written to the tap.
pub const VNET_HDR_LEN: usize = 12;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// Errors of tap setup.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The interface name is empty, too long or not ASCII.
    #[error("invalid tap name {0:?}: use 1 to 15 ASCII characters")]
    BadName(String),
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open /dev/net/tun: {0} (is the tun module loaded?)")]
    OpenTun(#[source] io::Error),
    /// Not allowed to create or attach the tap.
    #[error(
        "not permitted to create or attach tap {name:?}: creating a tap needs CAP_NET_ADMIN; \
         run as root, or have root create it first with `ip tuntap add {name} mode tap user $USER vnet_hdr`"
    )]
    Permission {
        /// The interface name.
        name: String,
    },
    /// An ioctl failed.
    #[error("{op} on tap {name:?} failed: {source}")]
    Ioctl {
        /// Which ioctl.
        op: &'static str,
        /// The interface name.
        name: String,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
}

/// An open tap interface in `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` mode,
/// non-blocking.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Tap {
    /// Opens the tap `name`, creating it if it does not exist (which needs
    /// CAP_NET_ADMIN). A tap created here disappears when the last file
    /// descriptor on it closes.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if name.is_empty()
            || name.len() >= libc::IFNAMSIZ
            || !name.is_ascii()
            || name.contains('\0')
        {
            return Err(TapError::BadName(name.into()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReqFlags {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq` (40 bytes); `req` is a
        // valid, initialised 40-byte repr(C) buffer that outlives the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EPERM) || e.raw_os_error() == Some(libc::EACCES) {
                return Err(TapError::Permission { name: name.into() });
            }
            return Err(TapError::Ioctl {
                op: "TUNSETIFF",
                name: name.into(),
                source: e,
            });
        }
        let actual = CStr::from_bytes_until_nul(&req.name)
            .ok()
            .and_then(|c| c.to_str().ok())
            .unwrap_or(name)
            .to_string();
        let tap = Tap { file, name: actual };
        let hdr: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, valid for the call.
        let rc = unsafe { libc::ioctl(tap.fd(), TUNSETVNETHDRSZ as _, &hdr) };
        tap.check(rc, "TUNSETVNETHDRSZ")?;
        // No offloads: every frame is a plain, checksummed Ethernet frame of at most MTU bytes.
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is accessed.
        let rc = unsafe { libc::ioctl(tap.fd(), TUNSETOFFLOAD as _, 0 as libc::c_ulong) };
        tap.check(rc, "TUNSETOFFLOAD")?;
        Ok(tap)
    }

    fn check(&self, rc: libc::c_int, op: &'static str) -> Result<(), TapError> {
        if rc < 0 {
            return Err(TapError::Ioctl {
                op,
                name: self.name.clone(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Brings the interface up (SIOCSIFFLAGS with IFF_UP; needs CAP_NET_ADMIN).
    pub fn set_up(&self) -> Result<(), TapError> {
        // SAFETY: plain socket(2) call; the fd is closed below.
        let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        self.check(sock, "socket")?;
        let mut req = IfReqFlags {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        req.name[..self.name.len()].copy_from_slice(self.name.as_bytes());
        // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write a 40-byte `struct ifreq`;
        // `req` is one, valid for both calls; `sock` is the socket opened above.
        let rc = unsafe { libc::ioctl(sock, libc::SIOCGIFFLAGS as _, &mut req) };
        let rc = if rc < 0 {
            rc
        } else {
            req.flags |= libc::IFF_UP as libc::c_short;
            // SAFETY: as above.
            unsafe { libc::ioctl(sock, libc::SIOCSIFFLAGS as _, &req) }
        };
        let err = io::Error::last_os_error();
        // SAFETY: closes the socket this function opened.
        unsafe { libc::close(sock) };
        if rc < 0 {
            if err.raw_os_error() == Some(libc::EPERM) {
                return Err(TapError::Permission {
                    name: self.name.clone(),
                });
            }
            return Err(TapError::Ioctl {
                op: "SIOCSIFFLAGS",
                name: self.name.clone(),
                source: err,
            });
        }
        Ok(())
    }

    /// Reads one frame with its virtio-net header into `buf`; `Ok(None)` when
    /// no frame is waiting.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: read(2) writes at most `buf.len()` bytes into the valid buffer.
        let n = unsafe { libc::read(self.fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(n as usize))
    }

    /// Writes one Ethernet frame, prefixed with a zero virtio-net header (no
    /// offloads), in one `writev`.
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<()> {
        let hdr = [0u8; VNET_HDR_LEN];
        let iov = [
            libc::iovec {
                iov_base: hdr.as_ptr() as *mut libc::c_void,
                iov_len: hdr.len(),
            },
            libc::iovec {
                iov_base: frame.as_ptr() as *mut libc::c_void,
                iov_len: frame.len(),
            },
        ];
        // SAFETY: writev reads the two valid buffers described by `iov`.
        let n = unsafe { libc::writev(self.fd(), iov.as_ptr(), 2) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
