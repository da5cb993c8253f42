//! The forgery check: valid kernel structures the vCPUs contradict.

use alloc::string::String;
use alloc::vec::Vec;

use super::{Finding, FindingKind, Run};
use crate::paging::{find_user_mapping, MAX_MAPPING_SEARCH};
use crate::{Error, PhysMem};

impl<M: PhysMem + ?Sized> Run<'_, '_, M> {
    /// Reports every VMCOREINFO copy that discovery found valid but the vCPUs'
    /// state contradicts, with the process whose memory holds it (searched through
    /// each process's page tables, at most [`MAX_MAPPING_SEARCH`] entries in all).
    /// Returns the copies judged: the believed one and the contradicted ones. An
    /// unanchored kernel cannot tell a forgery from the real thing: that is an error.
    pub(super) fn check_forgery(&self, found: &mut Vec<Finding>) -> Result<u64, Error> {
        let anchoring = self.linux.anchoring();
        if !anchoring.anchored {
            return Err(Error::Unanchored(anchoring.reason.clone().unwrap_or_default()));
        }
        let forged = self.linux.forged_vmcoreinfo();
        if forged.is_empty() {
            return Ok(1);
        }
        let processes = self.linux.processes()?;
        let mut budget = MAX_MAPPING_SEARCH;
        for &at in forged {
            let owner = processes.iter().filter(|p| !p.kernel_thread).find(|p| {
                p.pgd.is_some_and(|pgd| {
                    matches!(find_user_mapping(self.linux.mem(), pgd, self.kernel.mode(), at, &mut budget), Ok(Some(_)))
                })
            });
            found.push(Finding {
                kind: FindingKind::ForgedKernel,
                id: owner.map_or(-1, |p| i64::from(p.pid)),
                name: owner.map(|p| p.comm.clone()),
                address: at,
                detail: Some(String::from("a VMCOREINFO copy the vCPUs contradict")),
            });
        }
        Ok(1 + forged.len() as u64)
    }
}
