//! Retries: which failures may be retried ([`RetryPolicy`]), how many retries the upstream can
//! afford ([`RetryBudget`], as linkerd2-proxy and Finagle: retries add at most `ratio` of the
//! request load, plus a small floor), and one request's attempts ([`RetrySession`]).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use prometheus_client::metrics::counter::Counter;

use super::endpoint::lock;

pub use causeway_core::proxy_config::{RetryBudgetConfig, RetryPolicy};

#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    epoch: u64,
    requests: u64,
    retries: u64,
}

/// Counts requests and retries over a sliding window of buckets; a retry is allowed while
/// `retries + 1 ≤ ratio × requests + min_retries_per_second × window`.
#[derive(Debug)]
pub struct RetryBudget {
    config: RetryBudgetConfig,
    origin: Instant,
    bucket_len: Duration,
    buckets: Mutex<Vec<Bucket>>,
}

impl RetryBudget {
    pub fn new(config: RetryBudgetConfig) -> Self {
        Self::starting_at(config, Instant::now())
    }

    /// A budget whose window starts at `origin` (for callers with their own clock).
    pub fn starting_at(config: RetryBudgetConfig, origin: Instant) -> Self {
        let count = config.buckets.max(1);
        let bucket_len = Duration::from_millis(config.window_ms.max(1)) / count;
        Self {
            bucket_len: bucket_len.max(Duration::from_millis(1)),
            origin,
            buckets: Mutex::new(vec![Bucket::default(); count as usize]),
            config,
        }
    }

    pub fn config(&self) -> &RetryBudgetConfig {
        &self.config
    }

    /// Counts an original request (not a retry).
    pub fn deposit(&self) {
        self.deposit_at(Instant::now());
    }

    pub fn deposit_at(&self, now: Instant) {
        let mut buckets = lock(&self.buckets);
        self.current(&mut buckets, now).requests += 1;
    }

    /// Takes one retry from the budget if it allows one.
    pub fn try_withdraw(&self) -> bool {
        self.try_withdraw_at(Instant::now())
    }

    pub fn try_withdraw_at(&self, now: Instant) -> bool {
        let mut buckets = lock(&self.buckets);
        let (requests, retries) = self.totals(&buckets, now);
        if (retries + 1) as f64 > self.allowance(requests) {
            return false;
        }
        self.current(&mut buckets, now).retries += 1;
        true
    }

    /// How many more retries the budget allows at `now`.
    pub fn remaining_at(&self, now: Instant) -> u64 {
        let buckets = lock(&self.buckets);
        let (requests, retries) = self.totals(&buckets, now);
        (self.allowance(requests).floor() as u64).saturating_sub(retries)
    }

    fn allowance(&self, requests: u64) -> f64 {
        let window_s = self.bucket_len.as_secs_f64() * self.config.buckets.max(1) as f64;
        self.config.ratio.max(0.0) * requests as f64
            + f64::from(self.config.min_retries_per_second) * window_s
            // So that 0.2 × 100 allows 20 retries, not 19.999…
            + 1e-9
    }

    fn epoch(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.origin).as_nanos() / self.bucket_len.as_nanos()) as u64
    }

    fn current<'a>(&self, buckets: &'a mut [Bucket], now: Instant) -> &'a mut Bucket {
        let epoch = self.epoch(now);
        let len = buckets.len() as u64;
        let bucket = &mut buckets[(epoch % len) as usize];
        if bucket.epoch != epoch {
            *bucket = Bucket {
                epoch,
                ..Bucket::default()
            };
        }
        bucket
    }

    fn totals(&self, buckets: &[Bucket], now: Instant) -> (u64, u64) {
        let epoch = self.epoch(now);
        let len = buckets.len() as u64;
        buckets
            .iter()
            .filter(|bucket| bucket.epoch + len > epoch && bucket.epoch <= epoch)
            .fold((0, 0), |(requests, retries), bucket| {
                (requests + bucket.requests, retries + bucket.retries)
            })
    }
}

/// How an attempt failed, for the retry decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// No connection: the request never reached the endpoint.
    ConnectFailure,
    /// The endpoint answered with this status.
    Status(StatusCode),
    /// The attempt ran past its per-try timeout.
    PerTryTimeout,
    /// Anything else after connecting (reset, protocol error).
    Other,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryDecision {
    Retry,
    DoNotRetry(NoRetry),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoRetry {
    /// The failure is not one the policy retries.
    NotRetryable,
    /// A non-idempotent request whose bytes may have reached the endpoint.
    NotIdempotent,
    MaxRetries,
    DeadlineExceeded,
    BudgetExhausted,
}

/// The methods RFC 9110 calls idempotent.
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// The retry decision by the policy alone (the plain policy lives in causeway-core).
pub trait RetryPolicyExt {
    fn decide(&self, method: &Method, failure: FailureKind, bytes_sent: bool) -> RetryDecision {
        self.decide_for(is_idempotent(method), failure, bytes_sent)
    }

    /// [`decide`](Self::decide) for a request known to be idempotent or not: a method RFC 9110
    /// calls idempotent, or any request with an `Idempotency-Key` (the IETF httpapi draft: the
    /// server answers a repeat of the key with the first outcome, so sending it twice is safe).
    fn decide_for(&self, idempotent: bool, failure: FailureKind, bytes_sent: bool)
    -> RetryDecision;
}

impl RetryPolicyExt for RetryPolicy {
    /// Whether this failure of this request may be retried, by the policy alone (no budget,
    /// count or deadline). A request that never left (connect failure, no bytes sent) is safe to
    /// retry whatever its method; otherwise only idempotent methods are retried.
    fn decide_for(
        &self,
        idempotent: bool,
        failure: FailureKind,
        bytes_sent: bool,
    ) -> RetryDecision {
        if failure == FailureKind::ConnectFailure && !bytes_sent {
            return RetryDecision::Retry;
        }
        if !idempotent {
            return RetryDecision::DoNotRetry(NoRetry::NotIdempotent);
        }
        let retryable = match failure {
            FailureKind::ConnectFailure => true,
            FailureKind::Status(status) => self.retry_statuses.contains(&status.as_u16()),
            FailureKind::PerTryTimeout => self.retry_per_try_timeout,
            FailureKind::Other => self.retry_on_reset,
        };
        if retryable {
            RetryDecision::Retry
        } else {
            RetryDecision::DoNotRetry(NoRetry::NotRetryable)
        }
    }
}

/// Counters a session bumps: retries taken, and retries the budget refused.
#[derive(Clone, Debug, Default)]
pub struct RetryCounters {
    pub retries: Counter,
    pub budget_exhausted: Counter,
}

/// One request's attempts. Creating it deposits into the budget; [`RetrySession::after_failure`]
/// says whether to try again (withdrawing from the budget when it says yes).
///
/// ```ignore
/// let mut session = upstream.retry_session(&method);
/// loop {
///     let Some(timeout) = session.attempt_timeout() else { break /* deadline: 504 */ };
///     let guard = upstream.pick(&headers)?;
///     match tokio::time::timeout(timeout, send(guard.addr())).await { /* record, then: */ }
///     match session.after_failure(kind, bytes_sent) { RetryDecision::Retry => continue, _ => break }
/// }
/// ```
#[derive(Debug)]
pub struct RetrySession<'a> {
    policy: &'a RetryPolicy,
    budget: &'a RetryBudget,
    counters: Option<RetryCounters>,
    method: Method,
    idempotency_key: bool,
    /// The upstream's name, for the log line of each retry.
    upstream: &'a str,
    started: Instant,
    retries: u32,
}

impl<'a> RetrySession<'a> {
    pub fn new(policy: &'a RetryPolicy, budget: &'a RetryBudget, method: Method) -> Self {
        Self::starting_at(policy, budget, method, Instant::now())
    }

    pub fn starting_at(
        policy: &'a RetryPolicy,
        budget: &'a RetryBudget,
        method: Method,
        now: Instant,
    ) -> Self {
        budget.deposit_at(now);
        Self {
            policy,
            budget,
            counters: None,
            method,
            idempotency_key: false,
            upstream: "",
            started: now,
            retries: 0,
        }
    }

    /// The request carries an `Idempotency-Key`: it may be retried like an idempotent one.
    pub fn with_idempotency_key(mut self, present: bool) -> Self {
        self.idempotency_key = present;
        self
    }

    pub fn named(mut self, upstream: &'a str) -> Self {
        self.upstream = upstream;
        self
    }

    pub fn with_counters(mut self, counters: RetryCounters) -> Self {
        self.counters = Some(counters);
        self
    }

    /// Retries taken so far.
    pub fn retries(&self) -> u32 {
        self.retries
    }

    /// The time the next attempt may take: the per-try timeout cut to what is left of the
    /// deadline; None once the deadline has passed.
    pub fn attempt_timeout(&self) -> Option<Duration> {
        self.attempt_timeout_at(Instant::now())
    }

    pub fn attempt_timeout_at(&self, now: Instant) -> Option<Duration> {
        let left = self
            .policy
            .deadline()
            .checked_sub(now.saturating_duration_since(self.started))
            .filter(|left| !left.is_zero())?;
        Some(
            self.policy
                .per_try_timeout()
                .map_or(left, |per_try| per_try.min(left)),
        )
    }

    /// How long to wait before the retry [`after_failure`](Self::after_failure) just allowed:
    /// the policy's doubling backoff, jittered into its upper half, cut to what is left of the
    /// deadline; zero when the policy has no backoff.
    pub fn backoff_at(&self, now: Instant, jitter: f64) -> Duration {
        let full = self.policy.backoff(self.retries);
        if full.is_zero() {
            return full;
        }
        let jittered = full.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0));
        let left = self
            .policy
            .deadline()
            .saturating_sub(now.saturating_duration_since(self.started));
        jittered.min(left)
    }

    /// [`backoff_at`](Self::backoff_at) now, with random jitter.
    pub fn backoff(&self) -> Duration {
        use rand::Rng;
        self.backoff_at(Instant::now(), rand::rng().random::<f64>())
    }

    pub fn after_failure(&mut self, failure: FailureKind, bytes_sent: bool) -> RetryDecision {
        self.after_failure_at(failure, bytes_sent, Instant::now())
    }

    pub fn after_failure_at(
        &mut self,
        failure: FailureKind,
        bytes_sent: bool,
        now: Instant,
    ) -> RetryDecision {
        let decision = self.check(failure, bytes_sent, now);
        match decision {
            RetryDecision::Retry => {
                self.retries += 1;
                let why = if is_idempotent(&self.method) {
                    "idempotent method"
                } else if self.idempotency_key {
                    "Idempotency-Key present"
                } else {
                    "not sent: the connection failed before any byte"
                };
                tracing::info!(
                    event = "upstream.retry",
                    upstream = self.upstream,
                    method = %self.method,
                    failure = ?failure,
                    retry = self.retries,
                    why,
                    "retrying on another attempt"
                );
                if let Some(counters) = &self.counters {
                    counters.retries.inc();
                }
            }
            RetryDecision::DoNotRetry(NoRetry::BudgetExhausted) => {
                if let Some(counters) = &self.counters {
                    counters.budget_exhausted.inc();
                }
            }
            RetryDecision::DoNotRetry(_) => {}
        }
        decision
    }

    fn check(&self, failure: FailureKind, bytes_sent: bool, now: Instant) -> RetryDecision {
        use RetryDecision::DoNotRetry;
        let idempotent = is_idempotent(&self.method) || self.idempotency_key;
        if let DoNotRetry(reason) = self.policy.decide_for(idempotent, failure, bytes_sent) {
            return DoNotRetry(reason);
        }
        if self.retries >= self.policy.max_retries {
            return DoNotRetry(NoRetry::MaxRetries);
        }
        if self.attempt_timeout_at(now).is_none() {
            return DoNotRetry(NoRetry::DeadlineExceeded);
        }
        // Last, so the budget is only spent on retries that will happen.
        if !self.budget.try_withdraw_at(now) {
            return DoNotRetry(NoRetry::BudgetExhausted);
        }
        RetryDecision::Retry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(ratio: f64, min_retries_per_second: u32) -> (RetryBudget, Instant) {
        let origin = Instant::now();
        let config = RetryBudgetConfig {
            ratio,
            min_retries_per_second,
            window_ms: 10_000,
            buckets: 10,
        };
        (RetryBudget::starting_at(config, origin), origin)
    }

    #[test]
    fn budget_allows_a_fifth_then_refuses_and_refills() {
        let (budget, t0) = budget(0.2, 0);
        for _ in 0..100 {
            budget.deposit_at(t0);
        }
        assert_eq!(budget.remaining_at(t0), 20);
        let allowed = (0..50).filter(|_| budget.try_withdraw_at(t0)).count();
        assert_eq!(allowed, 20, "20% of 100 requests");
        assert!(!budget.try_withdraw_at(t0), "exhausted");

        // More requests refill it: 50 more allow 10 more retries.
        let t1 = t0 + Duration::from_millis(1500);
        for _ in 0..50 {
            budget.deposit_at(t1);
        }
        let allowed = (0..50).filter(|_| budget.try_withdraw_at(t1)).count();
        assert_eq!(allowed, 10);
        assert!(!budget.try_withdraw_at(t1));
    }

    #[test]
    fn budget_window_slides() {
        let (budget, t0) = budget(0.2, 0);
        for _ in 0..100 {
            budget.deposit_at(t0);
        }
        assert_eq!((0..30).filter(|_| budget.try_withdraw_at(t0)).count(), 20);
        // Once the window has passed, both the old requests and the old retries are gone.
        let later = t0 + Duration::from_secs(11);
        assert!(!budget.try_withdraw_at(later), "no requests in the window");
        for _ in 0..10 {
            budget.deposit_at(later);
        }
        assert_eq!((0..30).filter(|_| budget.try_withdraw_at(later)).count(), 2);
    }

    #[test]
    fn budget_floor_allows_retries_without_traffic() {
        let (budget, t0) = budget(0.2, 1);
        // 1 retry/s over a 10 s window.
        assert_eq!((0..30).filter(|_| budget.try_withdraw_at(t0)).count(), 10);
    }

    #[test]
    fn decision_table() {
        use FailureKind::*;
        use NoRetry::*;
        use RetryDecision::*;
        let policy = RetryPolicy::default();
        let unavailable = Status(StatusCode::SERVICE_UNAVAILABLE);
        let internal = Status(StatusCode::INTERNAL_SERVER_ERROR);
        let cases: &[(Method, FailureKind, bool, RetryDecision)] = &[
            (Method::GET, ConnectFailure, false, Retry),
            (Method::GET, unavailable, true, Retry),
            (Method::GET, internal, true, DoNotRetry(NotRetryable)),
            (Method::GET, PerTryTimeout, true, Retry),
            (Method::GET, Other, true, Retry),
            (Method::HEAD, unavailable, true, Retry),
            (Method::OPTIONS, unavailable, true, Retry),
            (Method::PUT, unavailable, true, Retry),
            (Method::DELETE, ConnectFailure, true, Retry),
            (Method::TRACE, unavailable, true, Retry),
            (Method::POST, ConnectFailure, false, Retry),
            (
                Method::POST,
                ConnectFailure,
                true,
                DoNotRetry(NotIdempotent),
            ),
            (Method::POST, unavailable, true, DoNotRetry(NotIdempotent)),
            (Method::POST, PerTryTimeout, true, DoNotRetry(NotIdempotent)),
            (Method::PATCH, ConnectFailure, false, Retry),
            (Method::PATCH, unavailable, false, DoNotRetry(NotIdempotent)),
            (Method::PATCH, Other, true, DoNotRetry(NotIdempotent)),
        ];
        for (method, failure, bytes_sent, expected) in cases {
            assert_eq!(
                policy.decide(method, *failure, *bytes_sent),
                *expected,
                "{method} {failure:?} bytes_sent={bytes_sent}"
            );
        }
        let no_timeouts = RetryPolicy {
            retry_per_try_timeout: false,
            ..RetryPolicy::default()
        };
        assert_eq!(
            no_timeouts.decide(&Method::GET, PerTryTimeout, true),
            DoNotRetry(NotRetryable)
        );
        let no_resets = RetryPolicy {
            retry_on_reset: false,
            ..RetryPolicy::default()
        };
        assert_eq!(
            no_resets.decide(&Method::GET, Other, true),
            DoNotRetry(NotRetryable)
        );
    }

    #[test]
    fn a_post_with_an_idempotency_key_is_retried_like_a_get() {
        let (budget, now) = budget(1.0, 10);
        let policy = RetryPolicy::default();
        let unavailable = FailureKind::Status(StatusCode::SERVICE_UNAVAILABLE);
        let mut plain = RetrySession::starting_at(&policy, &budget, Method::POST, now);
        assert_eq!(
            plain.after_failure_at(unavailable, true, now),
            RetryDecision::DoNotRetry(NoRetry::NotIdempotent)
        );
        let mut keyed = RetrySession::starting_at(&policy, &budget, Method::POST, now)
            .with_idempotency_key(true);
        assert_eq!(
            keyed.after_failure_at(unavailable, true, now),
            RetryDecision::Retry
        );
        assert_eq!(
            keyed.after_failure_at(
                FailureKind::Status(StatusCode::INTERNAL_SERVER_ERROR),
                true,
                now
            ),
            RetryDecision::DoNotRetry(NoRetry::NotRetryable),
            "the key makes a retry safe, not every failure retryable"
        );
        assert_eq!(keyed.retries(), 1);
    }

    #[test]
    fn retries_back_off_doubling_with_jitter_and_never_past_the_deadline() {
        let policy = RetryPolicy {
            max_retries: 5,
            deadline_ms: 1000,
            backoff_ms: 100,
            max_backoff_ms: 300,
            ..RetryPolicy::default()
        };
        let (budget, t0) = budget(1.0, 100);
        let mut session = RetrySession::starting_at(&policy, &budget, Method::GET, t0);
        let mut waits = Vec::new();
        for _ in 0..4 {
            assert_eq!(
                session.after_failure_at(FailureKind::ConnectFailure, false, t0),
                RetryDecision::Retry
            );
            let longest = session.backoff_at(t0, 1.0);
            let shortest = session.backoff_at(t0, 0.0);
            assert_eq!(shortest, longest / 2, "jitter stays in the upper half");
            waits.push(longest.as_millis() as u64);
        }
        assert_eq!(waits, [100, 200, 300, 300]);
        // 950 ms into a 1 s deadline, the wait is what is left.
        let late = t0 + Duration::from_millis(950);
        assert_eq!(session.backoff_at(late, 1.0), Duration::from_millis(50));

        let immediate = RetryPolicy::default();
        let mut at_once = RetrySession::starting_at(&immediate, &budget, Method::GET, t0);
        at_once.after_failure_at(FailureKind::ConnectFailure, false, t0);
        assert_eq!(at_once.backoff_at(t0, 1.0), Duration::ZERO);
    }

    #[test]
    fn session_counts_deadline_and_budget() {
        let policy = RetryPolicy {
            max_retries: 2,
            per_try_timeout_ms: 300,
            deadline_ms: 1000,
            ..RetryPolicy::default()
        };
        let (budget, t0) = budget(0.2, 0);
        for _ in 0..20 {
            budget.deposit_at(t0);
        }
        let mut session = RetrySession::starting_at(&policy, &budget, Method::GET, t0)
            .with_counters(RetryCounters::default());
        assert_eq!(
            session.attempt_timeout_at(t0),
            Some(Duration::from_millis(300))
        );
        let failure = FailureKind::ConnectFailure;
        assert_eq!(
            session.after_failure_at(failure, false, t0),
            RetryDecision::Retry
        );
        assert_eq!(
            session.after_failure_at(failure, false, t0),
            RetryDecision::Retry
        );
        assert_eq!(
            session.after_failure_at(failure, false, t0),
            RetryDecision::DoNotRetry(NoRetry::MaxRetries)
        );
        assert_eq!(session.retries(), 2);

        // The last attempt gets only what is left of the deadline.
        let late = t0 + Duration::from_millis(900);
        assert_eq!(
            session.attempt_timeout_at(late),
            Some(Duration::from_millis(100))
        );
        let over = t0 + Duration::from_millis(1000);
        assert_eq!(session.attempt_timeout_at(over), None);
        let mut other = RetrySession::starting_at(&policy, &budget, Method::GET, t0);
        assert_eq!(
            other.after_failure_at(failure, false, over),
            RetryDecision::DoNotRetry(NoRetry::DeadlineExceeded)
        );

        // 23 requests deposited, 2 retries taken: 4.6 allowed, so two more, then refused.
        let counters = RetryCounters::default();
        let mut third = RetrySession::starting_at(&policy, &budget, Method::GET, t0)
            .with_counters(counters.clone());
        assert_eq!(
            third.after_failure_at(failure, false, t0),
            RetryDecision::Retry
        );
        assert_eq!(
            other.after_failure_at(failure, false, t0),
            RetryDecision::Retry
        );
        assert_eq!(
            third.after_failure_at(failure, false, t0),
            RetryDecision::DoNotRetry(NoRetry::BudgetExhausted)
        );
        assert_eq!(counters.retries.get(), 1);
        assert_eq!(counters.budget_exhausted.get(), 1);
    }
}
