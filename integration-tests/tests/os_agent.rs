//! OS views computed inside the agent and served by the inspector, against a live
//! Linux guest under QEMU (the `linux_guest` fixture) with no symbol files anywhere:
//! the process list matches the guest's own `ps` both ways (every process it shows is
//! listed, with its comm, and nothing it does not show), the module list its
//! `/proc/modules`, a marker is read at the virtual address the process printed, a
//! process started after attach appears and one that exits disappears; on Debian
//! 12's 6.1 kernel and Debian 13's 6.12.

use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::linux_guest::{assert_processes_agree, parse_ps_reply, GuestInspector, LinuxGuest, ViewProcess};
use integration_tests::{binary, run_with_timeout};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(120);

/// QEMU serves one QMP client at a time: the tests attach to the shared guest in turn.
static ONE_INSPECTOR: std::sync::Mutex<()> = std::sync::Mutex::new(());

type Inspector = GuestInspector;

/// What these tests ask of an inspector beyond its control requests.
trait Requests {
    fn ps(&self) -> Vec<(u32, u32, u32, String)>;
    fn api_json(&self, args: &[&str]) -> Value;
}

impl Requests for Inspector {
    /// (pid, ppid, uid, comm) of every process, as the agent sees them.
    fn ps(&self) -> Vec<(u32, u32, u32, String)> {
        parse_ps_reply(&self.ask("ps"))
    }

    fn api_json(&self, args: &[&str]) -> Value {
        let (json, status) = self.specula_json(args);
        assert_eq!(status, 0, "specula {args:?}: {json}");
        json
    }
}

#[test]
fn the_agent_computes_the_guests_processes_modules_and_memory_with_no_symbols() {
    let _one = ONE_INSPECTOR.lock().unwrap_or_else(|p| p.into_inner());
    let guest = LinuxGuest::shared();
    let inspector = Inspector::attach(guest);
    assert_views_match_the_guest(guest, &inspector);
}

/// A second kernel version: Debian 13's 6.12 cloud kernel (module memory in
/// `mem[]` since 6.4, system calls dispatched by `x64_sys_call` since 6.9), found and
/// read the same way with nothing per version on the host; its rootkit checks are clean.
#[test]
fn debian_13s_kernel_gives_the_same_views_and_clean_checks() {
    use integration_tests::linux_guest::{LinuxGuestConfig, DEBIAN_13};
    let guest = LinuxGuest::start(LinuxGuestConfig { image: DEBIAN_13, ..Default::default() });
    assert!(guest.ground_truth().kernel_release.starts_with("6.12."), "{}", guest.ground_truth().kernel_release);
    let inspector = Inspector::attach(&guest);
    assert_views_match_the_guest(&guest, &inspector);
    process_comes_and_goes(&guest, &inspector);
    let checks = inspector.api_json(&["checks"]);
    assert_eq!(checks["clean"], true, "no false positive on Debian 13: {checks:#}");
}

/// The agent's kernel, process, module and memory views against what the guest
/// printed about itself: every process (pid, ppid, uid, comm), every module (name,
/// size, address), each marker at the virtual address its process printed.
fn assert_views_match_the_guest(guest: &LinuxGuest, inspector: &Inspector) {
    let truth = guest.ground_truth();
    let kernel = inspector.ask("kernel");
    assert!(kernel.starts_with(&format!("release={} ", truth.kernel_release)), "{kernel}");
    // The kernel found in RAM is the one the vCPUs run: their CR3s root page tables that
    // map its text where its own do (QEMU's registers give no LSTAR; GS bases may).
    let view = inspector.api_json(&["kernel"]);
    assert_eq!(view["anchored"], true, "{view:#}");
    let anchors = view["anchors"].as_array().unwrap();
    assert!(anchors.iter().any(|a| a["anchor"] == "cr3" && a["agrees"] == true), "{view:#}");
    assert!(anchors.iter().all(|a| a["agrees"] == true) && view["forged_vmcoreinfo"] == serde_json::json!([]));
    assert!(kernel.ends_with(" anchored=true"), "{kernel}");
    truth.assert_processes_listed(&inspector.ps());
    // Both ways: the agent's list, taken between two of the guest's own `ps`, holds every
    // process alive across both and nothing that neither shows (no phantom).
    let before = guest.ps();
    let listed: Vec<ViewProcess> = inspector.ps().iter().map(ViewProcess::from).collect();
    let after = guest.ps();
    assert_processes_agree(&before, &listed, &after, "the agent's ps");
    // The JSON view carries the command line, read from each process's own memory.
    let processes = inspector.api_json(&["ps"]);
    let marker = truth.marker("specula-workerA").expect("a marker").clone();
    let json = processes.as_array().unwrap().iter().find(|p| p["pid"] == marker.pid).expect("the marker process");
    let args: Vec<String> = json["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect();
    let truth_args = &truth.process_by_pid(marker.pid).unwrap().args;
    assert_eq!(args.join(" "), *truth_args, "the command line as the guest's ps shows it");
    // One process by pid: the same view through the CLI (and so the HTTP route) and
    // the line socket, and a pid the task list lacks is not found.
    let one = inspector.api_json(&["process", &marker.pid.to_string()]);
    assert_eq!((&one["pid"], &one["comm"], &one["args"]), (&json["pid"], &json["comm"], &json["args"]), "{one:#}");
    let line: Value = serde_json::from_str(&inspector.ask(&format!("process {}", marker.pid))).unwrap();
    assert_eq!((&line["pid"], &line["ppid"]), (&json["pid"], &json["ppid"]), "{line:#}");
    let missing = run_with_timeout(
        Command::new(binary("specula")).args(["--socket", inspector.api.to_str().unwrap(), "process", "999999"]),
        LIMIT,
    );
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success() && stderr.contains("not_found (404)") && stderr.contains("999999"), "{stderr}");
    // Modules: exactly /proc/modules, with sizes and addresses.
    truth.assert_modules_are(&inspector.ask("lsmod"));
    // The markers, at the virtual addresses the processes printed, through their page tables.
    for marker in &truth.markers {
        let hex = inspector.ask(&format!("vread {} {:#x} {}", marker.pid, marker.vaddr, marker.text.len()));
        let bytes: Vec<u8> =
            (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
        assert_eq!(bytes, marker.text.as_bytes(), "pid {}", marker.pid);
    }
}

#[test]
fn a_process_started_after_attach_appears_and_one_that_exits_disappears() {
    let _one = ONE_INSPECTOR.lock().unwrap_or_else(|p| p.into_inner());
    let guest = LinuxGuest::shared();
    let inspector = Inspector::attach(guest);
    process_comes_and_goes(guest, &inspector);
}

/// Starts `sleep 4444` in the guest, waits for the agent to list it, kills it and
/// waits for it to go.
fn process_comes_and_goes(guest: &LinuxGuest, inspector: &Inspector) {
    let started = guest.console("sleep 4444 & echo started $!", LIMIT);
    let pid: u32 = started.split_whitespace().last().unwrap().trim().parse().unwrap_or_else(|_| panic!("{started}"));
    let deadline = Instant::now() + LIMIT;
    while !inspector.ps().iter().any(|p| p.0 == pid && p.3 == "sleep") {
        assert!(Instant::now() < deadline, "pid {pid} never appeared");
        std::thread::sleep(Duration::from_millis(100));
    }
    guest.console(&format!("kill {pid}; wait {pid} 2>/dev/null; echo gone"), LIMIT);
    while inspector.ps().iter().any(|p| p.0 == pid) {
        assert!(Instant::now() < deadline, "pid {pid} never went away");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_os_endpoints_serve_the_kernel_maps_memory_and_modules() {
    let _one = ONE_INSPECTOR.lock().unwrap_or_else(|p| p.into_inner());
    let guest = LinuxGuest::shared();
    let truth = guest.ground_truth();
    let inspector = Inspector::attach(guest);
    let kernel = inspector.api_json(&["kernel"]);
    assert_eq!(kernel["release"].as_str(), Some(truth.kernel_release.as_str()), "{kernel}");
    assert_eq!(kernel["paging"].as_str(), Some("4-level"));
    let marker = truth.marker("specula-workerB").expect("a marker").clone();
    let maps = inspector.api_json(&["maps", &marker.pid.to_string()]);
    let covering = maps
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["start"].as_u64().unwrap() <= marker.vaddr && marker.vaddr < m["end"].as_u64().unwrap());
    let covering = covering.unwrap_or_else(|| panic!("a VMA holds {:#x}: {maps}", marker.vaddr));
    assert!(covering["perms"].as_str().unwrap().starts_with("rw"), "{covering}");
    let out = run_with_timeout(
        Command::new(binary("specula")).args([
            "--socket",
            inspector.api.to_str().unwrap(),
            "vread",
            &marker.pid.to_string(),
            &format!("{:#x}", marker.vaddr),
            &marker.text.len().to_string(),
        ]),
        LIMIT,
    );
    let dump = String::from_utf8_lossy(&out.stdout);
    assert!(dump.contains(&marker.text[..16]), "the hex dump shows the marker: {dump}");
    let modules = inspector.api_json(&["lsmod"]);
    assert!(
        modules.as_array().unwrap().iter().any(|m| m["name"] == "dummy" && m["state"] == "MODULE_STATE_LIVE"),
        "{modules}"
    );
}

#[test]
fn a_redirected_system_call_is_reported_with_its_module_and_a_clean_table_is_clean() {
    use std::os::unix::fs::FileExt;
    // A private guest: its system call table is changed while the check runs.
    let guest = LinuxGuest::start(integration_tests::linux_guest::LinuxGuestConfig::default());
    let dummy = guest.ground_truth().module("dummy").expect("dummy is loaded").address.unwrap();
    let inspector = Inspector::attach(&guest);
    let clean = inspector.ask("check-syscalls");
    let field =
        |reply: &str, key: &str| reply.split_whitespace().find_map(|w| w.strip_prefix(key)).unwrap_or("").to_string();
    let entries: u32 = field(&clean, "entries=").parse().unwrap();
    assert!(entries > 300, "the table's entries are found: {clean}");
    assert_eq!(field(&clean, "redirected="), "", "no false positive on an untouched guest: {clean}");
    // What a rootkit does: point kexec_load (246, rarely called) at its own code, here the
    // dummy module's. The test writes the guest's RAM itself, as the rootkit would, at the
    // table the guest's own /proc/kallsyms names (physical address from /proc/iomem), not
    // at the one Specula reported, which must be the same.
    let table_pa = guest.kernel_image_pa(guest.kallsyms_address("sys_call_table"));
    let reported = u64::from_str_radix(field(&clean, "table_pa=").trim_start_matches("0x"), 16).unwrap();
    assert_eq!(reported, table_pa, "Specula's sys_call_table is the guest's: {clean}");
    let ram = std::fs::OpenOptions::new().read(true).write(true).open(&guest.ram_memfds()[0]).unwrap();
    let slot = table_pa + 246 * 8;
    let mut original = [0u8; 8];
    ram.read_exact_at(&mut original, slot).unwrap();
    let kexec_load = guest.kallsyms_address("__x64_sys_kexec_load");
    assert_eq!(u64::from_le_bytes(original), kexec_load, "slot 246 of the guest's table is kexec_load's handler");
    ram.write_all_at(&dummy.to_le_bytes(), slot).unwrap();
    let hooked = inspector.ask("check-syscalls");
    ram.write_all_at(&original, slot).unwrap();
    assert_eq!(field(&hooked, "redirected="), format!("246:{dummy:#x}:dummy"), "{hooked}");
    let json = inspector.api_json(&["checks", "syscalls"]);
    assert_eq!(json["clean"], true, "restored: {json}");
}
