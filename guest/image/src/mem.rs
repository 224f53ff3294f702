//! Where the device workloads keep their rings and buffers (guest RAM from
//! `layout::WORKLOAD_ADDR`, identity mapped; everything lives in guest
//! memory so it is captured with it).

use castor_guest_abi::layout::WORKLOAD_ADDR;

/// virtio-net RX queue (descriptors, avail, used).
pub const NET_RXQ: u64 = WORKLOAD_ADDR;
/// virtio-net TX queue.
pub const NET_TXQ: u64 = WORKLOAD_ADDR + 0x4000;
/// virtio-blk request queue.
pub const BLK_Q: u64 = WORKLOAD_ADDR + 0x8000;
/// Size of the net queues.
pub const NET_QUEUE_SIZE: u16 = 256;
/// Bytes per net buffer (12-byte header + 1514-byte frame fit).
pub const NET_BUF: u64 = 2048;
/// RX buffers: one per RX descriptor.
pub const NET_RX_BUFS: u64 = WORKLOAD_ADDR + 0x10_0000;
/// TX buffers: one per TX descriptor.
pub const NET_TX_BUFS: u64 = NET_RX_BUFS + NET_QUEUE_SIZE as u64 * NET_BUF;
/// TCP socket buffers.
pub const TCP_BUFS: u64 = WORKLOAD_ADDR + 0x20_0000;
/// Bytes of each TCP socket's RX and of its TX buffer.
pub const TCP_BUF_BYTES: usize = 64 * 1024;
/// virtio-blk request header (16 bytes) and status byte (at +16).
pub const BLK_HDR: u64 = WORKLOAD_ADDR + 0x30_0000;
/// virtio-blk data buffer.
pub const BLK_DATA: u64 = BLK_HDR + 0x1000;
/// The continuous disk workload's expected block, built for comparison.
pub const BLK_EXPECT: u64 = BLK_HDR + 0x2000;
/// The disk throughput benchmark's 64 KiB write buffer.
pub const BLK_BULK: u64 = BLK_HDR + 0x1_0000;
/// Bytes of [`BLK_BULK`].
pub const BLK_BULK_BYTES: u64 = 0x1_0000;
/// The continuous disk workload's table: the round last written to each
/// block (u32 each, up to `MAX_CONTINUOUS_DISK_BLOCKS`).
pub const BLK_ROUNDS: u64 = WORKLOAD_ADDR + 0x40_0000;

/// A `'static` mutable byte slice over guest RAM.
///
/// # Safety
/// The range must be RAM reserved for this use and not aliased.
pub unsafe fn slice(addr: u64, len: usize) -> &'static mut [u8] {
    // SAFETY: per the caller's contract.
    unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, len) }
}
