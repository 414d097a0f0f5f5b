//! The `moneta` command line: `serve` (the default), `token`, and
//! `progress` (the dead letters of position delivery).

use std::alloc::{GlobalAlloc, Layout};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use moneta::auth::Claims;
use moneta::auth::verifier::mint_hs256;
use moneta::config::{ExposeSecret, Settings};
use moneta::model::UserId;
use moneta::progress::replay::{list_dead_letters, replay};
use moneta::sources::internal_api::InternalApi;
use moneta::sources::redis::RedisStore;
use moneta::startup::{Application, shutdown_signal};
use moneta::telemetry;

/// mimalloc instead of glibc's malloc: ~15 k fewer instructions a
/// heartbeat (`docs/profiling.md`, "Heartbeat, round 4").
#[cfg_attr(not(feature = "heap-profile"), global_allocator)]
#[cfg_attr(feature = "heap-profile", allow(dead_code))]
static ALLOCATOR: Allocator = Allocator;

/// `mimalloc::MiMalloc`, except that what needs no more than a word's
/// alignment (nearly every allocation: strings, byte buffers, boxes of
/// pointers) goes to plain `mi_malloc`. The crate sends everything to
/// `mi_malloc_aligned`, whose fast path only serves blocks up to 1 KiB
/// that happen to be aligned; larger ones (hyper's and the answers'
/// buffers) took its generic path (`docs/profiling.md`, "Hot path,
/// round 5"). Every mimalloc block is at least word-aligned.
struct Allocator;

const WORD: usize = std::mem::size_of::<usize>();

// SAFETY: each call forwards to mimalloc, which returns blocks of at least
// the requested size aligned to a word at least, or null; frees and
// reallocations only ever see mimalloc's own blocks.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= WORD {
            // SAFETY: see the impl.
            unsafe { libmimalloc_sys::mi_malloc(layout.size()).cast() }
        } else {
            // SAFETY: the caller's contract, passed on.
            unsafe { mimalloc::MiMalloc.alloc(layout) }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= WORD {
            // SAFETY: see the impl.
            unsafe { libmimalloc_sys::mi_zalloc(layout.size()).cast() }
        } else {
            // SAFETY: the caller's contract, passed on.
            unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from one of the calls above.
        unsafe { libmimalloc_sys::mi_free(ptr.cast()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.align() <= WORD {
            // SAFETY: `ptr` came from one of the calls above.
            unsafe { libmimalloc_sys::mi_realloc(ptr.cast(), new_size).cast() }
        } else {
            // SAFETY: the caller's contract, passed on.
            unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
        }
    }
}

/// mimalloc's own defaults keep freed pages for a second and commit arenas
/// eagerly: ~13 MiB more peak RSS than glibc under `scripts/bench`. Purging
/// at once and committing lazily kept it within 2–3 MiB of glibc's, and
/// below it under the overload flood. Those are set as defaults, so
/// `MIMALLOC_PURGE_DELAY`, `MIMALLOC_ARENA_EAGER_COMMIT` and
/// `MIMALLOC_ALLOW_THP` in the environment still override them.
///
/// They must land before mimalloc reads its options, which it does in its
/// own constructor, before `main` (set from `main`, the first arena was
/// already committed: +5–8 MiB). A constructor of priority 101 runs before
/// every default-priority one, mimalloc's included (gcc builds it so).
/// `tests/api/allocator.rs` checks the values the running binary ends with.
#[used]
#[unsafe(link_section = ".init_array.00101")]
static MIMALLOC_DEFAULTS: extern "C" fn() = mimalloc_defaults;

extern "C" fn mimalloc_defaults() {
    // `mi_option_t` values of the bundled mimalloc v3 (`include/mimalloc.h`);
    // the crate names neither.
    const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    const ALLOW_THP: libmimalloc_sys::mi_option_t = 43;
    // SAFETY: stores into mimalloc's option table, which takes them at any
    // time; nothing else runs this early.
    unsafe {
        libmimalloc_sys::mi_option_set_default(ARENA_EAGER_COMMIT, 0);
        libmimalloc_sys::mi_option_set_default(PURGE_DELAY, 0);
        // Off, mimalloc turns transparent huge pages off for the process
        // (`PR_SET_THP_DISABLE`). On a host with THP `always`, each 2 MiB
        // the arena or a thread stack touches becomes resident whole:
        // +3.2–6.2 MiB anonymous under scripts/bench's memory loads, all
        // gone with this (docs/profiling.md, "Memory, round 2").
        libmimalloc_sys::mi_option_set_default(ALLOW_THP, 0);
    }
}

#[derive(Parser)]
#[command(
    name = "moneta",
    version,
    about = "Video-playback service: signed stream URLs, DRM, resume positions, stream limits."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the public API and the admin (metrics) port. The default.
    Serve,
    /// Print a JWT signed with MONETA_JWT_HS256_SECRET, for development.
    Token {
        /// User id (`sub`): 1-128 bytes, no control characters.
        #[arg(long, value_parser = |s: &str| UserId::parse(s))]
        sub: UserId,
        #[arg(long)]
        plan: Option<String>,
        #[arg(long = "max-streams")]
        max_streams: Option<u32>,
        /// ISO 3166-1 alpha-2 country.
        #[arg(long)]
        country: Option<String>,
        /// Lifetime, e.g. 1h, 30m, 2d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Positions the internal API failed to take alone too often (the
    /// dead-letter streams in Redis).
    Progress {
        #[command(subcommand)]
        command: ProgressCommand,
    },
}

#[derive(Subcommand)]
enum ProgressCommand {
    /// List the dead-lettered positions, one JSON object per line, oldest first.
    DeadLetters,
    /// Send the dead-lettered positions to the internal API again; those it
    /// takes leave the stream, the others stay. Exits non-zero unless all were taken.
    Replay,
}

/// Exit code for unusable configuration (CONTRACT §2).
const CONFIG_EXIT: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("moneta: configuration error: {e}");
            return ExitCode::from(CONFIG_EXIT);
        }
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(settings),
        Command::Progress { command } => progress(settings, command),
        Command::Token {
            sub,
            plan,
            max_streams,
            country,
            ttl,
        } => {
            let Some(secret) = settings.jwt.hs256_secret.as_ref() else {
                eprintln!("moneta: configuration error: MONETA_JWT_HS256_SECRET: required to mint tokens");
                return ExitCode::from(CONFIG_EXIT);
            };
            let now = chrono::Utc::now().timestamp();
            let claims = Claims {
                sub,
                exp: now + ttl.as_secs() as i64,
                iat: Some(now),
                nbf: None,
                iss: settings.jwt.issuer.clone(),
                plan,
                max_streams,
                country: country.map(|c| c.to_ascii_uppercase()),
            };
            // The audience this configuration checks, so that its own
            // tokens pass it (`Claims` keeps only what Moneta reads).
            #[derive(serde::Serialize)]
            struct Minted<'a> {
                #[serde(flatten)]
                claims: &'a Claims,
                #[serde(skip_serializing_if = "Option::is_none")]
                aud: Option<&'a str>,
            }
            let minted = Minted {
                claims: &claims,
                aud: settings.jwt.audience.as_deref(),
            };
            match mint_hs256(secret.expose_secret(), &minted) {
                Ok(token) => {
                    println!("{token}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("moneta: cannot sign the token: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// `moneta progress …`: one-shot commands on the normal settings (Redis,
/// internal API and its token), each call under its usual guard and timeout.
fn progress(settings: Settings, command: ProgressCommand) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("moneta: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let redis = match RedisStore::new(&settings.redis) {
            Ok(redis) => redis,
            Err(e) => {
                eprintln!("moneta: configuration error: MONETA_REDIS_URL: {e}");
                return ExitCode::from(CONFIG_EXIT);
            }
        };
        let log = redis.progress_log();
        match command {
            ProgressCommand::DeadLetters => {
                match list_dead_letters(&log, |letter| println!("{letter}")).await {
                    Ok(_) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("moneta: cannot read the dead letters: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
            ProgressCommand::Replay => {
                let api = match InternalApi::new(&settings.internal_api) {
                    Ok(api) => api,
                    Err(e) => {
                        eprintln!("moneta: configuration error: {e}");
                        return ExitCode::from(CONFIG_EXIT);
                    }
                };
                match replay(&log, &api).await {
                    Ok(done) if done.left == 0 => {
                        eprintln!("moneta: {} dead letters delivered", done.delivered);
                        ExitCode::SUCCESS
                    }
                    Ok(done) => {
                        eprintln!(
                            "moneta: {} dead letters delivered, {} still failing (left in the stream)",
                            done.delivered, done.left
                        );
                        ExitCode::FAILURE
                    }
                    Err(e) => {
                        eprintln!("moneta: replay stopped: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
        }
    })
}

fn serve(settings: Settings) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("moneta: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The gRPC trace exporter binds to the runtime it is built in.
    let telemetry = match runtime.block_on(async { telemetry::init(&settings) }) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("moneta: configuration error: {e}");
            return ExitCode::from(CONFIG_EXIT);
        }
    };
    let code = runtime.block_on(async move {
        let app = match Application::build(settings).await {
            Ok(app) => app,
            Err(e) => {
                eprintln!("moneta: start-up error: {e}");
                return ExitCode::from(CONFIG_EXIT);
            }
        };
        // Everything start-up alone runs has run (src/resident.rs).
        let released = moneta::resident::release_startup_pages();
        tracing::debug!(
            binary_kib = released.binary_kib,
            mappings = released.mappings,
            "start-up pages released"
        );
        tokio::spawn(moneta::resident::keep_trimmed());
        match app.run_until_stopped(shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "server failed");
                ExitCode::FAILURE
            }
        }
    });
    // While the runtime still runs: the gRPC exporter's connection lives on it.
    telemetry.shutdown();
    code
}
