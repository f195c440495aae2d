//! Resolving service names through the internal DNS server.
//!
//! `order-service` is looked up as the SRV record `_https._tcp.order-service.internal.`, whose
//! answers give each instance's name and port, and whose additional records give their addresses.
//! Answers are kept for their TTL; when the DNS server cannot be reached, the last answer is used
//! (stale but better than failing every call) and a warning logged.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, Record};

/// One instance of a service, as discovery lists it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub instance: String,
    pub addr: SocketAddr,
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ResolveError {
    #[error("no instances of {service} are registered ({name} does not exist)")]
    NoInstances { service: String, name: String },
    #[error("DNS lookup of {name} via {server} failed: {message}")]
    Lookup {
        name: String,
        server: SocketAddr,
        message: String,
    },
}

/// The outcome of one resolution, with what it cost.
#[derive(Clone, Debug)]
pub struct Resolution {
    pub name: String,
    pub endpoints: Vec<Endpoint>,
    /// Whether the answer came from the client's cache (within its TTL) rather than a query.
    pub cached: bool,
    pub elapsed: Duration,
    pub server: SocketAddr,
    /// How long the answer stays fresh (the SRV TTL, or what is left of it for a cached answer;
    /// zero for a stale one): when a holder of the endpoints should resolve again.
    pub ttl: Duration,
}

struct CachedAnswer {
    endpoints: Vec<Endpoint>,
    expires: Instant,
}

pub struct Discovery {
    resolver: TokioResolver,
    server: SocketAddr,
    zone: String,
    cache: Mutex<HashMap<String, CachedAnswer>>,
}

impl Discovery {
    pub fn new(server: SocketAddr, zone: &str) -> Result<Self, ResolveError> {
        let mut name_server = NameServerConfig::udp_and_tcp(server.ip());
        for connection in &mut name_server.connections {
            connection.port = server.port();
        }
        let config = ResolverConfig::from_name_servers(vec![name_server]);
        let mut builder =
            TokioResolver::builder_with_config(config, TokioRuntimeProvider::default());
        let options = builder.options_mut();
        // This type keeps answers for their TTL itself, so that it knows (and can report)
        // whether an answer was cached.
        options.cache_size = 0;
        options.timeout = Duration::from_millis(500);
        options.attempts = 2;
        options.edns0 = true;
        let resolver = builder.build().map_err(|err| ResolveError::Lookup {
            name: zone.to_string(),
            server,
            message: err.to_string(),
        })?;
        Ok(Self {
            resolver,
            server,
            zone: zone.to_string(),
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The DNS name a service is reached by, e.g. `order-service.internal`.
    pub fn host_name(&self, service: &str) -> String {
        format!("{service}.{}", self.zone)
    }

    pub fn server(&self) -> SocketAddr {
        self.server
    }

    fn srv_name(&self, service: &str, port_name: &str) -> String {
        format!("_{port_name}._tcp.{service}.{}.", self.zone)
    }

    /// The instances serving `service`'s TLS port.
    pub async fn resolve(&self, service: &str) -> Result<Resolution, ResolveError> {
        self.resolve_port(service, "https").await
    }

    /// The instances of `service` behind the named port (`https` or `admin`).
    pub async fn resolve_port(
        &self,
        service: &str,
        port_name: &str,
    ) -> Result<Resolution, ResolveError> {
        let name = self.srv_name(service, port_name);
        let started = Instant::now();
        if let Some((endpoints, ttl)) = self.cached(&name, false) {
            return Ok(self.resolution(name, endpoints, true, started, ttl));
        }
        match self.resolver.srv_lookup(name.as_str()).await {
            Ok(lookup) => {
                let endpoints = endpoints_from(lookup.answers(), lookup.additionals());
                if endpoints.is_empty() {
                    return Err(ResolveError::NoInstances {
                        service: service.to_string(),
                        name,
                    });
                }
                let ttl = lookup
                    .answers()
                    .iter()
                    .map(|record| record.ttl)
                    .min()
                    .unwrap_or(1);
                let ttl = Duration::from_secs(u64::from(ttl));
                self.remember(&name, &endpoints, ttl);
                Ok(self.resolution(name, endpoints, false, started, ttl))
            }
            Err(err) if err.is_no_records_found() => {
                self.forget(&name);
                Err(ResolveError::NoInstances {
                    service: service.to_string(),
                    name,
                })
            }
            Err(err) => {
                if let Some((endpoints, ttl)) = self.cached(&name, true) {
                    tracing::warn!(%name, error = %err, "DNS unreachable; using the last answer");
                    return Ok(self.resolution(name, endpoints, true, started, ttl));
                }
                Err(ResolveError::Lookup {
                    name,
                    server: self.server,
                    message: err.to_string(),
                })
            }
        }
    }

    /// The A/AAAA answer for `<service>.<zone>`: the addresses its instances listen on.
    pub async fn addresses(&self, service: &str) -> Result<(Vec<IpAddr>, Duration), ResolveError> {
        let name = format!("{}.", self.host_name(service));
        let started = Instant::now();
        let lookup = self
            .resolver
            .lookup_ip(name.as_str())
            .await
            .map_err(|err| {
                if err.is_no_records_found() {
                    ResolveError::NoInstances {
                        service: service.to_string(),
                        name: name.clone(),
                    }
                } else {
                    ResolveError::Lookup {
                        name: name.clone(),
                        server: self.server,
                        message: err.to_string(),
                    }
                }
            })?;
        Ok((lookup.iter().collect(), started.elapsed()))
    }

    fn resolution(
        &self,
        name: String,
        endpoints: Vec<Endpoint>,
        cached: bool,
        started: Instant,
        ttl: Duration,
    ) -> Resolution {
        Resolution {
            name,
            endpoints,
            cached,
            elapsed: started.elapsed(),
            server: self.server,
            ttl,
        }
    }

    /// A remembered answer and how long it stays fresh.
    fn cached(&self, name: &str, allow_stale: bool) -> Option<(Vec<Endpoint>, Duration)> {
        let now = Instant::now();
        let cache = self
            .cache
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        cache
            .get(name)
            .filter(|answer| allow_stale || answer.expires > now)
            .map(|answer| {
                (
                    answer.endpoints.clone(),
                    answer.expires.saturating_duration_since(now),
                )
            })
    }

    fn remember(&self, name: &str, endpoints: &[Endpoint], ttl: Duration) {
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        cache.insert(
            name.to_string(),
            CachedAnswer {
                endpoints: endpoints.to_vec(),
                expires: Instant::now() + ttl,
            },
        );
    }

    /// Drops a cached answer, so that the next call asks DNS again (after an instance failed).
    pub fn forget(&self, name: &str) {
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        cache.remove(name);
    }

    pub fn forget_service(&self, service: &str) {
        self.forget(&self.srv_name(service, "https"));
    }
}

/// Pairs SRV answers with the addresses of their targets.
fn endpoints_from(answers: &[Record], additionals: &[Record]) -> Vec<Endpoint> {
    let addresses: HashMap<String, IpAddr> = additionals
        .iter()
        .filter_map(|record| {
            let ip = match &record.data {
                RData::A(a) => IpAddr::V4(a.0),
                RData::AAAA(aaaa) => IpAddr::V6(aaaa.0),
                _ => return None,
            };
            Some((record.name.to_ascii().to_ascii_lowercase(), ip))
        })
        .collect();
    let mut endpoints: Vec<Endpoint> = answers
        .iter()
        .filter_map(|record| {
            let RData::SRV(srv) = &record.data else {
                return None;
            };
            let target = srv.target.to_ascii().to_ascii_lowercase();
            let ip = addresses.get(&target)?;
            let instance = target.split('.').next()?.to_string();
            Some(Endpoint {
                instance,
                addr: SocketAddr::new(*ip, srv.port),
            })
        })
        .collect();
    endpoints.sort_by(|a, b| a.instance.cmp(&b.instance));
    endpoints
}
