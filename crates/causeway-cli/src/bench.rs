//! `causeway bench grpc`: the same price lookup served several ways, measured side by side in one
//! run on this machine: gRPC unary through the real Pricing Service (TLS, metrics, JSON call logs
//! to a file through the components' buffered writer, trace context) and through a bare tonic
//! server on the same handler, both called through Causeway's client (`GrpcChannel`, as
//! Inventory Service calls Pricing); Pricing Service again through tonic's own `Channel`; and
//! REST/JSON over HTTP/1.1 and HTTP/2 (TLS); then streaming throughput (LivePricing,
//! bidirectional). The unary rows take turns in rounds, so that a busy machine's drift is shared
//! among them. Servers run on a one-thread runtime of their own and the callers on another, in
//! this process: compare the rows with each other, not with numbers taken elsewhere.

use std::fmt::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use causeway_client::grpc::GrpcChannel;
use causeway_core::serve::{Shutdown, shutdown_channel};
use causeway_core::tls::{CertPaths, LocalCa};
use causeway_proto::pricing::v1::pricing_service_client::PricingServiceClient;
use causeway_proto::pricing::v1::pricing_service_server::{PricingService, PricingServiceServer};
use causeway_proto::pricing::v1::{
    BasketItem, Counter, GetPriceRequest, Offer, Price, PriceUpdate, Quote, StreamPricesRequest,
};
use causeway_services::ServiceDeps;
use causeway_services::pricing::PricingApp;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig,
};
use tonic::{Status, Streaming};

use crate::loadgen::{self, LoadReport, LoadShape};

const SKU: &str = "SKU-0001";
const SERVER_NAME: &str = "pricing-service.internal";
/// Thread names (as `/proc` shows them, at most 15 bytes) whose CPU time is the servers'.
const SERVER_THREADS: &str = "bench-server";
const SQLITE_THREADS: &str = "sqlx-sqlite-wor";
/// The buffered log writer's thread (`telemetry::LogGuard`).
const LOG_THREAD: &str = "log-writer";
/// Thread names of the callers' runtime (the load generator and the client code under it).
pub const CLIENT_THREADS: &str = "bench-client";
/// Offers per LivePricing session in the streaming workload (the service's per-session limit).
const OFFERS_PER_SESSION: u32 = 1000;

/// The bare baseline: tonic serving the Pricing Service's own lookup, without Causeway's
/// per-call logging, metrics, deadline handling or trace context. Only GetPrice is measured.
struct BarePricing {
    app: PricingApp,
}

type BoxStream<T> = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl PricingService for BarePricing {
    async fn get_price(
        &self,
        request: tonic::Request<GetPriceRequest>,
    ) -> Result<tonic::Response<Price>, Status> {
        let price = self.app.lookup(&request.into_inner().sku).await?;
        Ok(tonic::Response::new(price))
    }

    type StreamPricesStream = BoxStream<PriceUpdate>;

    async fn stream_prices(
        &self,
        _: tonic::Request<StreamPricesRequest>,
    ) -> Result<tonic::Response<Self::StreamPricesStream>, Status> {
        Err(Status::unimplemented(
            "the bare baseline serves GetPrice only",
        ))
    }

    async fn quote_basket(
        &self,
        _: tonic::Request<Streaming<BasketItem>>,
    ) -> Result<tonic::Response<Quote>, Status> {
        Err(Status::unimplemented(
            "the bare baseline serves GetPrice only",
        ))
    }

    type LivePricingStream = BoxStream<Counter>;

    async fn live_pricing(
        &self,
        _: tonic::Request<Streaming<Offer>>,
    ) -> Result<tonic::Response<Self::LivePricingStream>, Status> {
        Err(Status::unimplemented(
            "the bare baseline serves GetPrice only",
        ))
    }
}

fn tls_identity(certs: &CertPaths) -> anyhow::Result<Identity> {
    Ok(Identity::from_pem(
        std::fs::read(&certs.cert)?,
        std::fs::read(&certs.key)?,
    ))
}

async fn grpc_channel(addr: SocketAddr, ca: &Path) -> anyhow::Result<Channel> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca)?))
        .domain_name(SERVER_NAME);
    Ok(Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect()
        .await?)
}

/// Causeway's gRPC transport (the one Inventory Service calls Pricing Service through): the
/// client library's [`GrpcChannel`], here to one fixed address.
fn causeway_channel(addr: SocketAddr, ca: &Path) -> anyhow::Result<GrpcChannel> {
    let tls = causeway_core::tls::client_config(ca)?;
    Ok(GrpcChannel::fixed(
        SERVER_NAME,
        addr,
        tls,
        Duration::from_secs(5),
    )?)
}

/// One HTTP/1.1 or HTTP/2 connection over TLS to the REST server.
enum RestConnection {
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

async fn rest_connection(
    addr: SocketAddr,
    ca: &Path,
    http2: bool,
) -> anyhow::Result<RestConnection> {
    let alpn: &[&[u8]] = if http2 { &[b"h2"] } else { &[b"http/1.1"] };
    let config = causeway_core::tls::client_config_with_alpn(ca, alpn)?;
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from(SERVER_NAME)?, tcp)
        .await?;
    if http2 {
        let (sender, connection) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            TokioIo::new(tls),
        )
        .await?;
        tokio::spawn(connection);
        Ok(RestConnection::Http2(sender))
    } else {
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(connection);
        Ok(RestConnection::Http1(sender))
    }
}

impl RestConnection {
    async fn get_price(&mut self) -> anyhow::Result<()> {
        let uri = format!("https://{SERVER_NAME}/prices/{SKU}");
        let request = Request::get(uri).body(Full::new(Bytes::new()))?;
        let response = match self {
            RestConnection::Http1(sender) => {
                sender.ready().await?;
                sender.send_request(request).await?
            }
            RestConnection::Http2(sender) => {
                sender.ready().await?;
                sender.send_request(request).await?
            }
        };
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        anyhow::ensure!(status == StatusCode::OK, "REST answered {status}");
        let price: serde_json::Value = serde_json::from_slice(&body)?;
        anyhow::ensure!(price["sku"] == SKU, "unexpected answer {price}");
        Ok(())
    }
}

/// The REST/JSON server: `GET /prices/{sku}` with the same lookup.
async fn serve_rest(
    app: PricingApp,
    listener: TcpListener,
    certs: CertPaths,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    use axum::extract::{Path as UrlPath, State};
    async fn price(
        State(app): State<PricingApp>,
        UrlPath(sku): UrlPath<String>,
    ) -> Result<axum::Json<serde_json::Value>, (StatusCode, String)> {
        let price = app.lookup(&sku).await.map_err(|status| {
            let code = match status.code() {
                tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
                tonic::Code::NotFound => StatusCode::NOT_FOUND,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            (code, status.message().to_string())
        })?;
        Ok(axum::Json(serde_json::json!({
            "sku": price.sku,
            "currency": price.currency,
            "unitPriceCents": price.unit_price_cents,
            "updatedAt": price.updated_at,
            "servedBy": price.served_by,
        })))
    }
    let router = axum::Router::new()
        .route("/prices/{sku}", axum::routing::get(price))
        .with_state(app);
    let tls = tokio_rustls::TlsAcceptor::from(causeway_core::tls::server_config(&certs)?);
    let make_service = move |_| hyper_util::service::TowerToHyperService::new(router.clone());
    causeway_core::serve::serve(
        listener,
        Some(tls),
        make_service,
        shutdown,
        Duration::from_millis(200),
    )
    .await;
    Ok(())
}

pub struct BenchOptions {
    /// Turns each unary workload takes (see [`loadgen::run_in_rounds`]).
    pub rounds: u32,
    pub concurrency: usize,
    pub duration: Duration,
    pub warmup: Duration,
}

/// One unary `GetPrice` call, with a deadline as the services set one.
async fn get_price<C>(mut client: PricingServiceClient<C>) -> Result<(), Status>
where
    C: tonic::client::GrpcService<tonic::body::Body>,
    C::Error: Into<tonic::codegen::StdError>,
    C::ResponseBody: hyper::body::Body<Data = Bytes> + Send + 'static,
    <C::ResponseBody as hyper::body::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let mut request = tonic::Request::new(GetPriceRequest { sku: SKU.into() });
    request.set_timeout(Duration::from_secs(5));
    client.get_price(request).await.map(|_| ())
}

/// How `a`'s throughput compared with `b`'s round by round (turns of one round run back to back):
/// the median and the middle half of the per-round ratios, which a burst of load from elsewhere
/// on the machine moves less than the totals. Empty with fewer than four rounds.
fn round_by_round(a: &LoadReport, b: &LoadReport) -> String {
    let mut ratios: Vec<f64> = a
        .turn_rates
        .iter()
        .zip(&b.turn_rates)
        .map(|(a, b)| 100.0 * a / b.max(f64::EPSILON))
        .collect();
    if ratios.len() < 4 {
        return String::new();
    }
    ratios.sort_by(f64::total_cmp);
    let at = |quantile: f64| ratios[((ratios.len() - 1) as f64 * quantile).round() as usize];
    format!(
        " (round by round: median {:.1}%, middle half {:.1}-{:.1}%)",
        at(0.5),
        at(0.25),
        at(0.75)
    )
}

/// Runs the gRPC-versus-REST benchmark and returns its report.
pub async fn grpc(options: &BenchOptions) -> anyhow::Result<String> {
    let dir = std::env::temp_dir().join(format!("causeway-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let result = run_grpc(&dir, options).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run_grpc(dir: &Path, options: &BenchOptions) -> anyhow::Result<String> {
    // Call logs go to a file through the same buffered writer as a component's stderr under
    // `causeway up`; its thread's CPU is counted with the servers'.
    let _log = causeway_core::telemetry::init_logging_to_file(&dir.join("pricing.log"))?;
    let ca = LocalCa::load_or_create(&dir.join("tls"))?;
    let certs = ca.issue(
        "pricing-service",
        &[SERVER_NAME.to_string(), "127.0.0.1".to_string()],
    )?;
    let ca_path = ca.ca_cert_path();
    let deps = ServiceDeps {
        instance: "pricing-bench".into(),
        database_url: None,
        default_sqlite_path: dir.join("pricing.db"),
        http_metrics: Default::default(),
    };
    let app = causeway_services::pricing::app(&deps)
        .await
        .context("opening the pricing database")?;
    let mut metrics = causeway_core::telemetry::Metrics::new("pricing-service", "pricing-bench");
    app.register_metrics(&mut metrics);

    // Servers get a runtime (one worker thread) of their own, so that their CPU time can be told
    // apart from the load generator's: it is charged per request in the table.
    let servers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(SERVER_THREADS)
        .enable_all()
        .build()?;
    let server_cpu = || loadgen::thread_cpu_time(&[SERVER_THREADS, SQLITE_THREADS, LOG_THREAD]);
    let client_cpu = || loadgen::thread_cpu_time(&[CLIENT_THREADS]);
    let cpu = loadgen::CpuMeters {
        server: &server_cpu,
        client: &client_cpu,
    };
    let (trigger, shutdown) = shutdown_channel();
    let full_listener = TcpListener::bind("127.0.0.1:0").await?;
    let full_addr = full_listener.local_addr()?;
    let mut full_stop = shutdown.clone();
    let full = servers.spawn({
        let app = app.clone();
        let certs = certs.clone();
        async move {
            causeway_services::pricing::serve(app, full_listener, &certs, async move {
                full_stop.wait().await
            })
            .await
        }
    });

    let bare_listener = TcpListener::bind("127.0.0.1:0").await?;
    let bare_addr = bare_listener.local_addr()?;
    let mut bare_stop = shutdown.clone();
    let bare = tonic::transport::Server::builder()
        .tls_config(ServerTlsConfig::new().identity(tls_identity(&certs)?))?
        .add_service(PricingServiceServer::new(BarePricing { app: app.clone() }))
        .serve_with_incoming_shutdown(
            // As the Pricing Service does: small messages must not wait for Nagle's algorithm.
            TcpListenerStream::new(bare_listener).map(|connection| {
                if let Ok(stream) = &connection {
                    let _ = stream.set_nodelay(true);
                }
                connection
            }),
            async move { bare_stop.wait().await },
        );
    let bare = servers.spawn(bare);

    let rest_listener = TcpListener::bind("127.0.0.1:0").await?;
    let rest_addr = rest_listener.local_addr()?;
    let rest = servers.spawn(serve_rest(
        app.clone(),
        rest_listener,
        certs.clone(),
        shutdown.clone(),
    ));

    let shape = LoadShape {
        concurrency: options.concurrency,
        warmup: options.warmup,
        duration: options.duration,
    };
    // Pricing Service and bare tonic through the same client, Causeway's; then Pricing Service
    // through tonic's own `Channel`, which shows what the client side costs.
    let mut unary = Vec::new();
    for (name, addr) in [
        ("gRPC unary, Pricing Service", full_addr),
        ("gRPC unary, bare tonic, same handler", bare_addr),
    ] {
        let channel = causeway_channel(addr, &ca_path)?;
        unary.push(loadgen::Workload::new(name, move || {
            get_price(PricingServiceClient::new(channel.clone()))
        }));
    }
    let channel = grpc_channel(full_addr, &ca_path).await?;
    unary.push(loadgen::Workload::new(
        "gRPC unary, Pricing Service, tonic Channel",
        move || get_price(PricingServiceClient::new(channel.clone())),
    ));
    for (name, http2) in [("REST/JSON, HTTP/1.1", false), ("REST/JSON, HTTP/2", true)] {
        // HTTP/1.1: one keep-alive connection per worker; HTTP/2: one shared connection, as gRPC.
        let shared = if http2 {
            Some(Arc::new(Mutex::new(
                rest_connection(rest_addr, &ca_path, true).await?,
            )))
        } else {
            None
        };
        let mut pool = Vec::new();
        for _ in 0..options.concurrency {
            pool.push(match &shared {
                Some(shared) => shared.clone(),
                None => Arc::new(Mutex::new(
                    rest_connection(rest_addr, &ca_path, false).await?,
                )),
            });
        }
        let pool = Arc::new(pool);
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        unary.push(loadgen::Workload::new(name, move || {
            let pool = pool.clone();
            let turn = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            async move {
                let connection = &pool[turn % pool.len()];
                let mut guard = connection.lock().await;
                if let RestConnection::Http2(sender) = &*guard {
                    // HTTP/2 multiplexes: hold the lock only to clone the sender.
                    let mut shared = RestConnection::Http2(sender.clone());
                    drop(guard);
                    return shared.get_price().await;
                }
                guard.get_price().await
            }
        }));
    }
    let reports: Vec<LoadReport> = loadgen::run_in_rounds(&unary, shape, options.rounds, cpu).await;

    let channel = causeway_channel(full_addr, &ca_path)?;
    let streaming = loadgen::run(
        "gRPC bidi LivePricing (1000-msg sessions)",
        shape,
        cpu,
        move || {
            let mut client = PricingServiceClient::new(channel.clone());
            async move {
                let offers = (0..OFFERS_PER_SESSION).map(|i| Offer {
                    sku: SKU.into(),
                    quantity: 1 + i64::from(i % 10),
                    offered_unit_price_cents: 10_000,
                });
                let mut counters = client
                    .live_pricing(tokio_stream::iter(offers))
                    .await?
                    .into_inner();
                let mut received = 0;
                while counters.message().await?.is_some() {
                    received += 1;
                }
                if received == OFFERS_PER_SESSION {
                    Ok(())
                } else {
                    Err(Status::data_loss(format!(
                        "{received} counters for {OFFERS_PER_SESSION} offers"
                    )))
                }
            }
        },
    )
    .await;

    trigger.fire();
    let _ = full.await;
    let _ = bare.await;
    let _ = rest.await;
    servers.shutdown_background();

    let mut out = format!(
        "causeway bench grpc: GetPrice({SKU}) with {} concurrent callers, {:?} each after {:?} warm-up, TLS everywhere;\n\
         unary workloads measured in {} rounds, taking turns in rotating order\n\n",
        options.concurrency, options.duration, options.warmup, options.rounds
    );
    out.push_str(&loadgen::render(&reports));
    let full_rate = reports[0].per_second();
    let bare_rate = reports[1].per_second();
    let _ = writeln!(
        out,
        "\nPricing Service reaches {:.1}% of the bare tonic server's throughput{}; gRPC p50 {} µs vs REST HTTP/1.1 {} µs, HTTP/2 {} µs",
        100.0 * full_rate / bare_rate.max(f64::EPSILON),
        round_by_round(&reports[0], &reports[1]),
        reports[0].p50.as_micros(),
        reports[3].p50.as_micros(),
        reports[4].p50.as_micros(),
    );
    let _ = writeln!(
        out,
        "streaming: {:.0} messages/s each way over LivePricing ({} sessions, p50 session {} ms, {} errors)",
        streaming.per_second() * f64::from(OFFERS_PER_SESSION),
        streaming.requests,
        streaming.p50.as_millis(),
        streaming.errors
    );
    Ok(out)
}
