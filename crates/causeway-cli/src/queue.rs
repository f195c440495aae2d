//! `causeway queue ...`: the operator's view of the queue scenario's broker, whichever backend it
//! is: queue depths, messages without consuming them, dead letters, and redrive.

use std::fmt::Write;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use causeway_core::queue_policy::DEAD_LETTER_SUFFIX;
use causeway_core::{DataDir, Role, Topology};
use causeway_queue::{
    BrokerTarget, ConnectOptions, PeekedMessage, QueueBackend, QueueInfo, QueueSpec, headers,
};

use crate::state::RunState;

/// The broker URL to use: the flag, else what the running system uses, else the topology's.
pub fn broker_url(topology: &Topology, data_dir: &Path, flag: Option<&str>) -> String {
    if let Some(url) = flag {
        return url.to_string();
    }
    if let Ok(state) = RunState::load(data_dir)
        && let Some(url) = state.broker
    {
        return url;
    }
    topology
        .messaging
        .broker_url
        .clone()
        .unwrap_or_else(|| format!("causeway://{}", topology.broker.listen))
}

/// Connects to the scenario's broker as an operator tool.
pub async fn connect(
    topology: &Topology,
    data_dir: &Path,
    flag: Option<&str>,
) -> anyhow::Result<Arc<dyn QueueBackend>> {
    let url = broker_url(topology, data_dir, flag);
    let target = BrokerTarget::parse(&url)?;
    let mut options = ConnectOptions::new(format!("causeway-cli-{}", std::process::id()));
    options.ca_cert = Some(DataDir::new(data_dir).ca_cert());
    options.server_name = format!("{}.{}", Role::Broker.name(), topology.discovery.zone);
    causeway_queue::connect(&target, &options)
        .await
        .with_context(|| format!("connecting to the broker at {target}"))
}

/// The topology's spec for `name` (its policy), or the default policy for other queues.
pub fn spec_for(topology: &Topology, name: &str) -> QueueSpec {
    let known = &topology.messaging.notification_queue;
    if known.name == name {
        known.clone()
    } else {
        QueueSpec {
            name: name.to_string(),
            policy: Default::default(),
        }
    }
}

pub async fn list(backend: &dyn QueueBackend, topology: &Topology) -> anyhow::Result<String> {
    let queues = backend
        .list(std::slice::from_ref(&topology.messaging.notification_queue))
        .await?;
    Ok(render_list(backend, &queues))
}

fn render_list(backend: &dyn QueueBackend, queues: &[QueueInfo]) -> String {
    let count = |value: Option<u64>| value.map_or_else(|| "-".to_string(), |n| n.to_string());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<40} {:>8} {:>8} {:>8} {:>9}",
        "QUEUE", "READY", "UNACKED", "DELAYED", "CONSUMERS"
    );
    for queue in queues {
        let _ = writeln!(
            out,
            "{:<40} {:>8} {:>8} {:>8} {:>9}",
            queue.name,
            count(queue.ready),
            count(queue.unacked),
            count(queue.delayed),
            count(queue.consumers)
        );
    }
    if queues
        .iter()
        .any(|queue| queue.ready.is_none() || queue.unacked.is_none())
    {
        let _ = writeln!(out, "(-: the {} backend cannot count this)", backend.kind());
    }
    out
}

pub async fn peek(
    backend: &dyn QueueBackend,
    queue: &str,
    limit: usize,
) -> anyhow::Result<(Vec<PeekedMessage>, String)> {
    let messages = backend.peek(queue, limit).await?;
    let mut out = String::new();
    if queue.ends_with(DEAD_LETTER_SUFFIX) {
        let _ = writeln!(
            out,
            "{}",
            dead_letter_count(backend, queue, messages.len(), limit).await
        );
    } else if messages.is_empty() {
        let _ = writeln!(out, "{queue} is empty");
    }
    for (index, message) in messages.iter().enumerate() {
        let _ = writeln!(
            out,
            "#{} message {}  deliveries {}",
            index + 1,
            message.message_id,
            message
                .deliveries
                .map_or_else(|| "-".to_string(), |n| n.to_string())
        );
        if let Some(reason) = message.headers.get(headers::DEAD_LETTER_REASON) {
            let from = message
                .headers
                .get(headers::ORIGINAL_QUEUE)
                .map(String::as_str)
                .unwrap_or("?");
            let _ = writeln!(out, "   dead-lettered from {from}: {reason}");
        }
        for (name, value) in &message.headers {
            if name != headers::DEAD_LETTER_REASON && name != headers::ORIGINAL_QUEUE {
                let _ = writeln!(out, "   {name}: {value}");
            }
        }
        let _ = writeln!(out, "   {}", message.payload);
    }
    Ok((messages, out))
}

/// `<dlq>: N dead letters`. When the peek was cut off at `limit`, the total comes from the
/// broker's counts, where the backend has them; otherwise it says "at least".
async fn dead_letter_count(
    backend: &dyn QueueBackend,
    dlq: &str,
    shown: usize,
    limit: usize,
) -> String {
    let plural = |n: u64| if n == 1 { "" } else { "s" };
    let shown = shown as u64;
    if shown < limit as u64 {
        return format!("{dlq}: {shown} dead letter{}", plural(shown));
    }
    let original = QueueSpec {
        name: dlq
            .strip_suffix(DEAD_LETTER_SUFFIX)
            .unwrap_or(dlq)
            .to_string(),
        policy: Default::default(),
    };
    let counted = backend.list(&[original]).await.ok().and_then(|queues| {
        let info = queues.into_iter().find(|queue| queue.name == dlq)?;
        Some(info.ready? + info.unacked.unwrap_or(0) + info.delayed.unwrap_or(0))
    });
    match counted {
        Some(total) => format!(
            "{dlq}: {total} dead letter{} (the oldest {shown} shown)",
            plural(total)
        ),
        None => format!(
            "{dlq}: at least {shown} dead letters (the {} backend cannot count them; raise --limit to see more)",
            backend.kind()
        ),
    }
}

pub async fn redrive(
    backend: &dyn QueueBackend,
    spec: &QueueSpec,
    limit: Option<u64>,
) -> anyhow::Result<String> {
    let dlq = causeway_queue::dead_letter_queue_name(&spec.name);
    let moved = backend.redrive(spec, limit).await?;
    Ok(format!(
        "moved {moved} dead letter{} from {dlq} back to {}\n",
        if moved == 1 { "" } else { "s" },
        spec.name
    ))
}
