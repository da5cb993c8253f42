//! Specula's own guest images, built from source by this crate's build script.
//!
//! The guests run their work in ring 3 (see `guests/rt/boot.S` for why), enter
//! through a PVH note, and talk to the VMM through the ports in [`abi`].
//! Host code (the `vmm` tests, the inspector, benchmarks) finds the images
//! with [`image_path`] and reads guest data structures with [`workload`].

#![no_std]

extern crate std;

pub mod abi;

use std::path::PathBuf;

/// Names of the images this crate builds.
pub const IMAGES: &[&str] = &["hello", "source-workload"];

/// Directory the build script wrote the images to (`target/guest-images`).
pub fn images_dir() -> PathBuf {
    PathBuf::from(env!("SPECULA_GUEST_IMAGES_DIR"))
}

/// Path of the image called `name` (e.g. `hello` -> `target/guest-images/hello.elf`).
pub fn image_path(name: &str) -> PathBuf {
    images_dir().join(std::format!("{name}.elf"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_image_is_a_static_elf_with_a_pvh_note() {
        for name in IMAGES {
            let bytes = std::fs::read(image_path(name)).expect("image was built");
            assert_eq!(&bytes[..4], b"\x7fELF", "{name} is an ELF");
            assert!(
                bytes.windows(4).any(|w| w == b"Xen\0"),
                "{name} has a PVH note"
            );
            assert!(
                bytes.windows(8).any(|w| w == b"Specula\0"),
                "{name} has the Specula SMP note"
            );
        }
    }
}
