//! The built-in guest image and the parameters of its workloads.

use crate::error::{Error, Result};
use castor_guest_abi::{layout, pattern, DirtierConfig};
use std::fmt;
use std::str::FromStr;

/// The built-in guest's ELF image, built from `guest/image` by `vmm/build.rs`.
pub static GUEST_IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/castor-guest.elf"));

/// Access pattern of the dirtier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pattern {
    /// Pages in order.
    Sequential,
    /// Pages uniformly at random.
    Uniform,
    /// 90% of touches on 10% of the pages.
    HotCold,
}

impl FromStr for Pattern {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "sequential" | "seq" => Ok(Pattern::Sequential),
            "uniform" | "random" => Ok(Pattern::Uniform),
            "hot-cold" | "hotcold" => Ok(Pattern::HotCold),
            other => Err(Error::InvalidConfig(format!(
                "unknown pattern {other:?}: use sequential, uniform or hot-cold"
            ))),
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Pattern::Sequential => "sequential",
            Pattern::Uniform => "uniform",
            Pattern::HotCold => "hot-cold",
        })
    }
}

/// Parameters of the dirtier workload.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DirtierParams {
    /// Total working set over all vCPUs, in bytes; 0 = all memory left to workloads.
    pub working_set: u64,
    /// Total dirty rate over all vCPUs, in bytes of dirtied pages per second
    /// (page touches x 4 KiB); 0 = as fast as possible.
    pub dirty_rate: u64,
    /// Access pattern.
    pub pattern: Pattern,
    /// Bytes written per touched page (multiple of 8, 8..=4096).
    pub bytes_per_page: u32,
    /// A record every this many page touches.
    pub record_every: u64,
    /// Mix host randomness into every record (nondeterministic input).
    pub use_entropy: bool,
}

impl Default for DirtierParams {
    fn default() -> Self {
        DirtierParams {
            working_set: 0,
            dirty_rate: 50 << 20,
            pattern: Pattern::Uniform,
            bytes_per_page: 64,
            record_every: 256,
            use_entropy: false,
        }
    }
}

/// A workload of the built-in guest.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Workload {
    /// The memory dirtier.
    Dirtier(DirtierParams),
    /// TCP counter and echo services on virtio-net (vCPU 0; other vCPUs finish).
    Net(NetParams),
    /// Numbered blocks written to virtio-blk and read back (vCPU 0).
    Disk(DiskParams),
}

/// Parameters of the network workload.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetParams {
    /// The guest's IPv4 address.
    pub ip: [u8; 4],
    /// Prefix length of its subnet.
    pub prefix_len: u8,
    /// Default gateway, if any.
    pub gateway: Option<[u8; 4]>,
    /// The guest's MAC address (must match the virtio-net device's).
    pub mac: [u8; 6],
    /// Port of the counter service; the echo service is on `port + 1`.
    pub port: u16,
    /// Sequence numbers per second per client; 0: as fast as TCP takes them.
    pub rate: u64,
}

impl Default for NetParams {
    fn default() -> Self {
        NetParams {
            ip: [10, 0, 0, 2],
            prefix_len: 24,
            gateway: None,
            mac: [0x02, 0xca, 0x57, 0x00, 0x00, 0x02],
            port: 7000,
            rate: 1000,
        }
    }
}

/// Parameters of the disk workload.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskParams {
    /// Number of 4 KiB blocks written from the start of the disk.
    pub blocks: u64,
    /// Run forever: random numbered, checksummed block writes, a flush every
    /// 8 writes, and a read-back of every block in turn checked against what
    /// the guest believes it wrote, reported as records (a mismatch is a
    /// record with `_reserved = 1`, then a panic). `false`: the one-shot
    /// device test (write, flush, read back, malformed requests, done).
    #[serde(default)]
    pub continuous: bool,
    /// Operations (a write plus a read-back) per second in continuous mode;
    /// 0: as fast as the device answers.
    #[serde(default)]
    pub rate: u64,
    /// Continuous mode: stop (done) after this many operations, each
    /// block then read back once more; 0: never.
    #[serde(default)]
    pub ops: u64,
    /// Continuous mode as a throughput benchmark instead: sequential 64 KiB
    /// writes, a flush every 16 (`rate`: writes per second).
    #[serde(default)]
    pub sequential: bool,
}

fn write_device_config(
    mem: &crate::GuestMemoryMmap,
    c: &castor_guest_abi::DeviceConfig,
) -> Result<()> {
    use vm_memory::{Bytes, GuestAddress};
    mem.write_slice(&c.to_bytes(), GuestAddress(layout::DEVICE_CONFIG_ADDR))
        .map_err(|e| Error::Memory(format!("writing device config: {e}")))
}

impl NetParams {
    /// Checks the parameters against the VM's devices and writes the guest's
    /// [`castor_guest_abi::DeviceConfig`].
    pub fn write_config(
        &self,
        mem: &crate::GuestMemoryMmap,
        bus: &crate::devices::DeviceBus,
    ) -> Result<()> {
        let net = bus.find(crate::devices::virtio::TYPE_NET).ok_or_else(|| {
            Error::InvalidConfig("the net workload needs a virtio-net device (--tap)".into())
        })?;
        if self.prefix_len == 0 || self.prefix_len > 30 || self.port == u16::MAX {
            return Err(Error::InvalidConfig(format!(
                "bad network parameters: prefix /{} (use 1..=30), port {} (use < 65535)",
                self.prefix_len, self.port
            )));
        }
        let mut mac = [0u8; 8];
        mac[..6].copy_from_slice(&self.mac);
        write_device_config(
            mem,
            &castor_guest_abi::DeviceConfig {
                magic: castor_guest_abi::DEVICE_CONFIG_MAGIC,
                net_mmio: net,
                blk_mmio: bus.find(crate::devices::virtio::TYPE_BLOCK).unwrap_or(0),
                mac,
                ipv4: self.ip,
                prefix_len: self.prefix_len as u32,
                gateway: self.gateway.unwrap_or([0; 4]),
                port: self.port as u32,
                rate: self.rate,
                // Given a disk, the net workload also writes, flushes and
                // verifies numbered blocks (up to 1 GiB of it).
                disk_blocks: bus.disk().filter(|d| !d.read_only()).map_or(0, |d| {
                    (d.capacity_bytes() / castor_guest_abi::DISK_BLOCK_BYTES)
                        .min(castor_guest_abi::MAX_CONTINUOUS_DISK_BLOCKS)
                }),
                disk_continuous: u64::from(bus.disk().is_some_and(|d| !d.read_only())),
                disk_ops: 0,
            },
        )
    }
}

impl DiskParams {
    /// Most blocks the continuous disk workload tracks.
    pub const MAX_CONTINUOUS_BLOCKS: u64 = castor_guest_abi::MAX_CONTINUOUS_DISK_BLOCKS;

    /// Checks the parameters against the VM's devices and writes the guest's
    /// [`castor_guest_abi::DeviceConfig`].
    pub fn write_config(
        &self,
        mem: &crate::GuestMemoryMmap,
        bus: &crate::devices::DeviceBus,
    ) -> Result<()> {
        let blk = bus
            .find(crate::devices::virtio::TYPE_BLOCK)
            .ok_or_else(|| {
                Error::InvalidConfig("the disk workload needs a virtio-blk device (--disk)".into())
            })?;
        if self.blocks == 0 {
            return Err(Error::InvalidConfig(
                "the disk workload needs at least one block".into(),
            ));
        }
        if self.continuous && self.blocks > castor_guest_abi::MAX_CONTINUOUS_DISK_BLOCKS {
            return Err(Error::InvalidConfig(format!(
                "the continuous disk workload tracks at most {} blocks, not {}",
                castor_guest_abi::MAX_CONTINUOUS_DISK_BLOCKS,
                self.blocks
            )));
        }
        write_device_config(
            mem,
            &castor_guest_abi::DeviceConfig {
                magic: castor_guest_abi::DEVICE_CONFIG_MAGIC,
                net_mmio: bus.find(crate::devices::virtio::TYPE_NET).unwrap_or(0),
                blk_mmio: blk,
                disk_blocks: self.blocks,
                disk_continuous: match (self.continuous, self.sequential) {
                    (false, _) => 0,
                    (true, false) => 1,
                    (true, true) => castor_guest_abi::DISK_MODE_SEQUENTIAL,
                },
                disk_ops: self.ops,
                rate: self.rate,
                ..Default::default()
            },
        )
    }
}

/// Everything the built-in guest needs to boot.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuestBoot {
    /// Which workload each vCPU runs.
    pub workload: Workload,
    /// Seed of the workload's pseudo-random choices.
    pub seed: u64,
}

impl DirtierParams {
    /// Checks the parameters against a VM of `vcpus` vCPUs and `mem_bytes`
    /// bytes, and turns them into the guest's ABI form.
    pub fn to_abi(&self, vcpus: u32, mem_bytes: u64) -> Result<DirtierConfig> {
        let page = layout::PAGE_SIZE;
        let available = mem_bytes.saturating_sub(layout::WORKLOAD_ADDR);
        let ws = if self.working_set == 0 {
            available
        } else {
            self.working_set
        };
        if ws > available {
            return Err(Error::InvalidConfig(format!(
                "working set {} MiB does not fit: {} MiB of guest memory leaves {} MiB for workloads; \
                 raise --mem or lower --working-set",
                ws >> 20,
                mem_bytes >> 20,
                available >> 20
            )));
        }
        let per_vcpu = (ws / vcpus as u64) / page * page;
        if per_vcpu < page {
            return Err(Error::InvalidConfig(format!(
                "working set of {ws} bytes gives each of {vcpus} vCPUs less than one page"
            )));
        }
        if self.bytes_per_page < 8
            || self.bytes_per_page > 4096
            || !self.bytes_per_page.is_multiple_of(8)
        {
            return Err(Error::InvalidConfig(format!(
                "bytes per page {} is invalid: use a multiple of 8 from 8 to 4096",
                self.bytes_per_page
            )));
        }
        if self.record_every == 0 {
            return Err(Error::InvalidConfig(
                "record interval must be at least 1 page touch".into(),
            ));
        }
        let pages_per_sec = if self.dirty_rate == 0 {
            0
        } else {
            (self.dirty_rate / page / vcpus as u64).max(1)
        };
        Ok(DirtierConfig {
            region_base: layout::WORKLOAD_ADDR,
            region_bytes: per_vcpu,
            pattern: match self.pattern {
                Pattern::Sequential => pattern::SEQUENTIAL,
                Pattern::Uniform => pattern::UNIFORM,
                Pattern::HotCold => pattern::HOT_COLD,
            },
            bytes_per_page: self.bytes_per_page,
            pages_per_sec,
            record_every: self.record_every,
            use_entropy: self.use_entropy as u32,
            _reserved: 0,
        })
    }
}

/// Parses a byte size such as `256M`, `1G`, `4096`, `64K` (binary units).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                'B' => 1,
                _ => return Err(format!("{s:?}: unknown unit {c:?}; use K, M, G or T")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size (examples: 256M, 1G, 4096)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn dirtier_validation() {
        let p = DirtierParams::default();
        let c = p.to_abi(2, 256 << 20).unwrap();
        assert_eq!(c.region_bytes, ((256 << 20) - layout::WORKLOAD_ADDR) / 2);
        assert!(DirtierParams {
            working_set: 1 << 30,
            ..p.clone()
        }
        .to_abi(1, 256 << 20)
        .is_err());
        assert!(DirtierParams {
            bytes_per_page: 12,
            ..p.clone()
        }
        .to_abi(1, 256 << 20)
        .is_err());
        assert!(DirtierParams {
            record_every: 0,
            ..p.clone()
        }
        .to_abi(1, 256 << 20)
        .is_err());
        assert!("zigzag".parse::<Pattern>().is_err());
    }
}
