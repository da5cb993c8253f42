//! The Python client (clients/python) against a live inspector: a real source `vmm`
//! running the workload guest, a real inspector serving `--api-socket`, and the
//! client's own unittest suite run by the system `python3`, with the workload's
//! ground truth passed in its environment.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use guest_images::workload;
use integration_tests::{binary, run_with_timeout, spawn_api_inspector, SourceVm, TempDir};

const LIMIT: Duration = Duration::from_secs(60);

fn python_package_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../clients/python")
}

#[test]
fn the_python_clients_suite_passes_against_a_live_inspector() {
    let python = Command::new("python3").arg("--version").output();
    assert!(
        python.as_ref().is_ok_and(|o| o.status.success()),
        "python3 is missing (scripts/setup.sh installs it): {python:?}"
    );
    let dir = TempDir::new("python-client");
    let SourceVm { vm: mut source, mirror, .. } = SourceVm::spawn(&dir, &["--memory", "256M"]);
    source.expect_line("workload: ready", LIMIT);
    let api = dir.join("inspector-api.sock");
    let _inspector = spawn_api_inspector(&mirror, &api, &["--watch-interval-ms", "50"]);

    // A watch over the text, then a guest write to its second page: the suite finds it
    // as a finding and as an event in the backlog.
    let added = run_with_timeout(
        Command::new(binary("specula")).args([
            "--socket",
            api.to_str().unwrap(),
            "--json",
            "watch",
            "add",
            &format!("{:#x}", workload::TEXT_GPA),
            &format!("{:#x}", workload::TEXT_LEN),
        ]),
        LIMIT,
    );
    assert!(added.status.success(), "specula watch add: {added:?}");
    let watch: serde_json::Value = serde_json::from_slice(&added.stdout).expect("watch JSON");
    let watch_id = watch["id"].as_u64().expect("watch id");
    source.send("text-modify 4096\n");
    source.expect_line("ack text-modify", LIMIT);

    let mut text = vec![0u8; workload::TEXT_LEN];
    workload::fill_text(&mut text);
    let text_sha256 =
        String::from_utf8(guest_images::sha256::hex(&guest_images::sha256::digest(&text[..4096])).to_vec()).unwrap();
    let magic: String = workload::HEADER_MAGIC.iter().map(|b| format!("{b:02x}")).collect();
    let package = python_package_dir();
    let out = run_with_timeout(
        Command::new("python3")
            .args(["-m", "unittest", "discover", "-v", "-s", "tests", "-t", "."])
            .current_dir(&package)
            .env("PYTHONPATH", &package)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("SPECULA_API", &api)
            .env("SPECULA_HEADER_GPA", format!("{:#x}", workload::HEADER_GPA))
            .env("SPECULA_HEADER_MAGIC", magic)
            .env("SPECULA_TEXT_GPA", format!("{:#x}", workload::TEXT_GPA))
            .env("SPECULA_TEXT_LEN", format!("{:#x}", workload::TEXT_LEN))
            .env("SPECULA_TEXT_SHA256", text_sha256)
            .env("SPECULA_WATCH_ID", watch_id.to_string())
            .env("SPECULA_CHANGED_PAGE", format!("{:#x}", workload::TEXT_GPA + 4096)),
        Duration::from_secs(240),
    );
    let report = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the Python client's suite failed:\n{report}");
    let ran: usize = report
        .lines()
        .find_map(|l| l.strip_prefix("Ran ").and_then(|r| r.split_whitespace().next()).and_then(|n| n.parse().ok()))
        .expect("unittest summary");
    assert_eq!(ran, 8, "every test of the suite ran:\n{report}");
}
