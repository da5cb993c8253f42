//! Grant requests: checks against RAM, policy and revokes, and the answer with sealed
//! O_RDONLY re-opens of the chunks they overlap.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;

use super::{error, lock, Chunk, Connection, GrantRecord, GrantState, Shared};
use crate::memfd;
use crate::protocol::{ErrorCode, Grant, Message, Range, ACCESS_READ_ONLY, MAX_FDS_PER_FRAME};

const PAGE: u64 = 4096;

/// Why a grant request is refused: an error reply.
fn check_grant_request(conn: &Connection, shared: &Shared, access: u32, ranges: &[Range]) -> Result<(), Message> {
    if access != ACCESS_READ_ONLY {
        return Err(error(ErrorCode::BadAccess, format!("access {access} refused: grants are read-only")));
    }
    if ranges.is_empty() {
        return Err(error(ErrorCode::Malformed, "a grant request needs at least one range"));
    }
    let revoked = lock(&shared.revoked);
    for r in ranges {
        let Some(end) = r.gpa.checked_add(r.len).filter(|_| r.len > 0) else {
            return Err(error(ErrorCode::OutOfRange, format!("range {:#x}+{:#x} is empty or overflows", r.gpa, r.len)));
        };
        if !r.gpa.is_multiple_of(PAGE) || !r.len.is_multiple_of(PAGE) {
            let text = format!("range {:#x}+{:#x} is not 4 KiB-aligned; grants are whole pages", r.gpa, r.len);
            return Err(error(ErrorCode::OutOfRange, text));
        }
        if !shared.ram_ranges.iter().any(|ram| r.gpa >= ram.gpa && end <= ram.gpa + ram.len) {
            let text = format!("range {:#x}+{:#x} is not within the source's RAM", r.gpa, r.len);
            return Err(error(ErrorCode::OutOfRange, text));
        }
        if let Some(allowed) = &shared.policy.ranges {
            if !allowed.iter().any(|a| r.gpa >= a.gpa && end <= a.gpa + a.len) {
                let text = format!("range {:#x}+{:#x} is outside the source's grant policy", r.gpa, r.len);
                return Err(error(ErrorCode::PolicyDenied, text));
            }
            // An fd exposes its whole chunk: every chunk the range touches must be allowed.
            let chunks = shared.chunks.iter().filter(|c| c.gpa < end && r.gpa < c.gpa + c.len);
            for c in chunks {
                if !allowed.iter().any(|a| c.gpa >= a.gpa && c.gpa + c.len <= a.gpa + a.len) {
                    let text = format!(
                        "range {:#x}+{:#x} lies in RAM chunk {:#x}+{:#x}, which the grant policy does not cover whole \
                         (an fd exposes its whole chunk)",
                        r.gpa, r.len, c.gpa, c.len
                    );
                    return Err(error(ErrorCode::PolicyDenied, text));
                }
            }
        }
        if let Some((_, gone)) =
            revoked.iter().find(|(uid, g)| *uid == conn.uid && r.gpa < g.gpa + g.len && g.gpa < end)
        {
            let text = format!(
                "range {:#x}+{:#x} overlaps {:#x}+{:#x}, revoked from uid {}; the source's policy does not grant it again",
                r.gpa, r.len, gone.gpa, gone.len, conn.uid
            );
            return Err(error(ErrorCode::PolicyDenied, text));
        }
    }
    Ok(())
}

/// The (chunk index, gpa, len) pieces a request asks for: one per chunk overlapped.
fn pieces(shared: &Shared, ranges: &[Range]) -> Vec<(usize, u64, u64)> {
    let mut pieces = Vec::new();
    for r in ranges {
        for (index, chunk) in shared.chunks.iter().enumerate() {
            let lo = r.gpa.max(chunk.gpa);
            let hi = (r.gpa + r.len).min(chunk.gpa + chunk.len);
            if lo < hi {
                pieces.push((index, lo, hi - lo));
            }
        }
    }
    pieces
}

/// Checks a grant request and answers it with O_RDONLY re-opens of the overlapped
/// chunks, sealed against future writes first; at most one frame's fds are open at once.
pub(super) fn grant(conn: &Connection, shared: &Shared, id: u32, access: u32, ranges: &[Range]) {
    if let Err(reply) = check_grant_request(conn, shared, access, ranges) {
        conn.send(id, &reply, &[]);
        return;
    }
    let pieces = pieces(shared, ranges);
    let limits = &shared.limits;
    if pieces.len() > limits.max_grants_per_request {
        let text =
            format!("{} pieces exceed the {} one request may ask for", pieces.len(), limits.max_grants_per_request);
        conn.send(id, &error(ErrorCode::TooLarge, text), &[]);
        return;
    }
    // Held while fds are made and recorded, so a revoke sees every grant it must cut.
    let _ops = lock(&shared.ops);
    let held = lock(&shared.grants).values().filter(|g| g.uid == conn.uid).count();
    if held + pieces.len() > limits.max_grants_per_uid {
        let text = format!(
            "uid {} has {held} grants that may still be held; {} more would exceed {} (the source must revoke some)",
            conn.uid,
            pieces.len(),
            limits.max_grants_per_uid
        );
        conn.send(id, &error(ErrorCode::TooLarge, text), &[]);
        return;
    }
    let batches: Vec<_> = pieces.chunks(MAX_FDS_PER_FRAME).collect();
    for (n, batch) in batches.iter().enumerate() {
        let mut grants = Vec::with_capacity(batch.len());
        let mut files = Vec::with_capacity(batch.len());
        for (i, &(chunk_index, gpa, len)) in batch.iter().enumerate() {
            let chunk = &shared.chunks[chunk_index];
            match open_grant_fd(chunk) {
                Ok(file) => files.push(file),
                Err(e) => {
                    let text = format!("cannot hand out chunk {:#x} read-only: {e}", chunk.gpa);
                    conn.send(id, &error(ErrorCode::Internal, text), &[]);
                    return;
                }
            }
            let grant_id = shared.next_grant.fetch_add(1, Ordering::SeqCst);
            grants.push(Grant { id: grant_id, gpa, len, fd_index: i as u32, offset: gpa - chunk.gpa });
        }
        let mut records = lock(&shared.grants);
        for (g, &(chunk, ..)) in grants.iter().zip(batch.iter()) {
            let record =
                GrantRecord { grant: *g, chunk, uid: conn.uid, connection: conn.id, state: GrantState::Active };
            records.insert(g.id, record);
        }
        drop(records);
        let fds: Vec<RawFd> = files.iter().map(AsRawFd::as_raw_fd).collect();
        if !conn.send(id, &Message::GrantReply { more: n + 1 < batches.len(), grants }, &fds) {
            return;
        }
    }
}

/// Seals the chunk against future writes, then opens a new O_RDONLY file description of
/// it (through /proc, so it is not the source's read-write description).
fn open_grant_fd(chunk: &Chunk) -> std::io::Result<File> {
    let file = chunk.current_file();
    memfd::seal_future_writes(&file)?;
    std::fs::OpenOptions::new().read(true).open(format!("/proc/self/fd/{}", file.as_raw_fd()))
}
