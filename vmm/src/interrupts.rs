//! What a device transport asks of the VM: MSI routes with an irqfd per vector, and
//! ioeventfds for queue notifications. [`KvmResources`] does it with KVM; tests use a fake.
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole routing table, so the table is kept here: the
//! default routes of the 24 legacy GSIs (PIC + IOAPIC, as KVM sets them up with the in-kernel
//! irqchip) plus one MSI route per allocated vector of every device.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KvmIrqRouting, kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1,
    kvm_irq_routing_irqchip, kvm_irq_routing_msi,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::pci::msix::MsiMessage;

/// GSIs 0..24 are the IOAPIC pins (0..16 also the PICs'); MSI routes start above.
pub const IOAPIC_PINS: u32 = 24;
const PIC_PINS: u32 = 16;

/// One MSI vector: its GSI and the irqfd that raises it.
#[derive(Debug)]
pub struct MsiVector {
    pub gsi: u32,
    pub irqfd: EventFd,
}

/// VM services for device transports.
pub trait VmResources: Send + Sync {
    /// Allocates a GSI and an irqfd for an MSI vector (not routed until [`Self::route_msi`]).
    fn allocate_msi(&self) -> io::Result<MsiVector>;
    /// Routes `gsi` to `message`, or removes its route (`None`: the vector is not set up).
    fn route_msi(&self, gsi: u32, message: Option<MsiMessage>) -> io::Result<()>;
    /// Makes a guest write to MMIO address `addr` signal `event` without a VM exit.
    fn register_ioevent(&self, event: &EventFd, addr: u64) -> io::Result<()>;
    /// Undoes [`Self::register_ioevent`].
    fn unregister_ioevent(&self, event: &EventFd, addr: u64) -> io::Result<()>;
}

/// [`VmResources`] on a KVM VM.
#[derive(Debug)]
pub struct KvmResources {
    vm: Arc<VmFd>,
    routes: Mutex<Routes>,
}

#[derive(Debug)]
struct Routes {
    next_gsi: u32,
    msi: BTreeMap<u32, MsiMessage>,
}

fn irqchip_route(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        u: kvm_irq_routing_entry__bindgen_ty_1 { irqchip: kvm_irq_routing_irqchip { irqchip, pin } },
        ..Default::default()
    }
}

fn msi_route(gsi: u32, message: MsiMessage) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            msi: kvm_irq_routing_msi {
                address_lo: message.address as u32,
                address_hi: (message.address >> 32) as u32,
                data: message.data,
                ..Default::default()
            },
        },
        ..Default::default()
    }
}

/// The legacy routes KVM installs with `KVM_CREATE_IRQCHIP`.
pub fn legacy_routes() -> Vec<kvm_irq_routing_entry> {
    let mut routes = Vec::new();
    for gsi in 0..IOAPIC_PINS {
        if gsi < PIC_PINS {
            let chip = if gsi < 8 { KVM_IRQCHIP_PIC_MASTER } else { KVM_IRQCHIP_PIC_SLAVE };
            routes.push(irqchip_route(gsi, chip, gsi % 8));
        }
        routes.push(irqchip_route(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    routes
}

impl KvmResources {
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self { vm, routes: Mutex::new(Routes { next_gsi: IOAPIC_PINS, msi: BTreeMap::new() }) }
    }

    fn commit(&self, routes: &Routes) -> io::Result<()> {
        let mut entries = legacy_routes();
        entries.extend(routes.msi.iter().map(|(gsi, message)| msi_route(*gsi, *message)));
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|_| io::Error::other("too many interrupt routes for KVM"))?;
        self.vm.set_gsi_routing(&table).map_err(io::Error::from)
    }
}

impl VmResources for KvmResources {
    fn allocate_msi(&self) -> io::Result<MsiVector> {
        let irqfd = EventFd::new(EFD_NONBLOCK)?;
        let gsi = {
            let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
            let gsi = routes.next_gsi;
            routes.next_gsi += 1;
            gsi
        };
        self.vm.register_irqfd(&irqfd, gsi).map_err(io::Error::from)?;
        Ok(MsiVector { gsi, irqfd })
    }

    fn route_msi(&self, gsi: u32, message: Option<MsiMessage>) -> io::Result<()> {
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        match message {
            Some(m) => routes.msi.insert(gsi, m),
            None => routes.msi.remove(&gsi),
        };
        self.commit(&routes)
    }

    fn register_ioevent(&self, event: &EventFd, addr: u64) -> io::Result<()> {
        self.vm.register_ioevent(event, &IoEventAddress::Mmio(addr), NoDatamatch).map_err(io::Error::from)
    }

    fn unregister_ioevent(&self, event: &EventFd, addr: u64) -> io::Result<()> {
        self.vm.unregister_ioevent(event, &IoEventAddress::Mmio(addr), NoDatamatch).map_err(io::Error::from)
    }
}

#[cfg(test)]
pub mod fake {
    //! A [`VmResources`] that records what it is asked.
    use super::*;

    #[derive(Debug, Default)]
    pub struct FakeResources {
        pub routes: Mutex<BTreeMap<u32, MsiMessage>>,
        pub ioevents: Mutex<Vec<u64>>,
        next: Mutex<u32>,
    }

    impl VmResources for FakeResources {
        fn allocate_msi(&self) -> io::Result<MsiVector> {
            let mut next = self.next.lock().unwrap();
            *next += 1;
            Ok(MsiVector { gsi: IOAPIC_PINS + *next - 1, irqfd: EventFd::new(EFD_NONBLOCK)? })
        }
        fn route_msi(&self, gsi: u32, message: Option<MsiMessage>) -> io::Result<()> {
            let mut routes = self.routes.lock().unwrap();
            match message {
                Some(m) => routes.insert(gsi, m),
                None => routes.remove(&gsi),
            };
            Ok(())
        }
        fn register_ioevent(&self, _: &EventFd, addr: u64) -> io::Result<()> {
            self.ioevents.lock().unwrap().push(addr);
            Ok(())
        }
        fn unregister_ioevent(&self, _: &EventFd, addr: u64) -> io::Result<()> {
            self.ioevents.lock().unwrap().retain(|a| *a != addr);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_routes_cover_pic_and_ioapic() {
        let routes = legacy_routes();
        assert_eq!(routes.len(), 16 + 24);
        assert!(routes.iter().all(|r| r.type_ == KVM_IRQ_ROUTING_IRQCHIP));
    }
}
