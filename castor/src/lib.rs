//! Library side of the `castor` binary: the CLI itself ([`cli`]), and what
//! `castor demo`, `castor drill` and `castor observe` share with the
//! failover tests and benchmarks ([`cluster`], [`observe`]).

pub mod cli;
pub mod cluster;
pub mod counter;
mod daemons;
mod demo;
pub mod drill;
pub mod netdemo;
pub mod observe;
mod run;
pub mod status;
