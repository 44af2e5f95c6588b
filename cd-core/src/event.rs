//! [`FsEvent`]: one file-system change as a capture backend reports it.
//!
//! Every backend (eBPF, fanotify) decodes what the kernel gave it into this one
//! form, already relative to the content root it watches, and feeds the
//! [`Coalescer`](crate::coalesce::Coalescer). A backend that lost events says so
//! with [`EventKind::Lost`], naming the subtree to rescan (`None` = the whole root),
//! so loss is never silent.

use crate::path::RelPath;

/// What happened. Paths are relative to the watched content root.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// A file was opened for writing (O_WRONLY/O_RDWR, O_TRUNC, O_CREAT or an
    /// io_uring open); content may change until the matching close.
    OpenWrite,
    /// Content was written (write, pwrite, writev, splice, copy_file_range,
    /// sendfile, io_uring write, fallocate) or truncated.
    Modify,
    /// A writable mapping was created (`mmap(PROT_WRITE, MAP_SHARED)`): content may
    /// change without further events until the mapping goes away.
    MmapWrite,
    /// A file descriptor opened for writing was closed.
    CloseWrite,
    /// A regular file or special file was created (creat, open O_CREAT, mknod).
    Create,
    /// A directory was created.
    Mkdir,
    /// A symlink was created.
    Symlink,
    /// A hard link was created at `path` (to an existing file).
    Link,
    /// Mode, owner or timestamps changed.
    Attrib,
    /// A non-directory was removed.
    Unlink,
    /// A directory was removed.
    Rmdir,
    /// `path` was renamed to `path2` (both inside the root). A rename into the root
    /// from outside arrives as `Create` (or `Mkdir`) of the new path; a rename out of
    /// the root as `Unlink` (or `Rmdir`) of the old one. A directory renamed in brings
    /// contents no event described: report `Mkdir` followed by `Lost` of it.
    Rename,
    /// Events were lost (ring buffer full, queue overflow, sequence gap): rescan
    /// `path` (or the whole root when `path` is `None`).
    Lost,
}

/// One decoded change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsEvent {
    pub kind: EventKind,
    /// The path the event is about; `None` only for `Lost` of the whole root.
    pub path: Option<RelPath>,
    /// The new path of a `Rename`.
    pub path2: Option<RelPath>,
    /// True when the object is a directory (for `Rename`, `Attrib`, `Lost`).
    pub is_dir: bool,
    /// Process that made the change, when the backend knows it (0 otherwise).
    pub pid: u32,
}
