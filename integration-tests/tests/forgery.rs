//! A kernel forged in a guest process's pages (`guest-images/linux/specula-forger.c`):
//! a valid VMCOREINFO whose page-table root is a page of the forger's own, with page
//! tables that map `swapper_pg_dir`'s address back onto that root, which is the test a
//! discovery from RAM alone applies to a candidate, and that map the two task-list
//! links next to the forger's task onto copies that skip it: in the forged kernel the
//! forger does not exist. The forger runs as root (it needs its pages' physical
//! addresses, kernel memory and kernel addresses) and writes nothing but its own
//! memory.
//!
//! Anchored to the vCPUs' CR3s, discovery believes the real kernel; the kernel view
//! lists the forged copy, and the `forgery` check names its physical address and the
//! forger's pid, on Debian 12's 6.1 and Debian 13's 6.12.

use std::time::Duration;

use integration_tests::linux_guest::{GuestInspector, LinuxGuest, LinuxGuestConfig, DEBIAN_13};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(120);

/// `specula --json ARGS` against the inspector's API.
fn api_json(inspector: &GuestInspector, args: &[&str]) -> Value {
    let (json, status) = inspector.specula_json(args);
    // `checks` exits 3 when it found something: the JSON is the reply either way.
    assert!(matches!(status, 0 | 3), "specula {args:?} exited {status}: {json}");
    json
}

/// Starts the forger in `guest`; returns its pid and the forged VMCOREINFO's
/// guest-physical address, as it printed them.
fn start_forger(guest: &LinuxGuest) -> (i64, u64) {
    // It reads /proc/kallsyms a few times: seconds under TCG.
    let out = guest.console(
        "specula-forger > /tmp/forger.out 2>&1 & i=0; until grep -q . /tmp/forger.out || [ $i -ge 300 ]; do usleep 200000; i=$((i+1)); done; cat /tmp/forger.out",
        LIMIT,
    );
    let line = out.lines().find(|l| l.starts_with("forger ")).unwrap_or_else(|| panic!("the forger said: {out}"));
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {line:?}"))
            .to_string()
    };
    assert_eq!(field("hidden="), "1", "the forger hid itself in its copy: {line}");
    let pid = field("pid=").parse().unwrap();
    let pa = u64::from_str_radix(field("vmcoreinfo_pa=").trim_start_matches("0x"), 16).unwrap();
    (pid, pa)
}

fn a_forged_kernel_is_named_with_its_forger(config: LinuxGuestConfig) {
    let guest = LinuxGuest::start(config);
    let (pid, pa) = start_forger(&guest);
    let inspector = GuestInspector::attach(&guest);
    // Found again now, with the forgery in RAM.
    let kernel = api_json(&inspector, &["discover"]);
    assert_eq!(kernel["release"].as_str(), Some(guest.ground_truth().kernel_release.as_str()), "{kernel:#}");
    assert_eq!(kernel["anchored"], true, "{kernel:#}");
    // It says how it knows: each vCPU's CR3 (QEMU's registers carry no LSTAR) agrees.
    let anchors = kernel["anchors"].as_array().unwrap_or_else(|| panic!("no anchors: {kernel:#}"));
    assert!(anchors.iter().any(|a| a["anchor"] == "cr3"), "the CR3 anchor was checked: {kernel:#}");
    assert!(anchors.iter().all(|a| a["agrees"] == true), "every anchor agrees: {kernel:#}");
    let forged: Vec<u64> = kernel["forged_vmcoreinfo"].as_array().unwrap().iter().filter_map(Value::as_u64).collect();
    assert!(forged.contains(&pa), "the forged copy at {pa:#x} is not listed: {kernel:#}");
    let report = api_json(&inspector, &["checks", "forgery"]);
    let findings = report["findings"].as_array().unwrap();
    assert_eq!(findings.len(), forged.len(), "one finding per forged copy: {report:#}");
    assert!(
        findings.iter().any(|f| f["address"].as_u64() == Some(pa)),
        "no finding at the forged copy {pa:#x}: {report:#}"
    );
    // Nothing else accused: the genuine kernel's copies are no process's. (A text
    // that runs from another of the forger's pages into the forged one, when they
    // sit side by side in physical memory, is a forged copy too, and the forger's.)
    for f in findings {
        assert_eq!(
            (f["kind"].as_str(), f["id"].as_i64(), f["name"].as_str()),
            (Some("forged_kernel"), Some(pid), Some("specula-forger")),
            "{report:#}"
        );
    }
    // The views come from the real kernel: the forger, hidden in the copy, is listed.
    let ps = api_json(&inspector, &["ps"]);
    assert!(ps.as_array().unwrap().iter().any(|p| p["pid"].as_i64() == Some(pid)), "{ps:#}");
}

#[test]
fn a_kernel_forged_in_a_processs_pages_is_named_on_linux_6_1() {
    a_forged_kernel_is_named_with_its_forger(LinuxGuestConfig::default());
}

#[test]
fn a_kernel_forged_in_a_processs_pages_is_named_on_linux_6_12() {
    a_forged_kernel_is_named_with_its_forger(LinuxGuestConfig { image: DEBIAN_13, ..Default::default() });
}
