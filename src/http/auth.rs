//! Authentication of requests: a [`Principal`] from the `Authorization` header
//! (`OpenTera <token>` or `Bearer <token>`), checked before any body is read.

use warp::http::HeaderMap;
use warp::{Filter, Rejection};

use super::error::ApiError;
use super::{with_context, Context};
use crate::auth::{token_from_authorization, Authenticator, TokenError};
use crate::domain::principal::Principal;

/// The filter every API route but the upload starts with (the upload guards its body
/// first, then calls [`authenticate`]).
pub fn authenticated(ctx: Context) -> impl Filter<Extract = (Principal,), Error = Rejection> + Clone {
    warp::header::headers_cloned().and(with_context(ctx)).and_then(|headers: HeaderMap, ctx: Context| async move {
        authenticate(&headers, &ctx.app.auth).map_err(Rejection::from)
    })
}

pub fn authenticate(headers: &HeaderMap, auth: &Authenticator) -> Result<Principal, ApiError> {
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
