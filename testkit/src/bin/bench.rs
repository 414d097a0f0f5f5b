//! `scripts/bench`: starts the bench stack (`testkit::bench_stack`), Moneta,
//! both baselines and nginx on loopback, drives each scenario with wrk, and
//! reports requests/s, p50/p99, peak RSS, Redis round trips per request and
//! the ratio to each baseline measured in the same round. Writes the table to
//! `docs/performance.md`.
//!
//! Settings: BENCH_DURATION_S (10), BENCH_ROUNDS (3), BENCH_CONNECTIONS (64),
//! BENCH_SOAK_S (60), BENCH_USERS (1000), BENCH_TITLES (200),
//! BENCH_OVERLOAD_S (20), BENCH_SCENARIOS (`all`, or `overload`, `cluster`, `memory` or
//! `reference` for that scenario alone, which rewrites only its section of the
//! report; `reference` runs only when asked, as it builds an older Moneta),
//! BENCH_SYSCALLS (`1`: also count the serving process's system calls,
//! context switches and page faults per request with `perf stat`, in the
//! first round's warm-up runs),
//! BENCH_SAMPLE (`1`: also sample where the serving process spends its CPU
//! time with `perf record`, in the first round's warm-up runs, into
//! `target/bench/samples/`: the data and, beside it, the share by function).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use testkit::bench_stack::{
    Baseline, Binaries, Spread, Stack, drive, env_or, machine, playback_info_requests, renew_sessions,
    report_date, repository_root, start_sessions, start_sessions_on,
};
use testkit::nginx::{Nginx, NginxOptions};
use testkit::{RedisCluster, require_binary};

/// The soak's memory target: peak RSS at most this, and flat.
const SOAK_TARGET_MIB: f64 = 12.0;
/// Heartbeats go round these many live sessions.
const HEARTBEAT_SESSIONS: usize = 64;
const WARM_CONCURRENCY: usize = 64;

/// A scenario's name as a file name: `playback-info-warm-cache`.
fn slug(name: &str) -> String {
    let mut out = String::new();
    for word in name
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .take(6)
    {
        if !out.is_empty() {
            out.push('-');
        }
        out.push_str(&word.to_ascii_lowercase());
    }
    out
}

/// Peak resident memory since the last reset, in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    status_kib(pid, "VmHWM:") / 1024.0
}

fn rss_mib(pid: u32) -> f64 {
    status_kib(pid, "VmRSS:") / 1024.0
}

fn status_kib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Resets the kernel's peak-RSS mark so each scenario reports its own peak.
fn reset_peak(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

#[derive(Default, Clone)]
struct Outcome {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: u64,
    non2xx: u64,
    socket_errors: u64,
    peak_rss_mib: f64,
    redis_calls: Option<f64>,
    cache_hits: Option<f64>,
    cpu: CpuPerRequest,
}

/// System calls by name and count, context switches, and the requests that
/// made them.
type SyscallCounts = (testkit::cpu::Counted, u64);

/// Where a request's CPU went, in µs: the serving process, Redis, wrk, and
/// the whole machine (which adds the kernel's loopback work outside any of
/// them, nginx and everything else).
#[derive(Default, Clone, Copy)]
struct CpuPerRequest {
    server: testkit::cpu::Times,
    redis: f64,
    wrk: f64,
    machine: f64,
}

impl CpuPerRequest {
    /// Measures around `run`; per request of the outcome `run` returns.
    fn around(server: u32, redis: u32, run: impl FnOnce() -> Outcome) -> Outcome {
        use testkit::cpu;
        let (s, r, w, m) = (
            cpu::process(server),
            cpu::process(redis),
            cpu::children(),
            cpu::machine_busy(),
        );
        let mut outcome = run();
        let per = 1e6 / outcome.requests.max(1) as f64;
        let server = cpu::process(server) - s;
        outcome.cpu = CpuPerRequest {
            server: testkit::cpu::Times {
                user: server.user * per,
                system: server.system * per,
            },
            redis: (cpu::process(redis) - r).total() * per,
            wrk: (cpu::children() - w).total() * per,
            machine: (cpu::machine_busy() - m) * per,
        };
        outcome
    }
}

struct Wrk {
    lua_dir: PathBuf,
    connections: u64,
    envs: Vec<(String, String)>,
}

impl Wrk {
    fn run(&self, url: &str, script: &str, seconds: u64) -> Outcome {
        self.run_as(url, script, seconds, 2, self.connections, &[])
    }

    /// With its own threads and connections; `envs` after the common ones.
    fn run_as(
        &self,
        url: &str,
        script: &str,
        seconds: u64,
        threads: u64,
        connections: u64,
        envs: &[(&str, &str)],
    ) -> Outcome {
        let out = Command::new(require_binary("wrk"))
            .args([
                &format!("-t{threads}"),
                &format!("-c{connections}"),
                &format!("-d{seconds}s"),
                "--timeout",
                "5s",
            ])
            .arg("-s")
            .arg(self.lua_dir.join(script))
            .arg(url)
            .env("BENCH_LUA_DIR", &self.lua_dir)
            .envs(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(envs.iter().copied())
            .output()
            .expect("run wrk");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "wrk failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = text
            .lines()
            .find(|l| l.starts_with("RESULT "))
            .unwrap_or_else(|| panic!("no RESULT from wrk:\n{text}"));
        let fields: BTreeMap<&str, f64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k, v.parse().ok()?))
            })
            .collect();
        let get = |k: &str| fields.get(k).copied().unwrap_or(0.0);
        Outcome {
            rps: get("rps"),
            p50_ms: get("p50_ms"),
            p99_ms: get("p99_ms"),
            requests: get("requests") as u64,
            non2xx: get("non2xx") as u64,
            socket_errors: get("socket_errors") as u64,
            ..Outcome::default()
        }
    }
}

/// Who serves a scenario, which decides whose RSS and round trips count.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Server {
    Bare,
    /// `examples/bench_baseline.rs` with Redis: playback-info's one-RTT
    /// ceiling…
    OneTrip,
    /// …and, in the same process, the heartbeat's.
    HeartbeatTrip,
    Moneta,
}

struct Scenario {
    name: &'static str,
    url: String,
    script: &'static str,
    server: Server,
    /// Requests per counted operation: a session start + stop pair is two.
    requests_per_op: f64,
}

/// Median, min and max of a few numbers.
fn spread_of(values: &[f64]) -> (f64, f64, f64) {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() {
    let duration = env_or("BENCH_DURATION_S", 10);
    let rounds = env_or("BENCH_ROUNDS", 3).max(1);
    let connections = env_or("BENCH_CONNECTIONS", 64);
    let soak = env_or("BENCH_SOAK_S", 60);
    let spread = Spread::from_env();
    let root = repository_root();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");

    eprintln!("starting Redis, PostgreSQL and the internal API");
    let stack = Stack::start(Binaries::beside_current_exe("scripts/bench"), spread.clone());
    eprintln!("starting Moneta");
    let moneta = stack.moneta(&[], &[], Duration::from_secs(60));
    let moneta_pid = moneta.pid();
    let base = moneta.url();
    let at_start = testkit::memory::breakdown(moneta_pid);

    let tokens = Arc::new(stack.user_tokens());
    let pair_token = stack.token("bench-pair", 100_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("bench file");
        path.display().to_string()
    };
    let tokens_file = write("tokens", tokens.join("\n"));
    let titles_file = write("titles", spread.titles.join("\n"));

    let client = testkit::bench_stack::client();
    let playback_info = playback_info_requests(&base, &tokens, &spread);
    let warm_started = Instant::now();
    let (body_len, sessions) = runtime.block_on(async {
        let len = drive(&client, 0..1, 1, &playback_info).await;
        // Every user × title pair once, so Redis holds each caller's
        // entitlement and resume position before anything is measured (the
        // one-RTT baseline reads those same keys).
        eprintln!(
            "warming: playback-info for {} users × {} titles",
            spread.users,
            spread.titles.len()
        );
        drive(&client, 1..spread.pairs(), WARM_CONCURRENCY, &playback_info).await;
        let sessions = start_sessions(&client, &base, &tokens, &spread, HEARTBEAT_SESSIONS).await;
        (len, sessions)
    });
    let warm_s = warm_started.elapsed().as_secs_f64();
    let warmed = testkit::memory::breakdown(moneta_pid);
    let before_loads = [("At start", at_start), ("After the warm-up", warmed)];
    let heartbeat_sessions = sessions_file(dir.path(), "sessions", &sessions);

    // The overload flood's sessions: one per user, on devices of their own,
    // started right before the flood (they live 90 s without a heartbeat).
    let flood_sessions = |moneta: &testkit::bench_stack::Moneta| {
        let started = runtime.block_on(start_sessions_on(
            &client,
            &moneta.url(),
            &tokens,
            &spread,
            spread.users,
            "bench-flood",
        ));
        let file = sessions_file(dir.path(), "flood-sessions", &started);
        (file, started.len())
    };
    let wrk = Wrk {
        lua_dir: root.join("bench/wrk"),
        connections,
        envs: vec![
            ("BENCH_TOKENS".into(), tokens_file),
            ("BENCH_TITLE_IDS".into(), titles_file),
            ("BENCH_SESSIONS".into(), heartbeat_sessions),
            ("BENCH_PAIR_TOKEN".into(), pair_token),
        ],
    };
    let overload_s = env_or("BENCH_OVERLOAD_S", 20).max(8);
    let report_path = root.join("docs/performance.md");
    if std::env::var("BENCH_SCENARIOS").is_ok_and(|v| v.trim() == "overload") {
        let (flood_sessions_file, flood_sessions) = flood_sessions(&moneta);
        // Only the processes this scenario measures.
        drop(moneta);
        let section = overload_section(&stack, &wrk, &flood_sessions_file, flood_sessions, overload_s);
        println!("\n{section}");
        let old = std::fs::read_to_string(&report_path).unwrap_or_default();
        let _ = std::fs::write(&report_path, with_section(&old, OVERLOAD_HEADING, &section));
        return;
    }
    let cluster_section = |moneta: &testkit::bench_stack::Moneta| {
        cluster_section(
            &stack,
            &wrk,
            moneta,
            &runtime,
            &tokens,
            (rounds, duration),
            dir.path(),
        )
    };
    if std::env::var("BENCH_SCENARIOS").is_ok_and(|v| v.trim() == "memory") {
        let section = memory_section(&wrk, &base, moneta_pid, duration, &before_loads, || {
            runtime.block_on(renew_sessions(&client, &base, &sessions))
        });
        println!("\n{section}");
        let old = std::fs::read_to_string(&report_path).unwrap_or_default();
        let _ = std::fs::write(&report_path, with_section(&old, MEMORY_HEADING, &section));
        return;
    }
    if std::env::var("BENCH_SCENARIOS").is_ok_and(|v| v.trim() == "reference") {
        let section = reference_section(
            &stack,
            &wrk,
            &moneta,
            &runtime,
            &tokens,
            (rounds, duration, body_len),
            dir.path(),
        );
        println!("\n{section}");
        let old = std::fs::read_to_string(&report_path).unwrap_or_default();
        let _ = std::fs::write(&report_path, with_section(&old, REFERENCE_HEADING, &section));
        return;
    }
    if std::env::var("BENCH_SCENARIOS").is_ok_and(|v| v.trim() == "cluster") {
        let section = cluster_section(&moneta);
        println!("\n{section}");
        let old = std::fs::read_to_string(&report_path).unwrap_or_default();
        let _ = std::fs::write(&report_path, with_section(&old, CLUSTER_HEADING, &section));
        return;
    }

    let never = Duration::from_secs(60);
    let bare = stack.baseline(Baseline::BareAxum, body_len, &[], never);
    let one_trip = stack.baseline(Baseline::OneRoundTrip, body_len, &[], never);
    let nginx = Nginx::start(
        NginxOptions::new(base.trim_start_matches("http://")).rate_limit("1000000r/s", 1_000_000),
    );

    let scenario = |name, url: &str, script, server, requests_per_op| Scenario {
        name,
        url: url.to_owned(),
        script,
        server,
        requests_per_op,
    };
    let scenarios = [
        scenario(
            "baseline: bare axum, same body size",
            &bare.url,
            "playback_info.lua",
            Server::Bare,
            1.0,
        ),
        scenario(
            "baseline: one-RTT ceiling (one Redis pipeline, same keys)",
            &one_trip.url,
            "playback_info.lua",
            Server::OneTrip,
            1.0,
        ),
        scenario(
            "playback-info, warm cache",
            &base,
            "playback_info.lua",
            Server::Moneta,
            1.0,
        ),
        scenario(
            "playback-info, repeat viewers (each user one title)",
            &base,
            "playback_info_repeat.lua",
            Server::Moneta,
            1.0,
        ),
        scenario(
            "session start + stop (pairs/s)",
            &base,
            "session_pair.lua",
            Server::Moneta,
            2.0,
        ),
        scenario(
            "baseline: heartbeat one-RTT ceiling (one EVALSHA: ZADD, HSET, XADD on keys of the same shape)",
            &one_trip.url,
            "heartbeat.lua",
            Server::HeartbeatTrip,
            1.0,
        ),
        scenario("heartbeat", &base, "heartbeat.lua", Server::Moneta, 1.0),
        scenario(
            "playback-info through nginx",
            &nginx.url(""),
            "playback_info.lua",
            Server::Moneta,
            1.0,
        ),
    ];
    let [bare_at, one_trip_at, heartbeat_trip_at] = [Server::Bare, Server::OneTrip, Server::HeartbeatTrip]
        .map(|s| scenarios.iter().position(|sc| sc.server == s).expect("baselines"));
    // A heartbeat's ceiling is one EVALSHA, not playback-info's pipeline.
    let ceiling_of = |sc: &Scenario| match sc.script {
        "heartbeat.lua" => heartbeat_trip_at,
        _ => one_trip_at,
    };
    // This machine's speed drifts (shared cores): every round measures both
    // baselines and each scenario back to back, a ratio is taken within its
    // round, and the table reports the median round.
    let mut rounds_out: Vec<Vec<Outcome>> = vec![Vec::new(); scenarios.len()];
    let count_syscalls = std::env::var("BENCH_SYSCALLS").is_ok_and(|v| v.trim() == "1");
    // Per scenario: the counts by call, and the requests they were made for.
    let mut syscalls: Vec<Option<SyscallCounts>> = vec![None; scenarios.len()];
    let sample = std::env::var("BENCH_SAMPLE").is_ok_and(|v| v.trim() == "1");
    let samples_dir = repository_root().join("target/bench/samples");
    // Per scenario: the share of the serving process's samples by part.
    let mut sampled: Vec<Option<Vec<(testkit::cpu::Part, f64)>>> = vec![None; scenarios.len()];
    if sample {
        std::fs::create_dir_all(&samples_dir).expect("create target/bench/samples");
    }
    for round in 1..=rounds {
        for (i, sc) in scenarios.iter().enumerate() {
            eprintln!("round {round}/{rounds}: {}", sc.name);
            // A round outlasts the sessions' 90 s of liveness.
            runtime.block_on(renew_sessions(&client, &base, &sessions));
            let pid = match sc.server {
                Server::Bare => bare.process.pid(),
                Server::OneTrip | Server::HeartbeatTrip => one_trip.process.pid(),
                Server::Moneta => moneta_pid,
            };
            // Counting and sampling run over the warm-up run, so they never
            // slow a measured one.
            let counting = (count_syscalls && round == 1).then(|| testkit::cpu::Syscalls::count(pid));
            let sampling = (sample && round == 1).then(|| {
                let out = samples_dir.join(format!("{i}-{}.data", slug(sc.name)));
                testkit::cpu::Samples::record(pid, out)
            });
            let warm = wrk.run(&sc.url, sc.script, 3);
            if let Some(counting) = counting {
                syscalls[i] = Some((counting.stop(), warm.requests.max(1)));
            }
            if let Some(sampling) = sampling {
                sampled[i] = Some(sampling.stop());
            }
            reset_peak(pid);
            let before = (moneta.redis_calls(), moneta.client_cache_hits());
            let mut outcome =
                CpuPerRequest::around(pid, stack.redis.pid(), || wrk.run(&sc.url, sc.script, duration));
            outcome.peak_rss_mib = peak_rss_mib(pid);
            if sc.server == Server::Moneta {
                let requests = outcome.requests.max(1) as f64;
                outcome.redis_calls = Some((moneta.redis_calls() - before.0) / requests);
                outcome.cache_hits = Some((moneta.client_cache_hits() - before.1) / requests);
            }
            outcome.rps /= sc.requests_per_op;
            rounds_out[i].push(outcome);
        }
    }
    let ratio_to = |baseline: usize, per_round: &[Outcome]| {
        let ratios: Vec<f64> = per_round
            .iter()
            .zip(&rounds_out[baseline])
            .map(|(o, b)| o.rps / b.rps.max(1.0) * 100.0)
            .collect();
        spread_of(&ratios)
    };
    struct Row {
        name: &'static str,
        median: Outcome,
        vs_bare: (f64, f64, f64),
        vs_one_trip: (f64, f64, f64),
        server: Server,
    }
    let rows: Vec<Row> = scenarios
        .iter()
        .zip(&rounds_out)
        .map(|(sc, per_round)| {
            let mut by_rps = per_round.clone();
            by_rps.sort_by(|a, b| a.rps.total_cmp(&b.rps));
            Row {
                name: sc.name,
                median: by_rps[by_rps.len() / 2].clone(),
                vs_bare: ratio_to(bare_at, per_round),
                vs_one_trip: ratio_to(ceiling_of(sc), per_round),
                server: sc.server,
            }
        })
        .collect();

    eprintln!("soak: playback-info for {soak} s, sampling RSS every 5 s");
    reset_peak(moneta_pid);
    let start_rss = rss_mib(moneta_pid);
    let soak_started = Instant::now();
    let sampler = std::thread::spawn(move || {
        let mut s = Vec::new();
        while soak_started.elapsed() < Duration::from_secs(soak) {
            std::thread::sleep(Duration::from_secs(5));
            s.push(rss_mib(moneta_pid));
        }
        s
    });
    let soak_outcome = wrk.run(&base, "playback_info.lua", soak);
    let samples = sampler.join().unwrap_or_default();
    let soak_peak = peak_rss_mib(moneta_pid);

    let mut table = String::new();
    let _ = writeln!(
        table,
        "| scenario | requests/s | p50 ms | p99 ms | peak RSS MiB | vs bare axum (median, min–max) | vs its one-RTT ceiling (median, min–max) | Redis calls/request | client-cache hits/request | non-2xx | socket errors |"
    );
    let _ = writeln!(
        table,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let percent = |(median, low, high): (f64, f64, f64)| format!("{median:.0} % ({low:.0}–{high:.0} %)");
    for row in &rows {
        let o = &row.median;
        let redis = match (row.server, o.redis_calls) {
            (_, Some(r)) => format!("{r:.2}"),
            (Server::OneTrip | Server::HeartbeatTrip, None) => "1 (by construction)".into(),
            _ => "–".into(),
        };
        let hits = o
            .cache_hits
            .map(|h| format!("{h:.2}"))
            .unwrap_or_else(|| "–".into());
        let _ = writeln!(
            table,
            "| {} | {:.0} | {:.2} | {:.2} | {:.1} | {} | {} | {redis} | {hits} | {} | {} |",
            row.name,
            o.rps,
            o.p50_ms,
            o.p99_ms,
            o.peak_rss_mib,
            percent(row.vs_bare),
            percent(row.vs_one_trip),
            o.non2xx,
            o.socket_errors
        );
    }
    let _ = writeln!(
        table,
        "\nCPU per request, µs (the same median rounds): the serving process's user and system time, Redis's, wrk's, and the machine's busy time over both cores (user, system, irq and softirq of every process and none: the rest is mostly the kernel's loopback and, in the nginx row, nginx). Every part shares the two cores, so requests/s go with the machine's column, not the server's alone.\n"
    );
    let _ = writeln!(
        table,
        "| scenario | server user | server system | Redis | wrk | the rest | machine | machine vs its one-RTT ceiling |"
    );
    let _ = writeln!(table, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (row, sc) in rows.iter().zip(&scenarios) {
        let c = row.median.cpu;
        let ceiling = rows[ceiling_of(sc)].median.cpu.machine;
        let rest = c.machine - c.server.total() - c.redis - c.wrk;
        let _ = writeln!(
            table,
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {rest:.1} | {:.1} | {:.2}× |",
            row.name,
            c.server.user,
            c.server.system,
            c.redis,
            c.wrk,
            c.machine,
            c.machine / ceiling.max(f64::MIN_POSITIVE)
        );
    }
    if sample {
        use testkit::cpu::Part;
        let _ = writeln!(
            table,
            "\nWhere the serving process's CPU time goes, µs per request (`BENCH_SAMPLE=1`: `perf record` on the `cpu-clock` event at 4999 Hz over the first round's 3 s warm-up run; each part's share of the samples times the server's user + system time per request above). A sample counts where it fell after inlining: generic code counts under the crate that names the function first, code inlined into Moneta's functions counts as Moneta's. Parts: the kernel (system calls, the network stack, scheduling); the allocator (mimalloc, or glibc's malloc for the baselines); `memcpy`/`memcmp`; clock reads through the vDSO; the runtime (tokio, futures); HTTP (hyper, axum, http, tower, bytes); the Redis client (redis, combine); caches (moka); telemetry (tracing, OpenTelemetry, metrics); JSON (serde); tokens and signing; Moneta's own functions; std, core and hashbrown; and the rest. The data and each function's share are in `target/bench/samples/`.\n"
        );
        let short: Vec<&str> = Part::ALL.iter().map(|p| p.column()).collect();
        let _ = writeln!(table, "| scenario | {} | server |", short.join(" | "));
        let _ = writeln!(table, "| --- |{} ---: |", " ---: |".repeat(short.len()));
        for (row, shares) in rows.iter().zip(&sampled) {
            let Some(shares) = shares else {
                continue;
            };
            let server = row.median.cpu.server.total();
            let cells: Vec<String> = Part::ALL
                .iter()
                .map(|part| {
                    let share = shares.iter().find(|(p, _)| p == part).map_or(0.0, |(_, s)| *s);
                    format!("{:.2}", share / 100.0 * server)
                })
                .collect();
            let _ = writeln!(table, "| {} | {} | {server:.1} |", row.name, cells.join(" | "));
        }
    }
    if count_syscalls {
        let _ = writeln!(
            table,
            "\nSystem calls per request of the serving process (`BENCH_SYSCALLS=1`: `perf stat` on the kernel's syscall tracepoints over the first round's 3 s warm-up run), those made at least 0.05 times a request, the times one of its threads was switched out (`context-switches`: waiting for work or preempted), and its page faults (memory the allocator gave back to the kernel and touched again, or touched for the first time):\n"
        );
        let _ = writeln!(
            table,
            "| scenario | all | by call | context switches | page faults |"
        );
        let _ = writeln!(table, "| --- | ---: | --- | ---: | ---: |");
        for (sc, counted) in scenarios.iter().zip(&syscalls) {
            let Some((counted, requests)) = counted else {
                continue;
            };
            let per = |n: u64| n as f64 / *requests as f64;
            let all: u64 = counted.calls.iter().map(|(_, n)| n).sum();
            let by_call: Vec<String> = counted
                .calls
                .iter()
                .filter(|(_, n)| per(*n) >= 0.05)
                .map(|(name, n)| format!("{name} {:.2}", per(*n)))
                .collect();
            let _ = writeln!(
                table,
                "| {} | {:.2} | {} | {:.2} | {:.3} |",
                sc.name,
                per(all),
                by_call.join(", "),
                per(counted.context_switches),
                per(counted.page_faults)
            );
        }
    }
    let first = samples.first().copied().unwrap_or(start_rss);
    let last = samples.last().copied().unwrap_or(start_rss);
    let low = samples.iter().copied().fold(f64::INFINITY, f64::min).min(first);
    let high = samples.iter().copied().fold(0.0, f64::max);
    let verdict = if soak_peak <= SOAK_TARGET_MIB {
        "within"
    } else {
        "over"
    };
    let soak_line = format!(
        "Soak: playback-info for {soak} s at {:.0} requests/s, p99 {:.2} ms, {} non-2xx; RSS {start_rss:.1} MiB before, {first:.1} MiB after 5 s, {last:.1} MiB at the end (samples every 5 s span {low:.1}–{high:.1} MiB: {}); peak {soak_peak:.1} MiB, {verdict} the {SOAK_TARGET_MIB:.0} MiB target.",
        soak_outcome.rps,
        soak_outcome.p99_ms,
        soak_outcome.non2xx,
        samples
            .iter()
            .map(|s| format!("{s:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let report = format!(
        "# Performance\n\n\
         Measured by `scripts/bench` ({date}; wrk with 2 threads and {connections} connections, {rounds} round{plural} of {duration} s per scenario, each after a 3 s warm-up).\n\n\
         Machine: {machine}.\n\n\
         Load: {users} users × {titles} titles. playback-info requests walk every user × title pair (users fastest, each wrk thread from a random point of the cycle). The internal API's demo seed has a dozen titles, most limited by country or plan, so the bench adds copies of m-0001 (`m-1001`…) beside it and users `bench-0`…. Before the rounds every pair was asked for once ({warm_s:.0} s), so Redis holds every caller's entitlement and resume position. Both baselines get the same requests and answer a body of playback-info's size ({body_len} bytes): the bare axum handler does nothing else, the one-RTT ceiling (`examples/bench_baseline.rs`) makes one Redis pipeline (GET entitlement + HGET position) per request over the same keys in the same order — the least I/O a warm playback-info needs unless it answers from memory held in the process. The heartbeat has a ceiling of its own in the same process: Moneta's heartbeat requests, answered with one `EVALSHA` of a script doing a heartbeat's writes (`ZADD` to the sessions set, `HSET` of the position, `XADD` to the bucket's progress log, their lifetimes renewed only when low as Moneta's script renews them, on keys of Moneta's shape under a `ceiling:` prefix) and an answer of the heartbeat's shape, without authentication or the session checks; heartbeat rows are compared with it, every other row with playback-info's.\n\n\
         {table}\n\
         {soak_line}\n\n\
         Each row is the median round; a ratio is taken against each baseline of the same round. Session start + stop counts pairs (each pair is two requests). Heartbeats go round {sessions} live sessions. Redis calls per request are Moneta's own count (`moneta_dependency_requests_total{{dependency=\"redis\"}}`: a command, a pipeline or a script is one call; background probes included); a call the client-side cache answered whole is one of them but makes no round trip. Client-cache hits per request count reads the in-process copy of Redis answered (`moneta_redis_client_cache_requests_total{{result=\"hit\"}}`): a playback-info reads two keys, so 2.00 means no round trip at all, 1.00 typically the entitlement from the copy and the position from Redis. Instructions per request and per-function costs: `docs/profiling.md`.\n",
        date = report_date(),
        machine = machine(),
        users = spread.users,
        titles = spread.titles.len(),
        sessions = HEARTBEAT_SESSIONS,
        plural = if rounds == 1 { "" } else { "s" },
    );
    drop(nginx);
    let memory = memory_section(&wrk, &base, moneta_pid, duration, &before_loads, || {
        runtime.block_on(renew_sessions(&client, &base, &sessions))
    });
    let cluster = cluster_section(&moneta);
    let (flood_sessions_file, flood_sessions) = flood_sessions(&moneta);
    drop(moneta);
    let section = overload_section(&stack, &wrk, &flood_sessions_file, flood_sessions, overload_s);
    let report = with_section(&report, MEMORY_HEADING, &memory);
    let report = with_section(&report, CLUSTER_HEADING, &cluster);
    let report = with_section(&report, OVERLOAD_HEADING, &section);
    let old = std::fs::read_to_string(&report_path).unwrap_or_default();
    let report = with_kept_sections(&report, &old);
    println!("\n{report}");
    let _ = std::fs::write(&report_path, report);
}

/// The overload scenario (CONTRACT §9): heartbeats from this many connections…
const FLOOD_CONNECTIONS: u64 = 4096;
/// …and, beside them, playback-info from these many.
const PROBE_CONNECTIONS: u64 = 4;
/// The contract's figures for it.
const PROBE_SUCCESS_TARGET_PCT: f64 = 99.0;
const PROBE_P99_TARGET_MS: f64 = 100.0;
const FLOOD_P99_TARGET_MS: f64 = 250.0;
const OVERLOAD_RSS_TARGET_MIB: f64 = 96.0;
const OVERLOAD_HEADING: &str = "## Overload";
const SESSION_ROUTE: &str = "route=\"/v1/playback/sessions/{session_id}\"";

struct OverloadRow {
    name: &'static str,
    flood: Outcome,
    probe: Outcome,
    /// Flood requests answered `503 overloaded` (admission) and `503` by a
    /// handler (the Redis bulkhead full, a timeout).
    shed: f64,
    handler_503: f64,
    limit_at_end: f64,
    peak_rss_mib: f64,
}

impl OverloadRow {
    /// Share of a run's requests answered 2xx; wrk counts a request it gave
    /// up on (5 s) or lost to a socket error as no answer.
    fn success_pct(o: &Outcome) -> f64 {
        let sent = (o.requests + o.socket_errors).max(1) as f64;
        (o.requests - o.non2xx.min(o.requests)) as f64 / sent * 100.0
    }

    /// Flood requests answered 2xx or 503, as the contract asks of every one.
    fn flood_answered_pct(&self) -> f64 {
        let o = &self.flood;
        let sent = (o.requests + o.socket_errors).max(1) as f64;
        let ok = (o.requests - o.non2xx.min(o.requests)) as f64;
        ((ok + self.shed + self.handler_503) / sent * 100.0).min(100.0)
    }

    fn shed_pct(&self) -> f64 {
        self.shed / self.flood.requests.max(1) as f64 * 100.0
    }
}

/// One fresh Moneta with `settings` under the flood and the probe.
fn overload_row(
    stack: &Stack,
    wrk: &Wrk,
    flood_sessions_file: &str,
    seconds: u64,
    name: &'static str,
    settings: &[(&str, String)],
) -> (OverloadRow, Outcome) {
    eprintln!("overload: {name}");
    let moneta = stack.moneta(&[], settings, Duration::from_secs(60));
    let base = moneta.url();
    // This process's own copies (titles, the client-side cache) warm up
    // with the probe alone, which is also the reference p99.
    let _ = wrk.run_as(&base, "playback_info.lua", 3, 1, PROBE_CONNECTIONS, &[]);
    let alone = wrk.run_as(&base, "playback_info.lua", 5, 1, PROBE_CONNECTIONS, &[]);
    reset_peak(moneta.pid());
    let shed_before = moneta.metric("moneta_requests_shed_total", SESSION_ROUTE);
    let handler_503 = |m: &testkit::bench_stack::Moneta| {
        m.metric(
            "moneta_http_requests_total",
            &format!("{SESSION_ROUTE},status=\"503\""),
        )
    };
    let handler_503_before = handler_503(&moneta);
    let flood_envs = [("BENCH_SESSIONS", flood_sessions_file)];
    let (flood, probe, limit_at_end) = std::thread::scope(|scope| {
        let flood =
            scope.spawn(|| wrk.run_as(&base, "heartbeat.lua", seconds, 2, FLOOD_CONNECTIONS, &flood_envs));
        // The probe runs inside the flood: it starts once all 4096
        // connections are open and ends before they close.
        std::thread::sleep(Duration::from_secs(2));
        let probe = wrk.run_as(&base, "playback_info.lua", seconds - 4, 1, PROBE_CONNECTIONS, &[]);
        let limit = moneta.metric("moneta_overload_limit", "");
        (flood.join().expect("the flood's wrk"), probe, limit)
    });
    let row = OverloadRow {
        name,
        peak_rss_mib: peak_rss_mib(moneta.pid()),
        shed: moneta.metric("moneta_requests_shed_total", SESSION_ROUTE) - shed_before,
        handler_503: handler_503(&moneta) - handler_503_before,
        limit_at_end,
        flood,
        probe,
    };
    (row, alone)
}

/// Before (no admission control) and after (the default adaptive limit).
fn overload_section(
    stack: &Stack,
    wrk: &Wrk,
    flood_sessions_file: &str,
    sessions: usize,
    seconds: u64,
) -> String {
    let nofile = command_line_of("sh", &["-c", "ulimit -n"]);
    let (before, _) = overload_row(
        stack,
        wrk,
        flood_sessions_file,
        seconds,
        "before: no admission control (`MONETA_OVERLOAD_LIMIT=off`)",
        &[("MONETA_OVERLOAD_LIMIT", "off".into())],
    );
    let (after, alone) = overload_row(
        stack,
        wrk,
        flood_sessions_file,
        seconds,
        "after: adaptive limit (default)",
        &[],
    );
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| | probe success | probe p99 ms | probe req/s | flood answered 2xx or 503 | flood p99 ms | flood p50 ms | flood req/s | shed (503 overloaded) | other 503 | socket errors | limit at the end | peak RSS MiB |"
    );
    let _ = writeln!(
        table,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for row in [&before, &after] {
        let limit = if row.limit_at_end > 0.0 {
            format!("{:.0}", row.limit_at_end)
        } else {
            "off".into()
        };
        let _ = writeln!(
            table,
            "| {} | {:.2} % | {:.1} | {:.0} | {:.2} % | {:.1} | {:.1} | {:.0} | {:.1} % | {:.0} | {} | {limit} | {:.1} |",
            row.name,
            OverloadRow::success_pct(&row.probe),
            row.probe.p99_ms,
            row.probe.rps,
            row.flood_answered_pct(),
            row.flood.p99_ms,
            row.flood.p50_ms,
            row.flood.rps,
            row.shed_pct(),
            row.handler_503,
            row.flood.socket_errors,
            row.peak_rss_mib,
        );
    }
    let _ = writeln!(
        table,
        "| contract (§9) | ≥ {PROBE_SUCCESS_TARGET_PCT:.0} % | ≤ {PROBE_P99_TARGET_MS:.0} | | 100 % | ≤ {FLOOD_P99_TARGET_MS:.0} | | | | | | | ≤ {OVERLOAD_RSS_TARGET_MIB:.0} |"
    );
    let verdict = |ok: bool| if ok { "met" } else { "missed" };
    let checks = [
        (
            "probe success",
            OverloadRow::success_pct(&after.probe) >= PROBE_SUCCESS_TARGET_PCT,
        ),
        ("probe p99", after.probe.p99_ms <= PROBE_P99_TARGET_MS),
        ("flood answered", after.flood_answered_pct() >= 99.99),
        ("flood p99", after.flood.p99_ms <= FLOOD_P99_TARGET_MS),
        ("peak RSS", after.peak_rss_mib <= OVERLOAD_RSS_TARGET_MIB),
    ]
    .iter()
    .map(|(what, ok)| format!("{what} {}", verdict(*ok)))
    .collect::<Vec<_>>()
    .join(", ");
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    format!(
        "{OVERLOAD_HEADING} (CONTRACT §9)\n\n\
         Measured by `scripts/bench` ({date}; `BENCH_SCENARIOS=overload` runs this alone). Machine: {machine}; open files {nofile}.\n\n\
         wrk sends heartbeats from {FLOOD_CONNECTIONS} connections (2 threads) round {sessions} live sessions (one per bench user) for {seconds} s; beside them, playback-info from {PROBE_CONNECTIONS} other connections (1 thread, the probe) walks the warm user × title pairs, from 2 s after the flood starts to 2 s before it ends. Each row is one fresh Moneta process on the same Redis and internal API; wrk, Moneta, Redis and the internal API share the machine's cores. A request wrk gave up on (5 s) or lost to a socket error counts as unanswered.\n\n\
         {table}\n\
         Reference: the probe alone on the same instance, just before the flood: p99 {alone_p99:.2} ms at {alone_rps:.0} requests/s. Under the flood the probe's p99 is {after_vs_alone:.0}× that with admission control, {before_vs_alone:.0}× without; its success went from {before_success:.2} % to {after_success:.2} %, the flood's p99 from {before_flood:.0} ms to {after_flood:.0} ms, peak RSS from {before_rss:.1} MiB to {after_rss:.1} MiB.\n\n\
         Against the contract, after: {checks}.\n",
        date = report_date(),
        machine = machine(),
        alone_p99 = alone.p99_ms,
        alone_rps = alone.rps,
        after_vs_alone = ratio(after.probe.p99_ms, alone.p99_ms),
        before_vs_alone = ratio(before.probe.p99_ms, alone.p99_ms),
        before_success = OverloadRow::success_pct(&before.probe),
        after_success = OverloadRow::success_pct(&after.probe),
        before_flood = before.flood.p99_ms,
        after_flood = after.flood.p99_ms,
        before_rss = before.peak_rss_mib,
        after_rss = after.peak_rss_mib,
    )
}

/// `report` with its section under `heading` replaced by `section`, or
/// added before the first section, so a scenario run alone lands beside the
/// single-node table it is compared with.
fn with_section(report: &str, heading: &str, section: &str) -> String {
    let Some(start) = report.find(heading) else {
        return match report.find("\n## ") {
            Some(at) => format!("{}\n\n{section}\n{}", report[..at].trim_end(), &report[at + 1..]),
            None => format!("{}\n\n{section}", report.trim_end()),
        };
    };
    let rest = &report[start + heading.len()..];
    let end = rest
        .find("\n## ")
        .map_or(report.len(), |at| start + heading.len() + at + 1);
    format!("{}{section}{}", &report[..start], &report[end..])
}

/// `report` followed by the sections of `old` a run does not write (kept by
/// hand: the hot-path goals and their reasons), so a full run keeps them.
fn with_kept_sections(report: &str, old: &str) -> String {
    let mut out = report.trim_end().to_owned();
    for section in old.split("\n## ").skip(1) {
        let section = format!("## {}", section.trim_end());
        if !report.contains(section.lines().next().unwrap_or_default()) {
            out.push_str("\n\n");
            out.push_str(&section);
        }
    }
    out.push('\n');
    out
}

/// The first line a shell command prints.
fn command_line_of(program: &str, args: &[&str]) -> String {
    testkit::bench_stack::command_line(program, args)
}

const MEMORY_HEADING: &str = "## Memory";

/// Where Moneta's resident memory is after `seconds` of playback-info and
/// then of heartbeats (each from a reset peak), crate by crate for its code.
fn memory_section(
    wrk: &Wrk,
    base: &str,
    pid: u32,
    seconds: u64,
    before_loads: &[(&str, Option<testkit::memory::Breakdown>)],
    renew_sessions: impl Fn(),
) -> String {
    let mut section = format!(
        "{MEMORY_HEADING}\n\n\
         Measured by `scripts/bench` ({date}; `BENCH_SCENARIOS=memory` runs this alone): Moneta's memory from `/proc` when it had started, after the warm-up, and at the end of {seconds} s of each load (wrk as above, from a reset peak, after the rounds above when the whole bench runs). Anonymous is `RssAnon` (heap, stacks, caches); the binary's code is its executable mapping, resident pages of it; a crate's row counts the bytes of its functions that lie on resident pages (`nm` sizes against `/proc/<pid>/pagemap`; generic code counts under the crate that instantiated it).\n\n",
        date = report_date(),
    );
    // The warm-up fills the caches: every user's token, every title, the
    // client-side cache's entitlements and positions.
    for (when, breakdown) in before_loads {
        if let Some(b) = breakdown {
            section.push_str(&b.markdown(when, 0));
        }
    }
    for (name, script) in [
        ("playback-info", "playback_info.lua"),
        ("heartbeat", "heartbeat.lua"),
    ] {
        eprintln!("memory: {name} for {seconds} s");
        renew_sessions();
        let _ = wrk.run(base, script, 3);
        reset_peak(pid);
        let _ = wrk.run(base, script, seconds);
        match testkit::memory::breakdown(pid) {
            Some(b) => section.push_str(&b.markdown(&format!("After {name}"), 12)),
            None => section.push_str(&format!("After {name}: the process was gone.\n")),
        }
        section.push('\n');
    }
    section
}

const CLUSTER_HEADING: &str = "## Redis Cluster";
const CLUSTER_PRIMARIES: usize = 3;

/// One measured wrk run against `moneta`, with its Redis calls and
/// client-cache hits per request.
fn measure(
    wrk: &Wrk,
    moneta: &testkit::bench_stack::Moneta,
    script: &str,
    seconds: u64,
    envs: &[(&str, &str)],
) -> Outcome {
    let url = moneta.url();
    let _ = wrk.run_as(&url, script, 3, 2, wrk.connections, envs);
    let before = (moneta.redis_calls(), moneta.client_cache_hits());
    let mut outcome = measure_server(wrk, (&url, moneta.pid()), script, (0, seconds), envs);
    let requests = outcome.requests.max(1) as f64;
    outcome.redis_calls = Some((moneta.redis_calls() - before.0) / requests);
    outcome.cache_hits = Some((moneta.client_cache_hits() - before.1) / requests);
    outcome
}

/// [`measure`] for any server, Moneta's metrics aside: `seconds` of
/// `script` after `warm_up_s` of it (none for 0), with the server's peak RSS
/// over the measured seconds.
fn measure_server(
    wrk: &Wrk,
    (url, pid): (&str, u32),
    script: &str,
    (warm_up_s, seconds): (u64, u64),
    envs: &[(&str, &str)],
) -> Outcome {
    if warm_up_s > 0 {
        let _ = wrk.run_as(url, script, warm_up_s, 2, wrk.connections, envs);
    }
    reset_peak(pid);
    let mut outcome = wrk.run_as(url, script, seconds, 2, wrk.connections, envs);
    outcome.peak_rss_mib = peak_rss_mib(pid);
    outcome
}

/// Writes `sessions` for wrk's heartbeat script (`<token> <id>` a line) to
/// `dir/name`; its path.
fn sessions_file(dir: &Path, name: &str, sessions: &[(String, String)]) -> String {
    let path = dir.join(name);
    let lines: String = sessions
        .iter()
        .map(|(token, id)| format!("{token} {id}\n"))
        .collect();
    std::fs::write(&path, lines).expect("bench file");
    path.display().to_string()
}

/// Warms `newcomer` the way the main Moneta was (every user × title pair
/// once) and starts heartbeat sessions on it and on `beside`, whose sessions
/// from the main rounds may have ended by now (90 s without a heartbeat).
/// The seconds it took, and both sessions with their file, the newcomer's
/// first.
fn warm_beside(
    stack: &Stack,
    runtime: &tokio::runtime::Runtime,
    tokens: &Arc<Vec<String>>,
    (newcomer, beside): (&testkit::bench_stack::Moneta, &testkit::bench_stack::Moneta),
    name: &str,
    dir: &Path,
) -> (f64, [Started; 2]) {
    let client = testkit::bench_stack::client();
    let started = Instant::now();
    let sessions = runtime.block_on(async {
        let playback_info = playback_info_requests(&newcomer.url(), tokens, &stack.spread);
        drive(&client, 0..stack.spread.pairs(), WARM_CONCURRENCY, &playback_info).await;
        let mut sessions = Vec::new();
        for (moneta, prefix) in [
            (newcomer, format!("bench-{name}")),
            (beside, format!("bench-{name}-beside")),
        ] {
            let on = &moneta.url();
            sessions.push(
                start_sessions_on(&client, on, tokens, &stack.spread, HEARTBEAT_SESSIONS, &prefix).await,
            );
        }
        sessions
    });
    let warm_s = started.elapsed().as_secs_f64();
    let mut sessions = sessions.into_iter();
    let mut started = |file: String| {
        let sessions = sessions.next().unwrap_or_default();
        Started {
            file: sessions_file(dir, &file, &sessions),
            sessions,
        }
    };
    (
        warm_s,
        [
            started(format!("{name}-sessions")),
            started(format!("{name}-beside-sessions")),
        ],
    )
}

/// Heartbeat sessions started on one Moneta, and the file wrk reads them from.
struct Started {
    sessions: Vec<(String, String)>,
    file: String,
}

/// Per load, per round, one outcome per contender: every round measures each
/// load on every contender back to back, so that a ratio taken within a round
/// is not the machine's drift. `takes` and `measure` get the load's wrk
/// script and the contender's index; a contender that does not take a load
/// gets an empty outcome (no requests), which the tables leave out.
fn alternated<const N: usize>(
    section: &str,
    rounds: u64,
    loads: &[(&str, &str)],
    contenders: [&str; N],
    takes: impl Fn(&str, usize) -> bool,
    mut measure: impl FnMut(&str, usize) -> Outcome,
) -> Vec<Vec<[Outcome; N]>> {
    let mut measured: Vec<Vec<[Outcome; N]>> = vec![Vec::new(); loads.len()];
    for round in 1..=rounds {
        for (i, (name, script)) in loads.iter().enumerate() {
            measured[i].push(std::array::from_fn(|at| {
                if !takes(script, at) {
                    return Outcome::default();
                }
                eprintln!("{section} round {round}/{rounds}: {name}, {}", contenders[at]);
                measure(script, at)
            }));
        }
    }
    measured
}

/// Contender `at`'s outcome in its median round by requests/s.
fn median_round<const N: usize>(per_round: &[[Outcome; N]], at: usize) -> Outcome {
    let mut by_rps: Vec<&Outcome> = per_round.iter().map(|r| &r[at]).collect();
    by_rps.sort_by(|a, b| a.rps.total_cmp(&b.rps));
    by_rps[by_rps.len() / 2].clone()
}

/// Median, min and max over the rounds of contender `at`'s `value` divided
/// by contender `against`'s in the same round.
fn ratio_over_rounds<const N: usize>(
    per_round: &[[Outcome; N]],
    at: usize,
    against: usize,
    value: fn(&Outcome) -> f64,
) -> (f64, f64, f64) {
    let ratios: Vec<f64> = per_round
        .iter()
        .map(|r| value(&r[at]) / value(&r[against]).max(f64::MIN_POSITIVE))
        .collect();
    spread_of(&ratios)
}

/// The single-node Moneta `single` and a Moneta on a 3-primary Redis Cluster
/// under the same playback-info and heartbeat load, back to back in every
/// round, so that the ratio between them is not the machine's drift.
fn cluster_section(
    stack: &Stack,
    wrk: &Wrk,
    single: &testkit::bench_stack::Moneta,
    runtime: &tokio::runtime::Runtime,
    tokens: &Arc<Vec<String>>,
    (rounds, duration): (u64, u64),
    dir: &Path,
) -> String {
    eprintln!("cluster: starting a {CLUSTER_PRIMARIES}-node Redis Cluster and a Moneta on it");
    let cluster = RedisCluster::start(CLUSTER_PRIMARIES);
    let moneta = stack.moneta(
        &[],
        &[("MONETA_REDIS_CLUSTER_URLS", cluster.urls())],
        Duration::from_secs(60),
    );
    // The cluster starts empty; warmed like the single node, it holds the
    // same entitlements and positions when the rounds begin.
    let (warm_s, [on_cluster, on_single]) =
        warm_beside(stack, runtime, tokens, (&moneta, single), "cluster", dir);
    let cluster_envs = [("BENCH_SESSIONS", on_cluster.file.as_str())];
    let single_envs = [("BENCH_SESSIONS", on_single.file.as_str())];

    let loads = [
        ("playback-info, warm cache", "playback_info.lua"),
        ("heartbeat", "heartbeat.lua"),
    ];
    let measured = alternated(
        "cluster",
        rounds,
        &loads,
        ["single node", "cluster"],
        |_, _| true,
        |script, at| match at {
            0 => measure(wrk, single, script, duration, &single_envs),
            _ => measure(wrk, &moneta, script, duration, &cluster_envs),
        },
    );

    let mut table = String::new();
    let _ = writeln!(
        table,
        "| scenario | Redis | requests/s | p50 ms | p99 ms | peak RSS MiB | cluster vs single node (median, min–max) | Redis calls/request | client-cache hits/request | non-2xx | socket errors |"
    );
    let _ = writeln!(
        table,
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for ((name, _), per_round) in loads.iter().zip(&measured) {
        let (median, low, high) = ratio_over_rounds(per_round, 1, 0, |o| o.rps);
        for (at, redis) in [(0, "single node"), (1, "cluster, 3 primaries")] {
            let o = &median_round(per_round, at);
            let ratio = if at == 0 {
                "100 %".to_owned()
            } else {
                format!(
                    "{:.0} % ({:.0}–{:.0} %)",
                    median * 100.0,
                    low * 100.0,
                    high * 100.0
                )
            };
            let _ = writeln!(
                table,
                "| {name} | {redis} | {:.0} | {:.2} | {:.2} | {:.1} | {ratio} | {:.2} | {:.2} | {} | {} |",
                o.rps,
                o.p50_ms,
                o.p99_ms,
                o.peak_rss_mib,
                o.redis_calls.unwrap_or(0.0),
                o.cache_hits.unwrap_or(0.0),
                o.non2xx,
                o.socket_errors
            );
        }
    }
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    format!(
        "{CLUSTER_HEADING}\n\n\
         Measured by `scripts/bench` ({date}; `BENCH_SCENARIOS=cluster` runs this alone; wrk with 2 threads and {connections} connections, {rounds} round{plural} of {duration} s per row, each after a 3 s warm-up). Machine: {machine}.\n\n\
         Two Moneta processes on the same internal API: the single-node one of the table above (one Redis) and one with `MONETA_REDIS_CLUSTER_URLS` on a {CLUSTER_PRIMARIES}-primary Redis Cluster without replicas. Every round measures the single node and then the cluster, back to back, under each load; the ratio is taken within its round, and each row is the median round. The cluster was warmed like the single node (every user × title pair once, then {HEARTBEAT_SESSIONS} live sessions for the heartbeats; {warm_s:.0} s). These figures come from one run on a noisy {cores}-core machine where the three Redis nodes, wrk, Moneta and the internal API share the cores: they show what cluster mode costs Moneta as a client, not the throughput three Redis machines would give.\n\n\
         {table}",
        date = report_date(),
        machine = machine(),
        connections = wrk.connections,
        plural = if rounds == 1 { "" } else { "s" },
    )
}

const REFERENCE_HEADING: &str = "## The Go service, through the build it was compared with";
/// The build of Moneta that the hot path's second round compared with the Go
/// service of the same contract. The Go service is not in this repository and
/// does not run here; this build does, so it carries that comparison over.
const REFERENCE_REV: &str = "60747d7";
/// What that comparison found, on its own host, per load: Moneta at
/// [`REFERENCE_REV`] over the Go service, in requests/s and in peak RSS.
const GO_MEASURED: [(&str, f64, f64); 2] = [("playback-info", 3.96, 1.28), ("heartbeat", 1.91, 1.39)];
/// The goals set against the Go service: requests/s at least this…
const GO_THROUGHPUT_GOAL: f64 = 4.0;
/// …and peak RSS at most this.
const GO_RSS_GOAL: f64 = 1.0;
/// The most heartbeats the group-committed ceiling writes in one call.
const HEARTBEAT_BATCH: &str = "32";

/// Moneta at [`REFERENCE_REV`], built once into `target/reference/` from
/// this repository's history (`git archive`, then the release build its own
/// `Cargo.lock` pins).
fn reference_build(root: &Path) -> PathBuf {
    let dir = root.join("target/reference");
    let binary = dir.join(format!("moneta-{REFERENCE_REV}"));
    if binary.is_file() {
        return binary;
    }
    let src = dir.join(format!("src-{REFERENCE_REV}"));
    if !src.join("Cargo.toml").is_file() {
        std::fs::create_dir_all(&src).expect("create target/reference");
        let archive = Command::new("git")
            .arg("-C")
            .arg(root)
            .args(["archive", "--format=tar", REFERENCE_REV])
            .output()
            .expect("run git archive");
        assert!(
            archive.status.success(),
            "git archive {REFERENCE_REV} failed (a shallow clone lacks it: `git fetch --unshallow`): {}",
            String::from_utf8_lossy(&archive.stderr)
        );
        let tar_file = dir.join(format!("src-{REFERENCE_REV}.tar"));
        std::fs::write(&tar_file, &archive.stdout).expect("write the archive");
        let status = Command::new("tar")
            .arg("-xf")
            .arg(&tar_file)
            .arg("-C")
            .arg(&src)
            .status()
            .expect("run tar");
        assert!(status.success(), "unpacking {REFERENCE_REV} failed");
        let _ = std::fs::remove_file(&tar_file);
    }
    eprintln!(
        "reference: building Moneta at {REFERENCE_REV} (a release build, several minutes the first time)"
    );
    let status = Command::new("cargo")
        .args([
            "build",
            "--release",
            "--locked",
            "-p",
            "moneta",
            "--bin",
            "moneta",
        ])
        .current_dir(&src)
        .env("CARGO_TARGET_DIR", &dir)
        .status()
        .expect("run cargo");
    assert!(status.success(), "building Moneta at {REFERENCE_REV} failed");
    std::fs::copy(dir.join("release/moneta"), &binary).expect("keep the reference binary");
    binary
}

/// This build, Moneta at [`REFERENCE_REV`] (on a Redis of its own, warmed the
/// same way) and the one-RTT ceilings under playback-info and heartbeat load,
/// back to back in every round. The ratios to the reference build, times what
/// the reference measured against the Go service, say where this build
/// stands against the Go service.
fn reference_section(
    stack: &Stack,
    wrk: &Wrk,
    current: &testkit::bench_stack::Moneta,
    runtime: &tokio::runtime::Runtime,
    tokens: &Arc<Vec<String>>,
    (rounds, duration, body_len): (u64, u64, usize),
    dir: &Path,
) -> String {
    let binary = reference_build(&repository_root());
    eprintln!("reference: starting Moneta at {REFERENCE_REV} on a Redis of its own");
    let redis = testkit::RedisServer::start();
    let reference = stack.moneta_binary(
        &binary,
        &[],
        &[("MONETA_REDIS_URL", redis.url.clone())],
        Duration::from_secs(60),
    );
    let ceiling = stack.baseline(Baseline::OneRoundTrip, body_len, &[], Duration::from_secs(60));
    let batched = stack.baseline_with(
        Baseline::OneRoundTrip,
        body_len,
        &[],
        &[("BENCH_HEARTBEAT_BATCH", HEARTBEAT_BATCH)],
        Duration::from_secs(60),
    );
    let (warm_s, [on_reference, on_current]) =
        warm_beside(stack, runtime, tokens, (&reference, current), "reference", dir);
    let client = testkit::bench_stack::client();

    let loads = [
        ("playback-info, warm cache", "playback_info.lua"),
        ("heartbeat", "heartbeat.lua"),
    ];
    let contenders = [
        format!("Moneta at {REFERENCE_REV}"),
        "this build".to_owned(),
        "its one-RTT ceiling".to_owned(),
        format!("the heartbeat ceiling, group-committed (up to {HEARTBEAT_BATCH} a call)"),
    ];
    let measured = alternated(
        "reference",
        rounds,
        &loads,
        contenders.each_ref().map(String::as_str),
        // Batching changes only how heartbeats are written.
        |script, at| at < 3 || script == "heartbeat.lua",
        |script, at| {
            // A round outlasts the sessions' 90 s of liveness.
            if script == "heartbeat.lua" && at < 2 {
                let (moneta, sessions) = match at {
                    0 => (&reference, &on_reference.sessions),
                    _ => (current, &on_current.sessions),
                };
                runtime.block_on(renew_sessions(&client, &moneta.url(), sessions));
            }
            match at {
                0 => measure(
                    wrk,
                    &reference,
                    script,
                    duration,
                    &[("BENCH_SESSIONS", &on_reference.file)],
                ),
                1 => measure(
                    wrk,
                    current,
                    script,
                    duration,
                    &[("BENCH_SESSIONS", &on_current.file)],
                ),
                2 => measure_server(
                    wrk,
                    (&ceiling.url, ceiling.process.pid()),
                    script,
                    (3, duration),
                    &[],
                ),
                _ => measure_server(
                    wrk,
                    (&batched.url, batched.process.pid()),
                    script,
                    (3, duration),
                    &[],
                ),
            }
        },
    );

    let mut table = String::new();
    let _ = writeln!(
        table,
        "| load | server | requests/s | p50 ms | p99 ms | peak RSS MiB | requests/s vs Moneta at {REFERENCE_REV} (median, min–max) | peak RSS vs Moneta at {REFERENCE_REV} (median) | requests/s vs the Go service (derived) | peak RSS vs the Go service (derived) | non-2xx | socket errors |"
    );
    let _ = writeln!(
        table,
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let mut verdicts = Vec::new();
    for (((name, _), per_round), (go_load, go_rps, go_rss)) in loads.iter().zip(&measured).zip(GO_MEASURED) {
        for (at, server) in contenders.iter().enumerate() {
            let o = median_round(per_round, at);
            if o.requests == 0 {
                continue;
            }
            let (rps, rps_low, rps_high) = ratio_over_rounds(per_round, at, 0, |o| o.rps);
            let (rss, _, _) = ratio_over_rounds(per_round, at, 0, |o| o.peak_rss_mib);
            // The ceilings' memory is a bare handler's: no answer to compare.
            let rss_vs_go = if at >= 2 {
                "–".to_owned()
            } else {
                format!("{:.2}×", go_rss * rss)
            };
            let _ = writeln!(
                table,
                "| {name} | {server} | {:.0} | {:.2} | {:.2} | {:.1} | {:.2} ({rps_low:.2}–{rps_high:.2}) | {rss:.2} | {:.2}× | {rss_vs_go} | {} | {} |",
                o.rps,
                o.p50_ms,
                o.p99_ms,
                o.peak_rss_mib,
                rps,
                go_rps * rps,
                o.non2xx,
                o.socket_errors
            );
            if at == 1 {
                let met = |ok: bool| if ok { "met" } else { "missed" };
                verdicts.push(format!(
                    "{go_load}: requests/s {:.2}× the Go service's (goal ≥ {GO_THROUGHPUT_GOAL}×, {}), peak RSS {:.2}× (goal ≤ {GO_RSS_GOAL}×, {})",
                    go_rps * rps,
                    met(go_rps * rps >= GO_THROUGHPUT_GOAL),
                    go_rss * rss,
                    met(go_rss * rss <= GO_RSS_GOAL),
                ));
            }
            if at >= 2 {
                verdicts.push(format!(
                    "{go_load}, {server}: {:.2}× the Go service's requests/s",
                    go_rps * rps
                ));
            }
        }
    }
    format!(
        "{REFERENCE_HEADING}\n\n\
         Measured by `scripts/bench` ({date}; `BENCH_SCENARIOS=reference` runs this alone; wrk with 2 threads and {connections} connections, {rounds} round{plural} of {duration} s per row, each after a 3 s warm-up). Machine: {machine}.\n\n\
         The Go service of the same contract is not in this repository and does not run here. The comparison with it was made on another host against Moneta at `{REFERENCE_REV}`, which does: it found Moneta's requests/s {pb_rps}× and {hb_rps}× the Go service's (playback-info, heartbeat) and its peak RSS {pb_rss}× and {hb_rss}×. Here this build, Moneta at `{REFERENCE_REV}` (built from this repository's history into `target/reference/`, on a Redis of its own, warmed the same way: every user × title pair, then {HEARTBEAT_SESSIONS} live sessions; {warm_s:.0} s) the one-RTT ceilings of the main table, and the heartbeat's ceiling group-committed (`BENCH_HEARTBEAT_BATCH` in `examples/bench_baseline.rs`: heartbeats that arrive while earlier ones are being written go together, up to {HEARTBEAT_BATCH} in one `EVALSHA`, at most two calls in flight) run the same loads back to back in every round; a ratio to `{REFERENCE_REV}` is taken within its round, each row is the median round, and the derived columns multiply that ratio by what `{REFERENCE_REV}` measured against the Go service. The derivation assumes the Go service would keep its ratio to `{REFERENCE_REV}` on this host.\n\n\
         {table}\n\
         {verdicts}.\n",
        date = report_date(),
        machine = machine(),
        connections = wrk.connections,
        plural = if rounds == 1 { "" } else { "s" },
        pb_rps = GO_MEASURED[0].1,
        hb_rps = GO_MEASURED[1].1,
        pb_rss = GO_MEASURED[0].2,
        hb_rss = GO_MEASURED[1].2,
        verdicts = verdicts.join("; "),
    )
}
