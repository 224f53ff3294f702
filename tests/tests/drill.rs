//! `castor drill` against a networked guest (root, KVM): the pair runs in
//! the demo's namespaces (`castor::netdemo::Topology`: hosts A and B with
//! bridges and taps, a client host C on the LAN), the drill runs in C as a
//! TCP client of the guest's counter service, SIGKILLs the primary and
//! reports as JSON: the stream went on with no reset, gap or duplicate.

use castor::netdemo::Topology;
use castor::status::fetch_socket;
use castor_node::ProtectionState;
use castor_tests::require_kvm;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

fn castor_exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_castor-under-test"))
}

#[test]
fn drill_a_network_guest_as_its_tcp_client() {
    require_kvm();
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test makes network namespaces and taps: run it as root"
    );
    let exe = castor_exe();
    let t = Topology::new("drill", std::env::var_os("CASTOR_KEEP_DIR").is_some()).unwrap();
    let (pc, bc) = t.write_configs(20).unwrap();
    let mut backup = t.spawn(&exe, &t.b, "backup", &bc).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut primary = t.spawn(&exe, &t.a, "primary", &pc).unwrap();
    let sock = t.dir.join("primary.sock");
    let start = Instant::now();
    while !fetch_socket(&sock).is_ok_and(|s| s.state == ProtectionState::Protected) {
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "not protected in 90 s: {}",
            std::fs::read_to_string(t.dir.join("primary.log")).unwrap_or_default()
        );
        assert!(primary.try_wait().unwrap().is_none(), "the primary exited");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = Command::new("ip")
        .args(["netns", "exec", &t.c])
        .arg(&exe)
        .args(["drill", "--json", "--before", "1", "--after", "3"])
        .arg("--primary-config")
        .arg(&pc)
        .arg("--backup-config")
        .arg(&bc)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    let logs = || {
        format!(
            "drill stderr:\n{}\nbackup log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(t.dir.join("backup.log")).unwrap_or_default()
        )
    };
    assert!(
        out.status.success(),
        "the drill failed ({})\n{}",
        out.status,
        logs()
    );
    let r: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(r["workload"], "net");
    assert_eq!(r["mode"], "kill");
    assert_eq!(r["ok"], true, "{}", logs());
    assert!(r["violations"].as_array().is_some_and(|v| v.is_empty()));
    assert!(r["outputs_before"].as_u64() > Some(0));
    assert!(
        r["outputs_after"].as_u64() > Some(0),
        "the stream did not go on"
    );
    assert!(r["takeover_ms"].is_number());
    // The backup took over: it is now the primary.
    let s = fetch_socket(&t.dir.join("backup.sock")).unwrap();
    assert!(s.took_over && s.last_failover.is_some(), "{s:#?}");
    assert!(
        primary.try_wait().unwrap().is_some(),
        "the drill did not kill the primary"
    );
    let _ = backup.kill();
    let _ = backup.wait();
}
