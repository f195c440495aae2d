//! The services authorize by the principal the edge set (`x-authenticated-subject` and
//! `x-authenticated-scope`): a user reads their own data, an admin anyone's, anyone else gets 403
//! and a request with no principal 401, each with the JSON error body.

use std::path::PathBuf;

use axum::body::Body;
use causeway_core::principal::{AUTHENTICATED_SCOPE, AUTHENTICATED_SUBJECT};
use causeway_core::telemetry::HttpMetrics;
use causeway_services::ServiceDeps;
use causeway_services::order;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;

struct TestDir(PathBuf);

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn order_service(name: &str) -> (axum::Router, TestDir) {
    let dir = std::env::temp_dir().join(format!(
        "causeway-authz-{name}-{}-{}",
        std::process::id(),
        causeway_queue::new_message_id()
    ));
    std::fs::create_dir_all(&dir).expect("create test dir");
    let deps = ServiceDeps {
        instance: "order-service-test".into(),
        database_url: None,
        default_sqlite_path: dir.join("orders.sqlite"),
        http_metrics: HttpMetrics::default(),
    };
    let app = order::app(&deps).await.expect("start Order Service");
    (app, TestDir(dir))
}

/// Asks for user 123's orders as `subject` with `scope`; the status and the JSON body.
async fn orders_of_123(
    app: &axum::Router,
    subject: Option<&str>,
    scope: Option<&str>,
) -> (StatusCode, serde_json::Value) {
    let mut request = Request::get("/orders?userId=123");
    if let Some(subject) = subject {
        request = request.header(AUTHENTICATED_SUBJECT, subject);
    }
    if let Some(scope) = scope {
        request = request.header(AUTHENTICATED_SCOPE, scope);
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::empty()).expect("request"))
        .await
        .expect("response");
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let json = serde_json::from_slice(&body).expect("a JSON body");
    (status, json)
}

#[tokio::test]
async fn order_service_answers_the_user_and_admins_only() {
    let (app, _dir) = order_service("orders").await;

    let (status, own) = orders_of_123(&app, Some("123"), None).await;
    assert_eq!(status, StatusCode::OK, "{own}");
    assert_eq!(own.as_array().map(Vec::len), Some(2), "{own}");

    let (status, other) = orders_of_123(&app, Some("124"), Some("debug")).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{other}");
    assert_eq!(other["error"], "forbidden", "{other}");
    assert!(
        other["message"]
            .as_str()
            .unwrap_or_default()
            .contains("124"),
        "{other}"
    );

    let (status, admin) = orders_of_123(&app, Some("ops"), Some("debug admin")).await;
    assert_eq!(status, StatusCode::OK, "{admin}");
    assert_eq!(admin, own);

    let (status, anonymous) = orders_of_123(&app, None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{anonymous}");
    assert_eq!(anonymous["error"], "unauthenticated", "{anonymous}");

    // A subject that only looks like the user id is someone else.
    let (status, _) = orders_of_123(&app, Some("0123"), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}
