//! Kernel change capture for cdsync: eBPF programs in C (CO-RE, BTF) loaded by aya.
//!
//! The kernel side (`bpf/cdsync.bpf.c`, built by `bpf/build.sh`, committed as
//! `bpf/cdsync.bpf.o` and embedded here) attaches BTF tracepoints only, because they
//! load on every kernel we target (Debian 12's 6.1 up to 6.18) and in sandboxes that
//! refuse fentry/LSM programs:
//!
//! | program | tracepoint | covers |
//! |---|---|---|
//! | `cd_sys_enter` | `tp_btf/sys_enter` | `close` of fds recorded as opened for write |
//! | `cd_sys_exit` | `tp_btf/sys_exit` | every other file syscall, on success |
//! | `cd_uring_submit_req`/`_sqe` | `tp_btf/io_uring_submit_req` (6.4+) or `io_uring_submit_sqe` | `IORING_OP_CLOSE`; resolves io_uring path operations |
//! | `cd_uring_complete` | `tp_btf/io_uring_complete` | io_uring writes, fallocate, splice, ftruncate, openat(2); reports path operations |
//! | `cd_uring_cqe_overflow` | `tp_btf/io_uring_cqe_overflow` | path operations whose completion overflowed the CQ ring |
//!
//! Events are filtered in the kernel: only changes below a root registered with
//! [`Capture::watch_root`] reach user space. A full ring buffer is counted
//! ([`Capture::drops`]) and turned into [`EventKind::Lost`] events by
//! [`Capture::poll`], so loss is never silent.
//!
//! A richer backend (fentry on `vfs_*`, BPF LSM hooks) can be added later as more
//! programs in the same object; [`probe`] already reports whether this kernel
//! allows them.
//!
//! Path resolution is documented in `bpf/cdsync.bpf.c` and the record format in
//! `bpf/cdsync.h` / [`abi`]. In short: fd-based events walk the file's dentry up to
//! a root; path-based ones (unlink, rename, mkdir, chmod, ...) resolve the base
//! directory (dirfd, cwd or the task's root) and append the user's path string,
//! which [`Capture::poll`] normalises.
//!
//! # Known limits
//!
//! - x86_64 only (syscall numbers, `pt_regs`); 32-bit compat syscalls are ignored.
//! - A path-based syscall is seen only if its base directory is inside a root or is
//!   a (canonical) ancestor of one: `cwd=/srv/other` + `../www/x`, or a path through
//!   a symlink to the root (`/var/www` → `/srv/www`), is missed. fd-based events
//!   (open, write, mmap, close, fchmod...) do not have this limit.
//! - Mount points inside a root are not crossed; paths deeper than 48 levels or
//!   4 KiB below a root become `Lost` for every root on that device.
//! - `Modify` is rate-limited in the kernel to one per (process, fd) per second;
//!   `OpenWrite`/`CloseWrite` bracket the writes. No `CloseWrite` for fds closed by
//!   `close_range`, `dup2` or process exit.
//! - io_uring: writes, fallocate, splice, ftruncate, openat/openat2, close and the
//!   path operations (renameat, unlinkat, mkdirat, symlinkat, linkat) are
//!   captured; direct (fixed-file) opens are not. A path operation is resolved
//!   when it is submitted and reported when it completes successfully; one
//!   submitted with `IOSQE_CQE_SKIP_SUCCESS` has no completion to wait for and is
//!   reported as `Lost` at submission (the rescan may run before it finished).
//! - `is_dir` of a rename comes from `lstat` of the new path (through
//!   `/proc/<pid>/{cwd,root,fd}` when it left the root), so it is best effort.

#![deny(unsafe_code)]

pub mod abi;
mod decode;

use std::collections::BTreeMap;
use std::error::Error as StdError;
use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::{BtfTracePoint, FEntry, Lsm};
use aya::{Btf, Ebpf, EbpfLoader};
use cd_core::event::{EventKind, FsEvent};

use crate::decode::RootInfo;

/// The compiled kernel object (see `bpf/build.sh`).
static OBJECT: &[u8] = aya::include_bytes_aligned!("../bpf/cdsync.bpf.o");

/// Default ring-buffer size: 32 MiB.
pub const DEFAULT_RING_BYTES: u32 = 32 << 20;

/// Load-time options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaptureOptions {
    /// Ring-buffer size in bytes: a power of two, at least one page. 16–64 MiB is
    /// sensible for production; tests use tiny rings to provoke loss.
    pub ring_bytes: u32,
}

impl Default for CaptureOptions {
    fn default() -> Self {
        Self {
            ring_bytes: DEFAULT_RING_BYTES,
        }
    }
}

/// A failure, naming the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("ring buffer size {0} is not a power of two of at least one page")]
    RingSize(u32),
    #[error("reading kernel BTF from /sys/kernel/btf/vmlinux: {0}")]
    Btf(String),
    #[error("loading the eBPF object (creating maps): {0}")]
    Object(String),
    #[error("{attach_point}: {op} failed: {reason}")]
    Program {
        attach_point: String,
        op: &'static str,
        reason: String,
    },
    #[error("eBPF map `{map}`: {op} failed: {reason}")]
    Map {
        map: &'static str,
        op: &'static str,
        reason: String,
    },
    #[error("watch root {path}: {source}")]
    Root {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("root id {0} is invalid (0 is reserved) or already watched")]
    RootId(u32),
    #[error("root id {0} is not watched")]
    NotWatched(u32),
}

/// Full error chain of `e`, with errno names where the kernel gave one, and the
/// verifier log cut to its last lines.
fn chain(e: &dyn StdError) -> String {
    let mut s = e.to_string();
    if let Some(t) = s.strip_suffix(" Verifier output: ") {
        s = t.trim_end_matches('.').to_string();
    }
    if s.len() > 4000 {
        // Verifier logs can be megabytes: keep the head (the errno) and the tail.
        let head: String = s.chars().take(300).collect();
        let tail_start = s.len() - 2000;
        let tail_start = (tail_start..s.len())
            .find(|&i| s.is_char_boundary(i))
            .unwrap_or(s.len());
        s = format!("{head} [...] {}", &s[tail_start..]);
    }
    let mut src = e.source();
    while let Some(c) = src {
        let cs = c.to_string();
        if !s.contains(&cs) {
            s.push_str(": ");
            s.push_str(&cs);
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>()
            && let Some(code) = io.raw_os_error()
        {
            let name = errno_name(code);
            if !s.contains(name) {
                s = format!("{name}: {s}");
            }
        }
        src = c.source();
    }
    s
}

fn errno_name(code: i32) -> &'static str {
    match code {
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        libc::EINVAL => "EINVAL",
        libc::ENOENT => "ENOENT",
        libc::E2BIG => "E2BIG",
        libc::ENOMEM => "ENOMEM",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ESRCH => "ESRCH",
        _ => "errno",
    }
}

/// One decoded change, tagged with the root it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedEvent {
    /// The `root_id` given to [`Capture::watch_root`].
    pub root_id: u32,
    /// Kernel sequence number of the record this came from (one record can yield
    /// two events, e.g. `Create` + `OpenWrite`). Records from different CPUs may
    /// arrive slightly out of order; `Lost` events synthesised for drops carry the
    /// last sequence number seen.
    pub seq: u64,
    pub event: FsEvent,
}

/// Kernel change capture: loaded programs, maps and the watched roots.
pub struct Capture {
    // Field order matters for drop order: the maps and ring borrow nothing, the
    // object owns programs and their links (detached on drop).
    ring: RingBuf<MapData>,
    roots_map: HashMap<MapData, [u8; 16], u32>,
    root_devs: HashMap<MapData, u32, u32>,
    ancestors: HashMap<MapData, [u8; 16], u32>,
    anc_prefix: HashMap<MapData, [u8; 24], u32>,
    drops_map: PerCpuArray<MapData, u64>,
    roots: BTreeMap<u32, RootInfo>,
    attached: Vec<String>,
    drops_reported: u64,
    last_seq: u64,
    stats: CaptureStats,
    _ebpf: Ebpf,
}

/// Counters since [`Capture::load`], for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CaptureStats {
    /// Records read from the ring buffer.
    pub records: u64,
    /// Events produced from them (including `Lost` for drops).
    pub events: u64,
    /// Records that produced no event (e.g. the path normalised to the root itself
    /// or left it through `..`); the kernel already drops everything outside roots.
    pub discarded: u64,
}

impl fmt::Debug for Capture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Capture")
            .field("attached", &self.attached)
            .field("roots", &self.roots.keys().collect::<Vec<_>>())
            .field("drops_reported", &self.drops_reported)
            .finish_non_exhaustive()
    }
}

/// The object is built for x86_64 (`-D__TARGET_ARCH_x86`), whose page size is 4 KiB.
fn page_size() -> u32 {
    4096
}

fn load_object(ring_bytes: u32) -> Result<(Ebpf, Btf), CaptureError> {
    let btf = Btf::from_sys_fs().map_err(|e| CaptureError::Btf(chain(&e)))?;
    let ebpf = EbpfLoader::new()
        .btf(Some(&btf))
        .map_max_entries("events", ring_bytes)
        .load(OBJECT)
        .map_err(|e| CaptureError::Object(chain(&e)))?;
    Ok((ebpf, btf))
}

/// Loads and attaches `prog` at `tp_btf/<tp>`. `Ok(false)`: this kernel has no such
/// tracepoint (nothing was loaded).
fn attach_tp(ebpf: &mut Ebpf, btf: &Btf, prog: &str, tp: &str) -> Result<bool, CaptureError> {
    let point = format!("tp_btf/{tp}");
    let err = |op, reason| CaptureError::Program {
        attach_point: point.clone(),
        op,
        reason,
    };
    let p: &mut BtfTracePoint = ebpf
        .program_mut(prog)
        .ok_or_else(|| {
            err(
                "find program",
                format!("program {prog} missing from object"),
            )
        })?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| err("find program", chain(&e)))?;
    match p.load(tp, btf) {
        Ok(()) => {}
        Err(aya::programs::ProgramError::Btf(aya::BtfError::UnknownBtfTypeName { .. })) => {
            return Ok(false);
        }
        Err(e) => return Err(err("load", chain(&e))),
    }
    p.attach().map_err(|e| err("attach", chain(&e)))?;
    Ok(true)
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, CaptureError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let m = ebpf.take_map(name).ok_or(CaptureError::Map {
        map: name,
        op: "find",
        reason: "missing from object".into(),
    })?;
    T::try_from(m).map_err(|e| CaptureError::Map {
        map: name,
        op: "open",
        reason: chain(&e),
    })
}

/// Kernel `s_dev` (`MKDEV(major, minor)` = `major << 20 | minor`) from a user-space
/// `st_dev` (glibc encoding, decoded with `major()`/`minor()`).
pub fn kernel_dev(st_dev: u64) -> u32 {
    let major = libc::major(st_dev);
    let minor = libc::minor(st_dev);
    (major << 20) | (minor & 0xfffff)
}

impl Capture {
    /// Loads the object, sizes the ring buffer and attaches every program. The
    /// syscall tracepoints are required; the io_uring ones are attached when the
    /// kernel has them (see [`Capture::attached`]).
    pub fn load(opts: CaptureOptions) -> Result<Capture, CaptureError> {
        let rb = opts.ring_bytes;
        if !rb.is_power_of_two() || rb < page_size() {
            return Err(CaptureError::RingSize(rb));
        }
        let (mut ebpf, btf) = load_object(rb)?;
        let mut attached = Vec::new();
        for (prog, tp) in [("cd_sys_enter", "sys_enter"), ("cd_sys_exit", "sys_exit")] {
            if !attach_tp(&mut ebpf, &btf, prog, tp)? {
                return Err(CaptureError::Program {
                    attach_point: format!("tp_btf/{tp}"),
                    op: "load",
                    reason: format!("kernel BTF has no btf_trace_{tp}"),
                });
            }
            attached.push(format!("tp_btf/{tp}"));
        }
        // io_uring: optional (kernels without CONFIG_IO_URING), but where the
        // tracepoint exists the program must load.
        if attach_tp(&mut ebpf, &btf, "cd_uring_complete", "io_uring_complete")? {
            attached.push("tp_btf/io_uring_complete".into());
        } else {
            tracing::warn!(
                "kernel has no io_uring_complete tracepoint: io_uring writes are not captured"
            );
        }
        if attach_tp(
            &mut ebpf,
            &btf,
            "cd_uring_submit_req",
            "io_uring_submit_req",
        )? {
            attached.push("tp_btf/io_uring_submit_req".into());
        } else if attach_tp(
            &mut ebpf,
            &btf,
            "cd_uring_submit_sqe",
            "io_uring_submit_sqe",
        )? {
            attached.push("tp_btf/io_uring_submit_sqe".into());
        }
        if attach_tp(
            &mut ebpf,
            &btf,
            "cd_uring_cqe_overflow",
            "io_uring_cqe_overflow",
        )? {
            attached.push("tp_btf/io_uring_cqe_overflow".into());
        }
        let ring = take_map(&mut ebpf, "events")?;
        let roots_map = take_map(&mut ebpf, "roots")?;
        let root_devs = take_map(&mut ebpf, "root_devs")?;
        let ancestors = take_map(&mut ebpf, "ancestors")?;
        let anc_prefix = take_map(&mut ebpf, "anc_prefix")?;
        let drops_map = take_map(&mut ebpf, "drops")?;
        Ok(Capture {
            ring,
            roots_map,
            root_devs,
            ancestors,
            anc_prefix,
            drops_map,
            roots: BTreeMap::new(),
            attached,
            drops_reported: 0,
            last_seq: 0,
            stats: CaptureStats::default(),
            _ebpf: ebpf,
        })
    }

    /// Attach points in use, e.g. `tp_btf/sys_exit`.
    pub fn attached(&self) -> &[String] {
        &self.attached
    }

    fn map_err(
        map: &'static str,
        op: &'static str,
    ) -> impl Fn(aya::maps::MapError) -> CaptureError {
        move |e| CaptureError::Map {
            map,
            op,
            reason: chain(&e),
        }
    }

    fn bump(
        map: &mut HashMap<MapData, u32, u32>,
        key: u32,
        delta: i32,
    ) -> Result<(), CaptureError> {
        let cur = map.get(&key, 0).unwrap_or(0);
        let new = cur.saturating_add_signed(delta);
        if new == 0 {
            let _ = map.remove(&key);
            Ok(())
        } else {
            map.insert(key, new, 0)
                .map_err(Self::map_err("root_devs", "update"))
        }
    }

    /// Starts reporting changes below `path` (a directory) as `root_id` (non-zero,
    /// unique). The path is canonicalised; its (device, inode) identifies the root
    /// in the kernel, and each ancestor directory is registered so that absolute
    /// and cwd-relative paths into the root are recognised.
    pub fn watch_root(&mut self, root_id: u32, path: &Path) -> Result<(), CaptureError> {
        if root_id == 0 || self.roots.contains_key(&root_id) {
            return Err(CaptureError::RootId(root_id));
        }
        let rerr = |source| CaptureError::Root {
            path: path.to_path_buf(),
            source,
        };
        let canon = std::fs::canonicalize(path).map_err(rerr)?;
        let md = std::fs::metadata(&canon).map_err(rerr)?;
        if !md.is_dir() {
            return Err(rerr(std::io::Error::from_raw_os_error(libc::ENOTDIR)));
        }
        let kdev = kernel_dev(md.dev());
        let ino = md.ino();
        let mut info = RootInfo {
            path: canon.clone(),
            kdev,
            ino,
            rems: Default::default(),
            anc_keys: Vec::new(),
        };
        self.roots_map
            .insert(abi::ino_key(kdev, ino), root_id, 0)
            .map_err(Self::map_err("roots", "update"))?;
        Self::bump(&mut self.root_devs, kdev, 1)?;
        // Ancestors: "/", "/srv", ... up to the root's parent.
        let mut anc = canon.parent();
        while let Some(a) = anc {
            let rem = canon
                .strip_prefix(a)
                .unwrap_or(&canon)
                .as_os_str()
                .as_bytes()
                .to_vec();
            if rem.len() >= abi::ANC_REM_MAX {
                anc = a.parent();
                continue;
            }
            if let Ok(am) = std::fs::metadata(a) {
                let ak = abi::ino_key(kernel_dev(am.dev()), am.ino());
                let pk = abi::anc_key(kernel_dev(am.dev()), am.ino(), &rem);
                let n = self.ancestors.get(&ak, 0).unwrap_or(0);
                self.ancestors
                    .insert(ak, n + 1, 0)
                    .map_err(Self::map_err("ancestors", "update"))?;
                self.anc_prefix
                    .insert(pk, root_id, 0)
                    .map_err(Self::map_err("anc_prefix", "update"))?;
                info.anc_keys.push((ak, pk));
                info.rems.insert(rem);
            }
            anc = a.parent();
        }
        tracing::info!(root_id, path = %canon.display(), kdev, ino, "watching root");
        self.roots.insert(root_id, info);
        Ok(())
    }

    /// Stops reporting changes below `root_id`.
    pub fn unwatch_root(&mut self, root_id: u32) -> Result<(), CaptureError> {
        let info = self
            .roots
            .remove(&root_id)
            .ok_or(CaptureError::NotWatched(root_id))?;
        let _ = self.roots_map.remove(&abi::ino_key(info.kdev, info.ino));
        Self::bump(&mut self.root_devs, info.kdev, -1)?;
        for (ak, pk) in info.anc_keys {
            let _ = self.anc_prefix.remove(&pk);
            let n = self.ancestors.get(&ak, 0).unwrap_or(0);
            if n <= 1 {
                let _ = self.ancestors.remove(&ak);
            } else {
                self.ancestors
                    .insert(ak, n - 1, 0)
                    .map_err(Self::map_err("ancestors", "update"))?;
            }
        }
        Ok(())
    }

    /// Records the kernel could not queue because the ring buffer was full (sum
    /// over CPUs, since load).
    pub fn drops(&self) -> u64 {
        match self.drops_map.get(&0, 0) {
            Ok(v) => v.iter().sum(),
            Err(e) => {
                tracing::warn!(error = %chain(&e), "reading the drop counter");
                0
            }
        }
    }

    /// Drains up to `max` records from the ring buffer without blocking, appending
    /// their events to `out`; returns the number of events appended. New drops
    /// since the previous call are reported first as `Lost` (whole root) for every
    /// watched root.
    pub fn poll(&mut self, out: &mut Vec<DecodedEvent>, max: usize) -> usize {
        let before = out.len();
        let mut n = 0;
        while n < max {
            let Some(item) = self.ring.next() else { break };
            n += 1;
            match abi::parse(&item) {
                Ok(rec) => {
                    self.last_seq = rec.hdr.seq;
                    let at = out.len();
                    decode::decode(&rec, &self.roots, out);
                    if out.len() == at {
                        self.stats.discarded += 1;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "malformed kernel record; reporting Lost");
                    push_lost_all(&self.roots, self.last_seq, out);
                }
            }
        }
        let drops = self.drops();
        if drops > self.drops_reported {
            tracing::warn!(
                dropped = drops - self.drops_reported,
                "kernel ring buffer overflowed; reporting Lost for every root"
            );
            self.drops_reported = drops;
            push_lost_all(&self.roots, self.last_seq, out);
        }
        self.stats.records += n as u64;
        self.stats.events += (out.len() - before) as u64;
        out.len() - before
    }

    /// Counters since load.
    pub fn stats(&self) -> CaptureStats {
        self.stats
    }

    /// The ring buffer's fd: readable (epoll) when records are waiting. Wrap it in
    /// `tokio::io::unix::AsyncFd` and call [`Capture::poll`] when it is ready.
    pub fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}

impl AsFd for Capture {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }
}

impl AsRawFd for Capture {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}

fn push_lost_all(roots: &BTreeMap<u32, RootInfo>, seq: u64, out: &mut Vec<DecodedEvent>) {
    for &root_id in roots.keys() {
        out.push(DecodedEvent {
            root_id,
            seq,
            event: FsEvent {
                kind: EventKind::Lost,
                path: None,
                path2: None,
                is_dir: true,
                pid: 0,
            },
        });
    }
}

/// What this kernel allows, for choosing (and explaining) a capture backend.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProbeReport {
    /// Kernel BTF is readable (required by everything below).
    pub btf: bool,
    /// A BPF ring buffer could be created.
    pub ringbuf: bool,
    /// `tp_btf` programs load and attach (what [`Capture`] uses).
    pub tp_btf: bool,
    /// fentry programs load and attach.
    pub fentry: bool,
    /// BPF LSM programs load and attach.
    pub lsm: bool,
    /// One line per failed check, e.g. `fentry/vfs_write: load failed: EPERM: ...`.
    pub reasons: Vec<String>,
}

impl ProbeReport {
    /// Whether [`Capture::load`] can be expected to succeed.
    pub fn capture_supported(&self) -> bool {
        self.btf && self.ringbuf && self.tp_btf
    }
}

/// Tries tiny loads of each program type this crate may use.
pub fn probe() -> ProbeReport {
    let mut r = ProbeReport::default();
    let btf = match Btf::from_sys_fs() {
        Ok(b) => b,
        Err(e) => {
            r.reasons.push(format!("kernel BTF: {}", chain(&e)));
            return r;
        }
    };
    r.btf = true;
    let mut ebpf = match EbpfLoader::new()
        .btf(Some(&btf))
        .map_max_entries("events", page_size())
        .load(OBJECT)
    {
        Ok(e) => e,
        Err(e) => {
            r.reasons.push(format!(
                "loading object (maps incl. ring buffer): {}",
                chain(&e)
            ));
            return r;
        }
    };
    r.ringbuf = true;
    match attach_tp(&mut ebpf, &btf, "cd_sys_enter", "sys_enter") {
        Ok(true) => r.tp_btf = true,
        Ok(false) => r.reasons.push("tp_btf/sys_enter: not in kernel BTF".into()),
        Err(e) => r.reasons.push(e.to_string()),
    }
    let fentry = (|| -> Result<(), String> {
        let p: &mut FEntry = ebpf
            .program_mut("cd_probe_fentry")
            .ok_or("program missing")?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| chain(&e))?;
        p.load("vfs_write", &btf)
            .map_err(|e| format!("load failed: {}", chain(&e)))?;
        p.attach()
            .map_err(|e| format!("attach failed: {}", chain(&e)))?;
        Ok(())
    })();
    match fentry {
        Ok(()) => r.fentry = true,
        Err(e) => r.reasons.push(format!("fentry/vfs_write: {e}")),
    }
    let lsm = (|| -> Result<(), String> {
        let p: &mut Lsm = ebpf
            .program_mut("cd_probe_lsm")
            .ok_or("program missing")?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| chain(&e))?;
        p.load("file_open", &btf)
            .map_err(|e| format!("load failed: {}", chain(&e)))?;
        p.attach()
            .map_err(|e| format!("attach failed: {}", chain(&e)))?;
        Ok(())
    })();
    match lsm {
        Ok(()) => r.lsm = true,
        Err(e) => r.reasons.push(format!("lsm/file_open: {e}")),
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_dev_encoding() {
        // glibc: makedev(8, 1) = 0x801; kernel MKDEV(8, 1) = 8 << 20 | 1.
        assert_eq!(kernel_dev(libc::makedev(8, 1)), (8 << 20) | 1);
        assert_eq!(kernel_dev(libc::makedev(259, 70_000)), (259 << 20) | 70_000);
        assert_eq!(kernel_dev(libc::makedev(0, 42)), 42);
    }

    #[test]
    fn object_is_embedded() {
        assert!(OBJECT.starts_with(b"\x7fELF"));
    }

    #[test]
    fn bad_ring_size_is_refused() {
        assert!(matches!(
            Capture::load(CaptureOptions { ring_bytes: 12345 }),
            Err(CaptureError::RingSize(12345))
        ));
    }
}
