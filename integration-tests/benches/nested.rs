//! Benchmarks in the nested test bed (docs/nested.md): L1s under QEMU's TCG with
//! emulated SVM and nested paging, so every figure is TCG's and only ratios measured
//! in the same L1 compare (each table comes from one L1). Writes the `nested` section of BENCHMARKS.md:
//! - mirror attach latency for 1, 16, 64 and 256 GiB sparse sources on NPT (the
//!   runner's own PVM grows with the bytes mirrored; is a TDP MMU flat?);
//! - Debian's 6.1 and 6.12 kernels under our vmm (2 vCPUs, 256 MiB): to `Run /init`
//!   and to the initramfs shell.
//!
//! `cargo bench -p integration-tests --bench nested` (after scripts/build.sh).

use std::time::Duration;

use integration_tests::bench::{summarize, write_section};
use integration_tests::nested::NestedL1;

const RUNS: usize = 5;
const SIZES_GIB: [u64; 4] = [1, 16, 64, 256];

/// Runs `script` in L1 and returns the values of its `NAME=VALUE` output lines (and
/// echoes its `# ` lines: what a failed run printed last).
fn run(l1: &NestedL1, script: &str) -> Vec<(String, f64)> {
    let out = l1.run(script, Duration::from_secs(600));
    assert_eq!(out.status, 0, "the benchmark script failed in L1:\n{}", out.output);
    out.output.lines().filter(|l| l.starts_with("# ")).for_each(|l| eprintln!("{l}"));
    out.output
        .lines()
        .filter_map(|l| {
            let (name, value) = l.trim().split_once('=')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
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

/// Each kernel `RUNS` times: L1 uptime from the vmm's start to `Run /init` and to the
/// shell's first line (polled every 50 ms).
fn boot_script(l1: &NestedL1) -> String {
    let vmm = l1.binary("vmm");
    let mut script = String::from("cd /tmp\nnow() { awk '{ print $1 * 1000 }' /proc/uptime; }\n");
    for dir in ["linux", "linux-trixie"] {
        let (kernel, initramfs) = (l1.linux_image(dir, "vmlinuz"), l1.linux_image(dir, "initramfs.cpio.gz"));
        script.push_str(&format!(
            "for run in $(seq {RUNS}); do\n\
               rm -f in out; mkfifo in; exec 3<>in\n\
               t0=$(now)\n\
               {vmm} --kernel {kernel} --initramfs {initramfs} --memory 256M --cpus 2 --cmdline 'console=ttyS0 panic=-1' < in > out 2>&1 &\n\
               vmm=$!; init=; failed=\n\
               until grep -q 'specula-initramfs: reached userspace' out; do\n\
                 [ -z \"$init\" ] && grep -q 'Run /init' out && init=$(now)\n\
                 kill -0 $vmm || {{ failed=1; break; }}; usleep 50000\n\
               done\n\
               if [ -n \"$failed\" ]; then\n\
                 echo \"failed_{dir}=1\"; tail -3 out | sed 's/^/# /'\n\
               else\n\
                 shell=$(now); [ -n \"$init\" ] || init=$shell\n\
                 echo \"init_{dir}=$(awk \"BEGIN {{ print $init - $t0 }}\")\"\n\
                 echo \"shell_{dir}=$(awk \"BEGIN {{ print $shell - $t0 }}\")\"\n\
                 echo 'poweroff -f' >&3\n\
               fi\n\
               wait $vmm; exec 3>&-\n\
             done\n"
        ));
    }
    script
}

fn main() {
    // One L1 per script: an L1 that has run KVM guests stops reading its command port
    // within a few commands (docs/nested.md); each script is one command.
    let attach = {
        let l1 = NestedL1::boot(&[]);
        run(&l1, &attach_script(&l1))
    };
    let boots = {
        let l1 = NestedL1::boot(&[]);
        run(&l1, &boot_script(&l1))
    };

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
    body.push_str(
        "\n### Linux under our vmm on NPT (2 vCPUs, 256 MiB, payload decompressed by the vmm)\n\n\
         From the vmm's start to the kernel's `Run /init` line and to the initramfs shell's first line, in \
         L1's clock (polled every 50 ms). QEMU `-M microvm` is not beside it: bringing QEMU into L1 means \
         carrying its binary, its ~40 shared libraries and its firmware in the initramfs, which the bed does not \
         do yet.\n\n\
         | kernel | to `Run /init`, median (s) | to the shell, median (s) | runs that reached the shell | runs that failed |\n\
         |---|---|---|---|---|\n",
    );
    for (dir, name) in [("linux", "Debian 12, 6.1"), ("linux-trixie", "Debian 13, 6.12")] {
        let failed = boots.iter().filter(|(n, _)| n == &format!("failed_{dir}")).count();
        let (init, shell) = (values(&boots, &format!("init_{dir}")), values(&boots, &format!("shell_{dir}")));
        let median = |d: &[Duration]| {
            if d.is_empty() {
                "-".to_string()
            } else {
                format!("{:.2}", summarize(d).median.as_secs_f64())
            }
        };
        body.push_str(&format!("| {name} | {} | {} | {} | {failed} |\n", median(&init), median(&shell), shell.len()));
    }
    body.push_str(
        "\nA run that did not reach the shell is counted as failed, not dropped: it is a fault of the hardware \
         path (the last lines it printed are echoed by the benchmark).\n",
    );
    print!("{body}");
    let path = write_section("nested", &body).expect("write BENCHMARKS.md");
    println!("wrote {}", path.display());
}
