//! The inspector: attaches to a source VM through the mirror device (in progress).
