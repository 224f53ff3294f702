//! `castor primary`, `castor backup`, `castor keygen`.

use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct ConfigArg {
    /// The TOML configuration file (see configs/ for commented examples).
    #[arg(long)]
    pub config: PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct PrimaryArgs {
    /// The TOML configuration file (see configs/primary.toml).
    #[arg(long)]
    pub config: PathBuf,
    /// Override `[replication] verify_memory_every`: every N epochs the
    /// primary sends a digest of all guest memory taken at the pause and the
    /// backup compares it with its replica after the commit (0 = never; the
    /// digest is computed inside the pause).
    #[arg(long)]
    pub verify_memory_every: Option<u64>,
}

#[derive(clap::Args, Debug)]
pub struct KeygenArgs {
    /// Directory to write NAME.crt and NAME.key into.
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
    /// Host name (file names and certificate subject).
    #[arg(long)]
    pub name: String,
}

pub fn primary(a: &PrimaryArgs) -> Result<(), String> {
    let mut cfg = castor_primary::Config::load(&a.config).map_err(|e| e.to_string())?;
    if let Some(n) = a.verify_memory_every {
        cfg.pipeline.verify_memory_every = n;
    }
    castor_primary::run(cfg).map_err(|e| e.to_string())
}

pub fn backup(a: &ConfigArg) -> Result<(), String> {
    let cfg = castor_backup::Config::load(&a.config).map_err(|e| e.to_string())?;
    castor_backup::run(cfg).map_err(|e| e.to_string())
}

pub fn keygen(a: &KeygenArgs) -> Result<(), String> {
    std::fs::create_dir_all(&a.out).map_err(|e| format!("{}: {e}", a.out.display()))?;
    let (cert, key) =
        castor_replicator::transport::write_identity(&a.out, &a.name).map_err(|e| e.to_string())?;
    println!(
        "wrote {} and {} (key mode 0600)",
        cert.display(),
        key.display()
    );
    Ok(())
}
