//! `cdctl`: the cdsync command line, over a daemon's local control socket.
//!
//! Exit codes: 0 success, 1 failure (including a sync in which any target failed),
//! 2 usage. A closed stdout (`cdctl status | head`) is not an error.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use cd_daemon::control::{self, Request};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cdctl", version, about = "cdsync control")]
struct Cli {
    /// The daemon's control socket.
    #[arg(short, long, global = true, default_value = "/var/lib/cdsync/cdd.sock")]
    socket: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Role, peers, content sets, last sync and errors.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Run a sync job now (scan the source, send differences to every target) and wait for it.
    Sync {
        /// Content set (optional when there is only one).
        content_set: Option<String>,
        /// Plan only (on the master): per target, the files that would be sent (whole
        /// or as deltas), removals and attribute-only changes. Nothing is sent or changed.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// The master's job log, newest first.
    Jobs {
        /// Only jobs of this content set.
        #[arg(long = "set")]
        content_set: Option<String>,
        /// At most this many jobs.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Only failed jobs.
        #[arg(long)]
        failed: bool,
        #[arg(long)]
        json: bool,
    },
    /// One job from the master's job log: its targets and the events around it.
    Job {
        id: u64,
        #[arg(long)]
        json: bool,
    },
    /// Per-node and per-link transfer statistics from the master's job log.
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// The farm's events from the master's job log, newest first: nodes up and down,
    /// reroutes, broken links, catch-ups.
    Events {
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Server monitoring (on the master): each node's newest sample (CPU, memory,
    /// load, disk of each content root, sessions), thresholds, checks, why it is
    /// routed around, and a summary of its sample history.
    Health {
        /// One node (default: every monitored node).
        node: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Alerts (on the master): those firing now, where they are sent, and the newest
    /// alert events (raised, resolved, undelivered) from the job log.
    Alerts {
        /// At most this many history entries.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// The route table of a content set (on the master): who sends to whom.
    Routes {
        /// Content set (optional when there is only one).
        content_set: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Deploy barrier (on the master): wait until every target of the content set
    /// holds what the source had at change set SEQ (default: the source's newest now).
    /// Exit 0 when consistent, 1 on timeout (the targets behind are listed).
    Wait {
        /// Content set (optional when there is only one).
        content_set: Option<String>,
        /// The source's change set to wait for (`cdctl status` on the source, or a
        /// sync job's `seq`); default: its newest now.
        #[arg(long)]
        seq: Option<u64>,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        #[arg(long)]
        json: bool,
    },
    /// Start the catch-up of recovered nodes that wait for a command (on the master).
    Catchup {
        /// One node (default: every node waiting). A node that is current gets a
        /// full reconcile from its parent all the same.
        node: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Join tokens (on the master).
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// The cluster certificate authority.
    Ca {
        #[command(subcommand)]
        cmd: CaCmd,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Print a one-time join token for one node.
    Create {
        #[arg(long, default_value_t = 3600)]
        ttl_seconds: u64,
    },
}

#[derive(Subcommand)]
enum CaCmd {
    /// Create the cluster CA and the master's certificate in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        master_name: String,
        /// Extra names or IP addresses for the master's certificate.
        #[arg(long)]
        san: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            if let Some(io) = e.downcast_ref::<std::io::Error>()
                && io.kind() == std::io::ErrorKind::BrokenPipe
            {
                return ExitCode::SUCCESS;
            }
            eprintln!("cdctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn out(s: &str) -> anyhow::Result<()> {
    let mut o = std::io::stdout().lock();
    o.write_all(s.as_bytes())?;
    o.write_all(b"\n")?;
    o.flush()?;
    Ok(())
}

fn call(socket: &std::path::Path, req: Request) -> anyhow::Result<serde_json::Value> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(rt.block_on(control::call(socket, &req))?)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Ca {
            cmd:
                CaCmd::Init {
                    dir,
                    master_name,
                    san,
                },
        } => {
            cd_daemon::config::check_name(&master_name).map_err(anyhow::Error::msg)?;
            cd_daemon::pki::ca_init(&dir, &master_name, &san).context("ca init")?;
            out(&format!(
                "created cluster CA and certificate for `{master_name}` in {}",
                dir.display()
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Token {
            cmd: TokenCmd::Create { ttl_seconds },
        } => {
            let v = call(&cli.socket, Request::TokenCreate { ttl_seconds })?;
            out(v["token"].as_str().context("no token in answer")?)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { json } => {
            let v = call(&cli.socket, Request::Status)?;
            if json {
                out(&serde_json::to_string_pretty(&v)?)?;
            } else {
                out(&render_status(&v))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Routes { content_set, json } => {
            let v = call(&cli.socket, Request::Routes { content_set })?;
            if json {
                out(&serde_json::to_string_pretty(&v)?)?;
            } else {
                out(&render_routes(&v))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Wait {
            content_set,
            seq,
            timeout,
            json,
        } => {
            let v = call(
                &cli.socket,
                Request::Wait {
                    content_set,
                    seq,
                    timeout_ms: timeout.saturating_mul(1000),
                },
            )?;
            let ok = v["consistent"].as_bool() == Some(true);
            // What was waited for: change set N, or per source of an N:M set.
            let (what, holds): (String, fn(&serde_json::Value) -> String) =
                match v["sources_seq"].as_object() {
                    Some(m) => (
                        format!(
                            "{} (per source)",
                            m.iter()
                                .map(|(s, q)| format!("{s}@{q}"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                        |h: &serde_json::Value| {
                            h.as_object()
                                .into_iter()
                                .flatten()
                                .map(|(s, q)| format!("{s}@{q}"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        },
                    ),
                    None => (
                        format!("change set {}", v["seq"]),
                        |h: &serde_json::Value| h["seq"].to_string(),
                    ),
                };
            if json {
                out(&serde_json::to_string(&v)?)?;
            } else if ok {
                out(&format!(
                    "consistent: all {} targets of {} hold {what} (waited {} ms)",
                    v["targets"],
                    v["content_set"].as_str().unwrap_or("?"),
                    v["waited_ms"]
                ))?;
            } else {
                let mut s = format!(
                    "NOT consistent after {} ms: targets behind {what} of {}:\n",
                    v["waited_ms"],
                    v["content_set"].as_str().unwrap_or("?")
                );
                for b in v["behind"].as_array().into_iter().flatten() {
                    s += &format!(
                        "  {:<16} holds {}{}\n",
                        b["target"].as_str().unwrap_or("?"),
                        if b["holds"].is_null() {
                            "nothing known".to_owned()
                        } else {
                            holds(&b["holds"])
                        },
                        if b["connected"].as_bool() == Some(true) {
                            ""
                        } else {
                            " (not connected)"
                        }
                    );
                }
                out(s.trim_end())?;
            }
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::Catchup { node, json } => {
            let v = call(&cli.socket, Request::CatchUp { node })?;
            if json {
                out(&serde_json::to_string(&v)?)?;
            } else {
                out(&format!("{} catch-up(s) started", v["started"]))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Sync {
            content_set,
            dry_run,
            json,
        } => {
            let v = call(
                &cli.socket,
                Request::Sync {
                    content_set,
                    dry_run,
                },
            )?;
            if json {
                out(&serde_json::to_string(&v)?)?;
            } else if dry_run {
                out(&render_dry_run(&v))?;
            } else {
                out(&render_job(&v))?;
            }
            Ok(if v["ok"].as_bool() == Some(true) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::Jobs {
            content_set,
            limit,
            failed,
            json,
        } => {
            let v = call(
                &cli.socket,
                Request::Jobs {
                    content_set,
                    limit,
                    failed,
                },
            )?;
            print_json_or(&v, json, render_jobs)
        }
        Cmd::Job { id, json } => {
            let v = call(&cli.socket, Request::Job { id })?;
            print_json_or(&v, json, render_logged_job)
        }
        Cmd::Stats { json } => {
            let v = call(&cli.socket, Request::Stats)?;
            print_json_or(&v, json, render_stats)
        }
        Cmd::Events { limit, json } => {
            let v = call(&cli.socket, Request::Events { limit })?;
            print_json_or(&v, json, render_events)
        }
        Cmd::Health { node, json } => {
            let v = call(&cli.socket, Request::Health { node })?;
            print_json_or(&v, json, render_health)
        }
        Cmd::Alerts { limit, json } => {
            let v = call(&cli.socket, Request::Alerts { limit })?;
            print_json_or(&v, json, render_alerts)
        }
    }
}

/// `cdctl health`: one block per node.
fn render_health(v: &serde_json::Value) -> String {
    let num = |x: &serde_json::Value, digits: usize| match x.as_f64() {
        Some(f) => format!("{f:.digits$}"),
        None => "-".into(),
    };
    let pct = |x: &serde_json::Value| match x.as_f64() {
        Some(f) => format!("{:.0}%", f * 100.0),
        None => "-".into(),
    };
    let mut s = format!(
        "monitor: every {} ms, service ports {}, icmp {}\n",
        v["interval_ms"],
        v["service_ports"],
        v["icmp"].as_bool().unwrap_or(false)
    );
    for n in v["nodes"].as_array().into_iter().flatten() {
        let degraded = n["degraded"].as_object().filter(|d| !d.is_empty());
        s += &format!(
            "{} (group {}): {}\n",
            n["node"].as_str().unwrap_or("?"),
            n["group"].as_str().unwrap_or("?"),
            match degraded {
                Some(d) => format!(
                    "DEGRADED, routed around: {}",
                    d.iter()
                        .map(|(c, why)| format!("{c} ({})", why.as_str().unwrap_or("")))
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
                None => "ok".into(),
            }
        );
        let x = &n["sample"];
        if n["monitored"] == false {
            s += "  no monitor (an older cdd): not judged silent, port checks only\n";
        } else if x.is_null() {
            s += "  no sample yet\n";
        } else {
            s += &format!(
                "  load {} {} {}  cpu {}  memory {}  sessions {}  ({} ms ago)\n",
                num(&x["load1"], 2),
                num(&x["load5"], 2),
                num(&x["load15"], 2),
                pct(&x["cpu_busy_ratio"]),
                pct(&x["memory_used_ratio"]),
                num(&x["sessions"], 0),
                x["age_ms"]
            );
            for d in x["disks"].as_array().into_iter().flatten() {
                s += &format!(
                    "  disk {}: {} used, {} MiB free\n",
                    d["content_set"].as_str().unwrap_or("?"),
                    pct(&d["used_ratio"]),
                    d["available_bytes"].as_u64().unwrap_or(0) >> 20
                );
            }
            for u in x["unavailable"].as_array().into_iter().flatten() {
                s += &format!("  unavailable: {}\n", u.as_str().unwrap_or(""));
            }
        }
        for t in n["thresholds"].as_array().into_iter().flatten() {
            s += &format!(
                "  threshold {} > {} (clear < {}, {}): {} (now {})\n",
                t["metric"].as_str().unwrap_or("?"),
                t["above"],
                t["clear_below"],
                t["action"].as_str().unwrap_or("?"),
                if t["firing"] == true { "FIRING" } else { "ok" },
                num(&t["value"], 2)
            );
        }
        for c in n["checks"].as_array().into_iter().flatten() {
            s += &format!(
                "  check {}: {}\n",
                c["check"].as_str().unwrap_or("?"),
                if c["ok"] == true {
                    "ok".to_owned()
                } else {
                    format!("FAILING {}", c["detail"].as_str().unwrap_or(""))
                }
            );
        }
        let h = &n["history"];
        if !h.is_null() {
            s += &format!(
                "  history: {} samples, load1 mean {} max {}, cpu max {}, disk max {}\n",
                h["samples"],
                num(&h["load1"]["mean"], 2),
                num(&h["load1"]["max"], 2),
                pct(&h["cpu_busy_ratio"]["max"]),
                pct(&h["disk_used_ratio"]["max"])
            );
        }
    }
    s.trim_end().to_owned()
}

/// `cdctl alerts`: what fires, the sinks, the history.
fn render_alerts(v: &serde_json::Value) -> String {
    let firing: Vec<&serde_json::Value> = v["firing"].as_array().into_iter().flatten().collect();
    let mut s = if firing.is_empty() {
        "no alert is firing\n".to_owned()
    } else {
        format!("{} firing:\n", firing.len())
    };
    for a in firing {
        let since = a["since_unix_ms"].as_i64().unwrap_or(0);
        let t = time::OffsetDateTime::from_unix_timestamp(since / 1000)
            .map(|t| {
                format!(
                    "{:04}-{:02}-{:02} {:02}:{:02}:{:02}Z",
                    t.year(),
                    u8::from(t.month()),
                    t.day(),
                    t.hour(),
                    t.minute(),
                    t.second()
                )
            })
            .unwrap_or_default();
        s += &format!(
            "  {:<8} {}  since {t}  {}\n",
            a["severity"].as_str().unwrap_or("?"),
            a["key"].as_str().unwrap_or("?"),
            a["summary"].as_str().unwrap_or("")
        );
    }
    let sinks: Vec<&str> = v["sinks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x.as_str())
        .collect();
    s += &format!(
        "sinks: {}\n",
        if sinks.is_empty() {
            "none (job log only)".to_owned()
        } else {
            sinks.join(", ")
        }
    );
    let history = render_events(&v["history"]);
    if !history.is_empty() {
        s += "history (newest first):\n";
        s += &history;
    }
    s.trim_end().to_owned()
}

fn render_events(v: &serde_json::Value) -> String {
    let mut s = String::new();
    for e in v.as_array().into_iter().flatten() {
        let at = e["at_unix_ms"].as_i64().unwrap_or(0);
        let t = time::OffsetDateTime::from_unix_timestamp(at / 1000)
            .map(|t| format!("{:02}:{:02}:{:02}Z", t.hour(), t.minute(), t.second()))
            .unwrap_or_default();
        s += &format!(
            "{t}  {:<18} {:<10} {:<8} {}\n",
            e["kind"].as_str().unwrap_or("?"),
            e["node"].as_str().unwrap_or("-"),
            e["content_set"].as_str().unwrap_or("-"),
            e["detail"].as_str().unwrap_or("")
        );
    }
    s.trim_end().to_owned()
}

/// The route tree, indented under the source.
fn render_routes(v: &serde_json::Value) -> String {
    let source = v["source"].as_str().unwrap_or("?");
    let edges: Vec<&serde_json::Value> = v["edges"].as_array().into_iter().flatten().collect();
    let mut s = format!(
        "content set {} ({} routing, catch-up {}), source {source} at change set {}\n",
        v["content_set"].as_str().unwrap_or("?"),
        v["routing"].as_str().unwrap_or("?"),
        v["catch_up"].as_str().unwrap_or("?"),
        v["source_seq"],
    );
    fn walk(
        s: &mut String,
        edges: &[&serde_json::Value],
        v: &serde_json::Value,
        node: &str,
        depth: usize,
    ) {
        for e in edges.iter().filter(|e| e["parent"].as_str() == Some(node)) {
            let child = e["child"].as_str().unwrap_or("?");
            let held = &v["held"][child];
            *s += &format!(
                "{:indent$}└─ {child:<16} {:<14} {:<18} {}/{}  holds {}\n",
                "",
                e["class"].as_str().unwrap_or("?"),
                e["kind"].as_str().unwrap_or("?"),
                e["region"].as_str().unwrap_or("?"),
                e["group"].as_str().unwrap_or("?"),
                if held.is_null() {
                    "?".to_owned()
                } else {
                    held["seq"].to_string()
                },
                indent = depth * 3
            );
            walk(s, edges, v, child, depth + 1);
        }
    }
    s += &format!("{source}\n");
    walk(&mut s, &edges, v, source, 0);
    for u in v["unreached"].as_array().into_iter().flatten() {
        s += &format!(
            "not routed: {} ({})\n",
            u["node"].as_str().unwrap_or("?"),
            u["reason"].as_str().unwrap_or("?")
        );
    }
    for r in v["rejected_routes"].as_array().into_iter().flatten() {
        s += &format!("manual route ignored: {}\n", r.as_str().unwrap_or("?"));
    }
    s
}

fn print_json_or(
    v: &serde_json::Value,
    json: bool,
    human: fn(&serde_json::Value) -> String,
) -> anyhow::Result<ExitCode> {
    if json {
        out(&serde_json::to_string_pretty(v)?)?;
    } else {
        out(&human(v))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn render_status(v: &serde_json::Value) -> String {
    let mut s = format!(
        "{} ({}) version {}\n",
        v["name"].as_str().unwrap_or("?"),
        v["roles"]
            .as_array()
            .map(|r| r
                .iter()
                .filter_map(|x| x.as_str())
                .collect::<Vec<_>>()
                .join("+"))
            .unwrap_or_default(),
        v["version"].as_str().unwrap_or("?")
    );
    s += &match v["metrics_addr"].as_str() {
        Some(a) => format!("metrics: http://{a}/metrics\n"),
        None => "metrics: off\n".to_owned(),
    };
    if let Some(l) = v["latency"].as_object() {
        s += &render_latency(l);
    }
    if let Some(m) = v["master"].as_object() {
        s += &format!(
            "master: listening on {}\n",
            m["listen"].as_str().unwrap_or("?")
        );
        for n in m["nodes"].as_array().into_iter().flatten() {
            // Health: `ok`, or the causes the monitor routes it around for.
            let health = match n["degraded"].as_object() {
                Some(d) if !d.is_empty() => {
                    format!(
                        "DEGRADED ({})",
                        d.keys().cloned().collect::<Vec<_>>().join(", ")
                    )
                }
                _ if n["connected"].as_bool() == Some(true) => "ok".to_owned(),
                _ => "-".to_owned(),
            };
            s += &format!(
                "  node {:<16} {:<12} {:<22} {}\n",
                n["name"].as_str().unwrap_or("?"),
                if n["connected"].as_bool() == Some(true) {
                    "connected"
                } else {
                    "DISCONNECTED"
                },
                n["data_addr"].as_str().unwrap_or("-"),
                health
            );
        }
        for c in m["content_sets"].as_array().into_iter().flatten() {
            let last = &c["last_job"];
            let last = if last.is_null() {
                "never synced".to_owned()
            } else {
                format!(
                    "last job {} {}",
                    last["job_id"],
                    if last["ok"].as_bool() == Some(true) {
                        "ok"
                    } else {
                        "FAILED"
                    }
                )
            };
            s += &format!(
                "  set {:<16} {} -> {}  {}  ({last})\n",
                c["name"].as_str().unwrap_or("?"),
                c["source"].as_str().unwrap_or("?"),
                c["targets"],
                c["mode"].as_str().unwrap_or("?"),
            );
            let sch = &c["schedule"];
            if sch.is_object() {
                let what = match (sch["cron"].as_str(), sch["every_seconds"].as_u64()) {
                    (Some(c), _) => format!("cron \"{c}\""),
                    (None, Some(n)) => format!("every {n}s"),
                    _ => "?".into(),
                };
                let next = match (sch["next_local"].as_str(), sch["next_unix"].as_i64()) {
                    (Some(l), Some(u)) => format!("next run {l} ({u})"),
                    _ => "no next run".into(),
                };
                let running = sch["running_job"]
                    .as_u64()
                    .map(|j| format!(", job {j} running"))
                    .unwrap_or_default();
                s += &format!("    schedule: {what}, {next}{running}\n");
            }
            s += &render_filter(&c["filter"]);
        }
    }
    if let Some(n) = v["node"].as_object() {
        s += &format!(
            "node: master {} ({}), data {}\n",
            n["master_addr"].as_str().unwrap_or("?"),
            if n["master_connected"].as_bool() == Some(true) {
                "connected"
            } else {
                "DISCONNECTED"
            },
            n["data_addr"].as_str().unwrap_or("?")
        );
        for c in n["content_sets"].as_array().into_iter().flatten() {
            let role = match c["is_source"].as_bool() {
                Some(true) => "source",
                Some(false) => "replica",
                None => "unassigned",
            };
            let last = &c["last_sync"];
            let last = if last.is_null() {
                "no sync yet".to_owned()
            } else {
                format!(
                    "last {} job {} {} ({} files, {} bytes, {} ms){}",
                    last["side"].as_str().unwrap_or("?"),
                    last["job_id"],
                    if last["ok"].as_bool() == Some(true) {
                        "ok"
                    } else {
                        "FAILED"
                    },
                    last["files"],
                    last["bytes"],
                    last["duration_ms"],
                    last["error"]
                        .as_str()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                )
            };
            s += &format!(
                "  set {:<16} {role:<10} {}  {last}\n",
                c["name"].as_str().unwrap_or("?"),
                c["root"].as_str().unwrap_or("?")
            );
            s += &render_filter(&c["filter"]);
        }
    }
    for e in v["errors"].as_array().into_iter().flatten() {
        s += &format!("error: {}\n", e.as_str().unwrap_or("?"));
    }
    s.trim_end().to_owned()
}

/// The change-to-replica latency line (quantiles since the daemon started).
fn render_latency(l: &serde_json::Map<String, serde_json::Value>) -> String {
    let n = l
        .get("count")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    if n == 0 {
        return "latency: change -> replica: no real-time change applied yet\n".to_owned();
    }
    let q = |k: &str| {
        l.get(k)
            .and_then(serde_json::Value::as_f64)
            .map_or("?".to_owned(), |ms| format!("{ms:.1} ms"))
    };
    format!(
        "latency: change -> replica: p50 {}  p90 {}  p99 {}  max {}  ({n} applies)\n",
        q("p50_ms"),
        q("p90_ms"),
        q("p99_ms"),
        q("max_ms")
    )
}

/// A `    filter: ...` line for a content set's filter, or nothing when it filters nothing.
fn render_filter(f: &serde_json::Value) -> String {
    let list = |key: &str| {
        let v: Vec<&str> = f[key]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p.as_str())
            .collect();
        (!v.is_empty()).then(|| format!("{key} {}", v.join(" ")))
    };
    let denied: Vec<&str> = ["create", "update", "delete", "move", "erase"]
        .into_iter()
        .filter(|c| f["commands"][*c].as_bool() == Some(false))
        .collect();
    let parts: Vec<String> = [
        list("include"),
        list("exclude"),
        (!denied.is_empty()).then(|| format!("no {}", denied.join(", no "))),
    ]
    .into_iter()
    .flatten()
    .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("    filter: {}\n", parts.join("; "))
    }
}

fn render_job(v: &serde_json::Value) -> String {
    let mut s = format!(
        "job {} `{}` seq {}: {} ({} entries, scan {} ms)\n",
        v["job_id"],
        v["content_set"].as_str().unwrap_or("?"),
        v["seq"],
        if v["ok"].as_bool() == Some(true) {
            "ok"
        } else {
            "FAILED"
        },
        v["source_entries"],
        v["scan_ms"]
    );
    if let Some(e) = v["error"].as_str().filter(|e| !e.is_empty()) {
        s += &format!("  error: {e}\n");
    }
    for t in v["targets"].as_array().into_iter().flatten() {
        s += &format!(
            "  {:<16} {:<6} sent {} files / {} bytes ({} on the wire), reused {}, removed {}, attrs {}, {} ms{}\n",
            t["target"].as_str().unwrap_or("?"),
            if t["ok"].as_bool() == Some(true) {
                "ok"
            } else {
                "FAILED"
            },
            t["files_sent"],
            t["bytes_sent"],
            t["wire_bytes"],
            t["reused_local"],
            t["removed"],
            t["meta_only"],
            t["duration_ms"],
            t["error"]
                .as_str()
                .filter(|e| !e.is_empty())
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
    }
    s.trim_end().to_owned()
}

/// Unix milliseconds as UTC `YYYY-MM-DD HH:MM:SS`.
fn when(ms: &serde_json::Value) -> String {
    match ms.as_i64() {
        Some(ms) => {
            let w = cd_core::schedule::Zone::to_wall(&cd_core::schedule::Utc, ms.div_euclid(1000));
            format!(
                "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
                w.year, w.month, w.day, w.hour, w.minute, w.second
            )
        }
        None => "-".into(),
    }
}

/// Rows of cells as a table whose columns are as wide as their widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l += c;
            } else {
                l += &format!("{c:<w$}  ", w = width[i]);
            }
        }
        l.trim_end().to_owned() + "\n"
    };
    let mut s = line(header.to_vec());
    for r in rows {
        s += &line(r.iter().map(String::as_str).collect());
    }
    s
}

fn num(v: &serde_json::Value) -> String {
    v.as_i64()
        .map(|n| n.to_string())
        .or_else(|| v.as_u64().map(|n| n.to_string()))
        .unwrap_or_else(|| "-".into())
}

fn render_jobs(v: &serde_json::Value) -> String {
    let jobs = v.as_array().map(Vec::as_slice).unwrap_or_default();
    if jobs.is_empty() {
        return "no jobs".into();
    }
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                num(&j["job_id"]),
                j["kind"].as_str().unwrap_or("?").into(),
                j["content_set"].as_str().unwrap_or("?").into(),
                j["source"].as_str().unwrap_or("?").into(),
                j["state"].as_str().unwrap_or("?").to_uppercase(),
                when(&j["started_unix_ms"]),
                num(&j["duration_ms"]),
                format!(
                    "{}/{}",
                    j["target_count"].as_i64().unwrap_or(0)
                        - j["targets_failed"].as_i64().unwrap_or(0),
                    num(&j["target_count"])
                ),
                num(&j["files"]),
                num(&j["bytes"]),
                j["error"].as_str().unwrap_or("").into(),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "KIND",
            "SET",
            "SOURCE",
            "STATE",
            "STARTED (UTC)",
            "MS",
            "OK/TARGETS",
            "FILES",
            "BYTES",
            "ERROR",
        ],
        &rows,
    )
    .trim_end()
    .to_owned()
}

fn render_logged_job(v: &serde_json::Value) -> String {
    let mut s = format!(
        "job {} {} `{}` from {}: {} (seq {}, {} entries, scan {} ms)\n  started {} UTC, {} ms\n",
        num(&v["job_id"]),
        v["kind"].as_str().unwrap_or("?"),
        v["content_set"].as_str().unwrap_or("?"),
        v["source"].as_str().unwrap_or("?"),
        v["state"].as_str().unwrap_or("?").to_uppercase(),
        num(&v["seq"]),
        num(&v["source_entries"]),
        num(&v["scan_ms"]),
        when(&v["started_unix_ms"]),
        num(&v["duration_ms"]),
    );
    if let Some(e) = v["error"].as_str().filter(|e| !e.is_empty()) {
        s += &format!("  error: {e}\n");
    }
    let rows: Vec<Vec<String>> = v["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            vec![
                t["target"].as_str().unwrap_or("?").into(),
                t["via"].as_str().unwrap_or("?").into(),
                if t["ok"] == true {
                    "ok".into()
                } else {
                    "FAILED".into()
                },
                num(&t["files_sent"]),
                num(&t["bytes_sent"]),
                num(&t["wire_bytes"]),
                num(&t["delta_files"]),
                num(&t["removed"]),
                num(&t["meta_only"]),
                num(&t["duration_ms"]),
                t["error"].as_str().unwrap_or("").into(),
            ]
        })
        .collect();
    if !rows.is_empty() {
        s += &table(
            &[
                "  TARGET", "VIA", "RESULT", "FILES", "BYTES", "WIRE", "DELTAS", "REMOVED",
                "ATTRS", "MS", "ERROR",
            ],
            &rows
                .into_iter()
                .map(|mut r| {
                    r[0] = format!("  {}", r[0]);
                    r
                })
                .collect::<Vec<_>>(),
        );
    }
    for t in v["targets"].as_array().into_iter().flatten() {
        if t["planned"].is_object() {
            s += &render_plan(t["target"].as_str().unwrap_or("?"), &t["planned"]);
        }
    }
    for e in v["events"].as_array().into_iter().flatten() {
        s += &format!(
            "  event {} UTC {} {}{}: {}\n",
            when(&e["at_unix_ms"]),
            e["kind"].as_str().unwrap_or("?"),
            e["node"].as_str().unwrap_or("-"),
            e["job_id"]
                .as_u64()
                .map(|j| format!(" (job {j})"))
                .unwrap_or_default(),
            e["detail"].as_str().unwrap_or(""),
        );
    }
    s.trim_end().to_owned()
}

fn render_stats(v: &serde_json::Value) -> String {
    let mut s = format!(
        "{} jobs in the log, {} failed\n\nnodes:\n",
        num(&v["jobs"]),
        num(&v["failed_jobs"])
    );
    let rows: Vec<Vec<String>> = v["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| {
            vec![
                format!("  {}", n["name"].as_str().unwrap_or("?")),
                num(&n["jobs"]),
                num(&n["bytes_received"]),
                num(&n["failures"]),
                when(&n["last_ok_unix_ms"]),
                num(&n["jobs_as_source"]),
            ]
        })
        .collect();
    s += &table(
        &[
            "  NODE",
            "RECEIVED",
            "BYTES",
            "FAILURES",
            "LAST OK (UTC)",
            "AS SOURCE",
        ],
        &rows,
    );
    s += "\nlinks:\n";
    let rows: Vec<Vec<String>> = v["links"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| {
            vec![
                format!(
                    "  {} -> {}",
                    l["via"].as_str().unwrap_or("?"),
                    l["target"].as_str().unwrap_or("?")
                ),
                l["link_class"]
                    .as_str()
                    .filter(|c| !c.is_empty())
                    .unwrap_or("-")
                    .into(),
                num(&l["transfers"]),
                num(&l["bytes"]),
                num(&l["wire_bytes"]),
                num(&l["failures"]),
                num(&l["mean_duration_ms"]),
            ]
        })
        .collect();
    s += &table(
        &[
            "  LINK",
            "CLASS",
            "TRANSFERS",
            "BYTES",
            "WIRE",
            "FAILURES",
            "MEAN MS",
        ],
        &rows,
    );
    s.trim_end().to_owned()
}

/// One target's dry-run plan.
fn render_plan(target: &str, p: &serde_json::Value) -> String {
    let mut s = format!(
        "  {target}: would send {} files / {} bytes, remove {}, set attributes of {}, reuse {} local, create {} directories\n",
        num(&p["files_count"]),
        num(&p["files_bytes"]),
        num(&p["removed_count"]),
        num(&p["meta_only_count"]),
        num(&p["reused_local"]),
        num(&p["created_dirs"]),
    );
    for f in p["files"].as_array().into_iter().flatten() {
        s += &format!(
            "    send   {} ({} bytes, {})\n",
            f["path"].as_str().unwrap_or("?"),
            num(&f["size"]),
            if f["delta"] == true { "delta" } else { "whole" }
        );
    }
    for r in p["removed"].as_array().into_iter().flatten() {
        s += &format!("    remove {}\n", r.as_str().unwrap_or("?"));
    }
    for m in p["meta_only"].as_array().into_iter().flatten() {
        s += &format!("    attrs  {}\n", m.as_str().unwrap_or("?"));
    }
    if p["truncated"] == true {
        s += "    (lists cut short; the counts are complete)\n";
    }
    s
}

fn render_dry_run(v: &serde_json::Value) -> String {
    let mut s = format!(
        "dry run (job {}) `{}`: {} ({} entries, scan {} ms); nothing was sent or changed\n",
        num(&v["job_id"]),
        v["content_set"].as_str().unwrap_or("?"),
        if v["ok"] == true { "ok" } else { "FAILED" },
        num(&v["source_entries"]),
        num(&v["scan_ms"]),
    );
    if let Some(e) = v["error"].as_str().filter(|e| !e.is_empty()) {
        s += &format!("  error: {e}\n");
    }
    if v["routes"].is_object() {
        s += "routes:\n";
        for line in render_routes(&v["routes"]).lines() {
            s += &format!("  {line}\n");
        }
    }
    for t in v["targets"].as_array().into_iter().flatten() {
        let name = t["target"].as_str().unwrap_or("?");
        if t["planned"].is_object() {
            s += &render_plan(name, &t["planned"]);
        } else {
            s += &format!("  {name}: FAILED: {}\n", t["error"].as_str().unwrap_or("?"));
        }
    }
    s.trim_end().to_owned()
}
