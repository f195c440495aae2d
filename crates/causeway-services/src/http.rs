//! What every service's HTTP API shares: trace context and request ids on every request, a log
//! line and metrics per request, JSON errors, and the caller's [`Principal`] as the edge verified
//! it ([`Caller`]), by which handlers authorize (the model is `causeway_core::principal`'s).

use std::time::Instant;

use axum::Json;
use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use causeway_core::principal::{Principal, scopes};
use causeway_core::registry_api::ErrorBody;
use causeway_core::telemetry::HttpMetrics;
use causeway_core::trace_context::{REQUEST_ID, TraceContext};
use http::request::Parts;
use http::{HeaderValue, StatusCode};

/// An error answer: status plus the common JSON body.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub request_id: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            request_id: None,
        }
    }

    pub fn for_request(mut self, trace: &TraceContext) -> Self {
        self.request_id = Some(trace.request_id.clone());
        self
    }

    /// 503: the database did not answer. `doing` says what failed (`read orders`); logged too.
    pub fn database_unavailable(instance: &str, doing: &str, err: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %err, doing, "database query failed");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "database_unavailable",
            format!("{instance} cannot {doing}: {err}"),
        )
    }

    /// 500: a stored row does not have the shape the service expects.
    pub fn bad_row(err: &sqlx::Error) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "bad_row",
            err.to_string(),
        )
    }
}

/// Reads every row with `read`; a row that does not fit is an [`ApiError::bad_row`].
pub fn read_rows<T>(
    rows: &[sqlx::any::AnyRow],
    read: impl Fn(&sqlx::any::AnyRow) -> Result<T, sqlx::Error>,
) -> Result<Vec<T>, ApiError> {
    rows.iter()
        .map(read)
        .collect::<Result<_, _>>()
        .map_err(|err| ApiError::bad_row(&err))
}

/// The principal a request acts for. Extracting it refuses a request without one (401
/// `unauthenticated`): every service route is behind the edge's token check, so a request with no
/// principal did not come through it.
#[derive(Clone, Debug)]
pub struct Caller {
    pub principal: Principal,
    trace: Option<TraceContext>,
}

impl Caller {
    /// Ok when the caller may read or change user `user_id`'s data; 403 `forbidden` otherwise.
    pub fn may_act_for_user(&self, user_id: i64) -> Result<(), ApiError> {
        if self.principal.may_act_for_user(user_id) {
            return Ok(());
        }
        Err(self.forbidden(format!(
            "subject {:?} may not act for user {user_id} (needs to be that user or hold the {:?} scope)",
            self.principal.subject,
            scopes::ADMIN
        )))
    }

    /// Ok when the caller holds the admin scope; 403 `forbidden` naming `what` otherwise.
    pub fn require_admin(&self, what: &str) -> Result<(), ApiError> {
        if self.principal.has_scope(scopes::ADMIN) {
            return Ok(());
        }
        Err(self.forbidden(format!(
            "{what} needs the {:?} scope, which subject {:?} does not hold",
            scopes::ADMIN,
            self.principal.subject
        )))
    }

    fn forbidden(&self, message: String) -> ApiError {
        tracing::warn!(subject = %self.principal.subject, reason = %message, "request forbidden");
        let error = ApiError::new(StatusCode::FORBIDDEN, "forbidden", message);
        match &self.trace {
            Some(trace) => error.for_request(trace),
            None => error,
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let trace = parts.extensions.get::<TraceContext>().cloned();
        match Principal::from_headers(&parts.headers) {
            Some(principal) => Ok(Self { principal, trace }),
            None => {
                let error = ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthenticated",
                    "the request carries no authenticated subject; call through the edge with a bearer token",
                );
                Err(match &trace {
                    Some(trace) => error.for_request(trace),
                    None => error,
                })
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.code.to_string(),
            message: self.message,
            request_id: self.request_id,
        };
        (self.status, Json(body)).into_response()
    }
}

/// Middleware: continues the caller's trace (available to handlers as an extension), echoes the
/// request id, logs the request and records its metrics under its route template.
pub async fn observe(
    State(metrics): State<HttpMetrics>,
    mut request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let trace = TraceContext::continue_from(request.headers());
    request.extensions_mut().insert(trace.clone());
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|matched| matched.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let mut response = next.run(request).await;
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    metrics.observe(&route, &method, status, elapsed);
    if let Ok(value) = HeaderValue::from_str(&trace.request_id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    tracing::info!(
        request_id = %trace.request_id,
        trace_id = %trace.trace_id,
        span_id = %trace.span_id,
        %method,
        %path,
        status,
        elapsed_ms = elapsed.as_secs_f64() * 1000.0,
        "request"
    );
    response
}

/// What every service's API ends with: a JSON 404 for unknown paths, its state, and the
/// [`observe`] middleware (trace context, request log line, metrics).
pub fn service_api<S: Clone + Send + Sync + 'static>(
    routes: axum::Router<S>,
    state: S,
    metrics: &HttpMetrics,
) -> axum::Router {
    routes
        .fallback(not_found)
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(
            metrics.clone(),
            observe,
        ))
}

/// The answer for paths no route matches.
pub async fn not_found(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route for {} {}", request.method(), request.uri().path()),
    )
}
