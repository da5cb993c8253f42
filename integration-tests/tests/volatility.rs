//! Volatility 3 (the real one, from PyPI, pinned by scripts/python-tools.sh) on a
//! live Linux guest under QEMU, through Specula's `specula://` layer
//! (clients/python/volatility) and a symbol table `specula isf` builds from the
//! guest's own BTF and kallsyms: no dwarf2json, no debug package, no symbol file
//! on the host. `linux.pslist` gives the guest's own process list, `linux.lsmod`
//! its /proc/modules, `linux.check_syscall` its system call table with every entry
//! resolved to a handler's symbol.
//!
//! Needs qemu-system-x86_64, target/guest-images/linux/ and target/python-tools
//! (scripts/setup.sh makes all three).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use integration_tests::linux_guest::{GuestInspector, LinuxGuest};
use integration_tests::{binary, run_with_timeout, TempDir};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(300);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// `vol -r json ... PLUGIN` against the inspector's API socket; its rows.
fn vol(inspector: &GuestInspector, cache: &Path, plugin: &str) -> Vec<Value> {
    let vol = workspace().join("target/python-tools/bin/vol");
    assert!(vol.is_file(), "{} is missing: run scripts/setup.sh (scripts/python-tools.sh)", vol.display());
    let out = run_with_timeout(
        Command::new(&vol)
            .env("XDG_CACHE_HOME", cache)
            .env("SPECULA_BIN", binary("specula"))
            .args(["--offline", "-q", "-r", "json", "--cache-path"])
            .arg(cache.join("volatility3"))
            .arg("-p")
            .arg(workspace().join("clients/python/volatility"))
            .arg("-f")
            .arg(format!("specula://{}", inspector.api.display()))
            .arg(plugin),
        LIMIT,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "vol {plugin}: {}\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);
    serde_json::from_str::<Value>(&stdout)
        .unwrap_or_else(|e| panic!("vol {plugin} output is not JSON ({e}):\n{stdout}\nstderr:\n{stderr}"))
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn volatility_runs_on_the_live_guest_with_a_symbol_table_from_its_own_btf() {
    let guest = LinuxGuest::shared();
    let truth = guest.ground_truth();
    let inspector = GuestInspector::attach(guest);
    let cache = TempDir::new("volatility-cache");

    let pslist = vol(&inspector, &cache.0, "linux.pslist");
    let isf = std::fs::read_dir(cache.join("specula/volatility/linux")).unwrap().count();
    assert_eq!(isf, 1, "specula isf wrote one symbol table into the cache");
    for p in truth.processes.iter().filter(|p| p.comm != "ps" && p.comm != "cat" && !p.args.starts_with('[')) {
        let row = pslist
            .iter()
            .find(|r| r["PID"].as_u64() == Some(p.pid.into()))
            .unwrap_or_else(|| panic!("pid {} ({}) not in linux.pslist:\n{pslist:#?}", p.pid, p.comm));
        assert_eq!(row["PPID"].as_u64(), Some(p.ppid.into()), "{p:?} vs {row}");
        assert_eq!(row["COMM"].as_str(), Some(p.comm.as_str()), "{p:?} vs {row}");
    }

    let lsmod = vol(&inspector, &cache.0, "linux.lsmod");
    let mut got: Vec<(String, u64)> = lsmod
        .iter()
        .map(|r| (r["Module Name"].as_str().unwrap_or("").to_string(), r["Code Size"].as_u64().unwrap_or(0)))
        .collect();
    let mut want: Vec<(String, u64)> = truth.modules.iter().map(|m| (m.name.clone(), m.size)).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want, "linux.lsmod is /proc/modules: {lsmod:#?}");

    // Every 64-bit entry resolves to a handler through the generated table's symbols.
    let syscalls = vol(&inspector, &cache.0, "linux.check_syscall");
    let table: Vec<&Value> = syscalls.iter().filter(|r| r["Table Name"] == "64bit").collect();
    assert!(table.len() > 300, "every table entry: {syscalls:#?}");
    assert_eq!(table[0]["Handler Symbol"], "__x64_sys_read", "{:#?}", table[0]);
    for row in &table {
        let symbol = row["Handler Symbol"].as_str().unwrap_or("");
        // Aliases share an address (__x64_sys_rt_sigreturn is __do_sys_rt_sigreturn): any
        // system call handler's name will do, an unresolved entry will not.
        assert!(symbol.contains("sys_"), "entry {} resolves to {symbol:?}: {row}", row["Index"]);
    }
}
