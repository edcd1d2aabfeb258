//! `/api/imports` and `/api/jobs`: ask for an import, follow a job, cancel it, list a
//! session's jobs. The job runs elsewhere (a worker); these only read and append.

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
use crate::app::jobs::{AnyImportBody, IdempotencyKey};
use crate::app::CommandContext;
use crate::domain::principal::Principal;
use crate::projections::read::JobInfo;

/// Longest `Idempotency-Key` accepted.
const MAX_IDEMPOTENCY_KEY: usize = 255;

/// The answer to `POST /imports`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ImportAccepted {
    pub job_uuid: Uuid,
    /// Where to follow the job (`GET`) or cancel it (`DELETE`).
    pub status_url: String,
}

/// A page of a session's jobs.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobPage {
    pub jobs: Vec<JobInfo>,
    /// Pass as `cursor` to get the next page; null on the last page.
    pub next_cursor: Option<String>,
}

pub fn routes(ctx: Context) -> BoxedFilter<(warp::reply::Response,)> {
    let import = warp::path!("imports")
        .and(warp::post())
        .and(json_body(ctx.settings.body_idle_timeout))
        .and(authenticated(ctx.clone()))
        .and(request_context())
        .and(warp::header::headers_cloned())
        .and(with_context(ctx.clone()))
        .then(|body, principal, request_id, headers, ctx| async move {
            respond(request_import(body, principal, request_id, headers, ctx).await)
        });
    let job = warp::path!("jobs" / String);
    let get = job
        .and(get_or_head())
        .and(authenticated(ctx.clone()))
        .and(warp::header::headers_cloned())
        .and(with_context(ctx.clone()))
        .then(|uuid, principal, headers, ctx| async move { respond(get_job(uuid, principal, headers, ctx).await) });
    let cancel = job
        .and(warp::delete())
        .and(authenticated(ctx.clone()))
        .and(request_context())
        .and(warp::header::headers_cloned())
        .and(with_context(ctx.clone()))
        .then(|uuid, principal, request_id, headers, ctx| async move {
            respond(cancel_job(uuid, principal, request_id, headers, ctx).await)
        });
    let list = warp::path!("sessions" / String / "jobs")
        .and(get_or_head())
        .and(authenticated(ctx.clone()))
        .and(query_map())
        .and(warp::header::headers_cloned())
        .and(with_context(ctx))
        .then(|id, principal, query, headers, ctx| async move {
            respond(list_jobs(id, principal, query, headers, ctx).await)
        });
    import.or(get).unify().or(cancel).unify().or(list).unify().boxed()
}

/// The job as answered: a succeeded import's result gets the asset's URL and a token
/// for the reader.
fn view(mut job: JobInfo, principal: &Principal, headers: &HeaderMap, ctx: &Context) -> JobInfo {
    let asset_uuid = job.result.as_ref().and_then(|r| r.get("asset_uuid")?.as_str()?.parse::<Uuid>().ok());
    if let (Some(asset_uuid), Some(serde_json::Value::Object(result))) = (asset_uuid, job.result.as_mut()) {
        let origin = super::origin(&ctx.settings, headers);
        let asset_url = format!("{origin}{}/api/assets?asset_uuid={asset_uuid}", ctx.settings.base_path);
        result.insert("asset_url".into(), asset_url.into());
        result.insert("access_token".into(), ctx.app.asset_token(asset_uuid, principal).into());
    }
    job
}

/// Import a file into a session, as a job: from a URL, or a received two-phase upload
/// (`upload_uuid`), which the job verifies and commits without copying its bytes.
#[utoipa::path(post, path = "/api/imports", tag = "jobs",
    request_body = AnyImportBody,
    params(("Idempotency-Key" = Option<fields::IdempotencyKey>, Header,
        description = "the same key and body give the same job (409 for another body); at most 255 characters")),
    responses(
        (status = 202, description = "the job is queued", body = ImportAccepted),
        (status = 400, description = "malformed request", body = ErrorBody),
        (status = 401, description = "no or bad token", body = ErrorBody),
        (status = 403, description = "no access to the session", body = ErrorBody),
        (status = 404, description = "unknown session", body = ErrorBody),
        (status = 409, description = "the Idempotency-Key was used with another body; or the upload has no bytes yet, is already imported or committed", body = ErrorBody),
        (status = 410, description = "the upload expired", body = ErrorBody),
        (status = 413, description = "body over 1 MiB", body = ErrorBody),
        (status = 415, description = "body not application/json", body = ErrorBody),
        (status = 422, description = "invalid field (url, name, type…)", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn request_import(
    body: JsonBody,
    principal: Principal,
    request_id: String,
    headers: HeaderMap,
    ctx: Context,
) -> Result<impl warp::Reply, ApiError> {
    if headers.get_all("idempotency-key").iter().count() > 1 {
        return Err(ApiError::bad_request("invalid_header", "one Idempotency-Key header at most"));
    }
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(value) => {
            let key = value
                .to_str()
                .ok()
                .map(str::trim)
                .filter(|key| {
                    (1..=MAX_IDEMPOTENCY_KEY).contains(&key.len()) && key.bytes().all(|b| (b' '..=b'~').contains(&b))
                })
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_header",
                        format!("Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters"),
                    )
                })?;
            Some(key.to_owned())
        }
    };
    let (body, bytes): (AnyImportBody, Vec<u8>) = body.parse_keeping_bytes().await?;
    let request = match body {
        AnyImportBody::Url(body) => body.validate(&principal).map_err(ApiError::invalid_field)?,
        AnyImportBody::Upload(body) => {
            let spec = body.validate(&principal).map_err(ApiError::invalid_field)?;
            ctx.app.upload_import_request(&principal, spec).await?
        }
    };
    let idempotency = key.map(|key| IdempotencyKey { key, body_sha256: crate::app::body_sha256(&bytes) });
    let command = CommandContext::for_request(&principal, &request_id);
    let requested =
        ctx.app.request_import(&principal, &command, request, idempotency, ctx.settings.import_policy).await?;
    let job_uuid = requested.job.job_uuid;
    let origin = super::origin(&ctx.settings, &headers);
    let status_url = format!("{origin}{}/api/jobs/{job_uuid}", ctx.settings.base_path);
    let reply = warp::reply::json(&ImportAccepted { job_uuid, status_url: status_url.clone() });
    let reply = warp::reply::with_header(reply, "location", status_url);
    Ok(warp::reply::with_status(reply, StatusCode::ACCEPTED))
}

/// A job: status, attempts, progress, result, last error.
#[utoipa::path(get, path = "/api/jobs/{job_uuid}", tag = "jobs",
    params(("job_uuid" = fields::UuidText, Path, description = "the job")),
    responses(
        (status = 200, description = "the job", body = JobInfo),
        (status = 400, description = "job_uuid is not a uuid", body = ErrorBody),
        (status = 401, description = "no or bad token", body = ErrorBody),
        (status = 403, description = "no access to the job's session", body = ErrorBody),
        (status = 404, description = "unknown job", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn get_job(
    uuid: String,
    principal: Principal,
    headers: HeaderMap,
    ctx: Context,
) -> Result<impl warp::Reply, ApiError> {
    let uuid = parse_uuid("job_uuid", Some(&uuid))?;
    let job = ctx.app.job_for(&principal, uuid).await?;
    Ok(warp::reply::json(&view(job, &principal, &headers, &ctx)))
}

/// Cancel a queued or running job: a running import stops within a second and leaves
/// nothing behind. Cancelling a cancelled job changes nothing.
#[utoipa::path(delete, path = "/api/jobs/{job_uuid}", tag = "jobs",
    params(("job_uuid" = fields::UuidText, Path, description = "the job")),
    responses(
        (status = 200, description = "the job, cancelled", body = JobInfo),
        (status = 400, description = "job_uuid is not a uuid", body = ErrorBody),
        (status = 401, description = "no or bad token", body = ErrorBody),
        (status = 403, description = "no access to the job's session", body = ErrorBody),
        (status = 404, description = "unknown job", body = ErrorBody),
        (status = 409, description = "the job has already finished", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn cancel_job(
    uuid: String,
    principal: Principal,
    request_id: String,
    headers: HeaderMap,
    ctx: Context,
) -> Result<impl warp::Reply, ApiError> {
    let uuid = parse_uuid("job_uuid", Some(&uuid))?;
    let job = ctx.app.cancel_job(&principal, &CommandContext::for_request(&principal, &request_id), uuid).await?;
    Ok(warp::reply::json(&view(job, &principal, &headers, &ctx)))
}

/// A session's jobs, newest first, keyset-paginated.
#[utoipa::path(get, path = "/api/sessions/{id_session}/jobs", tag = "jobs",
    params(
        ("id_session" = fields::SessionId, Path, description = "OpenTera session id"),
        ("limit" = Option<fields::PageSize>, Query, description = "page size, 1 to 1000 (default 100)"),
        ("cursor" = Option<fields::JobCursor>, Query, description = "next_cursor of the previous page"),
    ),
    responses(
        (status = 200, description = "a page of jobs", body = JobPage),
        (status = 400, description = "bad limit or cursor, or id_session not an integer", body = ErrorBody),
        (status = 401, description = "no or bad token", body = ErrorBody),
        (status = 403, description = "not a member", body = ErrorBody),
        (status = 404, description = "unknown session", body = ErrorBody),
        (status = 422, description = "id_session is not positive", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn list_jobs(
    id: String,
    principal: Principal,
    query: HashMap<String, String>,
    headers: HeaderMap,
    ctx: Context,
) -> Result<impl warp::Reply, ApiError> {
    let id_session = super::sessions::parse_session_id(&id)?;
    let limit = super::sessions::page_limit(&query)?;
    let before = match query.get("cursor").filter(|c| !c.is_empty()) {
        None => None,
        Some(raw) => Some(
            raw.parse::<i64>()
                .ok()
                .filter(|position| *position > 0)
                .ok_or_else(|| ApiError::bad_request("invalid_parameter", "cursor is not one this server issued"))?,
        ),
    };
    let mut jobs = ctx.app.session_jobs(&principal, id_session, before, limit + 1).await?;
    let next_cursor = (jobs.len() as i64 > limit).then(|| {
        jobs.truncate(limit as usize);
        jobs.last().map(|job| job.created_position.to_string()).unwrap_or_default()
    });
    let jobs = jobs.into_iter().map(|job| view(job, &principal, &headers, &ctx)).collect();
    Ok(warp::reply::json(&JobPage { jobs, next_cursor }))
}
