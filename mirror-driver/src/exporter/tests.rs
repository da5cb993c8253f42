use super::chunk::data_segments;
use super::shared::forget_duplicate_exposures;
use super::*;
use crate::memfd;
use crate::protocol::VcpuRegs;

fn record(id: u64, uid: u32, chunk: usize, state: GrantState) -> (u64, GrantRecord) {
    let grant = Grant { id, gpa: chunk as u64 * 4096, len: 4096, fd_index: 0, offset: 0 };
    (id, GrantRecord { grant, chunk, uid, connection: 1, state })
}

#[test]
fn released_exposures_collapse_to_one_per_uid_and_chunk() {
    let mut grants: BTreeMap<u64, GrantRecord> = [
        record(1, 7, 0, GrantState::Released),
        record(2, 7, 0, GrantState::Released),
        record(3, 7, 0, GrantState::Disconnected),
        record(4, 8, 0, GrantState::Released),
        record(5, 7, 1, GrantState::Active),
        record(6, 7, 1, GrantState::Released),
    ]
    .into_iter()
    .collect();
    forget_duplicate_exposures(&mut grants);
    let left: Vec<u64> = grants.keys().copied().collect();
    // One record for uid 7 on chunk 0, uid 8's own, and the active grant covering chunk 1.
    assert_eq!(left, vec![1, 4, 5]);
}

#[test]
fn vcpu_snapshots_are_taken_at_most_once_per_interval() {
    let cache = SnapshotCache::new(Duration::from_millis(200));
    let taken = std::sync::atomic::AtomicU32::new(0);
    let take = || {
        let n = taken.fetch_add(1, Ordering::SeqCst);
        Ok(vec![VcpuRegs { index: n, ..Default::default() }])
    };
    let started = Instant::now();
    for _ in 0..1000 {
        assert_eq!(cache.get(take).unwrap()[0].index, 0, "later requests share the first snapshot");
    }
    if started.elapsed() < Duration::from_millis(200) {
        assert_eq!(taken.load(Ordering::SeqCst), 1, "1000 requests, one kick");
    }
    std::thread::sleep(Duration::from_millis(210));
    assert_eq!(cache.get(take).unwrap()[0].index, 1, "a stale snapshot is retaken");
    assert!(cache.get(|| Err(SourceVmError::Stopping)).is_ok(), "and then shared again");
}

#[test]
fn data_segments_skip_holes() {
    use std::os::unix::fs::FileExt;
    let file = memfd::create_ram_memfd(1 << 20).unwrap();
    file.write_at(b"a", 8192).unwrap();
    file.write_at(b"b", 65536 + 10).unwrap();
    let segments = data_segments(&file, 1 << 20).unwrap();
    assert_eq!(segments, vec![(8192, 4096), (65536, 4096)]);
    let empty = memfd::create_ram_memfd(1 << 20).unwrap();
    assert!(data_segments(&empty, 1 << 20).unwrap().is_empty());
}

/// A source with no vCPUs: pauses and snapshots succeed at once.
struct IdleSource;

impl SourceVm for IdleSource {
    fn vcpu_state(&self) -> Result<Vec<VcpuRegs>, SourceVmError> {
        Ok(Vec::new())
    }
    fn pause(&self) -> Result<(), SourceVmError> {
        Ok(())
    }
    fn resume(&self) {}
}

/// After `shutdown` the source unmaps its RAM: a discard or revoke that an API client
/// asks for later (its threads outlive the VM) must not write the old mapping.
#[test]
fn after_shutdown_no_discard_or_revoke_touches_the_source_ram() {
    const LEN: u64 = 2 << 20;
    let file = memfd::create_ram_memfd(LEN).unwrap();
    // SAFETY: a fresh shared mapping of our own memfd, unmapped at the end.
    let ram = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            LEN as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    assert_ne!(ram, libc::MAP_FAILED);
    // SAFETY: inside the mapping above.
    unsafe { ram.cast::<u8>().write(0x5a) };
    let socket = std::env::temp_dir().join(format!("specula-exporter-shutdown-{}.sock", std::process::id()));
    let region = ExportRegion { gpa: 0, len: LEN, file: Arc::new(file), host_addr: ram as u64 };
    let policy = ExportPolicy {
        // SAFETY: getuid cannot fail.
        allowed_uids: vec![unsafe { libc::getuid() }],
        ranges: None,
        regrant_after_revoke: true,
        allow_pause: false,
        allow_trace: false,
        allow_trace_patches: false,
    };
    let exporter =
        Exporter::start(&socket, vec![region], 1, policy, ExportLimits::default(), Arc::new(IdleSource)).unwrap();
    exporter.discard(0, 4096).unwrap();
    // SAFETY: inside the mapping above.
    assert_eq!(unsafe { ram.cast::<u8>().read() }, 0, "a discard before shutdown zeroes the page");
    // SAFETY: inside the mapping above.
    unsafe { ram.cast::<u8>().write(0x5a) };
    exporter.shutdown();
    assert!(matches!(exporter.discard(0, 4096), Err(ExportError::Stopping)));
    assert!(matches!(exporter.revoke(1), Err(ExportError::Stopping)));
    // SAFETY: inside the mapping above.
    assert_eq!(unsafe { ram.cast::<u8>().read() }, 0x5a, "nothing was written after shutdown");
    // SAFETY: unmapping the mapping made above.
    unsafe { libc::munmap(ram, LEN as usize) };
}
