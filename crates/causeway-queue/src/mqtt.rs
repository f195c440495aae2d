//! The MQTT 5 backend (rumqttc's v5 client; tested against Mosquitto 2.0).
//!
//! # Mapping queues onto MQTT
//!
//! Queue `q` is the topic `causeway/queues/q`, its dead-letter queue the topic
//! `causeway/queues/q.dlq`. Each has one durable consumer *session*: client id `causeway-q/<queue>`
//! (derived from the queue name alone: [`ConnectOptions::client_name`] is unique per process, so
//! it cannot name a session that must outlive a restart and be shared with whoever declared the
//! queue), `clean_start=false`, a session that never expires (it lives as long as the queue's
//! marker, below) and a QoS 1 subscription to the topic. A consumer resumes that session with
//! manual acks and `receive_maximum` = prefetch; it acks (PUBACK) only when [`Delivery::ack`] or
//! a settle that replaced the message is done. Only one consumer per queue can hold a session at a
//! time (a second connection with the same client id takes it over).
//!
//! # Declaring: a retained marker
//!
//! The broker stores messages for a session only once its subscription exists, so the session must
//! be created before anyone publishes. But every service declares its queues on connecting,
//! publishers included, and connecting as `causeway-q/<queue>` while a consumer holds that session
//! would take it over: the consumer is disconnected and its unacked messages come back with DUP.
//! So the session is created once and then marked: a retained message on
//! `causeway/declared/<queue>`. `declare` opens a connection of its own (unique client id, clean
//! start), subscribes to the markers of the queue and its dead-letter queue, and collects the
//! retained markers the broker sends right behind the SUBACK (waiting 300 ms at most). A
//! marked queue is left alone. An unmarked one gets its session (connect as it, subscribe,
//! disconnect; nothing is queued for a session that does not exist yet), then its marker (QoS 1,
//! after the PUBACK). `delete` clears the markers (empty retained payloads) before it ends the
//! sessions, so an interrupted delete leaves unmarked sessions (recreated by the next declare),
//! never marked queues without sessions.
//!
//! The race: two declarers that check at the same moment both find no marker and both create the
//! session. That is harmless: no marker means no declare has finished, and services declare before
//! they consume or publish, so no consumer holds the session yet and nothing was published to it;
//! the second connection may take over the first declarer's, which counts that as done (whoever
//! took over subscribes too). Both then write the same marker. The check is narrowed to that
//! moment: a declarer stays subscribed to the markers and looks again right before connecting as
//! the session, so a marker written while it waited for retained ones stops it. A consumer that subscribes without
//! ever declaring creates the session unmarked; the first declare then takes it over once. The same
//! holds for sessions made before markers existed. Markers and sessions persist (or not) together
//! with the broker's persistence; a broker option that expires sessions on its own
//! (`persistent_client_expiration`) would leave markers without sessions, so leave it unset.
//!
//! # Backends compared
//!
//! What differs from the AMQP and embedded backends, because MQTT has no nack, no delay, no
//! dead-letter queue and no queue statistics:
//! - **Retries and dead letters are done by the library.** `redeliver` publishes a copy with
//!   `x-causeway-attempt` and a not-before time (`x-causeway-not-before`, ms since the epoch) and,
//!   after its PUBACK, acks the original; `dead_letter` publishes to the `.dlq` topic, then acks.
//!   A crash between the two duplicates the message, never loses it.
//! - **The delay is waited out by the consumer.** A delivery whose not-before time lies ahead is
//!   held back (in order) until then: one waiting retry delays every message behind it for that
//!   consumer (head-of-line delay), unlike the broker-side delays of AMQP and the embedded broker.
//! - **Attempts after a crash.** Mosquitto resends a session's unacked messages with DUP set when
//!   the session resumes; DUP counts as one more attempt. DUP is a flag, not a counter: several
//!   crashes on the same message still count as one.
//! - **No counts.** `list` reports the known queues and their dead-letter queues with every count
//!   `None`: MQTT cannot tell how many messages a session holds.
//! - **No peek.** Reading a session's messages means taking them; `peek` is `Unsupported`.
//!   `redrive` consumes the dead-letter session for a short window, republishes each message to
//!   the queue (fresh attempts) and acks it after the PUBACK; it takes the dead-letter session
//!   over from any consumer holding it.
//! - **Broker limits apply.** Mosquitto keeps at most `max_queued_messages` (default 1000) per
//!   session and drops QoS 1 messages beyond that; size it for the expected backlog.
//! - `delete` clears both markers and ends both sessions (connect with `clean_start=true` and
//!   expiry 0); messages in them are discarded.
//!
//! | | embedded | AMQP | MQTT (this) |
//! |---|---|---|---|
//! | confirm | broker sequence | publisher confirm | PUBACK |
//! | retry delay | broker | TTL retry queues | held back by the consumer |
//! | dead-letter queue | broker | `q.dlq`, published by the library | `.../q.dlq` topic, published by the library |
//! | attempts after a consumer crash | broker counts | `redelivered` flag (+1) | DUP flag (+1) |
//! | counts in `list` | all | ready, consumers, delayed | none |
//! | peek | yes | yes (counts as a delivery) | no |

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{
    DisconnectReasonCode, Filter, Packet, PubAckReason, Publish, PublishProperties,
    SubscribeReasonCode,
};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, StateError};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::message::{resolve_message_id, since_epoch};
use crate::wire_headers;
use crate::{
    BackendKind, BrokerTarget, Confirmation, ConnectOptions, Delivery, DeliveryStream,
    OutgoingMessage, PeekedMessage, QueueBackend, QueueError, QueueInfo, QueueSpec, now_millis,
    validate_queue_name,
};

const KIND: BackendKind = BackendKind::Mqtt;
/// A consumer session never expires (MQTT 5: `u32::MAX`): it must live exactly as long as the
/// queue's retained declaration marker, which does not expire either, until `delete` ends both.
const SESSION_EXPIRY_SECS: u32 = u32::MAX;
/// Larger than any payload a queue policy sensibly allows, plus headers.
const MAX_PACKET_BYTES: u32 = 16 * 1024 * 1024;
/// How long `redrive` waits for the next dead letter before it considers the session drained.
const REDRIVE_QUIET: Duration = Duration::from_millis(500);
/// How long `declare` waits after its SUBACK for retained markers (sent right behind the SUBACK).
const MARKER_WAIT: Duration = Duration::from_millis(300);

/// The topic of `queue`.
pub fn topic(queue: &str) -> String {
    format!("causeway/queues/{queue}")
}

const MARKER_PREFIX: &str = "causeway/declared/";

/// The topic of `queue`'s retained declaration marker.
fn marker_topic(queue: &str) -> String {
    format!("{MARKER_PREFIX}{queue}")
}

/// The client id of `queue`'s durable consumer session.
fn session_id(queue: &str) -> String {
    format!("causeway-q/{queue}")
}

fn disconnected(message: impl std::fmt::Display) -> QueueError {
    QueueError::Disconnected {
        backend: KIND,
        message: message.to_string(),
    }
}

pub struct MqttBackend {
    host: String,
    port: u16,
    options: ConnectOptions,
    publisher: Arc<Publisher>,
}

impl MqttBackend {
    pub async fn connect(
        target: &BrokerTarget,
        options: &ConnectOptions,
    ) -> Result<Self, QueueError> {
        let BrokerTarget::Mqtt { host, port } = target else {
            return Err(QueueError::InvalidUrl {
                url: target.display(),
                reason: "not an mqtt:// URL".into(),
            });
        };
        let client_id = format!("{}-pub-{:08x}", options.client_name, rand::random::<u32>());
        let mqtt = mqtt_options(host, *port, client_id, options);
        let publisher = Publisher::start(mqtt, options.confirm_timeout);
        let connected = tokio::time::timeout(options.connect_timeout, publisher.connected());
        let failure = match connected.await {
            Ok(Ok(())) => None,
            Ok(Err(message)) => Some(message),
            Err(_) => Some(format!(
                "no answer within {} ms",
                options.connect_timeout.as_millis()
            )),
        };
        if let Some(message) = failure {
            return Err(QueueError::Connect {
                backend: KIND,
                target: target.display(),
                message,
            });
        }
        Ok(Self {
            host: host.clone(),
            port: *port,
            options: options.clone(),
            publisher,
        })
    }

    /// Options for `queue`'s consumer session: resumed (`clean_start=false`) unless `clean`.
    fn session_options(&self, queue: &str, clean: bool, receive_maximum: u16) -> MqttOptions {
        let mut mqtt = mqtt_options(&self.host, self.port, session_id(queue), &self.options);
        mqtt.set_clean_start(clean)
            .set_session_expiry_interval(Some(if clean { 0 } else { SESSION_EXPIRY_SECS }))
            .set_manual_acks(true)
            .set_receive_maximum(Some(receive_maximum.max(1)));
        mqtt
    }

    /// Connects as `queue`'s session and subscribes; deliveries flow into the returned receiver.
    async fn open_session(
        &self,
        queue: &str,
        receive_maximum: u16,
    ) -> Result<(Arc<Session>, mpsc::UnboundedReceiver<SessionEvent>), QueueError> {
        let mqtt = self.session_options(queue, false, receive_maximum);
        let (session, mut events) = Session::start(mqtt, queue);
        // Deliveries may arrive before the SUBACK; keep them in order for the caller.
        let mut early = Vec::new();
        let subscribed = tokio::time::timeout(self.options.connect_timeout, async {
            loop {
                match events.recv().await {
                    Some(SessionEvent::Subscribed) => return Ok(()),
                    Some(SessionEvent::Failed(message)) | Some(SessionEvent::Ended(message)) => {
                        return Err(disconnected(message));
                    }
                    Some(event @ SessionEvent::Message(_)) => early.push(event),
                    None => return Err(disconnected("the session ended")),
                }
            }
        })
        .await
        .unwrap_or_else(|_| {
            Err(QueueError::Connect {
                backend: KIND,
                target: format!("mqtt://{}:{}", self.host, self.port),
                message: format!("no SUBACK for {queue} within the connect timeout"),
            })
        });
        subscribed?;
        let (forward, receiver) = mpsc::unbounded_channel();
        for event in early {
            let _ = forward.send(event);
        }
        session.relay(events, forward);
        Ok((session, receiver))
    }

    /// Declares `queues` (a queue and its dead-letter queue): creates the session of each that has
    /// no retained marker yet, then marks it. A marked queue's session is left alone, since
    /// connecting as it would take it over from its consumer.
    async fn declare_sessions(&self, queues: &[String]) -> Result<(), QueueError> {
        let mut markers = MarkerConnection::open(self).await?;
        let result = async {
            markers.watch(queues).await?;
            for queue in queues {
                // Checked again right before connecting as the session: a concurrent declarer
                // may have marked it (and its service begun consuming) while this one waited.
                if markers.is_marked(queue)? {
                    continue;
                }
                self.create_session(queue).await?;
                let marker = format!("{{\"queue\":\"{queue}\",\"declared_ms\":{}}}", now_millis());
                markers.publish(&marker_topic(queue), marker.into()).await?;
            }
            Ok(())
        }
        .await;
        markers.close().await;
        result
    }

    /// Creates `queue`'s durable session with its subscription, then disconnects. Only called for
    /// an unmarked queue, whose session does not exist yet and so holds no messages; the receive
    /// maximum of 1 and manual acks keep anything unexpected in the session, unacked.
    async fn create_session(&self, queue: &str) -> Result<(), QueueError> {
        let mqtt = self.session_options(queue, false, 1);
        let (client, mut eventloop) = AsyncClient::new(mqtt, 16);
        let created = tokio::time::timeout(self.options.connect_timeout, async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        client
                            .subscribe(topic(queue), QoS::AtLeastOnce)
                            .await
                            .map_err(disconnected)?;
                    }
                    Ok(Event::Incoming(Packet::SubAck(suback))) => {
                        granted(&suback.return_codes)?;
                        client.disconnect().await.map_err(disconnected)?;
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => return Ok(()),
                    Ok(_) => {}
                    // A concurrent declarer (or a consumer) connected as the session: it subscribes
                    // on connecting, so the session exists with its subscription either way.
                    Err(err) if taken_over(&err) => return Ok(()),
                    Err(err) => return Err(disconnected(err)),
                }
            }
        })
        .await;
        created.unwrap_or_else(|_| {
            Err(disconnected(format!(
                "creating the session of {queue} timed out"
            )))
        })
    }

    /// Ends `queue`'s session and discards what it held.
    async fn end_session(&self, queue: &str) -> Result<(), QueueError> {
        let mqtt = self.session_options(queue, true, 1);
        let (client, mut eventloop) = AsyncClient::new(mqtt, 16);
        let ended = tokio::time::timeout(self.options.connect_timeout, async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        client.disconnect().await.map_err(disconnected)?;
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => return Ok(()),
                    Ok(_) => {}
                    Err(err) => return Err(disconnected(err)),
                }
            }
        })
        .await;
        ended.unwrap_or_else(|_| {
            Err(disconnected(format!(
                "ending the session of {queue} timed out"
            )))
        })
    }
}

/// Whether the broker ended the connection because another one took its client id over.
fn taken_over(err: &ConnectionError) -> bool {
    matches!(
        err,
        ConnectionError::MqttState(StateError::ServerDisconnect {
            reason_code: DisconnectReasonCode::SessionTakenOver,
            ..
        })
    )
}

fn granted(codes: &[SubscribeReasonCode]) -> Result<(), QueueError> {
    if codes
        .iter()
        .all(|code| matches!(code, SubscribeReasonCode::Success(_)))
    {
        Ok(())
    } else {
        Err(disconnected(format!("subscription refused: {codes:?}")))
    }
}

/// A short-lived connection of its own (unique client id, clean start) that reads and writes the
/// declaration markers. Its event loop runs in a task, so that waiting for an event with a timeout
/// never cancels a poll.
struct MarkerConnection {
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<Result<Event, String>>,
    /// Queues whose marker arrived: retained at subscribing, or live from a concurrent declarer.
    marked: HashSet<String>,
    task: JoinHandle<()>,
    timeout: Duration,
}

impl Drop for MarkerConnection {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The queue a non-empty marker names (an empty one clears a marker).
fn marked_queue(event: &Event) -> Option<String> {
    let Event::Incoming(Packet::Publish(publish)) = event else {
        return None;
    };
    if publish.payload.is_empty() {
        return None;
    }
    let topic = std::str::from_utf8(&publish.topic).ok()?;
    topic.strip_prefix(MARKER_PREFIX).map(str::to_string)
}

impl MarkerConnection {
    async fn open(backend: &MqttBackend) -> Result<Self, QueueError> {
        let client_id = format!(
            "{}-declare-{:08x}",
            backend.options.client_name,
            rand::random::<u32>()
        );
        let mqtt = mqtt_options(&backend.host, backend.port, client_id, &backend.options);
        let (client, mut eventloop) = AsyncClient::new(mqtt, 16);
        let (sender, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let event = eventloop.poll().await.map_err(|err| err.to_string());
                let failed = event.is_err();
                if sender.send(event).is_err() || failed {
                    return;
                }
            }
        });
        let mut connection = Self {
            client,
            events,
            marked: HashSet::new(),
            task,
            timeout: backend.options.connect_timeout,
        };
        connection
            .until("connecting", |event| {
                matches!(event, Event::Incoming(Packet::ConnAck(_))).then_some(Ok(()))
            })
            .await?;
        Ok(connection)
    }

    fn note(&mut self, event: Result<Event, String>) -> Result<Event, QueueError> {
        let event = event.map_err(disconnected)?;
        self.marked.extend(marked_queue(&event));
        Ok(event)
    }

    /// Waits (up to the connect timeout) for the event `wanted` picks, noting markers meanwhile.
    async fn until<T>(
        &mut self,
        what: &str,
        mut wanted: impl FnMut(Event) -> Option<Result<T, QueueError>>,
    ) -> Result<T, QueueError> {
        let waited = tokio::time::timeout(self.timeout, async {
            loop {
                let event = self.events.recv().await;
                let event =
                    self.note(event.unwrap_or_else(|| Err("the event loop ended".into())))?;
                if let Some(result) = wanted(event) {
                    return result;
                }
            }
        })
        .await;
        waited.unwrap_or_else(|_| Err(disconnected(format!("{what} timed out"))))
    }

    /// Subscribes to the markers of `queues` and collects the retained ones, which the broker
    /// sends right behind the SUBACK; stays subscribed so that markers written meanwhile by a
    /// concurrent declarer arrive too.
    async fn watch(&mut self, queues: &[String]) -> Result<(), QueueError> {
        let filters = queues
            .iter()
            .map(|queue| Filter::new(marker_topic(queue), QoS::AtLeastOnce));
        self.client
            .subscribe_many(filters)
            .await
            .map_err(disconnected)?;
        self.until(
            "subscribing to the declaration markers",
            |event| match event {
                Event::Incoming(Packet::SubAck(suback)) => Some(granted(&suback.return_codes)),
                _ => None,
            },
        )
        .await?;
        let deadline = tokio::time::Instant::now() + MARKER_WAIT;
        while !queues.iter().all(|queue| self.marked.contains(queue)) {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(event) => {
                    self.note(event.unwrap_or_else(|| Err("the event loop ended".into())))?;
                }
                Err(_) => break,
            }
        }
        Ok(())
    }

    /// Whether `queue`'s marker arrived (by now: events already received are looked at first).
    fn is_marked(&mut self, queue: &str) -> Result<bool, QueueError> {
        while let Ok(event) = self.events.try_recv() {
            self.note(event)?;
        }
        Ok(self.marked.contains(queue))
    }

    /// Publishes a retained marker (an empty payload clears it) and waits for its PUBACK.
    async fn publish(&mut self, topic: &str, payload: Bytes) -> Result<(), QueueError> {
        self.client
            .publish(topic, QoS::AtLeastOnce, true, payload)
            .await
            .map_err(disconnected)?;
        // One publish at a time: the next PUBACK is its answer.
        self.until("publishing a declaration marker", |event| match event {
            Event::Incoming(Packet::PubAck(puback)) => Some(match puback.reason {
                // Retained either way: "no matching subscribers" only says nobody listens now.
                PubAckReason::Success | PubAckReason::NoMatchingSubscribers => Ok(()),
                reason => Err(disconnected(format!(
                    "declaration marker {topic} refused: PUBACK {reason:?}"
                ))),
            }),
            _ => None,
        })
        .await
    }

    async fn close(mut self) {
        let _ = self.client.disconnect().await;
        // Let the DISCONNECT go out before the task is aborted on drop.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(event)) = self.events.recv().await {
                if matches!(event, Event::Outgoing(Outgoing::Disconnect)) {
                    return;
                }
            }
        })
        .await;
    }
}

fn mqtt_options(host: &str, port: u16, client_id: String, options: &ConnectOptions) -> MqttOptions {
    let mut mqtt = MqttOptions::new(client_id, host, port);
    mqtt.set_keep_alive(Duration::from_secs(30))
        .set_connection_timeout(options.connect_timeout.as_secs().max(1))
        .set_max_packet_size(Some(MAX_PACKET_BYTES))
        .set_request_channel_capacity(1024);
    mqtt
}

fn user_properties(headers: &BTreeMap<String, String>) -> PublishProperties {
    PublishProperties {
        user_properties: headers
            .iter()
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect(),
        content_type: Some("application/json".into()),
        ..PublishProperties::default()
    }
}

/// The publishing connection: matches each PUBACK to the publish that is waiting for it.
struct Publisher {
    client: AsyncClient,
    waiters: Arc<StdMutex<Waiters>>,
    confirm_timeout: Duration,
    connected: StdMutex<Option<oneshot::Receiver<Result<(), String>>>>,
    task: JoinHandle<()>,
}

type PubAckResult = Result<(), PubAckReason>;

#[derive(Default)]
struct Waiters {
    /// Publishes handed to the event loop that have no packet id yet, in order.
    unsent: VecDeque<oneshot::Sender<Result<PubAckResult, String>>>,
    /// Publishes sent, by packet id, waiting for their PUBACK.
    sent: HashMap<u16, oneshot::Sender<Result<PubAckResult, String>>>,
}

impl Waiters {
    fn fail_all(&mut self, message: &str) {
        for waiter in self
            .unsent
            .drain(..)
            .chain(self.sent.drain().map(|(_, w)| w))
        {
            let _ = waiter.send(Err(message.to_string()));
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Publisher {
    fn start(mqtt: MqttOptions, confirm_timeout: Duration) -> Arc<Self> {
        let (client, eventloop) = AsyncClient::new(mqtt, 1024);
        let waiters = Arc::new(StdMutex::new(Waiters::default()));
        let (connected_tx, connected_rx) = oneshot::channel();
        let task = tokio::spawn(Self::drive(eventloop, waiters.clone(), connected_tx));
        Arc::new(Self {
            client,
            waiters,
            confirm_timeout,
            connected: StdMutex::new(Some(connected_rx)),
            task,
        })
    }

    async fn connected(&self) -> Result<(), String> {
        let receiver = lock(&self.connected).take();
        match receiver {
            Some(receiver) => receiver
                .await
                .unwrap_or_else(|_| Err("event loop ended".into())),
            None => Ok(()),
        }
    }

    async fn drive(
        mut eventloop: EventLoop,
        waiters: Arc<StdMutex<Waiters>>,
        connected: oneshot::Sender<Result<(), String>>,
    ) {
        let mut connected = Some(connected);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if let Some(connected) = connected.take() {
                        let _ = connected.send(Ok(()));
                    }
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    let mut waiters = lock(&waiters);
                    if let Some(waiter) = waiters.unsent.pop_front() {
                        waiters.sent.insert(pkid, waiter);
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(puback))) => {
                    if let Some(waiter) = lock(&waiters).sent.remove(&puback.pkid) {
                        let result = match puback.reason {
                            PubAckReason::Success => Ok(()),
                            reason => Err(reason),
                        };
                        let _ = waiter.send(Ok(result));
                    }
                }
                Ok(_) => {}
                Err(err) => {
                    let message = err.to_string();
                    if let Some(connected) = connected.take() {
                        let _ = connected.send(Err(message.clone()));
                    }
                    {
                        // Nothing is resent after a reconnect: every waiting publish fails now
                        // and its caller decides (under the same lock `publish` takes, so that no
                        // request slips between the two).
                        let mut waiters = lock(&waiters);
                        eventloop.clean();
                        eventloop.pending.clear();
                        waiters.fail_all(&message);
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// Publishes QoS 1 and waits for the PUBACK.
    async fn publish(
        &self,
        queue: &str,
        message_id: &str,
        headers: &BTreeMap<String, String>,
        payload: Bytes,
    ) -> Result<(), QueueError> {
        let (sender, receiver) = oneshot::channel();
        {
            let mut waiters = lock(&self.waiters);
            waiters.unsent.push_back(sender);
            let sent = self.client.try_publish_with_properties(
                topic(queue),
                QoS::AtLeastOnce,
                false,
                payload,
                user_properties(headers),
            );
            if let Err(err) = sent {
                waiters.unsent.pop_back();
                return Err(disconnected(err));
            }
        }
        let timeout = self.confirm_timeout;
        let answer = tokio::time::timeout(timeout, receiver).await.map_err(|_| {
            QueueError::ConfirmTimeout {
                backend: KIND,
                message_id: message_id.to_string(),
                timeout_ms: timeout.as_millis() as u64,
            }
        })?;
        match answer {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(PubAckReason::NoMatchingSubscribers))) => {
                Err(QueueError::NoSuchQueue(queue.to_string()))
            }
            Ok(Ok(Err(reason))) => Err(QueueError::PublishRefused {
                backend: KIND,
                message_id: message_id.to_string(),
                message: format!("PUBACK {reason:?}"),
            }),
            Ok(Err(message)) => Err(disconnected(message)),
            Err(_) => Err(disconnected("the publishing connection ended")),
        }
    }
}

fn lock<T>(mutex: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

enum SessionEvent {
    Subscribed,
    Message(Box<Publish>),
    Failed(String),
    Ended(String),
}

/// A connection holding a queue's consumer session. It lives while its stream or any of its
/// unsettled deliveries does; then it disconnects, and the broker keeps what was not acked.
struct Session {
    client: AsyncClient,
    task: StdMutex<Option<JoinHandle<()>>>,
    relay: StdMutex<Option<JoinHandle<()>>>,
}

impl Session {
    fn start(mqtt: MqttOptions, queue: &str) -> (Arc<Self>, mpsc::UnboundedReceiver<SessionEvent>) {
        let (client, eventloop) = AsyncClient::new(mqtt, 1024);
        let (events, receiver) = mpsc::unbounded_channel();
        let task = tokio::spawn(Self::drive(eventloop, client.clone(), topic(queue), events));
        let session = Arc::new(Self {
            client,
            task: StdMutex::new(Some(task)),
            relay: StdMutex::new(None),
        });
        (session, receiver)
    }

    async fn drive(
        mut eventloop: EventLoop,
        client: AsyncClient,
        topic: String,
        events: mpsc::UnboundedSender<SessionEvent>,
    ) {
        loop {
            let event = match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    // Subscribing again is harmless: it replaces the session's subscription.
                    if let Err(err) = client.subscribe(topic.clone(), QoS::AtLeastOnce).await {
                        SessionEvent::Failed(err.to_string())
                    } else {
                        continue;
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(suback))) => {
                    let granted = suback
                        .return_codes
                        .iter()
                        .all(|code| matches!(code, SubscribeReasonCode::Success(_)));
                    if granted {
                        SessionEvent::Subscribed
                    } else {
                        SessionEvent::Failed(format!(
                            "subscription refused: {:?}",
                            suback.return_codes
                        ))
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    SessionEvent::Message(Box::new(publish))
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                    let _ = events.send(SessionEvent::Ended("disconnected".into()));
                    return;
                }
                Ok(_) => continue,
                Err(err) => {
                    let _ = events.send(SessionEvent::Ended(err.to_string()));
                    return;
                }
            };
            let failed = matches!(event, SessionEvent::Failed(_));
            if events.send(event).is_err() || failed {
                return;
            }
        }
    }

    /// Forwards events after the subscription was confirmed (the first receiver is consumed).
    fn relay(
        &self,
        mut events: mpsc::UnboundedReceiver<SessionEvent>,
        forward: mpsc::UnboundedSender<SessionEvent>,
    ) {
        let relay = tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                if forward.send(event).is_err() {
                    return;
                }
            }
        });
        *lock(&self.relay) = Some(relay);
    }

    /// Disconnects cleanly (acks sent before are written first) and waits for the loop to end.
    async fn close(&self) {
        let _ = self.client.disconnect().await;
        let task = lock(&self.task).take();
        if let Some(task) = task
            && tokio::time::timeout(Duration::from_secs(2), task)
                .await
                .is_err()
        {
            tracing::debug!(
                event = "queue.mqtt_close_slow",
                "MQTT session close timed out"
            );
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // DISCONNECT goes after the acks already queued, so none is lost; the loop then ends.
        let _ = self.client.try_disconnect();
        if let Some(relay) = lock(&self.relay).take() {
            relay.abort();
        }
        if let Some(task) = lock(&self.task).take() {
            // Backstop for a broker that never answers.
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(5)).await;
                task.abort();
            });
        }
    }
}

/// What a received PUBLISH says about itself.
struct Received {
    message_id: String,
    headers: BTreeMap<String, String>,
    not_before: Option<u64>,
}

impl Received {
    /// Reads a message of `queue`; one without an id gets its content id.
    fn read(queue: &str, publish: &Publish) -> Self {
        let properties = publish
            .properties
            .as_ref()
            .map(|p| p.user_properties.as_slice())
            .unwrap_or_default();
        let not_before = properties
            .iter()
            .find(|(name, _)| name == wire_headers::NOT_BEFORE)
            .and_then(|(_, value)| value.parse().ok());
        let mut headers: BTreeMap<String, String> = properties
            .iter()
            .filter(|(name, _)| !wire_headers::is_transport_header(name))
            .cloned()
            .collect();
        // MQTT has no message id field: the header is the only carrier.
        let message_id = resolve_message_id(queue, None, &mut headers, &publish.payload);
        Self {
            message_id,
            headers,
            not_before,
        }
    }
}

#[async_trait]
impl QueueBackend for MqttBackend {
    fn kind(&self) -> BackendKind {
        KIND
    }

    async fn declare(&self, spec: &QueueSpec) -> Result<(), QueueError> {
        validate_queue_name(&spec.name)?;
        self.declare_sessions(&[spec.name.clone(), spec.dead_letter_queue()])
            .await
    }

    async fn publish_validated(
        &self,
        spec: &QueueSpec,
        message: OutgoingMessage,
    ) -> Result<Confirmation, QueueError> {
        validate_queue_name(&spec.name)?;
        self.publisher
            .publish(
                &spec.name,
                &message.message_id,
                &message.headers,
                message.payload,
            )
            .await?;
        Ok(Confirmation {
            message_id: message.message_id,
            sequence: None,
        })
    }

    async fn open_stream(
        &self,
        spec: &QueueSpec,
        prefetch: u16,
    ) -> Result<Box<dyn DeliveryStream>, QueueError> {
        let (session, events) = self.open_session(&spec.name, prefetch).await?;
        Ok(Box::new(MqttStream {
            session,
            events,
            publisher: self.publisher.clone(),
            spec: spec.clone(),
        }))
    }

    async fn list(&self, known: &[QueueSpec]) -> Result<Vec<QueueInfo>, QueueError> {
        Ok(known
            .iter()
            .flat_map(|spec| [spec.name.clone(), spec.dead_letter_queue()])
            .map(|name| QueueInfo {
                name,
                ready: None,
                unacked: None,
                delayed: None,
                consumers: None,
            })
            .collect())
    }

    async fn peek(&self, _queue: &str, _limit: usize) -> Result<Vec<PeekedMessage>, QueueError> {
        Err(QueueError::Unsupported {
            backend: KIND,
            operation: "peek",
            why: "an MQTT session hands out its messages only by delivering them; reading them \
                  without taking them is not possible",
        })
    }

    async fn redrive(&self, spec: &QueueSpec, limit: Option<u64>) -> Result<u64, QueueError> {
        let dlq = spec.dead_letter_queue();
        let window = limit
            .and_then(|limit| u16::try_from(limit).ok())
            .unwrap_or(u16::MAX);
        let (session, mut events) = self.open_session(&dlq, window).await?;
        let mut moved = 0;
        while limit.is_none_or(|limit| moved < limit) {
            let publish = match tokio::time::timeout(REDRIVE_QUIET, events.recv()).await {
                Ok(Some(SessionEvent::Message(publish))) => publish,
                Ok(Some(SessionEvent::Subscribed)) => continue,
                Ok(Some(SessionEvent::Failed(message) | SessionEvent::Ended(message))) => {
                    return Err(disconnected(message));
                }
                // Quiet for a while (or the loop ended): the dead-letter session is drained.
                Ok(None) | Err(_) => break,
            };
            let received = Received::read(&dlq, &publish);
            let headers = wire_headers::redrive_headers(&received.headers);
            self.publisher
                .publish(
                    &spec.name,
                    &received.message_id,
                    &headers,
                    publish.payload.clone(),
                )
                .await?;
            session.client.ack(&publish).await.map_err(disconnected)?;
            moved += 1;
        }
        session.close().await;
        Ok(moved)
    }

    async fn delete(&self, spec: &QueueSpec) -> Result<(), QueueError> {
        // Markers first: a delete cut short then leaves sessions without markers, which the next
        // declare recreates, never markers without sessions, which no declare would repair.
        let queues = [spec.name.clone(), spec.dead_letter_queue()];
        let mut markers = MarkerConnection::open(self).await?;
        let mut cleared = Ok(());
        for queue in &queues {
            cleared = markers.publish(&marker_topic(queue), Bytes::new()).await;
            if cleared.is_err() {
                break;
            }
        }
        markers.close().await;
        cleared?;
        for queue in &queues {
            self.end_session(queue).await?;
        }
        Ok(())
    }
}

struct MqttStream {
    session: Arc<Session>,
    events: mpsc::UnboundedReceiver<SessionEvent>,
    publisher: Arc<Publisher>,
    spec: QueueSpec,
}

#[async_trait]
impl DeliveryStream for MqttStream {
    async fn next(&mut self) -> Result<Delivery, QueueError> {
        let publish = loop {
            match self.events.recv().await {
                Some(SessionEvent::Message(publish)) => break publish,
                Some(SessionEvent::Subscribed) => continue,
                Some(SessionEvent::Failed(message) | SessionEvent::Ended(message)) => {
                    return Err(disconnected(message));
                }
                None => return Err(disconnected("the session's event loop ended")),
            }
        };
        let received = Received::read(&self.spec.name, &publish);
        if let Some(not_before) = received.not_before {
            // A retry waiting out its backoff: hold it (and, in order, all behind it) back.
            // Measured at sub-millisecond precision so the copy never comes back early.
            let wait = Duration::from_millis(not_before).saturating_sub(since_epoch());
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
        // The broker resends unacked messages of a resumed session with DUP set: a crashed
        // consumer's attempt.
        let attempt = wire_headers::recorded_attempt(&received.headers)
            .saturating_add(u32::from(publish.dup));
        let payload = publish.payload.clone();
        let settle = MqttSettle {
            session: self.session.clone(),
            publisher: self.publisher.clone(),
            queue: self.spec.name.clone(),
            message_id: received.message_id.clone(),
            headers: received.headers.clone(),
            publish,
        };
        Ok(Delivery::new(
            self.spec.name.clone(),
            received.message_id,
            payload,
            received.headers,
            attempt,
            settle.publish.dup || attempt > 1,
            self.spec.policy.clone(),
            Box::new(settle),
        ))
    }
}

struct MqttSettle {
    /// Keeps the session connected while this delivery is unsettled.
    session: Arc<Session>,
    publisher: Arc<Publisher>,
    queue: String,
    message_id: String,
    headers: BTreeMap<String, String>,
    publish: Box<Publish>,
}

#[async_trait]
impl wire_headers::CopyThenAck for MqttSettle {
    fn queue(&self) -> &str {
        &self.queue
    }

    fn headers(&self) -> &BTreeMap<String, String> {
        &self.headers
    }

    async fn publish_copy(
        &self,
        queue: &str,
        headers: &BTreeMap<String, String>,
    ) -> Result<(), QueueError> {
        let payload = self.publish.payload.clone();
        self.publisher
            .publish(queue, &self.message_id, headers, payload)
            .await
    }

    async fn ack_original(&self) -> Result<(), QueueError> {
        self.session
            .client
            .ack(&self.publish)
            .await
            .map_err(disconnected)
    }

    /// The same topic: the consumer holds the copy back until its not-before time.
    async fn delayed_queue(
        &self,
        delay: Duration,
        copy: &mut BTreeMap<String, String>,
    ) -> Result<String, QueueError> {
        // Rounded up to the next millisecond: truncating could release the copy up to 1 ms
        // before its backoff has passed.
        let not_before = (since_epoch() + delay).as_micros().div_ceil(1000) as u64;
        copy.insert(wire_headers::NOT_BEFORE.to_string(), not_before.to_string());
        Ok(self.queue.clone())
    }
}
