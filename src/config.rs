//! The machine description: a Firecracker-shaped JSON config file (`boot-source`, `machine-config`)
//! or the same fields from the command line, and its validation.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::memory::{CMDLINE_MAX_SIZE, MAX_VCPUS, MAX_VIRTIO_DEVICES, MIN_MEM_MIB};

/// Drives per VM, at most (every virtio device takes one of the machine's slots; vsock takes one).
pub const MAX_DRIVES: usize = MAX_VIRTIO_DEVICES - 1;
/// The longest drive id: what the guest reads as the disk's serial (VIRTIO_BLK_ID_BYTES).
pub const MAX_DRIVE_ID_LEN: usize = 20;

pub const DEFAULT_VCPUS: u8 = 1;
pub const DEFAULT_MEM_MIB: u64 = 128;
/// The largest guest ember accepts (1 TiB): more is almost certainly a typo.
pub const MAX_MEM_MIB: u64 = 1 << 20;

/// ember's default guest kernel command line, kept with the guest kernel in guest/kernel/cmdline.
const DEFAULT_CMDLINE_FILE: &str = include_str!("../guest/kernel/cmdline");

/// The default command line: guest/kernel/cmdline without its comments, joined with spaces.
pub fn default_cmdline() -> String {
    DEFAULT_CMDLINE_FILE
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config file {path}: {source}")]
    Parse { path: PathBuf, source: serde_json::Error },
    #[error("vCPU count (vcpu_count, --vcpus) must be between 1 and {MAX_VCPUS}, got {0}")]
    Vcpus(u64),
    #[error("guest memory (mem_size_mib, --mem-mib) must be between {MIN_MEM_MIB} and {MAX_MEM_MIB} MiB, got {0}")]
    Memory(u64),
    #[error("kernel command line is {0} bytes; the limit is {max}", max = CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(usize),
    #[error("the kernel command line must not contain a NUL byte")]
    CmdlineNul,
    #[error("drive: {0}")]
    Drive(String),
    #[error("network interface: {0}")]
    Net(String),
}

/// A block device (Firecracker's `drives` entry): a host file the guest sees as `/dev/vdX`, in
/// the order given (the root device first), its id readable as `/sys/block/vdX/serial`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    /// 1 to 20 characters of `[A-Za-z0-9_-]`.
    pub drive_id: String,
    pub path_on_host: PathBuf,
    /// Boot from this drive (`root=/dev/vda` on the command line) instead of an initramfs.
    #[serde(default)]
    pub is_root_device: bool,
    #[serde(default)]
    pub is_read_only: bool,
}

impl DriveConfig {
    /// A read-only drive that is not the root device (a layer).
    pub fn read_only(drive_id: impl Into<String>, path_on_host: impl Into<PathBuf>) -> Self {
        Self { drive_id: drive_id.into(), path_on_host: path_on_host.into(), is_root_device: false, is_read_only: true }
    }

    /// `PATH[,ro][,id=ID][,root]` (the `--drive` argument); `index` names a drive without an id.
    pub fn parse(arg: &str, index: usize) -> Result<Self, ConfigError> {
        let mut parts = arg.split(',');
        let path = parts.next().filter(|p| !p.is_empty()).ok_or_else(|| ConfigError::Drive("empty path".into()))?;
        let mut d = DriveConfig {
            drive_id: format!("drive{index}"),
            path_on_host: PathBuf::from(path),
            is_root_device: false,
            is_read_only: false,
        };
        for p in parts {
            match p {
                "ro" => d.is_read_only = true,
                "rw" => d.is_read_only = false,
                "root" => d.is_root_device = true,
                _ if p.starts_with("id=") => d.drive_id = p[3..].to_string(),
                _ => return Err(ConfigError::Drive(format!("{arg:?}: unknown option {p:?} (ro, rw, root, id=ID)"))),
            }
        }
        Ok(d)
    }
}

/// Checks a list of drives: ids well-formed and distinct, at most one root device, not too many.
pub fn check_drives(drives: &[DriveConfig]) -> Result<(), ConfigError> {
    if drives.len() > MAX_DRIVES {
        return Err(ConfigError::Drive(format!("{} drives, at most {MAX_DRIVES}", drives.len())));
    }
    for (i, d) in drives.iter().enumerate() {
        let id = &d.drive_id;
        if !is_id(id) {
            return Err(ConfigError::Drive(format!(
                "bad drive_id {id:?}: use 1 to {MAX_DRIVE_ID_LEN} characters of [A-Za-z0-9_-]"
            )));
        }
        if drives[..i].iter().any(|o| &o.drive_id == id) {
            return Err(ConfigError::Drive(format!("drive_id {id:?} is used twice")));
        }
        if d.path_on_host.as_os_str().is_empty() {
            return Err(ConfigError::Drive(format!("drive {id:?} has no path_on_host")));
        }
    }
    if drives.iter().filter(|d| d.is_root_device).count() > 1 {
        return Err(ConfigError::Drive("more than one root device".into()));
    }
    Ok(())
}

/// The drives in the order the guest numbers them: the root device first (`/dev/vda`).
pub fn ordered_drives(drives: &[DriveConfig]) -> Vec<DriveConfig> {
    let mut v = drives.to_vec();
    v.sort_by_key(|d| !d.is_root_device);
    v
}

/// Network interfaces per VM, at most (the agent configures one).
pub const MAX_NETS: usize = 1;
/// The MAC address a guest's interface gets when none is given.
pub const DEFAULT_GUEST_MAC: &str = "02:ee:00:00:00:02";

/// A network interface (Firecracker's `network-interfaces` entry): a virtio-net card on the host's
/// TAP device `host_dev_name`. ember's own additions: `guest_ip` (`ADDR/PREFIX`) and `gateway`,
/// which the agent gives the guest's `eth0` before the snapshot point (without them the guest
/// configures its interface itself).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// 1 to 20 characters of `[A-Za-z0-9_-]`.
    pub iface_id: String,
    /// The TAP device (ember opens it; it must exist unless ember may create it).
    pub host_dev_name: String,
    #[serde(default)]
    pub guest_mac: Option<String>,
    #[serde(default)]
    pub guest_ip: Option<String>,
    #[serde(default)]
    pub gateway: Option<String>,
}

impl NetConfig {
    /// `TAP[,mac=MAC][,ip=ADDR/PREFIX][,gw=ADDR][,id=ID]` (the `--net` argument).
    pub fn parse(arg: &str) -> Result<Self, ConfigError> {
        let mut parts = arg.split(',');
        let tap = parts.next().filter(|p| !p.is_empty()).ok_or_else(|| ConfigError::Net("empty TAP name".into()))?;
        let mut n = NetConfig {
            iface_id: "eth0".into(),
            host_dev_name: tap.into(),
            guest_mac: None,
            guest_ip: None,
            gateway: None,
        };
        for p in parts {
            match p.split_once('=') {
                Some(("mac", v)) => n.guest_mac = Some(v.into()),
                Some(("ip", v)) => n.guest_ip = Some(v.into()),
                Some(("gw", v)) => n.gateway = Some(v.into()),
                Some(("id", v)) => n.iface_id = v.into(),
                _ => {
                    return Err(ConfigError::Net(format!(
                        "{arg:?}: unknown option {p:?} (mac=MAC, ip=ADDR/PREFIX, gw=ADDR, id=ID)"
                    )))
                }
            }
        }
        n.check()?;
        Ok(n)
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        let text = self.guest_mac.as_deref().unwrap_or(DEFAULT_GUEST_MAC);
        parse_mac(text).unwrap_or([2, 0xee, 0, 0, 0, 2])
    }

    /// Checks every field; the address and gateway are parsed, the MAC is a unicast one.
    pub fn check(&self) -> Result<(), ConfigError> {
        let id = &self.iface_id;
        if !is_id(id) {
            return Err(ConfigError::Net(format!(
                "bad iface_id {id:?}: use 1 to {MAX_DRIVE_ID_LEN} characters of [A-Za-z0-9_-]"
            )));
        }
        let name = &self.host_dev_name;
        if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\0']) {
            return Err(ConfigError::Net(format!("bad host_dev_name {name:?} (1 to 15 bytes, no '/')")));
        }
        if let Some(m) = &self.guest_mac {
            match parse_mac(m) {
                Some(mac) if mac[0] & 1 == 0 && mac != [0; 6] => {}
                _ => return Err(ConfigError::Net(format!("bad guest_mac {m:?} (a unicast aa:bb:cc:dd:ee:ff)"))),
            }
        }
        if let Some(ip) = &self.guest_ip {
            parse_cidr(ip).map_err(|e| ConfigError::Net(format!("bad guest_ip {ip:?}: {e}")))?;
        }
        if let Some(gw) = &self.gateway {
            if self.guest_ip.is_none() {
                return Err(ConfigError::Net("a gateway needs a guest_ip".into()));
            }
            gw.parse::<std::net::Ipv4Addr>().map_err(|e| ConfigError::Net(format!("bad gateway {gw:?}: {e}")))?;
        }
        Ok(())
    }

    /// What the agent reads from the command line to configure `eth0` (`ember_net=ADDR/PREFIX[,GW]`).
    pub fn cmdline(&self) -> Option<String> {
        let ip = self.guest_ip.as_ref()?;
        Some(match &self.gateway {
            Some(gw) => format!("ember_net={ip},{gw}"),
            None => format!("ember_net={ip}"),
        })
    }
}

/// Parses a MAC address `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Parses `ADDR/PREFIX` (IPv4).
pub fn parse_cidr(s: &str) -> Result<(std::net::Ipv4Addr, u8), String> {
    let (addr, prefix) = s.split_once('/').ok_or("expected ADDR/PREFIX")?;
    let addr = addr.parse::<std::net::Ipv4Addr>().map_err(|e| e.to_string())?;
    let prefix = prefix.parse::<u8>().ok().filter(|p| *p <= 32).ok_or("the prefix must be 0 to 32")?;
    Ok((addr, prefix))
}

fn is_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_DRIVE_ID_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Checks a VM's network interfaces: each well-formed, ids distinct, not too many.
pub fn check_nets(nets: &[NetConfig]) -> Result<(), ConfigError> {
    if nets.len() > MAX_NETS {
        return Err(ConfigError::Net(format!("{} network interfaces, at most {MAX_NETS}", nets.len())));
    }
    for n in nets {
        n.check()?;
    }
    Ok(())
}

/// What to boot.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// An ELF vmlinux (PVH entry when it has the note) or a bzImage.
    pub kernel_image_path: PathBuf,
    /// An initramfs (uncompressed cpio recommended).
    #[serde(default)]
    pub initrd_path: Option<PathBuf>,
    /// The kernel command line; ember's default when absent.
    #[serde(default)]
    pub boot_args: Option<String>,
}

/// The machine's size.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    #[serde(default = "default_vcpus")]
    pub vcpu_count: u64,
    #[serde(default = "default_mem")]
    pub mem_size_mib: u64,
}

fn default_vcpus() -> u64 {
    u64::from(DEFAULT_VCPUS)
}

fn default_mem() -> u64 {
    DEFAULT_MEM_MIB
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self { vcpu_count: default_vcpus(), mem_size_mib: default_mem() }
    }
}

/// A whole VM description, as in Firecracker's `--config-file`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    #[serde(rename = "boot-source")]
    pub boot_source: BootSource,
    #[serde(rename = "machine-config", default)]
    pub machine_config: MachineConfig,
    #[serde(default)]
    pub drives: Vec<DriveConfig>,
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetConfig>,
}

impl VmConfig {
    /// Reads and validates a JSON config file. Relative paths in it are taken relative to the file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let mut cfg: VmConfig =
            serde_json::from_str(&text).map_err(|source| ConfigError::Parse { path: path.to_owned(), source })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let rebase = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        rebase(&mut cfg.boot_source.kernel_image_path);
        if let Some(p) = cfg.boot_source.initrd_path.as_mut() {
            rebase(p);
        }
        for d in &mut cfg.drives {
            rebase(&mut d.path_on_host);
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what can be checked without touching the kernel or initramfs files.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let m = &self.machine_config;
        if m.vcpu_count == 0 || m.vcpu_count > u64::from(MAX_VCPUS) {
            return Err(ConfigError::Vcpus(m.vcpu_count));
        }
        if m.mem_size_mib < MIN_MEM_MIB || m.mem_size_mib > MAX_MEM_MIB {
            return Err(ConfigError::Memory(m.mem_size_mib));
        }
        if let Some(args) = &self.boot_source.boot_args {
            if args.len() + 1 > CMDLINE_MAX_SIZE {
                return Err(ConfigError::CmdlineTooLong(args.len()));
            }
            if args.contains('\0') {
                return Err(ConfigError::CmdlineNul);
            }
        }
        check_drives(&self.drives)?;
        check_nets(&self.network_interfaces)
    }

    pub fn vcpus(&self) -> u8 {
        self.machine_config.vcpu_count.min(u64::from(MAX_VCPUS)) as u8
    }

    pub fn mem_bytes(&self) -> u64 {
        self.machine_config.mem_size_mib << 20
    }

    /// This machine with `layers` (read-only drives, bottom to top) added as the guest's root: the
    /// agent mounts the drives that `ember_layers=ID,...` on the command line names and stacks
    /// them (guest/agent/src/layers.rs).
    pub fn with_layers(mut self, layers: Vec<DriveConfig>) -> Self {
        if !layers.is_empty() {
            let ids: Vec<&str> = layers.iter().map(|d| d.drive_id.as_str()).collect();
            self.boot_source.boot_args = Some(format!("{} ember_layers={}", self.cmdline(), ids.join(",")));
        }
        self.drives.extend(layers);
        self
    }

    /// The kernel command line: the configured one, or ember's default; with a root drive, the
    /// kernel mounts it as `/` (unless the command line names a root itself).
    pub fn cmdline(&self) -> String {
        let mut base = self.boot_source.boot_args.clone().unwrap_or_else(default_cmdline);
        if let Some(net) = self.network_interfaces.first().and_then(NetConfig::cmdline) {
            base = format!("{base} {net}");
        }
        match self.drives.iter().find(|d| d.is_root_device) {
            Some(d) if !base.split_whitespace().any(|w| w.starts_with("root=")) => {
                format!("{base} root=/dev/vda {}", if d.is_read_only { "ro" } else { "rw" })
            }
            _ => base,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<VmConfig, String> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vm.json");
        std::fs::write(&p, s).unwrap();
        VmConfig::from_file(&p).map_err(|e| e.to_string())
    }

    #[test]
    fn random_and_mutated_config_files_are_refused_without_a_panic() {
        let good = br#"{"boot-source": {"kernel_image_path": "/k", "initrd_path": "i", "boot_args": "console=ttyS0"},
            "machine-config": {"vcpu_count": 2, "mem_size_mib": 256}}"#;
        let mut rng = crate::sys::TestRng::new(17);
        for _ in 0..20_000 {
            if let Ok(c) = serde_json::from_slice::<VmConfig>(&rng.mutate(good)) {
                if c.validate().is_ok() {
                    assert!((1..=MAX_VCPUS).contains(&c.vcpus()) && c.mem_bytes() >= MIN_MEM_MIB << 20);
                }
            }
        }
    }

    #[test]
    fn firecracker_shaped_file() {
        let c = parse(
            r#"{"boot-source": {"kernel_image_path": "/k", "initrd_path": "i.cpio", "boot_args": "console=ttyS0"},
                "machine-config": {"vcpu_count": 2, "mem_size_mib": 256}}"#,
        )
        .unwrap();
        assert_eq!(c.vcpus(), 2);
        assert_eq!(c.mem_bytes(), 256 << 20);
        assert_eq!(c.boot_source.kernel_image_path, PathBuf::from("/k"));
        assert!(c.boot_source.initrd_path.as_ref().unwrap().ends_with("i.cpio"));
        assert_eq!(c.cmdline(), "console=ttyS0");
    }

    #[test]
    fn defaults() {
        let c = parse(r#"{"boot-source": {"kernel_image_path": "/k"}}"#).unwrap();
        assert_eq!((c.vcpus(), c.mem_bytes()), (1, 128 << 20));
        assert!(c.cmdline().contains("console=ttyS0"));
    }

    #[test]
    fn bad_files() {
        let e = parse(r#"{"boot-source": {"kernel_image_path": "/k", "kernel": 1}}"#).unwrap_err();
        assert!(e.contains("unknown field `kernel`"), "{e}");
        let e = parse(r#"{"boot-source": {"kernel_image_path": "/k"}, "logger": {}}"#).unwrap_err();
        assert!(e.contains("unknown field `logger`"), "{e}");
        let e = parse(r#"{"machine-config": {}}"#).unwrap_err();
        assert!(e.contains("missing field `boot-source`"), "{e}");
        let e = parse("{not json").unwrap_err();
        assert!(e.starts_with("invalid config file"), "{e}");
        let e =
            parse(r#"{"boot-source": {"kernel_image_path": "/k"}, "machine-config": {"vcpu_count": 0}}"#).unwrap_err();
        assert!(e.contains("must be between 1 and 32, got 0"), "{e}");
        let e = parse(r#"{"boot-source": {"kernel_image_path": "/k"}, "machine-config": {"mem_size_mib": 4}}"#)
            .unwrap_err();
        assert!(e.contains("mem_size_mib"), "{e}");
        let e = VmConfig::from_file(Path::new("/nonexistent/vm.json")).unwrap_err().to_string();
        assert!(e.starts_with("cannot read config file /nonexistent/vm.json"), "{e}");
    }

    #[test]
    fn drives_in_firecrackers_shape_and_from_the_command_line() {
        let c = parse(
            r#"{"boot-source": {"kernel_image_path": "/k"},
                "drives": [{"drive_id": "data", "path_on_host": "d.img", "is_root_device": false, "is_read_only": true},
                           {"drive_id": "rootfs", "path_on_host": "/r.img", "is_root_device": true, "is_read_only": false}]}"#,
        )
        .unwrap();
        assert!(c.drives[0].path_on_host.ends_with("d.img") && c.drives[0].path_on_host.is_absolute());
        assert!(c.cmdline().ends_with(" root=/dev/vda rw"), "{}", c.cmdline());
        assert_eq!(ordered_drives(&c.drives)[0].drive_id, "rootfs");

        let d = DriveConfig::parse("/x.img,ro,id=layer-1", 3).unwrap();
        assert_eq!((d.drive_id.as_str(), d.is_read_only, d.is_root_device), ("layer-1", true, false));
        assert_eq!(DriveConfig::parse("/x.img", 3).unwrap().drive_id, "drive3");
        assert!(DriveConfig::parse("/x.img,rx", 0).is_err());
        assert!(DriveConfig::parse(",ro", 0).is_err());

        for bad in [
            r#"[{"drive_id": "a", "path_on_host": "/x"}, {"drive_id": "a", "path_on_host": "/y"}]"#,
            r#"[{"drive_id": "a b", "path_on_host": "/x"}]"#,
            r#"[{"drive_id": "abcdefghijklmnopqrstu", "path_on_host": "/x"}]"#,
            r#"[{"drive_id": "a", "path_on_host": "/x", "is_root_device": true},
                {"drive_id": "b", "path_on_host": "/y", "is_root_device": true}]"#,
            r#"[{"drive_id": "a", "path_on_host": "/x", "cache_type": "Unsafe"}]"#,
        ] {
            let e = parse(&format!(r#"{{"boot-source": {{"kernel_image_path": "/k"}}, "drives": {bad}}}"#));
            assert!(e.is_err(), "{bad}");
        }
    }

    #[test]
    fn cmdline_limits() {
        let long = "a".repeat(CMDLINE_MAX_SIZE);
        let c = VmConfig {
            boot_source: BootSource { kernel_image_path: "/k".into(), initrd_path: None, boot_args: Some(long) },
            machine_config: MachineConfig::default(),
            drives: Vec::new(),
            network_interfaces: Vec::new(),
        };
        assert!(matches!(c.validate(), Err(ConfigError::CmdlineTooLong(2048))));
    }

    #[test]
    fn default_cmdline_has_the_console_and_the_workarounds() {
        let c = default_cmdline();
        assert!(c.starts_with("console=ttyS0 "), "{c}");
        assert!(c.contains(" noxsave "), "{c}");
        assert!(c.contains("io_delay=none"), "{c}");
        assert!(!c.contains('#'), "{c}");
        assert!(!c.contains("  "), "{c}");
    }
}
