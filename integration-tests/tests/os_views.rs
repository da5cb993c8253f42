//! `specula-os` against the live Linux guest fixture: with nothing but the
//! guest's RAM (read-only memfd mappings), no symbol files, the library finds
//! the kernel and its views, and they match what the guest says about itself
//! (`integration_tests::linux_guest::GroundTruth`: its own `ps`, `/proc/modules`,
//! the markers its processes printed, `uname -r`).
//!
//! Needs qemu-system-x86_64 and target/guest-images/linux/{vmlinuz,introspect.cpio.gz}.

use std::fs::File;
use std::ops::Range;
use std::os::unix::io::AsRawFd;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use integration_tests::linux_guest::{LinuxGuest, RamMapping};
use specula_os::{Error, Linux, PagingMode, PhysMem, Process};

const CONSOLE: Duration = Duration::from_secs(30);

/// Guest RAM of the shared guest (`pc`, one backend, 512 MiB: guest-physical
/// address = offset in the memfd).
struct GuestRam {
    map: RamMapping,
    file: File,
}

impl PhysMem for GuestRam {
    fn read(&self, pa: u64, buf: &mut [u8]) -> Result<(), Error> {
        let ram = self.map.as_slice();
        let src = usize::try_from(pa)
            .ok()
            .and_then(|start| ram.get(start..start.checked_add(buf.len())?))
            .ok_or(Error::PhysRead { pa, len: buf.len() as u64 })?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn prefetch(&self, pa: u64) {
        if let Some(byte) = usize::try_from(pa).ok().and_then(|at| self.map.as_slice().get(at)) {
            // SAFETY: a prefetch reads nothing architecturally and never faults; the
            // address is inside the mapping anyway.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(byte as *const u8 as *const i8)
            };
        }
    }

    /// The memfd's data extents: pages the guest never wrote are holes, which
    /// a scan need not read (and reading them would allocate them).
    fn ram_ranges(&self) -> Vec<Range<u64>> {
        let (fd, len) = (self.file.as_raw_fd(), self.map.len() as i64);
        let mut out: Vec<Range<u64>> = Vec::new();
        let mut pos = 0i64;
        while pos < len {
            // SAFETY: lseek on a file we hold open.
            let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
            if data < 0 {
                break;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            let end = if hole < 0 { len } else { hole.min(len) };
            out.push(data as u64..end as u64);
            pos = end;
        }
        out
    }
}

fn ram() -> &'static GuestRam {
    static RAM: OnceLock<GuestRam> = OnceLock::new();
    RAM.get_or_init(|| {
        let guest = LinuxGuest::shared();
        let path = guest.ram_memfds().into_iter().next().expect("a RAM memfd");
        GuestRam { map: guest.map_ram().into_iter().next().unwrap(), file: File::open(path).unwrap() }
    })
}

fn linux() -> &'static Linux<'static, GuestRam> {
    static LINUX: OnceLock<Linux<'static, GuestRam>> = OnceLock::new();
    LINUX.get_or_init(|| {
        let started = Instant::now();
        let linux = Linux::discover(ram()).unwrap_or_else(|e| panic!("discovery failed: {e}"));
        eprintln!(
            "discovered in {:?}: {} symbols, {} BTF types, VMCOREINFO at {:#x}",
            started.elapsed(),
            linux.kallsyms().len(),
            linux.btf().len(),
            linux.vmcoreinfo().found_at
        );
        linux
    })
}

/// The process list, walked while the guest runs (the library walks again a list
/// that changed under it).
fn processes() -> Vec<Process> {
    linux().processes().unwrap_or_else(|e| panic!("task list walk failed: {e}"))
}

fn args_of(p: &Process) -> String {
    if p.kernel_thread {
        format!("[{}]", p.comm)
    } else {
        p.args().join(" ")
    }
}

#[test]
fn kernel_view_matches_uname() {
    let guest = LinuxGuest::shared();
    let info = linux().kernel_info().unwrap();
    eprintln!("{info:#x?}");
    assert_eq!(info.release, guest.ground_truth().kernel_release);
    assert_eq!(info.uts_release.as_deref(), Some(info.release.as_str()));
    assert_eq!(info.paging_mode, PagingMode::Level4);
    assert_eq!(info.conflicting_vmcoreinfo, 0, "the kernel's two VMCOREINFO copies agree");
    assert_eq!((info.online_cpus, info.nr_cpu_ids), (Some(1), Some(1)), "the guest has one vCPU");
    // The KASLR slide moves _stext from its link-time address.
    let stext = linux().kallsyms().address("_stext").unwrap();
    assert_eq!(stext, 0xffff_ffff_8100_0000 + info.kaslr_offset);
    assert_eq!(linux().task_state_member(), "__state", "Linux 6.1 has task_struct.__state");
    assert!(!linux().modules_use_mem_array(), "Linux 6.1 has module.core_layout");
}

#[test]
fn processes_match_the_guests_ps() {
    let truth = LinuxGuest::shared().ground_truth();
    let found = processes();
    // ps and cat ran to print the ground truth and exited since.
    let exited = |p: &&integration_tests::linux_guest::GuestProcess| p.comm == "ps" || p.comm == "cat";
    for want in truth.processes.iter().filter(|p| !exited(p)) {
        let kworker = want.comm.starts_with("kworker/");
        let Some(got) = found.iter().find(|p| p.pid as u32 == want.pid) else {
            // Kernel workers come and go with the load; everything else is still there.
            assert!(kworker, "pid {} ({}) not in the task list:\n{found:#?}", want.pid, want.comm);
            continue;
        };
        // For workers, ps shows comm plus the workqueue they last ran ("kworker/0:0-rcu"), cut at 15 bytes.
        if kworker {
            assert!(want.comm.starts_with(&got.comm), "pid {}: comm {} vs ps {}", want.pid, got.comm, want.comm);
        } else {
            assert_eq!(got.comm, want.comm, "pid {}", want.pid);
            assert_eq!(args_of(got), want.args, "pid {} ({})", want.pid, want.comm);
        }
        assert_eq!((got.ppid as u32, got.uid), (want.ppid, want.uid()), "pid {} ({})", want.pid, want.comm);
        assert_eq!(got.kernel_thread, want.args.starts_with('['), "pid {} ({})", want.pid, want.comm);
        assert_eq!(got.tgid, got.pid);
    }
    // And nothing old that ps did not list (later pids are the console's own processes).
    let newest = truth.processes.iter().map(|p| p.pid).max().unwrap();
    for got in found.iter().filter(|p| (p.pid as u32) <= newest && !p.comm.starts_with("kworker/")) {
        assert!(truth.process_by_pid(got.pid as u32).is_some(), "{got:#?} is not in the guest's ps:\n{}", truth.raw);
    }
    let b = found.iter().find(|p| p.comm == "specula-workerB").unwrap();
    assert_eq!((b.uid, b.euid), (1000, 1000));
}

#[test]
fn the_dummy_module_is_listed_with_its_size() {
    let want = LinuxGuest::shared().ground_truth().module("dummy").expect("dummy in /proc/modules");
    let modules = linux().modules().unwrap();
    let got = modules.iter().find(|m| m.name == "dummy").unwrap_or_else(|| panic!("no dummy in {modules:#x?}"));
    assert_eq!(got.size, want.size);
    assert_eq!(Some(got.base), want.address);
    assert_eq!(got.state_name.as_deref(), Some("MODULE_STATE_LIVE"));
    assert_eq!(modules.len(), LinuxGuest::shared().ground_truth().modules.len());
}

#[test]
fn markers_are_read_through_each_process_page_tables() {
    let truth = LinuxGuest::shared().ground_truth();
    let found = processes();
    for marker in &truth.markers {
        let p = found.iter().find(|p| p.pid as u32 == marker.pid).unwrap_or_else(|| panic!("no pid {}", marker.pid));
        assert_eq!((p.comm.as_str(), p.uid), (marker.comm.as_str(), marker.uid));
        let mut text = vec![0u8; marker.text.len()];
        linux().read_process(p, marker.vaddr, &mut text).unwrap();
        assert_eq!(String::from_utf8_lossy(&text), marker.text);
        // The same address in the other marker's address space holds the other text.
        assert_eq!(args_of(p), truth.process_by_pid(marker.pid).unwrap().args);
        assert!(p.pgd.is_some() && !p.kernel_thread && p.cmdline_error.is_none());
    }
}

#[test]
fn a_process_started_later_appears_and_disappears() {
    let guest = LinuxGuest::shared();
    let shell: i32 = guest.console("echo $$", CONSOLE).trim().parse().unwrap();
    let pid: i32 = guest.console("sleep 3333 & echo $!", CONSOLE).trim().parse().unwrap();
    // The child may not have exec'd sleep yet when echo returns.
    let deadline = Instant::now() + Duration::from_secs(20);
    let started = loop {
        let list = processes();
        if let Some(p) = list.into_iter().find(|p| p.pid == pid && p.comm == "sleep") {
            break p;
        }
        assert!(Instant::now() < deadline, "pid {pid} (sleep 3333) never showed up");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(started.args(), ["sleep", "3333"]);
    assert_eq!((started.ppid, started.uid), (shell, 0), "a child of the console shell, as root");
    let shell_task = processes().into_iter().find(|p| p.pid == shell).expect("the console shell");
    assert_eq!(shell_task.comm, "sh");
    guest.console(&format!("kill {pid}; wait {pid}"), CONSOLE);
    let gone = processes();
    assert!(gone.iter().all(|p| p.pid != pid), "pid {pid} still listed after kill and wait");
}

type MapLine = (u64, u64, String, Option<String>);

/// `/proc/PID/maps` lines as (start, end, perms, file base name); `[vsyscall]` is not a VMA.
fn parse_maps(maps: &str) -> Vec<MapLine> {
    maps.lines()
        .filter(|l| !l.is_empty() && !l.ends_with("[vsyscall]"))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (s, e) = f[0].split_once('-').unwrap();
            let path = f.get(5).filter(|p| p.starts_with('/')).map(|p| p.rsplit('/').next().unwrap().to_string());
            (u64::from_str_radix(s, 16).unwrap(), u64::from_str_radix(e, 16).unwrap(), f[1].to_string(), path)
        })
        .collect()
}

#[test]
fn memory_areas_match_proc_maps() {
    let guest = LinuxGuest::shared();
    let truth = guest.ground_truth();
    let found = processes();
    // Every user process of the workload (ps and cat are gone; pid 1 is the console shell's parent).
    let pids: Vec<i32> = found
        .iter()
        .filter(|p| !p.kernel_thread && truth.process_by_pid(p.pid as u32).is_some())
        .map(|p| p.pid)
        .collect();
    assert!(pids.len() >= 5, "init, two markers, two sleeps: {pids:?}");
    for &pid in &pids {
        let p = found.iter().find(|p| p.pid == pid).unwrap();
        let vmas = linux().vmas(p).unwrap_or_else(|e| panic!("VMAs of pid {pid}: {e}"));
        let maps = guest.console(&format!("cat /proc/{pid}/maps"), CONSOLE);
        let got: Vec<MapLine> = vmas.iter().map(|v| (v.start, v.end, v.perms(), v.file_name.clone())).collect();
        assert_eq!(got, parse_maps(&maps), "pid {pid} ({}): VMAs vs /proc/PID/maps:\n{maps}", p.comm);
    }
    for marker in &truth.markers {
        let p = found.iter().find(|p| p.pid as u32 == marker.pid).unwrap();
        let vmas = linux().vmas(p).unwrap();
        assert!(vmas.iter().any(|v| v.start <= marker.vaddr && marker.vaddr < v.end && v.perms().starts_with("rw")));
    }
    // Kernel threads have none.
    let kthreadd = found.iter().find(|p| p.pid == 2).unwrap();
    assert!(linux().vmas(kthreadd).unwrap().is_empty());
}

#[test]
fn the_real_btf_and_kallsyms_survive_damage() {
    let linux = linux();
    let k = linux.kallsyms();
    let (start, stop) = (k.address("__start_BTF").unwrap(), k.address("__stop_BTF").unwrap());
    let mut blob = vec![0u8; (stop - start) as usize];
    specula_os::VirtMem::read_virt(linux.kernel(), start, &mut blob).unwrap();
    assert_eq!(specula_os::Btf::parse(blob.clone()).unwrap().len(), linux.btf().len());
    // Cut short anywhere: an error, never a panic.
    for i in 1..12 {
        let cut = blob.len() * i / 12;
        assert!(specula_os::Btf::parse(blob[..cut].to_vec()).is_err(), "BTF cut at {cut} parsed");
    }
    // Bytes flipped in the type section: whatever parses answers lookups without panicking.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..12 {
        let mut bad = blob.clone();
        for _ in 0..64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let at = 24 + (x as usize % (bad.len() / 2));
            bad[at] ^= (x >> 32) as u8 | 1;
        }
        if let Ok(btf) = specula_os::Btf::parse(bad) {
            for (st, path) in [("task_struct", "tasks"), ("mm_struct", "mm_mt.ma_root"), ("module", "core_layout.size")]
            {
                let _ = btf.member(st, path);
            }
        }
    }
}

#[test]
fn a_zombie_is_an_exited_process_not_a_kernel_thread() {
    let guest = LinuxGuest::shared();
    // `sleep 0` exits at once and its parent, which exec'd `sleep 30`, never reaps it.
    let parent: i32 = guest.console("sh -c 'sleep 0 & exec sleep 30' & echo $!", CONSOLE).trim().parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let zombie = loop {
        if let Some(z) = processes().into_iter().find(|p| p.ppid == parent && p.exit_state != 0) {
            break z;
        }
        assert!(Instant::now() < deadline, "no zombie child of pid {parent}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let stat = guest.console(&format!("cat /proc/{}/stat", zombie.pid), CONSOLE);
    assert!(stat.contains(") Z "), "pid {} is a zombie: {stat}", zombie.pid);
    assert!(!zombie.kernel_thread && zombie.mm == 0 && zombie.pgd.is_none(), "{zombie:#x?}");
    assert_eq!(zombie.comm, "sleep");
    guest.console(&format!("kill {parent}; wait {parent}"), CONSOLE);
}

/// A private guest with another shape: q35, RAM in two NUMA-node memfds (two
/// guest-physical segments), two vCPUs, no KASLR.
#[test]
fn a_numa_guest_without_kaslr() {
    use integration_tests::linux_guest::{LinuxGuestConfig, Machine};
    let guest = LinuxGuest::start(LinuxGuestConfig {
        memory_backends: 2,
        machine: Machine::Q35,
        cpus: 2,
        extra_cmdline: "nokaslr".into(),
        ..Default::default()
    });
    let maps = guest.map_ram();
    let half = maps[0].len() as u64;
    let mem = specula_os::SliceMem::new(vec![(0, maps[0].as_slice()), (half, maps[1].as_slice())]);
    let linux = Linux::discover(&mem).unwrap_or_else(|e| panic!("discovery failed: {e}"));
    let info = linux.kernel_info().unwrap();
    assert_eq!(info.release, guest.ground_truth().kernel_release);
    assert_eq!(info.kaslr_offset, 0, "nokaslr");
    assert_eq!((info.online_cpus, info.nr_cpu_ids), (Some(2), Some(2)));
    let procs = linux.processes().unwrap();
    for marker in &guest.ground_truth().markers {
        let p = procs.iter().find(|p| p.pid as u32 == marker.pid).unwrap();
        let mut text = vec![0u8; marker.text.len()];
        linux.read_process(p, marker.vaddr, &mut text).unwrap();
        assert_eq!(String::from_utf8_lossy(&text), marker.text);
    }
}
