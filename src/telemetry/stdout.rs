//! Stdout for log lines, with access lines written in batches.
//!
//! Written one per `write(2)`, the access line was one system call in every
//! request, a third as many as the request's own socket I/O (`scripts/bench`
//! with `BENCH_SYSCALLS=1`, `docs/profiling.md`); into a pipe to the log
//! shipper it also wakes the reader each time. So access lines wait until
//! [`FLUSH_AT`] bytes are pending or for at most [`FLUSH_AFTER`], as nginx's
//! `access_log … buffer= flush=` does. Any other line (start-up, warnings,
//! errors) goes out at once with whatever is pending before it: order is
//! kept, and nothing an operator waits for is held back. A graceful stop
//! writes what is pending ([`flush`]); a SIGKILL loses at most the last
//! [`FLUSH_AFTER`] of access lines.
//!
//! Written here rather than with `tracing-appender`'s non-blocking writer:
//! that one hands every line to a worker thread over a channel (a buffer per
//! line, and a wake of the worker whenever it has caught up) and the worker
//! still writes the lines one by one.

use std::io::Write;
use std::sync::{Condvar, LazyLock, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use tracing::Metadata;
use tracing_subscriber::fmt::MakeWriter;

/// Pending access lines are written once they reach this size.
pub const FLUSH_AT: usize = 16 * 1024;
/// …or when the oldest of them has waited this long.
pub const FLUSH_AFTER: Duration = Duration::from_millis(20);

/// Lines on their way to a sink, in order.
pub struct Batched<W> {
    state: Mutex<State<W>>,
    wake: Condvar,
}

struct State<W> {
    sink: W,
    pending: Vec<u8>,
    /// The flusher waits for a first pending line; only then is it woken,
    /// so a busy process wakes it once per batch, not once per line.
    flusher_waiting: bool,
}

impl<W: Write> Batched<W> {
    pub fn new(sink: W) -> Self {
        Self {
            state: Mutex::new(State {
                sink,
                pending: Vec::with_capacity(FLUSH_AT),
                flusher_waiting: false,
            }),
            wake: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<W>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One whole line. `urgent`: written now, after what is pending.
    pub fn line(&self, line: &[u8], urgent: bool) {
        let mut state = self.lock();
        let was_empty = state.pending.is_empty();
        state.pending.extend_from_slice(line);
        if urgent || state.pending.len() >= FLUSH_AT {
            state.write_out();
        } else if was_empty && state.flusher_waiting {
            state.flusher_waiting = false;
            self.wake.notify_one();
        }
    }

    /// Writes what is pending.
    pub fn flush(&self) {
        self.lock().write_out();
    }

    /// As [`Batched::flush`], unless another thread holds the lines (a panic
    /// inside a write must not wait for itself).
    fn try_flush(&self) {
        if let Ok(mut state) = self.state.try_lock() {
            state.write_out();
        }
    }

    /// The flusher's loop: waits for a first pending line, gives it
    /// [`FLUSH_AFTER`] to gather company, writes the batch.
    fn run_flusher(&self) -> ! {
        loop {
            let mut state = self.lock();
            while state.pending.is_empty() {
                state.flusher_waiting = true;
                state = self.wake.wait(state).unwrap_or_else(PoisonError::into_inner);
            }
            state.flusher_waiting = false;
            drop(state);
            std::thread::sleep(FLUSH_AFTER);
            self.flush();
        }
    }
}

impl<W: Write> State<W> {
    fn write_out(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        // As before batching: a line that cannot be written is dropped, and
        // a full pipe holds the writer back rather than growing this buffer.
        let _ = self.sink.write_all(&self.pending);
        let _ = self.sink.flush();
        self.pending.clear();
        // One oversized line (a long error) does not keep its memory.
        if self.pending.capacity() > 4 * FLUSH_AT {
            self.pending.shrink_to(FLUSH_AT);
        }
    }
}

static STDOUT: LazyLock<Batched<std::io::Stdout>> = LazyLock::new(|| Batched::new(std::io::stdout()));
/// Whether the flusher thread runs, once the first batched line asked.
static FLUSHER: OnceLock<bool> = OnceLock::new();

/// Lines to stdout: the writer the log layer writes through.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stdout;

/// One line on its way to stdout.
pub struct Line {
    urgent: bool,
}

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let urgent = self.urgent || !start_flusher();
        STDOUT.line(buf, urgent);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Whether the flusher runs; started with the first batched line. Without
/// it (no thread to be had) every line is written at once.
fn start_flusher() -> bool {
    *FLUSHER.get_or_init(|| {
        let started = std::thread::Builder::new()
            .name("log-flusher".into())
            .spawn(|| STDOUT.run_flusher())
            .is_ok();
        if started {
            // A panic that ends the process still writes the lines before it.
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                STDOUT.try_flush();
                previous(info);
            }));
        }
        started
    })
}

impl<'a> MakeWriter<'a> for Stdout {
    type Writer = Line;

    /// Without a line's metadata: the access line written straight out
    /// (`logs::access`), batched.
    fn make_writer(&'a self) -> Line {
        Line { urgent: false }
    }

    /// An event's line: batched if it is an access line, else at once.
    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Line {
        Line {
            urgent: meta.target() != super::logs::ACCESS_TARGET,
        }
    }
}

/// Writes the pending lines to stdout; before the process exits.
pub fn flush() {
    STDOUT.flush();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A sink that records each write apart.
    #[derive(Clone, Default)]
    struct Writes(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Writes {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Writes {
        fn taken(&self) -> Vec<Vec<u8>> {
            self.0.lock().unwrap().clone()
        }
    }

    fn access_line(i: usize) -> Vec<u8> {
        format!("{{\"message\":\"request\",\"n\":{i:>200}}}\n").into_bytes()
    }

    #[test]
    fn access_lines_go_out_together_once_a_batch_is_full() {
        let writes = Writes::default();
        let batched = Batched::new(writes.clone());
        let per_batch = FLUSH_AT.div_ceil(access_line(0).len());
        for i in 0..per_batch - 1 {
            batched.line(&access_line(i), false);
        }
        assert!(writes.taken().is_empty());
        batched.line(&access_line(per_batch - 1), false);
        let taken = writes.taken();
        assert_eq!(taken.len(), 1, "one write for the whole batch");
        let expected: Vec<u8> = (0..per_batch).flat_map(access_line).collect();
        assert_eq!(taken[0], expected);
    }

    #[test]
    fn an_urgent_line_goes_out_at_once_after_those_pending() {
        let writes = Writes::default();
        let batched = Batched::new(writes.clone());
        batched.line(b"access 1\n", false);
        batched.line(b"access 2\n", false);
        batched.line(b"warning\n", true);
        assert_eq!(writes.taken(), [b"access 1\naccess 2\nwarning\n".to_vec()]);
        batched.flush();
        assert_eq!(writes.taken().len(), 1, "nothing was left to flush");
    }

    #[test]
    fn the_flusher_writes_a_lone_line_without_being_asked() {
        let writes = Writes::default();
        let batched: &'static Batched<Writes> = Box::leak(Box::new(Batched::new(writes.clone())));
        std::thread::spawn(|| batched.run_flusher());
        for round in 0..3 {
            batched.line(format!("access {round}\n").as_bytes(), false);
            let started = std::time::Instant::now();
            while writes.taken().len() <= round && started.elapsed() < Duration::from_secs(30) {
                std::thread::sleep(Duration::from_millis(5));
            }
            assert_eq!(writes.taken().len(), round + 1, "round {round}");
        }
    }
}
