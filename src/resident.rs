//! Resident memory after start-up: the binary's pages that only starting
//! touched, and the heap start-up freed.
//!
//! Starting runs code that serving never runs again: the command line and
//! settings parsing, the AWS SDK's client and credential chain, the trace
//! exporter's set-up, key parsing, the OpenAPI document. The kernel maps
//! each page of the binary a process touches (and its neighbours: fault-
//! around maps 64 KiB at a time) and leaves it mapped, counted in the RSS,
//! until memory pressure reclaims it. Under load that was ~11.5 MiB of the
//! binary resident, most of it never used again (`docs/profiling.md`,
//! "Memory, round 1").
//!
//! So once started, and every [`TRIM_EVERY`] after, the process unmaps its
//! binary's read-only pages. What serving runs maps back in on first use: a
//! minor fault from the page cache, no disk read, once per 64 KiB. What stays
//! resident is the code serving ran lately, and `build.rs` links that code
//! together. The pages stay in the page cache (shared, clean); unmapped, the
//! kernel counts them as inactive and reclaims them first, and a container's
//! working set (usage less inactive file pages) no longer holds them. A mapping is released only when it is the executable's, read-only,
//! and holds no private page: `MADV_DONTNEED` on a private file mapping
//! drops the process's copy and the next touch reads the file again, which
//! for a page nobody wrote is the same bytes. The relocated read-only data
//! (RELRO: pointers the loader wrote before sealing it) holds private pages
//! and is left alone; so is everything writable.
//!
//! Written here because no crate does it: `procfs` parses `smaps`, but the
//! decision (which mappings are safe to drop) is this module.

/// How often the binary's pages are released again, once started: code
/// that ran once since (the servers' and the courier's first paths, a key
/// rotation, an error) leaves the resident set within this.
pub const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// What [`release_startup_pages`] released.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    /// The binary's resident pages unmapped, in KiB.
    pub binary_kib: u64,
    /// Mappings released.
    pub mappings: usize,
}

/// Unmaps the binary's read-only pages (see the module) and returns freed
/// heap pages to the system. Call once everything has started; whatever
/// runs next maps its code back in.
pub fn release_startup_pages() -> Released {
    // SAFETY: a collection pass over mimalloc's own heap; callable at any
    // time from any thread.
    unsafe { libmimalloc_sys::mi_collect(true) };
    release_binary_pages()
}

/// Releases the binary's read-only pages every [`TRIM_EVERY`], so the
/// resident code is what serving ran lately. The first paths the servers,
/// the courier and the first requests take right after start-up are
/// scattered over the binary, and touching one maps 64 KiB around it: they
/// brought ~5 MiB of code back within 100 ms of the first release
/// (`docs/profiling.md`, "Memory, round 1"). A pass reads
/// `/proc/self/smaps` and makes two `madvise` calls, ~1 ms (2.5 ms under
/// strace, with its overhead); what serving runs maps back in with one
/// minor fault per 64 KiB, a few dozen for the 3–4 MiB it keeps.
pub async fn keep_trimmed() {
    let mut tick = tokio::time::interval(TRIM_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate; start-up released already.
    tick.tick().await;
    loop {
        tick.tick().await;
        release_binary_pages();
    }
}

#[cfg(target_os = "linux")]
fn release_binary_pages() -> Released {
    let (Ok(exe), Ok(smaps)) = (
        std::fs::read_link("/proc/self/exe"),
        std::fs::read_to_string("/proc/self/smaps"),
    ) else {
        return Released::default();
    };
    let Some(exe) = exe.to_str() else {
        return Released::default();
    };
    let mut released = Released::default();
    for mapping in droppable(&smaps, exe) {
        // SAFETY: the range is a whole mapping of the executable, read-only
        // and without private pages (`droppable`), so dropping it loses no
        // byte: the next access maps the same file page back in. Nothing can
        // write a read-only mapping in between.
        let done = unsafe {
            libc::madvise(
                mapping.start as *mut libc::c_void,
                mapping.end - mapping.start,
                libc::MADV_DONTNEED,
            )
        };
        if done == 0 {
            released.binary_kib += mapping.rss_kib;
            released.mappings += 1;
        }
    }
    released
}

#[cfg(not(target_os = "linux"))]
fn release_binary_pages() -> Released {
    Released::default()
}

/// One mapping, as `/proc/<pid>/smaps` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mapping {
    start: usize,
    end: usize,
    readonly: bool,
    path: String,
    rss_kib: u64,
    private_kib: u64,
}

/// The mappings of `exe` that may be dropped: read-only, no private
/// (anonymous, copy-on-write) page, something resident.
fn droppable<'a>(smaps: &'a str, exe: &'a str) -> impl Iterator<Item = Mapping> + 'a {
    mappings(smaps).filter(move |m| m.path == exe && m.readonly && m.private_kib == 0 && m.rss_kib > 0)
}

fn mappings(smaps: &str) -> impl Iterator<Item = Mapping> + '_ {
    let mut lines = smaps.lines().peekable();
    std::iter::from_fn(move || {
        let mut mapping = loop {
            match header(lines.next()?) {
                Some(m) => break m,
                None => continue,
            }
        };
        // The fields up to the next header.
        while let Some(line) = lines.next_if(|l| header(l).is_none()) {
            let Some((name, rest)) = line.split_once(':') else {
                continue;
            };
            let kib = || {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0)
            };
            match name {
                "Rss" => mapping.rss_kib = kib(),
                // Private pages of a file mapping that are no longer the
                // file's (written, or relocated by the loader).
                "Anonymous" => mapping.private_kib = kib(),
                _ => {}
            }
        }
        Some(mapping)
    })
}

/// `start-end perms offset dev inode [path]`, or `None` for a field line.
fn header(line: &str) -> Option<Mapping> {
    let mut parts = line.splitn(6, ' ');
    let (start, end) = parts.next()?.split_once('-')?;
    let start = usize::from_str_radix(start, 16).ok()?;
    let end = usize::from_str_radix(end, 16).ok()?;
    let perms = parts.next()?;
    if perms.len() != 4 {
        return None;
    }
    let _offset = parts.next()?;
    let _device = parts.next()?;
    let _inode = parts.next()?;
    let path = parts.next().unwrap_or("").trim_start().to_owned();
    Some(Mapping {
        start,
        end,
        readonly: !perms.contains('w'),
        path,
        rss_kib: 0,
        private_kib: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0000000-55d0c0400000 r--p 00000000 00:2a 1234                       /srv/moneta
Size:               4096 kB
Rss:                2008 kB
Anonymous:             0 kB
VmFlags: rd mr mw me dw sd
55d0c0400000-55d0c1200000 r-xp 00400000 00:2a 1234                       /srv/moneta
Size:              14336 kB
Rss:                9584 kB
Anonymous:             0 kB
55d0c1200000-55d0c1280000 r--p 01200000 00:2a 1234                       /srv/moneta
Rss:                 512 kB
Anonymous:           512 kB
55d0c1280000-55d0c1290000 rw-p 01280000 00:2a 1234                       /srv/moneta
Rss:                  40 kB
Anonymous:            40 kB
7f0000000000-7f0000200000 r-xp 00000000 00:2a 99                         /usr/lib/libc.so.6
Rss:                 980 kB
Anonymous:             0 kB
7f0000400000-7f0000c00000 rw-p 00000000 00:00 0 
Rss:                7576 kB
Anonymous:          7576 kB
";

    #[test]
    fn reads_every_mapping_with_its_sizes() {
        let all: Vec<Mapping> = mappings(SMAPS).collect();
        assert_eq!(all.len(), 6);
        assert_eq!(all[1].start, 0x55d0_c040_0000);
        assert_eq!(all[1].rss_kib, 9584);
        assert_eq!(all[2].private_kib, 512);
        assert_eq!(all[5].path, "");
        assert!(!all[5].readonly);
    }

    #[test]
    fn drops_only_the_binarys_pages_nobody_wrote() {
        let dropped: Vec<(usize, u64)> = droppable(SMAPS, "/srv/moneta")
            .map(|m| (m.start, m.rss_kib))
            .collect();
        // The rodata and the code; not the relocated RELRO, not .data, not
        // another file's code, not the heap.
        assert_eq!(dropped, vec![(0x55d0_c000_0000, 2008), (0x55d0_c040_0000, 9584)]);
    }

    /// Constants only this test reads, in the test binary's read-only data.
    static CONSTANTS: [u8; 1 << 20] = [7; 1 << 20];

    fn sum_of_constants() -> u64 {
        std::hint::black_box(&CONSTANTS)
            .iter()
            .map(|&b| u64::from(b))
            .sum()
    }

    /// KiB resident of the mapping that holds `CONSTANTS`.
    fn constants_resident() -> u64 {
        let at = CONSTANTS.as_ptr() as usize;
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        mappings(&smaps)
            .find(|m| m.start <= at && at < m.end)
            .map(|m| m.rss_kib)
            .expect("the mapping of the constants")
    }

    /// The test binary itself: its read-only pages are dropped, and read
    /// back from the file, unchanged, when touched again.
    #[cfg(target_os = "linux")]
    #[test]
    fn releases_the_running_binarys_pages_and_reads_them_back() {
        assert_eq!(sum_of_constants(), 7 << 20);
        let before = constants_resident();
        assert!(before >= 1024, "the constants are resident: {before} KiB");
        let released = release_startup_pages();
        assert!(
            released.mappings >= 1 && released.binary_kib >= 1024,
            "{released:?}"
        );
        let after = constants_resident();
        assert!(
            after + 1024 <= before,
            "resident {before} KiB before, {after} KiB after"
        );
        assert_eq!(sum_of_constants(), 7 << 20);
        assert!(constants_resident() >= 1024);
    }
}
