//! A VM's devices, assembled in one place: the legacy devices on the port-I/O bus, ember's MMIO
//! pages, and every virtio device behind its own virtio-mmio transport, each with its interrupt
//! wired to an irqfd and its queue notifications to ioeventfds. A snapshot's device state is
//! handed to each device's `restore`; saving reads each device's typed state, and a device that
//! cannot be saved fails the save, named by its slot.

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::Channels;
use crate::channel::mailbox::Mailbox;
use crate::config::{DriveConfig, NetConfig};
use crate::devices::boot_timer::{BootClock, BootTimer};
use crate::devices::bus::Bus;
use crate::devices::control::{ControlPage, FLAG_QUIET, FLAG_SERVE};
use crate::devices::debug_port::{DebugPort, ExitPort, DEBUG_PORT, EXIT_PORT};
use crate::devices::i8042::{I8042Error, I8042, I8042_DATA_PORT, I8042_PORTS, KBD_IRQ};
use crate::devices::pit::{AbsentPit, PIT_PORT, PIT_PORTS};
use crate::devices::serial::{ConsoleOut, SerialDevice, COM1_IRQ, COM1_PORT, UART_PORTS};
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::{MmioArgs, MmioTransport, REG_QUEUE_NOTIFY};
use crate::devices::virtio::net::{Net, Tap};
use crate::devices::virtio::thread::{ParkedDevice, Threads};
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::devices::{DeviceError, DevicesState, Persist};
use crate::memory::{
    virtio_slot, GuestMemory, BOOT_TIMER_ADDR, BOOT_TIMER_SIZE, CONTROL_ADDR, CONTROL_SIZE, MAX_VIRTIO_DEVICES,
    VIRTIO_MMIO_SIZE,
};
use crate::sys::Locked;

/// Every virtio device of a VM, in slot order (slot `i`: `memory::virtio_slot(i)`). A new device
/// is one line here.
fn virtio_devices(
    drives: &[DriveConfig],
    nets: &[NetConfig],
    channels: &Channels,
    threads: &Threads,
) -> Result<Vec<Box<dyn VirtioDevice>>, DeviceError> {
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::with_capacity(drives.len() + nets.len() + 1);
    for d in drives {
        devices.push(Box::new(Block::new(d, threads)?));
    }
    for (i, n) in nets.iter().enumerate() {
        let what = || format!("network interface {:?} (TAP {})", n.iface_id, n.host_dev_name);
        let tap = match channels.taps.get(i) {
            Some(fd) => fd.try_clone().and_then(Tap::from_fd),
            None => Tap::open(&n.host_dev_name),
        }
        .map_err(DeviceError::io(what()))?;
        devices.push(Box::new(Net::new(&n.iface_id, n.mac(), tap, threads)?));
    }
    devices.push(Box::new(Vsock::new(channels.vsock.as_deref(), threads)?));
    Ok(devices)
}

/// The threads of `virtio_devices`' devices (for `drives` drives and `nets` network cards), by
/// name: what a VM shell starts ahead.
pub fn device_threads(drives: usize, nets: usize) -> Vec<&'static str> {
    let mut names = vec![Block::THREAD; drives];
    names.extend(std::iter::repeat_n(Net::THREAD, nets));
    names.push(Vsock::THREAD);
    names
}

/// What the guest kernel's command line needs to find `count` virtio-mmio devices.
pub fn virtio_cmdline(count: usize) -> String {
    (0..count)
        .map(|i| {
            let (base, irq) = virtio_slot(i);
            format!("virtio_mmio.device=4K@{base:#x}:{irq}")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The VM's devices and the buses the vCPUs reach them through.
pub struct Devices {
    pub serial: Arc<Mutex<SerialDevice>>,
    i8042: Arc<Mutex<I8042>>,
    virtio: Vec<Arc<Mutex<MmioTransport>>>,
    /// The drives in slot order (slot `i` is drive `i`), as served now.
    drives: Mutex<Vec<DriveConfig>>,
    nets: Vec<NetConfig>,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
}

/// What the devices of one VM are built from.
pub struct DeviceArgs<'a> {
    pub vm: &'a VmFd,
    pub mem: &'a GuestMemory,
    pub mailbox: &'a Arc<Mailbox>,
    pub console: ConsoleOut,
    pub clock: &'a Arc<BootClock>,
    pub channels: &'a Channels,
    /// The clone's id (0 for a VM that booted): what the guest reads from its control page.
    pub clone_id: u64,
    /// The block devices' drives, in slot order (a restore: the snapshot's).
    pub drives: &'a [DriveConfig],
    /// The network interfaces, after the drives (a restore: the snapshot's).
    pub nets: &'a [NetConfig],
    /// Device threads started ahead (a VM shell's), confined with the device filter.
    pub parked: Vec<ParkedDevice>,
    /// Interrupt lines wired ahead (a VM shell's, [`irqfds_ahead`]), by GSI; the rest are wired here.
    pub irqfds: Vec<(u32, EventFd)>,
}

fn irqfd(vm: &VmFd, gsi: u32) -> Result<EventFd, DeviceError> {
    let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::io("eventfd"))?;
    vm.register_irqfd(&fd, gsi).map_err(|e| DeviceError::Kvm("KVM_IRQFD", e.errno()))?;
    Ok(fd)
}

/// The interrupt lines of a VM with `virtio` virtio devices (the serial port's, the i8042's and
/// each virtio slot's), each an eventfd wired to its GSI: what a VM shell wires ahead, so that a
/// restore does not (a KVM_IRQFD each, ~20 us on a host that emulates KVM). A line the restored
/// VM does not use is unwired when its eventfd is dropped.
pub fn irqfds_ahead(vm: &VmFd, virtio: usize) -> Result<Vec<(u32, EventFd)>, DeviceError> {
    let slots = (0..virtio.min(MAX_VIRTIO_DEVICES)).map(|i| virtio_slot(i).1);
    [COM1_IRQ, KBD_IRQ].into_iter().chain(slots).map(|gsi| Ok((gsi, irqfd(vm, gsi)?))).collect()
}

impl Devices {
    /// Creates every device and wires its interrupt; `saved` is a snapshot's device state, for a
    /// clone.
    pub fn create(args: DeviceArgs<'_>, saved: Option<&DevicesState>) -> Result<Self, DeviceError> {
        let DeviceArgs { vm, mem, mailbox, console, clock, channels, clone_id, drives, nets, parked, mut irqfds } =
            args;
        let mut irqfd = |gsi| match irqfds.iter().position(|(g, _)| *g == gsi) {
            Some(i) => Ok(irqfds.swap_remove(i).1),
            None => irqfd(vm, gsi),
        };
        let serial_irq = irqfd(COM1_IRQ)?;
        let serial = Arc::new(Mutex::new(match saved {
            Some(s) => SerialDevice::restore((serial_irq, console), &s.serial)?,
            None => SerialDevice::new(serial_irq, console),
        }));
        let mut pio = Bus::new();
        pio.insert(COM1_PORT, UART_PORTS, serial.clone())?;
        let i8042 = Arc::new(Mutex::new(I8042::new(irqfd(KBD_IRQ)?, mailbox.clone())));
        pio.insert(I8042_DATA_PORT, I8042_PORTS, i8042.clone())?;
        pio.insert(DEBUG_PORT, 1, Arc::new(Mutex::new(DebugPort::new(clock.clone()))))?;
        pio.insert(EXIT_PORT, 1, Arc::new(Mutex::new(ExitPort)))?;
        pio.insert(PIT_PORT, PIT_PORTS, Arc::new(Mutex::new(AbsentPit::default())))?;
        let mut mmio = Bus::new();
        mmio.insert(BOOT_TIMER_ADDR, BOOT_TIMER_SIZE, Arc::new(Mutex::new(BootTimer::new(clock.clone()))))?;
        let flags = if channels.serve { FLAG_SERVE } else { 0 } | if channels.quiet { FLAG_QUIET } else { 0 };
        let control = ControlPage::new(clone_id, flags).map_err(DeviceError::io("control page seed"))?;
        mmio.insert(CONTROL_ADDR, CONTROL_SIZE, Arc::new(Mutex::new(control)))?;

        // Threads made ahead are confined with the device filter: not used without it.
        let threads = match channels.device_seccomp {
            true => {
                let f = crate::seccomp::shared_device_filter().map_err(|e| DeviceError::Seccomp(e.to_string()))?;
                Threads::new(Some(f)).with_ahead(parked)
            }
            false => Threads::new(None),
        };
        let devices = virtio_devices(drives, nets, channels, &threads)?;
        if devices.len() > MAX_VIRTIO_DEVICES {
            return Err(DeviceError::BadState(format!(
                "{} virtio devices, at most {MAX_VIRTIO_DEVICES}",
                devices.len()
            )));
        }
        if let Some(s) = saved {
            if s.virtio.len() != devices.len() {
                return Err(DeviceError::BadState(format!(
                    "{} virtio devices in the snapshot, {} here",
                    s.virtio.len(),
                    devices.len()
                )));
            }
        }
        let mut virtio = Vec::with_capacity(devices.len());
        for (i, device) in devices.into_iter().enumerate() {
            let (base, gsi) = virtio_slot(i);
            for (q, evt) in device.queue_events().iter().enumerate() {
                vm.register_ioevent(evt, &IoEventAddress::Mmio(base + REG_QUEUE_NOTIFY), q as u32)
                    .map_err(|e| DeviceError::Kvm("KVM_IOEVENTFD", e.errno()))?;
            }
            let interrupt = Arc::new(Interrupt::new(irqfd(gsi)?, mailbox.clone()));
            let args = MmioArgs { device, mem: mem.clone(), interrupt };
            let transport = match saved {
                Some(s) => MmioTransport::restore(args, &s.virtio[i]),
                None => MmioTransport::new(args),
            }
            .map_err(|source| DeviceError::Virtio { slot: i, source })?;
            let transport = Arc::new(Mutex::new(transport));
            mmio.insert(base, VIRTIO_MMIO_SIZE, transport.clone())?;
            virtio.push(transport);
        }
        Ok(Self {
            serial,
            i8042,
            virtio,
            drives: Mutex::new(drives.to_vec()),
            nets: nets.to_vec(),
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
        })
    }

    /// Every device's state, for a snapshot; the first device that cannot be saved fails it.
    pub fn save(&self) -> Result<DevicesState, DeviceError> {
        let virtio = self
            .virtio
            .iter()
            .enumerate()
            .map(|(slot, t)| t.locked().save().map_err(|source| DeviceError::Virtio { slot, source }))
            .collect::<Result<_, _>>()?;
        Ok(DevicesState {
            serial: self.serial.locked().save()?,
            virtio,
            drives: self.drives.locked().clone(),
            nets: self.nets.clone(),
            vsock_path: None,
        })
    }

    /// Serves drive `drive_id` from the file at `path` from now on (its block device is told, and
    /// tells the guest); a later snapshot records the new file.
    pub fn replace_drive(&self, drive_id: &str, path: &std::path::Path) -> Result<(), DeviceError> {
        let mut drives = self.drives.locked();
        let slot = drives.iter().position(|d| d.drive_id == drive_id);
        let Some((slot, transport)) = slot.and_then(|i| Some((i, self.virtio.get(i)?))) else {
            let source = std::io::Error::new(std::io::ErrorKind::NotFound, "no such drive");
            return Err(DeviceError::Io { what: format!("drive {drive_id:?}"), source });
        };
        transport.locked().device_mut().replace_file(path)?;
        drives[slot].path_on_host = path.to_path_buf();
        Ok(())
    }

    /// Presses Ctrl+Alt+Del on the VM's keyboard.
    pub fn ctrl_alt_del(&self) -> Result<(), I8042Error> {
        self.i8042.locked().ctrl_alt_del()
    }

    /// Every device's counters since they were last taken, by group name (`block_ID`,
    /// `net_ID`), with each kind's total (`block`, `net`), as Firecracker reports them.
    pub fn take_counters(&self) -> serde_json::Map<String, serde_json::Value> {
        let groups: Vec<_> = self.virtio.iter().filter_map(|t| t.locked().device().take_counters()).collect();
        let mut out = serde_json::Map::new();
        for kind in ["block", "net"] {
            let of_kind: Vec<_> =
                groups.iter().filter(|(n, _)| n.starts_with(&format!("{kind}_"))).map(|g| &g.1).collect();
            if !of_kind.is_empty() {
                out.insert(kind.to_string(), crate::devices::metrics::sum(&of_kind).into());
            }
        }
        out.extend(groups.into_iter().map(|(n, g)| (n, g.into())));
        out
    }

    /// How many virtio devices there are (the guest's command line names each).
    pub fn virtio_count(&self) -> usize {
        self.virtio.len()
    }

    /// The VM is starting: devices restored running are activated.
    pub fn start(&self) {
        for t in &self.virtio {
            t.locked().start();
        }
    }

    /// Stops every device's own thread from touching guest memory and queues (before a snapshot).
    pub fn pause(&self) {
        for t in &self.virtio {
            t.locked().pause();
        }
    }

    /// Lets paused devices go on.
    pub fn resume(&self) {
        for t in &self.virtio {
            t.locked().resume();
        }
    }

    /// Stops the devices' own threads.
    pub fn shutdown(&self) {
        for t in &self.virtio {
            t.locked().shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_names_every_slot() {
        assert_eq!(virtio_cmdline(1), "virtio_mmio.device=4K@0xd0002000:5");
        assert_eq!(virtio_cmdline(2), "virtio_mmio.device=4K@0xd0002000:5 virtio_mmio.device=4K@0xd0003000:6");
    }
}
