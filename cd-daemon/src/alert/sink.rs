//! Delivery: one task per sink (each Alertmanager URL, the e-mail relay, the SMS
//! gateway), fed by a bounded queue, so that the master never waits on a sink and a
//! slow sink never delays another.
//!
//! A task takes notices from its queue through its [`Limiter`], sends what the
//! limiter lets through (one notice, or a digest), and retries a failed delivery with
//! bounded exponential backoff ([`RETRY_DELAYS`]); when every attempt failed, it logs
//! the failure and writes an `alert_delivery_failed` event to the job log, and moves
//! on. An Alertmanager task also re-sends every alert still firing each
//! `alertmanager_resend_seconds`, as Alertmanager expects of its clients (it resolves
//! an alert whose `endsAt` passes without news); re-sends do not count against the
//! rate limit (Alertmanager de-duplicates them) and a failed one is logged only.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use lettre::message::{Mailbox, header::ContentType};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, CertificateStore, Tls, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::http::{self, HttpUrl, truncate};
use super::limit::{Batch, Limiter};
use super::{AlertState, Notice};
use crate::config::{AlertsConfig, EmailConfig, SmsConfig, SmtpTls};
use crate::joblog::JobLog;

/// Waits between attempts of one delivery: four attempts in all, ~7 s.
pub const RETRY_DELAYS: [Duration; 3] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
];
/// One attempt's limit (connect, TLS, request, answer).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(15);
/// Notices a sink's queue holds before new ones are refused (and logged as failed).
pub const QUEUE: usize = 1024;
/// The length of an SMS text: one GSM-7 segment.
pub const SMS_CHARS: usize = 160;

/// A sink's queue, as [`super::Alerts`] holds it.
#[derive(Debug, Clone)]
pub struct SinkHandle {
    pub name: String,
    pub tx: mpsc::Sender<Notice>,
}

/// What a sink delivers to.
enum Target {
    /// Tests: what would be sent, and the re-send interval of an Alertmanager.
    #[cfg(test)]
    Recorder {
        out: mpsc::UnboundedSender<Batch>,
        resend: Option<Duration>,
    },
    Alertmanager {
        url: HttpUrl,
        tls: Option<Arc<rustls::ClientConfig>>,
        generator_url: String,
        resend: Duration,
    },
    Email {
        transport: AsyncSmtpTransport<Tokio1Executor>,
        from: Mailbox,
        to: Vec<Mailbox>,
        master: String,
    },
    Sms {
        url: HttpUrl,
        tls: Option<Arc<rustls::ClientConfig>>,
        to: Vec<String>,
        bearer: Option<String>,
        master: String,
    },
}

struct Sink {
    name: String,
    target: Target,
    limiter: Limiter,
    joblog: Arc<JobLog>,
    /// [`RETRY_DELAYS`] (shorter in tests).
    retry: &'static [Duration],
}

/// Builds every configured sink and spawns its task; returns their queues.
pub fn start(
    cfg: &AlertsConfig,
    master: &str,
    joblog: &Arc<JobLog>,
) -> anyhow::Result<Vec<SinkHandle>> {
    let mut sinks = Vec::new();
    let generator_url = cfg
        .generator_url
        .clone()
        .unwrap_or_else(|| format!("cdsync://{master}/alerts"));
    let am_tls = match cfg.alertmanager.iter().any(|u| u.https) {
        true => Some(tls_from(cfg.alertmanager_ca_file.as_deref())?),
        false => None,
    };
    for base in &cfg.alertmanager {
        let path = format!("{}/api/v2/alerts", base.path.trim_end_matches('/'));
        sinks.push(Sink {
            name: format!("alertmanager {base}"),
            target: Target::Alertmanager {
                url: base.with_path(&path),
                tls: am_tls.clone(),
                generator_url: generator_url.clone(),
                resend: Duration::from_secs(cfg.alertmanager_resend_seconds),
            },
            limiter: Limiter::new(cfg.max_per_minute),
            joblog: joblog.clone(),
            retry: &RETRY_DELAYS,
        });
    }
    if let Some(e) = &cfg.email {
        sinks.push(Sink {
            name: format!("email {}:{}", e.host, e.port),
            target: email_target(e, master)?,
            limiter: Limiter::new(e.max_per_minute),
            joblog: joblog.clone(),
            retry: &RETRY_DELAYS,
        });
    }
    if let Some(s) = &cfg.sms {
        sinks.push(Sink {
            name: format!("sms {}", s.url),
            target: sms_target(s, master)?,
            limiter: Limiter::new(s.max_per_minute),
            joblog: joblog.clone(),
            retry: &RETRY_DELAYS,
        });
    }
    Ok(sinks
        .into_iter()
        .map(|s| {
            let (tx, rx) = mpsc::channel(QUEUE);
            let name = s.name.clone();
            tracing::info!(sink = %name, "alert sink ready");
            tokio::spawn(s.run(rx));
            SinkHandle { name, tx }
        })
        .collect())
}

fn tls_from(ca: Option<&std::path::Path>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let pem = ca
        .map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display())))
        .transpose()?;
    http::tls_config(pem.as_deref()).map_err(|r| {
        anyhow::anyhow!(
            "{}: {r}",
            ca.map_or("system CA store".into(), |p| p.display().to_string())
        )
    })
}

fn read_secret(p: &std::path::Path) -> anyhow::Result<String> {
    let s = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    Ok(s.trim().to_owned())
}

fn email_target(e: &EmailConfig, master: &str) -> anyhow::Result<Target> {
    let mut b = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&e.host)
        .port(e.port)
        .timeout(Some(ATTEMPT_TIMEOUT))
        .hello_name(ClientId::Domain(master.to_owned()));
    if e.tls != SmtpTls::None {
        let mut p = TlsParameters::builder(e.host.clone());
        if let Some(ca) = &e.ca_file {
            let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
            let cert = Certificate::from_pem(&pem)
                .with_context(|| format!("CA certificate {}", ca.display()))?;
            p = p
                .certificate_store(CertificateStore::None)
                .add_root_certificate(cert);
        }
        let params = p.build_rustls().context("SMTP TLS parameters")?;
        b = b.tls(match e.tls {
            SmtpTls::Implicit => Tls::Wrapper(params),
            _ => Tls::Required(params),
        });
    }
    if let (Some(u), Some(f)) = (&e.username, &e.password_file) {
        b = b.credentials(Credentials::new(u.clone(), read_secret(f)?));
    }
    let parse = |m: &str| {
        m.parse::<Mailbox>()
            .with_context(|| format!("mailbox `{m}`"))
    };
    Ok(Target::Email {
        transport: b.build(),
        from: parse(&e.from)?,
        to: e.to.iter().map(|t| parse(t)).collect::<Result<_, _>>()?,
        master: master.to_owned(),
    })
}

fn sms_target(s: &SmsConfig, master: &str) -> anyhow::Result<Target> {
    Ok(Target::Sms {
        tls: if s.url.https {
            Some(tls_from(s.ca_file.as_deref())?)
        } else {
            None
        },
        url: s.url.clone(),
        to: s.to.clone(),
        bearer: s
            .bearer_token_file
            .as_deref()
            .map(read_secret)
            .transpose()?,
        master: master.to_owned(),
    })
}

impl Sink {
    async fn run(mut self, mut rx: mpsc::Receiver<Notice>) {
        // Alertmanager: what fires now, by key, for the periodic re-send.
        let mut firing: BTreeMap<String, Notice> = BTreeMap::new();
        let resend = match &self.target {
            Target::Alertmanager { resend, .. } => Some(*resend),
            #[cfg(test)]
            Target::Recorder { resend, .. } => *resend,
            _ => None,
        };
        let mut next_resend = resend.map(|r| Instant::now() + r);
        loop {
            let wake = [
                self.limiter.poll_timeout().map(Instant::from_std),
                next_resend,
            ]
            .into_iter()
            .flatten()
            .min();
            let got = match wake {
                Some(t) => tokio::select! {
                    n = rx.recv() => Some(n),
                    () = tokio::time::sleep_until(t) => None,
                },
                None => Some(rx.recv().await),
            };
            match got {
                Some(None) => return,
                Some(Some(n)) => {
                    let key = n.alert.key();
                    match n.alert.state {
                        AlertState::Firing => firing.insert(key, n.clone()),
                        AlertState::Resolved => firing.remove(&key),
                    };
                    if let Some(b) = self.limiter.handle(n, Instant::now().into_std()) {
                        self.deliver(&b).await;
                    }
                }
                None => {}
            }
            if let Some(b) = self.limiter.poll(Instant::now().into_std()) {
                self.deliver(&b).await;
            }
            if let (Some(r), Some(t)) = (resend, next_resend)
                && Instant::now() >= t
            {
                next_resend = Some(Instant::now() + r);
                if !firing.is_empty() {
                    let batch = Batch {
                        items: firing
                            .values()
                            .map(|n| super::limit::Folded {
                                notice: n.clone(),
                                changes: 1,
                            })
                            .collect(),
                        digest: false,
                    };
                    if let Err(e) = self.send(&batch).await {
                        tracing::warn!(sink = %self.name, alerts = firing.len(), error = %format!("{e:#}"), "re-sending firing alerts failed");
                    }
                }
            }
        }
    }

    /// Sends `b`, retrying; a final failure goes to the log and the job log.
    async fn deliver(&self, b: &Batch) {
        let mut attempt = 0;
        loop {
            match self.send(b).await {
                Ok(()) => {
                    tracing::info!(sink = %self.name, notices = b.notices(), digest = b.digest, attempts = attempt + 1, "alert delivered");
                    return;
                }
                Err(e) if attempt < self.retry.len() => {
                    tracing::debug!(sink = %self.name, attempt, error = %format!("{e:#}"), "alert delivery failed; retrying");
                    tokio::time::sleep(self.retry[attempt]).await;
                    attempt += 1;
                }
                Err(e) => {
                    let keys: Vec<String> =
                        b.items.iter().map(|f| f.notice.alert.to_string()).collect();
                    let detail = format!(
                        "{}: gave up after {} attempts: {e:#}; undelivered: {}",
                        self.name,
                        attempt + 1,
                        keys.join("; ")
                    );
                    tracing::warn!(sink = %self.name, error = %format!("{e:#}"), "alert delivery failed");
                    self.joblog
                        .event("alert_delivery_failed", None, None, None, &detail);
                    return;
                }
            }
        }
    }

    async fn send(&self, b: &Batch) -> anyhow::Result<()> {
        match &self.target {
            Target::Alertmanager {
                url,
                tls,
                generator_url,
                resend,
            } => {
                let body = alertmanager_json(b, generator_url, *resend, crate::joblog::now_ms());
                http::post_json(
                    url,
                    &[],
                    body.to_string().as_bytes(),
                    tls.as_ref(),
                    ATTEMPT_TIMEOUT,
                )
                .await?;
            }
            Target::Email {
                transport,
                from,
                to,
                master,
            } => {
                let (subject, text) = email_text(b, master);
                let mut m = Message::builder().from(from.clone()).subject(subject);
                for t in to {
                    m = m.to(t.clone());
                }
                let m = m.header(ContentType::TEXT_PLAIN).body(text)?;
                transport.send(m).await?;
            }
            Target::Sms {
                url,
                tls,
                to,
                bearer,
                master,
            } => {
                let body = json!({ "to": to, "text": sms_text(b, master) });
                let auth = bearer.as_ref().map(|t| format!("Bearer {t}"));
                let headers: Vec<(&str, &str)> = auth
                    .as_deref()
                    .map(|a| ("Authorization", a))
                    .into_iter()
                    .collect();
                http::post_json(
                    url,
                    &headers,
                    body.to_string().as_bytes(),
                    tls.as_ref(),
                    ATTEMPT_TIMEOUT,
                )
                .await?;
            }
            #[cfg(test)]
            Target::Recorder { out, .. } => out.send(b.clone())?,
        }
        Ok(())
    }
}

/// RFC 3339 in UTC with milliseconds, as Alertmanager reads it.
pub fn rfc3339_utc(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// Alertmanager's `POST /api/v2/alerts` body for a batch: one entry per alert. A
/// firing alert ends at `now + 4 × resend` unless re-sent (as Prometheus does), so a
/// master that dies does not leave alerts firing for ever; a resolved one ends when
/// it was resolved.
pub fn alertmanager_json(
    b: &Batch,
    generator_url: &str,
    resend: Duration,
    now_ms: i64,
) -> serde_json::Value {
    let alerts: Vec<serde_json::Value> = b
        .items
        .iter()
        .map(|f| {
            let a = &f.notice.alert;
            let mut labels = serde_json::Map::new();
            labels.insert("alertname".into(), a.name.clone().into());
            if let Some(n) = &a.node {
                labels.insert("node".into(), n.clone().into());
            }
            labels.insert("severity".into(), a.severity.as_str().into());
            for (k, v) in &a.labels {
                labels.insert(k.clone(), v.clone().into());
            }
            let ends = match a.state {
                AlertState::Firing => now_ms + 4 * resend.as_millis() as i64,
                AlertState::Resolved => f.notice.at_ms,
            };
            let mut annotations = json!({ "summary": a.summary });
            if f.changes > 1 {
                annotations["changes"] =
                    format!("{} state changes folded by the rate limit", f.changes).into();
            }
            json!({
                "labels": labels,
                "annotations": annotations,
                "startsAt": rfc3339_utc(f.notice.starts_at_ms),
                "endsAt": rfc3339_utc(ends),
                "generatorURL": generator_url,
            })
        })
        .collect();
    serde_json::Value::Array(alerts)
}

fn state_word(s: AlertState) -> &'static str {
    match s {
        AlertState::Firing => "FIRING",
        AlertState::Resolved => "RESOLVED",
    }
}

/// What an alert is about, short: `NodeDown node3`, `JobFailed www`.
fn subject_of(a: &super::Alert) -> String {
    let mut s = a.name.clone();
    if let Some(n) = &a.node {
        s.push(' ');
        s.push_str(n);
    }
    for v in a.labels.values() {
        s.push(' ');
        s.push_str(v);
    }
    s
}

/// An e-mail's subject and plain-text body.
pub fn email_text(b: &Batch, master: &str) -> (String, String) {
    let mut body = String::new();
    let subject = match (b.digest, b.items.as_slice()) {
        (false, [f]) => {
            let a = &f.notice.alert;
            format!(
                "[cdsync {}] {}: {}",
                state_word(a.state),
                subject_of(a),
                truncate(&a.summary, 100)
            )
        }
        _ => {
            body.push_str(&format!(
                "{} alert changes were held by the rate limit and are summed up here; each alert is shown in its latest state.\n\n",
                b.notices()
            ));
            let firing = b
                .items
                .iter()
                .filter(|f| f.notice.alert.state == AlertState::Firing)
                .count();
            format!(
                "[cdsync digest] {} alerts: {firing} firing, {} resolved",
                b.items.len(),
                b.items.len() - firing
            )
        }
    };
    for f in &b.items {
        let a = &f.notice.alert;
        body.push_str(&format!("Alert:    {}\n", a.name));
        body.push_str(&format!("State:    {}\n", state_word(a.state)));
        body.push_str(&format!("Node:     {}\n", a.node.as_deref().unwrap_or("-")));
        body.push_str(&format!("Severity: {}\n", a.severity.as_str()));
        for (k, v) in &a.labels {
            body.push_str(&format!("Label:    {k}={v}\n"));
        }
        body.push_str(&format!("Summary:  {}\n", a.summary));
        body.push_str(&format!(
            "Since:    {}\n",
            rfc3339_utc(f.notice.starts_at_ms)
        ));
        if a.state == AlertState::Resolved {
            body.push_str(&format!("Resolved: {}\n", rfc3339_utc(f.notice.at_ms)));
        }
        if f.changes > 1 {
            body.push_str(&format!("Changes:  {} (folded)\n", f.changes));
        }
        body.push('\n');
    }
    body.push_str(&format!(
        "-- \ncdsync master `{master}`. Firing alerts and their history: `cdctl alerts`.\n"
    ));
    (subject, body)
}

/// An SMS text: at most [`SMS_CHARS`] characters.
pub fn sms_text(b: &Batch, master: &str) -> String {
    let text = match (b.digest, b.items.as_slice()) {
        (false, [f]) => {
            let a = &f.notice.alert;
            format!(
                "cdsync {master} {}: {}: {}",
                state_word(a.state),
                subject_of(a),
                a.summary
            )
        }
        _ => {
            let parts: Vec<String> = b
                .items
                .iter()
                .map(|f| {
                    format!(
                        "{} {}",
                        subject_of(&f.notice.alert),
                        state_word(f.notice.alert.state).to_lowercase()
                    )
                })
                .collect();
            format!(
                "cdsync {master}: {} alerts: {}",
                b.items.len(),
                parts.join("; ")
            )
        }
    };
    truncate(&text, SMS_CHARS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alert::limit::Folded;
    use crate::alert::{Alert, Severity};

    fn batch(items: Vec<(Alert, u32)>, digest: bool) -> Batch {
        Batch {
            items: items
                .into_iter()
                .map(|(alert, changes)| Folded {
                    notice: Notice {
                        alert,
                        starts_at_ms: 1_700_000_000_000,
                        at_ms: 1_700_000_060_500,
                    },
                    changes,
                })
                .collect(),
            digest,
        }
    }

    fn down() -> Alert {
        Alert::firing(
            "NodeDown",
            Some("node3"),
            Severity::Critical,
            "no control session",
        )
    }

    #[test]
    fn alertmanager_body_has_labels_annotations_and_times() {
        let job = Alert::firing("JobFailed", None, Severity::Warning, "job 7 failed")
            .label("content_set", "www");
        let b = batch(vec![(down(), 1), (job.resolved("job 8 ok"), 3)], true);
        let v = alertmanager_json(
            &b,
            "cdsync://master/alerts",
            Duration::from_secs(60),
            1_700_000_061_000,
        );
        let a = &v[0];
        assert_eq!(
            a["labels"],
            json!({"alertname": "NodeDown", "node": "node3", "severity": "critical"})
        );
        assert_eq!(a["annotations"]["summary"], "no control session");
        assert_eq!(a["startsAt"], "2023-11-14T22:13:20.000Z");
        // Firing: ends four re-send intervals from now unless re-sent.
        assert_eq!(a["endsAt"], "2023-11-14T22:18:21.000Z");
        assert_eq!(a["generatorURL"], "cdsync://master/alerts");
        let r = &v[1];
        assert_eq!(
            r["labels"],
            json!({"alertname": "JobFailed", "content_set": "www", "severity": "warning"})
        );
        // Resolved: ends when it was resolved.
        assert_eq!(r["endsAt"], "2023-11-14T22:14:20.500Z");
        assert!(
            r["annotations"]["changes"]
                .as_str()
                .unwrap()
                .starts_with("3 state changes")
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_delivery_that_keeps_failing_is_retried_then_written_to_the_job_log() {
        let dir = tempfile::tempdir().unwrap();
        let joblog = Arc::new(JobLog::open(&dir.path().join("j.sqlite")).unwrap());
        // A port nobody listens on: every attempt is refused.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = HttpUrl::parse(&format!("http://127.0.0.1:{port}/send")).unwrap();
        let sink = Sink {
            name: format!("sms {url}"),
            target: Target::Sms {
                url,
                tls: None,
                to: vec!["+1555".into()],
                bearer: None,
                master: "master".into(),
            },
            limiter: Limiter::new(10),
            joblog: joblog.clone(),
            retry: {
                const SHORT: [Duration; 2] = [Duration::from_millis(5), Duration::from_millis(5)];
                &SHORT
            },
        };
        sink.deliver(&batch(vec![(down(), 1)], false)).await;
        let ev = joblog.events_of_kind("alert_", 10).await.unwrap();
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(ev[0]["kind"], "alert_delivery_failed");
        let detail = ev[0]["detail"].as_str().unwrap();
        assert!(detail.contains("gave up after 3 attempts"), "{detail}");
        assert!(detail.contains("[FIRING] NodeDown node=node3"), "{detail}");
    }

    /// STARTTLS is required by default: against a server that does not offer it, the
    /// e-mail sink sends nothing (no envelope, no message) and records the failure.
    #[tokio::test(flavor = "current_thread")]
    async fn email_is_not_sent_to_a_server_without_starttls() {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let dir = tempfile::tempdir().unwrap();
        let joblog = Arc::new(JobLog::open(&dir.path().join("j.sqlite")).unwrap());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        // A plain ESMTP server that offers no STARTTLS; it records every command.
        let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let s2 = seen.clone();
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                let (r, mut w) = s.into_split();
                let mut r = BufReader::new(r);
                w.write_all(b"220 plain ESMTP\r\n").await.unwrap();
                let mut line = String::new();
                while r.read_line(&mut line).await.unwrap_or(0) > 0 {
                    let cmd = line.trim_end().to_ascii_uppercase();
                    s2.lock().unwrap().push(cmd.clone());
                    let reply: &[u8] = if cmd.starts_with("EHLO") {
                        b"250-plain\r\n250 8BITMIME\r\n"
                    } else if cmd.starts_with("QUIT") {
                        b"221 bye\r\n"
                    } else {
                        b"250 OK\r\n"
                    };
                    if w.write_all(reply).await.is_err() {
                        break;
                    }
                    line.clear();
                }
            }
        });
        let cfg = EmailConfig {
            host: "127.0.0.1".into(),
            port,
            tls: SmtpTls::StartTls,
            from: "cdsync <cdsync@test.invalid>".into(),
            to: vec!["ops@test.invalid".into()],
            username: None,
            password_file: None,
            ca_file: None,
            max_per_minute: 10,
        };
        let sink = Sink {
            name: format!("email 127.0.0.1:{port}"),
            target: email_target(&cfg, "master").unwrap(),
            limiter: Limiter::new(10),
            joblog: joblog.clone(),
            retry: {
                const SHORT: [Duration; 1] = [Duration::from_millis(5)];
                &SHORT
            },
        };
        sink.deliver(&batch(vec![(down(), 1)], false)).await;
        let ev = joblog.events_of_kind("alert_", 10).await.unwrap();
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(ev[0]["kind"], "alert_delivery_failed");
        let detail = ev[0]["detail"].as_str().unwrap();
        assert!(detail.contains("gave up after 2 attempts"), "{detail}");
        let seen = seen.lock().unwrap().clone();
        assert!(
            seen.iter().filter(|c| c.starts_with("EHLO MASTER")).count() == 2,
            "it greeted the server on each attempt: {seen:?}"
        );
        assert!(
            !seen
                .iter()
                .any(|c| c.starts_with("MAIL") || c.starts_with("RCPT") || c.starts_with("DATA")),
            "nothing was sent in clear text: {seen:?}"
        );
    }

    fn notice(node: &str, firing: bool) -> Notice {
        let a = Alert::firing("NodeDown", Some(node), Severity::Critical, "down");
        Notice {
            alert: if firing { a } else { a.resolved("up") },
            starts_at_ms: 0,
            at_ms: 0,
        }
    }

    fn recording_sink(
        max: u32,
        resend: Option<Duration>,
    ) -> (
        mpsc::Sender<Notice>,
        mpsc::UnboundedReceiver<Batch>,
        tempfile::TempDir,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let joblog = Arc::new(JobLog::open(&dir.path().join("j.sqlite")).unwrap());
        let (out, rx_out) = mpsc::unbounded_channel();
        let sink = Sink {
            name: "recorder".into(),
            target: Target::Recorder { out, resend },
            limiter: Limiter::new(max),
            joblog,
            retry: &RETRY_DELAYS,
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(sink.run(rx));
        (tx, rx_out, dir)
    }

    /// The next message of a recording sink; a task that never sends fails the test
    /// (in virtual time, an hour passes at once) instead of hanging it.
    async fn next(out: &mut mpsc::UnboundedReceiver<Batch>) -> Batch {
        tokio::time::timeout(Duration::from_secs(3600), out.recv())
            .await
            .expect("nothing sent within an hour")
            .expect("the task ended")
    }

    fn nodes_and_states(b: &Batch) -> Vec<(String, AlertState)> {
        b.items
            .iter()
            .map(|f| (f.notice.alert.node.clone().unwrap(), f.notice.alert.state))
            .collect()
    }

    /// The sink's task (virtual time): what exceeds the limit is held, not lost, and
    /// goes out as one digest exactly when the minute allows it.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn the_task_holds_what_exceeds_the_limit_and_sends_one_digest_when_the_window_reopens() {
        let (tx, mut out, _dir) = recording_sink(1, None);
        let t0 = Instant::now();
        tx.send(notice("a", true)).await.unwrap();
        let first = next(&mut out).await;
        assert!(!first.digest);
        assert_eq!(
            nodes_and_states(&first),
            [("a".to_owned(), AlertState::Firing)]
        );
        tx.send(notice("b", true)).await.unwrap();
        tx.send(notice("a", false)).await.unwrap();
        tx.send(notice("b", false)).await.unwrap();
        tx.send(notice("b", true)).await.unwrap();
        // Nothing more within the minute of the first message.
        let early = tokio::time::timeout_at(
            t0 + crate::alert::limit::WINDOW - Duration::from_millis(1),
            out.recv(),
        )
        .await;
        assert!(early.is_err(), "sent within the window: {early:?}");
        let d = next(&mut out).await;
        assert_eq!(
            Instant::now(),
            t0 + crate::alert::limit::WINDOW,
            "when the first message left the window"
        );
        assert!(d.digest);
        assert_eq!(
            nodes_and_states(&d),
            [
                ("b".to_owned(), AlertState::Firing),
                ("a".to_owned(), AlertState::Resolved)
            ]
        );
        assert_eq!(d.notices(), 4, "every held notice is counted in the digest");
        drop(tx);
        assert!(out.recv().await.is_none(), "the task ends with its queue");
    }

    /// An Alertmanager sink re-sends what fires every interval, and stops once it is
    /// resolved.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn firing_alerts_are_re_sent_until_resolved() {
        let resend = Duration::from_secs(5);
        let (tx, mut out, _dir) = recording_sink(10, Some(resend));
        let t0 = Instant::now();
        tx.send(notice("a", true)).await.unwrap();
        tx.send(notice("b", true)).await.unwrap();
        assert_eq!(
            nodes_and_states(&next(&mut out).await),
            [("a".to_owned(), AlertState::Firing)]
        );
        assert_eq!(
            nodes_and_states(&next(&mut out).await),
            [("b".to_owned(), AlertState::Firing)]
        );
        let again = next(&mut out).await;
        assert_eq!(Instant::now(), t0 + resend);
        assert_eq!(
            nodes_and_states(&again),
            [
                ("a".to_owned(), AlertState::Firing),
                ("b".to_owned(), AlertState::Firing)
            ]
        );
        tx.send(notice("a", false)).await.unwrap();
        assert_eq!(
            nodes_and_states(&next(&mut out).await),
            [("a".to_owned(), AlertState::Resolved)]
        );
        let again = next(&mut out).await;
        assert_eq!(Instant::now(), t0 + 2 * resend);
        assert_eq!(
            nodes_and_states(&again),
            [("b".to_owned(), AlertState::Firing)]
        );
        tx.send(notice("b", false)).await.unwrap();
        assert_eq!(
            nodes_and_states(&next(&mut out).await),
            [("b".to_owned(), AlertState::Resolved)]
        );
        // Nothing fires: nothing more is sent.
        let quiet = tokio::time::timeout(10 * resend, out.recv()).await;
        assert!(quiet.is_err(), "{quiet:?}");
    }

    #[test]
    fn email_and_sms_texts_say_state_node_summary_and_labels() {
        let (subject, body) = email_text(&batch(vec![(down(), 1)], false), "master");
        assert_eq!(
            subject,
            "[cdsync FIRING] NodeDown node3: no control session"
        );
        for want in [
            "State:    FIRING",
            "Node:     node3",
            "Severity: critical",
            "Summary:  no control session",
        ] {
            assert!(body.contains(want), "{want}: {body}");
        }
        let job = Alert::firing("JobFailed", None, Severity::Warning, "job 7 failed")
            .label("content_set", "www")
            .resolved("job 8 ok");
        let (subject, body) = email_text(&batch(vec![(job.clone(), 1)], false), "master");
        assert_eq!(subject, "[cdsync RESOLVED] JobFailed www: job 8 ok");
        assert!(body.contains("Label:    content_set=www"), "{body}");
        assert!(
            body.contains("Resolved: 2023-11-14T22:14:20.500Z"),
            "{body}"
        );

        let (subject, body) = email_text(&batch(vec![(down(), 2), (job, 1)], true), "master");
        assert_eq!(subject, "[cdsync digest] 2 alerts: 1 firing, 1 resolved");
        assert!(body.starts_with("3 alert changes"), "{body}");

        let sms = sms_text(&batch(vec![(down(), 1)], false), "master");
        assert_eq!(
            sms,
            "cdsync master FIRING: NodeDown node3: no control session"
        );
        let long = Alert::firing(
            "NodeDown",
            Some("node3"),
            Severity::Critical,
            "x".repeat(500),
        );
        let sms = sms_text(&batch(vec![(long, 1)], false), "master");
        assert_eq!(sms.chars().count(), SMS_CHARS);
        assert!(sms.ends_with('…'));
    }
}
