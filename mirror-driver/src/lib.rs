//! The mirror device (in progress).
