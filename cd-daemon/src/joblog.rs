//! The master's job log: every job, what it did to each target, and cluster events,
//! in SQLite (`<state_dir>/joblog.sqlite`, WAL, `synchronous=NORMAL`).
//!
//! - **Jobs** get their id here. Ids are SQLite row ids handed out from a counter that
//!   starts above the largest id on disk, so they keep growing across master restarts
//!   and [`JobLog::begin_job`] returns one without waiting for the disk.
//! - **One writer thread** owns the connection. Callers on async threads only send it
//!   messages: writes are fire-and-forget (batched into one transaction per wake-up),
//!   reads ([`JobLog::jobs`], [`JobLog::job`], [`JobLog::stats`]) wait for an answer on
//!   a oneshot channel and see every write sent before them. Dropping the [`JobLog`]
//!   flushes what is queued and joins the thread.
//! - **Retention**: jobs that started, and events that happened, more than
//!   `retention_days` ago are deleted when the log opens and every hour after; so are
//!   monitor samples older than `history_days` (`[master.monitor]`).
//! - **Samples**: every node's monitor samples (table `samples`), for `cdctl health`.
//! - A job still `running` when the log opens was cut short by a master restart: it is
//!   marked `failed` with that reason.
//!
//! The schema is versioned with `PRAGMA user_version`; a log written by a newer `cdd`
//! is refused rather than misread.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use cd_proto::pb;
use rusqlite::{Connection, OptionalExtension, params};
use serde_json::{Value, json};

/// The schema this build writes (2: the `samples` table).
const SCHEMA_VERSION: i64 = 2;
/// The default of `[master.monitor] history_days`.
pub const DEFAULT_HISTORY_DAYS: u32 = 7;
/// How often old rows are pruned while running.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// The default of `job_log_retention_days`.
pub const DEFAULT_RETENTION_DAYS: u32 = 30;
/// Jobs returned by [`JobLog::jobs`] when no limit is given, and at most.
pub const DEFAULT_LIMIT: usize = 50;
pub const MAX_LIMIT: usize = 10_000;

const SCHEMA: &str = "
CREATE TABLE jobs (
    id              INTEGER PRIMARY KEY,
    kind            TEXT NOT NULL,
    content_set     TEXT NOT NULL,
    source          TEXT NOT NULL,
    seq             INTEGER NOT NULL DEFAULT 0,
    state           TEXT NOT NULL CHECK (state IN ('running', 'ok', 'failed')),
    started_ms      INTEGER NOT NULL,
    finished_ms     INTEGER,
    error           TEXT NOT NULL DEFAULT '',
    source_entries  INTEGER NOT NULL DEFAULT 0,
    scan_ms         INTEGER NOT NULL DEFAULT 0,
    changes         INTEGER NOT NULL DEFAULT 0,
    targets         INTEGER NOT NULL DEFAULT 0,
    targets_failed  INTEGER NOT NULL DEFAULT 0,
    files           INTEGER NOT NULL DEFAULT 0,
    bytes           INTEGER NOT NULL DEFAULT 0,
    wire_bytes      INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX jobs_by_set ON jobs (content_set, id);
CREATE INDEX jobs_by_start ON jobs (started_ms);
CREATE TABLE job_targets (
    job_id              INTEGER NOT NULL,
    target              TEXT NOT NULL,
    via                 TEXT NOT NULL,
    link_class          TEXT NOT NULL DEFAULT '',
    ok                  INTEGER NOT NULL,
    error               TEXT NOT NULL DEFAULT '',
    files               INTEGER NOT NULL DEFAULT 0,
    bytes               INTEGER NOT NULL DEFAULT 0,
    wire_bytes          INTEGER NOT NULL DEFAULT 0,
    reused_local        INTEGER NOT NULL DEFAULT 0,
    removed             INTEGER NOT NULL DEFAULT 0,
    meta_only           INTEGER NOT NULL DEFAULT 0,
    resent              INTEGER NOT NULL DEFAULT 0,
    delta_files         INTEGER NOT NULL DEFAULT 0,
    delta_bytes         INTEGER NOT NULL DEFAULT 0,
    patch_bytes         INTEGER NOT NULL DEFAULT 0,
    signature_exchanges INTEGER NOT NULL DEFAULT 0,
    duration_ms         INTEGER NOT NULL DEFAULT 0,
    planned             TEXT,
    PRIMARY KEY (job_id, target)
);
CREATE INDEX job_targets_by_link ON job_targets (via, target);
CREATE TABLE events (
    id          INTEGER PRIMARY KEY,
    at_ms       INTEGER NOT NULL,
    kind        TEXT NOT NULL,
    node        TEXT,
    content_set TEXT,
    job_id      INTEGER,
    detail      TEXT NOT NULL
);
CREATE INDEX events_by_time ON events (at_ms);
CREATE INDEX events_by_job ON events (job_id);
";

/// Version 2: monitor samples. NULL: not measured in that sample.
const SCHEMA_SAMPLES: &str = "
CREATE TABLE samples (
    at_ms       INTEGER NOT NULL,
    node        TEXT NOT NULL,
    cpu_busy    REAL,
    mem_used    REAL,
    load1       REAL,
    load5       REAL,
    load15      REAL,
    disk_used   REAL,
    sessions    INTEGER,
    detail      TEXT NOT NULL
);
CREATE INDEX samples_by_node ON samples (node, at_ms);
CREATE INDEX samples_by_time ON samples (at_ms);
";

/// What started a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    /// `cdctl sync`.
    Sync,
    /// A scheduled content set's timer.
    Scheduled,
    /// A change set of the real-time stream (reported by the source).
    Realtime,
    /// A full round for targets that reconnected (reported by the source).
    CatchUp,
    /// `cdctl sync --dry-run`.
    DryRun,
}

impl JobKind {
    pub const ALL: [JobKind; 5] = [
        JobKind::Sync,
        JobKind::Scheduled,
        JobKind::Realtime,
        JobKind::CatchUp,
        JobKind::DryRun,
    ];

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Sync => "sync",
            JobKind::Scheduled => "scheduled",
            JobKind::Realtime => "realtime",
            JobKind::CatchUp => "catch_up",
            JobKind::DryRun => "dry_run",
        }
    }

    /// The kind a `JobReport.kind` names; empty means `sync`.
    #[must_use]
    pub fn parse(s: &str) -> Option<JobKind> {
        if s.is_empty() {
            return Some(JobKind::Sync);
        }
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// Which jobs [`JobLog::jobs`] lists (newest first).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JobQuery {
    pub content_set: Option<String>,
    /// 0 = [`DEFAULT_LIMIT`]; at most [`MAX_LIMIT`].
    #[serde(default)]
    pub limit: usize,
    /// Only jobs that failed.
    #[serde(default)]
    pub failed: bool,
}

type ReadFn = Box<dyn FnOnce(&Connection) + Send>;

enum Op {
    Begin {
        id: u64,
        kind: JobKind,
        set: String,
        source: String,
        at_ms: i64,
    },
    Finish {
        id: u64,
        report: Box<pb::JobReport>,
        at_ms: i64,
    },
    Record {
        id: u64,
        kind: JobKind,
        source: String,
        report: Box<pb::JobReport>,
        at_ms: i64,
    },
    Fail {
        id: u64,
        error: String,
        at_ms: i64,
    },
    Event {
        at_ms: i64,
        kind: String,
        node: Option<String>,
        set: Option<String>,
        job: Option<u64>,
        detail: String,
    },
    Sample {
        at_ms: i64,
        node: String,
        sample: Box<pb::MonitorSample>,
    },
    Read(ReadFn),
}

/// The job log. See the module docs.
#[derive(Debug)]
pub struct JobLog {
    path: PathBuf,
    next_id: AtomicU64,
    tx: Mutex<Option<mpsc::Sender<Op>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

/// Now, in Unix milliseconds.
#[must_use]
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl JobLog {
    /// Opens (creating it if needed) the log at `path` with the default retention.
    pub fn open(path: &Path) -> anyhow::Result<JobLog> {
        Self::open_with(path, DEFAULT_RETENTION_DAYS)
    }

    /// Opens the log, keeping `retention_days` of jobs and events.
    pub fn open_with(path: &Path, retention_days: u32) -> anyhow::Result<JobLog> {
        Self::open_keeping(path, retention_days, DEFAULT_HISTORY_DAYS)
    }

    /// Opens the log, keeping `retention_days` of jobs and events and `history_days`
    /// of monitor samples.
    pub fn open_keeping(
        path: &Path,
        retention_days: u32,
        history_days: u32,
    ) -> anyhow::Result<JobLog> {
        let ctx = || format!("job log {}", path.display());
        let conn = Connection::open(path).with_context(ctx)?;
        setup(&conn).with_context(ctx)?;
        let max: i64 = conn
            .query_row("SELECT COALESCE(MAX(id), 0) FROM jobs", [], |r| r.get(0))
            .with_context(ctx)?;
        let interrupted = conn
            .execute(
                "UPDATE jobs SET state = 'failed', finished_ms = ?1,
                 error = 'the master stopped before the job finished'
                 WHERE state = 'running'",
                [now_ms()],
            )
            .with_context(ctx)?;
        if interrupted > 0 {
            tracing::warn!(
                jobs = interrupted,
                "job log: jobs cut short by a master restart marked failed"
            );
        }
        let retention = Retention {
            log_ms: i64::from(retention_days.max(1)) * 86_400_000,
            samples_ms: i64::from(history_days.max(1)) * 86_400_000,
        };
        prune(&conn, now_ms(), retention).with_context(ctx)?;
        let (tx, rx) = mpsc::channel();
        let writer = std::thread::Builder::new()
            .name("cdd-joblog".into())
            .spawn(move || writer(conn, rx, retention))
            .with_context(ctx)?;
        tracing::info!(path = %path.display(), next_job = max + 1, retention_days, "job log open");
        Ok(JobLog {
            path: path.to_owned(),
            next_id: AtomicU64::new(max as u64 + 1),
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
        })
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn send(&self, op: Op) {
        let sent = self
            .tx
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|tx| tx.send(op).is_ok());
        if !sent {
            tracing::error!("job log writer is gone; entry lost");
        }
    }

    /// Records a job that starts now (state `running`) and returns its id.
    pub fn begin_job(&self, kind: JobKind, set: &str, source: &str) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.send(Op::Begin {
            id,
            kind,
            set: set.to_owned(),
            source: source.to_owned(),
            at_ms: now_ms(),
        });
        id
    }

    /// Finishes job `id` with the source's report: `ok` when the report has no error
    /// and every target succeeded, else `failed`.
    pub fn finish_job(&self, id: u64, report: &pb::JobReport) {
        self.send(Op::Finish {
            id,
            report: Box::new(report.clone()),
            at_ms: now_ms(),
        });
    }

    /// Marks job `id` failed without a report (the source disconnected or timed out).
    pub fn fail_job(&self, id: u64, error: &str) {
        self.send(Op::Fail {
            id,
            error: error.to_owned(),
            at_ms: now_ms(),
        });
    }

    /// Records a finished job that had no [`begin_job`](Self::begin_job) (a source's
    /// real-time or catch-up round) and returns its id.
    pub fn record_report(&self, kind: JobKind, source: &str, report: &pb::JobReport) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.send(Op::Record {
            id,
            kind,
            source: source.to_owned(),
            report: Box::new(report.clone()),
            at_ms: now_ms(),
        });
        id
    }

    /// Records a cluster event (routing, failover, catch-up, conflict, skipped
    /// schedule…) that happens now.
    pub fn event(
        &self,
        kind: &str,
        node: Option<&str>,
        content_set: Option<&str>,
        job: Option<u64>,
        detail: &str,
    ) {
        self.send(Op::Event {
            at_ms: now_ms(),
            kind: kind.to_owned(),
            node: node.map(str::to_owned),
            set: content_set.map(str::to_owned),
            job,
            detail: detail.to_owned(),
        });
    }

    /// Records a monitor sample of `node` received at `at_ms` (Unix milliseconds).
    pub fn sample(&self, node: &str, at_ms: i64, sample: &pb::MonitorSample) {
        self.send(Op::Sample {
            at_ms,
            node: node.to_owned(),
            sample: Box::new(sample.clone()),
        });
    }

    /// Per node (or only `node`): how many samples the log holds, over which span,
    /// and the mean and peak of each value, with the newest few samples.
    pub async fn sample_summary(
        &self,
        node: Option<String>,
    ) -> anyhow::Result<serde_json::Map<String, Value>> {
        self.read(move |c| {
            let mut out = serde_json::Map::new();
            let mut st = c.prepare(
                "SELECT node, COUNT(*), MIN(at_ms), MAX(at_ms),
                        AVG(load1), MAX(load1), AVG(cpu_busy), MAX(cpu_busy),
                        AVG(mem_used), MAX(mem_used), MAX(disk_used), MAX(sessions)
                 FROM samples WHERE ?1 IS NULL OR node = ?1 GROUP BY node ORDER BY node",
            )?;
            let rows = st.query_map([&node], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    json!({
                        "samples": r.get::<_, i64>(1)?,
                        "first_ms": r.get::<_, i64>(2)?,
                        "last_ms": r.get::<_, i64>(3)?,
                        "load1": {"mean": r.get::<_, Option<f64>>(4)?, "max": r.get::<_, Option<f64>>(5)?},
                        "cpu_busy_ratio": {"mean": r.get::<_, Option<f64>>(6)?, "max": r.get::<_, Option<f64>>(7)?},
                        "memory_used_ratio": {"mean": r.get::<_, Option<f64>>(8)?, "max": r.get::<_, Option<f64>>(9)?},
                        "disk_used_ratio": {"max": r.get::<_, Option<f64>>(10)?},
                        "sessions": {"max": r.get::<_, Option<i64>>(11)?},
                    }),
                ))
            })?;
            for row in rows {
                let (n, v) = row?;
                out.insert(n, v);
            }
            let mut recent = c.prepare(
                "SELECT at_ms, load1, cpu_busy, mem_used, disk_used, sessions FROM samples
                 WHERE node = ?1 ORDER BY at_ms DESC LIMIT 10",
            )?;
            for (n, v) in out.iter_mut() {
                let rows: Vec<Value> = recent
                    .query_map([n], |r| {
                        Ok(json!({
                            "at_ms": r.get::<_, i64>(0)?,
                            "load1": r.get::<_, Option<f64>>(1)?,
                            "cpu_busy_ratio": r.get::<_, Option<f64>>(2)?,
                            "memory_used_ratio": r.get::<_, Option<f64>>(3)?,
                            "disk_used_ratio": r.get::<_, Option<f64>>(4)?,
                            "sessions": r.get::<_, Option<i64>>(5)?,
                        }))
                    })?
                    .collect::<rusqlite::Result<_>>()?;
                v["recent"] = Value::Array(rows);
            }
            Ok(out)
        })
        .await
    }

    /// Runs `f` on the writer thread after every write sent before it.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(Op::Read(Box::new(move |c| {
            let _ = tx.send(f(c));
        })));
        rx.await
            .context("job log writer is gone")?
            .with_context(|| format!("job log {}", self.path.display()))
    }

    /// Jobs matching `q`, newest first.
    pub async fn jobs(&self, q: JobQuery) -> anyhow::Result<Vec<Value>> {
        self.read(move |c| {
            let limit = match q.limit {
                0 => DEFAULT_LIMIT,
                n => n.min(MAX_LIMIT),
            };
            let mut st = c.prepare(&format!(
                "SELECT {JOB_COLUMNS} FROM jobs
                 WHERE (?1 IS NULL OR content_set = ?1) AND (?2 = 0 OR state = 'failed')
                 ORDER BY id DESC LIMIT ?3"
            ))?;
            st.query_map(params![q.content_set, q.failed, limit as i64], job_json)?
                .collect()
        })
        .await
    }

    /// Job `id` with its targets and its events: those naming it, and those of its
    /// content set within its time window.
    pub async fn job(&self, id: u64) -> anyhow::Result<Option<Value>> {
        self.read(move |c| {
            let job = c
                .query_row(
                    &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"),
                    [id as i64],
                    job_json,
                )
                .optional()?;
            let Some(mut job) = job else { return Ok(None) };
            let mut st = c.prepare(
                "SELECT target, via, link_class, ok, error, files, bytes, wire_bytes,
                        reused_local, removed, meta_only, resent, delta_files, delta_bytes,
                        patch_bytes, signature_exchanges, duration_ms, planned
                 FROM job_targets WHERE job_id = ?1 ORDER BY rowid",
            )?;
            let targets: Vec<Value> = st
                .query_map([id as i64], |r| {
                    let planned: Option<String> = r.get(17)?;
                    Ok(json!({
                        "target": r.get::<_, String>(0)?,
                        "via": r.get::<_, String>(1)?,
                        "link_class": r.get::<_, String>(2)?,
                        "ok": r.get::<_, bool>(3)?,
                        "error": r.get::<_, String>(4)?,
                        "files_sent": r.get::<_, i64>(5)?,
                        "bytes_sent": r.get::<_, i64>(6)?,
                        "wire_bytes": r.get::<_, i64>(7)?,
                        "reused_local": r.get::<_, i64>(8)?,
                        "removed": r.get::<_, i64>(9)?,
                        "meta_only": r.get::<_, i64>(10)?,
                        "resent": r.get::<_, i64>(11)?,
                        "delta_files": r.get::<_, i64>(12)?,
                        "delta_bytes": r.get::<_, i64>(13)?,
                        "patch_bytes": r.get::<_, i64>(14)?,
                        "signature_exchanges": r.get::<_, i64>(15)?,
                        "duration_ms": r.get::<_, i64>(16)?,
                        "planned": planned.and_then(|p: String| serde_json::from_str::<Value>(&p).ok()),
                    }))
                })?
                .collect::<rusqlite::Result<_>>()?;
            let started = job["started_unix_ms"].as_i64().unwrap_or(0);
            let finished = job["finished_unix_ms"].as_i64().unwrap_or(i64::MAX);
            let set = job["content_set"].as_str().unwrap_or_default().to_owned();
            let mut st = c.prepare(
                "SELECT id, at_ms, kind, node, content_set, job_id, detail FROM events
                 WHERE job_id = ?1
                    OR (job_id IS NULL AND (content_set = ?2 OR content_set IS NULL)
                        AND at_ms BETWEEN ?3 AND ?4)
                 ORDER BY at_ms, id",
            )?;
            let events: Vec<Value> = st
                .query_map(params![id as i64, set, started, finished], event_json)?
                .collect::<rusqlite::Result<_>>()?;
            if let Some(o) = job.as_object_mut() {
                o.insert("targets".into(), Value::Array(targets));
                o.insert("events".into(), Value::Array(events));
            }
            Ok(Some(job))
        })
        .await
    }

    /// The newest `limit` events, newest first.
    pub async fn events(&self, limit: usize) -> anyhow::Result<Vec<Value>> {
        self.read(move |c| {
            let mut st = c.prepare(
                "SELECT id, at_ms, kind, node, content_set, job_id, detail FROM events
                 ORDER BY id DESC LIMIT ?1",
            )?;
            st.query_map([limit.clamp(1, MAX_LIMIT) as i64], event_json)?
                .collect()
        })
        .await
    }

    /// The newest `limit` events whose kind starts with `prefix`, newest first.
    pub async fn events_of_kind(&self, prefix: &str, limit: usize) -> anyhow::Result<Vec<Value>> {
        let pattern = format!(
            "{}%",
            prefix
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_")
        );
        self.read(move |c| {
            let mut st = c.prepare(
                "SELECT id, at_ms, kind, node, content_set, job_id, detail FROM events
                 WHERE kind LIKE ?1 ESCAPE '\\' ORDER BY id DESC LIMIT ?2",
            )?;
            st.query_map(
                rusqlite::params![pattern, limit.clamp(1, MAX_LIMIT) as i64],
                event_json,
            )?
            .collect()
        })
        .await
    }

    /// Statistics over the retained log (dry runs left out): per node (as a target:
    /// transfers, bytes received, failures, last success; as a source: jobs) and per
    /// link `via → target` (transfers, bytes, wire bytes, failures, mean duration).
    pub async fn stats(&self) -> anyhow::Result<Value> {
        self.read(|c| {
            let mut nodes = serde_json::Map::new();
            let mut st = c.prepare(
                "SELECT t.target, COUNT(*), SUM(t.bytes), SUM(t.ok = 0),
                        MAX(CASE WHEN t.ok THEN j.finished_ms END)
                 FROM job_targets t JOIN jobs j ON j.id = t.job_id
                 WHERE j.kind != 'dry_run' GROUP BY t.target ORDER BY t.target",
            )?;
            let rows = st.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Option<i64>>(2)?.unwrap_or(0),
                    r.get::<_, Option<i64>>(3)?.unwrap_or(0),
                    r.get::<_, Option<i64>>(4)?,
                ))
            })?;
            for row in rows {
                let (name, jobs, bytes, failures, last_ok) = row?;
                nodes.insert(
                    name.clone(),
                    json!({"name": name, "jobs": jobs, "bytes_received": bytes,
                           "failures": failures, "last_ok_unix_ms": last_ok,
                           "jobs_as_source": 0, "source_failures": 0}),
                );
            }
            let mut st = c.prepare(
                "SELECT source, COUNT(*), SUM(state = 'failed') FROM jobs
                 WHERE kind != 'dry_run' GROUP BY source",
            )?;
            let rows = st.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Option<i64>>(2)?.unwrap_or(0),
                ))
            })?;
            for row in rows {
                let (name, jobs, failed) = row?;
                let e = nodes.entry(name.clone()).or_insert_with(|| {
                    json!({"name": name, "jobs": 0, "bytes_received": 0, "failures": 0,
                           "last_ok_unix_ms": null})
                });
                e["jobs_as_source"] = jobs.into();
                e["source_failures"] = failed.into();
            }
            let mut st = c.prepare(
                "SELECT t.via, t.target, MAX(t.link_class), COUNT(*), SUM(t.bytes),
                        SUM(t.wire_bytes), SUM(t.ok = 0), AVG(t.duration_ms)
                 FROM job_targets t JOIN jobs j ON j.id = t.job_id
                 WHERE j.kind != 'dry_run' GROUP BY t.via, t.target ORDER BY t.via, t.target",
            )?;
            let links: Vec<Value> = st
                .query_map([], |r| {
                    Ok(json!({
                        "via": r.get::<_, String>(0)?,
                        "target": r.get::<_, String>(1)?,
                        "link_class": r.get::<_, String>(2)?,
                        "transfers": r.get::<_, i64>(3)?,
                        "bytes": r.get::<_, Option<i64>>(4)?.unwrap_or(0),
                        "wire_bytes": r.get::<_, Option<i64>>(5)?.unwrap_or(0),
                        "failures": r.get::<_, Option<i64>>(6)?.unwrap_or(0),
                        "mean_duration_ms": r.get::<_, Option<f64>>(7)?.unwrap_or(0.0).round() as i64,
                    }))
                })?
                .collect::<rusqlite::Result<_>>()?;
            let (jobs, failed): (i64, i64) = c.query_row(
                "SELECT COUNT(*), COALESCE(SUM(state = 'failed'), 0) FROM jobs",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            Ok(json!({
                "jobs": jobs,
                "failed_jobs": failed,
                "nodes": nodes.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
                "links": links,
            }))
        })
        .await
    }

    /// The newest finished job of each content set (for `status` after a restart).
    pub async fn last_per_set(&self) -> anyhow::Result<Vec<Value>> {
        self.read(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE id IN
                 (SELECT MAX(id) FROM jobs WHERE state != 'running' GROUP BY content_set)"
            ))?;
            st.query_map([], job_json)?.collect()
        })
        .await
    }
}

impl Drop for JobLog {
    fn drop(&mut self) {
        // Closing the channel ends the writer after everything queued is written.
        drop(self.tx.lock().unwrap().take());
        if let Some(h) = self.writer.lock().unwrap().take() {
            let _ = h.join();
        }
    }
}

const JOB_COLUMNS: &str = "id, kind, content_set, source, seq, state, started_ms, finished_ms, \
     error, source_entries, scan_ms, changes, targets, targets_failed, files, bytes, wire_bytes";

fn job_json(r: &rusqlite::Row<'_>) -> rusqlite::Result<Value> {
    let started: i64 = r.get(6)?;
    let finished: Option<i64> = r.get(7)?;
    let state: String = r.get(5)?;
    Ok(json!({
        "job_id": r.get::<_, i64>(0)?,
        "kind": r.get::<_, String>(1)?,
        "content_set": r.get::<_, String>(2)?,
        "source": r.get::<_, String>(3)?,
        "seq": r.get::<_, i64>(4)?,
        "ok": state == "ok",
        "state": state,
        "started_unix_ms": started,
        "finished_unix_ms": finished,
        "duration_ms": finished.map(|f| (f - started).max(0)),
        "error": r.get::<_, String>(8)?,
        "source_entries": r.get::<_, i64>(9)?,
        "scan_ms": r.get::<_, i64>(10)?,
        "changes": r.get::<_, i64>(11)?,
        "target_count": r.get::<_, i64>(12)?,
        "targets_failed": r.get::<_, i64>(13)?,
        "files": r.get::<_, i64>(14)?,
        "bytes": r.get::<_, i64>(15)?,
        "wire_bytes": r.get::<_, i64>(16)?,
    }))
}

fn event_json(r: &rusqlite::Row<'_>) -> rusqlite::Result<Value> {
    Ok(json!({
        "id": r.get::<_, i64>(0)?,
        "at_unix_ms": r.get::<_, i64>(1)?,
        "kind": r.get::<_, String>(2)?,
        "node": r.get::<_, Option<String>>(3)?,
        "content_set": r.get::<_, Option<String>>(4)?,
        "job_id": r.get::<_, Option<i64>>(5)?,
        "detail": r.get::<_, String>(6)?,
    }))
}

/// WAL, `synchronous=NORMAL`, and the schema at [`SCHEMA_VERSION`].
fn setup(conn: &Connection) -> anyhow::Result<()> {
    conn.busy_timeout(Duration::from_secs(5))?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    anyhow::ensure!(
        mode.eq_ignore_ascii_case("wal"),
        "cannot switch to WAL (journal mode stays {mode})"
    );
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    match version {
        0 => {
            let tx = conn.unchecked_transaction()?;
            tx.execute_batch(SCHEMA)?;
            tx.execute_batch(SCHEMA_SAMPLES)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
            tx.commit()?;
        }
        1 => {
            let tx = conn.unchecked_transaction()?;
            tx.execute_batch(SCHEMA_SAMPLES)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
            tx.commit()?;
        }
        SCHEMA_VERSION => {}
        v if v > SCHEMA_VERSION => anyhow::bail!(
            "schema version {v} was written by a newer cdd (this one knows {SCHEMA_VERSION}); \
             move the file aside to start a new log"
        ),
        v => anyhow::bail!("unknown schema version {v}"),
    }
    Ok(())
}

/// How long rows are kept.
#[derive(Debug, Clone, Copy)]
struct Retention {
    /// Jobs and events.
    log_ms: i64,
    samples_ms: i64,
}

/// Deletes jobs that started, and events that happened, before `now_ms` less the
/// retention, and samples older than their own.
fn prune(conn: &Connection, now_ms: i64, keep: Retention) -> rusqlite::Result<()> {
    let cutoff_ms = now_ms - keep.log_ms;
    let tx = conn.unchecked_transaction()?;
    let samples = tx.execute(
        "DELETE FROM samples WHERE at_ms < ?1",
        [now_ms - keep.samples_ms],
    )?;
    tx.execute(
        "DELETE FROM job_targets WHERE job_id IN
         (SELECT id FROM jobs WHERE started_ms < ?1 AND state != 'running')",
        [cutoff_ms],
    )?;
    let jobs = tx.execute(
        "DELETE FROM jobs WHERE started_ms < ?1 AND state != 'running'",
        [cutoff_ms],
    )?;
    let events = tx.execute("DELETE FROM events WHERE at_ms < ?1", [cutoff_ms])?;
    tx.commit()?;
    if jobs + events + samples > 0 {
        tracing::info!(
            jobs,
            events,
            samples,
            "job log: pruned entries past retention"
        );
    }
    Ok(())
}

fn writer(conn: Connection, rx: mpsc::Receiver<Op>, retention: Retention) {
    let mut pruned = Instant::now();
    loop {
        let first = match rx.recv_timeout(PRUNE_EVERY.saturating_sub(pruned.elapsed())) {
            Ok(op) => Some(op),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        if pruned.elapsed() >= PRUNE_EVERY {
            pruned = Instant::now();
            if let Err(e) = prune(&conn, now_ms(), retention) {
                tracing::warn!(error = %e, "job log: prune failed");
            }
        }
        // Everything queued now goes into one transaction; reads run after the writes
        // sent before them are committed.
        let mut batch: Vec<Op> = first.into_iter().collect();
        batch.extend(rx.try_iter());
        let mut writes = Vec::new();
        for op in batch {
            match op {
                Op::Read(f) => {
                    commit(&conn, std::mem::take(&mut writes));
                    f(&conn);
                }
                w => writes.push(w),
            }
        }
        commit(&conn, writes);
    }
}

fn commit(conn: &Connection, writes: Vec<Op>) {
    if writes.is_empty() {
        return;
    }
    let r = (|| -> rusqlite::Result<()> {
        let tx = conn.unchecked_transaction()?;
        for w in &writes {
            apply(&tx, w)?;
        }
        tx.commit()
    })();
    if let Err(e) = r {
        tracing::error!(error = %e, entries = writes.len(), "job log: write failed; entries lost");
    }
}

fn apply(c: &Connection, op: &Op) -> rusqlite::Result<()> {
    match op {
        Op::Begin {
            id,
            kind,
            set,
            source,
            at_ms,
        } => {
            c.execute(
                "INSERT INTO jobs (id, kind, content_set, source, state, started_ms)
                 VALUES (?1, ?2, ?3, ?4, 'running', ?5)",
                params![*id as i64, kind.as_str(), set, source, at_ms],
            )?;
        }
        Op::Finish { id, report, at_ms } => finish(c, *id, report, None, *at_ms)?,
        Op::Record {
            id,
            kind,
            source,
            report,
            at_ms,
        } => {
            let started = if report.started_unix_ms > 0 {
                report.started_unix_ms
            } else {
                *at_ms
            };
            c.execute(
                "INSERT INTO jobs (id, kind, content_set, source, state, started_ms)
                 VALUES (?1, ?2, ?3, ?4, 'running', ?5)",
                params![
                    *id as i64,
                    kind.as_str(),
                    report.content_set,
                    source,
                    started
                ],
            )?;
            finish(c, *id, report, Some(source), *at_ms)?;
        }
        Op::Fail { id, error, at_ms } => {
            c.execute(
                "UPDATE jobs SET state = 'failed', error = ?2, finished_ms = ?3
                 WHERE id = ?1 AND state = 'running'",
                params![*id as i64, error, at_ms],
            )?;
        }
        Op::Event {
            at_ms,
            kind,
            node,
            set,
            job,
            detail,
        } => {
            c.execute(
                "INSERT INTO events (at_ms, kind, node, content_set, job_id, detail)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![at_ms, kind, node, set, job.map(|j| j as i64), detail],
            )?;
        }
        Op::Sample {
            at_ms,
            node,
            sample,
        } => {
            use crate::config::Metric;
            use crate::monitor::metric_value;
            let v = |m| metric_value(sample, m);
            let detail = json!({"disks": sample.disks.iter().map(|d| json!({
                "content_set": d.content_set, "used_ratio": d.used_ratio,
                "available_bytes": d.available_bytes})).collect::<Vec<_>>(),
                "unavailable": sample.unavailable});
            c.execute(
                "INSERT INTO samples (at_ms, node, cpu_busy, mem_used, load1, load5, load15,
                 disk_used, sessions, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    at_ms,
                    node,
                    v(Metric::CpuBusyRatio),
                    v(Metric::MemoryUsedRatio),
                    v(Metric::Load1),
                    v(Metric::Load5),
                    v(Metric::Load15),
                    v(Metric::DiskUsedRatio),
                    v(Metric::Sessions).map(|x| x as i64),
                    detail.to_string()
                ],
            )?;
        }
        Op::Read(_) => unreachable!("reads are not batched"),
    }
    Ok(())
}

fn finish(
    c: &Connection,
    id: u64,
    r: &pb::JobReport,
    source: Option<&str>,
    at_ms: i64,
) -> rusqlite::Result<()> {
    let ok = r.error.is_empty() && r.targets.iter().all(|t| t.ok);
    let finished = if r.finished_unix_ms > 0 {
        r.finished_unix_ms
    } else {
        at_ms
    };
    let source: String = match source {
        Some(s) => s.to_owned(),
        None => c
            .query_row("SELECT source FROM jobs WHERE id = ?1", [id as i64], |r| {
                r.get(0)
            })
            .optional()?
            .unwrap_or_default(),
    };
    let sum = |f: fn(&pb::TargetResult) -> u64| r.targets.iter().map(f).sum::<u64>() as i64;
    c.execute(
        "UPDATE jobs SET state = ?2, finished_ms = ?3, error = ?4, seq = ?5,
             source_entries = ?6, scan_ms = ?7, changes = ?8, targets = ?9,
             targets_failed = ?10, files = ?11, bytes = ?12, wire_bytes = ?13
         WHERE id = ?1",
        params![
            id as i64,
            if ok { "ok" } else { "failed" },
            finished,
            r.error,
            r.seq as i64,
            r.source_entries as i64,
            r.scan_ms as i64,
            r.changes as i64,
            r.targets.len() as i64,
            r.targets.iter().filter(|t| !t.ok).count() as i64,
            sum(|t| t.files_sent),
            sum(|t| t.bytes_sent),
            sum(|t| t.wire_bytes),
        ],
    )?;
    let mut st = c.prepare(
        "INSERT OR REPLACE INTO job_targets (job_id, target, via, link_class, ok, error,
             files, bytes, wire_bytes, reused_local, removed, meta_only, resent, delta_files,
             delta_bytes, patch_bytes, signature_exchanges, duration_ms, planned)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
                 ?18, ?19)",
    )?;
    for t in &r.targets {
        let via = if t.via.is_empty() { &source } else { &t.via };
        let planned = t.planned.as_ref().map(|p| planned_json(p).to_string());
        st.execute(params![
            id as i64,
            t.target,
            via,
            t.link_class,
            t.ok,
            t.error,
            t.files_sent as i64,
            t.bytes_sent as i64,
            t.wire_bytes as i64,
            t.reused_local as i64,
            t.removed as i64,
            t.meta_only as i64,
            t.resent as i64,
            t.delta_files as i64,
            t.delta_bytes as i64,
            t.patch_bytes as i64,
            t.signature_exchanges as i64,
            t.duration_ms as i64,
            planned,
        ])?;
    }
    Ok(())
}

/// The JSON form of a dry run's plan for one target.
pub fn planned_json(p: &pb::DryRunPlan) -> Value {
    let path = |b: &Vec<u8>| String::from_utf8_lossy(b).into_owned();
    json!({
        "files": p.files.iter().map(|f| json!({
            "path": path(&f.path), "size": f.size, "delta": f.delta,
        })).collect::<Vec<_>>(),
        "removed": p.removed.iter().map(path).collect::<Vec<_>>(),
        "meta_only": p.meta_only.iter().map(path).collect::<Vec<_>>(),
        "files_count": p.files_count,
        "files_bytes": p.files_bytes,
        "removed_count": p.removed_count,
        "meta_only_count": p.meta_only_count,
        "reused_local": p.reused_local,
        "created_dirs": p.created_dirs,
        "truncated": p.truncated,
    })
}

/// A shared handle, as the master holds it.
pub type Shared = Arc<JobLog>;

#[cfg(test)]
mod tests {
    use super::*;

    fn report(set: &str, targets: &[(&str, bool)]) -> pb::JobReport {
        pb::JobReport {
            content_set: set.into(),
            seq: 7,
            targets: targets
                .iter()
                .map(|(t, ok)| pb::TargetResult {
                    target: (*t).into(),
                    ok: *ok,
                    error: if *ok { String::new() } else { "refused".into() },
                    files_sent: 2,
                    bytes_sent: 100,
                    wire_bytes: 60,
                    duration_ms: 10,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn wal_mode_and_schema_version() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("joblog.sqlite");
        drop(JobLog::open(&p).unwrap());
        let c = Connection::open(&p).unwrap();
        let mode: String = c
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode.to_lowercase(), "wal");
        let v: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        // A newer schema is refused, not misread.
        c.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        drop(c);
        let e = JobLog::open(&p).unwrap_err();
        assert!(format!("{e:#}").contains("newer cdd"), "{e:#}");
    }

    #[test]
    fn ids_persist_across_reopen_and_running_jobs_fail() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("joblog.sqlite");
        let log = JobLog::open(&p).unwrap();
        let a = log.begin_job(JobKind::Sync, "www", "node1");
        let b = log.begin_job(JobKind::Sync, "www", "node1");
        log.finish_job(a, &report("www", &[("node2", true)]));
        assert_eq!((a, b), (1, 2));
        drop(log);
        let log = JobLog::open(&p).unwrap();
        let c = log.begin_job(JobKind::Scheduled, "www", "node1");
        assert_eq!(c, 3);
        let rt = rt();
        let jobs = rt.block_on(log.jobs(JobQuery::default())).unwrap();
        let ids: Vec<i64> = jobs.iter().map(|j| j["job_id"].as_i64().unwrap()).collect();
        assert_eq!(ids, [3, 2, 1], "newest first");
        assert_eq!(jobs[0]["state"], "running");
        assert_eq!(jobs[1]["state"], "failed", "cut short by the restart");
        assert!(
            jobs[1]["error"]
                .as_str()
                .unwrap()
                .contains("master stopped")
        );
        assert_eq!(jobs[2]["state"], "ok");
        assert_eq!(jobs[2]["bytes"], 100);
        assert_eq!(jobs[2]["seq"], 7);
    }

    #[test]
    fn writer_thread_flushes_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("joblog.sqlite");
        let log = Arc::new(JobLog::open(&p).unwrap());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..50 {
                        let id = log.begin_job(JobKind::Sync, "www", "node1");
                        log.event(
                            "test",
                            Some("node1"),
                            Some("www"),
                            Some(id),
                            &format!("{t}/{i}"),
                        );
                        log.finish_job(
                            id,
                            &report("www", &[("node2", true), ("node3", i % 2 == 0)]),
                        );
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(Arc::into_inner(log).expect("last handle"));
        // Read the file directly: everything queued before the drop is there.
        let c = Connection::open(&p).unwrap();
        let n = |sql: &str| -> i64 { c.query_row(sql, [], |r| r.get(0)).unwrap() };
        assert_eq!(n("SELECT COUNT(*) FROM jobs"), 200);
        assert_eq!(n("SELECT COUNT(*) FROM jobs WHERE state = 'running'"), 0);
        assert_eq!(n("SELECT COUNT(*) FROM jobs WHERE state = 'failed'"), 100);
        assert_eq!(n("SELECT COUNT(*) FROM job_targets"), 400);
        assert_eq!(n("SELECT COUNT(*) FROM events"), 200);
        assert_eq!(n("SELECT COUNT(DISTINCT id) FROM jobs"), 200);
    }

    #[test]
    fn retention_prunes_old_jobs_and_events() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("joblog.sqlite");
        let log = JobLog::open(&p).unwrap();
        let old = log.begin_job(JobKind::Sync, "www", "node1");
        log.finish_job(old, &report("www", &[("node2", true)]));
        let new = log.begin_job(JobKind::Sync, "www", "node1");
        log.finish_job(new, &report("www", &[("node2", true)]));
        log.event("failover", Some("node2"), Some("www"), None, "old");
        log.event("failover", Some("node2"), Some("www"), None, "new");
        drop(log);
        // Age the first job and event by 40 days.
        let c = Connection::open(&p).unwrap();
        let forty = 40 * 86_400_000i64;
        c.execute(
            "UPDATE jobs SET started_ms = started_ms - ?1, finished_ms = finished_ms - ?1 WHERE id = ?2",
            params![forty, old as i64],
        )
        .unwrap();
        c.execute(
            "UPDATE events SET at_ms = at_ms - ?1 WHERE detail = 'old'",
            [forty],
        )
        .unwrap();
        drop(c);
        // 60 days keeps everything; 30 (the default) drops the old entries.
        let log = JobLog::open_with(&p, 60).unwrap();
        let rt = rt();
        assert_eq!(rt.block_on(log.jobs(JobQuery::default())).unwrap().len(), 2);
        drop(log);
        let log = JobLog::open(&p).unwrap();
        let jobs = rt.block_on(log.jobs(JobQuery::default())).unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0]["job_id"], new);
        let ev = rt.block_on(log.events(10)).unwrap();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0]["detail"], "new");
        // The pruned job's target rows went with it; ids still never repeat.
        drop(log);
        let c = Connection::open(&p).unwrap();
        let rows: i64 = c
            .query_row("SELECT COUNT(*) FROM job_targets", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 1);
    }

    #[test]
    fn queries_job_detail_and_stats() {
        let dir = tempfile::tempdir().unwrap();
        let log = JobLog::open(&dir.path().join("joblog.sqlite")).unwrap();
        let a = log.begin_job(JobKind::Sync, "www", "node1");
        log.event(
            "failover",
            Some("node3"),
            Some("www"),
            None,
            "node3 down; node2 relays",
        );
        log.finish_job(a, &report("www", &[("node2", true), ("node3", false)]));
        let mut rt_report = report("www", &[("node2", true)]);
        rt_report.kind = "realtime".into();
        rt_report.targets[0].via = "node1".into();
        let b = log.record_report(JobKind::Realtime, "node1", &rt_report);
        log.event("conflict", Some("node2"), Some("www"), Some(b), "a.txt");
        let c = log.begin_job(JobKind::Sync, "img", "node4");
        let rt = rt();
        let failed = rt
            .block_on(log.jobs(JobQuery {
                failed: true,
                ..Default::default()
            }))
            .unwrap();
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0]["job_id"], a);
        let img = rt
            .block_on(log.jobs(JobQuery {
                content_set: Some("img".into()),
                ..Default::default()
            }))
            .unwrap();
        assert_eq!(img.len(), 1);
        assert_eq!(img[0]["job_id"], c);
        let limited = rt
            .block_on(log.jobs(JobQuery {
                limit: 2,
                ..Default::default()
            }))
            .unwrap();
        assert_eq!(limited.len(), 2);

        let j = rt.block_on(log.job(a)).unwrap().unwrap();
        assert_eq!(j["state"], "failed");
        assert_eq!(j["kind"], "sync");
        let t = j["targets"].as_array().unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(
            t[0]["via"], "node1",
            "the source when the report names none"
        );
        assert_eq!(t[1]["ok"], false);
        let ev = j["events"].as_array().unwrap();
        assert_eq!(ev.len(), 1, "{j}");
        assert_eq!(ev[0]["kind"], "failover");
        let j = rt.block_on(log.job(b)).unwrap().unwrap();
        assert_eq!(j["kind"], "realtime");
        // Its own event; the failover may fall in its time window too (same instant).
        let kinds: Vec<&str> = j["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["kind"].as_str().unwrap())
            .collect();
        assert!(kinds.contains(&"conflict"), "{j}");
        assert!(rt.block_on(log.job(999)).unwrap().is_none());

        let s = rt.block_on(log.stats()).unwrap();
        let node = |n: &str| {
            s["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|x| x["name"] == n)
                .cloned()
                .unwrap()
        };
        assert_eq!(node("node2")["jobs"], 2);
        assert_eq!(node("node2")["bytes_received"], 200);
        assert_eq!(node("node3")["failures"], 1);
        assert!(node("node3")["last_ok_unix_ms"].is_null());
        assert_eq!(node("node1")["jobs_as_source"], 2);
        let links = s["links"].as_array().unwrap();
        let l = links
            .iter()
            .find(|l| l["via"] == "node1" && l["target"] == "node2")
            .unwrap();
        assert_eq!(l["transfers"], 2);
        assert_eq!(l["wire_bytes"], 120);
        assert_eq!(l["mean_duration_ms"], 10);
        assert_eq!(s["jobs"], 3);
    }

    #[test]
    fn samples_are_summarised_pruned_and_added_to_a_version_1_log() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("joblog.sqlite");
        // A log written before samples existed.
        {
            let c = Connection::open(&p).unwrap();
            c.execute_batch(SCHEMA).unwrap();
            c.pragma_update(None, "user_version", 1).unwrap();
        }
        let log = JobLog::open_keeping(&p, 30, 1).unwrap();
        let now = now_ms();
        let s = |load1: f64, disk: f64| pb::MonitorSample {
            load1,
            sessions: 3,
            disks: vec![pb::DiskSample {
                content_set: "www".into(),
                used_ratio: disk,
                available_bytes: 1,
            }],
            unavailable: vec!["cpu_busy_ratio: first sample".into()],
            ..Default::default()
        };
        log.sample("node2", now - 2_000, &s(2.0, 0.5));
        log.sample("node2", now - 1_000, &s(6.0, 0.25));
        log.sample("node3", now - 1_000, &s(1.0, 0.1));
        // Two days old: past `history_days = 1`, pruned when the log opens again.
        log.sample("node3", now - 2 * 86_400_000, &s(9.0, 0.9));
        let rt = rt();
        let all = rt.block_on(log.sample_summary(None)).unwrap();
        assert_eq!(all["node2"]["samples"], 2);
        assert_eq!(all["node2"]["load1"]["mean"], 4.0);
        assert_eq!(all["node2"]["load1"]["max"], 6.0);
        assert_eq!(all["node2"]["disk_used_ratio"]["max"], 0.5);
        assert_eq!(all["node2"]["sessions"]["max"], 3);
        assert!(
            all["node2"]["cpu_busy_ratio"]["max"].is_null(),
            "not measured"
        );
        assert_eq!(all["node2"]["recent"][0]["load1"], 6.0, "newest first");
        assert_eq!(all["node3"]["samples"], 2);
        drop(log);
        let log = JobLog::open_keeping(&p, 30, 1).unwrap();
        let one = rt
            .block_on(log.sample_summary(Some("node3".into())))
            .unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one["node3"]["samples"], 1, "{one:?}");
        assert_eq!(one["node3"]["load1"]["max"], 1.0);
    }

    #[test]
    fn kinds_round_trip() {
        for k in JobKind::ALL {
            assert_eq!(JobKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(JobKind::parse(""), Some(JobKind::Sync));
        assert_eq!(JobKind::parse("weekly"), None);
    }
}
