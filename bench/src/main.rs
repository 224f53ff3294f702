//! `castor-bench`: one subcommand per benchmark. Each prints a table, or with
//! `--json` one JSON object per result row.

mod disk;
mod failover;
mod harvest;
mod net;
mod net_kill;
mod pair;
mod pause;
mod replicate;
mod report;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "castor-bench",
    about = "Castor's benchmarks: each prints what it measured"
)]
struct Cli {
    /// One JSON object per result row instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Protected disk: guest write throughput and flush latency unprotected vs protected, initial sync of an image, pause time the disk adds.
    Disk(disk::Args),
    /// Failover time: SIGKILL of the primary to the first output of the new primary (real processes).
    Failover(failover::Args),
    /// Pause latency: pause() call to every vCPU out of KVM_RUN, under load.
    Pause(pause::Args),
    /// Dirty-page harvest cost per backend, guest size and dirty pages per epoch.
    Harvest(harvest::Args),
    /// Guest TCP over virtio-net + tap: stream throughput and echo latency.
    Net(net::Args),
    /// Checkpoint replication over QUIC loopback: pause, ack latency, wire bytes, guest slowdown.
    Replicate(replicate::Args),
}

fn main() {
    let cli = Cli::parse();
    let out = report::Output::new(cli.json);
    let result = match cli.bench {
        Bench::Disk(a) => disk::run(&a, &out),
        Bench::Failover(a) => failover::run(&a, &out),
        Bench::Pause(a) => pause::run(&a, &out),
        Bench::Harvest(a) => harvest::run(&a, &out),
        Bench::Net(a) => net::run(&a, &out),
        Bench::Replicate(a) => replicate::run(&a, &out),
    };
    if let Err(e) = result {
        eprintln!("castor-bench: {e}");
        std::process::exit(1);
    }
}
