//! QEMU's RAM files: each memory backend's file found among QEMU's fds (by size, and
//! where sizes collide by sampled contents) and opened read-only through /proc.

use std::collections::HashMap;
use std::os::fd::OwnedFd;

use crate::error::QemuError;
use crate::hmp::parse_xp;
use crate::layout::{Backend, RamRange};
use crate::qmp::Qmp;

/// Candidate RAM files among QEMU's fds: regular files (memfds, /dev/shm or hugetlbfs
/// files), as (fd number, size). Sizes come from stat through the magic link, without
/// opening anything.
fn candidate_files(pid: u32) -> Result<Vec<(u32, u64)>, QemuError> {
    let dir = format!("/proc/{pid}/fd");
    let entries = std::fs::read_dir(&dir).map_err(|source| match source.kind() {
        std::io::ErrorKind::PermissionDenied => QemuError::Permission { pid, path: dir.clone(), source },
        _ => QemuError::ProcFds { pid, source },
    })?;
    let mut found = Vec::new();
    for entry in entries.flatten().take(1 << 16) {
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        match std::fs::metadata(entry.path()) {
            Ok(meta) if meta.is_file() => found.push((fd, meta.len())),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(QemuError::Permission { pid, path: entry.path().display().to_string(), source: e })
            }
            Err(_) => {}
        }
    }
    Ok(found)
}

/// Opens QEMU's fd `fd` read-only through /proc.
fn open_read_only(pid: u32, fd: u32) -> Result<OwnedFd, QemuError> {
    let path = format!("/proc/{pid}/fd/{fd}");
    std::fs::OpenOptions::new().read(true).open(&path).map(OwnedFd::from).map_err(|source| QemuError::Permission {
        pid,
        path,
        source,
    })
}

/// Finds and opens each backend's file: by size, and where sizes collide by comparing
/// sampled guest memory (`xp`) with each candidate.
pub(crate) fn open_backend_files(
    qmp: &Qmp,
    pid: u32,
    backends: &[&Backend],
    ranges: &[RamRange],
) -> Result<HashMap<String, OwnedFd>, QemuError> {
    let candidates = candidate_files(pid)?;
    let mut files = HashMap::new();
    let mut taken = Vec::new();
    for backend in backends {
        let same_size: Vec<u32> =
            candidates.iter().filter(|(fd, size)| *size == backend.size && !taken.contains(fd)).map(|c| c.0).collect();
        let fd = match same_size.as_slice() {
            [] => return Err(QemuError::NoBackendFile { id: backend.id.clone(), size: backend.size }),
            [only] => *only,
            several => pick_by_contents(qmp, pid, backend, ranges, several)?,
        };
        taken.push(fd);
        files.insert(backend.id.clone(), open_read_only(pid, fd)?);
    }
    Ok(files)
}

/// Samples pages of `backend` through the monitor and keeps the one candidate file that
/// holds the same bytes at the same offsets.
fn pick_by_contents(
    qmp: &Qmp,
    pid: u32,
    backend: &Backend,
    ranges: &[RamRange],
    fds: &[u32],
) -> Result<u32, QemuError> {
    use std::os::unix::fs::FileExt;
    let mut alive: Vec<u32> = fds.to_vec();
    let mine: Vec<&RamRange> = ranges.iter().filter(|r| r.backend == backend.id).collect();
    for sample in 0..64u64 {
        let Some(r) = mine.get(sample as usize % mine.len().max(1)) else { break };
        let pages = r.len / 4096;
        if pages == 0 {
            continue;
        }
        let page = (sample * 0x9e37_79b9) % pages;
        let gpa = r.gpa + page * 4096;
        let bytes = parse_xp(&qmp.hmp(&format!("xp /64gx {gpa:#x}"))?, 64)?;
        if bytes.iter().all(|&b| b == 0) {
            continue;
        }
        alive.retain(|&fd| {
            let Ok(file) = open_read_only(pid, fd).map(std::fs::File::from) else { return false };
            let mut here = vec![0u8; bytes.len()];
            file.read_exact_at(&mut here, r.offset + page * 4096).is_ok() && here == bytes
        });
        if alive.len() <= 1 {
            break;
        }
    }
    match alive.as_slice() {
        [one] => Ok(*one),
        [] => Err(QemuError::NoBackendFile { id: backend.id.clone(), size: backend.size }),
        _ => Err(QemuError::Ambiguous(backend.id.clone())),
    }
}
