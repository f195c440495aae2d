//! `causeway soak`: every technique at once against the running system, at a steady rate, while
//! instances, the consumer, the publisher and the broker are killed in turn; then an end-to-end
//! account of what happened.
//!
//! Load is open-loop (a call starts on every tick whether or not the last one answered), as a
//! real client population is. REST reads user 123's orders; gRPC calls `GetPrice`; the queue
//! scenario sends emails for a user of the soak's own, so that its notifications are the soak's
//! alone, and one email in ten is made to fail processing, so that it must end dead-lettered.
//! Messages are counted from what the system stores, not from its logs: an email Email Service
//! acknowledged (201, or 202 when only its outbox holds the message) must show up exactly once
//! among the user's notifications, or, if it was made to fail, in the failed-delivery log as
//! dead-lettered. Anything else after the settle time is lost; a second notification of one email
//! is a duplicate.
//!
//! Chaos kills (SIGKILL) one component every few seconds, in rotation, and the supervisor brings
//! it back. The first instance of every role that has several is spared, so that some processes
//! live through the whole run under load and their memory can be judged: a process's resident
//! set after the warm-up is compared with its resident set at the end.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use causeway_core::principal::scopes;
use causeway_core::{DataDir, Role, Topology};
use causeway_proto::pricing::v1::GetPriceRequest;
use causeway_proto::pricing::v1::pricing_service_client::PricingServiceClient;
use causeway_services::email::EmailRecord;
use causeway_services::notification::{FailedDelivery, Notification};
use http::{HeaderMap, Method, StatusCode};
use serde::Serialize;
use tonic::metadata::MetadataValue;

use crate::demo::DEMO_USER;
use crate::state::{Phase, RunState};
use crate::status::{self, Memory};

/// Every tenth email is made to fail processing on every attempt.
const FAILING_EVERY: u64 = 10;
/// A call that has not answered by then counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the settle phase looks again for the messages it still waits for.
const SETTLE_POLL: Duration = Duration::from_secs(1);
/// A process whose resident set grew by more than this after the warm-up fails the soak.
pub const RSS_GROWTH_LIMIT: f64 = 0.10;
/// The memory target is stated over runs of at least this long; shorter runs report growth
/// without judging it (a young process's allocator is still settling).
pub const MEMORY_JUDGED_AFTER: Duration = Duration::from_secs(10 * 60);

#[derive(Clone, Debug)]
pub struct SoakOptions {
    pub duration: Duration,
    /// Calls per second of each technique (REST, gRPC, emails).
    pub rate: u32,
    /// A component is killed this often; `None`: no chaos.
    pub chaos_every: Option<Duration>,
    /// How long to wait, once the load stops, for messages still on their way.
    pub settle: Duration,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct CallCounts {
    pub made: u64,
    pub succeeded: u64,
    pub failed: u64,
    /// Failures by what went wrong (status code or error), most frequent first in the text.
    pub failures: BTreeMap<String, u64>,
}

impl CallCounts {
    fn record(&mut self, outcome: Result<(), String>) {
        self.made += 1;
        match outcome {
            Ok(()) => self.succeeded += 1,
            Err(reason) => {
                self.failed += 1;
                *self.failures.entry(reason).or_default() += 1;
            }
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct MessageCounts {
    /// Emails Email Service acknowledged, so their messages are its to deliver.
    pub published: u64,
    /// Of those meant to succeed: the ones whose notification was stored.
    pub consumed: u64,
    /// Of those made to fail: the ones recorded as dead-lettered.
    pub dead_lettered: u64,
    /// Acknowledged, but neither stored nor dead-lettered by the end of the settle time.
    pub lost: u64,
    /// Notifications beyond the first for one email.
    pub duplicated: u64,
    /// Notifications of emails made to fail, which must never be stored.
    pub wrongly_stored: u64,
    /// Notifications of emails whose request failed on the client's side (the system may have
    /// recorded the email before the connection broke): delivered, but never acknowledged.
    pub unacknowledged_delivered: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ChaosEvent {
    pub at_secs: f64,
    pub instance: String,
    pub pid: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct ProcessMemory {
    pub instance: String,
    pub start: Option<Memory>,
    pub after_warmup: Option<Memory>,
    pub end: Option<Memory>,
    /// Restarts during the run (chaos victims come back as new processes).
    pub restarts: u32,
    /// Resident-set growth from the warm-up to the end, for a process that lived through both.
    pub growth: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SoakReport {
    pub seconds: f64,
    pub rate: u32,
    pub broker: String,
    pub rest: CallCounts,
    pub grpc: CallCounts,
    pub emails: CallCounts,
    pub messages: MessageCounts,
    pub chaos: Vec<ChaosEvent>,
    pub warmup_secs: f64,
    pub memory: Vec<ProcessMemory>,
    pub memory_judged: bool,
    /// What missed a target; empty: the soak passed.
    pub problems: Vec<String>,
}

/// An email the soak sent, as Email Service acknowledged it.
struct SentEmail {
    email_id: i64,
    message_id: String,
    failing: bool,
}

#[derive(Default)]
struct Tally {
    rest: CallCounts,
    grpc: CallCounts,
    emails: CallCounts,
    sent: Vec<SentEmail>,
}

/// What every call needs: the edge, its CA and the tokens.
struct Client {
    edge: std::net::SocketAddr,
    ca: std::path::PathBuf,
    user_token: String,
    soak_user: i64,
    soak_token: String,
    operator_token: String,
    grpc: PricingServiceClient<tonic::transport::Channel>,
}

impl Client {
    async fn call(
        &self,
        token: &str,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<crate::edge::EdgeResponse, String> {
        let call = crate::edge::api_request(
            self.edge,
            &self.ca,
            token,
            method,
            path,
            body.as_ref(),
            HeaderMap::new(),
        );
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Err(_) => Err("no answer in time".into()),
            Ok(Err(err)) => Err(err.root_cause().to_string()),
            Ok(Ok(response)) if response.status.is_success() => Ok(response),
            Ok(Ok(response)) => Err(format!("HTTP {}", response.status.as_u16())),
        }
    }

    async fn rest(&self) -> Result<(), String> {
        let path = format!("/api/users/{DEMO_USER}/orders");
        self.call(&self.user_token, Method::GET, &path, None)
            .await
            .map(drop)
    }

    async fn grpc(&self) -> Result<(), String> {
        let mut request = tonic::Request::new(GetPriceRequest {
            sku: "SKU-0001".into(),
        });
        request.set_timeout(CALL_TIMEOUT);
        let bearer = MetadataValue::try_from(format!("Bearer {}", self.user_token))
            .map_err(|err| format!("bad token: {err}"))?;
        request.metadata_mut().insert("authorization", bearer);
        let mut client = self.grpc.clone();
        match client.get_price(request).await {
            Ok(_) => Ok(()),
            Err(status) => Err(format!("gRPC {:?}", status.code())),
        }
    }

    async fn email(&self, sequence: u64) -> Result<SentEmail, String> {
        let failing = sequence % FAILING_EVERY == FAILING_EVERY - 1;
        let body = serde_json::json!({
            "userId": self.soak_user,
            "subject": format!("soak email {sequence}"),
            "failNotification": failing,
        });
        let response = self
            .call(&self.soak_token, Method::POST, "/api/emails", Some(body))
            .await?;
        if response.status != StatusCode::CREATED && response.status != StatusCode::ACCEPTED {
            return Err(format!("HTTP {}", response.status.as_u16()));
        }
        let record: EmailRecord = serde_json::from_slice(&response.body)
            .map_err(|err| format!("not an email record: {err}"))?;
        Ok(SentEmail {
            email_id: record.email_id,
            message_id: record.message_id,
            failing,
        })
    }

    async fn notifications(&self) -> anyhow::Result<Vec<Notification>> {
        let path = format!("/api/notifications?userId={}", self.soak_user);
        let response = self
            .call(&self.soak_token, Method::GET, &path, None)
            .await
            .map_err(|err| anyhow::anyhow!("reading the notifications failed: {err}"))?;
        serde_json::from_slice(&response.body).context("the notifications are not JSON")
    }

    async fn dead_lettered(&self, message_id: &str) -> anyhow::Result<bool> {
        let path = format!("/api/notifications/failures?messageId={message_id}");
        let response = self
            .call(&self.operator_token, Method::GET, &path, None)
            .await
            .map_err(|err| anyhow::anyhow!("reading the failed deliveries failed: {err}"))?;
        let failures: Vec<FailedDelivery> =
            serde_json::from_slice(&response.body).context("the failed deliveries are not JSON")?;
        Ok(failures
            .iter()
            .any(|failure| failure.outcome == "dead-lettered"))
    }
}

/// The components chaos kills, in the order it kills them: the proxies and services it may take
/// down (all but the first instance of a role that has several) and the embedded broker.
pub fn chaos_victims(topology: &Topology) -> Vec<String> {
    let roles = [
        Role::OrderService,
        Role::Broker,
        Role::ReverseProxy,
        Role::NotificationService,
        Role::PricingService,
        Role::EmailService,
    ];
    roles
        .iter()
        .flat_map(|&role| {
            let count = topology.instances(role);
            let spared = usize::from(count > 1);
            (spared..count).map(move |index| role.instance_name(index))
        })
        .collect()
}

/// Runs the soak against the system `causeway up` runs with this topology.
pub async fn run(topology: &Topology, options: &SoakOptions) -> anyhow::Result<SoakReport> {
    let data_dir = topology.data_dir.clone();
    let state = RunState::load(&data_dir)?;
    let data = DataDir::new(&data_dir);
    let edge = state
        .edge
        .context("the run state names no edge address; is `causeway up` still starting?")?;
    let key = causeway_proxy::auth::load_or_create_key(&data.jwt_key())?;
    let jwt = &topology.reverse_proxy.jwt;
    // Long enough for the run and its settle time.
    let ttl = (options.duration + options.settle).as_secs() as i64 + 600;
    // A user of this run's own, so that its notifications are the soak's alone.
    let soak_user = 900_000_000 + (causeway_queue::now_millis() / 1000 % 100_000_000) as i64;
    let ca_pem = std::fs::read_to_string(data.ca_cert()).context("cannot read the CA")?;
    let channel = crate::demo_grpc::connect(edge, "localhost", &ca_pem).await?;
    let client = Arc::new(Client {
        edge,
        ca: data.ca_cert(),
        user_token: causeway_proxy::auth::issue_scoped(&key, jwt, DEMO_USER, &[], ttl)?,
        soak_user,
        soak_token: causeway_proxy::auth::issue_scoped(
            &key,
            jwt,
            &soak_user.to_string(),
            &[],
            ttl,
        )?,
        operator_token: causeway_proxy::auth::issue_scoped(
            &key,
            jwt,
            "soak-operator",
            &[scopes::ADMIN],
            ttl,
        )?,
        grpc: PricingServiceClient::new(channel),
    });
    let broker = state
        .broker
        .as_deref()
        .and_then(|url| causeway_queue::BrokerTarget::parse(url).ok())
        .map(|target| target.display())
        .unwrap_or_else(|| "embedded".into());

    let started = Instant::now();
    let warmup = (options.duration / 10).clamp(Duration::from_secs(5), Duration::from_secs(60));
    let start_memory = memory_snapshot(&data_dir).await?;
    let tally = Arc::new(Mutex::new(Tally::default()));
    let chaos_log = Arc::new(Mutex::new(Vec::new()));

    let load = steady_load(
        client.clone(),
        tally.clone(),
        options.rate,
        options.duration,
    );
    let chaos = async {
        if let Some(every) = options.chaos_every {
            run_chaos(
                &data_dir,
                &chaos_victims(topology),
                every,
                started,
                options.duration,
                &chaos_log,
            )
            .await;
        }
    };
    let warm_memory = async {
        tokio::time::sleep(warmup).await;
        memory_snapshot(&data_dir).await
    };
    let ((), (), warm_memory) = tokio::join!(load, chaos, warm_memory);
    let warm_memory = warm_memory?;
    let end_memory = memory_snapshot(&data_dir).await?;
    let seconds = started.elapsed().as_secs_f64();

    let (rest, grpc, emails, sent) = {
        let mut tally = tally
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        (
            tally.rest.clone(),
            tally.grpc.clone(),
            tally.emails.clone(),
            std::mem::take(&mut tally.sent),
        )
    };
    let messages = settle(&client, &sent, options.settle).await?;
    let memory = compare_memory(&start_memory, &warm_memory, &end_memory);
    let memory_judged = options.duration >= MEMORY_JUDGED_AFTER;
    let mut problems = Vec::new();
    if messages.lost > 0 {
        problems.push(format!("{} messages lost", messages.lost));
    }
    if messages.duplicated > 0 {
        problems.push(format!("{} messages duplicated", messages.duplicated));
    }
    if messages.wrongly_stored > 0 {
        problems.push(format!(
            "{} failing messages stored as notifications",
            messages.wrongly_stored
        ));
    }
    if memory_judged {
        for process in &memory {
            if let Some(growth) = process.growth.filter(|growth| *growth > RSS_GROWTH_LIMIT) {
                problems.push(format!(
                    "{} grew by {:.1} % after the warm-up",
                    process.instance,
                    growth * 100.0
                ));
            }
        }
    }
    let chaos = chaos_log
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone();
    Ok(SoakReport {
        seconds,
        rate: options.rate,
        broker,
        rest,
        grpc,
        emails,
        messages,
        chaos,
        warmup_secs: warmup.as_secs_f64(),
        memory,
        memory_judged,
        problems,
    })
}

/// Starts `rate` calls a second of each technique until `duration` has passed, then waits for
/// the calls still in flight.
async fn steady_load(client: Arc<Client>, tally: Arc<Mutex<Tally>>, rate: u32, duration: Duration) {
    let deadline = tokio::time::Instant::now() + duration;
    let mut ticks = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut calls = tokio::task::JoinSet::new();
    let mut sequence = 0u64;
    while ticks.tick().await < deadline {
        let (c, t) = (client.clone(), tally.clone());
        calls.spawn(async move {
            let outcome = c.rest().await;
            lock(&t).rest.record(outcome);
        });
        let (c, t) = (client.clone(), tally.clone());
        calls.spawn(async move {
            let outcome = c.grpc().await;
            lock(&t).grpc.record(outcome);
        });
        let (c, t) = (client.clone(), tally.clone());
        calls.spawn(async move {
            let sent = c.email(sequence).await;
            let mut tally = lock(&t);
            match sent {
                Ok(sent) => {
                    tally.emails.record(Ok(()));
                    tally.sent.push(sent);
                }
                Err(reason) => tally.emails.record(Err(reason)),
            }
        });
        sequence += 1;
        // Finished calls are reaped as the run goes, so the set stays as small as what is in flight.
        while calls.try_join_next().is_some() {}
    }
    while calls.join_next().await.is_some() {}
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Kills the victims in rotation, one every `every`, skipping one that is not running (still
/// coming back from its last death).
async fn run_chaos(
    data_dir: &Path,
    victims: &[String],
    every: Duration,
    started: Instant,
    duration: Duration,
    log: &Mutex<Vec<ChaosEvent>>,
) {
    if victims.is_empty() {
        return;
    }
    let mut next = 0usize;
    loop {
        tokio::time::sleep(every).await;
        // The last kill leaves time to come back before the load ends.
        if started.elapsed() + every > duration {
            return;
        }
        let Ok(state) = RunState::load(data_dir) else {
            continue;
        };
        for _ in 0..victims.len() {
            let instance = &victims[next % victims.len()];
            next += 1;
            let running = state
                .components
                .iter()
                .find(|component| &component.instance == instance)
                .filter(|component| component.phase == Phase::Running)
                .and_then(|component| component.pid);
            let Some(pid) = running else { continue };
            let Ok(raw) = i32::try_from(pid) else {
                continue;
            };
            let killed = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(raw),
                nix::sys::signal::Signal::SIGKILL,
            );
            if killed.is_ok() {
                tracing::info!(event = "soak.killed", instance = %instance, pid, "chaos");
                lock(log).push(ChaosEvent {
                    at_secs: started.elapsed().as_secs_f64(),
                    instance: instance.clone(),
                    pid,
                });
            }
            break;
        }
    }
}

/// Waits until every acknowledged email is accounted for, or `patience` has passed, and counts.
async fn settle(
    client: &Client,
    sent: &[SentEmail],
    patience: Duration,
) -> anyhow::Result<MessageCounts> {
    let deadline = Instant::now() + patience;
    let mut dead_lettered: std::collections::HashSet<&str> = Default::default();
    loop {
        let notifications = client.notifications().await;
        let notifications = match notifications {
            Ok(list) => list,
            // Still coming back from the last kill.
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(SETTLE_POLL).await;
                continue;
            }
            Err(err) => return Err(err),
        };
        let mut per_email: HashMap<i64, u64> = HashMap::new();
        for notification in &notifications {
            *per_email.entry(notification.email_id).or_default() += 1;
        }
        for email in sent.iter().filter(|email| email.failing) {
            if !dead_lettered.contains(email.message_id.as_str())
                && client
                    .dead_lettered(&email.message_id)
                    .await
                    .unwrap_or(false)
            {
                dead_lettered.insert(&email.message_id);
            }
        }
        let stored = |email: &SentEmail| per_email.get(&email.email_id).copied().unwrap_or(0);
        let missing = sent
            .iter()
            .filter(|email| {
                if email.failing {
                    !dead_lettered.contains(email.message_id.as_str())
                } else {
                    stored(email) == 0
                }
            })
            .count() as u64;
        if missing == 0 || Instant::now() >= deadline {
            let acknowledged: std::collections::HashSet<i64> =
                sent.iter().map(|email| email.email_id).collect();
            let succeeding = sent.iter().filter(|email| !email.failing);
            let failing = sent.iter().filter(|email| email.failing);
            return Ok(MessageCounts {
                published: sent.len() as u64,
                consumed: succeeding.clone().filter(|email| stored(email) > 0).count() as u64,
                dead_lettered: dead_lettered.len() as u64,
                lost: missing,
                duplicated: succeeding
                    .map(|email| stored(email).saturating_sub(1))
                    .sum(),
                wrongly_stored: failing.map(stored).sum(),
                unacknowledged_delivered: per_email
                    .keys()
                    .filter(|email_id| !acknowledged.contains(email_id))
                    .count() as u64,
            });
        }
        tokio::time::sleep(SETTLE_POLL).await;
    }
}

/// Every component's pid, restarts and memory, by instance.
type Snapshot = BTreeMap<String, (Option<u32>, u32, Option<Memory>)>;

async fn memory_snapshot(data_dir: &Path) -> anyhow::Result<Snapshot> {
    let status = status::collect(data_dir).await?;
    Ok(status
        .components
        .into_iter()
        .map(|component| {
            (
                component.instance,
                (component.pid, component.restarts, component.memory),
            )
        })
        .collect())
}

fn compare_memory(start: &Snapshot, warm: &Snapshot, end: &Snapshot) -> Vec<ProcessMemory> {
    end.iter()
        .map(|(instance, &(end_pid, end_restarts, end_memory))| {
            let (start_pid, start_restarts, start_memory) =
                start.get(instance).copied().unwrap_or_default();
            let (warm_pid, _, warm_memory) = warm.get(instance).copied().unwrap_or_default();
            let lived_through = end_pid.is_some() && warm_pid == end_pid;
            let growth = match (lived_through, warm_memory, end_memory) {
                (true, Some(warm), Some(end)) if warm.rss_bytes > 0 => {
                    Some(end.rss_bytes as f64 / warm.rss_bytes as f64 - 1.0)
                }
                _ => None,
            };
            ProcessMemory {
                instance: instance.clone(),
                start: start_memory.filter(|_| start_pid.is_some()),
                after_warmup: warm_memory,
                end: end_memory,
                restarts: end_restarts.saturating_sub(start_restarts),
                growth,
            }
        })
        .collect()
}

fn mib(memory: Option<Memory>) -> String {
    memory
        .map(|memory| format!("{:.1}", memory.rss_bytes as f64 / (1024.0 * 1024.0)))
        .unwrap_or_else(|| "-".into())
}

/// The report as text.
pub fn render(report: &SoakReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "soak: {:.0} s at {} calls/s per technique, broker {}, {} components killed\n",
        report.seconds,
        report.rate,
        report.broker,
        report.chaos.len()
    );
    let _ = writeln!(
        out,
        "{:<8} {:>8} {:>10} {:>8}  failures",
        "calls", "made", "succeeded", "failed"
    );
    for (name, counts) in [
        ("REST", &report.rest),
        ("gRPC", &report.grpc),
        ("emails", &report.emails),
    ] {
        let mut reasons: Vec<_> = counts.failures.iter().collect();
        reasons.sort_by(|a, b| b.1.cmp(a.1));
        let reasons: Vec<String> = reasons
            .iter()
            .take(4)
            .map(|(reason, count)| format!("{count}x {reason}"))
            .collect();
        let _ = writeln!(
            out,
            "{name:<8} {:>8} {:>10} {:>8}  {}",
            counts.made,
            counts.succeeded,
            counts.failed,
            reasons.join("; ")
        );
    }
    let m = &report.messages;
    let _ = writeln!(
        out,
        "\nmessages published {}, consumed {}, dead-lettered {}, lost {}, duplicated {}, \
         failing ones stored {}, delivered without acknowledgement {}",
        m.published,
        m.consumed,
        m.dead_lettered,
        m.lost,
        m.duplicated,
        m.wrongly_stored,
        m.unacknowledged_delivered
    );
    let _ = writeln!(
        out,
        "\nRSS (MiB)  {:<24} {:>8} {:>8} {:>8} {:>9} {:>8}",
        "instance",
        "start",
        format!("{:.0}s", report.warmup_secs),
        "end",
        "restarts",
        "growth"
    );
    let total = |pick: fn(&ProcessMemory) -> Option<Memory>| {
        let sum: u64 = report
            .memory
            .iter()
            .filter_map(|process| pick(process).map(|memory| memory.rss_bytes))
            .sum();
        Some(Memory {
            rss_bytes: sum,
            ..Memory::default()
        })
    };
    for process in &report.memory {
        let growth = process
            .growth
            .map(|growth| format!("{:+.1} %", growth * 100.0))
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "           {:<24} {:>8} {:>8} {:>8} {:>9} {:>8}",
            process.instance,
            mib(process.start),
            mib(process.after_warmup),
            mib(process.end),
            process.restarts,
            growth
        );
    }
    let _ = writeln!(
        out,
        "           {:<24} {:>8} {:>8} {:>8}",
        "total",
        mib(total(|p| p.start)),
        mib(total(|p| p.after_warmup)),
        mib(total(|p| p.end))
    );
    if !report.memory_judged {
        let _ = writeln!(
            out,
            "           (growth is judged on runs of {} minutes or more)",
            MEMORY_JUDGED_AFTER.as_secs() / 60
        );
    }
    if report.problems.is_empty() {
        let _ = writeln!(out, "\nPASS");
    } else {
        let _ = writeln!(out, "\nFAIL: {}", report.problems.join("; "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chaos_spares_the_first_of_several_instances_and_takes_singletons() {
        let topology = Topology::default();
        let victims = chaos_victims(&topology);
        assert!(!victims.contains(&Role::OrderService.instance_name(0)));
        assert!(victims.contains(&Role::OrderService.instance_name(1)));
        assert!(victims.contains(&Role::Broker.instance_name(0)));
        assert!(victims.contains(&Role::NotificationService.instance_name(0)));
        assert!(!victims.iter().any(|v| v.starts_with("load-balancer")));
        assert!(!victims.iter().any(|v| v.starts_with("discovery")));
    }

    #[test]
    fn memory_growth_is_judged_only_for_a_process_that_lived_through() {
        let memory = |mib: u64| {
            Some(Memory {
                rss_bytes: mib << 20,
                ..Memory::default()
            })
        };
        let snapshot = |entries: &[(&str, u32, u32, u64)]| -> Snapshot {
            entries
                .iter()
                .map(|&(name, pid, restarts, mib)| {
                    (name.into(), (Some(pid), restarts, memory(mib)))
                })
                .collect()
        };
        let start = snapshot(&[("a", 1, 0, 10), ("b", 2, 0, 10)]);
        let warm = snapshot(&[("a", 1, 0, 20), ("b", 2, 0, 20)]);
        let end = snapshot(&[("a", 1, 0, 25), ("b", 3, 1, 12)]);
        let compared = compare_memory(&start, &warm, &end);
        let a = compared.iter().find(|p| p.instance == "a").expect("a");
        let b = compared.iter().find(|p| p.instance == "b").expect("b");
        assert_eq!(a.growth, Some(0.25));
        assert_eq!(a.restarts, 0);
        assert_eq!(b.growth, None, "a restarted process is a new process");
        assert_eq!(b.restarts, 1);
    }
}
