//! The `vmm` library used in-process, as the inspector uses it: a VM stopped
//! from another thread leaves no vCPU thread behind.

use std::time::{Duration, Instant};

use guest_images::workload;
use integration_tests::{guest, require_kvm};
use vm_memory::{Bytes, GuestAddress};
use vmm::{VmConfig, VmExit, Vmm};

/// The tests count this process's vCPU threads: one VM at a time.
static ONE_VM_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn vcpu_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).ok())
        .filter(|comm| comm.starts_with("vcpu"))
        .count()
}

#[test]
fn stopping_a_running_vm_joins_every_vcpu_thread() {
    let _one = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    require_kvm();
    let config = VmConfig { memory: 64 << 20, cpus: 3, ..VmConfig::with_kernel(guest("source-workload")) };
    let vmm = Vmm::build(&config).expect("build");
    let memory = vmm.ram().memory().clone();
    let lifecycle = vmm.lifecycle();
    let runner = std::thread::spawn(move || vmm.run(false, Vec::new()));
    let deadline = Instant::now() + Duration::from_secs(30);
    let state_gpa = GuestAddress(workload::HEADER_GPA + std::mem::offset_of!(workload::Header, state) as u64);
    while memory.read_obj::<u32>(state_gpa).unwrap() != workload::STATE_RUNNING {
        assert!(Instant::now() < deadline, "the workload did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(vcpu_threads(), 3, "three vCPU threads run the guest");
    lifecycle.request_exit(VmExit::Stopped("test"));
    let exit = runner.join().unwrap().expect("run");
    assert_eq!(exit, VmExit::Stopped("test"));
    assert_eq!(vcpu_threads(), 0, "no vCPU thread outlives the VM");
}

/// An inspector-agent VM whose boot vCPU sleeps on the doorbell and whose second vCPU
/// is parked: a pause must count both as paused, not time out.
#[test]
fn a_pause_counts_parked_and_doorbell_waiting_vcpus() {
    use guest_images::agent::{RingHeader, AGENT_BOOTING, AGENT_READY, E820_MIRROR, RING_GPA, RING_MAGIC, RING_SLOTS};
    let _one = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    require_kvm();
    let window_base = 1u64 << 32;
    let doorbell = std::sync::Arc::new(vmm::devices::doorbell::Doorbell::new());
    let mut config = VmConfig::with_kernel(guest("inspector-agent"));
    config.boot.extra_memmap = vec![(window_base, 1 << 20, E820_MIRROR)];
    config.memory = guest_images::agent::MIN_RAM.next_multiple_of(2 << 20);
    config.cpus = 2;
    config.extra_pio_devices.push((vmm::devices::doorbell::PORTS, doorbell));
    let vmm = Vmm::build(&config).expect("build");
    let memory = vmm.ram().memory().clone();
    let header = RingHeader {
        magic: RING_MAGIC,
        window_base,
        window_len: 1 << 20,
        agent_state: AGENT_BOOTING,
        slots: RING_SLOTS as u32,
        completed: 0,
        digest_key: [1, 2],
    };
    // SAFETY: RingHeader is a repr(C) plain-data ABI struct.
    let bytes = unsafe {
        std::slice::from_raw_parts((&header as *const RingHeader).cast::<u8>(), std::mem::size_of::<RingHeader>())
    };
    memory.write_slice(bytes, GuestAddress(RING_GPA)).unwrap();
    let lifecycle = vmm.lifecycle();
    let runner = std::thread::spawn(move || vmm.run(false, Vec::new()));
    let state = GuestAddress(RING_GPA + std::mem::offset_of!(RingHeader, agent_state) as u64);
    let deadline = Instant::now() + Duration::from_secs(30);
    while memory.read_obj::<u32>(state).unwrap() != AGENT_READY {
        assert!(Instant::now() < deadline, "the agent did not become ready");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(50)); // let it reach its doorbell wait
    lifecycle.pause().expect("every vCPU counts as paused");
    assert!(lifecycle.is_paused());
    lifecycle.resume();
    assert!(!lifecycle.is_paused());
    lifecycle.pause().expect("and again after a resume");
    lifecycle.resume();
    lifecycle.request_exit(VmExit::Stopped("test"));
    assert_eq!(runner.join().unwrap().expect("run"), VmExit::Stopped("test"));
}
