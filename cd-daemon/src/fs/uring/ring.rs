//! The unsafe core of the io_uring reader: a pool of registered buffers and a ring
//! that reads into them.
//!
//! # Ownership of buffer memory
//!
//! A [`Pool`] is one private anonymous mapping cut into `count` buffers of `buf_size`
//! bytes, registered with the ring as fixed buffers. Each buffer index is owned by at
//! most one [`Buf`] at a time: [`Pool::take`] hands out the indices of its free list,
//! and dropping a `Buf` puts its index back. Only the holder of a `Buf` can look at its
//! memory ([`Buf::bytes`]).
//!
//! [`Ring::push_read`] takes the `Buf` *by value* and keeps it, together with an
//! `Arc` of the file descriptor, in the ring's table of operations until the kernel
//! posts the completion; only [`Ring::reap`] gives it back, and only for a completion
//! the kernel has posted. So no safe code can see a buffer the kernel may still write
//! into, and the descriptor number cannot be closed and reused under a pending read.
//!
//! If a `Ring` is dropped with reads still in flight (a panic in the worker), their
//! `Buf`s and descriptors are leaked, never recycled: the memory stays mapped for the
//! life of the process (each leaked `Buf` keeps the pool alive) and nobody is handed
//! that index again. The pool is unmapped only when its last `Buf` and its ring are
//! gone, that is, when no read into it can be pending.
//!
//! Everything else (the worker loop, read-ahead, retries) is safe code in the parent
//! module.
#![expect(
    unsafe_code,
    reason = "io_uring submission and fixed-buffer registration hand raw memory to the \
              kernel; this module owns that memory and every pointer given away"
)]

use std::fmt;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use io_uring::{IoUring, Probe, opcode, squeue, types};
use rustix::mm::{MapFlags, ProtFlags};

/// Memory of a [`Pool`]: one private anonymous mapping, page aligned.
struct Arena {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the arena is plain memory with no thread affinity. Who may read or write
// which part of it is decided by `Buf` ownership (one owner per buffer index) and by
// the ring's table of in-flight reads, both of which are themselves thread-safe.
unsafe impl Send for Arena {}
// SAFETY: as above; shared references to the arena only ever produce `&[u8]` views of
// buffers whose `Buf` the caller holds, so no two threads mutate the same bytes.
unsafe impl Sync for Arena {}

impl Arena {
    fn new(len: usize) -> io::Result<Arena> {
        // SAFETY: a fresh private anonymous mapping at an address the kernel chooses;
        // it aliases no existing memory.
        let p = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE,
            )
        }?;
        let ptr = NonNull::new(p.cast::<u8>()).ok_or(io::ErrorKind::OutOfMemory)?;
        Ok(Arena { ptr, len })
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: `ptr..ptr+len` is the mapping created in `new`, page aligned. The
        // arena is dropped with its `Pool`, i.e. when no `Buf` (each holds the pool)
        // and no `Ring` (holds the pool; leaks the `Buf`s of unfinished reads) is
        // left, so no reference into it exists and no read into it is pending.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A set of equal-sized, page-aligned buffers for one ring. See the module docs.
pub(crate) struct Pool {
    arena: Arena,
    buf_size: usize,
    count: usize,
    free: Mutex<Vec<u16>>,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("buf_size", &self.buf_size)
            .field("count", &self.count)
            .field("free", &self.free_count())
            .finish()
    }
}

impl Pool {
    /// `count` buffers of `buf_size` bytes (`buf_size` a multiple of 4096, so every
    /// buffer is aligned for `O_DIRECT`).
    pub(crate) fn new(count: usize, buf_size: usize) -> io::Result<Arc<Pool>> {
        if count == 0
            || count > usize::from(u16::MAX)
            || buf_size == 0
            || !buf_size.is_multiple_of(4096)
        {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        let len = count
            .checked_mul(buf_size)
            .ok_or(io::ErrorKind::InvalidInput)?;
        let arena = Arena::new(len)?;
        // Reverse, so that `pop` hands out index 0 first.
        let free = (0..count as u16).rev().collect();
        Ok(Arc::new(Pool {
            arena,
            buf_size,
            count,
            free: Mutex::new(free),
        }))
    }

    /// A free buffer, if there is one.
    pub(crate) fn take(self: &Arc<Self>) -> Option<Buf> {
        let idx = self.free.lock().unwrap().pop()?;
        Some(Buf {
            pool: self.clone(),
            idx,
        })
    }

    pub(crate) fn free_count(&self) -> usize {
        self.free.lock().unwrap().len()
    }

    pub(crate) fn count(&self) -> usize {
        self.count
    }

    pub(crate) fn buf_size(&self) -> usize {
        self.buf_size
    }

    fn buf_ptr(&self, idx: u16) -> *mut u8 {
        // `idx < count` (only `new` creates indices), so the offset stays inside the
        // mapping; `wrapping_add` keeps this free of `unsafe`.
        self.arena
            .ptr
            .as_ptr()
            .wrapping_add(usize::from(idx) * self.buf_size)
    }
}

/// Exclusive ownership of one buffer of a [`Pool`]. Dropping it returns the buffer.
pub(crate) struct Buf {
    pool: Arc<Pool>,
    idx: u16,
}

impl fmt::Debug for Buf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Buf({})", self.idx)
    }
}

impl Buf {
    /// The first `len` bytes of the buffer (`len` is clamped to the buffer size).
    pub(crate) fn bytes(&self, len: usize) -> &[u8] {
        let len = len.min(self.pool.buf_size);
        // SAFETY: the pointer is inside the pool's mapping, which lives as long as
        // `self.pool`; `len` does not exceed the buffer. This `Buf` is the only owner
        // of index `idx`, and while it exists no read is pending into it (a pending
        // read holds the `Buf` itself, see `Ring::push_read`), so nothing writes these
        // bytes while the returned borrow of `self` lives. The mapping was zeroed by
        // the kernel when created, so every byte is initialised.
        unsafe { std::slice::from_raw_parts(self.pool.buf_ptr(self.idx), len) }
    }

    pub(crate) fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        self.pool.free.lock().unwrap().push(self.idx);
    }
}

/// `user_data` of the wake-up poll; reads use their slot index.
const WAKE: u64 = u64::MAX;

/// A read the kernel owns until its completion is reaped.
struct Pending<T> {
    buf: ManuallyDrop<Buf>,
    fd: ManuallyDrop<Arc<OwnedFd>>,
    tag: T,
}

/// What [`Ring::reap`] found.
#[derive(Debug)]
pub(crate) enum Event<T> {
    /// The wake-up poll fired; arm it again with [`Ring::arm_wake`].
    Wake,
    /// A read finished: `res` is the byte count or `-errno`; the buffer and the
    /// descriptor are the caller's again.
    Read {
        tag: T,
        buf: Buf,
        fd: Arc<OwnedFd>,
        res: i32,
    },
}

/// An io_uring with the buffers of one [`Pool`] registered. See the module docs.
pub(crate) struct Ring<T> {
    // Declared first so it is dropped (the ring closed) before `pool`.
    ring: IoUring,
    pool: Arc<Pool>,
    ops: Vec<Option<Pending<T>>>,
    free_slots: Vec<usize>,
    in_flight: usize,
}

impl<T> fmt::Debug for Ring<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ring")
            .field("pool", &self.pool)
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

impl<T> Ring<T> {
    /// A ring big enough for one read per buffer of `pool` plus the wake-up poll,
    /// with the pool's buffers registered. Fails if io_uring is unavailable (`ENOSYS`,
    /// `EPERM` under seccomp or `kernel.io_uring_disabled`), lacks `READ_FIXED` or
    /// `POLL_ADD`, or the buffers cannot be pinned (`ENOMEM`: `RLIMIT_MEMLOCK`).
    pub(crate) fn new(pool: Arc<Pool>) -> io::Result<Ring<T>> {
        let entries = u32::try_from((pool.count + 1).next_power_of_two())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let ring = IoUring::new(entries)?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for (code, name) in [
            (opcode::ReadFixed::CODE, "READ_FIXED"),
            (opcode::PollAdd::CODE, "POLL_ADD"),
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("the kernel's io_uring has no {name}"),
                ));
            }
        }
        let iov: Vec<libc::iovec> = (0..pool.count as u16)
            .map(|i| libc::iovec {
                iov_base: pool.buf_ptr(i).cast(),
                iov_len: pool.buf_size,
            })
            .collect();
        // SAFETY: every iovec lies inside the pool's mapping. The ring holds an `Arc`
        // of the pool and is dropped before it (field order), and the mapping outlives
        // any read still pending at that point (see `Drop for Ring`), so the memory
        // stays valid for as long as the kernel may use the registration.
        unsafe { ring.submitter().register_buffers(&iov) }?;
        Ok(Ring {
            ring,
            pool,
            ops: Vec::new(),
            free_slots: Vec::new(),
            in_flight: 0,
        })
    }

    /// Reads submitted and not yet reaped.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Queues a read of `len` bytes at `offset` of `fd` into `buf` (a fixed-buffer
    /// read). The buffer and the descriptor stay with the ring until [`reap`]
    /// returns them. Hands everything back if `buf` belongs to another pool or `len`
    /// exceeds it.
    ///
    /// [`reap`]: Ring::reap
    pub(crate) fn push_read(
        &mut self,
        buf: Buf,
        fd: Arc<OwnedFd>,
        offset: u64,
        len: u32,
        tag: T,
    ) -> Result<(), (Buf, Arc<OwnedFd>, T)> {
        if !Arc::ptr_eq(&buf.pool, &self.pool) || len as usize > self.pool.buf_size {
            return Err((buf, fd, tag));
        }
        let slot = match self.free_slots.pop() {
            Some(s) => s,
            None => {
                self.ops.push(None);
                self.ops.len() - 1
            }
        };
        let sqe = opcode::ReadFixed::new(
            types::Fd(fd.as_raw_fd()),
            self.pool.buf_ptr(buf.idx),
            len,
            buf.idx,
        )
        .offset(offset)
        .build()
        .user_data(slot as u64);
        self.ops[slot] = Some(Pending {
            buf: ManuallyDrop::new(buf),
            fd: ManuallyDrop::new(fd),
            tag,
        });
        self.in_flight += 1;
        // SAFETY: the SQE names buffer `idx` of the registered pool and a pointer and
        // length inside it. The `Buf` for that index has just been moved into
        // `self.ops[slot]`, so no one else can read or hand out that memory until the
        // completion for `slot` is reaped; if the ring is dropped first, the `Buf` is
        // leaked (see `Drop for Ring`). The descriptor is kept open by the `Arc` stored
        // beside it for the same span.
        unsafe { self.push(&sqe) };
        Ok(())
    }

    /// Arms a one-shot `POLLIN` poll on `fd` (an eventfd) that completes as
    /// [`Event::Wake`].
    pub(crate) fn arm_wake(&mut self, fd: BorrowedFd<'_>) {
        let sqe = opcode::PollAdd::new(types::Fd(fd.as_raw_fd()), libc::POLLIN as u32)
            .build()
            .user_data(WAKE);
        // SAFETY: a poll request refers to no user memory; the kernel takes its own
        // reference to the file when the request is submitted.
        unsafe { self.push(&sqe) };
    }

    /// # Safety
    ///
    /// Any memory `sqe` refers to must stay valid until its completion is reaped.
    unsafe fn push(&mut self, sqe: &squeue::Entry) {
        loop {
            // SAFETY: forwarded from the caller.
            if unsafe { self.ring.submission().push(sqe) }.is_ok() {
                return;
            }
            // The queue holds one entry per buffer plus the poll, so it is never full
            // in practice; if it is, hand what is queued to the kernel and try again.
            let _ = self.ring.submit();
        }
    }

    /// Submits what is queued and waits until at least `want` completions are ready.
    pub(crate) fn submit_and_wait(&mut self, want: usize) -> io::Result<()> {
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // Completions are waiting to be reaped first (CQ full): let the caller reap.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Moves every posted completion into `out`.
    pub(crate) fn reap(&mut self, out: &mut Vec<Event<T>>) {
        let mut cq = self.ring.completion();
        cq.sync();
        let done: Vec<(u64, i32)> = cq.map(|c| (c.user_data(), c.result())).collect();
        for (ud, res) in done {
            if ud == WAKE {
                out.push(Event::Wake);
                continue;
            }
            let slot = ud as usize;
            let Some(p) = self.ops.get_mut(slot).and_then(Option::take) else {
                continue;
            };
            self.free_slots.push(slot);
            self.in_flight -= 1;
            let Pending { buf, fd, tag } = p;
            // The kernel posted this read's completion: it no longer touches the
            // buffer, which is the caller's again.
            out.push(Event::Read {
                tag,
                buf: ManuallyDrop::into_inner(buf),
                fd: ManuallyDrop::into_inner(fd),
                res,
            });
        }
    }
}

impl<T> Drop for Ring<T> {
    fn drop(&mut self) {
        // Reads still pending keep their buffer and descriptor forever: the kernel may
        // complete them after the ring is closed. (`ManuallyDrop` fields are simply
        // not dropped; the tag is.)
        let leaked = self.ops.iter().filter(|o| o.is_some()).count();
        if leaked > 0 {
            tracing::warn!(
                reads = leaked,
                "io_uring closed with reads in flight; their buffers are retired"
            );
        }
    }
}
