//! Guest virtual memory as a stopped vCPU sees it: each address translated by KVM
//! through the vCPU's own paging state (KVM_TRANSLATE), then read from guest RAM. Used
//! at trace exits, where the vCPU is in the context (page tables, GS) of what it did.

use kvm_ioctls::VcpuFd;
use mirror_driver::protocol::MSR_WRITE_STACK_WORDS;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const PAGE: u64 = 4096;

/// Reads of a stopped vCPU's virtual memory.
pub struct GuestView<'a> {
    fd: &'a VcpuFd,
    memory: &'a GuestMemoryMmap,
}

impl<'a> GuestView<'a> {
    pub fn new(fd: &'a VcpuFd, memory: &'a GuestMemoryMmap) -> Self {
        Self { fd, memory }
    }

    /// The guest-physical address of `va`, if the vCPU maps it.
    pub fn translate(&self, va: u64) -> Option<u64> {
        self.fd.translate_gva(va).ok().filter(|t| t.valid != 0).map(|t| t.physical_address)
    }

    /// `buf.len()` bytes at `va`, page by page; false if any page is unmapped.
    pub fn read(&self, va: u64, buf: &mut [u8]) -> bool {
        let mut done = 0;
        while done < buf.len() {
            let Some(at) = va.checked_add(done as u64) else { return false };
            let in_page = ((PAGE - at % PAGE) as usize).min(buf.len() - done);
            let Some(gpa) = self.translate(at) else { return false };
            if self.memory.read_slice(&mut buf[done..done + in_page], GuestAddress(gpa)).is_err() {
                return false;
            }
            done += in_page;
        }
        true
    }

    pub fn read_u64(&self, va: u64) -> Option<u64> {
        let mut b = [0; 8];
        self.read(va, &mut b).then(|| u64::from_le_bytes(b))
    }

    pub fn read_u32(&self, va: u64) -> Option<u32> {
        let mut b = [0; 4];
        self.read(va, &mut b).then(|| u32::from_le_bytes(b))
    }

    /// The NUL-terminated string at `va`, at most `max` bytes of it (without the NUL).
    pub fn read_c_string(&self, va: u64, max: usize) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        let mut at = va;
        while out.len() < max {
            let n = ((PAGE - at % PAGE) as usize).min(max - out.len());
            let mut chunk = vec![0; n];
            if !self.read(at, &mut chunk) {
                // What was read up to an unmapped page is the string's start.
                return (!out.is_empty()).then_some(out);
            }
            if let Some(end) = memchr::memchr(0, &chunk) {
                out.extend_from_slice(&chunk[..end]);
                return Some(out);
            }
            out.extend_from_slice(&chunk);
            at = at.checked_add(n as u64)?;
        }
        Some(out)
    }

    /// The first words at `rsp` (0 where unmapped).
    pub fn stack_words(&self, rsp: u64) -> [u64; MSR_WRITE_STACK_WORDS] {
        let mut words = [0; MSR_WRITE_STACK_WORDS];
        for (i, word) in words.iter_mut().enumerate() {
            *word = rsp.checked_add(8 * i as u64).and_then(|va| self.read_u64(va)).unwrap_or(0);
        }
        words
    }
}
