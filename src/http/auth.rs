//! Authentication of requests: a [`Principal`] from the `Authorization` header
//! (`OpenTera <token>` or `Bearer <token>`), checked before any body is read.
//!
//! In OpenTera mode the token is OpenTera's instead (see `crate::opentera`): taken from
//! the header, the `token` argument or the `OpenTera` cookie, and every failure is a 403,
//! as in OpenTera's FileTransferService.

use warp::http::{HeaderMap, StatusCode};
use warp::{Filter, Rejection};

use super::error::ApiError;
use super::{with_context, Context};
use crate::auth::{token_from_authorization, Authenticator, TokenError};
use crate::domain::principal::Principal;
use crate::opentera::tokens::TokenRule;

/// The filter every API route but the upload starts with (the upload guards its body
/// first, then calls [`authenticate`]).
pub fn authenticated(ctx: Context) -> impl Filter<Extract = (Principal,), Error = Rejection> + Clone {
    warp::header::headers_cloned()
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(with_context(ctx))
        .and_then(|headers: HeaderMap, query: String, ctx: Context| async move {
            authenticate(&headers, &query, &ctx).await.map_err(Rejection::from)
        })
}

/// The request's principal: from assetd's own tokens, or OpenTera's in OpenTera mode
/// (dynamic tokens, and devices', on these routes).
pub async fn authenticate(headers: &HeaderMap, query: &str, ctx: &Context) -> Result<Principal, ApiError> {
    match &ctx.app.opentera {
        None => authenticate_native(headers, &ctx.app.auth),
        Some(opentera) => {
            let token = query_token(query);
            match opentera.authenticate(headers, token.as_deref(), TokenRule::DynamicOnly).await {
                Ok(Some(caller)) => Ok(caller.principal),
                Ok(None) => Err(forbidden()),
                Err(error) => Err(opentera_unavailable(error)),
            }
        }
    }
}

/// The `token` query argument (OpenTera's second token source).
pub fn query_token(query: &str) -> Option<String> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(query)
        .ok()?
        .into_iter()
        .find(|(name, _)| name == "token")
        .map(|(_, value)| value)
}

/// OpenTera's answer to any authentication failure.
pub fn forbidden() -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", "Forbidden")
}

/// 503: OpenTera's Redis or TeraServer could not be asked.
pub fn opentera_unavailable(error: crate::opentera::OpenTeraError) -> ApiError {
    tracing::warn!(%error, "OpenTera unavailable");
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "opentera_unavailable", error.to_string())
        .with_header("retry-after", crate::app::RETRY_AFTER_SECONDS.to_string())
}

fn authenticate_native(headers: &HeaderMap, auth: &Authenticator) -> Result<Principal, ApiError> {
    let header = headers.get("authorization").ok_or_else(|| {
        ApiError::unauthorized(
            "missing_token",
            "an Authorization: OpenTera <token> or Bearer <token> header is required",
        )
    })?;
    let token = header.to_str().ok().and_then(token_from_authorization).ok_or_else(|| {
        ApiError::unauthorized(
            "invalid_token",
            "the Authorization header must be 'OpenTera <token>' or 'Bearer <token>'",
        )
    })?;
    auth.verify(token).map_err(|error| match error {
        TokenError::Expired => ApiError::unauthorized("token_expired", "the token has expired"),
        TokenError::Invalid => ApiError::unauthorized("invalid_token", error.to_string()),
        TokenError::LivesTooLong(_) => ApiError::unauthorized("token_lifetime_too_long", error.to_string()),
    })
}
