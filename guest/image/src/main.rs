//! Castor's built-in guest.
//!
//! A freestanding program that runs entirely at CPL 3: no privileged
//! instruction, no interrupts, polling only. The VMM starts every vCPU at
//! [`_start`] in 64-bit mode with its own stack, `rdi` = vCPU id and
//! `rsi` = guest-physical address of the [`BootInfo`] page. The workload is
//! chosen by `BootInfo::workload`; new workloads are new modules dispatched here.
#![no_std]
#![no_main]

mod dirtier;
mod disk;
mod disk_soak;
mod mem;
mod net;
mod rt;
mod virtq;

use castor_guest_abi::{
    layout, status, workload, BootInfo, DeviceConfig, BOOT_MAGIC, BOOT_VERSION, DEVICE_CONFIG_MAGIC,
};

/// Entry point of every vCPU.
#[no_mangle]
#[link_section = ".text._start"]
pub extern "C" fn _start(vcpu: u64, boot_info: u64) -> ! {
    if boot_info != layout::BOOT_INFO_ADDR {
        rt::stop(status::BAD_BOOT_INFO);
    }
    // SAFETY: the VMM wrote a BootInfo at this identity-mapped address before start.
    let info: BootInfo = unsafe { core::ptr::read_volatile(boot_info as *const BootInfo) };
    if info.magic != BOOT_MAGIC || info.version != BOOT_VERSION || vcpu >= info.vcpu_count as u64 {
        rt::stop(status::BAD_BOOT_INFO);
    }
    match info.workload {
        workload::DIRTIER => dirtier::run(vcpu, &info),
        workload::NET | workload::DISK => {
            // SAFETY: the VMM wrote a DeviceConfig here for the device workloads.
            let cfg: DeviceConfig = unsafe {
                core::ptr::read_volatile(layout::DEVICE_CONFIG_ADDR as *const DeviceConfig)
            };
            if cfg.magic != DEVICE_CONFIG_MAGIC {
                rt::stop(status::BAD_BOOT_INFO);
            }
            if info.workload == workload::NET {
                net::run(vcpu, &info, &cfg)
            } else {
                disk::run(vcpu, &info, &cfg)
            }
        }
        _ => rt::stop(status::BAD_BOOT_INFO),
    }
}
