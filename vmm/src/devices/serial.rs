//! COM1: vm-superio's 8250 with its interrupt on an irqfd, output to stdout,
//! a file or nowhere, input from stdin through the event loop.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use specula_common::sync::lock;
use vm_superio::{serial::NoEvents, Serial, Trigger};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::bus::{PioAction, PioContext, PioDevice};

/// A vm-superio trigger backed by an EventFd (registered as an irqfd, or a reset signal).
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

impl EventFdTrigger {
    /// A second handle on the same eventfd.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self(self.0.try_clone()?))
    }
}

/// Where the guest's serial output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialOutput {
    /// The vmm's stdout; stdin feeds the guest.
    Tty,
    /// A file (created or truncated).
    File(PathBuf),
    /// Discarded, but the device exists.
    Null,
}

/// The COM1 device.
pub type SerialDevice = Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>;

/// Builds COM1 for `output`; the returned EventFd is its interrupt line.
pub fn build(output: &SerialOutput) -> io::Result<(SerialDevice, EventFd)> {
    let irq = EventFd::new(libc::EFD_NONBLOCK)?;
    let writer: Box<dyn Write + Send> = match output {
        SerialOutput::Tty => Box::new(io::stdout()),
        SerialOutput::File(path) => Box::new(File::create(path)?),
        SerialOutput::Null => Box::new(io::sink()),
    };
    Ok((Serial::new(EventFdTrigger(irq.try_clone()?), writer), irq))
}

/// COM1 on the port-I/O bus: the 8250's eight registers from its base port.
pub struct SerialPort(Mutex<SerialDevice>);

impl SerialPort {
    /// COM1 backed by `device`.
    pub fn new(device: SerialDevice) -> Self {
        Self(Mutex::new(device))
    }

    /// The device, for the input path.
    pub fn device(&self) -> &Mutex<SerialDevice> {
        &self.0
    }
}

impl PioDevice for SerialPort {
    fn name(&self) -> &str {
        "com1"
    }

    fn read(&self, _base: u16, offset: u16, data: &mut [u8]) {
        data[0] = lock(&self.0).read(offset as u8);
    }

    fn write(&self, _base: u16, offset: u16, data: &[u8], _context: &PioContext<'_>) -> PioAction {
        if let Err(e) = lock(&self.0).write(offset as u8, data[0]) {
            log::warn!("serial write failed: {e:?}");
        }
        PioAction::Continue
    }
}

/// A writer that appends to a shared buffer (tests capture guest output with it).
pub struct CaptureWriter(pub Arc<Mutex<Vec<u8>>>);

impl Write for CaptureWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        lock(&self.0).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// COM1 writing into a shared buffer.
pub fn capturing() -> io::Result<(SerialDevice, Arc<Mutex<Vec<u8>>>)> {
    let buffer = Arc::new(Mutex::new(Vec::new()));
    let irq = EventFd::new(libc::EFD_NONBLOCK)?;
    Ok((Serial::new(EventFdTrigger(irq), Box::new(CaptureWriter(buffer.clone()))), buffer))
}

/// Feeds bytes from an input fd (stdin) into COM1's receive FIFO.
pub struct SerialInput {
    input: RawFd,
    port: Arc<SerialPort>,
}

impl SerialInput {
    pub fn new(input: RawFd, port: Arc<SerialPort>) -> Self {
        Self { input, port }
    }

    /// Moves what the input has, up to the FIFO's free space, into the device.
    /// Returns `None` when the FIFO is full, `Some(0)` at end of input.
    fn pump(&mut self) -> io::Result<Option<usize>> {
        let mut serial = lock(self.port.device());
        let room = serial.fifo_capacity();
        if room == 0 {
            return Ok(None);
        }
        let mut buf = [0u8; 64];
        let want = room.min(buf.len());
        // SAFETY: reads at most `want` bytes into a buffer of at least that size.
        let n = unsafe { libc::read(self.input, buf.as_mut_ptr().cast(), want) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        if n > 0 {
            serial.enqueue_raw_bytes(&buf[..n]).map_err(|e| io::Error::other(format!("{e:?}")))?;
        }
        Ok(Some(n))
    }
}

impl MutEventSubscriber for SerialInput {
    fn init(&mut self, ops: &mut EventOps) {
        // Regular files and /dev/null cannot be polled (EPERM): such stdin gives no input.
        if let Err(e) = ops.add(Events::new_raw(self.input, EventSet::IN)) {
            log::debug!("serial input disabled: cannot watch fd {}: {e:?}", self.input);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match self.pump() {
            Ok(Some(n)) if n > 0 => {}
            Ok(None) => {
                // The guest is not draining its FIFO: back off instead of spinning on a readable fd.
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Ok(Some(_)) | Err(_) => {
                // EOF or a dead input: stop watching it; the guest keeps running.
                let _ = ops.remove(Events::new_raw(self.input, EventSet::IN));
            }
        }
        let _ = events;
    }
}

impl AsRawFd for SerialInput {
    fn as_raw_fd(&self) -> RawFd {
        self.input
    }
}
