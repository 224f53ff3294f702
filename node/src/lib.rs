//! What both Castor daemons (`castor primary`, `castor backup`) need, as
//! library types below them, so that each daemon stays a config file and a
//! `run` loop over `castor-replicator` and this crate (and the backup never
//! imports the primary):
//!
//! * [`config`]: the shared config sections (`[tls]`, `[output]`,
//!   `[metrics]`), the field parsers and [`ConfigError`], which names the
//!   field and the fix;
//! * [`mac`]: [`MacAddr`], printed as `02:ca:57:00:00:02`;
//! * [`sinks`]: where the guest's output goes (the output-commit buffer, UDP,
//!   the switches a replica is built with);
//! * [`net`]: packet output commit on the guest's virtio-net device and this
//!   host's tap;
//! * [`arp`]: the gratuitous ARP that announces a guest at its new port;
//! * [`replica`]: a replica VM's output plumbing and its VM factory;
//! * [`takeover`]: the takeover sequence ([`TakeoverPlan`]);
//! * [`mod@protect`]: the reconnect/backup-loss loop;
//! * [`runtime`]: the daemons' async runtime and metrics endpoint.

pub mod arp;
pub mod config;
pub mod mac;
pub mod net;
pub mod protect;
pub mod replica;
pub mod runtime;
pub mod sinks;
pub mod takeover;

pub use config::{ConfigError, MetricsSection, OutputSection, TlsFiles, TlsSection, Validator};
pub use mac::MacAddr;
pub use net::{open_tap, NetError, NetTxSink, TapRelease};
pub use protect::{protect, OnBackupLoss, Protection};
pub use replica::{ReplicaIo, ReplicaNet};
pub use runtime::{daemon_runtime, start_metrics, RuntimeError};
pub use sinks::{BufferedSink, SwitchSink, SwitchTxSink, UdpRelease};
pub use takeover::{Detection, TakeoverError, TakeoverPlan, TookOver};
