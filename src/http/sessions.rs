//! `/api/sessions`: the registry of sessions whose assets assetd keeps.

use std::collections::HashMap;

use serde::Serialize;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::Filter;

use super::auth::authenticated;
use super::error::{ApiError, ErrorBody};
use super::fields;
use super::{get_or_head, json_body, query_map, respond, with_context, Context, JsonBody};
use crate::app::sessions::SessionBody;
use crate::app::CommandContext;
use crate::domain::names::{Directory, SessionId};
use crate::domain::principal::Principal;
use crate::projections::read::{AssetInfo, ListingCursor, SessionInfo};

/// A page of a session's assets.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AssetPage {
    pub assets: Vec<ListedAsset>,
    /// Pass as `cursor` to get the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// An asset in a listing, with a fresh access token for it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ListedAsset {
    #[serde(flatten)]
    pub info: AssetInfo,
    pub access_token: String,
}

const DEFAULT_PAGE: i64 = 100;
pub(crate) const MAX_PAGE: i64 = 1000;

pub fn routes(ctx: Context) -> BoxedFilter<(warp::reply::Response,)> {
    let session_id = warp::path("sessions").and(warp::path::param::<String>());
    let put = session_id
        .and(warp::path::end())
        .and(warp::put())
        .and(json_body(ctx.settings.body_idle_timeout))
        .and(authenticated(ctx.clone()))
        .and(super::request_context())
        .and(with_context(ctx.clone()))
        .then(|id, body, principal, request_id, ctx| async move {
            respond(put_session(id, principal, request_id, body, ctx).await)
        });
    let get = session_id
        .and(warp::path::end())
        .and(get_or_head())
        .and(authenticated(ctx.clone()))
        .and(with_context(ctx.clone()))
        .then(|id, principal, ctx| async move { respond(get_session(id, principal, ctx).await) });
    let delete = session_id
        .and(warp::path::end())
        .and(warp::delete())
        .and(authenticated(ctx.clone()))
        .and(super::request_context())
        .and(warp::header::headers_cloned())
        .and(with_context(ctx.clone()))
        .then(|id, principal, request_id, headers, ctx| async move {
            respond(delete_session(id, principal, request_id, headers, ctx).await)
        });
    let list = session_id
        .and(warp::path!("assets"))
        .and(get_or_head())
        .and(authenticated(ctx.clone()))
        .and(query_map())
        .and(with_context(ctx))
        .then(|id, principal, query, ctx| async move { respond(list_assets(id, principal, query, ctx).await) });
    put.or(get).unify().or(delete).unify().or(list).unify().boxed()
}

/// A listing's `limit`: 1 to [`MAX_PAGE`], [`DEFAULT_PAGE`] when absent.
pub(super) fn page_limit(query: &HashMap<String, String>) -> Result<i64, ApiError> {
    match query.get("limit") {
        None => Ok(DEFAULT_PAGE),
        Some(raw) => raw.parse::<i64>().ok().filter(|l| (1..=MAX_PAGE).contains(l)).ok_or_else(|| {
            ApiError::bad_request("invalid_parameter", format!("limit must be an integer from 1 to {MAX_PAGE}"))
        }),
    }
}

pub(super) fn parse_session_id(raw: &str) -> Result<SessionId, ApiError> {
    let id: i64 =
        raw.parse().map_err(|_| ApiError::bad_request("invalid_parameter", "id_session must be an integer"))?;
    SessionId::new(id).map_err(ApiError::invalid_field)
}

/// Register or update a session (services).
#[utoipa::path(put, path = "/api/sessions/{id_session}", tag = "sessions",
    params(("id_session" = fields::SessionId, Path, description = "OpenTera session id")),
    request_body = SessionBody,
    responses(
        (status = 200, description = "the session as registered", body = SessionInfo),
        (status = 400, description = "malformed request", body = ErrorBody),
        (status = 401, description = "no or bad token", body = ErrorBody),
        (status = 403, description = "not a service", body = ErrorBody),
        (status = 422, description = "invalid field", body = ErrorBody),
        (status = 413, description = "body over 1 MiB", body = ErrorBody),
        (status = 415, description = "body not application/json", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn put_session(
    id: String,
    principal: Principal,
    request_id: String,
    body: JsonBody,
    ctx: Context,
) -> Result<impl warp::Reply, ApiError> {
    let id_session = parse_session_id(&id)?;
    let command = body.parse::<SessionBody>().await?.into_command(id_session);
    let session =
        ctx.app.upsert_session(&principal, &CommandContext::for_request(&principal, &request_id), command).await?;
    Ok(warp::reply::json(&session))
}

/// A session (members and services).
#[utoipa::path(get, path = "/api/sessions/{id_session}", tag = "sessions",
    params(("id_session" = fields::SessionId, Path, description = "OpenTera session id")),
    responses(
        (status = 200, description = "the session", body = SessionInfo),
        (status = 401, description = "no or bad token", body = ErrorBody),
        (status = 403, description = "not a member", body = ErrorBody),
        (status = 404, description = "unknown session", body = ErrorBody),
        (status = 400, description = "id_session is not an integer", body = ErrorBody),
        (status = 422, description = "id_session is not positive", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn get_session(id: String, principal: Principal, ctx: Context) -> Result<impl warp::Reply, ApiError> {
    let session = ctx.app.session_for(&principal, parse_session_id(&id)?).await?;
    Ok(warp::reply::json(&session))
}

/// The answer to `DELETE /sessions/{id_session}`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct SessionDeletionAccepted {
    pub id_session: i64,
    /// The job that deletes the session's assets, in batches.
    pub job_uuid: uuid::Uuid,
    /// Where to follow that job.
    pub status_url: String,
}

/// Delete a session (services). It is gone at once (its members lose access to its
/// assets, its unfinished jobs are cancelled, its uploads expire); its assets are
/// deleted in batches by a job (`purge_session`), whose progress counts them.
#[utoipa::path(delete, path = "/api/sessions/{id_session}", tag = "sessions",
    params(("id_session" = fields::SessionId, Path, description = "OpenTera session id")),
    responses(
        (status = 202, description = "deleted; its assets are being deleted by the job", body = SessionDeletionAccepted),
        (status = 401, description = "no or bad token", body = ErrorBody),
        (status = 403, description = "not a service", body = ErrorBody),
        (status = 404, description = "unknown session", body = ErrorBody),
        (status = 400, description = "id_session is not an integer", body = ErrorBody),
        (status = 422, description = "id_session is not positive", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn delete_session(
    id: String,
    principal: Principal,
    request_id: String,
    headers: warp::http::HeaderMap,
    ctx: Context,
) -> Result<impl warp::Reply, ApiError> {
    let id_session = parse_session_id(&id)?;
    let app = ctx.app.clone();
    let policy = ctx.settings.import_policy;
    let job_uuid = ctx
        .app
        .run_to_completion(async move {
            let command = CommandContext::for_request(&principal, &request_id);
            app.delete_session(&principal, &command, id_session, policy).await
        })
        .await?;
    let origin = super::origin(&ctx.settings, &headers);
    let status_url = format!("{origin}{}/api/jobs/{job_uuid}", ctx.settings.base_path);
    let accepted = SessionDeletionAccepted { id_session: id_session.get(), job_uuid, status_url };
    Ok(warp::reply::with_status(warp::reply::json(&accepted), warp::http::StatusCode::ACCEPTED))
}

/// A session's assets, newest first, keyset-paginated.
#[utoipa::path(get, path = "/api/sessions/{id_session}/assets", tag = "sessions",
    params(
        ("id_session" = fields::SessionId, Path, description = "OpenTera session id"),
        ("limit" = Option<fields::PageSize>, Query, description = "page size, 1 to 1000 (default 100)"),
        ("cursor" = Option<fields::ListingCursor>, Query, description = "next_cursor of the previous page"),
        ("directory" = Option<fields::Directory>, Query, description = "only assets directly in this virtual folder"),
    ),
    responses(
        (status = 200, description = "a page of assets", body = AssetPage),
        (status = 400, description = "bad limit or cursor", body = ErrorBody),
        (status = 401, description = "no or bad token", body = ErrorBody),
        (status = 403, description = "not a member", body = ErrorBody),
        (status = 404, description = "unknown session", body = ErrorBody),
        (status = 422, description = "invalid directory or id_session", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn list_assets(
    id: String,
    principal: Principal,
    query: HashMap<String, String>,
    ctx: Context,
) -> Result<impl warp::Reply, ApiError> {
    let id_session = parse_session_id(&id)?;
    let limit = page_limit(&query)?;
    let cursor = match query.get("cursor").filter(|c| !c.is_empty()) {
        None => None,
        Some(raw) => Some(
            ListingCursor::decode(raw)
                .ok_or_else(|| ApiError::bad_request("invalid_parameter", "cursor is not one this server issued"))?,
        ),
    };
    let directory = match query.get("directory") {
        None => None,
        Some(raw) => Some(Directory::parse(raw).map_err(ApiError::invalid_field)?),
    };
    let assets = ctx
        .app
        .session_assets(&principal, id_session, directory.as_ref().map(Directory::as_str), cursor, limit + 1)
        .await?;
    let has_more = assets.len() as i64 > limit;
    let page: Vec<AssetInfo> = assets.into_iter().take(limit as usize).collect();
    let next_cursor = has_more
        .then(|| {
            page.last()
                .map(|last| ListingCursor { created_at: last.asset_created_at, asset_uuid: last.asset_uuid }.encode())
        })
        .flatten();
    let assets = page
        .into_iter()
        .map(|info| ListedAsset { access_token: ctx.app.asset_token(info.asset_uuid, &principal), info })
        .collect();
    Ok(warp::reply::with_status(warp::reply::json(&AssetPage { assets, next_cursor }), StatusCode::OK))
}
