//! Free loopback ports, for listeners a test configures by number (a port 0 cannot be named in
//! another process's config). The port is free when asked; a test binds it soon after.
//!
//! Ports come from below the kernel's ephemeral range (Linux: 32768–60999), which every outgoing
//! connection draws its local port from. A port the kernel handed out for `bind(0)` was in that
//! range, so a client socket of another test could take it in the seconds before a slow server
//! (MLServer takes about three) bound it: CI saw MLServer fail with "address already in use" on
//! such a port. Each process starts at its own point of the range and never hands a port out
//! twice, so tests running side by side rarely try the same one.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// The range handed out: below the ephemeral ports, above the well-known and most services'.
const FIRST: u16 = 20_000;
const END: u16 = 32_000;

/// The next ports to try: the whole range once, from this process's next unused point.
fn candidates() -> impl Iterator<Item = u16> {
    static START: OnceLock<u32> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let span = u32::from(END - FIRST);
    let start = *START.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        std::process::id().wrapping_mul(7919).wrapping_add(nanos) % span
    });
    (0..span).map(move |_| {
        let offset = start.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        FIRST + offset as u16
    })
}

/// A TCP port free on 127.0.0.1 now.
pub fn free_tcp_port() -> u16 {
    candidates()
        .find(|&port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok())
        .unwrap_or_else(|| panic!("no free TCP port on 127.0.0.1 in {FIRST}..{END}"))
}

/// A UDP port free on 127.0.0.1 now (QUIC listens on UDP).
pub fn free_udp_port() -> u16 {
    candidates()
        .find(|&port| std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok())
        .unwrap_or_else(|| panic!("no free UDP port on 127.0.0.1 in {FIRST}..{END}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_below_the_ephemeral_range_and_not_handed_out_twice() {
        let ports: Vec<u16> = (0..50).map(|_| free_tcp_port()).collect();
        assert!(ports.iter().all(|p| (FIRST..END).contains(p)), "{ports:?}");
        let distinct: std::collections::HashSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
        let udp = free_udp_port();
        assert!((FIRST..END).contains(&udp) && !ports.contains(&udp));
    }
}
