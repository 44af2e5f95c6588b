//! The node role: joins the cluster, keeps a session with the master, receives
//! content as a replica, and runs sync jobs as a source.
//!
//! - Identity: on first start (no `node.pem` in the state directory) the node
//!   generates a key and redeems its join token with the master ([`join`]).
//! - Master session: one mTLS connection, re-established with backoff. The node
//!   registers its data address and content sets; the master answers with
//!   [`Assignment`](pb::Assignment)s and sends [`SyncRequest`](pb::SyncRequest)s; the
//!   node answers each with a [`JobReport`](pb::JobReport).
//! - Data listener: accepts transfers only from peers with a cluster certificate
//!   whose name is the assigned source of the content set.
//! - One job or transfer at a time per content set (a per-set lock).
//! - Relaying: a node with children for the content set (other than the sender)
//!   forwards while it receives ([`relay`]): its children's transfers start as soon as
//!   its own is planned and take each file from its stage once verified; it answers
//!   its parent after its own apply and its whole subtree, with a result per target.
//!   A child that cannot take the change set incrementally then gets the whole tree
//!   from this node's root. Dry runs are forwarded after the relay's own plan.
//! - Filters: every assignment carries the content set's [`Filter`] (include/exclude
//!   patterns, command mask). A node that cannot compile it suspends the set (no
//!   assignment, so no job or transfer runs for it) and says so in its status. As the
//!   source it ships [`Filter::apply_to_manifest`] of its scan in full rounds, and in
//!   real time passes events through [`Filter::filter_event`] before the coalescer and
//!   resolved changes through [`Filter::allows`] (see [`realtime::resolve`]). As a
//!   replica it plans against [`Filter::reconcile_target`] of what it received, for
//!   full manifests and incremental change sets alike, so its own excluded entries
//!   stay and the command mask holds even if a source sent more.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use cd_core::coalesce::PathChange;
use cd_core::filter::Filter;
use cd_proto::pb::{self, envelope::Msg};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;

use crate::config::{Config, NodeConfig};
use crate::fs;
use crate::link;
use crate::net::{self, NetError};
use crate::pki::{self, Identity};
use crate::realtime::{self, CaptureService};
use crate::relay;
use crate::shipped::{self, Shipped};
use crate::transfer::{self, OutBody, Outgoing, ReceiveContext, ReplicaState};

mod dryrun;
mod report;

/// Rounds a job may take when files keep changing under it.
const MAX_ROUNDS: u32 = 3;
const HEARTBEAT: Duration = Duration::from_secs(5);
/// How long a catch-up waits for more targets to (re)connect before its full round.
const CATCH_UP_SETTLE: Duration = Duration::from_millis(300);
/// How long an incoming transfer waits for the content set's lock before it is
/// refused as busy (the sender retries with its next change set or round).
const BUSY_WAIT: Duration = Duration::from_secs(120);
/// How long a job waits for the master to route around a child that failed.
const REROUTE_WAIT: Duration = Duration::from_secs(3);
/// Transfer links remembered for `status`.
const RECENT_LINKS: usize = 16;

#[derive(Debug, Clone, Serialize)]
pub struct LastSync {
    pub job_id: u64,
    pub at_unix: i64,
    pub ok: bool,
    pub error: Option<String>,
    /// "source" or "replica".
    pub side: &'static str,
    pub files: u64,
    pub bytes: u64,
    pub duration_ms: u64,
}

#[derive(Debug)]
struct SetState {
    root: PathBuf,
    assignment: Mutex<Option<pb::ContentSetAssignment>>,
    last_sync: Mutex<Option<LastSync>>,
    /// One job or transfer at a time per content set.
    busy: tokio::sync::Mutex<()>,
    /// As a replica: the tree and sequence number last applied.
    replica: Mutex<ReplicaState>,
    /// As a source: per target, the last change set it applied completely.
    sent: Mutex<BTreeMap<String, u64>>,
    /// As a source: per target, when the last full round it applied completely began
    /// (a catch-up requested before that instant has nothing left to do).
    full_done: Mutex<BTreeMap<String, Instant>>,
    /// As a real-time source: targets waiting for a catch-up, with when they asked.
    catch_up: Mutex<BTreeMap<String, Instant>>,
    /// As a source: the real-time task, once started.
    realtime: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// As a source: subtrees and whole trees reconciled because events were lost.
    rescans_subtree: AtomicU64,
    rescans_full: AtomicU64,
    /// As a real-time source: full reconciles run without a sync command (start
    /// without a usable record, lost events, a replica that fell behind).
    full_reconciles: AtomicU64,
    /// As a real-time source: the tree its change sets describe (see [`shipped`]).
    shipped: Mutex<Option<Shipped>>,
    /// How the real-time stream started: resumed from a record, or a full reconcile.
    resume: Mutex<serde_json::Value>,
    /// The filter of the current assignment; the real-time task watches it.
    filter: watch::Sender<SetFilter>,
    /// As a real-time source with a filter that is not a no-op: what the replicas hold,
    /// as far as this node knows (the filtered tree of the last full round, plus the
    /// change sets shipped since). `None`: unknown, the next batch is a full round.
    known: Mutex<Option<realtime::KnownTree>>,
    /// An N:M set (its assignment names several sources): its version store, clock
    /// and echo filter, opened with the first such assignment (see [`crate::nm`]).
    nm: Mutex<Option<Arc<crate::nm::NmSet>>>,
}

/// A content set's filter as last assigned.
#[derive(Debug, Clone, Default)]
struct SetFilter {
    filter: Arc<Filter>,
    /// False while the set is suspended because the master's filter was refused.
    valid: bool,
}

impl SetState {
    /// The filter to apply now.
    fn filter(&self) -> Arc<Filter> {
        self.filter.borrow().filter.clone()
    }
}

#[derive(Debug)]
pub struct Node {
    name: String,
    state_dir: PathBuf,
    cfg: NodeConfig,
    client_cfg: Arc<rustls::ClientConfig>,
    data_addr: SocketAddr,
    sets: BTreeMap<String, SetState>,
    master_connected: AtomicBool,
    master_tx: Mutex<Option<mpsc::Sender<Msg>>>,
    errors: Mutex<Vec<String>>,
    owner: bool,
    /// Kernel change capture, started with the first real-time content set.
    capture: Mutex<Option<Arc<CaptureService>>>,
    /// Signatures of what this node distributed, and patches being broadcast.
    delta_cache: Arc<crate::delta::DeltaCache>,
    /// How transfer links are set up (kernel TLS, trusted plaintext peers).
    transport: link::Policy,
    /// The last transfer links, newest last, for `status`.
    links: Mutex<VecDeque<serde_json::Value>>,
    /// Targets whose kernel-TLS link ran out of its record budget: the next
    /// connection to them uses rustls (see [`crate::link`]).
    rustls_only: Mutex<BTreeSet<String>>,
    /// What the master asked the monitor to sample, and how often.
    monitor: watch::Sender<Option<pb::MonitorSettings>>,
    /// The monitor's reader of this machine (see [`crate::monitor`]).
    sampler: Arc<Mutex<crate::monitor::Sampler>>,
}

pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Node {
    /// Loads or obtains the node's identity, binds the data listener and starts the
    /// master session and the listener tasks.
    pub async fn start(cfg: &Config) -> anyhow::Result<Arc<Node>> {
        let ncfg = cfg.node.clone().context("no [node] table")?;
        let identity = ensure_identity(&cfg.name, &cfg.state_dir, &ncfg).await?;
        let client_cfg = pki::client_config(&identity)?;
        let server_cfg = pki::server_config(&identity, pki::ClientAuth::Required)?;
        let listener = TcpListener::bind(ncfg.listen)
            .await
            .with_context(|| format!("bind data listener {}", ncfg.listen))?;
        let transport = link::Policy::new(
            ncfg.ktls,
            std::env::var(link::ENV_KTLS).ok().as_deref(),
            ncfg.trusted_peers.clone(),
        );
        // Before any file is sent under a lease (see fs::snapshot).
        fs::snapshot::init_lease_signal();
        let data_addr = listener.local_addr()?;
        fs::file_io::install(fs::FileIo::start(ncfg.file_io, ncfg.direct_io));
        let sets = ncfg
            .content_sets
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    SetState {
                        root: s.root.clone(),
                        assignment: Mutex::new(None),
                        last_sync: Mutex::new(None),
                        busy: tokio::sync::Mutex::new(()),
                        replica: Mutex::new(ReplicaState::load(
                            &cfg.state_dir.join(format!("applied-{}", s.name)),
                        )),
                        sent: Mutex::new(BTreeMap::new()),
                        full_done: Mutex::new(BTreeMap::new()),
                        catch_up: Mutex::new(BTreeMap::new()),
                        realtime: Mutex::new(None),
                        rescans_subtree: AtomicU64::new(0),
                        rescans_full: AtomicU64::new(0),
                        full_reconciles: AtomicU64::new(0),
                        shipped: Mutex::new(None),
                        resume: Mutex::new(serde_json::Value::Null),
                        filter: watch::Sender::new(SetFilter::default()),
                        known: Mutex::new(None),
                        nm: Mutex::new(None),
                    },
                )
            })
            .collect();
        let ncfg_proc_root = ncfg.monitor_proc_root.clone();
        let sampler_roots: Vec<(String, PathBuf)> = ncfg
            .content_sets
            .iter()
            .map(|s| (s.name.clone(), s.root.clone()))
            .collect();
        let node = Arc::new(Node {
            name: cfg.name.clone(),
            state_dir: cfg.state_dir.clone(),
            cfg: ncfg,
            client_cfg,
            delta_cache: Arc::new(crate::delta::DeltaCache::new()),
            data_addr,
            sets,
            master_connected: AtomicBool::new(false),
            master_tx: Mutex::new(None),
            errors: Mutex::new(Vec::new()),
            owner: rustix::process::geteuid().is_root(),
            capture: Mutex::new(None),
            transport,
            links: Mutex::new(VecDeque::new()),
            rustls_only: Mutex::new(BTreeSet::new()),
            monitor: watch::Sender::new(None),
            sampler: Arc::new(Mutex::new(crate::monitor::Sampler::new(
                ncfg_proc_root,
                sampler_roots,
            ))),
        });
        tracing::info!(node = %node.name, data_addr = %data_addr, "node started");
        tokio::spawn(
            node.clone()
                .accept_loop(listener, TlsAcceptor::from(server_cfg)),
        );
        tokio::spawn(node.clone().master_loop());
        Ok(node)
    }

    /// The content set, when this node has exactly one.
    pub fn single_set(&self) -> anyhow::Result<String> {
        match self.sets.keys().collect::<Vec<_>>().as_slice() {
            [one] => Ok((*one).clone()),
            [] => bail!("this node has no content sets"),
            _ => bail!("this node has several content sets: name one"),
        }
    }

    fn index_path(&self, set: &str) -> PathBuf {
        self.state_dir.join(format!("index-{set}.bin"))
    }

    fn shipped_path(&self, set: &str) -> PathBuf {
        self.state_dir.join(format!("shipped-{set}.bin"))
    }

    /// Saves each real-time set's record of what it shipped (on shutdown). Waits for
    /// a batch in flight, so the record and the sequence number agree, and keeps
    /// every set locked until the process exits, so no later batch moves the
    /// sequence number past the saved record.
    pub async fn shutdown(&self) {
        for (name, s) in &self.sets {
            let busy = s.busy.lock().await;
            std::mem::forget(busy);
            let record = s.shipped.lock().unwrap().clone();
            if let Some(r) = record {
                match r.save(&self.shipped_path(name)) {
                    Ok(()) => {
                        tracing::info!(content_set = %name, seq = r.seq, entries = r.len(), "saved the record of what was shipped")
                    }
                    Err(e) => {
                        tracing::warn!(content_set = %name, error = %e, "could not save the record of what was shipped")
                    }
                }
            }
        }
    }

    /// The N:M state of `set`, when its assignment names several sources.
    fn nm(&self, set: &str) -> Option<Arc<crate::nm::NmSet>> {
        let s = self.sets.get(set)?;
        let nm_now = s
            .assignment
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|a| !a.sources.is_empty());
        if !nm_now {
            return None;
        }
        s.nm.lock().unwrap().clone()
    }

    fn seq_path(&self, set: &str) -> PathBuf {
        self.state_dir.join(format!("seq-{set}"))
    }

    /// The last sequence number used for `set` (0 before the first change set).
    fn current_seq(&self, set: &str) -> u64 {
        std::fs::read_to_string(self.seq_path(set))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    fn next_seq(&self, set: &str) -> u64 {
        let p = self.seq_path(set);
        let cur = self.current_seq(set);
        let next = cur + 1;
        let tmp = p.with_extension("tmp");
        if std::fs::write(&tmp, next.to_string())
            .and_then(|_| std::fs::rename(&tmp, &p))
            .is_err()
        {
            tracing::warn!(path = %p.display(), "could not persist the change-set sequence number");
        }
        self.report_progress();
        next
    }

    /// What this node holds of each content set: the change set it last applied
    /// completely as a replica, and (where it ever was a source) its newest one.
    fn progress(&self) -> Vec<pb::SetProgress> {
        let mut out = Vec::new();
        for (name, s) in &self.sets {
            if let Some(nm) = self.nm(name) {
                // N:M: what this member holds of every other source, and of its own.
                let (is_source, sources) = match s.assignment.lock().unwrap().as_ref() {
                    Some(a) => (a.is_source, a.sources.clone()),
                    None => continue,
                };
                for origin in sources {
                    let own = origin == self.name;
                    if own && !is_source {
                        continue;
                    }
                    out.push(pb::SetProgress {
                        content_set: name.clone(),
                        seq: if own {
                            self.current_seq(name)
                        } else {
                            nm.last_seq(&origin)
                        },
                        origin,
                        is_source: own,
                    });
                }
                continue;
            }
            let is_source = s.assignment.lock().unwrap().as_ref().map(|a| a.is_source);
            // Before the first assignment this node cannot tell whether it is the
            // source: it says what it would be at (0: nothing yet), and the master
            // takes it from the source only.
            if is_source != Some(false) {
                out.push(pb::SetProgress {
                    content_set: name.clone(),
                    origin: self.name.clone(),
                    seq: self.current_seq(name),
                    is_source: true,
                });
            }
            if is_source != Some(true)
                && let Some((origin, seq)) = s.replica.lock().unwrap().last_applied.clone()
            {
                out.push(pb::SetProgress {
                    content_set: name.clone(),
                    origin,
                    seq,
                    is_source: false,
                });
            }
        }
        out
    }

    /// Tells the master what this node holds now (best effort: the next session's
    /// `Register` carries it too).
    fn report_progress(&self) {
        if let Some(tx) = self.master_tx.lock().unwrap().as_ref() {
            let _ = tx.try_send(Msg::Progress(pb::Progress {
                sets: self.progress(),
            }));
        }
    }

    fn note_error(&self, e: String) {
        let mut errs = self.errors.lock().unwrap();
        errs.push(e);
        let n = errs.len();
        if n > 20 {
            errs.drain(..n - 20);
        }
    }

    pub fn status(&self) -> serde_json::Value {
        let sets: Vec<serde_json::Value> = self
            .sets
            .iter()
            .map(|(name, s)| {
                let a = s.assignment.lock().unwrap().clone();
                let filter = a.as_ref().map(|_| crate::config::filter_json(&s.filter()));
                serde_json::json!({
                    "name": name,
                    "root": s.root,
                    "is_source": a.as_ref().map(|a| a.is_source),
                    "source": a.as_ref().map(|a| a.source.clone()),
                    // Where this node receives the set from, and whom it passes it to.
                    "parent": a.as_ref().map(|a| a.parent.clone()).filter(|p| !p.is_empty()),
                    "holds": s.replica.lock().unwrap().last_applied.as_ref().map(|(o, q)| serde_json::json!({"origin": o, "seq": q})),
                    "targets": a.as_ref().map(|a| a.targets.iter().map(|t| t.name.clone()).collect::<Vec<_>>()).unwrap_or_default(),
                    "last_sync": *s.last_sync.lock().unwrap(),
                    "realtime": s.realtime.lock().unwrap().as_ref().is_some_and(|h| !h.is_finished()),
                    "rescans": {
                        "subtree": s.rescans_subtree.load(Ordering::Relaxed),
                        "full": s.rescans_full.load(Ordering::Relaxed),
                    },
                    "full_reconciles": s.full_reconciles.load(Ordering::Relaxed),
                    "resume": *s.resume.lock().unwrap(),
                    "filter": filter,
                    // N:M: all sources, this node's last change set and its clock.
                    "sources": a.as_ref().map(|a| a.sources.clone()).unwrap_or_default(),
                    "nm": s.nm.lock().unwrap().as_ref().map(|n| serde_json::json!({
                        "seq": self.current_seq(name),
                        "clock": n.clock().to_string(),
                    })),
                })
            })
            .collect();
        serde_json::json!({
            "master_addr": self.cfg.master_addr,
            "master_connected": self.master_connected.load(Ordering::Relaxed),
            "data_addr": self.data_addr.to_string(),
            "content_sets": sets,
            "errors": *self.errors.lock().unwrap(),
            "capture": self.capture.lock().unwrap().as_ref().map(|c| c.status()),
            "delta": self.delta_cache.status(),
            "transport": {
                "ktls": self.transport.status(),
                "links": *self.links.lock().unwrap(),
            },
            "file_io": fs::file_io::current().name(),
            "file_io_detail": fs::file_io::current().status(),
        })
    }

    /// Remembers a transfer link for `status`: which record layer it used and how its
    /// file data went out (`bytes_sendfile`) or in.
    fn record_link(
        &self,
        peer: &str,
        side: &'static str,
        content_set: &str,
        stats: Option<&Arc<link::LinkStats>>,
        ok: bool,
    ) {
        let Some(stats) = stats else { return };
        let mut v = stats.json();
        if let Some(o) = v.as_object_mut() {
            o.insert("peer".into(), peer.into());
            o.insert("side".into(), side.into());
            o.insert("content_set".into(), content_set.into());
            o.insert("ok".into(), ok.into());
            o.insert("at_unix".into(), now_unix().into());
        }
        let mut links = self.links.lock().unwrap();
        links.push_back(v);
        while links.len() > RECENT_LINKS {
            links.pop_front();
        }
    }

    // ---- master session -------------------------------------------------------

    async fn master_loop(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let started = Instant::now();
            match self.clone().master_session().await {
                Ok(()) => tracing::info!("master closed the session"),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), master = %self.cfg.master_addr, "master session ended");
                    self.note_error(format!("master session: {e:#}"));
                }
            }
            self.master_connected.store(false, Ordering::Relaxed);
            *self.master_tx.lock().unwrap() = None;
            if started.elapsed() > Duration::from_secs(30) {
                backoff = Duration::from_millis(100);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn master_session(self: Arc<Self>) -> anyhow::Result<()> {
        let mut conn = net::connect(
            &self.cfg.master_addr,
            &self.cfg.master_name,
            self.client_cfg.clone(),
        )
        .await?;
        conn.client_hello(&self.name, pb::hello::Purpose::Control)
            .await?;
        conn.send(Msg::Register(pb::Register {
            data_addr: self.data_addr.to_string(),
            content_sets: self.sets.keys().cloned().collect(),
            progress: self.progress(),
            monitor: true,
        }))
        .await?;
        let (mut rx_conn, mut tx_conn) = conn.split();
        let (tx, mut rx) = mpsc::channel::<Msg>(64);
        *self.master_tx.lock().unwrap() = Some(tx.clone());
        self.master_connected.store(true, Ordering::Relaxed);
        tracing::info!(master = %self.cfg.master_addr, "connected to master");
        let mut settings = self.monitor.subscribe();
        // Settings kept from an earlier session apply at once.
        settings.mark_changed();
        let sampler = self.sampler.clone();
        let writer = tokio::spawn(async move {
            let unix_ms = || {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_millis() as i64)
                    .unwrap_or(0)
            };
            let mut tick = tokio::time::interval(HEARTBEAT);
            // The monitor's clock and service ports, once the master sent them.
            let mut sampling: Option<(tokio::time::Interval, Arc<BTreeSet<u16>>)> = None;
            loop {
                tokio::select! {
                    m = rx.recv() => match m {
                        Some(m) => tx_conn.send(m).await?,
                        None => return Ok::<(), NetError>(()),
                    },
                    _ = tick.tick() => {
                        tx_conn.send(Msg::Heartbeat(pb::Heartbeat { unix_ms: unix_ms(), sample: None })).await?;
                    }
                    Ok(()) = settings.changed() => {
                        sampling = settings.borrow_and_update().as_ref().map(|m| {
                            let every = Duration::from_millis(u64::from(m.interval_ms.max(100)));
                            let mut i = tokio::time::interval(every);
                            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                            let ports = m.service_ports.iter().filter_map(|&p| u16::try_from(p).ok()).collect();
                            (i, Arc::new(ports))
                        });
                    }
                    _ = async { sampling.as_mut().expect("guarded").0.tick().await }, if sampling.is_some() => {
                        let ports = sampling.as_ref().expect("guarded").1.clone();
                        let sampler = sampler.clone();
                        let sample = tokio::task::spawn_blocking(move || sampler.lock().unwrap().sample(&ports)).await;
                        if let Ok(sample) = sample {
                            crate::metrics::get().record_sample(&sample);
                            tx_conn.send(Msg::Heartbeat(pb::Heartbeat { unix_ms: unix_ms(), sample: Some(sample) })).await?;
                        }
                    }
                }
            }
        });
        let result = loop {
            let msg = match rx_conn.recv_msg().await {
                Ok(m) => m,
                Err(e) => break Err(anyhow::Error::from(e)),
            };
            match msg {
                Msg::Assignment(a) => self.apply_assignment(a),
                Msg::SyncRequest(r) => {
                    let node = self.clone();
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let report = if r.dry_run {
                            node.dry_run_job(&r.content_set, r.job_id).await
                        } else {
                            node.run_job(&r.content_set, r.job_id).await
                        };
                        let _ = tx.send(Msg::JobReport(report)).await;
                    });
                }
                Msg::Heartbeat(_) => {}
                m => tracing::warn!(msg = %net::msg_name(&m), "unexpected message from master"),
            }
        };
        writer.abort();
        result
    }

    fn apply_assignment(self: &Arc<Self>, a: pb::Assignment) {
        self.monitor.send_if_modified(|m| {
            let changed = *m != a.monitor;
            if changed {
                tracing::info!(monitor = ?a.monitor, "monitor settings");
                m.clone_from(&a.monitor);
            }
            changed
        });
        for set in a.content_sets {
            let Some(s) = self.sets.get(&set.name) else {
                tracing::warn!(content_set = %set.name, "master assigned a content set this node has no root for");
                continue;
            };
            let filter = match set.filter.as_ref().map(Filter::try_from).transpose() {
                Ok(f) => f.unwrap_or_default(),
                Err(e) => {
                    // Syncing with a filter this node cannot apply could delete or
                    // overwrite what the operator excluded: suspend the set instead.
                    let msg = format!(
                        "content set `{}` suspended: the master's filter is invalid here: {e}",
                        set.name
                    );
                    tracing::error!(content_set = %set.name, error = %e, "refused the assignment's filter; content set suspended");
                    self.note_error(msg);
                    *s.assignment.lock().unwrap() = None;
                    s.filter.send_modify(|f| f.valid = false);
                    continue;
                }
            };
            s.filter.send_if_modified(|f| {
                let changed = !f.valid || *f.filter != filter;
                if changed {
                    tracing::info!(content_set = %set.name, filter = %crate::config::filter_json(&filter), "filter");
                    *f = SetFilter {
                        filter: Arc::new(filter),
                        valid: true,
                    };
                }
                changed
            });
            if !set.sources.is_empty() && s.nm.lock().unwrap().is_none() {
                let path = self.state_dir.join(format!("versions-{}.sqlite", set.name));
                match crate::nm::NmSet::open(&self.name, self.owner, &path) {
                    Ok(v) => *s.nm.lock().unwrap() = Some(Arc::new(v)),
                    Err(e) => {
                        let msg = format!(
                            "content set `{}` suspended: cannot open its version store: {e:#}",
                            set.name
                        );
                        tracing::error!(content_set = %set.name, error = %msg, "N:M content set suspended");
                        self.note_error(msg);
                        *s.assignment.lock().unwrap() = None;
                        continue;
                    }
                }
            }
            tracing::info!(content_set = %set.name, is_source = set.is_source, realtime = set.realtime, parent = %set.parent, targets = set.targets.len(), sources = ?set.sources, "assignment");
            let before = s.assignment.lock().unwrap().replace(set.clone());
            if set.is_source && set.realtime {
                let running = s
                    .realtime
                    .lock()
                    .unwrap()
                    .as_ref()
                    .is_some_and(|h| !h.is_finished());
                if !running {
                    self.start_realtime(&set.name);
                    continue;
                }
            }
            // A child that is new here (it (re)connected, or was re-parented to this
            // node) catches up at once with the full tree as the current change set,
            // so the stream continues from there: in real time always (it may have
            // missed change sets), otherwise when the master says it is behind.
            let was: Vec<pb::Peer> = before.map(|b| b.targets).unwrap_or_default();
            let back: Vec<String> = set
                .targets
                .iter()
                .filter(|t| {
                    let prev = was.iter().find(|w| w.name == t.name);
                    let new_here = prev.is_none_or(|w| w.data_addr != t.data_addr);
                    // The master may also mark a child it already had as behind
                    // (`cdctl catchup NODE`): that starts its catch-up too.
                    let newly_behind = t.catch_up && prev.is_some_and(|w| !w.catch_up);
                    !t.data_addr.is_empty()
                        && ((new_here && (set.realtime || t.catch_up)) || newly_behind)
                })
                .map(|t| t.name.clone())
                .collect();
            if !back.is_empty() {
                let requested = Instant::now();
                let mut waiting = s.catch_up.lock().unwrap();
                for t in back {
                    waiting.entry(t).or_insert(requested);
                }
                drop(waiting);
                let node = self.clone();
                let name = set.name.clone();
                tokio::spawn(async move { node.catch_up(&name).await });
            }
        }
    }

    fn start_realtime(self: &Arc<Self>, set: &str) {
        let Some(s) = self.sets.get(set) else { return };
        let capture = {
            let mut c = self.capture.lock().unwrap();
            if c.is_none() {
                match CaptureService::start(self.cfg.capture, self.cfg.ring_buffer_mib) {
                    Ok(svc) => *c = Some(svc),
                    Err(e) => {
                        let msg = format!("real-time capture unavailable: {e:#}");
                        tracing::error!(content_set = set, error = %msg, "cannot start real-time distribution");
                        self.note_error(msg);
                        return;
                    }
                }
            }
            c.clone().expect("set above")
        };
        // Root ids start at 1 (the eBPF side reserves 0).
        let root_id = self.sets.keys().position(|k| k == set).unwrap_or(0) as u32 + 1;
        let (rx, overflowed) = match capture.watch(root_id, &s.root) {
            Ok(x) => x,
            Err(e) => {
                let msg = format!("cannot watch {}: {e:#}", s.root.display());
                tracing::error!(content_set = set, error = %msg, "cannot start real-time distribution");
                self.note_error(msg);
                return;
            }
        };
        let node = self.clone();
        let name = set.to_owned();
        let handle = tokio::spawn(async move { node.realtime_loop(name, rx, overflowed).await });
        *s.realtime.lock().unwrap() = Some(handle);
    }

    /// Brings the targets waiting in the set's `catch_up` list up to date with one full
    /// round for all of them. Targets that connect close together (a source starting
    /// while its targets come up one by one) share a round: the list settles for a
    /// moment first, and a target that a full round begun after its request has
    /// already reached is dropped from it.
    async fn catch_up(self: &Arc<Self>, set: &str) {
        let Some(state) = self.sets.get(set) else {
            return;
        };
        tokio::time::sleep(CATCH_UP_SETTLE).await;
        let _busy = state.busy.lock().await;
        let waiting = std::mem::take(&mut *state.catch_up.lock().unwrap());
        let targets: Vec<String> = {
            let done = state.full_done.lock().unwrap();
            waiting
                .into_iter()
                .filter(|(t, requested)| done.get(t).is_none_or(|at| at < requested))
                .map(|(t, _)| t)
                .collect()
        };
        if targets.is_empty() {
            return;
        }
        let Some(seq) = self.distributed_seq(set) else {
            tracing::info!(content_set = set, targets = ?targets, "nothing complete to catch up from yet; the next change set brings the tree");
            return;
        };
        let mut report = pb::JobReport {
            content_set: set.to_owned(),
            ..Default::default()
        };
        let started_ms = crate::joblog::now_ms();
        tracing::info!(content_set = set, targets = ?targets, seq, "catching up reconnected targets");
        let r = self
            .full_rounds(set, 0, seq, Some(&targets), &mut report)
            .await
            .map_err(|e| format!("{e:#}"));
        if let Err(e) = &r {
            tracing::warn!(content_set = set, error = %e, "catch-up failed");
        }
        self.report_round("catch_up", set, started_ms, report, r);
    }

    /// The change set this node's tree is, as a distributor: its own newest as the
    /// source; as a relay, the last one it applied completely from the source (`None`
    /// when it holds no complete one).
    fn distributed_seq(&self, set: &str) -> Option<u64> {
        let s = self.sets.get(set)?;
        let a = s.assignment.lock().unwrap().clone()?;
        if a.is_source {
            return Some(self.current_seq(set));
        }
        let held = s.replica.lock().unwrap().last_applied.clone();
        held.filter(|(o, _)| *o == a.source).map(|(_, q)| q)
    }

    /// The real-time loop of one source content set. It waits on events and on the
    /// coalescer's next deadline only; nothing else wakes it.
    async fn realtime_loop(
        self: Arc<Self>,
        set: String,
        mut rx: mpsc::Receiver<Vec<cd_core::event::FsEvent>>,
        overflowed: Arc<AtomicBool>,
    ) {
        let Some(state) = self.sets.get(&set) else {
            return;
        };
        let epoch = Instant::now();
        let now_ms = || epoch.elapsed().as_millis() as u64;
        let mut co = realtime::coalescer(self.cfg.debounce_ms);
        let mut co_depth = crate::metrics::Depth::new("coalescer");
        let index_path = self.index_path(&set);
        let index = fs::HashIndex::load(&index_path);
        let mut filter_rx = state.filter.subscribe();
        let mut filter = filter_rx.borrow_and_update().filter.clone();
        let mut filter_open = true;
        let (check_tx, mut check_rx) = mpsc::channel::<Vec<cd_core::event::FsEvent>>(1);
        let seq = self.current_seq(&set);
        match Shipped::load(&self.shipped_path(&set)).filter(|r| r.seq == seq) {
            Some(record) => {
                // Resume: stream from `seq` now; a background check ships whatever
                // changed while the daemon was not watching.
                tracing::info!(content_set = %set, seq, entries = record.len(), "resuming the real-time stream; consistency check in the background");
                *state.resume.lock().unwrap() =
                    serde_json::json!({"from_seq": seq, "check": "running"});
                let check = record.clone();
                *state.shipped.lock().unwrap() = Some(record);
                let node = self.clone();
                let name = set.clone();
                tokio::spawn(async move { node.consistency_check(name, check, check_tx).await });
            }
            None => {
                // Start the stream from a known state: the whole tree, once.
                *state.resume.lock().unwrap() =
                    serde_json::json!({"from_seq": null, "check": "full reconcile"});
                drop(check_tx);
                co.handle_event(realtime::lost_root(), now_ms());
            }
        }
        let mut saved = Instant::now();
        // One batch ships at a time, in its own task, while this loop keeps taking
        // events into the coalescer (so a slow replica never backs the kernel's
        // queue up into a loss); the next batch is what accumulated meanwhile.
        let mut index = Some(index);
        let mut shipping: Option<tokio::task::JoinHandle<(fs::HashIndex, bool)>> = None;
        // After a failed batch: the whole tree again, not before this instant.
        let mut hold_until: Option<Instant> = None;
        let mut saving: Option<tokio::task::JoinHandle<()>> = None;
        loop {
            let deadline = match (&shipping, hold_until) {
                (Some(_), _) => None,
                (None, Some(h)) if h > Instant::now() => Some(h),
                (None, _) => co.poll_timeout().map(|t| epoch + Duration::from_millis(t)),
            };
            let received = tokio::select! {
                evs = rx.recv() => match evs {
                    Some(evs) => evs,
                    None => return,
                },
                Some(evs) = check_rx.recv() => evs,
                done = async { shipping.as_mut().expect("guarded").await }, if shipping.is_some() => {
                    shipping = None;
                    match done {
                        Ok((i, ok)) => {
                            index = Some(i);
                            if !ok {
                                // What the batch held is not on the replicas: never
                                // drop it silently, reconcile (after a pause).
                                co.handle_event(realtime::lost_root(), now_ms());
                                hold_until = Some(Instant::now() + Duration::from_secs(2));
                            }
                        }
                        Err(e) => {
                            tracing::error!(content_set = %set, error = %e, "real-time batch task failed; reconciling in full");
                            index = Some(fs::HashIndex::load(&index_path));
                            co.handle_event(realtime::lost_root(), now_ms());
                        }
                    }
                    Vec::new()
                }
                changed = filter_rx.changed(), if filter_open => {
                    filter_open = changed.is_ok();
                    Vec::new()
                }
                _ = async { tokio::time::sleep_until(deadline.expect("guarded").into()).await }, if deadline.is_some() => Vec::new(),
            };
            // A new filter changes what the replicas should hold: reconcile in full.
            // (Events received with it are judged by it; the rescan covers the rest.)
            let current = filter_rx.borrow_and_update().clone();
            if current.valid && !Arc::ptr_eq(&filter, &current.filter) {
                tracing::info!(content_set = %set, "filter changed; reconciling the whole tree");
                filter = current.filter;
                co.handle_event(realtime::lost_root(), now_ms());
            }
            for e in received {
                for e in filter.filter_event(e) {
                    co.handle_event(e, now_ms());
                }
            }
            while let Ok(evs) = rx.try_recv() {
                for e in evs {
                    for e in filter.filter_event(e) {
                        co.handle_event(e, now_ms());
                    }
                }
            }
            if overflowed.swap(false, Ordering::Relaxed) {
                tracing::warn!(content_set = %set, "event queue overflowed; rescanning");
                co.handle_event(realtime::lost_root(), now_ms());
            }
            co_depth.set(co.pending());
            if shipping.is_some() || hold_until.is_some_and(|h| h > Instant::now()) {
                continue;
            }
            let Some(mut idx) = index.take() else {
                continue;
            };
            if saved.elapsed() >= shipped::SAVE_EVERY
                && saving.as_ref().is_none_or(|h| h.is_finished())
            {
                // Copies, written by a blocking task: the loop keeps taking events.
                saved = Instant::now();
                let index_copy = idx.clone();
                let record = state.shipped.lock().unwrap().clone();
                let index_path = index_path.clone();
                let shipped_path = self.shipped_path(&set);
                saving = Some(tokio::task::spawn_blocking(move || {
                    if let Err(e) = index_copy.save(&index_path) {
                        tracing::warn!(error = %e, "could not save the hash index");
                    }
                    if let Some(r) = record
                        && let Err(e) = r.save(&shipped_path)
                    {
                        tracing::warn!(error = %e, "could not save the record of what was shipped");
                    }
                }));
            }
            let batch = co.poll_batch(now_ms());
            co_depth.set(co.pending());
            let Some(batch) = batch else {
                index = Some(idx);
                continue;
            };
            let cut = crate::metrics::Cut::now();
            let node = self.clone();
            let name = set.clone();
            shipping = Some(tokio::spawn(async move {
                let Some(state) = node.sets.get(&name) else {
                    return (idx, true);
                };
                let t0 = Instant::now();
                let started_ms = crate::joblog::now_ms();
                let mut report = pb::JobReport {
                    changes: batch.changes.len() as u64,
                    ..Default::default()
                };
                let r = node
                    .ship_batch(&name, state, &batch, cut, &mut idx, &mut report)
                    .await;
                // A batch that shipped nothing (N:M echoes only) is no round.
                if r.is_err() || report.seq != 0 {
                    node.report_round(
                        "realtime",
                        &name,
                        started_ms,
                        report,
                        r.as_ref().map(|_| ()).map_err(|e| format!("{e:#}")),
                    );
                }
                let (ok, error) = match &r {
                    Ok(()) => (true, None),
                    Err(e) => {
                        tracing::warn!(content_set = %name, error = %format!("{e:#}"), "real-time batch failed");
                        (false, Some(format!("{e:#}")))
                    }
                };
                *state.last_sync.lock().unwrap() = Some(LastSync {
                    job_id: 0,
                    at_unix: now_unix(),
                    ok,
                    error,
                    side: "source",
                    files: batch.changes.len() as u64,
                    bytes: 0,
                    duration_ms: t0.elapsed().as_millis() as u64,
                });
                (idx, r.is_ok())
            }));
        }
    }

    /// Scans the tree (in the background, hashing only what changed) and hands the
    /// differences from `record` to the real-time loop as events.
    async fn consistency_check(
        self: Arc<Self>,
        set: String,
        record: Shipped,
        tx: mpsc::Sender<Vec<cd_core::event::FsEvent>>,
    ) {
        let Some(state) = self.sets.get(&set) else {
            return;
        };
        let t0 = Instant::now();
        let root_path = state.root.clone();
        let index_path = self.index_path(&set);
        let scanned = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let root = fs::Root::open(&root_path)?;
            // A copy: the real-time loop owns (and saves) the index file.
            let mut index = fs::HashIndex::load(&index_path);
            let (manifest, _) = fs::scan(&root, &mut index)?;
            Ok(record.differences(&manifest))
        })
        .await;
        let evs = match scanned {
            Ok(Ok(evs)) => evs,
            Ok(Err(e)) => {
                tracing::warn!(content_set = %set, error = %format!("{e:#}"), "consistency check failed; reconciling in full");
                vec![realtime::lost_root()]
            }
            Err(e) => {
                tracing::warn!(content_set = %set, error = %e, "consistency check panicked; reconciling in full");
                vec![realtime::lost_root()]
            }
        };
        let ms = t0.elapsed().as_millis() as u64;
        tracing::info!(content_set = %set, differences = evs.len(), ms, "consistency check done");
        if let Some(r) = state.resume.lock().unwrap().as_object_mut() {
            r.insert(
                "check".into(),
                serde_json::json!({"differences": evs.len(), "ms": ms}),
            );
        }
        let _ = tx.send(evs).await;
    }

    /// Ships one coalesced batch as change set `seq` to every connected target.
    async fn ship_batch(
        self: &Arc<Self>,
        set: &str,
        state: &SetState,
        batch: &cd_core::coalesce::Batch,
        cut: crate::metrics::Cut,
        index: &mut fs::HashIndex,
        report: &mut pb::JobReport,
    ) -> anyhow::Result<()> {
        let assignment = state
            .assignment
            .lock()
            .unwrap()
            .clone()
            .context("no assignment")?;
        // The lock first: a full round running now changes what the replicas hold,
        // which the filter's command mask is judged against.
        let _busy = state.busy.lock().await;
        // N:M: resolve and stamp under the apply lock (see crate::nm: echoes).
        let nm = self.nm(set);
        let mut nm_guard = match &nm {
            Some(n) => Some(n.apply_lock.lock().await),
            None => None,
        };
        let filter = state.filter();
        let root = Arc::new(tokio::task::block_in_place(|| fs::Root::open(&state.root))?);
        let mut known = state.known.lock().unwrap().take();
        let resolved = tokio::task::block_in_place(|| {
            realtime::resolve(&root, index, batch, &filter, known.as_mut())
        });
        // Only a batch resolved to the end leaves `known` describing what the
        // replicas will hold; a full round (below) sets it afresh.
        if matches!(&resolved, Ok(r) if !r.full) {
            *state.known.lock().unwrap() = known;
        }
        let mut resolved = resolved?;
        if let Some(nm) = &nm
            && !resolved.full
        {
            let before = resolved.changes.len();
            resolved.changes = tokio::task::block_in_place(|| {
                nm_local_changes(nm, &root, index, std::mem::take(&mut resolved.changes))
            })?;
            if resolved.changes.is_empty() {
                // Only this node's own applications of remote writes: nothing to ship,
                // and no sequence number used (replicas would see a gap).
                tracing::debug!(
                    content_set = set,
                    echoes = before,
                    "captured changes were all applied remote writes; nothing to ship"
                );
                report.seq = 0;
                return Ok(());
            }
        }
        let seq = self.next_seq(set);
        let connected: Vec<String> = assignment
            .targets
            .iter()
            .filter(|t| !t.data_addr.is_empty())
            .map(|t| t.name.clone())
            .collect();
        report.seq = seq;
        if resolved.rescanned > 0 {
            state
                .rescans_subtree
                .fetch_add(resolved.rescanned, Ordering::Relaxed);
            crate::metrics::get().rescans("subtree", resolved.rescanned);
            tracing::warn!(
                content_set = set,
                seq,
                subtrees = resolved.rescanned,
                "events were lost beneath some directories; shipping those subtrees in full"
            );
        }
        if resolved.full {
            if batch
                .changes
                .iter()
                .any(|c| matches!(c, PathChange::Rescan { path: None }))
            {
                state.rescans_full.fetch_add(1, Ordering::Relaxed);
                crate::metrics::get().rescans("full", 1);
            }
            tracing::info!(
                content_set = set,
                seq,
                "real-time batch needs a full reconcile"
            );
            // full_rounds takes the apply lock itself.
            drop(nm_guard.take());
            let r = self
                .full_rounds(set, 0, seq, Some(&connected), report)
                .await;
            cut.reached_all(report);
            return r;
        }
        if resolved.changes.is_empty() {
            // Nothing to send (e.g. a file created and removed before shipping), but
            // the sequence moved on: replicas must move with it.
            tracing::debug!(content_set = set, seq, "empty batch");
        }
        let unsourced = match state.shipped.lock().unwrap().as_mut() {
            Some(r) => r.apply(seq, &resolved.changes),
            None => Vec::new(),
        };
        if !unsourced.is_empty() {
            // A rename whose source the replicas never got (its `Upsert` found the
            // path already renamed away, so it shipped as a removal): moving nothing
            // would leave the target stale. Ship the target as it is now instead.
            let mut extra = Vec::new();
            for to in &unsourced {
                tokio::task::block_in_place(|| match fs::scan_subtree(&root, to, index)? {
                    None => {
                        extra.push(cd_core::changeset::Change::Remove(to.clone()));
                        Ok::<_, fs::FsError>(())
                    }
                    Some(s) => {
                        extra.extend(
                            s.entries
                                .into_iter()
                                .map(cd_core::changeset::Change::Upsert),
                        );
                        Ok(())
                    }
                })?;
            }
            tracing::debug!(
                content_set = set,
                seq,
                renames = unsourced.len(),
                "renames without a source on the replicas ship their targets"
            );
            if let Some(r) = state.shipped.lock().unwrap().as_mut() {
                r.apply(seq, &extra);
            }
            resolved.changes.extend(extra);
        }
        let nm_versions = match &nm {
            Some(nm) => {
                let v = tokio::task::block_in_place(|| nm.stamp_local(seq, &resolved.changes))?;
                Some(Arc::new(transfer::OutVersions::Changes(
                    v.iter().map(crate::nm::version_pb).collect(),
                )))
            }
            None => None,
        };
        drop(nm_guard);
        let out = self.outgoing(
            &assignment,
            set,
            self.name.clone(),
            seq,
            0,
            OutBody::Incremental {
                base_seq: seq - 1,
                changes: Arc::new(resolved.changes),
            },
            root,
        );
        let out = with_versions(out, nm_versions);
        let connected_peers: Vec<pb::Peer> = assignment
            .targets
            .iter()
            .filter(|t| !t.data_addr.is_empty())
            .cloned()
            .collect();
        let mut fallback = Vec::new();
        for (peer, r, took) in self.send_all(&out, connected_peers).await {
            let mut tr = report::incremental_result(&peer.name, &r, took);
            tr.via = self.name.clone();
            tr.link_class = peer.link_class.clone();
            report.targets.push(tr);
            if let Ok(st) = &r {
                report.targets.extend(st.apply.subtree.iter().cloned());
                report.conflicts.extend(st.apply.conflicts.iter().cloned());
            }
            match r {
                Ok(st)
                    if st.apply.ok
                        && !st.need_full
                        && st.changed_since_scan == 0
                        && st.apply.skipped == 0 =>
                {
                    cut.reached();
                    // A relay answers once its subtree applied too.
                    for _ in st.apply.subtree.iter().filter(|t| t.ok) {
                        cut.reached();
                    }
                    state.sent.lock().unwrap().insert(peer.name.clone(), seq);
                }
                Ok(st) => {
                    tracing::info!(target = %peer.name, need_full = st.need_full, changed = st.changed_since_scan, error = %st.apply.error, "target gets the full tree");
                    fallback.push(peer.name);
                }
                Err(e) => {
                    tracing::warn!(target = %peer.name, error = %format!("{e:#}"), "real-time transfer failed; full tree next");
                    fallback.push(peer.name);
                }
            }
        }
        if !fallback.is_empty() {
            let incremental = std::mem::take(&mut report.targets);
            let r = self.full_rounds(set, 0, seq, Some(&fallback), report).await;
            cut.reached_all(report);
            report::merge_fallback(report, incremental);
            r?;
        }
        Ok(())
    }

    // ---- source side ------------------------------------------------------------

    /// Runs a sync job for `set` as its source: scan, then distribute to every
    /// target concurrently; repeated (up to `MAX_ROUNDS`) while files changed under it.
    pub async fn run_job(self: &Arc<Self>, set: &str, job_id: u64) -> pb::JobReport {
        let started = Instant::now();
        let mut report = pb::JobReport {
            job_id,
            content_set: set.to_owned(),
            ..Default::default()
        };
        let r = self.run_job_inner(set, job_id, &mut report).await;
        if let Err(e) = &r {
            report.error = format!("{e:#}");
            tracing::warn!(job_id, content_set = set, error = %report.error, "job failed");
        }
        let ok = report.error.is_empty() && report.targets.iter().all(|t| t.ok);
        if let Some(s) = self.sets.get(set) {
            *s.last_sync.lock().unwrap() = Some(LastSync {
                job_id,
                at_unix: now_unix(),
                ok,
                error: (!ok).then(|| {
                    if report.error.is_empty() {
                        report
                            .targets
                            .iter()
                            .filter(|t| !t.ok)
                            .map(|t| format!("{}: {}", t.target, t.error))
                            .collect::<Vec<_>>()
                            .join("; ")
                    } else {
                        report.error.clone()
                    }
                }),
                side: "source",
                files: report.targets.iter().map(|t| t.files_sent).sum(),
                bytes: report.targets.iter().map(|t| t.bytes_sent).sum(),
                duration_ms: started.elapsed().as_millis() as u64,
            });
        }
        report
    }

    async fn run_job_inner(
        self: &Arc<Self>,
        set: &str,
        job_id: u64,
        report: &mut pb::JobReport,
    ) -> anyhow::Result<()> {
        let state = self
            .sets
            .get(set)
            .with_context(|| format!("this node has no content set `{set}`"))?;
        let _busy = state.busy.lock().await;
        let seq = self.next_seq(set);
        self.full_rounds(set, job_id, seq, None, report).await
    }

    /// Sends the whole tree (scanned now) as change set `seq` to every child (every
    /// target the route table gives this node: all of them with direct routing), or
    /// to `only` those; repeated while files change under it. The source runs it for
    /// jobs and reconciles; a relay for children that need the whole tree. The report
    /// has a result per target of the whole subtree. The caller holds the set's
    /// `busy` lock.
    async fn full_rounds(
        self: &Arc<Self>,
        set: &str,
        job_id: u64,
        seq: u64,
        only: Option<&[String]>,
        report: &mut pb::JobReport,
    ) -> anyhow::Result<()> {
        let state = self
            .sets
            .get(set)
            .with_context(|| format!("this node has no content set `{set}`"))?;
        let assignment = state.assignment.lock().unwrap().clone();
        let Some(assignment) = assignment else {
            bail!("no assignment from the master yet for `{set}`")
        };
        if !assignment.is_source && assignment.targets.is_empty() {
            bail!(
                "this node is not the source of `{set}` (the source is `{}`)",
                assignment.source
            );
        }
        if job_id == 0 && assignment.is_source {
            state.full_reconciles.fetch_add(1, Ordering::Relaxed);
        }
        let mut pending: Vec<pb::Peer> = assignment
            .targets
            .iter()
            .filter(|t| only.is_none_or(|o| o.contains(&t.name)))
            .cloned()
            .collect();
        let mut results: BTreeMap<String, pb::TargetResult> = BTreeMap::new();
        for round in 1..=MAX_ROUNDS {
            let t0 = Instant::now();
            let began = t0;
            let filter = state.filter();
            // N:M: scan and version under the apply lock, so every entry's version is
            // that of what was scanned.
            let nm = self.nm(set);
            let nm_guard = match &nm {
                Some(n) => Some(n.apply_lock.lock().await),
                None => None,
            };
            let (root, manifest) = self.scan_for_targets(set, &filter)?;
            let nm_versions = match &nm {
                Some(n) => Some(Arc::new(transfer::OutVersions::Full(
                    tokio::task::block_in_place(|| n.versions_for_full(&manifest, seq, true))?,
                ))),
                None => None,
            };
            drop(nm_guard);
            if assignment.is_source {
                *state.known.lock().unwrap() = (assignment.realtime && !filter.is_noop())
                    .then(|| realtime::KnownTree::from_manifest(&manifest));
            }
            report.scan_ms += t0.elapsed().as_millis() as u64;
            report.source_entries = manifest.len() as u64;
            let every_connected = assignment
                .targets
                .iter()
                .filter(|t| !t.data_addr.is_empty())
                .all(|t| only.is_none_or(|o| o.contains(&t.name)));
            if assignment.is_source && assignment.realtime && every_connected {
                // A full change set to every connected target: the record restarts
                // from it. (A partial one, to targets that fell behind, leaves the
                // record of the incremental stream the others follow.)
                *state.shipped.lock().unwrap() = Some(Shipped::from_manifest(seq, &manifest));
            }
            report.seq = seq;
            let out = self.outgoing(
                &assignment,
                set,
                // The origin is this node as a source (one of several in N:M).
                if assignment.is_source {
                    self.name.clone()
                } else {
                    assignment.source.clone()
                },
                seq,
                job_id,
                OutBody::Full(manifest),
                Arc::new(root),
            );
            let out = with_versions(out, nm_versions);
            let mut below = Vec::new();
            let mut lost_link = false;
            for (peer, r, took) in self.send_all(&out, std::mem::take(&mut pending)).await {
                let entry = results
                    .entry(peer.name.clone())
                    .or_insert_with(|| pb::TargetResult {
                        target: peer.name.clone(),
                        ..Default::default()
                    });
                entry.via = self.name.clone();
                entry.link_class = peer.link_class.clone();
                entry.duration_ms += took.as_millis() as u64;
                match r {
                    Ok(st) => {
                        add_sent(entry, &st);
                        entry.reused_local += st.apply.reused_local;
                        entry.removed += st.apply.removed;
                        entry.meta_only += st.apply.meta_only;
                        entry.ok = st.apply.ok;
                        entry.error = st.apply.error.clone();
                        below.extend(st.apply.subtree.iter().cloned());
                        report.conflicts.extend(st.apply.conflicts.iter().cloned());
                        if st.apply.ok && st.changed_since_scan == 0 && st.apply.skipped == 0 {
                            state.sent.lock().unwrap().insert(peer.name.clone(), seq);
                            state
                                .full_done
                                .lock()
                                .unwrap()
                                .insert(peer.name.clone(), began);
                        }
                        if st.apply.ok && (st.changed_since_scan > 0 || st.apply.skipped > 0) {
                            if round < MAX_ROUNDS {
                                tracing::info!(target = %peer.name, changed = st.changed_since_scan, "files changed during the job; another round");
                                pending.push(peer);
                            } else {
                                entry.ok = false;
                                entry.error = format!(
                                    "{} files kept changing during {MAX_ROUNDS} rounds; run sync again",
                                    st.changed_since_scan.max(st.apply.skipped)
                                );
                            }
                        }
                    }
                    Err(e) => {
                        entry.ok = false;
                        entry.error = format!("{e:#}");
                        lost_link = true;
                        tracing::warn!(target = %peer.name, error = %entry.error, "transfer failed");
                    }
                }
            }
            for sub in below {
                results.insert(sub.target.clone(), sub);
            }
            if round < MAX_ROUNDS {
                // Routes may have changed under the job: a child failed on the link
                // (the master routes around it; wait for that), or a node caught up
                // or came back and was re-parented. Children this node has now that
                // the job has not reached get its change set in the next round.
                let now = if lost_link {
                    self.rerouted_children(set, &assignment.targets).await
                } else {
                    state
                        .assignment
                        .lock()
                        .unwrap()
                        .as_ref()
                        .map(|a| a.targets.clone())
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|t| !t.data_addr.is_empty())
                        .collect()
                };
                for t in now {
                    if only.is_none_or(|o| o.contains(&t.name))
                        && results.get(&t.name).is_none_or(|r| !r.ok)
                        && !pending.iter().any(|p| p.name == t.name)
                    {
                        tracing::info!(target = %t.name, "re-routed to this node during the job; another round");
                        pending.push(t);
                    }
                }
            }
            if pending.is_empty() {
                break;
            }
        }
        report.targets = results.into_values().collect();
        Ok(())
    }

    /// After a child failed: waits (briefly) for the master's new assignment and
    /// returns the children it has now that it did not have in `before`.
    async fn rerouted_children(&self, set: &str, before: &[pb::Peer]) -> Vec<pb::Peer> {
        let Some(state) = self.sets.get(set) else {
            return Vec::new();
        };
        let deadline = Instant::now() + REROUTE_WAIT;
        loop {
            let now: Vec<pb::Peer> = state
                .assignment
                .lock()
                .unwrap()
                .as_ref()
                .map(|a| a.targets.clone())
                .unwrap_or_default();
            let new: Vec<pb::Peer> = now
                .into_iter()
                .filter(|t| !t.data_addr.is_empty() && !before.iter().any(|b| b.name == t.name))
                .collect();
            if !new.is_empty() || Instant::now() >= deadline {
                return new;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// What this node sends of a content set. The policy fields are the content
    /// set's; [`send_to`](Self::send_to) replaces them with each peer's link policy.
    #[expect(
        clippy::too_many_arguments,
        reason = "one constructor for every sender"
    )]
    fn outgoing(
        &self,
        a: &pb::ContentSetAssignment,
        content_set: &str,
        origin: String,
        seq: u64,
        job_id: u64,
        body: OutBody,
        root: Arc<fs::Root>,
    ) -> Arc<Outgoing> {
        Arc::new(Outgoing {
            content_set: content_set.to_owned(),
            origin,
            seq,
            job_id,
            body,
            root,
            zstd_level: a.zstd_level,
            max_rate_bytes_per_sec: a.max_rate_bytes_per_sec,
            delta: a.delta(),
            cache: self.delta_cache.clone(),
            upstream: None,
            versions: None,
        })
    }

    /// Scans this node's tree of `set` (hashing only what changed since the index)
    /// and keeps what `filter` covers: the manifest its targets reconcile against.
    fn scan_for_targets(
        &self,
        set: &str,
        filter: &Filter,
    ) -> anyhow::Result<(fs::Root, Arc<cd_core::manifest::Manifest>)> {
        let state = self
            .sets
            .get(set)
            .with_context(|| format!("this node has no content set `{set}`"))?;
        let index_path = self.index_path(set);
        let (root, manifest) = tokio::task::block_in_place(|| -> anyhow::Result<_> {
            let root = fs::Root::open(&state.root)?;
            let mut index = fs::HashIndex::load(&index_path);
            let (manifest, stats) = fs::scan(&root, &mut index)?;
            index.save(&index_path)?;
            tracing::info!(
                content_set = set,
                entries = stats.entries,
                hashed = stats.hashed_files,
                cached = stats.cached_files,
                "scanned"
            );
            Ok((root, manifest))
        })?;
        Ok((
            root,
            Arc::new(if filter.is_everything() {
                manifest
            } else {
                filter.apply_to_manifest(&manifest)
            }),
        ))
    }

    /// Sends `out` to every peer concurrently; each result with the time it took.
    async fn send_all(
        self: &Arc<Self>,
        out: &Arc<Outgoing>,
        peers: Vec<pb::Peer>,
    ) -> Vec<(pb::Peer, anyhow::Result<transfer::SendStats>, Duration)> {
        let mut tasks = tokio::task::JoinSet::new();
        for peer in peers {
            let node = self.clone();
            let out = out.clone();
            tasks.spawn(async move {
                let t = Instant::now();
                let r = node.send_to(&peer, &out).await;
                (peer, r, t.elapsed())
            });
        }
        let mut done = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(x) => done.push(x),
                Err(e) => tracing::error!(error = %e, "transfer task panicked"),
            }
        }
        done
    }

    /// Sends `out` to one peer, with the policy of its link (zstd level, rate,
    /// deltas, encryption, as the master resolved them for its link class). A failure
    /// of the link itself is reported to the master, which routes around it.
    async fn send_to(
        &self,
        peer: &pb::Peer,
        out: &Outgoing,
    ) -> anyhow::Result<transfer::SendStats> {
        if peer.data_addr.is_empty() {
            bail!("target `{}` is not connected to the master", peer.name);
        }
        let out = Outgoing {
            zstd_level: peer.zstd_level,
            max_rate_bytes_per_sec: peer.max_rate_bytes_per_sec,
            delta: peer.delta(),
            ..out.clone()
        };
        let force_rustls = self.rustls_only.lock().unwrap().remove(&peer.name);
        let connected = net::connect_transfer(
            &peer.data_addr,
            &peer.name,
            self.client_cfg.clone(),
            &self.name,
            peer.plaintext,
            &self.transport,
            force_rustls,
        )
        .await;
        let mut conn = match connected {
            Ok((c, _)) => c,
            Err(e) => {
                self.report_link_failure(&out.content_set, &peer.name, &e);
                return Err(e.into());
            }
        };
        let r = transfer::send(&mut conn, &out).await;
        if r.is_ok() {
            conn.shutdown().await;
        }
        let stats = conn.link_stats();
        crate::metrics::get().record_send(peer, stats.map(|s| s.path), r.as_ref().ok());
        if stats.is_some_and(|s| s.budget_exhausted.load(Ordering::Relaxed)) {
            self.rustls_only.lock().unwrap().insert(peer.name.clone());
        }
        self.record_link(&peer.name, "source", &out.content_set, stats, r.is_ok());
        if let Err(transfer::TransferError::Net(e)) = &r {
            self.report_link_failure(&out.content_set, &peer.name, e);
        }
        Ok(r?)
    }

    /// Tells the master a link to a child failed (not a refusal by the child itself:
    /// that is a matter of assignments, which the master already knows).
    fn report_link_failure(&self, set: &str, child: &str, e: &NetError) {
        if matches!(e, NetError::Remote { .. }) {
            return;
        }
        if let Some(tx) = self.master_tx.lock().unwrap().as_ref() {
            let _ = tx.try_send(Msg::LinkFailure(pb::LinkFailure {
                content_set: set.to_owned(),
                child: child.to_owned(),
                error: e.to_string(),
            }));
        }
    }

    /// A relay: forwards the change set it just received from `from` to its children
    /// (reading the content from its own tree, which now holds it), as the same change
    /// set of the same origin, so each child's sequence continues. A child that cannot
    /// apply it incrementally gets the whole tree. Returns a result per target below.
    ///
    /// `from` itself is skipped if the routes made it a child meanwhile (a catch-up
    /// from a group mate that ends with the caught-up node heading the group again):
    /// it holds the change set already, and its transfer holds its content set's lock
    /// until this node answers, so sending to it would wait out [`BUSY_WAIT`].
    async fn forward(
        self: &Arc<Self>,
        begin: &pb::TransferBegin,
        from: &str,
        body: OutBody,
    ) -> Vec<pb::TargetResult> {
        self.forward_via(begin, from, body, None).await
    }

    /// A relay that forwards while it still receives (see [`relay`]): waits until its
    /// receive planned, then forwards the body as [`forward`](Self::forward) does,
    /// with content taken from its stage as it is verified. Nothing to forward if
    /// the receive ended without a plan.
    async fn forward_cut_through(
        self: &Arc<Self>,
        begin: &pb::TransferBegin,
        from: &str,
        upstream: relay::Upstream,
    ) -> Vec<pb::TargetResult> {
        match upstream.body().await {
            Some(body) => self.forward_via(begin, from, body, Some(upstream)).await,
            None => Vec::new(),
        }
    }

    /// Whether this node has children for `set` other than `from`: a relay.
    fn relays(&self, set: &str, from: &str) -> bool {
        self.sets.get(set).is_some_and(|state| {
            state
                .assignment
                .lock()
                .unwrap()
                .as_ref()
                .is_some_and(|a| a.targets.iter().any(|t| t.name != from))
        })
    }

    /// [`forward`](Self::forward), reading content that `upstream` is still receiving
    /// from the stage (cut-through), or all of it from the root (`None`).
    async fn forward_via(
        self: &Arc<Self>,
        begin: &pb::TransferBegin,
        from: &str,
        body: OutBody,
        upstream: Option<relay::Upstream>,
    ) -> Vec<pb::TargetResult> {
        let set = begin.content_set.as_str();
        let Some(state) = self.sets.get(set) else {
            return Vec::new();
        };
        let Some(mut a) = state.assignment.lock().unwrap().clone() else {
            return Vec::new();
        };
        a.targets.retain(|t| t.name != from);
        if a.targets.is_empty() {
            return Vec::new();
        }
        let root = match tokio::task::block_in_place(|| fs::Root::open(&state.root)) {
            Ok(r) => Arc::new(r),
            Err(e) => {
                return a
                    .targets
                    .iter()
                    .map(|t| failed(&self.name, t, format!("relay cannot open its root: {e}")))
                    .collect();
            }
        };
        let full = matches!(body, OutBody::Full(_));
        let out = self.outgoing(
            &a,
            set,
            begin.origin.clone(),
            begin.seq,
            begin.job_id,
            body,
            root,
        );
        let out = match upstream.clone() {
            Some(up) => Arc::new(Outgoing {
                upstream: Some(up),
                ..(*out).clone()
            }),
            None => out,
        };
        let mut results: BTreeMap<String, pb::TargetResult> = BTreeMap::new();
        let mut whole = Vec::new();
        for (peer, r, took) in self.send_all(&out, a.targets.clone()).await {
            let mut tr = pb::TargetResult {
                target: peer.name.clone(),
                via: self.name.clone(),
                link_class: peer.link_class.clone(),
                duration_ms: took.as_millis() as u64,
                ..Default::default()
            };
            match r {
                Ok(st) => {
                    add_sent(&mut tr, &st);
                    tr.reused_local = st.apply.reused_local;
                    tr.removed = st.apply.removed;
                    tr.meta_only = st.apply.meta_only;
                    tr.ok = st.apply.ok && st.apply.skipped == 0 && !st.need_full;
                    tr.error = st.apply.error.clone();
                    for sub in &st.apply.subtree {
                        results.insert(sub.target.clone(), sub.clone());
                    }
                    if st.apply.ok && !st.need_full {
                        state
                            .sent
                            .lock()
                            .unwrap()
                            .insert(peer.name.clone(), begin.seq);
                    } else if !full && !st.apply.stale {
                        whole.push(peer.name.clone());
                    }
                }
                Err(e) => tr.error = format!("{e:#}"),
            }
            results.insert(peer.name.clone(), tr);
        }
        if let Some(up) = &upstream
            && !whole.is_empty()
            && up.finished().await.is_err()
        {
            // The whole tree comes from this relay's root, which its failed transfer
            // did not bring up to date: the next round repairs these children.
            whole.clear();
        }
        if !whole.is_empty() {
            let mut report = pb::JobReport::default();
            tracing::info!(content_set = set, targets = ?whole, "children get the whole tree from this relay");
            match self
                .full_rounds(set, begin.job_id, begin.seq, Some(&whole), &mut report)
                .await
            {
                Ok(()) => {
                    for t in report.targets {
                        results.insert(t.target.clone(), t);
                    }
                }
                Err(e) => {
                    tracing::warn!(content_set = set, error = %format!("{e:#}"), "relay full round failed")
                }
            }
        }
        results.into_values().collect()
    }

    // ---- replica side -----------------------------------------------------------

    async fn accept_loop(self: Arc<Self>, listener: TcpListener, acceptor: TlsAcceptor) {
        loop {
            let (tcp, addr) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "data listener accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let node = self.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Err(e) = node.serve_transfer(tcp, &acceptor).await {
                    tracing::warn!(peer = %addr, error = %format!("{e:#}"), "refused or failed transfer");
                }
            });
        }
    }

    async fn serve_transfer(
        self: &Arc<Self>,
        tcp: tokio::net::TcpStream,
        acceptor: &TlsAcceptor,
    ) -> anyhow::Result<()> {
        let (mut conn, hello) =
            net::accept_transfer(tcp, acceptor, &self.name, &self.transport).await?;
        if hello.purpose != pb::hello::Purpose::Transfer as i32 {
            conn.send_error(
                pb::error::ErrorCode::BadRequest,
                "this port accepts transfers only",
            )
            .await;
            bail!(
                "peer `{}` opened a non-transfer session on the data port",
                hello.node_name
            );
        }
        let begin = match conn.recv_msg().await? {
            Msg::TransferBegin(b) => b,
            m => bail!(
                "expected TransferBegin from `{}`, got {}",
                hello.node_name,
                net::msg_name(&m)
            ),
        };
        let Some(state) = self.sets.get(&begin.content_set) else {
            conn.send_error(
                pb::error::ErrorCode::UnknownContentSet,
                format!("no content set `{}` here", begin.content_set),
            )
            .await;
            bail!(
                "`{}` sent unknown content set `{}`",
                hello.node_name,
                begin.content_set
            );
        };
        // From the source, or from the parent the route table gives this node; the
        // content always originates at the source.
        let (source, parent) = state
            .assignment
            .lock()
            .unwrap()
            .as_ref()
            .map(|a| (a.source.clone(), a.parent.clone()))
            .unzip();
        let from = hello.node_name.as_str();
        // N:M: from any of the sources, each sending its own writes.
        let nm_sources: Vec<String> = state
            .assignment
            .lock()
            .unwrap()
            .as_ref()
            .map(|a| a.sources.clone())
            .unwrap_or_default();
        let nm_ok = nm_sources.iter().any(|s| s == from) && begin.origin == from;
        let sender_ok = source.as_deref() == Some(from)
            || parent
                .as_deref()
                .is_some_and(|p| !p.is_empty() && p == from);
        if !nm_ok
            && (!nm_sources.is_empty() || !sender_ok || Some(&begin.origin) != source.as_ref())
        {
            conn.send_error(
                pb::error::ErrorCode::Unauthenticated,
                "you are neither the source of this content set nor this node's assigned parent",
            )
            .await;
            bail!(
                "`{from}` may not send `{}` here (source {source:?}, parent {parent:?}, origin `{}`)",
                begin.content_set,
                begin.origin
            );
        }
        // Bounded: during a change of routes two nodes may briefly send to each other,
        // each holding its own lock while it forwards; one of them gives way.
        // N:M: every source sends while it receives from the others, so a transfer
        // in waits for applies (the apply lock), not for this node's own sends.
        let nm = self.nm(&begin.content_set);
        let lock = match &nm {
            Some(n) => &n.apply_lock,
            None => &state.busy,
        };
        let Ok(_busy) = tokio::time::timeout(BUSY_WAIT, lock.lock()).await else {
            conn.send_error(
                pb::error::ErrorCode::Busy,
                format!("`{}` is busy with another transfer", begin.content_set),
            )
            .await;
            bail!(
                "`{from}`: content set `{}` busy for {BUSY_WAIT:?}; refused",
                begin.content_set
            );
        };
        let t0 = Instant::now();
        let ctx = ReceiveContext {
            root: state.root.clone(),
            index_path: self.index_path(&begin.content_set),
            state_path: self
                .state_dir
                .join(format!("applied-{}", begin.content_set)),
            owner: self.owner,
            filter: state.filter(),
            tap: None,
            nm_source: nm_sources.iter().any(|s| *s == self.name),
            nm: nm.clone(),
        };
        // Held by this transfer alone (the busy lock): take it out of the mutex so no
        // guard lives across an await; a failed transfer leaves nothing to build on.
        let mut replica = std::mem::take(&mut *state.replica.lock().unwrap());
        // N:M sets are routed directly: a node never passes on what it receives.
        let mut r = if !begin.dry_run && nm.is_none() && self.relays(&begin.content_set, from) {
            // Cut-through: the children's transfers run alongside this one and take
            // each file as soon as it is staged and verified here.
            let (tap, upstream) = relay::channel();
            let tap = Arc::new(tap);
            let ctx = ReceiveContext {
                tap: Some(tap.clone()),
                ..ctx
            };
            let receiving = async {
                let r = transfer::receive(&mut conn, &begin, &ctx, &mut replica).await;
                tap.end(r.is_ok());
                if r.is_ok() {
                    // Tell the master what this node holds now, not after its subtree
                    // (the whole state goes back below, once the forward is done).
                    state.replica.lock().unwrap().last_applied = replica.last_applied.clone();
                    self.report_progress();
                }
                r
            };
            let (r, subtree) =
                tokio::join!(receiving, self.forward_cut_through(&begin, from, upstream));
            r.map(|mut s| {
                s.forward = None;
                s.apply.subtree = subtree;
                s
            })
        } else {
            transfer::receive(&mut conn, &begin, &ctx, &mut replica).await
        };
        if r.is_err() {
            replica.local = None;
        }
        *state.replica.lock().unwrap() = replica;
        if let Ok(s) = &mut r {
            self.report_progress();
            // A relay passes the change set on before it answers, so the answer
            // covers its whole subtree.
            if let Some(body) = s.forward.take() {
                s.apply.subtree = if begin.dry_run {
                    self.forward_dry_run(&begin, from, body).await
                } else {
                    self.forward(&begin, from, body).await
                };
            }
            if let Err(e) = conn.send(Msg::ApplyResult(s.apply.clone())).await {
                r = Err(e.into());
            }
        }
        let (ok, error, files, bytes) = match &r {
            Ok(s) => (
                s.apply.ok,
                (!s.apply.ok).then(|| s.apply.error.clone()),
                s.apply.placed_files,
                s.fetched_bytes,
            ),
            Err(e) => (false, Some(e.to_string()), 0, 0),
        };
        self.record_link(
            &hello.node_name,
            "replica",
            &begin.content_set,
            conn.link_stats(),
            ok,
        );
        let link_class = state
            .assignment
            .lock()
            .unwrap()
            .as_ref()
            .filter(|a| a.parent == hello.node_name)
            .map(|a| a.parent_link_class.clone())
            .unwrap_or_default();
        let sender = pb::Peer {
            name: hello.node_name.clone(),
            link_class,
            ..Default::default()
        };
        crate::metrics::get().record_receive(&sender, conn.link_stats().map(|s| s.path), bytes);
        *state.last_sync.lock().unwrap() = Some(LastSync {
            job_id: begin.job_id,
            at_unix: now_unix(),
            ok,
            error,
            side: "replica",
            files,
            bytes,
            duration_ms: t0.elapsed().as_millis() as u64,
        });
        match r {
            Ok(s) => {
                tracing::info!(content_set = %begin.content_set, seq = begin.seq, from = %hello.node_name, fetched = s.fetched_files, placed = s.apply.placed_files, removed = s.apply.removed, "applied change set");
                Ok(())
            }
            Err(e) => {
                let code = match e {
                    transfer::TransferError::BadManifest(_)
                    | transfer::TransferError::Protocol(_) => pb::error::ErrorCode::BadRequest,
                    _ => pb::error::ErrorCode::Internal,
                };
                conn.send_error(code, e.to_string()).await;
                Err(e.into())
            }
        }
    }
}

/// `out` carrying N:M `versions`, if any.
pub(super) fn with_versions(
    out: Arc<Outgoing>,
    versions: Option<Arc<transfer::OutVersions>>,
) -> Arc<Outgoing> {
    match versions {
        None => out,
        Some(v) => Arc::new(Outgoing {
            versions: Some(v),
            ..(*out).clone()
        }),
    }
}

/// An N:M source's own writes in a captured batch: renames become a removal and the
/// moved subtree as it is now (each path then has a version of its own), and changes
/// that only re-find what this node applied from other sources (echoes) are dropped.
fn nm_local_changes(
    nm: &crate::nm::NmSet,
    root: &fs::Root,
    index: &mut fs::HashIndex,
    changes: Vec<cd_core::changeset::Change>,
) -> anyhow::Result<Vec<cd_core::changeset::Change>> {
    use cd_core::changeset::Change;
    let mut out = Vec::with_capacity(changes.len());
    for c in changes {
        match c {
            Change::Rename { from, to } => {
                out.push(Change::Remove(from));
                match fs::scan_subtree(root, &to, index)? {
                    None => out.push(Change::Remove(to)),
                    Some(s) => out.extend(s.entries.into_iter().map(Change::Upsert)),
                }
            }
            c => out.push(c),
        }
    }
    out.retain(|c| !nm.is_echo(c));
    Ok(out)
}

/// Adds what a transfer sent to a target's result.
fn add_sent(entry: &mut pb::TargetResult, st: &transfer::SendStats) {
    entry.files_sent += st.files_sent;
    entry.bytes_sent += st.bytes_sent;
    entry.wire_bytes += st.wire_bytes;
    entry.resent += st.resent;
    entry.delta_files += st.delta_files;
    entry.delta_bytes += st.delta_bytes;
    entry.patch_bytes += st.patch_bytes;
    entry.signature_exchanges += st.signature_exchanges;
}

/// A target's result when nothing could be sent to it.
fn failed(via: &str, peer: &pb::Peer, error: String) -> pb::TargetResult {
    pb::TargetResult {
        target: peer.name.clone(),
        via: via.to_owned(),
        link_class: peer.link_class.clone(),
        error,
        ..Default::default()
    }
}

/// Loads the node's certificate, or joins the cluster with the configured token.
async fn ensure_identity(
    name: &str,
    state_dir: &Path,
    cfg: &NodeConfig,
) -> anyhow::Result<Identity> {
    let [key, cert, ca] = pki::NODE_FILES.map(|f| state_dir.join(f));
    if !cert.exists() {
        let token = cfg.join_token.as_deref().with_context(|| {
            format!("{} has no certificate yet: set node.join_token (from `cdctl token create` on the master)", state_dir.display())
        })?;
        join(name, state_dir, cfg, token).await?;
    }
    Ok(Identity::load(name, &cert, &key, &ca)?)
}

/// Redeems a join token: verifies the master by the CA pin in the token, sends the
/// token and the node's public key, stores the certificate it gets back.
pub async fn join(
    name: &str,
    state_dir: &Path,
    cfg: &NodeConfig,
    token: &str,
) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let parsed = pki::JoinToken::parse(token)?;
    let (key_pem, spki) = pki::generate_node_key()?;
    let (tls, verifier) = pki::join_client_config(parsed.ca_pin)?;
    let mut conn = net::connect(&cfg.master_addr, &cfg.master_name, tls)
        .await
        .context("join: connect to master")?;
    conn.client_hello(name, pb::hello::Purpose::Join).await?;
    conn.send(Msg::JoinRequest(pb::JoinRequest {
        token: token.trim().to_owned(),
        node_name: name.to_owned(),
        public_key_spki: spki,
    }))
    .await?;
    let resp = match conn
        .recv_msg()
        .await
        .context("join: waiting for the master's answer")?
    {
        Msg::JoinResponse(r) => r,
        m => bail!("join: expected JoinResponse, got {}", net::msg_name(&m)),
    };
    let pinned = verifier.ca().context("join: master CA was not verified")?;
    let ca = rustls_pki_types::CertificateDer::from_pem_slice(resp.ca_cert_pem.as_bytes())
        .context("join: CA from master")?;
    if ca.as_ref() != pinned.as_ref() {
        bail!("join: the master sent a CA that differs from the one it presented");
    }
    std::fs::create_dir_all(state_dir)?;
    let write = |file: &str, body: &str, mode: u32| -> anyhow::Result<()> {
        use std::io::Write;
        let p = state_dir.join(file);
        let tmp = state_dir.join(format!("{file}.tmp"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(body.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &p).with_context(|| format!("store {}", p.display()))
    };
    write("node.key", &key_pem, 0o600)?;
    write("ca.pem", &resp.ca_cert_pem, 0o644)?;
    // The certificate last: its presence means "joined".
    write("node.pem", &resp.node_cert_pem, 0o644)?;
    tracing::info!(node = name, "joined the cluster");
    Ok(())
}

use rustls_pki_types::pem::PemObject as _;
