// Temporary probe (not committed): boots a kernel and prints console + stop reason.
use castor_vmm::*;
use std::sync::Arc;
use std::time::{Duration, Instant};
fn main() {
    env_logger_init();
    let args: Vec<String> = std::env::args().collect();
    let kernel = args[1].clone();
    let initrd = args.get(2).filter(|s| !s.is_empty()).map(|s| s.into());
    let cmdline = args
        .get(3)
        .cloned()
        .unwrap_or(LinuxBoot::DEFAULT_CMDLINE.into());
    let secs: u64 = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(60);
    let vm = Vm::new(
        &VmConfig {
            vcpus: 1,
            mem_bytes: 256 << 20,
            ..VmConfig::default()
        },
        Arc::new(NullSink),
    )
    .unwrap();
    let r = vm
        .boot_linux(&LinuxBoot {
            kernel: kernel.into(),
            initrd,
            cmdline,
        })
        .unwrap();
    println!("{r:?}");
    let c = vm.console();
    let t = Instant::now();
    vm.resume();
    let mut seen = 0;
    let mut hist: std::collections::BTreeMap<u64, u32> = Default::default();
    let sample = std::env::var("SAMPLE").is_ok();
    while t.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_millis(100));
        if sample && c.line_count() == 0 {
            vm.pause();
            if let Ok(st) = vm.capture_state() {
                *hist.entry(st.vcpus[0].regs.rip).or_default() += 1;
            }
            vm.resume();
        }
        for l in c.lines_from(seen) {
            println!("[{:6.2}] {l}", t.elapsed().as_secs_f64());
            seen += 1;
        }
        if let Some(s) = vm
            .vcpu_states()
            .iter()
            .find(|s| matches!(s, VcpuRunState::Stopped(_)))
        {
            println!("STOPPED at {:.2}s: {s:?}", t.elapsed().as_secs_f64());
            break;
        }
    }
    println!("partial: {:?}", c.partial_line());
    for (rip, n) in &hist {
        println!("RIP {rip:#x} {n}");
    }
    vm.pause();
    let st = vm.capture_state().unwrap();
    let v = &st.vcpus[0];
    println!(
        "rip {:#x} cr0 {:#x} cr4 {:#x} efer {:#x} cs {:?}",
        v.regs.rip, v.sregs.cr0, v.sregs.cr4, v.sregs.efer, v.sregs.cs
    );
}
fn env_logger_init() {}
