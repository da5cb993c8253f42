//! virtio-blk throughput in the nested test bed (docs/nested.md): a sequential read of
//! 256 MiB from a virtio-blk disk by Debian 12's kernel under our vmm, beside the same
//! kernel under QEMU `-accel kvm -M microvm` with its virtio-blk (virtio-mmio, as
//! ours), and beside L1 reading the same file itself. All three in one L1 command per
//! run (TCG's figures: compare only the ratios). Writes the `nested-virtio` section of
//! BENCHMARKS.md.
//!
//! Both guests boot the disk initramfs with `root=` on the raw data disk: its mount
//! fails, and the initramfs's fallback shell (with virtio-blk loaded) runs the read:
//! `busybox dd if=/dev/vda of=/dev/null bs=1M`, timed by the guest's /proc/uptime.
//!
//! `cargo build --workspace && cargo bench -p integration-tests --bench virtio`
//! (after scripts/build.sh).

use std::path::Path;
use std::time::Duration;

use integration_tests::bench::{figures_of, summarize, write_section};
use integration_tests::nested::{linux_dir, Carried, NestedL1, L1_DISK_INITRAMFS};

const RUNS: usize = 3;
const MIB: u64 = 256;
/// The readers, as (figure key, label).
const READERS: [(&str, &str); 3] = [
    ("vmm", "Debian 6.1 under our vmm (virtio-blk)"),
    ("qemu", "Debian 6.1 under QEMU `-accel kvm -M microvm` (virtio-blk)"),
    ("l1", "L1 itself (`dd` of the file)"),
];

/// One guest's read: boot `command` (its console on a FIFO and a log), wait for the
/// initramfs's fallback shell, type the timed `dd`, report `read_KEY=MS` or why not.
fn guest_read(key: &str, command: &str) -> String {
    format!(
        "rm -f in.{key} out.{key}; mkfifo in.{key}; exec 4<>in.{key}\n\
         {command} < in.{key} > out.{key} 2>&1 &\n\
         pid=$!; end=$(( $(date +%s) + 300 )); ok=\n\
         until grep -q 'a shell instead' out.{key}; do\n\
           kill -0 $pid 2>/dev/null && [ $(date +%s) -lt $end ] || {{ echo '# {key}: no shell'; tail -5 out.{key} | sed 's/^/# {key}: /'; ok=no; break; }}\n\
           usleep 200000\n\
         done\n\
         if [ -z \"$ok\" ]; then\n\
           echo 'read a _ < /proc/uptime; busybox dd if=/dev/vda of=/dev/null bs=1M 2>/dev/null; read b _ < /proc/uptime; \
echo read-done $(busybox awk \"BEGIN {{ print ($b - $a) * 1000 }}\")' >&4\n\
           until grep -q '^read-done [0-9]' out.{key}; do\n\
             kill -0 $pid 2>/dev/null && [ $(date +%s) -lt $end ] || {{ echo '# {key}: no read'; tail -5 out.{key} | sed 's/^/# {key}: /'; break; }}\n\
             usleep 200000\n\
           done\n\
           grep '^read-done [0-9]' out.{key} | tr -d '\\r' | sed 's/^read-done /read_{key}=/'\n\
           echo \"# {key}: $(grep -c . out.{key}) console lines, read at $(date +%s)\"\n\
         fi\n\
         kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null; exec 4>&-\n"
    )
}

/// The whole run, as one L1 command.
fn script(l1: &NestedL1) -> String {
    let kernel = l1.linux_image("linux", "vmlinuz");
    let append = "console=ttyS0 quiet root=/dev/vda";
    let vmm = format!(
        "{} --kernel {kernel} --initramfs {L1_DISK_INITRAMFS} --memory 256M --disk path=/tmp/data.img,readonly=on \
         --cmdline '{append}'",
        l1.binary("vmm")
    );
    let qemu = format!(
        "{} -accel kvm -M microvm -m 256M -nodefaults -no-user-config -display none -kernel {kernel} \
         -initrd {L1_DISK_INITRAMFS} -append '{append}' -serial stdio \
         -drive id=data,file=/tmp/data.img,format=raw,if=none,readonly=on -device virtio-blk-device,drive=data",
        l1.qemu()
    );
    format!(
        "cd /tmp\n\
         dd if=/dev/urandom of=/tmp/data.img bs=1M count={MIB} 2>/dev/null || exit 1\n\
         a=$(cut -d' ' -f1 /proc/uptime); dd if=/tmp/data.img of=/dev/null bs=1M 2>/dev/null; b=$(cut -d' ' -f1 /proc/uptime)\n\
         echo \"read_l1=$(awk \"BEGIN {{ print ($b - $a) * 1000 }}\")\"\n\
         {}{}",
        guest_read("vmm", &vmm),
        guest_read("qemu", &qemu)
    )
}

fn main() {
    let disk_initramfs = linux_dir("linux").join("disk-initramfs.cpio.gz");
    assert!(Path::new(&disk_initramfs).is_file(), "{} is missing: run scripts/build.sh", disk_initramfs.display());
    let carried = Carried { files: vec![(disk_initramfs, L1_DISK_INITRAMFS.to_string())], programs: Vec::new() };
    let runs = std::env::var("SPECULA_VIRTIO_BENCH_RUNS").ok().and_then(|r| r.parse().ok()).unwrap_or(RUNS);
    let mut found = Vec::new();
    for run in 1..=runs {
        // A fresh L1 per run: one that has run KVM guests may stop answering (docs/nested.md).
        let l1 = NestedL1::boot_carrying(&[], &carried);
        match l1.try_run(&script(&l1), Duration::from_secs(400)) {
            Ok(out) if out.status == 0 => found.extend(figures_of(&out.output)),
            Ok(out) => panic!("run {run} failed in L1:\n{}", out.output),
            Err(why) => eprintln!("# run {run}: the L1 hung ({})", why.lines().next().unwrap_or("")),
        }
    }

    let mut body = format!(
        "## Nested: virtio-blk sequential read, `cargo bench --bench virtio`\n\n\
         {MIB} MiB read with `dd bs=1M` from a read-only raw disk (a file in L1's tmpfs), by Debian 12's 6.1 kernel \
         (1 vCPU, 256 MiB) from its initramfs shell, timed by the reader's own clock; each run in one fresh L1 \
         (Debian 6.1 cloud, 2 vCPUs, 3 GiB) under QEMU's TCG with nested SVM, so every figure is TCG's: compare the \
         ratios. QEMU is the runner's own (7.2), in L1 as an unmodified KVM VMM.\n\n\
         | reader | median (ms) | MiB/s | vs our vmm | runs |\n|---|---|---|---|---|\n"
    );
    let median = |key: &str| {
        let samples: Vec<Duration> = found
            .iter()
            .filter(|(n, _)| n == &format!("read_{key}"))
            .map(|(_, v)| Duration::from_secs_f64(v / 1e3))
            .collect();
        (!samples.is_empty()).then(|| summarize(&samples))
    };
    let ours = median("vmm").map(|s| s.median.as_secs_f64());
    for (key, label) in READERS {
        match median(key) {
            Some(s) => {
                let secs = s.median.as_secs_f64();
                let ratio = ours.map(|o| format!("{:.2}x", secs / o)).unwrap_or_else(|| "-".into());
                body.push_str(&format!(
                    "| {label} | {:.0} | {:.0} | {ratio} | {} |\n",
                    secs * 1e3,
                    MIB as f64 / secs,
                    s.n
                ));
            }
            None => body.push_str(&format!("| {label} | failed in every run (see the bench's stderr) | | | 0 |\n")),
        }
    }
    print!("{body}");
    let path = write_section("nested-virtio", &body).expect("write BENCHMARKS.md");
    println!("wrote {}", path.display());
}
