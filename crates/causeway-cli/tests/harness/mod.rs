//! Starts a real `causeway up` on ports chosen at run time in a fresh data dir, and always stops
//! it (and checks that nothing it started is left running).

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use causeway_cli::edge::{self, EdgeResponse};
use causeway_cli::state::RunState;
use causeway_core::{DataDir, Topology};
use http::{HeaderMap, HeaderValue, Method, header};

pub const CAUSEWAY: &str = env!("CARGO_BIN_EXE_causeway");

/// A topology on ports chosen at run time, with short timings so tests see changes quickly.
pub fn test_topology() -> Topology {
    let any: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
    let mut topology = Topology {
        data_dir: fresh_dir("data"),
        ..Topology::default()
    };
    topology.discovery.dns_listen = any;
    topology.discovery.api_listen = any;
    topology.discovery.heartbeat_interval_ms = 200;
    topology.discovery.expiry_ms = 1000;
    topology.load_balancer.listen = any;
    topology.load_balancer.health_check_interval_ms = 200;
    topology.broker.listen = any;
    // Quick retries, so a failing message reaches the dead-letter queue in well under a second.
    let policy = &mut topology.messaging.notification_queue.policy;
    policy.max_attempts = 3;
    policy.initial_backoff_ms = 100;
    policy.max_backoff_ms = 400;
    topology.client.attempt_timeout_ms = 1000;
    topology.client.deadline_ms = 3000;
    topology.client.endpoint_backoff_ms = 2000;
    // Load tests send one subject's requests as fast as they go; they are not about the limit
    // (the tests that are set their own).
    topology.reverse_proxy.rate_limit.requests_per_second = 100_000;
    topology.reverse_proxy.rate_limit.burst = 100_000;
    topology
}

pub fn fresh_dir(kind: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "causeway-test-{}-{kind}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Writes the topology to a file in a fresh directory and returns its path.
pub fn write_topology(topology: &Topology) -> PathBuf {
    let dir = fresh_dir("config");
    std::fs::create_dir_all(&dir).expect("create config dir");
    let path = dir.join("causeway.toml");
    std::fs::write(&path, topology.to_toml().expect("topology serialises"))
        .expect("write topology");
    path
}

/// Runs `causeway` with `args` to completion.
pub fn causeway(args: &[&str]) -> std::process::Output {
    Command::new(CAUSEWAY)
        .args(args)
        .env_remove("CAUSEWAY_CONFIG")
        .env_remove("CAUSEWAY_DATA_DIR")
        .output()
        .expect("run causeway")
}

pub struct System {
    pub topology: Topology,
    pub config: PathBuf,
    supervisor: Child,
    pub stdout: Vec<String>,
}

impl System {
    pub fn start(topology: Topology) -> System {
        Self::start_with(topology, &[])
    }

    pub fn start_with(topology: Topology, extra_args: &[&str]) -> System {
        let config = write_topology(&topology);
        let mut supervisor = Command::new(CAUSEWAY)
            .arg("--config")
            .arg(&config)
            .arg("up")
            .args(extra_args)
            .env_remove("CAUSEWAY_DATA_DIR")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start causeway up");
        let stdout = supervisor.stdout.take().expect("piped stdout");
        let (lines_tx, lines_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut system = System {
            topology,
            config,
            supervisor,
            stdout: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match lines_rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    let ready = line.contains("components ready");
                    system.stdout.push(line);
                    if ready {
                        break;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    panic!("causeway up exited while starting: {:?}", system.stdout)
                }
            }
            if let Ok(Some(status)) = system.supervisor.try_wait() {
                panic!("causeway up exited with {status}: {:?}", system.stdout);
            }
            assert!(
                Instant::now() < deadline,
                "not ready in 60 s: {:?}",
                system.stdout
            );
        }
        // Keep draining, so the supervisor never blocks writing.
        std::thread::spawn(move || while lines_rx.recv().is_ok() {});
        system
    }

    pub fn data_dir(&self) -> &Path {
        &self.topology.data_dir
    }

    pub fn data(&self) -> DataDir {
        DataDir::new(self.data_dir())
    }

    pub fn state(&self) -> RunState {
        RunState::load(self.data_dir()).expect("run state")
    }

    pub fn edge(&self) -> SocketAddr {
        self.state().edge.expect("edge address")
    }

    pub fn pid_of(&self, instance: &str) -> Option<u32> {
        self.state()
            .components
            .into_iter()
            .find(|c| c.instance == instance)
            .and_then(|c| c.pid)
    }

    pub fn supervisor_pid(&self) -> u32 {
        self.supervisor.id()
    }

    /// `causeway <args>` against this system's topology.
    pub fn run(&self, args: &[&str]) -> std::process::Output {
        let config = self.config.to_string_lossy().to_string();
        let mut all = vec!["--config", config.as_str()];
        all.extend_from_slice(args);
        causeway(&all)
    }

    pub fn token(&self, sub: &str, ttl: i64) -> String {
        self.scoped_token(sub, &[], ttl)
    }

    /// `causeway token --sub sub --scope …` for each of `scopes`.
    pub fn scoped_token(&self, sub: &str, scopes: &[&str], ttl: i64) -> String {
        let ttl = ttl.to_string();
        let mut args = vec!["token", "--sub", sub, "--ttl", &ttl];
        for scope in scopes {
            args.extend(["--scope", scope]);
        }
        let output = self.run(&args);
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout)
            .expect("utf-8 token")
            .trim()
            .to_string()
    }

    pub fn status_json(&self) -> serde_json::Value {
        let output = self.run(&["status", "--json"]);
        serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|err| panic!("status --json is JSON ({err}): {output:?}"))
    }

    /// The Prometheus text an instance (`order-service-1`) serves on its admin `/metrics`.
    pub async fn metrics(&self, instance: &str) -> String {
        let admin = self
            .state()
            .components
            .iter()
            .find(|component| component.instance == instance)
            .and_then(|component| component.admin)
            .unwrap_or_else(|| panic!("{instance} has no admin address"));
        let (code, body) = causeway_client::plain_http::request(
            Method::GET,
            admin,
            "/metrics",
            None,
            Duration::from_secs(2),
        )
        .await
        .unwrap_or_else(|err| panic!("metrics of {instance}: {err}"));
        assert_eq!(code, http::StatusCode::OK, "metrics of {instance}");
        String::from_utf8_lossy(&body).into_owned()
    }

    /// `GET path` through the edge, with `Authorization: Bearer token` if given.
    pub async fn get(&self, path: &str, token: Option<&str>) -> EdgeResponse {
        let mut headers = HeaderMap::new();
        if let Some(token) = token {
            headers.insert(
                header::AUTHORIZATION,
                HeaderValue::from_str(&format!("Bearer {token}")).expect("header value"),
            );
        }
        self.request(Method::GET, path, headers, Bytes::new()).await
    }

    /// `POST path` through the edge with `body` as JSON, as `token`, plus `headers`.
    pub async fn post_json(
        &self,
        path: &str,
        token: &str,
        mut headers: HeaderMap,
        body: &serde_json::Value,
    ) -> EdgeResponse {
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).expect("header value"),
        );
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        self.request(Method::POST, path, headers, Bytes::from(body.to_string()))
            .await
    }

    pub async fn request(
        &self,
        method: Method,
        path: &str,
        headers: HeaderMap,
        body: Bytes,
    ) -> EdgeResponse {
        edge::request(
            self.edge(),
            "localhost",
            &self.data().ca_cert(),
            method,
            path,
            headers,
            body,
        )
        .await
        .expect("edge answers")
    }

    /// The listening address of `instance` (`user-service-1`).
    pub fn listen_of(&self, instance: &str) -> SocketAddr {
        self.state()
            .components
            .iter()
            .find(|component| component.instance == instance)
            .and_then(|component| component.listen)
            .unwrap_or_else(|| panic!("{instance} has no listening address"))
    }

    /// Writes `raw` as is over a new HTTP/1.1-over-TLS connection to `addr` (verified as
    /// `localhost` against the Causeway CA) and returns everything read until the server closes
    /// or 5 s pass: for requests no well-behaved client library would send.
    pub async fn raw_https(&self, addr: SocketAddr, raw: &[u8]) -> String {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .unwrap_or_else(|err| panic!("connect to {addr}: {err}"));
        self.raw_https_over(tcp, raw).await
    }

    /// An HTTP/2 channel over TLS to the edge (gRPC through the load balancer and a proxy).
    pub async fn edge_grpc_channel(&self) -> tonic::transport::Channel {
        use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
        let ca = std::fs::read(self.data().ca_cert()).expect("the CA certificate");
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .domain_name("localhost");
        Endpoint::from_shared(format!("https://{}", self.edge()))
            .expect("an endpoint")
            .tls_config(tls)
            .expect("TLS settings")
            .connect()
            .await
            .expect("HTTP/2 over TLS to the edge")
    }

    /// [`Self::raw_https`] from another loopback address (`127.0.0.2`, say): a second client.
    pub async fn raw_https_from(&self, source: IpAddr, addr: SocketAddr, raw: &[u8]) -> String {
        self.raw_https_over(connect_from(source, addr).await, raw)
            .await
    }

    /// `raw` over TLS on an open connection; the whole answer.
    pub async fn raw_https_over(&self, tcp: tokio::net::TcpStream, raw: &[u8]) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = tcp.peer_addr().expect("peer address");
        let config =
            causeway_core::tls::client_config_with_alpn(&self.data().ca_cert(), &[b"http/1.1"])
                .expect("TLS client config");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("server name");
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .unwrap_or_else(|err| panic!("TLS with {addr}: {err}"));
        tls.write_all(raw).await.expect("write the request");
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut answer)).await;
        String::from_utf8_lossy(&answer).into_owned()
    }

    /// Sends SIGTERM and waits for the supervisor; returns how long it took.
    pub fn stop(&mut self) -> Duration {
        let started = Instant::now();
        signal(self.supervisor.id(), nix::sys::signal::Signal::SIGTERM);
        let deadline = started + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.supervisor.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        started.elapsed()
    }
}

impl Drop for System {
    fn drop(&mut self) {
        let _ = self.stop();
        let _ = self.supervisor.kill();
        let _ = self.supervisor.wait();
        // Nothing it started may outlive it.
        let leftovers = processes_using(self.data_dir());
        for pid in &leftovers {
            signal(*pid, nix::sys::signal::Signal::SIGKILL);
        }
        let _ = std::fs::remove_dir_all(self.data_dir());
        if let Some(dir) = self.config.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
        if !std::thread::panicking() {
            assert!(
                leftovers.is_empty(),
                "processes left running: {leftovers:?}"
            );
        }
    }
}

pub fn signal(pid: u32, signal: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
}

/// Live (non-zombie) processes whose command line names `data_dir`.
pub fn processes_using(data_dir: &Path) -> Vec<u32> {
    let needle = data_dir.to_string_lossy().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let names_dir = cmdline
                .split(|byte| *byte == 0)
                .any(|arg| arg == needle.as_bytes());
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
            names_dir && !zombie
        })
        .collect()
}

/// Polls `check` every 50 ms until it returns `Some`, for at most `within`.
pub async fn eventually<T>(
    within: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A TCP connection to `addr` from the loopback address `source`.
pub async fn connect_from(source: IpAddr, addr: SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(source, 0))
        .unwrap_or_else(|err| panic!("bind {source}: {err}"));
    socket
        .connect(addr)
        .await
        .unwrap_or_else(|err| panic!("connect to {addr} from {source}: {err}"))
}
