//! The source `vmm`'s API socket end to end: it is private from the start, and
//! it serves only the uids of the mirror allow list (`--mirror-allow-uid`, by
//! default the vmm's own uid), checked on each connection with SO_PEERCRED.
//! Clients of another uid are real processes (`inspector`'s client mode) started
//! as that uid, so the tests need root.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use integration_tests::{line_request_as, require_root, unix_request, SourceVm, TempDir};

const LIMIT: Duration = Duration::from_secs(60);
/// An unprivileged uid (nobody).
const OTHER_UID: u32 = 65534;

fn start(dir: &TempDir, extra: &[&str]) -> SourceVm {
    let mut args = vec!["--memory", "256M", "--cpus", "1"];
    args.extend_from_slice(extra);
    let mut source = SourceVm::spawn(dir, &args);
    source.vm.expect_line("workload: ready", LIMIT);
    source
}

/// Lets any uid connect to the socket file, so that only the vmm's own check refuses.
fn open_to_all(path: &Path) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).unwrap();
}

#[test]
fn by_default_the_api_serves_only_the_vmms_own_uid() {
    require_root();
    let dir = TempDir::new("api-default");
    let source = start(&dir, &[]);
    let mode = std::fs::metadata(&source.api).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "API socket file mode");
    assert!(unix_request(&source.api, "vcpus").starts_with("ok 0:rip="));
    open_to_all(&source.api);
    let out = line_request_as(OTHER_UID, &source.api, &["vcpus"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("uid {OTHER_UID} is not allowed")), "{stderr}");
    assert!(unix_request(&source.api, "vcpus").starts_with("ok 0:rip="), "the refusal did not stop the server");
}

#[test]
fn the_api_serves_the_uids_of_the_mirror_allow_list() {
    require_root();
    let dir = TempDir::new("api-allow");
    let source = start(&dir, &["--mirror-allow-uid", &OTHER_UID.to_string()]);
    assert_eq!(unix_request(&source.api, "vcpus"), "error uid 0 is not allowed", "root is not on the list");
    open_to_all(&source.api);
    let out = line_request_as(OTHER_UID, &source.api, &["vcpus"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("0:rip="));
}
