//! The example microservices Causeway's scenarios are built from, each an axum application with
//! its own database (SQLite in the data dir by default, PostgreSQL when `database_url` says so):
//! Order Service answers `GET /orders?userId=` (and `POST /orders/{id}/paid`), and User Service answers
//! `GET /users/{id}/orders` by reading the user from its own database and fetching the orders
//! from Order Service through the shared client library. Pricing Service serves gRPC, which
//! Inventory Service calls. Email Service publishes to the notification queue (through a
//! transactional outbox) and Notification Service consumes it, acking after its write commits.
//! Process start-up (listeners, TLS, registration) is the caller's; this crate owns the HTTP APIs
//! and their data.

pub mod db;
pub mod email;
pub mod http;
pub mod inventory;
pub mod notification;
pub mod order;
pub mod payment;
pub mod pricing;
pub mod user;

use std::path::PathBuf;

use causeway_core::telemetry::HttpMetrics;

/// What every service needs to build its application.
#[derive(Clone)]
pub struct ServiceDeps {
    pub instance: String,
    /// `sqlite://...` or `postgres://...`; `None`: SQLite at `default_sqlite_path`.
    pub database_url: Option<String>,
    pub default_sqlite_path: PathBuf,
    pub http_metrics: HttpMetrics,
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Database(#[from] db::DbError),
}
