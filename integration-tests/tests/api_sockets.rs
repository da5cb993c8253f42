//! The source `vmm`'s API socket end to end: it is private from the start, and
//! it serves only the uids of the mirror allow list (`--mirror-allow-uid`, by
//! default the vmm's own uid), checked on each connection with SO_PEERCRED.
//! Clients of another uid are real processes (`inspector`'s client mode) started
//! as that uid, so those tests need root. Its `memory` command tells guest RAM
//! ranges only, never where the vmm mapped them.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use integration_tests::bench::{mappings, RAM_MEMFD};
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

#[test]
fn the_memory_command_tells_guest_ranges_but_no_host_addresses() {
    let dir = TempDir::new("api-memory");
    let source = start(&dir, &[]);
    let reply = unix_request(&source.api, "memory");
    let chunks = reply.strip_prefix("ok ").unwrap_or_else(|| panic!("{reply}"));
    let mut total = 0;
    for chunk in chunks.split_whitespace() {
        let fields: Vec<&str> = chunk.split(':').collect();
        assert_eq!(fields.len(), 2, "gpa:len only: {chunk}");
        total += u64::from_str_radix(fields[1].trim_start_matches("0x"), 16).unwrap();
    }
    assert_eq!(total, 256 << 20, "the chunks add up to the guest RAM: {reply}");
    let ram = mappings(&source.vm.child.id().to_string());
    let ram: Vec<_> = ram.iter().filter(|m| m.path.starts_with(RAM_MEMFD)).collect();
    assert!(!ram.is_empty(), "the vmm maps its RAM memfds");
    for m in ram {
        assert!(!reply.contains(&format!("{:#x}", m.start)), "{reply} tells where RAM is mapped ({:#x})", m.start);
    }
}
