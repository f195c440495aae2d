use causeway_core::telemetry::latency_histogram;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabel {
    pub queue: String,
}

/// The broker's metric families; created at open so that counting starts before registration.
#[derive(Clone)]
pub struct BrokerMetrics {
    pub published: Family<QueueLabel, Counter>,
    /// Messages published without an id, which got their content id.
    pub derived_ids: Family<QueueLabel, Counter>,
    pub delivered: Family<QueueLabel, Counter>,
    pub acked: Family<QueueLabel, Counter>,
    pub redelivered: Family<QueueLabel, Counter>,
    pub dead_lettered: Family<QueueLabel, Counter>,
    pub ready: Family<QueueLabel, Gauge>,
    pub unacked: Family<QueueLabel, Gauge>,
    pub delayed: Family<QueueLabel, Gauge>,
    pub commit_batch: Histogram,
    pub commit_seconds: Histogram,
}

impl Default for BrokerMetrics {
    fn default() -> Self {
        Self {
            published: Family::default(),
            derived_ids: Family::default(),
            delivered: Family::default(),
            acked: Family::default(),
            redelivered: Family::default(),
            dead_lettered: Family::default(),
            ready: Family::default(),
            unacked: Family::default(),
            delayed: Family::default(),
            // 1, 2, 4, ... 4096 operations per commit.
            commit_batch: Histogram::new(exponential_buckets(1.0, 2.0, 13)),
            commit_seconds: latency_histogram(),
        }
    }
}

pub fn label(queue: &str) -> QueueLabel {
    QueueLabel {
        queue: queue.to_string(),
    }
}

impl BrokerMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let counters = [
            (
                "broker_published",
                "Messages accepted for publishing, by queue",
                &self.published,
            ),
            (
                "broker_derived_message_ids",
                "Messages published without an id that got one derived from their payload, by queue",
                &self.derived_ids,
            ),
            (
                "broker_delivered",
                "Deliveries sent to consumers, by queue",
                &self.delivered,
            ),
            ("broker_acked", "Deliveries acked, by queue", &self.acked),
            (
                "broker_redelivered",
                "Deliveries settled for redelivery (retry or requeue), by queue",
                &self.redelivered,
            ),
            (
                "broker_dead_lettered",
                "Deliveries moved to the dead-letter queue, by original queue",
                &self.dead_lettered,
            ),
        ];
        for (name, help, family) in counters {
            registry.register(name, help, family.clone());
        }
        let gauges = [
            (
                "broker_ready",
                "Messages ready for delivery, by queue",
                &self.ready,
            ),
            (
                "broker_unacked",
                "Messages delivered and not yet settled, by queue",
                &self.unacked,
            ),
            (
                "broker_delayed",
                "Messages waiting out a retry backoff, by queue",
                &self.delayed,
            ),
        ];
        for (name, help, family) in gauges {
            registry.register(name, help, family.clone());
        }
        registry.register(
            "broker_commit_batch_operations",
            "Operations (jobs) written per storage commit (group commit)",
            self.commit_batch.clone(),
        );
        registry.register(
            "broker_commit_seconds",
            "Duration of one storage commit, fsync included",
            self.commit_seconds.clone(),
        );
    }

    pub fn forget(&self, queue: &str) {
        let label = label(queue);
        for family in [&self.ready, &self.unacked, &self.delayed] {
            family.remove(&label);
        }
    }
}
