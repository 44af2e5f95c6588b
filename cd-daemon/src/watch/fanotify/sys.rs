//! Raw system calls for the fanotify backend that neither `std` nor `rustix` wraps:
//! `fanotify_init`, `fanotify_mark`, `name_to_handle_at`, `open_by_handle_at`.
//!
//! One syscall per function; every `unsafe` block says why it is sound. Everything
//! else (read, statx, readlinkat, openat) goes through safe `rustix` calls in the
//! parent module.
#![expect(
    unsafe_code,
    reason = "fanotify and file-handle syscalls have no safe wrapper in std or rustix"
)]

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Longest file handle the kernel produces (`MAX_HANDLE_SZ` in `linux/exportfs.h`).
pub(super) const MAX_HANDLE_SZ: usize = 128;

/// `fanotify_init(2)`: a new notification group.
pub(super) fn fanotify_init(flags: u32, event_f_flags: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain integer arguments; the kernel returns a new descriptor or -1.
    let fd = unsafe { libc::fanotify_init(flags, event_f_flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `fanotify_mark(2)` on the object `dir` refers to (no path argument, so the mark
/// lands on exactly the object the caller opened).
pub(super) fn fanotify_mark(
    group: BorrowedFd<'_>,
    flags: u32,
    mask: u64,
    dir: BorrowedFd<'_>,
) -> io::Result<()> {
    // SAFETY: both descriptors are borrowed and stay open for the call; a null
    // pathname is documented to mean "the object `dirfd` refers to".
    let rc = unsafe {
        libc::fanotify_mark(
            group.as_raw_fd(),
            flags,
            mask,
            dir.as_raw_fd(),
            std::ptr::null(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A `struct file_handle` laid out in a `u32` buffer so that its alignment (4) holds.
struct HandleBuf(Vec<u32>);

impl HandleBuf {
    /// Header words: `handle_bytes` and `handle_type`.
    const HEADER_WORDS: usize = 2;

    fn with_capacity(bytes: usize) -> Self {
        let mut v = vec![0u32; Self::HEADER_WORDS + bytes.div_ceil(4)];
        v[0] = u32::try_from(bytes).unwrap_or(u32::MAX);
        Self(v)
    }

    fn from_handle(handle_type: i32, handle: &[u8]) -> Self {
        let mut b = Self::with_capacity(handle.len());
        b.0[1] = u32::from_ne_bytes(handle_type.to_ne_bytes());
        for (i, chunk) in handle.chunks(4).enumerate() {
            let mut w = [0u8; 4];
            w[..chunk.len()].copy_from_slice(chunk);
            b.0[Self::HEADER_WORDS + i] = u32::from_ne_bytes(w);
        }
        b
    }

    fn handle_type(&self) -> i32 {
        i32::from_ne_bytes(self.0[1].to_ne_bytes())
    }

    fn handle_bytes(&self) -> Vec<u8> {
        let len = usize::try_from(self.0[0]).unwrap_or(usize::MAX);
        let words = &self.0[Self::HEADER_WORDS..];
        let mut out: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
        out.truncate(len.min(words.len() * 4));
        out
    }

    fn as_mut_ptr(&mut self) -> *mut libc::file_handle {
        self.0.as_mut_ptr().cast()
    }
}

/// `name_to_handle_at(fd, "", AT_EMPTY_PATH)`: the file handle of the object `fd`
/// refers to, as (`handle_type`, handle bytes, mount id).
pub(super) fn name_to_handle_fd(fd: BorrowedFd<'_>) -> io::Result<(i32, Vec<u8>, i32)> {
    let mut buf = HandleBuf::with_capacity(MAX_HANDLE_SZ);
    let mut mount_id: libc::c_int = 0;
    let empty: &CStr = c"";
    // SAFETY: `buf` is a 4-aligned `struct file_handle` whose `handle_bytes` says how
    // many bytes follow the header (MAX_HANDLE_SZ, all allocated); `empty` is a valid
    // NUL-terminated string; `mount_id` is a valid out-pointer; `fd` stays open.
    let rc = unsafe {
        libc::name_to_handle_at(
            fd.as_raw_fd(),
            empty.as_ptr(),
            buf.as_mut_ptr(),
            &raw mut mount_id,
            libc::AT_EMPTY_PATH,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((buf.handle_type(), buf.handle_bytes(), mount_id))
}

/// `open_by_handle_at(2)`: opens the object a file handle names, on the filesystem
/// `mount` is on (needs CAP_DAC_READ_SEARCH).
pub(super) fn open_by_handle_at(
    mount: BorrowedFd<'_>,
    handle_type: i32,
    handle: &[u8],
    flags: libc::c_int,
) -> io::Result<OwnedFd> {
    let mut buf = HandleBuf::from_handle(handle_type, handle);
    // SAFETY: `buf` is a 4-aligned `struct file_handle` with `handle_bytes` equal to
    // the number of initialised bytes that follow; the kernel only reads it.
    let fd = unsafe { libc::open_by_handle_at(mount.as_raw_fd(), buf.as_mut_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly opened descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Takes ownership of a descriptor the kernel put into an event (only in non-FID
/// modes, which this backend does not use) so that it is closed, never leaked.
pub(super) fn adopt_event_fd(fd: i32) -> Option<OwnedFd> {
    // SAFETY: a non-negative `fd` in an event read from our fanotify group was just
    // installed in our table by that read and belongs to the reader.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Operations the fidelity tests perform that have no safe wrapper.
#[cfg(test)]
pub(super) mod test_ops {
    use super::*;
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;

    /// `truncate(2)` by path (no open, no close).
    pub(crate) fn truncate(path: &Path, len: i64) -> io::Result<()> {
        let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
        // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
        if unsafe { libc::truncate(c.as_ptr(), len) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// `splice(2)` from a pipe into a file at its current offset.
    pub(crate) fn splice(
        pipe_in: BorrowedFd<'_>,
        out: BorrowedFd<'_>,
        len: usize,
    ) -> io::Result<usize> {
        // SAFETY: both descriptors are open; null offsets mean "use the file offset".
        let n = unsafe {
            libc::splice(
                pipe_in.as_raw_fd(),
                std::ptr::null_mut(),
                out.as_raw_fd(),
                std::ptr::null_mut(),
                len,
                0,
            )
        };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// A shared read-write mapping of `len` bytes of `fd`.
    pub(crate) struct Mapping {
        ptr: *mut libc::c_void,
        len: usize,
    }

    /// `mmap(PROT_READ|PROT_WRITE, MAP_SHARED)`.
    pub(crate) fn mmap_shared(fd: BorrowedFd<'_>, len: usize) -> io::Result<Mapping> {
        // SAFETY: a fresh mapping chosen by the kernel (null hint) over an open fd;
        // no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { ptr, len })
    }

    impl Mapping {
        /// Stores `data` at the start of the mapping (a plain memory write).
        pub(crate) fn write(&mut self, data: &[u8]) {
            let n = data.len().min(self.len);
            // SAFETY: the mapping is `len` writable bytes owned by `self`; `data` is a
            // separate allocation, so the ranges do not overlap.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.cast::<u8>(), n) };
        }

        /// `msync(MS_SYNC)`.
        pub(crate) fn msync(&self) -> io::Result<()> {
            // SAFETY: `ptr`/`len` describe a live mapping owned by `self`.
            if unsafe { libc::msync(self.ptr, self.len, libc::MS_SYNC) } < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        }
    }

    impl Drop for Mapping {
        /// `munmap(2)`.
        fn drop(&mut self) {
            // SAFETY: `ptr`/`len` describe a live mapping owned by `self`, unmapped once.
            unsafe { libc::munmap(self.ptr, self.len) };
        }
    }

    /// One `IORING_OP_WRITE` of `data` at offset 0 through a fresh io_uring.
    pub(crate) fn io_uring_write(fd: BorrowedFd<'_>, data: &[u8]) -> io::Result<i32> {
        use io_uring::{IoUring, opcode, types};
        let mut ring = IoUring::new(4)?;
        let len = u32::try_from(data.len()).map_err(io::Error::other)?;
        let sqe = opcode::Write::new(types::Fd(fd.as_raw_fd()), data.as_ptr(), len)
            .offset(0)
            .build();
        // SAFETY: `data` and `fd` outlive the operation: we wait for its completion
        // below before returning.
        unsafe { ring.submission().push(&sqe) }.map_err(io::Error::other)?;
        ring.submit_and_wait(1)?;
        let cqe = ring
            .completion()
            .next()
            .ok_or_else(|| io::Error::other("no completion"))?;
        Ok(cqe.result())
    }
}
