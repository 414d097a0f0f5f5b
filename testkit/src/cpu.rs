//! CPU time from `/proc` and `getrusage`, for the bench's split of a
//! request's cost between the server, Redis, wrk and the rest of the machine.
//! Everything shares two cores, so requests/s follow the sum of these, not
//! the server's share alone.

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

/// Counts a process's system calls by name while it runs (`perf stat` on
/// the kernel's syscall tracepoints, counting in the kernel, no record per
/// call). Every thread the process has when counting starts is counted.
pub struct Syscalls {
    perf: std::process::Child,
    out: tempfile::NamedTempFile,
}

impl Syscalls {
    pub fn count(pid: u32) -> Syscalls {
        let out = tempfile::NamedTempFile::new().expect("perf output file");
        let perf = std::process::Command::new(crate::require_binary("perf"))
            .args(["stat", "-x,", "-e", "syscalls:sys_enter_*", "-o"])
            .arg(out.path())
            .args(["-p", &pid.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("start perf stat");
        // perf attaches to every thread before it counts; a call made
        // before that is not counted, so give it time.
        std::thread::sleep(std::time::Duration::from_millis(500));
        Syscalls { perf, out }
    }

    /// Stops counting: each system call made, by name, with its count.
    pub fn stop(mut self) -> Vec<(String, u64)> {
        // SAFETY: kill sends a signal to perf, our own child.
        unsafe { libc::kill(self.perf.id() as libc::pid_t, libc::SIGINT) };
        let _ = self.perf.wait();
        let text = std::fs::read_to_string(self.out.path()).unwrap_or_default();
        let mut counts = parse_perf_stat(&text);
        counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        counts
    }
}

/// `perf stat -x,` lines: `count,unit,event,…`; events never hit read
/// `<not counted>` and are left out.
fn parse_perf_stat(text: &str) -> Vec<(String, u64)> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(',');
            let count = fields.next()?.parse::<u64>().ok()?;
            let event = fields.nth(1)?;
            let name = event.strip_prefix("syscalls:sys_enter_")?;
            (count > 0).then(|| (name.to_owned(), count))
        })
        .collect()
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
                    4,,syscalls:sys_enter_clone,13651403,100.00,,\n";
        assert_eq!(
            parse_perf_stat(text),
            [("mmap".to_owned(), 87), ("clone".to_owned(), 4)]
        );
    }

    #[test]
    fn a_process_that_is_gone_has_no_time() {
        assert_eq!(process(u32::MAX), Times::default());
    }
}
