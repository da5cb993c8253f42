//! YARA rules over a live Linux guest under QEMU, through the inspector's API and
//! the `specula yara` CLI (libyara 4.5, vendored): a rule for the marker one guest
//! process printed finds it in that process at the virtual address it printed, not
//! in the other marker process; the same rule over physical memory finds it too; a
//! rule for the kernel banner matches the kernel image; a rule matching nothing
//! reports nothing; rules that do not compile are a 400 naming the error.
//!
//! Needs qemu-system-x86_64 and target/guest-images/linux/ (scripts/build.sh).

use std::process::Command;
use std::time::Duration;

use integration_tests::linux_guest::{GuestInspector, LinuxGuest};
use integration_tests::{binary, run_with_timeout, TempDir};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(300);

/// `specula --json yara RULES ARGS`: (report, exit status).
fn yara(inspector: &GuestInspector, dir: &TempDir, rules: &str, args: &[&str]) -> (Value, i32) {
    let file = dir.join("rules.yar");
    std::fs::write(&file, rules).unwrap();
    let out = run_with_timeout(
        Command::new(binary("specula"))
            .args(["--socket", inspector.api.to_str().unwrap(), "--json", "yara"])
            .arg(&file)
            .args(args),
        LIMIT,
    );
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "specula yara {args:?}: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (report, out.status.code().unwrap_or(-1))
}

fn matches(report: &Value) -> &Vec<Value> {
    report["matches"].as_array().unwrap()
}

#[test]
fn a_rule_for_a_processs_marker_reports_that_process_and_the_address_it_printed() {
    let guest = LinuxGuest::shared();
    let truth = guest.ground_truth();
    let (a, b) = (truth.marker("specula-workerA").unwrap(), truth.marker("specula-workerB").unwrap());
    let inspector = GuestInspector::attach(guest);
    let dir = TempDir::new("yara");
    let rule = format!("rule marker_a : marker {{ strings: $text = \"{}\" condition: $text }}", a.text);

    let (in_a, status) = yara(&inspector, &dir, &rule, &["--pid", &a.pid.to_string()]);
    assert_eq!(status, 3, "a match makes the CLI exit 3: {in_a:#}");
    let found = matches(&in_a);
    assert!(found.iter().all(|m| m["pid"] == a.pid && m["rule"] == "marker_a" && m["string"] == "$text"), "{in_a:#}");
    assert!(
        found.iter().any(|m| m["va"].as_u64() == Some(a.vaddr) && m["length"] == a.text.len()),
        "a match at {:#x}, where the process put its marker: {in_a:#}",
        a.vaddr
    );
    assert_eq!(matches(&in_a)[0]["tags"], serde_json::json!(["marker"]));
    assert!(in_a["scanned_bytes"].as_u64().unwrap() > 4096, "{in_a:#}");

    let (in_b, status) = yara(&inspector, &dir, &rule, &["--pid", &b.pid.to_string()]);
    assert_eq!((matches(&in_b).len(), status), (0, 0), "marker A is not in process B: {in_b:#}");

    let (physical, _) = yara(&inspector, &dir, &rule, &[]);
    assert!(!matches(&physical).is_empty(), "marker A is somewhere in guest RAM: {physical:#}");
    assert!(matches(&physical).iter().all(|m| m["gpa"].is_u64() && m["pid"].is_null()), "{physical:#}");
    assert!(physical["scanned_bytes"].as_u64().unwrap() >= 500 << 20, "all of RAM: {physical:#}");

    let nothing = "rule nothing { strings: $x = \"SPECULA-NO-SUCH-BYTES-3f9a1c\" condition: $x }";
    let (none, status) = yara(&inspector, &dir, nothing, &[]);
    assert_eq!((matches(&none).len(), status), (0, 0), "{none:#}");

    let (kernel, _) =
        yara(&inspector, &dir, "rule banner { strings: $b = \"Linux version \" condition: $b }", &["--kernel"]);
    assert!(
        matches(&kernel)
            .iter()
            .any(|m| m["pid"] == 0 && m["va"].as_u64().is_some_and(|va| va >= 0xffff_ffff_8000_0000)),
        "the banner in the kernel image: {kernel:#}"
    );

    let out = run_with_timeout(
        Command::new(binary("specula")).args(["--socket", inspector.api.to_str().unwrap(), "yara"]).arg({
            std::fs::write(dir.join("bad.yar"), "rule broken { condition: $nothing }").unwrap();
            dir.join("bad.yar")
        }),
        LIMIT,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("bad_request") && stderr.contains("do not compile"), "{stderr}");
}
