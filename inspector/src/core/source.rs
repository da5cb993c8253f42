//! The source as the core sees it: its vCPUs (registers, system-call MSRs, pausing)
//! and the events it sends (revokes, dirty pages, discards, gone).

use std::sync::atomic::Ordering;

use guest_images::agent as abi;
use mirror_driver::importer::SourceEvent;
use mirror_driver::protocol::Range;
use specula_api::{Reply, Request, Vcpu};

use super::watches::WatchMode;
use super::{say, InspectError, Inspector};

impl Inspector {
    /// Serves the requests on the source's vCPUs.
    pub(super) fn handle_source(&self, request: Request) -> Result<Reply, InspectError> {
        Ok(match request {
            Request::Vcpus => Reply::Vcpus(self.vcpus()?),
            Request::Pause => {
                self.set_paused(true)?;
                Reply::Done
            }
            Request::Resume => {
                self.set_paused(false)?;
                Reply::Done
            }
            other => return Err(InspectError::misrouted(&other)),
        })
    }

    /// The system-call MSRs of every vCPU, from the source (bounded: at most
    /// [`abi::MAX_OS_VCPUS`]).
    pub fn cpu_msrs(&self) -> Result<Vec<specula_qemu::CpuMsrs>, InspectError> {
        if self.source_gone() {
            return Err(InspectError::SourceGone);
        }
        let msrs = self.source.cpu_msrs()?;
        if msrs.len() > abi::MAX_OS_VCPUS {
            return Err(InspectError::BadRequest(format!("{} vCPUs, more than {}", msrs.len(), abi::MAX_OS_VCPUS)));
        }
        Ok(msrs)
    }

    /// The source's vCPU registers.
    pub fn vcpus(&self) -> Result<Vec<Vcpu>, InspectError> {
        if self.source_gone() {
            return Err(InspectError::SourceGone);
        }
        Ok(self.source.vcpu_state()?)
    }

    /// Pauses (`true`) or resumes the source's vCPUs, where the source lets the inspector.
    pub fn set_paused(&self, paused: bool) -> Result<(), InspectError> {
        if self.source_gone() {
            return Err(InspectError::SourceGone);
        }
        Ok(self.source.set_paused(paused)?)
    }

    /// Asked by the agent VM's vCPU whose KVM_RUN failed with EFAULT: when the source's
    /// memory is gone (a source by pid that exited while the agent read it), every
    /// command fails by name from now on, the one running included, and the window gets
    /// zero pages, so that the agent runs on to answer it. Any other fault is not ours
    /// to mend (`false`: the agent VM ends as crashed).
    pub fn recover_from_lost_source_memory(&self) -> bool {
        if !self.source.memory_gone() {
            return false;
        }
        self.link.mark_source_memory_gone();
        let replaced = self.window.replace_with_zero_pages();
        if replaced {
            say(format_args!("the source's memory went while the agent read it; the agent reads zero pages there now"));
        }
        replaced
    }

    /// Handles a source event.
    pub(crate) fn on_event(&self, event: SourceEvent) {
        match event {
            SourceEvent::Revoke { grant_id, nonce } => {
                let removed = self.write_grants().remove(&grant_id);
                self.views.clear();
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
                self.views.written(&ranges);
                for w in self.lock_watches().iter_mut().filter(|w| w.mode == WatchMode::DirtyLog && !w.deleted) {
                    w.note_written(coalesced, &ranges);
                }
            }
            SourceEvent::Discard { gpa, len } => {
                // The source's VMM zeroed these pages itself: KVM's dirty log does not see it.
                self.views.written(&[Range { gpa, len }]);
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
            SourceEvent::DirtySynced { token } => self.views.note_synced(token),
            SourceEvent::MsrWrite(write) => self.queue_msr_write(write),
            SourceEvent::BreakpointHit(hit) => self.queue_breakpoint_hit(hit),
            SourceEvent::MemoryWrite(write) => self.queue_memory_write(write),
            SourceEvent::TraceDropped { count } => self.note_trace_dropped(count, "source"),
            SourceEvent::Gone => {
                self.source_gone.store(true, Ordering::SeqCst);
                self.views.clear();
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
                    self.link.mark_source_memory_gone();
                    let released = std::mem::take(&mut *self.write_grants()).len();
                    say(format_args!("source gone; its memory went with it, {released} grants released"));
                }
            }
        }
    }
}
