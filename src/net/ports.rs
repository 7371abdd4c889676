//! Free loopback ports for clusters on one machine (`tessera dev`, tests).
//!
//! A port taken from the kernel with `bind(:0)` and released again comes
//! from the ephemeral range, which every outgoing socket (a QUIC client, a
//! test's own endpoint) also draws from: between choosing it and a node
//! binding it, or while a node is down for a restart, someone else may take
//! it ("Address already in use"). These ports are chosen *below* the
//! ephemeral range instead, where the kernel never hands out a port by
//! itself, each probed free for both UDP and TCP, and never the same one
//! twice in one process.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicU32, Ordering};

/// The lowest port handed out (above the well-known and common service
/// ports).
const LOW: u32 = 10_000;

/// The first port of the kernel's ephemeral range (Linux's default when it
/// cannot be read).
fn ephemeral_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// The next candidate: a per-process start (so concurrent processes rarely
/// walk the same ports) advanced by one process-wide counter.
fn candidate(span: u32) -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let start = std::process::id().wrapping_mul(2_654_435_761) % span;
    let _ = NEXT.compare_exchange(u32::MAX, start, Ordering::Relaxed, Ordering::Relaxed);
    NEXT.fetch_add(1, Ordering::Relaxed) % span
}

fn free(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    UdpSocket::bind(addr).is_ok() && TcpListener::bind(addr).is_ok()
}

/// `n` distinct loopback addresses whose ports were free for UDP and TCP
/// when probed, all below the ephemeral range.
pub fn free_loopback_addrs(n: usize) -> io::Result<Vec<SocketAddr>> {
    let high = ephemeral_start().clamp(LOW + 1_000, 65_536);
    let span = high - LOW;
    let mut out = Vec::with_capacity(n);
    for _ in 0..span {
        if out.len() == n {
            break;
        }
        let port = (LOW + candidate(span)) as u16;
        if free(port) {
            out.push(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
        }
    }
    if out.len() < n {
        return Err(io::Error::new(
            io::ErrorKind::AddrNotAvailable,
            format!("found {} free loopback ports of {n}", out.len()),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_free_and_below_the_ephemeral_range() {
        let addrs = free_loopback_addrs(64).expect("ports");
        let mut ports: Vec<u16> = addrs.iter().map(|a| a.port()).collect();
        assert!(ports
            .iter()
            .all(|&p| u32::from(p) >= LOW && u32::from(p) < ephemeral_start()));
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 64, "ports repeat");
        // Each can be bound by a node right away.
        let held: Vec<UdpSocket> = addrs.iter().map(|a| UdpSocket::bind(a).unwrap()).collect();
        assert_eq!(held.len(), 64);
    }
}
