//! Tracing the source's guest: the subscription at the source, the breakpoints it
//! arms for the inspector ([`plan`]), and the `trace.*` events made of what it reports.
//! A traced write to a system-call MSR becomes a `trace.msr_write` event once the agent
//! has said where its value, the MSR's previous value, the writing instruction and its
//! callers land (a kernel symbol, a module, hidden or not); a breakpoint hit becomes a
//! `trace.exec`, `trace.exit` or `trace.module_load` event; a write the source trapped
//! in a kernel table ([`tables`]) becomes a `trace.kernel_write` event, its writer
//! placed as an MSR writer is.
//!
//! The source's events arrive on the source-event thread, which must never wait on the
//! agent (revocations go through it): they are queued here (bounded; past the bound
//! they are counted as dropped) and a resolver thread (`startup`) publishes them, in
//! the order they came.

mod plan;
mod tables;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use mirror_driver::protocol::{
    trace_kind, traced_msr_name, Breakpoint, BreakpointHit, MemoryWrite, MsrWrite, MSR_WRITE_STACK_WORDS,
};
use serde_json::{json, Value};
use specula_api::{Reply, Request, TraceStatus};
use specula_common::sync::lock;
use specula_os::checks::{select, FindingKind};
use specula_os::wire::{self, OsRequest, MAX_LSTARS};

use self::plan::Probe;
use self::tables::TablePlan;
use super::{InspectError, Inspector};

/// Trace kinds the inspector builds from hardware breakpoints (bits past the mirror
/// protocol's [`trace_kind`]s, which the source traces by subscription).
const EXEC: u32 = 1 << 8;
const EXIT: u32 = 1 << 9;
const MODULE_LOAD: u32 = 1 << 10;
const BREAKPOINT_KINDS: u32 = EXEC | EXIT | MODULE_LOAD;
/// Writes to the kernel's tables, trapped by the source ([`tables`]).
const KERNEL_WRITES: u32 = trace_kind::WRITE_TRAPS;
/// The kinds by the names the API uses.
const KIND_NAMES: [(u32, &str); 5] = [
    (trace_kind::MSR_WRITES, "msr_writes"),
    (EXEC, "exec"),
    (EXIT, "exit"),
    (MODULE_LOAD, "module_load"),
    (KERNEL_WRITES, "kernel_writes"),
];
/// Every kind.
const ALL_KINDS: u32 = trace_kind::MSR_WRITES | BREAKPOINT_KINDS | KERNEL_WRITES;
/// Module init texts remembered for placing writers.
const MAX_INIT_TEXTS: usize = 16;
/// Events waiting for the resolver; past it they are counted as dropped.
const MAX_PENDING: usize = 4096;
/// Addresses resolved per MSR write: the value, the previous value, the writer's RIP
/// and its stack words.
const PLACES_PER_WRITE: usize = 3 + MSR_WRITE_STACK_WORDS;
/// Addresses resolved per kernel-table write: the writer's RIP and its stack words.
const PLACES_PER_TABLE_WRITE: usize = 1 + MSR_WRITE_STACK_WORDS;
/// Events taken in one batch (all MSR writes, at most: one agent call resolves them).
const RESOLVE_BATCH: usize = MAX_LSTARS / PLACES_PER_WRITE;
/// The MSRs that hold where a system call enters the kernel.
const ENTRY_MSRS: [&str; 3] = ["LSTAR", "CSTAR", "SYSENTER_EIP"];
/// Where the kernel's half of the address space starts.
const KERNEL_HALF: u64 = 0xffff_8000_0000_0000;

/// A source event waiting to become a trace event.
enum Pending {
    Msr(MsrWrite),
    Hit(BreakpointHit),
    Write(MemoryWrite),
}

impl Pending {
    /// The addresses the agent places for this event.
    fn addresses(&self) -> Vec<u64> {
        match self {
            Pending::Msr(w) => [w.value, w.previous, w.rip].into_iter().chain(w.stack).collect(),
            Pending::Write(w) => std::iter::once(w.rip).chain(w.stack).collect(),
            Pending::Hit(_) => Vec::new(),
        }
    }
}

/// The trace state of one inspector.
#[derive(Default)]
pub(crate) struct Tracing {
    /// The kinds traced; held while they change.
    kinds: Mutex<u32>,
    /// Whether the breakpoints are `int3`s.
    software: std::sync::atomic::AtomicBool,
    /// What each armed breakpoint reports, by index.
    probes: Mutex<Vec<Probe>>,
    /// The breakpoints armed at the source, which `probes` decodes: re-armed when a
    /// change of plan fails half-way, so that no hit is decoded with another plan.
    points: Mutex<Vec<Breakpoint>>,
    /// The kernel tables whose writes the source traps. Shared, not copied, with each
    /// batch the resolver publishes: the plan holds every kernel text symbol (tens of
    /// thousands of names), and copying it per batch made the resolver thread take
    /// most of a CPU while exec was traced beside kernel writes.
    tables: Mutex<Arc<TablePlan>>,
    /// The init text of the modules loaded last, newest last (at most
    /// [`MAX_INIT_TEXTS`]): a writer there is the module's init.
    init_texts: Mutex<VecDeque<(String, u64, u64)>>,
    max_per_second: AtomicU32,
    published: AtomicU64,
    dropped: AtomicU64,
    pending: Mutex<VecDeque<Pending>>,
    ready: Condvar,
}

/// Where an address lands in the guest kernel, as the agent found it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Place {
    /// The core kernel symbol and offset, where the address is in the kernel's text.
    symbol: Option<String>,
    /// The module whose memory holds it, "(hidden)" when the module list leaves it out.
    module: Option<String>,
}

impl Place {
    fn json(&self) -> Value {
        json!({ "symbol": self.symbol, "module": self.module, "in_kernel_text": self.symbol.is_some() })
    }
}

/// The kinds the names select (none named: every kind).
fn kinds_named(names: &[String]) -> Result<u32, InspectError> {
    if names.is_empty() {
        return Ok(ALL_KINDS);
    }
    names.iter().try_fold(0, |kinds, name| {
        let (bit, _) = KIND_NAMES.iter().find(|(_, n)| *n == name).ok_or_else(|| {
            let known: Vec<&str> = KIND_NAMES.iter().map(|(_, n)| *n).collect();
            InspectError::BadRequest(format!("no trace kind {name:?} (known: {})", known.join(", ")))
        })?;
        Ok(kinds | bit)
    })
}

fn kind_names(kinds: u32) -> Vec<String> {
    KIND_NAMES.iter().filter(|(bit, _)| kinds & bit != 0).map(|(_, name)| name.to_string()).collect()
}

fn hex(n: u64) -> String {
    format!("{n:#x}")
}

impl Inspector {
    /// Serves the trace requests; each answers with where tracing stands.
    pub(super) fn handle_trace(&self, request: Request) -> Result<Reply, InspectError> {
        match request {
            Request::TraceStart { kinds, software_breakpoints } => {
                self.set_tracing(kinds_named(&kinds)?, software_breakpoints)?
            }
            Request::TraceStop => self.set_tracing(0, false)?,
            Request::TraceStatus => {}
            other => return Err(InspectError::misrouted(&other)),
        }
        Ok(Reply::Trace(self.trace_status()))
    }

    /// What is traced, and what was reported.
    pub fn trace_status(&self) -> TraceStatus {
        let t = &self.tracing;
        let kinds = *lock(&t.kinds);
        let breakpoints = (kinds & BREAKPOINT_KINDS != 0)
            .then(|| if t.software.load(Ordering::SeqCst) { "software" } else { "hardware" }.to_string());
        TraceStatus {
            kinds: kind_names(kinds),
            breakpoints,
            max_per_second: t.max_per_second.load(Ordering::SeqCst),
            events: t.published.load(Ordering::SeqCst),
            dropped: t.dropped.load(Ordering::SeqCst),
        }
    }

    /// Traces exactly `kinds` (0: nothing): the MSR kinds by subscription at the
    /// source, the others by the breakpoints planned for them (or none).
    fn set_tracing(&self, kinds: u32, software: bool) -> Result<(), InspectError> {
        if self.source_gone() {
            return Err(InspectError::SourceGone);
        }
        let mut current = lock(&self.tracing.kinds);
        // Both plans read the kernel's symbols: fetched once through the agent.
        let symbols = match kinds & (BREAKPOINT_KINDS | KERNEL_WRITES) {
            0 => Vec::new(),
            _ => self.os_symbols()?,
        };
        let plan = match kinds & BREAKPOINT_KINDS {
            0 => None,
            wanted => Some(self.plan_breakpoints(wanted, &symbols)?),
        };
        let tables = match kinds & KERNEL_WRITES {
            0 => None,
            _ => Some(self.plan_tables(&symbols)?),
        };
        let max_per_second = self.source.subscribe_trace(kinds & trace_kind::ALL)?;
        let armed = match &plan {
            Some(plan) => self.source.set_breakpoints(software, &plan.points).map(|_| ()),
            None if *current & BREAKPOINT_KINDS != 0 => self.source.set_breakpoints(false, &[]).map(|_| ()),
            None => Ok(()),
        };
        let armed = armed.and_then(|()| match &tables {
            Some(tables) => self.source.set_write_traps(&tables.ranges()).map(|_| ()),
            None if *current & KERNEL_WRITES != 0 => self.source.set_write_traps(&[]).map(|_| ()),
            None => Ok(()),
        });
        if let Err(e) = armed {
            // Back to what was traced before, as far as the source lets us. The old
            // breakpoints go back at their indices too: `probes` still decodes hits by
            // the old plan, and the new points may have been armed before the write
            // traps failed (a hit of an exit probe read as an exec, say).
            let _ = self.source.subscribe_trace(*current & trace_kind::ALL);
            if plan.is_some() || *current & BREAKPOINT_KINDS != 0 {
                let old = lock(&self.tracing.points);
                let _ = self.source.set_breakpoints(self.tracing.software.load(Ordering::SeqCst), &old);
            }
            return Err(e.into());
        }
        *lock(&self.tracing.points) = plan.as_ref().map(|p| p.points.clone()).unwrap_or_default();
        *lock(&self.tracing.probes) = plan.map(|p| p.probes).unwrap_or_default();
        *lock(&self.tracing.tables) = Arc::new(tables.unwrap_or_default());
        *current = kinds;
        self.tracing.software.store(software, Ordering::SeqCst);
        self.tracing.max_per_second.store(if kinds == 0 { 0 } else { max_per_second }, Ordering::SeqCst);
        Ok(())
    }

    /// The kernel tables to trap, from the kernel's kallsyms (`symbols`) and its image's
    /// physical base, once the kernel view is anchored to the vCPUs' state.
    fn plan_tables(&self, symbols: &[specula_os::wire::SymbolRecord]) -> Result<TablePlan, InspectError> {
        let kernel = self.os_kernel()?;
        if !kernel.anchored {
            let why = kernel.unanchored_reason.unwrap_or_else(|| "no reason given".into());
            return Err(InspectError::Os(format!(
                "kernel writes are traced only in a kernel anchored to the vCPUs' state, and this one is not ({why})"
            )));
        }
        tables::plan(symbols, kernel.phys_base)
    }

    /// The breakpoints for `kinds`, from the kernel's kallsyms (`symbols`) and its BTF
    /// (read through the agent).
    fn plan_breakpoints(
        &self,
        kinds: u32,
        symbols: &[specula_os::wire::SymbolRecord],
    ) -> Result<plan::Plan, InspectError> {
        let btf = specula_os::btf::Btf::parse(self.os_btf(symbols)?)?;
        plan::plan(kinds, symbols, &btf)
    }

    /// Queues a traced MSR write for the resolver (from the source-event thread).
    pub(super) fn queue_msr_write(&self, write: MsrWrite) {
        self.queue_trace_event(Pending::Msr(write));
    }

    /// Queues a breakpoint hit for the resolver (from the source-event thread).
    pub(super) fn queue_breakpoint_hit(&self, hit: BreakpointHit) {
        self.queue_trace_event(Pending::Hit(hit));
    }

    /// Queues a trapped kernel-table write for the resolver (from the source-event thread).
    pub(super) fn queue_memory_write(&self, write: MemoryWrite) {
        self.queue_trace_event(Pending::Write(write));
    }

    fn queue_trace_event(&self, event: Pending) {
        let mut pending = lock(&self.tracing.pending);
        if pending.len() >= MAX_PENDING {
            drop(pending);
            self.note_trace_dropped(1, "inspector");
            return;
        }
        pending.push_back(event);
        self.tracing.ready.notify_one();
    }

    /// Counts and reports trace events dropped, by the source (its rate cap and queue)
    /// or by this inspector (its own queue).
    pub(super) fn note_trace_dropped(&self, count: u64, by: &str) {
        self.tracing.dropped.fetch_add(count, Ordering::SeqCst);
        self.events.publish("trace.dropped", json!({ "count": count, "by": by }));
    }

    /// Waits up to `wait` for trace events, then publishes those queued (a batch), in
    /// order. Run by the resolver thread.
    pub(crate) fn publish_trace_events(&self, wait: Duration) {
        let batch: Vec<Pending> = {
            let pending = lock(&self.tracing.pending);
            let (mut pending, _) = self
                .tracing
                .ready
                .wait_timeout_while(pending, wait, |p| p.is_empty())
                .unwrap_or_else(|p| p.into_inner());
            let n = pending.len().min(RESOLVE_BATCH);
            pending.drain(..n).collect()
        };
        if batch.is_empty() {
            return;
        }
        let addresses: Vec<u64> = batch.iter().flat_map(Pending::addresses).collect();
        let (places, error) = match self.kernel_places(&addresses) {
            Ok(places) => (places, None),
            Err(e) => (vec![Place::default(); addresses.len()], Some(e.to_string())),
        };
        let mut places = places.as_slice();
        let mut take = |n: usize| {
            let (these, rest) = places.split_at(n.min(places.len()));
            places = rest;
            these
        };
        let probes = lock(&self.tracing.probes).clone();
        let tables = Arc::clone(&lock(&self.tracing.tables));
        for event in &batch {
            let (kind, detail) = match event {
                Pending::Msr(write) => {
                    let places = take(PLACES_PER_WRITE);
                    ("trace.msr_write", msr_write_detail(write, places, error.as_deref()))
                }
                // A hit of a breakpoint set before the last change of plan is not
                // decoded with the new one.
                Pending::Hit(hit) => match probes.get(hit.index as usize) {
                    Some(&probe) => {
                        if let Some(init) = plan::init_text(probe, hit) {
                            let mut inits = lock(&self.tracing.init_texts);
                            if inits.len() == MAX_INIT_TEXTS {
                                inits.pop_front();
                            }
                            inits.push_back(init);
                        }
                        plan::event(probe, hit)
                    }
                    None => continue,
                },
                Pending::Write(write) => {
                    let places = self.in_init_texts(take(PLACES_PER_TABLE_WRITE), write.rip, &write.stack);
                    let writer = places.first().cloned().unwrap_or_default();
                    let callers = callers(&write.stack, places.get(1..).unwrap_or_default());
                    // A write to a table no longer traced (or beside a table, on its
                    // page) is not reported.
                    match tables.event(write, &writer, callers, error.as_deref()) {
                        Some(detail) => ("trace.kernel_write", detail),
                        None => continue,
                    }
                }
            };
            self.events.publish(kind, detail);
            self.tracing.published.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// `places` (of `rip` and then `stack`), where the agent found nothing, placed in
    /// the init text of a module whose load was traced: code the kernel frees once the
    /// init returns, so that the agent, asked after, cannot place it.
    fn in_init_texts(&self, places: &[Place], rip: u64, stack: &[u64]) -> Vec<Place> {
        let inits = lock(&self.tracing.init_texts);
        let addresses = std::iter::once(rip).chain(stack.iter().copied());
        places
            .iter()
            .zip(addresses)
            .map(|(place, address)| {
                let init = inits.iter().rev().find(|(_, base, size)| address >= *base && address - base < *size);
                match init {
                    Some((name, _, _)) if place.symbol.is_none() && place.module.is_none() => {
                        Place { symbol: None, module: Some(format!("{name} (init)")) }
                    }
                    _ => place.clone(),
                }
            })
            .collect()
    }

    /// Where each address lands in the guest kernel, as the agent's `msrs` check
    /// attributes an LSTAR: given the addresses as if they were vCPUs' LSTARs, it
    /// reports each one that is not `entry_SYSCALL_64` with its core kernel symbol
    /// (where it is in the kernel's text) and the module holding it (hidden ones
    /// included), and says nothing of `entry_SYSCALL_64` itself. Addresses outside the
    /// kernel's half are not asked about.
    fn kernel_places(&self, addresses: &[u64]) -> Result<Vec<Place>, InspectError> {
        let asked: Vec<(u32, u64)> =
            addresses.iter().enumerate().filter(|(_, &a)| a >= KERNEL_HALF).map(|(i, &a)| (i as u32, a)).collect();
        let mut places = vec![Place::default(); addresses.len()];
        if asked.is_empty() {
            return Ok(places);
        }
        let report = wire::decode_checks(
            &self.os_call(&OsRequest::Checks { which: select::MSRS, lstars: Some(asked.clone()) })?,
        )?;
        if let Some(error) = report.runs.iter().find_map(|r| r.error.clone()) {
            return Err(InspectError::Os(error));
        }
        for &(i, _) in &asked {
            places[i as usize] = Place { symbol: Some("entry_SYSCALL_64".into()), module: None };
        }
        for finding in report.findings.iter().filter(|f| f.kind == FindingKind::SyscallEntryHooked) {
            // The agent names each finding by the index it was given: a reply naming
            // an index not asked about is not credible.
            let i = usize::try_from(finding.id).ok().filter(|&i| asked.iter().any(|&(a, _)| a as usize == i));
            let Some(i) = i else {
                return Err(InspectError::BadReply(format!("a place for address {} not asked about", finding.id)));
            };
            places[i] = Place { symbol: finding.name.clone(), module: finding.detail.clone() };
        }
        Ok(places)
    }
}

/// The stack words that land in kernel code or a module, with where: the writer's
/// callers, innermost first (the others are data, and left out).
fn callers(stack: &[u64], places: &[Place]) -> Vec<Value> {
    stack
        .iter()
        .zip(places)
        .filter(|(_, place)| place.symbol.is_some() || place.module.is_some())
        .map(|(&word, place)| json!({ "address": hex(word), "symbol": place.symbol, "module": place.module }))
        .collect()
}

/// The `trace.msr_write` event's detail. `places`: where the value, the previous value,
/// the writer's RIP and its stack words land ([`PLACES_PER_WRITE`]).
fn msr_write_detail(write: &MsrWrite, places: &[Place], resolve_error: Option<&str>) -> Value {
    let name = traced_msr_name(write.msr);
    let entry_msr = name.is_some_and(|n| ENTRY_MSRS.contains(&n));
    let place = |i: usize| places.get(i).cloned().unwrap_or_default();
    let (value_at, previous_at, writer) = (place(0), place(1), place(2));
    let callers = callers(&write.stack, places.get(3..).unwrap_or_default());
    let mut detail = json!({
        "vcpu": write.vcpu,
        "msr": name.unwrap_or("unknown"),
        "msr_index": hex(u64::from(write.msr)),
        "value": hex(write.value),
        "previous": hex(write.previous),
        "rip": hex(write.rip),
        "cr3": hex(write.cr3),
        "applied": write.applied,
        "writer": writer.json(),
        "callers": callers,
    });
    if entry_msr {
        detail["value_at"] = value_at.json();
        detail["previous_at"] = previous_at.json();
        // A system-call entry that leaves the kernel's text is a hook (a module's, or
        // code the kernel does not list), whoever wrote it.
        detail["syscall_entry_hooked"] =
            json!(write.value != 0 && resolve_error.is_none() && value_at.symbol.is_none());
    }
    if let Some(error) = resolve_error {
        detail["resolve_error"] = json!(error);
    }
    detail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_named_and_unknown_names_refused() {
        assert_eq!(kinds_named(&[]).unwrap(), ALL_KINDS);
        assert_eq!(kinds_named(&["msr_writes".into()]).unwrap(), trace_kind::MSR_WRITES);
        assert_eq!(kinds_named(&["exec".into(), "exit".into()]).unwrap(), EXEC | EXIT);
        assert_eq!(kind_names(ALL_KINDS), vec!["msr_writes", "exec", "exit", "module_load", "kernel_writes"]);
        let e = kinds_named(&["syscalls".into()]).unwrap_err().to_string();
        assert!(e.contains("\"syscalls\"") && e.contains("msr_writes"), "{e}");
        assert_eq!(kind_names(trace_kind::MSR_WRITES), vec!["msr_writes"]);
        assert!(kind_names(0).is_empty());
    }

    #[test]
    fn an_lstar_write_into_a_module_is_a_hook_and_one_back_to_the_entry_is_not() {
        let write = MsrWrite { msr: 0xc000_0082, value: 0xffff_ffff_c000_1000, applied: true, ..Default::default() };
        let module = Place { symbol: None, module: Some("specula_rootkit (hidden)".into()) };
        let entry = Place { symbol: Some("entry_SYSCALL_64".into()), module: None };
        let core = Place { symbol: Some("native_write_msr+0x4".into()), module: None };
        let write = MsrWrite { stack: [0xffff_ffff_c000_2040, 0xffff_c900_0000_0000, 0, 0], ..write };
        let places = [
            module.clone(),
            entry.clone(),
            core.clone(),
            module.clone(),
            Place::default(),
            Place::default(),
            Place::default(),
        ];
        let hooked = msr_write_detail(&write, &places, None);
        assert_eq!(hooked["msr"], "LSTAR");
        assert_eq!(hooked["syscall_entry_hooked"], true);
        assert_eq!(hooked["value_at"]["module"], "specula_rootkit (hidden)");
        assert_eq!(hooked["writer"]["symbol"], "native_write_msr+0x4");
        assert_eq!(
            hooked["callers"],
            json!([{ "address": "0xffffffffc0002040", "symbol": null, "module": "specula_rootkit (hidden)" }]),
            "the return address into the module, not the stack's data"
        );
        assert_eq!(hooked["previous_at"]["symbol"], "entry_SYSCALL_64");
        let restored = msr_write_detail(
            &write,
            &[
                entry.clone(),
                module.clone(),
                core,
                module.clone(),
                Place::default(),
                Place::default(),
                Place::default(),
            ],
            None,
        );
        assert_eq!(restored["syscall_entry_hooked"], false);
        // Unresolved, it is not called a hook: the event says why it could not tell.
        let unknown =
            msr_write_detail(&write, &[Place::default(), Place::default(), Place::default()], Some("no kernel"));
        assert_eq!(
            (unknown["syscall_entry_hooked"].clone(), unknown["resolve_error"].clone()),
            (json!(false), json!("no kernel"))
        );
    }

    #[test]
    fn an_efer_write_has_no_entry_places() {
        let write = MsrWrite { msr: 0xc000_0080, value: 0xd01, ..Default::default() };
        let detail = msr_write_detail(&write, &vec![Place::default(); PLACES_PER_WRITE], None);
        assert_eq!(detail["msr"], "EFER");
        assert!(detail.get("value_at").is_none() && detail.get("syscall_entry_hooked").is_none(), "{detail}");
    }
}
