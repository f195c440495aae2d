//! Passive outlier detection (Envoy's consecutive-5xx / consecutive-gateway-failure detectors),
//! which is also the per-endpoint circuit breaker: the outcomes of real requests eject (open the
//! circuit of) an endpoint that keeps failing, for a time that grows with each ejection, while
//! never ejecting more than a configured share of the set. An ejection ends at the first pick
//! after its time is up (no timer task); the endpoint is then half-open: one request at a time
//! is let through as a probe, and its outcome closes the circuit (`upstream.closed`) or ejects
//! the endpoint again at once, without waiting for the threshold (`probe_failed`).

use std::time::{Duration, Instant};

use super::endpoint::Outcome;

pub use causeway_core::proxy_config::OutlierConfig;

/// Why an endpoint was ejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EjectReason {
    Consecutive5xx,
    ConsecutiveConnectFailures,
    /// The half-open probe after an ejection failed.
    ProbeFailed,
}

impl EjectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EjectReason::Consecutive5xx => "consecutive_5xx",
            EjectReason::ConsecutiveConnectFailures => "consecutive_connect_failures",
            EjectReason::ProbeFailed => "probe_failed",
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct OutlierState {
    consecutive_5xx: u32,
    consecutive_connect: u32,
    pub(crate) times_ejected: u32,
    ejected_until: Option<Instant>,
    /// Back from an ejection, not yet proven by a probe.
    half_open: bool,
    probe_in_flight: bool,
}

/// What one outcome did to the circuit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Eject(EjectReason),
    /// A half-open endpoint's probe succeeded.
    Closed,
}

impl OutlierState {
    pub(crate) fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| now < until)
    }

    /// Whether a new request may be sent: not ejected, and not half-open with its probe out.
    pub(crate) fn admits(&self, now: Instant) -> bool {
        let probing = self.half_open && self.probe_in_flight;
        !(self.is_ejected(now) || probing)
    }

    pub(crate) fn is_half_open(&self) -> bool {
        self.half_open
    }

    /// Called for each request sent: true when it is the half-open endpoint's probe.
    pub(crate) fn take_probe(&mut self) -> bool {
        let probe = self.half_open && !self.probe_in_flight;
        self.probe_in_flight |= probe;
        probe
    }

    /// A probe that ended without an outcome (cancelled): the next request probes instead.
    pub(crate) fn release_probe(&mut self) {
        self.probe_in_flight = false;
    }

    /// Counts one outcome; says when it crosses an ejection threshold, or what it did to a
    /// half-open circuit. Outcomes that arrive while ejected (requests picked before the
    /// ejection) are not counted.
    pub(crate) fn count(
        &mut self,
        outcome: Outcome,
        config: &OutlierConfig,
        now: Instant,
    ) -> Option<Verdict> {
        if !config.enabled || self.is_ejected(now) {
            return None;
        }
        if self.half_open {
            self.probe_in_flight = false;
            if outcome.is_failure() {
                return Some(Verdict::Eject(EjectReason::ProbeFailed));
            }
            self.half_open = false;
            self.consecutive_5xx = 0;
            self.consecutive_connect = 0;
            return Some(Verdict::Closed);
        }
        let reason = match outcome {
            Outcome::ConnectFailure => {
                self.consecutive_connect += 1;
                (self.consecutive_connect >= config.consecutive_connect_failures.max(1))
                    .then_some(EjectReason::ConsecutiveConnectFailures)
            }
            outcome if outcome.is_failure() => {
                self.consecutive_5xx += 1;
                self.consecutive_connect = 0;
                (self.consecutive_5xx >= config.consecutive_5xx.max(1))
                    .then_some(EjectReason::Consecutive5xx)
            }
            _ => {
                self.consecutive_5xx = 0;
                self.consecutive_connect = 0;
                None
            }
        };
        reason.map(Verdict::Eject)
    }

    /// Ejects from `now`; returns how long for.
    pub(crate) fn eject(&mut self, config: &OutlierConfig, now: Instant) -> Duration {
        self.times_ejected += 1;
        let duration = config.ejection_duration(self.times_ejected);
        self.ejected_until = Some(now + duration);
        self.half_open = false;
        self.probe_in_flight = false;
        self.consecutive_5xx = 0;
        self.consecutive_connect = 0;
        duration
    }

    /// Ends an ejection whose time is up, half-opening the circuit; true when this call did.
    pub(crate) fn try_return(&mut self, now: Instant) -> bool {
        match self.ejected_until {
            Some(until) if now >= until => {
                self.ejected_until = None;
                self.half_open = true;
                self.probe_in_flight = false;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    #[test]
    fn durations_grow_and_cap() {
        let config = OutlierConfig {
            base_ejection_ms: 1000,
            max_ejection_ms: 2500,
            ..OutlierConfig::default()
        };
        assert_eq!(config.ejection_duration(1), Duration::from_millis(1000));
        assert_eq!(config.ejection_duration(2), Duration::from_millis(2000));
        assert_eq!(config.ejection_duration(3), Duration::from_millis(2500));
        assert_eq!(
            config.ejection_duration(u32::MAX),
            Duration::from_millis(2500)
        );
    }

    #[test]
    fn max_ejected_rounds_down_and_never_all() {
        let percent = |max_ejection_percent| OutlierConfig {
            max_ejection_percent,
            ..OutlierConfig::default()
        };
        assert_eq!(percent(50).max_ejected(4), 2);
        assert_eq!(percent(50).max_ejected(3), 1);
        assert_eq!(percent(10).max_ejected(3), 0);
        assert_eq!(percent(100).max_ejected(3), 2);
        assert_eq!(percent(100).max_ejected(1), 0);
        assert_eq!(percent(0).max_ejected(10), 0);
    }

    #[test]
    fn success_resets_the_streak() {
        let config = OutlierConfig {
            consecutive_5xx: 3,
            ..OutlierConfig::default()
        };
        let now = Instant::now();
        let mut state = OutlierState::default();
        let bad = Outcome::Response(StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(state.count(bad, &config, now), None);
        assert_eq!(state.count(bad, &config, now), None);
        assert_eq!(
            state.count(Outcome::Response(StatusCode::OK), &config, now),
            None
        );
        assert_eq!(state.count(bad, &config, now), None);
        assert_eq!(state.count(bad, &config, now), None);
        assert_eq!(
            state.count(Outcome::Failure, &config, now),
            Some(Verdict::Eject(EjectReason::Consecutive5xx))
        );
        // A 4xx is the client's fault and resets the streak.
        let mut state = OutlierState::default();
        state.count(bad, &config, now);
        state.count(bad, &config, now);
        state.count(Outcome::Response(StatusCode::NOT_FOUND), &config, now);
        assert_eq!(state.count(bad, &config, now), None);
    }

    #[test]
    fn disabled_never_ejects() {
        let config = OutlierConfig {
            enabled: false,
            consecutive_connect_failures: 1,
            ..OutlierConfig::default()
        };
        let mut state = OutlierState::default();
        assert_eq!(
            state.count(Outcome::ConnectFailure, &config, Instant::now()),
            None
        );
    }
}
