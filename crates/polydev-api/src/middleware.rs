//! Layers around every route: request id and log span, deadline, panics,
//! and JSON bodies for 404/405.

use std::any::Any;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::Instrument;

use crate::error::ApiError;
use crate::metrics::HttpMetrics;

pub(crate) const REQUEST_ID: &str = "x-request-id";

/// Accepts a caller's request id when it is short and plain, else makes one.
fn request_id(req: &Request) -> String {
    req.headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// Gives the request an id, runs it inside a span carrying that id, logs
/// one line when it completes (debug; warn for 5xx), records its duration,
/// and echoes the id in the response.
pub(crate) async fn request_span(
    State(metrics): State<Option<HttpMetrics>>,
    req: Request,
    next: Next,
) -> Response {
    let id = request_id(&req);
    let method = req.method().clone();
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        method = %method,
        route = tracing::field::Empty,
        user_id = tracing::field::Empty,
    );
    let started = Instant::now();
    let mut response = next.run(req).instrument(span.clone()).await;
    let status = response.status();
    let route = response
        .extensions()
        .get::<MatchedRoute>()
        .map(|r| r.0.as_str())
        .unwrap_or("unmatched");
    span.record("route", route);
    let elapsed = started.elapsed();
    if let Some(metrics) = &metrics {
        metrics.observe(&method, route, status.as_u16(), elapsed);
    }
    let elapsed_ms = (elapsed.as_secs_f64() * 1e6).round() / 1000.0;
    span.in_scope(|| {
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), elapsed_ms, "request failed");
        } else {
            tracing::debug!(status = status.as_u16(), elapsed_ms, "request done");
        }
    });
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    response
}

/// The route template a request matched (e.g. `/api/users/{id}`), never
/// the raw path: safe as a low-cardinality label.
#[derive(Debug, Clone)]
pub(crate) struct MatchedRoute(pub(crate) String);

/// Inside the router (as a `route_layer`): puts the matched route template
/// on the response, where `request_span` records it.
pub(crate) async fn record_route(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let mut response = next.run(req).await;
    if let Some(route) = route {
        response.extensions_mut().insert(MatchedRoute(route));
    }
    response
}

/// Whether a request bounds its own time instead: a JSON exec answers when
/// its command ends, which its `timeoutMs` (at most an hour) bounds, plus
/// a grace for the agent (the handler's own deadline).
fn bounds_itself(req: &Request) -> bool {
    let path = req.uri().path();
    req.method() == axum::http::Method::POST
        && path
            .strip_prefix("/api/sandboxes/")
            .and_then(|rest| rest.strip_suffix("/exec"))
            .is_some_and(|id| !id.is_empty() && !id.contains('/'))
}

/// Whether a request's body streams through its handler, which bounds
/// each read and the whole (a run's workspace upload: up to hundreds of
/// MiB, relayed to the sandbox as it arrives).
fn streams_itself(req: &Request) -> bool {
    let path = req.uri().path();
    req.method() == axum::http::Method::PUT
        && path
            .strip_prefix("/api/runs/")
            .and_then(|rest| rest.split_once("/workspace/"))
            .is_some_and(|(id, provider)| {
                !id.is_empty()
                    && !id.contains('/')
                    && !provider.is_empty()
                    && !provider.contains('/')
            })
}

/// Bounds the time to a response head. A request that bounds its own
/// (`bounds_itself`) still has its body read within the deadline: only
/// the work after it is the handler's to bound.
pub(crate) async fn deadline(
    State((limit, body_limit)): State<(Duration, usize)>,
    req: Request,
    next: Next,
) -> Response {
    if streams_itself(&req) {
        return next.run(req).await;
    }
    if bounds_itself(&req) {
        let (parts, body) = req.into_parts();
        return match tokio::time::timeout(limit, axum::body::to_bytes(body, body_limit)).await {
            Ok(Ok(bytes)) => {
                next.run(Request::from_parts(parts, Body::from(bytes)))
                    .await
            }
            Ok(Err(_)) => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the request body is larger than {body_limit} bytes, or broke off"),
            )
            .into_response(),
            Err(_) => ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!(
                    "the request body did not arrive within {} s",
                    limit.as_secs()
                ),
            )
            .into_response(),
        };
    }
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!(
                limit_ms = limit.as_millis() as u64,
                "request deadline passed"
            );
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "timeout",
                format!("the request did not finish within {} s", limit.as_secs()),
            )
            .into_response()
        }
    }
}

/// A panic becomes a 500 in the usual shape; the log keeps the message.
pub(crate) fn panic_response(err: Box<dyn Any + Send + 'static>) -> Response<Body> {
    let detail = err
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| err.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    tracing::error!(panic = detail, "handler panicked");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "internal error; the request id in the x-request-id header identifies it in the server log",
    )
    .into_response()
}

pub(crate) async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(format!(
        "no route for {} {}",
        req.method(),
        req.uri().path()
    ))
}

pub(crate) async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

#[cfg(test)]
mod deadline_tests {
    use super::*;

    #[test]
    fn only_a_sandbox_exec_bounds_its_own_time() {
        let req = |method: &str, path: &str| {
            axum::http::Request::builder()
                .method(method)
                .uri(path)
                .body(axum::body::Body::empty())
                .unwrap()
        };
        assert!(bounds_itself(&req("POST", "/api/sandboxes/sb-1/exec")));
        for (m, p) in [
            ("GET", "/api/sandboxes/sb-1/exec"),
            ("POST", "/api/sandboxes/sb-1/exec/x"),
            ("POST", "/api/sandboxes//exec"),
            ("POST", "/api/sandboxes/a/b/exec"),
            ("POST", "/api/runs"),
            ("PUT", "/api/sandboxes/sb-1/files"),
        ] {
            assert!(!bounds_itself(&req(m, p)), "{m} {p}");
        }
    }
}
