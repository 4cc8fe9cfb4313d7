//! A template a worker made, handed back over its socket and checked as untrusted input before the
//! daemon writes or uses any of it.

use std::path::Path;

/// A template a worker made, as it came back over the socket (the state file's bytes, the memory
/// as a sealed memfd, the working set's bytes), checked: the state decodes and describes the
/// registration's guest (its RAM, vCPUs and exactly the daemon's own drive list), the memory is
/// sealed and of that size, the working set lies within it.
pub struct MadeInWorker {
    pub state: crate::vmm::persist::SnapshotState,
    pub state_bytes: Vec<u8>,
    pub memory: crate::snapshot::MemoryFile,
    pub working_set: Option<Vec<u8>>,
}

impl MadeInWorker {
    pub(super) fn check(
        files: Vec<std::os::fd::OwnedFd>,
        working_set: bool,
        vm: &crate::config::VmConfig,
    ) -> Result<Self, String> {
        use crate::snapshot::working_set::WorkingSet;
        let bad = |what: &str| format!("the worker's template is not acceptable: {what}");
        let want = if working_set { 3 } else { 2 };
        if files.len() != want {
            return Err(bad(&format!("{} descriptors where {want} were due", files.len())));
        }
        let mut files = files.into_iter().map(std::fs::File::from);
        let (Some(state_file), Some(memory)) = (files.next(), files.next()) else {
            return Err(bad("descriptors missing"));
        };
        let origin = Path::new("(the worker's template state)");
        let limit = crate::snapshot::MAX_STATE_LEN + 4096;
        let state_bytes = crate::sys::read_file_limited(&state_file, limit).map_err(|e| bad(&format!("state: {e}")))?;
        let state =
            crate::vmm::persist::SnapshotState::decode(&state_bytes, origin).map_err(|e| bad(&e.to_string()))?;
        let (vcpus, mem_bytes) = (vm.machine_config.vcpu_count, vm.machine_config.mem_size_mib << 20);
        if state.machine.mem_bytes != mem_bytes || state.vcpus.len() as u64 != vcpus {
            return Err(bad(&format!(
                "a guest of {} bytes and {} vCPUs, where {mem_bytes} bytes and {} were registered",
                state.machine.mem_bytes,
                state.vcpus.len(),
                vcpus
            )));
        }
        if state.devices.drives != vm.drives {
            return Err(bad("its drives are not the registration's"));
        }
        let memory = crate::snapshot::MemoryFile::from_sealed(memory, mem_bytes).map_err(|e| bad(&e.to_string()))?;
        let working_set = match files.next() {
            Some(f) => {
                let bytes = crate::sys::read_file_limited(&f, limit).map_err(|e| bad(&format!("working set: {e}")))?;
                WorkingSet::decode(&bytes, mem_bytes, Path::new("(the worker's working set)"))
                    .map_err(|e| bad(&e.to_string()))?;
                Some(bytes)
            }
            None => None,
        };
        Ok(Self { state, state_bytes, memory, working_set })
    }
}
