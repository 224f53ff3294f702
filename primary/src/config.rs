//! `primary.toml`: every field, with its default. Unknown fields are refused
//! and named; see `configs/primary.toml` for a commented example. The
//! sections both daemons share (`[tls]`, `[output]`, `[metrics]`) and the
//! field checks are `castor_node::config`'s.

pub use castor_node::config::ConfigError;
use castor_node::config::{
    self, ControlSection, DiskSection, MetricsSection, OutputSection, TlsFiles, TlsSection,
    Validator,
};
use castor_node::{MacAddr, OnBackupLoss, TapPolicy};
use castor_vmm::{DirtierParams, DiskParams, GuestBoot, NetParams, Pattern, VmConfig, Workload};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::Path;

/// The `[vm]` section.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSection {
    /// vCPUs, 1 to 8. Default 1.
    #[serde(default = "one")]
    pub vcpus: u32,
    /// Guest memory, "16M" to "16G". Default "256M".
    #[serde(default = "default_mem")]
    pub memory: String,
    /// "bitmap", "ring" or "auto" (default).
    #[serde(default = "default_tracking")]
    pub dirty_tracking: String,
}

/// The `[guest]` section: which guest (the built-in one with its workload,
/// or a Linux kernel) and the built-in workload's parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestSection {
    /// "builtin" (default: Castor's ring-3 guest running `workload`) or
    /// "linux" (an unmodified kernel: needs `kernel`).
    #[serde(default = "default_kind")]
    pub kind: String,
    /// Linux: the kernel, an ELF vmlinux (PVH entry) or a bzImage.
    #[serde(default)]
    pub kernel: Option<std::path::PathBuf>,
    /// Linux: an initramfs, optional.
    #[serde(default)]
    pub initrd: Option<std::path::PathBuf>,
    /// Linux: the kernel command line. Default: a console on COM1
    /// ("console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=t panic=-1").
    #[serde(default)]
    pub cmdline: Option<String>,
    /// "dirtier" (default), "net" (TCP counter/echo services on
    /// virtio-net; needs the `[net]` section) or "disk" (numbered,
    /// checksummed blocks written, flushed and verified continuously on
    /// virtio-blk; needs the `[disk]` section).
    #[serde(default = "default_workload")]
    pub workload: String,
    /// Total dirty rate, bytes of dirtied pages per second ("50M"); "0" = flat out.
    #[serde(default = "default_rate")]
    pub dirty_rate: String,
    /// Working set over all vCPUs ("64M"); default: all workload memory.
    #[serde(default)]
    pub working_set: Option<String>,
    /// "sequential", "uniform" (default) or "hot-cold".
    #[serde(default = "default_pattern")]
    pub pattern: String,
    /// Bytes written per touched page (multiple of 8, 8..=4096). Default 64.
    #[serde(default = "default_bpp")]
    pub bytes_per_page: u32,
    /// A record every this many page touches. Default 256.
    #[serde(default = "default_record_every")]
    pub record_every: u64,
    /// Mix host randomness into each record (nondeterministic input). Default true.
    #[serde(default = "yes")]
    pub entropy: bool,
    /// Workload seed. Default 1.
    #[serde(default = "one_u64")]
    pub seed: u64,
    /// Disk workload: blocks (4 KiB, from the start of the disk) it writes
    /// and verifies. Default: the whole disk, at most 262144 (1 GiB).
    #[serde(default)]
    pub disk_blocks: Option<u64>,
    /// Disk workload: operations (a block write and a read-back) per
    /// second; 0: as fast as the device answers. Default 500.
    #[serde(default = "default_disk_rate")]
    pub disk_rate: u64,
}

fn default_disk_rate() -> u64 {
    500
}

/// The `[net]` section (with `workload = "net"`): the guest's virtio-net
/// device and TCP services.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetSection {
    /// This host's tap interface for the guest, on the guest's bridge.
    /// Required. A missing tap is refused unless `create_tap`.
    pub tap: String,
    /// Create the tap when it is missing (needs CAP_NET_ADMIN; it is then on
    /// no bridge until you attach it). Default false.
    #[serde(default)]
    pub create_tap: bool,
    /// The guest's MAC address. Default "02:ca:57:00:00:02".
    #[serde(default = "default_mac")]
    pub mac: String,
    /// The guest's IPv4 address and prefix. Default "10.0.0.2/24".
    #[serde(default = "default_ip")]
    pub ip: String,
    /// Default gateway; absent = none.
    #[serde(default)]
    pub gateway: Option<std::net::Ipv4Addr>,
    /// Counter service port (echo on port + 1). Default 7000.
    #[serde(default = "default_port")]
    pub port: u16,
    /// Counter values per second per client; 0 (default) = as fast as TCP takes them.
    #[serde(default)]
    pub rate: u64,
}

/// The `[replication]` section.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationSection {
    /// The backup's address, "host:port". Required.
    pub backup: SocketAddr,
    /// Local UDP address to bind. Default "0.0.0.0:0".
    #[serde(default = "default_bind")]
    pub bind: SocketAddr,
    /// Epoch interval in milliseconds, 2 to 1000. Default 25.
    #[serde(default = "default_epoch")]
    pub epoch_ms: u64,
    /// "fixed" (default: an epoch every epoch_ms) or "output-triggered" (also
    /// end an epoch as soon as guest output waits and min_epoch_ms passed).
    #[serde(default = "default_epoch_mode")]
    pub epoch_mode: String,
    /// Shortest epoch in output-triggered mode, ms, 1 to epoch_ms. Default 1.
    #[serde(default = "default_min_epoch")]
    pub min_epoch_ms: u64,
    /// Epochs in flight (sent, not acked) before the next pause waits. Default 4.
    #[serde(default = "default_in_flight")]
    pub max_in_flight: usize,
    /// Last-sent page cache for XOR deltas ("256M").
    #[serde(default = "default_cache")]
    pub cache: String,
    /// Send a full-memory digest every N epochs for the backup to check (0 = never).
    #[serde(default)]
    pub verify_memory_every: u64,
    /// Heartbeat period in ms. Default 10.
    #[serde(default = "default_hb")]
    pub heartbeat_ms: u64,
    /// The backup is lost after this many ms of silence. Default 100.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// On backup loss: "pause" (default: hold the guest until a backup
    /// returns) or "continue" (run unprotected, release held output; loud).
    #[serde(default = "default_policy")]
    pub on_backup_loss: String,
}

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    /// `[vm]`.
    pub vm: VmSection,
    /// `[guest]`.
    #[serde(default = "default_guest")]
    pub guest: GuestSection,
    /// `[net]` (with `workload = "net"`).
    #[serde(default)]
    pub net: Option<NetSection>,
    /// `[disk]`: the guest's virtio-blk disk, replicated with it.
    #[serde(default)]
    pub disk: Option<DiskSection>,
    /// `[replication]`.
    pub replication: ReplicationSection,
    /// `[tls]`.
    pub tls: TlsSection,
    /// `[output]` (`release_to` is for the record guest only).
    #[serde(default)]
    pub output: OutputSection,
    /// `[metrics]`.
    #[serde(default)]
    pub metrics: MetricsSection,
    /// `[control]`.
    #[serde(default)]
    pub control: ControlSection,
}

/// A validated configuration.
#[derive(Debug)]
pub struct Config {
    /// VM shape.
    pub vm: VmConfig,
    /// The built-in guest (ignored when `linux` is set).
    pub boot: GuestBoot,
    /// A Linux guest (`[guest] kind = "linux"`).
    pub linux: Option<castor_vmm::LinuxBoot>,
    /// Pipeline settings.
    pub pipeline: castor_replicator::primary::PrimaryConfig,
    /// Backup address.
    pub backup: SocketAddr,
    /// Local bind.
    pub bind: SocketAddr,
    /// This host's TLS identity and the backup's certificate.
    pub tls: TlsFiles,
    /// Released records' destination (the record guest; `None` for a
    /// network guest, whose frames go to its tap).
    pub release_to: Option<SocketAddr>,
    /// Output cap in bytes.
    pub max_held: usize,
    /// HTTP endpoint (metrics, status, status page).
    pub metrics: Option<SocketAddr>,
    /// Control socket.
    pub control: Option<castor_node::control::SocketConfig>,
    /// Backup-loss policy.
    pub on_backup_loss: OnBackupLoss,
    /// The guest's network device (net workload).
    pub net: Option<NetDevice>,
    /// The guest's disk.
    pub disk: Option<castor_vmm::devices::BlkConfig>,
}

/// The guest's virtio-net device on this host.
#[derive(Clone, Debug)]
pub struct NetDevice {
    /// Tap interface name.
    pub tap: String,
    /// The guest's MAC.
    pub mac: MacAddr,
    /// Create the tap when missing.
    pub tap_policy: TapPolicy,
}

fn one() -> u32 {
    1
}
fn one_u64() -> u64 {
    1
}
fn yes() -> bool {
    true
}
fn default_mem() -> String {
    "256M".into()
}
fn default_tracking() -> String {
    "auto".into()
}
fn default_kind() -> String {
    "builtin".into()
}
fn default_workload() -> String {
    "dirtier".into()
}
fn default_rate() -> String {
    "50M".into()
}
fn default_pattern() -> String {
    "uniform".into()
}
fn default_bpp() -> u32 {
    64
}
fn default_record_every() -> u64 {
    256
}
fn default_bind() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}
fn default_epoch() -> u64 {
    25
}
fn default_in_flight() -> usize {
    4
}
fn default_cache() -> String {
    "256M".into()
}
fn default_hb() -> u64 {
    10
}
fn default_timeout() -> u64 {
    100
}
fn default_policy() -> String {
    "pause".into()
}
fn default_mac() -> String {
    "02:ca:57:00:00:02".into()
}
fn default_ip() -> String {
    "10.0.0.2/24".into()
}
fn default_port() -> u16 {
    7000
}
fn default_epoch_mode() -> String {
    "fixed".into()
}
fn default_min_epoch() -> u64 {
    1
}
fn default_guest() -> GuestSection {
    GuestSection {
        kind: default_kind(),
        kernel: None,
        initrd: None,
        cmdline: None,
        workload: default_workload(),
        dirty_rate: default_rate(),
        working_set: None,
        pattern: default_pattern(),
        bytes_per_page: default_bpp(),
        record_every: default_record_every(),
        entropy: yes(),
        seed: one_u64(),
        disk_blocks: None,
        disk_rate: default_disk_rate(),
    }
}

/// `[guest] kind` and, for "linux", the kernel to boot (checked here, at
/// start: a missing file is named with the command that makes one).
fn linux_boot(
    v: &Validator,
    g: &GuestSection,
) -> Result<Option<castor_vmm::LinuxBoot>, ConfigError> {
    match g.kind.as_str() {
        "builtin" => {
            for (field, set) in [
                ("guest.kernel", g.kernel.is_some()),
                ("guest.initrd", g.initrd.is_some()),
                ("guest.cmdline", g.cmdline.is_some()),
            ] {
                if set {
                    return Err(v.invalid(
                        field,
                        "applies to a Linux guest: add kind = \"linux\" to [guest], or remove it",
                    ));
                }
            }
            Ok(None)
        }
        "linux" => {
            let Some(kernel) = &g.kernel else {
                return Err(v.invalid(
                    "guest.kernel",
                    "kind = \"linux\" needs a kernel: kernel = \"/var/cache/castor-linux/vmlinux\" \
                     (scripts/linux-guest-kit.sh makes one)",
                ));
            };
            let kernel = v.relative(kernel);
            let initrd = g.initrd.as_ref().map(|p| v.relative(p));
            for (field, p) in [
                ("guest.kernel", Some(&kernel)),
                ("guest.initrd", initrd.as_ref()),
            ] {
                if let Some(p) = p {
                    if !p.is_file() {
                        return Err(v.invalid(
                            field,
                            format!(
                                "{} is not a readable file (scripts/linux-guest-kit.sh makes a kernel and an initramfs)",
                                p.display()
                            ),
                        ));
                    }
                }
            }
            Ok(Some(castor_vmm::LinuxBoot {
                kernel,
                initrd,
                cmdline: g
                    .cmdline
                    .clone()
                    .unwrap_or_else(|| castor_vmm::LinuxBoot::DEFAULT_CMDLINE.to_string()),
            }))
        }
        other => Err(v.invalid(
            "guest.kind",
            format!("{other:?}: use \"builtin\" or \"linux\""),
        )),
    }
}

/// Parses "10.0.0.2/24" into the address and the prefix length (1 to 30).
pub fn parse_cidr(s: &str) -> Option<([u8; 4], u8)> {
    let (ip, len) = s.split_once('/')?;
    let ip: std::net::Ipv4Addr = ip.trim().parse().ok()?;
    let len: u8 = len.trim().parse().ok()?;
    (1..=30).contains(&len).then_some((ip.octets(), len))
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::parse(&config::read(path)?, path)
    }

    /// Validates the text of a config file (`path` for messages and relative paths).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let f: File = config::parse_toml(text, path, &["vm", "replication", "tls"])?;
        let v = Validator::new(path);
        let vm = VmConfig {
            vcpus: f.vm.vcpus,
            mem_bytes: v.size("vm.memory", &f.vm.memory)?,
            dirty_tracking: v.tracking("vm.dirty_tracking", &f.vm.dirty_tracking)?,
            ..VmConfig::default()
        };
        vm.validate().map_err(|e| v.invalid("vm", e.to_string()))?;
        let mut net = None;
        let mut net_params = None;
        let disk = match &f.disk {
            Some(d) => Some(d.resolve(&v)?),
            None => None,
        };
        let mut disk_params = None;
        let linux = linux_boot(&v, &f.guest)?;
        if linux.is_some() && f.guest.workload != "dirtier" {
            return Err(v.invalid(
                "guest.workload",
                format!(
                    "{:?} is a workload of the built-in guest; a Linux guest (kind = \"linux\") runs its own programs: remove `workload`",
                    f.guest.workload
                ),
            ));
        }
        if let (Some(_), Some(n)) = (&linux, &f.net) {
            // A Linux guest drives its virtio-net device itself.
            net = Some(NetDevice {
                tap: n.tap.clone(),
                mac: v.mac("net.mac", &n.mac)?,
                tap_policy: if n.create_tap {
                    TapPolicy::Create
                } else {
                    TapPolicy::MustExist
                },
            });
        }
        match (f.guest.workload.as_str(), &f.net) {
            _ if linux.is_some() => {}
            ("dirtier", _) => {}
            ("disk", _) => {
                let Some(d) = &disk else {
                    return Err(v.invalid(
                        "disk",
                        "workload \"disk\" needs a [disk] section with `path` (a raw image: `truncate -s 64M disk.img`)",
                    ));
                };
                if d.read_only {
                    return Err(v.invalid(
                        "disk.read_only",
                        "the disk workload writes: set read_only = false",
                    ));
                }
                let capacity = std::fs::metadata(&d.path).map(|m| m.len()).unwrap_or(0)
                    / castor_vmm::devices::DISK_BLOCK;
                let max = capacity.min(DiskParams::MAX_CONTINUOUS_BLOCKS);
                let blocks = f.guest.disk_blocks.unwrap_or(max);
                if blocks == 0 || blocks > max {
                    return Err(v.invalid(
                        "guest.disk_blocks",
                        format!(
                            "{blocks}: use 1 to {max} (the image holds {capacity} blocks of 4 KiB)"
                        ),
                    ));
                }
                disk_params = Some(DiskParams {
                    blocks,
                    continuous: true,
                    rate: f.guest.disk_rate,
                    ops: 0,
                    sequential: false,
                });
            }
            ("net", Some(n)) => {
                let mac = v.mac("net.mac", &n.mac)?;
                let (ip, prefix_len) = parse_cidr(&n.ip).ok_or_else(|| {
                    v.invalid(
                        "net.ip",
                        format!("{:?}: use ADDRESS/PREFIX, prefix 1 to 30", n.ip),
                    )
                })?;
                if n.port == u16::MAX || n.port == 0 {
                    return Err(v.invalid("net.port", format!("{}: use 1 to 65534", n.port)));
                }
                net = Some(NetDevice {
                    tap: n.tap.clone(),
                    mac,
                    tap_policy: if n.create_tap {
                        TapPolicy::Create
                    } else {
                        TapPolicy::MustExist
                    },
                });
                net_params = Some(NetParams {
                    ip,
                    prefix_len,
                    gateway: n.gateway.map(|g| g.octets()),
                    mac: mac.octets(),
                    port: n.port,
                    rate: n.rate,
                });
            }
            ("net", None) => {
                return Err(v.invalid(
                    "net",
                    "workload \"net\" needs a [net] section with at least `tap`",
                ))
            }
            (other, _) => {
                return Err(v.invalid(
                    "guest.workload",
                    format!("{other:?}: use \"dirtier\", \"net\" or \"disk\""),
                ))
            }
        }
        let pattern: Pattern = f
            .guest
            .pattern
            .parse()
            .map_err(|e: castor_vmm::Error| v.invalid("guest.pattern", e.to_string()))?;
        let params = DirtierParams {
            working_set: match &f.guest.working_set {
                Some(w) => v.size("guest.working_set", w)?,
                None => 0,
            },
            dirty_rate: v.size("guest.dirty_rate", &f.guest.dirty_rate)?,
            pattern,
            bytes_per_page: f.guest.bytes_per_page,
            record_every: f.guest.record_every,
            use_entropy: f.guest.entropy,
        };
        params
            .to_abi(vm.vcpus, vm.mem_bytes)
            .map_err(|e| v.invalid("guest", e.to_string()))?;
        let r = &f.replication;
        let epoch_interval = v.epoch_ms("replication.epoch_ms", r.epoch_ms)?;
        if r.max_in_flight == 0 || r.max_in_flight > 64 {
            return Err(v.invalid(
                "replication.max_in_flight",
                format!("{}: use 1 to 64", r.max_in_flight),
            ));
        }
        let (heartbeat, peer_timeout) =
            v.timeouts("replication.timeout_ms", r.heartbeat_ms, r.timeout_ms)?;
        let on_backup_loss = v.on_backup_loss("replication.on_backup_loss", &r.on_backup_loss)?;
        let epoch_mode = v.epoch_mode(
            ("replication.epoch_mode", "replication.min_epoch_ms"),
            &r.epoch_mode,
            r.min_epoch_ms,
            r.epoch_ms,
        )?;
        let pipeline = castor_replicator::primary::PrimaryConfig {
            epoch_mode,
            epoch_interval,
            max_in_flight: r.max_in_flight,
            cache_bytes: v.size("replication.cache", &r.cache)? as usize,
            verify_memory_every: r.verify_memory_every,
            heartbeat,
            peer_timeout,
            ..Default::default()
        };
        Ok(Config {
            vm,
            boot: GuestBoot {
                workload: match (net_params, disk_params) {
                    (Some(n), _) => Workload::Net(n),
                    (None, Some(d)) => Workload::Disk(d),
                    (None, None) => Workload::Dirtier(params),
                },
                seed: f.guest.seed,
            },
            linux,
            pipeline,
            backup: r.backup,
            bind: r.bind,
            tls: f.tls.resolve(&v),
            release_to: f
                .output
                .records_to(&v, net.as_ref().map(|n| n.tap.as_str()))?,
            max_held: f.output.max_held_bytes(&v)?,
            metrics: f.metrics.listen,
            control: f.control.resolve(&v, "primary"),
            on_backup_loss,
            net,
            disk,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const BASE: &str = "[vm]\n[replication]\nbackup = \"127.0.0.1:7400\"\n\
        [tls]\ncert = \"p.crt\"\nkey = \"p.key\"\npeer_cert = \"b.crt\"\n\
        [output]\nrelease_to = \"127.0.0.1:7500\"\n";

    fn parse(extra_replication: &str, rest: &str) -> Result<Config, ConfigError> {
        let text = BASE.replace(
            "[replication]\n",
            &format!("[replication]\n{extra_replication}"),
        );
        Config::parse(
            &format!("{text}{rest}"),
            Path::new("/etc/castor/primary.toml"),
        )
    }

    #[test]
    fn net_workload_and_epoch_modes() {
        let c = parse(
            "epoch_mode = \"output-triggered\"\nmin_epoch_ms = 2\n",
            "[guest]\nworkload = \"net\"\n[net]\ntap = \"tap0\"\nmac = \"02:00:00:00:00:09\"\n\
             ip = \"10.1.2.3/16\"\ngateway = \"10.1.0.1\"\nport = 8000\n",
        )
        .unwrap();
        let dev = c.net.clone().unwrap();
        assert_eq!(dev.tap, "tap0");
        assert_eq!(dev.mac, MacAddr([2, 0, 0, 0, 0, 9]));
        assert_eq!(dev.mac.to_string(), "02:00:00:00:00:09");
        match &c.boot.workload {
            Workload::Net(n) => {
                assert_eq!(n.ip, [10, 1, 2, 3]);
                assert_eq!(n.prefix_len, 16);
                assert_eq!(n.gateway, Some([10, 1, 0, 1]));
                assert_eq!(n.port, 8000);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            c.pipeline.epoch_mode,
            castor_replicator::primary::EpochMode::OutputTriggered {
                min_epoch: Duration::from_millis(2)
            }
        );
        let d = parse("", "").unwrap();
        assert!(d.net.is_none());
        assert_eq!(
            d.pipeline.epoch_mode,
            castor_replicator::primary::EpochMode::Fixed
        );
    }

    #[test]
    fn bad_net_settings_are_refused_with_the_field() {
        let field = |e: ConfigError| match e {
            ConfigError::Invalid { field, .. } => field,
            other => panic!("{other}"),
        };
        let net = |s: &str| format!("[guest]\nworkload = \"net\"\n[net]\ntap = \"t\"\n{s}");
        assert_eq!(
            field(parse("", "[guest]\nworkload = \"net\"\n").unwrap_err()),
            "net"
        );
        assert_eq!(
            field(parse("", &net("mac = \"02:00\"\n")).unwrap_err()),
            "net.mac"
        );
        assert_eq!(
            field(parse("", &net("ip = \"10.0.0.2\"\n")).unwrap_err()),
            "net.ip"
        );
        assert_eq!(
            field(parse("", &net("port = 0\n")).unwrap_err()),
            "net.port"
        );
        assert_eq!(
            field(parse("epoch_mode = \"sometimes\"\n", "").unwrap_err()),
            "replication.epoch_mode"
        );
        assert_eq!(
            field(parse("epoch_mode = \"output-triggered\"\nmin_epoch_ms = 0\n", "").unwrap_err()),
            "replication.min_epoch_ms"
        );
        assert_eq!(
            field(parse("", "[guest]\nworkload = \"disk\"\n").unwrap_err()),
            "disk"
        );
        assert_eq!(
            field(
                parse(
                    "",
                    "[guest]\nworkload = \"disk\"\n[disk]\npath = \"/nonexistent/castor.img\"\n"
                )
                .unwrap_err()
            ),
            "disk.path"
        );
    }

    #[test]
    fn output_applies_to_the_record_guest_only() {
        let no_output = "[vm]\n[replication]\nbackup = \"127.0.0.1:7400\"\n\
            [tls]\ncert = \"p.crt\"\nkey = \"p.key\"\npeer_cert = \"b.crt\"\n";
        let p = Path::new("/etc/castor/primary.toml");
        // A network guest needs no [output] at all.
        let c = Config::parse(
            &format!("{no_output}[guest]\nworkload = \"net\"\n[net]\ntap = \"tap0\"\n"),
            p,
        )
        .unwrap();
        assert_eq!(c.release_to, None);
        assert_eq!(c.net.unwrap().tap_policy, TapPolicy::MustExist);
        assert_eq!(
            c.control.map(|s| s.path),
            Some(std::path::PathBuf::from("/run/castor/primary.sock"))
        );
        // The record guest does, and says so by field.
        match Config::parse(no_output, p) {
            Err(ConfigError::Invalid { field, .. }) => assert_eq!(field, "output.release_to"),
            other => panic!("{other:?}"),
        }
        // A missing section is named, not "missing field at line 1 column 1".
        let e = Config::parse("[vm]\n", p).unwrap_err();
        assert!(
            e.to_string().contains("[replication] section is missing"),
            "{e}"
        );
        let c = parse("", "[guest]\nworkload = \"net\"\n[net]\ntap = \"t\"\ncreate_tap = true\n[control]\nsocket = \"ctl.sock\"\n").unwrap();
        assert_eq!(c.net.unwrap().tap_policy, TapPolicy::Create);
        assert_eq!(
            c.control.map(|s| s.path),
            Some(std::path::PathBuf::from("/etc/castor/ctl.sock"))
        );
    }

    #[test]
    fn cidr() {
        assert_eq!(parse_cidr("10.0.0.2/24"), Some(([10, 0, 0, 2], 24)));
        assert_eq!(parse_cidr("10.0.0.2/31"), None);
        assert_eq!(parse_cidr("10.0.0/24"), None);
    }

    #[test]
    fn linux_guest_fields_are_checked_at_start() {
        let field = |e: ConfigError| match e {
            ConfigError::Invalid { field, message, .. } => (field, message),
            other => panic!("{other:?}"),
        };
        let dir = std::env::temp_dir().join(format!("castor-cfg-linux-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kernel = dir.join("vmlinux");
        std::fs::write(&kernel, b"not really a kernel").unwrap();
        // No kernel: named, with the script that makes one.
        let (f, m) = field(parse("", "[guest]\nkind = \"linux\"\n").unwrap_err());
        assert_eq!(f, "guest.kernel");
        assert!(m.contains("linux-guest-kit.sh"), "{m}");
        // A kernel that is not there.
        let (f, _) = field(
            parse(
                "",
                "[guest]\nkind = \"linux\"\nkernel = \"/nonexistent/vmlinux\"\n",
            )
            .unwrap_err(),
        );
        assert_eq!(f, "guest.kernel");
        // A built-in workload with a Linux guest.
        let linux = format!(
            "[guest]\nkind = \"linux\"\nkernel = \"{}\"\n",
            kernel.display()
        );
        let (f, _) = field(parse("", &format!("{linux}workload = \"net\"\n")).unwrap_err());
        assert_eq!(f, "guest.workload");
        // Linux fields without kind = "linux".
        let (f, _) = field(parse("", "[guest]\ncmdline = \"quiet\"\n").unwrap_err());
        assert_eq!(f, "guest.cmdline");
        let (f, _) = field(parse("", "[guest]\nkind = \"windows\"\n").unwrap_err());
        assert_eq!(f, "guest.kind");
        // Valid: the default command line.
        let c = parse("", &linux).unwrap();
        let l = c.linux.expect("a Linux guest");
        assert_eq!(l.kernel, kernel);
        assert_eq!(l.cmdline, castor_vmm::LinuxBoot::DEFAULT_CMDLINE);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
