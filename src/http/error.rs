//! The JSON error of API.md, `{"error": {"code", "message", "request_id"}}`, and the one
//! place where rejections and application errors become HTTP statuses.

use std::convert::Infallible;

use serde::Serialize;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Rejection, Reply};

use super::request_id;
use crate::app::AppError;
use crate::domain::names::InvalidValue;
use crate::domain::DomainError;

/// An error answer. Rejected through warp so filters (auth, limits) can fail early.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Extra response headers (e.g. `Content-Range` on a 416).
    pub headers: Vec<(&'static str, String)>,
}

impl warp::reject::Reject for ApiError {}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), headers: Vec::new() }
    }
    pub fn with_header(mut self, name: &'static str, value: String) -> Self {
        self.headers.push((name, value));
        self
    }
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    pub fn invalid_field(error: InvalidValue) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", error.to_string())
    }
    pub fn not_found(what: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", format!("{what} not found"))
    }
    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code, message)
    }
    pub fn too_large(limit: u64) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the upload exceeds the limit of {limit} bytes"),
        )
    }
    pub fn internal(error: impl std::fmt::Debug) -> Self {
        tracing::error!(?error, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "an internal error occurred; the request id identifies it in the logs",
        )
    }
    /// 503: a dependency (the database) is down or going away; `Retry-After` says when
    /// to try again.
    pub fn unavailable(error: impl std::fmt::Display) -> Self {
        tracing::warn!(%error, "dependency unavailable");
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "a dependency is unavailable; try again shortly")
            .with_header("retry-after", crate::app::RETRY_AFTER_SECONDS.to_string())
    }
}

/// The body of every error answer.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// A stable snake_case code, e.g. `invalid_token`.
    pub code: String,
    pub message: String,
    pub request_id: String,
}

impl Reply for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message.clone(),
                request_id: request_id::current(),
            },
        };
        let mut response = warp::reply::with_status(warp::reply::json(&body), self.status).into_response();
        for (name, value) in &self.headers {
            if let Ok(value) = warp::http::HeaderValue::from_str(value) {
                response.headers_mut().insert(*name, value);
            }
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert("www-authenticate", warp::http::HeaderValue::from_static("Bearer realm=\"assetd\""));
        }
        response
    }
}

impl From<AppError> for ApiError {
    fn from(error: AppError) -> Self {
        match error {
            AppError::Domain(DomainError::NotFound(what)) => Self::not_found(what),
            AppError::Domain(DomainError::Conflict(message)) => Self::new(StatusCode::CONFLICT, "conflict", message),
            AppError::Domain(DomainError::Invalid(message)) => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", message)
            }
            AppError::Domain(DomainError::Expired(message)) => Self::new(StatusCode::GONE, "upload_expired", message),
            AppError::Unprocessable(code, message) => Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message),
            AppError::TooMany(code, message) => Self::new(StatusCode::TOO_MANY_REQUESTS, code, message),
            AppError::Forbidden(message) => Self::new(StatusCode::FORBIDDEN, "forbidden", message),
            AppError::AccessTokenExpired(message) => Self::new(StatusCode::FORBIDDEN, "access_token_expired", message),
            AppError::EventStore(e) if e.is_conflict() => {
                tracing::info!(error = %e, "conflict after retries");
                Self::new(StatusCode::CONFLICT, "conflict", "the resource was changed concurrently; retry the request")
            }
            // The database going away or out of reach, however it shows (one classifier,
            // shared with the command consumer): 503, never 500.
            error if error.is_database_unavailable() => Self::unavailable(error),
            AppError::Storage(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Self::new(StatusCode::CONFLICT, "conflict", "an asset with this uuid already exists")
            }
            // The S3 bucket out of reach: retry later, as with the database.
            AppError::Storage(e) if crate::blobs::is_backend_unavailable(&e) => Self::unavailable(e),
            // ENOSPC / EDQUOT: the disk is full, which is 507 in API.md.
            AppError::Storage(e) if matches!(e.raw_os_error(), Some(28) | Some(122)) => {
                Self::new(StatusCode::INSUFFICIENT_STORAGE, "storage_full", "no space left to store the upload")
            }
            other => Self::internal(other),
        }
    }
}

/// Turns any rejection into the JSON error shape; nothing escapes as a bare 500.
pub async fn recover(rejection: Rejection) -> Result<Response, Infallible> {
    use warp::reject;
    let error = if let Some(api) = rejection.find::<ApiError>() {
        api.clone()
    } else if rejection.is_not_found() {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
    } else if let Some(e) = rejection.find::<reject::InvalidQuery>() {
        ApiError::bad_request("invalid_query", e.to_string())
    } else if let Some(e) = rejection.find::<reject::InvalidHeader>() {
        ApiError::bad_request("invalid_header", e.to_string())
    } else if let Some(e) = rejection.find::<reject::MissingHeader>() {
        ApiError::bad_request("missing_header", e.to_string())
    } else if rejection.find::<reject::PayloadTooLarge>().is_some() {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", "the request body is too large")
    } else if rejection.find::<reject::LengthRequired>().is_some() {
        ApiError::new(StatusCode::LENGTH_REQUIRED, "length_required", "a Content-Length is required")
    } else if let Some(e) = rejection.find::<reject::UnsupportedMediaType>() {
        ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", e.to_string())
    } else if let Some(e) = rejection.find::<warp::filters::body::BodyDeserializeError>() {
        ApiError::bad_request("invalid_json", e.to_string())
    } else if rejection.find::<reject::MethodNotAllowed>().is_some() {
        ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "this method is not allowed on this route")
    } else {
        ApiError::internal(format!("unhandled rejection: {rejection:?}"))
    };
    Ok(error.into_response())
}
