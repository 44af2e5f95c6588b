//! Daemon configuration: TOML source → pure validation → resolution against the system.
//!
//! [`load`] reads one file and returns a [`Config`] whose every value has been checked;
//! any problem is a [`ConfigError`] that names the file, the line and column, and the
//! reason, and makes `cdd` exit with code 64. Unknown keys are errors (a typo must not
//! silently disable a setting). Option names carry their units (`max_rate_bytes_per_sec`).
//!
//! Validation is split in two: [`parse`] checks the text alone (syntax, types, ranges,
//! cross references between content sets and nodes), [`Config::resolve`] checks it
//! against the machine (content roots exist and are directories, PKI files exist).
//! `cdd check-config` runs both without starting anything.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

pub use crate::alert::http::HttpUrl;
pub use crate::fs::FileIoChoice;
use cd_core::filter::{CommandMask, Filter, FilterError, Pattern};
pub use cd_core::schedule::Schedule;
use cd_core::topology::{LinkClass, ServerSpec, Topology};
use serde::Deserialize;
use toml::Spanned;

/// A configuration problem, located in its file.
#[derive(Debug, thiserror::Error)]
#[error("{}:{line}:{column}: {reason}", file.display())]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based; 0 when the problem is not tied to a place (e.g. unreadable file).
    pub line: usize,
    pub column: usize,
    pub reason: String,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub file: PathBuf,
    pub name: String,
    pub state_dir: PathBuf,
    pub control_socket: PathBuf,
    pub log_level: String,
    /// Where `/metrics` listens (`metrics_listen`; default `127.0.0.1:0`, an
    /// ephemeral port shown by `cdctl status`); `None` = `"off"`.
    pub metrics_listen: Option<SocketAddr>,
    pub master: Option<MasterConfig>,
    pub node: Option<NodeConfig>,
    /// Locations of values that resolution may reject.
    spans: ResolveSpans,
}

#[derive(Debug, Clone)]
pub struct MasterConfig {
    pub listen: SocketAddr,
    pub pki_dir: PathBuf,
    pub content_sets: Vec<MasterContentSet>,
    /// The farm: every server's region, group and capacity weight (`[[master.servers]]`;
    /// a node named in a content set but not here is in region and group `default`
    /// with weight 1).
    pub servers: Vec<ServerSpec>,
    /// Policy per link class (`[master.link_classes.same_group]`, `same_region`,
    /// `international`): overrides the content set's value for links of that class.
    pub link_classes: BTreeMap<LinkClass, LinkPolicy>,
    /// Days of jobs and events the job log keeps (`job_log_retention_days`, default 30).
    pub job_log_retention_days: u32,
    /// The server monitor: what nodes sample, what the master checks, and the
    /// thresholds that alert or route around a node (`[master.monitor]`).
    pub monitor: MonitorConfig,
    /// Where alerts go (`[master.alerts]`); no sinks when the table is absent.
    pub alerts: AlertsConfig,
}

/// `[master.monitor]`: see the README (Monitoring).
#[derive(Debug, Clone, PartialEq)]
pub struct MonitorConfig {
    /// How often nodes sample and the master runs its checks (`interval`, default 10s).
    pub interval: std::time::Duration,
    /// Ports whose established connections count as sessions, and that the master
    /// checks with a TCP connect on every node (`service_ports`, default none).
    pub service_ports: Vec<u16>,
    /// The master pings every node with ICMP echo (`icmp`, default false; needs root
    /// or CAP_NET_RAW).
    pub icmp: bool,
    /// How long a TCP connect or ping may take before it fails (`check_timeout`,
    /// default 2s).
    pub check_timeout: std::time::Duration,
    /// Days of samples the job log keeps (`history_days`, default 7).
    pub history_days: u32,
    pub thresholds: Vec<Threshold>,
    /// `[master.monitor.groups.NAME] service_ports`: a group's own service ports,
    /// instead of the farm's.
    pub group_ports: BTreeMap<String, Vec<u16>>,
}

impl MonitorConfig {
    /// The service ports of the servers of `group`.
    pub fn service_ports_for(&self, group: &str) -> &[u16] {
        self.group_ports
            .get(group)
            .map_or(&self.service_ports[..], |p| &p[..])
    }
}

impl Default for MonitorConfig {
    fn default() -> Self {
        MonitorConfig {
            interval: std::time::Duration::from_secs(10),
            service_ports: Vec::new(),
            icmp: false,
            check_timeout: std::time::Duration::from_secs(2),
            history_days: 7,
            thresholds: Vec::new(),
            group_ports: BTreeMap::new(),
        }
    }
}

/// `[master.alerts]`: the sinks alerts are delivered to. Every alert is in the job log
/// whether or not any sink is configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertsConfig {
    /// `max_per_minute`: messages per sink per minute (default 10); more are folded
    /// into a digest when the minute allows. A sink's own key overrides it.
    pub max_per_minute: u32,
    /// `alertmanager_urls = [...]`: Alertmanager base URLs (`/api/v2/alerts` is
    /// appended); each gets every alert.
    pub alertmanager: Vec<HttpUrl>,
    /// `alertmanager_resend_seconds`: how often firing alerts are re-sent (default 60;
    /// keep it well under Alertmanager's `resolve_timeout`).
    pub alertmanager_resend_seconds: u64,
    /// `alertmanager_ca_file`: the CA for `https://` Alertmanagers (default: the system's).
    pub alertmanager_ca_file: Option<PathBuf>,
    /// `generator_url`: the `generatorURL` of every alert (default
    /// `cdsync://<master name>/alerts`).
    pub generator_url: Option<String>,
    /// `[master.alerts.email]`.
    pub email: Option<EmailConfig>,
    /// `[master.alerts.sms]`.
    pub sms: Option<SmsConfig>,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            max_per_minute: DEFAULT_ALERTS_PER_MINUTE,
            alertmanager: Vec::new(),
            alertmanager_resend_seconds: DEFAULT_ALERTMANAGER_RESEND_SECONDS,
            alertmanager_ca_file: None,
            generator_url: None,
            email: None,
            sms: None,
        }
    }
}

/// A monitored value that a threshold may watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Metric {
    Load1,
    Load5,
    Load15,
    CpuBusyRatio,
    MemoryUsedRatio,
    /// The fullest content root's file system.
    DiskUsedRatio,
    Sessions,
}

impl Metric {
    pub const ALL: [Metric; 7] = [
        Metric::Load1,
        Metric::Load5,
        Metric::Load15,
        Metric::CpuBusyRatio,
        Metric::MemoryUsedRatio,
        Metric::DiskUsedRatio,
        Metric::Sessions,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Load1 => "load1",
            Metric::Load5 => "load5",
            Metric::Load15 => "load15",
            Metric::CpuBusyRatio => "cpu_busy_ratio",
            Metric::MemoryUsedRatio => "memory_used_ratio",
            Metric::DiskUsedRatio => "disk_used_ratio",
            Metric::Sessions => "sessions",
        }
    }

    pub fn parse(s: &str) -> Option<Metric> {
        Metric::ALL.into_iter().find(|m| m.as_str() == s)
    }

    /// A share in 0..=1 (thresholds must be too).
    pub fn is_ratio(self) -> bool {
        matches!(
            self,
            Metric::CpuBusyRatio | Metric::MemoryUsedRatio | Metric::DiskUsedRatio
        )
    }
}

/// What crossing a threshold does besides alerting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ThresholdAction {
    /// Alert only.
    Alert,
    /// Alert, and route around the node (it still receives, never relays).
    RouteAround,
}

/// `[[master.monitor.thresholds]]`: fires when `metric` is above `above` for
/// `for_samples` consecutive samples, clears when it is below `clear_below`.
#[derive(Debug, Clone, PartialEq)]
pub struct Threshold {
    /// Only for the servers of this group; a group's thresholds for a metric replace
    /// the farm-wide ones (no `group`) for that metric.
    pub group: Option<String>,
    pub metric: Metric,
    pub above: f64,
    pub clear_below: f64,
    pub for_samples: u32,
    pub action: ThresholdAction,
}

pub const DEFAULT_ALERTS_PER_MINUTE: u32 = 10;
pub const DEFAULT_ALERTMANAGER_RESEND_SECONDS: u64 = 60;

/// How the SMTP connection is secured (`tls = ...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpTls {
    /// `"starttls"` (default): plain connect, then STARTTLS, refusing a server that
    /// does not offer it. Default port 587.
    StartTls,
    /// `"tls"`: TLS from the first byte (SMTPS). Default port 465.
    Implicit,
    /// `"none"`: clear text (a relay on loopback only). Default port 25.
    None,
}

/// `[master.alerts.email]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmailConfig {
    /// `smtp_server = "host[:port]"`.
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    /// `from = "cdsync <cdsync@example.com>"`.
    pub from: String,
    /// `to = ["ops@example.com", ...]`.
    pub to: Vec<String>,
    /// `username` + `password_file` (both or neither; not with `tls = "none"`).
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    /// `ca_file`: trust only this CA (PEM) for the server's certificate instead of
    /// the system's store.
    pub ca_file: Option<PathBuf>,
    pub max_per_minute: u32,
}

/// `[master.alerts.sms]`: a gateway webhook; each message is a `POST` of
/// `{"to": [...], "text": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmsConfig {
    pub url: HttpUrl,
    pub to: Vec<String>,
    /// `bearer_token_file`: sent as `Authorization: Bearer <token>`.
    pub bearer_token_file: Option<PathBuf>,
    /// `ca_file` for an `https://` gateway (default: the system's store).
    pub ca_file: Option<PathBuf>,
    pub max_per_minute: u32,
}

/// What a link class overrides of a content set's transfer policy (`None`: keep it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkPolicy {
    pub zstd_level: Option<i32>,
    pub max_rate_bytes_per_sec: Option<u64>,
    pub delta: Option<DeltaMode>,
    pub encryption: Option<bool>,
}

/// How a content set's changes travel from its source to its targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Routing {
    /// Along the master's route tree: one copy per group (to its head) and per other
    /// region (to the region head), relays forwarding (see `cd_core::route`).
    #[default]
    Relay,
    /// Every target straight from the source (1:N).
    Direct,
}

/// When a node that was down catches up (`catch_up = ...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CatchUp {
    /// As soon as it is back.
    #[default]
    Immediate,
    /// When an operator runs `cdctl catchup`.
    Command,
    /// At the next HH:MM, local time.
    Daily { hour: u8, minute: u8 },
}

impl std::fmt::Display for CatchUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CatchUp::Immediate => f.write_str("immediate"),
            CatchUp::Command => f.write_str("command"),
            CatchUp::Daily { hour, minute } => write!(f, "at {hour:02}:{minute:02}"),
        }
    }
}

/// A content set as the master sees it: who is the source, who receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterContentSet {
    pub name: String,
    /// The source; for an N:M set the first of `sources` (the one manual and
    /// scheduled jobs run on).
    pub source: String,
    /// Every source: `source = "x"` is `["x"]`; `sources = ["ed1", "ed2"]` makes an
    /// N:M set (several writers, last writer wins per path, see `cd_core::lww`),
    /// always routed directly: each source sends its own writes to every other member.
    pub sources: Vec<String>,
    pub targets: Vec<String>,
    /// 0 = no compression (file data can then go out with `sendfile`).
    pub zstd_level: i32,
    /// 0 = unlimited.
    pub max_rate_bytes_per_sec: u64,
    /// `delta = "auto"` (default: a delta against the replica's version where it
    /// pays) or `"never"` (whole files only, "dump copy").
    pub delta: DeltaMode,
    /// `encryption = false`: the source asks its targets to drop TLS after the
    /// authenticated handshake; a target does so only for a source it lists in its
    /// `trusted_peers`.
    pub encryption: bool,
    pub mode: SyncMode,
    /// `mode = "scheduled"`: `schedule = "0 3 * * *"` (cron, the master's local time)
    /// or `every = "15m"`. `None` for the other modes.
    pub schedule: Option<Schedule>,
    /// `include`, `exclude` and `commands`: what the set syncs and which changes it
    /// may make on its replicas (everything when none is given).
    pub filter: Filter,
    pub routing: Routing,
    /// Per-data-kind targeting (`[master.content_sets.target_filters.NODE]`): what
    /// that target holds of the set. Its `include` replaces the set's (when given),
    /// its `exclude` adds to the set's; the command mask is the set's. Such a target
    /// never relays (it lacks what the others need).
    pub target_filters: BTreeMap<String, Filter>,
    /// Manual routes: target → the parent an operator chose (`routes = { b = "a" }`).
    pub routes: BTreeMap<String, String>,
    pub catch_up: CatchUp,
}

/// Whether a content set's changed files may travel as deltas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeltaMode {
    #[default]
    Auto,
    Never,
}

/// `metrics_listen` when the config does not say: loopback, an ephemeral port.
pub const DEFAULT_METRICS_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

/// The prefix that makes an `include`/`exclude` entry a regex; anything else is a glob.
pub const REGEX_PREFIX: &str = "re:";
/// The prefix that makes an entry a glob explicitly (for a glob starting with `re:`).
pub const GLOB_PREFIX: &str = "glob:";

/// When a content set is distributed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncMode {
    /// Only on `cdctl sync`.
    Manual,
    /// Changes are captured in the kernel and shipped as they happen (plus `cdctl sync`).
    Realtime,
    /// The master runs a sync job on a timer (`schedule` or `every`), plus `cdctl sync`.
    Scheduled,
}

/// Which kernel capture backend a node uses for its real-time content sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CaptureChoice {
    /// eBPF where the kernel loads the programs, else fanotify (the reason is reported).
    Auto,
    Ebpf,
    Fanotify,
}

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub master_addr: String,
    pub master_name: String,
    pub listen: SocketAddr,
    pub join_token: Option<String>,
    pub content_sets: Vec<NodeContentSet>,
    pub capture: CaptureChoice,
    /// Quiet time after a path's last event before it ships (0 = as soon as ready).
    pub debounce_ms: u64,
    /// Size of the eBPF ring buffer (the File Detect Buffer).
    pub ring_buffer_mib: u32,
    /// Hand the TLS record layer of transfers to the kernel where it has TLS (default
    /// true; the environment variable `CDD_KTLS=off` also turns it off).
    pub ktls: bool,
    /// Sources this node accepts plaintext transfers from (content sets with
    /// `encryption = false`); `"*"` = any cluster member. Default: none.
    pub trusted_peers: Vec<String>,
    /// How files are read for sending (`io_uring` falls back to `sync` where the
    /// kernel refuses it).
    pub file_io: FileIoChoice,
    /// Read files for sending with `O_DIRECT` (io_uring only; filesystems that refuse
    /// it are read buffered).
    pub direct_io: bool,
    /// Where the monitor reads `stat`, `meminfo`, `loadavg` and `net/tcp{,6}`
    /// (`monitor_proc_root`, default `/proc`; another directory is for tests and
    /// containers that mount the host's proc elsewhere).
    pub monitor_proc_root: PathBuf,
}

/// A content set as a node sees it: where its root is on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeContentSet {
    pub name: String,
    pub root: PathBuf,
}

#[derive(Debug, Clone, Default)]
struct ResolveSpans {
    pki_dir: Range<usize>,
    roots: Vec<Range<usize>>,
    join_token_file: Option<(PathBuf, Range<usize>)>,
    /// Files `[master.alerts]` names: checked readable (and a CA file parsed).
    alert_files: Vec<(PathBuf, Range<usize>, AlertFile)>,
    text: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AlertFile {
    Ca,
    Secret,
}

// ---- source (serde) -------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    name: Spanned<String>,
    state_dir: Spanned<PathBuf>,
    control_socket: Option<Spanned<PathBuf>>,
    metrics_listen: Option<Spanned<String>>,
    log: Option<RawLog>,
    master: Option<RawMaster>,
    node: Option<RawNode>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMaster {
    listen: Spanned<String>,
    pki_dir: Spanned<PathBuf>,
    job_log_retention_days: Option<Spanned<i64>>,
    monitor: Option<RawMonitor>,
    #[serde(default)]
    content_sets: Vec<RawMasterSet>,
    #[serde(default)]
    servers: Vec<RawServer>,
    link_classes: Option<RawLinkClasses>,
    alerts: Option<RawAlerts>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAlerts {
    max_per_minute: Option<Spanned<i64>>,
    alertmanager_urls: Option<Vec<Spanned<String>>>,
    alertmanager_resend_seconds: Option<Spanned<i64>>,
    alertmanager_ca_file: Option<Spanned<PathBuf>>,
    generator_url: Option<Spanned<String>>,
    email: Option<RawEmail>,
    sms: Option<RawSms>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEmail {
    smtp_server: Spanned<String>,
    tls: Option<Spanned<String>>,
    from: Spanned<String>,
    to: Spanned<Vec<Spanned<String>>>,
    username: Option<Spanned<String>>,
    password_file: Option<Spanned<PathBuf>>,
    ca_file: Option<Spanned<PathBuf>>,
    max_per_minute: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSms {
    url: Spanned<String>,
    to: Spanned<Vec<Spanned<String>>>,
    bearer_token_file: Option<Spanned<PathBuf>>,
    ca_file: Option<Spanned<PathBuf>>,
    max_per_minute: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMonitor {
    interval: Option<Spanned<String>>,
    service_ports: Option<Vec<Spanned<i64>>>,
    icmp: Option<bool>,
    check_timeout: Option<Spanned<String>>,
    history_days: Option<Spanned<i64>>,
    #[serde(default)]
    thresholds: Vec<RawThreshold>,
    #[serde(default)]
    groups: BTreeMap<Spanned<String>, RawMonitorGroup>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMonitorGroup {
    service_ports: Vec<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawThreshold {
    group: Option<Spanned<String>>,
    metric: Spanned<String>,
    above: Spanned<f64>,
    clear_below: Spanned<f64>,
    for_samples: Option<Spanned<i64>>,
    action: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTargetFilter {
    include: Option<Vec<Spanned<String>>>,
    exclude: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    name: Spanned<String>,
    region: Spanned<String>,
    group: Spanned<String>,
    weight: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLinkClasses {
    same_group: Option<RawLinkPolicy>,
    same_region: Option<RawLinkPolicy>,
    international: Option<RawLinkPolicy>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLinkPolicy {
    zstd_level: Option<Spanned<i64>>,
    max_rate_bytes_per_sec: Option<Spanned<i64>>,
    delta: Option<Spanned<String>>,
    encryption: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMasterSet {
    name: Spanned<String>,
    source: Option<Spanned<String>>,
    sources: Option<Spanned<Vec<Spanned<String>>>>,
    targets: Spanned<Vec<Spanned<String>>>,
    zstd_level: Option<Spanned<i64>>,
    max_rate_bytes_per_sec: Option<Spanned<i64>>,
    delta: Option<Spanned<String>>,
    encryption: Option<bool>,
    mode: Option<Spanned<String>>,
    schedule: Option<Spanned<String>>,
    every: Option<Spanned<String>>,
    include: Option<Vec<Spanned<String>>>,
    exclude: Option<Vec<Spanned<String>>>,
    commands: Option<RawCommands>,
    routing: Option<Spanned<String>>,
    target_filters: Option<BTreeMap<String, Spanned<RawTargetFilter>>>,
    routes: Option<BTreeMap<String, Spanned<String>>>,
    catch_up: Option<Spanned<String>>,
}

/// `commands = { create = true, update = true, delete = false, move = true, erase = false }`;
/// an omitted key is `true`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCommands {
    create: Option<bool>,
    update: Option<bool>,
    delete: Option<bool>,
    #[serde(rename = "move")]
    r#move: Option<bool>,
    erase: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    master_addr: Spanned<String>,
    master_name: Spanned<String>,
    listen: Spanned<String>,
    join_token: Option<Spanned<String>>,
    join_token_file: Option<Spanned<PathBuf>>,
    capture: Option<Spanned<String>>,
    debounce_ms: Option<Spanned<i64>>,
    ring_buffer_mib: Option<Spanned<i64>>,
    ktls: Option<bool>,
    trusted_peers: Option<Vec<Spanned<String>>>,
    file_io: Option<Spanned<String>>,
    direct_io: Option<Spanned<bool>>,
    monitor_proc_root: Option<Spanned<PathBuf>>,
    #[serde(default)]
    content_sets: Vec<RawNodeSet>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNodeSet {
    name: Spanned<String>,
    root: Spanned<PathBuf>,
}

// ---- validation -------------------------------------------------------------------

/// Reads and validates `file` (syntax and values; see [`Config::resolve`] for the rest).
pub fn load(file: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|e| ConfigError {
        file: file.to_owned(),
        line: 0,
        column: 0,
        reason: format!("cannot read: {e}"),
    })?;
    parse(file, &text)
}

/// Validates configuration `text` that came from `file`.
pub fn parse(file: &Path, text: &str) -> Result<Config, ConfigError> {
    let err = |span: Range<usize>, reason: String| locate(file, text, span, reason);
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let reason = e.message().trim_end().to_owned();
        err(e.span().unwrap_or(0..0), reason)
    })?;

    check_name(raw.name.get_ref()).map_err(|r| err(raw.name.span(), r))?;
    let state_dir = absolute(&raw.state_dir).map_err(|r| err(raw.state_dir.span(), r))?;
    let control_socket = match &raw.control_socket {
        Some(s) => absolute(s).map_err(|r| err(s.span(), r))?,
        None => state_dir.join("cdd.sock"),
    };
    let log_level = match &raw.log {
        Some(l) => {
            let v = l.level.get_ref();
            if !["error", "warn", "info", "debug", "trace"].contains(&v.as_str()) {
                return Err(err(
                    l.level.span(),
                    format!("log level `{v}` is not one of error, warn, info, debug, trace"),
                ));
            }
            v.clone()
        }
        None => "info".to_owned(),
    };

    let metrics_listen = match &raw.metrics_listen {
        None => Some(DEFAULT_METRICS_LISTEN),
        Some(s) if s.get_ref() == "off" => None,
        Some(s) => Some(s.get_ref().parse().map_err(|_| {
            err(
                s.span(),
                format!(
                    "metrics_listen `{}` is not an IP:PORT address or \"off\"",
                    s.get_ref()
                ),
            )
        })?),
    };

    let mut spans = ResolveSpans {
        text: text.to_owned(),
        ..Default::default()
    };

    let master = match raw.master {
        None => None,
        Some(m) => {
            let listen = parse_addr(&m.listen).map_err(|r| err(m.listen.span(), r))?;
            let pki_dir = absolute(&m.pki_dir).map_err(|r| err(m.pki_dir.span(), r))?;
            spans.pki_dir = m.pki_dir.span();
            let mut names = BTreeSet::new();
            let mut sets = Vec::new();
            for s in &m.content_sets {
                check_name(s.name.get_ref()).map_err(|r| err(s.name.span(), r))?;
                if !names.insert(s.name.get_ref().clone()) {
                    return Err(err(
                        s.name.span(),
                        format!("duplicate content set `{}`", s.name.get_ref()),
                    ));
                }
                let sources = set_sources(s, &err)?;
                let nm = sources.len() > 1;
                if s.targets.get_ref().is_empty() {
                    return Err(err(
                        s.targets.span(),
                        "targets must name at least one node".into(),
                    ));
                }
                let mut seen = BTreeSet::new();
                for t in s.targets.get_ref() {
                    check_name(t.get_ref()).map_err(|r| err(t.span(), format!("target: {r}")))?;
                    if sources.iter().any(|x| x.get_ref() == t.get_ref()) {
                        return Err(err(
                            t.span(),
                            format!("`{}` is a source; it cannot also be a target", t.get_ref()),
                        ));
                    }
                    if !seen.insert(t.get_ref().clone()) {
                        return Err(err(
                            t.span(),
                            format!("target `{}` is listed twice", t.get_ref()),
                        ));
                    }
                }
                let zstd_level = zstd_level(&s.zstd_level, &err)?.unwrap_or(3);
                let max_rate_bytes_per_sec =
                    max_rate(&s.max_rate_bytes_per_sec, &err)?.unwrap_or(0);
                let delta = delta_mode(&s.delta, &err)?.unwrap_or_default();
                let mode = match s.mode.as_ref().map(|m| (m.get_ref().as_str(), m.span())) {
                    None | Some(("manual", _)) => SyncMode::Manual,
                    Some(("realtime", _)) => SyncMode::Realtime,
                    Some(("scheduled", _)) => SyncMode::Scheduled,
                    Some((other, span)) => {
                        return Err(err(
                            span,
                            format!("mode `{other}` is not one of manual, realtime, scheduled"),
                        ));
                    }
                };
                let routing = match s.routing.as_ref().map(|m| (m.get_ref().as_str(), m.span())) {
                    None if nm => Routing::Direct,
                    Some(("relay", span)) if nm => {
                        return Err(err(
                            span,
                            "routing: a content set with several sources is routed directly (each source to every other member)".into(),
                        ));
                    }
                    None | Some(("relay", _)) => Routing::Relay,
                    Some(("direct", _)) => Routing::Direct,
                    Some((other, span)) => {
                        return Err(err(
                            span,
                            format!("routing `{other}` is not one of relay, direct"),
                        ));
                    }
                };
                let mut routes = BTreeMap::new();
                if nm && let Some((_, parent)) = s.routes.iter().flatten().next() {
                    return Err(err(
                        parent.span(),
                        "routes: a content set with several sources is routed directly; it takes no manual routes".into(),
                    ));
                }
                if nm && let Some((_, tf)) = s.target_filters.iter().flatten().next() {
                    return Err(err(
                        tf.span(),
                        "target_filters: not supported in a content set with several sources"
                            .into(),
                    ));
                }
                for (child, parent) in s.routes.iter().flatten() {
                    let members = || {
                        std::iter::once(sources[0].get_ref())
                            .chain(s.targets.get_ref().iter().map(|t| t.get_ref()))
                    };
                    if !s.targets.get_ref().iter().any(|t| t.get_ref() == child) {
                        return Err(err(
                            parent.span(),
                            format!("routes: `{child}` is not a target of this content set"),
                        ));
                    }
                    if !members().any(|m| m == parent.get_ref()) || parent.get_ref() == child {
                        return Err(err(
                            parent.span(),
                            format!(
                                "routes: the parent of `{child}` must be the source or another target, not `{}`",
                                parent.get_ref()
                            ),
                        ));
                    }
                    routes.insert(child.clone(), parent.get_ref().clone());
                }
                let catch_up = match &s.catch_up {
                    None => CatchUp::Immediate,
                    Some(c) => parse_catch_up(c.get_ref()).map_err(|r| err(c.span(), r))?,
                };
                let schedule = parse_schedule(text, s, mode).map_err(|(span, r)| err(span, r))?;
                let patterns = |list: &'static str, raw: &Option<Vec<Spanned<String>>>| {
                    raw.iter()
                        .flatten()
                        .map(|p| {
                            parse_pattern(p.get_ref())
                                .map_err(|r| err(p.span(), format!("{list}: {r}")))
                        })
                        .collect::<Result<Vec<_>, _>>()
                };
                let include = patterns("include", &s.include)?;
                let exclude = patterns("exclude", &s.exclude)?;
                let commands = match &s.commands {
                    None => CommandMask::ALL,
                    Some(c) => CommandMask {
                        create: c.create.unwrap_or(true),
                        update: c.update.unwrap_or(true),
                        delete: c.delete.unwrap_or(true),
                        r#move: c.r#move.unwrap_or(true),
                        erase: c.erase.unwrap_or(true),
                    },
                };
                sets.push(MasterContentSet {
                    name: s.name.get_ref().clone(),
                    source: sources[0].get_ref().clone(),
                    sources: sources.iter().map(|x| x.get_ref().clone()).collect(),
                    targets: s
                        .targets
                        .get_ref()
                        .iter()
                        .map(|t| t.get_ref().clone())
                        .collect(),
                    zstd_level,
                    max_rate_bytes_per_sec,
                    delta,
                    encryption: s.encryption.unwrap_or(true),
                    mode,
                    filter: Filter::new(include.clone(), exclude.clone(), commands),
                    target_filters: {
                        let set_filter = Filter::new(include.clone(), exclude.clone(), commands);
                        let mut out = BTreeMap::new();
                        for (t, tf) in s.target_filters.iter().flatten() {
                            if !s.targets.get_ref().iter().any(|x| x.get_ref() == t) {
                                return Err(err(
                                    tf.span(),
                                    format!(
                                        "target_filters: `{t}` is not a target of this content set"
                                    ),
                                ));
                            }
                            let ti = patterns("include", &tf.get_ref().include)?;
                            let mut te = exclude.clone();
                            te.extend(patterns("exclude", &tf.get_ref().exclude)?);
                            let inc = if ti.is_empty() {
                                set_filter.include().to_vec()
                            } else {
                                ti
                            };
                            out.insert(t.clone(), Filter::new(inc, te, commands));
                        }
                        out
                    },
                    schedule,
                    routing,
                    routes,
                    catch_up,
                });
            }
            // The farm: a topology cd_core accepts, over every server named anywhere.
            let mut servers = Vec::new();
            for sv in &m.servers {
                check_name(sv.name.get_ref()).map_err(|r| err(sv.name.span(), r))?;
                for (what, v) in [("region", &sv.region), ("group", &sv.group)] {
                    check_name(v.get_ref()).map_err(|r| err(v.span(), format!("{what}: {r}")))?;
                }
                let weight = int_in(&sv.weight, "weight", 1..=1_000_000, 1, &err)? as u32;
                if servers
                    .iter()
                    .any(|x: &ServerSpec| &x.name == sv.name.get_ref())
                {
                    return Err(err(
                        sv.name.span(),
                        format!("server `{}` is listed twice", sv.name.get_ref()),
                    ));
                }
                servers.push(ServerSpec::new(
                    sv.name.get_ref(),
                    sv.region.get_ref(),
                    sv.group.get_ref(),
                    weight,
                ));
            }
            let mut link_classes = BTreeMap::new();
            if let Some(lc) = &m.link_classes {
                for (class, raw) in [
                    (LinkClass::SameGroup, &lc.same_group),
                    (LinkClass::SameRegion, &lc.same_region),
                    (LinkClass::International, &lc.international),
                ] {
                    let Some(raw) = raw else { continue };
                    link_classes.insert(
                        class,
                        LinkPolicy {
                            zstd_level: zstd_level(&raw.zstd_level, &err)?,
                            max_rate_bytes_per_sec: max_rate(&raw.max_rate_bytes_per_sec, &err)?,
                            delta: delta_mode(&raw.delta, &err)?,
                            encryption: raw.encryption,
                        },
                    );
                }
            }
            let job_log_retention_days = int_in(
                &m.job_log_retention_days,
                "job_log_retention_days",
                1..=36_500,
                crate::joblog::DEFAULT_RETENTION_DAYS.into(),
                &err,
            )? as u32;
            let monitor = match &m.monitor {
                None => MonitorConfig::default(),
                Some(raw) => parse_monitor(raw, &servers, &err)?,
            };
            let alerts = match &m.alerts {
                None => AlertsConfig::default(),
                Some(a) => parse_alerts(a, &err, &mut spans)?,
            };
            let mc = MasterConfig {
                listen,
                pki_dir,
                content_sets: sets,
                servers,
                link_classes,
                job_log_retention_days,
                monitor,
                alerts,
            };
            mc.topology()
                .map_err(|e| err(0..0, format!("[[master.servers]]: {e}")))?;
            Some(mc)
        }
    };

    let node = match raw.node {
        None => None,
        Some(n) => {
            if n.master_addr
                .get_ref()
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .is_none()
            {
                return Err(err(
                    n.master_addr.span(),
                    format!("master_addr `{}` is not HOST:PORT", n.master_addr.get_ref()),
                ));
            }
            check_name(n.master_name.get_ref())
                .map_err(|r| err(n.master_name.span(), format!("master_name: {r}")))?;
            let listen = parse_addr(&n.listen).map_err(|r| err(n.listen.span(), r))?;
            let join_token = match (&n.join_token, &n.join_token_file) {
                (Some(t), None) => Some(t.get_ref().trim().to_owned()),
                (None, Some(f)) => {
                    let p = absolute(f).map_err(|r| err(f.span(), r))?;
                    spans.join_token_file = Some((p, f.span()));
                    None
                }
                (None, None) => None,
                (Some(_), Some(f)) => {
                    return Err(err(
                        f.span(),
                        "set join_token or join_token_file, not both".into(),
                    ));
                }
            };
            let mut names = BTreeSet::new();
            let mut sets = Vec::new();
            for s in &n.content_sets {
                check_name(s.name.get_ref()).map_err(|r| err(s.name.span(), r))?;
                if !names.insert(s.name.get_ref().clone()) {
                    return Err(err(
                        s.name.span(),
                        format!("duplicate content set `{}`", s.name.get_ref()),
                    ));
                }
                let root = absolute(&s.root).map_err(|r| err(s.root.span(), r))?;
                if root.starts_with(&state_dir) || state_dir.starts_with(&root) {
                    return Err(err(
                        s.root.span(),
                        "a content root must not contain or lie inside state_dir".into(),
                    ));
                }
                spans.roots.push(s.root.span());
                sets.push(NodeContentSet {
                    name: s.name.get_ref().clone(),
                    root,
                });
            }
            let capture = match n.capture.as_ref().map(|c| (c.get_ref().as_str(), c.span())) {
                None | Some(("auto", _)) => CaptureChoice::Auto,
                Some(("ebpf", _)) => CaptureChoice::Ebpf,
                Some(("fanotify", _)) => CaptureChoice::Fanotify,
                Some((other, span)) => {
                    return Err(err(
                        span,
                        format!("capture `{other}` is not one of auto, ebpf, fanotify"),
                    ));
                }
            };
            let debounce_ms = int_in(&n.debounce_ms, "debounce_ms", 0..=600_000, 0, &err)? as u64;
            let ring_buffer_mib = match &n.ring_buffer_mib {
                None => 32,
                Some(r)
                    if (1..=1024).contains(r.get_ref())
                        && (*r.get_ref() as u64).is_power_of_two() =>
                {
                    *r.get_ref() as u32
                }
                Some(r) => {
                    return Err(err(
                        r.span(),
                        format!(
                            "ring_buffer_mib {} must be a power of two in 1..=1024",
                            r.get_ref()
                        ),
                    ));
                }
            };
            let mut trusted_peers = Vec::new();
            for t in n.trusted_peers.iter().flatten() {
                if t.get_ref() != "*" {
                    check_name(t.get_ref())
                        .map_err(|r| err(t.span(), format!("trusted_peers: {r} (or \"*\")")))?;
                }
                trusted_peers.push(t.get_ref().clone());
            }
            let file_io = match n.file_io.as_ref().map(|c| (c.get_ref().as_str(), c.span())) {
                None | Some(("io_uring", _)) => FileIoChoice::IoUring,
                Some(("sync", _)) => FileIoChoice::Sync,
                Some((other, span)) => {
                    return Err(err(
                        span,
                        format!("file_io `{other}` is not one of io_uring, sync"),
                    ));
                }
            };
            let direct_io = match &n.direct_io {
                Some(d) if *d.get_ref() && file_io == FileIoChoice::Sync => {
                    return Err(err(
                        d.span(),
                        "direct_io needs file_io = \"io_uring\"".into(),
                    ));
                }
                Some(d) => *d.get_ref(),
                None => false,
            };
            let monitor_proc_root = match &n.monitor_proc_root {
                None => PathBuf::from("/proc"),
                Some(p) => {
                    absolute(p).map_err(|r| err(p.span(), format!("monitor_proc_root: {r}")))?
                }
            };
            Some(NodeConfig {
                master_addr: n.master_addr.get_ref().clone(),
                master_name: n.master_name.get_ref().clone(),
                listen,
                join_token,
                content_sets: sets,
                capture,
                debounce_ms,
                ring_buffer_mib,
                ktls: n.ktls.unwrap_or(true),
                trusted_peers,
                file_io,
                direct_io,
                monitor_proc_root,
            })
        }
    };

    if master.is_none() && node.is_none() {
        return Err(err(
            0..0,
            "no role: add a [master] or a [node] table (or both)".into(),
        ));
    }

    Ok(Config {
        file: file.to_owned(),
        name: raw.name.get_ref().clone(),
        state_dir,
        control_socket,
        log_level,
        metrics_listen,
        master,
        node,
        spans,
    })
}

impl Config {
    /// Checks the configuration against this machine: content roots exist and are
    /// directories, the PKI directory holds what `cdctl ca init` writes, a join token
    /// file is readable. Fills `join_token` from `join_token_file`.
    pub fn resolve(&mut self) -> Result<(), ConfigError> {
        let file = self.file.clone();
        let text = std::mem::take(&mut self.spans.text);
        let err = |span: Range<usize>, reason: String| locate(&file, &text, span, reason);
        if let Some(m) = &self.master {
            for f in crate::pki::MASTER_FILES {
                let p = m.pki_dir.join(f);
                if !p.is_file() {
                    return Err(err(
                        self.spans.pki_dir.clone(),
                        format!(
                            "{} is missing (create it with `cdctl ca init --dir {}`)",
                            p.display(),
                            m.pki_dir.display()
                        ),
                    ));
                }
            }
        }
        for (p, span, kind) in &self.spans.alert_files {
            let bytes =
                std::fs::read(p).map_err(|e| err(span.clone(), format!("{}: {e}", p.display())))?;
            match kind {
                AlertFile::Ca => {
                    crate::alert::http::tls_config(Some(&bytes))
                        .map_err(|r| err(span.clone(), format!("{}: {r}", p.display())))?;
                }
                AlertFile::Secret => {
                    if String::from_utf8_lossy(&bytes).trim().is_empty() {
                        return Err(err(span.clone(), format!("{} is empty", p.display())));
                    }
                }
            }
        }
        if let Some(n) = &mut self.node {
            for (s, span) in n.content_sets.iter().zip(&self.spans.roots) {
                match std::fs::symlink_metadata(&s.root) {
                    Ok(md) if md.is_dir() => {}
                    Ok(_) => {
                        return Err(err(
                            span.clone(),
                            format!("content root {} is not a directory", s.root.display()),
                        ));
                    }
                    Err(e) => {
                        return Err(err(
                            span.clone(),
                            format!("content root {}: {e}", s.root.display()),
                        ));
                    }
                }
            }
            if let Some((p, span)) = &self.spans.join_token_file {
                let t = std::fs::read_to_string(p).map_err(|e| {
                    err(
                        span.clone(),
                        format!("join_token_file {}: {e}", p.display()),
                    )
                })?;
                n.join_token = Some(t.trim().to_owned());
            }
        }
        self.spans.text = text;
        Ok(())
    }

    pub fn roles(&self) -> Vec<&'static str> {
        let mut r = Vec::new();
        if self.master.is_some() {
            r.push("master");
        }
        if self.node.is_some() {
            r.push("node");
        }
        r
    }
}

/// `[master.alerts]`, validated; files it names are checked by [`Config::resolve`].
fn parse_alerts(
    a: &RawAlerts,
    err: &ErrAt<'_>,
    spans: &mut ResolveSpans,
) -> Result<AlertsConfig, ConfigError> {
    let per_minute = |v: &Option<Spanned<i64>>, default: u32| {
        int_in(v, "max_per_minute", 1..=10_000, default.into(), err).map(|n| n as u32)
    };
    let mut file = |f: &Spanned<PathBuf>, kind: AlertFile| {
        let p = absolute(f).map_err(|r| err(f.span(), r))?;
        spans.alert_files.push((p.clone(), f.span(), kind));
        Ok::<_, ConfigError>(p)
    };
    let max_per_minute = per_minute(&a.max_per_minute, DEFAULT_ALERTS_PER_MINUTE)?;
    let mut alertmanager = Vec::new();
    for u in a.alertmanager_urls.iter().flatten() {
        let url = HttpUrl::parse(u.get_ref())
            .map_err(|r| err(u.span(), format!("alertmanager_urls: {r}")))?;
        alertmanager.push(url);
    }
    let alertmanager_resend_seconds = int_in(
        &a.alertmanager_resend_seconds,
        "alertmanager_resend_seconds",
        1..=3600,
        DEFAULT_ALERTMANAGER_RESEND_SECONDS as i64,
        err,
    )? as u64;
    let alertmanager_ca_file = match &a.alertmanager_ca_file {
        Some(f) if !alertmanager.iter().any(|u| u.https) => {
            return Err(err(
                f.span(),
                "alertmanager_ca_file is for https:// Alertmanagers; alertmanager_urls has none"
                    .into(),
            ));
        }
        Some(f) => Some(file(f, AlertFile::Ca)?),
        None => None,
    };
    let generator_url = match &a.generator_url {
        Some(g) if g.get_ref().is_empty() || g.get_ref().contains(char::is_whitespace) => {
            return Err(err(
                g.span(),
                "generator_url must be a URL without spaces".into(),
            ));
        }
        g => g.as_ref().map(|g| g.get_ref().clone()),
    };
    let mailboxes = |list: &Spanned<Vec<Spanned<String>>>| {
        if list.get_ref().is_empty() {
            return Err(err(
                list.span(),
                "to must name at least one recipient".into(),
            ));
        }
        list.get_ref()
            .iter()
            .map(|t| {
                if t.get_ref().trim().is_empty() {
                    Err(err(t.span(), "an empty recipient".into()))
                } else {
                    Ok(t.get_ref().trim().to_owned())
                }
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let email = match &a.email {
        None => None,
        Some(e) => {
            let tls = match e.tls.as_ref().map(|t| (t.get_ref().as_str(), t.span())) {
                None | Some(("starttls", _)) => SmtpTls::StartTls,
                Some(("tls", _)) => SmtpTls::Implicit,
                Some(("none", _)) => SmtpTls::None,
                Some((other, span)) => {
                    return Err(err(
                        span,
                        format!("tls `{other}` is not one of starttls, tls, none"),
                    ));
                }
            };
            let server = e.smtp_server.get_ref();
            let (host, port) = match server.rsplit_once(':') {
                Some((h, p)) if !h.contains(':') || h.ends_with(']') => (
                    h.trim_start_matches('[').trim_end_matches(']').to_owned(),
                    p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
                        err(
                            e.smtp_server.span(),
                            format!("smtp_server `{server}`: bad port `{p}`"),
                        )
                    })?,
                ),
                _ => (
                    server.clone(),
                    match tls {
                        SmtpTls::StartTls => 587,
                        SmtpTls::Implicit => 465,
                        SmtpTls::None => 25,
                    },
                ),
            };
            if host.is_empty() || host.contains(char::is_whitespace) {
                return Err(err(
                    e.smtp_server.span(),
                    format!("smtp_server `{server}` is not HOST[:PORT]"),
                ));
            }
            let check_mailbox = |m: &Spanned<String>, what: &str| {
                m.get_ref()
                    .parse::<lettre::message::Mailbox>()
                    .map_err(|x| err(m.span(), format!("{what} `{}`: {x}", m.get_ref())))
            };
            check_mailbox(&e.from, "from")?;
            let to = mailboxes(&e.to)?;
            for t in e.to.get_ref() {
                check_mailbox(t, "to")?;
            }
            let password_file = match (&e.username, &e.password_file) {
                (Some(_), Some(f)) => Some(file(f, AlertFile::Secret)?),
                (None, None) => None,
                (Some(u), None) => {
                    return Err(err(u.span(), "username needs password_file".into()));
                }
                (None, Some(f)) => {
                    return Err(err(f.span(), "password_file needs username".into()));
                }
            };
            if tls == SmtpTls::None {
                if let Some(u) = &e.username {
                    return Err(err(
                        u.span(),
                        "a password is never sent in clear text: set tls = \"starttls\" or \"tls\""
                            .into(),
                    ));
                }
                if let Some(c) = &e.ca_file {
                    return Err(err(
                        c.span(),
                        "ca_file needs tls = \"starttls\" or \"tls\"".into(),
                    ));
                }
            }
            Some(EmailConfig {
                host,
                port,
                tls,
                from: e.from.get_ref().clone(),
                to,
                username: e.username.as_ref().map(|u| u.get_ref().clone()),
                password_file,
                ca_file: e
                    .ca_file
                    .as_ref()
                    .map(|f| file(f, AlertFile::Ca))
                    .transpose()?,
                max_per_minute: per_minute(&e.max_per_minute, max_per_minute)?,
            })
        }
    };
    let sms = match &a.sms {
        None => None,
        Some(s) => {
            let url = HttpUrl::parse(s.url.get_ref()).map_err(|r| err(s.url.span(), r))?;
            if let Some(c) = &s.ca_file
                && !url.https
            {
                return Err(err(c.span(), "ca_file needs an https:// url".into()));
            }
            Some(SmsConfig {
                to: mailboxes(&s.to)?,
                bearer_token_file: s
                    .bearer_token_file
                    .as_ref()
                    .map(|f| file(f, AlertFile::Secret))
                    .transpose()?,
                ca_file: s
                    .ca_file
                    .as_ref()
                    .map(|f| file(f, AlertFile::Ca))
                    .transpose()?,
                max_per_minute: per_minute(&s.max_per_minute, max_per_minute)?,
                url,
            })
        }
    };
    Ok(AlertsConfig {
        max_per_minute,
        alertmanager,
        alertmanager_resend_seconds,
        alertmanager_ca_file,
        generator_url,
        email,
        sms,
    })
}

/// A scheduled set's `schedule` (cron) or `every` (interval): exactly one of them, and
/// only with `mode = "scheduled"`. A bad expression is located at its bad field.
fn parse_schedule(
    text: &str,
    s: &RawMasterSet,
    mode: SyncMode,
) -> Result<Option<Schedule>, (Range<usize>, String)> {
    use cd_core::schedule::{Cron, parse_every};
    let given = s.schedule.as_ref().or(s.every.as_ref());
    if mode != SyncMode::Scheduled {
        return match given {
            Some(v) => Err((
                v.span(),
                "`schedule` and `every` need mode = \"scheduled\"".into(),
            )),
            None => Ok(None),
        };
    }
    // Where the string's content starts: after its opening quote, when it has no
    // escapes (so byte offsets in the value are byte offsets in the file).
    let at = |v: &Spanned<String>, offset: usize| {
        let span = v.span();
        let raw = text.get(span.clone()).unwrap_or_default();
        let start = if raw.len() == v.get_ref().len() + 2 {
            span.start + 1 + offset
        } else {
            span.start
        };
        start..span.end
    };
    match (&s.schedule, &s.every) {
        (Some(c), None) => Cron::parse(c.get_ref())
            .map(|c| Some(Schedule::Cron(c)))
            .map_err(|e| (at(c, e.at), format!("schedule: {}", e.reason))),
        (None, Some(e)) => parse_every(e.get_ref())
            .map(|seconds| Some(Schedule::Every { seconds }))
            .map_err(|x| (at(e, x.at), format!("every: {}", x.reason))),
        (Some(_), Some(e)) => Err((e.span(), "set `schedule` or `every`, not both".into())),
        (None, None) => Err((
            s.mode.as_ref().map_or(s.name.span(), Spanned::span),
            "mode = \"scheduled\" needs `schedule = \"MIN HOUR DOM MON DOW\"` or `every = \"15m\"`"
                .into(),
        )),
    }
}

fn locate(file: &Path, text: &str, span: Range<usize>, reason: String) -> ConfigError {
    let start = span.start.min(text.len());
    let before = &text[..start];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(start, |i| start - i - 1) + 1;
    ConfigError {
        file: file.to_owned(),
        line,
        column,
        reason,
    }
}

/// Node, master and content-set names: DNS labels, because node names are also the
/// names in their TLS certificates.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a valid name (1-63 of a-z, 0-9, `-`; not starting or ending with `-`)"
        ))
    }
}

/// One `include`/`exclude` entry: `re:REGEX` is a regex (the `regex` crate's syntax,
/// searched in the path relative to the content root; a directory is presented with a
/// trailing `/`), `glob:GLOB` or any other text a glob (see `cd_core::filter`).
pub fn parse_pattern(entry: &str) -> Result<Pattern, String> {
    let compiled = if let Some(re) = entry.strip_prefix(REGEX_PREFIX) {
        Pattern::regex(re)
    } else {
        Pattern::glob(entry.strip_prefix(GLOB_PREFIX).unwrap_or(entry))
    };
    compiled.map_err(|e| match e {
        FilterError::Glob { pattern, reason } => format!("invalid glob {pattern:?}: {reason}"),
        // The regex crate's message spans lines (the pattern, a caret, the error):
        // keep the error line, the pattern is already named.
        FilterError::Regex { pattern, source } => {
            let text = source.to_string();
            let why = text
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim()
                .trim_start_matches("error: ");
            format!("invalid regex {pattern:?}: {why}")
        }
    })
}

/// A pattern as it would be written in the config (the inverse of [`parse_pattern`]).
pub fn format_pattern(p: &Pattern) -> String {
    match p {
        Pattern::Regex(_) => format!("{REGEX_PREFIX}{}", p.as_str()),
        Pattern::Glob(_)
            if p.as_str().starts_with(REGEX_PREFIX) || p.as_str().starts_with(GLOB_PREFIX) =>
        {
            format!("{GLOB_PREFIX}{}", p.as_str())
        }
        Pattern::Glob(_) => p.as_str().to_owned(),
    }
}

/// A filter for `cdctl status --json`, in the config's terms.
pub fn filter_json(f: &Filter) -> serde_json::Value {
    let pats = |v: &[Pattern]| v.iter().map(format_pattern).collect::<Vec<_>>();
    let m = f.commands();
    serde_json::json!({
        "include": pats(f.include()),
        "exclude": pats(f.exclude()),
        "commands": {
            "create": m.create,
            "update": m.update,
            "delete": m.delete,
            "move": m.r#move,
            "erase": m.erase,
        },
    })
}

impl MasterConfig {
    /// The farm as cd_core sees it: the declared servers plus every node a content set
    /// names (undeclared ones in region and group `default`, weight 1).
    pub fn topology(&self) -> Result<Topology, cd_core::topology::TopologyError> {
        let mut specs = self.servers.clone();
        for set in &self.content_sets {
            for n in set.sources.iter().chain(&set.targets) {
                if !specs.iter().any(|s| &s.name == n) {
                    specs.push(ServerSpec::new(n, "default", "default", 1));
                }
            }
        }
        Topology::new(specs)
    }
}

/// `"immediate"`, `"command"` or `"at HH:MM"`.
fn parse_catch_up(v: &str) -> Result<CatchUp, String> {
    let bad = || format!("catch_up `{v}` is not one of immediate, command, \"at HH:MM\"");
    match v {
        "immediate" => Ok(CatchUp::Immediate),
        "command" => Ok(CatchUp::Command),
        _ => {
            let hm = v.strip_prefix("at ").ok_or_else(bad)?;
            let (h, m) = hm.trim().split_once(':').ok_or_else(bad)?;
            let hour: u8 = h.parse().map_err(|_| bad())?;
            let minute: u8 = m.parse().map_err(|_| bad())?;
            if hour > 23 || minute > 59 || m.len() != 2 {
                return Err(bad());
            }
            Ok(CatchUp::Daily { hour, minute })
        }
    }
}

type ErrAt<'a> = dyn Fn(Range<usize>, String) -> ConfigError + 'a;

/// An optional integer key: `default` when absent, else its value if within `range`,
/// else an error at the value (`KEY N is out of range A..=B`).
fn int_in(
    v: &Option<Spanned<i64>>,
    key: &str,
    range: std::ops::RangeInclusive<i64>,
    default: i64,
    err: &ErrAt<'_>,
) -> Result<i64, ConfigError> {
    match v {
        None => Ok(default),
        Some(n) if range.contains(n.get_ref()) => Ok(*n.get_ref()),
        Some(n) => Err(err(
            n.span(),
            format!("{key} {} is out of range {range:?}", n.get_ref()),
        )),
    }
}

/// `"500ms"`, `"10s"`, `"5m"`, `"1h"`: a positive whole number and one unit.
pub fn parse_interval(v: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("interval `{v}` is not a whole number with a unit (ms, s, m, h)");
    let split = v.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (n, unit) = v.split_at(split);
    let n: u64 = n.parse().map_err(|_| bad())?;
    let ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => None,
    }
    .ok_or_else(bad)?;
    Ok(std::time::Duration::from_millis(ms))
}

/// `[master.monitor]`, its thresholds checked against the farm's groups.
fn parse_monitor(
    raw: &RawMonitor,
    servers: &[ServerSpec],
    err: &ErrAt<'_>,
) -> Result<MonitorConfig, ConfigError> {
    use std::time::Duration;
    let mut out = MonitorConfig::default();
    let duration = |v: &Spanned<String>, what: &str, range: Range<Duration>| {
        let d = parse_interval(v.get_ref()).map_err(|r| err(v.span(), format!("{what}: {r}")))?;
        if !range.contains(&d) {
            return Err(err(
                v.span(),
                format!(
                    "{what} {} is out of range {:?}..{:?}",
                    v.get_ref(),
                    range.start,
                    range.end
                ),
            ));
        }
        Ok(d)
    };
    if let Some(v) = &raw.interval {
        out.interval = duration(
            v,
            "interval",
            Duration::from_millis(100)..Duration::from_secs(3601),
        )?;
    }
    if let Some(v) = &raw.check_timeout {
        out.check_timeout = duration(
            v,
            "check_timeout",
            Duration::from_millis(10)..Duration::from_secs(61),
        )?;
    }
    let ports = |raw: &[Spanned<i64>]| {
        let mut out: Vec<u16> = Vec::new();
        for p in raw {
            let port = u16::try_from(*p.get_ref())
                .ok()
                .filter(|&x| x != 0)
                .ok_or_else(|| {
                    err(
                        p.span(),
                        format!("service port {} is out of range 1..=65535", p.get_ref()),
                    )
                })?;
            if out.contains(&port) {
                return Err(err(
                    p.span(),
                    format!("service port {port} is listed twice"),
                ));
            }
            out.push(port);
        }
        Ok(out)
    };
    out.service_ports = ports(raw.service_ports.as_deref().unwrap_or_default())?;
    let known_group = |g: &str| servers.iter().any(|s| s.group == g) || g == "default";
    for (g, raw_group) in &raw.groups {
        if !known_group(g.get_ref()) {
            return Err(err(
                g.span(),
                format!(
                    "unknown group `{}`: no [[master.servers]] is in it",
                    g.get_ref()
                ),
            ));
        }
        out.group_ports
            .insert(g.get_ref().clone(), ports(&raw_group.service_ports)?);
    }
    out.icmp = raw.icmp.unwrap_or(false);
    out.history_days = int_in(
        &raw.history_days,
        "history_days",
        1..=3650,
        out.history_days.into(),
        err,
    )? as u32;
    for t in &raw.thresholds {
        let metric = Metric::parse(t.metric.get_ref()).ok_or_else(|| {
            err(
                t.metric.span(),
                format!(
                    "unknown metric `{}` (one of {})",
                    t.metric.get_ref(),
                    Metric::ALL.map(Metric::as_str).join(", ")
                ),
            )
        })?;
        let group = match &t.group {
            None => None,
            Some(g) => {
                if !known_group(g.get_ref()) {
                    return Err(err(
                        g.span(),
                        format!(
                            "unknown group `{}`: no [[master.servers]] is in it",
                            g.get_ref()
                        ),
                    ));
                }
                Some(g.get_ref().clone())
            }
        };
        let (above, clear_below) = (*t.above.get_ref(), *t.clear_below.get_ref());
        for (what, v) in [("above", &t.above), ("clear_below", &t.clear_below)] {
            let x = *v.get_ref();
            if !x.is_finite() || x < 0.0 || (metric.is_ratio() && x > 1.0) {
                let range = if metric.is_ratio() {
                    "0..=1 (a ratio)"
                } else {
                    ">= 0"
                };
                return Err(err(
                    v.span(),
                    format!("{what} {x} is out of range {range} for {}", metric.as_str()),
                ));
            }
        }
        if clear_below >= above {
            return Err(err(
                t.clear_below.span(),
                format!("clear_below {clear_below} must be below above = {above} (hysteresis)"),
            ));
        }
        let for_samples = int_in(&t.for_samples, "for_samples", 1..=1000, 1, err)? as u32;
        let action = match t.action.as_ref().map(|a| (a.get_ref().as_str(), a.span())) {
            None | Some(("alert", _)) => ThresholdAction::Alert,
            Some(("route_around", _)) => ThresholdAction::RouteAround,
            Some((other, span)) => {
                return Err(err(
                    span,
                    format!("action `{other}` is not one of alert, route_around"),
                ));
            }
        };
        // One threshold per metric and group: they share the alert's key and the
        // routing cause, so a second one's clearing would clear the first's.
        if out
            .thresholds
            .iter()
            .any(|x| x.metric == metric && x.group == group)
        {
            return Err(err(
                t.metric.span(),
                format!(
                    "a second {} threshold for {}: one per metric and group",
                    metric.as_str(),
                    group
                        .as_deref()
                        .map_or("the whole farm".to_owned(), |g| format!("group `{g}`"))
                ),
            ));
        }
        out.thresholds.push(Threshold {
            group,
            metric,
            above,
            clear_below,
            for_samples,
            action,
        });
    }
    Ok(out)
}

/// `source = "x"` or `sources = ["a", "b", …]` (exactly one of the two): the set's
/// sources, checked (names, none twice, at least one).
fn set_sources<'a>(
    s: &'a RawMasterSet,
    err: &ErrAt<'_>,
) -> Result<Vec<&'a Spanned<String>>, ConfigError> {
    let list: Vec<&Spanned<String>> = match (&s.source, &s.sources) {
        (Some(one), None) => vec![one],
        (None, Some(many)) => {
            if many.get_ref().is_empty() {
                return Err(err(
                    many.span(),
                    "sources must name at least one node".into(),
                ));
            }
            many.get_ref().iter().collect()
        }
        (Some(one), Some(_)) => {
            return Err(err(
                one.span(),
                "give either `source` or `sources`, not both".into(),
            ));
        }
        (None, None) => {
            return Err(err(
                s.name.span(),
                format!(
                    "content set `{}` names no `source` (or `sources`)",
                    s.name.get_ref()
                ),
            ));
        }
    };
    let mut seen = BTreeSet::new();
    for x in &list {
        check_name(x.get_ref()).map_err(|r| err(x.span(), format!("source: {r}")))?;
        if !seen.insert(x.get_ref().as_str()) {
            return Err(err(
                x.span(),
                format!("source `{}` is listed twice", x.get_ref()),
            ));
        }
    }
    Ok(list)
}

fn zstd_level(v: &Option<Spanned<i64>>, err: &ErrAt<'_>) -> Result<Option<i32>, ConfigError> {
    match v {
        None => Ok(None),
        Some(l) if (0..=19).contains(l.get_ref()) => Ok(Some(*l.get_ref() as i32)),
        Some(l) => Err(err(
            l.span(),
            format!(
                "zstd_level {} is out of range 0..=19 (0 = no compression)",
                l.get_ref()
            ),
        )),
    }
}

fn max_rate(v: &Option<Spanned<i64>>, err: &ErrAt<'_>) -> Result<Option<u64>, ConfigError> {
    match v {
        None => Ok(None),
        Some(r) if *r.get_ref() >= 0 => Ok(Some(*r.get_ref() as u64)),
        Some(r) => Err(err(r.span(), "max_rate_bytes_per_sec must be >= 0".into())),
    }
}

fn delta_mode(
    v: &Option<Spanned<String>>,
    err: &ErrAt<'_>,
) -> Result<Option<DeltaMode>, ConfigError> {
    match v.as_ref().map(|m| (m.get_ref().as_str(), m.span())) {
        None => Ok(None),
        Some(("auto", _)) => Ok(Some(DeltaMode::Auto)),
        Some(("never", _)) => Ok(Some(DeltaMode::Never)),
        Some((other, span)) => Err(err(
            span,
            format!("delta `{other}` is not one of auto, never"),
        )),
    }
}

fn absolute(p: &Spanned<PathBuf>) -> Result<PathBuf, String> {
    let p = p.get_ref();
    if p.is_absolute() {
        Ok(p.clone())
    } else {
        Err(format!("{} must be an absolute path", p.display()))
    }
}

fn parse_addr(s: &Spanned<String>) -> Result<SocketAddr, String> {
    s.get_ref()
        .parse()
        .map_err(|_| format!("`{}` is not an IP:PORT address", s.get_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Config, ConfigError> {
        parse(Path::new("/etc/cdsync/cdd.toml"), text)
    }

    const MASTER_SET: &str = r#"
name = "master"
state_dir = "/var/lib/cdsync"
[master]
listen = "127.0.0.1:7700"
pki_dir = "/etc/cdsync/pki"
[[master.content_sets]]
name = "www"
source = "node1"
targets = ["node2", "node3"]
"#;

    const GOOD: &str = r#"
name = "node1"
state_dir = "/var/lib/cdsync"

[node]
master_addr = "127.0.0.1:7700"
master_name = "master"
listen = "127.0.0.1:0"
join_token = "cdj1.x"

[[node.content_sets]]
name = "www"
root = "/srv/www"
"#;

    #[test]
    fn good_config_parses() {
        let c = p(GOOD).unwrap();
        assert_eq!(c.name, "node1");
        assert_eq!(c.control_socket, Path::new("/var/lib/cdsync/cdd.sock"));
        assert_eq!(c.node.unwrap().content_sets[0].root, Path::new("/srv/www"));
    }

    #[test]
    fn errors_name_file_line_and_reason() {
        let cases = [
            (
                GOOD.replace("listen = \"127.0.0.1:0\"", "listen = \"nowhere\""),
                8,
                "not an IP:PORT",
            ),
            (
                GOOD.replace("name = \"www\"", "name = \"www\"\nroot_dir = \"/x\""),
                13,
                "unknown field",
            ),
            (
                GOOD.replace("name = \"node1\"", "name = \"Node_1\""),
                2,
                "not a valid name",
            ),
            (
                GOOD.replace("root = \"/srv/www\"", "root = \"srv\""),
                13,
                "absolute",
            ),
            (
                GOOD.replace("join_token = \"cdj1.x\"", "join_token = \"cdj1.x"),
                9,
                "",
            ),
        ];
        for (text, line, why) in cases {
            let e = p(&text).unwrap_err();
            assert_eq!(e.line, line, "{e}");
            assert!(e.to_string().starts_with("/etc/cdsync/cdd.toml:"), "{e}");
            assert!(e.reason.contains(why), "{e}");
        }
    }

    const ALERTS: &str = r#"
[master.alerts]
max_per_minute = 5
alertmanager_urls = ["http://127.0.0.1:9093", "https://am2.example.com/prefix/"]
[master.alerts.email]
smtp_server = "mail.example.com"
from = "cdsync <cdsync@example.com>"
to = ["ops@example.com"]
username = "cdsync"
password_file = "/etc/cdsync/smtp.pass"
[master.alerts.sms]
url = "https://sms.example.com/send"
to = ["+15550100"]
max_per_minute = 2
"#;

    #[test]
    fn alerts_config_parses_with_defaults() {
        let c = p(&format!("{MASTER_SET}{ALERTS}")).unwrap();
        let a = c.master.unwrap().alerts;
        assert_eq!(a.max_per_minute, 5);
        assert_eq!(a.alertmanager.len(), 2);
        assert_eq!(a.alertmanager[1].path, "/prefix/");
        assert!(a.alertmanager[1].https);
        assert_eq!(a.alertmanager_resend_seconds, 60);
        let e = a.email.unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.tls),
            ("mail.example.com", 587, SmtpTls::StartTls)
        );
        assert_eq!(e.max_per_minute, 5, "inherits the table's limit");
        assert_eq!(
            e.password_file.as_deref(),
            Some(Path::new("/etc/cdsync/smtp.pass"))
        );
        let s = a.sms.unwrap();
        assert_eq!(s.max_per_minute, 2);
        assert_eq!(s.to, ["+15550100"]);
        // No table: no sinks.
        let a = p(MASTER_SET).unwrap().master.unwrap().alerts;
        assert_eq!(a, AlertsConfig::default());
    }

    #[test]
    fn alerts_config_errors_are_located() {
        let full = format!("{MASTER_SET}{ALERTS}");
        // Line of `[master.alerts]` in `full`.
        let base = MASTER_SET.lines().count() + 2;
        let cases = [
            (
                "max_per_minute = 5",
                "max_per_minute = 0",
                1,
                "out of range",
            ),
            ("\"http://127.0.0.1:9093\"", "\"ftp://x\"", 2, "not an http"),
            (
                "\"https://am2.example.com/prefix/\"]",
                "\"http://am2.example.com/\"]\nalertmanager_ca_file = \"/x.pem\"",
                3,
                "alertmanager_urls has none",
            ),
            (
                "smtp_server = \"mail.example.com\"",
                "smtp_server = \"mail:x\"",
                4,
                "bad port",
            ),
            (
                "from = \"cdsync <cdsync@example.com>\"",
                "from = \"not an address\"",
                5,
                "from",
            ),
            (
                "username = \"cdsync\"\n",
                "username = \"cdsync\"\ntls = \"none\"\n",
                7,
                "clear text",
            ),
            (
                "username = \"cdsync\"\n",
                "username = \"cdsync\"\ntls = \"ssl\"\n",
                8,
                "not one of",
            ),
            (
                "password_file = \"/etc/cdsync/smtp.pass\"\n",
                "",
                7,
                "needs password_file",
            ),
            ("to = [\"+15550100\"]", "to = []", 11, "at least one"),
            (
                "max_per_minute = 2",
                "max_per_minut = 2",
                12,
                "unknown field",
            ),
        ];
        for (from, to, line, why) in cases {
            let text = full.replacen(from, to, 1);
            assert_ne!(text, full, "{from}");
            let e = p(&text).unwrap_err();
            assert_eq!(e.line, base + line, "{from} -> {to}: {e}");
            assert!(e.reason.contains(why), "{from} -> {to}: {e}");
        }
    }

    #[test]
    fn alert_files_are_checked_on_resolve() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        crate::pki::ca_init(&d.join("pki"), "master", &[]).unwrap();
        let text = |ca: &str| {
            format!(
                "name = \"master\"\nstate_dir = \"{0}/state\"\n[master]\nlisten = \"127.0.0.1:0\"\n\
                 pki_dir = \"{0}/pki\"\n[master.alerts.email]\nsmtp_server = \"127.0.0.1:2525\"\n\
                 from = \"a@b.c\"\nto = [\"d@e.f\"]\nca_file = \"{ca}\"\n",
                d.display()
            )
        };
        let ok = d.join("pki/ca.pem");
        let mut c = p(&text(&ok.display().to_string())).unwrap();
        c.resolve().unwrap();
        std::fs::write(d.join("junk.pem"), "not a certificate").unwrap();
        for bad in [d.join("missing.pem"), d.join("junk.pem")] {
            let mut c = p(&text(&bad.display().to_string())).unwrap();
            let e = c.resolve().unwrap_err();
            assert_eq!((e.line, e.column), (10, 11), "{e}");
            assert!(e.reason.contains(&bad.display().to_string()), "{e}");
        }
    }

    #[test]
    fn metrics_listen() {
        assert_eq!(
            p(GOOD).unwrap().metrics_listen,
            Some(DEFAULT_METRICS_LISTEN)
        );
        let with =
            |v: &str| p(&GOOD.replace("\n[node]", &format!("metrics_listen = {v}\n\n[node]")));
        assert_eq!(
            with("\"0.0.0.0:9464\"").unwrap().metrics_listen,
            Some("0.0.0.0:9464".parse().unwrap())
        );
        assert_eq!(with("\"off\"").unwrap().metrics_listen, None);
        for (v, why) in [
            (
                "\"9464\"",
                "metrics_listen `9464` is not an IP:PORT address or \"off\"",
            ),
            ("9464", "invalid type"),
        ] {
            let e = with(v).unwrap_err();
            assert_eq!((e.line, e.column), (4, 18), "{e}");
            assert!(e.reason.contains(why), "{e}");
        }
    }

    #[test]
    fn realtime_options_are_validated() {
        let c = p(&GOOD.replace(
            "join_token = \"cdj1.x\"",
            "join_token = \"cdj1.x\"\ncapture = \"fanotify\"\ndebounce_ms = 50",
        ))
        .unwrap();
        let n = c.node.unwrap();
        assert_eq!(
            (n.capture, n.debounce_ms, n.ring_buffer_mib),
            (CaptureChoice::Fanotify, 50, 32)
        );
        for (extra, why) in [
            ("capture = \"inotify\"", "not one of auto, ebpf, fanotify"),
            ("ring_buffer_mib = 3", "power of two"),
            ("debounce_ms = -1", "out of range"),
        ] {
            let e = p(&GOOD.replace(
                "join_token = \"cdj1.x\"",
                &format!("join_token = \"cdj1.x\"\n{extra}"),
            ))
            .unwrap_err();
            assert_eq!(e.line, 10, "{e}");
            assert!(e.reason.contains(why), "{e}");
        }
    }

    #[test]
    fn transport_options() {
        let n = p(GOOD).unwrap().node.unwrap();
        assert!(n.ktls);
        assert!(n.trusted_peers.is_empty());
        let with = |extra: &str| {
            p(&GOOD.replace(
                "join_token = \"cdj1.x\"",
                &format!("join_token = \"cdj1.x\"\n{extra}"),
            ))
        };
        let n = with("ktls = false\ntrusted_peers = [\"node-a\", \"*\"]")
            .unwrap()
            .node
            .unwrap();
        assert!(!n.ktls);
        assert_eq!(n.trusted_peers, ["node-a", "*"]);
        for (extra, why) in [
            ("ktls = \"no\"", "invalid type"),
            ("trusted_peers = [\"Node_A\"]", "trusted_peers"),
            ("trusted_peer = [\"node-a\"]", "unknown field"),
        ] {
            let e = with(extra).unwrap_err();
            assert_eq!(e.line, 10, "{extra}: {e}");
            assert!(e.reason.contains(why), "{extra}: {e}");
        }
        // Per content set on the master: encryption (default on) and zstd_level 0.
        let c = p(MASTER_SET).unwrap();
        assert!(c.master.unwrap().content_sets[0].encryption);
        let c = p(&format!("{MASTER_SET}encryption = false\nzstd_level = 0\n")).unwrap();
        let set = &c.master.unwrap().content_sets[0];
        assert!(!set.encryption);
        assert_eq!(set.zstd_level, 0);
        let e = p(&format!("{MASTER_SET}encryption = 0\n")).unwrap_err();
        assert_eq!(e.line, 11, "{e}");
        let e = p(&format!("{MASTER_SET}zstd_level = -1\n")).unwrap_err();
        assert!(e.reason.contains("0..=19"), "{e}");
    }

    #[test]
    fn file_io_options_are_validated() {
        let n = p(GOOD).unwrap().node.unwrap();
        assert_eq!((n.file_io, n.direct_io), (FileIoChoice::IoUring, false));
        let with = |extra: &str| {
            p(&GOOD.replace(
                "join_token = \"cdj1.x\"",
                &format!("join_token = \"cdj1.x\"\n{extra}"),
            ))
        };
        let n = with("file_io = \"sync\"").unwrap().node.unwrap();
        assert_eq!((n.file_io, n.direct_io), (FileIoChoice::Sync, false));
        let n = with("direct_io = true").unwrap().node.unwrap();
        assert_eq!((n.file_io, n.direct_io), (FileIoChoice::IoUring, true));
        for (extra, line, why) in [
            (
                "file_io = \"uring\"",
                10,
                "file_io `uring` is not one of io_uring, sync",
            ),
            (
                "file_io = \"sync\"\ndirect_io = true",
                11,
                "direct_io needs",
            ),
            ("direct_io = 1", 10, "invalid type"),
            ("direct_i0 = true", 10, "unknown field"),
        ] {
            let e = with(extra).unwrap_err();
            assert_eq!(e.line, line, "{e}");
            assert!(e.reason.contains(why), "{e}");
        }
    }

    #[test]
    fn filters_parse() {
        let text = format!(
            "{MASTER_SET}include = [\"*.html\", \"re:^static/\", \"glob:re:odd\"]\n\
             exclude = [\"cache/\"]\ncommands = {{ delete = false, move = false }}\n"
        );
        let c = p(&text).unwrap();
        let f = &c.master.unwrap().content_sets[0].filter;
        let g = |s| Pattern::glob(s).unwrap();
        assert_eq!(
            f.include(),
            [
                g("*.html"),
                Pattern::regex("^static/").unwrap(),
                g("re:odd")
            ]
        );
        assert_eq!(f.exclude(), [g("cache/")]);
        assert_eq!(
            f.commands(),
            CommandMask {
                delete: false,
                r#move: false,
                ..CommandMask::ALL
            }
        );
        // Shown as written, and read back the same.
        for pat in f.include().iter().chain(f.exclude()) {
            assert_eq!(&parse_pattern(&format_pattern(pat)).unwrap(), pat);
        }
        let shown = filter_json(f);
        assert_eq!(
            shown["include"],
            serde_json::json!(["*.html", "re:^static/", "glob:re:odd"])
        );
        assert_eq!(shown["commands"]["delete"], false);
        assert_eq!(shown["commands"]["create"], true);
        // None given: everything, every command.
        let c = p(MASTER_SET).unwrap();
        assert!(c.master.unwrap().content_sets[0].filter.is_noop());
        let c = p(&format!("{MASTER_SET}commands = {{}}\ninclude = []\n")).unwrap();
        assert!(c.master.unwrap().content_sets[0].filter.is_noop());
    }

    #[test]
    fn bad_filters_are_located_at_the_offending_entry() {
        // (extra lines, the text the error must point at, words of the reason)
        let cases = [
            (
                "exclude = [\"*.tmp\", \"[z-a]\"]",
                "\"[z-a]\"",
                "exclude: invalid glob \"[z-a]\": reversed range",
            ),
            (
                "include = [\"re:(x\"]",
                "\"re:(x\"",
                "include: invalid regex \"(x\"",
            ),
            ("include = [\"glob:\"]", "\"glob:\"", "empty pattern"),
            (
                "commands = { delete = false, remove = true }",
                "remove",
                "unknown field `remove`",
            ),
            ("commands = { delete = \"no\" }", "\"no\"", "invalid type"),
            ("exclude = \"*.tmp\"", "\"*.tmp\"", "invalid type"),
        ];
        for (extra, at, why) in cases {
            let text = format!("{MASTER_SET}zstd_level = 3\n{extra}\n");
            let e = p(&text).unwrap_err();
            let offset = text.rfind(at).unwrap();
            let line = text[..offset].matches('\n').count() + 1;
            let column = offset - text[..offset].rfind('\n').map_or(0, |i| i + 1) + 1;
            assert_eq!((e.line, e.column), (line, column), "{extra}: {e}");
            assert!(e.reason.contains(why), "{extra}: {e}");
        }
        // The regex crate's multi-line message is kept to one line.
        let e = p(&format!("{MASTER_SET}exclude = [\"re:a)\"]\n")).unwrap_err();
        assert!(!e.to_string().contains('\n'), "{e}");
        assert!(e.reason.contains("unopened group"), "{e}");
    }

    #[test]
    fn scheduled_sets_and_retention() {
        let c = p(&format!(
            "{MASTER_SET}mode = \"scheduled\"\nschedule = \"0 3 * * *\"\n"
        ))
        .unwrap();
        let m = c.master.unwrap();
        assert_eq!(m.job_log_retention_days, 30);
        let set = &m.content_sets[0];
        assert_eq!(set.mode, SyncMode::Scheduled);
        assert!(matches!(&set.schedule, Some(Schedule::Cron(c)) if c.as_str() == "0 3 * * *"));
        let c = p(&format!(
            "{MASTER_SET}mode = \"scheduled\"\nevery = \"15m\"\n"
        ))
        .unwrap();
        assert_eq!(
            c.master.unwrap().content_sets[0].schedule,
            Some(Schedule::Every { seconds: 900 })
        );
        assert!(
            p(MASTER_SET).unwrap().master.unwrap().content_sets[0]
                .schedule
                .is_none()
        );
        let c = p(&MASTER_SET.replace(
            "pki_dir = \"/etc/cdsync/pki\"\n",
            "pki_dir = \"/etc/cdsync/pki\"\njob_log_retention_days = 7\n",
        ))
        .unwrap();
        assert_eq!(c.master.unwrap().job_log_retention_days, 7);
    }

    /// `MASTER_SET` with a `web` group and `monitor` (the `[master.monitor]` body and
    /// its sub-tables) before the content set.
    fn with_monitor(monitor: &str) -> String {
        MASTER_SET.replace(
            "pki_dir = \"/etc/cdsync/pki\"\n",
            &format!(
                "pki_dir = \"/etc/cdsync/pki\"\n[[master.servers]]\nname = \"node2\"\n\
                 region = \"r\"\ngroup = \"web\"\n[master.monitor]\n{monitor}\n"
            ),
        )
    }

    #[test]
    fn monitor_settings_parse() {
        let m = p(MASTER_SET).unwrap().master.unwrap().monitor;
        assert_eq!(m, MonitorConfig::default());
        let c = p(&with_monitor(
            "interval = \"250ms\"\nservice_ports = [80, 443]\nicmp = true\n\
             check_timeout = \"1s\"\nhistory_days = 2\n\
             [[master.monitor.thresholds]]\ngroup = \"web\"\nmetric = \"load1\"\n\
             above = 8.0\nclear_below = 6.0\naction = \"route_around\"\nfor_samples = 3\n\
             [[master.monitor.thresholds]]\nmetric = \"disk_used_ratio\"\nabove = 0.9\nclear_below = 0.85\n\
             [master.monitor.groups.web]\nservice_ports = [8080]\n",
        ))
        .unwrap();
        let m = c.master.unwrap().monitor;
        assert_eq!(m.interval, std::time::Duration::from_millis(250));
        assert_eq!(m.service_ports, [80, 443]);
        assert!(m.icmp);
        assert_eq!(m.check_timeout, std::time::Duration::from_secs(1));
        assert_eq!(m.history_days, 2);
        assert_eq!(m.service_ports_for("web"), [8080]);
        assert_eq!(m.service_ports_for("default"), [80, 443]);
        assert_eq!(
            m.thresholds,
            [
                Threshold {
                    group: Some("web".into()),
                    metric: Metric::Load1,
                    above: 8.0,
                    clear_below: 6.0,
                    for_samples: 3,
                    action: ThresholdAction::RouteAround,
                },
                Threshold {
                    group: None,
                    metric: Metric::DiskUsedRatio,
                    above: 0.9,
                    clear_below: 0.85,
                    for_samples: 1,
                    action: ThresholdAction::Alert,
                },
            ]
        );
        let n = p(&GOOD.replace(
            "join_token = \"cdj1.x\"",
            "join_token = \"cdj1.x\"\nmonitor_proc_root = \"/tmp/proc\"",
        ))
        .unwrap();
        assert_eq!(n.node.unwrap().monitor_proc_root, Path::new("/tmp/proc"));
        assert_eq!(
            p(GOOD).unwrap().node.unwrap().monitor_proc_root,
            Path::new("/proc")
        );
    }

    #[test]
    fn bad_monitor_settings_are_located() {
        let thr = |body: &str| format!("[[master.monitor.thresholds]]\n{body}");
        // (the [master.monitor] text, the text the error must point at, words of the reason)
        let cases = [
            (
                thr("metric = \"load\"\nabove = 8.0\nclear_below = 6.0"),
                "\"load\"",
                "unknown metric `load`",
            ),
            (
                thr("metric = \"load1\"\nabove = 8.0\nclear_below = 8.0"),
                "8.0",
                "clear_below 8 must be below above = 8",
            ),
            (
                thr("metric = \"load1\"\nabove = 8.0\nclear_below = 9.5"),
                "9.5",
                "must be below",
            ),
            (
                thr("group = \"db\"\nmetric = \"load1\"\nabove = 8.0\nclear_below = 6.0"),
                "\"db\"",
                "unknown group `db`",
            ),
            (
                thr("metric = \"cpu_busy_ratio\"\nabove = 90.0\nclear_below = 0.5"),
                "90.0",
                "0..=1",
            ),
            (
                thr("metric = \"load1\"\nabove = 8.0\nclear_below = 6.0\naction = \"page\""),
                "\"page\"",
                "action `page`",
            ),
            (
                thr("metric = \"load1\"\nabove = 8.0\nclear_below = 6.0\nfor_samples = 0"),
                "0",
                "for_samples 0 is out of range 1..=1000",
            ),
            (
                thr("metric = \"load1\"\nabove = 8.0"),
                "",
                "missing field `clear_below`",
            ),
            (
                format!(
                    "{}\n{}",
                    thr("group = \"web\"\nmetric = \"load1\"\nabove = 8.0\nclear_below = 6.0"),
                    thr("group = \"web\"\nmetric = \"load1\"\nabove = 9.0\nclear_below = 7.0")
                ),
                "\"load1\"\nabove = 9.0",
                "a second load1 threshold for group `web`",
            ),
            (
                "interval = \"10\"".to_owned(),
                "\"10\"",
                "interval: interval `10`",
            ),
            ("interval = \"10ms\"".to_owned(), "\"10ms\"", "out of range"),
            (
                "service_ports = [80, 70000]".to_owned(),
                "70000",
                "out of range 1..=65535",
            ),
            ("service_ports = [80, 80]".to_owned(), "80]", "listed twice"),
            ("pings = true".to_owned(), "pings", "unknown field"),
            (
                "[master.monitor.groups.db]\nservice_ports = [80]".to_owned(),
                "db",
                "unknown group `db`",
            ),
            (
                "[master.monitor.groups.web]\nservice_ports = [0]".to_owned(),
                "0",
                "out of range 1..=65535",
            ),
        ];
        for (body, at, why) in cases {
            let text = with_monitor(&body);
            let e = p(&text).unwrap_err();
            assert!(e.reason.contains(why), "{body}: {e}");
            if at.is_empty() {
                assert!(e.line > 0, "{body}: {e}");
                continue;
            }
            let offset = text.find(&body).unwrap() + body.rfind(at).unwrap();
            let line = text[..offset].matches('\n').count() + 1;
            let column = offset - text[..offset].rfind('\n').map_or(0, |i| i + 1) + 1;
            assert_eq!((e.line, e.column), (line, column), "{body}: {e}");
        }
    }

    #[test]
    fn bad_schedules_are_located() {
        // (extra lines, the text the error must point at, words of the reason)
        let cases = [
            (
                "mode = \"scheduled\"\nschedule = \"0 25 * * *\"",
                "25 * * *\"",
                "schedule: hour: 25 is out of range 0-23",
            ),
            (
                "mode = \"scheduled\"\nschedule = \"0 3 * *\"",
                "0 3 * *\"",
                "5 fields",
            ),
            (
                "mode = \"scheduled\"\nschedule = \"*/15 * * * mon-sat,x\"",
                "x\"",
                "day name",
            ),
            (
                "mode = \"scheduled\"\nevery = \"15w\"",
                "w\"",
                "every: interval `15w`",
            ),
            (
                "mode = \"scheduled\"\nevery = \"2s\"\nschedule = \"* * * * *\"",
                "\"2s\"",
                "not both",
            ),
            ("mode = \"scheduled\"", "\"scheduled\"", "needs `schedule"),
            ("every = \"2s\"", "\"2s\"", "need mode = \"scheduled\""),
            (
                "mode = \"realtime\"\nschedule = \"* * * * *\"",
                "\"* * * * *\"",
                "need mode",
            ),
            ("schedule = 5", "5", "invalid type"),
        ];
        for (extra, at, why) in cases {
            let text = format!("{MASTER_SET}{extra}\n");
            let e = p(&text).unwrap_err();
            let offset = text.rfind(at).unwrap();
            let line = text[..offset].matches('\n').count() + 1;
            let column = offset - text[..offset].rfind('\n').map_or(0, |i| i + 1) + 1;
            assert_eq!((e.line, e.column), (line, column), "{extra}: {e}");
            assert!(e.reason.contains(why), "{extra}: {e}");
        }
        let e = p(&MASTER_SET.replace(
            "pki_dir = \"/etc/cdsync/pki\"\n",
            "pki_dir = \"/etc/cdsync/pki\"\njob_log_retention_days = 0\n",
        ))
        .unwrap_err();
        assert_eq!(e.line, 7, "{e}");
        assert!(e.reason.contains("out of range"), "{e}");
    }

    fn c_delta(c: &Config) -> DeltaMode {
        c.master.as_ref().unwrap().content_sets[0].delta
    }

    #[test]
    fn master_set_validation() {
        let base = r#"
name = "master"
state_dir = "/var/lib/cdsync"
[master]
listen = "127.0.0.1:7700"
pki_dir = "/etc/cdsync/pki"
[[master.content_sets]]
name = "www"
source = "node1"
targets = ["node2", "node3"]
"#;
        let c = p(base).unwrap();
        assert_eq!(c.master.unwrap().content_sets[0].zstd_level, 3);
        let e = p(&format!("{base}mode = \"sometimes\"\n")).unwrap_err();
        assert!(
            e.reason.contains("not one of manual, realtime, scheduled"),
            "{e}"
        );
        let c = p(&format!("{base}mode = \"realtime\"\n")).unwrap();
        assert_eq!(c.master.unwrap().content_sets[0].mode, SyncMode::Realtime);
        assert_eq!(c_delta(&p(base).unwrap()), DeltaMode::Auto);
        let c = p(&format!("{base}delta = \"never\"\n")).unwrap();
        assert_eq!(c_delta(&c), DeltaMode::Never);
        let e = p(&format!("{base}delta = \"sometimes\"\n")).unwrap_err();
        assert_eq!(e.line, 11);
        assert!(e.reason.contains("not one of auto, never"), "{e}");
        let e = p(&format!("{base}zstd_level = 99\n")).unwrap_err();
        assert_eq!(e.line, 11);
        assert!(e.reason.contains("out of range"), "{e}");
        let e = p(&base.replace("\"node2\", \"node3\"", "\"node1\"")).unwrap_err();
        assert!(e.reason.contains("cannot also be a target"), "{e}");
        let e = p(&base.replace("[master]\nlisten = \"127.0.0.1:7700\"\npki_dir = \"/etc/cdsync/pki\"\n[[master.content_sets]]\nname = \"www\"\nsource = \"node1\"\ntargets = [\"node2\", \"node3\"]\n", "")).unwrap_err();
        assert!(e.reason.contains("no role"), "{e}");
    }

    #[test]
    fn nm_sets_name_several_sources() {
        let base = r#"
name = "master"
state_dir = "/var/lib/cdsync"
[master]
listen = "127.0.0.1:7700"
pki_dir = "/etc/cdsync/pki"
[[master.content_sets]]
name = "www"
sources = ["ed1", "ed2"]
targets = ["web1"]
"#;
        let c = p(base).unwrap().master.unwrap();
        let s = &c.content_sets[0];
        assert_eq!(s.sources, ["ed1", "ed2"]);
        assert_eq!(s.source, "ed1");
        assert_eq!(s.routing, Routing::Direct, "N:M sets are routed directly");
        let names: Vec<String> = c
            .topology()
            .unwrap()
            .ids()
            .map(|i| c.topology().unwrap().name(i).to_owned())
            .collect();
        assert!(names.contains(&"ed2".to_owned()), "{names:?}");
        // `source` stays a set of one.
        let one = p(&base.replace("sources = [\"ed1\", \"ed2\"]", "source = \"ed1\""))
            .unwrap()
            .master
            .unwrap();
        assert_eq!(one.content_sets[0].sources, ["ed1"]);
        assert_eq!(one.content_sets[0].routing, Routing::Relay);
        // Each error at its place (line 9 is the `sources` line, 10 `targets`).
        let bad = |text: String, line: usize, col: usize, says: &str| {
            let e = p(&text).unwrap_err();
            assert_eq!((e.line, e.column), (line, col), "{e}");
            assert!(e.reason.contains(says), "{e}");
        };
        bad(
            base.replace("[\"ed1\", \"ed2\"]", "[\"ed1\", \"ed1\"]"),
            9,
            19,
            "listed twice",
        );
        bad(
            base.replace("[\"web1\"]", "[\"web1\", \"ed2\"]"),
            10,
            20,
            "is a source; it cannot also be a target",
        );
        bad(
            base.replace("[\"ed1\", \"ed2\"]", "[]"),
            9,
            11,
            "at least one",
        );
        bad(
            base.replace("sources = [\"ed1\", \"ed2\"]\n", ""),
            8,
            8,
            "names no `source`",
        );
        bad(
            base.replace("targets", "source = \"ed1\"\ntargets"),
            10,
            10,
            "not both",
        );
        bad(
            base.replace("[\"ed1\", \"ed2\"]", "[\"ed1\", \"Bad_Name\"]"),
            9,
            19,
            "source:",
        );
        bad(
            format!("{base}routing = \"relay\"\n"),
            11,
            11,
            "routed directly",
        );
        bad(
            format!("{base}routes = {{ web1 = \"ed2\" }}\n"),
            11,
            19,
            "no manual routes",
        );
    }
}
