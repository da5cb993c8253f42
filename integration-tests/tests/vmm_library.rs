//! The `vmm` library used in-process, as the inspector uses it: a VM stopped
//! from another thread leaves no vCPU thread behind.

use std::time::{Duration, Instant};

use guest_images::workload;
use integration_tests::{guest, require_kvm};
use vm_memory::{Bytes, GuestAddress};
use vmm::boot::BootSource;
use vmm::devices::serial::SerialOutput;
use vmm::{VmConfig, VmExit, Vmm};

fn vcpu_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).ok())
        .filter(|comm| comm.starts_with("vcpu"))
        .count()
}

#[test]
fn stopping_a_running_vm_joins_every_vcpu_thread() {
    require_kvm();
    let config = VmConfig {
        kvm_path: "/dev/kvm".into(),
        boot: BootSource {
            kernel: guest("source-workload"),
            initramfs: None,
            cmdline: String::new(),
            extra_memmap: Vec::new(),
        },
        memory: 64 << 20,
        cpus: 3,
        serial: SerialOutput::Null,
        mirror_socket: None,
        mirror_allow_uids: Vec::new(),
        mirror_policy: None,
        mirror_regrant: false,
        run_as: None,
        api_socket: None,
        host_tsc: false,
        doorbell: None,
    };
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
