//! Network namespaces for the LAN tests and `shoal-bench lan` (needs root, and
//! Debian's `iproute2` and `nftables`): a server host, a router with a shaped WAN uplink whose forwarded
//! bytes are counted by nftables, and LANs of devices behind it.
//!
//! ```text
//!   {P}-srv 10.77.0.10 --wan (tbf)-- {P}-rtr --br1 10.77.1.1/24-- {P}-d11 .. d1N (10.77.1.11..)
//!                                            \-br2 10.77.2.1/24-- {P}-d21 .. d2N (10.77.2.11..)
//! ```
//!
//! Each LAN is a bridge in the router's namespace, so mDNS (link-local multicast)
//! stays inside its LAN, as on a real site. Every namespace has a prefix unique to
//! the process (and a tag per topology) and is deleted on drop (also when the test
//! panics), after the processes started in it are killed. Tools that fail panic
//! with their stderr (a test's failure; the bench catches it).

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

/// The addresses' first two octets.
pub const NET: &str = "10.77";

/// Runs a tool, panicking with its stderr when it fails; names the Debian package
/// when it is missing.
pub fn sh(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} ({e}): {}", args[0], package_of(args[0])));
    assert!(
        out.status.success(),
        "{} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn package_of(tool: &str) -> &'static str {
    match tool {
        "nft" => "install Debian's nftables",
        "ip" | "tc" => "install Debian's iproute2",
        _ => "install it",
    }
}

/// Fails (never skips) when the test cannot build namespaces.
pub fn require_root_and_tools() {
    // The effective uid, from /proc (no libc call).
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("?");
    assert_eq!(
        euid, "0",
        "the network namespace tests need root (CI runs them as root)"
    );
    for (tool, arg) in [("ip", "-V"), ("tc", "-V"), ("nft", "--version")] {
        sh(&[tool, arg]);
    }
}

/// A topology of namespaces; torn down on drop.
#[derive(Debug)]
pub struct Net {
    /// The namespaces' prefix.
    pub prefix: String,
    namespaces: Vec<String>,
    children: Vec<Child>,
}

impl Net {
    /// The server, the router (WAN uplink shaped to `wan_rate`, e.g. `"16mbit"`,
    /// in both directions) and `lans` LANs of `devices` device namespaces each.
    /// `tag` keeps the namespaces of two tests of one process apart.
    pub fn new(tag: &str, lans: u8, devices: u8, wan_rate: &str) -> Net {
        require_root_and_tools();
        let prefix = format!("shl{tag}{}", std::process::id());
        let mut net = Net {
            prefix,
            namespaces: Vec::new(),
            children: Vec::new(),
        };
        net.add_ns("srv");
        net.add_ns("rtr");
        net.ip(
            "rtr",
            &["link", "add", "wan", "type", "veth", "peer", "name", "eth0"],
        );
        net.ip("rtr", &["link", "set", "eth0", "netns", &net.ns("srv")]);
        net.ip(
            "srv",
            &["addr", "add", &format!("{NET}.0.10/24"), "dev", "eth0"],
        );
        net.ip("srv", &["link", "set", "eth0", "up"]);
        net.ip(
            "srv",
            &["route", "add", "default", "via", &format!("{NET}.0.1")],
        );
        net.ip(
            "rtr",
            &["addr", "add", &format!("{NET}.0.1/24"), "dev", "wan"],
        );
        net.ip("rtr", &["link", "set", "wan", "up"]);
        net.exec("rtr", &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        for l in 1..=lans {
            let br = format!("br{l}");
            net.ip("rtr", &["link", "add", &br, "type", "bridge"]);
            net.ip(
                "rtr",
                &["addr", "add", &format!("{NET}.{l}.1/24"), "dev", &br],
            );
            net.ip("rtr", &["link", "set", &br, "up"]);
            for d in 1..=devices {
                net.add_device(l, d);
            }
        }
        // The WAN uplink: a token bucket each way (server -> site on the server's
        // side, site -> server on the router's).
        for (ns, dev) in [("srv", "eth0"), ("rtr", "wan")] {
            net.exec(
                ns,
                &[
                    "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", wan_rate, "burst",
                    "64kb", "latency", "300ms",
                ],
            );
        }
        net
    }

    /// Adds device namespace `d{lan}{n}` at `10.77.{lan}.{10+n}` on LAN `lan`.
    pub fn add_device(&mut self, lan: u8, n: u8) -> String {
        let name = format!("d{lan}{n}");
        self.add_ns(&name);
        self.ip(
            &name,
            &["link", "add", "eth0", "type", "veth", "peer", "name", "up0"],
        );
        self.ip(&name, &["link", "set", "up0", "netns", &self.ns("rtr")]);
        self.ip("rtr", &["link", "set", "up0", "name", &name]);
        self.ip(
            "rtr",
            &["link", "set", &name, "master", &format!("br{lan}"), "up"],
        );
        self.ip(
            &name,
            &[
                "addr",
                "add",
                &format!("{}/24", Net::addr(lan, n)),
                "dev",
                "eth0",
            ],
        );
        self.ip(&name, &["link", "set", "eth0", "up"]);
        self.ip(
            &name,
            &["route", "add", "default", "via", &format!("{NET}.{lan}.1")],
        );
        name
    }

    /// The address of device `n` on LAN `lan`.
    pub fn addr(lan: u8, n: u8) -> String {
        format!("{NET}.{lan}.{}", 10 + u16::from(n))
    }

    /// The full name of namespace `name`.
    pub fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    fn add_ns(&mut self, name: &str) {
        let ns = self.ns(name);
        sh(&["ip", "netns", "add", &ns]);
        self.namespaces.push(ns);
        self.ip(name, &["link", "set", "lo", "up"]);
    }

    fn ip(&self, ns: &str, args: &[&str]) {
        let full = self.ns(ns);
        let mut all = vec!["ip", "-n", &full];
        all.extend_from_slice(args);
        sh(&all);
    }

    /// Runs `args` in namespace `ns`; panics when it fails.
    pub fn exec(&self, ns: &str, args: &[&str]) -> Output {
        let full = self.ns(ns);
        let mut all = vec!["ip", "netns", "exec", &full];
        all.extend_from_slice(args);
        sh(&all)
    }

    /// A command that runs `program` in namespace `ns`.
    pub fn command(&self, ns: &str, program: &Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(ns)]).arg(program);
        cmd
    }

    /// Starts `cmd` (from [`Net::command`]) and keeps it, to be killed on drop;
    /// returns its index for [`Net::kill`] and [`Net::replace`].
    pub fn spawn(&mut self, mut cmd: Command) -> usize {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .expect("spawning a process in a namespace");
        self.children.push(child);
        self.children.len() - 1
    }

    /// Keeps `child` (started in a namespace) to be killed on drop.
    pub fn keep(&mut self, child: Child) -> usize {
        self.children.push(child);
        self.children.len() - 1
    }

    /// Kills (SIGKILL) process `i` and waits for it.
    pub fn kill(&mut self, i: usize) {
        let _ = self.children[i].kill();
        let _ = self.children[i].wait();
    }

    /// Starts `cmd` in place of (dead) process `i`.
    pub fn replace(&mut self, i: usize, mut cmd: Command) {
        self.children[i] = cmd
            .stdin(Stdio::null())
            .spawn()
            .expect("spawning a process in a namespace");
    }

    /// Counts the bytes the router forwards from the WAN: one counter per LAN
    /// (`lan1`, `lan2`, ...) for the devices' addresses except `excluded`, which
    /// have a counter of their own (`excluded`).
    pub fn count_wan(&self, lans: u8, excluded: &[String]) {
        let mut rules = String::new();
        if !excluded.is_empty() {
            rules.push_str(&format!(
                "    iifname \"wan\" ip daddr {{ {} }} counter name excluded accept\n",
                excluded.join(", ")
            ));
        }
        let mut counters = String::from("  counter excluded { }\n");
        for l in 1..=lans {
            counters.push_str(&format!("  counter lan{l} {{ }}\n"));
            rules.push_str(&format!(
                "    iifname \"wan\" oifname \"br{l}\" counter name lan{l}\n"
            ));
        }
        let table = format!(
            "table inet shoalwan {{\n{counters}  chain counting {{\n    type filter hook forward priority 0; policy accept;\n{rules}  }}\n}}\n"
        );
        let mut nft = Command::new("ip")
            .args(["netns", "exec", &self.ns("rtr"), "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run nft ({e}): install Debian's nftables"));
        nft.stdin
            .take()
            .expect("nft stdin")
            .write_all(table.as_bytes())
            .expect("write the nft table");
        let status = nft.wait().expect("nft");
        assert!(status.success(), "nft refused the counting table:\n{table}");
    }

    /// The bytes (IP packets, headers included) counter `name` has seen.
    pub fn counter(&self, name: &str) -> u64 {
        let out = self.exec("rtr", &["nft", "list", "counter", "inet", "shoalwan", name]);
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .skip_while(|w| *w != "bytes")
            .nth(1)
            .and_then(|b| b.parse().ok())
            .unwrap_or_else(|| panic!("no byte count in {text}"))
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}
