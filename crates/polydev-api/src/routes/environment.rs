//! `GET /api/admin/environment`: what sandboxes are made from and of, for
//! an admin who wants to know why nothing works: each template's image and
//! how far its preparation is (step, or the build's error), the warm pools
//! (target and ready), and how many sandboxes live against the host's
//! maximum.

use axum::extract::State;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::AdminUser;
use crate::error::{ApiResult, ErrorBody};
use crate::state::AppState;

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Environment {
    /// The sandbox driver (`local`).
    driver: &'static str,
    /// Sandboxes alive now, and the most this host runs at once.
    live: usize,
    host_max: u32,
    /// Every template: `{template, image, validated, status}`; `status`
    /// is `{state: ready|missing}`, `{state: building, step, of, what,
    /// sinceMs}`, `{state: queued}` or `{state: failed, error, atMs}`.
    #[schema(value_type = Vec<Object>)]
    images: Vec<polydev_sandbox::build::TemplateStatus>,
    pools: Vec<Pool>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Pool {
    template: String,
    /// How many warm sandboxes the pool keeps.
    target: usize,
    /// How many are ready now.
    ready: usize,
}

/// The sandbox environment: images, preparation, pools, capacity (admins
/// only).
#[utoipa::path(get, operation_id = "admin_environment", path = "/api/admin/environment", tag = "admin",
    security(("bearer" = [])),
    responses(
        (status = 200, body = Environment),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 503, description = "This controller runs no sandboxes", body = ErrorBody)))]
pub(crate) async fn get(
    State(state): State<AppState>,
    _: AdminUser,
) -> ApiResult<Json<Environment>> {
    let m = state.manager()?;
    let images = m.images().clone();
    let images =
        tokio::task::spawn_blocking(move || polydev_sandbox::build::template_status(&images))
            .await
            .unwrap_or_default();
    let pools = m
        .config()
        .pools
        .iter()
        .map(|(template, &target)| Pool {
            template: template.clone(),
            target,
            ready: m.pool_len(template),
        })
        .collect();
    Ok(Json(Environment {
        driver: m.driver_name(),
        live: m.live(),
        host_max: m.config().host_max,
        images,
        pools,
    }))
}
