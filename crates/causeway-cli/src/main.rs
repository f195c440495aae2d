//! `causeway`: runs Causeway's topology on this machine and looks into it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use causeway_cli::{
    bench, bench_proxy, bench_queue, component, demo, demo_grpc, demo_queue, queue, soak, status,
    supervisor,
};
use causeway_core::{DataDir, Topology};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "causeway",
    version,
    about = "Service-to-service communication, on one machine"
)]
struct Cli {
    /// Topology file (default: ./causeway.toml if present, else built-in defaults).
    #[arg(long, global = true, env = "CAUSEWAY_CONFIG")]
    config: Option<PathBuf>,
    /// Data dir (certificates, keys, databases, logs, run state); overrides the topology file.
    #[arg(long, global = true, env = "CAUSEWAY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start every component and keep them running until Ctrl-C.
    Up(UpArgs),
    /// List components with pid, addresses, health and metrics address.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print an API token (JWT) for a user.
    Token {
        /// The user id the token is for (its `sub` claim); the services let it read and change
        /// that user's data only.
        #[arg(long)]
        sub: String,
        /// A scope to grant (repeatable): `admin` reads and changes any user's data, `debug` has
        /// the edge pass the tiers' `Server-Timing` entries back.
        #[arg(long = "scope", value_name = "SCOPE")]
        scopes: Vec<String>,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600, allow_negative_numbers = true)]
        ttl: i64,
    },
    /// Run one technique's scenario for real and print its steps with timings.
    Demo {
        #[command(subcommand)]
        technique: Technique,
    },
    /// Measure techniques side by side on this machine.
    Bench {
        #[command(subcommand)]
        target: BenchTarget,
        /// Concurrent callers.
        #[arg(long, global = true, default_value_t = 32)]
        concurrency: usize,
        /// Measured seconds per workload.
        #[arg(long, global = true, default_value_t = 5)]
        seconds: u64,
        /// Warm-up seconds per workload.
        #[arg(long, global = true, default_value_t = 1)]
        warmup: u64,
    },
    /// Every technique at once at a steady rate, with components killed in turn, then an
    /// end-to-end account: calls made and failed, messages lost or duplicated, memory per process.
    Soak {
        /// How long the load runs (fractions allowed: `--minutes 0.5`).
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
        /// Calls per second of each technique (REST, gRPC, emails).
        #[arg(long, default_value_t = 10)]
        rate: u32,
        /// Seconds between two kills; 0: no chaos.
        #[arg(long, default_value_t = 5.0)]
        chaos_every: f64,
        /// Seconds to wait, once the load stops, for messages still on their way.
        #[arg(long, default_value_t = 60)]
        settle: u64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Look into the queue scenario's broker: depths, messages, dead letters, redrive.
    Queue {
        #[command(subcommand)]
        action: QueueAction,
        /// Broker URL (default: the one the running system uses).
        #[arg(long, global = true, env = "CAUSEWAY_BROKER")]
        broker: Option<String>,
        /// Print JSON instead of text.
        #[arg(long, global = true)]
        json: bool,
    },
    /// Run one component (started by `causeway up`, not by hand).
    #[command(hide = true)]
    Component {
        /// Shown in process listings; the launch description comes from the environment.
        instance: String,
    },
}

#[derive(Subcommand)]
enum Technique {
    /// REST over HTTPS: User Service -> Order Service.
    Rest,
    /// gRPC: Inventory Service -> Pricing Service, all four call kinds.
    Grpc,
    /// Message queue: Email Service -> notification-queue -> Notification Service, then a
    /// message that fails into the dead-letter queue.
    Queue,
}

#[derive(Subcommand)]
enum QueueAction {
    /// Queues with their ready, unacked and delayed messages and consumers.
    Ls,
    /// Messages of a queue, oldest first, without consuming them.
    Peek {
        queue: String,
        #[arg(long, default_value_t = 10)]
        limit: usize,
    },
    /// The dead letters of a queue (its `<queue>.dlq`), with why each was dead-lettered.
    Dlq {
        queue: String,
        #[arg(long, default_value_t = 10)]
        limit: usize,
    },
    /// Move a queue's dead letters back into it, each with a fresh attempt count.
    Redrive {
        queue: String,
        /// At most this many (default: all).
        #[arg(long)]
        limit: Option<u64>,
    },
}

#[derive(Subcommand)]
enum BenchTarget {
    /// Causeway's reverse proxy vs nginx in front of one upstream, measured with wrk.
    Proxy {
        /// nginx worker processes and Causeway runtime worker threads alike.
        #[arg(long, default_value_t = 1)]
        workers: usize,
        /// Connections of the throughput round (a second round uses one).
        #[arg(long, default_value_t = 64)]
        connections: usize,
        /// Size of the upstream's answer.
        #[arg(long, default_value_t = 1024)]
        body_bytes: usize,
        /// Access logs on in both proxies (to files) instead of off in both.
        #[arg(long)]
        access_log: bool,
        #[arg(long, default_value = "/usr/sbin/nginx")]
        nginx: PathBuf,
        #[arg(long, default_value = "/usr/bin/wrk")]
        wrk: PathBuf,
        /// Internal: serve the gateway in front of this upstream (the benchmark's child).
        #[arg(long, hide = true)]
        serve_upstream: Option<SocketAddr>,
    },
    /// gRPC unary vs REST/JSON (HTTP/1.1, HTTP/2), Pricing Service vs bare tonic, streaming.
    Grpc {
        /// The unary workloads take turns in this many rounds (order rotating), each measured for
        /// its share of `--seconds`, so that drift on a busy machine falls on all of them alike.
        #[arg(long, default_value_t = 10)]
        rounds: u32,
    },
    /// Publish+consume through the embedded broker, RabbitMQ and MQTT: msgs/s and latency.
    Queue {
        /// RabbitMQ to compare with (skipped if unreachable).
        #[arg(
            long,
            env = "CAUSEWAY_BENCH_AMQP_URL",
            default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
        )]
        amqp: String,
        /// MQTT broker to compare with (skipped if unreachable).
        #[arg(
            long,
            env = "CAUSEWAY_BENCH_MQTT_URL",
            default_value = "mqtt://127.0.0.1:1883"
        )]
        mqtt: String,
    },
}

#[derive(clap::Args)]
struct UpArgs {
    /// Order Service instances.
    #[arg(long, env = "CAUSEWAY_ORDER_INSTANCES")]
    order_instances: Option<usize>,
    /// Reverse-proxy instances behind the load balancer.
    #[arg(long, env = "CAUSEWAY_PROXY_INSTANCES")]
    proxy_instances: Option<usize>,
    /// Edge (load balancer) address.
    #[arg(long, env = "CAUSEWAY_LISTEN")]
    listen: Option<SocketAddr>,
    /// DNS server address (UDP and TCP).
    #[arg(long, env = "CAUSEWAY_DNS_LISTEN")]
    dns_listen: Option<SocketAddr>,
    /// Registry API address.
    #[arg(long, env = "CAUSEWAY_REGISTRY_LISTEN")]
    registry_listen: Option<SocketAddr>,
    /// Database for every service (`postgres://...`); default: SQLite files in the data dir.
    #[arg(long, env = "CAUSEWAY_DATABASE_URL")]
    database_url: Option<String>,
    /// The broker of the queue scenario: `amqp://user:pass@host:5672/%2f` (RabbitMQ) or
    /// `mqtt://host:1883`; default: Causeway's embedded broker.
    #[arg(long, env = "CAUSEWAY_BROKER")]
    broker: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let topology = match &cli.command {
        // A component reads its whole configuration from the launch description.
        Command::Component { .. } => return component::main(),
        _ => topology(&cli),
    };
    match topology.and_then(|topology| run(cli.command, topology)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("causeway: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn topology(cli: &Cli) -> anyhow::Result<Topology> {
    let mut topology = Topology::load(cli.config.as_deref())?;
    if let Some(dir) = &cli.data_dir {
        topology.data_dir = dir.clone();
    }
    Ok(topology)
}

fn run(command: Command, mut topology: Topology) -> anyhow::Result<ExitCode> {
    // One thread: the supervisor spawns every child from it, and children are told to stop
    // when the thread that started them ends (PR_SET_PDEATHSIG).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match command {
        Command::Up(args) => {
            apply_overrides(&mut topology, args);
            topology.validate()?;
            if let Some(url) = &topology.messaging.broker_url {
                causeway_queue::BrokerTarget::parse(url)?;
            }
            runtime.block_on(supervisor::up(topology))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { json } => {
            let status = runtime.block_on(status::collect(&topology.data_dir))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", status::render(&status));
            }
            Ok(if status.running {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Token { sub, scopes, ttl } => {
            if let Some(bad) = scopes
                .iter()
                .find(|scope| scope.is_empty() || scope.chars().any(|c| c.is_ascii_whitespace()))
            {
                anyhow::bail!("a scope is one word without spaces, not {bad:?}");
            }
            let data = DataDir::new(&topology.data_dir);
            let key = causeway_proxy::auth::load_or_create_key(&data.jwt_key())?;
            let scopes: Vec<&str> = scopes.iter().map(String::as_str).collect();
            let token = causeway_proxy::auth::issue_scoped(
                &key,
                &topology.reverse_proxy.jwt,
                &sub,
                &scopes,
                ttl,
            )?;
            println!("{token}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { technique } => {
            let report = runtime.block_on(async {
                match technique {
                    Technique::Rest => demo::rest(&topology, &topology.data_dir).await,
                    Technique::Grpc => demo_grpc::grpc(&topology, &topology.data_dir).await,
                    Technique::Queue => demo_queue::queue(&topology, &topology.data_dir).await,
                }
            })?;
            print!("{report}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Soak {
            minutes,
            rate,
            chaos_every,
            settle,
            json,
        } => {
            if !(minutes.is_finite() && minutes > 0.0) {
                anyhow::bail!("--minutes must be a positive number, not {minutes}");
            }
            if !(chaos_every.is_finite() && chaos_every >= 0.0) {
                anyhow::bail!("--chaos-every must be 0 or more seconds, not {chaos_every}");
            }
            let options = soak::SoakOptions {
                duration: std::time::Duration::from_secs_f64(minutes * 60.0),
                rate: rate.max(1),
                chaos_every: (chaos_every > 0.0)
                    .then(|| std::time::Duration::from_secs_f64(chaos_every)),
                settle: std::time::Duration::from_secs(settle),
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            let report = runtime.block_on(soak::run(&topology, &options))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", soak::render(&report));
            }
            Ok(if report.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Bench {
            target: BenchTarget::Queue { amqp, mqtt },
            concurrency,
            seconds,
            warmup,
        } => {
            let options = bench_queue::QueueBenchOptions {
                shape: causeway_cli::loadgen::LoadShape {
                    concurrency: concurrency.max(1),
                    duration: std::time::Duration::from_secs(seconds.max(1)),
                    warmup: std::time::Duration::from_secs(warmup),
                },
                amqp_url: amqp,
                mqtt_url: mqtt,
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            let report = runtime.block_on(bench_queue::run(&options))?;
            print!("{report}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            target:
                BenchTarget::Proxy {
                    workers,
                    connections,
                    body_bytes,
                    access_log,
                    nginx,
                    wrk,
                    serve_upstream,
                },
            seconds,
            warmup,
            ..
        } => {
            if let Some(upstream) = serve_upstream {
                bench_proxy::serve_proxy(upstream, workers, &topology.data_dir, access_log)?;
                return Ok(ExitCode::SUCCESS);
            }
            let options = bench_proxy::ProxyBenchOptions {
                workers: workers.max(1),
                connections: connections.max(1),
                duration: std::time::Duration::from_secs(seconds.max(1)),
                warmup: std::time::Duration::from_secs(warmup),
                body_bytes,
                access_log,
                nginx,
                wrk,
            };
            print!("{}", bench_proxy::run(&options)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            target: BenchTarget::Grpc { rounds },
            concurrency,
            seconds,
            warmup,
        } => {
            let options = bench::BenchOptions {
                rounds: rounds.max(1),
                concurrency: concurrency.max(1),
                duration: std::time::Duration::from_secs(seconds.max(1)),
                warmup: std::time::Duration::from_secs(warmup),
            };
            // The callers get one thread; the servers another (see `bench`).
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name(bench::CLIENT_THREADS)
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            let report = runtime.block_on(bench::grpc(&options))?;
            print!("{report}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Queue {
            action,
            broker,
            json,
        } => {
            let data_dir = topology.data_dir.clone();
            let out = runtime.block_on(async {
                let backend = queue::connect(&topology, &data_dir, broker.as_deref()).await?;
                let text = match action {
                    QueueAction::Ls if json => {
                        let known = std::slice::from_ref(&topology.messaging.notification_queue);
                        serde_json::to_string_pretty(&backend.list(known).await?)? + "\n"
                    }
                    QueueAction::Ls => queue::list(&*backend, &topology).await?,
                    QueueAction::Peek { queue, limit } => {
                        peek_output(&*backend, &queue, limit, json).await?
                    }
                    QueueAction::Dlq { queue, limit } => {
                        let dlq = causeway_queue::dead_letter_queue_name(&queue);
                        peek_output(&*backend, &dlq, limit, json).await?
                    }
                    QueueAction::Redrive { queue, limit } => {
                        let spec = queue::spec_for(&topology, &queue);
                        queue::redrive(&*backend, &spec, limit).await?
                    }
                };
                anyhow::Ok(text)
            })?;
            print!("{out}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Component { .. } => Ok(component::main()),
    }
}

async fn peek_output(
    backend: &dyn causeway_queue::QueueBackend,
    queue_name: &str,
    limit: usize,
    json: bool,
) -> anyhow::Result<String> {
    let (messages, text) = queue::peek(backend, queue_name, limit).await?;
    Ok(if json {
        serde_json::to_string_pretty(&messages)? + "\n"
    } else {
        text
    })
}

fn apply_overrides(topology: &mut Topology, args: UpArgs) {
    if let Some(n) = args.order_instances {
        topology.order_service.instances = n;
    }
    if let Some(n) = args.proxy_instances {
        topology.reverse_proxy.instances = n;
    }
    if let Some(addr) = args.listen {
        topology.load_balancer.listen = addr;
    }
    if let Some(addr) = args.dns_listen {
        topology.discovery.dns_listen = addr;
    }
    if let Some(addr) = args.registry_listen {
        topology.discovery.api_listen = addr;
    }
    if let Some(url) = args.database_url {
        for service in [
            &mut topology.user_service,
            &mut topology.order_service,
            &mut topology.payment_service,
            &mut topology.pricing_service,
            &mut topology.inventory_service,
            &mut topology.email_service,
            &mut topology.notification_service,
        ] {
            service.database_url = Some(url.clone());
        }
    }
    if let Some(url) = args.broker {
        topology.messaging.broker_url = Some(url);
    }
}
