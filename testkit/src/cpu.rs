//! CPU time from `/proc` and `getrusage`, for the bench's split of a
//! request's cost between the server, Redis, wrk and the rest of the machine.
//! Everything shares two cores, so requests/s follow the sum of these, not
//! the server's share alone.

use std::path::{Path, PathBuf};

/// Seconds of CPU a process has used so far, user and system apart (every
/// thread, from `/proc/<pid>/stat`). Zero when the process is gone.
pub fn process(pid: u32) -> Times {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name is in parentheses and may hold spaces: fields are
    // counted after its closing one, where `state` is field 3.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |field: usize| {
        fields
            .get(field - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / clock_ticks()
    };
    Times {
        user: ticks(14),
        system: ticks(15),
    }
}

/// CPU of this process's children that have exited and been waited for
/// (`RUSAGE_CHILDREN`): around one `Command::output()` of a client, its time.
pub fn children() -> Times {
    // SAFETY: getrusage only writes the struct it is handed.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a zeroed rusage.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Times {
        user: seconds(usage.ru_utime),
        system: seconds(usage.ru_stime),
    }
}

/// Seconds every core of the machine has been busy, summed (`/proc/stat`:
/// user, nice, system, irq and softirq; idle, iowait and steal are not).
/// Loopback's packet processing runs in softirq, counted here and often in
/// no process.
pub fn machine_busy() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // user nice system idle iowait irq softirq steal …
    let busy: f64 = [0, 1, 2, 5, 6].iter().filter_map(|&i| v.get(i)).sum();
    busy / clock_ticks()
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf reads a constant of the system.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

/// `perf` attached to every thread a process has when it starts, until
/// stopped with SIGINT.
struct Perf {
    child: std::process::Child,
}

impl Perf {
    fn attach(args: &[&str], out: &Path, pid: u32) -> Perf {
        let child = std::process::Command::new(crate::require_binary("perf"))
            .args(args)
            .arg("-o")
            .arg(out)
            .args(["-p", &pid.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("start perf");
        // perf attaches to every thread before it counts; what happens
        // before that is missed, so give it time.
        std::thread::sleep(std::time::Duration::from_millis(500));
        Perf { child }
    }

    fn stop(mut self) {
        // SAFETY: kill sends a signal to perf, our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        let _ = self.child.wait();
    }
}

/// Counts a process's system calls by name, the times its threads were
/// switched out and the page faults it took, while it runs (`perf stat` on
/// the kernel's syscall tracepoints and the `context-switches` and
/// `page-faults` software events, counting in the kernel, no record per
/// call).
pub struct Syscalls {
    perf: Perf,
    out: tempfile::NamedTempFile,
}

/// What [`Syscalls`] counted.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counted {
    /// Each system call made, by name, most made first.
    pub calls: Vec<(String, u64)>,
    /// Voluntary (waiting) and involuntary (preempted) together.
    pub context_switches: u64,
    /// Minor and major together: memory touched again after the allocator
    /// gave it back to the kernel, or touched for the first time.
    pub page_faults: u64,
}

impl Syscalls {
    pub fn count(pid: u32) -> Syscalls {
        let out = tempfile::NamedTempFile::new().expect("perf output file");
        let events = [
            "stat",
            "-x,",
            "-e",
            "syscalls:sys_enter_*",
            "-e",
            "context-switches",
            "-e",
            "page-faults",
        ];
        let perf = Perf::attach(&events, out.path(), pid);
        Syscalls { perf, out }
    }

    pub fn stop(self) -> Counted {
        self.perf.stop();
        let text = std::fs::read_to_string(self.out.path()).unwrap_or_default();
        parse_perf_stat(&text)
    }
}

/// Samples where a process spends its CPU time (`perf record` on the
/// `cpu-clock` software event: this host exposes no hardware counters).
/// Unlike callgrind's instruction counts this sees time, so it also shows
/// what waits on memory and what runs only under real concurrency (the
/// scheduler's stealing and parking, lock contention, the kernel's side).
/// No call graphs: release builds keep no frame pointers.
pub struct Samples {
    perf: Perf,
    out: PathBuf,
}

impl Samples {
    pub fn record(pid: u32, out: PathBuf) -> Samples {
        let perf = Perf::attach(&["record", "-q", "-e", "cpu-clock", "-F", "4999"], &out, pid);
        Samples { perf, out }
    }

    /// Stops sampling, writes every sampled function's share beside the
    /// data (`.txt`) and returns the shares summed by [`Part`].
    pub fn stop(self) -> Vec<(Part, f64)> {
        self.perf.stop();
        let text = std::process::Command::new(crate::require_binary("perf"))
            .args([
                "report",
                "--stdio",
                "--no-children",
                "-n",
                "--sort",
                "dso,sym",
                "--percent-limit",
                "0",
                "-i",
            ])
            .arg(&self.out)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        std::fs::write(self.out.with_extension("txt"), &text).expect("write the samples' report");
        by_part(&text)
    }
}

/// What a sample's function belongs to. Inlined code counts where it was
/// inlined, and a generic function under the crate that names it first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Part {
    Kernel,
    Allocator,
    MemoryCopies,
    Clock,
    Runtime,
    Http,
    RedisClient,
    Caches,
    Telemetry,
    Json,
    Auth,
    Moneta,
    Std,
    Other,
}

impl Part {
    pub const ALL: [Part; 14] = [
        Part::Kernel,
        Part::Allocator,
        Part::MemoryCopies,
        Part::Clock,
        Part::Runtime,
        Part::Http,
        Part::RedisClient,
        Part::Caches,
        Part::Telemetry,
        Part::Json,
        Part::Auth,
        Part::Moneta,
        Part::Std,
        Part::Other,
    ];

    /// The part's column in the bench's table.
    pub fn column(self) -> &'static str {
        match self {
            Part::Kernel => "kernel",
            Part::Allocator => "allocator",
            Part::MemoryCopies => "memcpy/cmp",
            Part::Clock => "clock",
            Part::Runtime => "runtime",
            Part::Http => "HTTP",
            Part::RedisClient => "Redis client",
            Part::Caches => "caches",
            Part::Telemetry => "telemetry",
            Part::Json => "JSON",
            Part::Auth => "tokens",
            Part::Moneta => "Moneta",
            Part::Std => "std",
            Part::Other => "other",
        }
    }

    /// `kernel`: perf marked the sample `[k]`; `dso`: the binary it fell in.
    pub fn of(kernel: bool, dso: &str, symbol: &str) -> Part {
        if kernel {
            return Part::Kernel;
        }
        if dso.starts_with("[vdso") {
            return Part::Clock;
        }
        if symbol.starts_with("__mem") {
            return Part::MemoryCopies;
        }
        let c_allocator = [
            "malloc",
            "free",
            "realloc",
            "calloc",
            "_int_",
            "unlink_chunk",
            "tcache",
        ];
        if symbol.starts_with("mi_")
            || symbol.starts_with("_mi_")
            || (dso.starts_with("libc") && c_allocator.iter().any(|a| symbol.contains(a)))
        {
            return Part::Allocator;
        }
        match rust_crate(symbol) {
            Some("tokio" | "tokio_util" | "mio" | "futures_util" | "futures_core" | "futures_channel") => {
                Part::Runtime
            }
            Some(
                "hyper" | "hyper_util" | "axum" | "axum_core" | "http" | "http_body" | "http_body_util"
                | "httparse" | "tower" | "tower_http" | "tower_service" | "matchit" | "bytes",
            ) => Part::Http,
            Some("redis" | "combine") => Part::RedisClient,
            Some("moka" | "quick_cache") => Part::Caches,
            Some(
                "tracing"
                | "tracing_core"
                | "tracing_subscriber"
                | "tracing_opentelemetry"
                | "opentelemetry"
                | "opentelemetry_sdk"
                | "sharded_slab"
                | "metrics"
                | "metrics_util"
                | "metrics_exporter_prometheus",
            ) => Part::Telemetry,
            Some("serde" | "serde_core" | "serde_json" | "itoa" | "ryu") => Part::Json,
            Some(
                "jsonwebtoken" | "ring" | "aws_lc_rs" | "hmac" | "sha2" | "base64" | "rsa" | "p256" | "ecdsa",
            ) => Part::Auth,
            Some("moneta") => Part::Moneta,
            Some("core" | "alloc" | "std" | "hashbrown" | "foldhash") => Part::Std,
            _ => Part::Other,
        }
    }
}

/// The crate a demangled Rust symbol belongs to: `moneta::a::b` → `moneta`,
/// `<hyper::X<T> as core::future::Future>::poll` → `hyper`, and for an
/// implementation on a type parameter (`<F as axum::Handler>::call`) the
/// trait's crate.
fn rust_crate(symbol: &str) -> Option<&str> {
    let path = symbol
        .trim_start_matches(['<', '&'])
        .trim_start_matches("mut ")
        .trim_start_matches("dyn ");
    if let Some((self_type, trait_path)) = path.split_once(" as ") {
        let type_parameter = self_type.len() <= 2 && self_type.chars().all(|c| c.is_ascii_uppercase());
        if type_parameter {
            return rust_crate(trait_path);
        }
    }
    let (first, _) = path.split_once("::")?;
    (!first.is_empty() && first.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')).then_some(first)
}

/// `perf report --stdio -n --sort dso,sym` lines
/// (`  7.53%  1683  moneta  [.] sym`) summed by [`Part`], in percent of all
/// samples. From the sample counts: the printed percentages are rounded,
/// and thousands of functions each shown as 0.01 % add up.
pub fn by_part(report: &str) -> Vec<(Part, f64)> {
    let mut counts = std::collections::BTreeMap::new();
    let mut total = 0u64;
    for line in report.lines() {
        let Some((_, rest)) = line.trim_start().split_once('%') else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let (Some(Ok(samples)), Some(dso), Some(mark)) =
            (fields.next().map(str::parse::<u64>), fields.next(), fields.next())
        else {
            continue;
        };
        let kernel = match mark {
            "[k]" => true,
            "[.]" => false,
            _ => continue,
        };
        let symbol = fields.collect::<Vec<_>>().join(" ");
        *counts.entry(Part::of(kernel, dso, &symbol)).or_insert(0u64) += samples;
        total += samples;
    }
    counts
        .into_iter()
        .map(|(part, n)| (part, n as f64 * 100.0 / total.max(1) as f64))
        .collect()
}

/// `perf stat -x,` lines: `count,unit,event,…`; events never hit read
/// `<not counted>` and are left out.
fn parse_perf_stat(text: &str) -> Counted {
    let mut counted = Counted::default();
    for line in text.lines() {
        let mut fields = line.split(',');
        let Some(Ok(count)) = fields.next().map(str::parse::<u64>) else {
            continue;
        };
        match fields.nth(1) {
            Some("context-switches") => counted.context_switches += count,
            Some("page-faults") => counted.page_faults += count,
            Some(event) => {
                if let Some(name) = event.strip_prefix("syscalls:sys_enter_").filter(|_| count > 0) {
                    counted.calls.push((name.to_owned(), count));
                }
            }
            None => {}
        }
    }
    counted
        .calls
        .sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    counted
}

/// User and system seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Times {
    pub user: f64,
    pub system: f64,
}

impl Times {
    pub fn total(self) -> f64 {
        self.user + self.system
    }
}

impl std::ops::Sub for Times {
    type Output = Times;
    fn sub(self, earlier: Times) -> Times {
        Times {
            user: self.user - earlier.user,
            system: self.system - earlier.system,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_summed_by_part() {
        let report = "# Samples: 1K of event 'cpu-clock'\n\
            #\n\
            \x20   30.00%   300  [kernel.kallsyms]  [k] _raw_spin_unlock_irqrestore\n\
            \x20   10.00%   100  [vdso]             [.] __vdso_clock_gettime\n\
            \x20   10.00%   100  moneta             [.] moneta::sources::redis::catalog::<impl moneta::sources::redis::RedisStore>::user_view::{{closure}}\n\
            \x20    5.00%    50  libc.so.6          [.] __memcmp_evex_movbe\n\
            \x20    5.00%    50  moneta             [.] _mi_theap_malloc_zero\n\
            \x20    5.00%    50  libc.so.6          [.] _int_malloc\n\
            \x20   10.00%   100  moneta             [.] <hyper_util::server::conn::auto::UpgradeableConnection<I,S,E> as core::future::future::Future>::poll\n\
            \x20   10.00%   100  moneta             [.] <F as axum::handler::Handler<(M,T1),S>>::call::{{closure}}\n\
            \x20    5.00%    50  moneta             [.] redis::caching::cache_manager::CacheManager::get\n\
            \x20    4.00%    40  moneta             [.] tokio::runtime::task::raw::poll\n\
            \x20    3.00%    30  moneta             [.] core::ptr::drop_in_place<tower::util::MapFuture>\n\
            \x20    2.00%    20  libc.so.6          [.] __GI___writev\n\
            \x20    0.01%     5  moneta             [.] a_c_function\n\
            \x20    0.01%     5  moneta             [.] another_one\n";
        let parts: std::collections::BTreeMap<Part, f64> = by_part(report).into_iter().collect();
        let close = |part: Part, want: f64| {
            let got = parts.get(&part).copied().unwrap_or(0.0);
            assert!((got - want).abs() < 1e-9, "{part:?}: {got} != {want}");
        };
        close(Part::Kernel, 30.0);
        close(Part::Clock, 10.0);
        close(Part::Moneta, 10.0);
        close(Part::MemoryCopies, 5.0);
        close(Part::Allocator, 10.0);
        close(Part::Http, 20.0);
        close(Part::RedisClient, 5.0);
        close(Part::Runtime, 4.0);
        close(Part::Std, 3.0);
        // From the counts, not the rounded percentages.
        close(Part::Other, 3.0);
        assert_eq!(parts.len(), 10, "the header lines count nowhere");
    }

    #[test]
    fn a_busy_loop_shows_in_its_own_user_time_and_the_machines() {
        let me = std::process::id();
        let (before, machine_before) = (process(me), machine_busy());
        let started = std::time::Instant::now();
        let mut x = 0u64;
        // Spin until the process's own clock has moved by a few ticks.
        while process(me).user - before.user < 0.05 && started.elapsed().as_secs() < 30 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let spent = process(me) - before;
        assert!(spent.user >= 0.05, "{spent:?}");
        // Tick-sampled on both sides: half is a wide margin for the sampling.
        assert!(machine_busy() - machine_before >= spent.user / 2.0);
    }

    #[test]
    fn a_childs_time_is_counted_once_it_is_waited_for() {
        let before = children();
        let status = std::process::Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done"])
            .status()
            .expect("sh");
        assert!(status.success());
        assert!((children() - before).total() > 0.0);
    }

    #[test]
    fn perf_stat_lines_become_counts_by_call() {
        let text = "# started on Thu Dec  3 02:08:08 2026\n\n\
                    <not counted>,,syscalls:sys_enter_iopl,0,100.00,,\n\
                    87,,syscalls:sys_enter_mmap,13651403,100.00,,\n\
                    0,,syscalls:sys_enter_read,13651403,100.00,,\n\
                    4,,syscalls:sys_enter_clone,13651403,100.00,,\n\
                    1234,,context-switches,13651403,100.00,,\n\
                    56,,page-faults,13651403,100.00,,\n";
        assert_eq!(
            parse_perf_stat(text),
            Counted {
                calls: vec![("mmap".to_owned(), 87), ("clone".to_owned(), 4)],
                context_switches: 1234,
                page_faults: 56,
            }
        );
    }

    #[test]
    fn a_process_that_is_gone_has_no_time() {
        assert_eq!(process(u32::MAX), Times::default());
    }
}
