//! ICMP echo ("ping") for the master's `icmp` check: a raw IPv4 socket, so root or
//! CAP_NET_RAW. Without the privilege the check reports so once and is disabled; it
//! never marks a node failing for what the master cannot do.

use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketType, ipproto, sockopt};

/// How a [`PingError::NotPermitted`] message starts.
pub const NOT_PERMITTED: &str = "ICMP not permitted";

#[derive(Debug, thiserror::Error)]
pub enum PingError {
    #[error("{NOT_PERMITTED}: a raw socket needs root or CAP_NET_RAW ({0})")]
    NotPermitted(String),
    #[error("{0}")]
    Failed(String),
}

static SEQ: AtomicU16 = AtomicU16::new(1);

const ECHO_REQUEST: u8 = 8;
const ECHO_REPLY: u8 = 0;

/// The internet checksum (RFC 1071) of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An echo request with `id` and `seq` and a 16-byte payload.
pub fn echo_request(id: u16, seq: u16) -> Vec<u8> {
    let mut p = vec![ECHO_REQUEST, 0, 0, 0];
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(b"cdsync-monitor\0\0");
    let c = checksum(&p);
    p[2..4].copy_from_slice(&c.to_be_bytes());
    p
}

/// Whether `packet` (as a raw socket reads it: IPv4 header, then ICMP) is the echo
/// reply from `from` to the request `id`/`seq`.
pub fn is_reply(packet: &[u8], from: Ipv4Addr, id: u16, seq: u16) -> bool {
    let Some(&first) = packet.first() else {
        return false;
    };
    let ihl = usize::from(first & 0x0f) * 4;
    if packet.len() < ihl + 8 || ihl < 20 || packet[12..16] != from.octets() {
        return false;
    }
    let icmp = &packet[ihl..];
    icmp[0] == ECHO_REPLY
        && icmp[1] == 0
        && icmp[4..6] == id.to_be_bytes()
        && icmp[6..8] == seq.to_be_bytes()
        && checksum(icmp) == 0
}

/// Sends one echo request to `ip` and waits up to `timeout` for its reply; the
/// round-trip time.
pub fn ping(ip: IpAddr, timeout: Duration) -> Result<Duration, PingError> {
    let IpAddr::V4(v4) = ip else {
        return Err(PingError::Failed(format!(
            "{ip}: ICMP checks are IPv4 only"
        )));
    };
    let fd = rustix::net::socket(AddressFamily::INET, SocketType::RAW, Some(ipproto::ICMP))
        .map_err(|e| match e {
            rustix::io::Errno::PERM | rustix::io::Errno::ACCESS => {
                PingError::NotPermitted(e.to_string())
            }
            e => PingError::Failed(format!("raw socket: {e}")),
        })?;
    let id = (std::process::id() as u16) ^ 0x5a5a;
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    rustix::net::sendto(
        &fd,
        &echo_request(id, seq),
        SendFlags::empty(),
        &SocketAddrV4::new(v4, 0),
    )
    .map_err(|e| PingError::Failed(format!("send echo request to {v4}: {e}")))?;
    let mut buf = [0u8; 1500];
    loop {
        let left = timeout.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Err(PingError::Failed(format!(
                "no echo reply from {v4} in {timeout:?}"
            )));
        }
        sockopt::set_socket_timeout(&fd, sockopt::Timeout::Recv, Some(left))
            .map_err(|e| PingError::Failed(format!("socket timeout: {e}")))?;
        match rustix::net::recvfrom(&fd, &mut buf, RecvFlags::empty()) {
            Ok((n, _, _)) => {
                if is_reply(&buf[..n], v4, id, seq) {
                    return Ok(started.elapsed());
                }
            }
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(PingError::Failed(format!("receive from {v4}: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_rfc1071_example_and_of_a_request() {
        // RFC 1071 section 3: the sum of 0001 f203 f4f5 f6f7 is ddf2, complemented.
        assert_eq!(
            checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            !0xddf2
        );
        let r = echo_request(0x1234, 7);
        assert_eq!(checksum(&r), 0, "a packet with its checksum sums to zero");
        assert_eq!(&r[4..8], &[0x12, 0x34, 0, 7]);
    }

    #[test]
    fn replies_are_matched_by_source_id_and_sequence() {
        let from = Ipv4Addr::new(10, 0, 0, 2);
        let mut icmp = echo_request(9, 3);
        icmp[0] = ECHO_REPLY;
        icmp[2..4].copy_from_slice(&[0, 0]);
        let c = checksum(&icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        let mut packet = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0, 10, 0, 0, 2, 10, 0, 0, 1,
        ];
        packet.extend_from_slice(&icmp);
        assert!(is_reply(&packet, from, 9, 3));
        assert!(!is_reply(&packet, from, 9, 4), "another sequence");
        assert!(!is_reply(&packet, from, 8, 3), "another id");
        assert!(
            !is_reply(&packet, Ipv4Addr::new(10, 0, 0, 3), 9, 3),
            "another host"
        );
        let mut request = packet.clone();
        request[20] = ECHO_REQUEST;
        assert!(
            !is_reply(&request, from, 9, 3),
            "our own request on loopback"
        );
        let mut corrupt = packet.clone();
        corrupt[30] ^= 1;
        assert!(!is_reply(&corrupt, from, 9, 3));
        assert!(!is_reply(&packet[..25], from, 9, 3));
    }

    #[test]
    fn pings_loopback_as_root_or_says_it_may_not() {
        match ping(IpAddr::V4(Ipv4Addr::LOCALHOST), Duration::from_secs(2)) {
            Ok(rtt) => assert!(rtt < Duration::from_secs(2)),
            Err(PingError::NotPermitted(_)) => {
                assert!(
                    !rustix::process::geteuid().is_root(),
                    "root may open raw sockets"
                )
            }
            Err(e) => panic!("{e}"),
        }
    }
}
