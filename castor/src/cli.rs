//! The `castor` command line: each subcommand is a thin layer over the
//! library crates (vmm, replicator, primary, backup). `castor`'s `main` is
//! [`main`]; the test suite builds the same CLI into its own binary.

use crate::{daemons, demo, drill, run, status};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "castor",
    version,
    about = "Castor keeps a KVM virtual machine alive when its host dies"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a guest on this host, unprotected, with live progress.
    Run(run::RunArgs),
    /// Run the protected guest and replicate it to a backup.
    Primary(daemons::PrimaryArgs),
    /// Hold a hot replica of a primary's guest; take over when it dies.
    Backup(daemons::ConfigArg),
    /// Write a TLS key pair (NAME.crt, NAME.key) for one host.
    Keygen(daemons::KeygenArgs),
    /// Receive released output and check that the world saw one history.
    Observe(crate::observe::ObserveArgs),
    /// Start a pair on this machine, kill the primary, watch the backup take over.
    Demo(demo::DemoArgs),
    /// Trigger a failover of a running pair and check the invariant.
    Drill(drill::DrillArgs),
    /// Show a running daemon's role, protection state, epochs, rates and failovers.
    Status(status::StatusArgs),
    /// Send a control command to a running daemon: suspend or resume protection, status.
    Ctl(status::CtlArgs),
}

/// Parses the command line, runs the subcommand, exits 1 on error.
pub fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => run::run(&a).map_err(|e| e.to_string()),
        Command::Primary(a) => daemons::primary(&a),
        Command::Backup(a) => daemons::backup(&a),
        Command::Keygen(a) => daemons::keygen(&a),
        Command::Observe(a) => crate::observe::observe_command(&a),
        Command::Demo(a) => demo::demo(&a),
        Command::Drill(a) => drill::drill(&a),
        Command::Status(a) => status::status(&a),
        Command::Ctl(a) => status::ctl(&a),
    };
    if let Err(e) = result {
        eprintln!("castor: error: {e}");
        std::process::exit(1);
    }
}
