//! `causeway up`: prepares the data dir (CA, certificates, token key), starts every component as
//! its own process in dependency order, prints what runs where, restarts a component that dies,
//! and on Ctrl-C or SIGTERM stops everything, edge first, within five seconds.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use causeway_core::launch::LAUNCH_ENV;
use causeway_core::tls::{CertPaths, LocalCa, SniCertificates};
use causeway_core::{ChildReport, DataDir, InheritedListener, Launch, MeshLaunch, Role, Topology};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::os::fd::AsRawFd;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::state::{ComponentState, Phase, RunState, is_alive};

/// How long a component may take to report ready.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Each role gets this long to exit after SIGTERM before the next role is asked.
const STOP_GRACE_PER_ROLE: Duration = Duration::from_millis(800);
const RESTART_BACKOFF_FIRST: Duration = Duration::from_secs(1);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(30);

struct Running {
    role: Role,
    pid: u32,
    started: Instant,
}

enum Event {
    Exited { instance: String, status: String },
    Restart { instance: String },
}

struct Supervisor {
    topology: Topology,
    data: DataDir,
    exe: PathBuf,
    dns: Option<SocketAddr>,
    registry: Option<SocketAddr>,
    running: HashMap<String, Running>,
    state: RunState,
    events: mpsc::UnboundedSender<Event>,
    backoff: HashMap<String, Duration>,
    /// Where the mesh control plane listens, once it is ready.
    control_plane: Option<SocketAddr>,
    /// Signs each sidecar's single-use bootstrap token.
    bootstrap_key: Option<causeway_mesh::BootstrapKey>,
    /// Per meshed app instance: the listeners it and its sidecar share, held here for the
    /// whole run so that either can restart on the same addresses.
    mesh_sockets: HashMap<(Role, usize), MeshSockets>,
}

struct MeshSockets {
    /// The sidecar's outbound half, where the app sends.
    outbound: TcpListener,
    /// The app's plain-HTTP listener, where the sidecar's inbound half delivers.
    app: TcpListener,
}

impl MeshSockets {
    fn bind() -> anyhow::Result<Self> {
        let bind = || TcpListener::bind(("127.0.0.1", 0)).context("binding a mesh listener");
        Ok(Self {
            outbound: bind()?,
            app: bind()?,
        })
    }

    fn inherited(&self) -> anyhow::Result<(InheritedListener, InheritedListener)> {
        let describe = |listener: &TcpListener| -> anyhow::Result<InheritedListener> {
            Ok(InheritedListener {
                addr: listener.local_addr()?,
                fd: listener.as_raw_fd(),
            })
        };
        Ok((describe(&self.outbound)?, describe(&self.app)?))
    }
}

/// Runs the whole topology until Ctrl-C or SIGTERM.
pub async fn up(mut topology: Topology) -> anyhow::Result<()> {
    let data_root = prepare_data_dir(&topology.data_dir)?;
    topology.data_dir = data_root.clone();
    // Components may run elsewhere than here: they get absolute routing-file paths, checked now
    // so that a broken file stops `up` with its own error rather than a proxy failing to start.
    for file in &mut topology.reverse_proxy.ingress {
        *file = std::path::absolute(&*file)
            .with_context(|| format!("ingress file {}", file.display()))?;
    }
    for certificate in &mut topology.reverse_proxy.certificates {
        for file in [&mut certificate.cert, &mut certificate.key] {
            *file = std::path::absolute(&*file)
                .with_context(|| format!("certificate file {}", file.display()))?;
        }
    }
    causeway_proxy::routing::RouteTable::load(
        &topology.reverse_proxy.routes,
        &topology.reverse_proxy.ingress,
    )?;
    let data = DataDir::new(&data_root);
    if let Ok(state) = RunState::load(&data_root)
        && state.supervisor_pid != std::process::id()
        && is_alive(state.supervisor_pid)
    {
        bail!(
            "causeway is already running with data dir {} (pid {}); stop it first",
            data_root.display(),
            state.supervisor_pid
        );
    }
    check_fixed_ports(&topology)?;
    prepare_credentials(&topology, &data)?;
    let bootstrap_key = prepare_mesh(&mut topology, &data)?;
    let mut mesh_sockets = HashMap::new();
    for app in topology.meshed_instances() {
        mesh_sockets.insert(app, MeshSockets::bind()?);
    }

    let (events, mut inbox) = mpsc::unbounded_channel();
    let mut supervisor = Supervisor {
        state: RunState {
            supervisor_pid: std::process::id(),
            data_dir: data_root.clone(),
            dns: topology.discovery.dns_listen,
            registry: topology.discovery.api_listen,
            edge: None,
            broker: topology.messaging.broker_url.clone(),
            components: Vec::new(),
        },
        topology,
        data,
        exe: std::env::current_exe().context("cannot find the causeway executable")?,
        dns: None,
        registry: None,
        running: HashMap::new(),
        events,
        backoff: HashMap::new(),
        control_plane: None,
        bootstrap_key,
        mesh_sockets,
    };

    println!("causeway: starting (data dir {})", data_root.display());
    let started = Instant::now();
    let shutdown = tokio::spawn(causeway_core::serve::termination_signal());
    tokio::pin!(shutdown);
    let start_all = supervisor.start_all();
    let outcome = tokio::select! {
        outcome = start_all => outcome,
        _ = &mut shutdown => Err(anyhow::anyhow!("interrupted while starting")),
    };
    let outcome = match outcome {
        Ok(()) => supervisor.await_mesh().await,
        failed => failed,
    };
    if let Err(err) = outcome {
        supervisor.stop_all().await;
        RunState::remove(&data_root);
        return Err(err);
    }
    supervisor.save_state();
    println!(
        "causeway: {} components ready in {:.1} s\n",
        supervisor.running.len(),
        started.elapsed().as_secs_f64()
    );
    print!("{}", crate::status::ready_table(&supervisor.state));
    if let Some(edge) = supervisor.state.edge {
        println!(
            "\nedge: https://localhost:{}/api/users/123/orders  (CA: {})",
            edge.port(),
            supervisor.data.ca_cert().display()
        );
        println!(
            "token: causeway token --sub 123    status: causeway status    demo: causeway demo rest"
        );
    }
    println!("Ctrl-C stops everything.");

    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(event) = inbox.recv() => supervisor.handle(event).await,
        }
    }
    println!("\ncauseway: stopping");
    supervisor.stop_all().await;
    RunState::remove(&data_root);
    println!("causeway: stopped");
    Ok(())
}

/// The mesh's issuer (under the local root) and bootstrap key, and its policy file: the
/// topology's, checked now, or the default one in the data dir. None when the mesh is off.
fn prepare_mesh(
    topology: &mut Topology,
    data: &DataDir,
) -> anyhow::Result<Option<causeway_mesh::BootstrapKey>> {
    if !topology.mesh.enabled {
        return Ok(None);
    }
    causeway_mesh::MeshAuthority::load_or_create(&data.tls_dir())?;
    let key = causeway_mesh::BootstrapKey::load_or_create(&data.mesh_bootstrap_key())?;
    let file = match &topology.mesh.policy_file {
        Some(file) => std::path::absolute(file)
            .with_context(|| format!("mesh policy file {}", file.display()))?,
        None => {
            let file = data.mesh_policy();
            if !file.exists() {
                std::fs::write(&file, causeway_mesh::policy::DEFAULT_POLICY)
                    .with_context(|| format!("writing the mesh policy {}", file.display()))?;
            }
            file
        }
    };
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("reading the mesh policy {}", file.display()))?;
    causeway_mesh::MeshPolicy::parse(
        &file.display().to_string(),
        &text,
        &topology.mesh.trust_domain,
    )?;
    topology.mesh.policy_file = Some(file);
    Ok(Some(key))
}

/// Creates the data dir and proves it writable; returns its absolute path.
fn prepare_data_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("data dir {} cannot be created", dir.display()))?;
    let absolute = std::fs::canonicalize(dir)
        .with_context(|| format!("data dir {} cannot be resolved", dir.display()))?;
    let probe = absolute.join(".write-test");
    std::fs::write(&probe, b"ok")
        .with_context(|| format!("data dir {} is not writable", absolute.display()))?;
    let _ = std::fs::remove_file(probe);
    for sub in ["logs", "db", "run", "tls"] {
        std::fs::create_dir_all(absolute.join(sub))
            .with_context(|| format!("data dir {} is not writable", absolute.display()))?;
    }
    Ok(absolute)
}

/// Fails before anything starts if a fixed port is taken, naming the port and its user.
fn check_fixed_ports(topology: &Topology) -> anyhow::Result<()> {
    let dns = topology.discovery.dns_listen;
    let mut tcp = vec![
        ("the DNS server (tcp)", dns),
        ("the registry API", topology.discovery.api_listen),
        ("the load balancer", topology.load_balancer.listen),
    ];
    if topology.instances(Role::Broker) > 0 {
        tcp.push(("the broker", topology.broker.listen));
    }
    let fixed = |base: SocketAddr, count: usize| {
        (0..count).map(move |i| causeway_core::topology::instance_addr(base, i))
    };
    for addr in fixed(
        topology.reverse_proxy.listen,
        topology.reverse_proxy.instances,
    ) {
        tcp.push(("a reverse proxy", addr));
    }
    for role in Role::ALL {
        if let Some(service) = topology.service(role) {
            for addr in fixed(service.listen, service.instances) {
                tcp.push((role.name(), addr));
            }
        }
    }
    for (what, addr) in tcp.into_iter().filter(|(_, addr)| addr.port() != 0) {
        TcpListener::bind(addr).with_context(|| {
            format!("port {} ({addr}) for {what} is not available", addr.port())
        })?;
    }
    if dns.port() != 0 {
        UdpSocket::bind(dns).with_context(|| {
            format!(
                "port {} ({dns}) for the DNS server (udp) is not available",
                dns.port()
            )
        })?;
    }
    Ok(())
}

/// The CA (kept), a fresh certificate per service and per Ingress TLS Secret, and the token key
/// (kept). Every certificate the reverse proxies will serve is loaded once here, so that an
/// unusable one stops `up` with its file named.
fn prepare_credentials(topology: &Topology, data: &DataDir) -> anyhow::Result<()> {
    let ca = LocalCa::load_or_create(&data.tls_dir())?;
    let zone = &topology.discovery.zone;
    let certified = Role::ALL.into_iter().filter(|role| {
        matches!(
            role,
            Role::ReverseProxy | Role::Broker | Role::MeshControlPlane
        ) || topology.service(*role).is_some()
    });
    for role in certified {
        let service = role.name();
        let mut names = vec![format!("{service}.{zone}"), format!("*.{service}.{zone}")];
        if role == Role::ReverseProxy {
            names.extend(topology.reverse_proxy.server_names.iter().cloned());
        } else {
            names.extend(["localhost".to_string(), "127.0.0.1".to_string()]);
        }
        ca.issue(service, &names)?;
    }
    // As cert-manager fills a Kubernetes Secret: one certificate per `spec.tls[].secretName`,
    // for the hosts its entries name.
    for (secret, hosts) in ingress_tls_secrets(topology)? {
        let stem = causeway_core::tls::secret_file_stem(&secret)?;
        ca.issue(&stem, &hosts)
            .with_context(|| format!("issuing the certificate of TLS Secret {secret}"))?;
    }
    if topology.instances(Role::ReverseProxy) > 0 {
        reverse_proxy_certificates(topology, data)?;
    }
    causeway_proxy::auth::load_or_create_key(&data.jwt_key())?;
    Ok(())
}

/// The Secrets of the Ingress files' `spec.tls[]` entries with their hosts (entries without
/// hosts mean the default certificate: the edge's).
fn ingress_tls_secrets(topology: &Topology) -> anyhow::Result<Vec<(String, Vec<String>)>> {
    let files = &topology.reverse_proxy.ingress;
    if files.is_empty() {
        return Ok(Vec::new());
    }
    let routes = causeway_proxy::ingress::IngressRoutes::from_files(files)?;
    let entries = routes.tls().iter().filter_map(|entry| {
        let secret = entry.secret_name.as_deref()?;
        Some((secret, entry.hosts.as_slice()))
    });
    Ok(causeway_core::tls::hosts_by_secret(entries))
}

/// The files whose change reloads the reverse proxy: its Ingress files and the certificates and
/// keys it serves (those of Ingress TLS Secrets too, whether issued yet or not).
pub fn reverse_proxy_watched_files(topology: &Topology, data: &DataDir) -> Vec<PathBuf> {
    let config = &topology.reverse_proxy;
    let mut files = config.ingress.clone();
    for certificate in &config.certificates {
        files.extend([certificate.cert.clone(), certificate.key.clone()]);
    }
    // An Ingress that does not parse names no Secrets: the reload that follows refuses it.
    for (secret, _) in ingress_tls_secrets(topology).unwrap_or_default() {
        if let Ok(paths) = causeway_core::tls::secret_cert(&data.tls_dir(), &secret) {
            files.extend([paths.cert, paths.key]);
        }
    }
    files
}

/// What the reverse proxy serves, chosen by SNI: `reverse_proxy.certificates` first, then the
/// Ingress Secrets' certificates, and the edge certificate for any other name or no SNI.
pub fn reverse_proxy_certificates(
    topology: &Topology,
    data: &DataDir,
) -> anyhow::Result<SniCertificates> {
    let mut named: Vec<(Vec<String>, CertPaths)> = topology
        .reverse_proxy
        .certificates
        .iter()
        .map(|certificate| {
            let paths = CertPaths {
                cert: certificate.cert.clone(),
                key: certificate.key.clone(),
            };
            (certificate.hosts.clone(), paths)
        })
        .collect();
    for (secret, hosts) in ingress_tls_secrets(topology)? {
        let paths = causeway_core::tls::secret_cert(&data.tls_dir(), &secret)?;
        if !paths.cert.exists() && !paths.key.exists() {
            // Named after `up` issued the Secrets (the file changed since): like an ingress
            // controller whose Secret is not there yet, serve the default certificate.
            tracing::warn!(
                secret = %secret,
                "TLS Secret has no certificate yet (issued at `causeway up`); its hosts get the default certificate"
            );
            continue;
        }
        named.push((hosts, paths));
    }
    let default = data.service_cert(Role::ReverseProxy.name());
    SniCertificates::new(&default, &named).context("loading the reverse proxy's TLS certificates")
}

impl Supervisor {
    async fn start_all(&mut self) -> anyhow::Result<()> {
        for role in Role::ALL {
            let count = self.topology.instances(role);
            let starts = (0..count).map(|index| self.spawn(role, index));
            // Instances of one role start together; roles start in dependency order.
            let results = futures_util::future::join_all(starts).await;
            for result in results {
                let (child, ready) = result?;
                self.adopt(role, child, ready);
            }
        }
        Ok(())
    }

    /// Starts one instance and waits for its ready report.
    async fn spawn(&self, role: Role, index: usize) -> anyhow::Result<(Child, ChildReport)> {
        let instance = self.topology.instance_name(role, index);
        let mesh = self.mesh_launch(role, index, &instance)?;
        let inherited: Vec<i32> = mesh
            .iter()
            .flat_map(|mesh| [mesh.outbound.fd, mesh.app.fd])
            .collect();
        let launch = Launch {
            role,
            index,
            topology: self.topology.clone(),
            dns_addr: self.dns.unwrap_or(self.topology.discovery.dns_listen),
            registry_addr: self.registry.unwrap_or(self.topology.discovery.api_listen),
            mesh,
        };
        let log_path = self.data.log(&instance);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("cannot open log file {}", log_path.display()))?;
        let mut command = Command::new(&self.exe);
        command
            .arg("component")
            .arg(&instance)
            .arg("--data-dir")
            .arg(self.data.root())
            .env(LAUNCH_ENV, serde_json::to_string(&launch)?)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            // Its own process group: a terminal's Ctrl-C reaches only the supervisor, which
            // then stops the components in order.
            .process_group(0)
            .kill_on_drop(true);
        #[cfg(target_os = "linux")]
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            command.pre_exec(move || {
                // If the supervisor dies without stopping us (kill -9), we stop too.
                nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(std::io::Error::from)?;
                // The mesh listeners this child is handed survive the exec.
                for fd in &inherited {
                    let fd = std::os::fd::BorrowedFd::borrow_raw(*fd);
                    nix::fcntl::fcntl(
                        fd,
                        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
                    )
                    .map_err(std::io::Error::from)?;
                }
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {instance}"))?;
        let stdout = child.stdout.take().context("child stdout is not piped")?;
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(START_TIMEOUT, lines.next_line()).await;
        let report = match first {
            Ok(Ok(Some(line))) => serde_json::from_str::<ChildReport>(&line)
                .with_context(|| format!("{instance} reported nonsense: {line}"))?,
            Ok(Ok(None)) | Ok(Err(_)) => {
                let status = child.wait().await.ok();
                bail!(
                    "{instance} exited before it was ready ({}); see {}",
                    describe_exit(status),
                    log_path.display()
                );
            }
            Err(_) => {
                let _ = child.kill().await;
                bail!(
                    "{instance} was not ready within {START_TIMEOUT:?}; see {}",
                    log_path.display()
                );
            }
        };
        if let ChildReport::Failed { message } = report {
            let _ = child.wait().await;
            bail!("{instance} failed to start: {message}");
        }
        // Keep reading so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok((child, report))
    }

    /// Waits until the mesh has converged: the control plane lists every meshed instance's
    /// sidecar among its service's endpoints, and every sidecar has applied that version. Until
    /// then a call through the mesh could find no endpoint.
    async fn await_mesh(&self) -> anyhow::Result<()> {
        let Some(addr) = self.control_plane else {
            return Ok(());
        };
        let topology = &self.topology;
        let target = causeway_mesh::client::ControlPlaneTarget {
            addr,
            server_name: crate::component::control_plane_server_name(&topology.discovery.zone),
            ca_pem: std::fs::read_to_string(self.data.ca_cert())?,
            timeout: Duration::from_secs(2),
        };
        let sidecars: Vec<String> = (0..topology.instances(Role::Sidecar))
            .map(|index| topology.instance_name(Role::Sidecar, index))
            .collect();
        let deadline = Instant::now() + START_TIMEOUT;
        let mut last = String::from("no answer yet");
        while Instant::now() < deadline {
            match causeway_mesh::client::sidecars(&target).await {
                Ok(status) => {
                    let endpoints_listed = topology.mesh.services.iter().all(|service| {
                        let expected =
                            Role::from_name(service).map_or(0, |role| topology.instances(role));
                        status.destinations.iter().any(|destination| {
                            destination.service == *service
                                && destination.endpoints.len() == expected
                        })
                    });
                    let applied = sidecars.iter().all(|instance| {
                        status.sidecars.iter().any(|sidecar| {
                            sidecar.instance == *instance
                                && sidecar.applied_version == status.current_version
                        })
                    });
                    if endpoints_listed && applied {
                        return Ok(());
                    }
                    last = format!(
                        "version {}: endpoints listed {endpoints_listed}, applied by every sidecar {applied}",
                        status.current_version
                    );
                }
                Err(err) => last = err.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("the mesh did not converge within {START_TIMEOUT:?} ({last})")
    }

    /// What a sidecar or its meshed app is handed: their shared listeners, and for the sidecar
    /// the control plane's address and a fresh single-use token naming its workload.
    fn mesh_launch(
        &self,
        role: Role,
        index: usize,
        instance: &str,
    ) -> anyhow::Result<Option<MeshLaunch>> {
        let app = match role {
            Role::Sidecar => self
                .topology
                .sidecar_app(index)
                .context("a sidecar without an app")?,
            _ if self.topology.is_meshed(role) => (role, index),
            _ => return Ok(None),
        };
        let sockets = self
            .mesh_sockets
            .get(&app)
            .with_context(|| format!("no mesh listeners for {}", app.0.instance_name(app.1)))?;
        let (outbound, app_listener) = sockets.inherited()?;
        let (control_plane, bootstrap_token) = if role == Role::Sidecar {
            let key = self
                .bootstrap_key
                .as_ref()
                .context("the mesh has no bootstrap key")?;
            let mesh = &self.topology.mesh;
            let identity =
                causeway_mesh::SpiffeId::new(&mesh.trust_domain, &mesh.namespace, app.0.name())?;
            let token = key.mint(&identity, instance, Duration::from_secs(600));
            let control_plane = self
                .control_plane
                .context("the mesh control plane is not running")?;
            (Some(control_plane), Some(token))
        } else {
            (None, None)
        };
        Ok(Some(MeshLaunch {
            outbound,
            app: app_listener,
            control_plane,
            bootstrap_token,
        }))
    }

    /// Takes a ready child into the running set and watches for its exit.
    fn adopt(&mut self, role: Role, mut child: Child, ready: ChildReport) {
        let ChildReport::Ready {
            instance,
            pid,
            listen,
            admin,
        } = ready
        else {
            return;
        };
        match role {
            Role::Discovery => {
                self.dns = Some(listen);
                self.registry = Some(admin);
                self.state.dns = listen;
                self.state.registry = admin;
            }
            Role::LoadBalancer => self.state.edge = Some(listen),
            Role::Broker => self.state.broker = Some(format!("causeway://{listen}")),
            Role::MeshControlPlane => self.control_plane = Some(listen),
            _ => {}
        }
        let log = self.data.log(&instance);
        match self.state.component_mut(&instance) {
            Some(component) => {
                component.pid = Some(pid);
                component.listen = Some(listen);
                component.admin = Some(admin);
                component.phase = Phase::Running;
            }
            None => self.state.components.push(ComponentState {
                role,
                instance: instance.clone(),
                pid: Some(pid),
                listen: Some(listen),
                admin: Some(admin),
                phase: Phase::Running,
                restarts: 0,
                last_exit: None,
                log,
            }),
        }
        println!("  {instance:<18} ready  pid {pid:<7} {listen}");
        self.running.insert(
            instance.clone(),
            Running {
                role,
                pid,
                started: Instant::now(),
            },
        );
        let events = self.events.clone();
        tokio::spawn(async move {
            let status = describe_exit(child.wait().await.ok());
            let _ = events.send(Event::Exited { instance, status });
        });
    }

    async fn handle(&mut self, event: Event) {
        match event {
            Event::Exited { instance, status } => {
                let Some(running) = self.running.remove(&instance) else {
                    return;
                };
                eprintln!("causeway: {instance} exited unexpectedly ({status}); restarting");
                // A component that ran a while gets a fresh backoff; one that keeps dying waits longer.
                let backoff = if running.started.elapsed() > RESTART_BACKOFF_MAX {
                    RESTART_BACKOFF_FIRST
                } else {
                    self.backoff
                        .get(&instance)
                        .map(|last| (*last * 2).min(RESTART_BACKOFF_MAX))
                        .unwrap_or(RESTART_BACKOFF_FIRST)
                };
                self.backoff.insert(instance.clone(), backoff);
                if let Some(component) = self.state.component_mut(&instance) {
                    component.phase = Phase::Down;
                    component.pid = None;
                    component.last_exit = Some(status);
                }
                self.save_state();
                self.restart_later(instance, backoff);
            }
            Event::Restart { instance } => {
                let Some(component) = self.state.component_mut(&instance) else {
                    return;
                };
                let role = component.role;
                let index = role_index(&self.topology, role, &instance);
                component.restarts += 1;
                match self.spawn(role, index).await {
                    Ok((child, ready)) => {
                        self.adopt(role, child, ready);
                        eprintln!("causeway: {instance} restarted");
                    }
                    Err(err) => {
                        eprintln!("causeway: restarting {instance} failed: {err:#}");
                        let backoff = self
                            .backoff
                            .get(&instance)
                            .map(|last| (*last * 2).min(RESTART_BACKOFF_MAX))
                            .unwrap_or(RESTART_BACKOFF_FIRST);
                        self.backoff.insert(instance.clone(), backoff);
                        self.restart_later(instance, backoff);
                    }
                }
                self.save_state();
            }
        }
    }

    fn restart_later(&self, instance: String, after: Duration) {
        let events = self.events.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = events.send(Event::Restart { instance });
        });
    }

    fn save_state(&self) {
        if let Err(err) = self.state.save() {
            eprintln!("causeway: {err}");
        }
    }

    /// SIGTERM role by role, edge first; SIGKILL whatever is left.
    async fn stop_all(&mut self) {
        let mut all = Vec::new();
        for role in Role::ALL.into_iter().rev() {
            let pids: Vec<u32> = self
                .running
                .values()
                .filter(|r| r.role == role)
                .map(|r| r.pid)
                .collect();
            for pid in &pids {
                signal(*pid, Signal::SIGTERM);
            }
            let deadline = Instant::now() + STOP_GRACE_PER_ROLE;
            while pids.iter().any(|pid| is_running_child(*pid)) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            all.extend(pids);
        }
        for pid in all {
            if is_running_child(pid) {
                signal(pid, Signal::SIGKILL);
            }
        }
        self.running.clear();
    }
}

/// Whether `pid` is still running (a reaped or zombie child counts as stopped).
fn is_running_child(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"));
    match stat {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => is_alive(pid) && !cfg!(target_os = "linux"),
    }
}

fn signal(pid: u32, signal: Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(pid), signal);
    }
}

fn role_index(topology: &Topology, role: Role, instance: &str) -> usize {
    (0..topology.instances(role))
        .find(|&index| topology.instance_name(role, index) == instance)
        .unwrap_or(0)
}

fn describe_exit(status: Option<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Some(status) => match (status.code(), status.signal()) {
            (Some(code), _) => format!("exit code {code}"),
            (None, Some(signal)) => format!("killed by signal {signal}"),
            _ => status.to_string(),
        },
        None => "exit status unknown".to_string(),
    }
}
