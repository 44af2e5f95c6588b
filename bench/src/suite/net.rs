//! The bench's own small network: one network namespace per host, all joined by a
//! bridge in a hub namespace, so that every tool's bytes cross a real interface whose
//! kernel counters can be read.
//!
//! ```text
//!   <p>-src    <p>-r1 … <p>-r8    <p>-aux        (one namespace per host, eth0 10.203.0.x/24)
//!      │          │          │         │
//!   vb-src     vb-r1 …    vb-r8     vb-aux       (veth peers, in <p>-hub, on bridge br0)
//!      └──────────┴────┬─────┴─────────┘
//!                     br0                         (<p>-hub)
//! ```
//!
//! What a host sends is what its hub-side veth receives: [`Net::tx_bytes`] reads
//! `rx_bytes` of `vb-<host>` in the hub namespace (L2 frames as the kernel counted
//! them, headers included, nothing self-reported by the tools). [`Net::shape`] puts a
//! token-bucket filter on both ends of every host's link, so each host's uplink and
//! downlink are limited to the rate separately, like a switch port.
//!
//! Every namespace is deleted when the [`Net`] is dropped, and namespaces left with the
//! same prefix by a killed run are deleted before new ones are made.

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

/// One host of the bench network.
#[derive(Debug, Clone)]
pub struct Host {
    /// Short name (`src`, `r1`, …, `aux`).
    pub name: String,
    /// Its network namespace.
    pub ns: String,
    /// Its address on the bench network.
    pub ip: Ipv4Addr,
    /// Its veth's peer in the hub namespace.
    hub_if: String,
}

/// The namespaces, bridge and links; removed on drop.
#[derive(Debug)]
pub struct Net {
    prefix: String,
    hub: String,
    hosts: Vec<Host>,
}

/// Runs `ip`/`tc` (or anything) and fails with its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    ensure!(
        out.status.success(),
        "{program} {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Net {
    /// Creates the hub and one host per name (addresses 10.203.0.10, .11, … in order).
    pub fn create(prefix: &str, names: &[&str]) -> Result<Self> {
        ensure!(names.len() < 200, "too many hosts");
        remove_stale(prefix)?;
        let hub = format!("{prefix}-hub");
        let mut net = Self {
            prefix: prefix.to_owned(),
            hub: hub.clone(),
            hosts: Vec::new(),
        };
        run("ip", &["netns", "add", &hub])?;
        run("ip", &["-n", &hub, "link", "set", "lo", "up"])?;
        run("ip", &["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        run("ip", &["-n", &hub, "link", "set", "br0", "up"])?;
        for (i, name) in names.iter().enumerate() {
            let ns = format!("{prefix}-{name}");
            let hub_if = format!("vb-{name}");
            ensure!(hub_if.len() <= 15, "interface name too long: {hub_if}");
            let ip = Ipv4Addr::new(10, 203, 0, 10 + u8::try_from(i)?);
            run("ip", &["netns", "add", &ns])?;
            run(
                "ip",
                &[
                    "link", "add", &hub_if, "netns", &hub, "type", "veth", "peer", "name", "eth0",
                    "netns", &ns,
                ],
            )?;
            run(
                "ip",
                &["-n", &hub, "link", "set", &hub_if, "master", "br0", "up"],
            )?;
            run(
                "ip",
                &["-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
            )?;
            run("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
            run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
            net.hosts.push(Host {
                name: (*name).to_owned(),
                ns,
                ip,
                hub_if,
            });
        }
        Ok(net)
    }

    /// The prefix of the namespaces' names (also names the runs' cgroups, so that two
    /// benches side by side never touch each other's processes).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The host called `name`.
    pub fn host(&self, name: &str) -> Result<&Host> {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .with_context(|| format!("no bench host {name}"))
    }

    /// Limits every link to `rate` (a `tc` rate such as `1gbit`) in both directions,
    /// or removes the limits (`None`).
    pub fn shape(&self, rate: Option<&str>) -> Result<()> {
        for h in &self.hosts {
            for (ns, dev) in [(h.ns.as_str(), "eth0"), (self.hub.as_str(), &h.hub_if)] {
                match rate {
                    // The burst must hold a GSO super-packet (64 KiB) with room to spare,
                    // or a TSO-sized frame can never pass the bucket.
                    Some(r) => run(
                        "tc",
                        &[
                            "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", r,
                            "burst", "1mb", "latency", "100ms",
                        ],
                    )?,
                    None => {
                        // Absent already is fine.
                        let _ = run("tc", &["-n", ns, "qdisc", "del", "dev", dev, "root"]);
                        String::new()
                    }
                };
            }
        }
        Ok(())
    }

    /// Bytes host `h` has sent so far (its hub-side veth's received bytes).
    pub fn tx_bytes(&self, h: &Host) -> Result<u64> {
        let out = run(
            "ip",
            &[
                "-n", &self.hub, "-s", "-j", "link", "show", "dev", &h.hub_if,
            ],
        )?;
        let v: Value = serde_json::from_str(&out).context("parsing `ip -j -s link` output")?;
        v[0]["stats64"]["rx"]["bytes"]
            .as_u64()
            .with_context(|| format!("no rx byte counter for {} in: {out}", h.hub_if))
    }

    /// Bytes sent by every host so far.
    pub fn total_tx_bytes(&self) -> Result<u64> {
        self.hosts.iter().map(|h| self.tx_bytes(h)).sum()
    }

    /// Whether something in `h`'s namespace listens on TCP `port` (`/proc/net/tcp` as
    /// seen from inside).
    pub fn listening(&self, h: &Host, port: u16) -> Result<bool> {
        let out = run("ip", &["netns", "exec", &h.ns, "cat", "/proc/net/tcp"])?;
        Ok(tcp_listens(&out, port))
    }
}

/// Whether `/proc/net/tcp` text shows a socket in state LISTEN on `port`.
fn tcp_listens(proc_net_tcp: &str, port: u16) -> bool {
    proc_net_tcp.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3
            && f[3] == "0A"
            && f[1]
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                == Some(port)
    })
}

fn remove_stale(prefix: &str) -> Result<()> {
    let list = run("ip", &["netns", "list"])?;
    for line in list.lines() {
        let Some(ns) = line.split_whitespace().next() else {
            continue;
        };
        if ns.starts_with(&format!("{prefix}-")) {
            run("ip", &["netns", "del", ns])?;
        }
    }
    Ok(())
}

impl Drop for Net {
    fn drop(&mut self) {
        for h in &self.hosts {
            let _ = run("ip", &["netns", "del", &h.ns]);
        }
        let _ = run("ip", &["netns", "del", &self.hub]);
        if let Err(e) = remove_stale(&self.prefix) {
            eprintln!("bench: removing network namespaces: {e:#}");
        }
    }
}

/// Fails unless `ip netns` works here (root, iproute2).
pub fn check_available() -> Result<()> {
    if let Err(e) = run("ip", &["netns", "list"]) {
        bail!("the side-by-side bench needs root and iproute2 (`ip netns`): {e:#}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_listeners_in_proc_net_tcp() {
        let t = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000:0371 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n\
   1: 0A00CB0A:9C40 0A00CB0B:0016 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1\n";
        assert!(tcp_listens(t, 0x371));
        assert!(!tcp_listens(t, 0x9C40), "established, not listening");
        assert!(!tcp_listens(t, 22));
    }
}
