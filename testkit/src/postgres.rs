//! A real PostgreSQL server in a temporary directory on a loopback port.
//!
//! The server is stopped by a guard when a test owns it, and otherwise by a
//! watchdog process that notices the test process is gone (however it ended,
//! even by SIGKILL) because the pipe it reads from closes.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};

use sqlx::{Connection, PgConnection};

use crate::{free_port, run};

const SUPERUSER: &str = "postgres";

struct PgBinaries {
    initdb: PathBuf,
    pg_ctl: PathBuf,
}

/// Where PostgreSQL's server programs are: `PG_BIN_DIR`, then `PATH`, then
/// Debian's versioned `/usr/lib/postgresql/<major>/bin` (which `apt-get
/// install postgresql` does not put on `PATH`).
fn pg_binaries() -> PgBinaries {
    let has_all = |dir: &Path| {
        ["initdb", "pg_ctl", "postgres"]
            .iter()
            .all(|b| dir.join(b).is_file())
    };
    let mut searched = Vec::new();
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(dir) = std::env::var_os("PG_BIN_DIR") {
        candidates.push(PathBuf::from(dir));
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path));
    }
    let mut debian: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| {
                    let major = e.file_name().to_str()?.parse::<u32>().ok()?;
                    Some((major, e.path().join("bin")))
                })
                .collect()
        })
        .unwrap_or_default();
    debian.sort_by_key(|d| std::cmp::Reverse(d.0));
    candidates.extend(debian.into_iter().map(|(_, dir)| dir));

    for dir in candidates {
        if has_all(&dir) {
            // pg_ctl looks for `postgres` next to its real location.
            let dir = std::fs::canonicalize(dir.join("pg_ctl"))
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf))
                .unwrap_or(dir);
            return PgBinaries {
                initdb: dir.join("initdb"),
                pg_ctl: dir.join("pg_ctl"),
            };
        }
        searched.push(dir.display().to_string());
    }
    panic!(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found; searched PG_BIN_DIR, \
         PATH and /usr/lib/postgresql/*/bin ({}). Install them (Debian: apt-get install \
         postgresql) or set PG_BIN_DIR.",
        searched.join(", ")
    );
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// PostgreSQL refuses to run as root, so as root every server program runs as
/// the `postgres` OS user.
fn pg_command(program: &Path) -> Command {
    if running_as_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

/// A PostgreSQL server in its own temporary directory, listening on a
/// loopback port, with fsync off because its data is thrown away.
/// `synchronous_commit` stays on: the outage tests stop the server like a
/// crash and expect committed rows to survive it.
pub struct PgServer {
    dir: PathBuf,
    data: PathBuf,
    port: u16,
    pg_ctl: PathBuf,
    watchdog: Mutex<Option<(Child, ChildStdin)>>,
}

impl PgServer {
    pub fn start() -> Self {
        let bins = pg_binaries();
        if running_as_root() {
            let known = Command::new("id").args(["-u", "postgres"]).output();
            assert!(
                known.is_ok_and(|o| o.status.success()),
                "running as root, but there is no `postgres` OS user to run PostgreSQL as \
                 (Debian: apt-get install postgresql creates it)"
            );
        }
        let dir = std::env::temp_dir().join(format!("internal-api-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir(&dir).expect("create temp dir for PostgreSQL");
        if running_as_root() {
            run(
                Command::new("chown").args(["-R", "postgres:postgres"]).arg(&dir),
                "chown",
            );
        }
        let data = dir.join("data");
        let mut server = Self {
            dir,
            data,
            port: 0,
            pg_ctl: bins.pg_ctl,
            watchdog: Mutex::new(None),
        };
        // Armed before anything is started, so nothing outlives this process.
        server.spawn_watchdog();
        run(
            pg_command(&bins.initdb).arg("-D").arg(&server.data).args([
                "-U",
                SUPERUSER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ]),
            "initdb",
        );
        // The port is free when chosen but could be taken before PostgreSQL
        // binds it; try a few.
        let mut last_error = String::new();
        for _ in 0..5 {
            server.port = free_port();
            match server.try_start() {
                Ok(()) => return server,
                Err(e) => last_error = e,
            }
        }
        panic!("PostgreSQL did not start: {last_error}");
    }

    fn spawn_watchdog(&mut self) {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(
                "trap '' INT TERM HUP; cat >/dev/null; dir=$1; shift; \
                 \"$@\" >/dev/null 2>&1; rm -rf \"$dir\"",
            )
            .arg("internal-api-test-pg-watchdog")
            .arg(&self.dir);
        if running_as_root() {
            cmd.args(["runuser", "-u", "postgres", "--"]);
        }
        cmd.arg(&self.pg_ctl)
            .arg("-D")
            .arg(&self.data)
            .args(["stop", "-m", "immediate"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, so Ctrl-C in a terminal does not take it
            // down before it has stopped the server.
            .process_group(0);
        let mut child = cmd.spawn().expect("spawn PostgreSQL watchdog (sh)");
        let stdin = child.stdin.take().expect("watchdog stdin is piped");
        *self.watchdog.lock().unwrap_or_else(|e| e.into_inner()) = Some((child, stdin));
    }

    fn try_start(&self) -> Result<(), String> {
        let options = format!(
            "-F -k {} -c listen_addresses=127.0.0.1 -p {} -c max_connections=300 \
             -c full_page_writes=off",
            self.dir.display(),
            self.port
        );
        let output = pg_command(&self.pg_ctl)
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .args(["-w", "-t", "60", "-o", &options, "start"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run pg_ctl: {e}"))?;
        if output.status.success() {
            Ok(())
        } else {
            let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
            Err(format!(
                "pg_ctl start failed: {}{}\nserver log:\n{log}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }

    /// Starts the server again on the same port after `stop`.
    pub fn restart(&self) {
        if let Err(e) = self.try_start() {
            panic!("PostgreSQL did not restart: {e}");
        }
    }

    /// Stops at once, like a crash: clients see their connections drop.
    pub fn stop(&self) {
        let _ = pg_command(&self.pg_ctl)
            .arg("-D")
            .arg(&self.data)
            .args(["-w", "stop", "-m", "immediate"])
            .stdin(Stdio::null())
            .output();
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{database}", self.port)
    }

    /// A new, empty database on this server.
    pub async fn create_database(&self) -> String {
        let name = format!("test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = PgConnection::connect(&self.url("postgres"))
            .await
            .expect("connect to the test PostgreSQL server");
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut conn)
            .await
            .expect("create test database");
        let _ = conn.close().await;
        self.url(&name)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
        let watchdog = self.watchdog.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some((mut child, mut stdin)) = watchdog {
            // Closing the pipe lets the watchdog finish the cleanup (it also
            // removes the directory); wait so no process is left behind.
            let _ = stdin.flush();
            drop(stdin);
            let _ = child.wait();
        }
    }
}

/// One server for the whole test binary: starting PostgreSQL costs about a
/// second, a new database a few milliseconds. Statics are never dropped; the
/// watchdog stops it when the process exits.
pub fn shared_server() -> &'static PgServer {
    static SERVER: OnceLock<PgServer> = OnceLock::new();
    SERVER.get_or_init(PgServer::start)
}
