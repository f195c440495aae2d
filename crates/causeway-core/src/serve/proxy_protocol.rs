//! PROXY protocol v2 (HAProxy's binary header) on both ends of a layer-4 hop: the edge balancer
//! writes one before the client's bytes ([`header_for`]) so that the proxies behind it see the
//! client's address rather than the balancer's; a listener configured to accept it reads one
//! ([`client_address`]), from the sources it trusts only. The header is parsed and built by the
//! `ppp` crate; this module decides when one is expected and whom to believe.
//!
//! A connection from a trusted source may start with a header (its source address is then the
//! client's) or without one (its own address is). A header from any other source is refused and
//! the connection closed, so that nobody can claim another client's address: nginx's
//! `set_real_ip_from` and Envoy's proxy-protocol filter draw the same line.

use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;
use ppp::v2::{self, Addresses, Builder, Command, Protocol, Version};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The 12 bytes every v2 header starts with; no TLS record or HTTP request starts like it.
const SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The fixed part: signature, version and command, family and protocol, length.
const FIXED_LEN: usize = 16;
/// Addresses plus room for the TLVs a balancer adds; a longer header is refused, not buffered.
const MAX_PAYLOAD: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum ProxyProtocolError {
    #[error("a PROXY protocol header from {peer}, which is not a trusted source")]
    Untrusted { peer: SocketAddr },
    #[error("a malformed PROXY protocol header: {0}")]
    Malformed(String),
    #[error("the PROXY protocol header did not arrive within {0:?}")]
    TimedOut(Duration),
    #[error("the connection closed before its first bytes")]
    Closed,
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] std::io::Error),
}

impl ProxyProtocolError {
    /// The stable reason for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Untrusted { .. } => "proxy_protocol_untrusted",
            Self::Malformed(_) => "proxy_protocol_malformed",
            Self::TimedOut(_) => "proxy_protocol_timeout",
            Self::Closed | Self::Io(_) => "proxy_protocol_io",
        }
    }
}

/// The header the balancer sends ahead of a client's bytes: a TCP connection from `client` to
/// `listener` (the balancer's own address that the client reached).
pub fn header_for(client: SocketAddr, listener: SocketAddr) -> Vec<u8> {
    // Both addresses in one family, as the format requires: an IPv4 client on a dual-stack
    // listener is named by its IPv4-mapped IPv6 address.
    let addresses: Addresses = match (client, listener) {
        (SocketAddr::V4(client), SocketAddr::V4(listener)) => {
            v2::IPv4::new(*client.ip(), *listener.ip(), client.port(), listener.port()).into()
        }
        _ => v2::IPv6::new(
            to_v6(client.ip()),
            to_v6(listener.ip()),
            client.port(),
            listener.port(),
        )
        .into(),
    };
    Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, addresses)
        .build()
        // Building into a Vec cannot fail for address-only headers.
        .unwrap_or_default()
}

fn to_v6(ip: std::net::IpAddr) -> std::net::Ipv6Addr {
    match ip {
        std::net::IpAddr::V4(ip) => ip.to_ipv6_mapped(),
        std::net::IpAddr::V6(ip) => ip,
    }
}

/// Reads a PROXY protocol v2 header if the connection starts with one, within `timeout`, and
/// returns the client's address: the header's source for a trusted `peer`, else `peer` itself.
/// Without a header nothing is consumed, so TLS or HTTP reads the stream from its first byte.
pub async fn client_address(
    stream: &mut TcpStream,
    peer: SocketAddr,
    trusted: &[IpNet],
    timeout: Duration,
) -> Result<SocketAddr, ProxyProtocolError> {
    tokio::time::timeout(timeout, read_header(stream, peer, trusted))
        .await
        .map_err(|_| ProxyProtocolError::TimedOut(timeout))?
}

async fn read_header(
    stream: &mut TcpStream,
    peer: SocketAddr,
    trusted: &[IpNet],
) -> Result<SocketAddr, ProxyProtocolError> {
    let mut fixed = [0u8; FIXED_LEN];
    let mut seen = 0;
    loop {
        let peeked = stream.peek(&mut fixed).await?;
        if peeked == 0 {
            return Err(ProxyProtocolError::Closed);
        }
        let compared = peeked.min(SIGNATURE.len());
        if fixed[..compared] != SIGNATURE[..compared] {
            return Ok(peer);
        }
        if peeked == FIXED_LEN {
            break;
        }
        // A header split across segments: peeking again at once would return the same bytes.
        if peeked == seen {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        seen = peeked;
    }
    if !trusted.iter().any(|net| net.contains(&peer.ip())) {
        return Err(ProxyProtocolError::Untrusted { peer });
    }
    let payload = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    if payload > MAX_PAYLOAD {
        return Err(ProxyProtocolError::Malformed(format!(
            "a {payload}-byte payload (at most {MAX_PAYLOAD} accepted)"
        )));
    }
    let mut header = vec![0u8; FIXED_LEN + payload];
    stream.read_exact(&mut header).await?;
    let parsed = v2::Header::try_from(header.as_slice())
        .map_err(|err| ProxyProtocolError::Malformed(err.to_string()))?;
    if parsed.command == Command::Local {
        // The balancer's own connection (a health check): no client to name.
        return Ok(peer);
    }
    match parsed.addresses {
        Addresses::IPv4(ip) => Ok(SocketAddr::from((ip.source_address, ip.source_port))),
        Addresses::IPv6(ip) => {
            let source = ip.source_address;
            let source = source
                .to_ipv4_mapped()
                .map(std::net::IpAddr::V4)
                .unwrap_or(std::net::IpAddr::V6(source));
            Ok(SocketAddr::new(source, ip.source_port))
        }
        // UNSPEC or a Unix socket: nothing to say about the client.
        _ => Ok(peer),
    }
}

#[cfg(test)]
mod tests;
