//! Free loopback ports, for listeners a test configures by number (a port 0 cannot be named in
//! another process's config). The port is free when asked; a test binds it soon after.

/// A TCP port free on 127.0.0.1 now.
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A UDP port free on 127.0.0.1 now (QUIC listens on UDP).
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
