//! [`BaseFile`]: a replica's current version of a file, read at offsets while a delta
//! patch is applied to it.
//!
//! Opened like [`SendFile`](super::SendFile) (beneath the root, no symlinks, regular
//! files only, never inside `.cdsync`). Nothing here trusts the content: the caller
//! hashes what it builds from it and refuses the result unless it has the hash the
//! source announced, so a base that changed after its signature was made can only
//! cost a file, never install a wrong one.

use std::os::fd::OwnedFd;

use super::sys;
use super::{FsError, Root};
use cd_core::path::RelPath;

/// A regular file opened for reading at offsets.
#[derive(Debug)]
pub struct BaseFile {
    fd: OwnedFd,
    path: RelPath,
    size: u64,
}

impl BaseFile {
    pub fn open(root: &Root, path: &RelPath) -> Result<BaseFile, FsError> {
        let (fd, st) = root.open_file("open delta base", path)?;
        Ok(BaseFile {
            fd,
            path: path.clone(),
            size: st.size,
        })
    }

    /// Size at open time.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Fills `buf` from `offset`; a file shorter than that is an error (the base
    /// changed under us).
    pub fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> Result<(), FsError> {
        while !buf.is_empty() {
            let n = sys::retry(|| rustix::io::pread(&self.fd, &mut *buf, offset))
                .map_err(|e| FsError::io("read delta base", &self.path, e))?;
            if n == 0 {
                return Err(FsError::Changed {
                    path: self.path.display(),
                    what: "it became shorter while a delta was applied to it",
                });
            }
            buf = &mut buf[n..];
            offset += n as u64;
        }
        Ok(())
    }
}
