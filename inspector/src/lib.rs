//! Specula's inspector: attaches to a source VMM through the mirror device (or to
//! an unmodified QEMU through QMP),
//! maps granted source RAM as read-only memslots of an isolated agent VM, and
//! serves analysis (read, hash, scan, integrity watch) run by the agent in ring 3.

pub mod agent_link;
mod agent_replies;
pub mod api;
pub mod control;
pub mod daemon;
pub mod dump;
pub mod events;
pub mod isf;
pub mod launch;
pub mod source;
pub mod window;
pub mod yara_scan;
