//! `causeway demo rest`: one real request through the running system, shown as the seven steps
//! of the REST flow in the reference (DNS lookup, HTTP request, reverse proxy, load balancer,
//! Order Service, HTTP response, User Service). Every number comes from that request: the
//! client's own timings, and the `Server-Timing` entries each hop added to the answer.

use std::fmt::Write;
use std::path::Path;

use anyhow::{Context, bail};
use bytes::Bytes;
use causeway_client::Discovery;
use causeway_core::principal::scopes;
use causeway_core::server_timing::{self, TimingEntry, steps};
use causeway_core::trace_context::{REQUEST_ID, TraceContext};
use causeway_core::{DataDir, Topology};
use http::{HeaderMap, HeaderValue, Method, header};

use crate::state::RunState;

/// The demo's request: user 123's orders.
pub const DEMO_USER: &str = "123";
/// The subject of the demos' operator token.
pub const DEMO_OPERATOR: &str = "demo-operator";

/// What a demo needs to call the running system through its edge as the demo user.
pub struct DemoAccess {
    pub state: RunState,
    pub data: DataDir,
    pub edge: std::net::SocketAddr,
    /// A five-minute token for [`DEMO_USER`], with the `debug` scope so that the edge passes the
    /// tiers' `Server-Timing` entries back, which the demos print.
    pub token: String,
    /// A five-minute token for an operator (`admin` and `debug` scopes), for views of data that
    /// belong to no one user, such as the failed-delivery log.
    pub operator_token: String,
}

impl DemoAccess {
    pub fn load(topology: &Topology, data_dir: &Path) -> anyhow::Result<Self> {
        let state = RunState::load(data_dir)?;
        let data = DataDir::new(data_dir);
        let edge = state
            .edge
            .context("the run state names no edge address; is `causeway up` still starting?")?;
        let key = causeway_proxy::auth::load_or_create_key(&data.jwt_key())?;
        let jwt = &topology.reverse_proxy.jwt;
        let token =
            causeway_proxy::auth::issue_scoped(&key, jwt, DEMO_USER, &[scopes::DEBUG], 300)?;
        let operator_token = causeway_proxy::auth::issue_scoped(
            &key,
            jwt,
            DEMO_OPERATOR,
            &[scopes::ADMIN, scopes::DEBUG],
            300,
        )?;
        Ok(Self {
            state,
            data,
            edge,
            token,
            operator_token,
        })
    }
}

pub async fn rest(topology: &Topology, data_dir: &Path) -> anyhow::Result<String> {
    let DemoAccess {
        state,
        data,
        edge,
        token,
        ..
    } = DemoAccess::load(topology, data_dir)?;

    // The demo's own look at DNS, as `dig order-service.internal A` would see it.
    let discovery = Discovery::new(state.dns, &topology.discovery.zone)?;
    let own_lookup = discovery.addresses("order-service").await;

    let trace = TraceContext::continue_from(&HeaderMap::new());
    let mut headers = HeaderMap::new();
    trace.inject(&mut headers);
    headers.insert(
        header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}"))?,
    );
    let path = format!("/api/users/{DEMO_USER}/orders");
    let response = crate::edge::request(
        edge,
        "localhost",
        &data.ca_cert(),
        Method::GET,
        &path,
        headers,
        Bytes::new(),
    )
    .await?;
    if !response.status.is_success() {
        bail!(
            "the request failed with {}: {}",
            response.status,
            String::from_utf8_lossy(&response.body)
        );
    }
    let body = response.json()?;
    let entries = server_timing::parse(&response.headers);
    let find = |name: &str| entries.iter().find(|entry| entry.name == name);
    let ms = |entry: Option<&TimingEntry>| entry.and_then(|e| e.duration_ms).unwrap_or(0.0);
    let desc = |entry: Option<&TimingEntry>| {
        entry
            .and_then(|e| e.description.clone())
            .unwrap_or_else(|| "(not reported)".into())
    };
    let request_id = response
        .headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();

    let upstream = find(steps::UPSTREAM);
    let order_service = find(steps::ORDER_SERVICE);
    let orders = body.get("orders").cloned().unwrap_or_default();
    let order_count = orders.as_array().map(Vec::len).unwrap_or(0);
    let orders_json = serde_json::to_string(&orders)?;
    let wire_ms = (ms(upstream) - ms(order_service)).max(0.0);

    let mut out = String::new();
    let _ = writeln!(
        out,
        "REST over HTTPS: User Service -> Order Service\n\
         request  GET https://localhost:{}{path}  (request id {request_id}, trace {})\n\
         client   TCP {:.2} ms, TLS {:.2} ms, response after {:.2} ms, {:.2} ms in all: {}\n",
        edge.port(),
        trace.trace_id,
        millis(response.timings.tcp),
        millis(response.timings.tls),
        millis(response.timings.to_headers),
        millis(response.timings.total),
        response.status
    );
    let mut step = |number: u32, name: &str, latency: Option<f64>, what: String| {
        let latency = latency
            .map(|ms| format!("{ms:>8.3} ms"))
            .unwrap_or_else(|| format!("{:>11}", "-"));
        let _ = writeln!(out, " {number}. {name:<15} {latency}  {what}");
    };
    let own = match &own_lookup {
        Ok((addresses, elapsed)) => format!(
            "; the demo's own query order-service.internal A -> {} ({:.3} ms)",
            addresses
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            millis(*elapsed)
        ),
        Err(err) => format!("; the demo's own query failed: {err}"),
    };
    step(
        1,
        "DNS lookup",
        Some(ms(find(steps::DNS))),
        format!("User Service resolved {}{own}", desc(find(steps::DNS))),
    );
    step(
        2,
        "HTTP request",
        Some(wire_ms),
        format!(
            "{}; on the wire both ways (call minus Order Service's own time)",
            desc(upstream)
        ),
    );
    step(
        3,
        "Reverse proxy",
        Some(ms(find(steps::EDGE_PROXY))),
        desc(find(steps::EDGE_PROXY)),
    );
    step(
        4,
        "Load balancer",
        None,
        format!(
            "edge balancer {edge} spliced the TLS connection to a healthy reverse proxy; \
             User Service's client library: {}",
            desc(find(steps::BALANCE))
        ),
    );
    step(
        5,
        "Order Service",
        Some(ms(order_service)),
        format!(
            "{} ({:.3} ms in the database)",
            desc(find(steps::ORDER_DB)),
            ms(find(steps::ORDER_DB))
        ),
    );
    step(
        6,
        "HTTP response",
        Some(ms(upstream)),
        format!("200 application/json with {order_count} orders: {orders_json}"),
    );
    step(
        7,
        "User Service",
        Some(ms(find(steps::USER_SERVICE))),
        format!(
            "{} (user read in {:.3} ms); the client got it after {:.3} ms",
            desc(find(steps::USER_SERVICE)),
            ms(find(steps::USER_DB)),
            millis(response.timings.total)
        ),
    );
    Ok(out)
}

fn millis(duration: std::time::Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}
