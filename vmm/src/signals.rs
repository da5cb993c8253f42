//! SIGINT and SIGTERM through a signalfd, so the event loop stops the VM cleanly.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use crate::vstate::vcpu::{Lifecycle, VmExit};

/// Watches SIGINT and SIGTERM and turns them into a requested stop.
pub struct StopSignals {
    fd: OwnedFd,
    lifecycle: Arc<Lifecycle>,
}

fn stop_signal_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initializes it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
    }
    set
}

/// Blocks SIGINT and SIGTERM in the calling thread; threads spawned later inherit the
/// mask. Call it first thing in `main`, before any thread starts, so that a stop signal
/// is never delivered to (and kills the process through) a thread that does not expect it.
pub fn block_stop_signals() -> io::Result<()> {
    let set = stop_signal_set();
    // SAFETY: `set` is a valid sigset_t.
    if unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl StopSignals {
    /// Blocks SIGINT and SIGTERM in the calling thread (threads spawned later inherit
    /// the mask) and opens a signalfd for them.
    pub fn new(lifecycle: Arc<Lifecycle>) -> io::Result<Self> {
        block_stop_signals()?;
        let set = stop_signal_set();
        // SAFETY: `set` is a valid sigset_t.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: signalfd returned a new fd that nothing else owns.
        Ok(Self { fd: unsafe { OwnedFd::from_raw_fd(fd) }, lifecycle })
    }

    fn read_signal(&self) -> Option<i32> {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reads at most `size` bytes into `info`.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), (&mut info as *mut libc::signalfd_siginfo).cast(), size) };
        (n == size as isize).then_some(info.ssi_signo as i32)
    }
}

impl MutEventSubscriber for StopSignals {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            log::error!("cannot watch SIGINT/SIGTERM: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        while let Some(signo) = self.read_signal() {
            let name = if signo == libc::SIGINT { "SIGINT" } else { "SIGTERM" };
            self.lifecycle.request_exit(VmExit::Stopped(name));
        }
    }
}
