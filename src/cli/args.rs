//! Arguments several subcommands share: the machine to boot and the channels to the guest agent.

use std::path::PathBuf;

use clap::Args;
use ember::config::{BootSource, DriveConfig, MachineConfig, NetConfig, VmConfig, DEFAULT_MEM_MIB, DEFAULT_VCPUS};

/// How the host reaches the guest agent.
#[derive(Args, Clone)]
pub(crate) struct ChannelArgs {
    /// Create the VM's mailbox at PATH (a new file, removed when the VM ends), so that `ember
    /// invoke --mailbox PATH` can reach it; implies --serve. With several clones PATH must
    /// contain `{id}`, replaced by each clone's id.
    #[arg(long, value_name = "PATH")]
    mailbox: Option<String>,
    /// The vsock device's host socket (Firecracker's hybrid vsock: connect and send `CONNECT
    /// <port>\n`; guest connections to host port P go to `PATH_P`); implies --serve. With several
    /// clones PATH must contain `{id}`.
    #[arg(long, value_name = "PATH")]
    vsock: Option<String>,
    /// Have the guest agent serve invocations after "ready" instead of powering the VM off.
    #[arg(long)]
    serve: bool,
}

impl ChannelArgs {
    /// The channels of one VM (`id`: a clone's id, for `{id}` in paths); `no_seccomp` also leaves
    /// device threads unconfined.
    pub(crate) fn for_vm(&self, id: Option<u64>, no_seccomp: bool) -> Result<ember::vmm::Channels, String> {
        let path = |p: &Option<String>| match (p, id) {
            (None, _) => None,
            (Some(p), None) => Some(PathBuf::from(p)),
            (Some(p), Some(id)) => Some(PathBuf::from(p.replace("{id}", &id.to_string()))),
        };
        let (mailbox, vsock) = (path(&self.mailbox), path(&self.vsock));
        let serve = self.serve || mailbox.is_some() || vsock.is_some();
        Ok(ember::vmm::Channels { serve, mailbox, vsock, quiet: false, device_seccomp: !no_seccomp, taps: Vec::new() })
    }

    /// Checks that per-clone paths differ.
    pub(crate) fn check_clones(&self, clones: u32) -> Result<(), String> {
        for (flag, p) in [("--mailbox", &self.mailbox), ("--vsock", &self.vsock)] {
            match p {
                Some(p) if clones > 1 && !p.contains("{id}") => {
                    return Err(format!("{flag} {p}: with --clones {clones} the path must contain {{id}}"))
                }
                _ => {}
            }
        }
        Ok(())
    }
}

#[derive(Args, Clone)]
pub(crate) struct MachineArgs {
    /// Kernel to boot: an ELF vmlinux (entered through PVH when it has the note) or a bzImage.
    #[arg(long, value_name = "PATH", required_unless_present = "config", conflicts_with = "config")]
    kernel: Option<PathBuf>,
    /// Initramfs to load (an uncompressed cpio boots fastest).
    #[arg(long, value_name = "PATH", conflicts_with = "config")]
    initrd: Option<PathBuf>,
    /// Kernel command line, replacing ember's default (see guest/kernel/cmdline).
    #[arg(long, value_name = "STR", conflicts_with = "config")]
    cmdline: Option<String>,
    /// Number of vCPUs (1-32).
    #[arg(long, value_name = "N", default_value_t = u64::from(DEFAULT_VCPUS), conflicts_with = "config")]
    vcpus: u64,
    /// Guest memory in MiB.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MEM_MIB, conflicts_with = "config")]
    mem_mib: u64,
    /// A block device: `PATH[,ro][,id=ID][,root]` (repeatable; the guest sees /dev/vda, vdb, ...
    /// with the root device first, each id as /sys/block/vdX/serial). Added to a --config file's.
    #[arg(long = "drive", value_name = "PATH[,ro][,id=ID][,root]")]
    drives: Vec<String>,
    /// A network interface on an existing TAP device: `TAP[,mac=MAC][,ip=ADDR/PREFIX][,gw=ADDR]`
    /// (the agent gives the guest's eth0 the address and default route). Added to a --config
    /// file's `network-interfaces`.
    #[arg(long = "net", value_name = "TAP[,mac=MAC][,ip=ADDR/PREFIX][,gw=ADDR]")]
    nets: Vec<String>,
    /// The whole machine as a Firecracker-style JSON file ("boot-source", "machine-config")
    /// instead of the flags above.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

impl MachineArgs {
    pub(crate) fn to_config(&self) -> Result<VmConfig, String> {
        let mut cfg = match (&self.config, &self.kernel) {
            (Some(path), _) => VmConfig::from_file(path).map_err(|e| e.to_string())?,
            (None, Some(kernel)) => VmConfig {
                boot_source: BootSource {
                    kernel_image_path: kernel.clone(),
                    initrd_path: self.initrd.clone(),
                    boot_args: self.cmdline.clone(),
                },
                machine_config: MachineConfig { vcpu_count: self.vcpus, mem_size_mib: self.mem_mib },
                drives: Vec::new(),
                network_interfaces: Vec::new(),
            },
            (None, None) => return Err("either --kernel or --config is required".into()),
        };
        let first = cfg.drives.len();
        for (i, d) in self.drives.iter().enumerate() {
            cfg.drives.push(DriveConfig::parse(d, first + i).map_err(|e| e.to_string())?);
        }
        for n in &self.nets {
            cfg.network_interfaces.push(NetConfig::parse(n).map_err(|e| e.to_string())?);
        }
        cfg.validate().map_err(|e| e.to_string())?;
        Ok(cfg)
    }
}
