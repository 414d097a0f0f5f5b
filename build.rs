//! Links the functions serving runs next to each other in a release build of
//! the `moneta` binary.
//!
//! The kernel keeps a process's code resident 64 KiB at a time (fault-around),
//! so what counts is how many such windows hold a function serving runs.
//! Laid out by the compiler, the ~2.7 MiB of functions a warm request and the
//! background work run were spread over the whole 14 MiB of code, and ~10 MiB
//! of it stayed resident under load. `link/hot-functions.txt` lists them
//! (`scripts/hot-functions`, from `scripts/profile`'s callgrind runs); lld
//! places them first, in that order (`docs/profiling.md`, "Memory, round 1").
//!
//! Only where lld links: Rust's default on x86_64 Linux. A name the binary no
//! longer has is skipped, so a stale list costs memory, never correctness.

use std::path::Path;

fn main() {
    let list = Path::new("link/hot-functions.txt");
    println!("cargo::rerun-if-changed={}", list.display());
    let release = std::env::var("PROFILE").is_ok_and(|p| p == "release");
    let lld_by_default = std::env::var("TARGET").is_ok_and(|t| t == "x86_64-unknown-linux-gnu");
    // A build that picks its own linker (or turns rust-lld off) gets the
    // compiler's layout.
    let own_linker = std::env::var("CARGO_ENCODED_RUSTFLAGS")
        .is_ok_and(|f| f.contains("linker") || f.contains("link-self-contained") || f.contains("link-arg"))
        || std::env::vars().any(|(k, _)| k.starts_with("CARGO_TARGET_") && k.ends_with("_LINKER"));
    if !(release && lld_by_default && !own_linker && list.is_file()) {
        return;
    }
    let Ok(list) = list.canonicalize() else {
        return;
    };
    println!(
        "cargo::rustc-link-arg-bin=moneta=-Wl,--symbol-ordering-file={}",
        list.display()
    );
    println!("cargo::rustc-link-arg-bin=moneta=-Wl,--no-warn-symbol-ordering");
}
