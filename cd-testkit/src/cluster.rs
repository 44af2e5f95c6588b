//! A cdsync cluster of real processes on loopback.
//!
//! [`Cluster::start`] follows the documented startup flow exactly as an operator would:
//!
//! 1. `cdctl ca init --dir DIR/pki --master-name master --san 127.0.0.1 --san localhost`
//! 2. write `DIR/config/master.toml` (master role, one content set `www`: source
//!    `node1`, targets `node2..nodeN`) and start `cdd run --config ...`
//! 3. wait until the master's control socket answers `cdctl status --json`
//! 4. for each node: `cdctl --socket MASTER token create`, write
//!    `DIR/config/<node>.toml` with that `join_token`, start `cdd run`
//! 5. wait until the master's status shows every node connected.
//!
//! Every daemon's stdout and stderr go to `DIR/logs/<name>.log`; every error this
//! module returns about a daemon includes the tail of the logs. Dropping the
//! [`Cluster`] stops all daemons (SIGTERM, then SIGKILL after a grace period).
//!
//! Layout under `ClusterSpec::dir`: `pki/`, `state/<name>/` (state dir and control
//! socket), `config/<name>.toml`, `logs/<name>.log`; content roots under
//! `ClusterSpec::roots_dir` (default `DIR/roots`), one `<node>/` each.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::Value;

use crate::sys;

/// Name of the master daemon (also the name in its certificate).
pub const MASTER: &str = "master";
/// The one content set a test cluster carries.
pub const CONTENT_SET: &str = "www";

/// What to launch.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// Number of nodes: `node1` is the source, `node2..=nodeN` are targets (N ≥ 2).
    pub nodes: usize,
    /// Working directory for PKI, state, configs and logs (created if missing).
    pub dir: PathBuf,
    /// Parent of the content roots (`<roots_dir>/<node>/`); `None` = `dir/roots`.
    pub roots_dir: Option<PathBuf>,
    /// The `cdd` binary.
    pub cdd: PathBuf,
    /// The `cdctl` binary.
    pub cdctl: PathBuf,
    /// `zstd_level` of the content set; `None` leaves the daemon's default.
    pub zstd_level: Option<i32>,
    /// `max_rate_bytes_per_sec` of the content set (0 = unlimited).
    pub max_rate: u64,
    /// `mode` of the content set (`"manual"` or `"realtime"`); `None` = daemon default.
    pub mode: Option<&'static str>,
    /// `capture` of every node (`"auto"`, `"ebpf"`, `"fanotify"`); `None` = default.
    pub capture: Option<&'static str>,
    /// `ring_buffer_mib` of every node (the eBPF ring buffer); `None` = default.
    pub ring_buffer_mib: Option<u32>,
    /// Extra lines of the master's content-set table, written as given after the
    /// others (e.g. `exclude = ["*.tmp"]`, `commands = { delete = false }`). The table
    /// ends the master's config, so a test may append more lines to
    /// [`Cluster::config`]`(MASTER)` and [`Cluster::restart`] the master.
    pub set_lines: Vec<String>,
    /// Extra text of the master's config between its `[master]` keys and the content
    /// set: keys of `[master]` first, then its sub-tables, e.g. the topology's
    /// `[[master.servers]]` tables.
    pub master_lines: Vec<String>,
    /// Extra lines of a node's `[node]` table, by node name (e.g. `ktls = false`,
    /// `trusted_peers = ["node1"]`).
    pub node_lines: BTreeMap<String, Vec<String>>,
    /// Extra environment variables of every daemon.
    pub env: Vec<(String, String)>,
    /// How long to wait for a daemon to come up or a node to (re)connect.
    pub startup_timeout: Duration,
    /// How long a `cdctl sync` may take before it is killed and reported.
    pub sync_timeout: Duration,
    /// Where daemons run, by name (`master`, `node1`, …); a daemon not named here runs
    /// as a plain child on 127.0.0.1 (see [`Placement`]).
    pub placements: BTreeMap<String, Placement>,
    /// Content root of a node, by name, instead of `<roots_dir>/<node>/`.
    pub roots: BTreeMap<String, PathBuf>,
    /// How many nodes are sources: `node1..=nodeK` (K > 1: an N:M content set,
    /// `sources = [...]`); the others are targets. Default 1.
    pub sources: usize,
}

/// How and where one daemon runs, for a cluster spread over network namespaces.
#[derive(Debug, Clone)]
pub struct Placement {
    /// The address it listens on (its data listener, or the master's listener).
    pub ip: std::net::IpAddr,
    /// The command line that `cdd run --config …` is appended to, e.g.
    /// `["ip", "netns", "exec", "host1"]`.
    pub launcher: Vec<std::ffi::OsString>,
}

impl ClusterSpec {
    /// The address daemon `name` listens on.
    fn ip_of(&self, name: &str) -> std::net::IpAddr {
        self.placements
            .get(name)
            .map_or(std::net::IpAddr::from([127, 0, 0, 1]), |p| p.ip)
    }

    /// Places server `name` in the master's topology: a `[[master.servers]]` table
    /// in [`ClusterSpec::master_lines`].
    pub fn server(&mut self, name: &str, region: &str, group: &str, weight: u32) {
        self.master_lines.extend([
            "[[master.servers]]".to_owned(),
            format!("name = {}", toml_str(name)),
            format!("region = {}", toml_str(region)),
            format!("group = {}", toml_str(group)),
            format!("weight = {weight}"),
        ]);
    }

    /// `nodes` nodes in `dir`, default limits (30 s startup, 300 s per sync).
    #[must_use]
    pub fn new(nodes: usize, dir: &Path, cdd: &Path, cdctl: &Path) -> Self {
        Self {
            nodes,
            dir: dir.to_path_buf(),
            roots_dir: None,
            cdd: cdd.to_path_buf(),
            cdctl: cdctl.to_path_buf(),
            zstd_level: None,
            max_rate: 0,
            mode: None,
            capture: None,
            ring_buffer_mib: None,
            set_lines: Vec::new(),
            master_lines: Vec::new(),
            node_lines: BTreeMap::new(),
            env: Vec::new(),
            startup_timeout: Duration::from_secs(30),
            sync_timeout: Duration::from_secs(300),
            placements: BTreeMap::new(),
            roots: BTreeMap::new(),
            sources: 1,
        }
    }
}

#[derive(Debug)]
struct Daemon {
    config: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    root: Option<PathBuf>,
    child: Option<Child>,
}

/// A running cluster. See the module docs.
#[derive(Debug)]
pub struct Cluster {
    spec: ClusterSpec,
    master_addr: SocketAddr,
    daemons: BTreeMap<String, Daemon>,
}

/// Result of one `cdctl sync --json`.
#[derive(Debug, Clone)]
pub struct SyncOutcome {
    /// Exit code of `cdctl` (0: every target ok, 1: some target failed).
    pub exit_code: i32,
    /// The job report.
    pub report: Value,
    /// What `cdctl` wrote on stderr.
    pub stderr: String,
}

impl SyncOutcome {
    /// The report's entry for `target`.
    pub fn target(&self, target: &str) -> Result<&Value> {
        target_report(&self.report, target)
    }
}

/// The entry for `target` in a job report's `targets` array.
pub fn target_report<'a>(report: &'a Value, target: &str) -> Result<&'a Value> {
    report["targets"]
        .as_array()
        .ok_or_else(|| anyhow!("job report has no `targets` array: {report}"))?
        .iter()
        .find(|t| t["target"] == target)
        .ok_or_else(|| anyhow!("job report has no entry for target {target}: {report}"))
}

/// An unsigned counter of a per-target report entry (error if absent).
pub fn counter(target_entry: &Value, field: &str) -> Result<u64> {
    target_entry[field]
        .as_u64()
        .ok_or_else(|| anyhow!("report entry lacks counter `{field}`: {target_entry}"))
}

/// Sum of counter `field` over all targets of a job report.
pub fn sum_counter(report: &Value, field: &str) -> Result<u64> {
    let targets = report["targets"]
        .as_array()
        .ok_or_else(|| anyhow!("job report has no `targets` array: {report}"))?;
    targets.iter().map(|t| counter(t, field)).sum()
}

/// A command running in the background with its output collected.
#[derive(Debug)]
pub struct Running {
    what: String,
    child: Child,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr: Option<JoinHandle<Vec<u8>>>,
    deadline: Instant,
}

/// Output of a finished [`Running`] command.
#[derive(Debug, Clone)]
pub struct Finished {
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

fn reader(mut r: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        // A read error just ends the capture; the exit status tells what happened.
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

impl Running {
    /// Starts `cmd` with null stdin and captured stdout/stderr.
    pub fn spawn(mut cmd: Command, timeout: Duration) -> Result<Self> {
        let what = format!("{cmd:?}");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
        let stdout = child.stdout.take().map(reader);
        let stderr = child.stderr.take().map(reader);
        Ok(Self {
            what,
            child,
            stdout,
            stderr,
            deadline: Instant::now() + timeout,
        })
    }

    /// Whether the command has exited.
    pub fn is_finished(&mut self) -> Result<bool> {
        Ok(self.child.try_wait()?.is_some())
    }

    /// Waits for the exit (killing the command at its deadline, which is an error).
    pub fn wait(mut self) -> Result<Finished> {
        let status = loop {
            if let Some(st) = self.child.try_wait()? {
                break st;
            }
            if Instant::now() >= self.deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let out = self.collect();
                bail!(
                    "timed out, killed: {}\nstdout: {}\nstderr: {}",
                    self.what,
                    out.0,
                    out.1
                );
            }
            thread::sleep(Duration::from_millis(20));
        };
        let (stdout, stderr) = self.collect();
        Ok(Finished {
            status,
            stdout,
            stderr,
        })
    }

    fn collect(&mut self) -> (String, String) {
        let take = |h: Option<JoinHandle<Vec<u8>>>| {
            h.and_then(|h| h.join().ok())
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        };
        (take(self.stdout.take()), take(self.stderr.take()))
    }
}

/// Runs `cmd` to completion (bounded by `timeout`).
pub fn run(cmd: Command, timeout: Duration) -> Result<Finished> {
    Running::spawn(cmd, timeout)?.wait()
}

/// A pending `cdctl sync`, see [`Cluster::sync_background`].
#[derive(Debug)]
pub struct BackgroundSync {
    running: Running,
    diag: String,
}

impl BackgroundSync {
    /// Whether `cdctl sync` has returned.
    pub fn is_finished(&mut self) -> Result<bool> {
        self.running.is_finished()
    }

    /// Waits for the job and parses its report.
    pub fn wait(self) -> Result<SyncOutcome> {
        let diag = self.diag;
        parse_sync(self.running.wait()?).with_context(|| diag)
    }
}

fn parse_sync(out: Finished) -> Result<SyncOutcome> {
    let code = out.status.code().ok_or_else(|| {
        anyhow!(
            "cdctl sync died by signal: {:?}; stderr: {}",
            out.status,
            out.stderr
        )
    })?;
    let report: Value = serde_json::from_str(out.stdout.trim()).with_context(|| {
        format!(
            "cdctl sync --json exited {code} without a JSON report\nstdout: {}\nstderr: {}",
            out.stdout, out.stderr
        )
    })?;
    ensure!(
        code == 0 || code == 1,
        "cdctl sync exited {code} (contract: 0 or 1); report {report}; stderr {}",
        out.stderr
    );
    let targets = report["targets"]
        .as_array()
        .ok_or_else(|| anyhow!("job report has no `targets` array: {report}"))?;
    // A job that failed as a whole (e.g. the source could not scan) reports an error
    // and may list no target at all.
    let job_error = report["error"].as_str().is_some_and(|e| !e.is_empty());
    let all_ok = !job_error && targets.iter().all(|t| t["ok"] == true);
    ensure!(
        (code == 0) == all_ok,
        "cdctl sync exit code {code} contradicts the report (job error: {job_error}, \
         all targets ok: {all_ok}): {report}"
    );
    Ok(SyncOutcome {
        exit_code: code,
        report,
        stderr: out.stderr,
    })
}

/// Quotes `s` as a TOML basic string.
fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn toml_path(p: &Path) -> Result<String> {
    Ok(toml_str(p.to_str().ok_or_else(|| {
        anyhow!(
            "path is not UTF-8, cannot go into a config: {}",
            p.display()
        )
    })?))
}

/// Last `lines` lines of the file at `path` (or a note that it cannot be read).
pub fn tail(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(b) => {
            let s = String::from_utf8_lossy(&b);
            let v: Vec<&str> = s.lines().collect();
            v[v.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

impl Cluster {
    /// Launches the master and `spec.nodes` nodes and waits until all are connected.
    pub fn start(spec: ClusterSpec) -> Result<Self> {
        ensure!(
            spec.nodes >= 2,
            "a cluster needs a source and at least one target"
        );
        for b in [&spec.cdd, &spec.cdctl] {
            ensure!(b.is_file(), "binary not found: {}", b.display());
        }
        let dir = &spec.dir;
        for sub in ["logs", "config", "state"] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        let roots_dir = spec.roots_dir.clone().unwrap_or_else(|| dir.join("roots"));
        let port = free_port()?;
        let master_addr = SocketAddr::new(spec.ip_of(MASTER), port);
        let mut cluster = Self {
            master_addr,
            daemons: BTreeMap::new(),
            spec,
        };

        // 1. PKI.
        let pki = cluster.spec.dir.join("pki");
        let mut ca = Command::new(&cluster.spec.cdctl);
        ca.arg("ca").arg("init").arg("--dir").arg(&pki).args([
            "--master-name",
            MASTER,
            "--san",
            "127.0.0.1",
            "--san",
            "localhost",
        ]);
        let out = run(ca, Duration::from_secs(60))?;
        ensure!(
            out.status.success(),
            "cdctl ca init failed ({}):\n{}{}",
            out.status,
            out.stdout,
            out.stderr
        );
        for f in ["ca.pem", "ca.key", "master.pem", "master.key"] {
            ensure!(
                pki.join(f).is_file(),
                "cdctl ca init succeeded but did not write {}",
                pki.join(f).display()
            );
        }

        // 2–3. Master.
        let k = cluster.spec.sources.max(1);
        ensure!(
            k < cluster.spec.nodes,
            "sources must leave at least one target"
        );
        let targets: Vec<String> = (k + 1..=cluster.spec.nodes)
            .map(|i| format!("node{i}"))
            .collect();
        let sources_line = if k == 1 {
            "source = \"node1\"".to_owned()
        } else {
            format!(
                "sources = [{}]",
                (1..=k)
                    .map(|i| toml_str(&format!("node{i}")))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let mut cfg = cluster.common_config(MASTER)?;
        let _ = write!(
            cfg,
            "\n[master]\nlisten = {}\npki_dir = {}\n{}\n[[master.content_sets]]\nname = {}\n\
             {sources_line}\ntargets = [{}]\nmax_rate_bytes_per_sec = {}\n",
            toml_str(&master_addr.to_string()),
            toml_path(&pki)?,
            cluster
                .spec
                .master_lines
                .iter()
                .map(|l| format!("{l}\n"))
                .collect::<String>(),
            toml_str(CONTENT_SET),
            targets
                .iter()
                .map(|t| toml_str(t))
                .collect::<Vec<_>>()
                .join(", "),
            cluster.spec.max_rate
        );
        if let Some(z) = cluster.spec.zstd_level {
            let _ = writeln!(cfg, "zstd_level = {z}");
        }
        if let Some(m) = cluster.spec.mode {
            let _ = writeln!(cfg, "mode = {}", toml_str(m));
        }
        for line in &cluster.spec.set_lines {
            let _ = writeln!(cfg, "{line}");
        }
        cluster.add_daemon(MASTER, &cfg, None)?;
        cluster.spawn(MASTER)?;
        cluster.wait_socket(MASTER)?;

        // 4–5. Nodes.
        for i in 1..=cluster.spec.nodes {
            let name = format!("node{i}");
            let root = cluster
                .spec
                .roots
                .get(&name)
                .cloned()
                .unwrap_or_else(|| roots_dir.join(&name));
            let listen = SocketAddr::new(cluster.spec.ip_of(&name), 0);
            fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
            fs::set_permissions(&root, fs::Permissions::from_mode(0o755))?;
            let token = cluster.token()?;
            let mut cfg = cluster.common_config(&name)?;
            let _ = write!(
                cfg,
                "\n[node]\nmaster_addr = {}\nmaster_name = {}\nlisten = {}\n\
                 join_token = {}\n\n[[node.content_sets]]\nname = {}\nroot = {}\n",
                toml_str(&master_addr.to_string()),
                toml_str(MASTER),
                toml_str(&listen.to_string()),
                toml_str(&token),
                toml_str(CONTENT_SET),
                toml_path(&root)?
            );
            // Keys of [node]: inserted before the content-set table.
            let at = cfg.find("\n[[node.content_sets]]").unwrap_or(cfg.len());
            if let Some(c) = cluster.spec.capture {
                cfg.insert_str(at, &format!("capture = {}\n", toml_str(c)));
            }
            if let Some(m) = cluster.spec.ring_buffer_mib {
                cfg.insert_str(at, &format!("ring_buffer_mib = {m}\n"));
            }
            for line in cluster.spec.node_lines.get(&name).into_iter().flatten() {
                cfg.insert_str(at, &format!("{line}\n"));
            }
            cluster.add_daemon(&name, &cfg, Some(root))?;
            cluster.spawn(&name)?;
        }
        let names = cluster.nodes();
        cluster.wait_connected(&names)?;
        Ok(cluster)
    }

    fn common_config(&self, name: &str) -> Result<String> {
        let state = self.spec.dir.join("state").join(name);
        let socket = state.join("cdd.sock");
        ensure!(
            socket.as_os_str().len() < 100,
            "control socket path too long for AF_UNIX ({} bytes): {}; use a shorter dir",
            socket.as_os_str().len(),
            socket.display()
        );
        Ok(format!(
            "# written by cd-testkit\nname = {}\nstate_dir = {}\ncontrol_socket = {}\n",
            toml_str(name),
            toml_path(&state)?,
            toml_path(&socket)?
        ))
    }

    fn add_daemon(&mut self, name: &str, config: &str, root: Option<PathBuf>) -> Result<()> {
        let path = self.spec.dir.join("config").join(format!("{name}.toml"));
        fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
        let d = Daemon {
            config: path,
            socket: self.spec.dir.join("state").join(name).join("cdd.sock"),
            log: self.spec.dir.join("logs").join(format!("{name}.log")),
            root,
            child: None,
        };
        self.daemons.insert(name.to_owned(), d);
        Ok(())
    }

    fn daemon(&self, name: &str) -> Result<&Daemon> {
        self.daemons
            .get(name)
            .ok_or_else(|| anyhow!("no daemon named {name} in this cluster"))
    }

    fn daemon_mut(&mut self, name: &str) -> Result<&mut Daemon> {
        self.daemons
            .get_mut(name)
            .ok_or_else(|| anyhow!("no daemon named {name} in this cluster"))
    }

    fn spawn(&mut self, name: &str) -> Result<()> {
        let cdd = self.spec.cdd.clone();
        let mut cmd = match self.spec.placements.get(name) {
            Some(p) if !p.launcher.is_empty() => {
                let mut c = Command::new(&p.launcher[0]);
                c.args(&p.launcher[1..]).arg(&cdd);
                c
            }
            _ => Command::new(&cdd),
        };
        cmd.envs(self.spec.env.iter().map(|(k, v)| (k, v)));
        let d = self.daemon_mut(name)?;
        ensure!(d.child.is_none(), "{name} is already running");
        let log = File::options()
            .create(true)
            .append(true)
            .open(&d.log)
            .with_context(|| format!("opening {}", d.log.display()))?;
        let child = cmd
            .arg("run")
            .arg("--config")
            .arg(&d.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} for {name}", cdd.display()))?;
        d.child = Some(child);
        Ok(())
    }

    /// Names of the nodes, `node1` (source) first.
    #[must_use]
    pub fn nodes(&self) -> Vec<String> {
        (1..=self.spec.nodes).map(|i| format!("node{i}")).collect()
    }

    /// Names of the target nodes.
    #[must_use]
    pub fn targets(&self) -> Vec<String> {
        (2..=self.spec.nodes).map(|i| format!("node{i}")).collect()
    }

    /// Name of the source node.
    #[must_use]
    pub fn source(&self) -> &'static str {
        "node1"
    }

    /// Address the master listens on.
    #[must_use]
    pub fn master_addr(&self) -> SocketAddr {
        self.master_addr
    }

    /// The spec this cluster was started with.
    #[must_use]
    pub fn spec(&self) -> &ClusterSpec {
        &self.spec
    }

    /// Content root of node `name`.
    pub fn root(&self, name: &str) -> Result<PathBuf> {
        self.daemon(name)?
            .root
            .clone()
            .ok_or_else(|| anyhow!("{name} has no content root"))
    }

    /// Control socket of daemon `name` (`master` or a node).
    pub fn socket(&self, name: &str) -> Result<PathBuf> {
        Ok(self.daemon(name)?.socket.clone())
    }

    /// Config file of daemon `name`.
    pub fn config(&self, name: &str) -> Result<PathBuf> {
        Ok(self.daemon(name)?.config.clone())
    }

    /// Log file (stdout + stderr) of daemon `name`.
    pub fn log_path(&self, name: &str) -> Result<PathBuf> {
        Ok(self.daemon(name)?.log.clone())
    }

    /// Process id of daemon `name`, if it is running.
    pub fn pid(&self, name: &str) -> Result<Option<u32>> {
        Ok(self.daemon(name)?.child.as_ref().map(Child::id))
    }

    /// The last lines of every daemon's log, for error messages.
    #[must_use]
    pub fn diagnostics(&self) -> String {
        let mut s = String::new();
        for (name, d) in &self.daemons {
            let _ = write!(
                s,
                "\n----- {name} ({}), last 25 lines -----\n{}",
                d.log.display(),
                tail(&d.log, 25)
            );
        }
        s
    }

    fn cdctl(&self, name: &str) -> Result<Command> {
        let mut c = Command::new(&self.spec.cdctl);
        c.arg("--socket").arg(&self.daemon(name)?.socket);
        Ok(c)
    }

    /// Runs `cdctl ARGS` against daemon `name` (ARGS should ask for `--json`); returns
    /// its exit code and its output parsed, whatever the exit code, as long as it
    /// printed JSON.
    pub fn cdctl_json(&self, name: &str, args: &[&str], timeout: Duration) -> Result<(i32, Value)> {
        let mut c = self.cdctl(name)?;
        c.args(args);
        let out = run(c, timeout)?;
        let v = serde_json::from_str(out.stdout.trim()).with_context(|| {
            format!(
                "cdctl {} ({name}) exited {} and printed {:?}; stderr: {}",
                args.join(" "),
                out.status,
                out.stdout,
                out.stderr.trim()
            )
        })?;
        Ok((out.status.code().unwrap_or(-1), v))
    }

    /// Fails if daemon `name` has exited (reaping it), with its log tail.
    fn check_alive(&mut self, name: &str) -> Result<()> {
        let d = self.daemon_mut(name)?;
        if let Some(child) = d.child.as_mut()
            && let Some(st) = child.try_wait()?
        {
            d.child = None;
            bail!(
                "daemon {name} exited ({st}); last log lines:\n{}",
                tail(&d.log, 40)
            );
        }
        Ok(())
    }

    /// `cdctl --socket <name's socket> status --json`, parsed.
    pub fn status(&self, name: &str) -> Result<Value> {
        let mut c = self.cdctl(name)?;
        c.args(["status", "--json"]);
        let out = run(c, Duration::from_secs(30))?;
        ensure!(
            out.status.success(),
            "cdctl status ({name}) failed ({}): {}",
            out.status,
            out.stderr.trim()
        );
        serde_json::from_str(out.stdout.trim())
            .with_context(|| format!("cdctl status --json ({name}) printed: {}", out.stdout))
    }

    /// Where daemon `name` serves `/metrics` (`metrics_addr` of its status; the
    /// default `metrics_listen` is an ephemeral port on 127.0.0.1).
    pub fn metrics_addr(&self, name: &str) -> Result<SocketAddr> {
        let v = self.status(name)?;
        let a = v["metrics_addr"]
            .as_str()
            .with_context(|| format!("{name}'s status has no metrics_addr: {v}"))?;
        a.parse()
            .with_context(|| format!("{name}'s metrics_addr {a:?} is not IP:PORT"))
    }

    fn wait_socket(&mut self, name: &str) -> Result<()> {
        let deadline = Instant::now() + self.spec.startup_timeout;
        loop {
            self.check_alive(name)?;
            let last_err = match self.status(name) {
                Ok(_) => return Ok(()),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "{name}'s control socket {} did not answer within {:?} (last error: \
                     {last_err}){}",
                    self.daemon(name)?.socket.display(),
                    self.spec.startup_timeout,
                    self.diagnostics()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn token(&self) -> Result<String> {
        let mut c = self.cdctl(MASTER)?;
        c.args(["token", "create"]);
        let out = run(c, Duration::from_secs(30))?;
        ensure!(
            out.status.success(),
            "cdctl token create failed ({}): {}{}",
            out.status,
            out.stderr.trim(),
            self.diagnostics()
        );
        let token = out.stdout.trim().to_owned();
        ensure!(
            !token.is_empty() && !token.contains('\n'),
            "cdctl token create printed {:?}, expected one line",
            out.stdout
        );
        Ok(token)
    }

    /// The master's view of node `name`: `(connected, data_addr)`.
    fn master_view(status: &Value, name: &str) -> (bool, Option<String>) {
        status["master"]["nodes"]
            .as_array()
            .and_then(|nodes| nodes.iter().find(|n| n["name"] == name))
            .map_or((false, None), |n| {
                (
                    n["connected"] == true,
                    n["data_addr"].as_str().map(str::to_owned),
                )
            })
    }

    /// Waits until the master shows every node in `names` connected.
    pub fn wait_connected(&mut self, names: &[String]) -> Result<()> {
        self.wait_master_view(names, true)
    }

    fn wait_master_view(&mut self, names: &[String], connected: bool) -> Result<()> {
        let deadline = Instant::now() + self.spec.startup_timeout;
        loop {
            self.check_alive(MASTER)?;
            if connected {
                for n in names {
                    self.check_alive(n)?;
                }
            }
            let last = match self.status(MASTER) {
                Ok(st) => {
                    if names
                        .iter()
                        .all(|n| Self::master_view(&st, n).0 == connected)
                    {
                        return Ok(());
                    }
                    st
                }
                Err(e) => Value::String(format!("{e:#}")),
            };
            if Instant::now() >= deadline {
                bail!(
                    "master did not show {names:?} {} within {:?}; last master status: {last}{}",
                    if connected {
                        "connected"
                    } else {
                        "disconnected"
                    },
                    self.spec.startup_timeout,
                    self.diagnostics()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends `signal` (see [`crate::signal`]) to daemon `name`. For SIGKILL, SIGTERM and
    /// SIGINT, waits (up to the startup timeout) until the process has exited.
    pub fn kill(&mut self, name: &str, signal: i32) -> Result<()> {
        let timeout = self.spec.startup_timeout;
        let d = self.daemon_mut(name)?;
        let child = d
            .child
            .as_mut()
            .ok_or_else(|| anyhow!("{name} is not running"))?;
        sys::kill(child.id(), signal).with_context(|| format!("kill -{signal} {name}"))?;
        if ![libc::SIGKILL, libc::SIGTERM, libc::SIGINT].contains(&signal) {
            return Ok(());
        }
        let deadline = Instant::now() + timeout;
        loop {
            if child.try_wait()?.is_some() {
                d.child = None;
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("{name} did not exit within {timeout:?} of signal {signal}");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops daemon `name` if it runs (SIGTERM), waits until the master shows it
    /// disconnected (for a node), starts it again with the same config and waits until
    /// it is connected (or, for the master, answering with all nodes connected).
    pub fn restart(&mut self, name: &str) -> Result<()> {
        if self.daemon(name)?.child.is_some() {
            self.kill(name, libc::SIGTERM)?;
        }
        if name == MASTER {
            self.spawn(MASTER)?;
            self.wait_socket(MASTER)?;
            let nodes = self.nodes();
            return self.wait_connected(&nodes);
        }
        self.wait_master_view(&[name.to_owned()], false)?;
        self.spawn(name)?;
        self.wait_socket(name)?;
        self.wait_connected(&[name.to_owned()])
    }

    /// Runs `cdctl sync www --json` on the master; fails unless every target is ok.
    pub fn sync(&self) -> Result<Value> {
        let out = self.try_sync()?;
        ensure!(
            out.exit_code == 0,
            "sync failed (exit {}): {}\nstderr: {}{}",
            out.exit_code,
            out.report,
            out.stderr,
            self.diagnostics()
        );
        Ok(out.report)
    }

    /// Runs `cdctl sync www --json` on the master; returns its outcome whether targets
    /// succeeded or not (errors only when the CLI breaks its contract).
    pub fn try_sync(&self) -> Result<SyncOutcome> {
        self.sync_background()?.wait()
    }

    /// Starts `cdctl sync www --json` on the master and returns at once.
    pub fn sync_background(&self) -> Result<BackgroundSync> {
        let mut c = self.cdctl(MASTER)?;
        c.args(["sync", CONTENT_SET, "--json"]);
        Ok(BackgroundSync {
            running: Running::spawn(c, self.spec.sync_timeout)?,
            diag: self.diagnostics(),
        })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for d in self.daemons.values_mut() {
            if let Some(c) = d.child.as_mut()
                && c.try_wait().ok().flatten().is_none()
            {
                let _ = sys::kill(c.id(), libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for d in self.daemons.values_mut() {
            let Some(mut c) = d.child.take() else {
                continue;
            };
            while Instant::now() < deadline {
                if c.try_wait().ok().flatten().is_some() {
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
            if c.try_wait().ok().flatten().is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_str("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000A\"");
    }

    #[test]
    fn sync_output_must_match_its_exit_code() {
        use std::os::unix::process::ExitStatusExt;
        let fin = |code: i32, json: &str| Finished {
            status: ExitStatus::from_raw(code << 8),
            stdout: json.to_owned(),
            stderr: String::new(),
        };
        let ok = r#"{"job_id":1,"targets":[{"target":"node2","ok":true}]}"#;
        let bad = r#"{"job_id":1,"targets":[{"target":"node2","ok":false}]}"#;
        assert_eq!(parse_sync(fin(0, ok)).unwrap().exit_code, 0);
        assert_eq!(parse_sync(fin(1, bad)).unwrap().exit_code, 1);
        assert!(parse_sync(fin(1, ok)).is_err());
        assert!(parse_sync(fin(0, bad)).is_err());
        assert!(parse_sync(fin(2, bad)).is_err());
        assert!(parse_sync(fin(0, "not json")).is_err());
        let failed_job = r#"{"job_id":1,"error":"scan failed","targets":[]}"#;
        assert_eq!(parse_sync(fin(1, failed_job)).unwrap().exit_code, 1);
        assert!(parse_sync(fin(0, failed_job)).is_err());
        let out = parse_sync(fin(0, ok)).unwrap();
        assert_eq!(out.target("node2").unwrap()["ok"], true);
        assert!(out.target("node3").is_err());
    }

    #[test]
    fn start_reports_missing_binaries() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = ClusterSpec::new(
            2,
            tmp.path(),
            Path::new("/nonexistent/cdd"),
            Path::new("/nonexistent/cdctl"),
        );
        let err = Cluster::start(spec).unwrap_err();
        assert!(format!("{err:#}").contains("binary not found"), "{err:#}");
    }

    #[test]
    fn running_commands_time_out() {
        let mut c = Command::new("sleep");
        c.arg("5");
        let err = run(c, Duration::from_millis(200)).unwrap_err();
        assert!(format!("{err:#}").contains("timed out"), "{err:#}");
        let mut c = Command::new("sh");
        c.args(["-c", "echo out; echo err >&2; exit 3"]);
        let f = run(c, Duration::from_secs(10)).unwrap();
        assert_eq!(
            (f.status.code(), f.stdout.as_str(), f.stderr.as_str()),
            (Some(3), "out\n", "err\n")
        );
    }
}
