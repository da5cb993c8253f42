//! The inspector daemon: attach to a source through the mirror device, place
//! every grant in the agent VM's mirror window as a read-only memslot, boot the
//! agent, react to source events, and answer analysis requests.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use std::time::{Duration, Instant};

use guest_images::agent::{self as abi, E820_MIRROR, MAX_PATTERN, MAX_WATCHES};
use mirror_driver::importer::{MappedGrant, SourceEvent};
use mirror_driver::protocol::{Range, VcpuRegs};
use vmm::devices::doorbell::Doorbell;
use vmm::devices::serial::SerialOutput;
use vmm::vstate::vm::Vm;
use vmm::{VmConfig, VmExit, Vmm};

use crate::agent_link::{AgentError, AgentLink};
use crate::agent_replies;
use crate::events::EventBus;
pub use crate::source::SourceSpec;
use crate::source::{Source, SourceError};
use crate::window::{MirrorWindow, WindowError};
use specula_os::wire;
use specula_os::{CheckReport, KernelInfo, Module, SyscallCheck, Vma};

/// Where source GPA 0 appears in the agent's physical address space (above its RAM
/// and the MMIO gap); source GPA `g` is at `WINDOW_BASE + g`.
pub const WINDOW_BASE: u64 = 1 << 32;
/// The agent's page tables map at most 512 GiB.
pub const MAX_WINDOW_END: u64 = 512 << 30;
/// Default agent RAM (room for the OS views' heap).
pub const DEFAULT_MEMORY: u64 = 192 << 20;
const PAGE: u64 = 4096;
/// Longest read served in one request.
pub const MAX_READ: u64 = 1 << 20;
/// Longest copy from the inspector's own mappings in one call (API bulk streams go in
/// pieces of this size).
pub const MAX_MAPPED_READ: u64 = 8 << 20;
/// Longest range hashed in one request (the agent hashes it in one command: ~2 s).
pub const MAX_HASH_LEN: u64 = 1 << 30;
/// A scan runs as agent commands of at most this many bytes each; between two, a
/// revoke can take its grant away and the scan stops with an error.
pub const SCAN_STEP: u64 = 256 << 20;
/// Longest a latency measurement may spin in the agent.
pub const MAX_LATENCY_MS: u64 = 10_000;

/// How the daemon runs.
#[derive(Clone)]
pub struct DaemonConfig {
    pub source: SourceSpec,
    /// Ranges to ask for; `None` asks for all of the source's RAM.
    pub ranges: Option<Vec<Range>>,
    pub control_socket: Option<PathBuf>,
    /// The HTTP API socket, and who may use it.
    pub api: Option<(PathBuf, crate::api::ApiAccess)>,
    pub memory: u64,
    pub serial: SerialOutput,
    /// Ranges to keep under an integrity watch, reported on stdout as they change.
    pub watches: Vec<Range>,
    pub watch_interval: Duration,
    pub kvm_path: PathBuf,
    /// Whether to subscribe to the source's dirty-page feed (where it has one).
    pub dirty_log: bool,
    /// Most bytes per second a scan may read, to bound what it costs the source (its
    /// memory bandwidth and caches); `None`: as fast as the agent goes.
    pub scan_rate_limit: Option<u64>,
}

/// Failures of the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("attaching to the source")]
    Source(#[from] SourceError),
    #[error("the source's RAM ends at {0:#x}, beyond the {MAX_WINDOW_END:#x} the mirror window can map")]
    SourceTooLarge(u64),
    #[error("range {gpa:#x}+{len:#x} is not 4 KiB-aligned; memslots map whole pages")]
    Unaligned { gpa: u64, len: u64 },
    #[error("building the agent VM")]
    Build(#[from] vmm::BuildError),
    #[error("KVM cannot isolate the mirror window")]
    Kvm(#[from] vmm::vstate::vm::VmError),
    #[error("placing the grants in the mirror window")]
    Window(#[from] WindowError),
    #[error("the agent")]
    Agent(#[from] AgentError),
    #[error("cannot serve the control socket")]
    Control(#[source] std::io::Error),
}

/// Failures of one analysis request.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("range {gpa:#x}+{len:#x} is not granted (revoked, released, or never asked for)")]
    NotGranted { gpa: u64, len: u64 },
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("agent: {0}")]
    Agent(#[from] AgentError),
    /// The whole chain in one message: these errors end up as one reply line.
    #[error("{}", vmm::error_chain(.0))]
    Source(SourceError),
    #[error("the agent's reply is not credible: {0}")]
    BadReply(String),
    /// An OS view failed in the agent (the kernel was not found, a structure is corrupt...).
    #[error("OS view: {0}")]
    Os(String),
}

impl From<specula_os::Error> for InspectError {
    /// A reply that does not decode.
    fn from(e: specula_os::Error) -> Self {
        InspectError::BadReply(e.to_string())
    }
}

impl From<SourceError> for InspectError {
    fn from(e: SourceError) -> Self {
        InspectError::Source(e)
    }
}

/// Fails unless every byte of `[gpa, gpa + len)` lies in a live grant.
/// The address of kernel symbol `name` in `symbols` (from [`Inspector::os_symbols`]).
pub fn kernel_symbol(symbols: &[wire::SymbolRecord], name: &str) -> Result<u64, InspectError> {
    symbols
        .iter()
        .find(|s| s.name == name)
        .map(|s| s.address)
        .ok_or_else(|| InspectError::Os(format!("no {name} in kallsyms")))
}

fn covered(grants: &GrantMap, gpa: u64, len: u64) -> Result<(), InspectError> {
    let end = gpa.checked_add(len).filter(|_| len > 0).ok_or_else(|| InspectError::BadRequest("empty range".into()))?;
    let mut spans: Vec<(u64, u64)> =
        grants.values().map(|g| (g.mapped.grant.gpa, g.mapped.grant.gpa + g.mapped.grant.len)).collect();
    spans.sort_unstable();
    let mut reached = gpa;
    for (lo, hi) in spans {
        if lo > reached {
            break;
        }
        reached = reached.max(hi);
        if reached >= end {
            return Ok(());
        }
    }
    Err(InspectError::NotGranted { gpa, len })
}

struct LiveGrant {
    mapped: MappedGrant,
}

/// Live grants by id. Requests hold a read guard from their `check_granted` until the
/// agent is done, so a revoke (which takes the write guard to replace the grant's pages
/// with zeros) never pulls memory from under a running command.
type GrantMap = BTreeMap<u64, LiveGrant>;

/// A running inspector.
pub struct Inspector {
    link: AgentLink,
    vm: Arc<Vm>,
    grants: RwLock<GrantMap>,
    source: Box<dyn Source>,
    source_gone: AtomicBool,
    window_len: u64,
    /// The memslots the grants sit in (one per run of adjacent grants).
    window: MirrorWindow,
    /// How the source's dirty-page feed learns of writes, when it has one: polled
    /// watches then use the feed.
    dirty_feed: Option<mirror_driver::protocol::DirtyMechanism>,
    /// See [`DaemonConfig::scan_rate_limit`].
    scan_rate_limit: Option<u64>,
    /// Each watch, by id (its agent slot).
    watches: Mutex<Vec<WatchState>>,
    events: EventBus,
}

/// Changes a polled watch kept: the pages, and the event that told them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub seq: u64,
    /// Pages written since the last report: changed, or restored (below).
    pub pages: Vec<u64>,
    /// Of `pages`, those the source wrote whose contents are back to what was last seen:
    /// a modify-then-restore between two checks (dirty-log watches only).
    pub restored: Vec<u64>,
}

/// How a polled watch learns what changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchMode {
    /// Every check re-hashes every watched page.
    Hash,
    /// The source's dirty-page feed says which pages were written; only those are
    /// re-hashed, and a page written and restored between two checks is still reported.
    DirtyLog,
}

impl WatchMode {
    /// The API's name for it.
    pub fn name(self) -> &'static str {
        match self {
            WatchMode::Hash => "hash",
            WatchMode::DirtyLog => "dirty-log",
        }
    }
}

/// Findings kept per watch (the oldest go first).
pub const MAX_FINDINGS: usize = 256;

struct WatchState {
    range: Range,
    polled: bool,
    deleted: bool,
    findings: VecDeque<Finding>,
    mode: WatchMode,
    /// Pages the dirty-log feed reported written since the last poll.
    written: BTreeSet<u64>,
    /// Pages that may have been written (a coalesced report, or the first report after the
    /// watch was set, which may predate it): re-hashed, reported only if changed.
    maybe_written: BTreeSet<u64>,
    /// Whether a dirty report arrived since the watch was set.
    primed: bool,
}

impl WatchState {
    fn new(range: Range, polled: bool, mode: WatchMode) -> Self {
        Self {
            range,
            polled,
            deleted: false,
            findings: VecDeque::new(),
            mode,
            written: BTreeSet::new(),
            maybe_written: BTreeSet::new(),
            primed: false,
        }
    }

    /// The watched pages that `range` touches.
    fn pages_in(&self, range: Range) -> std::iter::StepBy<std::ops::Range<u64>> {
        let lo = range.gpa.max(self.range.gpa) & !(PAGE - 1);
        let hi = range.gpa.saturating_add(range.len).min(self.range.gpa + self.range.len);
        (lo..hi).step_by(PAGE as usize)
    }

    /// Records the pages of a range the source's VMM wrote itself (not in the dirty log).
    fn note_host_write(&mut self, range: Range) {
        let pages = self.pages_in(range);
        self.written.extend(pages);
    }

    /// Records the pages of `runs` inside this watch.
    fn note_written(&mut self, coalesced: bool, runs: &[Range]) {
        let exact = !coalesced && self.primed;
        self.primed = true;
        for &r in runs {
            let pages = self.pages_in(r);
            if exact {
                self.written.extend(pages);
            } else {
                self.maybe_written.extend(pages);
            }
        }
    }
}

fn say(line: std::fmt::Arguments) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "inspector: {line}");
    let _ = out.flush();
}

impl Inspector {
    /// Whether the source has gone away (the inspector keeps serving what it maps).
    pub fn source_gone(&self) -> bool {
        self.source_gone.load(Ordering::SeqCst)
    }

    /// Live grants as (id, gpa, len).
    pub fn grants(&self) -> Vec<(u64, u64, u64)> {
        self.read_grants().values().map(|g| (g.mapped.grant.id, g.mapped.grant.gpa, g.mapped.grant.len)).collect()
    }

    /// Memslots of the agent VM that exist in KVM now (its RAM and the mirror window).
    pub fn memslots(&self) -> u32 {
        self.vm.memslot_count()
    }

    fn read_grants(&self) -> RwLockReadGuard<'_, GrantMap> {
        self.grants.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_grants(&self) -> RwLockWriteGuard<'_, GrantMap> {
        self.grants.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks that every byte of the range is covered by a live grant; the guard it
    /// returns keeps it so until dropped.
    fn check_granted(&self, gpa: u64, len: u64) -> Result<RwLockReadGuard<'_, GrantMap>, InspectError> {
        let grants = self.read_grants();
        covered(&grants, gpa, len)?;
        Ok(grants)
    }

    /// Fails unless every byte of the range is granted now.
    pub fn check_range(&self, gpa: u64, len: u64) -> Result<(), InspectError> {
        covered(&self.read_grants(), gpa, len)
    }

    /// The bytes of a granted range, read by the agent.
    pub fn read(&self, gpa: u64, len: u64) -> Result<Vec<u8>, InspectError> {
        if len > MAX_READ {
            return Err(InspectError::BadRequest(format!("reads are limited to {MAX_READ} bytes")));
        }
        let _granted = self.check_granted(gpa, len)?;
        let done = self.link.call(abi::OP_READ, [gpa, len, 0, 0], &[])?;
        Ok(done.data(0, len)?)
    }

    /// The window's bytes as the agent reads them, whether granted now or revoked since:
    /// an audit of what a compromised agent could see (a revoked grant reads as zeros).
    /// The range must lie inside one memslot of the window.
    pub fn audit_read(&self, gpa: u64, len: u64) -> Result<Vec<u8>, InspectError> {
        if len == 0 || len > MAX_READ {
            return Err(InspectError::BadRequest(format!("audit reads are 1 to {MAX_READ} bytes")));
        }
        if !self.window.contains(gpa, len) {
            return Err(InspectError::BadRequest(format!("{gpa:#x}+{len:#x} is not inside one memslot of the window")));
        }
        // The read guard keeps revokes out while the agent reads.
        let _grants = self.read_grants();
        let done = self.link.call(abi::OP_READ, [gpa, len, 0, 0], &[])?;
        Ok(done.data(0, len)?)
    }

    /// Copies a granted range straight from this process's read-only mappings of the
    /// grants (bulk transfer: no agent round trip, no copy through its data slot). The
    /// grant table stays locked while copying, so a revoke cannot unmap under it.
    pub fn read_mapped(&self, gpa: u64, len: u64) -> Result<Vec<u8>, InspectError> {
        if len > MAX_MAPPED_READ {
            return Err(InspectError::BadRequest(format!("mapped reads are limited to {MAX_MAPPED_READ} bytes")));
        }
        let grants = self.check_granted(gpa, len)?;
        let mut out = vec![0u8; len as usize];
        let end = gpa + len;
        for g in grants.values() {
            let (lo, hi) = (gpa.max(g.mapped.grant.gpa), end.min(g.mapped.grant.gpa + g.mapped.grant.len));
            if lo >= hi {
                continue;
            }
            let src = g.mapped.host_addr() + (lo - g.mapped.grant.gpa);
            // SAFETY: lo..hi lies inside this grant, whose PROT_READ mapping lives while the
            // grant table is locked; the source may change the bytes under us (a snapshot of
            // racing bytes is what a reader of a running VM gets), and `out` is ours.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    src as *const u8,
                    out.as_mut_ptr().add((lo - gpa) as usize),
                    (hi - lo) as usize,
                )
            };
        }
        Ok(out)
    }

    /// xxh64 and SHA-256 of a granted range, computed by the agent.
    pub fn hash(&self, gpa: u64, len: u64) -> Result<(u64, [u8; 32]), InspectError> {
        if len > MAX_HASH_LEN {
            return Err(InspectError::BadRequest(format!("hashes cover at most {} MiB", MAX_HASH_LEN >> 20)));
        }
        let _granted = self.check_granted(gpa, len)?;
        let done = self.link.call(abi::OP_HASH, [gpa, len, 0, 0], &[])?;
        let digest = done.data(0, 32)?.try_into().expect("32 bytes");
        Ok((done.result[0], digest))
    }

    /// Every GPA in the range where `pattern` occurs: (total, the first ones stored, at
    /// most [`abi::MAX_SCAN_HITS`]). Runs in steps of [`SCAN_STEP`] bytes.
    pub fn scan(&self, gpa: u64, len: u64, pattern: &[u8]) -> Result<(u64, Vec<u64>), InspectError> {
        if pattern.is_empty() || pattern.len() > MAX_PATTERN {
            return Err(InspectError::BadRequest(format!("patterns are 1 to {MAX_PATTERN} bytes")));
        }
        covered(&self.read_grants(), gpa, len)?;
        let end = gpa + len;
        let (mut total, mut hits) = (0u64, Vec::new());
        let mut step_start = gpa;
        // Under a rate limit, steps of a tenth of a second's budget, each followed by the
        // agent idling until the average is back under the limit.
        let step = self.scan_rate_limit.map_or(SCAN_STEP, |rate| (rate / 10).clamp(PAGE, SCAN_STEP));
        let started = Instant::now();
        while step_start < end {
            if let Some(rate) = self.scan_rate_limit {
                let due = Duration::from_secs_f64((step_start - gpa) as f64 / rate as f64);
                std::thread::sleep(due.saturating_sub(started.elapsed()));
            }
            // Each step reads pattern.len() - 1 bytes past its share, so no match that
            // straddles two shares is lost.
            let starts_end = (step_start + step).min(end);
            let step_len = (starts_end + pattern.len() as u64 - 1).min(end) - step_start;
            let (step_total, step_hits) = self.scan_step(step_start, step_len, pattern)?;
            total += step_total;
            let room = abi::MAX_SCAN_HITS - hits.len();
            hits.extend(step_hits.into_iter().take(room));
            step_start = starts_end;
        }
        Ok((total, hits))
    }

    /// One scan command over `[gpa, gpa + len)`. A match that starts at or after the step's
    /// share of the range (`len - pattern.len() + 1` bytes) would not fit: no match is
    /// counted by two steps.
    fn scan_step(&self, gpa: u64, len: u64, pattern: &[u8]) -> Result<(u64, Vec<u64>), InspectError> {
        let _granted = self.check_granted(gpa, len)?;
        let done = self.link.call(abi::OP_SCAN, [gpa, len, pattern.len() as u64, 0], pattern)?;
        agent_replies::scan_matches(&done, gpa, len, pattern.len() as u64)
    }

    /// Starts an integrity watch over a granted, page-aligned range; returns its id. A
    /// `polled` watch is checked by the inspector every watch interval, its changes kept
    /// as findings and published as events; the others are checked on request.
    pub fn watch(&self, gpa: u64, len: u64, polled: bool) -> Result<usize, InspectError> {
        if !gpa.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) || len == 0 || len > abi::MAX_WATCH_LEN {
            return Err(InspectError::BadRequest(format!(
                "watched ranges are whole pages, at most {} MiB",
                abi::MAX_WATCH_LEN >> 20
            )));
        }
        let _granted = self.check_granted(gpa, len)?;
        let mut watches = self.lock_watches();
        // A deleted watch's agent slot is reused.
        let id = match watches.iter().position(|w| w.deleted) {
            Some(free) => free,
            None if watches.len() < MAX_WATCHES => watches.len(),
            None => return Err(InspectError::BadRequest(format!("at most {MAX_WATCHES} watches"))),
        };
        self.link.call(abi::OP_WATCH_SET, [id as u64, gpa, len, 0], &[])?;
        let mode = if polled { self.polled_watch_mode() } else { WatchMode::Hash };
        let state = WatchState::new(Range { gpa, len }, polled, mode);
        if id == watches.len() {
            watches.push(state);
        } else {
            watches[id] = state;
        }
        Ok(id)
    }

    fn lock_watches(&self) -> std::sync::MutexGuard<'_, Vec<WatchState>> {
        self.watches.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops watch `id`; its agent slot may be reused.
    pub fn delete_watch(&self, id: usize) -> Result<(), InspectError> {
        match self.lock_watches().get_mut(id) {
            Some(w) if !w.deleted => {
                w.deleted = true;
                Ok(())
            }
            _ => Err(InspectError::NotFound(format!("no watch {id}"))),
        }
    }

    /// Every live watch: (id, range, polled, findings kept, mode).
    pub fn watches(&self) -> Vec<(usize, Range, bool, usize, WatchMode)> {
        let watches = self.lock_watches();
        watches
            .iter()
            .enumerate()
            .filter(|(_, w)| !w.deleted)
            .map(|(id, w)| (id, w.range, w.polled, w.findings.len(), w.mode))
            .collect()
    }

    /// How the source's dirty-page feed learns of writes; None without a feed.
    pub fn dirty_feed(&self) -> Option<mirror_driver::protocol::DirtyMechanism> {
        self.dirty_feed
    }

    /// The mode a new polled watch runs in.
    pub fn polled_watch_mode(&self) -> WatchMode {
        if self.dirty_feed.is_some() {
            WatchMode::DirtyLog
        } else {
            WatchMode::Hash
        }
    }

    /// Re-hashes only `pages` (sorted) of watch `id` in the agent; returns those that changed.
    fn check_pages(&self, id: usize, range: Range, pages: &[u64]) -> Result<Vec<u64>, InspectError> {
        let _granted = self.check_granted(range.gpa, range.len)?;
        let mut changed = Vec::new();
        for batch in pages.chunks(abi::MAX_CHECK_PAGES) {
            let input: Vec<u8> = batch.iter().flat_map(|p| p.to_le_bytes()).collect();
            let done = self.link.call(abi::OP_WATCH_CHECK_PAGES, [id as u64, batch.len() as u64, 0, 0], &input)?;
            changed.extend(agent_replies::changed_of_asked(&done, batch)?);
        }
        Ok(changed)
    }

    /// What a dirty-log watch has to report since the last poll: (changed or restored
    /// pages, the restored ones); nothing is asked of the agent when nothing was written.
    fn poll_dirty_watch(&self, id: usize, range: Range) -> Result<(Vec<u64>, Vec<u64>), InspectError> {
        let (written, maybe) = {
            let mut watches = self.lock_watches();
            let Some(w) = watches.get_mut(id) else { return Ok((Vec::new(), Vec::new())) };
            (std::mem::take(&mut w.written), std::mem::take(&mut w.maybe_written))
        };
        if written.is_empty() && maybe.is_empty() {
            // Nothing written; a revoked range fails here as it would when hashed.
            covered(&self.read_grants(), range.gpa, range.len)?;
            return Ok((Vec::new(), Vec::new()));
        }
        let pages: Vec<u64> = written.union(&maybe).copied().collect();
        let changed: BTreeSet<u64> = self.check_pages(id, range, &pages)?.into_iter().collect();
        let restored: Vec<u64> = written.difference(&changed).copied().collect();
        let reported: Vec<u64> = changed.union(&restored.iter().copied().collect()).copied().collect();
        Ok((reported, restored))
    }

    /// The findings kept for a polled watch, oldest first.
    pub fn findings(&self, id: usize) -> Result<Vec<Finding>, InspectError> {
        match self.lock_watches().get(id) {
            Some(w) if !w.deleted => Ok(w.findings.iter().cloned().collect()),
            _ => Err(InspectError::NotFound(format!("no watch {id}"))),
        }
    }

    /// Pages of watch `id` that changed since the last check (or since it was set). Fails,
    /// without asking the agent, once any of the watched range is no longer granted.
    pub fn check(&self, id: usize) -> Result<Vec<u64>, InspectError> {
        let range = self.lock_watches().get(id).filter(|w| !w.deleted).map(|w| w.range);
        let range = range.ok_or_else(|| InspectError::NotFound(format!("no watch {id}")))?;
        let _granted = self.check_granted(range.gpa, range.len)?;
        let done = self.link.call(abi::OP_WATCH_CHECK, [id as u64, 0, 0, 0], &[])?;
        agent_replies::changed_in_watch(&done, id, range)
    }

    /// Checks every polled watch once: records and publishes what changed; a watch whose
    /// check fails (its range revoked) stops being polled, with one `watch.failed` event.
    fn poll_watches(&self) {
        let polled: Vec<(usize, Range, WatchMode)> = self
            .lock_watches()
            .iter()
            .enumerate()
            .filter(|(_, w)| w.polled && !w.deleted)
            .map(|(id, w)| (id, w.range, w.mode))
            .collect();
        for (id, range, mode) in polled {
            let outcome = match mode {
                WatchMode::Hash => self.check(id).map(|pages| (pages, Vec::new())),
                WatchMode::DirtyLog => self.poll_dirty_watch(id, range),
            };
            match outcome {
                Ok((pages, restored)) if !pages.is_empty() => {
                    let list: Vec<String> = pages
                        .iter()
                        .take(8)
                        .map(|p| if restored.contains(p) { format!("{p:#x}(restored)") } else { format!("{p:#x}") })
                        .collect();
                    say(format_args!(
                        "integrity watch {id}: {} page(s) of {:#x}+{:#x} changed: {}",
                        pages.len(),
                        range.gpa,
                        range.len,
                        list.join(" ")
                    ));
                    // The finding is recorded under the same lock the event is published
                    // in, so a subscriber that asks for findings on seeing the event finds it.
                    let mut watches = self.lock_watches();
                    let seq = self.events.publish(
                        "watch.changed",
                        serde_json::json!({
                            "watch": id, "gpa": range.gpa, "len": range.len, "pages": pages,
                            "restored": restored, "mode": mode.name(),
                        }),
                    );
                    if let Some(w) = watches.get_mut(id) {
                        if w.findings.len() == MAX_FINDINGS {
                            w.findings.pop_front();
                        }
                        w.findings.push_back(Finding { seq, pages, restored });
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    say(format_args!("integrity watch {id}: {e}"));
                    self.events.publish("watch.failed", serde_json::json!({ "watch": id, "error": e.to_string() }));
                    if let Some(w) = self.lock_watches().get_mut(id) {
                        w.polled = false;
                    }
                }
            }
        }
    }

    /// Runs an OS command: the granted ranges go first in its data area (the agent reads
    /// nothing else), the grants stay locked until it is done; a source whose kernel the
    /// agent has not found yet is discovered first. Returns the reply bytes.
    fn os_call(&self, op: u32, args: [u64; 4]) -> Result<Vec<u8>, InspectError> {
        self.os_call_with(op, args, &[])
    }

    /// [`Inspector::os_call`] with `extra` input after the granted ranges.
    fn os_call_with(&self, op: u32, args: [u64; 4], extra: &[u8]) -> Result<Vec<u8>, InspectError> {
        let grants = self.read_grants();
        let mut input = Vec::with_capacity(4 + grants.len() * 16 + extra.len());
        input.extend_from_slice(&(grants.len() as u32).to_le_bytes());
        for g in grants.values() {
            input.extend_from_slice(&g.mapped.grant.gpa.to_le_bytes());
            input.extend_from_slice(&g.mapped.grant.len.to_le_bytes());
        }
        input.extend_from_slice(extra);
        let run = |op| -> Result<Vec<u8>, AgentError> {
            let done = self.link.call(op, args, &input)?;
            done.data(0, done.result[0])
        };
        let reply = match run(op) {
            Err(AgentError::NotDiscovered) => run(abi::OP_OS_DISCOVER).and_then(|_| run(op)),
            other => other,
        };
        reply.map_err(|e| match e {
            AgentError::Os(text) => InspectError::Os(text),
            other => InspectError::Agent(other),
        })
    }

    /// Finds the source's Linux kernel again (after a reboot, say) and describes it.
    pub fn os_discover(&self) -> Result<KernelInfo, InspectError> {
        Ok(wire::decode_kernel(&self.os_call(abi::OP_OS_DISCOVER, [0; 4])?)?)
    }

    /// The source's kernel: release, KASLR offset, paging, CPUs.
    pub fn os_kernel(&self) -> Result<KernelInfo, InspectError> {
        Ok(wire::decode_kernel(&self.os_call(abi::OP_OS_KERNEL, [0; 4])?)?)
    }

    /// The source's processes, from its task list.
    pub fn os_processes(&self) -> Result<Vec<wire::DecodedProcess>, InspectError> {
        Ok(wire::decode_processes(&self.os_call(abi::OP_OS_PROCESSES, [0; 4])?)?)
    }

    /// The source's loaded modules.
    pub fn os_modules(&self) -> Result<Vec<Module>, InspectError> {
        Ok(wire::decode_modules(&self.os_call(abi::OP_OS_MODULES, [0; 4])?)?)
    }

    /// The system call table check: entries that do not point into the kernel's text.
    pub fn os_syscall_check(&self) -> Result<SyscallCheck, InspectError> {
        Ok(wire::decode_syscalls(&self.os_call(abi::OP_OS_SYSCALLS, [0; 4])?)?)
    }

    /// The rootkit checks `which` selects (bits of `specula_os::checks::select`).
    pub fn os_checks(&self, which: u64) -> Result<CheckReport, InspectError> {
        if which == 0 || which & !specula_os::checks::select::ALL != 0 {
            return Err(InspectError::BadRequest(format!("no such set of checks: {which:#x}")));
        }
        // The syscall-entry check needs each vCPU's LSTAR, a register: the source reads
        // them (QEMU through a device-state snapshot) and the agent judges them.
        let (lstars, lstar_error) = if which & specula_os::checks::select::MSRS != 0 {
            match self.cpu_msrs() {
                Ok(msrs) => (Some(msrs), None),
                Err(e) => (None, Some(vmm::error_chain(&e))),
            }
        } else {
            (None, None)
        };
        let mut extra = Vec::new();
        if let Some(msrs) = &lstars {
            extra.extend_from_slice(&(msrs.len() as u32).to_le_bytes());
            for m in msrs {
                extra.extend_from_slice(&m.cpu.to_le_bytes());
                extra.extend_from_slice(&m.lstar.to_le_bytes());
            }
        }
        let flag = u64::from(lstars.is_some());
        let mut report = wire::decode_checks(&self.os_call_with(abi::OP_OS_CHECKS, [which, flag, 0, 0], &extra)?)?;
        if let (Some(why), Some(run)) = (lstar_error, report.runs.iter_mut().find(|r| r.check == "msrs")) {
            run.error = Some(why);
        }
        let ran: u64 = report
            .runs
            .iter()
            .filter_map(|r| specula_os::checks::select::NAMES.iter().position(|n| *n == r.check))
            .fold(0, |m, bit| m | 1 << bit);
        if ran != which || report.runs.len() != which.count_ones() as usize {
            return Err(InspectError::BadReply(format!("the agent ran checks {ran:#x}, not {which:#x}")));
        }
        Ok(report)
    }

    /// Every kernel symbol (kallsyms, as the agent decoded it), fetched a page at a time.
    pub fn os_symbols(&self) -> Result<Vec<wire::SymbolRecord>, InspectError> {
        let mut out: Vec<wire::SymbolRecord> = Vec::new();
        loop {
            let reply = self.os_call(abi::OP_OS_SYMBOLS, [out.len() as u64, u64::MAX, 0, 0])?;
            let (page, total) = wire::decode_symbols(&reply)?;
            if page.is_empty() && (out.len() as u64) < total {
                return Err(InspectError::BadReply(format!("an empty page at symbol {} of {total}", out.len())));
            }
            out.extend(page);
            if out.len() as u64 >= total {
                out.truncate(total as usize);
                return Ok(out);
            }
        }
    }

    /// The kernel's BTF blob (`__start_BTF`..`__stop_BTF`), read through the agent.
    pub fn os_btf(&self, symbols: &[wire::SymbolRecord]) -> Result<Vec<u8>, InspectError> {
        let (start, stop) = (kernel_symbol(symbols, "__start_BTF")?, kernel_symbol(symbols, "__stop_BTF")?);
        let len = stop
            .checked_sub(start)
            .filter(|&l| l > 0 && l <= specula_os::btf::MAX_BTF_BYTES as u64)
            .ok_or_else(|| InspectError::Os(format!("BTF spans {start:#x}..{stop:#x}")))?;
        let mut blob = Vec::with_capacity(len as usize);
        while (blob.len() as u64) < len {
            let n = (len - blob.len() as u64).min(MAX_READ);
            blob.extend(self.os_read_virtual(0, start + blob.len() as u64, n)?);
        }
        Ok(blob)
    }

    /// The memory areas of process `pid`.
    pub fn os_vmas(&self, pid: u32) -> Result<Vec<Vma>, InspectError> {
        Ok(wire::decode_vmas(&self.os_call(abi::OP_OS_VMAS, [u64::from(pid), 0, 0, 0])?)?)
    }

    /// `len` bytes of process `pid`'s virtual memory at `va` (pid 0: the kernel's).
    pub fn os_read_virtual(&self, pid: u32, va: u64, len: u64) -> Result<Vec<u8>, InspectError> {
        if len == 0 || len > MAX_READ {
            return Err(InspectError::BadRequest(format!("virtual reads are 1 to {MAX_READ} bytes")));
        }
        let bytes = self.os_call(abi::OP_OS_READ_VIRTUAL, [u64::from(pid), va, len, 0])?;
        if bytes.len() as u64 != len {
            return Err(InspectError::BadReply(format!("{} bytes for a {len}-byte read", bytes.len())));
        }
        Ok(bytes)
    }

    /// The inspector's event stream.
    pub fn events(&self) -> &EventBus {
        &self.events
    }

    /// Has the agent try to write `byte` into the window at `gpa`; returns what it reads back.
    pub fn write_probe(&self, gpa: u64, byte: u8) -> Result<u8, InspectError> {
        let _granted = self.check_granted(gpa, 1)?;
        let done = self.link.call(abi::OP_WRITE_PROBE, [gpa, u64::from(byte), 0, 0], &[])?;
        Ok(done.result[0] as u8)
    }

    /// Coherence latency samples in TSC cycles: the agent spins on the (sequence, TSC)
    /// pair the source publishes at `gpa` and records how long each new stamp took to show.
    /// A sample is negative where the agent's TSC read lags the source's by more than that.
    pub fn latency(&self, gpa: u64, count: u64, timeout_ms: u64) -> Result<Vec<i64>, InspectError> {
        if count == 0 || count > abi::MAX_LATENCY_SAMPLES {
            return Err(InspectError::BadRequest(format!("1 to {} samples", abi::MAX_LATENCY_SAMPLES)));
        }
        if timeout_ms > MAX_LATENCY_MS {
            return Err(InspectError::BadRequest(format!("at most {MAX_LATENCY_MS} ms")));
        }
        let _granted = self.check_granted(gpa, 16)?;
        // The agent's deadline in TSC cycles, assuming at most 10 GHz so it is never too short.
        let timeout_cycles = timeout_ms.saturating_mul(10_000_000);
        let done = self.link.call(abi::OP_LATENCY, [gpa, count, timeout_cycles, 0], &[])?;
        Ok(done.u64s(0, done.result[0], count)?.into_iter().map(|c| c as i64).collect())
    }

    /// The system-call MSRs of every vCPU, from the source (bounded: at most
    /// [`abi::MAX_OS_VCPUS`]).
    pub fn cpu_msrs(&self) -> Result<Vec<mirror_driver::qemu_state::CpuMsrs>, InspectError> {
        if self.source_gone() {
            return Err(InspectError::Source(SourceError::Unsupported("the source is gone")));
        }
        let msrs = self.source.cpu_msrs()?;
        if msrs.len() > abi::MAX_OS_VCPUS {
            return Err(InspectError::BadRequest(format!("{} vCPUs, more than {}", msrs.len(), abi::MAX_OS_VCPUS)));
        }
        Ok(msrs)
    }

    /// The source's vCPU registers (for page-table walks).
    pub fn vcpus(&self) -> Result<Vec<VcpuRegs>, InspectError> {
        if self.source_gone() {
            return Err(InspectError::BadRequest("the source is gone".into()));
        }
        Ok(self.source.vcpu_state()?)
    }

    /// Pauses (`true`) or resumes the source's vCPUs, where the source lets the inspector.
    pub fn set_paused(&self, paused: bool) -> Result<(), InspectError> {
        if self.source_gone() {
            return Err(InspectError::BadRequest("the source is gone".into()));
        }
        Ok(self.source.set_paused(paused)?)
    }

    /// What the inspector is attached to: `specula` or `qemu`.
    pub fn source_kind(&self) -> &'static str {
        self.source.kind()
    }

    /// Size of the mirror window (the source's highest RAM address).
    pub fn window_len(&self) -> u64 {
        self.window_len
    }

    /// Handles a source event.
    fn on_event(&self, event: SourceEvent) {
        match event {
            SourceEvent::Revoke { grant_id, nonce } => {
                let removed = self.write_grants().remove(&grant_id);
                if let Some(live) = removed {
                    let g = live.mapped.grant;
                    // Dropping the grant puts zero pages in its place inside the run's memslot
                    // (KVM's mappings of the old pages are zapped before that returns); all of
                    // it happens before the acknowledgement.
                    drop(live);
                    say(format_args!(
                        "grant {grant_id} ({:#x}+{:#x}) revoked: its pages now read as zeros",
                        g.gpa, g.len
                    ));
                    self.events
                        .publish("grant.revoked", serde_json::json!({ "grant": grant_id, "gpa": g.gpa, "len": g.len }));
                }
                if let Err(e) = self.source.acknowledge_revoke(grant_id, nonce) {
                    say(format_args!("cannot acknowledge the revocation of grant {grant_id}: {e}"));
                }
            }
            SourceEvent::Dirty { coalesced, mut ranges } => {
                // The source's runs may overlap (a hostile one's all of them): merged, each
                // watched page is recorded at most once per report.
                mirror_driver::dirty::normalize(&mut ranges);
                for w in self.lock_watches().iter_mut().filter(|w| w.mode == WatchMode::DirtyLog && !w.deleted) {
                    w.note_written(coalesced, &ranges);
                }
            }
            SourceEvent::Discard { gpa, len } => {
                // The source's VMM zeroed these pages itself: KVM's dirty log does not see it.
                for w in self.lock_watches().iter_mut().filter(|w| w.mode == WatchMode::DirtyLog && !w.deleted) {
                    w.note_host_write(Range { gpa, len });
                }
                say(format_args!("source discarded {gpa:#x}+{len:#x}; those pages now read as zeros"));
                self.events.publish("source.discarded", serde_json::json!({ "gpa": gpa, "len": len }));
            }
            SourceEvent::Paused => {
                say(format_args!("source paused"));
                self.events.publish("source.paused", serde_json::json!({}));
            }
            SourceEvent::Resumed => {
                say(format_args!("source resumed"));
                self.events.publish("source.resumed", serde_json::json!({}));
            }
            SourceEvent::Gone => {
                self.source_gone.store(true, Ordering::SeqCst);
                self.events.publish("source.gone", serde_json::json!({}));
                if self.source.contents_outlive_the_source() {
                    say(format_args!(
                        "source gone; still serving {} grants with their last contents",
                        self.read_grants().len()
                    ));
                } else {
                    // Its memory is gone: the grants are released (dropping one leaves zero
                    // pages in its memslot), so reads there are refused by name instead of
                    // the agent faulting on pages that no longer exist.
                    let released = std::mem::take(&mut *self.write_grants()).len();
                    say(format_args!("source gone; its memory went with it, {released} grants released"));
                }
            }
        }
    }
}

/// Attaches, builds and runs the agent VM until it stops; returns how it ended.
pub fn run(config: &DaemonConfig) -> Result<VmExit, DaemonError> {
    let started = Instant::now();
    let attached = crate::source::attach(&config.source, config.ranges.as_deref(), check_plan)?;
    let mapped_after = started.elapsed();
    let window_len = attached.window_len;

    let doorbell = Arc::new(Doorbell::new());
    let mut vm_config = VmConfig::with_kernel(guest_images::image_path("inspector-agent"));
    vm_config.kvm_path = config.kvm_path.clone();
    vm_config.boot.extra_memmap = vec![(WINDOW_BASE, window_len, E820_MIRROR)];
    vm_config.memory = config.memory;
    vm_config.serial = config.serial.clone();
    vm_config.host_tsc = true;
    vm_config.doorbell = Some(doorbell.clone());
    let vmm = Vmm::build(&vm_config)?;
    let vm = vmm.vm();
    // The mirror's isolation rests on read-only memslots: without them, refuse to run.
    vm.require(kvm_ioctls::Cap::ReadonlyMem, "KVM_CAP_READONLY_MEM")?;
    let mut mapped = attached.mapped;
    let building = started.elapsed() - mapped_after;
    let placing = Instant::now();
    let window = MirrorWindow::place(&vm, WINDOW_BASE, &mut mapped)?;
    let placed_in = placing.elapsed();
    let bytes: u64 = mapped.iter().map(|m| m.grant.len).sum();
    let grants: GrantMap = mapped.into_iter().map(|m| (m.grant.id, LiveGrant { mapped: m })).collect();
    let count = grants.len();
    let link = AgentLink::new(vmm.ram().shared_memory(), doorbell, WINDOW_BASE, window_len)?;
    say(format_args!(
        "attached to {}: {count} grants in {} memslots, {} MiB mirrored read-only at window {WINDOW_BASE:#x}; \
         grants mapped after {:.1} ms, agent VM built in {:.1} ms, grants placed in memslots in {:.1} ms; \
         memslots ready after {:.1} ms",
        config.source,
        window.regions().len(),
        bytes >> 20,
        mapped_after.as_secs_f64() * 1e3,
        building.as_secs_f64() * 1e3,
        placed_in.as_secs_f64() * 1e3,
        started.elapsed().as_secs_f64() * 1e3
    ));

    let dirty_feed = if config.dirty_log {
        match attached.source.subscribe_dirty() {
            Ok(feed) => {
                say(format_args!(
                    "dirty-page feed on: the source reports written pages every {} us ({})",
                    feed.interval.as_micros(),
                    feed.mechanism.name()
                ));
                Some(feed.mechanism)
            }
            Err(e) => {
                say(format_args!("no dirty-page feed ({}); watches re-hash", vmm::error_chain(&e)));
                None
            }
        }
    } else {
        None
    };
    let inspector = Arc::new(Inspector {
        link,
        vm,
        grants: RwLock::new(grants),
        source: attached.source,
        source_gone: AtomicBool::new(false),
        window_len,
        window,
        dirty_feed,
        scan_rate_limit: config.scan_rate_limit,
        watches: Mutex::new(Vec::new()),
        events: EventBus::new(),
    });
    start_events(&inspector, attached.events).map_err(DaemonError::Control)?;

    if let Some(path) = &config.control_socket {
        crate::control::serve(path, inspector.clone()).map_err(DaemonError::Control)?;
    }
    if let Some((path, access)) = &config.api {
        crate::api::serve(path, inspector.clone(), access.clone()).map_err(DaemonError::Control)?;
    }
    start_watches(&inspector, config);
    let exit = vmm.run(true, Vec::new())?;
    Ok(exit)
}

/// Refuses a source the mirror window cannot hold, and ranges memslots cannot map.
fn check_plan(window_len: u64, ranges: &[Range]) -> Result<(), DaemonError> {
    if WINDOW_BASE + window_len > MAX_WINDOW_END {
        return Err(DaemonError::SourceTooLarge(window_len));
    }
    match ranges.iter().find(|r| !r.gpa.is_multiple_of(PAGE) || !r.len.is_multiple_of(PAGE)) {
        Some(r) => Err(DaemonError::Unaligned { gpa: r.gpa, len: r.len }),
        None => Ok(()),
    }
}

/// Hands the source's events to the inspector on a thread of their own, until the
/// source is gone or the inspector is.
fn start_events(inspector: &Arc<Inspector>, events: Receiver<SourceEvent>) -> std::io::Result<()> {
    let weak: Weak<Inspector> = Arc::downgrade(inspector);
    std::thread::Builder::new().name("source-events".into()).spawn(move || {
        for event in events {
            let gone = event == SourceEvent::Gone;
            match weak.upgrade() {
                Some(inspector) => inspector.on_event(event),
                None => return,
            }
            if gone {
                return;
            }
        }
    })?;
    Ok(())
}

/// Waits for the agent, sets the configured watches, and reports changes as they happen.
fn start_watches(inspector: &Arc<Inspector>, config: &DaemonConfig) {
    let weak = Arc::downgrade(inspector);
    let watches = config.watches.clone();
    let interval = config.watch_interval;
    let _ = std::thread::Builder::new().name("integrity-watch".into()).spawn(move || {
        let Some(inspector) = weak.upgrade() else { return };
        if !inspector.link.wait_ready(Duration::from_secs(60)) {
            say(format_args!("the agent did not become ready"));
            return;
        }
        say(format_args!("agent ready"));
        for w in &watches {
            match inspector.watch(w.gpa, w.len, true) {
                Ok(id) => say(format_args!("integrity watch {id} on {:#x}+{:#x}: baseline taken", w.gpa, w.len)),
                Err(e) => say(format_args!("cannot watch {:#x}+{:#x}: {e}", w.gpa, w.len)),
            }
        }
        drop(inspector);
        // Polls every watch made polled, from the command line or through the API.
        loop {
            std::thread::sleep(interval);
            let Some(inspector) = weak.upgrade() else { return };
            inspector.poll_watches();
        }
    });
}
