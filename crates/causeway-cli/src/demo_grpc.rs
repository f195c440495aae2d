//! `causeway demo grpc`: real calls of all four kinds to Pricing Service, shown as the six steps of
//! the gRPC flow in the reference (client stub, method call, protobuf serialization, gRPC server,
//! response, secure communication), with timings and message sizes from those calls, then the same
//! unary call through the edge proxy.

use std::fmt::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use causeway_client::Discovery;
use causeway_core::trace_context::TraceContext;
use causeway_core::{DataDir, Topology};
use causeway_proto::pricing::v1::pricing_service_client::PricingServiceClient;
use causeway_proto::pricing::v1::{BasketItem, GetPriceRequest, Offer, StreamPricesRequest};
use http::HeaderMap;
use prost::Message;
use rustls::pki_types::ServerName;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::state::RunState;

const SERVICE: &str = "pricing-service";
const DEMO_SKU: &str = "SKU-0001";
/// gRPC frames each message with a 1-byte compression flag and a 4-byte length.
const FRAME_HEADER_BYTES: usize = 5;

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// A TLS channel to `addr`, verifying it as `server_name` against the CA.
pub(crate) async fn connect(
    addr: SocketAddr,
    server_name: &str,
    ca_pem: &str,
) -> anyhow::Result<Channel> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(server_name);
    Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .with_context(|| format!("cannot connect to {server_name} at {addr}"))
}

/// Metadata carrying this call's trace context (and, through the edge, its token).
fn metadata(trace: &TraceContext, token: Option<&str>) -> MetadataMap {
    let mut headers = HeaderMap::new();
    trace.inject(&mut headers);
    let mut metadata = MetadataMap::from_headers(headers);
    if let Some(token) = token
        && let Ok(value) = MetadataValue::try_from(format!("Bearer {token}"))
    {
        metadata.insert("authorization", value);
    }
    metadata
}

fn request<T>(message: T, trace: &TraceContext, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    *request.metadata_mut() = metadata(trace, token);
    // Step 4 shows the server's own timings.
    request.metadata_mut().insert(
        causeway_services::pricing::SERVER_TIMING_REQUEST,
        MetadataValue::from_static("1"),
    );
    request.set_timeout(Duration::from_secs(3));
    request
}

/// What a real TLS handshake with the instance agreed on.
async fn handshake(addr: SocketAddr, server_name: &str, ca: &Path) -> anyhow::Result<String> {
    let config = causeway_core::tls::client_config_with_alpn(ca, &[b"h2"])?;
    let started = Instant::now();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = ServerName::try_from(server_name.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    let elapsed = started.elapsed();
    let (_, session) = tls.get_ref();
    Ok(format!(
        "{:?}, {:?}, ALPN {}, certificate for {server_name} verified against the Causeway CA, handshake {:.3} ms",
        session
            .protocol_version()
            .context("no TLS version agreed")?,
        session
            .negotiated_cipher_suite()
            .map(|suite| suite.suite())
            .context("no cipher suite agreed")?,
        String::from_utf8_lossy(session.alpn_protocol().unwrap_or(b"none")),
        ms(elapsed)
    ))
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

pub async fn grpc(topology: &Topology, data_dir: &Path) -> anyhow::Result<String> {
    let state = RunState::load(data_dir)?;
    let data = DataDir::new(data_dir);
    let ca_path = data.ca_cert();
    let ca_pem = std::fs::read_to_string(&ca_path)
        .with_context(|| format!("cannot read {}", ca_path.display()))?;
    let zone = &topology.discovery.zone;
    let server_name = format!("{SERVICE}.{zone}");
    let trace = TraceContext::continue_from(&HeaderMap::new());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "gRPC: Inventory Service -> Pricing Service (trace {})\n",
        trace.trace_id
    );

    let discovery = Discovery::new(state.dns, zone)?;
    let resolution = discovery.resolve(SERVICE).await?;
    let endpoint = resolution
        .endpoints
        .first()
        .context("discovery lists no pricing-service instance")?
        .clone();
    let connect_started = Instant::now();
    let channel = connect(endpoint.addr, &server_name, &ca_pem).await?;
    let connected = connect_started.elapsed();
    let mut client = PricingServiceClient::new(channel);
    let _ = writeln!(
        out,
        " 1. gRPC client stub       PricingServiceClient generated from proto/pricing/v1/pricing.proto at build time \
         (protox + tonic-prost-build); {server_name} resolved via DNS {} to {} instances in {:.3} ms; \
         HTTP/2 connection to {} ({}) opened in {:.3} ms",
        state.dns,
        resolution.endpoints.len(),
        ms(resolution.elapsed),
        endpoint.instance,
        endpoint.addr,
        ms(connected)
    );

    let message = GetPriceRequest {
        sku: DEMO_SKU.into(),
    };
    let encode_started = Instant::now();
    let encoded = message.encode_to_vec();
    let encoded_in = encode_started.elapsed();
    let call_started = Instant::now();
    let response = client
        .get_price(request(message.clone(), &trace, None))
        .await
        .context("GetPrice failed")?;
    let latency = call_started.elapsed();
    let timings = causeway_core::server_timing::parse(&response.metadata().clone().into_headers());
    let price = response.into_inner();
    let server_side: Vec<String> = timings
        .iter()
        .map(|entry| {
            format!(
                "{} {:.3} ms{}",
                entry.name,
                entry.duration_ms.unwrap_or(0.0),
                entry
                    .description
                    .as_ref()
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default()
            )
        })
        .collect();
    let _ = writeln!(
        out,
        " 2. Method call            GetPrice(sku: {DEMO_SKU:?}) with a 3 s deadline (grpc-timeout) and traceparent in the metadata: {:.3} ms round trip",
        ms(latency)
    );
    let _ = writeln!(
        out,
        " 3. Protobuf serialization request: {} bytes [{}] + {FRAME_HEADER_BYTES}-byte gRPC frame header, encoded in {:.1} µs; \
         response: {} bytes",
        encoded.len(),
        hex(&encoded),
        encoded_in.as_secs_f64() * 1e6,
        price.encoded_len()
    );
    let _ = writeln!(
        out,
        " 4. gRPC server            {} decoded the request and ran GetPrice: {}",
        price.served_by,
        if server_side.is_empty() {
            "no timings reported".to_string()
        } else {
            server_side.join("; ")
        }
    );
    let _ = writeln!(
        out,
        " 5. Response               {} costs {}.{:02} {} (updated at {} ms since the epoch), status OK",
        price.sku,
        price.unit_price_cents / 100,
        price.unit_price_cents % 100,
        price.currency,
        price.updated_at
    );
    let tls = handshake(endpoint.addr, &server_name, &ca_path).await?;
    let _ = writeln!(out, " 6. Secure communication   {tls}");

    // The other three call kinds over the same channel.
    let started = Instant::now();
    let mut updates = client
        .stream_prices(request(
            StreamPricesRequest {
                skus: vec![DEMO_SKU.into(), "SKU-0002".into()],
                interval_ms: 50,
                max_updates: 4,
            },
            &trace,
            None,
        ))
        .await
        .context("StreamPrices failed")?
        .into_inner();
    let mut received = Vec::new();
    while let Some(update) = updates
        .message()
        .await
        .context("StreamPrices stream broke")?
    {
        received.push(update);
    }
    let bytes: usize = received.iter().map(Message::encoded_len).sum();
    let _ = writeln!(
        out,
        "\n    server streaming       StreamPrices: {} updates ({} bytes) in {:.3} ms",
        received.len(),
        bytes,
        ms(started.elapsed())
    );

    let items = vec![
        BasketItem {
            sku: DEMO_SKU.into(),
            quantity: 2,
        },
        BasketItem {
            sku: "SKU-0002".into(),
            quantity: 1,
        },
        BasketItem {
            sku: "SKU-0003".into(),
            quantity: 12,
        },
    ];
    let sent: usize = items.iter().map(Message::encoded_len).sum();
    let started = Instant::now();
    let quote = client
        .quote_basket(request(tokio_stream::iter(items), &trace, None))
        .await
        .context("QuoteBasket failed")?
        .into_inner();
    let _ = writeln!(
        out,
        "    client streaming       QuoteBasket: 3 items ({sent} bytes) in, quote of {}.{:02} {} for {} units out, {:.3} ms",
        quote.total_cents / 100,
        quote.total_cents % 100,
        quote.currency,
        quote.units,
        ms(started.elapsed())
    );

    let offers = vec![
        Offer {
            sku: DEMO_SKU.into(),
            quantity: 10,
            offered_unit_price_cents: 1,
        },
        Offer {
            sku: DEMO_SKU.into(),
            quantity: 10,
            offered_unit_price_cents: price.unit_price_cents,
        },
    ];
    let started = Instant::now();
    let mut counters = client
        .live_pricing(request(tokio_stream::iter(offers), &trace, None))
        .await
        .context("LivePricing failed")?
        .into_inner();
    let mut rounds = Vec::new();
    while let Some(counter) = counters
        .message()
        .await
        .context("LivePricing stream broke")?
    {
        rounds.push(format!(
            "round {} {}",
            counter.round,
            if counter.accepted {
                "accepted"
            } else {
                "countered"
            }
        ));
    }
    let _ = writeln!(
        out,
        "    bidirectional          LivePricing: 2 offers, {} in {:.3} ms",
        rounds.join(", "),
        ms(started.elapsed())
    );

    // The same unary call from outside, through the edge (HTTP/2 end to end, trailers intact).
    if let Some(edge) = state.edge {
        let key = causeway_proxy::auth::load_or_create_key(&data.jwt_key())?;
        let token = causeway_proxy::auth::issue_scoped(
            &key,
            &topology.reverse_proxy.jwt,
            crate::demo::DEMO_USER,
            &[causeway_core::principal::scopes::DEBUG],
            300,
        )?;
        let started = Instant::now();
        let mut through_edge =
            PricingServiceClient::new(connect(edge, "localhost", &ca_pem).await?);
        let price = through_edge
            .get_price(request(
                GetPriceRequest {
                    sku: DEMO_SKU.into(),
                },
                &trace,
                Some(&token),
            ))
            .await
            .context("GetPrice through the edge failed")?
            .into_inner();
        let _ = writeln!(
            out,
            "    through the edge       GetPrice via load balancer {edge} and a reverse proxy (JWT checked) answered by {} in {:.3} ms",
            price.served_by,
            ms(started.elapsed())
        );
    }
    Ok(out)
}
