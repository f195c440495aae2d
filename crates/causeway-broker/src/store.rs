//! Durable storage: one redb database file, written by one thread that group-commits.
//!
//! Why redb: it is pure Rust (no C library, no separate server to run), ACID, and crash-safe by
//! construction: copy-on-write B-trees with a checksummed commit slot, so a crash mid-commit leaves
//! the previous commit intact and no recovery log has to be replayed. It has a single writer, which
//! suits a broker whose throughput comes from batching, not from concurrent writers.
//!
//! Group commit: every change (publish, ack, redelivery, dead-letter, redrive, declare, delete)
//! is a [`Job`] sent to the writer thread. The thread takes whatever jobs are waiting, up to
//! `max_batch`, applies them in one write transaction and commits once; the cost of a commit (an
//! fsync) is then shared by all of them. Only after the commit does it apply the jobs' effects to
//! the in-memory index and answer their waiters, so a confirm or a settled reply always means
//! "on disk". A failed commit fails every job in the batch and rolls their in-memory effects back.
//!
//! `fsync = false` commits with [`redb::Durability::None`]: redb then keeps the commit in this
//! process only until a durable commit follows, which the thread makes once it has been idle for
//! [`LAZY_FLUSH`] (and at close). Confirms are sent before that flush, so a crash of the process or
//! the machine can lose up to that long of confirmed operations. It exists to measure what fsync
//! costs, not to run with.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use causeway_core::queue_policy::QueuePolicy;
use causeway_proto::broker::v1::StoredMessage;
use prost::Message as _;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use crate::BrokerError;

/// Messages keyed by (queue, sequence); the value is a prost-encoded [`StoredMessage`].
const MESSAGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("messages");
/// Queue name -> its policy as JSON.
const QUEUES: TableDefinition<&str, &[u8]> = TableDefinition::new("queues");
/// Counters that must survive restarts.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const NEXT_SEQUENCE: &str = "next_sequence";

/// With `fsync = false`, how long the writer waits idle before making earlier commits durable.
pub const LAZY_FLUSH: Duration = Duration::from_millis(100);

/// One change to the stored data.
#[derive(Debug)]
pub enum Mutation {
    Put {
        queue: String,
        message: StoredMessage,
    },
    Remove {
        queue: String,
        sequence: u64,
    },
    PutQueue {
        name: String,
        policy: QueuePolicy,
    },
    /// The queue's row and all of its messages.
    DropQueue {
        name: String,
    },
}

/// What a job does to the in-memory index once committed (or, for `on_fail`, once it failed).
#[derive(Debug)]
pub enum Effect {
    /// The message becomes deliverable (or waits for `due_at_ms` if set).
    Enqueue {
        queue: String,
        message: StoredMessage,
    },
    CreateQueue {
        name: String,
        policy: QueuePolicy,
    },
}

pub type Done = oneshot::Sender<Result<(), BrokerError>>;

/// Mutations committed atomically (within one batch's transaction), then their effects applied.
#[derive(Debug, Default)]
pub struct Job {
    pub mutations: Vec<Mutation>,
    pub on_commit: Vec<Effect>,
    pub on_fail: Vec<Effect>,
    pub done: Option<Done>,
}

impl Job {
    /// Stores `message` in `queue` and, once committed, makes it deliverable there.
    pub fn put(&mut self, queue: &str, message: StoredMessage) {
        self.mutations.push(Mutation::Put {
            queue: queue.to_string(),
            message: message.clone(),
        });
        self.on_commit.push(Effect::Enqueue {
            queue: queue.to_string(),
            message,
        });
    }

    /// Creates (or updates) `name` with `policy`.
    pub fn create_queue(&mut self, name: &str, policy: &QueuePolicy) {
        self.mutations.push(Mutation::PutQueue {
            name: name.to_string(),
            policy: policy.clone(),
        });
        self.on_commit.push(Effect::CreateQueue {
            name: name.to_string(),
            policy: policy.clone(),
        });
    }
}

pub enum Command {
    Job(Job),
    Close(oneshot::Sender<()>),
}

/// What was on disk at open.
pub struct Loaded {
    pub queues: BTreeMap<String, QueuePolicy>,
    pub messages: Vec<(String, StoredMessage)>,
    pub next_sequence: u64,
}

/// Opens (or creates) the database and reads everything in it.
pub fn open(path: &Path) -> Result<(Database, Loaded), BrokerError> {
    let db = Database::create(path).map_err(|source| BrokerError::Open {
        path: path.to_path_buf(),
        source: source.into(),
    })?;
    let txn = db.begin_write().map_err(redb::Error::from)?;
    {
        txn.open_table(MESSAGES).map_err(redb::Error::from)?;
        txn.open_table(QUEUES).map_err(redb::Error::from)?;
        txn.open_table(META).map_err(redb::Error::from)?;
    }
    txn.commit().map_err(redb::Error::from)?;

    let read = db.begin_read().map_err(redb::Error::from)?;
    let mut queues = BTreeMap::new();
    for row in read
        .open_table(QUEUES)
        .map_err(redb::Error::from)?
        .iter()
        .map_err(redb::Error::from)?
    {
        let (name, policy) = row.map_err(redb::Error::from)?;
        let policy: QueuePolicy = serde_json::from_slice(policy.value()).map_err(|err| {
            BrokerError::Corrupt(format!("policy of queue {:?}: {err}", name.value()))
        })?;
        queues.insert(name.value().to_string(), policy);
    }
    let mut messages = Vec::new();
    let mut next_sequence = read
        .open_table(META)
        .map_err(redb::Error::from)?
        .get(NEXT_SEQUENCE)
        .map_err(redb::Error::from)?
        .map(|value| value.value())
        .unwrap_or(1);
    for row in read
        .open_table(MESSAGES)
        .map_err(redb::Error::from)?
        .iter()
        .map_err(redb::Error::from)?
    {
        let (key, value) = row.map_err(redb::Error::from)?;
        let (queue, sequence) = key.value();
        let mut message = StoredMessage::decode(value.value()).map_err(|err| {
            BrokerError::Corrupt(format!("message {sequence} of queue {queue:?}: {err}"))
        })?;
        message.sequence = sequence;
        next_sequence = next_sequence.max(sequence + 1);
        messages.push((queue.to_string(), message));
    }
    Ok((
        db,
        Loaded {
            queues,
            messages,
            next_sequence,
        },
    ))
}

/// What the writer calls after each commit.
pub trait Applier: Send + Sync + 'static {
    /// Applies committed (or rolled back) effects to the index, in commit order, and returns the
    /// mutations that follow from them (deliveries made to waiting consumers), which the writer
    /// commits next.
    fn apply(&self, effects: Vec<Effect>) -> Vec<Mutation>;
    fn observe_commit(&self, batch: usize, elapsed: Duration);
}

/// The writer thread: owns the database until `Close` or until every sender is gone.
pub struct Writer {
    pub sender: std_mpsc::Sender<Command>,
    pub thread: std::thread::JoinHandle<()>,
}

/// Runs the writer on its own thread (redb's API is blocking).
pub fn spawn_writer(
    db: Database,
    fsync: bool,
    max_batch: usize,
    applier: Arc<dyn Applier>,
) -> Result<Writer, BrokerError> {
    let (sender, receiver) = std_mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("broker-writer".into())
        .spawn(move || writer(db, fsync, max_batch.max(1), applier, receiver))
        .map_err(BrokerError::Thread)?;
    Ok(Writer { sender, thread })
}

fn writer(
    db: Database,
    fsync: bool,
    max_batch: usize,
    applier: Arc<dyn Applier>,
    receiver: std_mpsc::Receiver<Command>,
) {
    let mut stored_next_sequence = 0;
    // A non-durable commit not yet followed by a durable one (fsync = false only).
    let mut unflushed = false;
    let mut close_reply = None;
    // Mutations that followed from the last commit's effects.
    let mut carry: Vec<Mutation> = Vec::new();
    loop {
        let mut jobs = Vec::new();
        if !carry.is_empty() {
            jobs.push(Job {
                mutations: std::mem::take(&mut carry),
                ..Job::default()
            });
        } else if close_reply.is_some() {
            break;
        } else {
            let first = if unflushed {
                match receiver.recv_timeout(LAZY_FLUSH) {
                    Ok(command) => Some(command),
                    Err(std_mpsc::RecvTimeoutError::Timeout) => {
                        flush(&db, &mut unflushed);
                        continue;
                    }
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => None,
                }
            } else {
                receiver.recv().ok()
            };
            match first {
                Some(Command::Job(job)) => jobs.push(job),
                Some(Command::Close(reply)) => close_reply = Some(reply),
                None => break,
            }
        }
        while close_reply.is_none() && jobs.len() < max_batch {
            match receiver.try_recv() {
                Ok(Command::Job(job)) => jobs.push(job),
                Ok(Command::Close(reply)) => close_reply = Some(reply),
                Err(_) => break,
            }
        }
        if !jobs.is_empty() {
            let started = Instant::now();
            let result = commit(&db, fsync, &jobs, &mut stored_next_sequence);
            applier.observe_commit(jobs.len(), started.elapsed());
            unflushed |= result.is_ok() && !fsync;
            carry = finish(&*applier, jobs, result);
        }
    }
    flush(&db, &mut unflushed);
    drop(db);
    // Whatever arrived after Close fails: the database is closed.
    while let Ok(command) = receiver.try_recv() {
        match command {
            Command::Job(job) => {
                finish(&*applier, vec![job], Err(BrokerError::Closed));
            }
            Command::Close(reply) => {
                let _ = reply.send(());
            }
        }
    }
    if let Some(reply) = close_reply {
        let _ = reply.send(());
    }
}

fn flush(db: &Database, unflushed: &mut bool) {
    if !*unflushed {
        return;
    }
    // An empty durable commit makes the earlier non-durable ones durable.
    let result = db
        .begin_write()
        .map_err(redb::Error::from)
        .and_then(|txn| txn.commit().map_err(redb::Error::from));
    match result {
        Ok(()) => *unflushed = false,
        Err(err) => {
            tracing::error!(event = "broker.flush_failed", error = %err, "lazy flush failed")
        }
    }
}

fn commit(
    db: &Database,
    fsync: bool,
    jobs: &[Job],
    stored_next_sequence: &mut u64,
) -> Result<(), BrokerError> {
    let mut txn = db.begin_write().map_err(redb::Error::from)?;
    txn.set_durability(if fsync {
        Durability::Immediate
    } else {
        Durability::None
    })
    .map_err(redb::Error::from)?;
    let mut next_sequence = *stored_next_sequence;
    {
        let mut messages = txn.open_table(MESSAGES).map_err(redb::Error::from)?;
        let mut queues = txn.open_table(QUEUES).map_err(redb::Error::from)?;
        for mutation in jobs.iter().flat_map(|job| &job.mutations) {
            match mutation {
                Mutation::Put { queue, message } => {
                    next_sequence = next_sequence.max(message.sequence + 1);
                    messages
                        .insert(
                            (queue.as_str(), message.sequence),
                            message.encode_to_vec().as_slice(),
                        )
                        .map_err(redb::Error::from)?;
                }
                Mutation::Remove { queue, sequence } => {
                    messages
                        .remove((queue.as_str(), *sequence))
                        .map_err(redb::Error::from)?;
                }
                Mutation::PutQueue { name, policy } => {
                    let json = serde_json::to_vec(policy)
                        .map_err(|err| BrokerError::Corrupt(err.to_string()))?;
                    queues
                        .insert(name.as_str(), json.as_slice())
                        .map_err(redb::Error::from)?;
                }
                Mutation::DropQueue { name } => {
                    queues.remove(name.as_str()).map_err(redb::Error::from)?;
                    messages
                        .retain_in((name.as_str(), 0)..=(name.as_str(), u64::MAX), |_, _| false)
                        .map_err(redb::Error::from)?;
                }
            }
        }
    }
    if next_sequence > *stored_next_sequence {
        txn.open_table(META)
            .map_err(redb::Error::from)?
            .insert(NEXT_SEQUENCE, next_sequence)
            .map_err(redb::Error::from)?;
    }
    txn.commit().map_err(redb::Error::from)?;
    *stored_next_sequence = next_sequence;
    Ok(())
}

/// Applies effects in commit order, then answers the waiters; returns the follow-up mutations.
fn finish(applier: &dyn Applier, jobs: Vec<Job>, result: Result<(), BrokerError>) -> Vec<Mutation> {
    let mut effects = Vec::new();
    let mut waiters = Vec::new();
    for job in jobs {
        effects.extend(if result.is_ok() {
            job.on_commit
        } else {
            job.on_fail
        });
        waiters.extend(job.done);
    }
    if let Err(err) = &result {
        tracing::error!(event = "broker.commit_failed", error = %err, jobs = waiters.len(), "commit failed");
    }
    let follow_ups = applier.apply(effects);
    for waiter in waiters {
        let _ = waiter.send(match &result {
            Ok(()) => Ok(()),
            Err(BrokerError::Closed) => Err(BrokerError::Closed),
            Err(err) => Err(BrokerError::Commit(err.to_string())),
        });
    }
    follow_ups
}
