//! Volatility 3 (the real one, from PyPI, pinned by scripts/python-tools.sh) on a
//! live Linux guest under QEMU, through Specula's `specula://` layer
//! (clients/python/volatility) and a symbol table `specula isf` builds from the
//! guest's own BTF and kallsyms: no dwarf2json, no debug package, no symbol file
//! on the host. `linux.pslist` gives the guest's own process list (compared both ways
//! with the guest's `ps`, live and on dumps), `linux.lsmod` its /proc/modules,
//! `linux.check_syscall` its system call table, every entry the handler address in the
//! guest's RAM and a name the guest's /proc/kallsyms gives it.
//!
//! Needs qemu-system-x86_64, target/guest-images/linux/ and target/python-tools
//! (scripts/setup.sh makes all three).

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use integration_tests::linux_guest::{assert_processes_agree, GuestInspector, LinuxGuest, ViewProcess};
use integration_tests::{binary, python_tool, run_with_timeout, volatility, TempDir};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(300);
/// Volatility's x86-64 layers give virtual addresses in 48 bits (no sign extension).
const VOL_ADDRESS_MASK: u64 = (1 << 48) - 1;

/// QEMU serves one QMP client at a time: the tests attach to the shared guest in turn.
static ONE_INSPECTOR: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `vol -r json ... PLUGIN` against the inspector's API socket; its rows.
fn vol(inspector: &GuestInspector, cache: &Path, plugin: &str) -> Vec<Value> {
    vol_on(&format!("specula://{}", inspector.api.display()), cache, plugin)
}

/// `vol -r json ... PLUGIN` on `location` (a `specula://` URL or a file); its rows.
fn vol_on(location: &str, cache: &Path, plugin: &str) -> Vec<Value> {
    let out = run_with_timeout(volatility(location, cache).arg(plugin), LIMIT);
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
    let _one = ONE_INSPECTOR.lock().unwrap_or_else(|p| p.into_inner());
    let guest = LinuxGuest::shared();
    let truth = guest.ground_truth();
    let inspector = GuestInspector::attach(guest);
    let cache = TempDir::new("volatility-cache");

    // linux.pslist, between two of the guest's own `ps`: the same processes both ways.
    let before = guest.ps();
    let pslist = vol(&inspector, &cache.0, "linux.pslist");
    let after = guest.ps();
    let isf = std::fs::read_dir(cache.join("specula/volatility/linux")).unwrap().count();
    assert_eq!(isf, 1, "specula isf wrote one symbol table into the cache");
    assert_processes_agree(&before, &pslist_view(&pslist), &after, "linux.pslist on the live guest");
    // And the boot-time ground truth's user processes (kernel workers may have come and gone).
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

    // Every 64-bit entry is the guest's: the table where its /proc/kallsyms puts
    // sys_call_table, each handler address the one in the guest's RAM there (read by the
    // test from QEMU's memfd, at the physical address /proc/iomem gives), and each
    // handler's symbol a name /proc/kallsyms gives that address.
    let syscalls = vol(&inspector, &cache.0, "linux.check_syscall");
    let table: Vec<&Value> = syscalls.iter().filter(|r| r["Table Name"] == "64bit").collect();
    assert!(table.len() > 300, "every table entry: {syscalls:#?}");
    assert_eq!(table[0]["Handler Symbol"], "__x64_sys_read", "{:#?}", table[0]);
    let table_va = guest.kallsyms_address("sys_call_table");
    let mut entries = vec![0u8; table.len() * 8];
    let ram = std::fs::File::open(&guest.ram_memfds()[0]).unwrap();
    std::os::unix::fs::FileExt::read_exact_at(&ram, &mut entries, guest.kernel_image_pa(table_va)).unwrap();
    let entry = |i: usize| u64::from_le_bytes(entries[i * 8..i * 8 + 8].try_into().unwrap());
    let handlers: BTreeSet<u64> = (0..table.len()).map(entry).collect();
    let names = guest.kallsyms_names(&handlers);
    for (i, row) in table.iter().enumerate() {
        assert_eq!(row["Index"].as_u64(), Some(i as u64), "{row}");
        // Volatility gives handler addresses in its layer's 48 bits (the sign extension cut);
        // its "Table Address" is the symbol table's value, before the KASLR shift.
        let handler = entry(i) & VOL_ADDRESS_MASK;
        assert_eq!(row["Handler Address"].as_u64(), Some(handler), "entry {i} in the guest's RAM: {row}");
        let symbol = row["Handler Symbol"].as_str().unwrap_or("");
        // Aliases share an address (__x64_sys_rt_sigreturn is __do_sys_rt_sigreturn): any
        // name of the address will do, another symbol's will not.
        let known = names.get(&entry(i)).cloned().unwrap_or_default();
        assert!(known.iter().any(|n| n == symbol), "entry {i}: {symbol:?}, /proc/kallsyms says {known:?}: {row}");
    }
}

/// linux.pslist's rows as a process view (no uids: not every Volatility version has them).
fn pslist_view(rows: &[Value]) -> Vec<ViewProcess> {
    rows.iter()
        .map(|r| ViewProcess {
            pid: r["PID"].as_u64().unwrap_or_else(|| panic!("{r}")) as u32,
            ppid: r["PPID"].as_u64().unwrap_or_else(|| panic!("{r}")) as u32,
            uid: None,
            comm: r["COMM"].as_str().unwrap_or_else(|| panic!("{r}")).to_string(),
        })
        .collect()
}

/// `specula dump` (the guest paused for the copy) writes an ELF core (and a LiME file)
/// that the same Volatility reads offline, with the same processes, and that drgn opens, finding
/// `init_task` and `jiffies` through its kallsyms support (VMCOREINFO names the
/// tables) and reading `linux_banner` through the kernel's page tables.
#[test]
fn a_specula_dump_opens_in_volatility_and_drgn() {
    let _one = ONE_INSPECTOR.lock().unwrap_or_else(|p| p.into_inner());
    let guest = LinuxGuest::shared();
    let inspector = GuestInspector::attach(guest);
    let cache = TempDir::new("volatility-dump");
    let core = cache.join("guest.core");
    // One run on the live guest puts the symbol table `specula isf` builds into the cache
    // the dumps are then read with.
    vol(&inspector, &cache.0, "linux.pslist");
    // The guest's own `ps` before and after the dump: what linux.pslist must find in it.
    let before = guest.ps();
    let out = run_with_timeout(
        Command::new(binary("specula"))
            .args(["--socket", inspector.api.to_str().unwrap(), "--json", "dump"])
            .arg(&core),
        LIMIT,
    );
    assert!(out.status.success(), "specula dump: {}", String::from_utf8_lossy(&out.stderr));
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["consistency"], "paused", "QEMU pauses for the copy: {summary}");
    let ram = std::fs::metadata(&core).unwrap().len();
    assert!(ram > summary["bytes"].as_u64().unwrap() && summary["bytes"].as_u64().unwrap() >= 500 << 20, "{summary}");

    let after = guest.ps();

    // Volatility on the dump lists the guest's own processes, both ways (the guest's `ps`
    // just before and just after the copy), the markers and the console's shell among them.
    let dumped = pslist_view(&vol_on(core.to_str().unwrap(), &cache.0, "linux.pslist"));
    assert_processes_agree(&before, &dumped, &after, "linux.pslist on the ELF core");
    let user: Vec<&ViewProcess> = dumped.iter().filter(|p| p.comm.starts_with("specula-")).collect();
    assert_eq!(user.len(), 2, "both markers: {dumped:?}");

    // The same memory as LiME: one 32-byte header per range, each range's bytes after it,
    // and Volatility's LiME layer gives the same list.
    let lime = cache.join("guest.lime");
    let out = run_with_timeout(
        Command::new(binary("specula"))
            .args(["--socket", inspector.api.to_str().unwrap(), "--json", "dump", "--format", "lime"])
            .arg(&lime),
        LIMIT,
    );
    assert!(out.status.success(), "specula dump --format lime: {}", String::from_utf8_lossy(&out.stderr));
    let bytes = std::fs::read(&lime).unwrap();
    let (mut at, mut ranges) = (0usize, 0u64);
    while at < bytes.len() {
        let word = |o: usize| u64::from_le_bytes(bytes[at + o..at + o + 8].try_into().unwrap());
        assert_eq!(&bytes[at..at + 8], &[0x45, 0x4d, 0x69, 0x4c, 1, 0, 0, 0], "a LiME header at {at}");
        let (start, end) = (word(8), word(16));
        assert!(end >= start, "range {start:#x}..={end:#x}");
        at += 32 + (end - start + 1) as usize;
        ranges += 1;
    }
    assert_eq!((at, ranges), (bytes.len(), summary["ranges"].as_u64().unwrap()), "headers and data tile the file");
    drop(bytes);
    let lime_after = guest.ps();
    let from_lime = pslist_view(&vol_on(lime.to_str().unwrap(), &cache.0, "linux.pslist"));
    assert_processes_agree(&after, &from_lime, &lime_after, "linux.pslist on the LiME dump");

    // drgn: kallsyms from the core's VMCOREINFO, virtual reads through its page tables.
    let script = r#"
import sys, drgn
from drgn.helpers.linux.kallsyms import load_vmlinux_kallsyms
prog = drgn.Program()
prog.set_core_dump(sys.argv[1])
prog.register_symbol_finder("vmlinux_kallsyms", load_vmlinux_kallsyms(prog), enable_index=0)
banner = prog.read(prog.symbol("linux_banner").address, 64)
print(hex(prog.symbol("init_task").address), hex(prog.symbol("jiffies").address), banner.split(b"\n")[0].decode())
"#;
    let python = python_tool("python");
    let out = run_with_timeout(Command::new(&python).arg("-c").arg(script).arg(&core), LIMIT);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "drgn: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let fields: Vec<&str> = stdout.trim().splitn(3, ' ').collect();
    // The release the guest's own `uname -r` gives, not the one Specula found.
    let release = guest.console("uname -r", Duration::from_secs(30)).trim().to_string();
    assert!(!release.is_empty(), "uname -r");
    assert!(fields[2].starts_with(&format!("Linux version {release} ")), "linux_banner read by drgn: {stdout}");
    let drgn_address = |field: &str| u64::from_str_radix(field.trim_start_matches("0x"), 16).unwrap();
    assert_eq!(drgn_address(fields[0]), guest.kallsyms_address("init_task"), "init_task: {stdout}");
    assert_eq!(drgn_address(fields[1]), guest.kallsyms_address("jiffies"), "jiffies: {stdout}");
}
