//! How [`SendFile`](super::SendFile) reads file content: through io_uring worker
//! threads with registered buffers (see [`super::uring`]), or with `read(2)` on the
//! calling thread.
//!
//! The node picks once at start ([`FileIo::start`], then [`install`]): io_uring is
//! probed (ring creation, opcode probe, buffer registration), and when it cannot be
//! used (seccomp in a container gives `EPERM`/`ENOSYS`, `kernel.io_uring_disabled`
//! gives `EPERM`, an old kernel lacks `READ_FIXED`) the node says why and reads
//! synchronously. [`current`] is what `SendFile::open` uses: the installed choice, or
//! synchronous reads if nothing was installed (tools, tests).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use serde::Serialize;

use super::uring::{CHUNK, DirectPolicy, UringConfig, UringService};

/// The `[node] file_io` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FileIoChoice {
    /// io_uring where the kernel allows it, else `read(2)` (the reason is reported).
    IoUring,
    /// Always `read(2)`.
    Sync,
}

/// The file read path of this process. See the module docs.
#[derive(Debug)]
pub struct FileIo {
    uring: Option<UringService>,
    /// `Some` when `O_DIRECT` was asked for and io_uring is in use.
    direct: Option<Arc<DirectPolicy>>,
    requested: FileIoChoice,
    direct_requested: bool,
    /// Why io_uring is not used although it was asked for.
    fallback: Option<String>,
    /// Files read synchronously because every buffer pool was busy.
    sync_files: AtomicU64,
}

impl FileIo {
    /// `read(2)` on the calling thread.
    pub fn sync() -> FileIo {
        FileIo {
            uring: None,
            direct: None,
            requested: FileIoChoice::Sync,
            direct_requested: false,
            fallback: None,
            sync_files: AtomicU64::new(0),
        }
    }

    /// Probes and starts what `choice` asks for, with the default shape, and logs the
    /// path chosen.
    pub fn start(choice: FileIoChoice, direct_io: bool) -> FileIo {
        FileIo::start_with(choice, direct_io, UringConfig::default())
    }

    /// As [`start`](Self::start) with an explicit shape.
    pub fn start_with(choice: FileIoChoice, direct_io: bool, cfg: UringConfig) -> FileIo {
        let probe = match choice {
            FileIoChoice::IoUring => Some(UringService::start(cfg)),
            FileIoChoice::Sync => None,
        };
        let io = FileIo::from_probe(choice, direct_io, probe);
        io.log();
        io
    }

    /// The choice given the outcome of starting io_uring (`None`: not tried).
    pub(crate) fn from_probe(
        choice: FileIoChoice,
        direct_io: bool,
        probe: Option<io::Result<UringService>>,
    ) -> FileIo {
        let (uring, fallback) = match probe {
            Some(Ok(s)) => (Some(s), None),
            Some(Err(e)) => (None, Some(format!("io_uring unavailable: {e}"))),
            None => (None, None),
        };
        let direct = (direct_io && uring.is_some()).then(|| Arc::new(DirectPolicy::default()));
        FileIo {
            uring,
            direct,
            requested: choice,
            direct_requested: direct_io,
            fallback,
            sync_files: AtomicU64::new(0),
        }
    }

    fn log(&self) {
        match (&self.uring, &self.fallback) {
            (Some(s), _) => {
                let c = s.config();
                tracing::info!(
                    threads = c.threads,
                    buffers_per_thread = c.buffers_per_thread,
                    buffer_kib = CHUNK / 1024,
                    read_ahead = c.read_ahead,
                    direct_io = self.direct.is_some(),
                    "file reads: io_uring"
                );
            }
            (None, Some(why)) => {
                tracing::info!(reason = %why, direct_io_ignored = self.direct_requested, "file reads: sync (read(2))");
            }
            (None, None) => tracing::info!("file reads: sync (read(2)), as configured"),
        }
    }

    /// `"io_uring"` or `"sync"`: the path in use.
    pub fn name(&self) -> &'static str {
        if self.uring.is_some() {
            "io_uring"
        } else {
            "sync"
        }
    }

    /// The io_uring service, when that is the path in use.
    pub fn uring(&self) -> Option<&UringService> {
        self.uring.as_ref()
    }

    pub(crate) fn direct(&self) -> Option<&Arc<DirectPolicy>> {
        self.direct.as_ref()
    }

    pub(crate) fn note_sync_file(&self) {
        self.sync_files.fetch_add(1, Ordering::Relaxed);
    }

    /// Files read with `read(2)` although io_uring is in use (every pool was busy).
    pub fn sync_files(&self) -> u64 {
        self.sync_files.load(Ordering::Relaxed)
    }

    /// Details for the node's status.
    pub fn status(&self) -> serde_json::Value {
        let c = self.uring.as_ref().map(|s| s.config());
        let free = self.uring.as_ref().map(|s| s.buffers().0);
        serde_json::json!({
            "path": self.name(),
            "requested": self.requested,
            "fallback_reason": self.fallback,
            "direct_io": self.direct.is_some(),
            "direct_io_refused_devices": self.direct.as_ref().map(|d| d.refused()).unwrap_or_default(),
            "threads": c.map(|c| c.threads),
            "buffers_per_thread": c.map(|c| c.buffers_per_thread),
            "buffers_free": free,
            "buffer_bytes": c.map(|_| CHUNK),
            "read_ahead": c.map(|c| c.read_ahead),
            "files_read_sync_pools_busy": self.sync_files(),
        })
    }
}

static INSTALLED: OnceLock<FileIo> = OnceLock::new();
static SYNC: OnceLock<FileIo> = OnceLock::new();

/// Makes `io` the path [`current`] returns for the rest of the process. The first
/// call wins; a later one is dropped (and says so) and the installed one returned.
pub fn install(io: FileIo) -> &'static FileIo {
    let mut io = Some(io);
    let installed = INSTALLED.get_or_init(|| io.take().unwrap_or_else(FileIo::sync));
    if io.is_some() {
        tracing::debug!(
            path = installed.name(),
            "file read path already chosen for this process"
        );
    }
    installed
}

/// The installed read path, or synchronous reads when none was installed.
pub fn current() -> &'static FileIo {
    INSTALLED
        .get()
        .unwrap_or_else(|| SYNC.get_or_init(FileIo::sync))
}
