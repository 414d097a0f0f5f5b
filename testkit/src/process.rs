//! A child process that never outlives the test that started it.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::wait::{PATIENCE, eventually_blocking};

/// A child process, killed and reaped on drop.
pub struct Process {
    child: Child,
    what: String,
    /// Where stdout and stderr went, when the process was started `logged`.
    logs: Option<Logs>,
}

struct Logs {
    stdout: PathBuf,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

impl Process {
    /// Starts `command` with the stdio it was given.
    pub fn spawn(command: &mut Command, what: &str) -> Process {
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        Process {
            child,
            what: what.to_owned(),
            logs: None,
        }
    }

    /// Starts `command` with stdout and stderr in files, so a test can read
    /// what it wrote (`output`, `stderr`) while it runs and after it exits.
    pub fn logged(command: &mut Command, what: &str) -> Process {
        let dir = tempfile::tempdir().expect("tempdir for process logs");
        let stdout = dir.path().join("stdout.log");
        let stderr = dir.path().join("stderr.log");
        let file = |path: &PathBuf| std::fs::File::create(path).expect("process log file");
        command
            .stdin(Stdio::null())
            .stdout(file(&stdout))
            .stderr(file(&stderr));
        let mut process = Process::spawn(command, what);
        process.logs = Some(Logs {
            stdout,
            stderr,
            _dir: dir,
        });
        process
    }

    /// Waits until something accepts connections on `port`; panics with the
    /// process's own words if it exits first.
    pub fn listening_on(self, port: u16) -> Process {
        self.try_listening_on(port).unwrap_or_else(|exited| {
            let (process, status) = *exited;
            panic!(
                "{} exited early with {status}\n{}",
                process.what,
                process.output()
            )
        })
    }

    /// As [`Process::listening_on`], handing back a process that exited
    /// first, with its status, so the caller can start it again.
    pub fn try_listening_on(mut self, port: u16) -> Result<Process, Box<(Process, ExitStatus)>> {
        let listening = eventually_blocking(PATIENCE, || {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(Ok(()));
            }
            self.exit_status().map(Err)
        });
        match listening {
            Some(Ok(())) => Ok(self),
            Some(Err(status)) => Err(Box::new((self, status))),
            None => panic!(
                "{} did not listen on port {port} within {PATIENCE:?}\n{}",
                self.what,
                self.output()
            ),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, if the process has exited.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits at most `within` for the process to exit by itself.
    pub fn wait_for_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        eventually_blocking(within, || self.exit_status())
    }

    /// Sends SIGTERM and waits at most `within` for the exit.
    pub fn terminate(&mut self, within: Duration) -> Option<ExitStatus> {
        crate::signal(self.pid(), "TERM");
        self.wait_for_exit(within)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Everything written to stdout, then to stderr, so far (`logged` only).
    pub fn output(&self) -> String {
        self.stdout() + &self.stderr()
    }

    pub fn stdout(&self) -> String {
        self.read_log(|l| &l.stdout)
    }

    pub fn stderr(&self) -> String {
        self.read_log(|l| &l.stderr)
    }

    fn read_log(&self, which: impl Fn(&Logs) -> &PathBuf) -> String {
        self.logs
            .as_ref()
            .and_then(|logs| std::fs::read_to_string(which(logs)).ok())
            .unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}
