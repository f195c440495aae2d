use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use super::*;

const TIMEOUT: Duration = Duration::from_secs(2);

fn net(text: &str) -> IpNet {
    text.parse().expect("a network")
}

/// A connection to a fresh listener from `source`: (the server's end, its peer, the client's end).
async fn connection(source: Ipv4Addr) -> (TcpStream, SocketAddr, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(IpAddr::V4(source), 0))
        .expect("bind the source");
    let client = socket
        .connect(listener.local_addr().expect("addr"))
        .await
        .expect("connect");
    let (server, peer) = listener.accept().await.expect("accept");
    (server, peer, client)
}

async fn rest_of(server: &mut TcpStream, expected: &[u8]) {
    let mut rest = vec![0; expected.len()];
    server.read_exact(&mut rest).await.expect("the bytes after");
    assert_eq!(rest, expected);
}

#[tokio::test]
async fn a_trusted_balancer_names_the_client_and_the_stream_goes_on_after_the_header() {
    let (mut server, peer, mut client) = connection(Ipv4Addr::LOCALHOST).await;
    let real: SocketAddr = "203.0.113.9:40123".parse().unwrap();
    let mut bytes = header_for(real, "127.0.0.1:8443".parse().unwrap());
    bytes.extend_from_slice(b"\x16\x03\x01hello");
    client.write_all(&bytes).await.unwrap();
    let found = client_address(&mut server, peer, &[net("127.0.0.1/32")], TIMEOUT)
        .await
        .expect("a client address");
    assert_eq!(found, real);
    rest_of(&mut server, b"\x16\x03\x01hello").await;
}

#[tokio::test]
async fn without_a_header_nothing_is_consumed_and_the_peer_is_the_client() {
    let (mut server, peer, mut client) = connection(Ipv4Addr::LOCALHOST).await;
    // Starts like the signature (`\r\n`) and then differs: still not a header.
    client.write_all(b"\r\nGET / HTTP/1.1\r\n").await.unwrap();
    let found = client_address(&mut server, peer, &[net("127.0.0.0/8")], TIMEOUT)
        .await
        .expect("the peer");
    assert_eq!(found, peer);
    rest_of(&mut server, b"\r\nGET / HTTP/1.1\r\n").await;
}

#[tokio::test]
async fn a_header_from_an_untrusted_source_is_refused() {
    let (mut server, peer, mut client) = connection(Ipv4Addr::new(127, 0, 0, 2)).await;
    let forged = header_for(
        "198.51.100.1:1".parse().unwrap(),
        "127.0.0.1:8443".parse().unwrap(),
    );
    client.write_all(&forged).await.unwrap();
    let refused = client_address(&mut server, peer, &[net("127.0.0.1/32")], TIMEOUT).await;
    assert!(
        matches!(refused, Err(ProxyProtocolError::Untrusted { peer: p }) if p == peer),
        "{refused:?}"
    );
    assert_eq!(refused.unwrap_err().reason(), "proxy_protocol_untrusted");
}

#[tokio::test]
async fn a_header_split_across_segments_is_read_whole() {
    let (mut server, peer, mut client) = connection(Ipv4Addr::LOCALHOST).await;
    let real: SocketAddr = "[2001:db8::7]:443".parse().unwrap();
    let header = header_for(real, "[::1]:8443".parse().unwrap());
    let writer = tokio::spawn(async move {
        for part in [&header[..5], &header[5..14], &header[14..]] {
            client.write_all(part).await.unwrap();
            client.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        client.write_all(b"after").await.unwrap();
        client
    });
    let found = client_address(&mut server, peer, &[net("127.0.0.1/32")], TIMEOUT)
        .await
        .expect("a client address");
    assert_eq!(found, real);
    rest_of(&mut server, b"after").await;
    drop(writer.await);
}

#[tokio::test]
async fn an_ipv4_client_behind_an_ipv6_listener_keeps_its_ipv4_address() {
    let (mut server, peer, mut client) = connection(Ipv4Addr::LOCALHOST).await;
    let real: SocketAddr = "192.0.2.44:5000".parse().unwrap();
    client
        .write_all(&header_for(real, "[::1]:8443".parse().unwrap()))
        .await
        .unwrap();
    let found = client_address(&mut server, peer, &[net("127.0.0.1/32")], TIMEOUT)
        .await
        .expect("a client address");
    assert_eq!(found, real);
}

#[tokio::test]
async fn malformed_oversized_and_missing_headers_are_errors_not_hangs() {
    // Version 3 is not a version.
    let (mut server, peer, mut client) = connection(Ipv4Addr::LOCALHOST).await;
    let mut bad = SIGNATURE.to_vec();
    bad.extend_from_slice(&[0x31, 0x11, 0, 12]);
    bad.extend_from_slice(&[0; 12]);
    client.write_all(&bad).await.unwrap();
    let result = client_address(&mut server, peer, &[net("127.0.0.1/32")], TIMEOUT).await;
    assert!(
        matches!(result, Err(ProxyProtocolError::Malformed(_))),
        "{result:?}"
    );

    // A payload over the bound is refused before anything is buffered.
    let (mut server, peer, mut client) = connection(Ipv4Addr::LOCALHOST).await;
    let mut huge = SIGNATURE.to_vec();
    huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
    client.write_all(&huge).await.unwrap();
    let result = client_address(&mut server, peer, &[net("127.0.0.1/32")], TIMEOUT).await;
    assert!(
        matches!(result, Err(ProxyProtocolError::Malformed(_))),
        "{result:?}"
    );

    // Half a signature and then silence: the timeout, not a stuck task.
    let (mut server, peer, mut client) = connection(Ipv4Addr::LOCALHOST).await;
    client.write_all(&SIGNATURE[..6]).await.unwrap();
    let short = Duration::from_millis(200);
    let result = client_address(&mut server, peer, &[net("127.0.0.1/32")], short).await;
    assert!(
        matches!(result, Err(ProxyProtocolError::TimedOut(_))),
        "{result:?}"
    );
}
