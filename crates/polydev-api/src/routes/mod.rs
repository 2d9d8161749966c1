//! Every API route, one module per area.

pub(crate) mod admin;
pub(crate) mod egress;
pub(crate) mod environment;
pub(crate) mod health;
pub(crate) mod health_admin;
pub(crate) mod keys;
pub(crate) mod login;
pub(crate) mod providers;
pub(crate) mod runs;
pub(crate) mod sandboxes;
pub(crate) mod session;
pub(crate) mod users;
pub(crate) mod vault;

use axum::routing::{get, post};
use axum::Router;

use crate::middleware::record_route;
use crate::state::AppState;

pub(crate) fn api_routes() -> Router<AppState> {
    Router::new()
        .route("/api/auth/health", get(health::health))
        .route("/healthz", get(health::health))
        .route("/readyz", get(health::ready))
        .route("/api/health/ready", get(health::ready))
        .route("/api/openapi.json", get(crate::openapi::serve))
        .route("/api/client-config", get(health::client_config))
        .route("/api/users", post(users::create))
        .route("/api/users/{id}", get(users::get))
        .route("/api/me", get(users::me))
        .route("/api/auth/login", post(session::login))
        .route("/api/auth/prelogin", get(session::prelogin))
        .route("/api/auth/password", post(session::change_password))
        .route("/api/auth/logout", post(session::logout))
        .route("/api/auth/start", post(login::start))
        .route("/api/auth/providers", get(login::providers))
        .route("/api/providers", get(providers::list))
        .route(
            "/api/auth/session/{id}",
            get(login::get).delete(login::cancel),
        )
        .route("/api/auth/session/{id}/events", get(login::events))
        .route("/api/auth/session/{id}/ticket", post(login::ticket))
        .route("/api/auth/session/{id}/code", post(login::code))
        .route("/api/auth/session/{id}/novnc/websock", get(login::websock))
        .route("/api/admin/users", get(admin::list_users))
        .route("/api/admin/environment", get(environment::get))
        .route("/metrics", get(health_admin::metrics))
        .route("/api/admin/health/system", get(health_admin::system))
        .route("/api/admin/health/cpu", get(health_admin::cpu_route))
        .route("/api/admin/health/memory", get(health_admin::memory_route))
        .route("/api/admin/health/disk", get(health_admin::disk_route))
        .route(
            "/api/admin/health/network",
            get(health_admin::network_route),
        )
        .route(
            "/api/admin/health/temperature",
            get(health_admin::temperature_route),
        )
        .route(
            "/api/admin/health/network-health",
            get(health_admin::network_health),
        )
        .route("/api/admin/health/history", get(health_admin::history))
        .route("/api/admin/alerts", get(health_admin::alerts))
        .route("/api/admin/egress/credentials", post(egress::mint))
        .route(
            "/api/admin/egress/credentials/{username}",
            axum::routing::delete(egress::revoke),
        )
        .route("/api/egress/usage", get(egress::usage))
        .route("/api/vault/keys", get(vault::get_keys).put(vault::put_keys))
        .route("/api/vault/items", get(vault::list_items))
        .route(
            "/api/vault/items/{id}",
            get(vault::get_item)
                .put(vault::put_item)
                .delete(vault::delete_item),
        )
        .route(
            "/api/sandboxes",
            get(sandboxes::list).post(sandboxes::create),
        )
        .route(
            "/api/sandboxes/{id}",
            get(sandboxes::get).delete(sandboxes::delete),
        )
        .route("/api/sandboxes/{id}/exec", post(sandboxes::exec))
        .route(
            "/api/sandboxes/{id}/files",
            get(sandboxes::get_file).put(sandboxes::put_file),
        )
        .route("/api/runs", get(runs::history).post(runs::start))
        .route("/api/runs/{id}", get(runs::get).delete(runs::cancel))
        .route(
            "/api/runs/{id}/providers/{provider}",
            axum::routing::delete(runs::cancel_provider),
        )
        .route("/api/runs/{id}/credentials", post(runs::credentials))
        .route(
            "/api/runs/{id}/workspace/{provider}",
            axum::routing::put(runs::workspace),
        )
        .route("/api/runs/{id}/diff/{provider}", get(runs::diff))
        .route("/api/runs/{id}/events", get(runs::events))
        .route("/api/vms/create", post(sandboxes::vm_create))
        .route("/api/vms/{id}", axum::routing::delete(sandboxes::vm_delete))
        .route_layer(axum::middleware::from_fn(record_route))
}
