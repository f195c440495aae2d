//! Notification Service against an in-process embedded broker (127.0.0.1, port chosen at run
//! time) and a SQLite database of its own: what it stores for messages published without an id.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use causeway_broker::testing::LocalBroker;
use causeway_core::principal::AUTHENTICATED_SUBJECT;
use causeway_core::serve::shutdown_channel;
use causeway_core::telemetry::HttpMetrics;
use causeway_queue::{BrokerLink, ConnectOptions, QueuePolicy, QueueSpec, content_message_id};
use causeway_services::ServiceDeps;
use causeway_services::notification::{self, ConsumerMetrics, Notification};
use http_body_util::BodyExt;
use tower::ServiceExt;

const USER: i64 = 4242;

/// A directory of its own per test, removed at the end.
struct TestDir(PathBuf);

impl TestDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "causeway-notification-{name}-{}-{}",
            std::process::id(),
            causeway_queue::new_message_id()
        ));
        std::fs::create_dir_all(&dir).expect("create test dir");
        Self(dir)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn event(email_id: i64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"emailId": email_id, "status": "sent", "userId": USER}))
        .expect("JSON")
}

async fn notifications(app: &axum::Router) -> Vec<Notification> {
    let request = http::Request::get(format!("/notifications?userId={USER}"))
        .header(AUTHENTICATED_SUBJECT, USER.to_string())
        .body(Body::empty())
        .expect("request");
    let response = app.clone().oneshot(request).await.expect("response");
    assert_eq!(response.status(), http::StatusCode::OK);
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    serde_json::from_slice(&body).expect("notifications JSON")
}

/// Two id-less messages with different bodies are two notifications (before content ids, the
/// second was acked as a "duplicate" of the first, whose id was the empty string, and lost); an
/// identical id-less body is the same message and stored once.
#[tokio::test]
async fn id_less_messages_with_different_bodies_are_all_stored() {
    let dir = TestDir::new("id-less");
    let broker = LocalBroker::start()
        .await
        .expect("start the embedded broker");
    let queue = QueueSpec::new("notification-queue", QueuePolicy::default());
    let link = Arc::new(BrokerLink::fixed(
        broker.target(),
        broker.connect_options(ConnectOptions::new("notification-test")),
        vec![queue.clone()],
    ));
    // Connecting declares the queue, so the raw publishes below have somewhere to go.
    link.backend().await.expect("connect and declare");
    let deps = ServiceDeps {
        instance: "notification-service-test".into(),
        database_url: None,
        default_sqlite_path: dir.0.join("notifications.sqlite"),
        http_metrics: HttpMetrics::default(),
    };
    let (stop, shutdown) = shutdown_channel();
    let app = notification::app(
        &deps,
        link,
        queue.clone(),
        8,
        ConsumerMetrics::default(),
        shutdown,
    )
    .await
    .expect("start Notification Service");

    // As a foreign client publishes: no message id, no headers. The last one comes after the
    // repeat, so once it is stored the repeat has been handled too (one consumer, in order).
    for email_id in [1, 2, 1, 3] {
        broker
            .broker
            .publish(&queue.name, "", HashMap::new(), event(email_id))
            .await
            .expect("the broker takes an id-less message");
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    let stored = loop {
        let stored = notifications(&app).await;
        if stored.iter().any(|n| n.email_id == 3) || Instant::now() > deadline {
            break stored;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut seen: Vec<(i64, String)> = stored
        .iter()
        .map(|n| (n.email_id, n.message_id.clone()))
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [1, 2, 3]
            .into_iter()
            .map(|email_id| (email_id, content_message_id(&event(email_id))))
            .collect::<Vec<_>>(),
        "{stored:?}"
    );
    stop.fire();
}
