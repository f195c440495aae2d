//! The live instance registry: who is registered, and whether their heartbeats are recent.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use causeway_core::registry_api::{InstanceRecord, RegisteredInstance, RegistryListing};

/// The registry of service instances. Cloning shares the same registry.
///
/// An instance stays listed while its last registration or heartbeat ([`Registry::upsert`]) is
/// younger than the expiry. Expired instances are dropped (and logged once) by the next call
/// that looks at the registry, or by the periodic sweep the discovery server runs.
///
/// Names are stored as given; the HTTP API only admits lowercase DNS labels, which is what
/// DNS lookups (lowercased) match against.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

struct Inner {
    expiry: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// service -> instance -> entry; BTreeMaps keep listings sorted by name.
    services: BTreeMap<String, BTreeMap<String, Entry>>,
    /// Bumped on every change that DNS answers can see: the zone's SOA serial.
    changes: u32,
}

struct Entry {
    record: InstanceRecord,
    last_seen: Instant,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("expiry", &self.inner.expiry)
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// An empty registry in which instances expire `expiry` after their last heartbeat.
    pub fn new(expiry: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                expiry,
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// Registers an instance, or refreshes it (a heartbeat). A record that differs from the stored
    /// one (a new address, say) replaces it.
    pub fn upsert(&self, record: InstanceRecord) {
        let now = Instant::now();
        let mut state = self.lock(now);
        let instances = state.services.entry(record.service.clone()).or_default();
        let changed = match instances.get_mut(&record.instance) {
            Some(entry) => {
                entry.last_seen = now;
                if entry.record == record {
                    tracing::debug!(
                        service = %record.service,
                        instance = %record.instance,
                        "heartbeat"
                    );
                    false
                } else {
                    tracing::info!(
                        service = %record.service,
                        instance = %record.instance,
                        addr = %record.addr,
                        old_addr = %entry.record.addr,
                        "instance re-registered with a changed record"
                    );
                    entry.record = record;
                    true
                }
            }
            None => {
                tracing::info!(
                    service = %record.service,
                    instance = %record.instance,
                    addr = %record.addr,
                    admin_addr = ?record.admin_addr,
                    pid = ?record.pid,
                    "instance registered"
                );
                instances.insert(
                    record.instance.clone(),
                    Entry {
                        record,
                        last_seen: now,
                    },
                );
                true
            }
        };
        if changed {
            state.changes = state.changes.wrapping_add(1);
        }
    }

    /// Deregisters an instance; false if it was not (or no longer) registered.
    pub fn remove(&self, service: &str, instance: &str) -> bool {
        let mut state = self.lock(Instant::now());
        let Some(instances) = state.services.get_mut(service) else {
            return false;
        };
        if instances.remove(instance).is_none() {
            return false;
        }
        if instances.is_empty() {
            state.services.remove(service);
        }
        state.changes = state.changes.wrapping_add(1);
        tracing::info!(service, instance, "instance deregistered");
        true
    }

    /// The live instances of a service, sorted by instance name.
    pub fn live(&self, service: &str) -> Vec<RegisteredInstance> {
        let now = Instant::now();
        let state = self.lock(now);
        state
            .services
            .get(service)
            .map(|instances| instances.values().map(|e| e.report(now)).collect())
            .unwrap_or_default()
    }

    /// Every live instance, by service.
    pub fn listing(&self) -> RegistryListing {
        let now = Instant::now();
        let state = self.lock(now);
        RegistryListing {
            expiry_ms: u64::try_from(self.inner.expiry.as_millis()).unwrap_or(u64::MAX),
            services: state
                .services
                .iter()
                .map(|(service, instances)| {
                    let live = instances.values().map(|e| e.report(now)).collect();
                    (service.clone(), live)
                })
                .collect(),
        }
    }

    /// How long an instance stays listed without a heartbeat.
    pub(crate) fn expiry(&self) -> Duration {
        self.inner.expiry
    }

    /// Drops expired instances now, so that expiries are logged when they happen and not at the
    /// next lookup.
    pub(crate) fn sweep(&self) {
        drop(self.lock(Instant::now()));
    }

    /// A counter of visible changes, used as the zone's SOA serial.
    pub(crate) fn serial(&self) -> u32 {
        self.lock(Instant::now()).changes
    }

    /// Locks the state with expired entries already removed, so that no reader ever sees them.
    fn lock(&self, now: Instant) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic elsewhere (every update is a single
        // insert/remove), so a poisoned lock is still usable.
        let mut state = self
            .inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let expiry = self.inner.expiry;
        let mut expired = 0u32;
        state.services.retain(|service, instances| {
            instances.retain(|instance, entry| {
                let age = now.saturating_duration_since(entry.last_seen);
                let live = age < expiry;
                if !live {
                    expired += 1;
                    tracing::warn!(
                        service = %service,
                        instance = %instance,
                        addr = %entry.record.addr,
                        last_seen_ms_ago = u64::try_from(age.as_millis()).unwrap_or(u64::MAX),
                        "instance expired: no heartbeat within the expiry"
                    );
                }
                live
            });
            !instances.is_empty()
        });
        if expired > 0 {
            state.changes = state.changes.wrapping_add(expired);
        }
        state
    }
}

impl Entry {
    fn report(&self, now: Instant) -> RegisteredInstance {
        let age = now.saturating_duration_since(self.last_seen);
        RegisteredInstance {
            record: self.record.clone(),
            last_seen_ms_ago: u64::try_from(age.as_millis()).unwrap_or(u64::MAX),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(service: &str, instance: &str, addr: &str) -> InstanceRecord {
        InstanceRecord {
            service: service.into(),
            instance: instance.into(),
            addr: addr.parse().unwrap(),
            admin_addr: None,
            pid: None,
        }
    }

    fn names(instances: &[RegisteredInstance]) -> Vec<&str> {
        instances
            .iter()
            .map(|i| i.record.instance.as_str())
            .collect()
    }

    #[test]
    fn live_lists_instances_sorted_by_name() {
        let registry = Registry::new(Duration::from_secs(60));
        registry.upsert(record("order-service", "order-service-2", "127.0.0.1:9002"));
        registry.upsert(record("order-service", "order-service-1", "127.0.0.1:9001"));
        registry.upsert(record("user-service", "user-service-1", "127.0.0.1:9100"));
        let live = registry.live("order-service");
        assert_eq!(names(&live), ["order-service-1", "order-service-2"]);
        assert_eq!(live[0].record.addr.port(), 9001);
        assert!(registry.live("nobody").is_empty());

        let listing = registry.listing();
        assert_eq!(listing.expiry_ms, 60_000);
        assert_eq!(
            listing.services.keys().collect::<Vec<_>>(),
            ["order-service", "user-service"]
        );
    }

    #[test]
    fn upsert_replaces_the_address() {
        let registry = Registry::new(Duration::from_secs(60));
        let serial = registry.serial();
        registry.upsert(record("order-service", "order-service-1", "127.0.0.1:9001"));
        assert_ne!(registry.serial(), serial);
        let serial = registry.serial();

        // A heartbeat with the same record changes nothing visible.
        registry.upsert(record("order-service", "order-service-1", "127.0.0.1:9001"));
        assert_eq!(registry.serial(), serial);

        registry.upsert(record("order-service", "order-service-1", "127.0.0.2:9005"));
        let live = registry.live("order-service");
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].record.addr, "127.0.0.2:9005".parse().unwrap());
        assert_ne!(registry.serial(), serial);
    }

    #[test]
    fn remove_forgets_the_instance_and_the_empty_service() {
        let registry = Registry::new(Duration::from_secs(60));
        registry.upsert(record("order-service", "order-service-1", "127.0.0.1:9001"));
        registry.upsert(record("order-service", "order-service-2", "127.0.0.1:9002"));
        assert!(registry.remove("order-service", "order-service-1"));
        assert!(!registry.remove("order-service", "order-service-1"));
        assert!(!registry.remove("user-service", "order-service-2"));
        assert_eq!(names(&registry.live("order-service")), ["order-service-2"]);
        assert!(registry.remove("order-service", "order-service-2"));
        assert!(registry.listing().services.is_empty());
    }

    #[test]
    fn instances_without_heartbeats_expire() {
        let registry = Registry::new(Duration::from_millis(300));
        registry.upsert(record("order-service", "order-service-1", "127.0.0.1:9001"));
        registry.upsert(record("order-service", "order-service-2", "127.0.0.1:9002"));
        std::thread::sleep(Duration::from_millis(200));
        // Only instance 2 heartbeats; 400 ms after the first registration it is still there.
        registry.upsert(record("order-service", "order-service-2", "127.0.0.1:9002"));
        std::thread::sleep(Duration::from_millis(200));
        let live = registry.live("order-service");
        assert_eq!(names(&live), ["order-service-2"]);
        assert!(live[0].last_seen_ms_ago >= 150, "{live:?}");

        // An expired instance cannot be deregistered any more.
        assert!(!registry.remove("order-service", "order-service-1"));
        std::thread::sleep(Duration::from_millis(350));
        assert!(registry.live("order-service").is_empty());
        assert!(registry.listing().services.is_empty());
    }
}
