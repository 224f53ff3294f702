//! Announcing a guest at a new port: a gratuitous ARP, request and reply
//! forms, from the guest's MAC for its IPv4 address, both read from the
//! guest's device configuration ([`castor_guest_abi::DeviceConfig`]) in its
//! (replicated) memory. The built-in guest is IPv4-only, so there is no
//! unsolicited IPv6 neighbour advertisement.

use crate::mac::MacAddr;
use crate::net::TapRelease;
use castor_guest_abi::{layout::DEVICE_CONFIG_ADDR, DeviceConfig};
use castor_vmm::Vm;
use std::net::Ipv4Addr;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

/// A guest's address on the LAN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestNetAddress {
    /// Its MAC.
    pub mac: MacAddr,
    /// Its IPv4 address.
    pub ipv4: Ipv4Addr,
}

/// The guest's address could not be read.
#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    /// Its device configuration is not readable in guest memory.
    #[error("cannot read the guest's network configuration: {0}")]
    Read(#[from] GuestMemoryError),
    /// The guest memory holds no device configuration (not a device workload).
    #[error("no network configuration in the guest")]
    NoConfig,
}

/// Reads the guest's MAC and IPv4 address from its device configuration.
pub fn guest_net_address(vm: &Vm) -> Result<GuestNetAddress, AnnounceError> {
    let mut raw = [0u8; DeviceConfig::SIZE];
    vm.memory()
        .read_slice(&mut raw, GuestAddress(DEVICE_CONFIG_ADDR))?;
    let cfg = DeviceConfig::parse(&raw).ok_or(AnnounceError::NoConfig)?;
    Ok(GuestNetAddress {
        mac: MacAddr(cfg.mac_address()),
        ipv4: Ipv4Addr::from(cfg.ipv4),
    })
}

/// Sends the gratuitous ARP for `addr` on `tap`, request form then reply form.
pub fn announce(tap: &TapRelease, addr: GuestNetAddress) {
    for reply in [false, true] {
        tap.send(&gratuitous_arp(addr.mac, addr.ipv4, reply));
    }
}

/// A gratuitous ARP for `ip` at `mac`: a broadcast ARP frame with the
/// sender and target protocol address both `ip` (RFC 5227 announcement),
/// padded to the 60-byte Ethernet minimum. `reply` picks the ARP reply form
/// (opcode 2) instead of the request form (opcode 1); some peers update
/// their caches only on one of them, so a takeover sends both.
pub fn gratuitous_arp(mac: MacAddr, ip: Ipv4Addr, reply: bool) -> Vec<u8> {
    let mac = mac.octets();
    let ip = ip.octets();
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06]); // ARP
    f.extend_from_slice(&[0x00, 0x01, 0x08, 0x00, 6, 4]); // Ethernet, IPv4
    f.extend_from_slice(&[0x00, if reply { 2 } else { 1 }]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip);
    if reply {
        f.extend_from_slice(&mac);
    } else {
        f.extend_from_slice(&[0; 6]);
    }
    f.extend_from_slice(&ip);
    f.resize(60, 0);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garp_layout() {
        let mac = MacAddr([2, 0xca, 0x57, 0, 0, 2]);
        let ip = Ipv4Addr::new(10, 0, 0, 2);
        let f = gratuitous_arp(mac, ip, false);
        assert_eq!(f.len(), 60);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac.octets());
        assert_eq!(&f[12..14], &[8, 6]);
        assert_eq!(&f[20..22], &[0, 1]);
        assert_eq!(&f[22..28], &mac.octets());
        assert_eq!(&f[28..32], &[10, 0, 0, 2]);
        assert_eq!(&f[32..38], &[0; 6]);
        assert_eq!(&f[38..42], &[10, 0, 0, 2]);
        let r = gratuitous_arp(mac, ip, true);
        assert_eq!(&r[20..22], &[0, 2]);
        assert_eq!(&r[32..38], &mac.octets());
    }
}
