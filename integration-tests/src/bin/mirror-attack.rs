//! `mirror-attack SOCKET GPA SOURCE_PID`: the attack the mirror's read-only promise
//! must withstand. Attaches to a source's mirror socket as whatever uid it runs as,
//! takes a read-only grant of the page at GPA, and tries every way it knows to write
//! source RAM through it or around it. Prints one line per path:
//!
//! ```text
//! blocked NAME: why
//! WROTE NAME: how          (a write into source RAM may have landed)
//! ```
//!
//! Every write attempt writes [`MARK`], so a test can also look for it in source RAM.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use mirror_driver::protocol::{Message, Range, ACCESS_READ_ONLY, PROTOCOL_VERSION};
use mirror_driver::wire;

/// What every write attempt writes.
const MARK: &[u8; 8] = b"PWNED!!!";
const PAGE: usize = 4096;

fn errno() -> String {
    std::io::Error::last_os_error().to_string()
}

fn report(name: &str, outcome: Result<String, String>) {
    match outcome {
        Ok(how) => println!("WROTE {name}: {how}"),
        Err(why) => println!("blocked {name}: {why}"),
    }
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
    let outcome = pwrite(fd)
        .or_else(|_| map_and_write(fd, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED))
        .or_else(|_| punch(fd))
        .map(|how| format!("re-opened {path} read-write, then {how}"));
    // SAFETY: closing the fd opened above.
    unsafe { libc::close(fd) };
    outcome.map_err(|e| format!("opened {path} read-write, but every write failed (last: {e})"))
}

fn fchmod_reopen(fd: i32) -> Result<String, String> {
    // SAFETY: fchmod on an fd we hold.
    let chmod = if unsafe { libc::fchmod(fd, 0o600) } == 0 { "fchmod 0600 succeeded".to_string() } else { errno() };
    reopen_and_write(&format!("/proc/self/fd/{fd}")).map_err(|e| format!("{chmod}; {e}"))
}

fn proc_mem(pid: &str) -> Result<String, String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"));
    let address = maps.ok().and_then(|m| {
        let line = m.lines().find(|l| l.contains("specula-guest-ram"))?.to_string();
        u64::from_str_radix(line.split('-').next()?, 16).ok()
    });
    let path = CString::new(format!("/proc/{pid}/mem")).expect("no NUL");
    // SAFETY: open with a valid path.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(format!("open /proc/{pid}/mem O_RDWR: {}", errno()));
    }
    let at = address.unwrap_or(0x7000_0000_0000);
    // SAFETY: pwrite of MARK from a live buffer; closing our own fd.
    let n = unsafe {
        let n = libc::pwrite(fd, MARK.as_ptr().cast(), MARK.len(), at as libc::off_t);
        libc::close(fd);
        n
    };
    if n > 0 {
        Ok(format!("wrote {n} bytes at {at:#x} through /proc/{pid}/mem"))
    } else {
        Err(format!("opened /proc/{pid}/mem, but pwrite at {at:#x}: {}", errno()))
    }
}

fn proc_fds(pid: &str) -> Result<String, String> {
    let entries = std::fs::read_dir(format!("/proc/{pid}/fd")).map_err(|e| format!("list /proc/{pid}/fd: {e}"))?;
    let mut last = String::from("no fd of the source could be re-opened read-write");
    for entry in entries.flatten() {
        let path = entry.path().display().to_string();
        let Ok(target) = std::fs::read_link(entry.path()) else { continue };
        if !target.to_string_lossy().contains("specula-guest-ram") {
            continue;
        }
        match reopen_and_write(&path) {
            Ok(how) => return Ok(how),
            Err(e) => last = e,
        }
    }
    Err(last)
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
            std::process::exit(1);
        }
    };
    // SAFETY: getuid cannot fail.
    println!("attacking as uid {}", unsafe { libc::getuid() });
    let raw = fd.as_raw_fd();
    report("mmap-shared-writable", map_and_write(raw, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED));
    report("mprotect", mprotect_upgrade(raw));
    report("pwrite", pwrite(raw));
    report("fallocate-punch-hole", punch(raw));
    report("ftruncate", truncate(raw));
    report("add-seals", add_seals(raw));
    report("fchmod-reopen", fchmod_reopen(raw));
    report("proc-pid-mem", proc_mem(pid));
    report("proc-pid-fd", proc_fds(pid));
    report("ptrace", ptrace(pid));
    println!("done");
}
