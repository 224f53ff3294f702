//! Library side of the `castor` binary: what `castor demo`, `castor drill`
//! and `castor observe` share with the failover tests and benchmarks.

pub mod cluster;
pub mod observe;
