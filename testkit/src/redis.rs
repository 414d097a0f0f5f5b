//! A real redis-server without persistence.

use std::process::{Command, Stdio};

use crate::wait::{PATIENCE, eventually_blocking};
use crate::{Process, free_port, require_binary, run, signal};

pub struct RedisServer {
    pub port: u16,
    pub url: String,
    process: Process,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_on(free_port())
    }

    /// Starts (or restarts, after `kill`) on a chosen port.
    pub fn start_on(port: u16) -> RedisServer {
        Self::start_with(port, &[])
    }

    /// Starts with extra `redis-server` arguments.
    pub fn start_with(port: u16, extra: &[&str]) -> RedisServer {
        let mut command = Command::new(require_binary("redis-server"));
        command
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--protected-mode", "no", "--loglevel", "warning"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        RedisServer {
            port,
            url: format!("redis://127.0.0.1:{port}"),
            process: Process::spawn(&mut command, "redis-server").listening_on(port),
        }
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Freezes the server (SIGSTOP): connections hang instead of being refused.
    pub fn pause(&self) {
        signal(self.pid(), "STOP");
    }

    pub fn resume(&self) {
        signal(self.pid(), "CONT");
    }

    pub fn kill(&mut self) {
        self.process.kill();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // A stopped process would die only once continued.
        self.resume();
    }
}

/// A Redis Cluster of `n` masters (no replicas), each a real redis-server.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    pub fn start(n: usize) -> RedisCluster {
        let dir = tempfile::tempdir().expect("cluster dir");
        let nodes: Vec<RedisServer> = (0..n)
            .map(|_| {
                let port = free_port();
                let conf = dir.path().join(format!("nodes-{port}.conf"));
                RedisServer::start_with(
                    port,
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        &conf.display().to_string(),
                    ],
                )
            })
            .collect();
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        run(
            Command::new(require_binary("redis-cli"))
                .args(["--cluster", "create"])
                .args(&addrs)
                .args(["--cluster-replicas", "0", "--cluster-yes"]),
            "redis-cli --cluster create",
        );
        // Slots are assigned at once, but every node must agree before clients use it.
        for node in &nodes {
            let ready = eventually_blocking(PATIENCE, || {
                let info = run(
                    Command::new(require_binary("redis-cli")).args([
                        "-p",
                        &node.port.to_string(),
                        "cluster",
                        "info",
                    ]),
                    "redis-cli cluster info",
                );
                String::from_utf8_lossy(&info.stdout)
                    .contains("cluster_state:ok")
                    .then_some(())
            });
            assert!(
                ready.is_some(),
                "cluster node {} never reached cluster_state:ok",
                node.port
            );
        }
        RedisCluster { nodes, _dir: dir }
    }

    /// `MONETA_REDIS_CLUSTER_URLS` for this cluster.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.url.clone())
            .collect::<Vec<_>>()
            .join(",")
    }
}
