//! `scripts/profile`: instructions per warm request, counted by callgrind for
//! the bare axum baseline, the one-RTT ceiling, Moneta's playback-info and
//! Moneta's heartbeat, on the stack `scripts/bench` uses
//! (`testkit::bench_stack`). Instruction counts repeat where wall-clock
//! numbers on a shared machine do not. Prints the table and writes it into
//! `docs/profiling.md`.
//!
//! Settings: PROFILE_REQUESTS (2000) requests counted per scenario,
//! PROFILE_WARMUP (one per user) requests before counting,
//! PROFILE_CONCURRENCY (1) requests in flight, PROFILE_ANNOTATE=1 keeps the
//! playback-info profile and its `callgrind_annotate` output in
//! `target/profile/`; BENCH_USERS and BENCH_TITLES as for `scripts/bench`.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use testkit::bench_stack::{
    Baseline, Binaries, MakeRequest, Spread, Stack, command_line, drive, env_or, heartbeat_requests, machine,
    playback_info_requests, redis_reads, report_date, repository_root, start_sessions,
};
use testkit::{require_binary, run};

const HEADING: &str = "## Instructions per request (scripts/profile)";
/// The target: a warm playback-info costs at most this many times
/// the one-RTT ceiling's instructions.
const TARGET_VS_ONE_TRIP: f64 = 2.0;
/// Start-up under valgrind runs ~50× slower than native.
const PATIENCE: Duration = Duration::from_secs(600);
/// Moneta keeps a verified token this long; a warm-up older than that no
/// longer warms the token cache.
const TOKEN_CACHE: Duration = Duration::from_secs(60);
const HEARTBEAT_SESSIONS: usize = 64;

/// Valgrind slows Moneta ~50×, so wall-clock lifetimes would expire ~50×
/// more often per request than in production and time limits meant for
/// native speed would trip. Both are stretched; neither changes the code a
/// warm request runs.
fn stretched_settings() -> Vec<(&'static str, String)> {
    [
        ("MONETA_CONTENT_TTL_S", "36000"),
        ("MONETA_CONTENT_LOCAL_TTL_MS", "600000"),
        ("MONETA_ENTITLEMENT_TTL_S", "36000"),
        ("MONETA_REDIS_CLIENT_CACHE_TTL_MS", "3600000"),
        ("MONETA_REDIS_TIMEOUT_MS", "20000"),
        ("MONETA_INTERNAL_API_TIMEOUT_MS", "20000"),
        ("MONETA_REQUEST_TIMEOUT_MS", "60000"),
    ]
    .into_iter()
    .map(|(k, v)| (k, v.to_owned()))
    .collect()
}

/// One process under callgrind, counting from the start with collection on;
/// a measurement zeroes the counters and dumps them.
struct Callgrind {
    out: PathBuf,
    log: PathBuf,
}

impl Callgrind {
    fn new(dir: &Path, name: &str) -> Callgrind {
        Callgrind {
            out: dir.join(format!("{name}.callgrind")),
            log: dir.join(format!("{name}.valgrind.log")),
        }
    }

    fn wrapper(&self) -> Vec<OsString> {
        vec![
            require_binary("valgrind").into(),
            "--tool=callgrind".into(),
            format!("--callgrind-out-file={}", self.out.display()).into(),
            "--dump-instr=no".into(),
            format!("--log-file={}", self.log.display()).into(),
        ]
    }

    fn control(&self, pid: u32, arg: &str) {
        run(
            Command::new(require_binary("callgrind_control"))
                .arg(arg)
                .arg(pid.to_string()),
            &format!("callgrind_control {arg}"),
        );
    }

    /// Dumps the counters since the last zeroing; returns the dump file and
    /// its total instructions.
    fn dump(&self, pid: u32) -> (PathBuf, u64) {
        let before = self.dumps();
        self.control(pid, "-d");
        let found = testkit::eventually_blocking(PATIENCE, || {
            let path = self.dumps().into_iter().find(|p| !before.contains(p))?;
            let text = std::fs::read_to_string(&path).ok()?;
            let total = text
                .lines()
                .find_map(|l| l.strip_prefix("summary:"))?
                .trim()
                .parse()
                .ok()?;
            Some((path, total))
        });
        found.unwrap_or_else(|| {
            panic!(
                "no callgrind dump appeared for {} (valgrind log: {})",
                self.out.display(),
                self.log.display()
            )
        })
    }

    fn dumps(&self) -> Vec<PathBuf> {
        let name = self
            .out
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let Some(dir) = self.out.parent() else {
            return Vec::new();
        };
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            .and_then(|n| n.strip_prefix(name.as_str()))
                            .is_some_and(|rest| rest.starts_with('.') && rest.len() > 1)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

struct Counted {
    name: &'static str,
    per_request: f64,
    redis_round_trips: f64,
    dump: PathBuf,
}

struct Run<'a> {
    runtime: &'a tokio::runtime::Runtime,
    client: reqwest::Client,
    redis_port: u16,
    warm: Range<u64>,
    counted: Range<u64>,
    concurrency: usize,
}

impl Run<'_> {
    /// Warms, zeroes, sends exactly the counted requests, dumps. Redis round
    /// trips come from Redis, not from Moneta's `/metrics`: under valgrind,
    /// its process collector (rustix reading the vDSO from the auxiliary
    /// vector) faults on the first scrape.
    fn count(&self, name: &'static str, grind: &Callgrind, pid: u32, make: &MakeRequest) -> Counted {
        let started = Instant::now();
        eprintln!("{name}: {} warm-up requests", self.warm.end - self.warm.start);
        self.runtime
            .block_on(drive(&self.client, self.warm.clone(), self.concurrency, make));
        let reads_before = redis_reads(self.redis_port);
        grind.control(pid, "-z");
        let n = self.counted.end - self.counted.start;
        eprintln!("{name}: {n} counted requests");
        self.runtime
            .block_on(drive(&self.client, self.counted.clone(), self.concurrency, make));
        let (dump, total) = grind.dump(pid);
        // The second INFO is itself one read.
        let reads = redis_reads(self.redis_port).saturating_sub(reads_before + 1);
        let took = started.elapsed();
        let per_request = total as f64 / n as f64;
        eprintln!(
            "{name}: {per_request:.0} instructions/request ({:.0} s under valgrind)",
            took.as_secs_f64()
        );
        if took > TOKEN_CACHE {
            eprintln!(
                "{name}: warm-up and count took over {TOKEN_CACHE:?}: some tokens were verified again; lower PROFILE_REQUESTS"
            );
        }
        Counted {
            name,
            per_request,
            redis_round_trips: reads as f64 / n as f64,
            dump,
        }
    }
}

fn main() {
    let counted_n = env_or("PROFILE_REQUESTS", 2000).max(1);
    let concurrency = env_or("PROFILE_CONCURRENCY", 1).max(1) as usize;
    let annotate = std::env::var("PROFILE_ANNOTATE").is_ok_and(|v| v == "1");
    let spread = Spread::from_env();
    // One request per user first, so every token the counted requests carry
    // is verified already; the counted requests then ask for pairs the
    // process has not seen, as most requests do when users × titles is large.
    let warm_n = env_or("PROFILE_WARMUP", spread.users as u64).max(1);
    let warm = 0..warm_n;
    let counted = warm_n..warm_n + counted_n;
    let root = repository_root();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let client = reqwest::Client::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let stretched = stretched_settings();

    eprintln!("starting Redis, PostgreSQL and the internal API");
    let stack = Stack::start(Binaries::beside_current_exe("scripts/profile"), spread.clone());
    let tokens = Arc::new(stack.user_tokens());

    // Redis learns every pair the profiled processes will ask for from a
    // Moneta at full speed, which then leaves: the profiled Moneta starts
    // with nothing in its own memory, as after a deploy onto a warm Redis.
    eprintln!("warming Redis through a Moneta at full speed");
    let body_len = {
        let native = stack.moneta(&[], &stretched, PATIENCE);
        let make = playback_info_requests(&native.url(), &tokens, &spread);
        runtime.block_on(async {
            let len = drive(&client, 0..1, 1, &make).await;
            drive(&client, 1..counted.end, 64, &make).await;
            len
        })
    };

    let job = Run {
        runtime: &runtime,
        client,
        redis_port: stack.redis.port,
        warm,
        counted,
        concurrency,
    };
    let mut results: Vec<Counted> = Vec::new();

    for kind in [Baseline::BareAxum, Baseline::OneRoundTrip] {
        let grind = Callgrind::new(dir.path(), &kind.name().replace([' ', ':'], "-"));
        let server = stack.baseline(kind, body_len, &grind.wrapper(), PATIENCE);
        let make = playback_info_requests(&server.url, &tokens, &spread);
        results.push(job.count(kind.name(), &grind, server.process.pid(), &make));
    }

    let grind = Callgrind::new(dir.path(), "moneta");
    eprintln!("starting Moneta under callgrind");
    let moneta = stack.moneta(&grind.wrapper(), &stretched, PATIENCE);
    let base = moneta.url();
    let make = playback_info_requests(&base, &tokens, &spread);
    results.push(job.count("Moneta playback-info, warm", &grind, moneta.pid(), &make));

    let sessions = Arc::new(runtime.block_on(start_sessions(
        &job.client,
        &base,
        &tokens,
        &spread,
        HEARTBEAT_SESSIONS,
    )));
    let make = heartbeat_requests(&base, &sessions);
    results.push(job.count("Moneta heartbeat", &grind, moneta.pid(), &make));
    drop(moneta);

    if annotate {
        save_annotation(&root, &results[2].dump);
    }
    let section = section(&results, &spread, counted_n, job.warm.end, concurrency, body_len);
    println!("\n{section}");
    let doc = root.join("docs/profiling.md");
    let text = std::fs::read_to_string(&doc).unwrap_or_else(|_| "# Profiling the hot path\n".into());
    std::fs::write(&doc, replace_section(&text, HEADING, &section)).expect("write docs/profiling.md");
}

fn section(
    results: &[Counted],
    spread: &Spread,
    counted: u64,
    warm: u64,
    concurrency: usize,
    body_len: usize,
) -> String {
    let bare = results[0].per_request;
    let one_trip = results[1].per_request;
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| scenario | instructions/request | vs one-RTT ceiling | vs bare axum | Redis round trips/request |"
    );
    let _ = writeln!(table, "| --- | ---: | ---: | ---: | ---: |");
    for r in results {
        let _ = writeln!(
            table,
            "| {} | {} | {:.2}× | {:.2}× | {:.2} |",
            r.name,
            thousands(r.per_request),
            r.per_request / one_trip,
            r.per_request / bare,
            r.redis_round_trips,
        );
    }
    let playback = results[2].per_request / one_trip;
    let verdict = if playback <= TARGET_VS_ONE_TRIP {
        "met"
    } else {
        "not met"
    };
    format!(
        "{HEADING}\n\n\
         Measured by `scripts/profile` ({date}; {valgrind}). Machine: {machine}.\n\n\
         {table}\n\
         Target, a warm playback-info at most {TARGET_VS_ONE_TRIP:.0}× the one-RTT ceiling's instructions: {verdict} ({playback:.2}×).\n\n\
         How: each server runs under `valgrind --tool=callgrind`; after {warm} warm-up requests the counters are zeroed (`callgrind_control -z`), exactly {counted} requests are sent, {in_flight}, and the dump's total (`callgrind_control -d`) is divided by {counted}. The total is the whole process: every thread, the runtime, background tasks (health probes, metrics upkeep) included; the kernel is not. Requests are those of `scripts/bench`: playback-info walks {users} users × {titles} titles, the baselines get the same requests and answer {body_len} bytes, and a Moneta at full speed asked for every counted pair beforehand, so Redis is warm and the profiled process's own memory holds only what its warm-up put there (every user's token, the titles). Heartbeats go round {sessions} live sessions. Redis round trips are the reads Redis served during the count (`INFO stats` `total_reads_processed`), background probes included. Under valgrind Moneta runs ~50× slower, so its wall-clock lifetimes (title and entitlement caches) and timeouts are stretched for the run; background work that runs per second still weighs more per request than at full speed. `PROFILE_ANNOTATE=1 scripts/profile` keeps the playback-info profile and `callgrind_annotate` output in `target/profile/`.\n",
        date = report_date(),
        valgrind = command_line("valgrind", &["--version"]),
        machine = machine(),
        users = spread.users,
        titles = spread.titles.len(),
        sessions = HEARTBEAT_SESSIONS,
        in_flight = if concurrency == 1 {
            "one at a time over a keep-alive connection".to_owned()
        } else {
            format!(
                "{concurrency} at a time over keep-alive connections (Redis round trips then undercount: concurrent pipelines share a read)"
            )
        },
    )
}

/// Replaces the `heading` section (up to the next `## `) or, when absent,
/// puts it before the first other section.
fn replace_section(text: &str, heading: &str, section: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.iter().position(|l| l.trim_end() == heading);
    let (head, tail): (&[&str], &[&str]) = match start {
        Some(start) => {
            let end = lines[start + 1..]
                .iter()
                .position(|l| l.starts_with("## "))
                .map_or(lines.len(), |i| start + 1 + i);
            (&lines[..start], &lines[end..])
        }
        None => {
            let first = lines
                .iter()
                .position(|l| l.starts_with("## "))
                .unwrap_or(lines.len());
            (&lines[..first], &lines[first..])
        }
    };
    let mut out = head.join("\n");
    if !out.is_empty() {
        out.push_str("\n\n");
    }
    out.push_str(section.trim_end());
    out.push('\n');
    if !tail.is_empty() {
        out.push('\n');
        out.push_str(&tail.join("\n"));
        out.push('\n');
    }
    while out.contains("\n\n\n") {
        out = out.replace("\n\n\n", "\n\n");
    }
    out
}

/// Keeps the playback-info profile where it can be read after the run.
fn save_annotation(root: &Path, dump: &Path) {
    let out_dir = root.join("target/profile");
    std::fs::create_dir_all(&out_dir).expect("create target/profile");
    let kept = out_dir.join("playback-info.callgrind");
    std::fs::copy(dump, &kept).expect("copy the callgrind dump");
    // Functions on the stack when the counters are dumped (thread start, the
    // worker loop) show the whole total as their own cost; the list below
    // them is the real exclusive cost, hence no threshold.
    for (file, view) in [
        (
            "playback-info.annotate.txt",
            ["--threshold=100", "--inclusive=no"],
        ),
        (
            "playback-info.inclusive.txt",
            ["--threshold=99", "--inclusive=yes"],
        ),
    ] {
        let mut command = Command::new(require_binary("callgrind_annotate"));
        command.arg("--auto=no").args(view).arg(&kept);
        let output = run(&mut command, "callgrind_annotate");
        std::fs::write(out_dir.join(file), output.stdout).expect("write annotation");
    }
    eprintln!("profile and annotations in {}", out_dir.display());
}

/// `123456.7` → `123,457`.
fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value);
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}
