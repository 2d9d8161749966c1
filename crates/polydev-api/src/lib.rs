//! polydev's HTTP API: the routes, their auth and error shape, the OpenAPI document.
//!
//! [`router`] builds the whole axum `Router` from an [`AppState`]. Handlers
//! parse input into domain types at the edge (`UserId::parse`, `Email::parse`)
//! and return [`ApiError`], so every failure has the same JSON shape.
//!
//! Invariants:
//! - Every response carries `x-request-id`; every log line of a request is
//!   inside a span with that id.
//! - No 5xx body carries internal error text; the log has it.
//! - Work on a request has a deadline (`ApiConfig::request_timeout`).

mod auth;
mod error;
mod error_map;
mod exec_gate;
mod extract;
mod limits;
mod metrics;
mod middleware;
mod openapi;
mod origin;
mod routes;
mod schema;
mod serve;
mod state;
mod web;
pub mod ws;

use axum::extract::DefaultBodyLimit;
use axum::Router;

pub use auth::{mint_token, token_hash, MintedToken, PasswordHasherPool, SESSION_COOKIE};
pub use error::{ApiError, ErrorBody};
pub use metrics::HttpMetrics;
pub use openapi::openapi_json;
pub use serve::serve;
pub use state::{ApiConfig, AppState, BuildInfo, Observability};
/// The viewer WebSocket ↔ stream pump (also measured by `polydev-bench stream`).
pub use ws::bridge;

/// The whole HTTP surface: API routes, the web UI, and the layers that give
/// every response a request id, a deadline and the JSON error shape.
pub fn router(state: AppState) -> Router {
    let api = routes::api_routes()
        .layer(DefaultBodyLimit::max(state.config.body_limit))
        .layer(axum::middleware::from_fn_with_state(
            state.config.clone(),
            origin::cookie_writes_from_our_pages,
        ))
        .with_state(state.clone());
    Router::new()
        .merge(api)
        .merge(web::routes())
        .fallback(middleware::not_found)
        .method_not_allowed_fallback(middleware::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            (state.config.request_timeout, state.config.body_limit),
            middleware::deadline,
        ))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            middleware::panic_response,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.observability.http.clone(),
            middleware::request_span,
        ))
}
