//! Passive outlier detection (Envoy's consecutive-5xx / consecutive-gateway-failure detectors):
//! the outcomes of real requests eject an endpoint that keeps failing, for a time that grows with
//! each ejection, while never ejecting more than a configured share of the set. An ejection ends
//! at the first pick after its time is up (no timer task); that is when `upstream.returned` is
//! logged and the `upstream_ejected` gauge drops back to 0.

use std::time::{Duration, Instant};

use super::endpoint::Outcome;

pub use causeway_core::proxy_config::OutlierConfig;

/// Why an endpoint was ejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EjectReason {
    Consecutive5xx,
    ConsecutiveConnectFailures,
}

impl EjectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EjectReason::Consecutive5xx => "consecutive_5xx",
            EjectReason::ConsecutiveConnectFailures => "consecutive_connect_failures",
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct OutlierState {
    consecutive_5xx: u32,
    consecutive_connect: u32,
    pub(crate) times_ejected: u32,
    ejected_until: Option<Instant>,
}

impl OutlierState {
    pub(crate) fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| now < until)
    }

    /// Counts one outcome; says when it crosses an ejection threshold. Outcomes that arrive while
    /// ejected (requests picked before the ejection) are not counted.
    pub(crate) fn count(
        &mut self,
        outcome: Outcome,
        config: &OutlierConfig,
        now: Instant,
    ) -> Option<EjectReason> {
        if !config.enabled || self.is_ejected(now) {
            return None;
        }
        match outcome {
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
        }
    }

    /// Ejects from `now`; returns how long for.
    pub(crate) fn eject(&mut self, config: &OutlierConfig, now: Instant) -> Duration {
        self.times_ejected += 1;
        let duration = config.ejection_duration(self.times_ejected);
        self.ejected_until = Some(now + duration);
        self.consecutive_5xx = 0;
        self.consecutive_connect = 0;
        duration
    }

    /// Ends an ejection whose time is up; true when this call ended one.
    pub(crate) fn try_return(&mut self, now: Instant) -> bool {
        match self.ejected_until {
            Some(until) if now >= until => {
                self.ejected_until = None;
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
            Some(EjectReason::Consecutive5xx)
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
