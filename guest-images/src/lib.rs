//! Specula's own guest images, built from source by this crate's build script.
//!
//! The guests run their work in ring 3 (see `guests/rt/boot.S` for why), enter
//! through a PVH note, and talk to the VMM through the ports in [`abi`].
//! Host code (the `vmm` tests, the inspector, benchmarks) finds the images
//! with [`image_path`] and reads guest data structures with [`workload`].

#![no_std]

extern crate std;

pub mod abi;
pub mod agent;
pub mod sha256;
pub mod workload;
pub mod xxh64;

use std::path::PathBuf;

/// Names of the images this crate builds.
pub const IMAGES: &[&str] = &["hello", "source-workload", "inspector-agent"];

/// The environment variable that names the image directory at run time.
pub const IMAGES_DIR_ENV: &str = "SPECULA_GUEST_IMAGES_DIR";

/// Directory of the guest images, looked up at run time so that the binaries can
/// move (into a nested test bed, a package, another machine):
/// 1. `$SPECULA_GUEST_IMAGES_DIR`, when set;
/// 2. a `guest-images` directory beside the running executable, or beside its
///    directory: an installed `bin/` + `guest-images/` pair, and cargo's own layout
///    (`target/<profile>/inspector` next to `target/guest-images`);
/// 3. the directory the build script wrote (`target/guest-images` of this build).
pub fn images_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(IMAGES_DIR_ENV) {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().ok();
    let beside = exe.as_deref().and_then(std::path::Path::parent);
    let candidates = [beside, beside.and_then(std::path::Path::parent)];
    let found = candidates.into_iter().flatten().map(|dir| dir.join("guest-images")).find(|dir| dir.is_dir());
    found.unwrap_or_else(|| PathBuf::from(env!("SPECULA_GUEST_IMAGES_DIR")))
}

/// The inspector's agent image, built into the binaries that link this crate, so that
/// an `inspector` copied or installed alone still has its agent.
pub static INSPECTOR_AGENT_ELF: &[u8] =
    include_bytes!(concat!(env!("SPECULA_GUEST_IMAGES_DIR"), "/inspector-agent.elf"));

/// Path of the image called `name` (e.g. `hello` -> `target/guest-images/hello.elf`).
pub fn image_path(name: &str) -> PathBuf {
    images_dir().join(std::format!("{name}.elf"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_directory_follows_the_environment_over_the_build_path() {
        // The test executable lives in target/<profile>/deps, so neither its directory
        // nor its parent holds guest-images: without the variable the build path serves.
        std::env::remove_var(IMAGES_DIR_ENV);
        assert_eq!(images_dir(), PathBuf::from(env!("SPECULA_GUEST_IMAGES_DIR")));
        std::env::set_var(IMAGES_DIR_ENV, "/elsewhere/images");
        assert_eq!(image_path("hello"), PathBuf::from("/elsewhere/images/hello.elf"));
        std::env::remove_var(IMAGES_DIR_ENV);
    }

    #[test]
    fn sha256_matches_fips_vectors() {
        assert_eq!(
            &sha256::hex(&sha256::digest(b"abc")),
            b"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            &sha256::hex(&sha256::digest(b"")),
            b"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let million_a = std::vec![b'a'; 1_000_000];
        assert_eq!(
            &sha256::hex(&sha256::digest(&million_a)),
            b"cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"
        );
    }

    #[test]
    fn sha256_is_independent_of_how_input_is_split() {
        let data: std::vec::Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let mut h = sha256::Sha256::new();
        for part in data.chunks(33) {
            h.update(part);
        }
        assert_eq!(h.finish(), sha256::digest(&data));
    }

    #[test]
    fn xxh64_matches_reference_vectors() {
        assert_eq!(xxh64::xxh64(b"", 0), 0xef46_db37_51d8_e999);
        assert_eq!(xxh64::xxh64(b"a", 0), 0xd24e_c4f1_a98c_6e5b);
        assert_eq!(xxh64::xxh64(b"abc", 0), 0x44bc_2cf5_ad77_0999);
        assert_eq!(xxh64::xxh64(b"Nobody inspects the spammish repetition", 0), 0xfbce_a83c_8a37_8bf1);
    }

    #[test]
    fn task_link_order_is_a_permutation() {
        let mut seen = [false; workload::TASK_COUNT];
        for i in 0..workload::TASK_COUNT {
            seen[workload::link_order(i)] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn every_image_is_a_static_elf_with_a_pvh_note() {
        for name in IMAGES {
            let bytes = std::fs::read(image_path(name)).expect("image was built");
            assert_eq!(&bytes[..4], b"\x7fELF", "{name} is an ELF");
            assert!(bytes.windows(4).any(|w| w == b"Xen\0"), "{name} has a PVH note");
            assert!(bytes.windows(8).any(|w| w == b"Specula\0"), "{name} has the Specula SMP note");
        }
    }
}
