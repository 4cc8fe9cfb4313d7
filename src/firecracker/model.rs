//! The bodies of Firecracker's API, as its OpenAPI document (`firecracker.yaml`) describes them:
//! field names, types and which are required. What ember cannot honour yet is refused by name
//! ([`unsupported`]), never accepted and ignored.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The Firecracker API version whose paths and bodies this door follows.
pub const FIRECRACKER_API_VERSION: &str = "1.17.0";

/// A request refused with Firecracker's `400 {"fault_message": ...}`.
#[derive(Debug, PartialEq, Eq)]
pub struct Fault(pub String);

impl Fault {
    pub fn new(msg: impl Into<String>) -> Self {
        Self(msg.into())
    }
}

impl From<serde_json::Error> for Fault {
    fn from(e: serde_json::Error) -> Self {
        Self(format!("An error occurred when deserializing the json body of a request: {e}."))
    }
}

/// A Firecracker feature ember does not have (yet): named, with what to do instead.
pub fn unsupported(what: &str) -> Fault {
    Fault(format!("{what} is not supported by ember (see docs/firecracker.md)"))
}

/// Firecracker's rule for the ids in paths (drives, network interfaces).
pub fn checked_id(id: &str) -> Result<(), Fault> {
    if id.len() > 64 {
        return Err(Fault::new("API Resource IDs can only be up to 64 characters."));
    }
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(Fault::new("API Resource IDs can only contain alphanumeric characters and underscores."));
    }
    Ok(())
}

/// `PUT /boot-source`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    pub kernel_image_path: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

impl BootSource {
    /// The kernel (and initrd) must be readable now, as Firecracker opens them here.
    pub fn check(&self) -> Result<(), Fault> {
        std::fs::File::open(&self.kernel_image_path)
            .map_err(|e| Fault::new(format!("The kernel file cannot be opened: {e}")))?;
        if let Some(initrd) = &self.initrd_path {
            std::fs::File::open(initrd).map_err(|e| {
                Fault::new(format!("The initrd file cannot be opened due to invalid path or invalid permissions. {e}"))
            })?;
        }
        Ok(())
    }
}

/// `PUT /machine-config` (every field given) and `PATCH /machine-config` (any of them).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_count: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_size_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<String>,
}

impl MachineConfigBody {
    /// Refuses what ember's VMs cannot be: SMT, dirty-page tracking (Diff snapshots), CPU
    /// templates, huge pages.
    pub fn check(&self) -> Result<(), Fault> {
        if self.smt == Some(true) {
            return Err(unsupported("smt"));
        }
        if self.track_dirty_pages == Some(true) {
            return Err(unsupported("track_dirty_pages (Diff snapshots)"));
        }
        if self.cpu_template.as_deref().is_some_and(|t| t != "None") {
            return Err(unsupported("cpu_template"));
        }
        if self.huge_pages.as_deref().is_some_and(|h| h != "None") {
            return Err(unsupported("huge_pages"));
        }
        Ok(())
    }
}

/// What `GET /machine-config` answers.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MachineConfig {
    pub vcpu_count: u64,
    pub mem_size_mib: u64,
    pub smt: bool,
    pub track_dirty_pages: bool,
    pub huge_pages: &'static str,
}

/// `PUT /drives/{drive_id}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    pub drive_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<PathBuf>,
    pub is_root_device: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_read_only: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
}

impl Drive {
    pub fn check(&self) -> Result<PathBuf, Fault> {
        if self.socket.is_some() {
            return Err(unsupported("a vhost-user drive (socket)"));
        }
        if self.rate_limiter.is_some() {
            return Err(unsupported("a drive's rate_limiter"));
        }
        if self.partuuid.is_some() {
            return Err(unsupported("a root drive by partuuid"));
        }
        if self.io_engine.as_deref().is_some_and(|e| e != "Sync") {
            return Err(unsupported("io_engine Async"));
        }
        if let Some(c) = self.cache_type.as_deref().filter(|c| !matches!(*c, "Unsafe" | "Writeback")) {
            return Err(Fault(format!("cache_type {c:?}: expected Unsafe or Writeback")));
        }
        self.path_on_host.clone().ok_or_else(|| Fault::new("path_on_host is required for a block device"))
    }
}

/// `PUT /network-interfaces/{iface_id}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    pub iface_id: String,
    pub host_dev_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
}

/// `PATCH /drives/{drive_id}` (after InstanceStart): a new backing file, or rate limiter.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    pub drive_id: String,
    #[serde(default)]
    pub path_on_host: Option<PathBuf>,
    #[serde(default)]
    pub rate_limiter: Option<serde_json::Value>,
}

/// `PATCH /network-interfaces/{iface_id}` (after InstanceStart): its rate limiters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialNetworkInterface {
    pub iface_id: String,
    #[serde(default)]
    pub rx_rate_limiter: Option<serde_json::Value>,
    #[serde(default)]
    pub tx_rate_limiter: Option<serde_json::Value>,
}

/// `PUT /metrics` (and `--metrics-path`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    pub metrics_path: PathBuf,
    /// Whether each line carries the microVM's id as `id`.
    #[serde(default)]
    pub emit_id: bool,
    /// The operator's key-value pairs, under `properties` on each line.
    #[serde(default)]
    pub properties: Option<std::collections::BTreeMap<String, String>>,
}

/// `PUT /vsock`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    pub guest_cid: u32,
    pub uds_path: PathBuf,
    /// Deprecated in Firecracker, still accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
}

/// `PUT /actions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Action {
    pub action_type: String,
}

/// `PATCH /vm`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmState {
    pub state: String,
}

/// `PUT /snapshot/create`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    pub snapshot_path: PathBuf,
    pub mem_file_path: PathBuf,
    #[serde(default)]
    pub snapshot_type: Option<String>,
}

/// `mem_backend` of `PUT /snapshot/load`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    pub backend_type: String,
    pub backend_path: PathBuf,
}

/// One of `network_overrides`: a network interface's new TAP.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
}

/// `vsock_override`: the vsock device's new socket path.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    pub uds_path: PathBuf,
}

/// `PUT /snapshot/load`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoad {
    pub snapshot_path: PathBuf,
    #[serde(default)]
    pub mem_backend: Option<MemBackend>,
    /// Deprecated in Firecracker, still accepted.
    #[serde(default)]
    pub mem_file_path: Option<PathBuf>,
    #[serde(default)]
    pub enable_diff_snapshots: Option<bool>,
    #[serde(default)]
    pub track_dirty_pages: Option<bool>,
    #[serde(default)]
    pub resume_vm: Option<bool>,
    #[serde(default)]
    pub network_overrides: Vec<NetworkOverride>,
    #[serde(default)]
    pub vsock_override: Option<VsockOverride>,
    #[serde(default)]
    pub clock_realtime: Option<bool>,
    #[serde(default)]
    pub huge_pages: Option<String>,
}

impl SnapshotLoad {
    /// The memory file, from exactly one of `mem_backend` (a File backend) and `mem_file_path`;
    /// what ember cannot do is refused by name.
    pub fn memory(&self) -> Result<&Path, Fault> {
        if self.enable_diff_snapshots == Some(true) || self.track_dirty_pages == Some(true) {
            return Err(unsupported("dirty page tracking (Diff snapshots)"));
        }
        if self.clock_realtime == Some(true) {
            return Err(unsupported("clock_realtime"));
        }
        if self.huge_pages.as_deref().is_some_and(|h| !matches!(h, "None" | "Snapshot")) {
            return Err(unsupported("huge_pages on restore"));
        }
        match (&self.mem_backend, &self.mem_file_path) {
            (Some(b), None) if b.backend_type == "File" => Ok(&b.backend_path),
            (Some(b), None) if b.backend_type == "Uffd" => Err(unsupported("the Uffd memory backend")),
            (Some(b), None) => Err(Fault(format!("unknown variant `{}`, expected `File` or `Uffd`", b.backend_type))),
            (None, Some(p)) => Ok(p),
            _ => Err(Fault::new("Exactly one of mem_backend and mem_file_path must be given")),
        }
    }
}

/// What `GET /` answers.
#[derive(Debug, Serialize)]
pub struct InstanceInfo {
    pub app_name: &'static str,
    pub id: String,
    pub state: &'static str,
    pub vmm_version: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_read_as_firecracker_writes_them_and_what_ember_lacks_is_named() {
        let d: Drive = serde_json::from_str(
            r#"{"drive_id": "rootfs", "path_on_host": "/r.ext4", "is_root_device": true, "is_read_only": false}"#,
        )
        .unwrap();
        assert_eq!(d.check(), Ok(PathBuf::from("/r.ext4")));
        let limited = Drive { rate_limiter: Some(serde_json::json!({})), ..d.clone() };
        assert!(limited.check().unwrap_err().0.contains("rate_limiter"));
        assert!(serde_json::from_str::<Drive>(r#"{"drive_id": "x", "is_root_device": false, "colour": 1}"#).is_err());
        let m: MachineConfigBody =
            serde_json::from_str(r#"{"vcpu_count": 2, "mem_size_mib": 256, "smt": false}"#).unwrap();
        assert_eq!(m.check(), Ok(()));
        let smt = MachineConfigBody { smt: Some(true), ..m };
        assert!(smt.check().unwrap_err().0.contains("smt"));
        let f = Fault::from(serde_json::from_str::<Action>("{").unwrap_err());
        assert!(f.0.starts_with("An error occurred when deserializing the json body"), "{}", f.0);
    }
}
