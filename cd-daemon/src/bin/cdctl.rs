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
        Cmd::Sync { content_set, json } => {
            let v = call(&cli.socket, Request::Sync { content_set })?;
            if json {
                out(&serde_json::to_string(&v)?)?;
            } else {
                out(&render_job(&v))?;
            }
            Ok(if v["ok"].as_bool() == Some(true) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
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
            s += &format!(
                "  node {:<16} {:<12} {}\n",
                n["name"].as_str().unwrap_or("?"),
                if n["connected"].as_bool() == Some(true) {
                    "connected"
                } else {
                    "DISCONNECTED"
                },
                n["data_addr"].as_str().unwrap_or("-")
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
                "  set {:<16} {} -> {}  ({last})\n",
                c["name"].as_str().unwrap_or("?"),
                c["source"].as_str().unwrap_or("?"),
                c["targets"]
            );
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
