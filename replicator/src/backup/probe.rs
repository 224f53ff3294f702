//! Failover in milliseconds when only the primary's process dies.
//!
//! A primary whose process died on a host that lives leaves its UDP port
//! closed: the host answers anything sent there with ICMP port unreachable.
//! The backup keeps a *connected* UDP socket to the primary's QUIC address
//! and sends it an empty datagram every heartbeat period; the kernel reports
//! an ICMP port unreachable for exactly that address and port to that
//! socket as `ECONNREFUSED`. That is taken as the loss at once (no timeout
//! to wait out): the process that held the session is gone, whatever comes
//! next. Host death, a cut link or a frozen process send no ICMP and still
//! fall to the timeout.
//!
//! What the reply proves: the ICMP message quotes our datagram's addresses
//! and ports, and the kernel delivers it only to the socket connected to
//! that peer from that port (an ephemeral one), so an off-path host cannot
//! forge it without guessing the port; an empty datagram is dropped by a
//! live QUIC endpoint (quinn ignores what it cannot parse).

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::Duration;

/// Resolves when the host at `peer` reports its UDP port closed (ICMP port
/// unreachable), probing every `period`. Never resolves while the port is
/// open or the host is silent; other socket errors end the probing (the
/// timeout then decides, as without it).
pub(super) async fn port_closed(peer: SocketAddr, period: Duration) -> bool {
    let local: SocketAddr = if peer.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = match tokio::net::UdpSocket::bind(local).await {
        Ok(s) => s,
        Err(e) => {
            log::warn!("port probe of {peer}: {e}; only the timeout detects a dead primary");
            return false;
        }
    };
    if let Err(e) = sock.connect(peer).await {
        log::warn!("port probe of {peer}: {e}; only the timeout detects a dead primary");
        return false;
    }
    let mut buf = [0u8; 64];
    loop {
        match sock.send(&[]).await {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => return true,
            Err(e) => {
                log::warn!("port probe of {peer}: {e}; only the timeout detects a dead primary");
                return false;
            }
        }
        match tokio::time::timeout(period, sock.recv(&mut buf)).await {
            // Nothing answers a live endpoint's empty datagram.
            Err(_) | Ok(Ok(_)) => {}
            Ok(Err(e)) if e.kind() == ErrorKind::ConnectionRefused => return true,
            Ok(Err(e)) => {
                log::warn!("port probe of {peer}: {e}; only the timeout detects a dead primary");
                return false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::port_closed;
    use std::time::Duration;

    #[tokio::test]
    async fn a_closed_port_is_reported_and_an_open_one_is_not() {
        // An open port (a bound socket that never answers): no verdict.
        let open = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = open.local_addr().unwrap();
        let r = tokio::time::timeout(
            Duration::from_millis(300),
            port_closed(addr, Duration::from_millis(5)),
        )
        .await;
        assert!(r.is_err(), "an open port was reported closed");
        // The same port once its socket is gone: reported (loopback always
        // answers with ICMP port unreachable).
        drop(open);
        let closed = tokio::time::timeout(
            Duration::from_secs(30),
            port_closed(addr, Duration::from_millis(5)),
        )
        .await;
        assert_eq!(closed, Ok(true));
    }
}
