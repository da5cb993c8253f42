//! KVM state: the VM (memslots, irqchip, PIT), its vCPUs and their lifecycle.

pub mod dirty_ring;
pub mod lifecycle;
pub mod ram_slots;
pub mod trace;
pub mod vcpu;
pub mod vm;
