//! Multi-process integration tests: a master and nodes as real `cdd` processes on
//! loopback, driven with `cdctl`, judged by `cd-testkit`'s independent comparator.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use cd_testkit::cluster::{Cluster, ClusterSpec, MASTER, counter, run, target_report};
use cd_testkit::compare::{assert_identical, compare};
use cd_testkit::mutate::{MutateSpec, mutate};
use cd_testkit::signal::SIGKILL;
use cd_testkit::tree::files_under;
use cd_testkit::tree::{TreeSpec, generate};
use serde_json::Value;

const MIB: usize = 1 << 20;

fn cdd() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cdd"))
}

fn cdctl() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cdctl"))
}

fn start(dir: &Path, nodes: usize, max_rate: u64) -> Cluster {
    let mut spec = ClusterSpec::new(nodes, dir, &cdd(), &cdctl());
    spec.max_rate = max_rate;
    Cluster::start(spec).unwrap_or_else(|e| panic!("cluster did not start: {e:#}"))
}

fn sync_ok(c: &Cluster) -> Value {
    c.sync().unwrap_or_else(|e| panic!("{e:#}"))
}

fn assert_replicas_identical(c: &Cluster) {
    let source = c.root(c.source()).unwrap();
    for t in c.targets() {
        assert_identical(&source, &c.root(&t).unwrap());
    }
}

fn target_counter(report: &Value, target: &str, field: &str) -> u64 {
    let t = target_report(report, target).unwrap();
    counter(t, field).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Deterministic, incompressible bytes (splitmix64 of `seed` and the word index).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut i = 0u64;
    while out.len() < len {
        let mut z = (seed << 32 ^ i).wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

/// Polls `<root>/.cdsync/stage/` until it holds a regular file with some but not all
/// of its `full_len` bytes (a transfer in progress) or `sync` has finished.
fn wait_for_partial_stage(
    root: &Path,
    full_len: u64,
    sync: &mut cd_testkit::cluster::BackgroundSync,
) -> Option<(PathBuf, u64)> {
    let stage = root.join(".cdsync/stage");
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if let Some(f) = files_under(&stage)
            .into_iter()
            .find(|(_, l)| (1..full_len).contains(l))
        {
            return Some(f);
        }
        if sync.is_finished().unwrap() {
            return None;
        }
        thread::sleep(Duration::from_millis(2));
    }
    None
}

#[test]
fn cluster_replicates_tree_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let c = start(tmp.path(), 4, 0);
    let source = c.root(c.source()).unwrap();
    let mut spec = TreeSpec::new(800, 11);
    spec.max_total_bytes = 24 * MIB as u64;
    let summary = generate(&source, &spec).unwrap();
    let big = noise(77, 2 * MIB);
    fs::create_dir(source.join("reuse")).unwrap();
    fs::write(source.join("reuse/big.bin"), &big).unwrap();

    // First sync: everything travels.
    let r1 = sync_ok(&c);
    assert_eq!(r1["content_set"], "www", "{r1}");
    // The source read it all through io_uring (this kernel allows it), or says why not.
    let status = c.status(c.source()).unwrap();
    let io = &status["node"]["file_io_detail"];
    assert_eq!(status["node"]["file_io"], "io_uring", "{io}");
    assert_eq!(io["fallback_reason"], Value::Null, "{io}");
    for t in c.targets() {
        // Empty replicas: (nearly) all content travels; empty files need no content.
        let sent = target_counter(&r1, &t, "files_sent");
        let bytes = target_counter(&r1, &t, "bytes_sent");
        assert!(sent > 0, "{t}: {r1}");
        assert!(
            bytes * 10 >= (summary.bytes + big.len() as u64) * 9,
            "{t}: only {bytes} content bytes sent for {} source bytes: {r1}",
            summary.bytes
        );
    }
    assert_replicas_identical(&c);

    // One round of every kind of edit.
    let counts = mutate(&source, &MutateSpec::new(5, 5)).unwrap();
    assert!(counts.total() > 50, "{counts}");
    let r2 = sync_ok(&c);
    for t in c.targets() {
        assert!(target_counter(&r2, &t, "files_sent") > 0, "{t}: {r2}");
        assert!(target_counter(&r2, &t, "removed") > 0, "{t}: {r2}");
    }
    assert_replicas_identical(&c);

    // Nothing changed: nothing travels, nothing is touched.
    let r3 = sync_ok(&c);
    for t in c.targets() {
        for field in [
            "files_sent",
            "bytes_sent",
            "removed",
            "meta_only",
            "reused_local",
        ] {
            assert_eq!(target_counter(&r3, &t, field), 0, "{t}.{field}: {r3}");
        }
    }
    assert_replicas_identical(&c);

    // A rename is replayed on the replica from local content; only new content travels.
    fs::create_dir(source.join("reuse/moved")).unwrap();
    fs::rename(
        source.join("reuse/big.bin"),
        source.join("reuse/moved/big-renamed.bin"),
    )
    .unwrap();
    fs::write(source.join("reuse/new.txt"), b"fresh content\n").unwrap();
    let r4 = sync_ok(&c);
    for t in c.targets() {
        assert!(target_counter(&r4, &t, "reused_local") >= 1, "{t}: {r4}");
        assert_eq!(target_counter(&r4, &t, "files_sent"), 1, "{t}: {r4}");
        let bytes = target_counter(&r4, &t, "bytes_sent");
        assert!(bytes < big.len() as u64, "{t}: renamed file re-sent: {r4}");
    }
    assert_replicas_identical(&c);
}

#[test]
fn receiver_killed_mid_transfer_never_exposes_partial_file() {
    const FILES: usize = 8;
    const LEN: usize = 4 * MIB;
    let tmp = tempfile::tempdir().unwrap();
    let mut c = start(tmp.path(), 3, 4 * MIB as u64);
    let source = c.root(c.source()).unwrap();
    let victim = "node2";
    let victim_root = c.root(victim).unwrap();
    let name = |i: usize| format!("big/file-{i}.bin");
    let old: Vec<Vec<u8>> = (0..FILES).map(|i| noise(i as u64, LEN)).collect();
    let new: Vec<Vec<u8>> = (0..FILES).map(|i| noise(1000 + i as u64, LEN)).collect();

    fs::create_dir(source.join("big")).unwrap();
    for (i, content) in old.iter().enumerate() {
        fs::write(source.join(name(i)), content).unwrap();
    }
    sync_ok(&c);
    assert_replicas_identical(&c);

    for (i, content) in new.iter().enumerate() {
        fs::write(source.join(name(i)), content).unwrap();
    }
    let mut job = c.sync_background().unwrap();
    let seen = wait_for_partial_stage(&victim_root, LEN as u64, &mut job);
    let Some((staged, staged_len)) = seen else {
        panic!(
            "never saw a partially written file in {}/.cdsync/stage/ during a rate-limited \
             transfer of {FILES} x {LEN} bytes, so the kill could not be tested; job: {:?}",
            victim_root.display(),
            job.wait().map(|o| o.report)
        );
    };
    c.kill(victim, SIGKILL).unwrap();
    eprintln!(
        "killed {victim} while {} held {staged_len} bytes",
        staged.display()
    );

    // Every final path holds the complete old or the complete new content.
    for i in 0..FILES {
        let got = fs::read(victim_root.join(name(i))).unwrap();
        assert!(
            got == old[i] || got == new[i],
            "{victim}: {} is neither the old nor the new version ({} bytes)",
            name(i),
            got.len()
        );
    }
    let visible: Vec<PathBuf> = files_under(&victim_root)
        .into_iter()
        .map(|(p, _)| p.strip_prefix(&victim_root).unwrap().to_path_buf())
        .filter(|p| !p.starts_with(".cdsync"))
        .collect();
    assert_eq!(
        visible.len(),
        FILES,
        "unexpected files on {victim}: {visible:?}"
    );

    let out = job.wait().unwrap();
    assert_eq!(out.exit_code, 1, "{}", out.report);
    let v = out.target(victim).unwrap();
    assert_eq!(v["ok"], false, "{}", out.report);
    assert!(
        !v["error"].as_str().unwrap_or("").is_empty(),
        "{}",
        out.report
    );
    assert_eq!(out.target("node3").unwrap()["ok"], true, "{}", out.report);

    c.restart(victim).unwrap();
    sync_ok(&c);
    assert_replicas_identical(&c);
    let leftovers = files_under(&victim_root.join(".cdsync/stage"));
    assert!(
        leftovers.is_empty(),
        "stage leftovers on {victim}: {leftovers:?}"
    );
    if let Ok(rd) = fs::read_dir(victim_root.join(".cdsync/stage")) {
        let names: Vec<_> = rd.flatten().map(|e| e.file_name()).collect();
        assert!(names.is_empty(), "stage leftovers on {victim}: {names:?}");
    }
}

/// One config case for `cdd check-config`: the text and the line the error must name.
struct BadConfig {
    what: &'static str,
    text: String,
    /// Line that must appear as `FILE:LINE:` in stderr.
    line: usize,
    /// Text that must appear in stderr too.
    mention: &'static str,
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle} not in config"))
        + 1
}

fn bad(what: &'static str, text: String, marker: &str, mention: &'static str) -> BadConfig {
    BadConfig {
        what,
        line: line_of(&text, marker),
        text,
        mention,
    }
}

#[test]
fn bad_config_exits_64() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let root = d.join("root");
    fs::create_dir(&root).unwrap();
    let pki = d.join("pki");
    let mut ca = Command::new(cdctl());
    ca.args(["ca", "init", "--master-name", "master", "--dir"])
        .arg(&pki);
    let out = run(ca, Duration::from_secs(60)).unwrap();
    assert!(out.status.success(), "cdctl ca init: {out:?}");

    let state = d.join("state");
    let master = format!(
        "name = \"master\"\nstate_dir = \"{}\"\n\n[master]\nlisten = \"127.0.0.1:7700\"\n\
         pki_dir = \"{}\"\n\n[[master.content_sets]]\nname = \"www\"\nsource = \"node1\"\n\
         targets = [\"node2\"]\nzstd_level = 3\nmax_rate_bytes_per_sec = 0\n",
        state.display(),
        pki.display()
    );
    let node = format!(
        "name = \"node1\"\nstate_dir = \"{}\"\n\n[node]\nmaster_addr = \"127.0.0.1:7700\"\n\
         master_name = \"master\"\nlisten = \"127.0.0.1:0\"\njoin_token = \"cdj1example\"\n\n\
         [[node.content_sets]]\nname = \"www\"\nroot = \"{}\"\n",
        d.join("nstate").display(),
        root.display()
    );

    // The good one first: otherwise every case below could pass for a broken parser.
    let good = d.join("good.toml");
    fs::write(&good, &master).unwrap();
    let mut cmd = Command::new(cdd());
    cmd.arg("check-config").arg(&good);
    let out = run(cmd, Duration::from_secs(30)).unwrap();
    assert_eq!(out.status.code(), Some(0), "good config refused: {out:?}");

    let cases = [
        bad(
            "TOML syntax error",
            master.replace("[master]", "[master"),
            "[master",
            "",
        ),
        bad(
            "unknown key",
            master.replace("listen =", "colour = \"blue\"\nlisten ="),
            "colour",
            "colour",
        ),
        bad(
            "N:M source listed twice",
            master.replace(
                "source = \"node1\"",
                "sources = [\"node1\", \"node3\", \"node1\"]",
            ),
            "sources",
            "listed twice",
        ),
        bad(
            "N:M source also a target",
            master.replace("source = \"node1\"", "sources = [\"node1\", \"node2\"]"),
            "targets = [",
            "cannot also be a target",
        ),
        bad(
            "missing field",
            node.replace("master_addr = \"127.0.0.1:7700\"\n", ""),
            "[node]",
            "master_addr",
        ),
        bad(
            "zstd level out of range",
            master.replace("zstd_level = 3", "zstd_level = 99"),
            "zstd_level",
            "zstd_level",
        ),
        bad(
            "invalid name",
            master.replace("name = \"master\"", "name = \"Master_1\""),
            "Master_1",
            "name",
        ),
        bad(
            "invalid exclude regex",
            master.replace(
                "zstd_level = 3",
                "zstd_level = 3\nexclude = [\"*.tmp\", \"re:^cache/(\"]",
            ),
            "re:^cache/(",
            "invalid regex \"^cache/(\"",
        ),
        bad(
            "unknown command key",
            master.replace(
                "zstd_level = 3",
                "zstd_level = 3\ncommands = { delete = false, rename = false }",
            ),
            "rename = false",
            "rename",
        ),
        bad(
            "threshold metric unknown",
            master.replace(
                "\n[[master.content_sets]]",
                "[[master.monitor.thresholds]]\nmetric = \"load_avg\"\nabove = 8.0\n\
                 clear_below = 6.0\n[[master.content_sets]]",
            ),
            "\"load_avg\"",
            "unknown metric `load_avg`",
        ),
        bad(
            "threshold clear_below not below above",
            master.replace(
                "\n[[master.content_sets]]",
                "[[master.monitor.thresholds]]\nmetric = \"load1\"\nabove = 8.0\n\
                 clear_below = 9.0\n[[master.content_sets]]",
            ),
            "9.0",
            "clear_below 9 must be below above = 8",
        ),
        bad(
            "threshold group unknown",
            master.replace(
                "\n[[master.content_sets]]",
                "[[master.monitor.thresholds]]\ngroup = \"dbs\"\nmetric = \"load1\"\n\
                 above = 8.0\nclear_below = 6.0\n[[master.content_sets]]",
            ),
            "\"dbs\"",
            "unknown group `dbs`",
        ),
        bad(
            "content root missing",
            node.replace(
                &format!("root = \"{}\"", root.display()),
                "root = \"/nonexistent/cdsync/root\"",
            ),
            "/nonexistent/cdsync/root",
            "/nonexistent/cdsync/root",
        ),
    ];
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let path = d.join(format!("bad-{i}.toml"));
        fs::write(&path, &case.text).unwrap();
        let mut cmd = Command::new(cdd());
        cmd.arg("check-config").arg(&path);
        let out = run(cmd, Duration::from_secs(30)).unwrap();
        let want = format!("{}:{}:", path.display(), case.line);
        let problems: Vec<&str> = [
            (out.status.code() != Some(64), "exit code is not 64"),
            (!out.stderr.contains(&want), "stderr lacks FILE:LINE:"),
            (
                !out.stderr.contains(case.mention),
                "stderr lacks the culprit",
            ),
        ]
        .iter()
        .filter(|(bad, _)| *bad)
        .map(|(_, why)| *why)
        .collect();
        if !problems.is_empty() {
            failures.push(format!(
                "{}: {} (exit {:?}, wanted `{want}` and `{}` in stderr: {:?})",
                case.what,
                problems.join(", "),
                out.status.code(),
                case.mention,
                out.stderr.trim()
            ));
        }
    }
    // `cdd run` refuses a bad config the same way.
    let path = d.join("bad-run.toml");
    fs::write(&path, &cases[3].text).unwrap();
    let mut cmd = Command::new(cdd());
    cmd.arg("run").arg("--config").arg(&path);
    let out = run(cmd, Duration::from_secs(30)).unwrap();
    if out.status.code() != Some(64) {
        failures.push(format!(
            "cdd run with a bad config: exit {:?}",
            out.status.code()
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Content of version `v` of the hot file: every 4 KiB block starts with `v` and its
/// own index, the rest is noise derived from `v`, so any mix of versions is visible.
fn versioned(v: u64, len: usize) -> Vec<u8> {
    let mut out = noise(v + 1_000_000, len);
    for (i, block) in out.chunks_mut(4096).enumerate() {
        block[..8].copy_from_slice(&v.to_le_bytes());
        block[8..16].copy_from_slice(&(i as u64).to_le_bytes());
    }
    out
}

/// The version a hot-file image holds, or a description of how it is torn.
fn version_of(data: &[u8], len: usize) -> Result<u64, String> {
    if data.len() != len {
        return Err(format!("length {} instead of {len}", data.len()));
    }
    let v = u64::from_le_bytes(data[..8].try_into().unwrap());
    if data == versioned(v, len).as_slice() {
        return Ok(v);
    }
    let mut versions: Vec<u64> = data
        .chunks(4096)
        .map(|b| u64::from_le_bytes(b[..8].try_into().unwrap()))
        .collect();
    versions.sort_unstable();
    versions.dedup();
    Err(format!("torn: blocks from versions {versions:?}"))
}

#[test]
fn change_during_read_is_resent_not_torn() {
    change_during_read(false);
}

/// The same on a plaintext, uncompressed link, where whole files go out by `sendfile`
/// when they can be pinned: the file the writer keeps open is never among them (no
/// read lease while it is open for writing; no reflinks on the test's filesystem), so
/// it takes the read path, which re-reads it.
#[test]
fn change_during_sendfile_link_is_read_not_zero_copied() {
    change_during_read(true);
}

fn change_during_read(plain: bool) {
    const LEN: usize = 8 * MIB;
    let tmp = tempfile::tempdir().unwrap();
    let c = if plain {
        let mut spec = ClusterSpec::new(2, tmp.path(), &cdd(), &cdctl());
        spec.max_rate = 4 * MIB as u64;
        spec.zstd_level = Some(0);
        spec.set_lines.push("encryption = false".into());
        spec.node_lines
            .insert("node2".into(), vec!["trusted_peers = [\"node1\"]".into()]);
        Cluster::start(spec).unwrap_or_else(|e| panic!("cluster did not start: {e:#}"))
    } else {
        start(tmp.path(), 2, 4 * MIB as u64)
    };
    let source = c.root(c.source()).unwrap();
    let target_root = c.root("node2").unwrap();
    let hot = source.join("hot.bin");
    fs::write(&hot, versioned(0, LEN)).unwrap();
    fs::write(source.join("cold.txt"), b"unchanged\n").unwrap();
    sync_ok(&c);
    assert_replicas_identical(&c);
    if plain {
        // Nobody writes yet: the 8 MiB file goes out by sendfile under a lease.
        let l = last_link(&c, "node1", "source");
        assert_eq!(l["path"], "plain", "{l}");
        assert!(l["bytes_sendfile"].as_u64().unwrap() >= LEN as u64, "{l}");
    }

    // A writer rewrites the file in place, version after version, in chunks, with a
    // short pause between versions.
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (done, stop, hot) = (done.clone(), stop.clone(), hot.clone());
        thread::spawn(move || {
            use std::io::{Seek, SeekFrom, Write};
            let mut f = fs::OpenOptions::new().write(true).open(&hot).unwrap();
            let mut v = 0;
            while !stop.load(Ordering::SeqCst) {
                v += 1;
                let data = versioned(v, LEN);
                f.seek(SeekFrom::Start(0)).unwrap();
                for chunk in data.chunks(256 * 1024) {
                    f.write_all(chunk).unwrap();
                    thread::sleep(Duration::from_millis(2));
                }
                done.store(v, Ordering::SeqCst);
                thread::sleep(Duration::from_millis(30));
            }
        })
    };
    while done.load(Ordering::SeqCst) < 1 {
        thread::sleep(Duration::from_millis(5));
    }

    // On the sendfile link: the file stays open for writing until the job is over, so
    // every round of it must read the file, none may zero-copy it.
    let held = plain.then(|| fs::OpenOptions::new().write(true).open(&hot).unwrap());
    let links_before = if plain { source_links(&c).len() } else { 0 };
    let mut job = c.sync_background().unwrap();
    let seen = wait_for_partial_stage(&target_root, LEN as u64, &mut job);
    let at_partial = done.load(Ordering::SeqCst);
    // Keep writing until at least two more versions completed after the transfer was
    // seen in flight (bounded: the writer needs well under a second per version).
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.is_some()
        && done.load(Ordering::SeqCst) < at_partial + 2
        && Instant::now() < deadline
    {
        thread::sleep(Duration::from_millis(5));
    }
    let after_partial = done.load(Ordering::SeqCst) - at_partial;
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    let last = done.load(Ordering::SeqCst);
    let out = job.wait().unwrap();

    assert!(
        seen.is_some(),
        "the transfer of hot.bin was never seen in flight on node2, so the test proved \
         nothing; job: {}",
        out.report
    );
    assert!(
        after_partial >= 2,
        "writer stalled: {after_partial} versions after staging"
    );
    assert_eq!(out.exit_code, 0, "{}", out.report);
    let t = out.target("node2").unwrap();
    assert!(counter(t, "files_sent").unwrap() >= 1, "{}", out.report);
    eprintln!("resent = {}, last version written = {last}", t["resent"]);
    if plain {
        let links = source_links(&c);
        assert!(links.len() > links_before, "{links:?}");
        for (_, l) in &links[links_before..] {
            assert_eq!(l["path"], "plain", "{l}");
            assert_eq!(
                l["bytes_sendfile"], 0,
                "a file open for writing went out by sendfile: {l}"
            );
        }
    }
    drop(held);

    let replica = fs::read(target_root.join("hot.bin")).unwrap();
    let v = version_of(&replica, LEN).unwrap_or_else(|e| panic!("node2 hot.bin: {e}"));
    assert!(
        (1..=last).contains(&v),
        "replica holds version {v}, written: 1..={last}"
    );

    // With the writer stopped, the next sync converges to the final version.
    sync_ok(&c);
    assert_replicas_identical(&c);
    let replica = fs::read(target_root.join("hot.bin")).unwrap();
    assert_eq!(version_of(&replica, LEN), Ok(last));
    let diffs = compare(&source, &target_root).unwrap();
    assert!(diffs.is_empty(), "{diffs:?}");
}

/// The newest transfer link `node` recorded for `side` (`source` or `replica`), from
/// its `cdctl status --json`.
fn last_link(c: &Cluster, node: &str, side: &str) -> Value {
    let st = c.status(node).unwrap();
    st["node"]["transport"]["links"]
        .as_array()
        .and_then(|l| l.iter().rev().find(|x| x["side"] == side))
        .cloned()
        .unwrap_or_else(|| panic!("{node} recorded no {side} link: {st}"))
}

/// The links `node1` (the source) recorded, by peer.
fn source_links(c: &Cluster) -> Vec<(String, Value)> {
    let st = c.status("node1").unwrap();
    st["node"]["transport"]["links"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["side"] == "source")
        .map(|l| (l["peer"].as_str().unwrap().to_owned(), l.clone()))
        .collect()
}

/// `encryption = false` on the master drops TLS only towards a replica that trusts the
/// source (`trusted_peers`); the one that does not keeps an encrypted link. Both get
/// the tree. On the plaintext link the big file goes out by `sendfile`; on a rustls
/// link nothing can.
#[test]
fn plaintext_only_when_both_agree() {
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = ClusterSpec::new(4, tmp.path(), &cdd(), &cdctl());
    spec.zstd_level = Some(0);
    spec.set_lines.push("encryption = false".into());
    // Each replica judges the source itself: every link straight from it.
    spec.set_lines.push("routing = \"direct\"".into());
    spec.node_lines
        .insert("node2".into(), vec!["trusted_peers = [\"node1\"]".into()]);
    spec.node_lines
        .insert("node3".into(), vec!["trusted_peers = [\"node9\"]".into()]);
    // node4 trusts everyone, but its own kernel TLS is off: plaintext wins.
    spec.node_lines.insert(
        "node4".into(),
        vec!["trusted_peers = [\"*\"]".into(), "ktls = false".into()],
    );
    let c = Cluster::start(spec).unwrap_or_else(|e| panic!("cluster did not start: {e:#}"));
    let source = c.root(c.source()).unwrap();
    fs::write(source.join("big.bin"), noise(1, 3 * MIB)).unwrap();
    fs::write(source.join("small.txt"), b"small\n").unwrap();
    sync_ok(&c);
    assert_replicas_identical(&c);

    let links = source_links(&c);
    let find = |peer: &str| {
        links
            .iter()
            .rev()
            .find(|(p, _)| p == peer)
            .map(|(_, l)| l.clone())
            .unwrap_or_else(|| panic!("no link to {peer}: {links:?}"))
    };
    for peer in ["node2", "node4"] {
        let l = find(peer);
        assert_eq!(l["path"], "plain", "{peer}: {l}");
        assert!(
            l["bytes_sendfile"].as_u64().unwrap() >= 3 * MIB as u64,
            "{peer}: {l}"
        );
        let r = last_link(&c, peer, "replica");
        assert_eq!(r["path"], "plain", "{peer}: {r}");
    }
    // node3 does not trust node1: encrypted, kernel TLS where this kernel has it.
    let l = find("node3");
    assert_ne!(l["path"], "plain", "{l}");
    let ktls =
        c.status("node1").unwrap()["node"]["transport"]["ktls"]["probe"]["available"] == true;
    if ktls {
        assert_eq!(l["path"], "ktls", "{l}");
    } else {
        assert_eq!(l["path"], "rustls", "{l}");
        assert_eq!(l["bytes_sendfile"], 0, "{l}");
    }
    assert_eq!(last_link(&c, "node3", "replica")["path"], l["path"]);
}

/// Kernel TLS switched off in the node's config and in the environment: the status
/// says so and the links use rustls (with no note: disabled, not unavailable).
#[test]
fn ktls_disabled_by_config_or_environment() {
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = ClusterSpec::new(3, tmp.path(), &cdd(), &cdctl());
    spec.zstd_level = Some(0);
    spec.node_lines
        .insert("node1".into(), vec!["ktls = false".into()]);
    spec.env.push(("CDD_KTLS".into(), "off".into()));
    let c = Cluster::start(spec).unwrap_or_else(|e| panic!("cluster did not start: {e:#}"));
    fs::write(c.root("node1").unwrap().join("f"), noise(2, MIB)).unwrap();
    sync_ok(&c);
    assert_replicas_identical(&c);
    for node in ["node1", "node2", "node3"] {
        let k = &c.status(node).unwrap()["node"]["transport"]["ktls"];
        assert_eq!(k["enabled"], false, "{node}: {k}");
        // Probed all the same: status says whether it could be used.
        assert!(k["probe"]["available"].is_boolean(), "{node}: {k}");
    }
    for (peer, l) in source_links(&c) {
        assert_eq!(l["path"], "rustls", "{peer}: {l}");
        assert_eq!(l["note"], Value::Null, "{peer}: {l}");
        assert_eq!(l["bytes_sendfile"], 0, "{peer}: {l}");
    }
}

#[test]
fn examples_pass_check_config() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    fs::create_dir(d.join("www")).unwrap();
    let mut ca = Command::new(cdctl());
    ca.args(["ca", "init", "--master-name", "master", "--dir"])
        .arg(d.join("pki"));
    let out = run(ca, Duration::from_secs(60)).unwrap();
    assert!(out.status.success(), "cdctl ca init: {out:?}");
    // Only the machine-specific paths are replaced; everything else is checked as shipped.
    let replacements = [
        ("/etc/cdsync/pki", d.join("pki")),
        ("/var/lib/cdsync", d.join("state")),
        ("/srv/www", d.join("www")),
    ];
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    for name in ["master.toml", "node.toml"] {
        let mut text = fs::read_to_string(examples.join(name)).unwrap();
        for (from, to) in &replacements {
            text = text.replace(from, to.to_str().unwrap());
        }
        let live: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert!(
            !live
                .iter()
                .any(|l| l.contains("\"/etc/") || l.contains("\"/var/")),
            "examples/{name} names a path this test does not replace: {live:?}"
        );
        let path = d.join(name);
        fs::write(&path, text).unwrap();
        let mut cmd = Command::new(cdd());
        cmd.arg("check-config").arg(&path);
        let out = run(cmd, Duration::from_secs(30)).unwrap();
        assert_eq!(out.status.code(), Some(0), "examples/{name}: {out:?}");
    }
}

#[test]
fn ca_init_refuses_to_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = tmp.path().join("pki");
    let init = || {
        let mut ca = Command::new(cdctl());
        ca.args(["ca", "init", "--master-name", "master", "--dir"])
            .arg(&pki);
        run(ca, Duration::from_secs(60)).unwrap()
    };
    assert_eq!(init().status.code(), Some(0));
    let key = fs::read(pki.join("ca.key")).unwrap();
    for f in ["ca.pem", "ca.key", "master.pem", "master.key"] {
        assert!(pki.join(f).is_file(), "{f} missing");
    }
    let again = init();
    assert_eq!(again.status.code(), Some(1), "{again:?}");
    assert_eq!(
        fs::read(pki.join("ca.key")).unwrap(),
        key,
        "ca.key was replaced"
    );
}

/// Polls until every replica equals the source (or `limit` passes, then fails with the
/// remaining differences and the daemons' logs). No `cdctl sync` is involved.
fn wait_identical(c: &Cluster, limit: Duration, what: &str) {
    wait_same_as(c, c.source(), &c.targets(), limit, what);
}

/// Polls until every node of `others` holds the tree `reference` holds, within `limit`.
fn wait_same_as(c: &Cluster, reference: &str, others: &[String], limit: Duration, what: &str) {
    let first = c.root(reference).unwrap();
    let start = Instant::now();
    loop {
        let mut diffs = Vec::new();
        for n in others {
            // A tree being applied to can lose an entry between listing and reading
            // it: that is a difference for now, not a failure.
            match compare(&first, &c.root(n).unwrap()) {
                Ok(d) => diffs.extend(d.into_iter().take(10).map(|x| format!("{n}: {x}"))),
                Err(e) => diffs.push(format!("{n}: cannot compare yet: {e:#}")),
            }
        }
        if diffs.is_empty() {
            return;
        }
        if start.elapsed() > limit {
            panic!(
                "{what}: still different from {reference} after {limit:?}:\n{}\n{}",
                diffs.join("\n"),
                c.diagnostics()
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Real time over one capture backend: the initial tree, a burst of creations and a
/// round of every kind of edit reach every replica with no `cdctl sync`.
fn realtime_replicates(capture: &'static str) {
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = ClusterSpec::new(3, tmp.path(), &cdd(), &cdctl());
    spec.mode = Some("realtime");
    spec.capture = Some(capture);
    let c = Cluster::start(spec).unwrap_or_else(|e| panic!("cluster did not start: {e:#}"));
    let source = c.root(c.source()).unwrap();
    let status = c.status(c.source()).unwrap();
    let backend = &status["node"]["capture"]["backend"];
    assert_eq!(backend, capture, "the configured backend runs: {status}");

    let mut tree = TreeSpec::new(400, 23);
    tree.max_total_bytes = 8 * MIB as u64;
    generate(&source, &tree).unwrap();
    wait_identical(&c, Duration::from_secs(120), "generated tree");

    let counts = mutate(&source, &MutateSpec::new(4, 29)).unwrap();
    assert!(counts.total() > 30, "{counts}");
    wait_identical(
        &c,
        Duration::from_secs(120),
        "a round of every kind of edit",
    );

    // A file held open for writing is not shipped half-written: write half, check
    // the replicas do not show the partial content, finish, and it arrives whole.
    let path = source.join("held-open.bin");
    let first = noise(5, MIB);
    let second = noise(6, MIB);
    {
        use std::io::Write;
        let mut f = fs::File::create(&path).unwrap();
        f.write_all(&first).unwrap();
        f.flush().unwrap();
        let deadline = Instant::now() + Duration::from_millis(700);
        while Instant::now() < deadline {
            for t in c.targets() {
                let p = c.root(&t).unwrap().join("held-open.bin");
                if let Ok(got) = fs::read(&p) {
                    panic!(
                        "{t}: a file still open for writing was shipped ({} bytes)",
                        got.len()
                    );
                }
            }
            thread::sleep(Duration::from_millis(20));
        }
        f.write_all(&second).unwrap();
    }
    wait_identical(&c, Duration::from_secs(60), "file closed after writing");
    let status = c.status(c.source()).unwrap();
    assert_eq!(status["node"]["capture"]["lost_total"], 0, "{status}");
    // The source reported its change sets to the master's job log (best effort, so
    // the last one may still be on its way: wait for one that sent files).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let jobs = master_json(&c, &["jobs", "--limit", "1000"]);
        let shipped = jobs.as_array().unwrap().iter().any(|j| {
            j["kind"] == "realtime" && j["state"] == "ok" && j["files"].as_u64() > Some(0)
        });
        if shipped {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no real-time round in the job log: {jobs}"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn realtime_replicates_with_ebpf() {
    realtime_replicates("ebpf");
}

#[test]
fn realtime_replicates_with_fanotify() {
    realtime_replicates("fanotify");
}

/// Loss-driven rescans the source has made so far: (subtrees, whole trees).
fn rescans(c: &Cluster) -> (u64, u64) {
    let status = c.status(c.source()).unwrap();
    let r = &status["node"]["content_sets"][0]["rescans"];
    (
        r["subtree"].as_u64().unwrap_or_else(|| panic!("{status}")),
        r["full"].as_u64().unwrap_or_else(|| panic!("{status}")),
    )
}

/// The file-operation fidelity matrix over one capture backend, end to end: each
/// operation of `cd_testkit::fileops::matrix` is done on the source of a running
/// real-time cluster and must reach every replica exactly, through the events it
/// caused (a rescan after lost events would hide a missed one, so none may happen,
/// except where the matrix says a directory arrives with unseen contents).
fn realtime_fidelity_matrix(capture: &'static str) {
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = ClusterSpec::new(3, tmp.path(), &cdd(), &cdctl());
    spec.mode = Some("realtime");
    spec.capture = Some(capture);
    let c = Cluster::start(spec).unwrap_or_else(|e| panic!("cluster did not start: {e:#}"));
    let status = c.status(c.source()).unwrap();
    assert_eq!(status["node"]["capture"]["backend"], capture, "{status}");
    let source = c.root(c.source()).unwrap();
    let outside = tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    wait_identical(&c, Duration::from_secs(60), "empty tree");

    let mut failed = Vec::new();
    for op in cd_testkit::fileops::matrix() {
        let d = source.join(op.name);
        let o = outside.join(op.name);
        fs::create_dir(&o).unwrap();
        fs::create_dir(&d).unwrap();
        (op.setup)(&d, &o).unwrap_or_else(|e| panic!("{}: setup: {e}", op.name));
        wait_identical(&c, Duration::from_secs(60), &format!("{}: setup", op.name));
        let before = rescans(&c);
        (op.act)(&d, &o).unwrap_or_else(|e| panic!("{}: {e}", op.name));
        if let Err(e) = std::panic::catch_unwind(|| {
            wait_identical(&c, Duration::from_secs(30), op.name);
        }) {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .unwrap_or_else(|| "?".into());
            failed.push(format!(
                "{}: {}",
                op.name,
                msg.lines().take(4).collect::<Vec<_>>().join(" | ")
            ));
            // Bring the replicas back in line for the next operation.
            c.sync().unwrap();
            continue;
        }
        let after = rescans(&c);
        if !op.rescans && after != before {
            failed.push(format!(
                "{}: replicated only through a rescan after lost events ({before:?} -> {after:?})",
                op.name
            ));
        }
    }
    let status = c.status(c.source()).unwrap();
    assert_eq!(status["node"]["capture"]["lost_total"], 0, "{status}");
    assert!(
        failed.is_empty(),
        "{capture}: {} of {} operations not replicated exactly:\n{}\n{}",
        failed.len(),
        cd_testkit::fileops::matrix().len(),
        failed.join("\n"),
        c.diagnostics()
    );
}

#[test]
fn realtime_fidelity_matrix_ebpf() {
    realtime_fidelity_matrix("ebpf");
}

#[test]
fn realtime_fidelity_matrix_fanotify() {
    realtime_fidelity_matrix("fanotify");
}

/// `n` small files of distinct content under `dir/b<k>/`, 1000 per directory.
fn burst(dir: &Path, n: usize) {
    for i in 0..n {
        let sub = dir.join(format!("b{}", i / 1000));
        if i % 1000 == 0 {
            fs::create_dir_all(&sub).unwrap();
        }
        fs::write(sub.join(format!("f{i}")), format!("file {i}\n")).unwrap();
    }
}

fn lost_total(c: &Cluster) -> u64 {
    let status = c.status(c.source()).unwrap();
    status["node"]["capture"]["lost_total"]
        .as_u64()
        .unwrap_or_else(|| panic!("{status}"))
}

/// The source's daemon is frozen (SIGSTOP) while 20,000 files are written. With eBPF
/// the 1 MiB ring buffer fills and the kernel counts the records it could not queue;
/// once thawed the daemon sees the counter move, rescans, and the replicas end
/// identical. With fanotify the kernel queue is unbounded: the backlog is read late,
/// nothing is lost. Either way no file is missing.
fn stalled_consumer_heals(capture: &'static str) {
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = ClusterSpec::new(2, tmp.path(), &cdd(), &cdctl());
    spec.mode = Some("realtime");
    spec.capture = Some(capture);
    spec.ring_buffer_mib = Some(1);
    let mut c = Cluster::start(spec).unwrap_or_else(|e| panic!("cluster did not start: {e:#}"));
    let source = c.root(c.source()).unwrap();
    wait_identical(&c, Duration::from_secs(60), "empty tree");
    let (_, full_before) = rescans(&c);
    assert_eq!(lost_total(&c), 0);

    let name = c.source().to_owned();
    c.kill(&name, cd_testkit::signal::SIGSTOP).unwrap();
    burst(&source.join("stalled"), 20_000);
    c.kill(&name, cd_testkit::signal::SIGCONT).unwrap();
    wait_identical(&c, Duration::from_secs(600), "burst written while stalled");

    let lost = lost_total(&c);
    let (_, full_after) = rescans(&c);
    if capture == "ebpf" {
        assert!(lost > 0, "a 1 MiB ring cannot hold 20,000 files' records");
        assert!(
            full_after > full_before,
            "the drops were healed by a rescan: {full_before} -> {full_after}"
        );
    } else {
        assert_eq!(lost, 0, "fanotify's queue is unbounded");
    }
}

#[test]
fn stalled_consumer_heals_with_ebpf() {
    stalled_consumer_heals("ebpf");
}

#[test]
fn stalled_consumer_heals_with_fanotify() {
    stalled_consumer_heals("fanotify");
}

/// 200,000 files created in a burst on a running real-time source all reach the
/// replica (none missing, none extra), with no sync command.
#[test]
fn burst_of_200k_files_replicates() {
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = ClusterSpec::new(2, tmp.path(), &cdd(), &cdctl());
    spec.mode = Some("realtime");
    spec.capture = Some("ebpf");
    let c = Cluster::start(spec).unwrap_or_else(|e| panic!("cluster did not start: {e:#}"));
    let source = c.root(c.source()).unwrap();
    wait_identical(&c, Duration::from_secs(60), "empty tree");
    let n: usize = std::env::var("CD_BURST_FILES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let t = Instant::now();
    burst(&source.join("burst"), n);
    let written = t.elapsed();
    wait_identical(&c, Duration::from_secs(1200), "200,000-file burst");
    eprintln!(
        "burst: {n} files written in {written:?}, replica identical after {:?}; \
         ring-buffer drops {}, rescans {:?}",
        t.elapsed(),
        lost_total(&c),
        rescans(&c)
    );
}

/// A real-time source stopped gracefully and restarted resumes its stream from the
/// record it saved: what changed while it was down reaches the replicas through the
/// background consistency check, without a full reconcile. After a crash (its record
/// no longer matches the sequence number) it reconciles in full, and the replicas
/// still end identical.
#[test]
fn realtime_source_restart_resumes_without_full_reconcile() {
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = ClusterSpec::new(3, tmp.path(), &cdd(), &cdctl());
    spec.mode = Some("realtime");
    let mut c = Cluster::start(spec).unwrap_or_else(|e| panic!("cluster did not start: {e:#}"));
    let source = c.root(c.source()).unwrap();
    // No hard links: a change set touching a file with several names is still
    // shipped as a full reconcile (its other names may be anywhere in the tree).
    let mut tree = TreeSpec::new(600, 41);
    tree.max_total_bytes = 4 * MIB as u64;
    tree.hardlink_groups = 0;
    generate(&source, &tree).unwrap();
    wait_identical(&c, Duration::from_secs(120), "generated tree");
    // The record starts at a full round that reached every connected target. The
    // start-up round may have raced a target's connection (that target is then
    // caught up on its own, which does not start a record): a sync makes one.
    c.sync().unwrap();

    let name = c.source().to_owned();
    let set_status = |c: &Cluster| c.status(c.source()).unwrap()["node"]["content_sets"][0].clone();
    c.kill(&name, cd_testkit::signal::SIGTERM).unwrap();
    let mut edits = MutateSpec::new(43, 4);
    edits.hardlinks = false;
    let counts = mutate(&source, &edits).unwrap();
    assert!(counts.total() > 20, "{counts}");
    c.restart(&name).unwrap();
    wait_identical(
        &c,
        Duration::from_secs(120),
        "edits made while the source was down",
    );
    let st = set_status(&c);
    assert!(
        st["resume"]["from_seq"].as_u64().is_some(),
        "resumed: {st}\n{}",
        c.diagnostics()
    );
    assert!(
        st["resume"]["check"]["differences"].as_u64().unwrap_or(0) > 0,
        "the check found the edits: {st}"
    );
    assert_eq!(
        st["full_reconciles"],
        0,
        "no full reconcile: {st}\n{}",
        c.diagnostics()
    );

    c.kill(&name, SIGKILL).unwrap();
    edits.seed = 47;
    mutate(&source, &edits).unwrap();
    c.restart(&name).unwrap();
    wait_identical(&c, Duration::from_secs(120), "edits made after a crash");
    let st = set_status(&c);
    assert!(st["resume"]["from_seq"].is_null(), "{st}");
    assert!(st["full_reconciles"].as_u64().unwrap() >= 1, "{st}");
}

/// The filter of the filter tests, as the master's content-set lines.
const FILTER_LINE: &str = r#"exclude = ["*.tmp", "re:^cache/"]"#;

/// The test's own reading of [`FILTER_LINE`] (no cdsync code): a path is excluded when
/// one of its components ends in `.tmp` (a glob without `/` matches names at any depth,
/// and an excluded directory takes what is beneath it), or when it lies in the
/// top-level `cache` directory (the regex `^cache/` sees directories with a trailing
/// `/`, so it takes `cache` itself).
fn synced(rel: &Path) -> bool {
    let names: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    names.first().is_none_or(|n| n != "cache") && !names.iter().any(|n| n.ends_with(".tmp"))
}

/// Relative paths of every entry under `root` (the reserved `.cdsync` left out).
fn rel_paths(root: &Path) -> Vec<PathBuf> {
    fn walk(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) {
        for e in fs::read_dir(root.join(rel)).unwrap().flatten() {
            let r = rel.join(e.file_name());
            if r.as_os_str() == ".cdsync" {
                continue;
            }
            let is_dir = e.file_type().unwrap().is_dir();
            out.push(r.clone());
            if is_dir {
                walk(root, &r, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, Path::new(""), &mut out);
    out
}

/// How each replica departs from what the filter says it holds: exactly the source's
/// synced entries (judged by the independent comparator: type, bytes, mode, owner,
/// mtime, links), none of the source's excluded entries, and every one of its own
/// `kept` entries (paths the source does not sync, or that the command mask protects),
/// whatever the source has there. Empty when every replica is as expected.
fn filter_violations(c: &Cluster, kept: &[&str]) -> Vec<String> {
    let source = c.root(c.source()).unwrap();
    let source_paths = rel_paths(&source);
    let mut out = Vec::new();
    for t in c.targets() {
        let r = c.root(&t).unwrap();
        // A replica being applied to can lose an entry between listing and reading it:
        // a violation for now (a poll retries), not a failure of the comparison.
        let diffs =
            compare(&source, &r).unwrap_or_else(|e| vec![format!("(cannot compare yet): {e:#}")]);
        for d in diffs {
            let path = d.split(": ").next().unwrap_or_default();
            let expected =
                kept.contains(&path) || (d.contains(": only in A (") && !synced(Path::new(path)));
            if !expected {
                out.push(format!("{t}: {d}"));
            }
        }
        for p in source_paths.iter().filter(|p| !synced(p)) {
            let shown = p.to_str().unwrap();
            if !kept.contains(&shown) && fs::symlink_metadata(r.join(p)).is_ok() {
                out.push(format!("{t}: {shown}: excluded, yet on the replica"));
            }
        }
        for k in kept {
            if fs::symlink_metadata(r.join(k)).is_err() {
                out.push(format!("{t}: {k}: the replica's own entry is gone"));
            }
        }
    }
    out
}

/// Polls [`filter_violations`] until there are none, failing after `limit` (zero: one
/// look, for a state that must already hold).
fn wait_filtered(c: &Cluster, kept: &[&str], limit: Duration, what: &str) {
    let start = Instant::now();
    loop {
        let v = filter_violations(c, kept);
        if v.is_empty() {
            return;
        }
        if start.elapsed() >= limit {
            panic!(
                "{what}: replicas are not what the filter says after {limit:?}:\n{}\n{}",
                v.join("\n"),
                c.diagnostics()
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until every node's status shows `commands.delete == false` for the set.
fn wait_delete_off(c: &Cluster) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pending: Vec<(String, Value)> = c
            .nodes()
            .into_iter()
            .map(|n| {
                let st = c.status(&n).unwrap();
                (n, st["node"]["content_sets"][0]["filter"].clone())
            })
            .filter(|(_, f)| f["commands"]["delete"] != false)
            .collect();
        if pending.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the new filter did not reach every node: {pending:?}{}",
            c.diagnostics()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// Include/exclude and the command filter, end to end, under `cdctl sync` (`mode`
/// `None`) or real time: excluded files (glob and regex) stay on the source; a
/// replica's own excluded files survive a full sync while its own included file does
/// not; a rename from an excluded name to an included one makes the file appear (and
/// the reverse makes it go); after the master's config gains `delete = false`, a file
/// removed on the source stays on the replicas.
fn filters_hold(mode: Option<&'static str>, capture: Option<&'static str>) {
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = ClusterSpec::new(3, tmp.path(), &cdd(), &cdctl());
    spec.mode = mode;
    spec.capture = capture;
    spec.set_lines = vec![FILTER_LINE.to_owned()];
    let mut c = Cluster::start(spec).unwrap_or_else(|e| panic!("cluster did not start: {e:#}"));
    let realtime = mode == Some("realtime");
    let source = c.root(c.source()).unwrap();
    let status = c.status(c.source()).unwrap();
    assert_eq!(
        status["node"]["content_sets"][0]["filter"]["exclude"],
        serde_json::json!(["*.tmp", "re:^cache/"]),
        "{status}"
    );
    // Real time ships by itself; manual needs a sync, after which the state must hold.
    let settle = |c: &Cluster, kept: &[&str], what: &str| {
        if realtime {
            wait_filtered(c, kept, Duration::from_secs(120), what);
        } else {
            sync_ok(c);
            wait_filtered(c, kept, Duration::ZERO, what);
        }
    };

    // Each replica has entries of its own: excluded ones, and an included file.
    const KEPT: [&str; 3] = ["local.tmp", "cache", "cache/own.dat"];
    for t in c.targets() {
        let r = c.root(&t).unwrap();
        fs::write(r.join("local.tmp"), b"the replica's own\n").unwrap();
        fs::create_dir(r.join("cache")).unwrap();
        fs::write(r.join("cache/own.dat"), b"the replica's cache\n").unwrap();
        fs::write(r.join("stray.txt"), b"not on the source\n").unwrap();
    }
    // The source: in each directory the excluded entries come first, so the last
    // change a directory sees is one that ships and its mtime reaches the replicas.
    fs::write(source.join("app.tmp"), b"excluded by glob\n").unwrap();
    fs::create_dir(source.join("cache")).unwrap();
    fs::write(source.join("cache/page.html"), b"excluded by regex\n").unwrap();
    fs::write(source.join("old.tmp"), b"renamed into the set later\n").unwrap();
    fs::create_dir(source.join("docs")).unwrap();
    fs::write(source.join("docs/draft.tmp"), b"excluded at depth\n").unwrap();
    fs::create_dir(source.join("docs/build.tmp")).unwrap();
    fs::write(
        source.join("docs/build.tmp/out.txt"),
        b"in an excluded dir\n",
    )
    .unwrap();
    fs::write(source.join("docs/guide.txt"), b"synced\n").unwrap();
    fs::write(source.join("index.html"), b"synced, renamed out later\n").unwrap();

    // A full sync (also in real time, where it reconciles like any full round).
    sync_ok(&c);
    let limit = if realtime {
        Duration::from_secs(120)
    } else {
        Duration::ZERO
    };
    wait_filtered(&c, &KEPT, limit, "full sync");
    for t in c.targets() {
        let r = c.root(&t).unwrap();
        assert_eq!(fs::read(r.join("docs/guide.txt")).unwrap(), b"synced\n");
        for gone in [
            "app.tmp",
            "cache/page.html",
            "docs/draft.tmp",
            "docs/build.tmp",
        ] {
            assert!(!r.join(gone).exists(), "{t}: excluded {gone} replicated");
        }
        assert!(!r.join("stray.txt").exists(), "{t}: included extra kept");
        assert_eq!(
            fs::read(r.join("cache/own.dat")).unwrap(),
            b"the replica's cache\n"
        );
    }

    // Renames across the boundary: excluded to included appears, the reverse goes.
    fs::rename(source.join("old.tmp"), source.join("new.html")).unwrap();
    fs::rename(source.join("index.html"), source.join("index.html.tmp")).unwrap();
    settle(&c, &KEPT, "renames across the filter boundary");
    for t in c.targets() {
        let r = c.root(&t).unwrap();
        assert_eq!(
            fs::read(r.join("new.html")).unwrap(),
            b"renamed into the set later\n",
            "{t}"
        );
        assert!(
            !r.join("index.html").exists(),
            "{t}: renamed out, still there"
        );
        assert!(
            !r.join("index.html.tmp").exists(),
            "{t}: excluded name shipped"
        );
    }

    // The command filter: no deletes from now on.
    let cfg = c.config(MASTER).unwrap();
    let mut text = fs::read_to_string(&cfg).unwrap();
    text.push_str("commands = { delete = false }\n");
    fs::write(&cfg, text).unwrap();
    c.restart(MASTER).unwrap();
    wait_delete_off(&c);
    fs::remove_file(source.join("docs/guide.txt")).unwrap();
    // Written after the removal: once it is on the replicas, so is the removal's verdict
    // (a removal ships before, or with, a later file's content).
    fs::write(
        source.join("docs/after.txt"),
        b"written after the removal\n",
    )
    .unwrap();
    let kept: Vec<&str> = KEPT.iter().copied().chain(["docs/guide.txt"]).collect();
    settle(&c, &kept, "delete = false");
    for t in c.targets() {
        let r = c.root(&t).unwrap();
        assert_eq!(
            fs::read(r.join("docs/guide.txt")).unwrap(),
            b"synced\n",
            "{t}: removed despite delete = false"
        );
        assert!(r.join("docs/after.txt").exists(), "{t}");
    }
    // A full sync keeps it too, and the excluded entries stay as they were.
    sync_ok(&c);
    wait_filtered(&c, &kept, limit, "full sync with delete = false");
}

#[test]
fn filters_hold_for_manual_sync() {
    filters_hold(None, None);
}

#[test]
fn filters_hold_in_realtime_with_ebpf() {
    filters_hold(Some("realtime"), Some("ebpf"));
}

#[test]
fn filters_hold_in_realtime_with_fanotify() {
    filters_hold(Some("realtime"), Some("fanotify"));
}

/// Rewrites `len` bytes of `data` at `at` with fresh noise.
fn rewrite(data: &mut [u8], at: usize, len: usize, seed: u64) {
    data[at..at + len].copy_from_slice(&noise(seed, len));
}

#[test]
fn small_change_to_large_file_travels_as_broadcast_delta() {
    const BIG: usize = 24 * MIB;
    let tmp = tempfile::tempdir().unwrap();
    let c = start(tmp.path(), 4, 0);
    let source = c.root(c.source()).unwrap();
    let mut big = noise(5, BIG);
    let unrelated = noise(6, 2 * MIB);
    fs::write(source.join("big.bin"), &big).unwrap();
    fs::write(source.join("other.bin"), &unrelated).unwrap();
    fs::write(source.join("small.txt"), b"small\n").unwrap();
    let r1 = sync_ok(&c);
    for t in c.targets() {
        assert_eq!(target_counter(&r1, &t, "delta_files"), 0, "{t}: {r1}");
    }
    assert_replicas_identical(&c);

    // 1 MiB in the middle changes. The source never signed the version it sent whole,
    // so each replica sends the signature of its copy: one exchange each.
    rewrite(&mut big, BIG / 2, MIB, 50);
    fs::write(source.join("big.bin"), &big).unwrap();
    // A file replaced by unrelated content of the same size: a delta would not pay.
    fs::write(source.join("other.bin"), noise(7, 2 * MIB)).unwrap();
    let r2 = sync_ok(&c);
    for t in c.targets() {
        assert_eq!(target_counter(&r2, &t, "files_sent"), 2, "{t}: {r2}");
        assert_eq!(target_counter(&r2, &t, "delta_files"), 1, "{t}: {r2}");
        assert_eq!(
            target_counter(&r2, &t, "signature_exchanges"),
            2,
            "{t}: {r2}"
        );
        let patch = target_counter(&r2, &t, "patch_bytes");
        assert!(patch < 2 * MIB as u64, "{t}: patch of {patch} bytes: {r2}");
        // The 1 MiB change (plus up to a block either side) and the 2 MiB whole file.
        let wire = target_counter(&r2, &t, "wire_bytes");
        assert!(wire < 5 * MIB as u64, "{t}: {wire} bytes on the wire: {r2}");
    }
    assert_replicas_identical(&c);

    // The next change is made against the version the source distributed, whose
    // signature it built while generating: no exchange, one patch for all replicas.
    rewrite(&mut big, 1000, 4096, 51);
    rewrite(&mut big, BIG - 10_000, 100, 52);
    fs::write(source.join("big.bin"), &big).unwrap();
    let r3 = sync_ok(&c);
    for t in c.targets() {
        assert_eq!(target_counter(&r3, &t, "delta_files"), 1, "{t}: {r3}");
        assert_eq!(
            target_counter(&r3, &t, "signature_exchanges"),
            0,
            "{t}: {r3}"
        );
        let wire = target_counter(&r3, &t, "wire_bytes");
        assert!(wire < MIB as u64, "{t}: {wire} bytes on the wire: {r3}");
    }
    assert_replicas_identical(&c);

    // A replica whose copy drifted (edited locally) is not patched blindly: its base
    // differs from the cached signature's, so it gets its own exchange.
    let drifted = c.targets()[0].clone();
    let mut local = big.clone();
    rewrite(&mut local, 3 * MIB, 10, 53);
    fs::write(c.root(&drifted).unwrap().join("big.bin"), &local).unwrap();
    rewrite(&mut big, 7 * MIB, 10, 54);
    fs::write(source.join("big.bin"), &big).unwrap();
    let r4 = sync_ok(&c);
    for t in c.targets() {
        assert_eq!(target_counter(&r4, &t, "delta_files"), 1, "{t}: {r4}");
        let exchanges = if t == drifted { 1 } else { 0 };
        assert_eq!(
            target_counter(&r4, &t, "signature_exchanges"),
            exchanges,
            "{t}: {r4}"
        );
    }
    assert_replicas_identical(&c);
}

#[test]
fn delta_never_sends_whole_files() {
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = ClusterSpec::new(2, tmp.path(), &cdd(), &cdctl());
    spec.set_lines.push("delta = \"never\"".into());
    let c = Cluster::start(spec).unwrap_or_else(|e| panic!("cluster did not start: {e:#}"));
    let source = c.root(c.source()).unwrap();
    let mut big = noise(8, 4 * MIB);
    fs::write(source.join("big.bin"), &big).unwrap();
    sync_ok(&c);
    rewrite(&mut big, MIB, 4096, 55);
    fs::write(source.join("big.bin"), &big).unwrap();
    let r = sync_ok(&c);
    let t = &c.targets()[0];
    assert_eq!(target_counter(&r, t, "delta_files"), 0, "{r}");
    assert_eq!(target_counter(&r, t, "bytes_sent"), 4 * MIB as u64, "{r}");
    assert_replicas_identical(&c);
}

// ---- job log, dry runs, scheduled sets ------------------------------------------

/// `cdctl --socket <master> ARGS… --json`, parsed; panics unless it exits 0.
fn master_json(c: &Cluster, args: &[&str]) -> Value {
    let mut cmd = Command::new(cdctl());
    cmd.arg("--socket")
        .arg(c.socket(MASTER).unwrap())
        .args(args)
        .arg("--json");
    let out = run(cmd, Duration::from_secs(60)).unwrap();
    assert!(out.status.success(), "cdctl {args:?}: {out:?}");
    serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("cdctl {args:?} printed {:?}: {e}", out.stdout))
}

/// Everything under `dir` (dot directories included): kind, mode, mtime and content.
fn snapshot(dir: &Path) -> Vec<(PathBuf, u32, i64, Vec<u8>)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let md = fs::symlink_metadata(&p).unwrap();
            let body = if md.is_dir() {
                stack.push(p.clone());
                Vec::new()
            } else if md.is_file() {
                fs::read(&p).unwrap()
            } else {
                fs::read_link(&p)
                    .unwrap()
                    .into_os_string()
                    .into_encoded_bytes()
            };
            out.push((
                p,
                md.mode(),
                md.mtime() * 1_000_000_000 + md.mtime_nsec(),
                body,
            ));
        }
    }
    out.sort();
    out
}

fn wait_disconnected(c: &Cluster, node: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = c.status(MASTER).unwrap();
        let connected = st["master"]["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["name"] == node && n["connected"] == true);
        if !connected {
            return;
        }
        assert!(Instant::now() < deadline, "{node} still connected: {st}");
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn job_log_keeps_jobs_across_restarts_and_dry_run_changes_nothing() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let mut c = start(tmp.path(), 3, 0);
    let src = c.root(c.source()).unwrap();
    for i in 0..5 {
        fs::write(src.join(format!("f{i}.txt")), noise(i, 1000)).unwrap();
    }
    fs::write(src.join("m.bin"), noise(100, 256 << 10)).unwrap();
    fs::write(src.join("d.txt"), b"to be deleted").unwrap();
    fs::write(src.join("p.txt"), b"to be chmodded").unwrap();

    // Two good jobs, then one with a target down.
    let a = sync_ok(&c)["job_id"].as_u64().unwrap();
    let b = sync_ok(&c)["job_id"].as_u64().unwrap();
    c.kill("node3", libc::SIGTERM).unwrap();
    wait_disconnected(&c, "node3");
    let failed = c.try_sync().unwrap();
    assert_eq!(failed.exit_code, 1, "{}", failed.report);
    let f = failed.report["job_id"].as_u64().unwrap();
    assert!(a < b && b < f, "ids grow: {a} {b} {f}");

    let jobs = master_json(&c, &["jobs"]);
    let listed: Vec<(u64, &str, &str)> = jobs
        .as_array()
        .unwrap()
        .iter()
        .map(|j| {
            (
                j["job_id"].as_u64().unwrap(),
                j["kind"].as_str().unwrap(),
                j["state"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [(f, "sync", "failed"), (b, "sync", "ok"), (a, "sync", "ok")],
        "newest first: {jobs}"
    );
    let only_failed = master_json(&c, &["jobs", "--failed", "--set", "www"]);
    assert_eq!(only_failed.as_array().unwrap().len(), 1, "{only_failed}");
    assert_eq!(
        master_json(&c, &["jobs", "--limit", "1"])
            .as_array()
            .unwrap()
            .len(),
        1
    );

    let job = master_json(&c, &["job", &f.to_string()]);
    let targets = job["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 2, "{job}");
    let row = |name: &str| targets.iter().find(|t| t["target"] == name).unwrap();
    assert_eq!(row("node2")["ok"], true, "{job}");
    assert_eq!(row("node3")["ok"], false, "{job}");
    assert!(!row("node3")["error"].as_str().unwrap().is_empty(), "{job}");
    assert_eq!(row("node2")["via"], "node1", "{job}");
    let first = master_json(&c, &["job", &a.to_string()]);
    assert_eq!(
        counter(&first["targets"][0], "files_sent").unwrap(),
        8,
        "{first}"
    );

    // Node3 back, everyone in sync; then the master restarts and keeps its log.
    c.restart("node3").unwrap();
    sync_ok(&c);
    assert_replicas_identical(&c);
    c.restart(MASTER).unwrap();
    let jobs = master_json(&c, &["jobs"]);
    let ids: Vec<u64> = jobs
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["job_id"].as_u64().unwrap())
        .collect();
    assert!(ids.contains(&a) && ids.contains(&f), "{jobs}");
    let after = sync_ok(&c)["job_id"].as_u64().unwrap();
    assert!(after > *ids.iter().max().unwrap(), "{after} after {ids:?}");
    let stats = master_json(&c, &["stats"]);
    let link = stats["links"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["via"] == "node1" && l["target"] == "node3")
        .unwrap_or_else(|| panic!("{stats}"));
    assert!(link["failures"].as_u64().unwrap() >= 1, "{stats}");

    // A dry run against a changed tree: right counts, no replica touched.
    fs::create_dir(src.join("new")).unwrap();
    fs::write(src.join("new/a.txt"), b"new file").unwrap();
    let mut m = fs::read(src.join("m.bin")).unwrap();
    m[1000..1010].copy_from_slice(b"0123456789");
    fs::write(src.join("m.bin"), &m).unwrap();
    fs::remove_file(src.join("d.txt")).unwrap();
    fs::set_permissions(src.join("p.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    let before: Vec<_> = c
        .targets()
        .iter()
        .map(|t| snapshot(&c.root(t).unwrap()))
        .collect();
    let dry = master_json(&c, &["sync", "--dry-run", "www"]);
    assert_eq!(dry["ok"], true, "{dry}");
    assert_eq!(dry["kind"], "dry_run", "{dry}");
    let names: Vec<&str> = dry["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["target"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["node2", "node3"], "in the configured order");
    for t in dry["targets"].as_array().unwrap() {
        let p = &t["planned"];
        assert_eq!(p["files_count"], 2, "{t}");
        assert_eq!(p["files_bytes"], 8 + (256 << 10), "{t}");
        assert_eq!(p["removed_count"], 1, "{t}");
        assert_eq!(p["removed"], serde_json::json!(["d.txt"]), "{t}");
        assert_eq!(p["meta_only_count"], 1, "{t}");
        assert_eq!(p["meta_only"], serde_json::json!(["p.txt"]), "{t}");
        assert_eq!(p["created_dirs"], 1, "{t}");
        let file = |path: &str| {
            p["files"]
                .as_array()
                .unwrap()
                .iter()
                .find(|f| f["path"] == path)
                .cloned()
                .unwrap_or_else(|| panic!("{path} not planned: {t}"))
        };
        assert_eq!(file("new/a.txt")["delta"], false, "no base: whole");
        assert_eq!(
            file("m.bin")["delta"],
            true,
            "a base of the same size: delta"
        );
        assert_eq!(t["files_sent"], 0, "{t}");
        assert_eq!(t["bytes_sent"], 0, "{t}");
    }
    let after_dry: Vec<_> = c
        .targets()
        .iter()
        .map(|t| snapshot(&c.root(t).unwrap()))
        .collect();
    assert!(before == after_dry, "a dry run changed a replica");
    for t in c.targets() {
        let stage = c.root(&t).unwrap().join(".cdsync/stage");
        assert!(files_under(&stage).is_empty(), "{t}: stage files left");
    }
    let logged = master_json(&c, &["job", &dry["job_id"].to_string()]);
    assert_eq!(logged["kind"], "dry_run", "{logged}");
    assert_eq!(
        logged["targets"][0]["planned"]["files_count"], 2,
        "{logged}"
    );
    // The human form names every planned change.
    let mut cmd = Command::new(cdctl());
    cmd.arg("--socket")
        .arg(c.socket(MASTER).unwrap())
        .args(["sync", "--dry-run", "www"]);
    let text = run(cmd, Duration::from_secs(60)).unwrap().stdout;
    for needle in [
        "new/a.txt",
        "m.bin",
        "delta",
        "remove d.txt",
        "attrs  p.txt",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    // The real sync then does exactly what was planned.
    let real = sync_ok(&c);
    for t in c.targets() {
        assert_eq!(target_counter(&real, &t, "files_sent"), 2, "{real}");
        assert_eq!(target_counter(&real, &t, "removed"), 1, "{real}");
    }
    assert_replicas_identical(&c);
}

#[test]
fn scheduled_set_runs_without_a_sync_command() {
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = ClusterSpec::new(2, tmp.path(), &cdd(), &cdctl());
    spec.set_lines = vec!["mode = \"scheduled\"".into(), "every = \"2s\"".into()];
    let c = Cluster::start(spec).unwrap_or_else(|e| panic!("cluster did not start: {e:#}"));
    fs::write(c.root(c.source()).unwrap().join("hello.txt"), b"scheduled").unwrap();
    let st = c.status(MASTER).unwrap();
    let set = &st["master"]["content_sets"][0];
    assert_eq!(set["mode"], "scheduled", "{st}");
    assert_eq!(set["schedule"]["every_seconds"], 2, "{st}");
    assert!(set["schedule"]["next_unix"].as_i64().is_some(), "{st}");
    assert!(set["schedule"]["next_local"].as_str().is_some(), "{st}");
    let deadline = Instant::now() + Duration::from_secs(120);
    let target = c.root("node2").unwrap().join("hello.txt");
    loop {
        let jobs = master_json(&c, &["jobs"]);
        let done = jobs
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["kind"] == "scheduled" && j["state"] == "ok");
        if done && fs::read(&target).ok().as_deref() == Some(&b"scheduled"[..]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no scheduled job replicated hello.txt: {jobs}\n{}",
            c.diagnostics()
        );
        thread::sleep(Duration::from_millis(200));
    }
    let jobs = master_json(&c, &["jobs"]);
    assert!(
        jobs.as_array()
            .unwrap()
            .iter()
            .all(|j| j["kind"] == "scheduled"),
        "{jobs}"
    );
}

/// The farm of `relay_routes_failover_and_catch_up`: node1 is the source (its own
/// group), east has two groups of two, west one group of two; the first of each group
/// weighs more, so it is the head.
const FARM: &str = r#"
[[master.servers]]
name = "node1"
region = "east"
group = "east-src"
[[master.servers]]
name = "node2"
region = "east"
group = "east-a"
weight = 2
[[master.servers]]
name = "node3"
region = "east"
group = "east-a"
[[master.servers]]
name = "node4"
region = "east"
group = "east-b"
weight = 2
[[master.servers]]
name = "node5"
region = "east"
group = "east-b"
[[master.servers]]
name = "node6"
region = "west"
group = "west-a"
weight = 2
[[master.servers]]
name = "node7"
region = "west"
group = "west-a"
[master.link_classes.same_group]
zstd_level = 0
"#;

fn routes(c: &Cluster) -> Value {
    c.cdctl_json(MASTER, &["routes", "--json"], Duration::from_secs(30))
        .unwrap()
        .1
}

fn parent_of(routes: &Value, child: &str) -> Option<String> {
    routes["edges"]
        .as_array()?
        .iter()
        .find(|e| e["child"] == child)
        .and_then(|e| e["parent"].as_str().map(str::to_owned))
}

/// Waits until `pred` holds of the master's routes.
fn wait_routes(c: &Cluster, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = routes(c);
        if pred(&r) {
            return r;
        }
        assert!(Instant::now() < deadline, "routes never showed {what}: {r}");
        thread::sleep(Duration::from_millis(100));
    }
}

fn master_events(c: &Cluster) -> Vec<Value> {
    c.status(MASTER).unwrap()["master"]["events"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Relay routes on loopback: the source sends one copy per group of its region and
/// one to the other region, heads forward; a killed head is routed around (its group
/// mate takes over), and when it comes back it catches up from that group mate, not
/// from the source; `cdctl wait` is the deploy barrier.
#[test]
fn relay_routes_failover_and_catch_up() {
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = ClusterSpec::new(7, tmp.path(), &cdd(), &cdctl());
    spec.set_lines = FARM.lines().map(str::to_owned).collect();
    let mut c = Cluster::start(spec).unwrap_or_else(|e| panic!("{e:#}"));
    let source = c.root(c.source()).unwrap();
    let mut tree = TreeSpec::new(300, 5);
    tree.max_total_bytes = 6 * MIB as u64;
    generate(&source, &tree).unwrap();

    let r = wait_routes(&c, "every target routed", |r| {
        r["edges"].as_array().is_some_and(|e| e.len() == 6)
    });
    let expect = [
        ("node2", "node1", "same_region"),
        ("node4", "node1", "same_region"),
        ("node6", "node1", "international"),
        ("node3", "node2", "same_group"),
        ("node5", "node4", "same_group"),
        ("node7", "node6", "same_group"),
    ];
    for (child, parent, class) in expect {
        let e = r["edges"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["child"] == child)
            .unwrap_or_else(|| panic!("{child} not routed: {r}"));
        assert_eq!(
            (e["parent"].as_str(), e["class"].as_str()),
            (Some(parent), Some(class)),
            "{r}"
        );
    }

    // 1. A sync goes along the tree; every target reports who sent to it.
    let r1 = sync_ok(&c);
    for (child, parent, class) in expect {
        let t = target_report(&r1, child).unwrap();
        assert_eq!(
            (t["via"].as_str(), t["link_class"].as_str()),
            (Some(parent), Some(class)),
            "{r1}"
        );
        assert!(counter(t, "files_sent").unwrap() > 0, "{child}: {r1}");
    }
    assert_replicas_identical(&c);
    // The deploy barrier holds at once for the job's change set.
    let seq = r1["seq"].as_u64().unwrap();
    let (code, w) = c
        .cdctl_json(
            MASTER,
            &[
                "wait",
                "--seq",
                &seq.to_string(),
                "--timeout",
                "30",
                "--json",
            ],
            Duration::from_secs(60),
        )
        .unwrap();
    assert_eq!((code, &w["consistent"]), (0, &Value::Bool(true)), "{w}");

    // 2. Kill a head: its group mate takes over, the others are unaffected.
    c.kill("node2", SIGKILL).unwrap();
    let r = wait_routes(&c, "node3 under the source", |r| {
        parent_of(r, "node3").as_deref() == Some("node1") && parent_of(r, "node2").is_none()
    });
    assert!(
        r["unreached"]
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u["node"] == "node2"),
        "{r}"
    );
    mutate(&source, &MutateSpec::new(3, 3)).unwrap();
    let out = c.try_sync().unwrap();
    let r2 = out.report;
    assert_eq!(target_report(&r2, "node3").unwrap()["via"], "node1", "{r2}");
    assert_eq!(target_report(&r2, "node3").unwrap()["ok"], true, "{r2}");
    assert_eq!(target_report(&r2, "node2").unwrap()["ok"], false, "{r2}");
    for t in ["node3", "node4", "node5", "node6", "node7"] {
        assert_identical(&source, &c.root(t).unwrap());
    }
    // The barrier names the laggard and times out.
    let seq2 = r2["seq"].as_u64().unwrap();
    let (code, w) = c
        .cdctl_json(
            MASTER,
            &[
                "wait",
                "--seq",
                &seq2.to_string(),
                "--timeout",
                "1",
                "--json",
            ],
            Duration::from_secs(60),
        )
        .unwrap();
    assert_eq!(code, 1, "{w}");
    assert_eq!(w["behind"][0]["target"], "node2", "{w}");

    // 3. node2 comes back behind: it catches up from its group mate, then heads again.
    c.restart("node2").unwrap();
    wait_identical(&c, Duration::from_secs(60), "node2 caught up");
    let (code, w) = c
        .cdctl_json(
            MASTER,
            &[
                "wait",
                "--seq",
                &seq2.to_string(),
                "--timeout",
                "60",
                "--json",
            ],
            Duration::from_secs(90),
        )
        .unwrap();
    assert_eq!(code, 0, "{w}");
    wait_routes(&c, "node2 heading east-a again", |r| {
        parent_of(r, "node2").as_deref() == Some("node1")
            && parent_of(r, "node3").as_deref() == Some("node2")
    });
    let ev = master_events(&c);
    let find = |kind: &str, node: &str| {
        ev.iter()
            .find(|e| e["kind"] == kind && e["node"] == node)
            .unwrap_or_else(|| panic!("no {kind} event for {node}: {ev:#?}"))
            .clone()
    };
    find("node_down", "node2");
    find("reroute", "node3");
    // An operator's catch-up of a node that is current: a full reconcile from its
    // parent, then done.
    let (code, v) = c
        .cdctl_json(
            MASTER,
            &["catchup", "node5", "--json"],
            Duration::from_secs(30),
        )
        .unwrap();
    assert_eq!((code, &v["started"]), (0, &Value::from(1)), "{v}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !master_events(&c)
        .iter()
        .any(|e| e["kind"] == "catch_up_done" && e["node"] == "node5")
    {
        assert!(
            Instant::now() < deadline,
            "`cdctl catchup node5` never finished: {:#?}",
            master_events(&c)
        );
        thread::sleep(Duration::from_millis(100));
    }
    find("catch_up_waiting", "node2");
    find("catch_up_done", "node2");
    let caught = find("reroute", "node2");
    // While catching up node2 hung off its group mate (a same-group link). node2
    // reports what it holds before it answers node3, so node3 may record the link a
    // moment after the master saw the catch-up done.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let links = c.status("node3").unwrap()["node"]["transport"]["links"].clone();
        let served = links
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["peer"] == "node2" && l["side"] == "source" && l["ok"] == true);
        if served {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node3 never sent to node2; events: {ev:#?}; last reroute: {caught}; node3's links: {links}{}",
            c.diagnostics()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// Per-data-kind targeting: an image server holds only the images of the set, and
/// keeps its own other files; it never relays (it lacks what the others need).
#[test]
fn a_target_gets_only_its_data_kinds() {
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = ClusterSpec::new(4, tmp.path(), &cdd(), &cdctl());
    spec.set_lines = [
        "[master.content_sets.target_filters.node2]",
        "include = [\"*.jpg\"]",
    ]
    .map(str::to_owned)
    .to_vec();
    let c = Cluster::start(spec).unwrap_or_else(|e| panic!("{e:#}"));
    let source = c.root(c.source()).unwrap();
    fs::create_dir_all(source.join("img/a")).unwrap();
    fs::write(source.join("img/a/x.jpg"), noise(5, 70_000)).unwrap();
    fs::write(source.join("img/a/x.html"), b"<p>x</p>").unwrap();
    fs::write(source.join("index.html"), b"<p>home</p>").unwrap();
    let own = c.root("node2").unwrap().join("local.txt");
    fs::write(&own, b"the image server's own file").unwrap();
    let r = wait_routes(&c, "every target routed", |r| {
        r["edges"].as_array().is_some_and(|e| e.len() == 3)
    });
    assert!(
        r["edges"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["parent"] != "node2"),
        "node2 relays: {r}"
    );
    sync_ok(&c);
    for t in ["node3", "node4"] {
        assert_identical(&source, &c.root(t).unwrap());
    }
    let img = c.root("node2").unwrap();
    assert_eq!(fs::read(img.join("img/a/x.jpg")).unwrap(), noise(5, 70_000));
    assert!(!img.join("img/a/x.html").exists() && !img.join("index.html").exists());
    assert!(own.exists(), "the image server's own file was removed");
}

/// The master's job-log events (`cdctl events`), newest first.
fn logged_events(c: &Cluster) -> Vec<Value> {
    let (code, v) = c
        .cdctl_json(
            MASTER,
            &["events", "--limit", "1000", "--json"],
            Duration::from_secs(30),
        )
        .unwrap();
    assert_eq!(code, 0, "{v}");
    v.as_array().cloned().unwrap_or_default()
}

/// Waits until the job log holds an event of `kind` about `node` whose detail
/// contains `detail`; returns it.
fn wait_event(c: &Cluster, kind: &str, node: &str, detail: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ev = logged_events(c);
        if let Some(e) = ev.iter().find(|e| {
            e["kind"] == kind
                && e["node"] == node
                && e["detail"].as_str().is_some_and(|d| d.contains(detail))
        }) {
            return e.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no `{kind}` event of {node} with `{detail}`: {ev:#?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// Writes `text` to `path` whole (a reader never sees half of it).
fn write_whole(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).unwrap();
    fs::rename(&tmp, path).unwrap();
}

/// A stand-in for a node's service: a listener that accepts (and drops) every
/// connection until it is dropped, which closes the port. It must accept: a listener
/// that never does fills its backlog with the master's checks and then stops
/// answering, which is a hung service, not a healthy one.
struct Service {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Service {
    fn start(addr: (std::net::IpAddr, u16)) -> Service {
        let l = std::net::TcpListener::bind(addr).unwrap();
        l.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let halt = stop.clone();
        let thread = thread::spawn(move || {
            while !halt.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => panic!("service {addr:?}: accept: {e}"),
                }
            }
        });
        Service {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The server monitor feeds routing: node2 heads group `web` until its load (read by
/// its monitor from a proc directory the test controls) crosses the group's
/// threshold; the master then routes around it (a `degraded` event, a
/// `ThresholdCrossed` alert), a sync still reaches everyone, and when the load falls
/// below `clear_below` node2 heads again and the alert resolves. Then the same with
/// the master's TCP check of a service port that stops and starts answering.
#[test]
fn monitor_routes_around_a_loaded_or_failing_node_and_back() {
    use cd_testkit::cluster::Placement;
    use std::net::{IpAddr, Ipv4Addr};

    let tmp = tempfile::tempdir().unwrap();
    // node2 lives on its own loopback address, so that the port check of node2 alone
    // can fail; the others share 127.0.0.1.
    let node2_ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let port = cd_testkit::cluster::free_port().unwrap();
    let shared = Service::start((IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    let mut node2_service = Some(Service::start((node2_ip, port)));

    // Each web node's monitor reads its own directory: copies of this machine's proc
    // files, with a load average the test sets. (This machine's own load1 is no
    // fixture: a busy CI runner passes 4.0 and would degrade node3 and node4.)
    let fake_proc = |name: &str| {
        let dir = tmp.path().join(format!("proc-{name}"));
        fs::create_dir_all(dir.join("net")).unwrap();
        for f in ["stat", "meminfo", "net/tcp", "net/tcp6"] {
            if let Ok(text) = fs::read_to_string(Path::new("/proc").join(f)) {
                fs::write(dir.join(f), text).unwrap();
            }
        }
        write_whole(&dir.join("loadavg"), "0.50 0.40 0.30 1/100 1\n");
        dir
    };
    let proc2 = fake_proc("node2");
    let loadavg = proc2.join("loadavg");

    let mut spec = ClusterSpec::new(4, tmp.path(), &cdd(), &cdctl());
    spec.server("node1", "east", "src", 1);
    spec.server("node2", "east", "web", 2);
    spec.server("node3", "east", "web", 1);
    spec.server("node4", "east", "web", 1);
    spec.master_lines.extend([
        "[master.monitor]".to_owned(),
        // Silence fails after three intervals: 1 s leaves room for a busy runner.
        "interval = \"1s\"".to_owned(),
        format!("service_ports = [{port}]"),
        "check_timeout = \"1s\"".to_owned(),
        // As root the master pings every node; without root it says so and does
        // not ping (never blaming the node).
        "icmp = true".to_owned(),
        "[[master.monitor.thresholds]]".to_owned(),
        "group = \"web\"".to_owned(),
        "metric = \"load1\"".to_owned(),
        "above = 4.0".to_owned(),
        "clear_below = 2.0".to_owned(),
        "action = \"route_around\"".to_owned(),
    ]);
    for name in ["node2", "node3", "node4"] {
        let dir = if name == "node2" {
            proc2.clone()
        } else {
            fake_proc(name)
        };
        spec.node_lines.insert(
            name.into(),
            vec![format!("monitor_proc_root = {:?}", dir.to_str().unwrap())],
        );
    }
    spec.placements.insert(
        "node2".into(),
        Placement {
            ip: node2_ip,
            launcher: Vec::new(),
        },
    );
    let c = Cluster::start(spec).unwrap_or_else(|e| panic!("{e:#}"));
    let source = c.root(c.source()).unwrap();
    generate(&source, &TreeSpec::new(60, 3)).unwrap();

    let node2_heads = |r: &Value| {
        parent_of(r, "node2").as_deref() == Some("node1")
            && parent_of(r, "node3").as_deref() == Some("node2")
            && parent_of(r, "node4").as_deref() == Some("node2")
    };
    let routed_around = |r: &Value| {
        r["edges"].as_array().is_some_and(|e| e.len() == 3)
            && parent_of(r, "node3").is_some_and(|p| p != "node2")
            && parent_of(r, "node4").is_some_and(|p| p != "node2")
            && parent_of(r, "node2").is_some()
    };
    wait_routes(&c, "node2 heading web", node2_heads);

    // The monitor's samples reach the master: node2's load is what the test wrote.
    let deadline = Instant::now() + Duration::from_secs(30);
    let h = loop {
        let (code, h) = c
            .cdctl_json(
                MASTER,
                &["health", "node2", "--json"],
                Duration::from_secs(30),
            )
            .unwrap();
        assert_eq!(code, 0, "{h}");
        let n = &h["nodes"][0];
        let check_ok = |name: &str| {
            n["checks"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|x| x["check"] == name && x["ok"] == true)
        };
        let port_ok = check_ok(&format!("tcp:{port}"));
        let icmp_ok = check_ok("icmp") || !cd_testkit::is_root();
        if n["sample"]["load1"] == 0.5
            && port_ok
            && icmp_ok
            && n["history"]["samples"].as_u64() > Some(0)
        {
            break h;
        }
        assert!(Instant::now() < deadline, "no sample of node2 yet: {h}");
        thread::sleep(Duration::from_millis(100));
    };
    let n2 = &h["nodes"][0];
    assert_eq!(n2["node"], "node2", "{h}");
    assert_eq!(n2["group"], "web", "{h}");
    assert_eq!(n2["sample"]["disks"][0]["content_set"], "www", "{h}");
    assert_eq!(n2["thresholds"][0]["firing"], false, "{h}");
    assert!(n2["degraded"].as_object().unwrap().is_empty(), "{h}");

    // 1. node2's load crosses the threshold: routed around, still receiving.
    write_whole(&loadavg, "9.00 3.00 1.00 5/100 1\n");
    let r = wait_routes(&c, "node2 routed around", routed_around);
    assert!(
        r["degraded"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["node"] == "node2" && d["causes"]["threshold:load1"].is_string()),
        "{r}"
    );
    wait_event(&c, "degraded", "node2", "threshold:load1");
    // `cdctl status` shows why, node by node.
    let st = c.status(MASTER).unwrap();
    let degraded_of = |name: &str| {
        st["master"]["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == name)
            .map(|n| n["degraded"].clone())
            .unwrap()
    };
    assert!(degraded_of("node2")["threshold:load1"].is_string(), "{st}");
    assert_eq!(degraded_of("node3"), serde_json::json!({}), "{st}");
    wait_event(
        &c,
        "alert_firing",
        "node2",
        "ThresholdCrossed node=node2 metric=load1",
    );
    let r1 = sync_ok(&c);
    for t in c.targets() {
        let e = target_report(&r1, &t).unwrap();
        assert_eq!(e["ok"], true, "{t}: {r1}");
        assert_ne!(
            e["via"], "node2",
            "{t} got it through the loaded node2: {r1}"
        );
    }
    assert_replicas_identical(&c);

    // Between clear_below and above: still routed around (hysteresis).
    write_whole(&loadavg, "3.00 3.00 1.00 5/100 1\n");
    thread::sleep(Duration::from_secs(2));
    let r = routes(&c);
    assert!(routed_around(&r), "{r}");

    // 2. Below clear_below: node2 heads again, the alert resolves.
    write_whole(&loadavg, "1.00 2.00 1.00 1/100 1\n");
    wait_routes(&c, "node2 heading web again", node2_heads);
    wait_event(&c, "recovered", "node2", "threshold:load1 cleared");
    wait_event(
        &c,
        "alert_resolved",
        "node2",
        "ThresholdCrossed node=node2 metric=load1",
    );

    // 3. node2's service port stops answering: the master's TCP check fails.
    drop(node2_service.take());
    let check = format!("tcp:{port}");
    wait_routes(&c, "node2 routed around for its port", routed_around);
    wait_event(&c, "degraded", "node2", &format!("check:{check}"));
    wait_event(
        &c,
        "alert_firing",
        "node2",
        &format!("CheckFailed node=node2 check={check}"),
    );
    let (_, h) = c
        .cdctl_json(MASTER, &["health", "--json"], Duration::from_secs(30))
        .unwrap();
    let n2 = h["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == "node2")
        .unwrap();
    assert!(n2["degraded"][format!("check:{check}")].is_string(), "{h}");
    // The other nodes answer on 127.0.0.1: not routed around.
    for other in ["node3", "node4"] {
        let n = h["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node"] == other)
            .unwrap();
        assert!(n["degraded"].as_object().unwrap().is_empty(), "{h}");
    }
    mutate(&source, &MutateSpec::new(5, 3)).unwrap();
    let r2 = sync_ok(&c);
    for t in c.targets() {
        assert_ne!(target_report(&r2, &t).unwrap()["via"], "node2", "{r2}");
    }
    assert_replicas_identical(&c);

    // 4. It answers again: node2 heads again, the check's alert resolves.
    let _back = Service::start((node2_ip, port));
    wait_routes(&c, "node2 heading after its port answers", node2_heads);
    wait_event(&c, "recovered", "node2", &format!("check:{check} cleared"));
    wait_event(
        &c,
        "alert_resolved",
        "node2",
        &format!("CheckFailed node=node2 check={check}"),
    );
    fs::write(source.join("after-recovery.bin"), noise(7, 200_000)).unwrap();
    let r3 = sync_ok(&c);
    for t in ["node3", "node4"] {
        assert_eq!(target_report(&r3, t).unwrap()["via"], "node2", "{r3}");
    }
    assert_replicas_identical(&c);

    // The human form names the node and its load.
    let out = run(
        {
            let mut cmd = Command::new(cdctl());
            cmd.arg("--socket")
                .arg(c.socket(MASTER).unwrap())
                .args(["health", "node2"]);
            cmd
        },
        Duration::from_secs(30),
    )
    .unwrap();
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        out.stdout.contains("node2 (group web): ok"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("load 1.00"), "{}", out.stdout);
    drop(shared);
}

/// A source, one relay and its group mate: node1 → node2 (`same_region`, paced to
/// `rate` bytes/s) → node3 (`same_group`, unpaced).
fn relay_chain(dir: &Path, rate: u64) -> Cluster {
    let mut spec = ClusterSpec::new(3, dir, &cdd(), &cdctl());
    spec.server("node1", "east", "east-src", 1);
    spec.server("node2", "east", "east-a", 2);
    spec.server("node3", "east", "east-a", 1);
    spec.master_lines.extend([
        "[master.link_classes.same_region]".to_owned(),
        format!("max_rate_bytes_per_sec = {rate}"),
    ]);
    let c = Cluster::start(spec).unwrap_or_else(|e| panic!("{e:#}"));
    wait_routes(&c, "node3 behind node2", |r| {
        parent_of(r, "node2").as_deref() == Some("node1")
            && parent_of(r, "node3").as_deref() == Some("node2")
    });
    c
}

/// Polls until `stage` (a `.cdsync/stage` directory) holds a file of `len` bytes:
/// a file completely received, staged for its apply. Returns whether it was seen
/// before `sync` finished.
fn wait_for_complete_stage(
    stage: &Path,
    len: u64,
    sync: &mut cd_testkit::cluster::BackgroundSync,
) -> bool {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if files_under(stage).iter().any(|(_, l)| *l == len) {
            return true;
        }
        if sync.is_finished().unwrap() {
            return false;
        }
        thread::sleep(Duration::from_millis(2));
    }
    false
}

/// Files of `root` outside `.cdsync`, by relative path, with their content.
fn content_of(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v: Vec<_> = files_under(root)
        .into_iter()
        .map(|(p, _)| p.strip_prefix(root).unwrap().to_path_buf())
        .filter(|p| !p.starts_with(".cdsync"))
        .map(|p| {
            let data = fs::read(root.join(&p)).unwrap();
            (p, data)
        })
        .collect();
    v.sort();
    v
}

/// Cut-through, shown by the order of events: with the source's uplink paced, the
/// relay's child holds a completely staged file of the change set while the relay
/// has not applied it yet (it applies only after it received every file); a
/// store-and-forward relay opens its child's transfer only after its own apply.
#[test]
fn relay_forwards_while_still_receiving() {
    const FILES: usize = 6;
    const LEN: usize = 512 * 1024;
    let tmp = tempfile::tempdir().unwrap();
    let c = relay_chain(tmp.path(), MIB as u64);
    let source = c.root("node1").unwrap();
    let relay = c.root("node2").unwrap();
    let child = c.root("node3").unwrap();
    fs::write(source.join("index.html"), b"<p>v1</p>").unwrap();
    // A file every replica holds; a small change to it travels as a delta, which the
    // relay makes for its child from what it staged.
    let mut site = noise(77, 768 * 1024);
    fs::write(source.join("site.bin"), &site).unwrap();
    sync_ok(&c);
    assert_replicas_identical(&c);

    fs::create_dir(source.join("big")).unwrap();
    for i in 0..FILES {
        fs::write(source.join(format!("big/f{i}.bin")), noise(i as u64, LEN)).unwrap();
    }
    rewrite(&mut site, 300 * 1024, 8 * 1024, 78);
    fs::write(source.join("site.bin"), &site).unwrap();
    let mut job = c.sync_background().unwrap();
    let seen = wait_for_complete_stage(&child.join(".cdsync/stage"), LEN as u64, &mut job);
    // Read after the child's stage: if the relay still lacks the files now, it had
    // not finished its own transfer when the child held one of them.
    let relay_has: Vec<bool> = (0..FILES)
        .map(|i| relay.join(format!("big/f{i}.bin")).exists())
        .collect();
    let out = job.wait().unwrap();
    assert!(
        seen,
        "node3 never held a staged file while the job ran: {}",
        out.report
    );
    assert!(
        relay_has.iter().all(|h| !h),
        "node3 staged a file only after node2 applied ({relay_has:?}): the relay stored \
         and forwarded; {}",
        out.report
    );
    assert_eq!(out.exit_code, 0, "{}", out.report);
    let t = out.target("node3").unwrap();
    assert_eq!(
        (t["via"].as_str(), t["ok"].as_bool()),
        (Some("node2"), Some(true)),
        "{}",
        out.report
    );
    assert_eq!(
        counter(t, "files_sent").unwrap(),
        FILES as u64 + 1,
        "{}",
        out.report
    );
    assert_eq!(counter(t, "delta_files").unwrap(), 1, "{}", out.report);
    assert!(
        counter(t, "patch_bytes").unwrap() < 64 * 1024,
        "{}",
        out.report
    );
    assert_replicas_identical(&c);
    for stage in [&relay, &child] {
        assert!(
            files_under(&stage.join(".cdsync/stage")).is_empty(),
            "stage leftovers under {}",
            stage.display()
        );
    }
}

/// The source dies while the relay is forwarding what it received so far: the
/// relay's transfer fails, so its child's transfer is aborted and neither applies
/// anything; the next sync converges.
#[test]
fn relay_upstream_cut_leaves_children_unchanged() {
    const FILES: usize = 8;
    const LEN: usize = 512 * 1024;
    let tmp = tempfile::tempdir().unwrap();
    let mut c = relay_chain(tmp.path(), MIB as u64);
    let source = c.root("node1").unwrap();
    let relay = c.root("node2").unwrap();
    let child = c.root("node3").unwrap();
    fs::create_dir(source.join("big")).unwrap();
    for i in 0..FILES {
        fs::write(
            source.join(format!("big/f{i}.bin")),
            noise(i as u64, LEN / 4),
        )
        .unwrap();
    }
    sync_ok(&c);
    assert_replicas_identical(&c);
    let before = content_of(&child);

    for i in 0..FILES {
        fs::write(
            source.join(format!("big/f{i}.bin")),
            noise(100 + i as u64, LEN),
        )
        .unwrap();
    }
    fs::write(source.join("new.html"), b"<p>new</p>").unwrap();
    let mut job = c.sync_background().unwrap();
    let child_stage = child.join(".cdsync/stage");
    assert!(
        wait_for_complete_stage(&child_stage, LEN as u64, &mut job),
        "node3 never held a staged file while the job ran: {:?}",
        job.wait().map(|o| o.report)
    );
    c.kill("node1", SIGKILL).unwrap();
    // The job fails: its source is gone (`cdctl` reports no JSON then).
    match job.wait() {
        Ok(out) => assert_ne!(out.exit_code, 0, "{}", out.report),
        Err(e) => assert!(format!("{e:#}").contains("disconnected"), "{e:#}"),
    }

    // The child's transfer ends (its stage goes) without applying anything.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !files_under(&child_stage).is_empty() {
        assert!(
            Instant::now() < deadline,
            "node3's aborted transfer never ended{}",
            c.diagnostics()
        );
        thread::sleep(Duration::from_millis(20));
    }
    for (name, root) in [("node3", &child), ("node2", &relay)] {
        let now = content_of(root);
        let changed: Vec<_> = now
            .iter()
            .filter(|f| !before.contains(f))
            .map(|f| f.0.clone())
            .collect();
        assert!(
            now.len() == before.len() && changed.is_empty(),
            "{name} applied part of a transfer whose upstream was cut: {changed:?}{}",
            c.diagnostics()
        );
    }

    c.restart("node1").unwrap();
    let r = sync_ok(&c);
    assert_eq!(target_report(&r, "node3").unwrap()["via"], "node2", "{r}");
    assert_replicas_identical(&c);
}

/// Every node's tree of an N:M set is the same (compared with the first), within `limit`.
fn wait_all_identical(c: &Cluster, limit: Duration, what: &str) {
    let nodes = c.nodes();
    wait_same_as(c, &nodes[0], &nodes[1..], limit, what);
}

/// The real-time rounds in the master's job log, and the change-set numbers the two
/// editors have used: what keeps growing if writes ping-pong between sources.
fn nm_activity(c: &Cluster) -> (usize, Vec<Value>) {
    let jobs = master_json(c, &["jobs", "--limit", "10000"]);
    let rounds = jobs
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["kind"] == "realtime")
        .count();
    let seqs = ["node1", "node2"]
        .iter()
        .map(|n| {
            let st = c.status(n).unwrap();
            st["node"]["content_sets"].clone()
        })
        .collect();
    (rounds, seqs)
}

/// An N:M member's newest change-set number (`cdctl status`).
fn nm_seq(c: &Cluster, n: &str) -> u64 {
    let st = c.status(n).unwrap();
    st["node"]["content_sets"][0]["nm"]["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("no N:M seq in {st}"))
}

/// `cdctl wait www --timeout SECS --json` on the master: exit code and answer.
fn nm_wait(c: &Cluster, secs: &str) -> (i32, Value) {
    c.cdctl_json(
        MASTER,
        &["wait", "www", "--timeout", secs, "--json"],
        Duration::from_secs(120),
    )
    .unwrap()
}

/// N:M: two editors' servers (`node1`, `node2`) both write one content set in real
/// time; `node3` is a plain target. Independent writes reach everyone; concurrent
/// writes to one path end with the same winner everywhere and a `conflict` in the
/// master's job log; a delete racing a modify resolves the same way everywhere; and
/// once quiet, nothing keeps travelling (no echo ping-pong).
#[test]
fn nm_editors_converge_last_writer_wins() {
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = ClusterSpec::new(3, tmp.path(), &cdd(), &cdctl());
    spec.mode = Some("realtime");
    spec.sources = 2;
    let mut c = Cluster::start(spec).unwrap_or_else(|e| panic!("cluster did not start: {e:#}"));
    let (r1, r2, r3) = (
        c.root("node1").unwrap(),
        c.root("node2").unwrap(),
        c.root("node3").unwrap(),
    );
    // The editors start their streams (a full round each) once assigned.
    thread::sleep(Duration::from_secs(2));

    // (a) Independent writes on each editor reach every node.
    fs::create_dir(r1.join("docs")).unwrap();
    fs::write(r1.join("docs/one.html"), b"written on node1").unwrap();
    fs::write(r2.join("two.html"), noise(2, 300_000)).unwrap();
    wait_all_identical(&c, Duration::from_secs(60), "independent writes");
    assert_eq!(
        fs::read(r3.join("docs/one.html")).unwrap(),
        b"written on node1"
    );
    assert_eq!(fs::read(r1.join("two.html")).unwrap(), noise(2, 300_000));
    // A file created in a directory that arrived earlier moves the directory's mtime
    // on its editor: that travels too (it is not mistaken for an echo).
    fs::create_dir(r2.join("media")).unwrap();
    wait_all_identical(&c, Duration::from_secs(60), "a new directory");
    thread::sleep(Duration::from_millis(1100));
    fs::write(r2.join("media/logo.png"), noise(4, 1000)).unwrap();
    wait_all_identical(&c, Duration::from_secs(60), "a file in it, later");
    // A write on one editor over what came from the other is an ordinary update.
    fs::write(r1.join("two.html"), b"node1 edits node2's page").unwrap();
    wait_all_identical(&c, Duration::from_secs(60), "update of a remote write");
    assert_eq!(
        fs::read(r2.join("two.html")).unwrap(),
        b"node1 edits node2's page"
    );

    // (b) Concurrent writes of one path on both editors: one winner everywhere.
    let a = b"node1's version of the shared page".to_vec();
    let b = b"node2's version of the shared page, longer".to_vec();
    fs::write(r1.join("shared.html"), &a).unwrap();
    fs::write(r2.join("shared.html"), &b).unwrap();
    wait_all_identical(&c, Duration::from_secs(60), "concurrent writes");
    let winner = fs::read(r3.join("shared.html")).unwrap();
    assert!(winner == a || winner == b, "a winner, not a mix");
    let deadline = Instant::now() + Duration::from_secs(30);
    let conflict = loop {
        let events = master_json(&c, &["events", "--limit", "1000"]);
        let found = events.as_array().unwrap().iter().find(|e| {
            e["kind"] == "conflict"
                && e["detail"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("shared.html")
        });
        if let Some(e) = found {
            break e.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no conflict for shared.html in the job log: {events}\n{}",
            c.diagnostics()
        );
        thread::sleep(Duration::from_millis(200));
    };
    // The event names the winner's origin first: the one whose content everyone holds.
    let detail = conflict["detail"].as_str().unwrap().to_owned();
    let winner_origin = if winner == a { "node1@" } else { "node2@" };
    assert!(
        detail.starts_with(&format!("shared.html: {winner_origin}")),
        "{detail} (content everywhere is {winner_origin}'s)"
    );

    // (c) A delete on one editor racing a modify on the other: the same everywhere.
    fs::write(r1.join("contested.html"), b"first").unwrap();
    wait_all_identical(&c, Duration::from_secs(60), "contested page created");
    fs::remove_file(r1.join("contested.html")).unwrap();
    fs::write(r2.join("contested.html"), b"node2 keeps editing").unwrap();
    wait_all_identical(&c, Duration::from_secs(60), "delete versus modify");
    let left = [&r1, &r2, &r3].map(|r| fs::read(r.join("contested.html")).ok());
    assert!(
        left.iter().all(|x| *x == left[0])
            && (left[0].is_none() || left[0].as_deref() == Some(&b"node2 keeps editing"[..])),
        "{left:?}"
    );

    // (d) No echoes: a write on one editor makes the other ship nothing (it applies
    // the write and its capture sees it, but it is not its own write).
    let seq = |n: &str| nm_seq(&c, n);
    thread::sleep(Duration::from_secs(2));
    for (writer, other, root) in [("node1", "node2", &r1), ("node2", "node1", &r2)] {
        let (w0, o0) = (seq(writer), seq(other));
        fs::write(root.join(format!("from-{writer}.html")), noise(9, 50_000)).unwrap();
        fs::create_dir_all(root.join(format!("dir-{writer}/sub"))).unwrap();
        fs::write(root.join(format!("dir-{writer}/sub/f")), b"x").unwrap();
        wait_all_identical(&c, Duration::from_secs(60), "a write to echo");
        thread::sleep(Duration::from_secs(2));
        assert!(seq(writer) > w0, "{writer} shipped its write");
        assert_eq!(seq(other), o0, "{other} re-shipped {writer}'s write");
    }
    // And once quiet, no more rounds and no more change sets.
    thread::sleep(Duration::from_secs(1));
    let before = nm_activity(&c);
    thread::sleep(Duration::from_secs(4));
    let after = nm_activity(&c);
    assert_eq!(before.0, after.0, "real-time rounds kept coming");
    assert_eq!(before.1, after.1, "the editors kept shipping change sets");
    wait_all_identical(&c, Duration::from_secs(1), "still identical");

    // (e) An editor that comes back with an older tree (killed, so it reconciles in
    // full) converges instead of clobbering: its full rounds do not remove or revert
    // what the other wrote meanwhile, and it gets those writes.
    c.kill("node1", SIGKILL).unwrap();
    wait_disconnected(&c, "node1");
    fs::write(r2.join("while-away.html"), b"new on node2").unwrap();
    fs::write(r2.join("docs/one.html"), b"node2 rewrote it meanwhile").unwrap();
    fs::remove_file(r2.join("from-node1.html")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while fs::read(r3.join("docs/one.html")).unwrap_or_default() != b"node2 rewrote it meanwhile"
        || !r3.join("while-away.html").exists()
        || r3.join("from-node1.html").exists()
    {
        assert!(
            Instant::now() < deadline,
            "node3 did not get node2's writes"
        );
        thread::sleep(Duration::from_millis(50));
    }
    c.restart("node1").unwrap();
    wait_all_identical(&c, Duration::from_secs(60), "editor back after a crash");
    for r in [&r1, &r2, &r3] {
        assert_eq!(
            fs::read(r.join("docs/one.html")).unwrap(),
            b"node2 rewrote it meanwhile"
        );
        assert_eq!(
            fs::read(r.join("while-away.html")).unwrap(),
            b"new on node2"
        );
        assert!(!r.join("from-node1.html").exists(), "a delete was undone");
    }

    // (f) A dry run of the N:M set plans last-writer-wins from the first source and
    // changes nothing: node3's stray file (no version anywhere) would be removed,
    // node2's newer page would not be reverted. The real sync then does just that.
    fs::write(r3.join("stray.html"), b"not from any editor").unwrap();
    let dry = master_json(&c, &["sync", "--dry-run", "www"]);
    assert_eq!(dry["ok"], true, "{dry}");
    let planned = |t: &str| {
        dry["targets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["target"] == t)
            .unwrap_or_else(|| panic!("no plan for {t}: {dry}"))["planned"]
            .clone()
    };
    let p3 = planned("node3");
    assert_eq!(p3["removed"], serde_json::json!(["stray.html"]), "{dry}");
    assert_eq!(p3["files_count"], 0, "{dry}");
    let p2 = planned("node2");
    assert_eq!(
        (&p2["files_count"], &p2["removed_count"]),
        (&serde_json::json!(0), &serde_json::json!(0)),
        "{dry}"
    );
    thread::sleep(Duration::from_secs(1));
    assert_eq!(
        fs::read(r3.join("stray.html")).unwrap(),
        b"not from any editor",
        "the dry run changed node3"
    );
    sync_ok(&c);
    assert!(
        !r3.join("stray.html").exists(),
        "the sync kept the stray file"
    );
    wait_all_identical(&c, Duration::from_secs(60), "after the N:M sync");

    // (g) The deploy barrier of an N:M set: every member holds every source's newest
    // change set. It holds now; with node3 down and a new write on node1 it does not
    // (and says who is behind); once node3 is back it holds, and node3 has the write.
    let (code, w) = nm_wait(&c, "60");
    assert_eq!((code, &w["consistent"]), (0, &Value::Bool(true)), "{w}");
    assert_eq!(w["targets"], 3, "{w}");
    for s in ["node1", "node2"] {
        assert!(w["sources_seq"][s].is_u64(), "{w}");
    }
    c.kill("node3", SIGKILL).unwrap();
    wait_disconnected(&c, "node3");
    let before = nm_seq(&c, "node1");
    fs::write(r1.join("barrier.html"), b"written while node3 was down").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while nm_seq(&c, "node1") <= before {
        assert!(Instant::now() < deadline, "node1 did not ship its write");
        thread::sleep(Duration::from_millis(50));
    }
    let shipped = nm_seq(&c, "node1");
    // The master learns node1's newest from its progress report.
    let w = loop {
        let (code, w) = nm_wait(&c, "1");
        if w["sources_seq"]["node1"].as_u64() >= Some(shipped) {
            assert_eq!(code, 1, "{w}");
            break w;
        }
        assert!(
            Instant::now() < deadline,
            "the master never saw {shipped}: {w}"
        );
    };
    assert_eq!(w["consistent"], false, "{w}");
    let node3 = w["behind"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["target"] == "node3")
        .unwrap_or_else(|| panic!("node3 is not behind: {w}"));
    assert_eq!(node3["connected"], false, "{w}");
    // Sequence numbers are per source: --seq names nothing in an N:M set.
    let mut cmd = Command::new(cdctl());
    cmd.arg("--socket").arg(c.socket(MASTER).unwrap()).args([
        "wait",
        "www",
        "--seq",
        "1",
        "--timeout",
        "5",
    ]);
    let out = run(cmd, Duration::from_secs(60)).unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert!(out.stderr.contains("N:M content set"), "{out:?}");
    c.restart("node3").unwrap();
    let (code, w) = c
        .cdctl_json(
            MASTER,
            &["wait", "www", "--timeout", "90", "--json"],
            Duration::from_secs(120),
        )
        .unwrap();
    assert_eq!((code, &w["consistent"]), (0, &Value::Bool(true)), "{w}");
    assert_eq!(
        fs::read(r3.join("barrier.html")).unwrap(),
        b"written while node3 was down",
        "the barrier held before node3 had the write"
    );
}
