//! A small network of network namespaces for clusters, faults and benchmarks: one
//! namespace per host, all joined by a bridge in a hub namespace, so that every byte
//! crosses a real interface whose kernel counters can be read, and so that links can
//! be shaped, delayed and cut one host pair at a time.
//!
//! ```text
//!   <p>-src    <p>-r1 … <p>-r8    <p>-aux        (one namespace per host, eth0 10.203.0.x/24)
//!      │          │          │         │
//!   vb-src     vb-r1 …    vb-r8     vb-aux       (veth peers, in <p>-hub, on bridge br0)
//!      └──────────┴────┬─────┴─────────┘
//!                     br0                         (<p>-hub)
//! ```
//!
//! - **Counters.** What a host sends is what its hub-side veth receives:
//!   [`Net::tx_bytes`] reads `rx_bytes` of `vb-<host>` in the hub namespace (L2 frames
//!   as the kernel counted them, headers included, nothing self-reported by the tools).
//! - **Rate.** [`Net::shape`] (every host) and [`Net::set_link`] (one host) put a
//!   token-bucket filter (`tbf`) on both ends of a host's link, so its uplink and
//!   downlink are limited to the rate separately, like a switch port.
//! - **Delay.** [`Net::set_link`] adds `netem` delay on the hub side of a host's link,
//!   i.e. to every packet the host *receives*; the round trip between hosts `a` and `b`
//!   is then `delay(a) + delay(b)`. It is on the hub side rather than in the host
//!   because a qdisc that holds packets in the sender's own stack stalls TCP Small
//!   Queues (the socket's bytes are not released until they leave the qdisc), whereas
//!   the veth crossing orphans them. With a rate too, `netem` is the root and `tbf` its
//!   child (the layout of the netem documentation): packets wait out the delay, then
//!   queue for the rate. Not every kernel has `netem` (`CONFIG_NET_SCH_NETEM`; this CI
//!   host's 6.18 lacks it): [`Net::netem_available`] says so, and [`Net::set_link`]
//!   fails with that reason when asked for a delay there.
//! - **Cuts.** [`Net::cut`] drops every IPv4 packet between two hosts, both ways,
//!   silently (no RST, no ICMP: a dead cable, not a refusing host), until
//!   [`Net::heal`]. It needs nothing but `tc`: in `a`'s namespace a `clsact` qdisc on
//!   `eth0` redirects packets to or from `b` (`u32` match) to an `ifb` device that is
//!   kept down, where the kernel drops them. Other pairs and the root qdisc (rate,
//!   delay) are untouched.
//!
//! Every namespace is deleted when the [`Net`] is dropped, and namespaces left with the
//! same prefix by a killed run are deleted before new ones are made, so two users of
//! this module side by side need different prefixes.

use std::ffi::OsStr;
use std::fs::File;
use std::net::Ipv4Addr;
use std::process::Command;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::cluster::Placement;
use crate::sys;

/// One host of the network.
#[derive(Debug, Clone)]
pub struct Host {
    /// Short name (`src`, `r1`, `node3`, …).
    pub name: String,
    /// Its network namespace.
    pub ns: String,
    /// Its address on the network.
    pub ip: Ipv4Addr,
    /// Its veth's peer in the hub namespace.
    hub_if: String,
}

impl Host {
    /// The name of its veth's peer in the hub namespace (`vb-<name>`).
    #[must_use]
    pub fn hub_if(&self) -> &str {
        &self.hub_if
    }

    /// `program` to be run in this host's namespace (`ip netns exec <ns> program`).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }

    /// Runs `f` on a new thread inside this host's namespace (sockets it opens stay
    /// there, whichever thread uses them later).
    pub fn spawn_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> thread::JoinHandle<Result<T>> {
        let path = format!("/run/netns/{}", self.ns);
        thread::spawn(move || {
            let ns = File::open(&path).with_context(|| format!("opening {path}"))?;
            sys::setns_net(&ns).with_context(|| format!("setns({path})"))?;
            f()
        })
    }

    /// Where a cdsync daemon runs on this host (for [`crate::cluster::ClusterSpec`]).
    #[must_use]
    pub fn placement(&self) -> Placement {
        Placement {
            ip: self.ip.into(),
            launcher: ["ip", "netns", "exec", &self.ns]
                .into_iter()
                .map(Into::into)
                .collect(),
        }
    }
}

/// How one host's link is shaped, see the module docs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Link {
    /// Rate limit in each direction, as `tc` takes it (`200mbit`, `1gbit`); `None`:
    /// unlimited.
    pub rate: Option<String>,
    /// Added to every packet the host receives (netem on the hub side).
    pub delay: Duration,
}

/// The namespaces, bridge and links; removed on drop.
#[derive(Debug)]
pub struct Net {
    prefix: String,
    hub: String,
    hosts: Vec<Host>,
}

/// Name of the always-down device that cut links' packets are redirected into.
const CUT_DEV: &str = "cut0";

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

    /// Every host, in the order they were created.
    #[must_use]
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The host called `name`.
    pub fn host(&self, name: &str) -> Result<&Host> {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .with_context(|| format!("no host {name} in network {}", self.prefix))
    }

    /// Limits every link to `rate` (a `tc` rate such as `1gbit`) in both directions,
    /// or removes the limits (`None`). Removes any delay.
    pub fn shape(&self, rate: Option<&str>) -> Result<()> {
        let link = Link {
            rate: rate.map(str::to_owned),
            delay: Duration::ZERO,
        };
        for h in &self.hosts {
            self.apply(h, &link)?;
        }
        Ok(())
    }

    /// Shapes host `name`'s link (replacing what was there), see the module docs.
    pub fn set_link(&self, name: &str, link: &Link) -> Result<()> {
        if !link.delay.is_zero()
            && let Some(why) = self.netem_missing()?
        {
            bail!("cannot delay {name}'s link: {why}");
        }
        self.apply(self.host(name)?, link)
    }

    fn apply(&self, h: &Host, link: &Link) -> Result<()> {
        // Host side (uplink): rate only, see the module docs.
        set_root(&h.ns, "eth0", link.rate.as_deref(), Duration::ZERO)?;
        set_root(&self.hub, &h.hub_if, link.rate.as_deref(), link.delay)
    }

    /// Whether this kernel has `netem`; `None` if so, else why not.
    pub fn netem_available(&self) -> Result<bool> {
        Ok(self.netem_missing()?.is_none())
    }

    fn netem_missing(&self) -> Result<Option<String>> {
        // A throwaway qdisc on the hub's loopback.
        let out = Command::new("tc")
            .args([
                "-n", &self.hub, "qdisc", "replace", "dev", "lo", "root", "netem", "delay", "1ms",
            ])
            .output()
            .context("running tc")?;
        if out.status.success() {
            run(
                "tc",
                &["-n", &self.hub, "qdisc", "del", "dev", "lo", "root"],
            )?;
            return Ok(None);
        }
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            err.contains("qdisc kind is unknown"),
            "probing netem: tc failed ({}): {}",
            out.status,
            err.trim()
        );
        Ok(Some(
            "this kernel has no netem qdisc (CONFIG_NET_SCH_NETEM)".to_owned(),
        ))
    }

    /// Drops every IPv4 packet between hosts `a` and `b`, both ways, until
    /// [`Net::heal`]; see the module docs.
    pub fn cut(&self, a: &str, b: &str) -> Result<()> {
        let (ha, hb, pref) = self.pair(a, b)?;
        let ns = ha.ns.as_str();
        if run("ip", &["-n", ns, "link", "show", "dev", CUT_DEV]).is_err() {
            // Created once, never brought up: a down device drops what is sent to it.
            run("ip", &["-n", ns, "link", "add", CUT_DEV, "type", "ifb"])?;
            run("tc", &["-n", ns, "qdisc", "add", "dev", "eth0", "clsact"])?;
        }
        let peer = format!("{}/32", hb.ip);
        for (hook, field) in [("egress", "dst"), ("ingress", "src")] {
            run(
                "tc",
                &[
                    "-n", ns, "filter", "add", "dev", "eth0", hook, "pref", &pref, "protocol",
                    "ip", "u32", "match", "ip", field, &peer, "action", "mirred", "egress",
                    "redirect", "dev", CUT_DEV,
                ],
            )
            .with_context(|| format!("cutting {a} from {b}"))?;
        }
        Ok(())
    }

    /// Undoes [`Net::cut`]`(a, b)` (fails if that link is not cut).
    pub fn heal(&self, a: &str, b: &str) -> Result<()> {
        let (ha, _, pref) = self.pair(a, b)?;
        for hook in ["egress", "ingress"] {
            run(
                "tc",
                &[
                    "-n", &ha.ns, "filter", "del", "dev", "eth0", hook, "pref", &pref,
                ],
            )
            .with_context(|| format!("healing the link between {a} and {b}"))?;
        }
        Ok(())
    }

    /// Hosts `a` and `b` and the filter priority of their cut (one per peer of `a`).
    fn pair(&self, a: &str, b: &str) -> Result<(&Host, &Host, String)> {
        ensure!(a != b, "cannot cut {a} from itself");
        let ha = self.host(a)?;
        let i = self
            .hosts
            .iter()
            .position(|h| h.name == b)
            .with_context(|| format!("no host {b} in network {}", self.prefix))?;
        Ok((ha, &self.hosts[i], (100 + i).to_string()))
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

/// Replaces the root qdisc of `dev` in `ns`: nothing, `tbf`, `netem`, or `netem` with a
/// `tbf` child.
fn set_root(ns: &str, dev: &str, rate: Option<&str>, delay: Duration) -> Result<()> {
    // The burst must hold a GSO super-packet (64 KiB) with room to spare, or a
    // TSO-sized frame can never pass the bucket.
    let tbf = |r: &str| -> Vec<String> {
        ["tbf", "rate", r, "burst", "1mb", "latency", "100ms"]
            .map(str::to_owned)
            .to_vec()
    };
    // Room for what is in flight during the delay at any rate this host reaches.
    let netem: Vec<String> = [
        "netem".to_owned(),
        "delay".to_owned(),
        format!("{}us", delay.as_micros()),
        "limit".to_owned(),
        "100000".to_owned(),
    ]
    .to_vec();
    let base = ["-n", ns, "qdisc", "replace", "dev", dev, "root"];
    let with = |tail: &[String]| -> Result<String> {
        let mut a: Vec<&str> = base.to_vec();
        a.extend(tail.iter().map(String::as_str));
        run("tc", &a)
    };
    match (rate, delay.is_zero()) {
        (None, true) => {
            // Absent already is fine.
            let _ = run("tc", &["-n", ns, "qdisc", "del", "dev", dev, "root"]);
        }
        (Some(r), true) => {
            with(&tbf(r))?;
        }
        (None, false) => {
            with(&netem)?;
        }
        (Some(r), false) => {
            // `replace` cannot turn a tbf root into a netem root with a handle; start
            // from nothing.
            let _ = run("tc", &["-n", ns, "qdisc", "del", "dev", dev, "root"]);
            let mut a = vec!["handle".to_owned(), "1:".to_owned()];
            a.extend(netem);
            with(&a)?;
            let mut c: Vec<&str> = vec![
                "-n", ns, "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:",
            ];
            let t = tbf(r);
            c.extend(t.iter().map(String::as_str));
            run("tc", &c)?;
        }
    }
    Ok(())
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
            eprintln!("netns: removing network namespaces: {e:#}");
        }
    }
}

/// Fails unless `ip netns` works here (root, iproute2).
pub fn check_available() -> Result<()> {
    if let Err(e) = run("ip", &["netns", "list"]) {
        bail!("namespace networks need root and iproute2 (`ip netns`): {e:#}");
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
