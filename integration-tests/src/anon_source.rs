//! A source process for kernel mirror tests and benchmarks: a forked child that owns
//! a range of private anonymous (or memfd) memory and changes it on command, so the
//! test can watch a mirror of it through every identity change a page goes through
//! (in-place writes, `MADV_DONTNEED`, munmap and a new mapping, KSM, migration, THP
//! collapse and split, swap).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use mirror_driver::kernel_mirror;

pub const PAGE: usize = 4096;
pub const PAGES: usize = 16;
/// Linux 6.1's `MADV_COLLAPSE` (not in every libc crate yet).
pub const MADV_COLLAPSE: i32 = 25;
/// `move_pages` flag: move the pages (linux/mempolicy.h).
pub const MPOL_MF_MOVE: i32 = 1 << 1;

/// A forked process with private anonymous pages at `addr`, which it fills, drops,
/// replaces, offers to KSM, pages out or collapses into a huge page on command.
/// Killed on drop.
pub struct Source {
    pub pid: libc::pid_t,
    commands: File,
    acks: File,
    /// Where the range lies in the source.
    pub addr: u64,
    pub pages: usize,
    /// The memfd behind the range, for a memfd source.
    pub memfd: Option<OwnedFd>,
    /// A page shared with the source, where it stamps the time of a `REPLACE_STAMPED`.
    stamp: *mut u64,
}

/// Commands to the source: (op, page, byte).
pub const FILL: u8 = 1;
pub const DONTNEED: u8 = 2;
pub const REMAP: u8 = 3;
/// Fills page `i` with `byte + i` (wrapping), every page.
pub const FILL_ALL: u8 = 4;
/// `madvise(MADV_MERGEABLE)` on the whole range: KSM may merge its identical pages.
pub const MERGEABLE: u8 = 5;
/// `madvise(MADV_PAGEOUT)` on the whole range: out to swap.
pub const PAGEOUT: u8 = 6;
/// `madvise(MADV_COLLAPSE)` on the whole (2 MiB-aligned) range: one huge page.
pub const COLLAPSE: u8 = 7;
/// `madvise(MADV_DONTNEED)` on one page (inside a huge page: splits its mapping).
pub const DONTNEED_PAGE: u8 = 8;

/// Stamps the time, drops page `page` (`MADV_DONTNEED`) and writes `byte` into the
/// fresh page that replaces it: an identity change whose visibility can be timed.
pub const REPLACE_STAMPED: u8 = 9;

/// Pages of a 2 MiB huge page.
pub const HUGE_PAGES: usize = 512;

impl Source {
    /// `PAGES` pages, page `i` filled with `0x10 + i`.
    pub fn spawn() -> Source {
        let mut source = Source::spawn_pages(PAGES, false);
        for page in 0..PAGES {
            source.send(FILL, page as u32, 0x10 + page as u8);
        }
        source
    }

    /// `pages` unfilled private anonymous pages; `huge_aligned`: starting on a 2 MiB
    /// boundary.
    pub fn spawn_pages(pages: usize, huge_aligned: bool) -> Source {
        Source::spawn_backed(pages, huge_aligned, false)
    }

    /// `pages` pages of a memfd mapped shared (how the `vmm` keeps guest RAM); the
    /// memfd stays open here, in [`Source::memfd`].
    pub fn spawn_memfd(pages: usize) -> Source {
        Source::spawn_backed(pages, false, true)
    }

    /// [`Source::spawn`]'s filled pages in a source that runs as `uid`:`uid` and stays
    /// dumpable (a uid change would make it non-dumpable, which ptrace checks refuse
    /// to everyone without CAP_SYS_PTRACE), so a caller of that uid may ptrace it.
    pub fn spawn_as(uid: u32) -> Source {
        let mut source = Source::spawn_with(PAGES, false, false, Some(uid));
        for page in 0..PAGES {
            source.send(FILL, page as u32, 0x10 + page as u8);
        }
        source
    }

    fn spawn_backed(pages: usize, huge_aligned: bool, memfd: bool) -> Source {
        Source::spawn_with(pages, huge_aligned, memfd, None)
    }

    fn spawn_with(pages: usize, huge_aligned: bool, memfd: bool, uid: Option<u32>) -> Source {
        let len = pages * PAGE;
        let slack = if huge_aligned { HUGE_PAGES * PAGE } else { 0 };
        let memfd = memfd.then(|| {
            // SAFETY: memfd_create with a literal name; the fd is owned right away.
            let fd = unsafe { libc::memfd_create(c"specula-source".as_ptr(), libc::MFD_CLOEXEC) };
            assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
            // SAFETY: a fresh fd we own.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: sizes the memfd we own.
            assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) }, 0);
            fd
        });
        let (flags, fd) = match &memfd {
            Some(fd) => (libc::MAP_SHARED, fd.as_raw_fd()),
            None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1),
        };
        // SAFETY: a fresh mapping; after the fork the parent unmaps its copy and only the
        // child uses the range.
        let mapped =
            unsafe { libc::mmap(std::ptr::null_mut(), len + slack, libc::PROT_READ | libc::PROT_WRITE, flags, fd, 0) };
        assert_ne!(mapped, libc::MAP_FAILED);
        // SAFETY: one shared anonymous page, for the source's time stamps.
        let stamp = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(stamp, libc::MAP_FAILED);
        let addr = if huge_aligned { (mapped as usize).next_multiple_of(slack) } else { mapped as usize };
        let (cmd_read, cmd_write) = pipe();
        let (ack_read, ack_write) = pipe();
        // SAFETY: the child only calls async-signal-safe functions (read, write, mmap,
        // madvise, clock_gettime, _exit) and writes memory it owns, then exits with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            if let Some(uid) = uid {
                // SAFETY: setgid/setuid/prctl on this child only; it _exits if they fail.
                unsafe {
                    if libc::setgid(uid) != 0 || libc::setuid(uid) != 0 || libc::prctl(libc::PR_SET_DUMPABLE, 1) != 0 {
                        libc::_exit(100);
                    }
                }
            }
            // SAFETY: see above; runs until told to stop or its parent's pipe closes.
            unsafe { source_main(cmd_read.as_raw_fd(), ack_write.as_raw_fd(), addr as *mut u8, len, stamp.cast()) };
        }
        // SAFETY: the parent's copy of the range, which it never touches.
        unsafe { libc::munmap(mapped, len + slack) };
        drop((cmd_read, ack_write));
        Source {
            pid,
            commands: File::from(cmd_write),
            acks: File::from(ack_read),
            addr: addr as u64,
            pages,
            memfd,
            stamp: stamp.cast(),
        }
    }

    /// The CLOCK_MONOTONIC time (ns) the source stamped when it began its last
    /// `REPLACE_STAMPED`.
    pub fn stamped_ns(&self) -> u64 {
        // SAFETY: the shared stamp page, written by the source before its ack.
        unsafe { self.stamp.read_volatile() }
    }

    /// A field of the source's /proc/PID/status, in kB (`VmSwap`, say).
    pub fn status_kb(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).expect("the source's status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':')?.trim().strip_suffix(" kB")?.parse().ok())
            .unwrap_or_else(|| panic!("no {field} in the source's status"))
    }

    /// `AnonHugePages` of the source's mapping that holds `addr`, in kB.
    pub fn huge_kb(&self) -> u64 {
        let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", self.pid)).expect("the source's smaps");
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ').filter(|(r, _)| r.contains('-') && !r.ends_with(':')) {
                let (lo, hi) = range.split_once('-').unwrap();
                let (lo, hi) = (u64::from_str_radix(lo, 16).unwrap_or(0), u64::from_str_radix(hi, 16).unwrap_or(0));
                inside = lo <= self.addr && self.addr < hi;
            } else if inside {
                if let Some(kb) = line.strip_prefix("AnonHugePages:") {
                    return kb.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0);
                }
            }
        }
        panic!("no mapping of {:#x} in the source's smaps", self.addr)
    }

    /// Sends a command and waits for the source's ack; fails if the source failed it.
    pub fn send(&mut self, op: u8, page: u32, byte: u8) {
        self.send_nowait(op, page, byte);
        assert!(self.ack(), "the source failed op {op}");
    }

    /// Sends a command without waiting for its ack ([`Source::ack`]).
    pub fn send_nowait(&mut self, op: u8, page: u32, byte: u8) {
        let mut frame = [0u8; 6];
        frame[0] = op;
        frame[1..5].copy_from_slice(&page.to_le_bytes());
        frame[5] = byte;
        self.commands.write_all(&frame).expect("command the source");
    }

    /// The ack of the command sent last: whether the source carried it out.
    pub fn ack(&mut self) -> bool {
        let mut ack = [0u8; 1];
        self.acks.read_exact(&mut ack).expect("the source's ack");
        ack[0] == 1
    }

    pub fn pidfd(&self) -> OwnedFd {
        kernel_mirror::pidfd_open(self.pid as u32).expect("pidfd_open")
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        // SAFETY: kill and reap our own child.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}

/// The forked source's loop.
///
/// # Safety
/// `addr..+len` must be this process's mapping, `stamp` a shared page; `commands`/`acks`
/// pipe fds.
unsafe fn source_main(commands: i32, acks: i32, addr: *mut u8, len: usize, stamp: *mut u64) -> ! {
    let mut frame = [0u8; 6];
    loop {
        // SAFETY: reads into a local buffer.
        if unsafe { libc::read(commands, frame.as_mut_ptr().cast(), frame.len()) } != frame.len() as isize {
            // SAFETY: ends the child without running the parent's destructors.
            unsafe { libc::_exit(0) };
        }
        let page = u32::from_le_bytes([frame[1], frame[2], frame[3], frame[4]]) as usize;
        let pages = len / PAGE;
        let advise = |advice: i32| {
            // SAFETY: advice on this process's own mapping, all of it.
            unsafe { libc::madvise(addr.cast(), len, advice) == 0 }
        };
        let ok = match frame[0] {
            // SAFETY: page < pages, inside the mapping.
            FILL if page < pages => unsafe {
                std::ptr::write_bytes(addr.add(page * PAGE), frame[5], PAGE);
                true
            },
            FILL_ALL => {
                for i in 0..pages {
                    // SAFETY: page i of the mapping.
                    unsafe { std::ptr::write_bytes(addr.add(i * PAGE), frame[5].wrapping_add(i as u8), PAGE) };
                }
                true
            }
            DONTNEED => advise(libc::MADV_DONTNEED),
            MERGEABLE => advise(libc::MADV_MERGEABLE),
            PAGEOUT => advise(libc::MADV_PAGEOUT),
            COLLAPSE => advise(MADV_COLLAPSE),
            // SAFETY: one page of the mapping.
            DONTNEED_PAGE if page < pages => unsafe {
                libc::madvise(addr.add(page * PAGE).cast(), PAGE, libc::MADV_DONTNEED) == 0
            },
            // SAFETY: the stamp page and page `page` of the mapping.
            REPLACE_STAMPED if page < pages => unsafe {
                let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
                libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now);
                stamp.write_volatile(now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64);
                let at = addr.add(page * PAGE);
                let ok = libc::madvise(at.cast(), PAGE, libc::MADV_DONTNEED) == 0;
                at.write_volatile(frame[5]);
                ok
            },
            REMAP => {
                // SAFETY: replaces our own mapping with a fresh one at the same address.
                let at = unsafe {
                    libc::mmap(
                        addr.cast(),
                        len,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                        -1,
                        0,
                    )
                };
                if at == addr.cast() {
                    // SAFETY: the new mapping, all of it.
                    unsafe { std::ptr::write_bytes(addr, frame[5], len) };
                }
                at == addr.cast()
            }
            _ => false,
        };
        let ack = [ok as u8];
        // SAFETY: writes a local byte.
        unsafe { libc::write(acks, ack.as_ptr().cast(), 1) };
    }
}

pub fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh fds we own.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// A read-only shared mapping of a mirror fd.
pub struct View {
    pub base: *const u8,
    pub len: usize,
}

impl View {
    pub fn map(fd: &OwnedFd, len: usize) -> View {
        // SAFETY: a fresh PROT_READ shared mapping of the device's fd.
        let base =
            unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, fd.as_raw_fd(), 0) };
        assert_ne!(base, libc::MAP_FAILED, "mmap the mirror: {}", std::io::Error::last_os_error());
        View { base: base as *const u8, len }
    }

    /// The first byte of `page`, read through the mirror.
    pub fn byte(&self, page: usize) -> u8 {
        assert!(page * PAGE < self.len);
        // SAFETY: inside the mapping; volatile, so each read goes to the page mapped now.
        unsafe { self.base.add(page * PAGE).read_volatile() }
    }
}

impl Drop for View {
    fn drop(&mut self) {
        // SAFETY: our mapping.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}
