//! Raw socket calls for kernel TLS that neither `std`, `rustix` nor `tokio` wraps:
//! `setsockopt(TCP_ULP)`, `setsockopt(SOL_TLS, TLS_TX / TLS_RX)`, and `recvmsg` /
//! `sendmsg` with the `TLS_GET_RECORD_TYPE` / `TLS_SET_RECORD_TYPE` control messages.
//!
//! One system call per function; every `unsafe` block says why it is sound. The
//! callers (the parent module) build the key material and drive readiness.
#![expect(
    unsafe_code,
    reason = "kernel TLS socket options and record-type control messages have no safe wrapper"
)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `TLS_GET_RECORD_TYPE` / `TLS_SET_RECORD_TYPE` carry one byte: the record's content type.
const CMSG_DATA_LEN: u32 = 1;

/// Room for one control message with a one-byte payload, aligned for `cmsghdr`.
#[repr(C)]
struct CmsgBuf {
    _align: [libc::cmsghdr; 0],
    bytes: [u8; 64],
}

impl CmsgBuf {
    fn new() -> Self {
        CmsgBuf {
            _align: [],
            bytes: [0; 64],
        }
    }
}

/// `setsockopt(fd, SOL_TCP, TCP_ULP, "tls")`: attaches the kernel TLS upper layer. On
/// an unconnected socket the kernel answers `ENOTCONN` when it has TLS, `ENOENT` when
/// it has not (and could not load it).
pub(super) fn set_ulp_tls(sock: BorrowedFd<'_>) -> io::Result<()> {
    const NAME: &[u8] = b"tls";
    // SAFETY: `sock` is a live descriptor borrowed for the call; the option value is a
    // valid buffer of the length passed, which the kernel only reads.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_ULP,
            NAME.as_ptr().cast(),
            NAME.len() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Which direction of the record layer a key is installed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Direction {
    Tx,
    Rx,
}

/// The `tls12_crypto_info_*` structure for one direction (the kernel uses the TLS 1.2
/// names for TLS 1.3 too; `info.version` says which).
pub(super) enum CryptoInfo {
    Aes128Gcm(libc::tls12_crypto_info_aes_gcm_128),
    Aes256Gcm(libc::tls12_crypto_info_aes_gcm_256),
    Chacha20Poly1305(libc::tls12_crypto_info_chacha20_poly1305),
}

/// `setsockopt(fd, SOL_TLS, TLS_TX or TLS_RX, info)`: hands one direction of the
/// record layer (key, IV, sequence number) to the kernel.
pub(super) fn set_crypto_info(
    sock: BorrowedFd<'_>,
    dir: Direction,
    info: &CryptoInfo,
) -> io::Result<()> {
    let (ptr, len): (*const libc::c_void, usize) = match info {
        CryptoInfo::Aes128Gcm(i) => (std::ptr::from_ref(i).cast(), size_of_val(i)),
        CryptoInfo::Aes256Gcm(i) => (std::ptr::from_ref(i).cast(), size_of_val(i)),
        CryptoInfo::Chacha20Poly1305(i) => (std::ptr::from_ref(i).cast(), size_of_val(i)),
    };
    let opt = match dir {
        Direction::Tx => libc::TLS_TX,
        Direction::Rx => libc::TLS_RX,
    };
    // SAFETY: `sock` is a live descriptor borrowed for the call; `ptr` points to a
    // fully initialised `tls12_crypto_info_*` of `len` bytes, borrowed from `info` for
    // the duration of the call, which the kernel only reads.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_TLS,
            opt,
            ptr,
            len as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One `recvmsg(2)` on a kernel-TLS socket with room for the record-type control
/// message. Returns the bytes received and the TLS content type of the record they
/// came from (23 = application data when the kernel attached no type). Non-blocking:
/// `WouldBlock` when nothing is queued.
pub(super) fn recv_record(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, u8)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = CmsgBuf::new();
    // SAFETY: an all-zero `msghdr` is a valid value (null name, no iovecs, no control).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.bytes.as_mut_ptr().cast();
    msg.msg_controllen = cbuf.bytes.len() as _;
    // SAFETY: `sock` is live for the call; `msg` points to one iovec covering `buf`
    // (writable, `buf.len()` bytes) and to `cbuf` (writable, its length), both of which
    // outlive the call. The kernel writes at most those lengths.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &raw mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut record_type = 23u8;
    // SAFETY: `msg` was filled in by the kernel: `msg_control`/`msg_controllen` describe
    // the control messages inside `cbuf`, which the CMSG_* helpers walk without leaving
    // it; a header's data is read only when its level and type say it is ours and its
    // length covers the byte read.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_TLS
                && (*c).cmsg_type == libc::TLS_GET_RECORD_TYPE
                && (*c).cmsg_len as usize >= libc::CMSG_LEN(CMSG_DATA_LEN) as usize
            {
                record_type = *libc::CMSG_DATA(c);
            }
            c = libc::CMSG_NXTHDR(&raw const msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other(
            "kernel TLS: record-type control message truncated",
        ));
    }
    Ok((n as usize, record_type))
}

/// One `sendmsg(2)` of `data` as a record of TLS content type `record_type` (e.g. 21,
/// an alert) on a kernel-TLS socket. Non-blocking.
pub(super) fn send_record(sock: BorrowedFd<'_>, record_type: u8, data: &[u8]) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    let mut cbuf = CmsgBuf::new();
    // SAFETY: an all-zero `msghdr` is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.bytes.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure size computation.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(CMSG_DATA_LEN) } as _;
    // SAFETY: `msg_control` points to `cbuf`, which is larger than CMSG_SPACE(1) and
    // aligned for `cmsghdr`, so CMSG_FIRSTHDR returns a header inside it, and its data
    // byte is inside it too.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&raw const msg);
        (*c).cmsg_level = libc::SOL_TLS;
        (*c).cmsg_type = libc::TLS_SET_RECORD_TYPE;
        (*c).cmsg_len = libc::CMSG_LEN(CMSG_DATA_LEN) as _;
        *libc::CMSG_DATA(c) = record_type;
    }
    // SAFETY: `sock` is live for the call; `msg` describes `data` (read only by the
    // kernel despite the `*mut` in `iovec`) and the control message in `cbuf`, both of
    // which outlive the call.
    let n = unsafe {
        libc::sendmsg(
            sock.as_raw_fd(),
            &raw const msg,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_buffer_fits_one_record_type() {
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(CMSG_DATA_LEN) } as usize;
        assert!(space <= CmsgBuf::new().bytes.len());
        assert_eq!(align_of::<CmsgBuf>(), align_of::<libc::cmsghdr>());
        assert!(size_of::<libc::tls12_crypto_info_aes_gcm_256>() > 40);
    }
}
