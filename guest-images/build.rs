//! Builds Specula's guests from source with the installed stable rustc and the
//! system linker (gcc), into `target/guest-images/NAME.elf`.
//!
//! Each guest is a `#![no_std] #![no_main]` crate for the host target, linked
//! as a freestanding static ELF by `guests/link.ld`. Nothing is downloaded.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Guest source files under `guests/`, each one image built by rustc alone.
const GUESTS: &[&str] = &["hello", "source-workload"];
/// Guests that link crates: each a cargo package under its own directory.
const PACKAGES: &[(&str, &str)] = &[("inspector-agent", "agent")];

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let guests_dir = manifest_dir.join("guests");
    println!("cargo:rerun-if-changed={}", guests_dir.display());
    println!("cargo:rerun-if-changed={}", manifest_dir.join("src").display());

    let out_dir = images_dir();
    std::fs::create_dir_all(&out_dir).expect("create target/guest-images");
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let linker_script = guests_dir.join("link.ld");
    let scratch = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));

    for guest in GUESTS {
        let source = guests_dir.join(format!("{}.rs", guest.replace('-', "_")));
        let built = scratch.join(format!("{guest}.elf"));
        build_guest(&rustc, &source, &linker_script, &built);
        std::fs::copy(&built, out_dir.join(format!("{guest}.elf"))).expect("copy guest image");
    }
    for (guest, dir) in PACKAGES {
        let package = manifest_dir.join(dir);
        println!("cargo:rerun-if-changed={}", package.display());
        // Its path dependencies outside guest-images (the OS-awareness library).
        println!("cargo:rerun-if-changed={}", manifest_dir.join("../inspector/os").display());
        let built = build_package(&package, guest, &linker_script, &scratch);
        std::fs::copy(&built, out_dir.join(format!("{guest}.elf"))).expect("copy guest image");
    }
    println!("cargo:rustc-env=SPECULA_GUEST_IMAGES_DIR={}", out_dir.display());
}

/// The freestanding static-ELF flags every guest links with.
fn guest_flags(linker_script: &Path) -> Vec<String> {
    let mut flags: Vec<String> = [
        "-C",
        "relocation-model=static",
        "-C",
        "target-cpu=x86-64",
        "-C",
        "link-arg=-nostartfiles",
        "-C",
        "link-arg=-nostdlib",
        "-C",
        "link-arg=-static",
        "-C",
        "link-arg=-no-pie",
        "-C",
        "link-arg=-Wl,--build-id=none",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    flags.push("-C".into());
    flags.push(format!("link-arg=-Wl,-T,{}", linker_script.display()));
    flags
}

/// Builds the cargo package at `package` (its own workspace and Cargo.lock) for the
/// host target with the guest flags, in its own target directory; returns the binary.
fn build_package(package: &Path, bin: &str, linker_script: &Path, scratch: &Path) -> PathBuf {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target = env::var("TARGET").expect("TARGET");
    let target_dir = scratch.join("packages");
    // With an explicit --target, RUSTFLAGS reach only the guest's own crates, never the
    // build scripts or proc macros of its dependencies, which run on the host.
    let rustflags = guest_flags(linker_script).join("\x1f");
    let status = Command::new(&cargo)
        .args(["build", "--release", "--locked", "--bin", bin, "--target", &target])
        .arg("--manifest-path")
        .arg(package.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        .env_remove("RUSTFLAGS")
        // Under `cargo clippy` the outer build runs a rustc wrapper; the guest builds with
        // plain rustc, as the rustc-only guests do.
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CLIPPY_ARGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cargo} to build guest {bin}: {e}"));
    assert!(status.success(), "building guest {bin} ({}) failed ({status})", package.display());
    target_dir.join(&target).join("release").join(bin)
}

/// `target/guest-images`, found from OUT_DIR (target/PROFILE/build/PKG-HASH/out).
fn images_dir() -> PathBuf {
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let target = out
        .ancestors()
        .find(|dir| dir.join("CACHEDIR.TAG").is_file())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| out.ancestors().nth(4).expect("target dir above OUT_DIR").to_path_buf());
    target.join("guest-images")
}

fn build_guest(rustc: &str, source: &Path, linker_script: &Path, output: &Path) {
    let status = Command::new(rustc)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .args(["--edition", "2021", "--crate-type", "bin"])
        .args(["-C", "opt-level=2", "-C", "panic=abort", "-C", "debuginfo=1"])
        .args(guest_flags(linker_script))
        .arg("-o")
        .arg(output)
        .arg(source)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {rustc} to build guest {}: {e}", source.display()));
    assert!(status.success(), "building guest {} failed ({status})", source.display());
}
