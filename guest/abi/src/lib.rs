//! The contract between the Castor VMM and its built-in ring-3 guest.
//!
//! Both sides compile this crate: the VMM (`castor-vmm`, std) and the guest
//! image (`guest/image`, `#![no_std]`). Everything here is plain `#[repr(C)]`
//! data and constants, so the two agree byte for byte on:
//!
//! * the guest-physical memory layout (identity mapped, see [`layout`]);
//! * the paravirtual registers the guest uses to talk to the VMM ([`pv`]);
//! * the boot information page the VMM fills before the first instruction
//!   ([`BootInfo`]) and the per-vCPU control page ([`VcpuPage`]).
//!
//! The guest runs entirely at CPL 3, takes no interrupts and polls.
//! Each vCPU enters `_start(vcpu_id, boot_info_gpa)` with its own stack.
#![no_std]

/// Guest-physical memory layout. All addresses are identity mapped by the
/// page tables the VMM builds (2 MiB pages, user-accessible).
pub mod layout {
    /// 4 KiB, the granularity of dirty tracking.
    pub const PAGE_SIZE: u64 = 4096;
    /// Global descriptor table.
    pub const GDT_ADDR: u64 = 0x1000;
    /// 64-bit task state segment.
    pub const TSS_ADDR: u64 = 0x2000;
    /// [`crate::BootInfo`], filled by the VMM before the guest starts.
    pub const BOOT_INFO_ADDR: u64 = 0x3000;
    /// [`crate::DeviceConfig`], filled by the VMM for the device workloads.
    pub const DEVICE_CONFIG_ADDR: u64 = 0x4000;
    /// PML4; the PDPT follows at +4 KiB, then the page directories.
    pub const PML4_ADDR: u64 = 0x1_0000;
    /// Page-directory-pointer table.
    pub const PDPT_ADDR: u64 = 0x1_1000;
    /// First page directory; one per GiB mapped.
    pub const PD_ADDR: u64 = 0x1_2000;
    /// Guest-physical space mapped by the page tables (RAM plus the MMIO window).
    pub const MAPPED_GIB: u64 = 64;
    /// Where the guest image is linked and loaded.
    pub const IMAGE_ADDR: u64 = 0x10_0000;
    /// Largest image the layout leaves room for.
    pub const IMAGE_MAX: u64 = 0x10_0000;
    /// Per-vCPU areas: control page, then stack.
    pub const VCPU_AREA_ADDR: u64 = 0x20_0000;
    /// Size of one vCPU's area (control page + stack).
    pub const VCPU_AREA_SIZE: u64 = 0x2_0000;
    /// Most vCPUs the layout has areas for.
    pub const MAX_VCPUS: u64 = 8;
    /// First byte of RAM available to workloads.
    pub const WORKLOAD_ADDR: u64 = 0x40_0000;
    /// Guest-physical base of the MMIO window for devices (above the largest RAM).
    pub const MMIO_BASE: u64 = 0x8_0000_0000;

    /// The control page of vCPU `id`.
    pub const fn vcpu_page(id: u64) -> u64 {
        VCPU_AREA_ADDR + id * VCPU_AREA_SIZE
    }

    /// Top of vCPU `id`'s stack (exclusive).
    pub const fn vcpu_stack_top(id: u64) -> u64 {
        VCPU_AREA_ADDR + (id + 1) * VCPU_AREA_SIZE
    }
}

/// The paravirtual register page, at the start of the MMIO window. The guest
/// accesses it with plain 32/64-bit loads and stores at CPL 3; each access is
/// one exit to the VMM (MMIO, because PVM does not honour IOPL for guest user
/// mode, so port I/O from CPL 3 faults there), so the guest batches: one exit
/// per record.
pub mod pv {
    use super::layout::MMIO_BASE;
    /// Base of the paravirtual page.
    pub const BASE: u64 = MMIO_BASE;
    /// Size of the paravirtual page.
    pub const SIZE: u64 = 0x1000;
    /// 32-bit load: submit the record in the vCPU's [`crate::VcpuPage::mailbox`].
    /// Reads 1 when the VMM took it, 0 when its output buffer is full
    /// (back-pressure: the guest retries the same record later).
    pub const OUTPUT: u64 = BASE;
    /// 64-bit load: 64 bits of host randomness (nondeterministic input).
    pub const ENTROPY: u64 = BASE + 0x8;
    /// 32-bit store: the guest reports its status ([`crate::status`]) and stops.
    pub const STATUS: u64 = BASE + 0x10;
    /// 32-bit store: the guest has nothing to do for this many microseconds
    /// (at most [`MAX_SLEEP_US`]); the VMM parks the vCPU thread instead of
    /// letting it spin, as an idle kernel would halt. A pause or a resume may
    /// end the sleep early; the guest re-checks its clock either way.
    pub const SLEEP_US: u64 = BASE + 0x18;
    /// Longest sleep the VMM grants in one request.
    pub const MAX_SLEEP_US: u32 = 2000;
    /// First byte after the paravirtual page: where devices' windows start.
    pub const DEVICES_BASE: u64 = BASE + SIZE;
}

/// Values written to [`pv::STATUS`].
pub mod status {
    /// The workload finished normally.
    pub const DONE: u32 = 0;
    /// The guest panicked; the message is in the mailbox's `text`.
    pub const PANIC: u32 = 1;
    /// The boot information was not understood.
    pub const BAD_BOOT_INFO: u32 = 2;
}

/// `BootInfo::magic`.
pub const BOOT_MAGIC: u64 = 0x4341_5354_4f52_4254; // "CASTORBT"
/// `BootInfo::version`.
pub const BOOT_VERSION: u32 = 1;

/// Workloads the guest image carries.
pub mod workload {
    /// Writes to a working set at a rate and pattern, emitting records.
    pub const DIRTIER: u32 = 1;
    /// TCP services on virtio-net: a counter stream on `DeviceConfig::port`
    /// and an echo on `port + 1`.
    pub const NET: u32 = 2;
    /// Writes numbered blocks to virtio-blk, flushes, reads them back.
    pub const DISK: u32 = 3;
}

/// `DeviceConfig::magic`.
pub const DEVICE_CONFIG_MAGIC: u64 = 0x4341_5354_4f52_4456; // "CASTORDV"

/// Bytes of each numbered block the disk workload writes.
pub const DISK_BLOCK_BYTES: u64 = 4096;

/// The device workloads' configuration, at [`layout::DEVICE_CONFIG_ADDR`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceConfig {
    /// [`DEVICE_CONFIG_MAGIC`].
    pub magic: u64,
    /// Guest-physical base of the virtio-net MMIO window; 0: none.
    pub net_mmio: u64,
    /// Guest-physical base of the virtio-blk MMIO window; 0: none.
    pub blk_mmio: u64,
    /// The guest's MAC address (6 bytes, then 2 zero bytes).
    pub mac: [u8; 8],
    /// The guest's IPv4 address.
    pub ipv4: [u8; 4],
    /// Prefix length of its subnet.
    pub prefix_len: u32,
    /// Default gateway (0.0.0.0: none).
    pub gateway: [u8; 4],
    /// TCP port of the counter service; the echo service is on `port + 1`.
    pub port: u32,
    /// Sequence numbers per second per client; 0: as fast as TCP takes them.
    pub rate: u64,
    /// Number of [`DISK_BLOCK_BYTES`] blocks the disk workload writes.
    pub disk_blocks: u64,
    /// Non-zero: the disk workload runs continuously (see [`disk_block`]):
    /// writes numbered, checksummed blocks at random, flushes, and verifies
    /// every block in turn against what it believes it wrote, reporting
    /// through records, forever. `rate` is then its operations per second
    /// (0: as fast as the device answers).
    pub disk_continuous: u64,
    /// Continuous disk workload: stop (DONE) after this many operations;
    /// 0: never.
    pub disk_ops: u64,
}

impl DeviceConfig {
    /// Size in guest memory.
    pub const SIZE: usize = core::mem::size_of::<DeviceConfig>();

    /// The little-endian bytes of the `#[repr(C)]` layout.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut out = [0u8; Self::SIZE];
        out[0..8].copy_from_slice(&self.magic.to_le_bytes());
        out[8..16].copy_from_slice(&self.net_mmio.to_le_bytes());
        out[16..24].copy_from_slice(&self.blk_mmio.to_le_bytes());
        out[24..32].copy_from_slice(&self.mac);
        out[32..36].copy_from_slice(&self.ipv4);
        out[36..40].copy_from_slice(&self.prefix_len.to_le_bytes());
        out[40..44].copy_from_slice(&self.gateway);
        out[44..48].copy_from_slice(&self.port.to_le_bytes());
        out[48..56].copy_from_slice(&self.rate.to_le_bytes());
        out[56..64].copy_from_slice(&self.disk_blocks.to_le_bytes());
        out[64..72].copy_from_slice(&self.disk_continuous.to_le_bytes());
        out[72..80].copy_from_slice(&self.disk_ops.to_le_bytes());
        out
    }

    /// Parses [`DeviceConfig::to_bytes`] (e.g. read back from guest memory);
    /// `None` if `b` is shorter than [`DeviceConfig::SIZE`] or does not start
    /// with [`DEVICE_CONFIG_MAGIC`] (the VMM wrote no device configuration).
    pub fn parse(b: &[u8]) -> Option<Self> {
        let b: &[u8; Self::SIZE] = b.get(..Self::SIZE)?.try_into().ok()?;
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(w)
        };
        let four = |i: usize| [b[i], b[i + 1], b[i + 2], b[i + 3]];
        let magic = u64_at(0);
        if magic != DEVICE_CONFIG_MAGIC {
            return None;
        }
        let mut mac = [0u8; 8];
        mac.copy_from_slice(&b[24..32]);
        Some(DeviceConfig {
            magic,
            net_mmio: u64_at(8),
            blk_mmio: u64_at(16),
            mac,
            ipv4: four(32),
            prefix_len: u32_at(36),
            gateway: four(40),
            port: u32_at(44),
            rate: u64_at(48),
            disk_blocks: u64_at(56),
            disk_continuous: u64_at(64),
            disk_ops: u64_at(72),
        })
    }

    /// The guest's MAC address (the first six bytes of `mac`).
    pub fn mac_address(&self) -> [u8; 6] {
        [
            self.mac[0],
            self.mac[1],
            self.mac[2],
            self.mac[3],
            self.mac[4],
            self.mac[5],
        ]
    }
}

/// The byte the disk workload writes at offset `i` of block `block` (seeded).
pub const fn disk_pattern(seed: u64, block: u64, i: u64) -> u8 {
    let x = (seed ^ block.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .wrapping_add(i.wrapping_mul(0x0100_0000_01b3));
    (x ^ (x >> 29) ^ (x >> 47)) as u8
}

/// `DeviceConfig::disk_continuous` for the throughput benchmark: sequential
/// 64 KiB writes across the first `disk_blocks` blocks (wrapping), a flush
/// every 16 writes (1 MiB); a record every 16 writes with the writes so far
/// in `iterations` and the last flush's latency in TSC ticks in `checksum`.
pub const DISK_MODE_SEQUENTIAL: u64 = 2;

/// Most blocks the continuous disk workload tracks (its table of rounds,
/// 4 bytes a block, lives in guest RAM: 1 MiB).
pub const MAX_CONTINUOUS_DISK_BLOCKS: u64 = 1 << 18;

/// Magic at the start of every block the continuous disk workload writes.
pub const DISK_BLOCK_MAGIC: u64 = 0x4b4c_4252_4f54_5343; // "CSTORBLK"

/// Fills `out` (one [`DISK_BLOCK_BYTES`] block) with the content the
/// continuous disk workload writes as round `round` (>= 1) of block `block`:
/// magic, block, round, checksum of the rest, then a seeded pattern. Round 0
/// (never written) is an all-zero block.
pub fn disk_block(seed: u64, block: u64, round: u64, out: &mut [u8]) {
    if round == 0 {
        out.fill(0);
        return;
    }
    let s = seed ^ round.wrapping_mul(0xd6e8_feb8_6659_fd93);
    for (i, x) in out.iter_mut().enumerate().skip(32) {
        *x = disk_pattern(s, block, i as u64);
    }
    let sum = disk_block_checksum(out);
    out[0..8].copy_from_slice(&DISK_BLOCK_MAGIC.to_le_bytes());
    out[8..16].copy_from_slice(&block.to_le_bytes());
    out[16..24].copy_from_slice(&round.to_le_bytes());
    out[24..32].copy_from_slice(&sum.to_le_bytes());
}

/// Checksum (FNV-1a) of a block's bytes after its 32-byte header.
pub fn disk_block_checksum(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &x in b.iter().skip(32) {
        h = (h ^ x as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// What a block of the continuous disk workload says of itself: `Some((block,
/// round))` for a well-formed written block (magic and checksum right),
/// `Some((u64::MAX, 0))` for an all-zero block, `None` for anything else
/// (torn, foreign or corrupt).
pub fn parse_disk_block(b: &[u8]) -> Option<(u64, u64)> {
    let u64_at = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[i..i + 8]);
        u64::from_le_bytes(w)
    };
    if b.len() < 32 {
        return None;
    }
    if b.iter().all(|&x| x == 0) {
        return Some((u64::MAX, 0));
    }
    if u64_at(0) != DISK_BLOCK_MAGIC || u64_at(24) != disk_block_checksum(b) {
        return None;
    }
    Some((u64_at(8), u64_at(16)))
}

/// Access patterns of the dirtier.
pub mod pattern {
    /// Pages in order, wrapping around.
    pub const SEQUENTIAL: u32 = 0;
    /// Pages drawn uniformly at random.
    pub const UNIFORM: u32 = 1;
    /// 90% of touches go to the first 10% of pages.
    pub const HOT_COLD: u32 = 2;
}

/// Parameters of the dirtier workload (the same for every vCPU; each vCPU works
/// on its own slice of the working set).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirtierConfig {
    /// Guest-physical address of vCPU 0's region; vCPU `i` starts at
    /// `region_base + i * region_bytes`.
    pub region_base: u64,
    /// Bytes in each vCPU's region (a multiple of 4 KiB).
    pub region_bytes: u64,
    /// One of [`pattern`].
    pub pattern: u32,
    /// Bytes written per touched page (multiple of 8, 8..=4096).
    pub bytes_per_page: u32,
    /// Page touches per second per vCPU; 0 means as fast as possible.
    pub pages_per_sec: u64,
    /// Emit a record every this many page touches (>= 1).
    pub record_every: u64,
    /// Non-zero: mix a value read from [`pv::ENTROPY`] into each record.
    pub use_entropy: u32,
    /// Reserved, zero.
    pub _reserved: u32,
}

/// The page at [`layout::BOOT_INFO_ADDR`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootInfo {
    /// [`BOOT_MAGIC`].
    pub magic: u64,
    /// [`BOOT_VERSION`].
    pub version: u32,
    /// Number of vCPUs running the workload.
    pub vcpu_count: u32,
    /// One of [`workload`].
    pub workload: u32,
    /// Reserved, zero.
    pub _reserved: u32,
    /// Guest TSC frequency in kHz, for pacing.
    pub tsc_khz: u64,
    /// Seed of the workload's pseudo-random choices.
    pub seed: u64,
    /// Dirtier parameters (valid when `workload == DIRTIER`).
    pub dirtier: DirtierConfig,
}

impl BootInfo {
    /// Size of the boot information in guest memory.
    pub const SIZE: usize = core::mem::size_of::<BootInfo>();

    /// The little-endian bytes the guest reads at [`layout::BOOT_INFO_ADDR`]
    /// (the same as the `#[repr(C)]` layout on x86-64).
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let d = &self.dirtier;
        let words: [(usize, u64, usize); 17] = [
            (0, self.magic, 8),
            (8, self.version as u64, 4),
            (12, self.vcpu_count as u64, 4),
            (16, self.workload as u64, 4),
            (20, self._reserved as u64, 4),
            (24, self.tsc_khz, 8),
            (32, self.seed, 8),
            (40, d.region_base, 8),
            (48, d.region_bytes, 8),
            (56, d.pattern as u64, 4),
            (60, d.bytes_per_page as u64, 4),
            (64, d.pages_per_sec, 8),
            (72, d.record_every, 8),
            (80, d.use_entropy as u64, 4),
            (84, d._reserved as u64, 4),
            (88, 0, 0),
            (88, 0, 0),
        ];
        let mut out = [0u8; Self::SIZE];
        for (off, v, len) in words {
            out[off..off + len].copy_from_slice(&v.to_le_bytes()[..len]);
        }
        out
    }
}

/// One output record: what the dirtier emits every `record_every` touches.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Record {
    /// vCPU that emitted it.
    pub vcpu: u32,
    /// Reserved, zero.
    pub _reserved: u32,
    /// Record sequence number of this vCPU: 1, 2, 3, ...
    pub seq: u64,
    /// Page touches done so far by this vCPU.
    pub iterations: u64,
    /// Running checksum of everything this vCPU wrote (and read from entropy).
    pub checksum: u64,
}

impl Record {
    /// Size of the record on the wire and in the mailbox.
    pub const SIZE: usize = 32;

    /// Little-endian bytes of the record.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut out = [0u8; Self::SIZE];
        out[0..4].copy_from_slice(&self.vcpu.to_le_bytes());
        out[4..8].copy_from_slice(&self._reserved.to_le_bytes());
        out[8..16].copy_from_slice(&self.seq.to_le_bytes());
        out[16..24].copy_from_slice(&self.iterations.to_le_bytes());
        out[24..32].copy_from_slice(&self.checksum.to_le_bytes());
        out
    }

    /// Parses [`Record::to_bytes`]; `None` if `b` is not exactly [`Record::SIZE`] bytes.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() != Self::SIZE {
            return None;
        }
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(w)
        };
        Some(Record {
            vcpu: u32_at(0),
            _reserved: u32_at(4),
            seq: u64_at(8),
            iterations: u64_at(16),
            checksum: u64_at(24),
        })
    }
}

/// Length of the panic text buffer in the mailbox.
pub const PANIC_TEXT_LEN: usize = 256;

/// Workload state the dirtier keeps in guest memory (so it is captured with it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirtierState {
    /// Page touches so far.
    pub iterations: u64,
    /// Running checksum.
    pub checksum: u64,
    /// Pseudo-random generator state.
    pub rng: u64,
    /// Sequence number of the last record emitted.
    pub seq: u64,
    /// Next page for the sequential pattern.
    pub cursor: u64,
}

/// The per-vCPU control page at [`layout::vcpu_page`].
#[repr(C)]
pub struct VcpuPage {
    /// The record being submitted through [`pv::OUTPUT`].
    pub mailbox: Record,
    /// UTF-8 panic message (NUL padded) when the guest reports [`status::PANIC`].
    pub text: [u8; PANIC_TEXT_LEN],
    /// The dirtier's state.
    pub dirtier: DirtierState,
}

/// Byte offset of [`VcpuPage::mailbox`] in the control page.
pub const MAILBOX_OFFSET: u64 = 0;
/// Byte offset of [`VcpuPage::text`] in the control page.
pub const TEXT_OFFSET: u64 = Record::SIZE as u64;

// The layout's regions must not overlap; checked when the crate compiles.
const _: () = {
    assert!(layout::vcpu_stack_top(layout::MAX_VCPUS - 1) <= layout::WORKLOAD_ADDR);
    assert!(layout::PD_ADDR + layout::MAPPED_GIB * 4096 <= layout::IMAGE_ADDR);
    assert!(layout::IMAGE_ADDR + layout::IMAGE_MAX <= layout::VCPU_AREA_ADDR);
    assert!(core::mem::size_of::<VcpuPage>() <= layout::PAGE_SIZE as usize);
    assert!(layout::MMIO_BASE >= 16 << 30); // above the largest RAM
    assert!(layout::MMIO_BASE + (1 << 30) <= layout::MAPPED_GIB << 30);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip() {
        let r = Record {
            vcpu: 3,
            _reserved: 0,
            seq: 7,
            iterations: 700,
            checksum: 0xdead_beef_1234_5678,
        };
        assert_eq!(Record::from_bytes(&r.to_bytes()), Some(r));
        assert_eq!(Record::from_bytes(&[0u8; 31]), None);
    }

    #[test]
    fn layout_fits() {
        assert_eq!(core::mem::size_of::<Record>(), Record::SIZE);
        assert!(core::mem::size_of::<VcpuPage>() <= layout::PAGE_SIZE as usize);
        assert!(core::mem::offset_of!(VcpuPage, text) as u64 == TEXT_OFFSET);
        assert_eq!(BootInfo::SIZE, 88);
        assert_eq!(core::mem::offset_of!(BootInfo, dirtier), 40);
        assert_eq!(core::mem::offset_of!(DirtierConfig, use_entropy), 40);
    }

    #[test]
    fn disk_blocks_describe_themselves() {
        let mut b = [0u8; DISK_BLOCK_BYTES as usize];
        disk_block(7, 12, 3, &mut b);
        assert_eq!(parse_disk_block(&b), Some((12, 3)));
        b[100] ^= 1;
        assert_eq!(parse_disk_block(&b), None);
        disk_block(7, 12, 0, &mut b);
        assert_eq!(parse_disk_block(&b), Some((u64::MAX, 0)));
    }

    #[test]
    fn device_config_bytes_match_repr_c() {
        let c = DeviceConfig {
            magic: DEVICE_CONFIG_MAGIC,
            net_mmio: 0x8_0000_1000,
            blk_mmio: 0x8_0000_2000,
            mac: [2, 0, 0, 0, 0, 9, 0, 0],
            ipv4: [10, 0, 0, 2],
            prefix_len: 24,
            gateway: [10, 0, 0, 1],
            port: 7000,
            rate: 1000,
            disk_blocks: 64,
            disk_continuous: 1,
            disk_ops: 5,
        };
        assert_eq!(DeviceConfig::SIZE, 80);
        // SAFETY: DeviceConfig is repr(C) plain integers with no padding.
        let raw = unsafe {
            core::slice::from_raw_parts(&c as *const DeviceConfig as *const u8, DeviceConfig::SIZE)
        };
        assert_eq!(&c.to_bytes()[..], raw);
        assert_eq!(DeviceConfig::parse(&c.to_bytes()), Some(c));
        assert_eq!(c.mac_address(), [2, 0, 0, 0, 0, 9]);
        assert_eq!(DeviceConfig::parse(&c.to_bytes()[..79]), None);
        assert_eq!(DeviceConfig::parse(&[0u8; 80]), None);
        assert!(layout::DEVICE_CONFIG_ADDR + DeviceConfig::SIZE as u64 <= layout::PML4_ADDR);
    }

    #[test]
    fn boot_info_bytes_match_repr_c() {
        let b = BootInfo {
            magic: BOOT_MAGIC,
            version: 1,
            vcpu_count: 2,
            workload: 1,
            _reserved: 0,
            tsc_khz: 123,
            seed: 0x55,
            dirtier: DirtierConfig {
                region_base: 0x400000,
                region_bytes: 4096,
                pattern: 2,
                bytes_per_page: 64,
                pages_per_sec: 9,
                record_every: 7,
                use_entropy: 1,
                _reserved: 0,
            },
        };
        let bytes = b.to_bytes();
        // SAFETY: BootInfo is repr(C) plain integers; reading its bytes is sound.
        let raw = unsafe {
            core::slice::from_raw_parts(&b as *const BootInfo as *const u8, BootInfo::SIZE)
        };
        assert_eq!(&bytes[..], raw);
    }
}
