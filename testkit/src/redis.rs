//! A real redis-server without persistence.

use std::process::{Child, Command, Stdio};

use crate::{free_port, require_binary, signal, wait_for_port};

pub struct RedisServer {
    pub port: u16,
    pub url: String,
    child: Child,
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
        let bin = require_binary("redis-server");
        let mut child = Command::new(bin)
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
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start redis-server");
        wait_for_port(port, "redis-server", &mut child);
        RedisServer {
            port,
            url: format!("redis://127.0.0.1:{port}"),
            child,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Freezes the server (SIGSTOP): connections hang instead of being refused.
    pub fn pause(&self) {
        signal(self.pid(), "STOP");
    }

    pub fn resume(&self) {
        signal(self.pid(), "CONT");
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        signal(self.pid(), "CONT");
        self.kill();
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
        let out = Command::new(require_binary("redis-cli"))
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        // Slots are assigned at once, but every node must agree before clients use it.
        let deadline = std::time::Instant::now() + crate::PATIENCE;
        for node in &nodes {
            loop {
                let info = Command::new(require_binary("redis-cli"))
                    .args(["-p", &node.port.to_string(), "cluster", "info"])
                    .output()
                    .expect("redis-cli cluster info");
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "cluster did not become ready"
                );
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
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
