//! The stack `scripts/bench` and `scripts/profile` measure: Redis, PostgreSQL
//! behind the seeded internal API plus bench users and titles, Moneta, and the
//! baselines of `examples/bench_baseline.rs`, all on loopback. Both tools
//! start it here so that their numbers describe the same requests over the
//! same data.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::sqlx::{self, Connection};
use crate::{PgServer, Process, RedisServer, free_port, run};

/// The dev HS256 key Moneta verifies bench tokens with.
pub const JWT_SECRET: &str = "bench-only-secret";
/// Shared by every Moneta process of a run, so a session started by one is
/// recognised by the next.
const SESSION_SECRET: &str = "bench-only-session-secret-of-some-length";

/// The HTTP client the bench tools drive Moneta with. Its pooled
/// connections are dropped after 30 s idle, before Moneta closes an idle
/// keep-alive connection (75 s): the tools run their client on a
/// current-thread runtime that stands still between their `block_on`s, so a
/// connection Moneta closed meanwhile would look alive at the next checkout
/// and fail its first request (`IncompleteMessage`).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_idle_timeout(Duration::from_secs(30))
        .build()
        .expect("HTTP client")
}

/// A numeric setting from the environment, or its default.
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Which user asks for which title: request `i` is user `i % users` asking
/// for title `(i / users) % titles`, so every user × title pair comes once in
/// `users × titles` requests and a cache smaller than that cannot hold the
/// whole working set. The wrk scripts and the one-round-trip baseline walk
/// the same order.
#[derive(Clone, Debug)]
pub struct Spread {
    pub users: usize,
    pub titles: Vec<String>,
}

impl Spread {
    /// `BENCH_USERS` (1000) users × `BENCH_TITLES` (200) titles.
    pub fn from_env() -> Spread {
        let users = env_or("BENCH_USERS", 1000).max(1) as usize;
        let titles = env_or("BENCH_TITLES", 200).clamp(1, 8999) as usize;
        Spread {
            users,
            titles: title_ids(titles),
        }
    }

    /// Requests until every pair has come once.
    pub fn pairs(&self) -> u64 {
        self.users as u64 * self.titles.len() as u64
    }

    /// The user index and title of request `i`.
    pub fn pair(&self, i: u64) -> (usize, &str) {
        let users = self.users as u64;
        let title = (i / users) % self.titles.len() as u64;
        ((i % users) as usize, &self.titles[title as usize])
    }

    pub fn user_id(index: usize) -> String {
        format!("bench-{index}")
    }
}

/// m-0001 first, then copies of it whose ids have the same length, so every
/// answer has the same size.
fn title_ids(count: usize) -> Vec<String> {
    std::iter::once("m-0001".to_owned())
        .chain((1..count).map(|i| format!("m-{}", 1000 + i)))
        .collect()
}

/// The binaries the scripts build into `target/release/`, beside the tool.
pub struct Binaries {
    pub moneta: PathBuf,
    pub internal_api: PathBuf,
    pub baseline: PathBuf,
}

impl Binaries {
    pub fn beside_current_exe(script: &str) -> Binaries {
        let exe = std::env::current_exe().expect("own path");
        let dir = exe.parent().expect("target dir");
        let bins = Binaries {
            moneta: dir.join("moneta"),
            internal_api: dir.join("internal-api"),
            baseline: dir.join("examples").join("bench_baseline"),
        };
        for b in [&bins.moneta, &bins.internal_api, &bins.baseline] {
            assert!(
                b.is_file(),
                "{} is missing: run {script}, which builds it",
                b.display()
            );
        }
        bins
    }
}

/// The repository root, for the wrk scripts and the docs the tools write.
pub fn repository_root() -> PathBuf {
    let testkit = Path::new(env!("CARGO_MANIFEST_DIR"));
    testkit.parent().unwrap_or(testkit).to_path_buf()
}

/// Redis, PostgreSQL and the internal API, seeded with the demo catalog, the
/// bench titles and the bench users. Fields drop in order: the internal API
/// stops before its database.
pub struct Stack {
    _api: Process,
    _pg: PgServer,
    pub redis: RedisServer,
    pub bins: Binaries,
    pub spread: Spread,
    pub internal_api_url: String,
}

impl Stack {
    pub fn start(bins: Binaries, spread: Spread) -> Stack {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let redis = RedisServer::start();
        let pg = PgServer::start();
        let database_url = runtime.block_on(pg.create_database());
        run(
            Command::new(&bins.internal_api)
                .arg("seed")
                .env("DATABASE_URL", &database_url)
                .env("RUST_LOG", "warn"),
            "internal-api seed",
        );
        runtime.block_on(seed_bench_data(&database_url, &spread));
        let api_port = free_port();
        let api = Process::spawn(
            Command::new(&bins.internal_api)
                .env("DATABASE_URL", &database_url)
                .env("INTERNAL_API_LISTEN_ADDR", format!("127.0.0.1:{api_port}"))
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::inherit()),
            "internal-api",
        )
        .listening_on(api_port);
        Stack {
            _api: api,
            _pg: pg,
            redis,
            bins,
            spread,
            internal_api_url: format!("http://127.0.0.1:{api_port}"),
        }
    }

    /// Starts Moneta at production's log level (the access line is part of
    /// the cost) and waits until it reports ready. `wrapper` is a command
    /// Moneta runs under (valgrind), empty for none; `extra` adds settings.
    pub fn moneta(&self, wrapper: &[OsString], extra: &[(&str, String)], patience: Duration) -> Moneta {
        self.moneta_binary(&self.bins.moneta, wrapper, extra, patience)
    }

    /// [`Stack::moneta`] from another build of it (`scripts/bench`'s
    /// reference scenario); `extra` may override the stack's settings.
    pub fn moneta_binary(
        &self,
        binary: &Path,
        wrapper: &[OsString],
        extra: &[(&str, String)],
        patience: Duration,
    ) -> Moneta {
        let port = free_port();
        let admin_port = free_port();
        let mut command = wrapped(wrapper, binary);
        command
            .arg("serve")
            .env("MONETA_LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .env("MONETA_ADMIN_ADDR", format!("127.0.0.1:{admin_port}"))
            .env("MONETA_REDIS_URL", &self.redis.url)
            .env("MONETA_INTERNAL_API_URL", &self.internal_api_url)
            .env("MONETA_JWT_HS256_SECRET", JWT_SECRET)
            .env("MONETA_SESSION_SECRET", SESSION_SECRET)
            .env("RUST_LOG", "info")
            .envs(extra.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let mut process = Process::spawn(&mut command, "moneta");
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + patience;
        loop {
            if http_get(&addr, "/health/ready").is_some_and(|(status, _)| status == 200) {
                break;
            }
            if let Some(status) = process.exit_status() {
                panic!("moneta exited before it was ready: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "moneta was not ready within {patience:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Moneta {
            process,
            addr,
            admin_addr: format!("127.0.0.1:{admin_port}"),
        }
    }

    /// Starts a baseline answering a body of `body_len` bytes and waits until
    /// it listens.
    pub fn baseline(
        &self,
        kind: Baseline,
        body_len: usize,
        wrapper: &[OsString],
        patience: Duration,
    ) -> Listening {
        self.baseline_with(kind, body_len, wrapper, &[], patience)
    }

    /// [`Stack::baseline`] with settings of its own (`BENCH_HEARTBEAT_BATCH`).
    pub fn baseline_with(
        &self,
        kind: Baseline,
        body_len: usize,
        wrapper: &[OsString],
        envs: &[(&str, &str)],
        patience: Duration,
    ) -> Listening {
        let port = free_port();
        let mut command = wrapped(wrapper, &self.bins.baseline);
        command.arg(format!("127.0.0.1:{port}")).arg(body_len.to_string());
        command.envs(envs.iter().copied());
        if kind == Baseline::OneRoundTrip {
            command
                .arg(&self.redis.url)
                .arg(self.spread.users.to_string())
                .arg(self.spread.titles.join(","));
        }
        command.stdout(Stdio::null()).stderr(Stdio::inherit());
        let mut process = Process::spawn(&mut command, kind.name());
        let deadline = Instant::now() + patience;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = process.exit_status() {
                panic!("{} exited before it listened: {status}", kind.name());
            }
            assert!(
                Instant::now() < deadline,
                "{} did not listen within {patience:?}",
                kind.name()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Listening {
            process,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    /// A premium KR token for `sub`, minted by `moneta token` so its claims
    /// are exactly what clients send.
    pub fn token(&self, sub: &str, max_streams: u32) -> String {
        let out = run(
            Command::new(&self.bins.moneta)
                .args(["token", "--sub", sub, "--plan", "premium", "--max-streams"])
                .arg(max_streams.to_string())
                .args(["--country", "KR", "--ttl", "4h"])
                .env("MONETA_JWT_HS256_SECRET", JWT_SECRET),
            "moneta token",
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// One token per bench user, in user order.
    pub fn user_tokens(&self) -> Vec<String> {
        (0..self.spread.users)
            .map(|i| self.token(&Spread::user_id(i), 4))
            .collect()
    }
}

/// Bench users `bench-0…` with four streams each, `bench-pair` whose limit
/// session start + stop never reaches, and the bench titles: copies of m-0001
/// (available everywhere, to any plan) under the ids of [`Spread`]. The demo
/// seed's dozen titles are too few, and most are limited by country or plan.
async fn seed_bench_data(database_url: &str, spread: &Spread) {
    let mut conn = sqlx::PgConnection::connect(database_url)
        .await
        .expect("connect to the bench database");
    sqlx::query(
        "INSERT INTO entitlements (user_id, plan, max_streams, active)
         SELECT 'bench-' || g, 'premium', 4, true FROM generate_series(0, $1) g
         UNION ALL SELECT 'bench-pair', 'premium', 100000, true
         ON CONFLICT (user_id) DO NOTHING",
    )
    .bind(spread.users as i32 - 1)
    .execute(&mut conn)
    .await
    .expect("bench users");
    let copies: Vec<&str> = spread.titles.iter().skip(1).map(String::as_str).collect();
    let statements = [
        "INSERT INTO contents (id, title, duration_ms, available_countries, required_plans)
         SELECT t.id, c.title, c.duration_ms, c.available_countries, c.required_plans
         FROM contents c, UNNEST($1::text[]) AS t(id) WHERE c.id = 'm-0001'",
        "INSERT INTO streams (content_id, ordinal, protocol, path, drm_system, drm_key_id)
         SELECT t.id, s.ordinal, s.protocol, replace(s.path, 'm-0001', t.id), s.drm_system, s.drm_key_id
         FROM streams s, UNNEST($1::text[]) AS t(id) WHERE s.content_id = 'm-0001'",
        "INSERT INTO subtitles (content_id, language, path, ordinal)
         SELECT t.id, s.language, replace(s.path, 'm-0001', t.id), s.ordinal
         FROM subtitles s, UNNEST($1::text[]) AS t(id) WHERE s.content_id = 'm-0001'",
        "INSERT INTO markers (content_id, type, start_ms, end_ms)
         SELECT t.id, m.type, m.start_ms, m.end_ms
         FROM markers m, UNNEST($1::text[]) AS t(id) WHERE m.content_id = 'm-0001'",
    ];
    for statement in statements {
        sqlx::query(statement)
            .bind(&copies)
            .execute(&mut conn)
            .await
            .expect("bench titles");
    }
    let _ = conn.close().await;
}

fn wrapped(wrapper: &[OsString], bin: &Path) -> Command {
    match wrapper.split_first() {
        Some((first, rest)) => {
            let mut command = Command::new(first);
            command.args(rest).arg(bin);
            command
        }
        None => Command::new(bin),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Baseline {
    /// A bare axum handler: no authentication, no I/O.
    BareAxum,
    /// One Redis pipeline per request over the same keys Moneta reads; also
    /// the heartbeat's ceiling (one `EVALSHA` per heartbeat request).
    OneRoundTrip,
}

impl Baseline {
    pub fn name(self) -> &'static str {
        match self {
            Baseline::BareAxum => "baseline: bare axum",
            Baseline::OneRoundTrip => "baseline: one-RTT ceiling",
        }
    }
}

/// A started server and its base URL.
pub struct Listening {
    pub process: Process,
    pub url: String,
}

pub struct Moneta {
    pub process: Process,
    addr: String,
    admin_addr: String,
}

impl Moneta {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The sum of Moneta's own series named `name` whose labels contain
    /// `labels` (from `/metrics`); 0 when absent.
    pub fn metric(&self, name: &str, labels: &str) -> f64 {
        let text = http_get(&self.admin_addr, "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default();
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']) && l.contains(labels))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Redis calls so far as Moneta's guard counts them: a command, a
    /// pipeline or a script is one, whether or not the client-side cache
    /// answered it.
    pub fn redis_calls(&self) -> f64 {
        self.metric("moneta_dependency_requests_total", "dependency=\"redis\"")
    }

    /// Reads the client-side cache answered (a playback-info reads two keys).
    pub fn client_cache_hits(&self) -> f64 {
        self.metric("moneta_redis_client_cache_requests_total", "result=\"hit\"")
    }
}

/// Reads Redis has served so far (`INFO stats` `total_reads_processed`): a
/// pipeline arrives in one read, so over a window where only one client talks
/// to Redis, one request at a time, the growth is that client's round trips
/// (plus one for each `INFO` asked). Concurrent pipelines on one multiplexed
/// connection can share a read.
pub fn redis_reads(port: u16) -> u64 {
    redis_info(port, "stats")
        .lines()
        .find_map(|l| l.strip_prefix("total_reads_processed:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("total_reads_processed from Redis INFO stats")
}

fn redis_info(port: u16, section: &str) -> String {
    let info = (|| {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
        write!(stream, "*2\r\n$4\r\nINFO\r\n${}\r\n{section}\r\n", section.len()).ok()?;
        let mut reply = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream.read(&mut chunk).ok()?;
            if n == 0 {
                return None;
            }
            reply.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&reply);
            if let Some((header, body)) = text.split_once("\r\n") {
                let len: usize = header.strip_prefix('$')?.parse().ok()?;
                if body.len() >= len {
                    return Some(body.to_owned());
                }
            }
        }
    })();
    info.unwrap_or_default()
}

/// A plain HTTP/1.0 GET: status and body, or `None` when nothing answered.
/// Blocking and dependency-free, for readiness and metrics between runs.
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(120))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

/// Builds request `i` of a run.
pub type MakeRequest = Arc<dyn Fn(&reqwest::Client, u64) -> reqwest::RequestBuilder + Send + Sync>;

/// playback-info in [`Spread`] order.
pub fn playback_info_requests(base: &str, tokens: &Arc<Vec<String>>, spread: &Spread) -> MakeRequest {
    let (base, tokens, spread) = (base.to_owned(), tokens.clone(), spread.clone());
    Arc::new(move |client, i| {
        let (user, title) = spread.pair(i);
        client
            .get(format!("{base}/v1/contents/{title}/playback-info"))
            .bearer_auth(&tokens[user])
    })
}

/// Heartbeats round-robin over `sessions` (`(token, session id)`).
pub fn heartbeat_requests(base: &str, sessions: &Arc<Vec<(String, String)>>) -> MakeRequest {
    let (base, sessions) = (base.to_owned(), sessions.clone());
    Arc::new(move |client, i| {
        let (token, id) = &sessions[(i % sessions.len() as u64) as usize];
        client
            .put(format!("{base}/v1/playback/sessions/{id}"))
            .bearer_auth(token)
            .json(&serde_json::json!({"position_ms": (i + 1) * 1000, "state": "playing"}))
    })
}

/// Sends requests `range` of `make`, `concurrency` at a time, each after the
/// previous answer on its connection; panics unless every answer is 2xx.
/// Returns the length of the first answer's body.
pub async fn drive(
    client: &reqwest::Client,
    range: Range<u64>,
    concurrency: usize,
    make: &MakeRequest,
) -> usize {
    let next = Arc::new(AtomicU64::new(range.start));
    let first_len = Arc::new(AtomicU64::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (client, make, next, first_len) = (client.clone(), make.clone(), next.clone(), first_len.clone());
        let end = range.end;
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= end {
                    return;
                }
                let response = make(&client, i)
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("request {i}: {e:?}"));
                let status = response.status();
                let body = response.bytes().await.unwrap_or_default();
                assert!(
                    status.is_success(),
                    "request {i} answered {status}: {}",
                    String::from_utf8_lossy(&body)
                );
                if i == range.start {
                    first_len.store(body.len() as u64, Ordering::Relaxed);
                }
            }
        });
    }
    while let Some(done) = workers.join_next().await {
        if let Err(e) = done {
            std::panic::resume_unwind(e.into_panic());
        }
    }
    first_len.load(Ordering::Relaxed) as usize
}

/// Starts `count` sessions, user `i` on title `i % titles`, each on its own
/// device; returns `(token, session id)` pairs.
pub async fn start_sessions(
    client: &reqwest::Client,
    base: &str,
    tokens: &[String],
    spread: &Spread,
    count: usize,
) -> Vec<(String, String)> {
    start_sessions_on(client, base, tokens, spread, count, "bench-heartbeat").await
}

/// One heartbeat for each of `sessions`, as players send every 30 s: a
/// session not heard from for 90 s has ended (CONTRACT §4), and a bench
/// spends longer than that between two heartbeat loads.
pub async fn renew_sessions(client: &reqwest::Client, base: &str, sessions: &[(String, String)]) {
    for (token, id) in sessions {
        let response = client
            .put(format!("{base}/v1/playback/sessions/{id}"))
            .bearer_auth(token)
            .json(&serde_json::json!({"position_ms": 60_000, "state": "playing"}))
            .send()
            .await
            .expect("heartbeat");
        let status = response.status();
        assert_eq!(status, 200, "a bench session ended before its renewal ({status})");
    }
}

/// As [`start_sessions`], on devices `<device_prefix>-<i>`: another set of
/// sessions beside the first, not replacing them (a start replaces the
/// session of its device).
pub async fn start_sessions_on(
    client: &reqwest::Client,
    base: &str,
    tokens: &[String],
    spread: &Spread,
    count: usize,
    device_prefix: &str,
) -> Vec<(String, String)> {
    let mut sessions = Vec::with_capacity(count);
    for i in 0..count {
        let token = &tokens[i % tokens.len()];
        let title = &spread.titles[i % spread.titles.len()];
        let response = client
            .post(format!("{base}/v1/playback/sessions"))
            .bearer_auth(token)
            .json(&serde_json::json!({"content_id": title, "device_id": format!("{device_prefix}-{i}")}))
            .send()
            .await
            .expect("session start");
        let status = response.status();
        let body: serde_json::Value = response.json().await.expect("session start body");
        assert_eq!(status, 201, "session start answered {status}: {body}");
        let id = body["session_id"].as_str().expect("session id").to_owned();
        sessions.push((token.clone(), id));
    }
    sessions
}

/// One line describing where the numbers were taken.
pub fn machine() -> String {
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
    format!(
        "{cores} cores ({cpu}), {mem} memory, Linux {}, {}, release build, everything on one machine over loopback",
        command_line("uname", &["-r"]),
        command_line("rustc", &["-V"])
    )
}

/// The run's date, to stamp a report.
pub fn report_date() -> String {
    command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
}

/// The first line a command prints, or nothing.
pub fn command_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}
