//! The VM-wide KVM state: the in-kernel interrupt controllers, the PIT and the kvmclock.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use super::{kvm_err, VmError};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    /// The kvmclock at the moment of the snapshot. A clone starts from this very value, so the guest
    /// sees no time pass while it was a snapshot, and has no gap to catch up on.
    pub clock: kvm_clock_data,
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, VmError> {
    let mut c = kvm_irqchip { chip_id, ..Default::default() };
    vm.get_irqchip(&mut c).map_err(kvm_err("KVM_GET_IRQCHIP"))?;
    Ok(c)
}

impl VmState {
    /// Reads the state of a VM whose vCPUs are all paused.
    pub fn save(vm: &VmFd) -> Result<Self, VmError> {
        Ok(Self {
            pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
            pit: vm.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?,
            clock: vm.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?,
        })
    }

    /// Loads the state into a VM that has its irqchip and PIT created and no vCPU running yet.
    pub fn restore(&self, vm: &VmFd) -> Result<(), VmError> {
        vm.set_pit2(&self.pit).map_err(kvm_err("KVM_SET_PIT2"))?;
        // Only the clock value: flags such as KVM_CLOCK_TSC_STABLE describe the old host and are
        // rejected or recomputed by KVM.
        let clock = kvm_clock_data { clock: self.clock.clock, ..Default::default() };
        vm.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))?;
        vm.set_irqchip(&self.pic_master).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        vm.set_irqchip(&self.pic_slave).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        vm.set_irqchip(&self.ioapic).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        Ok(())
    }
}
