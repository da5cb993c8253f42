//! OS views: commands the agent runs over the granted ranges (its OS awareness finds
//! the kernel in them, with no symbol files), kept by the view cache while the
//! dirty-page feed says nothing they read was written.

use std::time::Instant;

use guest_images::agent as abi;
use specula_api::{Reply, Request};
use specula_os::wire::{self, OsRequest, ReadRecord};
use specula_os::CpuState;
use specula_os::{CheckReport, KernelInfo, Module, SyscallCheck, Vma};

use super::replies as agent_replies;
use super::{say, InspectError, Inspector, DIRTY_SYNC_TIMEOUT, MAX_READ};
use crate::agent_link::AgentError;
use crate::view_cache::{Lookup, PageRead, Served, ViewCacheMode, ViewKey};

/// The address of kernel symbol `name` in `symbols` (from [`Inspector::os_symbols`]).
pub fn kernel_symbol(symbols: &[wire::SymbolRecord], name: &str) -> Result<u64, InspectError> {
    symbols
        .iter()
        .find(|s| s.name == name)
        .map(|s| s.address)
        .ok_or_else(|| InspectError::Os(format!("no {name} in kallsyms")))
}

/// What the agent walks for OS command `op`, in a log line.
fn walk_name(op: u32) -> &'static str {
    match op {
        abi::OP_OS_PROCESSES => "task list",
        abi::OP_OS_MODULES => "module list",
        abi::OP_OS_VMAS => "memory-area",
        abi::OP_OS_CHECKS => "rootkit-check",
        abi::OP_OS_READ_VIRTUAL => "virtual-read",
        _ => "OS view",
    }
}

/// The bits of `specula_os::checks::select` that the named checks select (none named:
/// the default set).
fn checks_named(names: &[String]) -> Result<u64, InspectError> {
    use specula_os::checks::select;
    let mut which = 0u64;
    for name in names {
        let bit = select::NAMES.iter().position(|n| n == name).ok_or_else(|| {
            InspectError::BadRequest(format!("unknown check {name:?} (checks are {})", select::NAMES.join(", ")))
        })?;
        which |= 1 << bit;
    }
    Ok(if which == 0 { select::DEFAULT } else { which })
}

impl Inspector {
    /// Serves the OS views.
    pub(super) fn handle_os(&self, request: Request) -> Result<Reply, InspectError> {
        Ok(match request {
            Request::Kernel => Reply::Kernel(self.os_kernel()?),
            Request::Discover => Reply::Kernel(self.os_discover()?),
            Request::Ps => Reply::Processes(self.os_processes()?),
            Request::Process { pid } => Reply::Process(
                self.os_processes()?
                    .into_iter()
                    .find(|d| d.process.pid == pid)
                    .ok_or_else(|| InspectError::NotFound(format!("no process {pid} in the source's task list")))?,
            ),
            Request::Lsmod => Reply::Modules(self.os_modules()?),
            Request::Maps { pid } => Reply::Vmas(self.os_vmas(pid)?),
            Request::CheckSyscalls => Reply::SyscallCheck(self.os_syscall_check()?),
            Request::Checks { only } => Reply::Checks(self.os_checks(checks_named(&only)?)?),
            Request::Symbols => Reply::Symbols(self.os_symbols()?),
            Request::Vread { pid, va, len } => Reply::Bytes(self.os_read_virtual(pid, va, len)?),
            Request::Btf => Reply::Bytes(self.os_btf(&self.os_symbols()?)?),
            other => return Err(InspectError::misrouted(&other)),
        })
    }

    /// Runs an OS command: the granted ranges go first in its data area (the agent reads
    /// nothing else), the grants stay locked until it is done; a source whose kernel the
    /// agent has not found yet is discovered first. Returns the reply bytes.
    pub(super) fn os_call(&self, request: &OsRequest) -> Result<Vec<u8>, InspectError> {
        self.os_call_synced(request, &mut None)
    }

    /// [`Inspector::os_call`], one of several that answer one request: `synced` holds
    /// whether the request's dirty-log barrier was taken (once, by the first that needs it).
    fn os_call_synced(&self, request: &OsRequest, synced: &mut Option<bool>) -> Result<Vec<u8>, InspectError> {
        let started = Instant::now();
        let (op, args, extra) = request.encode();
        let (reply, how) = self.os_call_served(op, args, &extra, synced)?;
        if abi::lists_pages_read(op) {
            self.views.record(how, started.elapsed());
        }
        Ok(reply)
    }

    /// Runs an OS command, from the view cache where it may: the reply and how it came.
    fn os_call_served(
        &self,
        op: u32,
        args: [u64; 4],
        extra: &[u8],
        synced: &mut Option<bool>,
    ) -> Result<(Vec<u8>, Served), InspectError> {
        let kind = (op, if op == abi::OP_OS_CHECKS { args[0] } else { 0 });
        // Only views that list what they read can be kept: the others (symbol pages,
        // virtual reads in a loop) skip the cache's lock altogether.
        let wanted = abi::lists_pages_read(op)
            && self.dirty_feed.is_some()
            && match self.view_cache {
                ViewCacheMode::Off => false,
                ViewCacheMode::Always => true,
                ViewCacheMode::Auto => self.views.worth_keeping(kind),
            };
        // The barrier is taken before the grants are locked: the event thread that
        // handles it may have a revoke to apply first, which needs the write lock.
        let cached = wanted && *synced.get_or_insert_with(|| self.dirty_synced());
        let grants = self.read_grants();
        let granted: Vec<wire::GrantedRange> =
            grants.values().map(|g| (g.mapped.grant.gpa, g.mapped.grant.len)).collect();
        let mut input = Vec::with_capacity(4 + granted.len() * 16 + extra.len());
        wire::encode_granted(&granted, &mut input);
        let ranges_len = input.len();
        input.extend_from_slice(extra);
        let mut args = args;
        if cached {
            args[3] = abi::LIST_PAGES_READ;
        }
        let key = ViewKey { op, args, input };
        if cached {
            match self.views.get(&key) {
                Lookup::Hit(reply) => return Ok((reply, Served::Hit)),
                Lookup::Suspect { reply, pages, generation } => {
                    if self.unchanged(&key.input[..ranges_len], &pages)? {
                        self.views.confirmed(&key, generation);
                        return Ok((reply, Served::Revalidated));
                    }
                    self.views.refuted(&key);
                }
                Lookup::Miss => {}
            }
        }
        let walk = cached.then(|| self.views.start_walk());
        let run = |op| -> Result<(Vec<u8>, Option<Vec<PageRead>>), InspectError> {
            let done = self.link.call(op, args, &key.input)?;
            let reply = done.data(0, done.result[0])?;
            if done.result[3] > 0 {
                // Worth a line: it is what a running source does to a walk, and a view
                // that fails after MAX_WALKS is then no surprise.
                say(format_args!(
                    "the source changed what the agent's {} walk read under it: walked again {} time(s)",
                    walk_name(op),
                    done.result[3]
                ));
            }
            let read = if cached && abi::lists_pages_read(op) {
                agent_replies::pages_read(&done, done.result[0], self.window_len)?
            } else {
                None
            };
            Ok((reply, read))
        };
        let walking = Instant::now();
        let outcome = match run(op) {
            Ok(done) => {
                self.views.note_walk(kind, walking.elapsed());
                Ok(done)
            }
            Err(InspectError::Agent(AgentError::NotDiscovered)) => {
                // The agent has no kernel yet (or lost it: it was restarted): views kept
                // so far came from the kernel it had.
                self.views.clear();
                self.discover_in_agent(&key.input[..ranges_len]).and_then(|_| run(op))
            }
            other => other,
        };
        let (reply, read) = match outcome {
            Ok(done) => done,
            Err(e) => {
                if let Some(walk) = walk {
                    self.views.abandon(walk);
                }
                return Err(match e {
                    InspectError::Agent(AgentError::Os(text)) => InspectError::Os(text),
                    other => other,
                });
            }
        };
        if op == abi::OP_OS_DISCOVER {
            self.views.clear();
        }
        if let Some(walk) = walk {
            self.views.keep(walk, key, &reply, read);
        }
        Ok((reply, Served::Walked))
    }

    /// Has the agent find the kernel, anchored to the vCPUs' state, over the granted
    /// ranges `ranges` (their input encoding).
    fn discover_in_agent(&self, ranges: &[u8]) -> Result<(), InspectError> {
        let (op, args, extra) = OsRequest::Discover { cpus: self.anchor_cpus() }.encode();
        let mut input = Vec::with_capacity(ranges.len() + extra.len());
        input.extend_from_slice(ranges);
        input.extend_from_slice(&extra);
        self.link.call(op, args, &input).map(drop).map_err(|e| match e {
            AgentError::Os(text) => InspectError::Os(text),
            other => InspectError::Agent(other),
        })
    }

    /// The vCPUs' state a discovery is anchored to: CR3, LSTAR and the GS bases, as
    /// the source reports them (none when it cannot: the kernel view then says it is
    /// not anchored).
    fn anchor_cpus(&self) -> Vec<CpuState> {
        match self.source.vcpu_state() {
            Ok(vcpus) => vcpus
                .iter()
                .take(specula_os::anchors::MAX_ANCHOR_CPUS)
                .map(|v| CpuState {
                    cpu: v.index,
                    cr3: v.cr3,
                    lstar: v.lstar,
                    gs_base: v.gs_base,
                    kernel_gs_base: v.kernel_gs_base,
                })
                .collect(),
            Err(e) => {
                log::info!("no vCPU state to anchor the kernel to: {}", vmm::error_chain(&e));
                Vec::new()
            }
        }
    }

    /// Whether the lines a kept view read on `pages` still hold what the walk read: the
    /// agent re-hashes them (under the same grants, `ranges` their input encoding).
    fn unchanged(&self, ranges: &[u8], pages: &[PageRead]) -> Result<bool, InspectError> {
        for batch in pages.chunks(abi::MAX_VALIDATE_RECORDS) {
            let records = batch.iter().map(|p| ReadRecord { page: p.gpa, lines: p.lines, digest: p.digest }).collect();
            let (op, args, extra) = OsRequest::Validate { records }.encode();
            let mut input = Vec::with_capacity(ranges.len() + extra.len());
            input.extend_from_slice(ranges);
            input.extend_from_slice(&extra);
            let done = self.link.call(op, args, &input)?;
            if done.result[0] != batch.len() as u64 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Whether kept OS views may be served: the source has a dirty-page feed and, asked
    /// now, has delivered every write its log had seen (a barrier on the event thread).
    fn dirty_synced(&self) -> bool {
        if self.dirty_feed.is_none() || self.source_gone() {
            return false;
        }
        let started = Instant::now();
        let token = self.views.next_token();
        if let Err(e) = self.source.dirty_sync(token) {
            log::debug!("no dirty sync, walking again: {e}");
            return false;
        }
        let synced = self.views.wait_synced(token, DIRTY_SYNC_TIMEOUT);
        if synced {
            self.views.note_sync(started.elapsed());
        }
        synced
    }

    /// Finds the source's Linux kernel again (after a reboot, say) and describes it.
    pub fn os_discover(&self) -> Result<KernelInfo, InspectError> {
        Ok(wire::decode_kernel(&self.os_call(&OsRequest::Discover { cpus: self.anchor_cpus() })?)?)
    }

    /// The source's kernel: release, KASLR offset, paging, CPUs.
    pub fn os_kernel(&self) -> Result<KernelInfo, InspectError> {
        Ok(wire::decode_kernel(&self.os_call(&OsRequest::Kernel)?)?)
    }

    /// The source's processes, from its task list.
    pub fn os_processes(&self) -> Result<Vec<wire::DecodedProcess>, InspectError> {
        Ok(wire::decode_processes(&self.os_call(&OsRequest::Processes)?)?)
    }

    /// The source's loaded modules.
    pub fn os_modules(&self) -> Result<Vec<Module>, InspectError> {
        Ok(wire::decode_modules(&self.os_call(&OsRequest::Modules)?)?)
    }

    /// The system call table check: entries that do not point into the kernel's text.
    pub fn os_syscall_check(&self) -> Result<SyscallCheck, InspectError> {
        Ok(wire::decode_syscalls(&self.os_call(&OsRequest::Syscalls)?)?)
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
        let lstars: Option<Vec<(u32, u64)>> = lstars.map(|msrs| msrs.iter().map(|m| (m.cpu, m.lstar)).collect());
        let mut report = if self.view_cache != ViewCacheMode::Off && self.dirty_feed.is_some() {
            // One agent command per check, each a view of its own: the kernel text check
            // (thousands of pages, which rarely change) stays kept while the process
            // check, whose tasks run, is walked again. One barrier serves them all.
            let mut synced = None;
            let mut report = CheckReport::default();
            for bit in (0..specula_os::checks::select::NAMES.len()).map(|b| 1u64 << b).filter(|b| which & b != 0) {
                let lstars = if bit == specula_os::checks::select::MSRS { lstars.clone() } else { None };
                let reply = self.os_call_synced(&OsRequest::Checks { which: bit, lstars }, &mut synced)?;
                let part = wire::decode_checks(&reply)?;
                report.runs.extend(part.runs);
                report.findings.extend(part.findings);
            }
            report
        } else {
            wire::decode_checks(&self.os_call(&OsRequest::Checks { which, lstars })?)?
        };
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
            let reply = self.os_call(&OsRequest::Symbols { start: out.len() as u64, max: u64::MAX })?;
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
        Ok(wire::decode_vmas(&self.os_call(&OsRequest::Vmas { pid })?)?)
    }

    /// `len` bytes of process `pid`'s virtual memory at `va` (pid 0: the kernel's).
    pub fn os_read_virtual(&self, pid: u32, va: u64, len: u64) -> Result<Vec<u8>, InspectError> {
        if len == 0 || len > MAX_READ {
            return Err(InspectError::BadRequest(format!("virtual reads are 1 to {MAX_READ} bytes")));
        }
        let bytes = self.os_call(&OsRequest::ReadVirtual { pid, va, len })?;
        if bytes.len() as u64 != len {
            return Err(InspectError::BadReply(format!("{} bytes for a {len}-byte read", bytes.len())));
        }
        Ok(bytes)
    }
}
