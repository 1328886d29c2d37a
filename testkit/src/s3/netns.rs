//! The network of a Garage cluster: one network namespace per node, and a fourth, the hub, that
//! holds the bridge joining them.
//!
//! ```text
//!   test process (root namespace)          hub namespace              node namespaces
//!   bfh<tag> 10.A.B.1/24  ==veth==  up0 ─┐
//!                                        br0 ─ h0 ==veth== eth0 10.A.B.10  (node 0)
//!                                            ─ h1 ==veth== eth0 10.A.B.11  (node 1)
//!                                            ─ h2 ==veth== eth0 10.A.B.12  (node 2)
//! ```
//!
//! The bridge is in a namespace of its own rather than in the root namespace because bridged
//! traffic passes the root namespace's iptables `FORWARD` chain when `br_netfilter` is loaded
//! (Docker loads it and sets that chain's policy to `DROP`): in the hub there are no rules. The
//! test process reaches every node at its own address (S3 on port 3900), so a client can keep
//! talking to one node while another is stopped. `A.B` is chosen under a machine-wide lock among
//! the /24s of 10.201.0.0–10.250.255.0 that no address or route of the root namespace uses.
//! Names carry the pid and a counter, so that concurrent test processes do not meet.

use std::net::Ipv4Addr;
use std::process::Command;

use crate::qemu::run_command;

/// The lock that makes choosing a subnet and claiming it (the host side's address) one step
/// across test processes.
const SUBNET_LOCK: &str = "/tmp/backflow-testkit-subnet.lock";

/// The range the second octet of a cluster's subnet is chosen from.
const SECOND_OCTETS: std::ops::RangeInclusive<u8> = 201..=250;

/// The last octet of node 0's address; node `i` has `NODE_HOST_OFFSET + i`.
const NODE_HOST_OFFSET: u8 = 10;

pub(crate) struct Network {
    pub(crate) hub: String,
    pub(crate) nodes: Vec<String>,
    host_if: String,
    /// `10.A.B`, once created.
    subnet: Option<[u8; 3]>,
}

impl Network {
    /// The names of a network of `nodes` namespaces, unique on this machine; nothing is created
    /// yet (so that a reaper that knows them can be started first).
    pub(crate) fn named(nodes: usize) -> Network {
        let tag = format!(
            "{:x}x{:x}",
            std::process::id(),
            super::NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        Network {
            hub: format!("bf{tag}hub"),
            nodes: (0..nodes).map(|i| format!("bf{tag}n{i}")).collect(),
            // Interface names have at most 15 bytes: 3 + 6 (pid) + 1 + counter.
            host_if: format!("bfh{tag}"),
            subnet: None,
        }
    }

    /// Shell lines that kill whatever runs in the namespaces and remove them (and with them the
    /// veth pairs and the bridge): the network's part of a reaper's script.
    pub(crate) fn cleanup_script(&self) -> String {
        let mut script = String::new();
        for ns in self.nodes.iter().chain([&self.hub]) {
            script.push_str(&format!(
                "ip netns pids {ns} 2>/dev/null | xargs -r kill -KILL\n\
                 ip netns del {ns} 2>/dev/null\n"
            ));
        }
        script.push_str(&format!("ip link del {} 2>/dev/null\n", self.host_if));
        script
    }

    /// Creates the namespaces, the bridge and the links (needs root and `ip` from iproute2).
    pub(crate) fn create(&mut self) {
        let ip = |args: &[&str]| {
            run_command(Command::new("ip").args(args));
        };
        ip(&["netns", "add", &self.hub]);
        ip(&["-n", &self.hub, "link", "set", "lo", "up"]);
        ip(&["-n", &self.hub, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &self.hub, "link", "set", "br0", "up"]);
        for (i, ns) in self.nodes.iter().enumerate() {
            let port = format!("h{i}");
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&[
                "-n", &self.hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                "netns", ns,
            ]);
            ip(&["-n", &self.hub, "link", "set", &port, "master", "br0", "up"]);
        }
        ip(&[
            "link",
            "add",
            &self.host_if,
            "type",
            "veth",
            "peer",
            "name",
            "up0",
            "netns",
            &self.hub,
        ]);
        ip(&["-n", &self.hub, "link", "set", "up0", "master", "br0", "up"]);

        let lock = std::fs::File::create(SUBNET_LOCK)
            .unwrap_or_else(|e| panic!("cannot open {SUBNET_LOCK}: {e}"));
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
            .unwrap_or_else(|e| panic!("cannot lock {SUBNET_LOCK}: {e}"));
        let subnet = free_subnet();
        self.subnet = Some(subnet);
        for (i, ns) in self.nodes.iter().enumerate() {
            let addr = format!("{}/24", self.node_ip(i));
            ip(&["-n", ns, "addr", "add", &addr, "dev", "eth0"]);
            ip(&["-n", ns, "link", "set", "eth0", "up"]);
        }
        let host = format!("{}/24", Ipv4Addr::new(10, subnet[1], subnet[2], 1));
        ip(&["addr", "add", &host, "dev", &self.host_if]);
        ip(&["link", "set", &self.host_if, "up"]);
        drop(lock); // the subnet is claimed: it shows in the root namespace's routes
    }

    /// Node `i`'s address.
    pub(crate) fn node_ip(&self, i: usize) -> Ipv4Addr {
        let [a, b, c] = self.subnet.expect("the network is created");
        Ipv4Addr::new(a, b, c, NODE_HOST_OFFSET + i as u8)
    }
}

/// A `10.A.B` that no address or route of the root namespace uses, from a random start in
/// [`SECOND_OCTETS`]; called under [`SUBNET_LOCK`].
fn free_subnet() -> [u8; 3] {
    let used = |args: &[&str]| {
        String::from_utf8_lossy(&run_command(Command::new("ip").args(args)).stdout).into_owned()
    };
    let taken = format!(
        "{}\n{}",
        used(&["-4", "-o", "addr", "show"]),
        used(&["-4", "route", "show", "table", "all"])
    );
    let span = u32::from(*SECOND_OCTETS.end() - *SECOND_OCTETS.start()) + 1;
    let count = span * 256;
    let start = u32::from_str_radix(&super::random_hex(4), 16).unwrap() % count;
    (0..count)
        .map(|k| (start + k) % count)
        .map(|n| [10, SECOND_OCTETS.start() + (n / 256) as u8, (n % 256) as u8])
        .find(|[a, b, c]| {
            let prefix = format!("{a}.{b}.{c}.");
            !taken
                .split(|ch: char| ch.is_whitespace())
                .any(|word| word.starts_with(&prefix))
        })
        .expect("a free /24 in 10.201.0.0/16-10.250.0.0/16")
}
