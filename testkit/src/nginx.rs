//! A real `nginx` running the repository's own edge configuration.
//!
//! The main `nginx/nginx.conf` is used verbatim and every
//! `nginx/templates/*.template` is rendered exactly as the official image's
//! envsubst step would, so the tests exercise the file that ships rather than
//! a look-alike. The process runs in the foreground (`daemon off`) inside a
//! throwaway prefix and is stopped on drop.

// Each test binary compiles the whole support tree but uses only part of it.
#![allow(dead_code)]

use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::Process;
use crate::wait::{PATIENCE, eventually_blocking};

/// The variables the edge template reads; anything else in `${...}` form is a
/// mistake in the template, caught by [`render_template`].
pub const TEMPLATE_VARIABLES: [&str; 6] = [
    "MONETA_UPSTREAM",
    "NGINX_LISTEN",
    "NGINX_RATE_LIMIT",
    "NGINX_RATE_BURST",
    "NGINX_REAL_IP_FROM",
    "NGINX_ACCESS_LOG",
];

/// How to render the edge template for one test.
#[derive(Clone, Debug)]
pub struct NginxOptions {
    /// `host:port` of the upstream (Moneta, or a test double).
    pub upstream: String,
    /// nginx rate syntax, e.g. `50r/s`.
    pub rate_limit: String,
    pub rate_burst: u32,
    /// CIDR whose X-Forwarded-For entry is believed; `unix:` believes nobody.
    pub real_ip_from: String,
}

impl NginxOptions {
    /// Defaults generous enough that only the rate-limit test ever sees a 429.
    pub fn new(upstream: impl Into<String>) -> Self {
        NginxOptions {
            upstream: upstream.into(),
            rate_limit: "10000r/s".to_owned(),
            rate_burst: 10000,
            real_ip_from: "unix:".to_owned(),
        }
    }

    pub fn rate_limit(mut self, rate: &str, burst: u32) -> Self {
        self.rate_limit = rate.to_owned();
        self.rate_burst = burst;
        self
    }

    pub fn trust_proxy(mut self, cidr: &str) -> Self {
        self.real_ip_from = cidr.to_owned();
        self
    }
}

pub struct Nginx {
    pub port: u16,
    binary: PathBuf,
    prefix: tempfile::TempDir,
    process: Option<Process>,
}

impl Nginx {
    /// Renders the configuration into a fresh prefix, checks it with
    /// `nginx -t`, starts nginx on a free loopback port and waits until it
    /// accepts connections. Panics with nginx's own error output otherwise.
    pub fn start(options: NginxOptions) -> Nginx {
        let binary = nginx_binary();
        // A port handed out by free_port() can be taken by someone else
        // before nginx binds it; a couple of retries make that harmless.
        let mut last_error = String::new();
        for _ in 0..3 {
            match Nginx::try_start(&binary, &options) {
                Ok(nginx) => return nginx,
                Err(error) => last_error = error,
            }
        }
        panic!("nginx did not start:\n{last_error}");
    }

    fn try_start(binary: &Path, options: &NginxOptions) -> Result<Nginx, String> {
        let port = crate::free_port();
        let prefix = tempfile::Builder::new()
            .prefix("moneta-nginx-")
            .tempdir()
            .expect("create nginx prefix");
        render_prefix(prefix.path(), port, options);

        let check = nginx_command(binary, prefix.path())
            .args(["-t", "-q"])
            .output()
            .expect("run nginx -t");
        if !check.status.success() {
            panic!(
                "nginx -t rejected the rendered edge configuration:\n{}",
                String::from_utf8_lossy(&check.stderr)
            );
        }

        let stderr = fs::File::create(prefix.path().join("error.log")).expect("create error.log");
        let process = Process::spawn(
            nginx_command(binary, prefix.path())
                .args(["-g", "daemon off;"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr),
            "nginx",
        );
        let mut nginx = Nginx {
            port,
            binary: binary.to_owned(),
            prefix,
            process: Some(process),
        };
        let listening = eventually_blocking(PATIENCE, || {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(Ok(()));
            }
            let exited = nginx.process.as_mut().and_then(Process::exit_status);
            exited.map(Err)
        });
        match listening {
            Some(Ok(())) => Ok(nginx),
            Some(Err(status)) => {
                nginx.process = None;
                Err(format!("nginx exited with {status}:\n{}", nginx.error_log()))
            }
            None => Err(format!(
                "nginx did not accept connections on port {port} within {PATIENCE:?}:\n{}",
                nginx.error_log()
            )),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    pub fn prefix(&self) -> &Path {
        self.prefix.path()
    }

    /// What nginx wrote to stderr (its error log).
    pub fn error_log(&self) -> String {
        fs::read_to_string(self.prefix.path().join("error.log")).unwrap_or_default()
    }

    /// The access log, one parsed JSON object per line. Panics on a line
    /// that is not JSON: the log format is part of what is under test.
    pub fn access_log(&self) -> Vec<serde_json::Value> {
        let text = fs::read_to_string(self.prefix.path().join("access.log")).unwrap_or_default();
        text.lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("access log line is not JSON ({e}): {line}"))
            })
            .collect()
    }

    /// nginx writes a request's log line only after the response has gone
    /// out, so a test that just got its answer may have to wait a moment.
    pub fn wait_for_access_log<F>(&self, what: &str, mut found: F) -> Vec<serde_json::Value>
    where
        F: FnMut(&[serde_json::Value]) -> bool,
    {
        eventually_blocking(PATIENCE, || {
            let lines = self.access_log();
            found(&lines).then_some(lines)
        })
        .unwrap_or_else(|| {
            panic!(
                "access log never showed {what}; it holds:\n{:#?}",
                self.access_log()
            )
        })
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let Some(mut process) = self.process.take() else {
            return;
        };
        // SIGKILL on the master would orphan the workers and their listening
        // sockets; `nginx -s stop` makes the master take them down with it.
        let _ = nginx_command(&self.binary, self.prefix.path())
            .args(["-s", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = process.wait_for_exit(Duration::from_secs(5));
    }
}

/// nginx working in `prefix`, on the configuration rendered there.
fn nginx_command(binary: &Path, prefix: &Path) -> Command {
    let mut command = Command::new(binary);
    command
        .arg("-p")
        .arg(format!("{}/", prefix.display()))
        .arg("-c")
        .arg(prefix.join("nginx.conf"));
    command
}

/// The repository's `nginx/` directory, or `$MONETA_EDGE_NGINX_DIR` to try
/// a candidate configuration against the same tests.
pub fn config_dir() -> PathBuf {
    match std::env::var_os("MONETA_EDGE_NGINX_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../nginx"),
    }
}

/// Replaces `${NAME}` for each given variable, the way
/// `envsubst '${A} ${B}'` does, and refuses to leave any other upper-case
/// `${...}` behind (nginx's own variables are lower-case and untouched).
pub fn render_template(template: &str, vars: &[(&str, String)]) -> String {
    let mut out = template.to_owned();
    for (name, value) in vars {
        out = out.replace(&format!("${{{name}}}"), value);
    }
    for (start, _) in out.match_indices("${") {
        let name: String = out[start + 2..].chars().take_while(|c| *c != '}').collect();
        if name
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        {
            panic!("the edge template uses ${{{name}}}, which nothing provides");
        }
    }
    out
}

fn render_prefix(prefix: &Path, port: u16, options: &NginxOptions) {
    let source = config_dir();
    fs::copy(source.join("nginx.conf"), prefix.join("nginx.conf")).expect("copy nginx.conf");

    let access_log = prefix.join("access.log").display().to_string();
    let vars: Vec<(&str, String)> = vec![
        ("MONETA_UPSTREAM", options.upstream.clone()),
        ("NGINX_LISTEN", format!("127.0.0.1:{port}")),
        ("NGINX_RATE_LIMIT", options.rate_limit.clone()),
        ("NGINX_RATE_BURST", options.rate_burst.to_string()),
        ("NGINX_REAL_IP_FROM", options.real_ip_from.clone()),
        ("NGINX_ACCESS_LOG", access_log),
    ];
    debug_assert_eq!(vars.len(), TEMPLATE_VARIABLES.len());

    // Same layout as the image: templates/X.template becomes conf.d/X.
    let conf_d = prefix.join("conf.d");
    fs::create_dir_all(&conf_d).expect("create conf.d");
    let mut rendered = 0;
    for entry in fs::read_dir(source.join("templates")).expect("read nginx/templates") {
        let path = entry.expect("read nginx/templates entry").path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(target) = name.strip_suffix(".template") else {
            continue;
        };
        let template = fs::read_to_string(&path).expect("read template");
        fs::write(conf_d.join(target), render_template(&template, &vars)).expect("write conf");
        rendered += 1;
    }
    assert!(rendered > 0, "no *.template under {}", source.display());

    // Workers drop privileges when nginx starts as root; they still have to
    // reach the temp directories inside this (by default owner-only) prefix.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(prefix, fs::Permissions::from_mode(0o755)).expect("chmod prefix");
    }
}

/// `$NGINX_BIN`, else `nginx` on PATH or in the usual sbin directories
/// (which are not on a normal user's PATH on Debian).
pub fn nginx_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("NGINX_BIN") {
        let bin = PathBuf::from(bin);
        assert!(bin.is_file(), "NGINX_BIN={} is not a file", bin.display());
        return bin;
    }
    crate::require_binary("nginx")
}
