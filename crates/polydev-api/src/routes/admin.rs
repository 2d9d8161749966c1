use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::users::UserView;
use crate::auth::AdminUser;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::ApiQuery;
use crate::state::AppState;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct Page {
    /// At most this many (1–500, default 100).
    limit: Option<i64>,
    /// Skip this many (default 0).
    offset: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct UserList {
    users: Vec<UserView>,
    total: i64,
}

/// Every user (admins only).
#[utoipa::path(get, path = "/api/admin/users", tag = "admin", params(Page),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Users, oldest first", body = UserList),
        (status = 400, description = "Bad paging", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody)))]
pub(crate) async fn list_users(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    ApiQuery(page): ApiQuery<Page>,
) -> ApiResult<Json<UserList>> {
    let limit = page.limit.unwrap_or(100);
    let offset = page.offset.unwrap_or(0);
    if !(1..=500).contains(&limit) || offset < 0 {
        return Err(ApiError::bad_request(
            "invalid_query",
            "limit must be 1–500 and offset must not be negative",
        ));
    }
    tracing::debug!(admin_id = %admin.user.id, limit, offset, "admin listed users");
    let users = state.store.list_users(limit, offset).await?;
    let total = state.store.count_users().await?;
    Ok(Json(UserList {
        users: users.iter().map(UserView::from).collect(),
        total,
    }))
}
