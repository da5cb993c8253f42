//! What agentless tracing costs a guest, in the nested test bed (docs/nested.md: an L1
//! under QEMU's TCG with emulated SVM and nested paging; every figure is TCG's, so only
//! the ratios within this one L1 compare). Writes the `nested-trace` section of
//! BENCHMARKS.md.
//!
//! Debian 13's Linux (6.12, 2 vCPUs) runs under our vmm with `--mirror-allow-trace`, an
//! inspector attached. Two guest workloads, timed from L1 (the command typed on the
//! console until the guest prints that it is done):
//! - exec-heavy: `EXECS` runs of `/bin/true` (fork, exec, exit each);
//! - syscall-heavy: `dd` copying `SYSCALL_BYTES` bytes one at a time (a read and a
//!   write system call per byte),
//!
//! each with tracing off, with `exec,exit` traced (software breakpoints: TCG does not
//! arm the debug registers), with `kernel_writes` traced (the kernel's text, system
//! call tables and IDT as read-only memslots), with `msr_writes` (KVM's MSR filter)
//! and with `module_load` (a breakpoint nothing here hits) each on its own, each of
//! the last three beside `exec,exit`, with every kind at once, and off again after all
//! of them ([`MODES`]). Then the event
//! latency: from a command typed on the console to its `trace.exec` on the inspector's
//! event stream, beside the same command's own output on the console.
//!
//! The inspector runs with `--no-dirty-log`: the dirty-page feed write-protects guest RAM,
//! which made exec-heavy work about 4 times slower in the nest (30 untraced execs: a
//! median of 4.9 s with the feed, 1.2 s without, three runs each in two L1s,
//! 2026-12-06), a cost that is the feed's, not the trace's.
//!
//! `cargo bench -p integration-tests --bench trace` (after scripts/build.sh).

use std::time::Duration;

use integration_tests::bench::{figures_of, summarize, write_section};
use integration_tests::nested::NestedL1;

/// The guest kernel: Debian 13's 6.12 (its L2s met fewer of the nest's TCG failures than
/// 6.1's in the trace tests).
const KERNEL_DIR: &str = "linux-trixie";
/// Runs of each workload in each mode.
const ROUNDS: usize = 5;
/// Execs per exec-heavy run: 30, down from 100. An exec loop in a nested L2 meets the
/// nest's triple fault now and then with tracing off as well (docs/nested.md), and
/// three L1s in a row met it with 100 (2026-12-06), before any figure was complete.
const EXECS: u32 = 30;
const SYSCALL_BYTES: u32 = 20_000;
/// Latency samples.
const LATENCY_SAMPLES: usize = 10;
/// The trace modes, in the order they run: the name, the kinds `trace-start` is given
/// (`-`: nothing armed; `all`: every kind) and what the mode arms, for the table. Each
/// kind alone; each with `exec,exit`, the kind that exits on every exec, to find the
/// pair that costs more than its parts (every kind at once made the exec loop about
/// twice as slow in three runs while each alone cost nothing measurable); and off again
/// last, after every kind was armed and disarmed, so a cost that outlives `trace-stop`
/// shows.
const MODES: [(&str, &str, &str); 10] = [
    ("off", "-", "nothing armed"),
    ("exec_exit", "exec,exit", "software breakpoints on `__x64_sys_execve`/`execveat` and `do_exit`: one exit per exec and per exit, each read and reported"),
    ("kernel_writes", "kernel_writes", "the kernel's text, system call tables and IDT as read-only memslots: an exit only when something writes them, which nothing here does"),
    ("msr_writes", "msr_writes", "KVM's MSR filter on the system-call MSRs, EFER and DEBUGCTL: an exit per write to them"),
    ("module_load", "module_load", "a software breakpoint on the kernel's module loader, which nothing here loads"),
    ("exec_exit_kernel_writes", "exec,exit,kernel_writes", "`exec,exit` and `kernel_writes`"),
    ("exec_exit_msr_writes", "exec,exit,msr_writes", "`exec,exit` and `msr_writes`"),
    ("exec_exit_module_load", "exec,exit,module_load", "`exec,exit` and `module_load`"),
    ("all", "all", "every kind at once"),
    ("off_after", "-", "nothing armed, after every mode above was armed and stopped"),
];

/// Source restarts one L1 may make. An L2 that the nest's TCG shuts down (a triple
/// fault, docs/nested.md) is booted again in the same L1 and the run it was in is
/// redone, so one L1's figures stay comparable; any other end of the source, or a run
/// that does not finish within `RUN_LIMIT_S`, fails the L1's attempt.
const MAX_RESTARTS: u32 = 8;
/// Seconds one workload run or latency sample may take before the attempt fails.
const RUN_LIMIT_S: u32 = 300;

/// The L1 script: boots the source, attaches the inspector, runs the workloads in every
/// mode and the latency samples; prints `NAME=MICROSECONDS` lines, from L1's
/// `/proc/uptime` (10 ms steps: L1's busybox `date` has no `%N`), and the source
/// restarts so far as `restarts_workloads=N` and `restarts_all=N`.
fn script(l1: &NestedL1) -> String {
    let (vmm, inspector, specula) = (l1.binary("vmm"), l1.binary("inspector"), l1.binary("specula"));
    let (kernel, initramfs) = (l1.linux_image(KERNEL_DIR, "vmlinuz"), l1.linux_image(KERNEL_DIR, "introspect.cpio.gz"));
    let modes: Vec<String> = MODES.iter().map(|(name, kinds, _)| format!("{name}:{kinds}")).collect();
    format!(
        "cd /tmp\n\
         now() {{ read up rest < /proc/uptime; echo $(( ${{up%.*}}${{up#*.}} * 10000 )); }}\n\
         mount -t debugfs none /sys/kernel/debug 2>/dev/null\n\
         counter() {{ cat /sys/kernel/debug/kvm/$vmm-*/$1 2>/dev/null || echo 0; }} # one of KVM's counters for the source's VM, summed over its vCPUs\n\
         restarts=0; vmm=; insp=\n\
         start_source() {{ # boots the source (the last one has ended) and attaches the inspector; fails the script if either fails\n\
           [ -n \"$insp\" ] && {{ kill $insp 2>/dev/null; wait $insp 2>/dev/null; }}\n\
           exec 3>&-; rm -f in out m.sock c.sock api.sock; mkfifo in; exec 3<>in\n\
           {vmm} --kernel {kernel} --initramfs {initramfs} --memory 512M --cpus 2 --mirror-socket m.sock \
             --mirror-allow-trace --mirror-allow-trace-patches --cmdline 'console=ttyS0 quiet' < in > out 2>&1 &\n\
           vmm=$!\n\
           until grep -q '=== specula ground truth end ===' out; do kill -0 $vmm || {{ tail -5 out | sed 's/^/# /'; exit 1; }}; usleep 200000; done\n\
           {inspector} --source-socket m.sock --all --serial null --no-dirty-log --control-socket c.sock --api-socket api.sock > insp.log 2>&1 &\n\
           insp=$!\n\
           until grep -q 'agent ready' insp.log; do kill -0 $insp || {{ sed 's/^/# /' insp.log; exit 1; }}; usleep 200000; done\n\
           n=0\n\
           warm_up\n\
         }}\n\
         warm_up() {{ # a fresh L2 touches each page for the first time (a nested page fault each, costly under TCG): \
           touch most of its RAM and run each workload once, unmeasured, so no mode's figures pay for a (re)boot\n\
           guest 'dd if=/dev/zero of=/tmp/warm bs=1M count=256 2>/dev/null; rm /tmp/warm' && guest '{exec_loop}' \
             && guest '{syscall_loop}' && return 0\n\
           echo '# the source ended in its warm-up'; crashed; start_source\n\
         }}\n\
         dump() {{ echo \"# $1\"; tail -8 out | sed 's/^/# vmm: /'; tail -8 insp.log | sed 's/^/# inspector: /'; exit 1; }}\n\
         arm() {{ # $1: the trace kinds (- for none, all for every kind)\n\
           {specula} --socket api.sock trace-stop > /dev/null || dump 'trace-stop failed'\n\
           case $1 in\n\
             -) ;;\n\
             all) {specula} --socket api.sock trace-start --software-breakpoints > trace.arm 2>&1 || dump \"trace-start: $(cat trace.arm)\" ;;\n\
             *) {specula} --socket api.sock trace-start $1 --software-breakpoints > trace.arm 2>&1 || dump \"trace-start $1: $(cat trace.arm)\" ;;\n\
           esac\n\
         }}\n\
         crashed() {{ # after the source ended: counts the nest's triple fault, fails the script on anything else\n\
           wait $vmm; status=$?\n\
           grep -q 'shut down (triple fault)' out || dump \"the vmm exited with $status\"\n\
           restarts=$((restarts + 1))\n\
           echo \"# restart $restarts: $(grep -m1 -o 'vCPU.*triple fault.*' out)\"\n\
           [ $restarts -le {MAX_RESTARTS} ] || dump 'too many triple faults in one L1'\n\
         }}\n\
         restart() {{ crashed; start_source; arm $1; }}\n\
         guest() {{ # runs $1 in the guest and waits for it: took=the microseconds, seen from L1; fails if the source ended\n\
           n=$((n + 1)); t0=$(now)\n\
           echo \"$1; echo done-$n-\\$((40 + 2))\" >&3\n\
           until grep -q \"^done-$n-42\" out; do\n\
             kill -0 $vmm || return 1\n\
             [ $(( ($(now) - t0) / 1000000 )) -lt {RUN_LIMIT_S} ] || dump \"the guest did not finish '$1' within {RUN_LIMIT_S} s\"\n\
             usleep 20000\n\
           done\n\
           took=$(( $(now) - t0 ))\n\
         }}\n\
         start_source\n\
         for mode in {modes}; do\n\
           name=${{mode%%:*}}; kinds=${{mode#*:}}\n\
           arm $kinds\n\
           for round in $(seq {ROUNDS}); do\n\
             until calls=$(counter hypercalls) && emulated=$(counter insn_emulation) && guest '{exec_loop}' \
               && exec_took=$took && calls=$(( $(counter hypercalls) - calls )) \
               && emulated=$(( $(counter insn_emulation) - emulated )) && guest '{syscall_loop}'; do \
               echo \"# the source ended in mode $name, round $round\"; restart $kinds; done\n\
             echo \"exec_$name=$exec_took\"; echo \"syscall_$name=$took\"\n\
             echo \"hypercalls_$name=$calls\"; echo \"emulated_$name=$emulated\"\n\
           done\n\
         done\n\
         {specula} --socket api.sock trace-status | sed 's/^/# status: /'\n\
         echo \"restarts_workloads=$restarts\"\n\
         echo workloads-complete\n\
         # Latency: tracing exec, a marker command typed on the console, until its trace.exec\n\
         # is on the event stream, and until its own output is on the console.\n\
         follow() {{\n\
           {specula} --socket api.sock --json events --kinds trace.exec > events.out 2>&1 &\n\
           follower=$!\n\
           sleep 1\n\
         }}\n\
         arm exec; follow\n\
         s=0\n\
         while [ $s -lt {LATENCY_SAMPLES} ]; do\n\
           s=$((s + 1)); t0=$(now)\n\
           echo \"/bin/echo latency-mark-$s-\\$((40 + 2))\" >&3\n\
           seen_event=; seen_out=\n\
           while [ -z \"$seen_event\" ] || [ -z \"$seen_out\" ]; do\n\
             kill -0 $vmm || break\n\
             [ -z \"$seen_event\" ] && grep -q \"latency-mark-$s-\" events.out && seen_event=$(( $(now) - t0 ))\n\
             [ -z \"$seen_out\" ] && grep -q \"^latency-mark-$s-42\" out && seen_out=$(( $(now) - t0 ))\n\
             [ $(( ($(now) - t0) / 1000000 )) -lt 60 ] || {{ echo \"# sample $s: no event or output in 60 s\"; tail -3 events.out | sed 's/^/# /'; exit 1; }}\n\
             usleep 2000\n\
           done\n\
           if ! kill -0 $vmm; then echo \"# the source ended in latency sample $s\"; kill $follower; wait $follower; s=$((s - 1)); restart exec; follow; continue; fi\n\
           echo \"latency_event=$seen_event\"; echo \"latency_output=$seen_out\"\n\
           sleep 1\n\
         done\n\
         echo \"restarts_all=$restarts\"\n\
         # How each process ended is said (`# ...`); the figures are complete by now.\n\
         kill $follower; wait $follower; echo \"# the event follower ended with $?\"\n\
         kill $insp; wait $insp; echo \"# the inspector ended with $? on SIGTERM\"\n\
         echo 'poweroff -f' >&3; wait $vmm; echo \"# the vmm ended with $? on poweroff\"\n\
         exit 0\n",
        modes = modes.join(" "),
        exec_loop = format!("i=0; while [ $i -lt {EXECS} ]; do /bin/true; i=$((i + 1)); done"),
        syscall_loop = format!("dd if=/dev/zero of=/dev/null bs=1 count={SYSCALL_BYTES} 2>/dev/null"),
    )
}

/// The figures named `name`, as durations.
fn values(found: &[(String, f64)], name: &str) -> Vec<Duration> {
    found.iter().filter(|(n, _)| n == name).map(|(_, us)| Duration::from_micros(*us as u64)).collect()
}

fn main() {
    // The workload table and the latency samples each come from one L1 (their ratios
    // compare within it): the first L1 that finished that part. TCG's nested SVM fails
    // an L1 or its L2 now and then (docs/nested.md), so a fresh L1 is tried, at most
    // three; a failed attempt is said, and only the parts it finished are used.
    let mut workloads: Option<Vec<(String, f64)>> = None;
    let mut latency: Option<Vec<(String, f64)>> = None;
    let mut why = String::new();
    for attempt in 1..=3 {
        if workloads.is_some() && latency.is_some() {
            break;
        }
        let l1 = NestedL1::boot(&[]);
        match l1.try_run(&script(&l1), Duration::from_secs(1500)) {
            Ok(out) => {
                let found = figures_of(&out.output);
                let (lat, work): (Vec<_>, Vec<_>) = found.into_iter().partition(|(n, _)| n.starts_with("latency_"));
                if workloads.is_none() && out.output.lines().any(|l| l.trim() == "workloads-complete") {
                    workloads = Some(work);
                }
                if latency.is_none() && out.status == 0 {
                    latency = Some(lat);
                }
                if out.status == 0 {
                    continue;
                }
                why = format!("status {}:\n{}", out.status, out.output);
            }
            Err(e) => why = e,
        }
        let tail: Vec<&str> = why.lines().rev().take(15).collect();
        eprintln!("# attempt {attempt} failed; its last lines:");
        tail.iter().rev().for_each(|l| eprintln!("#   {l}"));
    }
    let found = workloads.unwrap_or_else(|| panic!("no L1 of three finished the workloads:\n{why}"));

    // The median and the range of a workload's runs in one mode, in milliseconds.
    let spread_ms = |name: &str| {
        let v = values(&found, name);
        assert!(!v.is_empty(), "no {name} in {found:?}");
        let ms = |d: &Duration| d.as_secs_f64() * 1e3;
        let (min, max) = (v.iter().min().map(ms).unwrap_or(0.0), v.iter().max().map(ms).unwrap_or(0.0));
        (summarize(&v).median.as_secs_f64() * 1e3, min, max)
    };
    let mut body = format!(
        "## Nested: what agentless tracing costs the guest, `cargo bench --bench trace`\n\n\
         One L1 under QEMU's TCG (nested SVM; compare only ratios within this table): Debian 13 (6.12, 2 vCPUs) under \
         our vmm with `--mirror-allow-trace`, an inspector attached with its dirty-page feed off (`--no-dirty-log`: \
         the feed write-protects guest RAM, a cost of its own that is not the trace's). Each workload is timed from L1, from the command \
         typed on the guest's console until the guest prints that it finished (the console's own delay included: it is \
         in every mode alike); the median of {ROUNDS} runs, its ratio to off, and the fastest and slowest run, each \
         after a warm-up that touched most of the guest's RAM and ran both workloads once (a freshly booted L2 pays a \
         nested page fault for each page it touches first). Exec-heavy: {EXECS} runs of `/bin/true`. Syscall-heavy: \
         `dd bs=1 count={SYSCALL_BYTES}` (a read and a write per byte). The modes ran in the order of the rows.\n\n\
         The last two columns are two of KVM's counters for the source's VM (L1's debugfs) over each exec-heavy run, \
         medians: `hypercalls` (in this guest, paravirtual spinlock kicks: a vCPU that waited too long for a lock \
         the other held went to sleep, and its holder woke it) and `insn_emulation` (instructions KVM emulated).\n\n\
         | mode | what it arms | exec-heavy ({EXECS} execs, ms) | syscall-heavy ({} syscalls, ms) | hypercalls per exec-heavy run \
         | instructions emulated per exec-heavy run |\n|---|---|---|---|---|---|\n",
        2 * SYSCALL_BYTES
    );
    // The median of a counter's values over a mode's runs.
    let median_count = |name: &str| {
        let mut v: Vec<f64> = found.iter().filter(|(n, _)| n == name).map(|(_, c)| *c).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let (exec_off, syscall_off) = (spread_ms("exec_off").0, spread_ms("syscall_off").0);
    for (mode, _, arms) in MODES {
        let cell = |workload: &str, off: f64| {
            let (ms, min, max) = spread_ms(&format!("{workload}_{mode}"));
            format!("{ms:.0} ({:.2}x; {min:.0}-{max:.0})", ms / off)
        };
        body.push_str(&format!(
            "| {} | {arms} | {} | {} | {:.0} | {:.0} |\n",
            mode.replace('_', " "),
            cell("exec", exec_off),
            cell("syscall", syscall_off),
            median_count(&format!("hypercalls_{mode}")),
            median_count(&format!("emulated_{mode}"))
        ));
    }
    let restarts = found.iter().find(|(n, _)| n == "restarts_workloads").map_or(0, |(_, v)| *v as u32);
    body.push_str(&format!(
        "\nThe L2 met the nest's triple fault {restarts} times in these runs (docs/nested.md; at most {MAX_RESTARTS} \
         per L1): each time it was booted again in the same L1 and warmed up, its trace mode armed again, and the \
         round it was in was run again.\n"
    ));
    match &latency {
        Some(latency) => {
            let event = summarize(&values(latency, "latency_event"));
            let output = summarize(&values(latency, "latency_output"));
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            body.push_str(&format!(
                "\n**Event latency** ({} samples, exec traced): from `/bin/echo MARK` typed on the console until \
                 its `trace.exec` is on the inspector's event stream (`specula events`, polled every 2 ms, read in \
                 L1's 10 ms clock steps): median {:.1} ms, p90 {:.1} ms; until the program's own output is on the \
                 console: median {:.1} ms, p90 {:.1} ms. {}\n",
                event.n,
                ms(event.median),
                ms(event.p90),
                ms(output.median),
                ms(output.p90),
                if event.median < output.median {
                    "The event is on the stream before the program's own output is on the console: the exec is \
                     reported at the system call's entry, before the program runs."
                } else {
                    "The event reaches the stream after the program's own output reaches the console: the resolver \
                     and the event stream take longer than the program's run and the console."
                },
            ));
        }
        None => body.push_str(
            "\n**Event latency**: not measured in this run. Every L1 that reached the latency samples failed \
             before they were complete (the nest's failures, docs/nested.md); the attempts' lines say how.\n",
        ),
    }
    print!("{body}");
    let path = write_section("nested-trace", &body).expect("write BENCHMARKS.md");
    println!("wrote {}", path.display());
}
