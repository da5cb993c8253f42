//! Benchmarks in the nested test bed (docs/nested.md): L1s under QEMU's TCG with
//! emulated SVM and nested paging, so every figure is TCG's and only ratios measured
//! in the same L1 compare (each table comes from one L1). Writes the `nested` section of BENCHMARKS.md:
//! - mirror attach latency for 1, 16, 64 and 256 GiB sparse sources on NPT (the
//!   runner's own PVM grows with the bytes mirrored; is a TDP MMU flat?);
//! - Debian's 6.1 and 6.12 kernels under our vmm and under QEMU `-M microvm` (2 vCPUs,
//!   256 MiB): to `Run /init` and to the initramfs shell.
//!
//! - the kernel mirror device: 1 GiB scans beside a memfd mapping and
//!   `process_vm_readv`, invalidation latency, attach by pid at 1 and 16 GiB, and
//!   which reader goes stale after which identity change of a page;
//! - OS view refresh on a live Linux source under our vmm: inspectors on the same
//!   source, one walking every view again, one serving kept views while the dirty-page
//!   feed says what they read is unchanged.
//!
//! `cargo bench -p integration-tests --bench nested` (after scripts/build.sh).

use std::time::Duration;

use integration_tests::bench::{figures_of, summarize, write_section};
use integration_tests::nested::{NestedL1, L1_EXTRA_MODULES, L1_MODULES};

const RUNS: usize = 5;
const SIZES_GIB: [u64; 4] = [1, 16, 64, 256];

/// Runs the script `script(l1)` makes in a fresh L1 (with `nodes` NUMA nodes) and
/// returns its figures; once more in another fresh L1 if the first L1 failed under
/// it (TCG's nested SVM has hung and crashed L1s: docs/nested.md), saying so. A
/// script that fails twice fails the benchmark.
fn run(name: &str, nodes: u32, script: impl Fn(&NestedL1) -> String) -> Vec<(String, f64)> {
    let mut why = String::new();
    for attempt in 1..=2 {
        let l1 = NestedL1::boot_numa(&[], nodes);
        match l1.try_run(&script(&l1), Duration::from_secs(600)) {
            Ok(out) if out.status == 0 => {
                if attempt > 1 {
                    eprintln!("# {name}: passed on the second L1");
                }
                return figures_of(&out.output);
            }
            Ok(out) => why = format!("status {}:\n{}", out.status, out.output),
            Err(e) => why = e,
        }
        let tail: Vec<&str> = why.lines().rev().take(12).collect();
        eprintln!("# {name}: attempt {attempt} failed; its last lines:");
        tail.iter().rev().for_each(|l| eprintln!("#   {l}"));
    }
    panic!("the {name} benchmark failed in two L1s:\n{why}")
}

fn values(found: &[(String, f64)], name: &str) -> Vec<Duration> {
    found.iter().filter(|(n, _)| n == name).map(|(_, v)| Duration::from_secs_f64(v / 1e3)).collect()
}

/// Each size `RUNS` times: a source vmm running `source-workload`, then an inspector
/// attaching to all of it; the inspector's own "memslots ready after" figure.
fn attach_script(l1: &NestedL1) -> String {
    let (vmm, inspector, workload) = (l1.binary("vmm"), l1.binary("inspector"), l1.guest("source-workload"));
    format!(
        "cd /tmp\n\
         for size in {sizes}; do for run in $(seq {RUNS}); do\n\
           rm -f m.sock c.sock src.out insp.out\n\
           {vmm} --kernel {workload} --memory ${{size}}G --mirror-socket m.sock > src.out 2>&1 &\n\
           src=$!\n\
           until grep -q 'workload: ready' src.out; do kill -0 $src || {{ cat src.out; exit 1; }}; usleep 100000; done\n\
           {inspector} --source-socket m.sock --all --serial null --control-socket c.sock > insp.out 2>&1 &\n\
           insp=$!\n\
           until grep -q 'agent ready' insp.out; do kill -0 $insp || {{ cat insp.out; exit 1; }}; usleep 100000; done\n\
           echo \"attach_${{size}}=$(sed -n 's/.*memslots ready after \\([0-9.]*\\) ms.*/\\1/p' insp.out)\"\n\
           kill $insp $src; wait $insp $src 2>/dev/null\n\
         done; done\n",
        sizes = SIZES_GIB.map(|s| s.to_string()).join(" ")
    )
}

/// The VMMs the boot table compares, as (figure key, label).
const BOOTERS: [(&str, &str); 2] = [("vmm", "our vmm"), ("microvm", "QEMU `-M microvm`")];

/// One boot of `dir`'s kernel under VMM `key` in L1: L1 uptime from the VMM's start to
/// `Run /init` and to the shell's first line (polled every 50 ms), as `init_KEY_DIR=`
/// and `shell_KEY_DIR=` lines, or `failed_KEY_DIR=1`. QEMU is the host's own, carried
/// into L1 (`-accel kvm -M microvm`, same kernel, initramfs, vCPUs, RAM).
fn boot_script(l1: &NestedL1, dir: &str, key: &str) -> String {
    let (kernel, initramfs) = (l1.linux_image(dir, "vmlinuz"), l1.linux_image(dir, "initramfs.cpio.gz"));
    let command = match key {
        "vmm" => format!(
            "{} --kernel {kernel} --initramfs {initramfs} --memory 256M --cpus 2 --cmdline 'console=ttyS0 panic=-1'",
            l1.binary("vmm")
        ),
        _ => format!(
            "{} -accel kvm -M microvm -m 256M -smp 2 -nodefaults -no-user-config -display none \
             -kernel {kernel} -initrd {initramfs} -append 'console=ttyS0 panic=-1' -serial stdio",
            l1.qemu()
        ),
    };
    format!(
        "cd /tmp\nnow() {{ awk '{{ print $1 * 1000 }}' /proc/uptime; }}\n\
         rm -f in out; mkfifo in; exec 3<>in\n\
         t0=$(now)\n\
         {command} < in > out 2>&1 &\n\
         pid=$!; init=; failed=\n\
         until grep -q 'specula-initramfs: reached userspace' out; do\n\
           [ -z \"$init\" ] && grep -q 'Run /init' out && init=$(now)\n\
           kill -0 $pid || {{ failed=1; break; }}; usleep 50000\n\
         done\n\
         if [ -n \"$failed\" ]; then\n\
           echo \"failed_{key}_{dir}=1\"; tail -3 out | sed 's/^/# {key}: /'\n\
         else\n\
           shell=$(now); [ -n \"$init\" ] || init=$shell\n\
           echo \"init_{key}_{dir}=$(awk \"BEGIN {{ print $init - $t0 }}\")\"\n\
           echo \"shell_{key}_{dir}=$(awk \"BEGIN {{ print $shell - $t0 }}\")\"\n\
         fi\n\
         kill -9 $pid 2>/dev/null; wait $pid; exec 3>&-\n"
    )
}

/// Every boot of the table, each in a fresh L1 (an L1 whose CPU stayed in an L2 never
/// answers again: docs/nested.md), VMMs alternating; a boot whose L1 hung counts as
/// failed (`hung_KEY_DIR=1`).
fn boots() -> Vec<(String, f64)> {
    let mut found = Vec::new();
    for _ in 0..RUNS {
        for dir in ["linux", "linux-trixie"] {
            for (key, _) in BOOTERS {
                let l1 = NestedL1::boot(&[]);
                match l1.try_run(&boot_script(&l1, dir, key), Duration::from_secs(120)) {
                    Ok(out) if out.status == 0 => found.extend(figures_of(&out.output)),
                    Ok(out) => panic!("the boot script failed in L1:\n{}", out.output),
                    Err(why) => {
                        eprintln!("# {key} {dir}: the L1 hung ({})", why.lines().next().unwrap_or(""));
                        found.push((format!("hung_{key}_{dir}"), 1.0));
                    }
                }
            }
        }
    }
    found
}

/// The views a refresh loop asks for, by control request.
const VIEWS: [&str; 4] = ["kernel", "ps", "lsmod", "checks"];
/// Requests per view and inspector, `VIEW_POLL_MS` apart (a tool refreshing its views).
const VIEW_REQUESTS: usize = 20;
const VIEW_POLL_MS: u64 = 100;

/// How the inspectors of the view benchmark keep views (`--view-cache`).
const VIEW_MODES: [&str; 3] = ["off", "auto", "always"];

/// Debian 12's Linux as a source under our vmm (the introspection initramfs: its worker
/// processes run), with one inspector per `--view-cache` mode attached. Each view is
/// asked once to warm up, then `VIEW_REQUESTS` times of each inspector in turn; the
/// inspectors' own counters and serving times (the `views` request) before and after
/// give the figures.
fn views_script(l1: &NestedL1, modes: &[&str]) -> String {
    let (vmm, inspector) = (l1.binary("vmm"), l1.binary("inspector"));
    let (kernel, initramfs) = (l1.linux_image("linux", "vmlinuz"), l1.linux_image("linux", "introspect.cpio.gz"));
    let modes = modes.join(" ");
    format!(
        "cd /tmp\n\
         rm -f in out m.sock *.sock; mkfifo in; exec 3<>in\n\
         {vmm} --kernel {kernel} --initramfs {initramfs} --memory 512M --cpus 2 --mirror-socket m.sock \
           --cmdline 'console=ttyS0 quiet' < in > out 2>&1 &\n\
         vmm=$!\n\
         until grep -q '=== specula ground truth end ===' out; do kill -0 $vmm || {{ tail -5 out | sed 's/^/# /'; exit 1; }}; usleep 200000; done\n\
         for mode in {modes}; do\n\
           {inspector} --source-socket m.sock --all --serial null --control-socket $mode.sock --view-cache $mode > $mode.log 2>&1 &\n\
           eval pid_$mode=$!\n\
         done\n\
         for mode in {modes}; do\n\
           until grep -q 'agent ready' $mode.log; do\n\
             kill -0 $(eval echo \\$pid_$mode) || {{ sed 's/^/# /' $mode.log; exit 1; }}; usleep 200000\n\
           done\n\
         done\n\
         failed() {{ echo \"# $view through the $mode inspector failed; its log ends:\"; tail -15 $mode.log | sed 's/^/#   /'; \
           dmesg | tail -5 | sed 's/^/#   /'; exit 1; }}\n\
         for view in {views}; do for mode in {modes}; do\n\
           {inspector} $view --control-socket $mode.sock > /dev/null || failed\n\
           eval \"$({inspector} views --control-socket $mode.sock)\"\n\
           h0=$hits r0=$revalidated w0=$walks hu0=$hit_us ru0=$revalidated_us wu0=$walk_us s0=$syncs su0=$sync_us\n\
           for i in $(seq {VIEW_REQUESTS}); do\n\
             {inspector} $view --control-socket $mode.sock > /dev/null || failed; usleep {poll_us}\n\
           done\n\
           eval \"$({inspector} views --control-socket $mode.sock)\"\n\
           echo \"${{mode}}_${{view}}_hits=$((hits - h0))\"; echo \"${{mode}}_${{view}}_revalidated=$((revalidated - r0))\"\n\
           echo \"${{mode}}_${{view}}_walks=$((walks - w0))\"; echo \"${{mode}}_${{view}}_syncs=$((syncs - s0))\"\n\
           echo \"${{mode}}_${{view}}_sync_us=$((sync_us - su0))\"\n\
           echo \"${{mode}}_${{view}}_us=$((hit_us - hu0 + revalidated_us - ru0 + walk_us - wu0))\"\n\
         done; done\n\
         echo 'poweroff -f' >&3; wait $vmm\n",
        views = VIEWS.join(" "),
        poll_us = VIEW_POLL_MS * 1000,
    )
}

/// The kernel mirror device in a 2-node L1 with swap on zram: `kmirror-bench` (scans,
/// invalidation latency, the staleness table), then attach by pid beside attach over
/// the mirror socket, for 1 and 16 GiB sources, `RUNS` times each.
fn kmirror_script(l1: &NestedL1) -> String {
    let (vmm, inspector, workload) = (l1.binary("vmm"), l1.binary("inspector"), l1.guest("source-workload"));
    let (bench, kmod) = (l1.binary("kmirror-bench"), l1.linux_image("linux", "kmod"));
    format!(
        "cd /tmp\n\
         echo never > /sys/kernel/mm/transparent_hugepage/enabled\n\
         for m in {modules}; do insmod {L1_MODULES}/$m || exit 1; done\n\
         echo 256M > /sys/block/zram0/disksize && mkswap /dev/zram0 > /dev/null && swapon /dev/zram0 || exit 1\n\
         insmod {kmod}/specula_mirror.ko && insmod {kmod}/specula_pin_baseline.ko || exit 1\n\
         {bench} {SCAN_MIB} || exit 1\n\
         attach() {{\n\
           rm -f m.sock c.sock src.out insp.out\n\
           {vmm} --kernel {workload} --memory $1G $2 > src.out 2>&1 &\n\
           src=$!\n\
           until grep -q 'workload: ready' src.out; do kill -0 $src || {{ sed 's/^/# /' src.out; exit 1; }}; usleep 100000; done\n\
           if [ \"$3\" = pid ]; then from=\"--pid $src\"; else from='--source-socket m.sock'; fi\n\
           {inspector} $from --all --serial null --control-socket c.sock > insp.out 2>&1 &\n\
           insp=$!\n\
           until grep -q 'agent ready' insp.out; do kill -0 $insp || {{ sed 's/^/# /' insp.out; exit 1; }}; usleep 100000; done\n\
           echo \"attach$3_$1=$(sed -n 's/.*memslots ready after \\([0-9.]*\\) ms.*/\\1/p' insp.out)\"\n\
           kill $insp $src; wait $insp $src 2>/dev/null\n\
         }}\n\
         for size in 1 16; do for run in $(seq {RUNS}); do\n\
           attach $size '--memory-backend anon' pid\n\
           attach $size '--mirror-socket m.sock' socket\n\
         done; done\n",
        modules = L1_EXTRA_MODULES.join(" "),
    )
}

/// MiB the kernel mirror benchmark scans.
const SCAN_MIB: usize = 1024;

/// The view refresh figures, one L1 per mode: three inspectors and a Linux source in
/// one L1 made TCG's nested SVM fail that L1 (a corrupted L1 stack, agents shut down)
/// more often than not, one inspector and its source never did.
fn views() -> Vec<(String, f64)> {
    VIEW_MODES
        .iter()
        .flat_map(|mode| run(&format!("view refresh, {mode}"), 1, |l1| views_script(l1, &[mode])))
        .collect()
}

/// The figure `name` of a script's output.
fn figure(found: &[(String, f64)], name: &str) -> f64 {
    found.iter().find(|(n, _)| n == name).map(|(_, v)| *v).unwrap_or_else(|| panic!("no {name} in {found:?}"))
}

/// The kernel mirror device's tables.
fn kmirror_section(found: &[(String, f64)]) -> String {
    let mut body = format!(
        "\n### Kernel mirror device (`specula_mirror.ko`, any KVM VMM by pid)\n\n\
         One L1 with two NUMA nodes and swap on zram; the device, the memflow-style pinning baseline \
         (`specula_pin_baseline.ko`: pages pinned at map time and `remap_pfn_range`d) and the others read the \
         memory of a forked source process (`integration-tests/src/bin/kmirror-bench.rs`).\n\n\
         **Scanning {SCAN_MIB} MiB** for a needle that is in no page (`memchr::memmem`). `first`: every page \
         reached through that path for the first time (the device and the memfd mapping fault each page in; \
         `process_vm_readv` copies the same either way); `warm`: again.\n\n\
         | path | first (ms) | warm (ms) | warm (GiB/s) |\n|---|---|---|---|\n"
    );
    for (method, label) in [
        ("mirror", "kernel mirror device (anonymous RAM, zero-copy)"),
        ("memfd", "shared mapping of a memfd (Specula's own vmm)"),
        ("readv", "`process_vm_readv` into a 4 MiB buffer (a copy)"),
    ] {
        let (first, warm) =
            (figure(found, &format!("scan_{method}_first")), figure(found, &format!("scan_{method}_warm")));
        let rate = SCAN_MIB as f64 / 1024.0 / (warm / 1e3);
        body.push_str(&format!("| {label} | {first:.0} | {warm:.0} | {rate:.2} |\n"));
    }
    let mut latency: Vec<f64> = found.iter().filter(|(n, _)| n == "latency_us").map(|(_, v)| *v).collect();
    latency.sort_by(f64::total_cmp);
    let at = |q: f64| latency[((latency.len() - 1) as f64 * q).round() as usize];
    body.push_str(&format!(
        "\n**Invalidation to new contents visible** ({} samples): from the source's `MADV_DONTNEED` of a page \
         (then a write into the fresh page) to the new byte read through the device by a reader spinning on it: \
         median {:.0} us, p99 {:.0} us, max {:.0} us. The pinning baseline never shows it (below).\n",
        latency.len(),
        at(0.5),
        at(0.99),
        at(1.0)
    ));
    body.push_str(
        "\n**Attach by pid** (`inspector --pid`, the source `vmm --memory-backend anon`) beside attach over the \
         mirror socket (memfd RAM), connect to memslots ready as the inspector reports it, median of the runs:\n\n\
         | source RAM | by pid, kernel mirror (ms) | mirror socket (ms) | runs |\n|---|---|---|---|\n",
    );
    for size in [1, 16] {
        let (pid, socket) =
            (values(found, &format!("attachpid_{size}")), values(found, &format!("attachsocket_{size}")));
        let ms = |d: &[Duration]| summarize(d).median.as_secs_f64() * 1e3;
        body.push_str(&format!("| {size} GiB | {:.1} | {:.1} | {} |\n", ms(&pid), ms(&socket), pid.len()));
    }
    body.push_str(
        "\n**Staleness**: after each identity change of a source page and a write to it, does the reader see \
         the write? `fresh`: yes; `STALE`: it reads the page the source let go; `blocked`: the event could not \
         happen while that reader was attached (its pin held the page). The baseline's swap row is fresh \
         for a reason of its own: a pinned page cannot be freed, so it stays in the swap cache and the \
         source's next fault maps the same page back.\n\n\
         | event | kernel mirror | pinning baseline | `process_vm_readv` |\n|---|---|---|---|\n",
    );
    for (event, label) in [
        ("inplace", "write in place"),
        ("dontneed", "`MADV_DONTNEED`"),
        ("remap", "munmap + new mapping at the same address"),
        ("ksm", "KSM merge"),
        ("migrate", "migration to the other NUMA node (`move_pages`)"),
        ("collapse", "THP collapse (`MADV_COLLAPSE`)"),
        ("swap", "swap-out to zram (`MADV_PAGEOUT`)"),
    ] {
        let cell = |method: &str| match figure(found, &format!("stale_{event}_{method}")) as u8 {
            0 => "fresh",
            1 => "STALE",
            _ => "blocked",
        };
        body.push_str(&format!("| {label} | {} | {} | {} |\n", cell("mirror"), cell("pinned"), cell("readv")));
    }
    body
}

fn main() {
    // A quick look at the kernel mirror's tables alone, while working on them.
    match std::env::var("SPECULA_NESTED_BENCH_ONLY").as_deref() {
        Ok("kmirror") => {
            print!("{}", kmirror_section(&run("kernel mirror", 2, kmirror_script)));
            println!("(SPECULA_NESTED_BENCH_ONLY: one section only, BENCHMARKS.md not written)");
            return;
        }
        Ok("views") => {
            println!("{:?}", views());
            println!("(SPECULA_NESTED_BENCH_ONLY: one section only, BENCHMARKS.md not written)");
            return;
        }
        _ => {}
    }
    // One L1 per script: an L1 that has run KVM guests stops reading its command port
    // within a few commands (docs/nested.md); each script is one command.
    let attach = run("attach", 1, attach_script);
    let boots = boots();
    let views = views();
    let kmirror = run("kernel mirror", 2, kmirror_script);

    let mut body = String::from(
        "## Nested: on NPT under QEMU's TCG (nested SVM), `cargo bench --bench nested`\n\n\
         Every figure here is TCG's: each table from one L1 (Debian 6.1 cloud, 2 vCPUs, 3 GiB) under QEMU's emulated SVM with \
         nested paging, on this runner's two cores. Compare only ratios within this section.\n\n\
         ### Attach latency on NPT (`--all`, sparse sources)\n\n\
         Connect to memslots ready, self-reported by the inspector, as in \"Attach latency\" above \
         (which is PVM, on the runner itself, where it grows with the bytes mirrored). 1 GiB is 512 grants of \
         2 MiB; from 16 GiB on a source has 1024 (larger) chunks, so a flat figure from there says the cost \
         follows the grants, not the bytes.\n\n\
         | source RAM | connect to memslots ready, median (ms) | runs |\n|---|---|---|\n",
    );
    let mut first = None;
    for size in SIZES_GIB {
        let s = summarize(&values(&attach, &format!("attach_{size}")));
        let ms = s.median.as_secs_f64() * 1e3;
        let base = *first.get_or_insert(ms);
        body.push_str(&format!("| {size} GiB | {ms:.1} ({:.2}x the 1 GiB figure) | {} |\n", ms / base, s.n));
    }
    body.push_str(&format!(
        "\n### Linux to its shell on NPT: our vmm beside QEMU `-M microvm` (2 vCPUs, 256 MiB)\n\n\
         From the VMM's start to the kernel's `Run /init` line and to the initramfs shell's first line, in \
         L1's clock (polled every 50 ms), the two VMMs alternating run by run, each boot in a fresh L1 (an L1 \
         whose CPU stays inside an L2 never answers again, docs/nested.md; such a run is counted, not dropped). Our vmm \
         decompresses the bzImage's payload itself and enters the kernel directly; QEMU (the runner's own \
         {qemu_version}, carried into L1) boots the same bzImage through qboot with `-kernel`, its process start under \
         TCG included, as ours is.\n\n\
         | kernel | VMM | to `Run /init`, median (s) | to the shell, median (s) | runs that reached the shell | runs that failed | runs whose L1 hung |\n\
         |---|---|---|---|---|---|---|\n",
        qemu_version = integration_tests::linux_guest::qemu_version(),
    ));
    for (dir, name) in [("linux", "Debian 12, 6.1"), ("linux-trixie", "Debian 13, 6.12")] {
        for (key, label) in BOOTERS {
            let failed = boots.iter().filter(|(n, _)| n == &format!("failed_{key}_{dir}")).count();
            let hung = boots.iter().filter(|(n, _)| n == &format!("hung_{key}_{dir}")).count();
            let init = values(&boots, &format!("init_{key}_{dir}"));
            let shell = values(&boots, &format!("shell_{key}_{dir}"));
            let median = |d: &[Duration]| {
                if d.is_empty() {
                    "-".to_string()
                } else {
                    format!("{:.2}", summarize(d).median.as_secs_f64())
                }
            };
            body.push_str(&format!(
                "| {name} | {label} | {} | {} | {} | {failed} | {hung} |\n",
                median(&init),
                median(&shell),
                shell.len()
            ));
        }
    }
    body.push_str(
        "\nA run that did not reach the shell is counted as failed, not dropped: it is a fault of the hardware \
         path (the last lines it printed are echoed by the benchmark).\n",
    );
    body.push_str(&format!(
        "\n### OS view refresh on a live Linux source under our vmm\n\n\
         Debian 12 (6.1, 2 vCPUs) with the introspection initramfs, its worker processes running, and an \
         inspector attached to it, one L1 per `--view-cache` mode (three inspectors on one source in one L1 \
         made TCG's nested SVM fail the L1: docs/nested.md): `off` walks every view again (what every \
         request cost before); `always` keeps every view and serves it again while the dirty-page feed and a \
         line-by-line re-hash say nothing its walk read changed; `auto` (the default) keeps only the kinds of \
         view whose walk costs more than twice the feed's barrier. Each view asked {VIEW_REQUESTS} times of each, \
         {VIEW_POLL_MS} ms apart, after one warm-up request; times are the inspectors' own (request in to reply \
         out, the dirty-log barrier included), not the CLI's start. A `checks` request is one view per check.\n\n\
         | view | `off`: mean (ms) | `auto`: mean (ms) | `always`: mean (ms) | served as is / re-hashed / walked, `auto` | same, `always` | barrier mean (ms) |\n\
         |---|---|---|---|---|---|---|\n"
    ));
    for view in VIEWS {
        let mean = |mode: &str| figure(&views, &format!("{mode}_{view}_us")) / VIEW_REQUESTS as f64 / 1e3;
        let count = |mode: &str, what: &str| figure(&views, &format!("{mode}_{view}_{what}"));
        let served =
            |mode: &str| format!("{} / {} / {}", count(mode, "hits"), count(mode, "revalidated"), count(mode, "walks"));
        let barrier = count("always", "sync_us") / count("always", "syncs").max(1.0) / 1e3;
        let (off, auto, always) = (mean("off"), mean("auto"), mean("always"));
        body.push_str(&format!(
            "| {view} | {off:.2} | {auto:.2} ({:.2}x) | {always:.2} ({:.2}x) | {} | {} | {barrier:.2} |\n",
            auto / off,
            always / off,
            served("auto"),
            served("always"),
        ));
        assert_eq!(figure(&views, &format!("off_{view}_syncs")), 0.0, "the baseline took no barrier");
    }
    body.push_str(
        "\nA view whose walk read a line the guest changed (a running task's state in `ps`, say) is walked \
         again: the kept columns count those walks in their means.\n",
    );
    body.push_str(&kmirror_section(&kmirror));
    print!("{body}");
    let path = write_section("nested", &body).expect("write BENCHMARKS.md");
    println!("wrote {}", path.display());
}
