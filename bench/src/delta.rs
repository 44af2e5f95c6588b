//! `bench delta`: the delta engine of `cd_core::delta` on one large file, single
//! threaded, beside rsync's own delta transfer on the same files.
//!
//! A seeded pseudo-random base of `--size` bytes (default 1 GiB) is written, with three
//! targets: the base unchanged, the base with 1 MiB overwritten in the middle, and a
//! fully different file. Measured:
//!
//! 1. the weak checksum alone (vectorised and scalar) and the signature of the base
//!    ([`SignatureBuilder`]: weak sum, BLAKE3-128 per block, BLAKE3-256 of the whole);
//! 2. per target, the search ([`Generator`], index build included) and, separately,
//!    applying the ops as they come out (copy ranges from the base file, write the
//!    output file, hash it, compare with the target hash at the end);
//! 3. per target, `rsync -a -I --no-whole-file --stats` from a directory holding the
//!    target to one holding the base (rsync's local delta path: its generator
//!    checksums the base, its sender searches, its receiver rebuilds), wall time and
//!    the literal / matched bytes it reports.
//!
//! Engine times count only the engine's calls (reads come from the page cache and are
//! not counted); rsync's wall time counts everything it does, in its two or three
//! processes. The ratio compares rsync's wall with signature + search + apply.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use cd_core::delta::rolling::Weak;
use cd_core::delta::{DeltaStats, Generator, Op, Signature, SignatureBuilder};
use cd_testkit::human_bytes;

use crate::USAGE;
use crate::args::Options;
use crate::table::Table;

/// Options of `bench delta`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    /// Bytes of the base and of each target.
    pub size: u64,
    /// Seed of the content.
    pub seed: u64,
    /// Working directory (kept); `None`: a temporary one.
    pub dir: Option<PathBuf>,
    /// Skip the rsync runs.
    pub no_rsync: bool,
}

impl Args {
    pub fn parse(args: &[String]) -> Result<Self> {
        let mut out = Self {
            size: 1 << 30,
            seed: 1,
            dir: None,
            no_rsync: false,
        };
        let mut o = Options::new(args, USAGE);
        while let Some(name) = o.next_name() {
            match name {
                "--size" => out.size = o.value(name)?,
                "--seed" => out.seed = o.value(name)?,
                "--dir" => out.dir = Some(o.value(name)?),
                "--no-rsync" => out.no_rsync = true,
                other => return Err(o.unknown(other)),
            }
        }
        ensure!(out.size >= 4 << 20, "--size must be at least 4 MiB");
        Ok(out)
    }
}

/// Bytes per read of the files (one io_uring-sized chunk).
const CHUNK: usize = 4 << 20;
/// Bytes changed in the middle of the base.
const EDIT: u64 = 1 << 20;

const CASES: [(&str, &str); 3] = [
    ("unchanged", "base.bin"),
    ("1 MiB changed", "mid.bin"),
    ("different", "diff.bin"),
];

pub fn run(args: &Args) -> Result<()> {
    let tmp;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
            d.clone()
        }
        None => {
            tmp = tempfile::Builder::new()
                .prefix("cdsync-bench-delta")
                .tempdir()
                .context("create a temporary directory")?;
            tmp.path().to_owned()
        }
    };
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "delta: {} base, seed {}, in {}; load average {}",
        human_bytes(args.size),
        args.seed,
        dir.display(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let t = Instant::now();
    write_files(&dir, args.size, args.seed)?;
    println!(
        "  wrote base and targets in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let base_path = dir.join("base.bin");

    let mib = args.size as f64 / f64::from(1 << 20);
    let (weak_fast, weak_scalar) = weak_alone(&base_path, args.size)?;
    let (sig, sig_time) = signature(&base_path, args.size)?;
    println!(
        "  block length {} B, {} blocks, signature {} encoded",
        sig.block_len(),
        sig.blocks().len(),
        human_bytes(sig.encoded_len() as u64)
    );
    let mut t1 = Table::new(vec!["per core".into(), "MiB/s".into()]);
    t1.row("weak checksum, vectorised", vec![rate(mib, weak_fast)]);
    t1.row("weak checksum, scalar", vec![rate(mib, weak_scalar)]);
    t1.row("signature (weak + BLAKE3)", vec![rate(mib, sig_time)]);
    print!("\n{}", t1.render());

    let rsync = if args.no_rsync {
        None
    } else {
        Some(ensure_rsync()?)
    };
    let mut head = vec![String::new()];
    head.extend(CASES.iter().map(|(n, _)| (*n).to_owned()));
    let mut t = Table::new(head);
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for (name, file) in CASES {
        let r = search_and_apply(&sig, &base_path, &dir.join(file), &dir.join("out.bin"))
            .with_context(|| format!("case {name}"))?;
        ours.push(r);
        if rsync.is_some() {
            theirs.push(run_rsync(&dir, file).with_context(|| format!("rsync, case {name}"))?);
        }
    }
    let row = |t: &mut Table, label: &str, f: &dyn Fn(&Run) -> String| {
        t.row(label, ours.iter().map(f).collect());
    };
    t.section("cdsync engine, 1 thread");
    row(&mut t, "  search MiB/s", &|r| rate(mib, r.search));
    row(&mut t, "  apply MiB/s", &|r| rate(mib, r.apply));
    row(&mut t, "  matched", &|r| human_bytes(r.stats.matched_bytes));
    row(&mut t, "  literal", &|r| human_bytes(r.stats.literal_bytes));
    row(&mut t, "  patch", &|r| human_bytes(r.stats.patch_bytes));
    row(&mut t, "  ops (copy / literal)", &|r| {
        format!("{} / {}", r.stats.copy_ops, r.stats.literal_ops)
    });
    row(&mut t, "  strong hashes (false)", &|r| {
        format!("{} ({})", r.stats.strong_hashes, r.stats.false_alarms)
    });
    row(&mut t, "  sig + search + apply s", &|r| {
        secs(sig_time + r.search + r.apply)
    });
    if !theirs.is_empty() {
        t.section("rsync -a -I --no-whole-file");
        let rrow = |t: &mut Table, label: &str, f: &dyn Fn(&RsyncRun) -> String| {
            t.row(label, theirs.iter().map(f).collect());
        };
        rrow(&mut t, "  wall s", &|r| secs(r.wall));
        rrow(&mut t, "  literal", &|r| human_bytes(r.literal));
        rrow(&mut t, "  matched", &|r| human_bytes(r.matched));
        rrow(&mut t, "  bytes sent", &|r| human_bytes(r.sent));
        t.row(
            "rsync wall / cdsync",
            theirs
                .iter()
                .zip(&ours)
                .map(|(r, o)| {
                    let ours = (sig_time + o.search + o.apply).as_secs_f64();
                    format!("{:.2}x", r.wall.as_secs_f64() / ours)
                })
                .collect(),
        );
        t.row(
            "rsync literal / cdsync patch",
            theirs
                .iter()
                .zip(&ours)
                .map(|(r, o)| {
                    format!(
                        "{:.2}x",
                        r.literal as f64 / o.stats.patch_bytes.max(1) as f64
                    )
                })
                .collect(),
        );
    }
    print!("\n{}", t.render());
    if let Some(v) = &rsync {
        println!("({v})");
    }
    Ok(())
}

fn rate(mib: f64, d: Duration) -> String {
    format!("{:.0}", mib / d.as_secs_f64().max(1e-9))
}

fn secs(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}

/// xorshift64*: fills `buf` (a multiple of 8 bytes) from `state`.
fn fill(state: &mut u64, buf: &mut [u8]) {
    for w in buf.chunks_exact_mut(8) {
        *state ^= *state >> 12;
        *state ^= *state << 25;
        *state ^= *state >> 27;
        w.copy_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
}

/// `base.bin`, `mid.bin` (1 MiB of other content at the middle), `diff.bin`.
fn write_files(dir: &Path, size: u64, seed: u64) -> Result<()> {
    let create = |n: &str| -> Result<BufWriter<File>> {
        let p = dir.join(n);
        Ok(BufWriter::with_capacity(
            CHUNK,
            File::create(&p).with_context(|| format!("create {}", p.display()))?,
        ))
    };
    let (mut base, mut mid, mut diff) =
        (create("base.bin")?, create("mid.bin")?, create("diff.bin")?);
    let (mut s1, mut s2, mut s3) = (seed | 1, seed.wrapping_add(0x9E37) | 1, !seed | 1);
    let edit_at = size / 2;
    let mut buf = vec![0u8; CHUNK];
    let mut other = vec![0u8; CHUNK];
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(CHUNK as u64) as usize;
        fill(&mut s1, &mut buf);
        base.write_all(&buf[..n])?;
        let (lo, hi) = (edit_at.max(off), (edit_at + EDIT).min(off + n as u64));
        if lo < hi {
            fill(&mut s2, &mut other);
            let (a, b) = ((lo - off) as usize, (hi - off) as usize);
            buf[a..b].copy_from_slice(&other[a..b]);
        }
        mid.write_all(&buf[..n])?;
        fill(&mut s3, &mut buf);
        diff.write_all(&buf[..n])?;
        off += n as u64;
    }
    for mut w in [base, mid, diff] {
        w.flush()?;
    }
    Ok(())
}

/// Calls `f` on each chunk of the file at `path`; returns the time spent in `f`.
fn each_chunk(path: &Path, size: u64, mut f: impl FnMut(&[u8])) -> Result<Duration> {
    let mut file = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut buf = vec![0u8; CHUNK];
    let mut spent = Duration::ZERO;
    let mut total = 0u64;
    loop {
        let mut n = 0;
        while n < buf.len() {
            let r = file.read(&mut buf[n..])?;
            if r == 0 {
                break;
            }
            n += r;
        }
        if n == 0 {
            break;
        }
        total += n as u64;
        let t = Instant::now();
        f(&buf[..n]);
        spent += t.elapsed();
    }
    ensure!(
        total == size,
        "{} has {total} bytes, not {size}",
        path.display()
    );
    Ok(spent)
}

/// The weak checksum alone over the base's blocks: vectorised, then scalar.
fn weak_alone(base: &Path, size: u64) -> Result<(Duration, Duration)> {
    let bl = cd_core::delta::block_len_for(size) as usize;
    let mut sink = 0u32;
    let fast = each_chunk(base, size, |c| {
        for b in c.chunks(bl) {
            sink ^= Weak::of(b).digest();
        }
    })?;
    let scalar = each_chunk(base, size, |c| {
        for b in c.chunks(bl) {
            sink ^= Weak::of_scalar(b).digest();
        }
    })?;
    std::hint::black_box(sink);
    Ok((fast, scalar))
}

fn signature(base: &Path, size: u64) -> Result<(Signature, Duration)> {
    let mut b = SignatureBuilder::new(size)?;
    let spent = each_chunk(base, size, |c| b.handle_data(c))?;
    let t = Instant::now();
    let sig = b.finish()?;
    Ok((sig, spent + t.elapsed()))
}

/// One target through the engine.
#[derive(Debug)]
struct Run {
    search: Duration,
    apply: Duration,
    stats: DeltaStats,
}

/// Applies ops to an output file as they come, reading copies from the base file.
struct Applier<'a> {
    base: &'a File,
    block_len: u64,
    base_len: u64,
    out: BufWriter<File>,
    hash: blake3::Hasher,
    buf: Vec<u8>,
    spent: Duration,
}

impl Applier<'_> {
    fn op(&mut self, op: &Op) -> Result<()> {
        let t = Instant::now();
        match op {
            Op::Copy { block, count } => {
                let mut off = u64::from(*block) * self.block_len;
                let end =
                    ((u64::from(*block) + u64::from(*count)) * self.block_len).min(self.base_len);
                while off < end {
                    let n = (end - off).min(self.buf.len() as u64) as usize;
                    self.base.read_exact_at(&mut self.buf[..n], off)?;
                    self.out.write_all(&self.buf[..n])?;
                    self.hash.update(&self.buf[..n]);
                    off += n as u64;
                }
            }
            Op::Literal(b) => {
                self.out.write_all(b)?;
                self.hash.update(b);
            }
        }
        self.spent += t.elapsed();
        Ok(())
    }
}

fn search_and_apply(sig: &Signature, base: &Path, target: &Path, out: &Path) -> Result<Run> {
    let base_file = File::open(base)?;
    let mut ap = Applier {
        base: &base_file,
        block_len: u64::from(sig.block_len()),
        base_len: sig.base().len,
        out: BufWriter::with_capacity(CHUNK, File::create(out)?),
        hash: blake3::Hasher::new(),
        buf: vec![0u8; CHUNK],
        spent: Duration::ZERO,
    };
    let t = Instant::now();
    let mut g = Generator::new(sig);
    let mut search = t.elapsed();
    let mut failed = None;
    each_chunk(target, sig.base().len, |c| {
        let t = Instant::now();
        g.handle_data(c);
        // Drained after every chunk, as a sender would.
        let ops: Vec<Op> = std::iter::from_fn(|| g.poll_op()).collect();
        search += t.elapsed();
        for op in &ops {
            if let Err(e) = ap.op(op) {
                failed.get_or_insert(e);
            }
        }
    })?;
    let t = Instant::now();
    let f = g.finish();
    search += t.elapsed();
    for op in &f.ops {
        ap.op(op)?;
    }
    if let Some(e) = failed {
        return Err(e);
    }
    let t = Instant::now();
    ap.out.flush()?;
    let got = ap.hash.finalize();
    ap.spent += t.elapsed();
    if got.as_bytes() != &f.target_hash {
        bail!("applying the ops did not reproduce {}", target.display());
    }
    ensure!(f.stats.target_len == sig.base().len, "target length");
    Ok(Run {
        search,
        apply: ap.spent,
        stats: f.stats,
    })
}

/// rsync's `--stats` figures of one run.
#[derive(Debug)]
struct RsyncRun {
    wall: Duration,
    literal: u64,
    matched: u64,
    sent: u64,
}

/// The rsync version line; installs rsync with apt-get if it is missing.
fn ensure_rsync() -> Result<String> {
    let version = || -> Option<String> {
        let out = Command::new("rsync").arg("--version").output().ok()?;
        let s = String::from_utf8_lossy(&out.stdout);
        out.status
            .success()
            .then(|| s.lines().next().unwrap_or("rsync").to_owned())
    };
    if let Some(v) = version() {
        return Ok(v);
    }
    println!("  rsync is missing: apt-get install -y rsync");
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-q", "rsync"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !install() {
        let updated = Command::new("apt-get")
            .args(["update", "-q"])
            .status()
            .is_ok_and(|s| s.success());
        ensure!(
            updated && install(),
            "could not install rsync (use --no-rsync)"
        );
    }
    version().context("rsync still does not run after installing it")
}

/// rsync's local delta path: `src/data.bin` is the target, `dst/data.bin` the base
/// (hard links: rsync writes a temporary file and renames it, the base stays intact).
fn run_rsync(dir: &Path, target: &str) -> Result<RsyncRun> {
    let (src, dst) = (dir.join("rsync-src"), dir.join("rsync-dst"));
    for d in [&src, &dst] {
        let _ = std::fs::remove_dir_all(d);
        std::fs::create_dir_all(d)?;
    }
    std::fs::hard_link(dir.join(target), src.join("data.bin"))?;
    std::fs::hard_link(dir.join("base.bin"), dst.join("data.bin"))?;
    let t = Instant::now();
    let out = Command::new("rsync")
        .args([
            "-a",
            "-I",
            "--no-whole-file",
            "--stats",
            "--no-human-readable",
        ])
        .arg(format!("{}/", src.display()))
        .arg(format!("{}/", dst.display()))
        .output()
        .context("run rsync")?;
    let wall = t.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "rsync failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |name: &str| -> Result<u64> {
        let line = stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .with_context(|| format!("no `{name}` in rsync --stats:\n{stdout}"))?;
        let digits: String = line
            .trim_start_matches(':')
            .trim()
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == ',' || *c == '.')
            .filter(char::is_ascii_digit)
            .collect();
        digits.parse().with_context(|| format!("`{name}{line}`"))
    };
    let run = RsyncRun {
        wall,
        literal: field("Literal data")?,
        matched: field("Matched data")?,
        sent: field("Total bytes sent")?,
    };
    // Check rsync produced the target, then drop its copy.
    ensure!(
        same_content(&src.join("data.bin"), &dst.join("data.bin"))?,
        "rsync's result differs from the target"
    );
    std::fs::remove_dir_all(&src)?;
    std::fs::remove_dir_all(&dst)?;
    Ok(run)
}

fn same_content(a: &Path, b: &Path) -> Result<bool> {
    let hash = |p: &Path| -> Result<blake3::Hash> {
        let mut h = blake3::Hasher::new();
        let size = std::fs::metadata(p)?.len();
        each_chunk(p, size, |c| {
            h.update(c);
        })?;
        Ok(h.finalize())
    };
    Ok(hash(a)? == hash(b)?)
}
