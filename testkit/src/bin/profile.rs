//! `scripts/profile`: instructions per warm request, counted by callgrind for
//! the bare axum baseline, the one-RTT ceilings of playback-info and of the
//! heartbeat, Moneta's playback-info and Moneta's heartbeat, on the stack
//! `scripts/bench` uses (`testkit::bench_stack`). Instruction counts repeat
//! where wall-clock numbers on a shared machine do not. Prints the table and
//! writes it into `docs/profiling.md`.
//!
//! Settings: PROFILE_REQUESTS (2000) requests counted per scenario,
//! PROFILE_WARMUP (one per user) requests before counting,
//! PROFILE_CONCURRENCY (1) requests in flight, PROFILE_ANNOTATE=1 keeps the
//! playback-info and heartbeat profiles and their `callgrind_annotate`
//! output in `target/profile/`, PROFILE_ONLY=heartbeat counts the heartbeat
//! and its ceiling alone and leaves the docs as they are, PROFILE_ONLY=layout
//! keeps one mangled profile of everything serving runs in
//! `target/profile/layout.callgrind` (for `scripts/hot-functions`); BENCH_USERS
//! and BENCH_TITLES as for `scripts/bench`.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use testkit::bench_stack::{
    Baseline, Binaries, MakeRequest, Spread, Stack, command_line, drive, env_or, heartbeat_requests, machine,
    playback_info_requests, redis_reads, report_date, repository_root, start_sessions, start_sessions_on,
};
use testkit::{require_binary, run};

const HEADING: &str = "## Instructions per request (scripts/profile)";
/// The target: a warm playback-info costs at most this many times
/// the one-RTT ceiling's instructions.
const TARGET_VS_ONE_TRIP: f64 = 2.0;
/// The heartbeat's target, in instructions per request.
const HEARTBEAT_TARGET: f64 = 90_000.0;
const HEARTBEAT_CEILING: &str = "baseline: heartbeat one-RTT ceiling (EVALSHA)";
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
    /// Names as the binary's symbol table has them (for the link order).
    mangled: bool,
}

impl Callgrind {
    fn new(dir: &Path, name: &str) -> Callgrind {
        Callgrind {
            out: dir.join(format!("{name}.callgrind")),
            log: dir.join(format!("{name}.valgrind.log")),
            mangled: false,
        }
    }

    fn mangled(self) -> Callgrind {
        Callgrind {
            mangled: true,
            ..self
        }
    }

    fn wrapper(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            require_binary("valgrind").into(),
            "--tool=callgrind".into(),
            format!("--callgrind-out-file={}", self.out.display()).into(),
            "--dump-instr=no".into(),
            format!("--log-file={}", self.log.display()).into(),
        ];
        if self.mangled {
            args.push("--demangle=no".into());
        }
        args
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

/// Which one-RTT ceiling a row is compared with.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    PlaybackInfo,
    Heartbeat,
}

struct Counted {
    name: &'static str,
    kind: Kind,
    per_request: f64,
    redis_round_trips: f64,
    /// Moneta only: the connections' tasks (HTTP/1, router, middleware,
    /// handler, answer, access line) and the progress courier, per request.
    parts: Option<Parts>,
    dump: PathBuf,
}

#[derive(Clone, Copy)]
struct Parts {
    connection: f64,
    courier: f64,
}

/// Functions whose inclusive cost is a [`Parts`] column.
const CONNECTION_TASK: &str = "moneta::startup::spawn_connection::{{closure}}";
const COURIER: &str = "moneta::progress::courier::Courier::run::{{closure}}";

/// Inclusive instructions of the connections' tasks and of the courier in a
/// dump, per request. The courier's share moves between runs of the same
/// build (it depends on how many entries each of its rounds finds), the
/// connections' tasks do not; the table shows both.
fn parts(dump: &Path, requests: u64) -> Option<Parts> {
    let mut command = Command::new(require_binary("callgrind_annotate"));
    command
        .args(["--auto=no", "--inclusive=yes", "--threshold=100"])
        .arg(dump);
    let output = run(&mut command, "callgrind_annotate");
    let text = String::from_utf8_lossy(&output.stdout);
    // A function is listed once per source file its code came from; the
    // largest of its lines is the whole of it.
    let inclusive = |function: &str| {
        text.lines()
            .filter(|l| l.contains(function))
            .filter_map(|l| l.split_whitespace().next()?.replace(',', "").parse::<f64>().ok())
            .fold(0.0, f64::max)
    };
    let n = requests as f64;
    let connection = inclusive(CONNECTION_TASK) / n;
    (connection > 0.0).then(|| Parts {
        connection,
        courier: inclusive(COURIER) / n,
    })
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
    fn count(
        &self,
        name: &'static str,
        kind: Kind,
        grind: &Callgrind,
        pid: u32,
        make: &MakeRequest,
    ) -> Counted {
        let started = Instant::now();
        eprintln!("{name}: {} warm-up requests", self.warm.end - self.warm.start);
        self.runtime
            .block_on(drive(&self.client, self.warm.clone(), self.concurrency, make));
        // Moneta's heartbeats are delivered by its courier, in rounds a
        // second apart: counted from an empty log to an empty log, the
        // window holds the delivery of exactly the counted heartbeats, not
        // of part of the warm-up's or without the last round's.
        let delivered = || {
            if kind == Kind::Heartbeat && name.starts_with("Moneta") {
                wait_for_empty_progress_log(self.redis_port, name)
            } else {
                0
            }
        };
        delivered();
        let reads_before = redis_reads(self.redis_port);
        grind.control(pid, "-z");
        let n = self.counted.end - self.counted.start;
        eprintln!("{name}: {n} counted requests");
        self.runtime
            .block_on(drive(&self.client, self.counted.clone(), self.concurrency, make));
        let polls = delivered();
        let (dump, total) = grind.dump(pid);
        // The second INFO is itself one read, and so is each poll above.
        let reads = redis_reads(self.redis_port).saturating_sub(reads_before + 1 + polls);
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
        let parts = name.starts_with("Moneta").then(|| parts(&dump, n)).flatten();
        Counted {
            name,
            kind,
            per_request,
            redis_round_trips: reads as f64 / n as f64,
            parts,
            dump,
        }
    }
}

/// Waits until every progress-log stream Moneta writes (`moneta:{…}:log`)
/// is empty: its courier deletes each entry once settled. Each poll is one
/// script, so one Redis read; returns how many were made. Gives up after a
/// minute with a note, so a stuck courier shows in the count, not as a hang.
fn wait_for_empty_progress_log(redis_port: u16, name: &str) -> u64 {
    const LEFT: &str = "local n, cursor = 0, '0' \
        repeat \
          local r = redis.call('SCAN', cursor, 'MATCH', 'moneta:*:log', 'COUNT', 1000) \
          cursor = r[1] \
          for _, key in ipairs(r[2]) do n = n + redis.call('XLEN', key) end \
        until cursor == '0' \
        return n";
    let cli = require_binary("redis-cli");
    let port = redis_port.to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut polls = 0;
    loop {
        let out = run(
            Command::new(&cli).args(["-p", &port, "EVAL", LEFT, "0"]),
            "redis-cli EVAL",
        );
        polls += 1;
        let left: u64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(u64::MAX);
        if left == 0 {
            return polls;
        }
        if Instant::now() >= deadline {
            eprintln!("{name}: progress-log entries still undelivered after 60 s ({left})");
            return polls;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn main() {
    let counted_n = env_or("PROFILE_REQUESTS", 2000).max(1);
    let concurrency = env_or("PROFILE_CONCURRENCY", 1).max(1) as usize;
    let annotate = std::env::var("PROFILE_ANNOTATE").is_ok_and(|v| v == "1");
    let only = std::env::var("PROFILE_ONLY").unwrap_or_default();
    let layout_only = only == "layout";
    let heartbeat_only = only == "heartbeat";
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
    let client = testkit::bench_stack::client();
    let dir = tempfile::tempdir().expect("tempdir");
    let stretched = stretched_settings();

    eprintln!("starting Redis, PostgreSQL and the internal API");
    let stack = Stack::start(Binaries::beside_current_exe("scripts/profile"), spread.clone());
    let tokens = Arc::new(stack.user_tokens());

    // Redis learns every pair the profiled processes will ask for from a
    // Moneta at full speed, which then leaves: the profiled Moneta starts
    // with nothing in its own memory, as after a deploy onto a warm Redis.
    eprintln!("warming Redis through a Moneta at full speed");
    // It also starts the sessions the heartbeat ceiling is sent heartbeats
    // for: ids of the same shape as those of the profiled Moneta's own
    // sessions, which the ceiling writes for without checking.
    let (body_len, ceiling_sessions) = {
        let native = stack.moneta(&[], &stretched, PATIENCE);
        let make = playback_info_requests(&native.url(), &tokens, &spread);
        runtime.block_on(async {
            let len = drive(&client, 0..1, 1, &make).await;
            if !heartbeat_only {
                drive(&client, 1..counted.end, 64, &make).await;
            }
            let sessions = start_sessions_on(
                &client,
                &native.url(),
                &tokens,
                &spread,
                HEARTBEAT_SESSIONS,
                "bench-ceiling",
            )
            .await;
            (len, Arc::new(sessions))
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
    if layout_only {
        let grind = Callgrind::new(dir.path(), "layout").mangled();
        let dump = layout_window(&job, &stack, &grind, &tokens, &spread);
        save_annotation(&root, "layout", &dump);
        return;
    }
    let mut results: Vec<Counted> = Vec::new();

    let baselines: &[Baseline] = if heartbeat_only {
        &[Baseline::OneRoundTrip]
    } else {
        &[Baseline::BareAxum, Baseline::OneRoundTrip]
    };
    for &kind in baselines {
        let grind = Callgrind::new(dir.path(), &kind.name().replace([' ', ':'], "-"));
        let server = stack.baseline(kind, body_len, &grind.wrapper(), PATIENCE);
        let pid = server.process.pid();
        if !heartbeat_only {
            let make = playback_info_requests(&server.url, &tokens, &spread);
            results.push(job.count(kind.name(), Kind::PlaybackInfo, &grind, pid, &make));
        }
        if kind == Baseline::OneRoundTrip {
            // The same process serves the heartbeat's ceiling, counted apart.
            let make = heartbeat_requests(&server.url, &ceiling_sessions);
            results.push(job.count(HEARTBEAT_CEILING, Kind::Heartbeat, &grind, pid, &make));
        }
    }

    let grind = Callgrind::new(dir.path(), "moneta");
    eprintln!("starting Moneta under callgrind");
    let moneta = stack.moneta(&grind.wrapper(), &stretched, PATIENCE);
    let base = moneta.url();
    if !heartbeat_only {
        let make = playback_info_requests(&base, &tokens, &spread);
        results.push(job.count(
            "Moneta playback-info, warm",
            Kind::PlaybackInfo,
            &grind,
            moneta.pid(),
            &make,
        ));
    }

    let sessions = Arc::new(runtime.block_on(start_sessions(
        &job.client,
        &base,
        &tokens,
        &spread,
        HEARTBEAT_SESSIONS,
    )));
    let make = heartbeat_requests(&base, &sessions);
    results.push(job.count("Moneta heartbeat", Kind::Heartbeat, &grind, moneta.pid(), &make));
    drop(moneta);

    if annotate {
        for r in &results {
            match r.name {
                "Moneta playback-info, warm" => save_annotation(&root, "playback-info", &r.dump),
                "Moneta heartbeat" => save_annotation(&root, "heartbeat", &r.dump),
                _ => {}
            }
        }
    }
    if heartbeat_only {
        for r in &results {
            println!(
                "{}: {} instructions/request{}, {:.2} Redis round trips/request",
                r.name,
                thousands(r.per_request),
                r.parts.map_or(String::new(), |p| format!(
                    " (connections' tasks {}, progress courier {})",
                    thousands(p.connection),
                    thousands(p.courier)
                )),
                r.redis_round_trips
            );
        }
        return;
    }
    // Rows in reading order: the baselines, then Moneta.
    results.sort_by_key(|r| (r.name.starts_with("Moneta"), r.kind == Kind::Heartbeat));
    let section = section(&results, &spread, counted_n, job.warm.end, concurrency, body_len);
    println!("\n{section}");
    let doc = root.join("docs/profiling.md");
    let text = std::fs::read_to_string(&doc).unwrap_or_else(|_| "# Profiling the hot path\n".into());
    std::fs::write(&doc, replace_section(&text, HEADING, &section)).expect("write docs/profiling.md");
}

/// PROFILE_ONLY=layout: one window over everything serving runs, for
/// `scripts/hot-functions` (the binary's link order, `build.rs`): warm
/// playback-infos and heartbeats on a kept connection, playback-infos on a
/// new connection each, session starts and stops, the admin port's scrape,
/// and the courier delivering the heartbeats. Start-up and the warm-up are
/// outside it. Names are kept mangled, as the linker needs them.
fn layout_window(
    job: &Run<'_>,
    stack: &Stack,
    grind: &Callgrind,
    tokens: &Arc<Vec<String>>,
    spread: &Spread,
) -> PathBuf {
    eprintln!("layout: starting Moneta under callgrind");
    let moneta = stack.moneta(&grind.wrapper(), &stretched_settings(), PATIENCE);
    let (base, pid) = (moneta.url(), moneta.pid());
    let playback_info = playback_info_requests(&base, tokens, spread);
    let client = &job.client;
    let sessions = job.runtime.block_on(async {
        drive(client, job.warm.clone(), 1, &playback_info).await;
        start_sessions(client, &base, tokens, spread, HEARTBEAT_SESSIONS).await
    });
    let heartbeats = heartbeat_requests(&base, &Arc::new(sessions));
    let _ = moneta.redis_calls();
    wait_for_empty_progress_log(job.redis_port, "layout");
    grind.control(pid, "-z");
    eprintln!("layout: the window");
    let n = job.counted.end - job.counted.start;
    job.runtime.block_on(async {
        drive(client, job.counted.clone(), 1, &playback_info).await;
        drive(client, 0..n, 1, &heartbeats).await;
        let fresh = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .expect("client");
        drive(
            &fresh,
            job.counted.start..job.counted.start + n / 10,
            1,
            &playback_info,
        )
        .await;
        let pairs = start_sessions_on(client, &base, tokens, spread, HEARTBEAT_SESSIONS, "layout").await;
        for (token, id) in &pairs {
            let stop = client
                .delete(format!("{base}/v1/playback/sessions/{id}"))
                .bearer_auth(token)
                .send()
                .await
                .expect("session stop");
            assert!(
                stop.status().is_success(),
                "session stop answered {}",
                stop.status()
            );
        }
    });
    for _ in 0..3 {
        let _ = moneta.redis_calls();
    }
    wait_for_empty_progress_log(job.redis_port, "layout");
    grind.dump(pid).0
}

fn section(
    results: &[Counted],
    spread: &Spread,
    counted: u64,
    warm: u64,
    concurrency: usize,
    body_len: usize,
) -> String {
    let of = |name: &str| {
        results
            .iter()
            .find(|r| r.name == name)
            .map_or(f64::NAN, |r| r.per_request)
    };
    let bare = of(Baseline::BareAxum.name());
    let ceiling = |kind: Kind| match kind {
        Kind::PlaybackInfo => of(Baseline::OneRoundTrip.name()),
        Kind::Heartbeat => of(HEARTBEAT_CEILING),
    };
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| scenario | instructions/request | vs its one-RTT ceiling | vs bare axum | Redis round trips/request | of which the connection's task | of which the progress courier |"
    );
    let _ = writeln!(table, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in results {
        let (connection, courier) = r.parts.map_or(("–".to_owned(), "–".to_owned()), |p| {
            (thousands(p.connection), thousands(p.courier))
        });
        let _ = writeln!(
            table,
            "| {} | {} | {:.2}× | {:.2}× | {:.2} | {connection} | {courier} |",
            r.name,
            thousands(r.per_request),
            r.per_request / ceiling(r.kind),
            r.per_request / bare,
            r.redis_round_trips,
        );
    }
    let verdict = |met: bool| if met { "met" } else { "not met" };
    let playback = of("Moneta playback-info, warm") / ceiling(Kind::PlaybackInfo);
    let heartbeat = of("Moneta heartbeat");
    let heartbeat_ratio = heartbeat / ceiling(Kind::Heartbeat);
    format!(
        "{HEADING}\n\n\
         Measured by `scripts/profile` ({date}; {valgrind}). Machine: {machine}.\n\n\
         {table}\n\
         Targets: a warm playback-info at most {TARGET_VS_ONE_TRIP:.0}× its one-RTT ceiling's instructions: {playback_verdict} ({playback:.2}×); a heartbeat at most {heartbeat_target}: {heartbeat_verdict} ({heartbeat_now}, {heartbeat_ratio:.2}× its ceiling).\n\n\
         How: each server runs under `valgrind --tool=callgrind`; after {warm} warm-up requests the counters are zeroed (`callgrind_control -z`), exactly {counted} requests are sent, {in_flight}, and the dump's total (`callgrind_control -d`) is divided by {counted}. The total is the whole process: every thread, the runtime, background tasks (health probes, metrics upkeep) included; the kernel is not. Requests are those of `scripts/bench`: playback-info walks {users} users × {titles} titles, the baselines get the same requests and answer {body_len} bytes, and a Moneta at full speed asked for every counted pair beforehand, so Redis is warm and the profiled process's own memory holds only what its warm-up put there (every user's token, the titles). Heartbeats go round {sessions} live sessions; the heartbeat ceiling (`examples/bench_baseline.rs`, the same process as the playback-info ceiling, counted apart) gets the same requests for another {sessions} sessions and answers each with one `EVALSHA` of a script doing a heartbeat's writes (`ZADD`, `HSET`, `XADD`, their lifetimes renewed only when low as Moneta's script renews them, on keys of Moneta's shape) and an answer of the heartbeat's shape, without authentication or the session checks. Redis round trips are the reads Redis served during the count (`INFO stats` `total_reads_processed`), background probes included. For Moneta, two parts of the total (inclusive, per request): the connection's task (HTTP/1, router, middleware, handler, answer, access line), which repeats from run to run, and the progress courier, background work that reads each heartbeat's log entry back and delivers it. Moneta's heartbeats are counted from an empty progress log to an empty one (the courier deletes each entry it settles), so the count holds the delivery of exactly the counted heartbeats. Under valgrind Moneta runs ~50× slower, so its wall-clock lifetimes (title and entitlement caches) and timeouts are stretched for the run; background work that runs per second still weighs more per request than at full speed. `PROFILE_ANNOTATE=1 scripts/profile` keeps the playback-info and heartbeat profiles and `callgrind_annotate` output in `target/profile/`.\n",
        playback_verdict = verdict(playback <= TARGET_VS_ONE_TRIP),
        heartbeat_verdict = verdict(heartbeat <= HEARTBEAT_TARGET),
        heartbeat_target = thousands(HEARTBEAT_TARGET),
        heartbeat_now = thousands(heartbeat),
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

/// Keeps a profile (`name`: `playback-info`, `heartbeat`) where it can be
/// read after the run.
fn save_annotation(root: &Path, name: &str, dump: &Path) {
    let out_dir = root.join("target/profile");
    std::fs::create_dir_all(&out_dir).expect("create target/profile");
    let kept = out_dir.join(format!("{name}.callgrind"));
    std::fs::copy(dump, &kept).expect("copy the callgrind dump");
    // Functions on the stack when the counters are dumped (thread start, the
    // worker loop) show the whole total as their own cost; the list below
    // them is the real exclusive cost, hence no threshold.
    for (file, view) in [
        ("annotate.txt", ["--threshold=100", "--inclusive=no"]),
        ("inclusive.txt", ["--threshold=99", "--inclusive=yes"]),
    ] {
        let mut command = Command::new(require_binary("callgrind_annotate"));
        command.arg("--auto=no").args(view).arg(&kept);
        let output = run(&mut command, "callgrind_annotate");
        std::fs::write(out_dir.join(format!("{name}.{file}")), output.stdout).expect("write annotation");
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
