//! KVM state: the VM (memslots, irqchip, PIT) and its vCPUs.

pub mod dirty_ring;
pub mod vcpu;
pub mod vm;
