//! The cdsync daemon (`cdd`) and its CLI (`cdctl`).
//!
//! This crate does the I/O: configuration files, the cluster's TLS identity, the
//! master and node roles, framed connections, scanning and applying trees, and the
//! control socket. Protocol types and algorithms live in `cd-proto` and `cd-core`;
//! nothing here decides *what* a replica should hold, only carries it out.
//!
//! Start-up follows one direction: [`config::load`] (pure validation) →
//! [`config::Config::resolve`] (against this machine) → [`run`] (bind sockets, start
//! roles). A configuration problem is reported before anything is bound.

pub mod alert;
pub mod config;
pub mod control;
pub mod delta;
pub mod fs;
pub mod joblog;
pub mod link;
pub mod localtime;
pub mod master;
pub mod metrics;
pub mod monitor;
pub mod net;
pub mod nm;
pub mod node;
pub mod pki;
pub mod realtime;
pub mod relay;
pub mod routing;
pub mod sendfile;
pub mod shipped;
pub mod transfer;
pub mod watch;

use std::sync::Arc;

use control::{Handler, Request};

/// A running daemon: its roles, reachable from the control socket.
#[derive(Debug)]
pub struct Daemon {
    pub config: config::Config,
    pub master: Option<Arc<master::Master>>,
    pub node: Option<Arc<node::Node>>,
    /// Where `/metrics` is served (`None`: `metrics_listen = "off"`).
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl Handler for Daemon {
    async fn handle(self: Arc<Self>, req: Request) -> Result<serde_json::Value, String> {
        match req {
            Request::Status => Ok(self.status()),
            Request::Sync {
                content_set,
                dry_run,
            } => match (&self.master, &self.node) {
                (Some(m), _) => {
                    let kind = if dry_run {
                        joblog::JobKind::DryRun
                    } else {
                        joblog::JobKind::Sync
                    };
                    m.run_job(content_set.as_deref(), kind)
                        .await
                        .map_err(|e| format!("{e:#}"))
                }
                (None, Some(_)) if dry_run => {
                    Err("dry runs are started on the master (cdctl sync --dry-run there)".into())
                }
                (None, Some(n)) => {
                    let set = match content_set {
                        Some(s) => s,
                        None => n.single_set().map_err(|e| format!("{e:#}"))?,
                    };
                    let r = n.run_job(&set, 0).await;
                    Ok(master::report_json(&r))
                }
                (None, None) => Err("no role".into()),
            },
            Request::Routes { content_set } => match &self.master {
                Some(m) => m
                    .routes_json(content_set.as_deref())
                    .map_err(|e| format!("{e:#}")),
                None => Err("routes are computed by the master".into()),
            },
            Request::Wait {
                content_set,
                seq,
                timeout_ms,
            } => match &self.master {
                Some(m) => m
                    .wait_consistent(
                        content_set.as_deref(),
                        seq,
                        std::time::Duration::from_millis(timeout_ms),
                    )
                    .await
                    .map_err(|e| format!("{e:#}")),
                None => Err("the deploy barrier runs on the master".into()),
            },
            Request::CatchUp { node } => match &self.master {
                Some(m) => m
                    .catch_up_command(node.as_deref())
                    .map_err(|e| format!("{e:#}")),
                None => Err("catch-ups are started on the master".into()),
            },
            Request::TokenCreate { ttl_seconds } => match &self.master {
                Some(m) => m.create_token(ttl_seconds).map_err(|e| format!("{e:#}")),
                None => Err("join tokens are created on the master".into()),
            },
            Request::Jobs {
                content_set,
                limit,
                failed,
            } => {
                let q = joblog::JobQuery {
                    content_set,
                    limit,
                    failed,
                };
                self.master()?.jobs(q).await.map_err(|e| format!("{e:#}"))
            }
            Request::Job { id } => self.master()?.job(id).await.map_err(|e| format!("{e:#}")),
            Request::Stats => self.master()?.stats().await.map_err(|e| format!("{e:#}")),
            Request::Events { limit } => self
                .master()?
                .events(limit)
                .await
                .map_err(|e| format!("{e:#}")),
            Request::Health { node } => self
                .master()?
                .health_json(node.as_deref())
                .await
                .map_err(|e| format!("{e:#}")),
            Request::Alerts { limit } => self
                .master()?
                .alerts_json(limit)
                .await
                .map_err(|e| format!("{e:#}")),
        }
    }
}

impl Daemon {
    /// The master role, or the error a request for it gets on a node.
    fn master(&self) -> Result<&Arc<master::Master>, String> {
        self.master
            .as_ref()
            .ok_or_else(|| "the job log is on the master: use the master's control socket".into())
    }

    pub fn status(&self) -> serde_json::Value {
        let mut errors: Vec<String> = Vec::new();
        let node = self.node.as_ref().map(|n| {
            let s = n.status();
            if let Some(e) = s["errors"].as_array() {
                errors.extend(e.iter().filter_map(|v| v.as_str().map(str::to_owned)));
            }
            s
        });
        serde_json::json!({
            "name": self.config.name,
            "roles": self.config.roles(),
            "version": cd_proto::SOFTWARE_VERSION,
            "control_socket": self.config.control_socket,
            "metrics_addr": self.metrics_addr.map(|a| a.to_string()),
            "latency": self.node.as_ref().map(|_| metrics::get().latency_json()),
            "master": self.master.as_ref().map(|m| m.status()),
            "node": node,
            "errors": errors,
        })
    }
}

/// What `/metrics` serves: the daemon's registry, with the gauges that mirror role
/// state sampled first.
#[derive(Debug)]
struct Exporter {
    daemon: Arc<Daemon>,
    registry: prometheus_client::registry::Registry,
}

impl metrics::http::Source for Exporter {
    fn render(&self, openmetrics: bool) -> String {
        metrics::refresh(&self.daemon);
        metrics::encode(&self.registry, openmetrics)
    }
}

/// Starts every configured role and serves the control socket until SIGINT/SIGTERM.
pub async fn run(cfg: config::Config) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&cfg.state_dir)
        .with_context(|| format!("create state_dir {}", cfg.state_dir.display()))?;
    let listener = control::bind(&cfg.control_socket)?;
    let metrics_listener = match cfg.metrics_listen {
        Some(addr) => Some(
            metrics::http::bind(addr)
                .await
                .with_context(|| format!("bind metrics_listen {addr}"))?,
        ),
        None => None,
    };
    let metrics_addr = match &metrics_listener {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    let master = match cfg.master {
        Some(_) => Some(master::Master::start(&cfg).await?),
        None => None,
    };
    let node = match cfg.node {
        Some(_) => Some(node::Node::start(&cfg).await?),
        None => None,
    };
    let socket = cfg.control_socket.clone();
    let daemon = Arc::new(Daemon {
        config: cfg,
        master,
        node,
        metrics_addr,
    });
    tracing::info!(socket = %socket.display(), metrics = ?metrics_addr, roles = ?daemon.config.roles(), "cdd ready");
    tokio::spawn(control::serve(listener, daemon.clone()));
    if let Some(l) = metrics_listener {
        let registry = metrics::get().registry(metrics::Roles {
            master: daemon.master.is_some(),
            node: daemon.node.is_some(),
        });
        let exporter = Arc::new(Exporter {
            daemon: daemon.clone(),
            registry,
        });
        tokio::spawn(metrics::http::serve(l, exporter));
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    if let Some(node) = &daemon.node {
        node.shutdown().await;
    }
    let _ = std::fs::remove_file(&socket);
    Ok(())
}
