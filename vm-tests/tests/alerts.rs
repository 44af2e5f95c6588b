//! Alerts reach real peers: a real Alertmanager (Debian's `prometheus-alertmanager`)
//! passes the master's NodeDown and JobFailed alerts, and their resolutions, on to a
//! webhook receiver in this test; a real SMTP server (Python's aiosmtpd from Debian's
//! `python3-aiosmtpd`) that refuses mail before STARTTLS receives the alert e-mails
//! over TLS with a test CA; an SMS gateway webhook (this test's listener) receives the
//! JSON texts. `cdctl alerts` shows what fires and the history.
//!
//! Privileged tier (it needs those packages, which `cargo xtask test privileged`
//! installs with apt). The daemons come from `CD_CDD` and `CD_CDCTL`. Every wait is a
//! bounded poll for a state; nothing is timed.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cd_testkit::cluster::{Cluster, ClusterSpec, MASTER, free_port};
use serde_json::Value;

/// How long a notice may take to travel master → peer (Alertmanager groups for 1 s).
const SETTLE: Duration = Duration::from_secs(90);

fn binary(var: &str) -> PathBuf {
    let p = std::env::var_os(var).unwrap_or_else(|| {
        panic!("{var} is not set: run this test with `cargo xtask test privileged`")
    });
    let p = PathBuf::from(p);
    assert!(p.is_file(), "{var}={} is not a file", p.display());
    p
}

fn tool(path: &str, package: &str) -> PathBuf {
    let p = PathBuf::from(path);
    assert!(
        p.is_file(),
        "{path} is missing: `cargo xtask test privileged` installs Debian's `{package}` \
         package (or: apt-get install {package})"
    );
    p
}

/// Polls `f` until it returns `Some`, for up to [`SETTLE`].
fn wait_for<T>(what: &str, diag: impl Fn() -> String, mut f: impl FnMut() -> Option<T>) -> T {
    let until = Instant::now() + SETTLE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < until,
            "{what}: not within {SETTLE:?}\n{}",
            diag()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// An HTTP listener recording every request's path and body, answering 200.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<(String, String)>>>);

impl Recorder {
    fn start() -> (Recorder, SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let rec = Recorder::default();
        let r = rec.clone();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let r = r.clone();
                std::thread::spawn(move || r.serve(s));
            }
        });
        (rec, addr)
    }

    /// Serves the requests of one (possibly kept-alive) connection.
    fn serve(&self, s: TcpStream) {
        let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let path = line.split(' ').nth(1).unwrap_or("").to_owned();
            let mut len = 0usize;
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).unwrap_or(0) == 0 {
                    return;
                }
                let h = h.trim_end();
                if h.is_empty() {
                    break;
                }
                if let Some((k, v)) = h.split_once(':')
                    && k.eq_ignore_ascii_case("content-length")
                {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; len];
            if r.read_exact(&mut body).is_err() {
                return;
            }
            self.0
                .lock()
                .unwrap()
                .push((path, String::from_utf8_lossy(&body).into_owned()));
            if w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                .is_err()
            {
                return;
            }
        }
    }

    /// The JSON bodies posted to `path`, in order.
    fn bodies(&self, path: &str) -> Vec<Value> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == path)
            .filter_map(|(_, b)| serde_json::from_str(b).ok())
            .collect()
    }
}

/// A test CA and a server certificate for 127.0.0.1 and localhost, as PEM files.
fn test_pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, &ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("smtp.pem"),
        dir.join("smtp.key"),
    );
    std::fs::write(&paths.0, ca_cert.pem()).unwrap();
    std::fs::write(&paths.1, leaf.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    (paths.0, paths.1, paths.2)
}

/// A child process killed on drop, with a log file.
struct Peer {
    child: Child,
    log: PathBuf,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Peer {
    fn tail(&self) -> String {
        cd_testkit::cluster::tail(&self.log, 30)
    }
}

const SMTP_SERVER: &str = r#"
import json, os, ssl, sys, time
from aiosmtpd.controller import Controller

cert, key, port, outdir = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
ctx.load_cert_chain(cert, key)

class Saver:
    def __init__(self):
        self.n = 0

    async def handle_DATA(self, server, session, envelope):
        self.n += 1
        base = os.path.join(outdir, "%04d" % self.n)
        meta = {
            "tls": session.ssl is not None,
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
        }
        with open(base + ".json", "w") as f:
            json.dump(meta, f)
        with open(base + ".tmp", "wb") as f:
            f.write(envelope.original_content or envelope.content)
        os.rename(base + ".tmp", base + ".eml")
        return "250 OK saved"

c = Controller(Saver(), hostname="127.0.0.1", port=port,
               tls_context=ctx, require_starttls=True)
c.start()
print("ready", flush=True)
while True:
    time.sleep(3600)
"#;

/// A real SMTP server requiring STARTTLS; saves each message as `NNNN.eml` with
/// `NNNN.json` (whether the session was TLS, the envelope).
fn start_smtp(dir: &Path, cert: &Path, key: &Path) -> (Peer, SocketAddr, PathBuf) {
    let python = tool("/usr/bin/python3", "python3-aiosmtpd");
    let script = dir.join("smtp_server.py");
    std::fs::write(&script, SMTP_SERVER).unwrap();
    let out = dir.join("mail");
    std::fs::create_dir_all(&out).unwrap();
    let port = free_port().unwrap();
    let log = dir.join("smtp.log");
    let mut child = Command::new(python)
        .arg(&script)
        .arg(cert)
        .arg(key)
        .arg(port.to_string())
        .arg(&out)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let stdout: ChildStdout = child.stdout.take().unwrap();
    let peer = Peer { child, log };
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    assert_eq!(
        line.trim(),
        "ready",
        "SMTP server did not start:\n{}",
        peer.tail()
    );
    (peer, SocketAddr::from(([127, 0, 0, 1], port)), out)
}

/// One SMTP reply (possibly multi-line); returns its last line.
fn smtp_reply(r: &mut BufReader<TcpStream>) -> String {
    loop {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        if l.len() < 4 || l.as_bytes()[3] != b'-' {
            return l.trim_end().to_owned();
        }
    }
}

/// The saved messages: (meta, raw message), in arrival order.
fn mails(out: &Path) -> Vec<(Value, String)> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(out)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "eml"))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|p| {
            let meta = std::fs::read_to_string(p.with_extension("json")).unwrap();
            (
                serde_json::from_str(&meta).unwrap(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect()
}

/// A header of a raw message, unfolded.
fn header(raw: &str, name: &str) -> Option<String> {
    let head = raw.split("\r\n\r\n").next()?;
    let unfolded = head.replace("\r\n ", " ").replace("\r\n\t", " ");
    unfolded.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
    })
}

/// A real Alertmanager whose one receiver is a webhook to `hook`.
fn start_alertmanager(dir: &Path, hook: &str) -> (Peer, SocketAddr) {
    let bin = tool(
        "/usr/bin/prometheus-alertmanager",
        "prometheus-alertmanager",
    );
    let cfg = dir.join("alertmanager.yml");
    std::fs::write(
        &cfg,
        format!(
            "route:\n  receiver: hook\n  group_by: [alertname, node, content_set]\n  \
             group_wait: 1s\n  group_interval: 1s\n  repeat_interval: 1h\n\
             receivers:\n  - name: hook\n    webhook_configs:\n      - url: {hook}\n        \
             send_resolved: true\n"
        ),
    )
    .unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port().unwrap()));
    let log = dir.join("alertmanager.log");
    let child = Command::new(bin)
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!("--storage.path={}", dir.join("am-data").display()))
        .arg(format!("--web.listen-address={addr}"))
        // No gossip: a single instance on loopback.
        .arg("--cluster.listen-address=")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::options().append(true).open(&log).unwrap())
        .spawn()
        .unwrap();
    let peer = Peer { child, log };
    wait_for(
        "Alertmanager ready",
        || peer.tail(),
        || (http_get(addr, "/-/ready").ok()?.0 == 200).then_some(()),
    );
    (peer, addr)
}

fn http_get(addr: SocketAddr, target: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(s, "GET {target} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, body.to_owned()))
}

/// Alertmanager's active alerts with these labels.
fn am_active(am: SocketAddr, labels: &[(&str, &str)]) -> Vec<Value> {
    let Ok((200, body)) = http_get(am, "/api/v2/alerts") else {
        return Vec::new();
    };
    let v: Value = serde_json::from_str(&body).unwrap_or_default();
    v.as_array()
        .into_iter()
        .flatten()
        .filter(|a| labels.iter().all(|(k, val)| a["labels"][*k] == *val))
        .filter(|a| a["status"]["state"] == "active")
        .cloned()
        .collect()
}

/// The webhook notifications Alertmanager sent with `status` for these labels.
fn am_notified(rec: &Recorder, status: &str, labels: &[(&str, &str)]) -> Option<Value> {
    rec.bodies("/am").into_iter().find(|n| {
        n["status"] == status
            && n["alerts"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|a| a["status"] == status && labels.iter().all(|(k, v)| a["labels"][*k] == *v))
    })
}

/// The SMS gateway posts whose text contains `needle`.
fn sms_with(rec: &Recorder, needle: &str) -> Option<Value> {
    rec.bodies("/sms")
        .into_iter()
        .find(|b| b["text"].as_str().is_some_and(|t| t.contains(needle)))
}

fn mail_with_subject(out: &Path, subject: &str) -> Option<(Value, String)> {
    mails(out)
        .into_iter()
        .find(|(_, raw)| header(raw, "Subject").is_some_and(|s| s.starts_with(subject)))
}

fn cdctl_alerts(c: &Cluster) -> Value {
    let (code, v) = c
        .cdctl_json(MASTER, &["alerts", "--json"], Duration::from_secs(30))
        .unwrap();
    assert_eq!(code, 0, "{v}");
    v
}

fn firing_keys(v: &Value) -> Vec<String> {
    v["firing"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["key"].as_str().map(str::to_owned))
        .collect()
}

#[test]
#[ignore = "spawns daemons, Alertmanager and an SMTP server; run by cargo xtask test privileged"]
fn alerts_reach_alertmanager_smtp_and_sms_and_resolve() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (rec, hook) = Recorder::start();
    let (am_peer, am) = start_alertmanager(dir, &format!("http://{hook}/am"));
    let (ca, cert, key) = test_pki(dir);
    let (smtp_peer, smtp, mail_dir) = start_smtp(dir, &cert, &key);

    // The server really refuses mail before STARTTLS.
    {
        let s = TcpStream::connect(smtp).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        assert!(smtp_reply(&mut r).starts_with("220"));
        w.write_all(b"EHLO probe\r\n").unwrap();
        assert!(smtp_reply(&mut r).starts_with("250"));
        w.write_all(b"MAIL FROM:<probe@test.invalid>\r\n").unwrap();
        let refused = smtp_reply(&mut r);
        assert!(
            refused.starts_with("530"),
            "MAIL before STARTTLS: {refused}"
        );
    }

    let mut spec = ClusterSpec::new(3, &dir.join("c"), &binary("CD_CDD"), &binary("CD_CDCTL"));
    spec.startup_timeout = Duration::from_secs(120);
    spec.master_lines = vec![
        "[master.alerts]".into(),
        "max_per_minute = 30".into(),
        format!("alertmanager_urls = [\"http://{am}\"]"),
        "alertmanager_resend_seconds = 5".into(),
        "[master.alerts.email]".into(),
        format!("smtp_server = \"{smtp}\""),
        "from = \"cdsync <cdsync@test.invalid>\"".into(),
        "to = [\"ops@test.invalid\", \"Night Shift <night@test.invalid>\"]".into(),
        format!("ca_file = {:?}", ca.display().to_string()),
        "[master.alerts.sms]".into(),
        format!("url = \"http://{hook}/sms\""),
        "to = [\"+15550100\"]".into(),
    ];
    let mut c = Cluster::start(spec).unwrap_or_else(|e| panic!("cluster did not start: {e:#}"));
    let logs = dir.join("c/logs");
    let diag = || {
        let daemons: String = ["master", "node1", "node3"]
            .iter()
            .map(|d| {
                let log = logs.join(format!("{d}.log"));
                format!("--- {d} ---\n{}\n", cd_testkit::cluster::tail(&log, 30))
            })
            .collect();
        format!(
            "--- webhook/SMS posts ---\n{:?}\n--- alertmanager ---\n{}\n--- smtp ---\n{}\n{daemons}",
            rec.0.lock().unwrap(),
            am_peer.tail(),
            smtp_peer.tail(),
        )
    };
    let sinks = cdctl_alerts(&c)["sinks"].clone();
    assert_eq!(sinks.as_array().map(Vec::len), Some(3), "{sinks}");
    assert!(firing_keys(&cdctl_alerts(&c)).is_empty());

    // 1. node3 dies: NodeDown fires everywhere.
    c.kill("node3", libc::SIGKILL).unwrap();
    let down = [("alertname", "NodeDown"), ("node", "node3")];
    let n = wait_for("NodeDown via Alertmanager's webhook", diag, || {
        am_notified(&rec, "firing", &down)
    });
    let a = n["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["labels"]["node"] == "node3")
        .unwrap();
    assert_eq!(a["labels"]["severity"], "critical", "{n}");
    assert_eq!(a["generatorURL"], "cdsync://master/alerts", "{n}");
    assert!(
        a["annotations"]["summary"]
            .as_str()
            .is_some_and(|s| s.starts_with("no control session")),
        "{n}"
    );
    let active = wait_for("NodeDown active in Alertmanager", diag, || {
        Some(am_active(am, &down)).filter(|v| !v.is_empty())
    });
    assert_eq!(active.len(), 1, "{active:?}");

    let (meta, raw) = wait_for("the NodeDown e-mail", diag, || {
        mail_with_subject(&mail_dir, "[cdsync FIRING] NodeDown node3")
    });
    assert_eq!(meta["tls"], true, "sent after STARTTLS: {meta}");
    assert_eq!(meta["mail_from"], "cdsync@test.invalid", "{meta}");
    assert_eq!(
        meta["rcpt_tos"],
        serde_json::json!(["ops@test.invalid", "night@test.invalid"]),
        "{meta}"
    );
    for want in [
        "State:    FIRING",
        "Node:     node3",
        "Severity: critical",
        "Summary:  no control session",
    ] {
        assert!(raw.contains(want), "{want} in\n{raw}");
    }
    let sms = wait_for("the NodeDown SMS", diag, || {
        sms_with(&rec, "FIRING: NodeDown node3")
    });
    assert_eq!(sms["to"], serde_json::json!(["+15550100"]), "{sms}");
    let text = sms["text"].as_str().unwrap();
    assert!(
        text.starts_with("cdsync master FIRING: NodeDown node3: no control session"),
        "{text}"
    );
    assert!(text.chars().count() <= 160, "{text}");

    let v = cdctl_alerts(&c);
    assert_eq!(firing_keys(&v), ["NodeDown node=node3"], "{v}");
    assert_eq!(v["firing"][0]["severity"], "critical", "{v}");
    // The same for people: what fires, where alerts go, and the history.
    let out = Command::new(binary("CD_CDCTL"))
        .arg("--socket")
        .arg(c.socket(MASTER).unwrap())
        .arg("alerts")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let am_sink = format!("sinks: alertmanager http://{am}/");
    for want in [
        "1 firing:\n  critical NodeDown node=node3  since ",
        am_sink.as_str(),
        "email 127.0.0.1:",
        "sms http://",
        "history (newest first):",
        "alert_firing       node3",
    ] {
        assert!(text.contains(want), "{want:?} in\n{text}");
    }

    // 2. node3 is back: resolved everywhere.
    c.restart("node3").unwrap_or_else(|e| panic!("{e:#}"));
    wait_for("NodeDown resolved via Alertmanager's webhook", diag, || {
        am_notified(&rec, "resolved", &down)
    });
    wait_for("NodeDown no longer active in Alertmanager", diag, || {
        am_active(am, &down).is_empty().then_some(())
    });
    let (meta, raw) = wait_for("the resolution e-mail", diag, || {
        mail_with_subject(&mail_dir, "[cdsync RESOLVED] NodeDown node3")
    });
    assert_eq!(meta["tls"], true, "{meta}");
    assert!(raw.contains("State:    RESOLVED"), "{raw}");
    assert!(raw.contains("Resolved: "), "{raw}");
    wait_for("the resolution SMS", diag, || {
        sms_with(&rec, "RESOLVED: NodeDown node3")
    });
    let v = cdctl_alerts(&c);
    assert!(firing_keys(&v).is_empty(), "{v}");
    let kinds: Vec<&str> = v["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["node"] == "node3")
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["alert_resolved", "alert_firing"], "{v}");

    // 3. A job fails (its source is down): JobFailed fires; the set's next good job
    // resolves it.
    c.kill("node1", libc::SIGKILL).unwrap();
    // The job fails before any report exists: cdctl says why and exits non-zero.
    let out = Command::new(binary("CD_CDCTL"))
        .arg("--socket")
        .arg(c.socket(MASTER).unwrap())
        .args(["sync", "www"])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a sync without its source fails: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(why.contains("is not connected"), "{why}");
    let job = [("alertname", "JobFailed"), ("content_set", "www")];
    let n = wait_for("JobFailed via Alertmanager", diag, || {
        am_notified(&rec, "firing", &job)
    });
    assert!(n["alerts"][0]["labels"].get("node").is_none(), "{n}");
    wait_for("the JobFailed e-mail", diag, || {
        mail_with_subject(&mail_dir, "[cdsync FIRING] JobFailed www")
    });
    let v = cdctl_alerts(&c);
    assert!(
        firing_keys(&v).contains(&"JobFailed content_set=www".to_owned()),
        "{v}"
    );
    // While it fires, the master re-sends it (every 5 s here): Alertmanager's endsAt
    // for it moves on, so Alertmanager never times it out on its own.
    let ends = |a: &Vec<Value>| {
        a.first()
            .and_then(|a| a["endsAt"].as_str().map(str::to_owned))
    };
    let first = wait_for("JobFailed active in Alertmanager", diag, || {
        ends(&am_active(am, &job))
    });
    wait_for("JobFailed re-sent to Alertmanager", diag, || {
        ends(&am_active(am, &job)).filter(|e| *e > first)
    });
    c.restart("node1").unwrap_or_else(|e| panic!("{e:#}"));
    c.sync().unwrap_or_else(|e| panic!("{e:#}"));
    wait_for("JobFailed resolved via Alertmanager", diag, || {
        am_notified(&rec, "resolved", &job)
    });
    wait_for("the JobFailed resolution e-mail", diag, || {
        mail_with_subject(&mail_dir, "[cdsync RESOLVED] JobFailed www")
    });
    let v = cdctl_alerts(&c);
    assert!(firing_keys(&v).is_empty(), "{v}");
    // Every delivery succeeded.
    assert!(
        !v["history"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "alert_delivery_failed"),
        "{v}"
    );
    // Each alert change was mailed once: NodeDown node3 and node1, JobFailed, each
    // fired and resolved.
    wait_for("node1's NodeDown resolution e-mail", diag, || {
        mail_with_subject(&mail_dir, "[cdsync RESOLVED] NodeDown node1")
    });
    assert_eq!(mails(&mail_dir).len(), 6, "{}", diag());
}
