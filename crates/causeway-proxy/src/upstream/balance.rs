//! Balancers: which eligible endpoint a request goes to.
//!
//! Every balancer picks among `eligible`, the ascending indices (into the endpoint list) of the
//! endpoints that are healthy and not ejected, so health and outlier state never have to be
//! known here. The Maglev table is written here rather than taken from a crate: the crates that
//! exist are unmaintained or tied to their own backend types, and the builder is forty lines.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use http::HeaderMap;
use rand::Rng;

use super::endpoint::{Endpoint, lock};

pub use causeway_core::proxy_config::{
    BalancePolicy, DEFAULT_MAGLEV_TABLE_SIZE, Fallback, HashKey,
};

/// SipHash (std's) of `bytes` under `seed`; stable for a given build of the proxy, which is what
/// consistency across the proxy's replicas needs.
pub fn hash_bytes(seed: u64, bytes: &[u8]) -> u64 {
    let mut hasher = DefaultHasher::new();
    seed.hash(&mut hasher);
    bytes.hash(&mut hasher);
    hasher.finish()
}

/// Plain rotation over the eligible endpoints.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl RoundRobin {
    pub fn pick(&self, eligible: &[usize]) -> Option<usize> {
        if eligible.is_empty() {
            return None;
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        Some(eligible[turn % eligible.len()])
    }
}

/// nginx's smooth weighted round robin: each pick, every eligible endpoint's current weight grows
/// by its weight, the largest wins and pays back the total. Weights 5,1,1 give a a b a c a a:
/// exact proportions over each cycle, with the heavy endpoint's turns spread out.
#[derive(Debug)]
pub struct WeightedRoundRobin {
    current: Mutex<Vec<i64>>,
}

impl WeightedRoundRobin {
    pub fn new(endpoints: usize) -> Self {
        Self {
            current: Mutex::new(vec![0; endpoints]),
        }
    }

    pub fn pick(&self, endpoints: &[Arc<Endpoint>], eligible: &[usize]) -> Option<usize> {
        let mut current = lock(&self.current);
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for &index in eligible {
            let weight = i64::from(endpoints[index].weight().max(1));
            let value = {
                let slot = current.get_mut(index)?;
                *slot += weight;
                *slot
            };
            total += weight;
            // Strictly greater: ties go to the first, as in nginx.
            if best.is_none_or(|best| value > current[best]) {
                best = Some(index);
            }
        }
        let best = best?;
        current[best] -= total;
        Some(best)
    }
}

/// Power of two choices: two distinct random eligible endpoints, the cheaper one wins
/// (cost = peak-EWMA latency × (in-flight + 1)). Avoids the herd that "least loaded of all"
/// causes when many proxies share stale load views, at O(1) per pick.
#[derive(Debug, Default)]
pub struct LeastRequest;

impl LeastRequest {
    pub fn pick(
        &self,
        endpoints: &[Arc<Endpoint>],
        eligible: &[usize],
        now: Instant,
    ) -> Option<usize> {
        match eligible.len() {
            0 => None,
            1 => Some(eligible[0]),
            len => {
                let mut rng = rand::rng();
                let first = rng.random_range(0..len);
                // Second choice distinct from the first: draw from the other len-1 positions.
                let mut second = rng.random_range(0..len - 1);
                if second >= first {
                    second += 1;
                }
                let (a, b) = (eligible[first], eligible[second]);
                if endpoints[b].cost(now) < endpoints[a].cost(now) {
                    Some(b)
                } else {
                    Some(a)
                }
            }
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MaglevError {
    #[error("maglev table size {0} is not a prime")]
    NotPrime(usize),
    #[error("maglev table size {size} is too small for {endpoints} endpoints")]
    TooSmall { size: usize, endpoints: usize },
}

/// A Maglev lookup table (Eisenbud et al., NSDI 2016): each endpoint walks its own permutation
/// of the table's slots (offset and skip from two hashes of its id), taking turns claiming free
/// slots, in proportion to its weight (Envoy's weighted variant). Removing an endpoint frees only
/// its slots for the others, so keys on the other endpoints mostly stay where they were.
#[derive(Clone, Debug)]
pub struct MaglevTable {
    slots: Vec<u32>,
}

impl MaglevTable {
    /// Builds the table for endpoints given as (id, weight), indices follow `endpoints`.
    pub fn new(endpoints: &[(&str, u32)], size: usize) -> Result<Self, MaglevError> {
        if !is_prime(size) {
            return Err(MaglevError::NotPrime(size));
        }
        if size <= endpoints.len() || size > u32::MAX as usize {
            return Err(MaglevError::TooSmall {
                size,
                endpoints: endpoints.len(),
            });
        }
        if endpoints.is_empty() {
            return Ok(Self { slots: Vec::new() });
        }
        let m = size as u64;
        let max_weight = endpoints
            .iter()
            .map(|(_, weight)| u64::from((*weight).max(1)))
            .max()
            .unwrap_or(1);
        struct Walker {
            offset: u64,
            skip: u64,
            next: u64,
            weight: u64,
            target: u64,
        }
        let mut walkers: Vec<Walker> = endpoints
            .iter()
            .map(|(id, weight)| Walker {
                offset: hash_bytes(0, id.as_bytes()) % m,
                skip: hash_bytes(1, id.as_bytes()) % (m - 1) + 1,
                next: 0,
                weight: u64::from((*weight).max(1)),
                target: 0,
            })
            .collect();
        let mut slots = vec![u32::MAX; size];
        let mut filled = 0usize;
        let mut iteration = 1u64;
        while filled < size {
            for (index, walker) in walkers.iter_mut().enumerate() {
                // An endpoint of weight max/k takes a turn every k-th round.
                if iteration * walker.weight < walker.target {
                    continue;
                }
                walker.target += max_weight;
                let mut slot = (walker.offset + walker.next * walker.skip) % m;
                while slots[slot as usize] != u32::MAX {
                    walker.next += 1;
                    slot = (walker.offset + walker.next * walker.skip) % m;
                }
                slots[slot as usize] = index as u32;
                walker.next += 1;
                filled += 1;
                if filled == size {
                    break;
                }
            }
            iteration += 1;
        }
        Ok(Self { slots })
    }

    /// The endpoint index owning `hash`, or None for an empty table.
    pub fn lookup(&self, hash: u64) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        Some(self.slots[(hash % self.slots.len() as u64) as usize] as usize)
    }
}

fn is_prime(n: usize) -> bool {
    if n < 2 {
        return false;
    }
    (2..)
        .take_while(|d| d * d <= n)
        .all(|d| !n.is_multiple_of(d))
}

/// Maglev over the endpoint set. A key whose endpoint is ineligible is rehashed a few times so it
/// lands on another (still deterministic) endpoint and comes back when its own endpoint does.
#[derive(Debug)]
pub struct ConsistentHash {
    table: MaglevTable,
}

/// Rehashes before the last-resort modulo pick for a key whose endpoint is unavailable.
const REHASH_ATTEMPTS: u64 = 8;

impl ConsistentHash {
    pub fn new(endpoints: &[Arc<Endpoint>], table_size: usize) -> Result<Self, MaglevError> {
        let ids: Vec<(&str, u32)> = endpoints
            .iter()
            .map(|endpoint| (endpoint.id(), endpoint.weight()))
            .collect();
        Ok(Self {
            table: MaglevTable::new(&ids, table_size)?,
        })
    }

    pub fn pick(&self, key: &[u8], eligible: &[usize]) -> Option<usize> {
        if eligible.is_empty() {
            return None;
        }
        let is_eligible = |index: usize| eligible.binary_search(&index).is_ok();
        let mut hash = hash_bytes(2, key);
        for attempt in 0..=REHASH_ATTEMPTS {
            if let Some(index) = self.table.lookup(hash)
                && is_eligible(index)
            {
                return Some(index);
            }
            hash = hash_bytes(3 + attempt, &hash.to_le_bytes());
        }
        Some(eligible[(hash % eligible.len() as u64) as usize])
    }
}

/// A balancer built for one endpoint set; rebuilt when discovery replaces the set.
#[derive(Debug)]
pub(crate) enum Balancer {
    RoundRobin(RoundRobin),
    Weighted(WeightedRoundRobin),
    LeastRequest(LeastRequest),
    Hash {
        hash: ConsistentHash,
        key: HashKey,
        fallback: Box<Balancer>,
    },
}

impl Balancer {
    pub(crate) fn build(
        policy: &BalancePolicy,
        endpoints: &[Arc<Endpoint>],
    ) -> Result<Self, MaglevError> {
        Ok(match policy {
            BalancePolicy::RoundRobin => Balancer::RoundRobin(RoundRobin::default()),
            BalancePolicy::WeightedRoundRobin => {
                Balancer::Weighted(WeightedRoundRobin::new(endpoints.len()))
            }
            BalancePolicy::LeastRequest => Balancer::LeastRequest(LeastRequest),
            BalancePolicy::ConsistentHash {
                key,
                table_size,
                fallback,
            } => Balancer::Hash {
                hash: ConsistentHash::new(endpoints, *table_size)?,
                key: key.clone(),
                fallback: Box::new(match fallback {
                    Fallback::LeastRequest => Balancer::LeastRequest(LeastRequest),
                    Fallback::RoundRobin => Balancer::RoundRobin(RoundRobin::default()),
                }),
            },
        })
    }

    pub(crate) fn pick(
        &self,
        endpoints: &[Arc<Endpoint>],
        eligible: &[usize],
        headers: &HeaderMap,
        now: Instant,
    ) -> Option<usize> {
        match self {
            Balancer::RoundRobin(rr) => rr.pick(eligible),
            Balancer::Weighted(wrr) => wrr.pick(endpoints, eligible),
            Balancer::LeastRequest(p2c) => p2c.pick(endpoints, eligible, now),
            Balancer::Hash {
                hash,
                key,
                fallback,
            } => match key.extract(headers) {
                Some(key) => hash.pick(key, eligible),
                None => fallback.pick(endpoints, eligible, headers, now),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn primes() {
        assert!(is_prime(65_537));
        assert!(is_prime(2));
        assert!(!is_prime(65_536));
        assert!(!is_prime(1));
        assert!(!is_prime(9));
    }

    #[test]
    fn table_rejects_bad_sizes() {
        assert_eq!(
            MaglevTable::new(&[("a", 1)], 100).err(),
            Some(MaglevError::NotPrime(100))
        );
        assert!(matches!(
            MaglevTable::new(&[("a", 1), ("b", 1), ("c", 1)], 3),
            Err(MaglevError::TooSmall { .. })
        ));
        assert_eq!(
            MaglevTable::new(&[], 7).ok().and_then(|t| t.lookup(1)),
            None
        );
    }

    #[test]
    fn table_shares_slots_by_weight() {
        let table = MaglevTable::new(&[("a", 1), ("b", 1), ("c", 2)], 65_537).expect("valid table");
        let mut counts = [0usize; 3];
        for &slot in &table.slots {
            counts[slot as usize] += 1;
        }
        let total = table.slots.len() as f64;
        // Maglev fills within one slot of even; weights scale the turns exactly.
        assert!((counts[0] as f64 / total - 0.25).abs() < 0.01, "{counts:?}");
        assert!((counts[1] as f64 / total - 0.25).abs() < 0.01, "{counts:?}");
        assert!((counts[2] as f64 / total - 0.5).abs() < 0.01, "{counts:?}");
    }

    #[test]
    fn cookie_and_header_keys() {
        let mut headers = HeaderMap::new();
        headers.append("x-user", HeaderValue::from_static("42"));
        headers.append(
            http::header::COOKIE,
            HeaderValue::from_static("theme=dark; session=abc"),
        );
        headers.append(http::header::COOKIE, HeaderValue::from_static("sid = xyz "));
        let header = HashKey::Header {
            name: "x-user".into(),
        };
        let cookie = |name: &str| HashKey::Cookie { name: name.into() };
        assert_eq!(header.extract(&headers), Some(&b"42"[..]));
        assert_eq!(cookie("session").extract(&headers), Some(&b"abc"[..]));
        assert_eq!(cookie("sid").extract(&headers), Some(&b"xyz"[..]));
        assert_eq!(cookie("sess").extract(&headers), None);
        assert_eq!(cookie("x-user").extract(&headers), None);
        let missing = HashKey::Header {
            name: "x-tenant".into(),
        };
        assert_eq!(missing.extract(&headers), None);
    }

    #[test]
    fn policy_config_forms() {
        let policy: BalancePolicy = serde_json::from_str(
            r#"{"policy":"consistent_hash","key":{"from":"cookie","name":"session"}}"#,
        )
        .expect("parses");
        assert_eq!(
            policy,
            BalancePolicy::ConsistentHash {
                key: HashKey::Cookie {
                    name: "session".into()
                },
                table_size: 65_537,
                fallback: Fallback::LeastRequest,
            }
        );
        let policy: BalancePolicy =
            serde_json::from_str(r#"{"policy":"weighted_round_robin"}"#).expect("parses");
        assert_eq!(policy, BalancePolicy::WeightedRoundRobin);
        // serde checks unknown fields in struct variants only (not unit ones like round_robin).
        let typo = r#"{"policy":"consistent_hash","key":{"from":"header","name":"k"},"size":7}"#;
        assert!(serde_json::from_str::<BalancePolicy>(typo).is_err());
        let typo = r#"{"policy":"consistent_hash","key":{"from":"header","nam":"k"}}"#;
        assert!(serde_json::from_str::<BalancePolicy>(typo).is_err());
        assert!(serde_json::from_str::<BalancePolicy>(r#"{"policy":"random"}"#).is_err());
    }
}
