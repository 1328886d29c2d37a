//! Garage servers for the tests: one node on loopback ([`Garage::single`], or the one per test
//! process that [`Garage::shared`] hands out), or three in network namespaces with replication
//! factor 3 ([`Garage::cluster3`]; the network is described in `netns.rs`).
//!
//! A store is set up as an operator would: `garage server` per node from a `garage.toml` in a
//! temporary directory (LMDB metadata, an RPC secret, the S3 API, the admin API with a token),
//! `node connect` between the nodes, `layout assign` + `layout apply`, `key import` of one key per
//! store, and `bucket create` + `bucket allow --read --write --owner` per bucket. Blocks are
//! stored uncompressed (`compression_level = "none"`): the clients under test compress (and
//! encrypt) themselves, and a second zstd pass on the store's side would only cost CPU that the
//! benchmarks measure the clients with.
//!
//! Nodes are stopped with SIGKILL by their pid, as a crash would stop them, and started again on
//! the same directories; readiness is polled on the admin API's `/health`, which says "fully
//! operational" once a node has the layout and sees every storage node up.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

use super::netns::Network;
use super::{Reaper, S3, http_get, random_hex, tool, unique_bucket_name, wait_until};
use crate::qemu::run_command;

/// The region the stores sign with: not a default, so that a client that ignores `AWS_REGION`
/// fails its first request.
pub const REGION: &str = "garage";

/// The zone every node is assigned to.
const ZONE: &str = "dc1";

/// Each node's capacity in the layout: a weight only (all nodes share one disk), large enough
/// that Garage never thinks a node full.
const CAPACITY: &str = "100G";

/// The ports of a node in its own namespace (Garage's customary ones).
const S3_PORT: u16 = 3900;
const RPC_PORT: u16 = 3901;
const ADMIN_PORT: u16 = 3903;

/// What a node's `/health` says when it has the layout and every storage node is up.
const FULLY_OPERATIONAL: &str = "Garage is fully operational";

/// Log levels of the servers: start-up, peering and errors, without a line per S3 request.
const SERVER_LOG: &str = "garage=info,garage_api_common=warn";

/// How many times a node on loopback is started on other free ports when one was taken between
/// choosing it and binding it.
const PORT_ATTEMPTS: usize = 5;

/// A running Garage store (one node, or a cluster) with one access key that may read, write and
/// own every bucket made through [`Garage::bucket`]. Dropping it stops every node by pid and
/// removes its directory and namespaces.
pub struct Garage {
    garage: PathBuf,
    nodes: Vec<Node>,
    net: Option<Network>,
    key_id: String,
    secret: String,
    default: S3,
    /// Declared last: dropped after the nodes were stopped, it removes what is left.
    _reaper: Reaper,
}

/// One `garage server` process and its directory.
struct Node {
    dir: PathBuf,
    netns: Option<String>,
    s3: SocketAddr,
    admin: SocketAddr,
    child: Option<Child>,
}

impl Garage {
    /// One node on loopback (free ports), replication factor 1, with a bucket ready
    /// ([`Garage::s3`]). Starts in well under a second on an idle machine.
    pub fn single() -> Garage {
        let garage = tool("garage");
        let root = temp_root();
        let reaper = Reaper::spawn(&kill_nodes_script(""), &[&root]);
        let dir = root.join("node0");
        std::fs::create_dir(&dir).unwrap();
        let secret = random_hex(32);
        let mut node = None;
        for _attempt in 0..PORT_ATTEMPTS {
            let [s3, rpc, admin] =
                [(); 3].map(|()| SocketAddr::from(([127, 0, 0, 1], crate::smtp::free_port())));
            write_config(&dir, 1, rpc, rpc, s3, admin, &secret);
            let mut candidate = Node {
                dir: dir.clone(),
                netns: None,
                s3,
                admin,
                child: None,
            };
            candidate.spawn(&garage);
            if candidate.wait_answering_or_port_taken() {
                node = Some(candidate);
                break;
            }
        }
        let node = node
            .unwrap_or_else(|| panic!("garage found no free ports in {PORT_ATTEMPTS} attempts"));
        Garage::set_up(garage, vec![node], None, reaper)
    }

    /// The single node shared by every test of this process (started by the first caller).
    /// Tests take buckets of their own from it ([`Garage::bucket`]); it cannot be stopped.
    pub fn shared() -> &'static Garage {
        static SHARED: OnceLock<Garage> = OnceLock::new();
        SHARED.get_or_init(Garage::single)
    }

    /// Three nodes, each in a network namespace of its own, replication factor 3 (so writes
    /// and reads need 2 of the 3), connected and in one layout, with a bucket ready; clients
    /// reach node 0 through [`Garage::s3`] and node `i` through [`Garage::s3_via`]. Needs root.
    pub fn cluster3() -> Garage {
        const NODES: usize = 3;
        let garage = tool("garage");
        let root = temp_root();
        let mut net = Network::named(NODES);
        let reaper = Reaper::spawn(&kill_nodes_script(&net.cleanup_script()), &[&root]);
        net.create();
        let secret = random_hex(32);
        let mut nodes = Vec::new();
        for i in 0..NODES {
            let dir = root.join(format!("node{i}"));
            std::fs::create_dir(&dir).unwrap();
            let ip = net.node_ip(i);
            let at = |port| SocketAddr::V4(SocketAddrV4::new(ip, port));
            let any = |port| SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port));
            write_config(
                &dir,
                NODES,
                any(RPC_PORT),
                at(RPC_PORT),
                any(S3_PORT),
                any(ADMIN_PORT),
                &secret,
            );
            let mut node = Node {
                dir,
                netns: Some(net.nodes[i].clone()),
                s3: at(S3_PORT),
                admin: at(ADMIN_PORT),
                child: None,
            };
            node.spawn(&garage);
            nodes.push(node);
        }
        for node in &mut nodes {
            assert!(
                node.wait_answering_or_port_taken(),
                "garage could not bind its ports in namespace {:?}",
                node.netns
            );
        }
        Garage::set_up(garage, nodes, Some(net), reaper)
    }

    /// Connects the nodes, applies the first layout, imports the key and makes the default
    /// bucket.
    fn set_up(garage: PathBuf, nodes: Vec<Node>, net: Option<Network>, reaper: Reaper) -> Garage {
        let mut store = Garage {
            garage,
            nodes,
            net,
            key_id: format!("GK{}", random_hex(12)),
            secret: random_hex(32),
            default: S3 {
                endpoint: String::new(),
                region: REGION.to_owned(),
                access_key: String::new(),
                secret_key: String::new(),
                bucket: String::new(),
            },
            _reaper: reaper,
        };
        let ids: Vec<String> = store.nodes.iter().map(Node::id).collect();
        for (i, id) in ids.iter().enumerate().skip(1) {
            let rpc = store.rpc_addr(i);
            store.cli(&["node", "connect", &format!("{id}@{rpc}")]);
        }
        let mut assign = vec!["layout", "assign", "-z", ZONE, "-c", CAPACITY];
        assign.extend(ids.iter().map(String::as_str));
        store.cli(&assign);
        store.cli(&["layout", "apply", "--version", "1"]);
        store.wait_healthy();
        let (key_id, secret) = (store.key_id.clone(), store.secret.clone());
        store.cli(&[
            "key",
            "import",
            "--yes",
            &key_id,
            &secret,
            "-n",
            "backflow-tests",
        ]);
        store.default = store.bucket("default");
        store
    }

    /// The bucket made at start, through node 0.
    pub fn s3(&self) -> &S3 {
        &self.default
    }

    /// `s3` reached through node `i` instead (a cluster's other nodes).
    pub fn s3_via(&self, s3: &S3, i: usize) -> S3 {
        S3 {
            endpoint: format!("http://{}", self.nodes[i].s3),
            ..s3.clone()
        }
    }

    /// A new empty bucket named after `name` (see [`super::unique_bucket_name`]), which the
    /// store's key may read, write and own; reached through node 0.
    pub fn bucket(&self, name: &str) -> S3 {
        let bucket = unique_bucket_name(name);
        self.cli(&["bucket", "create", &bucket]);
        self.cli(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            &bucket,
            "--key",
            &self.key_id,
        ]);
        S3 {
            endpoint: format!("http://{}", self.nodes[0].s3),
            region: REGION.to_owned(),
            access_key: self.key_id.clone(),
            secret_key: self.secret.clone(),
            bucket,
        }
    }

    /// How many nodes the store has.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Never: a store has one node at least (for clippy's `len_without_is_empty`).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i`'s pid, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].child.as_ref().map(Child::id)
    }

    /// Node `i`'s data and metadata directories' parent (`garage.toml`, `meta/`, `data/`, `log`).
    pub fn node_dir(&self, i: usize) -> &Path {
        &self.nodes[i].dir
    }

    /// The network namespace node `i` runs in (a cluster's nodes only).
    pub fn netns(&self, i: usize) -> Option<&str> {
        self.nodes[i].netns.as_deref()
    }

    /// Stops node `i` with SIGKILL (by its pid), as a crash would, and waits until it is gone.
    pub fn stop(&mut self, i: usize) {
        self.nodes[i].stop();
    }

    /// Starts the stopped node `i` again on its directories and waits until it answers, and,
    /// when enough nodes run for a quorum, until every running node sees the others.
    pub fn start(&mut self, i: usize) {
        assert!(self.nodes[i].child.is_none(), "node {i} runs already");
        self.nodes[i].spawn(&self.garage);
        assert!(
            self.nodes[i].wait_answering_or_port_taken(),
            "node {i}'s ports were taken while it was stopped"
        );
        self.connect_running();
        self.wait_healthy();
    }

    /// Freezes node `i` (SIGSTOP by its pid): its sockets stay open and the kernel still accepts
    /// connections, but nothing answers, as with a hung server or a dead link; for clients'
    /// timeouts. [`Garage::resume`] lets it go on.
    pub fn pause(&self, i: usize) {
        self.signal(i, "STOP");
        // kill(2) returns before every thread has stopped: a thread still running could answer a
        // request sent right after. Wait until each thread's state is `T` (stopped).
        let pid = self.pid(i).unwrap_or_else(|| panic!("node {i} is stopped"));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let all_stopped = std::fs::read_dir(format!("/proc/{pid}/task"))
                .map(|tasks| {
                    tasks.flatten().all(|t| {
                        std::fs::read_to_string(t.path().join("stat")).is_ok_and(|stat| {
                            stat.rsplit_once(')')
                                .is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
                        })
                    })
                })
                .unwrap_or(false);
            if all_stopped {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "node {i} (pid {pid}) did not stop within 10 s of SIGSTOP"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Lets the paused node `i` go on (SIGCONT).
    pub fn resume(&self, i: usize) {
        self.signal(i, "CONT");
    }

    fn signal(&self, i: usize, signal: &str) {
        let pid = self.pid(i).unwrap_or_else(|| panic!("node {i} is stopped"));
        run_command(
            Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(pid.to_string()),
        );
    }

    /// Stops every node (see [`Garage::stop`]).
    pub fn stop_all(&mut self) {
        for node in &mut self.nodes {
            node.stop();
        }
    }

    /// Starts every stopped node and waits until the store is fully operational again.
    pub fn start_all(&mut self) {
        for node in self.nodes.iter_mut().filter(|n| n.child.is_none()) {
            node.spawn(&self.garage);
        }
        for (i, node) in self.nodes.iter_mut().enumerate() {
            assert!(
                node.wait_answering_or_port_taken(),
                "node {i}'s ports were taken while it was stopped"
            );
        }
        self.connect_running();
        self.wait_healthy();
    }

    /// Connects every running node to every other one (`garage node connect`). A node that
    /// starts while a peer is down retries that peer only every 30 s (Garage's
    /// `CONN_RETRY_INTERVAL`), so a restarted store would otherwise wait that long to be whole.
    fn connect_running(&self) {
        if self.nodes.len() < 2 {
            return;
        }
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].child.is_some())
            .collect();
        for &from in &running {
            for &to in running.iter().filter(|&&to| to != from) {
                let peer = format!("{}@{}", self.nodes[to].id(), self.rpc_addr(to));
                self.cli_on(from, &["node", "connect", &peer]);
            }
        }
    }

    /// The end of node `i`'s log, for failure messages.
    pub fn log_tail(&self, i: usize) -> String {
        super::tail(&self.nodes[i].dir.join("log"))
    }

    /// Waits until every running node says on `/health` that it is fully operational when all
    /// nodes run, or that it has a quorum when at least a majority runs. With fewer running
    /// nodes there is nothing to wait for.
    fn wait_healthy(&mut self) {
        let running = self.nodes.iter().filter(|n| n.child.is_some()).count();
        let total = self.nodes.len();
        let wanted: &dyn Fn(u16, &str) -> bool = if running == total {
            &|code, body| code == 200 && body.starts_with(FULLY_OPERATIONAL)
        } else if running > total / 2 {
            &|code, _| code == 200
        } else {
            return;
        };
        for (i, node) in self.nodes.iter_mut().enumerate() {
            if node.child.is_none() {
                continue;
            }
            let admin = node.admin;
            let log = node.dir.join("log");
            let what = format!("garage node {i} ({}) becomes healthy", node.s3);
            wait_until(
                &what,
                || http_get(admin, "/health").is_some_and(|(code, body)| wanted(code, &body)),
                || node.exited(),
                &log,
            );
        }
    }

    /// Node `i`'s RPC address as the other nodes and the CLI reach it.
    fn rpc_addr(&self, i: usize) -> SocketAddr {
        match &self.net {
            Some(net) => SocketAddr::V4(SocketAddrV4::new(net.node_ip(i), RPC_PORT)),
            None => {
                let config = std::fs::read_to_string(self.nodes[i].dir.join("garage.toml"))
                    .expect("garage.toml");
                config
                    .lines()
                    .find_map(|l| l.strip_prefix("rpc_public_addr = "))
                    .and_then(|v| v.trim_matches('"').parse().ok())
                    .expect("rpc_public_addr in garage.toml")
            }
        }
    }

    /// Runs the garage CLI against the first running node; panics with its output when it
    /// fails. Returns its stdout.
    fn cli(&self, args: &[&str]) -> String {
        let first = (0..self.nodes.len())
            .find(|&i| self.nodes[i].child.is_some())
            .expect("a running node");
        self.cli_on(first, args)
    }

    /// Runs the garage CLI against node `i`.
    fn cli_on(&self, i: usize, args: &[&str]) -> String {
        let node = &self.nodes[i];
        let out = run_command(
            Command::new(&self.garage)
                .arg("-c")
                .arg(node.dir.join("garage.toml"))
                .args(args)
                .env("RUST_LOG", "warn"),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Node {
    fn spawn(&mut self, garage: &Path) {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("log"))
            .unwrap();
        let mut command = match &self.netns {
            // `ip netns exec` execs the program: the child's pid is garage's.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(garage);
                c
            }
            None => Command::new(garage),
        };
        let child = command
            .arg("-c")
            .arg(self.dir.join("garage.toml"))
            .arg("server")
            .env("RUST_LOG", SERVER_LOG)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", garage.display()));
        std::fs::write(self.dir.join("pid"), child.id().to_string()).unwrap();
        self.child = Some(child);
    }

    /// Waits until the admin API answers (any status: before the layout, `/health` says 503).
    /// False when the node exited because one of its ports was taken (it is then stopped).
    fn wait_answering_or_port_taken(&mut self) -> bool {
        let admin = self.admin;
        let log = self.dir.join("log");
        let mut port_taken = false;
        let what = format!("garage at {} answers", self.s3);
        wait_until(
            &what,
            || http_get(admin, "/health").is_some(),
            || {
                let status = self.exited()?;
                port_taken = std::fs::read_to_string(&log)
                    .is_ok_and(|l| l.contains("Address already in use"));
                (!port_taken).then_some(status)
            },
            &log,
        );
        if port_taken {
            self.child = None;
            let _ = std::fs::remove_file(self.dir.join("pid"));
        }
        !port_taken
    }

    /// The exit status, when the process has exited.
    fn exited(&mut self) -> Option<String> {
        let child = self.child.as_mut()?;
        child.try_wait().unwrap().map(|s| s.to_string())
    }

    /// The node's full id: its public key (`meta/node_key.pub`, written at first start) in hex.
    fn id(&self) -> String {
        let key = std::fs::read(self.dir.join("meta/node_key.pub")).unwrap();
        key.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_file(self.dir.join("pid"));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A new directory for one store's nodes; the reaper removes it.
fn temp_root() -> PathBuf {
    tempfile::Builder::new()
        .prefix("bf-garage-")
        .tempdir()
        .unwrap()
        .keep()
}

/// The reaper's script: kill every node that still has a pid file (in `$1/node*/pid`), then run
/// `more` (the network's part), then remove the directory.
fn kill_nodes_script(more: &str) -> String {
    format!(
        "for f in \"$1\"/node*/pid; do [ -f \"$f\" ] && kill -KILL \"$(cat \"$f\")\"; done\n\
         {more}rm -rf \"$1\"\n"
    )
}

fn write_config(
    dir: &Path,
    replication: usize,
    rpc_bind: SocketAddr,
    rpc_public: SocketAddr,
    s3: SocketAddr,
    admin: SocketAddr,
    rpc_secret: &str,
) {
    let config = format!(
        r#"metadata_dir = "{dir}/meta"
data_dir = "{dir}/data"
db_engine = "lmdb"
replication_factor = {replication}
compression_level = "none"
rpc_bind_addr = "{rpc_bind}"
rpc_public_addr = "{rpc_public}"
rpc_secret = "{rpc_secret}"

[s3_api]
s3_region = "{REGION}"
api_bind_addr = "{s3}"

[admin]
api_bind_addr = "{admin}"
admin_token = "{admin_token}"
"#,
        dir = dir.display(),
        admin_token = random_hex(16),
    );
    std::fs::write(dir.join("garage.toml"), config).unwrap();
}
