//! `causeway component`: the body of every process `causeway up` starts. It reads its [`Launch`]
//! from the environment, binds its listeners, registers with discovery, reports `ready` on stdout,
//! serves until SIGTERM, then deregisters and drains.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use causeway_client::grpc::GrpcBalancer;
use causeway_client::{ClientSettings, Discovery, ServiceClient, registration};
use causeway_core::registry_api::InstanceRecord;
use causeway_core::serve::{self, Shutdown, ShutdownTrigger, bind, serve_admin, shutdown_channel};
use causeway_core::telemetry::{HttpMetrics, Metrics};
use causeway_core::topology::{ServiceConfig, instance_addr};
use causeway_core::{ChildReport, Launch, Role};
use causeway_discovery::{DiscoveryServer, Registry};
use causeway_proxy::reload::{Reloadable, ReloadableCertificates};
use causeway_proxy::routing::RouteTable;
use causeway_proxy::{Balancer, Gateway};
use causeway_queue::{BrokerLink, BrokerTarget, ConnectOptions, QueueError, ResolveBroker};
use causeway_services::ServiceDeps;
use causeway_services::email::PublisherMetrics;
use causeway_services::notification::ConsumerMetrics;
use hyper_util::service::TowerToHyperService;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

mod mesh;

pub use mesh::control_plane_server_name;

/// How often the reverse proxy looks at its Ingress and certificate files for changes.
const CONFIG_POLL: Duration = Duration::from_millis(500);
/// How long open connections may finish after SIGTERM.
const DRAIN: Duration = Duration::from_millis(700);
/// How long start-up waits for the registry to accept this instance.
const REGISTRATION_PATIENCE: Duration = Duration::from_secs(5);

/// Runs the component described by the environment; returns the process exit code.
pub fn main() -> std::process::ExitCode {
    // Held until the component exits, when it writes out what is buffered.
    let _log = causeway_core::telemetry::init_logging_buffered();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            ChildReport::Failed {
                message: format!("cannot start the async runtime: {err}"),
            }
            .emit();
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            let message = format!("{err:#}");
            tracing::error!(error = %message, "component failed");
            ChildReport::Failed { message }.emit();
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let launch = Launch::from_env()?;
    let instance = launch.instance();
    tracing::info!(%instance, pid = std::process::id(), "starting");
    let mut metrics = Metrics::new(launch.role.name(), &instance);
    let (trigger, shutdown) = shutdown_channel();
    let tasks = match launch.role {
        Role::Discovery => start_discovery(&launch, metrics, shutdown).await?,
        Role::LoadBalancer => start_balancer(&launch, metrics, shutdown).await?,
        Role::ReverseProxy => {
            let client = Arc::new(service_client(&launch, &mut metrics)?);
            start_reverse_proxy(&launch, metrics, client, shutdown).await?
        }
        Role::UserService => {
            let client = Arc::new(service_client(&launch, &mut metrics)?);
            let deps = service_deps(&launch, metrics.http_server());
            let app = causeway_services::user::app(&deps, client).await?;
            start_http_service(&launch, metrics, app, shutdown).await?
        }
        Role::OrderService => {
            let deps = service_deps(&launch, metrics.http_server());
            let app = causeway_services::order::app(&deps).await?;
            start_http_service(&launch, metrics, app, shutdown).await?
        }
        Role::PaymentService => {
            let mut client = service_client(&launch, &mut metrics)?;
            if let Some(mesh) = &launch.mesh {
                client = client.through_sidecar(mesh.outbound.addr, mesh::meshed_peers(&launch));
            }
            let client = Arc::new(client);
            let deps = service_deps(&launch, metrics.http_server());
            let app = causeway_services::payment::app(&deps, client).await?;
            start_http_service(&launch, metrics, app, shutdown).await?
        }
        Role::PricingService => {
            // A gRPC server: its metrics are per method and status code, not HTTP routes.
            let deps = service_deps(&launch, HttpMetrics::default());
            let app = causeway_services::pricing::app(&deps).await?;
            app.register_metrics(&mut metrics);
            start_pricing(&launch, metrics, app, shutdown).await?
        }
        Role::Broker => start_broker(&launch, metrics, shutdown).await?,
        Role::MeshControlPlane => mesh::start_control_plane(&launch, metrics, shutdown).await?,
        Role::Sidecar => {
            let client = Arc::new(service_client(&launch, &mut metrics)?);
            mesh::start_sidecar(&launch, metrics, client, shutdown).await?
        }
        Role::EmailService => {
            let broker = broker_link(&launch)?;
            let deps = service_deps(&launch, metrics.http_server());
            let queue = launch.topology.messaging.notification_queue.clone();
            let publisher_metrics = PublisherMetrics::default();
            publisher_metrics.register(metrics.registry_mut());
            let app = causeway_services::email::app(
                &deps,
                broker,
                queue,
                publisher_metrics,
                shutdown.clone(),
            )
            .await?;
            start_http_service(&launch, metrics, app, shutdown).await?
        }
        Role::NotificationService => {
            let broker = broker_link(&launch)?;
            let deps = service_deps(&launch, metrics.http_server());
            let messaging = &launch.topology.messaging;
            let consumer_metrics = ConsumerMetrics::default();
            consumer_metrics.register(metrics.registry_mut());
            let app = causeway_services::notification::app(
                &deps,
                broker,
                messaging.notification_queue.clone(),
                messaging.prefetch,
                consumer_metrics,
                shutdown.clone(),
            )
            .await?;
            start_http_service(&launch, metrics, app, shutdown).await?
        }
        Role::InventoryService => {
            let settings = client_settings(&launch);
            let pricing = GrpcBalancer::new(
                causeway_services::pricing::SERVICE_NAME,
                &settings,
                &launch.data().ca_cert(),
                &mut metrics,
            )?;
            let deps = service_deps(&launch, metrics.http_server());
            let app = causeway_services::inventory::app(&deps, Arc::new(pricing)).await?;
            start_http_service(&launch, metrics, app, shutdown).await?
        }
    };
    serve::termination_signal().await;
    tracing::info!(%instance, "stopping");
    stop(trigger, tasks).await;
    Ok(())
}

async fn stop(trigger: ShutdownTrigger, tasks: Vec<JoinHandle<()>>) {
    trigger.fire();
    let all = futures_util::future::join_all(tasks);
    if tokio::time::timeout(DRAIN + Duration::from_millis(500), all)
        .await
        .is_err()
    {
        tracing::warn!("some tasks did not stop in time");
    }
}

fn client_settings(launch: &Launch) -> ClientSettings {
    ClientSettings {
        dns_addr: launch.dns_addr,
        zone: launch.topology.discovery.zone.clone(),
        config: launch.topology.client.clone(),
    }
}

fn service_client(launch: &Launch, metrics: &mut Metrics) -> anyhow::Result<ServiceClient> {
    let settings = client_settings(launch);
    Ok(ServiceClient::new(
        settings,
        &launch.data().ca_cert(),
        metrics,
    )?)
}

/// The configuration of this instance's service (the roles that call this are all services).
fn service_config(launch: &Launch) -> ServiceConfig {
    launch
        .topology
        .service(launch.role)
        .cloned()
        .unwrap_or_default()
}

fn service_deps(launch: &Launch, http_metrics: HttpMetrics) -> ServiceDeps {
    ServiceDeps {
        instance: launch.instance(),
        database_url: service_config(launch).database_url,
        default_sqlite_path: launch.data().database(launch.role.name()),
        http_metrics,
    }
}

/// The main and admin listeners of this instance.
async fn bind_listeners(
    launch: &Launch,
    listen: SocketAddr,
    admin_listen: SocketAddr,
) -> anyhow::Result<(tokio::net::TcpListener, tokio::net::TcpListener)> {
    let what = launch.instance();
    let main = bind(&what, instance_addr(listen, launch.index)).await?;
    let admin = bind(
        &format!("{what} (admin)"),
        instance_addr(admin_listen, launch.index),
    )
    .await?;
    Ok((main, admin))
}

/// The main and admin listeners of a service instance, as its configuration places them.
async fn bind_service_listeners(
    launch: &Launch,
) -> anyhow::Result<(tokio::net::TcpListener, tokio::net::TcpListener)> {
    let config = service_config(launch);
    bind_listeners(launch, config.listen, config.admin_listen).await
}

/// Registers with discovery, reports ready, and starts the admin endpoint.
async fn announce(
    launch: &Launch,
    listen: SocketAddr,
    admin: tokio::net::TcpListener,
    metrics: Metrics,
    shutdown: &Shutdown,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let service = launch.role.name().to_string();
    announce_as(
        launch,
        service,
        launch.instance(),
        listen,
        admin,
        metrics,
        shutdown,
    )
    .await
}

/// [`announce`], registered in discovery as `service`'s `registered_instance` (a sidecar lists
/// itself under its app's mesh service).
async fn announce_as(
    launch: &Launch,
    service: String,
    registered_instance: String,
    listen: SocketAddr,
    admin: tokio::net::TcpListener,
    metrics: Metrics,
    shutdown: &Shutdown,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let instance = launch.instance();
    let admin_addr = admin.local_addr()?;
    let record = InstanceRecord {
        service,
        instance: registered_instance,
        addr: listen,
        admin_addr: Some(admin_addr),
        pid: Some(std::process::id()),
    };
    let heartbeat = Duration::from_millis(launch.topology.discovery.heartbeat_interval_ms);
    let registration = registration::start(
        launch.registry_addr,
        record,
        heartbeat,
        REGISTRATION_PATIENCE,
        shutdown.clone(),
    )
    .await?;
    let admin_task = tokio::spawn(serve_admin(
        admin,
        instance.clone(),
        metrics.into_shared(),
        shutdown.clone(),
    ));
    ChildReport::Ready {
        instance,
        pid: std::process::id(),
        listen,
        admin: admin_addr,
    }
    .emit();
    Ok(vec![registration, admin_task])
}

async fn start_discovery(
    launch: &Launch,
    mut metrics: Metrics,
    shutdown: Shutdown,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let config = &launch.topology.discovery;
    let registry = Registry::new(Duration::from_millis(config.expiry_ms));
    let server = DiscoveryServer::bind(config, registry, &mut metrics).await?;
    let report = ChildReport::Ready {
        instance: launch.instance(),
        pid: std::process::id(),
        listen: server.dns_addr,
        admin: server.api_addr,
    };
    let task = tokio::spawn(server.run(metrics.into_shared(), shutdown));
    report.emit();
    Ok(vec![task])
}

async fn start_balancer(
    launch: &Launch,
    mut metrics: Metrics,
    shutdown: Shutdown,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let config = launch.topology.load_balancer.clone();
    let (listener, admin) = bind_listeners(launch, config.listen, config.admin_listen).await?;
    let listen = listener.local_addr()?;
    let discovery = Discovery::new(launch.dns_addr, &launch.topology.discovery.zone)?;
    let balancer = Arc::new(Balancer::new(config, discovery, &mut metrics));
    balancer.refresh().await;
    let mut tasks = announce(launch, listen, admin, metrics, &shutdown).await?;
    tasks.extend(balancer.clone().watch_backends(shutdown.clone()));
    tasks.push(tokio::spawn(balancer.serve(listener, shutdown)));
    Ok(tasks)
}

fn tls_acceptor(launch: &Launch) -> anyhow::Result<TlsAcceptor> {
    let paths = launch.data().service_cert(launch.role.name());
    let config = causeway_core::tls::server_config(&paths)
        .with_context(|| format!("loading the TLS certificate of {}", launch.role))?;
    Ok(TlsAcceptor::from(config))
}

async fn start_reverse_proxy(
    launch: &Launch,
    mut metrics: Metrics,
    client: Arc<ServiceClient>,
    shutdown: Shutdown,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let config = &launch.topology.reverse_proxy;
    // One listener per worker thread (SO_REUSEPORT), then the admin listener.
    let what = launch.instance();
    let listeners = serve::bind_per_core(
        &what,
        instance_addr(config.listen, launch.index),
        config.worker_count(),
    )?;
    let admin = bind(
        &format!("{what} (admin)"),
        instance_addr(config.admin_listen, launch.index),
    )
    .await?;
    let listen = listeners[0].local_addr()?;
    // Several certificates, chosen by SNI (the edge's is the default), reloaded with the routes.
    let certificates = Arc::new(ReloadableCertificates::new(
        crate::supervisor::reverse_proxy_certificates(&launch.topology, &launch.data())?,
    ));
    let tls = TlsAcceptor::from(causeway_core::tls::server_config_with_resolver(
        certificates.clone(),
    )?);
    let key = causeway_proxy::auth::load_or_create_key(&launch.data().jwt_key())?;
    let http = metrics.http_server();
    let table = RouteTable::load(&config.routes, &config.ingress)?;
    let first = Gateway::with_routes(launch.instance(), config, table, &key, client, http);
    first.register_upstream_metrics(metrics.registry_mut());
    let gateway_limits = first.limits().clone();
    // Shared by the workers: max_connections holds for the instance.
    let connections =
        causeway_proxy::hygiene::ConnectionLimiter::new(gateway_limits.max_connections);
    connections.register(metrics.registry_mut());
    let rate_limit = first.rate_limit();
    rate_limit.register(metrics.registry_mut());
    // The budget is shared over UDP on the admin port's number, which discovery publishes.
    let sharing = if config.rate_limit.shared && config.instances > 1 {
        let admin_addr = admin.local_addr()?;
        match tokio::net::UdpSocket::bind(admin_addr).await {
            Ok(socket) => Some(socket),
            Err(err) => {
                tracing::warn!(%admin_addr, error = %err, "cannot bind the rate-limit port; this instance keeps a budget of its own");
                None
            }
        }
    } else {
        None
    };
    let mut tasks = announce(launch, listen, admin, metrics, &shutdown).await?;
    if let Some(socket) = sharing {
        let peers = causeway_proxy::rate_limit::DiscoveredPeers {
            discovery: Discovery::new(launch.dns_addr, &launch.topology.discovery.zone)?,
            service: launch.role.name().to_string(),
            instance: launch.instance(),
        };
        tasks.push(causeway_proxy::rate_limit::spawn_sharing(
            rate_limit,
            socket,
            peers,
            Duration::from_millis(config.rate_limit.sync_interval_ms),
            shutdown.clone(),
        ));
    }
    tasks.extend(first.spawn_health_checkers(&shutdown));
    tracing::info!(source = first.route_source(), "routes loaded");
    let gateway = Arc::new(Reloadable::new(first));
    tasks.push(tokio::spawn(watch_configuration(
        launch.topology.clone(),
        launch.data(),
        gateway.clone(),
        certificates,
        shutdown.clone(),
    )));

    let sweeper = gateway.clone();
    let mut sweeper_shutdown = shutdown.clone();
    tasks.push(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(60)) => sweeper.current().forget_idle_clients(),
                _ = sweeper_shutdown.wait() => return,
            }
        }
    }));
    let tunnels = gateway.clone();
    let make_service = move |peer: SocketAddr| {
        let gateway = gateway.clone();
        hyper::service::service_fn(move |request| {
            // Each request keeps the gateway it started with across a reload.
            let gateway = gateway.current();
            async move { Ok::<_, Infallible>(gateway.handle(request, peer).await) }
        })
    };
    let limits = gateway_limits;
    // nginx's model: each worker thread accepts on its own listener and serves its connections
    // on its own single-threaded runtime; the gateway is shared. The tasks above (admin,
    // registration, health checks, reloads) stay on this runtime. On SIGTERM every worker stops
    // accepting and drains like a single listener did.
    let workers = serve::serve_per_core("reverse-proxy", listeners, move |_worker, listener| {
        let make_service = make_service.clone();
        let (tls, limits) = (tls.clone(), limits.clone());
        let (connections, shutdown) = (connections.clone(), shutdown.clone());
        let tunnels = tunnels.clone();
        let mut drain_signal = shutdown.clone();
        async move {
            let serving = serve::serve_limited(
                listener,
                Some(tls),
                make_service,
                shutdown,
                DRAIN,
                Some(&limits),
                connections,
            );
            // Open WebSocket tunnels are part of the drain, alongside the connections: a grace
            // period, then closed; this worker's runtime runs its tunnels until they have ended.
            let tunnels = async move {
                drain_signal.wait().await;
                tunnels.current().drain_tunnels(DRAIN).await;
            };
            tokio::join!(serving, tunnels);
        }
    })?;
    tasks.push(tokio::spawn(workers.finished()));
    Ok(tasks)
}

/// Reloads the Ingress routes and the TLS certificates when one of their files changes (or on
/// SIGHUP): a new gateway takes the new requests while requests in flight finish on the old one,
/// new handshakes get the new certificates while open connections keep theirs, and a file that
/// does not load leaves what is in use in place. The new gateway carries the old one's metrics,
/// rate-limit state, WebSocket tunnels and the upstream pools of unchanged routes
/// (`Gateway::reload`). Topology routes and settings are read once, at start.
async fn watch_configuration(
    topology: causeway_core::topology::Topology,
    data: causeway_core::launch::DataDir,
    gateway: Arc<Reloadable<Gateway>>,
    certificates: Arc<ReloadableCertificates>,
    shutdown: Shutdown,
) {
    let files = crate::supervisor::reverse_proxy_watched_files(&topology, &data);
    causeway_proxy::reload::watch_files(files, CONFIG_POLL, shutdown, move |why| {
        let config = &topology.reverse_proxy;
        if !config.ingress.is_empty() {
            match RouteTable::load(&config.routes, &config.ingress) {
                Ok(table) => {
                    let routes = table.routes().len();
                    gateway.replace(gateway.current().reload(table));
                    tracing::info!(
                        event = "proxy.routes_reloaded",
                        why,
                        routes,
                        "routes reloaded"
                    );
                }
                Err(err) => tracing::error!(
                    event = "proxy.reload_refused",
                    why,
                    error = %err,
                    "routing files do not load; kept the routes in use"
                ),
            }
        }
        match crate::supervisor::reverse_proxy_certificates(&topology, &data) {
            Ok(loaded) => {
                certificates.replace(loaded);
                tracing::info!(
                    event = "proxy.certificates_reloaded",
                    why,
                    "TLS certificates reloaded"
                );
            }
            Err(err) => tracing::error!(
                event = "proxy.certificates_refused",
                why,
                error = format!("{err:#}"),
                "TLS certificates do not load; kept the certificates in use"
            ),
        }
        crate::supervisor::reverse_proxy_watched_files(&topology, &data)
    })
    .await;
}

/// The service's link to its broker: `messaging.broker_url` if set, else the embedded broker,
/// found through discovery on every (re)connect since a restarted broker may listen elsewhere.
fn broker_link(launch: &Launch) -> anyhow::Result<Arc<BrokerLink>> {
    let zone = &launch.topology.discovery.zone;
    let mut options = ConnectOptions::new(launch.instance());
    options.ca_cert = Some(launch.data().ca_cert());
    options.server_name = format!("{}.{zone}", Role::Broker.name());
    let queues = vec![launch.topology.messaging.notification_queue.clone()];
    if let Some(url) = &launch.topology.messaging.broker_url {
        let target = BrokerTarget::parse(url)?;
        return Ok(Arc::new(BrokerLink::fixed(target, options, queues)));
    }
    let discovery = Arc::new(Discovery::new(launch.dns_addr, zone)?);
    let resolve: ResolveBroker = Arc::new(move || {
        let discovery = discovery.clone();
        Box::pin(async move {
            let service = Role::Broker.name();
            discovery.forget_service(service);
            let resolution =
                discovery
                    .resolve(service)
                    .await
                    .map_err(|err| QueueError::Connect {
                        backend: causeway_queue::BackendKind::Embedded,
                        target: format!("{service} (discovery)"),
                        message: err.to_string(),
                    })?;
            let endpoint = &resolution.endpoints[0];
            Ok(BrokerTarget::Embedded {
                host: endpoint.addr.ip().to_string(),
                port: endpoint.addr.port(),
            })
        })
    });
    Ok(Arc::new(BrokerLink::new(resolve, options, queues)))
}

/// The embedded broker: its queues on disk in the data dir, its gRPC API over TLS.
async fn start_broker(
    launch: &Launch,
    mut metrics: Metrics,
    shutdown: Shutdown,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let config = &launch.topology.broker;
    let broker = causeway_broker::Broker::open(launch.data().root(), config)
        .context("opening the broker's storage")?;
    broker.register_metrics(metrics.registry_mut());
    let (listener, admin) = bind_listeners(launch, config.listen, config.admin_listen).await?;
    let listen = listener.local_addr()?;
    let certificate = launch.data().service_cert(launch.role.name());
    let mut tasks = announce(launch, listen, admin, metrics, &shutdown).await?;
    let stopped = shutdown.fired();
    tasks.push(tokio::spawn(async move {
        if let Err(err) = causeway_broker::serve(broker, listener, &certificate, stopped).await {
            tracing::error!(error = %err, "the broker stopped with an error");
        }
    }));
    Ok(tasks)
}

async fn start_pricing(
    launch: &Launch,
    metrics: Metrics,
    app: causeway_services::pricing::PricingApp,
    shutdown: Shutdown,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let (listener, admin) = bind_service_listeners(launch).await?;
    let listen = listener.local_addr()?;
    let certificate = launch.data().service_cert(launch.role.name());
    let mut tasks = announce(launch, listen, admin, metrics, &shutdown).await?;
    let stopped = shutdown.fired();
    tasks.push(tokio::spawn(async move {
        if let Err(err) =
            causeway_services::pricing::serve(app, listener, &certificate, stopped).await
        {
            tracing::error!(error = %err, "pricing service stopped with an error");
        }
    }));
    Ok(tasks)
}

async fn start_http_service(
    launch: &Launch,
    metrics: Metrics,
    app: axum::Router,
    shutdown: Shutdown,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let (listener, admin) = bind_service_listeners(launch).await?;
    let listen = listener.local_addr()?;
    let tls = tls_acceptor(launch)?;
    // A meshed app also serves its sidecar's inbound half, in the clear on loopback.
    let from_sidecar = match &launch.mesh {
        Some(mesh) => Some(mesh::inherited(&mesh.app)?),
        None => None,
    };
    let mut tasks = announce(launch, listen, admin, metrics, &shutdown).await?;
    let make_service = move |_peer| TowerToHyperService::new(app.clone());
    if let Some(listener) = from_sidecar {
        tasks.push(tokio::spawn(serve::serve(
            listener,
            None,
            make_service.clone(),
            shutdown.clone(),
            DRAIN,
        )));
    }
    tasks.push(tokio::spawn(serve::serve(
        listener,
        Some(tls),
        make_service,
        shutdown,
        DRAIN,
    )));
    Ok(tasks)
}
