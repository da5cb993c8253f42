//! `nested-run [--limit SECONDS] COMMAND...`: runs one shell command in a fresh L1 of
//! the nested test bed (`integration_tests::nested`: QEMU's TCG with emulated SVM and
//! nested paging, kvm-amd loaded), with the workspace's binaries under
//! `/target/<profile>/` and the guest images under `/target/guest-images/`, as the
//! nested tests see them. Prints what the command wrote and exits with its status (137
//! when the limit killed it); without a command, prints what L1 offers.
//!
//! ```sh
//! cargo build --workspace && scripts/build.sh
//! cargo run -p integration-tests --bin nested-run -- \
//!     /target/debug/vmm --kernel /target/guest-images/hello.elf --memory 64M --cmdline exit=7
//! ```

use std::time::Duration;

use integration_tests::nested::NestedL1;

const USAGE: &str = "usage: nested-run [--limit SECONDS] COMMAND...";

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut limit = Duration::from_secs(300);
    if args.first().map(String::as_str) == Some("--limit") {
        let Some(seconds) = args.get(1).and_then(|s| s.parse::<u64>().ok()) else {
            eprintln!("nested-run: --limit needs a number of seconds\n{USAGE}");
            std::process::exit(2);
        };
        limit = Duration::from_secs(seconds);
        args.drain(..2);
    }
    let command = if args.is_empty() {
        "uname -a; grep -c ^processor /proc/cpuinfo; cat /sys/module/kvm_amd/parameters/npt; ls /target /target/guest-images"
            .to_string()
    } else {
        args.join(" ")
    };
    let l1 = NestedL1::boot(&[]);
    match l1.try_run(&command, limit) {
        Ok(out) => {
            print!("{}", out.output);
            std::process::exit(out.status);
        }
        Err(why) => {
            eprintln!("nested-run: {why}");
            std::process::exit(1);
        }
    }
}
