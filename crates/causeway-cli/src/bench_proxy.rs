//! `causeway bench proxy`: Causeway's reverse proxy against nginx, on this machine, through the
//! same upstream and the same load generator (wrk).
//!
//! One upstream (a minimal hyper HTTP/1.1 server on its own thread and runtime) answers a fixed
//! body. nginx (`worker_processes N`, a keep-alive `upstream` block) and Causeway's gateway (a
//! child process of this command, `N` single-threaded runtimes with a `SO_REUSEPORT` listener
//! each, one static-upstream route through the same `Gateway::handle`, `serve::serve` and
//! `serve::serve_per_core` as `causeway up`'s reverse proxy) both listen on
//! plain HTTP. wrk measures the upstream directly and each proxy: throughput at `connections`
//! concurrent connections, then latency at one. CPU per request comes from `/proc/<pid>/stat` of
//! the proxy's processes over the measured run.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use causeway_core::topology::{
    ClientConfig, ReverseProxyConfig, RouteConfig, StaticUpstream, UpstreamProtocol,
};
use http::Response;
use http_body_util::Full;

use crate::loadgen::cpu_time;

/// What `causeway bench proxy` runs.
#[derive(Clone, Debug)]
pub struct ProxyBenchOptions {
    /// nginx worker processes and Causeway worker threads (one runtime each) alike.
    pub workers: usize,
    /// Concurrent connections of the throughput round.
    pub connections: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// Size of the upstream's answer.
    pub body_bytes: usize,
    /// Access logs on in both proxies (to files), instead of off in both.
    pub access_log: bool,
    pub nginx: PathBuf,
    pub wrk: PathBuf,
}

/// One wrk run's figures.
#[derive(Clone, Debug, Default)]
pub struct WrkResult {
    pub requests_per_second: f64,
    pub p50: Duration,
    pub p99: Duration,
    pub requests: u64,
    pub errors: u64,
}

/// One target under one load.
#[derive(Clone, Debug)]
struct Row {
    target: &'static str,
    wrk: WrkResult,
    /// CPU time of the proxy's processes per request (none for the direct run).
    cpu_per_request: Option<Duration>,
}

/// Runs the comparison and renders its table.
pub fn run(options: &ProxyBenchOptions) -> anyhow::Result<String> {
    for (tool, path) in [("nginx", &options.nginx), ("wrk", &options.wrk)] {
        if !path.exists() {
            bail!(
                "{tool} not found at {} (Debian: apt-get install -y nginx wrk)",
                path.display()
            );
        }
    }
    let dir = std::env::temp_dir().join(format!("causeway-bench-proxy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let body = Bytes::from(vec![b'x'; options.body_bytes]);
    let upstream = start_upstream(body)?;

    let nginx = Nginx::start(options, &dir, upstream)?;
    let causeway = CausewayProxy::start(options, &dir, upstream)?;
    let targets: [(&'static str, SocketAddr, Vec<u32>); 3] = [
        ("direct", upstream, Vec::new()),
        ("nginx", nginx.addr, nginx.pids()),
        ("causeway", causeway.addr, vec![causeway.child.id()]),
    ];

    let mut out = String::new();
    let _ = writeln!(
        out,
        "upstream: hyper HTTP/1.1, {} B body; proxies: {} worker(s) each, plain HTTP, \
         keep-alive to the upstream, access log {}; load: wrk -t1, {:?} per run",
        options.body_bytes,
        options.workers,
        if options.access_log {
            "on (files)"
        } else {
            "off"
        },
        options.duration,
    );
    let mut latency_rows = Vec::new();
    for connections in [options.connections, 1] {
        let mut rows = Vec::new();
        for (target, addr, pids) in &targets {
            if !options.warmup.is_zero() {
                wrk(options, *addr, connections, options.warmup)?;
            }
            let cpu_before = cpu_time(pids);
            let result = wrk(options, *addr, connections, options.duration)?;
            let cpu = cpu_time(pids)
                .zip(cpu_before)
                .map(|(after, before)| after.saturating_sub(before));
            let cpu_per_request = cpu.map(|cpu| cpu / result.requests.max(1) as u32);
            rows.push(Row {
                target,
                wrk: result,
                cpu_per_request,
            });
        }
        let _ = writeln!(out, "\n{connections} connection(s):");
        out.push_str(&render(&rows));
        if connections == 1 {
            latency_rows = rows;
        }
    }
    if let [direct, nginx_row, causeway_row] = latency_rows.as_slice() {
        let added =
            |row: &Row| row.wrk.p50.as_secs_f64() * 1e6 - direct.wrk.p50.as_secs_f64() * 1e6;
        let _ = writeln!(
            out,
            "\nadded latency per hop (p50 at 1 connection, minus direct): nginx {:.0} µs, \
             causeway {:.0} µs",
            added(nginx_row),
            added(causeway_row),
        );
    }
    drop(nginx);
    drop(causeway);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(out)
}

fn render(rows: &[Row]) -> String {
    let mut out = format!(
        "  {:<10} {:>10} {:>9} {:>9} {:>11} {:>7}\n",
        "target", "req/s", "p50", "p99", "CPU/req", "errors"
    );
    for row in rows {
        let cpu = row
            .cpu_per_request
            .map(|cpu| format!("{:.1} µs", cpu.as_secs_f64() * 1e6))
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "  {:<10} {:>10.0} {:>9} {:>9} {:>11} {:>7}",
            row.target,
            row.wrk.requests_per_second,
            micros(row.wrk.p50),
            micros(row.wrk.p99),
            cpu,
            row.wrk.errors,
        );
    }
    let find = |name: &str| rows.iter().find(|row| row.target == name);
    if let (Some(nginx), Some(causeway)) = (find("nginx"), find("causeway")) {
        let ratio = causeway.wrk.requests_per_second / nginx.wrk.requests_per_second.max(1.0);
        let _ = writeln!(
            out,
            "  causeway/nginx: throughput x{ratio:.2}, p99 x{:.2}",
            causeway.wrk.p99.as_secs_f64() / nginx.wrk.p99.as_secs_f64().max(1e-9)
        );
    }
    out
}

fn micros(duration: Duration) -> String {
    format!("{:.0} µs", duration.as_secs_f64() * 1e6)
}

/// Runs wrk against `addr` and parses its report.
fn wrk(
    options: &ProxyBenchOptions,
    addr: SocketAddr,
    connections: usize,
    duration: Duration,
) -> anyhow::Result<WrkResult> {
    let output = Command::new(&options.wrk)
        .args([
            "-t1".to_string(),
            format!("-c{connections}"),
            format!("-d{}s", duration.as_secs().max(1)),
            "--latency".to_string(),
            format!("http://{addr}/bench/hello"),
        ])
        .stdin(Stdio::null())
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "wrk failed: {}{}",
            text,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    parse_wrk(&text).with_context(|| format!("unexpected wrk output:\n{text}"))
}

/// Reads requests/s, the 50% and 99% latencies and the error counts of `wrk --latency`.
pub fn parse_wrk(text: &str) -> Option<WrkResult> {
    let mut result = WrkResult::default();
    let mut seen = (false, false, false);
    for line in text.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("Requests/sec:"), Some(value)) => {
                result.requests_per_second = value.parse().ok()?;
                seen.0 = true;
            }
            (Some("50%"), Some(value)) => {
                result.p50 = parse_wrk_duration(value)?;
                seen.1 = true;
            }
            (Some("99%"), Some(value)) => {
                result.p99 = parse_wrk_duration(value)?;
                seen.2 = true;
            }
            _ => {}
        }
        // "123456 requests in 5.00s, 140.00MB read"
        if let Some((count, _)) = line.split_once(" requests in ") {
            result.requests = count.trim().parse().ok()?;
        }
        // "Non-2xx or 3xx responses: 12" and "Socket errors: connect 0, read 0, write 0, timeout 0"
        if let Some(count) = line.strip_prefix("Non-2xx or 3xx responses:") {
            result.errors += count.trim().parse::<u64>().ok()?;
        }
        if let Some(errors) = line.strip_prefix("Socket errors:") {
            result.errors += errors
                .split(',')
                .filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    (seen.0 && seen.1 && seen.2).then_some(result)
}

/// wrk prints durations as `123.45us`, `1.23ms` or `1.02s`.
fn parse_wrk_duration(text: &str) -> Option<Duration> {
    let (number, scale) = if let Some(n) = text.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60.0)
    } else {
        (text.strip_suffix('s')?, 1.0)
    };
    Some(Duration::from_secs_f64(number.parse::<f64>().ok()? * scale))
}

/// The upstream: a hyper HTTP/1.1 keep-alive server on its own thread and single-threaded
/// runtime, so that it costs both proxies the same.
fn start_upstream(body: Bytes) -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding the upstream")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the upstream's runtime")?;
    std::thread::Builder::new()
        .name("bench-upstream".into())
        .spawn(move || {
            runtime.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                while let Ok((stream, _)) = listener.accept().await {
                    let _ = stream.set_nodelay(true);
                    let body = body.clone();
                    let service = hyper::service::service_fn(move |_request| {
                        let body = body.clone();
                        async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
                    });
                    tokio::spawn(
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                    );
                }
            });
        })
        .context("starting the upstream's thread")?;
    Ok(addr)
}

/// A free port on 127.0.0.1 (bound, then released for a child to take).
fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

fn wait_until_listening(addr: SocketAddr, child: &mut Child, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited ({status}) before listening on {addr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("{what} did not listen on {addr} within 10 s")
}

fn stop(child: &mut Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// nginx as a child process, with a generated configuration in the temp dir.
struct Nginx {
    child: Child,
    addr: SocketAddr,
}

impl Nginx {
    fn start(
        options: &ProxyBenchOptions,
        dir: &Path,
        upstream: SocketAddr,
    ) -> anyhow::Result<Self> {
        let addr = free_port()?;
        let access_log = if options.access_log {
            format!("access_log {}/nginx-access.log;", dir.display())
        } else {
            "access_log off;".to_string()
        };
        // Keep-alive both ways, no buffering to disk, headers as Causeway sets them.
        let config = format!(
            "daemon off;\nmaster_process on;\nworker_processes {workers};\npid {dir}/nginx.pid;\n\
             error_log {dir}/error.log warn;\nevents {{ worker_connections 4096; }}\n\
             http {{\n  {access_log}\n  keepalive_requests 1000000;\n\
               client_body_temp_path {dir}/body;\n  proxy_temp_path {dir}/proxy;\n\
               fastcgi_temp_path {dir}/fastcgi;\n  uwsgi_temp_path {dir}/uwsgi;\n\
               scgi_temp_path {dir}/scgi;\n\
               upstream bench {{ server {upstream}; keepalive 64; }}\n\
               server {{\n    listen {addr};\n    location / {{\n\
                   proxy_pass http://bench;\n      proxy_http_version 1.1;\n\
                   proxy_set_header Connection \"\";\n      proxy_set_header Host $host;\n\
                   proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n\
                   proxy_set_header X-Forwarded-Proto $scheme;\n\
                   proxy_set_header X-Forwarded-Host $host;\n\
                   proxy_set_header X-Request-Id $request_id;\n\
                   add_header X-Request-Id $request_id;\n    }}\n  }}\n}}\n",
            workers = options.workers,
            dir = dir.display(),
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
        let mut child = Command::new(&options.nginx)
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&path)
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .spawn()
            .context("starting nginx")?;
        wait_until_listening(addr, &mut child, "nginx")?;
        Ok(Self { child, addr })
    }

    /// The master and its workers.
    fn pids(&self) -> Vec<u32> {
        let master = self.child.id();
        let mut pids = vec![master];
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return pids;
        };
        for entry in entries.filter_map(Result::ok) {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // Field 4 (after the parenthesised name) is the parent pid.
            let parent = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|ppid| ppid.parse::<u32>().ok());
            if parent == Some(master) {
                pids.push(pid);
            }
        }
        pids
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

/// Causeway's gateway as a child process (this binary in `--serve-upstream` mode).
struct CausewayProxy {
    child: Child,
    addr: SocketAddr,
}

impl CausewayProxy {
    fn start(
        options: &ProxyBenchOptions,
        dir: &Path,
        upstream: SocketAddr,
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("finding this executable")?;
        let mut command = Command::new(exe);
        command
            .args(["bench", "proxy", "--serve-upstream"])
            .arg(upstream.to_string())
            .arg("--workers")
            .arg(options.workers.to_string())
            .arg("--data-dir")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        if options.access_log {
            command.arg("--access-log").env("CAUSEWAY_LOG", "info");
        } else {
            // nginx runs with `access_log off`; the access line is at info.
            command.env("CAUSEWAY_LOG", "warn");
        }
        let mut child = command.spawn().context("starting Causeway's proxy")?;
        let stdout = child.stdout.take().context("the proxy's stdout")?;
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .context("reading the proxy's address")?;
        let addr = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|addr| addr.parse().ok());
        let Some(addr) = addr else {
            stop(&mut child);
            bail!("Causeway's proxy did not start: {line:?}");
        };
        wait_until_listening(addr, &mut child, "Causeway's proxy")?;
        Ok(Self { child, addr })
    }
}

impl Drop for CausewayProxy {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

/// The child's side: the reverse proxy's `Gateway` with one public static-upstream route,
/// served on plain HTTP by `serve::serve` (as `causeway up` serves it, less TLS) on `workers`
/// single-threaded runtimes with one `SO_REUSEPORT` listener each (`serve::serve_per_core`, as
/// `causeway up` runs the reverse proxy). `CAUSEWAY_BENCH_RUNTIME=multi-thread` serves one
/// listener from a multi-threaded runtime with `workers` threads instead (the model before).
/// Prints `listening <addr>` once bound; runs until SIGTERM.
pub fn serve_proxy(
    upstream: SocketAddr,
    workers: usize,
    data_dir: &Path,
    access_log: bool,
) -> anyhow::Result<()> {
    // Without access logs the parent sets CAUSEWAY_LOG=warn: the access line is at info.
    let _logs = if access_log {
        Some(causeway_core::telemetry::init_logging_to_file(
            &data_dir.join("causeway-access.log"),
        )?)
    } else {
        causeway_core::telemetry::init_logging();
        None
    };
    let multi_thread =
        std::env::var("CAUSEWAY_BENCH_RUNTIME").is_ok_and(|flavor| flavor == "multi-thread");
    // The main runtime only waits for the signal (and, in the multi-thread model, serves).
    let mut builder = if multi_thread {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(workers.max(1));
        builder
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let runtime = builder
        .enable_all()
        .build()
        .context("starting the proxy's runtime")?;
    runtime.block_on(async move {
        let gateway = Arc::new(bench_gateway(upstream, data_dir)?);
        let (trigger, shutdown) = causeway_core::serve::shutdown_channel();
        let make_service = move |gateway: &Arc<causeway_proxy::Gateway>, peer: SocketAddr| {
            let gateway = gateway.clone();
            hyper::service::service_fn(move |request| {
                let gateway = gateway.clone();
                async move { Ok::<_, Infallible>(gateway.handle(request, peer).await) }
            })
        };
        let drain = Duration::from_millis(200);
        let addr = SocketAddr::from(([127, 0, 0, 1], 0));
        if multi_thread {
            let listener = tokio::net::TcpListener::bind(addr).await?;
            println!("listening {}", listener.local_addr()?);
            let server = tokio::spawn(causeway_core::serve::serve(
                listener,
                None,
                move |peer| make_service(&gateway, peer),
                shutdown,
                drain,
            ));
            causeway_core::serve::termination_signal().await;
            trigger.fire();
            let _ = server.await;
        } else {
            let listeners = causeway_core::serve::bind_per_core("the bench proxy", addr, workers)?;
            println!("listening {}", listeners[0].local_addr()?);
            let workers = causeway_core::serve::serve_per_core(
                "proxy-worker",
                listeners,
                move |_worker, listener| {
                    let gateway = gateway.clone();
                    causeway_core::serve::serve(
                        listener,
                        None,
                        move |peer| make_service(&gateway, peer),
                        shutdown.clone(),
                        drain,
                    )
                },
            )?;
            causeway_core::serve::termination_signal().await;
            trigger.fire();
            workers.finished().await;
        }
        anyhow::Ok(())
    })
}

fn bench_gateway(upstream: SocketAddr, data_dir: &Path) -> anyhow::Result<causeway_proxy::Gateway> {
    // The shared service client is built as `causeway up` builds it, though this route never
    // uses it (nothing is resolved until a service route is called).
    let ca = causeway_core::tls::LocalCa::load_or_create(&data_dir.join("ca"))?;
    let mut metrics =
        causeway_core::telemetry::Metrics::new("reverse-proxy", "reverse-proxy-bench");
    let settings = causeway_client::ClientSettings {
        dns_addr: SocketAddr::from(([127, 0, 0, 1], 9)),
        zone: "internal".into(),
        config: ClientConfig::default(),
    };
    let client = causeway_client::ServiceClient::new(settings, &ca.ca_cert_path(), &mut metrics)?;
    let mut config = ReverseProxyConfig::default();
    // One client address sends everything: the check runs, but must never refuse.
    config.rate_limit.requests_per_second = u32::MAX;
    config.rate_limit.burst = u32::MAX;
    config.routes = vec![RouteConfig {
        prefix: "/".into(),
        service: String::new(),
        strip_prefix: None,
        auth: false,
        upstream: Some(StaticUpstream {
            addrs: vec![upstream],
            protocol: UpstreamProtocol::Http1,
            pool_idle_timeout_ms: 90_000,
            pool_max_idle_per_addr: 256,
            policy: Default::default(),
        }),
        policy: causeway_core::topology::service_route_policy(),
    }];
    let key = b"bench-only-key-not-for-tokens";
    Ok(causeway_proxy::Gateway::new(
        "reverse-proxy-bench".into(),
        &config,
        key,
        Arc::new(client),
        metrics.http_server(),
    )
    .serving_plain_http())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_latency_reports() {
        let text = "Running 5s test @ http://127.0.0.1:8080/\n  1 threads and 64 connections\n\
  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency   610.12us  100.00us   5.00ms   90.00%\n\
  Latency Distribution\n     50%  590.00us\n     75%  650.00us\n     90%  700.00us\n     99%    1.20ms\n\
  523456 requests in 5.00s, 600.00MB read\n  Socket errors: connect 0, read 2, write 0, timeout 1\n\
  Non-2xx or 3xx responses: 3\nRequests/sec: 104691.20\nTransfer/sec:    120.00MB\n";
        let result = parse_wrk(text).unwrap();
        assert_eq!(result.requests, 523_456);
        assert!((result.requests_per_second - 104_691.2).abs() < 0.01);
        assert_eq!(result.p50, Duration::from_micros(590));
        assert_eq!(result.p99, Duration::from_micros(1200));
        assert_eq!(result.errors, 6);
        assert!(parse_wrk("no report").is_none());
    }
}
