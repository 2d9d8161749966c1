//! The one error type every handler returns, and its stable JSON body:
//! `{"error":{"code":"invalid_uuid","message":"userId must be a UUID, got \"x\""}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use polydev_domain::ParseError;
use polydev_store::StoreError;
use serde::Serialize;
use utoipa::ToSchema;

/// An error as the API reports it.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds after which a retry may succeed (429, 503).
    pub retry_after: Option<u64>,
    /// Structured context a client can act on (e.g. a failed boot's stage
    /// and log tail).
    pub details: Option<serde_json::Value>,
    /// What only an operator should read (a failed build's own account):
    /// never sent, except to an admin through `for_caller`.
    pub operator_note: Option<String>,
}

/// The JSON body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `invalid_uuid`, `user_not_found`, `unauthorized`, …
    #[schema(example = "invalid_uuid")]
    pub code: String,
    /// For people; may change between versions.
    #[schema(example = "userId must be a UUID, got \"abc\"")]
    pub message: String,
    /// Structured context, for some errors (e.g. `sandbox_boot_failed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub details: Option<serde_json::Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
            details: None,
            operator_note: None,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "sign in or send Authorization: Bearer <token>",
        )
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn user_not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "user_not_found", "no such user")
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn too_many_requests(message: impl Into<String>, retry_after: u64) -> Self {
        Self {
            retry_after: Some(retry_after.max(1)),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message)
        }
    }

    pub fn unavailable(message: impl Into<String>, retry_after: u64) -> Self {
        Self {
            retry_after: Some(retry_after.max(1)),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
        }
    }

    /// A 500 whose detail goes to the log only, never to the client.
    pub fn internal(context: &str, err: &dyn std::error::Error) -> Self {
        tracing::error!(error = %error_chain(err), "{context}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; the request id in the x-request-id header identifies it in the server log",
        )
    }
}

/// `err: source: source…`, for logs.
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
                details: self.details,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

impl From<ParseError> for ApiError {
    fn from(err: ParseError) -> Self {
        let code = match err {
            ParseError::InvalidUuid { .. } => "invalid_uuid",
            ParseError::InvalidEmail(_) => "invalid_email",
            ParseError::InvalidPassword(_) => "invalid_password",
            ParseError::UnknownRole(_) => "invalid_role",
            ParseError::UnknownProvider(_) => "invalid_provider",
        };
        ApiError::bad_request(code, err.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::NotFound => ApiError::not_found("not found"),
            StoreError::Conflict(what) => ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("{what} already exists"),
            ),
            StoreError::Unavailable(ref e) => {
                tracing::warn!(error = %error_chain(e), "store unavailable");
                ApiError::unavailable("the store is unavailable; try again shortly", 2)
            }
            other => ApiError::internal("store error", &other),
        }
    }
}

/// The error responses a route can give, for OpenAPI.
pub(crate) type ApiResult<T> = Result<T, ApiError>;
