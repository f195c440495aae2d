//! The broker's in-memory index and its operations. Every message lives in memory (rebuilt from
//! disk at open) in one of three places per queue: ready (FIFO by sequence), delayed (by due
//! time) or unacked (by delivery tag). Changes go to disk through the writer ([`crate::store`]);
//! a change becomes visible to consumers only once committed.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use causeway_core::queue_policy::{
    PayloadError, QueuePolicy, dead_letter_queue_name, validate_queue_name,
};
use causeway_core::topology::BrokerConfig;
use causeway_proto::broker::v1::StoredMessage;
use prometheus_client::registry::Registry;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::BrokerError;
use crate::metrics::{BrokerMetrics, label};
use crate::store::{self, Applier, Command, Effect, Job, Mutation};

/// Header values a dead letter carries (the names are shared with `causeway-queue`).
pub mod headers {
    pub const DEAD_LETTER_REASON: &str = "x-causeway-dead-letter-reason";
    pub const ORIGINAL_QUEUE: &str = "x-causeway-original-queue";
    /// On a dead letter: the attempts it failed.
    pub const ATTEMPT: &str = "x-causeway-attempt";
}

/// The database file inside `<data_dir>/broker/`.
pub const DB_FILE: &str = "queues.redb";

fn now_millis() -> u64 {
    since_epoch().as_millis() as u64
}

fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// When a retry delayed by `delay` from now becomes due, in whole milliseconds rounded up: a
/// message promoted once `now_millis() >= due` then never comes back before its delay.
fn due_after(delay: Duration) -> u64 {
    (since_epoch() + delay).as_micros().div_ceil(1000) as u64
}

/// One queue as [`Broker::list`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueStats {
    pub name: String,
    pub ready: u64,
    pub unacked: u64,
    pub delayed: u64,
    pub consumers: u64,
}

/// How a consumer settles one delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SettleAction {
    Ack,
    Redeliver { delay: Duration, next_attempt: u32 },
    DeadLetter { reason: String, attempts: u32 },
}

/// A delivery handed to a consumer.
#[derive(Clone, Debug)]
pub struct Delivered {
    pub tag: u64,
    /// `deliveries` already counts this delivery, so it is the attempt number.
    pub message: StoredMessage,
    pub redelivered: bool,
}

/// What a consumer receives.
#[derive(Debug)]
pub enum ConsumerEvent {
    Delivery(Delivered),
    /// The subscription is over (the queue was deleted, the broker closed).
    Closed(BrokerError),
}

/// An operation written to the writer, answered once committed.
#[must_use = "the operation is durable only once this resolves"]
pub struct Pending<T> {
    done: oneshot::Receiver<Result<(), BrokerError>>,
    value: T,
}

impl<T> Pending<T> {
    pub async fn wait(self) -> Result<T, BrokerError> {
        match self.done.await {
            Ok(Ok(())) => Ok(self.value),
            Ok(Err(err)) => Err(err),
            Err(_) => Err(BrokerError::Closed),
        }
    }
}

struct ConsumerSlot {
    id: u64,
    prefetch: usize,
    in_flight: usize,
    sender: mpsc::UnboundedSender<ConsumerEvent>,
}

struct Unacked {
    consumer: u64,
    message: StoredMessage,
}

struct QueueState {
    policy: QueuePolicy,
    /// By sequence: publishing order, and messages returned by a consumer go back to the front.
    ready: BTreeMap<u64, StoredMessage>,
    /// By (due time, sequence).
    delayed: BTreeMap<(u64, u64), StoredMessage>,
    unacked: HashMap<u64, Unacked>,
    consumers: Vec<ConsumerSlot>,
    /// Round robin: where the next search for a consumer with room starts.
    next_consumer: usize,
}

impl QueueState {
    fn new(policy: QueuePolicy) -> Self {
        Self {
            policy,
            ready: BTreeMap::new(),
            delayed: BTreeMap::new(),
            unacked: HashMap::new(),
            consumers: Vec::new(),
            next_consumer: 0,
        }
    }

    fn consumer_with_room(&mut self) -> Option<usize> {
        let count = self.consumers.len();
        (0..count)
            .map(|offset| (self.next_consumer + offset) % count)
            .find(|&index| {
                let slot = &self.consumers[index];
                slot.in_flight < slot.prefetch && !slot.sender.is_closed()
            })
            .inspect(|&index| self.next_consumer = index + 1)
    }

    fn enqueue(&mut self, message: StoredMessage, now: u64) -> bool {
        if message.due_at_ms > now {
            self.delayed
                .insert((message.due_at_ms, message.sequence), message);
            true
        } else {
            self.ready.insert(message.sequence, message);
            false
        }
    }
}

#[derive(Default)]
struct State {
    queues: HashMap<String, QueueState>,
    next_sequence: u64,
    next_tag: u64,
    next_consumer: u64,
}

impl State {
    fn sequence(&mut self) -> u64 {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        sequence
    }

    fn queue(&mut self, name: &str) -> Result<&mut QueueState, BrokerError> {
        self.queues
            .get_mut(name)
            .ok_or_else(|| BrokerError::NoSuchQueue(name.to_string()))
    }
}

/// What both the async side and the writer thread touch.
struct Core {
    state: Mutex<State>,
    metrics: BrokerMetrics,
    /// Wakes the timer when a message starts waiting out a delay.
    timer: Notify,
    commits: AtomicU64,
}

impl Core {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the index as it was at the panic; keep serving.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Hands ready messages to consumers with room; returns the attempt counts to persist.
    fn dispatch(&self, state: &mut State, name: &str) -> Vec<Mutation> {
        let mut mutations = Vec::new();
        let State {
            queues, next_tag, ..
        } = state;
        let Some(queue) = queues.get_mut(name) else {
            return mutations;
        };
        while !queue.ready.is_empty() {
            let Some(index) = queue.consumer_with_room() else {
                break;
            };
            let Some((_, mut message)) = queue.ready.pop_first() else {
                break;
            };
            message.deliveries = message.deliveries.saturating_add(1);
            *next_tag += 1;
            let tag = *next_tag;
            let slot = &mut queue.consumers[index];
            let delivered = Delivered {
                tag,
                message: message.clone(),
                redelivered: message.deliveries > 1,
            };
            if slot
                .sender
                .send(ConsumerEvent::Delivery(delivered))
                .is_err()
            {
                // The consumer is going away; its slot is removed when its handle drops.
                message.deliveries -= 1;
                queue.ready.insert(message.sequence, message);
                continue;
            }
            slot.in_flight += 1;
            self.metrics.delivered.get_or_create(&label(name)).inc();
            queue.unacked.insert(
                tag,
                Unacked {
                    consumer: slot.id,
                    message: message.clone(),
                },
            );
            mutations.push(Mutation::Put {
                queue: name.to_string(),
                message,
            });
        }
        self.gauges(name, queue);
        mutations
    }

    fn gauges(&self, name: &str, queue: &QueueState) {
        let label = label(name);
        let metrics = &self.metrics;
        metrics
            .ready
            .get_or_create(&label)
            .set(queue.ready.len() as i64);
        metrics
            .unacked
            .get_or_create(&label)
            .set(queue.unacked.len() as i64);
        metrics
            .delayed
            .get_or_create(&label)
            .set(queue.delayed.len() as i64);
    }

    /// Moves messages whose delay is over to ready; returns when the next one is due.
    fn promote_due(&self, now: u64) -> (Vec<Mutation>, Option<u64>) {
        let mut state = self.lock();
        let mut due_queues = Vec::new();
        let mut next_due: Option<u64> = None;
        for (name, queue) in state.queues.iter_mut() {
            let mut moved = false;
            while let Some(entry) = queue.delayed.first_entry() {
                if entry.key().0 > now {
                    next_due = Some(next_due.map_or(entry.key().0, |due| due.min(entry.key().0)));
                    break;
                }
                let mut message = entry.remove();
                message.due_at_ms = 0;
                queue.ready.insert(message.sequence, message);
                moved = true;
            }
            if moved {
                due_queues.push(name.clone());
            }
        }
        let mut mutations = Vec::new();
        for name in due_queues {
            mutations.extend(self.dispatch(&mut state, &name));
        }
        (mutations, next_due)
    }
}

impl Applier for Core {
    fn apply(&self, effects: Vec<Effect>) -> Vec<Mutation> {
        if effects.is_empty() {
            return Vec::new();
        }
        let now = now_millis();
        let mut state = self.lock();
        let mut touched: Vec<String> = Vec::new();
        let mut delayed = false;
        for effect in effects {
            match effect {
                Effect::CreateQueue { name, policy } => {
                    state
                        .queues
                        .entry(name.clone())
                        .and_modify(|queue| queue.policy = policy.clone())
                        .or_insert_with(|| QueueState::new(policy));
                    touched.push(name);
                }
                Effect::Enqueue { queue, message } => {
                    // A queue deleted meanwhile takes its messages with it.
                    if let Some(state) = state.queues.get_mut(&queue) {
                        delayed |= state.enqueue(message, now);
                        touched.push(queue);
                    }
                }
            }
        }
        if delayed {
            self.timer.notify_one();
        }
        touched.dedup();
        let mut mutations = Vec::new();
        for name in touched {
            mutations.extend(self.dispatch(&mut state, &name));
        }
        mutations
    }

    fn observe_commit(&self, batch: usize, elapsed: Duration) {
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.metrics.commit_batch.observe(batch as f64);
        self.metrics.commit_seconds.observe(elapsed.as_secs_f64());
    }
}

struct Inner {
    core: Arc<Core>,
    writer: std::sync::mpsc::Sender<Command>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the database before returning lets the same process reopen it at once.
        let (reply, _) = oneshot::channel();
        let _ = self.writer.send(Command::Close(reply));
        let thread = self
            .thread
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

/// The embedded broker: cheap to clone; the database closes when the last clone is dropped or
/// at [`Broker::close`].
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").finish_non_exhaustive()
    }
}

impl Broker {
    /// Opens (or creates) the broker's store under `<data_dir>/broker/` and rebuilds the index
    /// from it: messages that were unacked when the broker stopped are ready again. Must be called
    /// within a Tokio runtime (it starts the timer that ends retry delays).
    pub fn open(data_dir: &Path, config: &BrokerConfig) -> Result<Broker, BrokerError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| BrokerError::NoRuntime)?;
        let dir = data_dir.join("broker");
        std::fs::create_dir_all(&dir).map_err(|source| BrokerError::Io {
            path: dir.clone(),
            source,
        })?;
        let (db, loaded) = store::open(&dir.join(DB_FILE))?;
        let mut state = State {
            next_sequence: loaded.next_sequence,
            ..State::default()
        };
        for (name, policy) in loaded.queues {
            state.queues.insert(name, QueueState::new(policy));
        }
        let now = now_millis();
        let mut orphans = 0usize;
        for (queue, message) in loaded.messages {
            match state.queues.get_mut(&queue) {
                Some(queue) => {
                    queue.enqueue(message, now);
                }
                None => orphans += 1,
            }
        }
        let core = Arc::new(Core {
            state: Mutex::new(state),
            metrics: BrokerMetrics::default(),
            timer: Notify::new(),
            commits: AtomicU64::new(0),
        });
        {
            let state = core.lock();
            for (name, queue) in &state.queues {
                core.gauges(name, queue);
            }
            tracing::info!(
                event = "broker.opened",
                path = %dir.display(),
                queues = state.queues.len(),
                messages = state.queues.values().map(|q| q.ready.len() + q.delayed.len()).sum::<usize>(),
                orphans,
                fsync = config.fsync,
                max_batch = config.max_batch,
                "broker store opened"
            );
        }
        let writer = store::spawn_writer(db, config.fsync, config.max_batch, core.clone())?;
        let broker = Broker {
            inner: Arc::new(Inner {
                core,
                writer: writer.sender,
                thread: Mutex::new(Some(writer.thread)),
            }),
        };
        runtime.spawn(timer(Arc::downgrade(&broker.inner)));
        Ok(broker)
    }

    /// Registers the broker's metric families (counters per queue, gauges, commit histograms).
    pub fn register_metrics(&self, registry: &mut Registry) {
        self.inner.core.metrics.register(registry);
    }

    /// Storage commits so far (each holds one or more operations).
    pub fn commits(&self) -> u64 {
        self.inner.core.commits.load(Ordering::Relaxed)
    }

    /// Flushes and closes the database; later operations fail with [`BrokerError::Closed`].
    pub async fn close(&self) {
        let (reply, done) = oneshot::channel();
        if self.inner.writer.send(Command::Close(reply)).is_ok() {
            let _ = done.await;
        }
    }

    fn submit(&self, job: Job) -> Result<(), BrokerError> {
        self.inner
            .writer
            .send(Command::Job(job))
            .map_err(|_| BrokerError::Closed)
    }

    fn submit_waiting<T>(&self, mut job: Job, value: T) -> Result<Pending<T>, BrokerError> {
        let (done, receiver) = oneshot::channel();
        job.done = Some(done);
        self.submit(job)?;
        Ok(Pending {
            done: receiver,
            value,
        })
    }

    fn persist(&self, mutations: Vec<Mutation>) {
        if !mutations.is_empty() {
            // Only attempt counts: if the broker is closing they are lost, which is harmless.
            let _ = self.submit(Job {
                mutations,
                ..Job::default()
            });
        }
    }

    /// Creates `name` and its dead-letter queue, or updates their policy.
    pub async fn declare(&self, name: &str, policy: QueuePolicy) -> Result<(), BrokerError> {
        validate_queue_name(name)?;
        let dead_letters = dead_letter_queue_name(name);
        validate_queue_name(&dead_letters)?;
        policy.validate().map_err(BrokerError::InvalidPolicy)?;
        let mut job = Job::default();
        job.create_queue(name, &policy);
        job.create_queue(&dead_letters, &policy);
        self.submit_waiting(job, ())?.wait().await
    }

    /// Checks and stores a message; resolves to its sequence once it is durable.
    pub fn begin_publish(
        &self,
        queue: &str,
        message_id: String,
        headers: HashMap<String, String>,
        payload: Bytes,
    ) -> Result<Pending<u64>, BrokerError> {
        validate_queue_name(queue)?;
        // A publisher that sent no id (a foreign gRPC client; proto3 makes it "") gets the id
        // `causeway-queue` would derive on delivery, so that consumers deduplicate on the same id
        // on every backend and the broker never holds an empty one. Hashed before the lock.
        let derived = message_id.is_empty();
        let message_id = if derived {
            causeway_queue::content_message_id(&payload)
        } else {
            message_id
        };
        let mut state = self.inner.core.lock();
        let limit = state.queue(queue)?.policy.max_payload_bytes;
        // The broker enforces the size (it stores the bytes); whether they are JSON is the
        // clients' rule, checked at publish and again at delivery by `causeway-queue`.
        if payload.len() > limit {
            return Err(PayloadError::TooLarge {
                size: payload.len(),
                limit,
            }
            .into());
        }
        if derived {
            tracing::info!(
                event = "broker.message_id_derived",
                queue,
                message_id = %message_id,
                payload_bytes = payload.len(),
                "a message was published without an id; using one derived from its payload"
            );
            self.inner
                .core
                .metrics
                .derived_ids
                .get_or_create(&label(queue))
                .inc();
        }
        let sequence = state.sequence();
        let message = StoredMessage {
            message_id,
            headers,
            payload,
            deliveries: 0,
            sequence,
            due_at_ms: 0,
        };
        let mut job = Job::default();
        job.put(queue, message);
        // Submitted under the lock so that the writer sees sequences in order.
        let pending = self.submit_waiting(job, sequence)?;
        self.inner
            .core
            .metrics
            .published
            .get_or_create(&label(queue))
            .inc();
        Ok(pending)
    }

    /// Publishes and waits until the message is durable.
    pub async fn publish(
        &self,
        queue: &str,
        message_id: impl Into<String>,
        headers: HashMap<String, String>,
        payload: impl Into<Bytes>,
    ) -> Result<u64, BrokerError> {
        self.begin_publish(queue, message_id.into(), headers, payload.into())?
            .wait()
            .await
    }

    /// Starts a consumer of `queue` with at most `prefetch` unsettled deliveries.
    pub fn subscribe(&self, queue: &str, prefetch: u32) -> Result<Consumer, BrokerError> {
        validate_queue_name(queue)?;
        let (sender, events) = mpsc::unbounded_channel();
        let core = &self.inner.core;
        let mut state = core.lock();
        state.next_consumer += 1;
        let id = state.next_consumer;
        let slot = ConsumerSlot {
            id,
            prefetch: prefetch.max(1) as usize,
            in_flight: 0,
            sender,
        };
        state.queue(queue)?.consumers.push(slot);
        let mutations = core.dispatch(&mut state, queue);
        drop(state);
        self.persist(mutations);
        tracing::info!(
            event = "broker.subscribed",
            queue,
            consumer = id,
            prefetch,
            "consumer subscribed"
        );
        Ok(Consumer {
            broker: self.clone(),
            queue: queue.to_string(),
            id,
            events,
        })
    }

    fn settle(
        &self,
        queue_name: &str,
        consumer: u64,
        tag: u64,
        action: SettleAction,
    ) -> Result<Pending<()>, BrokerError> {
        let core = &self.inner.core;
        let metrics = &core.metrics;
        let mut state = core.lock();
        let queue = state.queue(queue_name)?;
        let message = match queue.unacked.remove(&tag) {
            Some(unacked) if unacked.consumer == consumer => unacked.message,
            Some(unacked) => {
                queue.unacked.insert(tag, unacked);
                return Err(BrokerError::UnknownDelivery(tag));
            }
            None => return Err(BrokerError::UnknownDelivery(tag)),
        };
        if let Some(slot) = queue.consumers.iter_mut().find(|slot| slot.id == consumer) {
            slot.in_flight = slot.in_flight.saturating_sub(1);
        }
        let dead_letter_policy = queue.policy.clone();
        // If the commit fails the message is still on disk: make it deliverable again.
        let mut job = Job {
            mutations: vec![Mutation::Remove {
                queue: queue_name.to_string(),
                sequence: message.sequence,
            }],
            on_fail: vec![Effect::Enqueue {
                queue: queue_name.to_string(),
                message: message.clone(),
            }],
            ..Job::default()
        };
        let label = label(queue_name);
        match action {
            SettleAction::Ack => {
                metrics.acked.get_or_create(&label).inc();
            }
            SettleAction::Redeliver {
                delay,
                next_attempt,
            } => {
                metrics.redelivered.get_or_create(&label).inc();
                // A fresh sequence puts the retry behind what was published meanwhile.
                let retry = StoredMessage {
                    sequence: state.sequence(),
                    deliveries: next_attempt.saturating_sub(1),
                    due_at_ms: if delay.is_zero() { 0 } else { due_after(delay) },
                    ..message
                };
                job.put(queue_name, retry);
            }
            SettleAction::DeadLetter { reason, attempts } => {
                metrics.dead_lettered.get_or_create(&label).inc();
                let dead_letters = dead_letter_queue_name(queue_name);
                tracing::warn!(
                    event = "broker.dead_lettered",
                    queue = queue_name,
                    dead_letter_queue = %dead_letters,
                    message_id = %message.message_id,
                    attempts,
                    reason = %reason,
                    "message dead-lettered"
                );
                let mut dead = StoredMessage {
                    sequence: state.sequence(),
                    deliveries: attempts,
                    due_at_ms: 0,
                    ..message
                };
                dead.headers
                    .insert(headers::DEAD_LETTER_REASON.into(), reason);
                dead.headers
                    .insert(headers::ORIGINAL_QUEUE.into(), queue_name.to_string());
                dead.headers
                    .insert(headers::ATTEMPT.into(), attempts.to_string());
                // Dead-lettering from a dead-letter queue creates its dead-letter queue.
                if !state.queues.contains_key(&dead_letters)
                    && validate_queue_name(&dead_letters).is_ok()
                {
                    job.create_queue(&dead_letters, &dead_letter_policy);
                }
                job.put(&dead_letters, dead);
            }
        }
        let mutations = core.dispatch(&mut state, queue_name);
        let pending = self.submit_waiting(job, ())?;
        drop(state);
        self.persist(mutations);
        Ok(pending)
    }

    fn remove_consumer(&self, queue_name: &str, consumer: u64) {
        let core = &self.inner.core;
        let mut state = core.lock();
        let Ok(queue) = state.queue(queue_name) else {
            return;
        };
        queue.consumers.retain(|slot| slot.id != consumer);
        let returned: Vec<u64> = queue
            .unacked
            .iter()
            .filter(|(_, unacked)| unacked.consumer == consumer)
            .map(|(tag, _)| *tag)
            .collect();
        for tag in &returned {
            if let Some(unacked) = queue.unacked.remove(tag) {
                // By sequence: back to the front, in their original order.
                queue
                    .ready
                    .insert(unacked.message.sequence, unacked.message);
            }
        }
        let mutations = core.dispatch(&mut state, queue_name);
        drop(state);
        self.persist(mutations);
        tracing::info!(
            event = "broker.unsubscribed",
            queue = queue_name,
            consumer,
            returned = returned.len(),
            "consumer gone; its unacked deliveries are ready again"
        );
    }

    /// Every queue, by name.
    pub fn list(&self) -> Vec<QueueStats> {
        let state = self.inner.core.lock();
        let mut queues: Vec<QueueStats> = state
            .queues
            .iter()
            .map(|(name, queue)| QueueStats {
                name: name.clone(),
                ready: queue.ready.len() as u64,
                unacked: queue.unacked.len() as u64,
                delayed: queue.delayed.len() as u64,
                consumers: queue.consumers.len() as u64,
            })
            .collect();
        queues.sort_by(|a, b| a.name.cmp(&b.name));
        queues
    }

    /// Up to `limit` messages of `queue` (ready, delayed or unacked), oldest first.
    pub fn peek(&self, queue: &str, limit: usize) -> Result<Vec<StoredMessage>, BrokerError> {
        let mut state = self.inner.core.lock();
        let queue = state.queue(queue)?;
        let mut messages: Vec<&StoredMessage> = queue
            .ready
            .values()
            .chain(queue.delayed.values())
            .chain(queue.unacked.values().map(|unacked| &unacked.message))
            .collect();
        messages.sort_by_key(|message| message.sequence);
        Ok(messages.into_iter().take(limit).cloned().collect())
    }

    /// Moves up to `limit` (all if `None`) ready dead letters of `queue` back into it with a
    /// fresh attempt count, in one commit; returns how many moved.
    pub async fn redrive(&self, queue_name: &str, limit: Option<u64>) -> Result<u64, BrokerError> {
        validate_queue_name(queue_name)?;
        let dead_letters = dead_letter_queue_name(queue_name);
        let pending = self.begin_redrive(queue_name, &dead_letters, limit)?;
        let count = pending.wait().await?;
        tracing::info!(
            event = "broker.redriven",
            queue = queue_name,
            moved = count,
            "dead letters redriven"
        );
        Ok(count)
    }

    fn begin_redrive(
        &self,
        queue_name: &str,
        dead_letters: &str,
        limit: Option<u64>,
    ) -> Result<Pending<u64>, BrokerError> {
        let core = &self.inner.core;
        let mut state = core.lock();
        state.queue(queue_name)?;
        let take = limit.unwrap_or(u64::MAX);
        let mut moved = Vec::new();
        {
            let source = state.queue(dead_letters)?;
            while (moved.len() as u64) < take {
                let Some((_, message)) = source.ready.pop_first() else {
                    break;
                };
                moved.push(message);
            }
        }
        let mut job = Job::default();
        for message in &moved {
            let mut fresh = StoredMessage {
                sequence: state.sequence(),
                deliveries: 0,
                due_at_ms: 0,
                ..message.clone()
            };
            for header in [
                headers::DEAD_LETTER_REASON,
                headers::ORIGINAL_QUEUE,
                headers::ATTEMPT,
            ] {
                fresh.headers.remove(header);
            }
            job.mutations.push(Mutation::Remove {
                queue: dead_letters.to_string(),
                sequence: message.sequence,
            });
            job.put(queue_name, fresh);
            job.on_fail.push(Effect::Enqueue {
                queue: dead_letters.to_string(),
                message: message.clone(),
            });
        }
        if let Ok(source) = state.queue(dead_letters) {
            core.gauges(dead_letters, source);
        }
        let count = moved.len() as u64;
        self.submit_waiting(job, count)
    }

    /// Removes `queue`, its dead-letter queue and their messages; their consumers' subscriptions
    /// end. Deleting a queue that does not exist is not an error.
    pub async fn delete(&self, queue_name: &str) -> Result<(), BrokerError> {
        validate_queue_name(queue_name)?;
        let mut job = Job::default();
        {
            let mut state = self.inner.core.lock();
            for name in [queue_name.to_string(), dead_letter_queue_name(queue_name)] {
                if let Some(queue) = state.queues.remove(&name) {
                    for slot in queue.consumers {
                        let _ = slot
                            .sender
                            .send(ConsumerEvent::Closed(BrokerError::NoSuchQueue(
                                name.clone(),
                            )));
                    }
                }
                self.inner.core.metrics.forget(&name);
                job.mutations.push(Mutation::DropQueue { name });
            }
            self.submit_waiting(job, ())
        }?
        .wait()
        .await
    }
}

/// One subscription. Dropping it ends the subscription: its unsettled deliveries go back to the
/// front of the queue.
pub struct Consumer {
    broker: Broker,
    queue: String,
    id: u64,
    events: mpsc::UnboundedReceiver<ConsumerEvent>,
}

impl Consumer {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The next delivery or the end of the subscription.
    pub async fn next(&mut self) -> ConsumerEvent {
        self.events
            .recv()
            .await
            .unwrap_or(ConsumerEvent::Closed(BrokerError::Closed))
    }

    /// Settles delivery `tag` of this consumer; the result resolves once it is durable.
    pub fn settle(&self, tag: u64, action: SettleAction) -> Result<Pending<()>, BrokerError> {
        self.broker.settle(&self.queue, self.id, tag, action)
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.broker.remove_consumer(&self.queue, self.id);
    }
}

/// Ends retry delays: moves due messages to ready and dispatches them.
async fn timer(broker: Weak<Inner>) {
    // How long to sleep when nothing is delayed; a new delayed message wakes the timer anyway.
    const IDLE: Duration = Duration::from_secs(1);
    loop {
        let Some(inner) = broker.upgrade() else {
            return;
        };
        let core = inner.core.clone();
        let now = now_millis();
        let (mutations, next_due) = core.promote_due(now);
        if !mutations.is_empty() {
            let _ = inner.writer.send(Command::Job(Job {
                mutations,
                ..Job::default()
            }));
        }
        drop(inner);
        let wait = next_due.map_or(IDLE, |due| Duration::from_millis(due.saturating_sub(now)));
        tokio::select! {
            _ = tokio::time::sleep(wait.min(IDLE)) => {}
            _ = core.timer.notified() => {}
        }
    }
}
