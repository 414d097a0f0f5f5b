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
            // A replica's full sync writes an RDB file even without `save`:
            // into the temp dir, one per port, never the working tree.
            .arg("--dir")
            .arg(std::env::temp_dir())
            .args(["--dbfilename", &format!("moneta-test-{port}.rdb")])
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

    /// A replica of the server on `primary_port`, returned once it holds the
    /// primary's data and takes its stream.
    pub fn start_replica_of(primary_port: u16) -> RedisServer {
        let primary = primary_port.to_string();
        let replica = Self::start_with(free_port(), &["--replicaof", "127.0.0.1", &primary]);
        let port = replica.port;
        let online = eventually_blocking(PATIENCE, || {
            let own = cli(port, &["INFO", "replication"]);
            let theirs = cli(primary_port, &["INFO", "replication"]);
            (own.contains("master_link_status:up") && theirs.contains(&format!("port={port},state=online")))
                .then_some(())
        });
        assert!(
            online.is_some(),
            "replica {port} of {primary_port} never came online"
        );
        replica
    }
}

/// What `redis-cli -p <port> <args…>` prints; empty when nothing answers
/// (a node killed on purpose is no reason to panic).
pub fn cli(port: u16, args: &[&str]) -> String {
    Command::new(require_binary("redis-cli"))
        .args(["-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
pub struct ClusterNode {
    pub id: String,
    pub port: u16,
    pub primary: bool,
    /// Marked failed (or possibly failed) by the node asked.
    pub failing: bool,
    /// The primary's id, for a replica.
    pub replica_of: Option<String>,
    /// Slot ranges served, inclusive.
    pub slots: Vec<(u16, u16)>,
}

fn parse_cluster_nodes(text: &str) -> Vec<ClusterNode> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let port = fields
                .get(1)?
                .split(['@', ','])
                .next()?
                .rsplit(':')
                .next()?
                .parse()
                .ok()?;
            let flags = fields.get(2)?;
            let slots = fields
                .get(8..)
                .unwrap_or_default()
                .iter()
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|n| (n, n)),
                })
                .collect();
            Some(ClusterNode {
                id: fields.first()?.to_string(),
                port,
                primary: flags.contains("master"),
                failing: flags.contains("fail"),
                replica_of: fields.get(3).filter(|m| **m != "-").map(|m| m.to_string()),
                slots,
            })
        })
        .collect()
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // A stopped process would die only once continued.
        self.resume();
    }
}

/// A Redis Cluster of real redis-servers: `n` masters (`start`), or
/// primaries with replicas that take over when one dies (`start_with_replicas`).
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    pub fn start(n: usize) -> RedisCluster {
        Self::create(n, 0, &[])
    }

    /// `n` primaries without replicas that take a silent node for failed
    /// after one second: the whole cluster then stops serving keys
    /// (`CLUSTERDOWN` on every primary), as Redis Cluster does by default
    /// when a primary fails with no replica to promote.
    pub fn start_failing_fast(n: usize) -> RedisCluster {
        Self::create(n, 0, &["--cluster-node-timeout", "1000"])
    }

    /// `primaries` primaries with `replicas_per_primary` replicas each, a
    /// node timeout of one second (a dead primary is replaced within a few
    /// seconds) and replicas that always stand in, however long their link
    /// was down. Returned once every node says `cluster_state:ok` and every
    /// primary has its replicas online.
    pub fn start_with_replicas(primaries: usize, replicas_per_primary: usize) -> RedisCluster {
        let cluster = Self::create(
            primaries * (1 + replicas_per_primary),
            replicas_per_primary,
            &[
                "--cluster-node-timeout",
                "1000",
                "--cluster-replica-validity-factor",
                "0",
            ],
        );
        let replicated = eventually_blocking(PATIENCE, || {
            let online = cluster
                .nodes
                .iter()
                .filter(|n| {
                    let info = cli(n.port, &["INFO", "replication"]);
                    info.contains("role:master")
                        && info.matches("state=online").count() == replicas_per_primary
                })
                .count();
            (online == primaries).then_some(())
        });
        assert!(
            replicated.is_some(),
            "the primaries never had {replicas_per_primary} replica(s) online each"
        );
        cluster
    }

    fn create(n: usize, replicas: usize, extra: &[&str]) -> RedisCluster {
        let dir = tempfile::tempdir().expect("cluster dir");
        let nodes: Vec<RedisServer> = (0..n)
            .map(|_| {
                let port = cluster_node_port();
                let conf = dir.path().join(format!("nodes-{port}.conf"));
                let conf = conf.display().to_string();
                let mut args = vec!["--cluster-enabled", "yes", "--cluster-config-file", &conf];
                args.extend_from_slice(extra);
                RedisServer::start_with(port, &args)
            })
            .collect();
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let replicas = replicas.to_string();
        run(
            Command::new(require_binary("redis-cli"))
                .args(["--cluster", "create"])
                .args(&addrs)
                .args(["--cluster-replicas", &replicas, "--cluster-yes"]),
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

    /// The cluster as the live node `asked` sees it.
    pub fn topology(&self, asked: u16) -> Vec<ClusterNode> {
        parse_cluster_nodes(&cli(asked, &["CLUSTER", "NODES"]))
    }

    /// The port of the primary serving `slot`, as the live node `asked`
    /// sees it (not a node it marks failed).
    pub fn primary_of_slot(&self, asked: u16, slot: u16) -> Option<u16> {
        self.topology(asked)
            .into_iter()
            .find(|n| n.primary && !n.failing && n.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
            .map(|n| n.port)
    }

    /// The ports of the replicas of the primary on `primary`.
    pub fn replicas_of(&self, primary: u16) -> Vec<u16> {
        let nodes = self.topology(primary);
        let Some(id) = nodes.iter().find(|n| n.port == primary).map(|n| n.id.clone()) else {
            return Vec::new();
        };
        nodes
            .iter()
            .filter(|n| n.replica_of.as_deref() == Some(id.as_str()))
            .map(|n| n.port)
            .collect()
    }

    /// Moves `slot` and its keys from the primary on `from` to the primary
    /// on `to`, the way `redis-cli --cluster reshard` does (IMPORTING and
    /// MIGRATING, `MIGRATE`, then the new owner announced to every primary).
    /// Clients that still ask `from` get `MOVED`.
    pub fn migrate_slot(&self, slot: u16, from: u16, to: u16) {
        let id_of = |port: u16| cli(port, &["CLUSTER", "MYID"]).trim().to_owned();
        let (from_id, to_id) = (id_of(from), id_of(to));
        let slot = slot.to_string();
        let ok = |reply: String, what: &str| assert!(reply.trim() == "OK", "{what}: {reply}");
        ok(
            cli(to, &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id]),
            "importing",
        );
        ok(
            cli(from, &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id]),
            "migrating",
        );
        loop {
            let keys = cli(from, &["CLUSTER", "GETKEYSINSLOT", &slot, "100"]);
            let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let to_port = to.to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &to_port, "", "0", "5000", "KEYS"];
            args.extend(keys);
            ok(cli(from, &args), "migrate");
        }
        for node in self
            .nodes
            .iter()
            .filter(|n| cli(n.port, &["ROLE"]).starts_with("master"))
        {
            ok(
                cli(node.port, &["CLUSTER", "SETSLOT", &slot, "NODE", &to_id]),
                "node",
            );
        }
    }

    /// SIGKILL to the node on `port`: no shutdown code of it runs.
    pub fn kill(&mut self, port: u16) {
        if let Some(node) = self.nodes.iter_mut().find(|n| n.port == port) {
            node.kill();
        }
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

/// A free port for a cluster node whose bus port (the port + 10000, which
/// Redis Cluster opens beside it) is free too. The kernel hands out ports up
/// to 60999, and a node on a port above 55535 cannot open its bus at all.
fn cluster_node_port() -> u16 {
    loop {
        let port = free_port();
        let bus_free = port
            .checked_add(10_000)
            .is_some_and(|bus| std::net::TcpListener::bind(("127.0.0.1", bus)).is_ok());
        if bus_free {
            return port;
        }
    }
}
