//! The authentication filter: every API route takes a [`Principal`] from the
//! `Authorization` header, so a bad token is refused (401) before any body is read.

use warp::{Filter, Rejection};

use super::error::ApiError;
use super::{with_context, Context};
use crate::auth::{token_from_authorization, TokenError};
use crate::domain::principal::Principal;

pub fn authenticated(
    ctx: Context,
) -> impl Filter<Extract = (Principal,), Error = Rejection> + Clone {
    warp::header::headers_cloned()
        .and(with_context(ctx))
        .and_then(|headers: warp::http::HeaderMap, ctx: Context| async move {
            let header = headers.get("authorization").ok_or_else(|| {
                ApiError::unauthorized(
                    "missing_token",
                    "an Authorization: OpenTera <token> or Bearer <token> header is required",
                )
            })?;
            let token = header
                .to_str()
                .ok()
                .and_then(token_from_authorization)
                .ok_or_else(|| {
                    ApiError::unauthorized(
                        "invalid_token",
                        "the Authorization header must be 'OpenTera <token>' or 'Bearer <token>'",
                    )
                })?;
            ctx.app.auth.verify(token).map_err(|error| {
                warp::reject::custom(match error {
                    TokenError::Expired => {
                        ApiError::unauthorized("token_expired", "the token has expired")
                    }
                    TokenError::Invalid => {
                        ApiError::unauthorized("invalid_token", error.to_string())
                    }
                })
            })
        })
}
