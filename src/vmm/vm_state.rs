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

/// An IOAPIC redirection entry's mask bit.
const IOAPIC_MASKED: u64 = 1 << 16;

impl VmState {
    /// Reads the state of a VM whose vCPUs are all paused. `absent_pit`: the PIT state of a VM
    /// made without a PIT (see [`VmState::pit_in_use`]), saved as it was restored.
    pub fn save(vm: &VmFd, absent_pit: Option<&kvm_pit_state2>) -> Result<Self, VmError> {
        let pit = match absent_pit {
            Some(p) => *p,
            None => vm.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?,
        };
        Ok(Self {
            pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
            pit,
            clock: vm.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?,
        })
    }

    /// Whether the guest may still use its PIT (the i8254): not when its channel 0 does not run
    /// periodically, channel 2's gate is off (no calibration or speaker tone) and the timer's
    /// interrupt (IRQ 0) is masked at the PIC and at the IOAPIC pins it can reach (0, and 2 where
    /// firmware routes it). A Linux guest whose clock events come from the local APIC leaves its
    /// PIT that way after boot: it stops it and masks its interrupt. Clones of such a snapshot are
    /// made without a PIT, which KVM emulates with a kernel thread and a timer per VM, and whose
    /// teardown waits for two SRCU grace periods (milliseconds each, one VM after another, when
    /// many VMs end).
    pub fn pit_in_use(&self) -> bool {
        let channels = &self.pit.channels;
        let periodic = matches!(channels[0].mode, 2 | 3);
        let speaker = channels[2].gate != 0;
        // SAFETY: the chip unions hold plain integers (any bit pattern is a value); each is
        // read as the variant its chip_id says KVM filled in (or as zeros).
        let (pic_imr, pins) = unsafe { (self.pic_master.chip.pic.imr, self.ioapic.chip.ioapic.redirtbl) };
        // SAFETY: as above, a redirection entry is a u64 either way.
        let masked = |pin: usize| unsafe { pins[pin].bits } & IOAPIC_MASKED != 0;
        let irq0_masked = pic_imr & 1 != 0 && masked(0) && masked(2);
        periodic || speaker || !irq0_masked
    }

    /// Loads the state into a VM that has its irqchip (and its PIT, when `pit`) created and no
    /// vCPU running yet.
    pub fn restore(&self, vm: &VmFd, pit: bool) -> Result<(), VmError> {
        if pit {
            vm.set_pit2(&self.pit).map_err(kvm_err("KVM_SET_PIT2"))?;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest's state after boot as ember's guest leaves it: PIT channel 0 stopped (one-shot),
    /// channel 2's gate off, IRQ 0 masked at the PIC and the IOAPIC.
    fn idle() -> VmState {
        let mut s = VmState {
            pic_master: kvm_irqchip { chip_id: KVM_IRQCHIP_PIC_MASTER, ..Default::default() },
            pic_slave: kvm_irqchip { chip_id: KVM_IRQCHIP_PIC_SLAVE, ..Default::default() },
            ioapic: kvm_irqchip { chip_id: KVM_IRQCHIP_IOAPIC, ..Default::default() },
            pit: kvm_pit_state2::default(),
            clock: kvm_clock_data::default(),
        };
        s.pit.channels[0].mode = 0;
        s.pit.channels[0].gate = 1;
        s.pit.channels[2].mode = 0xff;
        // SAFETY: writing plain integers into the variants the chip ids name.
        unsafe {
            s.pic_master.chip.pic.imr = 0xfb;
            for pin in s.ioapic.chip.ioapic.redirtbl.iter_mut() {
                pin.bits = IOAPIC_MASKED;
            }
        }
        s
    }

    #[test]
    fn a_stopped_pit_with_its_interrupt_masked_is_not_in_use() {
        assert!(!idle().pit_in_use());
        // Modes that do not repeat: still idle.
        for mode in [0, 1, 4, 5, 0xff] {
            let mut s = idle();
            s.pit.channels[0].mode = mode;
            assert!(!s.pit_in_use(), "mode {mode}");
        }
    }

    #[test]
    fn a_pit_the_guest_may_use_is_kept() {
        for mode in [2, 3] {
            let mut s = idle();
            s.pit.channels[0].mode = mode;
            assert!(s.pit_in_use(), "periodic mode {mode}");
        }
        let mut s = idle();
        s.pit.channels[2].gate = 1;
        assert!(s.pit_in_use(), "channel 2 gated on");
        let mut s = idle();
        s.pic_master.chip.pic.imr = 0xfa;
        assert!(s.pit_in_use(), "IRQ 0 open at the PIC");
        for pin in [0, 2] {
            let mut s = idle();
            // SAFETY: as in idle().
            unsafe { s.ioapic.chip.ioapic.redirtbl[pin].bits = 0x30 };
            assert!(s.pit_in_use(), "IOAPIC pin {pin} open");
        }
        // Another pin open does not matter.
        let mut s = idle();
        // SAFETY: as in idle().
        unsafe { s.ioapic.chip.ioapic.redirtbl[5].bits = 0x35 };
        assert!(!s.pit_in_use());
    }
}
