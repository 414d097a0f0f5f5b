//! What a running process keeps resident, from `/proc`: anonymous memory,
//! the binary's code and read-only data, shared libraries, and the binary's
//! resident code by crate (which crates' functions lie on resident pages).
//! `scripts/bench` reports it for Moneta after its load.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{Read, Seek, SeekFrom};
use std::process::Command;

const PAGE: u64 = 4096;

/// One snapshot of a process's resident memory, in KiB.
#[derive(Debug, Default, Clone)]
pub struct Breakdown {
    pub rss_kib: u64,
    pub peak_kib: u64,
    pub anon_kib: u64,
    /// The binary's executable mapping: size, resident.
    pub code_kib: (u64, u64),
    /// The binary's other mappings (read-only data, relocated data, .data).
    pub binary_data_kib: u64,
    /// Shared libraries (libc, libm, the loader…).
    pub libraries_kib: u64,
    /// Crate → KiB of its functions on resident code pages, largest first.
    pub crates: Vec<(String, u64)>,
}

struct Mapping {
    start: u64,
    end: u64,
    perms: String,
    offset: u64,
    path: String,
    rss_kib: u64,
}

/// Reads `/proc/<pid>`; `None` when the process is gone.
pub fn breakdown(pid: u32) -> Option<Breakdown> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let exe = exe.to_str()?.to_owned();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let mappings = parse_smaps(&smaps);
    let mut out = Breakdown {
        rss_kib: field("VmRSS:"),
        peak_kib: field("VmHWM:"),
        anon_kib: field("RssAnon:"),
        ..Breakdown::default()
    };
    for m in &mappings {
        if m.path == exe {
            if m.perms.contains('x') {
                out.code_kib.0 += (m.end - m.start) / 1024;
                out.code_kib.1 += m.rss_kib;
            } else {
                out.binary_data_kib += m.rss_kib;
            }
        } else if m.path.starts_with('/') {
            out.libraries_kib += m.rss_kib;
        }
    }
    if let Some(code) = mappings.iter().find(|m| m.path == exe && m.perms.contains('x')) {
        out.crates = resident_code_by_crate(pid, &exe, code).unwrap_or_default();
    }
    Some(out)
}

fn parse_smaps(smaps: &str) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::new();
    for line in smaps.lines() {
        let parts: Vec<&str> = line.splitn(6, ' ').collect();
        let range = parts
            .first()
            .and_then(|r| r.split_once('-'))
            .and_then(|(a, b)| Some((u64::from_str_radix(a, 16).ok()?, u64::from_str_radix(b, 16).ok()?)));
        if let (Some((start, end)), true) = (range, parts.len() >= 5) {
            out.push(Mapping {
                start,
                end,
                perms: parts[1].to_owned(),
                offset: u64::from_str_radix(parts[2], 16).unwrap_or(0),
                path: parts.get(5).map(|p| p.trim().to_owned()).unwrap_or_default(),
                rss_kib: 0,
            });
        } else if let (Some(rss), Some(last)) = (line.strip_prefix("Rss:"), out.last_mut()) {
            last.rss_kib = rss.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
        }
    }
    out
}

/// Which pages of the code mapping are present (`/proc/<pid>/pagemap`, bit
/// 63), and whose functions lie on them (`nm`'s symbol sizes).
fn resident_code_by_crate(pid: u32, exe: &str, code: &Mapping) -> Option<Vec<(String, u64)>> {
    let pages = (code.end - code.start) / PAGE;
    let mut map = std::fs::File::open(format!("/proc/{pid}/pagemap")).ok()?;
    map.seek(SeekFrom::Start(code.start / PAGE * 8)).ok()?;
    let mut raw = vec![0u8; (pages * 8) as usize];
    map.read_exact(&mut raw).ok()?;
    let present: Vec<bool> = raw
        .chunks_exact(8)
        .map(|e| u64::from_le_bytes(e.try_into().unwrap_or([0; 8])) >> 63 == 1)
        .collect();
    // Symbol addresses are the ELF's; the mapping starts at file offset
    // `code.offset`, which the loading segment puts at some address.
    let segments = load_segments(exe)?;
    let to_file_offset = |addr: u64| {
        segments
            .iter()
            .find(|(_, vaddr, size)| addr >= *vaddr && addr < vaddr + size)
            .map(|(offset, vaddr, _)| addr - vaddr + offset)
    };
    let nm = Command::new("nm")
        .args(["--demangle", "--print-size", "--defined-only", exe])
        .output()
        .ok()?;
    let mut by_crate: HashMap<String, u64> = HashMap::new();
    for line in String::from_utf8_lossy(&nm.stdout).lines() {
        let mut parts = line.splitn(4, ' ');
        let (Some(addr), Some(size), Some(kind), Some(name)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if !matches!(kind, "t" | "T" | "w" | "W") {
            continue;
        }
        let (Ok(addr), Ok(size)) = (u64::from_str_radix(addr, 16), u64::from_str_radix(size, 16)) else {
            continue;
        };
        let Some(offset) = to_file_offset(addr) else {
            continue;
        };
        let Some(page) = offset.checked_sub(code.offset).map(|o| (o / PAGE) as usize) else {
            continue;
        };
        if present.get(page).copied().unwrap_or(false) {
            *by_crate.entry(crate_of(name).to_owned()).or_default() += size;
        }
    }
    let mut crates: Vec<(String, u64)> = by_crate.into_iter().map(|(c, b)| (c, b / 1024)).collect();
    crates.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    Some(crates)
}

/// `(file offset, virtual address, file size)` of each `LOAD` segment.
fn load_segments(exe: &str) -> Option<Vec<(u64, u64, u64)>> {
    let out = Command::new("readelf").args(["-lW", exe]).output().ok()?;
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let p: Vec<&str> = l.split_whitespace().collect();
                (p.first() == Some(&"LOAD") && p.len() >= 5)
                    .then(|| Some((hex(p[1])?, hex(p[2])?, hex(p[4])?)))?
            })
            .collect(),
    )
}

/// The crate a demangled symbol belongs to: the first path that is not
/// `core`, `alloc` or `std`, so generic code (`core::ptr::drop_in_place<
/// moka::…>`) counts under the crate that instantiated it.
pub fn crate_of(symbol: &str) -> &str {
    let mut first = None;
    let bytes = symbol.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
            i += 1;
        }
        // A path's first segment: not preceded by `::`.
        let first_segment = start == 0 || bytes[start - 1] != b':';
        if i > start && first_segment && symbol[i..].starts_with("::") && !bytes[start].is_ascii_digit() {
            let name = &symbol[start..i];
            if !matches!(name, "core" | "alloc" | "std") {
                return name;
            }
            first.get_or_insert(name);
        }
        i += 1;
    }
    first.unwrap_or("(other)")
}

impl Breakdown {
    /// A paragraph and, for `top` > 0, a table of the crates with the most
    /// resident code, for `docs/performance.md`.
    pub fn markdown(&self, when: &str, top: usize) -> String {
        let mib = |k: u64| k as f64 / 1024.0;
        let other = self
            .rss_kib
            .saturating_sub(self.anon_kib + self.code_kib.1 + self.binary_data_kib + self.libraries_kib);
        let mut s = format!(
            "{when}: RSS {:.1} MiB (peak {:.1}): anonymous {:.1}; the binary's code {:.1} resident of {:.1} mapped, its other mappings {:.1}; shared libraries {:.1}; other {:.1}.\n\n",
            mib(self.rss_kib),
            mib(self.peak_kib),
            mib(self.anon_kib),
            mib(self.code_kib.1),
            mib(self.code_kib.0),
            mib(self.binary_data_kib),
            mib(self.libraries_kib),
            mib(other),
        );
        if top > 0 && !self.crates.is_empty() {
            let _ = writeln!(s, "| crate | KiB of its code on resident pages |\n| --- | ---: |");
            for (name, kib) in self.crates.iter().take(top) {
                let _ = writeln!(s, "| {name} | {kib} |");
            }
            let rest: u64 = self.crates.iter().skip(top).map(|c| c.1).sum();
            let _ = writeln!(
                s,
                "| the rest ({} crates) | {rest} |",
                self.crates.len().saturating_sub(top)
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_crate_that_instantiated_generic_code() {
        assert_eq!(crate_of("moneta::http::router::route"), "moneta");
        assert_eq!(
            crate_of("core::ptr::drop_in_place<moka::sync::Cache<u64>>"),
            "moka"
        );
        assert_eq!(
            crate_of("<alloc::vec::Vec<T> as core::clone::Clone>::clone"),
            "alloc"
        );
        assert_eq!(crate_of("<redis::cmd::Cmd as core::fmt::Debug>::fmt"), "redis");
        assert_eq!(
            crate_of("core::ptr::drop_in_place<core::option::Option<u8>>"),
            "core"
        );
        assert_eq!(crate_of("memcpy"), "(other)");
    }

    #[test]
    fn reads_this_process() {
        let b = breakdown(std::process::id()).expect("own /proc");
        assert!(b.rss_kib > 0 && b.code_kib.0 > 0 && b.code_kib.1 > 0, "{b:?}");
        assert!(!b.crates.is_empty(), "{b:?}");
    }
}
