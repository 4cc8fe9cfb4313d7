//! The machine description: a Firecracker-shaped JSON config file (`boot-source`, `machine-config`)
//! or the same fields from the command line, and its validation.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use crate::memory::{CMDLINE_MAX_SIZE, MAX_VCPUS, MIN_MEM_MIB};

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
}

/// What to boot.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
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
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
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
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    #[serde(rename = "boot-source")]
    pub boot_source: BootSource,
    #[serde(rename = "machine-config", default)]
    pub machine_config: MachineConfig,
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
        Ok(())
    }

    pub fn vcpus(&self) -> u8 {
        self.machine_config.vcpu_count.min(u64::from(MAX_VCPUS)) as u8
    }

    pub fn mem_bytes(&self) -> u64 {
        self.machine_config.mem_size_mib << 20
    }

    /// The kernel command line: the configured one, or ember's default.
    pub fn cmdline(&self) -> String {
        self.boot_source.boot_args.clone().unwrap_or_else(default_cmdline)
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
    fn cmdline_limits() {
        let long = "a".repeat(CMDLINE_MAX_SIZE);
        let c = VmConfig {
            boot_source: BootSource { kernel_image_path: "/k".into(), initrd_path: None, boot_args: Some(long) },
            machine_config: MachineConfig::default(),
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
