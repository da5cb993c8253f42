//! Specula's inspector: attaches to a source VMM through the mirror device (or to
//! an unmodified QEMU through QMP, or to any process's RAM through the kernel mirror
//! device), maps granted source RAM as read-only memslots of an isolated agent VM,
//! and serves analysis run by the agent in ring 3.
//!
//! - [`core`]: the one typed entry point, `Inspector::handle(Request) -> Reply`;
//! - [`api`] (HTTP) and [`line`] (line socket): front ends that only translate;
//! - [`startup`]: attaches, builds the agent VM, starts the core and the front ends.

pub mod agent_link;
pub mod api;
pub mod core;
pub mod dump;
pub mod events;
pub mod isf;
pub mod launch;
pub mod line;
pub mod source;
pub mod startup;
pub mod view_cache;
pub mod window;
