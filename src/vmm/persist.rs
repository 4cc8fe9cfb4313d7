//! A VM's snapshot state, beside the VM (as Firecracker keeps `persist.rs` beside each component):
//! the machine's shape, the VM-wide and per-vCPU KVM state and every device's state, checked for
//! consistency when read. The bytes on disk are `snapshot`'s business.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::vcpu_state::VcpuState;
use super::vm_state::VmState;
use crate::devices::DevicesState;
use crate::memory::{self, GuestMemory, PAGE_SIZE};
use crate::snapshot::{self, format, io_err, memory_file, SnapshotError, SnapshotPaths, MAX_STATE_LEN};

/// The shape of the machine a snapshot was taken of.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MachineInfo {
    pub vcpus: u8,
    pub mem_bytes: u64,
}

/// Everything but guest memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotState {
    pub machine: MachineInfo,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DevicesState,
}

impl SnapshotState {
    /// Checks what decoding cannot: the parts agree with each other.
    fn check(&self) -> Result<(), SnapshotError> {
        let m = &self.machine;
        if m.vcpus == 0 || usize::from(m.vcpus) != self.vcpus.len() {
            return Err(SnapshotError::Inconsistent(format!(
                "{} vCPUs with {} vCPU states",
                m.vcpus,
                self.vcpus.len()
            )));
        }
        if m.mem_bytes < memory::MIN_MEM_MIB << 20 || m.mem_bytes % PAGE_SIZE != 0 {
            return Err(SnapshotError::Inconsistent(format!("guest memory of {} bytes", m.mem_bytes)));
        }
        Ok(())
    }

    /// The state file's bytes.
    pub fn encode(&self) -> Result<Vec<u8>, SnapshotError> {
        format::encode(self)
    }

    /// Decodes and checks a state file's bytes; `path` names the file in errors.
    pub fn decode(bytes: &[u8], path: &Path) -> Result<Self, SnapshotError> {
        let state: Self = format::decode(bytes, path)?;
        state.check()?;
        Ok(state)
    }

    /// Reads and checks a snapshot's state file, and checks that its memory file has the right size.
    pub fn read(paths: &SnapshotPaths) -> Result<Self, SnapshotError> {
        let path = paths.state();
        let state = Self::decode(&snapshot::read_limited(&path, MAX_STATE_LEN + 4096)?, &path)?;
        let mem_path = paths.memory();
        let actual = std::fs::metadata(&mem_path).map_err(io_err(&mem_path))?.len();
        if actual != state.machine.mem_bytes {
            return Err(SnapshotError::MemorySize { path: mem_path, expected: state.machine.mem_bytes, actual });
        }
        Ok(state)
    }

    /// Writes a snapshot of this state and `mem` into `dir` (created if needed). Each file is
    /// written under a temporary name, synced and renamed into place, so a failed snapshot never
    /// leaves a half-written file under the real name. Renaming (rather than rewriting) also leaves
    /// running clones' mappings of an earlier memory file intact.
    pub fn write(&self, dir: &Path, mem: &GuestMemory) -> Result<(), SnapshotError> {
        crate::sys::private_dir(dir).map_err(io_err(dir))?;
        let paths = SnapshotPaths::new(dir);
        // A working set recorded for an earlier snapshot in this directory no longer applies.
        let _ = std::fs::remove_file(paths.working_set());
        self.write_files(&paths.state(), &paths.memory(), mem)
    }

    /// Writes this state to `state` and `mem` to `memory` (files anywhere, as Firecracker's API
    /// names them), each under a temporary name beside it first and renamed into place.
    pub fn write_files(&self, state: &Path, memory: &Path, mem: &GuestMemory) -> Result<(), SnapshotError> {
        let bytes = self.encode()?;
        let mut tmp_name = memory.file_name().unwrap_or_default().to_os_string();
        tmp_name.push(".tmp");
        let tmp_mem = memory.with_file_name(tmp_name);
        if let Err(e) = memory_file::write_memory(&tmp_mem, mem) {
            let _ = std::fs::remove_file(&tmp_mem);
            return Err(e);
        }
        std::fs::rename(&tmp_mem, memory).map_err(io_err(memory))?;
        snapshot::write_atomic(state, &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SnapshotState {
        SnapshotState {
            machine: MachineInfo { vcpus: 1, mem_bytes: 16 << 20 },
            vm: VmState {
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
                pit: Default::default(),
                clock: Default::default(),
            },
            vcpus: vec![VcpuState {
                msrs: vec![Default::default(); 3],
                regs: kvm_bindings::kvm_regs { rip: 0x1234, ..Default::default() },
                tsc_khz: 2_000_000,
                ..Default::default()
            }],
            devices: DevicesState::default(),
        }
    }

    #[test]
    fn round_trip() {
        let bytes = sample().encode().unwrap();
        let back = SnapshotState::decode(&bytes, Path::new("s")).unwrap();
        assert_eq!(back.vcpus[0].regs.rip, 0x1234);
        assert_eq!(back.vcpus[0].tsc_khz, 2_000_000);
        assert_eq!(back.machine.mem_bytes, 16 << 20);
    }

    #[test]
    fn typed_device_states_round_trip() {
        use crate::devices::virtio::mmio::MmioState;
        use crate::devices::virtio::{block, vsock, QueueSnapshot, VirtioState};
        let transport = |device_type, device| MmioState {
            device_type,
            status: 15,
            driver_features: 1 << 32,
            device_features_sel: 1,
            driver_features_sel: 1,
            queue_sel: 0,
            interrupt_status: 1,
            queues: vec![QueueSnapshot { max_size: 256, size: 128, ready: true, ..Default::default() }],
            device,
        };
        let mut s = sample();
        s.devices.virtio = vec![
            transport(
                block::BLOCK_DEVICE_ID,
                VirtioState::Block(block::BlockState {
                    drive_id: "rootfs".into(),
                    read_only: true,
                    identity: block::DriveIdentity {
                        dev: 8,
                        ino: 12,
                        size: 1 << 20,
                        mtime_ns: 1_700_000_000_000_000_000,
                    },
                }),
            ),
            transport(vsock::VSOCK_DEVICE_ID, VirtioState::Vsock(vsock::VsockState { connections: false })),
        ];
        let back = SnapshotState::decode(&s.encode().unwrap(), Path::new("s")).unwrap();
        assert_eq!(back.devices, s.devices);
    }

    #[test]
    fn a_snapshot_of_the_previous_format_is_refused() {
        let (old, now) = (format::FORMAT_VERSION - 1, format::FORMAT_VERSION);
        let mut bytes = sample().encode().unwrap();
        bytes[8..12].copy_from_slice(&old.to_le_bytes());
        let e = SnapshotState::decode(&bytes, Path::new("s")).unwrap_err().to_string();
        assert!(e.contains(&format!("format version {old} is not supported (this ember reads version {now})")), "{e}");
    }

    #[test]
    fn inconsistent_state_is_refused() {
        let mut s = sample();
        s.machine.vcpus = 2;
        let bytes = s.encode().unwrap();
        assert!(SnapshotState::decode(&bytes, Path::new("s")).unwrap_err().to_string().contains("inconsistent"));
    }

    #[test]
    fn written_and_read_back_from_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let mem = memory::create_guest_memory(16 << 20).unwrap();
        sample().write(dir.path(), &mem).unwrap();
        let paths = SnapshotPaths::new(dir.path());
        assert_eq!(SnapshotState::read(&paths).unwrap().vcpus[0].regs.rip, 0x1234);
        // A memory file of the wrong size is refused before anything maps it.
        std::fs::OpenOptions::new().write(true).open(paths.memory()).unwrap().set_len(8 << 20).unwrap();
        let e = SnapshotState::read(&paths).unwrap_err().to_string();
        assert!(e.contains("bytes of RAM"), "{e}");
        // A state file that is not a regular file is refused without reading it.
        std::fs::remove_file(paths.state()).unwrap();
        std::os::unix::fs::symlink("/dev/zero", paths.state()).unwrap();
        let e = SnapshotState::read(&paths).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }
}
