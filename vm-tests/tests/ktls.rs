//! Transfers between real `cdd` processes over kernel TLS with `sendfile`, and the
//! fallbacks, judged from outside: replicas compared byte for byte with the source,
//! and each daemon's `cdctl status --json` saying which record layer every link used
//! (`ktls`, `rustls`, `plain`) and how many file bytes went out by `sendfile`.
//!
//! Run by `cargo xtask test guest` inside a qemu guest on Debian's 6.1 kernel with
//! `tls.ko` (and the AEAD modules it needs) loaded; the guest sets
//! `CD_EXPECT_KTLS=1`, so a silent fallback to rustls fails the test. Run by `cargo
//! xtask test privileged` on the host too, whose kernel may lack TLS (this CI host's
//! has no `CONFIG_TLS`): there the tests require the daemon's probe to agree with the
//! kernel's list of TCP upper layers and check that the rustls path carried the same
//! trees, with no byte by `sendfile`.
//!
//! The daemons come from `CD_CDD` and `CD_CDCTL` (the xtask sets them: it builds them
//! on the host and ships them into the guest).

use std::fs;
use std::path::{Path, PathBuf};

use cd_testkit::cluster::{Cluster, ClusterSpec};
use cd_testkit::compare::assert_identical;
use cd_testkit::tree::noise;
use serde_json::Value;

const BIG: usize = 8 << 20;
const SMALL_FILES: usize = 50;

fn binary(var: &str) -> PathBuf {
    let p = std::env::var_os(var).unwrap_or_else(|| {
        panic!("{var} is not set: run this test with `cargo xtask test privileged` or `guest`")
    });
    let p = PathBuf::from(p);
    assert!(p.is_file(), "{var}={} is not a file", p.display());
    p
}

/// Whether kernel TLS must be used: the guest says so; elsewhere, whatever the kernel
/// lists once a daemon has probed it (the probe loads the module where it can).
fn kernel_has_tls() -> bool {
    if std::env::var("CD_EXPECT_KTLS").as_deref() == Ok("1") {
        return true;
    }
    fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp")
        .unwrap_or_default()
        .split_whitespace()
        .any(|u| u == "tls")
}

fn seed_tree(root: &Path, seed: u64) {
    fs::create_dir_all(root.join("small")).unwrap();
    for i in 0..SMALL_FILES {
        let len = 100 + (i * 997) % 30_000;
        fs::write(
            root.join("small").join(format!("f{i:02}")),
            noise(seed + i as u64, len),
        )
        .unwrap();
    }
    fs::write(root.join("big.bin"), noise(seed ^ 0xb16, BIG)).unwrap();
}

fn start(dir: &Path, f: impl FnOnce(&mut ClusterSpec)) -> Cluster {
    let mut spec = ClusterSpec::new(2, dir, &binary("CD_CDD"), &binary("CD_CDCTL"));
    // Uncompressed: file data can go out with sendfile.
    spec.zstd_level = Some(0);
    spec.startup_timeout = std::time::Duration::from_secs(120);
    f(&mut spec);
    Cluster::start(spec).unwrap_or_else(|e| panic!("cluster did not start: {e:#}"))
}

fn status(c: &Cluster, node: &str) -> Value {
    c.status(node).unwrap_or_else(|e| panic!("{e:#}"))["node"].clone()
}

/// The newest link `node` recorded for `side` ("source" or "replica").
fn last_link(c: &Cluster, node: &str, side: &str) -> Value {
    let st = status(c, node);
    st["transport"]["links"]
        .as_array()
        .and_then(|l| l.iter().rev().find(|x| x["side"] == side))
        .cloned()
        .unwrap_or_else(|| panic!("{node} recorded no {side} link: {}", st["transport"]))
}

fn sync_and_compare(c: &Cluster) {
    c.sync().unwrap_or_else(|e| panic!("{e:#}"));
    assert_identical(&c.root("node1").unwrap(), &c.root("node2").unwrap());
}

fn sendfile_bytes(link: &Value) -> u64 {
    link["bytes_sendfile"]
        .as_u64()
        .unwrap_or_else(|| panic!("{link}"))
}

/// Each node reports kernel TLS enabled or not as configured, and a probe that agrees
/// with the kernel.
fn check_probe(c: &Cluster, node: &str, enabled: bool) {
    let t = &status(c, node)["transport"]["ktls"];
    assert_eq!(t["enabled"], enabled, "{node}: {t}");
    // Probed whether enabled or not.
    assert_eq!(
        t["probe"]["available"],
        kernel_has_tls(),
        "{node}'s probe disagrees with the kernel: {t}"
    );
    if kernel_has_tls() {
        assert!(
            !t["probe"]["ciphers"].as_array().unwrap().is_empty(),
            "the kernel took keys of no cipher: {t}"
        );
    } else {
        assert!(
            t["probe"]["detail"]
                .as_str()
                .unwrap_or("")
                .contains("ENOENT"),
            "{t}"
        );
    }
}

#[test]
#[ignore = "spawns daemons; run by cargo xtask test (privileged, guest)"]
fn transfers_over_ktls_with_sendfile() {
    let tmp = tempfile::tempdir().unwrap();
    let c = start(tmp.path(), |_| {});
    check_probe(&c, "node1", true);
    check_probe(&c, "node2", true);
    let src = c.root("node1").unwrap();
    seed_tree(&src, 1);
    sync_and_compare(&c);

    let ktls = kernel_has_tls();
    let want = if ktls { "ktls" } else { "rustls" };
    for (node, side) in [("node1", "source"), ("node2", "replica")] {
        let l = last_link(&c, node, side);
        assert_eq!(l["path"], want, "{node} {side}: {l}");
        assert_eq!(l["ok"], true, "{l}");
        if ktls {
            assert!(l["cipher"].is_string(), "{l}");
        } else {
            assert_eq!(l["note"], "the kernel has no TLS", "{l}");
        }
    }
    let sent = last_link(&c, "node1", "source");
    if ktls {
        assert!(
            sendfile_bytes(&sent) >= BIG as u64,
            "the 8 MiB file did not go out by sendfile: {sent}"
        );
    } else {
        assert_eq!(
            sendfile_bytes(&sent),
            0,
            "sendfile on a rustls link: {sent}"
        );
    }

    // A second round on a new connection: the changed big file and one small one.
    fs::write(src.join("big.bin"), noise(99, BIG + 12_345)).unwrap();
    fs::write(src.join("small/f07"), noise(7, 40_000)).unwrap();
    sync_and_compare(&c);
    let sent = last_link(&c, "node1", "source");
    assert_eq!(sent["path"], want, "{sent}");
    if ktls {
        assert!(sendfile_bytes(&sent) >= (BIG + 12_345) as u64, "{sent}");
    }
}

/// The sender has kernel TLS off (`ktls = false`), the receiver on: rustls records in
/// user space on one end, the kernel's on the other, same bytes.
#[test]
#[ignore = "spawns daemons; run by cargo xtask test (privileged, guest)"]
fn rustls_sender_to_ktls_receiver() {
    let tmp = tempfile::tempdir().unwrap();
    let c = start(tmp.path(), |s| {
        s.node_lines
            .insert("node1".into(), vec!["ktls = false".into()]);
    });
    check_probe(&c, "node1", false);
    check_probe(&c, "node2", true);
    seed_tree(&c.root("node1").unwrap(), 2);
    sync_and_compare(&c);
    let sent = last_link(&c, "node1", "source");
    assert_eq!(sent["path"], "rustls", "{sent}");
    assert_eq!(
        sent["note"],
        Value::Null,
        "disabled, not unavailable: {sent}"
    );
    assert_eq!(sendfile_bytes(&sent), 0, "{sent}");
    let got = last_link(&c, "node2", "replica");
    assert_eq!(
        got["path"],
        if kernel_has_tls() { "ktls" } else { "rustls" },
        "{got}"
    );
}

/// `CDD_KTLS=off` in the environment: rustls on both ends, and the tree still arrives.
#[test]
#[ignore = "spawns daemons; run by cargo xtask test (privileged, guest)"]
fn fallback_when_disabled_by_environment() {
    let tmp = tempfile::tempdir().unwrap();
    let c = start(tmp.path(), |s| {
        s.env.push(("CDD_KTLS".into(), "off".into()));
    });
    check_probe(&c, "node1", false);
    check_probe(&c, "node2", false);
    seed_tree(&c.root("node1").unwrap(), 3);
    sync_and_compare(&c);
    for (node, side) in [("node1", "source"), ("node2", "replica")] {
        let l = last_link(&c, node, side);
        assert_eq!(l["path"], "rustls", "{node}: {l}");
        assert_eq!(sendfile_bytes(&l), 0, "{l}");
    }
}

/// The link layer in one process, both ends: TLS handshake and `Hello`s over loopback,
/// then control and data frames both ways over the record layer `establish` picked
/// (kernel TLS where the kernel has it), zero-copy data frames from a file, and the
/// sender's `close_notify` seen as the end of the stream. Checks every byte.
#[test]
#[ignore = "kernel TLS on loopback; run by cargo xtask test (privileged, guest)"]
fn link_round_trip() {
    use cd_daemon::link::Policy;
    use cd_daemon::net::{self, Incoming, NetError};
    use cd_proto::pb::{self, envelope::Msg};
    use std::os::fd::AsFd;

    let pki = tempfile::tempdir().unwrap();
    cd_daemon::pki::ca_init(pki.path(), "master", &[]).unwrap();
    let id = cd_daemon::pki::Identity::load(
        "master",
        &pki.path().join("master.pem"),
        &pki.path().join("master.key"),
        &pki.path().join("ca.pem"),
    )
    .unwrap();
    let client_cfg = cd_daemon::pki::client_config(&id).unwrap();
    let server_cfg =
        cd_daemon::pki::server_config(&id, cd_daemon::pki::ClientAuth::Required).unwrap();
    let policy = Policy::new(true, None, vec![]);
    let want = if kernel_has_tls() { "ktls" } else { "rustls" };

    let payload = noise(42, 3 * 256 * 1024 + 777);
    let file = tempfile::NamedTempFile::new().unwrap();
    fs::write(file.path(), &payload).unwrap();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let acceptor = tokio_rustls::TlsAcceptor::from(server_cfg);
        let server_policy = policy.clone();
        let expected = payload.clone();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let (mut conn, hello) = net::accept_transfer(tcp, &acceptor, "master", &server_policy)
                .await
                .unwrap();
            assert!(hello.accepts_no_crc);
            let path = conn.link_stats().unwrap().path.as_str();
            for i in 0..100 {
                match conn.recv_msg().await.unwrap() {
                    Msg::Heartbeat(h) => assert_eq!(h.unix_ms, i),
                    m => panic!("expected heartbeat {i}, got {m:?}"),
                }
            }
            // Data frames: CRC-checked ones, then zero-copy ones; the same content twice.
            let mut got = Vec::new();
            while got.len() < 2 * expected.len() {
                match conn.recv().await.unwrap() {
                    Incoming::Data { file_id, bytes } => {
                        assert_eq!(file_id, 7);
                        got.extend_from_slice(&bytes);
                    }
                    Incoming::Control(m) => panic!("expected data, got {m:?}"),
                }
            }
            let first_bad = got
                .iter()
                .zip(expected.iter().chain(expected.iter()))
                .position(|(a, b)| a != b);
            assert_eq!(first_bad, None, "received bytes differ");
            conn.send(Msg::Heartbeat(pb::Heartbeat {
                unix_ms: -1,
                ..Default::default()
            }))
            .await
            .unwrap();
            // The client shuts down: close_notify on TLS, FIN on plain TCP.
            let end = conn.recv().await;
            assert!(matches!(end, Err(NetError::Closed)), "{end:?}");
            path
        });

        let (mut conn, hello) =
            net::connect_transfer(&addr, "master", client_cfg, "master", false, &policy, false)
                .await
                .unwrap();
        assert!(!hello.plaintext);
        let stats = conn.link_stats().unwrap().clone();
        assert_eq!(stats.path.as_str(), want, "{stats:?}");
        for i in 0..100 {
            conn.send(Msg::Heartbeat(pb::Heartbeat {
                unix_ms: i,
                ..Default::default()
            }))
            .await
            .unwrap();
        }
        for chunk in payload.chunks(256 * 1024) {
            conn.send_data(7, chunk, 0).await.unwrap();
        }
        let f = fs::File::open(file.path()).unwrap();
        let zero_copy = conn.zero_copy().is_some();
        assert_eq!(zero_copy, want == "ktls", "zero-copy on a {want} link");
        let mut off = 0;
        while off < payload.len() {
            let len = (payload.len() - off).min(256 * 1024);
            if zero_copy {
                conn.send_data_zero_copy(7, f.as_fd(), off as u64, len)
                    .await
                    .unwrap();
            } else {
                conn.send_data(7, &payload[off..off + len], 0)
                    .await
                    .unwrap();
            }
            off += len;
        }
        match conn.recv_msg().await.unwrap() {
            Msg::Heartbeat(h) => assert_eq!(h.unix_ms, -1),
            m => panic!("expected the answer, got {m:?}"),
        }
        conn.shutdown().await;
        let server_path = server.await.unwrap();
        assert_eq!(server_path, want);
        let sendfile = stats
            .bytes_sendfile
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(sendfile, if zero_copy { payload.len() as u64 } else { 0 });
    });
}
