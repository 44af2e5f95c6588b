//! The io_uring read path against the `read(2)` path: same bytes, same hash, same
//! refusals; buffers always come back to the pool.

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use cd_core::path::RelPath;

use super::*;
use crate::fs::file_io::{FileIo, FileIoChoice};
use crate::fs::tests::set_mtime;
use crate::fs::{FsError, Root, SendFile, SentFile};

const SMALL: UringConfig = UringConfig {
    threads: 1,
    buffers_per_thread: 6,
    read_ahead: 4,
};

fn p(s: &str) -> RelPath {
    RelPath::new(s).unwrap()
}

/// Deterministic bytes that differ from chunk to chunk, so a chunk handed out in the
/// wrong order or from a stale buffer shows.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Held by every test that registers buffers: without `CAP_IPC_LOCK` they count
/// against an 8 MiB `RLIMIT_MEMLOCK`, which tests running side by side would exceed.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn uring(cfg: UringConfig, direct: bool) -> FileIo {
    let io = FileIo::from_probe(
        FileIoChoice::IoUring,
        direct,
        Some(UringService::start(cfg)),
    );
    assert_eq!(io.name(), "io_uring", "{}", io.status());
    io
}

/// Reads all of `f`: with `read_chunk` into buffers of `buf_len` bytes, or with
/// `next_chunk` when `buf_len` is 0.
fn read_all(f: &mut SendFile, buf_len: usize) -> Result<Vec<u8>, FsError> {
    let mut out = Vec::new();
    if buf_len == 0 {
        loop {
            let c = f.next_chunk()?;
            if c.is_empty() {
                return Ok(out);
            }
            assert!(c.len() <= CHUNK);
            out.extend_from_slice(c);
        }
    }
    let mut buf = vec![0u8; buf_len];
    loop {
        let n = f.read_chunk(&mut buf)?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n]);
    }
}

fn send(root: &Root, path: &str, io: &FileIo, buf_len: usize) -> (Vec<u8>, SentFile, bool) {
    let mut f = SendFile::open_with(root, &p(path), io).unwrap();
    let uring = f.via_io_uring();
    let data = read_all(&mut f, buf_len).unwrap();
    (data, f.finish().unwrap(), uring)
}

/// Waits until every buffer of `io`'s pools is back on a free list.
fn wait_all_free(io: &FileIo) {
    let svc = io.uring().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (free, total) = svc.buffers();
        if free == total {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "buffers not returned: {free} of {total} free"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn every_size_reads_the_same_as_read2() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let sizes = [
        0,
        1,
        4095,
        4096,
        4097,
        CHUNK - 1,
        CHUNK,
        CHUNK + 1,
        3 * CHUNK,
        5 * 1024 * 1024 + 123,
    ];
    for (i, size) in sizes.iter().enumerate() {
        std::fs::write(dir.path().join(format!("f{i}")), noise(i as u64, *size)).unwrap();
    }
    let root = Root::open(dir.path()).unwrap();
    let sync = FileIo::sync();
    let buffered = uring(SMALL, false);
    let direct = uring(SMALL, true);
    for (i, size) in sizes.iter().enumerate() {
        let name = format!("f{i}");
        let want = noise(i as u64, *size);
        let (data, expected, via) = send(&root, &name, &sync, 64 * 1024);
        assert!(!via);
        assert_eq!(data, want, "sync, size {size}");
        assert_eq!(expected.hash, *blake3::hash(&want).as_bytes());
        for (io, what) in [(&buffered, "io_uring"), (&direct, "io_uring O_DIRECT")] {
            // Caller buffers smaller than, equal to and larger than a chunk, and the
            // borrowed chunks (0).
            for buf_len in [7777, CHUNK, CHUNK + 4096, 0] {
                let (data, sent, via) = send(&root, &name, io, buf_len);
                assert!(via, "{what}, size {size}: not read through io_uring");
                assert!(
                    data == want,
                    "{what}, size {size}, buffer {buf_len}: content"
                );
                assert_eq!(sent, expected, "{what}, size {size}, buffer {buf_len}");
            }
        }
        let f = SendFile::open_with(&root, &p(&name), &direct).unwrap();
        assert!(f.is_direct(), "size {size}: not opened O_DIRECT");
    }
    assert!(direct.direct().unwrap().refused().is_empty());
    wait_all_free(&buffered);
    wait_all_free(&direct);
}

#[test]
fn read_chunk_and_next_chunk_mix() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let want = noise(7, 2 * CHUNK + 5000);
    std::fs::write(dir.path().join("f"), &want).unwrap();
    let root = Root::open(dir.path()).unwrap();
    let io = uring(SMALL, false);
    let mut f = SendFile::open_with(&root, &p("f"), &io).unwrap();
    let mut out = vec![0u8; 1000];
    assert_eq!(f.read_chunk(&mut out).unwrap(), 1000);
    // The rest of the first chunk, then a whole one, then bytes of the last.
    let c = f.next_chunk().unwrap().to_vec();
    assert_eq!(c.len(), CHUNK - 1000);
    out.extend_from_slice(&c);
    out.extend_from_slice(f.next_chunk().unwrap());
    let mut b = vec![0u8; 3000];
    let n = f.read_chunk(&mut b).unwrap();
    out.extend_from_slice(&b[..n]);
    out.extend(read_all(&mut f, 0).unwrap());
    assert!(out == want);
    assert_eq!(f.finish().unwrap().hash, *blake3::hash(&want).as_bytes());
}

#[test]
fn a_file_changed_while_read_is_refused() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let size = 3 * CHUNK + 17;
    let root = Root::open(dir.path()).unwrap();
    for direct in [false, true] {
        let io = uring(SMALL, direct);
        let path = dir.path().join("f");

        // Same size, one byte changed behind the read-ahead: only mtime/ctime tell.
        std::fs::write(&path, noise(1, size)).unwrap();
        set_mtime(&path, 1_000_000_000, 0);
        let mut f = SendFile::open_with(&root, &p("f"), &io).unwrap();
        assert!(f.via_io_uring());
        assert_eq!(f.next_chunk().unwrap().len(), CHUNK);
        let mut h = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        h.seek(SeekFrom::Start(2 * CHUNK as u64 + 3)).unwrap();
        h.write_all(b"\x00\x01").unwrap();
        drop(h);
        read_all(&mut f, 0).unwrap();
        let e = f.finish().unwrap_err();
        assert!(matches!(e, FsError::Changed { .. }), "direct {direct}: {e}");

        // Truncated under the reader: the short read ends the file early.
        std::fs::write(&path, noise(2, size)).unwrap();
        set_mtime(&path, 1_000_000_000, 0);
        let mut f = SendFile::open_with(&root, &p("f"), &io).unwrap();
        f.next_chunk().unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(CHUNK as u64 + 100)
            .unwrap();
        let rest = read_all(&mut f, 4096).unwrap();
        assert!(rest.len() <= 100 + 3 * CHUNK, "direct {direct}");
        let e = f.finish().unwrap_err();
        assert!(matches!(e, FsError::Changed { .. }), "direct {direct}: {e}");

        // Grown while read: caught too.
        std::fs::write(&path, noise(3, size)).unwrap();
        set_mtime(&path, 1_000_000_000, 0);
        let mut f = SendFile::open_with(&root, &p("f"), &io).unwrap();
        let mut h = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        h.write_all(b"more").unwrap();
        drop(h);
        read_all(&mut f, 0).unwrap();
        let e = f.finish().unwrap_err();
        assert!(matches!(e, FsError::Changed { .. }), "direct {direct}: {e}");
        wait_all_free(&io);
    }
}

#[test]
fn dropping_a_reader_mid_file_returns_its_buffers() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let big = noise(11, 40 * CHUNK + 99);
    let other = noise(12, 9 * CHUNK + 1);
    std::fs::write(dir.path().join("big"), &big).unwrap();
    std::fs::write(dir.path().join("other"), &other).unwrap();
    let root = Root::open(dir.path()).unwrap();
    let io = uring(SMALL, false);
    let total = io.uring().unwrap().buffers().1;
    for round in 0..20 {
        let mut f = SendFile::open_with(&root, &p("big"), &io).unwrap();
        assert!(f.via_io_uring());
        // Round 0 drops right after open, the others with reads in flight.
        for _ in 0..round % 5 {
            assert_eq!(f.next_chunk().unwrap().len(), CHUNK);
        }
        drop(f);
    }
    wait_all_free(&io);
    assert_eq!(io.uring().unwrap().buffers(), (total, total));
    // The same pool reads another file correctly after all that.
    let (data, sent, via) = send(&root, "other", &io, 0);
    assert!(via);
    assert!(data == other);
    assert_eq!(sent.hash, *blake3::hash(&other).as_bytes());
    // A reader abandoned after an error of `finish` (changed file) also gives back.
    wait_all_free(&io);
}

#[test]
fn exhausted_pools_fall_back_to_read2_per_file() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let want = noise(5, 6 * CHUNK);
    std::fs::write(dir.path().join("f"), &want).unwrap();
    let root = Root::open(dir.path()).unwrap();
    let io = uring(SMALL, false);
    // Six buffers: the first reader takes five, the second one, the third none.
    let mut a = SendFile::open_with(&root, &p("f"), &io).unwrap();
    let mut b = SendFile::open_with(&root, &p("f"), &io).unwrap();
    let mut c = SendFile::open_with(&root, &p("f"), &io).unwrap();
    assert_eq!(
        (a.via_io_uring(), b.via_io_uring(), c.via_io_uring()),
        (true, true, false)
    );
    assert_eq!(io.sync_files(), 1);
    // Interleaved on one thread: each reader has its own buffers, so none waits on
    // another's.
    let mut outs = [Vec::new(), Vec::new(), Vec::new()];
    loop {
        let mut more = false;
        for (f, out) in [&mut a, &mut b, &mut c].into_iter().zip(outs.iter_mut()) {
            let chunk = f.next_chunk().unwrap();
            more |= !chunk.is_empty();
            out.extend_from_slice(chunk);
        }
        if !more {
            break;
        }
    }
    for (f, out) in [a, b, c].into_iter().zip(outs) {
        assert!(out == want);
        assert_eq!(f.finish().unwrap().hash, *blake3::hash(&want).as_bytes());
    }
    wait_all_free(&io);
}

#[test]
fn readers_on_many_threads_share_the_workers() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<Vec<u8>> = (0..8)
        .map(|i| noise(100 + i, (i as usize + 1) * CHUNK / 3 * 7))
        .collect();
    for (i, d) in files.iter().enumerate() {
        std::fs::write(dir.path().join(format!("f{i}")), d).unwrap();
    }
    let root = Root::open(dir.path()).unwrap();
    let io = uring(
        UringConfig {
            threads: 2,
            buffers_per_thread: 8,
            read_ahead: 3,
        },
        false,
    );
    std::thread::scope(|s| {
        for (i, want) in files.iter().enumerate() {
            let (root, io) = (&root, &io);
            s.spawn(move || {
                for round in 0..5 {
                    let (data, sent, _) = send(root, &format!("f{i}"), io, [0, 5000][round % 2]);
                    assert!(data == *want, "file {i} round {round}");
                    assert_eq!(sent.hash, *blake3::hash(want).as_bytes());
                }
            });
        }
    });
    wait_all_free(&io);
}

#[test]
fn unavailable_io_uring_falls_back_to_read2() {
    let dir = tempfile::tempdir().unwrap();
    let want = noise(9, CHUNK + 3);
    std::fs::write(dir.path().join("f"), &want).unwrap();
    let root = Root::open(dir.path()).unwrap();
    for errno in [libc::EPERM, libc::ENOSYS] {
        let io = FileIo::from_probe(
            FileIoChoice::IoUring,
            true,
            Some(Err(io::Error::from_raw_os_error(errno))),
        );
        assert_eq!(io.name(), "sync");
        let st = io.status();
        assert_eq!(st["path"], "sync");
        assert_eq!(st["requested"], "io_uring");
        assert_eq!(st["direct_io"], false);
        let why = st["fallback_reason"].as_str().unwrap();
        assert!(
            why.contains(&io::Error::from_raw_os_error(errno).to_string()),
            "{why}"
        );
        let (data, sent, via) = send(&root, "f", &io, 0);
        assert!(!via);
        assert!(data == want);
        assert_eq!(sent.hash, *blake3::hash(&want).as_bytes());
    }
    let io = FileIo::start(FileIoChoice::Sync, false);
    assert_eq!(
        (io.name(), io.status()["fallback_reason"].is_null()),
        ("sync", true)
    );
}

/// The real thing: in a child process whose thread has a seccomp filter answering
/// `io_uring_setup` with `ENOSYS` (as container runtimes do), the probe fails, the
/// reason is reported and files are read with `read(2)`.
#[test]
fn io_uring_refused_by_seccomp_falls_back_to_read2() {
    const CHILD: &str = "CDSYNC_TEST_SECCOMP_CHILD";
    const NAME: &str = "fs::uring::tests::io_uring_refused_by_seccomp_falls_back_to_read2";
    if std::env::var_os(CHILD).is_none() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([NAME, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("seccomp child: ok"),
            "child: {}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    deny_io_uring_setup();
    let dir = tempfile::tempdir().unwrap();
    let want = noise(13, 2 * CHUNK + 9);
    std::fs::write(dir.path().join("f"), &want).unwrap();
    let root = Root::open(dir.path()).unwrap();
    let io = FileIo::start(FileIoChoice::IoUring, true);
    assert_eq!(io.name(), "sync");
    let why = io.status()["fallback_reason"].as_str().unwrap().to_owned();
    assert!(
        why.contains(&io::Error::from_raw_os_error(libc::ENOSYS).to_string()),
        "{why}"
    );
    let (data, sent, via) = send(&root, "f", &io, 0);
    assert!(!via && data == want);
    assert_eq!(sent.hash, *blake3::hash(&want).as_bytes());
    println!("seccomp child: ok ({why})");
}

/// Installs a seccomp filter on the calling thread: `io_uring_setup` fails with
/// `ENOSYS`, everything else is allowed.
#[expect(
    unsafe_code,
    reason = "prctl(2) with a seccomp program has no safe wrapper"
)]
fn deny_io_uring_setup() {
    let stmt = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jeq = |k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    };
    let mut prog = [
        // seccomp_data.nr is at offset 0.
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0),
        jeq(libc::SYS_io_uring_setup as u32, 0, 1),
        stmt(
            libc::BPF_RET | libc::BPF_K,
            libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
        ),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
    ];
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_mut_ptr(),
    };
    // SAFETY: integer arguments only.
    let r = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    assert_eq!(r, 0, "{}", io::Error::last_os_error());
    // SAFETY: `fprog` points to `prog`, a valid filter program of `len` instructions,
    // both alive for the call; the kernel copies the program before returning.
    let r = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &raw const fprog,
            0,
            0,
        )
    };
    assert_eq!(r, 0, "{}", io::Error::last_os_error());
}

#[test]
fn a_filesystem_refusing_o_direct_is_read_buffered() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let want = noise(21, 2 * CHUNK + 1);
    std::fs::write(dir.path().join("f"), &want).unwrap();
    let root = Root::open(dir.path()).unwrap();
    let io = uring(SMALL, true);
    let policy = io.direct().unwrap();
    policy.refuse_all.store(true, Ordering::Relaxed);
    for _ in 0..2 {
        let mut f = SendFile::open_with(&root, &p("f"), &io).unwrap();
        assert!(f.via_io_uring() && !f.is_direct());
        assert!(read_all(&mut f, 0).unwrap() == want);
        assert_eq!(f.finish().unwrap().hash, *blake3::hash(&want).as_bytes());
    }
    let dev = rustix::fs::stat(dir.path()).unwrap().st_dev;
    let shown = format!("{}:{}", rustix::fs::major(dev), rustix::fs::minor(dev));
    assert_eq!(policy.refused(), vec![shown.clone()]);
    assert_eq!(io.status()["direct_io_refused_devices"][0], shown.as_str());
}

/// ramfs has no direct I/O: `fcntl(F_SETFL, O_DIRECT)` fails with `EINVAL` for real.
/// Needs root to mount it.
#[test]
fn ramfs_refuses_o_direct_for_real() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("ramfs_refuses_o_direct_for_real: needs root to mount ramfs");
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path();
    let ok = std::process::Command::new("mount")
        .args(["-t", "ramfs", "cdsync-test", &mnt.display().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "mount ramfs");
    struct Umount<'a>(&'a Path);
    impl Drop for Umount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .args(["-l", &self.0.display().to_string()])
                .status();
        }
    }
    let _umount = Umount(mnt);
    let want = noise(31, 3 * CHUNK + 77);
    std::fs::write(mnt.join("f"), &want).unwrap();
    let root = Root::open(mnt).unwrap();
    let io = uring(SMALL, true);
    let mut f = SendFile::open_with(&root, &p("f"), &io).unwrap();
    assert!(f.via_io_uring() && !f.is_direct());
    assert!(read_all(&mut f, 7777).unwrap() == want);
    assert_eq!(f.finish().unwrap().hash, *blake3::hash(&want).as_bytes());
    assert_eq!(io.direct().unwrap().refused().len(), 1);
    drop(root);
}

/// Sequential read throughput of one large file through [`SendFile`] (hashing
/// included, as when sending): `read(2)` vs io_uring vs io_uring `O_DIRECT`, warm and
/// (as root, after dropping the page cache) cold. Prints MiB/s; asserts only content.
///
/// ```text
/// cargo test --release -p cd-daemon --lib throughput -- --ignored --nocapture
/// ```
///
/// `CDSYNC_BENCH_DIR` (default: the temp dir), `CDSYNC_BENCH_MIB` (default 1024) and
/// `CDSYNC_BENCH_READ_AHEAD` (default 4) choose where, how big and how deep.
#[test]
#[ignore = "a measurement, not a check: run by hand"]
fn throughput_of_a_large_file() {
    let _serial = serial();
    let mib: usize = std::env::var("CDSYNC_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let base = std::env::var_os("CDSYNC_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(base).unwrap();
    let path = dir.path().join("big");
    {
        let block = noise(42, 4 << 20);
        let mut f = std::fs::File::create(&path).unwrap();
        for i in 0..mib / 4 {
            let mut b = block.clone();
            b[..8].copy_from_slice(&(i as u64).to_le_bytes());
            f.write_all(&b).unwrap();
        }
        f.sync_all().unwrap();
    }
    let size = (mib / 4 * 4) << 20;
    let root = Root::open(dir.path()).unwrap();
    let cold_ok = rustix::process::geteuid().is_root();
    let drop_caches = || {
        rustix::fs::sync();
        std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    };
    let mut cfg = UringConfig::default();
    if let Some(n) = std::env::var("CDSYNC_BENCH_READ_AHEAD")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        cfg.read_ahead = n;
        cfg.buffers_per_thread = cfg.buffers_per_thread.max(n + 1);
    }
    let sync = FileIo::sync();
    let buffered = uring(cfg, false);
    let direct = uring(cfg, true);
    let mut want = None;
    let mut run = |io: &FileIo, buf_len: usize, cold: bool| -> f64 {
        if cold {
            drop_caches();
        }
        let t = Instant::now();
        let mut f = SendFile::open_with(&root, &p("big"), io).unwrap();
        let mut buf = vec![0u8; buf_len];
        let mut n = 0;
        loop {
            let k = if buf_len == 0 {
                f.next_chunk().unwrap().len()
            } else {
                f.read_chunk(&mut buf).unwrap()
            };
            if k == 0 {
                break;
            }
            n += k;
        }
        let sent = f.finish().unwrap();
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(n, size);
        assert_eq!(*want.get_or_insert(sent.hash), sent.hash);
        size as f64 / (1 << 20) as f64 / secs
    };
    // Warm the cache once.
    run(&sync, CHUNK, false);
    let h = Instant::now();
    let chunk = vec![7u8; CHUNK];
    let mut hasher = blake3::Hasher::new();
    for _ in 0..size / CHUNK {
        hasher.update(&chunk);
    }
    let _ = hasher.finalize();
    println!(
        "{mib} MiB file, {} KiB chunks, {} reads ahead, BLAKE3 alone: {:.0} MiB/s",
        CHUNK / 1024,
        cfg.read_ahead,
        size as f64 / (1 << 20) as f64 / h.elapsed().as_secs_f64()
    );
    let cases: [(&str, &FileIo, usize); 4] = [
        ("read(2), read_chunk", &sync, CHUNK),
        ("io_uring, read_chunk (copy)", &buffered, CHUNK),
        ("io_uring, next_chunk (no copy)", &buffered, 0),
        ("io_uring O_DIRECT, next_chunk", &direct, 0),
    ];
    for cold in [false, true] {
        if cold && !cold_ok {
            println!("cold: skipped (dropping the page cache needs root)");
            continue;
        }
        for (name, io, buf_len) in cases {
            let rates: Vec<f64> = (0..3).map(|_| run(io, buf_len, cold)).collect();
            let mut sorted = rates.clone();
            sorted.sort_by(f64::total_cmp);
            println!(
                "{:<5} {name:<32} median {:>6.0} MiB/s  (runs: {})",
                if cold { "cold" } else { "warm" },
                sorted[1],
                rates
                    .iter()
                    .map(|r| format!("{r:.0}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
}
