//! The OpenAPI 3 document, generated from the handlers' annotations and
//! served at `/api/openapi.json`. A snapshot test keeps changes deliberate.

use axum::http::header;
use axum::response::IntoResponse;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::routes::{
    admin, egress, environment, health, health_admin, login, providers, runs, sandboxes, session,
    users, vault,
};

#[derive(OpenApi)]
#[openapi(
    info(title = "polydev", description = "Run AI coding CLIs in throw-away sandboxes."),
    paths(
        health::health,
        health::ready,
        health::client_config,
        users::create,
        users::get,
        users::me,
        session::login,
        session::prelogin,
        session::change_password,
        session::logout,
        login::start,
        admin::list_users,
        environment::get,
        health_admin::metrics,
        health_admin::system,
        health_admin::cpu_route,
        health_admin::memory_route,
        health_admin::disk_route,
        health_admin::network_route,
        health_admin::temperature_route,
        health_admin::network_health,
        health_admin::history,
        health_admin::alerts,
        egress::mint,
        egress::revoke,
        egress::usage,
        vault::put_keys,
        vault::get_keys,
        vault::put_item,
        vault::get_item,
        vault::delete_item,
        vault::list_items,
        sandboxes::create,
        sandboxes::list,
        sandboxes::get,
        sandboxes::delete,
        sandboxes::exec,
        sandboxes::put_file,
        sandboxes::get_file,
        sandboxes::vm_create,
        sandboxes::vm_delete,
        runs::start,
        runs::history,
        runs::credentials,
        runs::workspace,
        runs::diff,
        runs::get,
        runs::cancel,
        runs::cancel_provider,
        runs::events,
        login::get,
        login::cancel,
        login::events,
        login::code,
        login::ticket,
        login::providers,
        providers::list,
        login::websock,
    ),
    modifiers(&BearerAuth, &WorkspaceProviders),
    tags(
        (name = "health", description = "Liveness and readiness"),
        (name = "users", description = "Accounts"),
        (name = "auth", description = "Sign-in and provider login sessions"),
        (name = "admin", description = "Operators only"),
        (name = "egress", description = "The per-user egress proxy"),
        (name = "sandboxes", description = "Isolated, throw-away sandboxes: create, exec (streamed), files, delete; v1's /api/vms"),
        (name = "runs", description = "One prompt across the provider CLIs, each in its own sandbox, streamed back"),
        (name = "vault", description = "Encrypted items and wrapped keys (zero-knowledge: see docs/VAULT.md)"),
        (name = "observability", description = "Metrics, host health and alerts (admins only, except /metrics)"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// What a derived schema cannot say: a run with a workspace takes only
/// the CLIs that work on code (`if`/`then` in an `allOf` on the start
/// body, added as an extension and renamed to the keyword in
/// `openapi_json`).
struct WorkspaceProviders;

impl Modify for WorkspaceProviders {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{schema::Schema, RefOr};
        let Some(components) = openapi.components.as_mut() else {
            return;
        };
        if let Some(RefOr::T(Schema::Object(body))) = components.schemas.get_mut("StartBody") {
            let code: Vec<&str> = polydev_domain::Provider::ALL
                .iter()
                .filter(|p| polydev_sessions::providers::works_on_code(**p))
                .map(|p| p.as_str())
                .collect();
            // One extension (its map has no order), the rule inside it.
            let rule = utoipa::openapi::extensions::ExtensionsBuilder::new()
                .add(
                    "allOf",
                    serde_json::json!([{
                        "if": {"required": ["workspace"]},
                        "then": {"properties": {"providers": {"items": {"enum": code}}}},
                    }]),
                )
                .build();
            match body.extensions.as_mut() {
                Some(e) => e.merge(rule),
                None => body.extensions = Some(rule),
            }
        }
    }
}

/// The document as pretty JSON (stable key order, for the snapshot).
pub fn openapi_json() -> String {
    let mut doc = ApiDoc::openapi();
    // The version comes from the crate, not from whatever built it.
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    doc.to_pretty_json()
        // utoipa writes every extension as `x-…`; this one is JSON
        // Schema's own keyword (see `WorkspaceProviders`).
        .map(|j| j.replace("\"x-allOf\": [", "\"allOf\": ["))
        .unwrap_or_else(|_| "{}".to_owned())
}

pub(crate) async fn serve() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], openapi_json())
}

#[cfg(test)]
mod tests {
    /// API changes are deliberate: the document is checked in. After an
    /// intended change, review the diff and bless it with
    /// `POLYDEV_BLESS=1 cargo nextest run -p polydev-api openapi`.
    #[test]
    fn openapi_document_matches_the_snapshot() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");
        let current = format!("{}\n", super::openapi_json());
        if std::env::var_os("POLYDEV_BLESS").is_some() {
            std::fs::write(path, &current).expect("write the snapshot");
        }
        let stored = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            stored == current,
            "the OpenAPI document changed; review it, then bless with POLYDEV_BLESS=1 cargo nextest run -p polydev-api openapi"
        );
    }
}
