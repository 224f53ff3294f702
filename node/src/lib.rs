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
//! * [`status`]: what an operator sees ([`StatusBoard`]: role, protection
//!   state with its reason, epochs, rates, pauses, failovers);
//! * [`http`]: the HTTP endpoint (`/metrics`, `/status`, the status page);
//! * [`control`]: the control socket (`status`, `suspend`, `resume`);
//! * [`systemd`]: `sd_notify` (READY, STATUS, WATCHDOG);
//! * [`runtime`]: the daemons' async runtime, and starting the endpoints.

pub mod arp;
pub mod config;
pub mod control;
pub mod http;
pub mod mac;
pub mod net;
pub mod protect;
pub mod replica;
pub mod runtime;
pub mod signals;
pub mod sinks;
pub mod status;
pub mod systemd;
pub mod takeover;

pub use config::{
    ConfigError, ControlSection, DiskSection, MetricsSection, OutputSection, TlsFiles, TlsSection,
    Validator,
};
pub use mac::MacAddr;
pub use net::{open_tap, NetError, NetTxSink, TapPolicy, TapRelease};
pub use protect::{protect, OnBackupLoss, ProtectError, ProtectSwitch, Protection, SwitchError};
pub use replica::{ReplicaIo, ReplicaNet};
pub use runtime::{daemon_runtime, start_endpoints, RuntimeError};
pub use sinks::{BufferedSink, SwitchSink, SwitchTxSink, UdpRelease};
pub use status::{ProtectionState, Reason, Role, Status, StatusBoard};
pub use takeover::{Detection, TakeoverError, TakeoverPlan, TookOver};
