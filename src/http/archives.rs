//! `/api/archives`: ask for a zip of a session's assets (or of a list), follow it,
//! download it (Range, ETag, X-Accel-Redirect or a presigned URL, as for assets),
//! delete it. A job builds it; these only read and append.

use std::collections::HashMap;

use serde::Serialize;
use uuid::Uuid;
use warp::filters::BoxedFilter;
use warp::http::{HeaderMap, StatusCode};
use warp::Filter;

use super::auth::authenticated;
use super::error::{ApiError, ErrorBody};
use super::fields;
use super::{get_or_head, json_body, parse_uuid, query_map, request_context, respond, with_context, Context, JsonBody};
use crate::app::archives::ArchiveBody;
use crate::app::CommandContext;
use crate::domain::principal::Principal;
use crate::projections::read::{ArchiveInfo, AssetInfo};

/// The answer to `POST /archives`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ArchiveAccepted {
    pub archive_uuid: Uuid,
    pub job_uuid: Uuid,
    /// `pending`.
    pub archive_status: String,
    /// Where to follow the archive (`GET`).
    pub status_url: String,
}

pub fn routes(ctx: Context) -> BoxedFilter<(warp::reply::Response,)> {
    let request = warp::path!("archives")
        .and(warp::post())
        .and(json_body(ctx.settings.body_idle_timeout))
        .and(authenticated(ctx.clone()))
        .and(request_context())
        .and(warp::header::headers_cloned())
        .and(with_context(ctx.clone()))
        .then(|body, principal, request_id, headers, ctx| async move {
            respond(request_archive(body, principal, request_id, headers, ctx).await)
        });
    let download = warp::path!("archives")
        .and(get_or_head())
        .and(warp::method())
        .and(authenticated(ctx.clone()))
        .and(query_map())
        .and(warp::header::headers_cloned())
        .and(with_context(ctx.clone()))
        .then(|method, principal, query, headers, ctx| async move {
            respond(download_archive(method, principal, query, headers, ctx).await)
        });
    let infos = warp::path!("archives" / "infos")
        .and(get_or_head())
        .and(authenticated(ctx.clone()))
        .and(query_map())
        .and(with_context(ctx.clone()))
        .then(|principal, query, ctx| async move { respond(archive_infos(principal, query, ctx).await) });
    let delete = warp::path!("archives")
        .and(warp::delete())
        .and(authenticated(ctx.clone()))
        .and(request_context())
        .and(query_map())
        .and(with_context(ctx))
        .then(|principal, request_id, query, ctx| async move {
            respond(delete_archive(principal, request_id, query, ctx).await)
        });
    request.or(download).unify().or(infos).unify().or(delete).unify().boxed()
}

/// The archive named by `archive_uuid` (or `uuid`); errors name the parameter the
/// route documents (`primary`).
fn archive_uuid(query: &HashMap<String, String>, primary: &'static str) -> Result<Uuid, ApiError> {
    parse_uuid(primary, query.get("archive_uuid").or(query.get("uuid")))
}

/// A zip of a session's live assets (`id_session`) or of a list of assets
/// (`asset_uuids`), built by a job: follow it with `GET /archives/infos`, then download
/// it with `GET /archives`. Whoever may upload to the session may ask (for a list:
/// whoever may reach every asset of it); the archive is theirs (and services').
#[utoipa::path(post, path = "/api/archives", tag = "archives",
    request_body = ArchiveBody,
    responses(
        (status = 202, description = "the archive is queued", body = ArchiveAccepted),
        (status = 400, description = "malformed request", body = ErrorBody),
        (status = 401, description = "no or bad token", body = ErrorBody),
        (status = 403, description = "no access to the session or to an asset", body = ErrorBody),
        (status = 404, description = "unknown session or asset", body = ErrorBody),
        (status = 413, description = "body over 1 MiB", body = ErrorBody),
        (status = 415, description = "body not application/json", body = ErrorBody),
        (status = 422, description = "invalid field (neither or both of id_session and asset_uuids, a deleted asset…)", body = ErrorBody),
        (status = 429, description = "5 archives of yours are still being built (too_many_archives)", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn request_archive(
    body: JsonBody,
    principal: Principal,
    request_id: String,
    headers: HeaderMap,
    ctx: Context,
) -> Result<impl warp::Reply, ApiError> {
    let body: ArchiveBody = body.parse().await?;
    let scope = body.validate().map_err(ApiError::invalid_field)?;
    let command = CommandContext::for_request(&principal, &request_id);
    let app = ctx.app.clone();
    let policy = ctx.settings.import_policy;
    let archive = ctx
        .app
        .run_to_completion(async move { app.request_archive(&principal, &command, scope, policy).await })
        .await?;
    let origin = super::origin(&ctx.settings, &headers);
    let accepted = ArchiveAccepted {
        archive_uuid: archive.archive_uuid,
        job_uuid: archive.job_uuid,
        archive_status: archive.archive_status.clone(),
        status_url: format!(
            "{origin}{}/api/archives/infos?archive_uuid={}",
            ctx.settings.base_path, archive.archive_uuid
        ),
    };
    Ok(warp::reply::with_status(warp::reply::json(&accepted), StatusCode::ACCEPTED))
}

/// An archive's state (its owner, services, superadmins).
#[utoipa::path(get, path = "/api/archives/infos", tag = "archives",
    params(("archive_uuid" = fields::UuidText, Query, description = "the archive (`uuid` is accepted too)")),
    responses(
        (status = 200, description = "the archive", body = ArchiveInfo),
        (status = 400, description = "missing or malformed archive_uuid", body = ErrorBody),
        (status = 401, description = "no or bad token", body = ErrorBody),
        (status = 403, description = "not the archive's owner", body = ErrorBody),
        (status = 404, description = "unknown archive", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn archive_infos(
    principal: Principal,
    query: HashMap<String, String>,
    ctx: Context,
) -> Result<impl warp::Reply, ApiError> {
    let archive = ctx.app.archive_for(&principal, archive_uuid(&query, "archive_uuid")?).await?;
    Ok(warp::reply::json(&view(archive)))
}

/// The archive as answered: its status at this moment (a completed archive past its
/// time is `expired` before the cleanup gets to it).
fn view(mut archive: ArchiveInfo) -> ArchiveInfo {
    archive.archive_status = archive.status_at(chrono::Utc::now()).to_owned();
    archive
}

/// Download a completed archive (`application/zip`), with Range, ETag and conditional
/// requests as for assets.
#[utoipa::path(get, path = "/api/archives", tag = "archives",
    params(
        ("archive_uuid" = fields::UuidText, Query, description = "the archive (`uuid` is accepted too)"),
        ("Range" = Option<String>, Header, description = "one byte range, e.g. `bytes=0-1023`"),
    ),
    responses(
        (status = 200, description = "the zip", content_type = "application/zip"),
        (status = 206, description = "the range asked for", content_type = "application/zip"),
        (status = 304, description = "If-None-Match or If-Modified-Since: not modified"),
        (status = 412, description = "If-Match or If-Unmodified-Since: the precondition failed", body = ErrorBody),
        (status = 416, description = "the range is outside the archive", body = ErrorBody),
        (status = 400, description = "missing or malformed archive_uuid", body = ErrorBody),
        (status = 401, description = "no or bad token", body = ErrorBody),
        (status = 403, description = "not the archive's owner", body = ErrorBody),
        (status = 404, description = "unknown or deleted archive", body = ErrorBody),
        (status = 409, description = "not built (yet): pending, in progress or failed", body = ErrorBody),
        (status = 410, description = "expired: its bytes are gone", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn download_archive(
    method: warp::http::Method,
    principal: Principal,
    query: HashMap<String, String>,
    headers: HeaderMap,
    ctx: Context,
) -> Result<warp::reply::Response, ApiError> {
    let archive = view(ctx.app.archive_for(&principal, archive_uuid(&query, "archive_uuid")?).await?);
    match archive.archive_status.as_str() {
        "completed" => {}
        "expired" => {
            return Err(ApiError::new(StatusCode::GONE, "archive_expired", "the archive expired; its bytes are gone"))
        }
        "deleted" => return Err(ApiError::not_found("archive")),
        status => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "archive_not_ready",
                match &archive.archive_error {
                    Some(error) if status == "failed" => format!("the archive failed: {error}"),
                    _ => format!("the archive is {status}"),
                },
            ))
        }
    }
    super::assets::deliver(&as_download(&archive), &method, &headers, &ctx).await
}

/// A completed archive as the download path knows files: an asset-shaped record of its
/// zip (name, size, SHA-256, location).
pub(super) fn as_download(archive: &ArchiveInfo) -> AssetInfo {
    AssetInfo {
        asset_uuid: archive.archive_uuid,
        id_session: archive.id_session.unwrap_or_default(),
        asset_name: archive.archive_original_filename.clone(),
        asset_original_filename: archive.archive_original_filename.clone(),
        asset_type: "application/zip".into(),
        asset_file_size: archive.archive_file_size.unwrap_or_default(),
        asset_sha256: archive.archive_sha256.clone().unwrap_or_default(),
        asset_datetime: archive.archive_completed_at.unwrap_or(archive.archive_created_at),
        directory: String::new(),
        tags: Vec::new(),
        metadata: Default::default(),
        asset_status: "available".into(),
        asset_created_at: archive.archive_completed_at.unwrap_or(archive.archive_created_at),
        asset_creator: archive.owner,
        asset_source: "archive".into(),
        asset_version: 0,
        created_position: 0,
        blob: archive.blob.clone(),
        id_asset: None,
    }
}

/// Delete an archive (its owner, services, superadmins): one being built stops, a built
/// one's bytes are removed.
#[utoipa::path(delete, path = "/api/archives", tag = "archives",
    params(("uuid" = fields::UuidText, Query, description = "the archive (`archive_uuid` is accepted too)")),
    responses(
        (status = 200, description = "deleted", body = ArchiveInfo),
        (status = 400, description = "missing or malformed uuid", body = ErrorBody),
        (status = 401, description = "no or bad token", body = ErrorBody),
        (status = 403, description = "not the archive's owner", body = ErrorBody),
        (status = 404, description = "unknown or already deleted archive", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn delete_archive(
    principal: Principal,
    request_id: String,
    query: HashMap<String, String>,
    ctx: Context,
) -> Result<impl warp::Reply, ApiError> {
    let uuid = archive_uuid(&query, "uuid")?;
    let command = CommandContext::for_request(&principal, &request_id);
    let app = ctx.app.clone();
    let archive =
        ctx.app.run_to_completion(async move { app.delete_archive(&principal, &command, uuid).await }).await?;
    Ok(warp::reply::json(&archive))
}
