//! Specula's mirror device.
//!
//! The source VMM serves it ([`exporter`]); an inspector attaches to it
//! ([`importer`]). Grants are O_RDONLY re-opens of the source's sealed RAM
//! memfds, so the inspector maps the very pages the source guest uses, the
//! kernel keeps both views coherent, and nothing the inspector holds can write.
//! [`socket`] creates private listening sockets and reads peers' credentials.

pub mod dirty;
pub mod exporter;
pub mod importer;
pub mod kernel_mirror;
pub mod memfd;
pub mod protocol;
pub mod socket;
pub mod trace;
pub mod wire;
