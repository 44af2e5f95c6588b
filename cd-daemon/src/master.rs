//! The master role: cluster membership, assignments and sync jobs.
//!
//! One TLS listener serves two kinds of peer:
//! - a node with a cluster certificate opens a control session (`Hello` purpose
//!   CONTROL, then `Register`); the master keeps it in its node table, sends it its
//!   [`Assignment`](pb::Assignment) (and re-sends every node's whenever a data address
//!   changes), dispatches sync jobs to sources and collects their reports. Every
//!   content set's assignment carries its filter, to the source and to the targets
//!   alike: both ends apply it;
//! - a node without a certificate may only ask to join (`JoinRequest` with a one-time
//!   token). Anything else from it is refused and logged; so is a peer whose
//!   certificate does not chain to the cluster CA (refused in the TLS handshake).
//!
//! The master is not on the data path: content flows from source to replicas
//! directly. Jobs, their per-target results and cluster events go to the SQLite job
//! log ([`crate::joblog`]); running jobs and schedules is in [`jobs`].

mod health;
mod icmp;
mod jobs;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cd_proto::pb::{self, envelope::Msg};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::TlsAcceptor;

use crate::alert::{Alert, Alerts, Severity};
use crate::config::{Config, MasterConfig};
use crate::joblog::JobLog;
use crate::net::{self, ServerConn};
use crate::node::now_unix;
use crate::pki::{self, CaSigner, Identity, TokenStore};
use crate::routing::{Farm, FarmEvent, class_name};

/// How long `cdctl sync` waits for a job.
const JOB_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// A node silent for this long is dropped.
const SESSION_IDLE: Duration = Duration::from_secs(30);

#[derive(Debug)]
struct Session {
    id: u64,
    data_addr: String,
    tx: mpsc::Sender<Msg>,
    connected_unix: i64,
}

/// Farm events kept in memory for `cdctl status` (the job log keeps them all).
const EVENT_HISTORY: usize = 200;

#[derive(Debug)]
struct State {
    /// Topology, health, progress and the routes computed from them.
    farm: Farm,
    /// The last farm events, newest last.
    events: VecDeque<serde_json::Value>,
    sessions: BTreeMap<String, Session>,
    next_session: u64,
    pending: HashMap<u64, (String, oneshot::Sender<pb::JobReport>)>,
    /// The last finished job of each content set (JSON, for `status`).
    last: BTreeMap<String, serde_json::Value>,
    /// Monitor samples, thresholds and checks of the connected nodes.
    health: health::HealthBook,
    /// N:M conflicts already logged (set, path, winner, loser), bounded.
    conflicts_seen: std::collections::HashSet<String>,
}

#[derive(Debug)]
pub struct Master {
    name: String,
    cfg: MasterConfig,
    listen: SocketAddr,
    signer: CaSigner,
    ca_pin: [u8; 32],
    tokens: Mutex<TokenStore>,
    state: Mutex<State>,
    joblog: Arc<JobLog>,
    /// Alerts raised from farm events, checks and jobs.
    alerts: Alerts,
    /// Scheduled content sets' timers, by set.
    timers: Mutex<BTreeMap<String, jobs::Timer>>,
}

impl Master {
    pub async fn start(cfg: &Config) -> anyhow::Result<Arc<Master>> {
        let mcfg = cfg.master.clone().context("no [master] table")?;
        let d = &mcfg.pki_dir;
        let identity = Identity::load(
            &cfg.name,
            &d.join("master.pem"),
            &d.join("master.key"),
            &d.join("ca.pem"),
        )?;
        let signer = CaSigner::load(d)?;
        let server_cfg = pki::server_config(&identity, pki::ClientAuth::OptionalForJoin)?;
        let listener = TcpListener::bind(mcfg.listen)
            .await
            .with_context(|| format!("bind master listener {}", mcfg.listen))?;
        let listen = listener.local_addr()?;
        std::fs::create_dir_all(&cfg.state_dir)?;
        let log_path = cfg.state_dir.join("joblog.sqlite");
        let retention = mcfg.job_log_retention_days;
        let history = mcfg.monitor.history_days;
        let joblog = Arc::new(
            tokio::task::spawn_blocking(move || {
                JobLog::open_keeping(&log_path, retention, history)
            })
            .await??,
        );
        let last = joblog
            .last_per_set()
            .await?
            .into_iter()
            .filter_map(|j| Some((j["content_set"].as_str()?.to_owned(), j)))
            .collect();
        let master = Arc::new(Master {
            name: cfg.name.clone(),
            listen,
            signer,
            ca_pin: identity.ca_fingerprint(),
            tokens: Mutex::new(TokenStore::load(cfg.state_dir.join("tokens.json"))),
            state: Mutex::new(State {
                farm: Farm::new(&mcfg)?,
                events: VecDeque::new(),
                last,
                sessions: BTreeMap::new(),
                next_session: 0,
                pending: HashMap::new(),
                health: health::HealthBook::new(mcfg.monitor.clone()),
                conflicts_seen: Default::default(),
            }),
            alerts: Alerts::start(joblog.clone(), &mcfg.alerts, &cfg.name)
                .context("starting the alert sinks")?,
            joblog,
            timers: Mutex::new(BTreeMap::new()),
            cfg: mcfg,
        });
        tokio::spawn(master.clone().farm_clock());
        tokio::spawn(master.clone().monitor_checks());
        master.start_timers();
        tracing::info!(listen = %listen, "master started");
        tokio::spawn(
            master
                .clone()
                .accept_loop(listener, TlsAcceptor::from(server_cfg)),
        );
        Ok(master)
    }

    pub fn create_token(&self, ttl_seconds: u64) -> anyhow::Result<serde_json::Value> {
        let ttl = ttl_seconds.clamp(1, 7 * 24 * 3600);
        let (t, exp) = self
            .tokens
            .lock()
            .unwrap()
            .create(self.ca_pin, now_unix(), ttl)?;
        Ok(serde_json::json!({ "token": t.to_string(), "expires_unix": exp }))
    }

    pub fn status(&self) -> serde_json::Value {
        let st = self.state.lock().unwrap();
        let mut names: Vec<&String> = self
            .cfg
            .content_sets
            .iter()
            .flat_map(|s| std::iter::once(&s.source).chain(&s.targets))
            .collect();
        names.extend(st.sessions.keys());
        names.sort();
        names.dedup();
        let nodes: Vec<serde_json::Value> = names
            .into_iter()
            .map(|n| match st.sessions.get(n) {
                Some(s) => serde_json::json!({"name": n, "connected": true, "data_addr": s.data_addr, "connected_unix": s.connected_unix, "degraded": st.farm.degraded(n)}),
                None => serde_json::json!({"name": n, "connected": false, "data_addr": null, "degraded": st.farm.degraded(n)}),
            })
            .collect();
        let sets: Vec<serde_json::Value> = self
            .cfg
            .content_sets
            .iter()
            .map(|s| {
                let last = st.last.get(&s.name).cloned();
                serde_json::json!({"name": s.name, "source": s.source, "targets": s.targets, "mode": s.mode, "schedule": self.schedule_json(s), "filter": crate::config::filter_json(&s.filter), "last_job": last, "routes": st.farm.routes_json(&s.name)})
            })
            .collect();
        let events: Vec<&serde_json::Value> = st.events.iter().rev().take(50).collect();
        serde_json::json!({ "listen": self.listen.to_string(), "nodes": nodes, "content_sets": sets, "events": events })
    }

    fn assignment_for(&self, node: &str, st: &State) -> pb::Assignment {
        let addr = |n: &str| {
            st.sessions
                .get(n)
                .map(|s| s.data_addr.clone())
                .unwrap_or_default()
        };
        let content_sets = self
            .cfg
            .content_sets
            .iter()
            .filter(|s| s.sources.iter().any(|x| x == node) || s.targets.iter().any(|t| t == node))
            .map(|s| {
                let routes = st.farm.routes(&s.name);
                let nm = s.sources.len() > 1;
                // This node's children, each with the policy of its link class. In an
                // N:M set a source sends to every other member that is up.
                let children = if nm {
                    if s.sources.iter().any(|x| x == node) {
                        crate::routing::nm_children(&s.sources, routes, node, |n| {
                            st.sessions.contains_key(n)
                        })
                        .into_iter()
                        .map(|c| {
                            let class = st.farm.link_class(node, &c);
                            (c, class)
                        })
                        .collect()
                    } else {
                        Vec::new()
                    }
                } else {
                    routes.map(|r| r.children(node)).unwrap_or_default()
                };
                let targets = children
                    .into_iter()
                    .map(|(child, class)| {
                        let p = self
                            .cfg
                            .link_classes
                            .get(&class)
                            .copied()
                            .unwrap_or_default();
                        pb::Peer {
                            data_addr: addr(&child),
                            link_class: class_name(class).to_owned(),
                            zstd_level: p.zstd_level.unwrap_or(s.zstd_level),
                            max_rate_bytes_per_sec: p
                                .max_rate_bytes_per_sec
                                .unwrap_or(s.max_rate_bytes_per_sec),
                            delta: delta_pb(p.delta.unwrap_or(s.delta)) as i32,
                            plaintext: !p.encryption.unwrap_or(s.encryption),
                            catch_up: st.farm.catching_up(&s.name, &child),
                            name: child,
                        }
                    })
                    .collect();
                pb::ContentSetAssignment {
                    name: s.name.clone(),
                    is_source: s.sources.iter().any(|x| x == node),
                    targets,
                    zstd_level: s.zstd_level,
                    source: s.source.clone(),
                    max_rate_bytes_per_sec: s.max_rate_bytes_per_sec,
                    delta: delta_pb(s.delta) as i32,
                    realtime: s.mode == crate::config::SyncMode::Realtime,
                    // Source and targets alike: both ends apply the filter (a target
                    // with its own data kinds, its own).
                    filter: Some(pb::Filter::from(
                        s.target_filters.get(node).unwrap_or(&s.filter),
                    )),
                    plaintext: !s.encryption,
                    sources: if nm { s.sources.clone() } else { Vec::new() },
                    parent: routes
                        .filter(|_| !nm)
                        .and_then(|r| r.parent(node))
                        .unwrap_or_default()
                        .to_owned(),
                    parent_link_class: routes
                        .and_then(|r| r.edges.get(node))
                        .map(|e| class_name(e.class).to_owned())
                        .unwrap_or_default(),
                }
            })
            .collect();
        pb::Assignment {
            content_sets,
            monitor: Some(pb::MonitorSettings {
                interval_ms: self.cfg.monitor.interval.as_millis() as u32,
                service_ports: self
                    .cfg
                    .monitor
                    .service_ports_for(&group_of(&st.farm, node))
                    .iter()
                    .map(|&p| u32::from(p))
                    .collect(),
            }),
        }
    }

    /// Logs farm events and keeps them for `status`.
    /// Logs farm events, keeps the last ones for `status`, and writes them all to the
    /// job log.
    fn record_events(&self, st: &mut State, events: Vec<FarmEvent>) {
        for e in events {
            tracing::info!(event = e.kind, node = %e.node, content_set = ?e.content_set, detail = %e.detail, "farm");
            self.joblog.event(
                e.kind,
                Some(&e.node),
                e.content_set.as_deref(),
                None,
                &e.detail,
            );
            st.events.push_back(serde_json::json!({
                "at_unix": now_unix(), "kind": e.kind, "node": e.node,
                "content_set": e.content_set, "detail": e.detail,
            }));
            while st.events.len() > EVENT_HISTORY {
                st.events.pop_front();
            }
            if let Some(a) = alert_of(&e) {
                self.alerts.raise(a);
            }
        }
    }

    /// Applies a farm change under the state lock, logs its events and pushes the
    /// assignments when anything happened.
    fn farm_update(&self, f: impl FnOnce(&mut Farm) -> Vec<FarmEvent>) {
        let events = {
            let mut st = self.state.lock().unwrap();
            let ev = f(&mut st.farm);
            let any = !ev.is_empty();
            self.record_events(&mut st, ev);
            any
        };
        if events {
            self.push_assignments();
        }
    }

    /// Turns health changes into alerts and, where they route, into degraded nodes of
    /// the farm. Returns whether the farm changed (assignments are then due).
    fn apply_health(&self, st: &mut State, changes: Vec<health::Change>) -> bool {
        let mut routed = false;
        for c in changes {
            let node = c.node().to_owned();
            let (alert, detail) = match &c {
                health::Change::Threshold {
                    threshold: t,
                    firing,
                    value,
                    ..
                } => {
                    let a = Alert::firing(
                        "ThresholdCrossed",
                        Some(&node),
                        Severity::Warning,
                        format!(
                            "{} {} above {} ({})",
                            t.metric.as_str(),
                            value.map_or("?".into(), |v| format!("{v:.2}")),
                            t.above,
                            threshold_action(t.action)
                        ),
                    )
                    .label("metric", t.metric.as_str());
                    let detail = format!(
                        "{} {} > {}",
                        t.metric.as_str(),
                        value.map_or("?".into(), |v| format!("{v:.2}")),
                        t.above
                    );
                    if *firing {
                        (a, detail)
                    } else {
                        let why = match value {
                            Some(v) => format!(
                                "{} {v:.2} below {} again",
                                t.metric.as_str(),
                                t.clear_below
                            ),
                            None => "node disconnected; no longer monitored".into(),
                        };
                        (a.resolved(why), detail)
                    }
                }
                health::Change::Check {
                    check,
                    failing,
                    detail,
                    ..
                } => {
                    let a = Alert::firing(
                        "CheckFailed",
                        Some(&node),
                        Severity::Critical,
                        format!("{check}: {detail}"),
                    )
                    .label("check", check.as_str());
                    if *failing {
                        (a, detail.clone())
                    } else {
                        (a.resolved(format!("{check}: {detail}")), detail.clone())
                    }
                }
            };
            let firing = alert.state == crate::alert::AlertState::Firing;
            self.alerts.raise(alert);
            if let Some(cause) = c.cause() {
                let ev = st
                    .farm
                    .set_degraded(&node, &cause, firing.then_some(detail.as_str()));
                routed |= !ev.is_empty();
                self.record_events(st, ev);
            }
        }
        routed
    }

    /// A heartbeat with a monitor sample from `node`.
    fn monitor_sample(&self, node: &str, unix_ms: i64, sample: pb::MonitorSample) {
        // The master's clock orders the history (nodes' clocks may differ).
        self.joblog.sample(node, crate::joblog::now_ms(), &sample);
        let routed = {
            let mut st = self.state.lock().unwrap();
            let changes = st.health.sample(node, unix_ms, sample, Instant::now());
            self.apply_health(&mut st, changes)
        };
        if routed {
            self.push_assignments();
        }
    }

    /// Every monitor interval: the silence check of every node, a TCP connect to each
    /// service port of every connected node, and an ICMP echo when `icmp = true`.
    async fn monitor_checks(self: Arc<Self>) {
        let mcfg = self.cfg.monitor.clone();
        let mut tick = tokio::time::interval(mcfg.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut icmp_refused = false;
        loop {
            tick.tick().await;
            let routed = {
                let mut st = self.state.lock().unwrap();
                let changes = st.health.silence(Instant::now(), crate::joblog::now_ms());
                self.apply_health(&mut st, changes)
            };
            if routed {
                self.push_assignments();
            }
            let hosts: Vec<(String, std::net::IpAddr, Vec<u16>)> = {
                let st = self.state.lock().unwrap();
                st.sessions
                    .iter()
                    .filter_map(|(n, s)| {
                        let ip = s.data_addr.parse::<SocketAddr>().ok()?.ip();
                        let ports = mcfg.service_ports_for(&group_of(&st.farm, n)).to_vec();
                        Some((n.clone(), ip, ports))
                    })
                    .collect()
            };
            let mut checks = tokio::task::JoinSet::new();
            for (node, ip, ports) in &hosts {
                for &port in ports {
                    let (node, ip, timeout) = (node.clone(), *ip, mcfg.check_timeout);
                    checks.spawn(async move {
                        let r = match tokio::time::timeout(
                            timeout,
                            tokio::net::TcpStream::connect((ip, port)),
                        )
                        .await
                        {
                            Ok(Ok(_)) => Ok(format!("{ip}:{port} accepts connections")),
                            Ok(Err(e)) => Err(format!("connect {ip}:{port}: {e}")),
                            Err(_) => Err(format!("connect {ip}:{port}: no answer in {timeout:?}")),
                        };
                        (node, format!("tcp:{port}"), r)
                    });
                }
                if mcfg.icmp && !icmp_refused && ip.is_ipv4() {
                    let (node, ip, timeout) = (node.clone(), *ip, mcfg.check_timeout);
                    checks.spawn(async move {
                        let r = tokio::task::spawn_blocking(move || icmp::ping(ip, timeout))
                            .await
                            .unwrap_or_else(|e| Err(icmp::PingError::Failed(e.to_string())));
                        (
                            node,
                            "icmp".to_owned(),
                            r.map_err(|e| e.to_string()).map(|rtt| {
                                format!("echo reply in {:.1} ms", rtt.as_secs_f64() * 1e3)
                            }),
                        )
                    });
                }
            }
            let mut results = Vec::new();
            while let Some(r) = checks.join_next().await {
                if let Ok(r) = r {
                    results.push(r);
                }
            }
            let routed = {
                let mut st = self.state.lock().unwrap();
                let mut changes = Vec::new();
                for (node, check, r) in results {
                    if check == "icmp"
                        && let Err(e) = &r
                        && e.starts_with(icmp::NOT_PERMITTED)
                    {
                        // Not a failure of the node: the master cannot ping at all.
                        tracing::error!(error = %e, "monitor: ICMP checks disabled");
                        icmp_refused = true;
                        continue;
                    }
                    // Only nodes still connected (a result may outlive its session).
                    if st.sessions.contains_key(&node) {
                        changes.extend(st.health.check(&node, &check, r, crate::joblog::now_ms()));
                    }
                }
                self.apply_health(&mut st, changes)
            };
            if routed {
                self.push_assignments();
            }
        }
    }

    /// `cdctl health [NODE]`: each node's newest sample, thresholds, checks and why it
    /// is routed around, with a summary of the samples in the job log.
    pub async fn health_json(&self, node: Option<&str>) -> anyhow::Result<serde_json::Value> {
        let (mut nodes, monitored) = {
            let st = self.state.lock().unwrap();
            if let Some(n) = node
                && st.farm.topology().id(n).is_none()
                && !st.sessions.contains_key(n)
            {
                bail!("no node `{n}` in the farm");
            }
            let mut nodes = st.health.json(node, Instant::now());
            for v in &mut nodes {
                let name = v["node"].as_str().unwrap_or_default();
                v["degraded"] = serde_json::json!(st.farm.degraded(name));
            }
            let monitored: Vec<String> = st.health.nodes().map(str::to_owned).collect();
            (nodes, monitored)
        };
        let history = self.joblog.sample_summary(node.map(str::to_owned)).await?;
        for v in &mut nodes {
            let name = v["node"].as_str().unwrap_or_default().to_owned();
            v["history"] = history
                .get(&name)
                .cloned()
                .unwrap_or(serde_json::Value::Null);
        }
        let mc = &self.cfg.monitor;
        Ok(serde_json::json!({
            "interval_ms": mc.interval.as_millis() as u64,
            "service_ports": mc.service_ports,
            "group_service_ports": mc.group_ports,
            "icmp": mc.icmp,
            "history_days": mc.history_days,
            "monitored": monitored,
            "nodes": nodes,
            "alerts_firing": self.alerts.firing(),
        }))
    }

    /// Runs due catch-ups and retries broken links when their time comes.
    async fn farm_clock(self: Arc<Self>) {
        loop {
            let next = self.state.lock().unwrap().farm.next_tick();
            let wait = next
                .map(|t| t.saturating_duration_since(Instant::now()))
                .unwrap_or(Duration::from_secs(1))
                .clamp(Duration::from_millis(20), Duration::from_secs(1));
            tokio::time::sleep(wait).await;
            self.farm_update(|f| f.tick(Instant::now()));
        }
    }

    /// `cdctl routes`: the route table of one content set (the only one when `None`).
    pub fn routes_json(&self, set: Option<&str>) -> anyhow::Result<serde_json::Value> {
        let name = self.set_named(set)?.name.clone();
        let st = self.state.lock().unwrap();
        let mut v = st.farm.routes_json(&name).context("no routes")?;
        if let Some(o) = v.as_object_mut() {
            let progress: serde_json::Map<String, serde_json::Value> = self
                .set_named(Some(&name))?
                .targets
                .iter()
                .map(|t| {
                    let p = st
                        .farm
                        .progress(t, &name)
                        .map(|(o, q)| serde_json::json!({"origin": o, "seq": q}));
                    (t.clone(), p.unwrap_or(serde_json::Value::Null))
                })
                .collect();
            o.insert("held".into(), progress.into());
        }
        Ok(v)
    }

    /// `cdctl wait`: returns when every target of the set holds change set `seq` of
    /// its source (or newer), `None` meaning the source's newest now; an error naming
    /// the targets behind after `timeout`.
    pub async fn wait_consistent(
        &self,
        set: Option<&str>,
        seq: Option<u64>,
        timeout: Duration,
    ) -> anyhow::Result<serde_json::Value> {
        let cs = self.set_named(set)?.clone();
        if cs.sources.len() > 1 {
            return self.wait_nm(&cs, seq, timeout).await;
        }
        let started = Instant::now();
        let want = match seq {
            Some(q) => q,
            None => {
                let known = self.state.lock().unwrap().farm.source_seq(&cs.name);
                known.with_context(|| {
                    format!(
                        "the source `{}` of `{}` has not reported yet",
                        cs.source, cs.name
                    )
                })?
            }
        };
        loop {
            let behind: Vec<serde_json::Value> = {
                let st = self.state.lock().unwrap();
                cs.targets
                    .iter()
                    .filter_map(|t| {
                        let held = st.farm.progress(t, &cs.name);
                        let ok = held.is_some_and(|(o, q)| *o == cs.source && *q >= want);
                        (!ok).then(|| serde_json::json!({
                            "target": t,
                            "holds": held.map(|(o, q)| serde_json::json!({"origin": o, "seq": q})),
                            "connected": st.sessions.contains_key(t),
                        }))
                    })
                    .collect()
            };
            let waited_ms = started.elapsed().as_millis() as u64;
            if behind.is_empty() {
                return Ok(serde_json::json!({
                    "content_set": cs.name, "seq": want, "consistent": true,
                    "targets": cs.targets.len(), "waited_ms": waited_ms,
                }));
            }
            if started.elapsed() >= timeout {
                return Ok(serde_json::json!({
                    "content_set": cs.name, "seq": want, "consistent": false,
                    "behind": behind, "waited_ms": waited_ms,
                }));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `cdctl wait` for an N:M set: returns when every member (sources and targets)
    /// holds, of every other source, the change set that source was at when the wait
    /// began. There is no one sequence to name, so `--seq` is refused.
    async fn wait_nm(
        &self,
        cs: &crate::config::MasterContentSet,
        seq: Option<u64>,
        timeout: Duration,
    ) -> anyhow::Result<serde_json::Value> {
        if seq.is_some() {
            anyhow::bail!(
                "`{}` is an N:M content set (sources {}): sequence numbers are per source, \
                 so --seq names nothing; wait without it (every source's newest)",
                cs.name,
                cs.sources.join(", ")
            );
        }
        let started = Instant::now();
        let want: BTreeMap<String, u64> = {
            let st = self.state.lock().unwrap();
            let mut want = BTreeMap::new();
            for s in &cs.sources {
                let q = st
                    .farm
                    .nm_held(s, &cs.name)
                    .and_then(|h| h.get(s).copied())
                    .with_context(|| {
                        format!("the source `{s}` of `{}` has not reported yet", cs.name)
                    })?;
                want.insert(s.clone(), q);
            }
            want
        };
        let members: Vec<&String> = cs.sources.iter().chain(&cs.targets).collect();
        loop {
            let behind: Vec<serde_json::Value> = {
                let st = self.state.lock().unwrap();
                members
                    .iter()
                    .filter_map(|m| {
                        let held = st.farm.nm_held(m, &cs.name);
                        let ok = want.iter().all(|(origin, q)| {
                            held.and_then(|h| h.get(origin)).is_some_and(|h| h >= q)
                        });
                        (!ok).then(|| {
                            serde_json::json!({
                                "target": m,
                                "holds": held,
                                "connected": st.sessions.contains_key(*m),
                            })
                        })
                    })
                    .collect()
            };
            let waited_ms = started.elapsed().as_millis() as u64;
            if behind.is_empty() {
                return Ok(serde_json::json!({
                    "content_set": cs.name, "sources_seq": want, "consistent": true,
                    "targets": members.len(), "waited_ms": waited_ms,
                }));
            }
            if started.elapsed() >= timeout {
                return Ok(serde_json::json!({
                    "content_set": cs.name, "sources_seq": want, "consistent": false,
                    "behind": behind, "waited_ms": waited_ms,
                }));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `cdctl catchup [NODE]`: starts catch-ups that wait for a command.
    pub fn catch_up_command(&self, node: Option<&str>) -> anyhow::Result<serde_json::Value> {
        let mut n = 0;
        let mut err = None;
        self.farm_update(|f| match f.catch_up_command(node, Instant::now()) {
            Ok(k) => {
                n = k;
                f.tick(Instant::now())
            }
            Err(e) => {
                err = Some(e);
                Vec::new()
            }
        });
        if let Some(e) = err {
            return Err(e);
        }
        Ok(serde_json::json!({ "started": n }))
    }

    pub(super) fn set_named(
        &self,
        set: Option<&str>,
    ) -> anyhow::Result<&crate::config::MasterContentSet> {
        match set {
            Some(n) => self
                .cfg
                .content_sets
                .iter()
                .find(|s| s.name == n)
                .with_context(|| format!("no content set `{n}`")),
            None => match self.cfg.content_sets.as_slice() {
                [one] => Ok(one),
                [] => bail!("no content sets are configured"),
                _ => bail!("several content sets are configured: name one"),
            },
        }
    }

    fn push_assignments(&self) {
        let st = self.state.lock().unwrap();
        for (name, s) in &st.sessions {
            let _ =
                s.tx.try_send(Msg::Assignment(self.assignment_for(name, &st)));
        }
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener, acceptor: TlsAcceptor) {
        loop {
            let (tcp, addr) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "master accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let m = self.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let conn = match net::accept(tcp, &acceptor).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(peer = %addr, error = %e, "refused peer");
                        return;
                    }
                };
                if let Err(e) = m.serve(conn).await {
                    tracing::warn!(peer = %addr, error = %format!("{e:#}"), "refused or closed session");
                }
            });
        }
    }

    async fn serve(self: Arc<Self>, mut conn: ServerConn) -> anyhow::Result<()> {
        let authenticated = conn.peer_cert().is_some();
        if !authenticated {
            conn.set_max_control(net::MAX_CONTROL_UNAUTHENTICATED);
        }
        let hello = conn.server_hello(&self.name, false).await?;
        let purpose = pb::hello::Purpose::try_from(hello.purpose).unwrap_or_default();
        match (authenticated, purpose) {
            (false, pb::hello::Purpose::Join) => self.serve_join(conn, &hello).await,
            (false, p) => {
                conn.send_error(
                    pb::error::ErrorCode::Unauthenticated,
                    "a cluster certificate is required (join first)",
                )
                .await;
                bail!(
                    "unauthenticated peer claiming `{}` asked for {p:?}",
                    hello.node_name
                )
            }
            (true, pb::hello::Purpose::Control) => self.serve_session(conn, hello).await,
            (true, p) => {
                conn.send_error(
                    pb::error::ErrorCode::BadRequest,
                    "the master accepts control sessions only",
                )
                .await;
                bail!("`{}` asked the master for {p:?}", hello.node_name)
            }
        }
    }

    async fn serve_join(&self, mut conn: ServerConn, hello: &pb::Hello) -> anyhow::Result<()> {
        let req = match conn.recv_msg().await? {
            Msg::JoinRequest(r) => r,
            m => bail!("expected JoinRequest, got {}", net::msg_name(&m)),
        };
        if req.node_name != hello.node_name || crate::config::check_name(&req.node_name).is_err() {
            conn.send_error(pb::error::ErrorCode::BadRequest, "invalid node name")
                .await;
            bail!("join: invalid node name `{}`", req.node_name);
        }
        let token = match pki::JoinToken::parse(&req.token) {
            Ok(t) => t,
            Err(e) => {
                conn.send_error(pb::error::ErrorCode::TokenInvalid, e.to_string())
                    .await;
                bail!("join by `{}`: {e}", req.node_name);
            }
        };
        let redeemed = self.tokens.lock().unwrap().redeem(&token, now_unix());
        if redeemed.is_err() {
            conn.send_error(
                pb::error::ErrorCode::TokenInvalid,
                "join token is unknown, used or expired",
            )
            .await;
            bail!("join by `{}`: token rejected", req.node_name);
        }
        let cert = self.signer.sign_node(&req.node_name, &req.public_key_spki);
        let cert = match cert {
            Ok(c) => c,
            Err(e) => {
                conn.send_error(pb::error::ErrorCode::BadRequest, e.to_string())
                    .await;
                bail!("join by `{}`: {e}", req.node_name);
            }
        };
        conn.send(Msg::JoinResponse(pb::JoinResponse {
            node_cert_pem: cert,
            ca_cert_pem: self.signer.ca_pem().to_owned(),
        }))
        .await?;
        conn.shutdown().await;
        tracing::info!(node = %req.node_name, "node joined");
        Ok(())
    }

    async fn serve_session(
        self: Arc<Self>,
        mut conn: ServerConn,
        hello: pb::Hello,
    ) -> anyhow::Result<()> {
        let name = hello.node_name;
        let reg = match conn.recv_msg().await? {
            Msg::Register(r) => r,
            m => bail!("`{name}`: expected Register, got {}", net::msg_name(&m)),
        };
        let (tx, mut rx) = mpsc::channel::<Msg>(64);
        let id = {
            let mut st = self.state.lock().unwrap();
            st.next_session += 1;
            let id = st.next_session;
            st.sessions.insert(
                name.clone(),
                Session {
                    id,
                    data_addr: reg.data_addr.clone(),
                    tx,
                    connected_unix: now_unix(),
                },
            );
            id
        };
        tracing::info!(node = %name, data_addr = %reg.data_addr, "node connected");
        self.farm_update(|f| f.connected(&name, &reg.progress, Instant::now()));
        {
            let mut st = self.state.lock().unwrap();
            let group = group_of(&st.farm, &name);
            st.health
                .connected(&name, &group, reg.monitor, Instant::now());
        }
        self.push_assignments();
        let (mut rx_conn, mut tx_conn) = conn.split();
        let writer = tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                if tx_conn.send(m).await.is_err() {
                    break;
                }
            }
        });
        let result = loop {
            let msg = match tokio::time::timeout(SESSION_IDLE, rx_conn.recv_msg()).await {
                Ok(Ok(m)) => m,
                Ok(Err(e)) => break Err(anyhow::Error::from(e)),
                Err(_) => break Err(anyhow::anyhow!("no heartbeat for {SESSION_IDLE:?}")),
            };
            match msg {
                Msg::Heartbeat(pb::Heartbeat {
                    unix_ms,
                    sample: Some(sample),
                }) => self.monitor_sample(&name, unix_ms, sample),
                Msg::Heartbeat(_) => {}
                Msg::Progress(p) => {
                    self.farm_update(|f| f.progressed(&name, &p.sets, Instant::now()))
                }
                Msg::LinkFailure(l) => self.farm_update(|f| {
                    f.link_failed(&l.content_set, &name, &l.child, &l.error, Instant::now())
                }),
                Msg::JobReport(r) => self.take_report(&name, r),
                m => tracing::warn!(node = %name, msg = %net::msg_name(&m), "unexpected message"),
            }
        };
        writer.abort();
        let why = match &result {
            Ok(()) => "session closed".to_owned(),
            Err(e) => format!("{e:#}"),
        };
        {
            let mut st = self.state.lock().unwrap();
            if st.sessions.get(&name).map(|s| s.id) == Some(id) {
                st.sessions.remove(&name);
                let ev = st.farm.disconnected(&name, &why);
                self.record_events(&mut st, ev);
                let changes = st.health.disconnected(&name);
                self.apply_health(&mut st, changes);
                // Fail the jobs this node was running: their reports cannot come.
                let dead: Vec<u64> = st
                    .pending
                    .iter()
                    .filter(|(_, (n, _))| n == &name)
                    .map(|(j, _)| *j)
                    .collect();
                for j in dead {
                    st.pending.remove(&j);
                }
            }
        }
        tracing::info!(node = %name, "node disconnected");
        self.push_assignments();
        result
    }
}

/// The alert a farm event raises or resolves, if any.
fn alert_of(e: &FarmEvent) -> Option<Alert> {
    let down =
        |summary: &str| Alert::firing("NodeDown", Some(&e.node), Severity::Critical, summary);
    match e.kind {
        "node_down" => Some(down(&format!("no control session: {}", e.detail))),
        "node_up" => Some(down("").resolved(format!("back: {}", e.detail))),
        _ => None,
    }
}

/// The group of `node` in the farm (`default` for a server it does not list).
fn group_of(farm: &Farm, node: &str) -> String {
    let topo = farm.topology();
    topo.id(node)
        .map_or("default".to_owned(), |i| topo.server(i).group().to_owned())
}

fn threshold_action(a: crate::config::ThresholdAction) -> &'static str {
    match a {
        crate::config::ThresholdAction::Alert => "alert",
        crate::config::ThresholdAction::RouteAround => "route_around",
    }
}

fn delta_pb(d: crate::config::DeltaMode) -> pb::DeltaMode {
    match d {
        crate::config::DeltaMode::Auto => pb::DeltaMode::Auto,
        crate::config::DeltaMode::Never => pb::DeltaMode::Never,
    }
}

/// The JSON form of a job report (`cdctl sync --json`).
pub fn report_json(r: &pb::JobReport) -> serde_json::Value {
    serde_json::json!({
        "job_id": r.job_id,
        "kind": if r.kind.is_empty() { "sync" } else { &r.kind },
        "content_set": r.content_set,
        "seq": r.seq,
        "scan_ms": r.scan_ms,
        "source_entries": r.source_entries,
        "error": r.error,
        "ok": r.error.is_empty() && r.targets.iter().all(|t| t.ok),
        "targets": r.targets.iter().map(|t| serde_json::json!({
            "target": t.target, "ok": t.ok, "error": t.error, "files_sent": t.files_sent,
            "bytes_sent": t.bytes_sent, "wire_bytes": t.wire_bytes, "reused_local": t.reused_local,
            "removed": t.removed, "meta_only": t.meta_only, "duration_ms": t.duration_ms, "resent": t.resent,
            "delta_files": t.delta_files, "delta_bytes": t.delta_bytes,
            "patch_bytes": t.patch_bytes, "signature_exchanges": t.signature_exchanges,
            "via": t.via, "link_class": t.link_class,
            "planned": t.planned.as_ref().map(crate::joblog::planned_json),
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    //! The master refuses every peer that is not a cluster member, and says so in its log.

    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use cd_proto::pb::{self, envelope::Msg};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::Master;
    use crate::net::{self, NetError};
    use crate::pki;
    use rustls_pki_types::pem::PemObject;

    #[derive(Clone, Default)]
    struct LogBuf(Arc<Mutex<Vec<u8>>>);
    impl Write for LogBuf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl LogBuf {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    async fn start_master(dir: &std::path::Path) -> Arc<Master> {
        pki::ca_init(&dir.join("pki"), "master", &[]).unwrap();
        let text = format!(
            "name = \"master\"\nstate_dir = \"{0}/state\"\n[master]\nlisten = \"127.0.0.1:0\"\npki_dir = \"{0}/pki\"\n",
            dir.display()
        );
        let cfg = crate::config::parse(&dir.join("m.toml"), &text).unwrap();
        Master::start(&cfg).await.unwrap()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn assignments_carry_the_filter_to_source_and_targets() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        pki::ca_init(&d.join("pki"), "master", &[]).unwrap();
        let text = format!(
            "name = \"master\"\nstate_dir = \"{0}/state\"\n[master]\nlisten = \"127.0.0.1:0\"\n\
             pki_dir = \"{0}/pki\"\n[[master.content_sets]]\nname = \"www\"\nsource = \"node1\"\n\
             targets = [\"node2\"]\nexclude = [\"*.tmp\", \"re:^cache/\"]\n\
             commands = {{ delete = false }}\n",
            d.display()
        );
        let cfg = crate::config::parse(&d.join("m.toml"), &text).unwrap();
        let m = Master::start(&cfg).await.unwrap();
        let st = m.state.lock().unwrap();
        for node in ["node1", "node2"] {
            let a = m.assignment_for(node, &st);
            let f = a.content_sets[0].filter.as_ref().expect("a filter");
            let f = cd_core::filter::Filter::try_from(f).unwrap();
            assert_eq!(
                f,
                cfg.master.as_ref().unwrap().content_sets[0].filter,
                "{node}"
            );
            assert!(!f.commands().delete);
        }
        assert!(m.assignment_for("node3", &st).content_sets.is_empty());
    }

    /// A node identity signed by the cluster CA, as a join would produce.
    fn member(dir: &std::path::Path, name: &str) -> pki::Identity {
        let signer = pki::CaSigner::load(&dir.join("pki")).unwrap();
        let (key, spki) = pki::generate_node_key().unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key).unwrap();
        std::fs::write(
            dir.join(format!("{name}.pem")),
            signer.sign_node(name, &spki).unwrap(),
        )
        .unwrap();
        pki::Identity::load(
            name,
            &dir.join(format!("{name}.pem")),
            &dir.join(format!("{name}.key")),
            &dir.join("pki/ca.pem"),
        )
        .unwrap()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn refuses_peers_without_valid_cluster_certificates() {
        let log = LogBuf::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);

        let dir = tempfile::tempdir().unwrap();
        let m = start_master(dir.path()).await;
        let addr = m.listen.to_string();

        // 1. A certificate from another CA: the TLS handshake fails and the master logs it.
        let foreign = tempfile::tempdir().unwrap();
        pki::ca_init(&foreign.path().join("pki"), "master", &[]).unwrap();
        let rogue = member(foreign.path(), "node1");
        let mut rogue_cfg = (*pki::client_config(&rogue).unwrap()).clone();
        // The rogue trusts our master (it copied our CA), but its own cert is foreign.
        let mut roots = rustls::RootCertStore::empty();
        let ours =
            rustls_pki_types::CertificateDer::from_pem_file(dir.path().join("pki/ca.pem")).unwrap();
        roots.add(ours).unwrap();
        rogue_cfg =
            rustls::ClientConfig::builder_with_provider(rogue_cfg.crypto_provider().clone())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_root_certificates(roots)
                .with_client_auth_cert(rogue.chain.clone(), rogue.key.clone_key())
                .unwrap();
        let r = async {
            let mut c = net::connect(&addr, "master", Arc::new(rogue_cfg)).await?;
            c.client_hello("node1", pb::hello::Purpose::Control).await
        }
        .await;
        assert!(r.is_err(), "a foreign certificate must be refused: {r:?}");

        // 2. No certificate at all, asking for a control session: refused.
        let (anon_cfg, _) =
            pki::join_client_config(pki::fingerprint(&member(dir.path(), "probe").ca)).unwrap();
        let mut c = net::connect(&addr, "master", anon_cfg.clone())
            .await
            .unwrap();
        let r = c.client_hello("node2", pb::hello::Purpose::Control).await;
        let r = match r {
            Ok(_) => c.recv_msg().await.map(|_| ()),
            Err(e) => Err(e),
        };
        assert!(
            matches!(
                r,
                Err(NetError::Remote {
                    code: pb::error::ErrorCode::Unauthenticated,
                    ..
                })
            ),
            "{r:?}"
        );

        // 3. A cluster member claiming another member's name: refused.
        let node3 = member(dir.path(), "node3");
        let mut c = net::connect(&addr, "master", pki::client_config(&node3).unwrap())
            .await
            .unwrap();
        let r = c.client_hello("node4", pb::hello::Purpose::Control).await;
        assert!(
            matches!(
                r,
                Err(NetError::Remote {
                    code: pb::error::ErrorCode::Unauthenticated,
                    ..
                })
            ),
            "{r:?}"
        );

        // 4. A join token works once.
        let token = m.create_token(60).unwrap()["token"]
            .as_str()
            .unwrap()
            .to_owned();
        for attempt in 0..2 {
            let mut c = net::connect(&addr, "master", anon_cfg.clone())
                .await
                .unwrap();
            c.client_hello("node5", pb::hello::Purpose::Join)
                .await
                .unwrap();
            let (_, spki) = pki::generate_node_key().unwrap();
            c.send(Msg::JoinRequest(pb::JoinRequest {
                token: token.clone(),
                node_name: "node5".into(),
                public_key_spki: spki,
            }))
            .await
            .unwrap();
            let r = c.recv_msg().await;
            match attempt {
                0 => assert!(matches!(r, Ok(Msg::JoinResponse(_))), "{r:?}"),
                _ => assert!(
                    matches!(
                        r,
                        Err(NetError::Remote {
                            code: pb::error::ErrorCode::TokenInvalid,
                            ..
                        })
                    ),
                    "{r:?}"
                ),
            }
        }

        // 5. A member speaking a newer protocol version gets a clear error, not a hang.
        let node6 = member(dir.path(), "node6");
        let c = net::connect(&addr, "master", pki::client_config(&node6).unwrap())
            .await
            .unwrap();
        let mut raw = c.into_inner();
        let mut frame = cd_proto::frame::encode_control(&pb::Envelope {
            msg: Some(Msg::Hello(net::hello("node6", pb::hello::Purpose::Control))),
        });
        frame[4] = cd_proto::frame::VERSION + 1;
        raw.write_all(&frame).await.unwrap();
        raw.flush().await.unwrap();
        let mut reply = Vec::new();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            raw.read_to_end(&mut reply),
        )
        .await
        .expect("master answers, no hang");
        let mut dec = cd_proto::frame::FrameDecoder::new();
        dec.push(&reply);
        match dec.next_frame() {
            Ok(Some(cd_proto::frame::Frame::Control(pb::Envelope {
                msg: Some(Msg::Error(e)),
            }))) => {
                assert_eq!(e.code, pb::error::ErrorCode::VersionMismatch as i32);
                assert!(e.message.contains('v'), "{}", e.message);
            }
            other => panic!("expected a version-mismatch error frame, got {other:?}"),
        }

        // Let the master's tasks log, then check every refusal is in the log.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let text = log.text();
        assert!(
            text.contains("refused peer"),
            "handshake refusal logged:\n{text}"
        );
        assert!(
            text.contains("unauthenticated peer claiming `node2`"),
            "{text}"
        );
        assert!(
            text.contains("NameMismatch") || text.contains("not valid for that name"),
            "{text}"
        );
        assert!(text.contains("token rejected"), "{text}");
        assert!(text.contains("node joined"), "{text}");
    }
}
