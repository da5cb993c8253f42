//! Specula's VMM library: boots x86_64 guests on /dev/kvm with the rust-vmm
//! crates. The `vmm` binary drives it from the command line; the inspector
//! reuses it to build its own VM.

pub mod api;
pub mod arch;
pub mod boot;
pub mod builder;
pub mod config;
pub mod devices;
pub mod jail;
pub mod line_server;
pub mod logger;
pub mod memory;
pub mod mirror;
pub mod signals;
pub mod vstate;

pub use builder::{BuildError, Vmm};
pub use config::{Command, VmConfig};
/// An error's message with its causes ("what failed: because: because").
pub use specula_common::error_chain;
pub use vstate::vcpu::{VmExit, CRASH_EXIT_CODE};

/// Raises the soft open-file limit to the hard limit: a large VM's RAM is ~1024
/// memfd chunks, and a mirror grant of all of it is as many fds again.
pub fn raise_fd_limit() {
    // SAFETY: rlimit is plain data; getrlimit/setrlimit on our own process.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
