//! Builds the built-in guest (`guest/image`, its own workspace) with a nested
//! cargo call and hands its ELF to the VMM through `OUT_DIR`.
//!
//! The guest needs `panic = "abort"`, static relocation and a linker script; a
//! separate workspace keeps those away from the main workspace's profiles. Only
//! the host target's prebuilt `core` is used: no extra toolchain.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let guest_dir = manifest_dir.join("../guest/image");
    let abi_dir = manifest_dir.join("../guest/abi");
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let target_dir = out_dir.join("guest-target");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target = "x86_64-unknown-linux-gnu";

    for p in ["src", "Cargo.toml", "linker.ld"] {
        println!("cargo:rerun-if-changed={}", guest_dir.join(p).display());
    }
    println!("cargo:rerun-if-changed={}", abi_dir.join("src").display());
    println!(
        "cargo:rerun-if-changed={}",
        abi_dir.join("Cargo.toml").display()
    );

    let linker_script = guest_dir.join("linker.ld");
    let flags = [
        "-Crelocation-model=static".to_string(),
        "-Ctarget-cpu=x86-64".to_string(),
        "-Clink-arg=-nostartfiles".to_string(),
        "-Clink-arg=-nostdlib".to_string(),
        "-Clink-arg=-static".to_string(),
        "-Clink-arg=-Wl,--build-id=none".to_string(),
        format!("-Clink-arg=-Wl,-T,{}", linker_script.display()),
    ];

    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest_dir)
        .args(["build", "--release", "--target", target, "--target-dir"])
        .arg(&target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", flags.join("\x1f"));
    // The outer build's settings must not leak into the guest's.
    for var in [
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_MAKEFLAGS",
        "CARGO_PROFILE_RELEASE_PANIC",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_LLVM_COV",
        "CARGO_ENCODED_RUSTDOCFLAGS",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .expect("failed to run cargo for the guest image");
    if !status.success() {
        panic!("building the built-in guest (guest/image) failed: {status}");
    }
    let elf = target_dir.join(target).join("release/castor-guest");
    let dest = out_dir.join("castor-guest.elf");
    std::fs::copy(&elf, &dest).expect("copy the guest ELF into OUT_DIR");
}
