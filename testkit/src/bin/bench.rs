//! `scripts/bench`: starts Redis, PostgreSQL, the internal API, Moneta, a bare
//! axum baseline and nginx on loopback, drives each scenario with wrk, and
//! reports requests/s, p50/p99, peak RSS and the ratio to the baseline measured
//! in the same run. Writes the table to `docs/performance.md`.
//!
//! Settings: BENCH_DURATION_S (10), BENCH_ROUNDS (3), BENCH_CONNECTIONS (64), BENCH_SOAK_S (60).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use testkit::nginx::{Nginx, NginxOptions};
use testkit::sqlx::{self, Connection};
use testkit::{PgServer, Process, RedisServer, free_port, require_binary, run};

const SECRET: &str = "bench-only-secret";
const USERS: usize = 256;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Starts `bin`, its stdout discarded and its stderr shown, and waits until it listens.
fn spawn(bin: &Path, args: &[&str], envs: &[(&str, String)], port: u16, what: &str) -> Process {
    Process::spawn(
        Command::new(bin)
            .args(args)
            .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit()),
        what,
    )
    .listening_on(port)
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

/// Redis round trips so far, as Moneta counts them: every guarded Redis call
/// (a command, a pipeline or a script) is one.
fn redis_round_trips(runtime: &tokio::runtime::Runtime, admin: &str) -> u64 {
    let text = runtime
        .block_on(async { reqwest::get(format!("{admin}/metrics")).await?.text().await })
        .unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("moneta_dependency_requests_total{") && l.contains("dependency=\"redis\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
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
    redis_round_trips: Option<f64>,
}

struct Wrk {
    lua_dir: PathBuf,
    connections: u64,
    envs: Vec<(String, String)>,
}

impl Wrk {
    fn run(&self, url: &str, script: &str, seconds: u64) -> Outcome {
        let out = Command::new(require_binary("wrk"))
            .args([
                "-t2",
                &format!("-c{}", self.connections),
                &format!("-d{seconds}s"),
                "--timeout",
                "5s",
            ])
            .arg("-s")
            .arg(self.lua_dir.join(script))
            .arg(url)
            .env("BENCH_LUA_DIR", &self.lua_dir)
            .envs(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
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

fn token(moneta: &Path, sub: &str, max_streams: u32) -> String {
    let out = Command::new(moneta)
        .args([
            "token",
            "--sub",
            sub,
            "--plan",
            "premium",
            "--max-streams",
            &max_streams.to_string(),
            "--country",
            "KR",
            "--ttl",
            "2h",
        ])
        .env("MONETA_JWT_HS256_SECRET", SECRET)
        .output()
        .expect("moneta token");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").map(|v| v.trim().to_owned()))
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel = Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let rustc = Command::new("rustc")
        .arg("-V")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!(
        "{cores} cores ({cpu}), {mem} memory, Linux {kernel}, {rustc}, release build, everything on one machine over loopback"
    )
}

fn main() {
    let duration = env_or("BENCH_DURATION_S", 10);
    let rounds = env_or("BENCH_ROUNDS", 3).max(1);
    let connections = env_or("BENCH_CONNECTIONS", 64);
    let soak = env_or("BENCH_SOAK_S", 60);
    let exe = std::env::current_exe().expect("own path");
    let bin_dir = exe.parent().expect("target dir").to_path_buf();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let moneta_bin = bin_dir.join("moneta");
    let api_bin = bin_dir.join("internal-api");
    let baseline_bin = bin_dir.join("examples").join("bench_baseline");
    for b in [&moneta_bin, &api_bin, &baseline_bin] {
        assert!(
            b.is_file(),
            "{} is missing: build with scripts/bench",
            b.display()
        );
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");

    eprintln!("starting Redis, PostgreSQL and the internal API");
    let redis = RedisServer::start();
    let pg = PgServer::start();
    let database_url = runtime.block_on(pg.create_database());
    run(
        Command::new(&api_bin)
            .arg("seed")
            .env("DATABASE_URL", &database_url)
            .env("RUST_LOG", "warn"),
        "internal-api seed",
    );
    runtime.block_on(async {
        let mut conn = sqlx::PgConnection::connect(&database_url).await.expect("connect");
        sqlx::query(
            "INSERT INTO entitlements (user_id, plan, max_streams, active)
             SELECT 'bench-' || g, 'premium', 4, true FROM generate_series(0, $1) g
             UNION ALL SELECT 'bench-pair', 'premium', 100000, true
             ON CONFLICT (user_id) DO NOTHING",
        )
        .bind(USERS as i32 - 1)
        .execute(&mut conn)
        .await
        .expect("bench users");
    });
    let api_port = free_port();
    let _api = spawn(
        &api_bin,
        &[],
        &[
            ("DATABASE_URL", database_url.clone()),
            ("INTERNAL_API_LISTEN_ADDR", format!("127.0.0.1:{api_port}")),
            ("RUST_LOG", "warn".into()),
        ],
        api_port,
        "internal-api",
    );

    eprintln!("starting Moneta");
    let port = free_port();
    let admin_port = free_port();
    let moneta = spawn(
        &moneta_bin,
        &["serve"],
        &[
            ("MONETA_LISTEN_ADDR", format!("127.0.0.1:{port}")),
            ("MONETA_ADMIN_ADDR", format!("127.0.0.1:{admin_port}")),
            ("MONETA_REDIS_URL", redis.url.clone()),
            ("MONETA_INTERNAL_API_URL", format!("http://127.0.0.1:{api_port}")),
            ("MONETA_JWT_HS256_SECRET", SECRET.into()),
            // Production's level: the access log line is part of the cost.
            ("RUST_LOG", "info".into()),
        ],
        port,
        "moneta",
    );
    let moneta_pid = moneta.pid();
    let base = format!("http://127.0.0.1:{port}");
    let admin = format!("http://127.0.0.1:{admin_port}");

    let tokens: Vec<String> = (0..USERS)
        .map(|i| token(&moneta_bin, &format!("bench-{i}"), 4))
        .collect();
    let pair_token = token(&moneta_bin, "bench-pair", 100_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let tokens_file = dir.path().join("tokens");
    std::fs::write(&tokens_file, tokens.join("\n")).expect("tokens file");

    let client = reqwest::Client::new();
    let (body_len, sessions) = runtime.block_on(async {
        let first = client
            .get(format!("{base}/v1/contents/m-0001/playback-info"))
            .bearer_auth(&tokens[0])
            .send()
            .await
            .expect("first request");
        assert_eq!(
            first.status(),
            200,
            "playback-info must answer before benchmarking"
        );
        let len = first.bytes().await.map(|b| b.len()).unwrap_or(0);
        let mut sessions = String::new();
        for t in tokens.iter().take(64) {
            let resp: serde_json::Value = client
                .post(format!("{base}/v1/playback/sessions"))
                .bearer_auth(t)
                .json(&serde_json::json!({"content_id": "m-0001", "device_id": "bench-heartbeat"}))
                .send()
                .await
                .expect("start")
                .json()
                .await
                .expect("start body");
            let id = resp["session_id"].as_str().expect("session id");
            let _ = writeln!(sessions, "{t} {id}");
        }
        (len, sessions)
    });
    let sessions_file = dir.path().join("sessions");
    std::fs::write(&sessions_file, sessions).expect("sessions file");

    let baseline_port = free_port();
    let baseline = spawn(
        &baseline_bin,
        &[&format!("127.0.0.1:{baseline_port}"), &body_len.to_string()],
        &[],
        baseline_port,
        "baseline",
    );
    let nginx =
        Nginx::start(NginxOptions::new(format!("127.0.0.1:{port}")).rate_limit("1000000r/s", 1_000_000));

    let wrk = Wrk {
        lua_dir: root.join("bench/wrk"),
        connections,
        envs: vec![
            ("BENCH_TOKENS".into(), tokens_file.display().to_string()),
            ("BENCH_SESSIONS".into(), sessions_file.display().to_string()),
            ("BENCH_PAIR_TOKEN".into(), pair_token),
        ],
    };
    let scenarios: [(&str, String, &str, u32); 5] = [
        (
            "baseline: bare axum, same body size",
            format!("http://127.0.0.1:{baseline_port}"),
            "baseline.lua",
            0,
        ),
        ("playback-info, warm cache", base.clone(), "playback_info.lua", 1),
        (
            "session start + stop (pairs/s)",
            base.clone(),
            "session_pair.lua",
            2,
        ),
        ("heartbeat", base.clone(), "heartbeat.lua", 1),
        (
            "playback-info through nginx",
            nginx.url(""),
            "playback_info.lua",
            1,
        ),
    ];
    // This machine's speed drifts (shared cores): every round measures the
    // baseline and each scenario back to back, a ratio is taken within its
    // round, and the table reports the median round.
    let mut rounds_out: Vec<Vec<Outcome>> = vec![Vec::new(); scenarios.len()];
    for round in 1..=rounds {
        for (i, (name, url, script, requests_per_op)) in scenarios.iter().enumerate() {
            eprintln!("round {round}/{rounds}: {name}");
            let _ = wrk.run(url, script, 3);
            let pid = if *requests_per_op == 0 {
                baseline.pid()
            } else {
                moneta_pid
            };
            reset_peak(pid);
            let before = redis_round_trips(&runtime, &admin);
            let mut outcome = wrk.run(url, script, duration);
            outcome.peak_rss_mib = peak_rss_mib(pid);
            if *requests_per_op > 0 {
                let trips = redis_round_trips(&runtime, &admin).saturating_sub(before);
                outcome.redis_round_trips = Some(trips as f64 / outcome.requests.max(1) as f64);
            }
            if *requests_per_op == 2 {
                outcome.rps /= 2.0;
            }
            rounds_out[i].push(outcome);
        }
    }
    let ratios: Vec<Vec<f64>> = rounds_out
        .iter()
        .map(|per_round| {
            per_round
                .iter()
                .zip(&rounds_out[0])
                .map(|(o, base)| o.rps / base.rps.max(1.0) * 100.0)
                .collect()
        })
        .collect();
    let results: Vec<(&str, Outcome, f64, f64, f64)> = scenarios
        .iter()
        .zip(&rounds_out)
        .zip(&ratios)
        .map(|((scenario, per_round), ratio)| {
            let mut by_rps = per_round.clone();
            by_rps.sort_by(|a, b| a.rps.total_cmp(&b.rps));
            let mut r = ratio.clone();
            r.sort_by(f64::total_cmp);
            let median = by_rps[by_rps.len() / 2].clone();
            (scenario.0, median, r[r.len() / 2], r[0], r[r.len() - 1])
        })
        .collect();

    eprintln!("soak: playback-info for {soak} s, sampling RSS");
    reset_peak(moneta_pid);
    let start_rss = rss_mib(moneta_pid);
    let soak_started = Instant::now();
    let mut samples = Vec::new();
    let sampler = std::thread::spawn(move || {
        let mut s = Vec::new();
        while soak_started.elapsed() < Duration::from_secs(soak) {
            std::thread::sleep(Duration::from_secs(5));
            s.push(rss_mib(moneta_pid));
        }
        s
    });
    let soak_outcome = wrk.run(&base, "playback_info.lua", soak);
    samples.extend(sampler.join().unwrap_or_default());
    let soak_peak = peak_rss_mib(moneta_pid);

    let mut table = String::new();
    let _ = writeln!(
        table,
        "| scenario | requests/s | p50 ms | p99 ms | peak RSS MiB | vs baseline (median, min–max) | Redis round trips/request | non-2xx | socket errors |"
    );
    let _ = writeln!(
        table,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for (name, o, ratio, low, high) in &results {
        let redis = o
            .redis_round_trips
            .map(|r| format!("{r:.2}"))
            .unwrap_or_else(|| "–".into());
        let _ = writeln!(
            table,
            "| {name} | {:.0} | {:.2} | {:.2} | {:.1} | {ratio:.0} % ({low:.0}–{high:.0} %) | {redis} | {} | {} |",
            o.rps, o.p50_ms, o.p99_ms, o.peak_rss_mib, o.non2xx, o.socket_errors
        );
    }
    let first = samples.first().copied().unwrap_or(start_rss);
    let last = samples.last().copied().unwrap_or(start_rss);
    let soak_line = format!(
        "Soak: playback-info for {soak} s at {:.0} requests/s, p99 {:.2} ms; RSS {start_rss:.1} MiB before, {first:.1} MiB after 5 s, {last:.1} MiB at the end, peak {soak_peak:.1} MiB (samples every 5 s: {}).",
        soak_outcome.rps,
        soak_outcome.p99_ms,
        samples
            .iter()
            .map(|s| format!("{s:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let report = format!(
        "# Performance\n\nMeasured by `scripts/bench` ({}; wrk with 2 threads and {connections} connections, {rounds} rounds of {duration} s per scenario, each after a 3 s warm-up; the response body of the baseline has the same size as playback-info's, {body_len} bytes).\n\nMachine: {}.\n\n{table}\n{soak_line}\n\nEach row is the median of the rounds; a ratio is taken against the baseline of the same round. Session start + stop counts pairs (each pair is two requests). Redis round trips per request come from Moneta's own `moneta_dependency_requests_total{{dependency=\"redis\"}}` (a command, a pipeline or a script is one round trip; the background probe's one PING a second is included). Profiling notes: `docs/profiling.md`.\n",
        report_date(),
        machine()
    );
    println!("\n{report}");
    let _ = std::fs::write(root.join("docs/performance.md"), report);
    drop(nginx);
}

/// The run's date, from `date`, to stamp the report.
fn report_date() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}
