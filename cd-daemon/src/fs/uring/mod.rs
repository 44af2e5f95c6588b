//! File reads on dedicated io_uring threads, with registered buffers and read-ahead.
//!
//! A [`UringService`] runs a few worker threads. Each owns one io_uring and one
//! [`Pool`] of registered (fixed) buffers of [`CHUNK`] bytes, and does nothing but
//! submit `READ_FIXED` requests that arrive over a channel, wait for completions and
//! send each one back to the reader that asked. Waking the worker is an `eventfd`
//! that the ring itself polls, so the worker sleeps in one place (`io_uring_enter`)
//! whether it waits for the disk or for new requests.
//!
//! A [`UringReader`] reads one file front to back for [`SendFile`](super::SendFile).
//! At open it reserves up to `read_ahead + 1` buffers of one worker's pool and keeps
//! every buffer that is neither being consumed nor already filled in flight, at
//! consecutive offsets, so the next chunks are read while the consumer hashes and
//! sends the current one. Chunks are handed out strictly in file order, whatever
//! order the kernel completes them in.
//!
//! # Buffer ownership
//!
//! A buffer is always owned by exactly one of: the pool's free list, a reader (idle,
//! being consumed, or completed but not yet consumed), the ring's table of in-flight
//! reads, or a completion message in a reader's channel. The type system carries
//! this (see [`ring`]): a [`Buf`] moves into the ring on submission and comes back only
//! with its completion. Every way a reader can end is therefore safe without waiting:
//! dropping it mid-file returns the buffers it holds at once, and completions of
//! reads still in flight are sent to a channel nobody receives from, so the send
//! fails and the buffer is dropped, which returns it to the pool. No buffer is handed
//! out again while the kernel may write into it.
//!
//! # Results
//!
//! `-EAGAIN` and `-EINTR` are retried by the worker (a file opened `O_NONBLOCK` on a
//! filesystem without async buffered reads gives `-EAGAIN`; readers clear
//! `O_NONBLOCK` anyway). A short read ends the pipeline at that point: reads already
//! queued behind it are discarded (their buffers come back, tagged with an old
//! epoch) and reading resumes right after the bytes received, so the consumer
//! sees the same bytes as with `read(2)`, including a file that shrank. With
//! `O_DIRECT`, `-EINVAL` turns `O_DIRECT` off for the file, records the refusal (see
//! [`DirectPolicy`]) and re-reads the chunk buffered.

mod ring;
#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::fs::OFlags;
use rustix::io::Errno;

pub(crate) use ring::{Buf, Pool};
use ring::{Event, Ring};

/// Size of one registered buffer and of one read: the largest chunk a data frame
/// carries, so one read is one frame.
pub const CHUNK: usize = cd_proto::frame::MAX_CHUNK_RAW;

/// How many times the worker re-submits a read that failed with `EAGAIN`/`EINTR`.
const MAX_RETRIES: u32 = 64;

/// Shape of a [`UringService`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UringConfig {
    /// Worker threads, each with its own ring and buffer pool.
    pub threads: usize,
    /// Registered buffers of [`CHUNK`] bytes per worker.
    pub buffers_per_thread: usize,
    /// Reads kept in flight ahead of the chunk being consumed.
    pub read_ahead: usize,
}

impl Default for UringConfig {
    /// Two workers of 16 buffers (8 MiB registered in all, the default
    /// `RLIMIT_MEMLOCK`), four reads ahead: three files at full depth per worker.
    fn default() -> UringConfig {
        UringConfig {
            threads: 2,
            buffers_per_thread: 16,
            read_ahead: 4,
        }
    }
}

/// Which filesystems refused `O_DIRECT` (by `st_dev`), so each is tried and logged
/// once, then read buffered.
#[derive(Debug, Default)]
pub struct DirectPolicy {
    refused: Mutex<BTreeSet<u64>>,
    #[cfg(test)]
    pub(crate) refuse_all: AtomicBool,
}

impl DirectPolicy {
    /// Turns `O_DIRECT` on for `fd` (a regular file on device `dev`) if its
    /// filesystem allows it with alignment our buffers meet. False: read buffered.
    pub(crate) fn enable(&self, fd: BorrowedFd<'_>, dev: u64, path: &dyn fmt::Display) -> bool {
        if self.refused.lock().unwrap().contains(&dev) {
            return false;
        }
        #[cfg(test)]
        if self.refuse_all.load(Ordering::Relaxed) {
            self.refuse(dev, path, "EINVAL (simulated)");
            return false;
        }
        if let Some((mem, off)) = dio_align(fd) {
            if off == 0 {
                self.refuse(dev, path, "statx reports no direct I/O support");
                return false;
            }
            if mem > 4096
                || !CHUNK.is_multiple_of(mem as usize)
                || !CHUNK.is_multiple_of(off as usize)
            {
                self.refuse(
                    dev,
                    path,
                    &format!("direct I/O needs {mem}-byte buffers and {off}-byte offsets"),
                );
                return false;
            }
        }
        match set_flags(fd, OFlags::DIRECT, OFlags::empty()) {
            Ok(()) => true,
            Err(e) => {
                self.refuse(dev, path, &format!("fcntl O_DIRECT: {e}"));
                false
            }
        }
    }

    /// Records that `dev` refused `O_DIRECT` and says so, once per filesystem.
    pub(crate) fn refuse(&self, dev: u64, path: &dyn fmt::Display, why: &str) {
        if self.refused.lock().unwrap().insert(dev) {
            tracing::warn!(
                path = %path,
                dev = format!("{}:{}", rustix::fs::major(dev), rustix::fs::minor(dev)),
                reason = why,
                "this filesystem refuses O_DIRECT; reading it buffered"
            );
        }
    }

    /// Devices that refused `O_DIRECT`, as `major:minor`.
    pub fn refused(&self) -> Vec<String> {
        self.refused
            .lock()
            .unwrap()
            .iter()
            .map(|d| format!("{}:{}", rustix::fs::major(*d), rustix::fs::minor(*d)))
            .collect()
    }
}

/// `(dio_mem_align, dio_offset_align)` from `statx`, if the kernel reports them.
fn dio_align(fd: BorrowedFd<'_>) -> Option<(u32, u32)> {
    let st = rustix::fs::statx(
        fd,
        "",
        rustix::fs::AtFlags::EMPTY_PATH,
        rustix::fs::StatxFlags::DIOALIGN,
    )
    .ok()?;
    if st.stx_mask & rustix::fs::StatxFlags::DIOALIGN.bits() == 0 {
        return None;
    }
    Some((st.stx_dio_mem_align, st.stx_dio_offset_align))
}

/// Sets `on` and clears `off` in the file status flags of `fd`.
pub(crate) fn set_flags(fd: BorrowedFd<'_>, on: OFlags, off: OFlags) -> rustix::io::Result<()> {
    let fl = rustix::fs::fcntl_getfl(fd)?;
    let want = (fl | on) & !off;
    if want != fl {
        rustix::fs::fcntl_setfl(fd, want)?;
    }
    Ok(())
}

/// A read request for a worker.
struct ReadCmd {
    buf: Buf,
    fd: Arc<OwnedFd>,
    len: u32,
    tag: Tag,
}

/// What a worker keeps with a read and sends back with its result.
#[derive(Debug)]
struct Tag {
    tx: Sender<Done>,
    epoch: u32,
    off: u64,
    tries: u32,
}

/// A finished read: `res` bytes (or `-errno`) at `off` into `buf`.
#[derive(Debug)]
struct Done {
    epoch: u32,
    off: u64,
    buf: Buf,
    res: i32,
}

/// The reader-side handle of one worker thread.
struct Worker {
    tx: Option<Sender<ReadCmd>>,
    wake: Arc<OwnedFd>,
    pool: Arc<Pool>,
    alive: Arc<AtomicBool>,
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("pool", &self.pool)
            .field("alive", &self.alive.load(Ordering::Relaxed))
            .finish()
    }
}

impl Worker {
    fn start(index: usize, buffers: usize) -> io::Result<Arc<Worker>> {
        let pool = Pool::new(buffers, CHUNK)?;
        let ring: Ring<Tag> = Ring::new(pool.clone())?;
        let wake = Arc::new(rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )?);
        let (tx, rx) = mpsc::channel();
        let alive = Arc::new(AtomicBool::new(true));
        let (w, a) = (wake.clone(), alive.clone());
        std::thread::Builder::new()
            .name(format!("cd-uring-{index}"))
            .spawn(move || worker_loop(ring, rx, w, a))?;
        Ok(Arc::new(Worker {
            tx: Some(tx),
            wake,
            pool,
            alive,
        }))
    }

    fn send(&self, cmd: ReadCmd) -> Result<(), ReadCmd> {
        match &self.tx {
            Some(tx) => tx.send(cmd).map_err(|e| e.0),
            None => Err(cmd),
        }
    }

    fn wake(&self) {
        let _ = rustix::io::write(&*self.wake, &1u64.to_ne_bytes());
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // The last handle is gone: disconnect the channel and wake the worker, which
        // exits once its reads in flight have completed.
        self.tx = None;
        self.wake();
    }
}

/// The worker thread: submit what arrives, hand back what completes.
fn worker_loop(
    mut ring: Ring<Tag>,
    rx: Receiver<ReadCmd>,
    wake: Arc<OwnedFd>,
    alive: Arc<AtomicBool>,
) {
    struct Alive(Arc<AtomicBool>);
    impl Drop for Alive {
        fn drop(&mut self) {
            self.0.store(false, Ordering::Release);
        }
    }
    let _alive = Alive(alive);
    ring.arm_wake(wake.as_fd());
    let mut closing = false;
    let mut events = Vec::new();
    loop {
        while !closing {
            match rx.try_recv() {
                Ok(c) => {
                    let off = c.tag.off;
                    if let Err((buf, _, tag)) = ring.push_read(c.buf, c.fd, off, c.len, c.tag) {
                        let _ = tag.tx.send(Done {
                            epoch: tag.epoch,
                            off,
                            buf,
                            res: -libc::EINVAL,
                        });
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => closing = true,
            }
        }
        if closing && ring.in_flight() == 0 {
            return;
        }
        if let Err(e) = ring.submit_and_wait(1) {
            tracing::error!(error = %e, "io_uring_enter failed; the file reader thread stops");
            return;
        }
        ring.reap(&mut events);
        for ev in events.drain(..) {
            match ev {
                Event::Wake => {
                    let mut b = [0u8; 8];
                    let _ = rustix::io::read(&*wake, &mut b);
                    if !closing {
                        ring.arm_wake(wake.as_fd());
                    }
                }
                Event::Read {
                    mut tag,
                    buf,
                    fd,
                    res,
                } => {
                    if (res == -libc::EAGAIN || res == -libc::EINTR) && tag.tries < MAX_RETRIES {
                        tag.tries += 1;
                        let (off, len) = (tag.off, buf.pool().buf_size() as u32);
                        if let Err((buf, _, tag)) = ring.push_read(buf, fd, off, len, tag) {
                            let _ = tag.tx.send(Done {
                                epoch: tag.epoch,
                                off,
                                buf,
                                res,
                            });
                        }
                        continue;
                    }
                    // If the reader is gone the send fails and drops `buf`, which
                    // returns it to the pool.
                    let _ = tag.tx.send(Done {
                        epoch: tag.epoch,
                        off: tag.off,
                        buf,
                        res,
                    });
                }
            }
        }
    }
}

/// Dedicated io_uring reader threads. See the module docs.
#[derive(Debug)]
pub struct UringService {
    workers: Vec<Arc<Worker>>,
    cfg: UringConfig,
    next: AtomicU64,
}

impl UringService {
    /// Starts the workers. Fails if io_uring cannot be used here (the error says why):
    /// not compiled in (`ENOSYS`), refused by seccomp or `kernel.io_uring_disabled`
    /// (`EPERM`), or the buffers cannot be pinned even at the smallest size.
    pub fn start(cfg: UringConfig) -> io::Result<UringService> {
        let threads = cfg.threads.max(1);
        let min = cfg.read_ahead + 1;
        let mut buffers = cfg.buffers_per_thread.max(min);
        let mut workers = Vec::with_capacity(threads);
        while workers.len() < threads {
            match Worker::start(workers.len(), buffers) {
                Ok(w) => workers.push(w),
                // Pinned memory is limited by RLIMIT_MEMLOCK without CAP_IPC_LOCK.
                Err(e) if e.raw_os_error() == Some(libc::ENOMEM) && buffers > min => {
                    buffers = (buffers / 2).max(min);
                    tracing::debug!(buffers, "io_uring: ENOMEM registering buffers; fewer");
                }
                Err(e) if !workers.is_empty() && e.raw_os_error() == Some(libc::ENOMEM) => break,
                Err(e) => return Err(e),
            }
        }
        let cfg = UringConfig {
            threads: workers.len(),
            buffers_per_thread: buffers,
            read_ahead: cfg.read_ahead,
        };
        Ok(UringService {
            workers,
            cfg,
            next: AtomicU64::new(0),
        })
    }

    /// The shape actually started (after any shrinking to fit `RLIMIT_MEMLOCK`).
    pub fn config(&self) -> UringConfig {
        self.cfg
    }

    /// Free buffers over all pools, and the total.
    pub fn buffers(&self) -> (usize, usize) {
        self.workers.iter().fold((0, 0), |(f, t), w| {
            (f + w.pool.free_count(), t + w.pool.count())
        })
    }

    /// A reader for the regular file `fd` of `size` bytes, or `None` when every pool
    /// is exhausted (the caller reads this file synchronously).
    pub(crate) fn reader(&self, fd: Arc<OwnedFd>, size: u64) -> Option<UringReader> {
        // The worker with the most free buffers; round-robin among equals.
        let start = self.next.fetch_add(1, Ordering::Relaxed) as usize;
        let n = self.workers.len();
        let worker = (0..n)
            .map(|i| &self.workers[(start + i) % n])
            .filter(|w| w.alive.load(Ordering::Acquire))
            .max_by_key(|w| w.pool.free_count())?;
        let chunks = size.div_ceil(CHUNK as u64).max(1);
        let want = usize::try_from(chunks)
            .unwrap_or(usize::MAX)
            .min(self.cfg.read_ahead + 1);
        let idle: Vec<Buf> = std::iter::from_fn(|| worker.pool.take())
            .take(want)
            .collect();
        if idle.is_empty() {
            return None;
        }
        let (tx, rx) = mpsc::channel();
        Some(UringReader {
            worker: worker.clone(),
            fd,
            size,
            idle,
            tx,
            rx,
            epoch: 0,
            next_off: 0,
            pending: VecDeque::new(),
            ready: Vec::new(),
            cur: None,
            eof: false,
            failed: None,
            direct: None,
        })
    }
}

/// The chunk being consumed: `len` valid bytes of `buf`, `pos` of them handed out.
#[derive(Debug)]
struct Cur {
    buf: Buf,
    len: usize,
    pos: usize,
}

/// Reads one file in order through a worker, several chunks ahead. See the module docs.
pub(crate) struct UringReader {
    worker: Arc<Worker>,
    fd: Arc<OwnedFd>,
    /// Size at open: no read is started at or past it (a file that grew is caught by
    /// [`SendFile::finish`](super::SendFile::finish)).
    size: u64,
    /// Buffers of this reader not in flight and not being consumed.
    idle: Vec<Buf>,
    tx: Sender<Done>,
    rx: Receiver<Done>,
    /// Bumped whenever queued reads are abandoned; their completions are recognised
    /// by the old value and only their buffers are kept.
    epoch: u32,
    /// Offset of the next read to start.
    next_off: u64,
    /// Offsets of this epoch's reads in flight or completed, in file order.
    pending: VecDeque<u64>,
    /// Completions of this epoch not yet consumed.
    ready: Vec<Done>,
    cur: Option<Cur>,
    eof: bool,
    failed: Option<Errno>,
    /// `Some` while the file is open `O_DIRECT`: the policy to report a refusal to
    /// and the file's `st_dev`.
    direct: Option<(Arc<DirectPolicy>, u64)>,
}

impl fmt::Debug for UringReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UringReader")
            .field("size", &self.size)
            .field("next_off", &self.next_off)
            .field("pending", &self.pending.len())
            .field("buffers", &self.idle.len())
            .field("direct", &self.direct.is_some())
            .finish()
    }
}

impl UringReader {
    /// Notes that `fd` was switched to `O_DIRECT` (see [`DirectPolicy::enable`]), so an
    /// `EINVAL` is reported to `policy` and answered by reading buffered.
    pub(crate) fn set_direct(&mut self, policy: Arc<DirectPolicy>, dev: u64) {
        self.direct = Some((policy, dev));
    }

    /// Makes sure a chunk with bytes not yet handed out is at hand; false at end of
    /// file.
    pub(crate) fn fill(&mut self, path: &dyn fmt::Display) -> Result<bool, Errno> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        match self.cur.take() {
            Some(c) if c.pos < c.len => {
                self.cur = Some(c);
                return Ok(true);
            }
            Some(c) => self.idle.push(c.buf),
            None => {}
        }
        loop {
            if self.eof {
                return Ok(false);
            }
            self.top_up()?;
            let Some(&off) = self.pending.front() else {
                self.eof = true;
                continue;
            };
            let done = self.wait_for(off)?;
            self.pending.pop_front();
            match done.res {
                n if n > 0 => {
                    let n = (n as usize).min(CHUNK);
                    if n < CHUNK {
                        // End of file as the kernel saw it, or a short read: what was
                        // queued behind it does not follow these bytes.
                        self.restart(off + n as u64);
                        if self.direct.is_some() && self.next_off < self.size {
                            // Resuming mid-file at an unaligned offset: buffered.
                            self.direct = None;
                            let _ = set_flags(self.fd.as_fd(), OFlags::empty(), OFlags::DIRECT);
                        }
                    }
                    self.cur = Some(Cur {
                        buf: done.buf,
                        len: n,
                        pos: 0,
                    });
                    return Ok(true);
                }
                0 => {
                    self.idle.push(done.buf);
                    self.restart(self.size);
                    self.eof = true;
                    return Ok(false);
                }
                neg => {
                    self.idle.push(done.buf);
                    let e = Errno::from_raw_os_error(-neg);
                    if e == Errno::INVAL
                        && let Some((policy, dev)) = self.direct.take()
                    {
                        // The filesystem took the flag but not the read: buffered from here.
                        policy.refuse(dev, path, "EINVAL on an O_DIRECT read");
                        set_flags(self.fd.as_fd(), OFlags::empty(), OFlags::DIRECT)?;
                        self.restart(off);
                        continue;
                    }
                    self.failed = Some(e);
                    return Err(e);
                }
            }
        }
    }

    /// Up to `max` bytes of the current chunk not yet handed out (after [`fill`]
    /// returned true), marked as handed out.
    ///
    /// [`fill`]: UringReader::fill
    pub(crate) fn take(&mut self, max: usize) -> &[u8] {
        match &mut self.cur {
            Some(c) => {
                let start = c.pos;
                let end = c.len.min(start.saturating_add(max));
                c.pos = end;
                &c.buf.bytes(end)[start..]
            }
            None => &[],
        }
    }

    /// Starts reads into every idle buffer, up to the size at open.
    fn top_up(&mut self) -> Result<(), Errno> {
        let mut sent = false;
        while self.next_off < self.size {
            let Some(buf) = self.idle.pop() else { break };
            let cmd = ReadCmd {
                buf,
                fd: self.fd.clone(),
                len: CHUNK as u32,
                tag: Tag {
                    tx: self.tx.clone(),
                    epoch: self.epoch,
                    off: self.next_off,
                    tries: 0,
                },
            };
            if let Err(cmd) = self.worker.send(cmd) {
                self.idle.push(cmd.buf);
                return Err(self.worker_gone());
            }
            self.pending.push_back(self.next_off);
            self.next_off += CHUNK as u64;
            sent = true;
        }
        if sent {
            self.worker.wake();
        }
        Ok(())
    }

    /// Waits for the completion of this epoch's read at `off`.
    fn wait_for(&mut self, off: u64) -> Result<Done, Errno> {
        loop {
            if let Some(i) = self.ready.iter().position(|d| d.off == off) {
                return Ok(self.ready.swap_remove(i));
            }
            match self.rx.recv_timeout(Duration::from_millis(500)) {
                Ok(d) if d.epoch == self.epoch => self.ready.push(d),
                Ok(d) => self.idle.push(d.buf),
                Err(RecvTimeoutError::Timeout) => {
                    if !self.worker.alive.load(Ordering::Acquire) {
                        return Err(self.worker_gone());
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return Err(self.worker_gone()),
            }
        }
    }

    fn worker_gone(&mut self) -> Errno {
        tracing::error!("the io_uring reader thread is gone");
        self.failed = Some(Errno::IO);
        Errno::IO
    }

    /// Abandons the reads queued so far and continues at `off`.
    fn restart(&mut self, off: u64) {
        self.epoch = self.epoch.wrapping_add(1);
        self.pending.clear();
        self.idle.extend(self.ready.drain(..).map(|d| d.buf));
        self.next_off = off;
    }
}
