//! `mirror-attack SOCKET GPA SOURCE_PID`: the attack the mirror's read-only promise
//! must withstand. Attaches to a source's mirror socket as whatever uid it runs as,
//! takes a read-only grant of the page at GPA, and tries every way it knows to write
//! source RAM through it or around it. Prints one line per path:
//!
//! ```text
//! blocked NAME: why        (every step names the errno it failed with, e.g. `EACCES`)
//! WROTE NAME: how          (a write into source RAM may have landed)
//! MISSING NAME: why        (the path could not be tried: no source RAM was found there)
//! ```
//!
//! Every write attempt writes [`MARK`], so a test can also look for it in source RAM.
//! Exits 0 when every path was tried, 1 when one is MISSING (a path that finds nothing
//! to attack proves nothing, so it must not pass for blocked), 2 on bad usage, 3 when
//! no grant could be taken.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use mirror_driver::protocol::{Message, Range, ACCESS_READ_ONLY, PROTOCOL_VERSION};
use mirror_driver::wire;

/// What every write attempt writes.
const MARK: &[u8; 8] = b"PWNED!!!";
const PAGE: usize = 4096;

/// The last error as `NAME (text)`, e.g. `EACCES (Permission denied (os error 13))`, so a
/// test can tell why a path was blocked.
fn errno() -> String {
    describe(&std::io::Error::last_os_error())
}

fn describe(error: &std::io::Error) -> String {
    let name = match error.raw_os_error() {
        Some(libc::EPERM) => "EPERM",
        Some(libc::ENOENT) => "ENOENT",
        Some(libc::EIO) => "EIO",
        Some(libc::EBADF) => "EBADF",
        Some(libc::EACCES) => "EACCES",
        Some(libc::EFAULT) => "EFAULT",
        Some(libc::EINVAL) => "EINVAL",
        Some(libc::ETXTBSY) => "ETXTBSY",
        Some(libc::ENODEV) => "ENODEV",
        Some(libc::ESRCH) => "ESRCH",
        Some(libc::EOPNOTSUPP) => "EOPNOTSUPP",
        _ => "E?",
    };
    format!("{name} ({error})")
}

/// A path's outcome: blocked (why), wrote (how), or not tried because there was no
/// source RAM to attack through it (why not).
enum Outcome {
    Blocked(String),
    Wrote(String),
    Missing(String),
}

impl From<Result<String, String>> for Outcome {
    fn from(result: Result<String, String>) -> Self {
        match result {
            Ok(how) => Outcome::Wrote(how),
            Err(why) => Outcome::Blocked(why),
        }
    }
}

/// Prints the path's line; returns whether it was tried (not MISSING).
fn report(name: &str, outcome: impl Into<Outcome>) -> bool {
    match outcome.into() {
        Outcome::Wrote(how) => println!("WROTE {name}: {how}"),
        Outcome::Blocked(why) => println!("blocked {name}: {why}"),
        Outcome::Missing(why) => {
            println!("MISSING {name}: {why}");
            return false;
        }
    }
    true
}

/// Maps `fd` with `prot` and `flags`; writes the mark if the mapping is writable.
fn map_and_write(fd: i32, prot: i32, flags: i32) -> Result<String, String> {
    // SAFETY: a fresh mapping chosen by the kernel, unmapped before returning.
    let map = unsafe { libc::mmap(std::ptr::null_mut(), PAGE, prot, flags, fd, 0) };
    if map == libc::MAP_FAILED {
        return Err(format!("mmap: {}", errno()));
    }
    // SAFETY: the mapping is PAGE bytes and writable (prot includes PROT_WRITE).
    unsafe {
        std::ptr::copy_nonoverlapping(MARK.as_ptr(), map.cast::<u8>(), MARK.len());
        libc::munmap(map, PAGE);
    }
    Ok("wrote through a writable shared mapping".into())
}

fn pwrite(fd: i32) -> Result<String, String> {
    // SAFETY: pwrite of MARK from a live buffer.
    let n = unsafe { libc::pwrite(fd, MARK.as_ptr().cast(), MARK.len(), 0) };
    if n < 0 {
        Err(format!("pwrite: {}", errno()))
    } else {
        Ok(format!("pwrite wrote {n} bytes"))
    }
}

fn mprotect_upgrade(fd: i32) -> Result<String, String> {
    // SAFETY: a fresh read-only mapping, unmapped before returning.
    let map = unsafe { libc::mmap(std::ptr::null_mut(), PAGE, libc::PROT_READ, libc::MAP_SHARED, fd, 0) };
    if map == libc::MAP_FAILED {
        return Err(format!("read-only mmap: {}", errno()));
    }
    // SAFETY: mprotect and munmap of the mapping made above.
    let rc = unsafe { libc::mprotect(map, PAGE, libc::PROT_READ | libc::PROT_WRITE) };
    let outcome = if rc == 0 {
        // SAFETY: the mapping is now writable.
        unsafe { std::ptr::copy_nonoverlapping(MARK.as_ptr(), map.cast::<u8>(), MARK.len()) };
        Ok("mprotect made the grant writable".into())
    } else {
        Err(format!("mprotect: {}", errno()))
    };
    // SAFETY: as above.
    unsafe { libc::munmap(map, PAGE) };
    outcome
}

fn punch(fd: i32) -> Result<String, String> {
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate on an fd we hold.
    if unsafe { libc::fallocate(fd, mode, 0, PAGE as libc::off_t) } == 0 {
        Ok("punched a hole".into())
    } else {
        Err(format!("fallocate: {}", errno()))
    }
}

fn truncate(fd: i32) -> Result<String, String> {
    // SAFETY: ftruncate on an fd we hold.
    if unsafe { libc::ftruncate(fd, 0) } == 0 {
        Ok("truncated the file".into())
    } else {
        Err(format!("ftruncate: {}", errno()))
    }
}

fn add_seals(fd: i32) -> Result<String, String> {
    // SAFETY: fcntl on an fd we hold.
    if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_WRITE) } == 0 {
        Ok("added F_SEAL_WRITE".into())
    } else {
        Err(format!("F_ADD_SEALS: {}", errno()))
    }
}

/// Opens `path` read-write and tries every write through the new description.
fn reopen_and_write(path: &str) -> Result<String, String> {
    let c_path = CString::new(path).expect("no NUL");
    // SAFETY: open with a valid path.
    let fd = unsafe { libc::open(c_path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(format!("open {path} O_RDWR: {}", errno()));
    }
    // One after the other, stopping at the first that writes (a punch after a landed
    // write would erase the mark).
    let attempts: [&dyn Fn() -> Result<String, String>; 3] =
        [&|| pwrite(fd), &|| map_and_write(fd, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED), &|| punch(fd)];
    let mut whys = Vec::new();
    let mut wrote = None;
    for attempt in attempts {
        match attempt() {
            Ok(how) => {
                wrote = Some(how);
                break;
            }
            Err(why) => whys.push(why),
        }
    }
    // SAFETY: closing the fd opened above.
    unsafe { libc::close(fd) };
    match wrote {
        Some(how) => Ok(format!("re-opened {path} read-write, then {how}")),
        None => Err(format!("open {path} O_RDWR: ok, but every write failed: {}", whys.join("; "))),
    }
}

fn fchmod_reopen(fd: i32) -> Result<String, String> {
    // SAFETY: fchmod on an fd we hold.
    let chmod = if unsafe { libc::fchmod(fd, 0o600) } == 0 { "ok".to_string() } else { errno() };
    let chmod = format!("fchmod 0600: {chmod}");
    reopen_and_write(&format!("/proc/self/fd/{fd}")).map_err(|e| format!("{chmod}; {e}"))
}

/// Where the source maps guest RAM (a chunk of it), from its /proc/PID/maps.
fn ram_address(pid: &str) -> Result<u64, String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|e| format!("read /proc/{pid}/maps: {}", describe(&e)))?;
    let line = maps
        .lines()
        .find(|l| l.contains("specula-guest-ram"))
        .ok_or_else(|| format!("/proc/{pid}/maps names no mapping of specula-guest-ram"))?;
    u64::from_str_radix(line.split('-').next().unwrap_or(""), 16).map_err(|e| format!("bad maps line {line:?}: {e}"))
}

fn proc_mem(pid: &str) -> Outcome {
    let path = CString::new(format!("/proc/{pid}/mem")).expect("no NUL");
    // SAFETY: open with a valid path.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Outcome::Blocked(format!("open /proc/{pid}/mem O_RDWR: {}", errno()));
    }
    // Open: the attack is only tried if it knows where source RAM is.
    let at = match ram_address(pid) {
        Ok(at) => at,
        Err(why) => {
            // SAFETY: closing the fd opened above.
            unsafe { libc::close(fd) };
            return Outcome::Missing(format!("opened /proc/{pid}/mem read-write, but found no source RAM: {why}"));
        }
    };
    // SAFETY: pwrite of MARK from a live buffer; closing our own fd.
    let (n, why) = unsafe {
        let n = libc::pwrite(fd, MARK.as_ptr().cast(), MARK.len(), at as libc::off_t);
        let why = errno();
        libc::close(fd);
        (n, why)
    };
    if n > 0 {
        Outcome::Wrote(format!("wrote {n} bytes at {at:#x} through /proc/{pid}/mem"))
    } else {
        Outcome::Blocked(format!("open /proc/{pid}/mem O_RDWR: ok, but pwrite at {at:#x}: {why}"))
    }
}

fn proc_fds(pid: &str) -> Outcome {
    let entries = match std::fs::read_dir(format!("/proc/{pid}/fd")) {
        Ok(entries) => entries,
        Err(e) => return Outcome::Blocked(format!("list /proc/{pid}/fd: {}", describe(&e))),
    };
    let mut found = 0;
    let mut unreadable = Vec::new();
    let mut whys = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path().display().to_string();
        let target = match std::fs::read_link(entry.path()) {
            Ok(target) => target,
            Err(e) => {
                unreadable.push(format!("readlink {path}: {}", describe(&e)));
                continue;
            }
        };
        if !target.to_string_lossy().contains("specula-guest-ram") {
            continue;
        }
        found += 1;
        match reopen_and_write(&path) {
            Ok(how) => return Outcome::Wrote(how),
            Err(e) => whys.push(e),
        }
    }
    if found == 0 {
        return Outcome::Missing(format!(
            "listed /proc/{pid}/fd, but no fd of source RAM (specula-guest-ram) is there{}{}",
            if unreadable.is_empty() { "" } else { "; " },
            unreadable.join("; ")
        ));
    }
    Outcome::Blocked(format!("{found} fds of source RAM, none writable: {}", whys.join(" | ")))
}

fn ptrace(pid: &str) -> Result<String, String> {
    let pid: libc::pid_t = pid.parse().map_err(|_| "bad pid".to_string())?;
    // SAFETY: PTRACE_ATTACH on another process; detached again if it succeeds.
    let rc = unsafe { libc::ptrace(libc::PTRACE_ATTACH, pid, 0, 0) };
    if rc == 0 {
        // SAFETY: detaching what we attached.
        unsafe { libc::ptrace(libc::PTRACE_DETACH, pid, 0, 0) };
        Ok("attached with ptrace (POKEDATA would write its RAM)".into())
    } else {
        Err(format!("PTRACE_ATTACH: {}", errno()))
    }
}

fn grant_fd(socket: &str, gpa: u64) -> Result<OwnedFd, String> {
    let stream = UnixStream::connect(socket).map_err(|e| format!("connect {socket}: {e}"))?;
    let talk = |message: Message| -> Result<wire::Frame, String> {
        wire::send(&stream, 1, &message, &[]).map_err(|e| e.to_string())?;
        wire::recv(&stream).map_err(|e| e.to_string())
    };
    match talk(Message::Hello { version: PROTOCOL_VERSION })?.message {
        Message::HelloAck { .. } => {}
        other => return Err(format!("refused: {other:?}")),
    }
    let request = Message::GrantRequest { access: ACCESS_READ_ONLY, ranges: vec![Range { gpa, len: PAGE as u64 }] };
    let frame = talk(request)?;
    match frame.message {
        Message::GrantReply { .. } => frame.fds.into_iter().next().ok_or_else(|| "no fd in the reply".into()),
        other => Err(format!("grant refused: {other:?}")),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, socket, gpa, pid] = args.as_slice() else {
        eprintln!("usage: mirror-attack SOCKET GPA SOURCE_PID");
        std::process::exit(2);
    };
    let gpa = u64::from_str_radix(gpa.trim_start_matches("0x"), 16).expect("GPA in hex");
    let fd = match grant_fd(socket, gpa) {
        Ok(fd) => fd,
        Err(e) => {
            eprintln!("mirror-attack: {e}");
            std::process::exit(3);
        }
    };
    // SAFETY: getuid cannot fail.
    println!("attacking as uid {}", unsafe { libc::getuid() });
    let raw = fd.as_raw_fd();
    let tried = [
        report("mmap-shared-writable", map_and_write(raw, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED)),
        report("mprotect", mprotect_upgrade(raw)),
        report("pwrite", pwrite(raw)),
        report("fallocate-punch-hole", punch(raw)),
        report("ftruncate", truncate(raw)),
        report("add-seals", add_seals(raw)),
        report("fchmod-reopen", fchmod_reopen(raw)),
        report("proc-pid-mem", proc_mem(pid)),
        report("proc-pid-fd", proc_fds(pid)),
        report("ptrace", ptrace(pid)),
    ];
    println!("done");
    if tried.contains(&false) {
        eprintln!("mirror-attack: some paths found no source RAM to attack (MISSING lines): not every path was tried");
        std::process::exit(1);
    }
}
