//! `scripts/heap`: where Moneta's heap goes, by call site, under the load
//! `scripts/bench` measures memory with (`testkit::bench_stack`): every
//! user × title pair once (the warm-up), then playback-info over those pairs
//! and heartbeats round live sessions.
//!
//! Moneta's own allocator (mimalloc) is invisible to heaptrack, which
//! follows glibc's malloc; `scripts/heap` builds Moneta with the
//! `heap-profile` feature (the system allocator) into `target/heap/`, and
//! this tool runs it with heaptrack's preload library. What heaptrack says
//! about call sites holds for either allocator: the same code asks for the
//! same blocks. What each allocator keeps around them does not; that part is
//! `scripts/bench`'s Memory section.
//!
//! Writes `target/heap/release/profile/moneta.heaptrack.zst` (for
//! `heaptrack_gui` or `heaptrack_print`) and `report.txt` beside it (the
//! table, then heaptrack's peak call sites), and prints the heap at its peak
//! by holder (`HOLDERS`).
//!
//! Settings: HEAP_REQUESTS (100000) requests of each load after the
//! warm-up; HEAP_DATA=<file> reports on an earlier run's data instead; BENCH_USERS and BENCH_TITLES as for `scripts/bench`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use testkit::bench_stack::{
    Binaries, Spread, Stack, drive, env_or, heartbeat_requests, playback_info_requests, renew_sessions,
    start_sessions,
};
use testkit::require_binary;

const HEARTBEAT_SESSIONS: usize = 64;
const CONCURRENCY: usize = 64;
/// Every allocation goes through heaptrack's pipe: start-up is slower.
const PATIENCE: Duration = Duration::from_secs(120);
/// Where Debian's heaptrack package puts what its `heaptrack` script runs.
const HEAPTRACK_LIB: &str = "/usr/lib/heaptrack";

fn main() {
    require_binary("heaptrack_print");
    let data = match std::env::var_os("HEAP_DATA") {
        Some(file) => PathBuf::from(file),
        None => record(),
    };
    report(&data);
}

/// Runs the stack and the loads with Moneta under heaptrack; returns the
/// interpreted data file.
fn record() -> PathBuf {
    let requests = env_or("HEAP_REQUESTS", 100_000).max(1);
    let spread = Spread::from_env();
    require_binary("zstd");
    let lib = Path::new(HEAPTRACK_LIB);
    let preload = lib.join("libheaptrack_preload.so");
    let interpret = lib.join("libexec/heaptrack_interpret");
    for file in [&preload, &interpret] {
        assert!(file.is_file(), "{} is missing: install heaptrack", file.display());
    }
    let exe = std::env::current_exe().expect("own path");
    let out_dir = exe.parent().expect("target dir").join("profile");
    std::fs::create_dir_all(&out_dir).expect("profile dir");
    let raw = out_dir.join("moneta.heaptrack.raw");
    let _ = std::fs::remove_file(&raw);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let client = testkit::bench_stack::client();
    eprintln!("starting Redis, PostgreSQL and the internal API");
    let stack = Stack::start(Binaries::beside_current_exe("scripts/heap"), spread.clone());
    let tokens = Arc::new(stack.user_tokens());
    eprintln!("starting Moneta under heaptrack");
    let mut moneta = stack.moneta(
        &[],
        &[
            ("LD_PRELOAD", preload.display().to_string()),
            ("DUMP_HEAPTRACK_OUTPUT", raw.display().to_string()),
        ],
        PATIENCE,
    );
    let pid = moneta.pid();
    let base = moneta.url();
    let anon = |when: &str| {
        if let Some(b) = testkit::memory::breakdown(pid) {
            eprintln!("{when}: RSS {} KiB, anonymous {} KiB", b.rss_kib, b.anon_kib);
        }
    };
    anon("at start");
    let playback_info = playback_info_requests(&base, &tokens, &spread);
    runtime.block_on(async {
        eprintln!(
            "warming: playback-info for {} users × {} titles",
            spread.users,
            spread.titles.len()
        );
        drive(&client, 0..spread.pairs(), CONCURRENCY, &playback_info).await;
        anon("after the warm-up");
        let sessions = start_sessions(&client, &base, &tokens, &spread, HEARTBEAT_SESSIONS).await;
        eprintln!("playback-info: {requests} requests");
        drive(&client, 0..requests, CONCURRENCY, &playback_info).await;
        anon("after playback-info");
        renew_sessions(&client, &base, &sessions).await;
        eprintln!("heartbeat: {requests} requests");
        let heartbeats = heartbeat_requests(&base, &Arc::new(sessions));
        drive(&client, 0..requests, CONCURRENCY, &heartbeats).await;
        anon("after heartbeats");
    });
    let status = moneta.process.terminate(Duration::from_secs(30));
    eprintln!("Moneta exited: {status:?}");

    let data = out_dir.join("moneta.heaptrack.zst");
    interpret_raw(&interpret, &raw, &data);
    let _ = std::fs::remove_file(&raw);
    data
}

/// The table by holder and heaptrack's own peak call sites, printed and
/// written beside `data`.
fn report(data: &Path) {
    let out_dir = data.parent().unwrap_or(Path::new("."));
    let report = run_capture(
        Command::new("heaptrack_print")
            .arg("--file")
            .arg(data)
            .args([
                "--print-peaks",
                "1",
                "--print-allocators",
                "0",
                "--print-temporary",
                "0",
            ])
            .args([
                "--print-leaks",
                "0",
                "--peak-limit",
                "40",
                "--sub-peak-limit",
                "6",
            ]),
    );
    let stacks = out_dir.join("peak.stacks");
    run_capture(
        Command::new("heaptrack_print")
            .arg("--file")
            .arg(data)
            .args([
                "-t",
                "0",
                "-p",
                "0",
                "-a",
                "0",
                "-T",
                "0",
                "--flamegraph-cost-type",
                "peak",
            ])
            .arg("--print-flamegraph")
            .arg(&stacks),
    );
    let table = by_holder(&std::fs::read_to_string(&stacks).expect("peak stacks"));
    let report_path = out_dir.join("report.txt");
    std::fs::write(&report_path, format!("{table}\n{report}")).expect("heap report");
    println!("{table}");
    eprintln!("wrote {} and {}", data.display(), report_path.display());
}

/// What the `heaptrack` script does between the preload library and a
/// `.zst` file `heaptrack_print` reads: resolve addresses into call sites.
fn interpret_raw(interpret: &Path, raw: &Path, data: &Path) {
    let input = std::fs::File::open(raw).expect("heaptrack raw data");
    let mut interpreter = Command::new(interpret)
        .stdin(input)
        .stdout(Stdio::piped())
        .spawn()
        .expect("heaptrack_interpret");
    let piped = interpreter.stdout.take().expect("interpreter output");
    let output = std::fs::File::create(data).expect("heaptrack data");
    let compressed = Command::new("zstd")
        .args(["-q", "-c"])
        .stdin(piped)
        .stdout(output)
        .status()
        .expect("zstd");
    let interpreted = interpreter.wait().expect("heaptrack_interpret");
    assert!(
        interpreted.success() && compressed.success(),
        "interpreting {} failed",
        raw.display()
    );
}

/// Who holds the heap at its peak. A stack belongs to the holder named by
/// its frame nearest the allocation that any pattern matches, the first
/// holder in this order if several do. Frames are demangled; a frame
/// inlined into another has only its own name, generic arguments and file
/// (`verify (verifier.rs)`), hence the file patterns.
const HOLDERS: &[(&str, &[&str])] = &[
    (
        "titles being loaded (the loading futures of waiting requests)",
        &["::load_once"],
    ),
    (
        "internal API client (reqwest's connection pool)",
        &["reqwest::", "hyper::client", "hyper_util::client"],
    ),
    (
        "Redis client-side cache (the redis crate's LRU)",
        &["redis::caching"],
    ),
    (
        "client-side cache admission",
        &["moneta::sources::redis::client_cache", "(client_cache.rs)"],
    ),
    ("verified tokens", &["moneta::auth::verifier", "(verifier.rs)"]),
    ("verified session ids", &["moneta::sessions::ids"]),
    (
        "title answer parts written once",
        &["moneta::playback::answer", "(answer.rs)"],
    ),
    (
        "titles (local copy, last good, loads)",
        &["moneta::playback::content", "(content.rs)"],
    ),
    (
        "users' entitlements and positions being read",
        &["moneta::playback::user_state", "(user_state.rs)"],
    ),
    ("stream-limit windows (licence proxy)", &["moneta::licenses"]),
    ("progress courier", &["moneta::progress"]),
    (
        "metrics (series, histogram samples)",
        &["metrics_util::", "metrics_exporter_prometheus::", "metrics::"],
    ),
    (
        "Redis connections and calls",
        &["redis::", "moneta::sources::redis"],
    ),
    ("logs and traces", &["tracing", "opentelemetry"]),
    ("AWS SDK", &["aws_"]),
    (
        "HTTP connections (hyper's buffers, connection tasks)",
        &["hyper::", "hyper_util::", "moneta::startup"],
    ),
    (
        "requests in flight (handlers, layers)",
        &["moneta::http", "axum::", "tower"],
    ),
    ("tokio runtime", &["tokio::"]),
];

/// Sums `heaptrack_print --print-flamegraph` stacks (bytes at the peak) by
/// holder, as a Markdown table.
fn by_holder(stacks: &str) -> String {
    let mut sums = vec![0u64; HOLDERS.len() + 1];
    for line in stacks.lines() {
        let Some((stack, bytes)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(bytes) = bytes.parse::<u64>() else {
            continue;
        };
        let holder = stack
            .rsplit(';')
            .find_map(|frame| {
                let (name, file) = frame.rsplit_once(" (").map_or((frame, ""), |(n, f)| (n, f));
                let frame = format!("{} ({file}", rustc_demangle::demangle(name));
                HOLDERS
                    .iter()
                    .position(|(_, patterns)| patterns.iter().any(|p| frame.contains(p)))
            })
            .unwrap_or(HOLDERS.len());
        sums[holder] += bytes;
    }
    let total: u64 = sums.iter().sum();
    let mut rows: Vec<(&str, u64)> = HOLDERS
        .iter()
        .map(|(name, _)| *name)
        .chain(["everything else (start-up, std, libraries)"])
        .zip(sums)
        .collect();
    rows.sort_by_key(|row| std::cmp::Reverse(row.1));
    let kib = |b: u64| format!("{:.0}", b as f64 / 1024.0);
    let mut table = format!(
        "| held at the heap's peak by | KiB |\n| --- | ---: |\n| all (peak heap) | {} |\n",
        kib(total)
    );
    for (name, bytes) in rows {
        table.push_str(&format!("| {name} | {} |\n", kib(bytes)));
    }
    table
}

fn run_capture(command: &mut Command) -> String {
    let output = command.output().expect("heaptrack_print");
    assert!(
        output.status.success(),
        "heaptrack_print failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[cfg(test)]
mod tests {
    use super::by_holder;

    #[test]
    fn stacks_go_to_the_first_holder_one_of_their_frames_names() {
        let stacks = "main (main.rs);_ZN6moneta4auth8verifier6verify17h0123456789abcdefE (verifier.rs);malloc 2048\n\
                      main (main.rs);poll<moneta::playback::content::{impl#1}::load_once::{async_fn_env#0}> (x.rs) 1024\n\
                      main (main.rs);_dl_init (dl-init.c) 1024\n\
                      main (main.rs);poll<moneta::auth::verifier::Verified> (x.rs);new<redis::caching::Entry> (lru.rs) 3072\n\
                      main (main.rs);never 0\n";
        let table = by_holder(stacks);
        assert!(table.contains("| all (peak heap) | 7 |"), "{table}");
        assert!(
            table.contains("| Redis client-side cache (the redis crate's LRU) | 3 |"),
            "{table}"
        );
        assert!(table.contains("| verified tokens | 2 |"), "{table}");
        assert!(table.contains("| titles being loaded"), "{table}");
        assert!(
            table.contains("| everything else (start-up, std, libraries) | 1 |"),
            "{table}"
        );
        let rows: Vec<&str> = table.lines().skip(3).collect();
        assert!(
            rows[0].starts_with("| Redis client-side cache"),
            "largest first: {table}"
        );
    }
}
