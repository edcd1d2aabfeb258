//! OpenTera mode's archive routes, as FTS defines them (`QueryArchiveFile*.py`):
//! TeraServer records an archive (`POST /api/archives/infos`, id 0), OpenTera's
//! `AssetsArchiveWorker` marks it in progress, zips the assets it downloads and uploads
//! the zip (`POST /api/archives`); its owner downloads it (`GET /api/archives`). Each
//! change is published to Redis as OpenTera's `ArchiveEvent`.
//!
//! Differences from FTS, on purpose: only services create, change or upload archives
//! (FTS lets any token do it, even a device's static one); the uploader of an archive is
//! a service, so "the owner or the uploader" may delete it means the owner or a service.

use std::collections::HashMap;

use bytes::Buf;
use futures::Stream;
use serde_json::{json, Value};
use uuid::Uuid;
use warp::filters::BoxedFilter;
use warp::http::{HeaderMap, StatusCode};
use warp::reply::Response;
use warp::{Filter, Reply};

use super::archives::as_download;
use super::assets::deliver;
use super::opentera::{arguments, caller, opentera, required, respond, Fts, RawFileAsset};
use super::upload::{form_boundary, guard_body, receive_form};
use super::{get_or_head, json_body, request_context, with_context, Context, JsonBody};
use crate::app::{AppError, CommandContext};
use crate::domain::names::FileName;
use crate::domain::principal::{Actor, PrincipalKind};
use crate::domain::DomainError;
use crate::opentera::events::{ArchiveEvent, ArchiveStatus};
use crate::opentera::tokens::{Caller, TokenRule};
use crate::opentera::vouched;
use crate::projections::read::ArchiveInfo;

pub fn routes(ctx: Context) -> BoxedFilter<(Response,)> {
    let query = warp::query::raw().or(warp::any().map(String::new)).unify();
    let download = warp::path!("archives")
        .and(get_or_head())
        .and(warp::method())
        .and(warp::header::headers_cloned())
        .and(query)
        .and(with_context(ctx.clone()))
        .then(|method, headers, query, ctx| async move { respond(download(method, headers, query, ctx).await) });
    let upload = warp::path!("archives")
        .and(warp::post())
        .and(request_context())
        .and(warp::header::headers_cloned())
        .and(query)
        .and(warp::body::stream())
        .and(with_context(ctx.clone()))
        .then(|request_id, headers, query, body, ctx| async move {
            respond(upload(request_id, headers, query, body, ctx).await)
        });
    let delete = warp::path!("archives")
        .and(warp::delete())
        .and(request_context())
        .and(warp::header::headers_cloned())
        .and(query)
        .and(with_context(ctx.clone()))
        .then(|request_id, headers, query, ctx| async move { respond(delete(request_id, headers, query, ctx).await) });
    let infos = warp::path!("archives" / "infos")
        .and(get_or_head())
        .and(warp::header::headers_cloned())
        .and(query)
        .and(with_context(ctx.clone()))
        .then(|headers, query, ctx| async move { respond(get_infos(headers, query, ctx).await) });
    let post_infos = warp::path!("archives" / "infos")
        .and(warp::post())
        .and(request_context())
        .and(warp::header::headers_cloned())
        .and(query)
        .and(json_body(ctx.settings.body_idle_timeout))
        .and(with_context(ctx))
        .then(|request_id, headers, query, body, ctx| async move {
            respond(post_infos(request_id, headers, query, body, ctx).await)
        });
    download.or(upload).unify().or(delete).unify().or(infos).unify().or(post_infos).unify().boxed()
}

fn no_archive() -> Fts {
    Fts::new(StatusCode::NOT_FOUND, "No archive found")
}

/// FTS's status number of an archive.
fn fts_status(archive: &ArchiveInfo) -> ArchiveStatus {
    match archive.status_at(chrono::Utc::now()) {
        "pending" => ArchiveStatus::Pending,
        "in_progress" => ArchiveStatus::InProgress,
        "completed" => ArchiveStatus::Completed,
        "deleted" | "expired" => ArchiveStatus::Deleted,
        _ => ArchiveStatus::Cancelled,
    }
}

/// FTS's fields of an archive (`ArchiveFileData.to_json()`). FTS fixes the expiry
/// when the archive is asked for; assetd records it when the zip arrives.
fn archive_json(archive: &ArchiveInfo, ttl: std::time::Duration) -> Value {
    let expires = archive.archive_expires_at.or_else(|| {
        chrono::Duration::from_std(ttl).ok().and_then(|ttl| archive.archive_created_at.checked_add_signed(ttl))
    });
    json!({
        "id_archive_file_data": archive.created_position,
        "archive_uuid": archive.archive_uuid,
        "archive_original_filename": archive.archive_original_filename,
        "archive_file_size": archive.archive_file_size,
        "archive_creation_datetime": archive.archive_created_at,
        "archive_upload_datetime": archive.archive_completed_at,
        "archive_expiration_datetime": expires,
        "archive_status": fts_status(archive) as i32,
        "archive_owner_uuid": archive.archive_owner_uuid,
        "archive_uploader_uuid": archive.archive_uploader_uuid,
    })
}

/// An archive FTS would still hold: not deleted, not expired.
async fn live_archive(ctx: &Context, uuid: &str) -> Result<ArchiveInfo, Fts> {
    let uuid = Uuid::try_parse(uuid).map_err(|_| no_archive())?;
    let archive = match ctx.app.archive_for(&super::opentera::privileged_reader(), uuid).await {
        Ok(archive) => archive,
        Err(AppError::Domain(DomainError::NotFound(_))) => return Err(no_archive()),
        Err(error) => return Err(error.into()),
    };
    if fts_status(&archive) == ArchiveStatus::Deleted {
        return Err(no_archive());
    }
    Ok(archive)
}

/// Tells OpenTera (its websocket layer, through Redis) what became of an archive.
async fn publish(ctx: &Context, archive: &ArchiveInfo, status: ArchiveStatus) {
    let opentera = opentera(ctx);
    let endpoint = match opentera.service().await {
        Ok((record, _)) => record.clientendpoint,
        Err(_) => "/file".into(),
    };
    let event = ArchiveEvent::new(archive.archive_uuid, archive.archive_owner_uuid, status, &endpoint);
    if let Err(error) = opentera.publish_archive_event(&event).await {
        tracing::warn!(archive_uuid = %archive.archive_uuid, %error, "could not publish the archive event to OpenTera");
    }
}

fn services_only(caller: &Caller) -> Result<(), Fts> {
    if caller.principal.is_service() {
        Ok(())
    } else {
        Err(Fts::forbidden("Only services create, change or upload archives"))
    }
}

async fn get_infos(headers: HeaderMap, query: String, ctx: Context) -> Result<Response, Fts> {
    let args = arguments(&query);
    let caller = caller(&ctx, &headers, &args, TokenRule::DynamicOnly).await?;
    let uuid = required(&args, "archive_uuid", "UUID of the archive to get info")?;
    let archive = live_archive(&ctx, uuid).await?;
    if !caller.principal.is_service() && archive.archive_owner_uuid != caller.principal.uuid {
        return Err(Fts::forbidden("Access denied for that archive"));
    }
    Ok(warp::reply::json(&archive_json(&archive, opentera(&ctx).archive_ttl)).into_response())
}

async fn download(
    method: warp::http::Method,
    headers: HeaderMap,
    query: String,
    ctx: Context,
) -> Result<Response, Fts> {
    let args = arguments(&query);
    let caller = caller(&ctx, &headers, &args, TokenRule::DynamicOnly).await?;
    let uuid = required(&args, "archive_uuid", "UUID of the archive to download")?;
    let archive = live_archive(&ctx, uuid).await?;
    if archive.archive_owner_uuid != caller.principal.uuid {
        return Err(Fts::forbidden("Access denied to the requested archive"));
    }
    if fts_status(&archive) != ArchiveStatus::Completed {
        return Err(no_archive());
    }
    Ok(deliver(&as_download(&archive), &method, &headers, &ctx).await?)
}

async fn delete(request_id: String, headers: HeaderMap, query: String, ctx: Context) -> Result<Response, Fts> {
    let args = arguments(&query);
    let caller = caller(&ctx, &headers, &args, TokenRule::DynamicOnly).await?;
    let uuid = required(&args, "uuid", "UUID of the archive do delete")?;
    let archive = live_archive(&ctx, uuid).await?;
    if !caller.principal.is_service() && archive.archive_owner_uuid != caller.principal.uuid {
        return Err(Fts::forbidden("Access denied to the requested archive"));
    }
    let command = CommandContext::for_request(&caller.principal, &request_id);
    let principal = vouched(&caller);
    let app = ctx.app.clone();
    let uuid = archive.archive_uuid;
    ctx.app.run_to_completion(async move { app.delete_archive(&principal, &command, uuid).await }).await?;
    publish(&ctx, &archive, ArchiveStatus::Deleted).await;
    Ok(warp::reply::json(&"Archive deleted").into_response())
}

async fn post_infos(
    request_id: String,
    headers: HeaderMap,
    query: String,
    body: JsonBody,
    ctx: Context,
) -> Result<Response, Fts> {
    let args = arguments(&query);
    let caller = caller(&ctx, &headers, &args, TokenRule::StaticAllowed).await?;
    let body: Value = body.parse().await?;
    let Some(info) = body.get("archive").and_then(Value::as_object) else {
        return Err(Fts::bad_request("Badly formatted request"));
    };
    let Some(id) = info.get("id_archive_file_data") else { return Err(Fts::bad_request("Badly formatted request")) };
    let Some(filename) = info.get("archive_original_filename") else {
        return Err(Fts::bad_request("Missing original filename"));
    };
    let Some(owner) = info.get("archive_owner_uuid") else { return Err(Fts::bad_request("Missing owner UUID")) };
    services_only(&caller)?;
    let parsing = || Fts::bad_request("Error parsing archive information");
    let id = id.as_i64().ok_or_else(parsing)?;
    let command = CommandContext::for_request(&caller.principal, &request_id);
    let (archive, status) = if id == 0 {
        let owner: Uuid = owner.as_str().and_then(|o| o.parse().ok()).ok_or_else(parsing)?;
        let filename = filename.as_str().and_then(|f| FileName::parse(f).ok()).ok_or_else(parsing)?;
        // TeraServer records archives for users (UserQueryAssetsArchive).
        let owner = Actor { kind: PrincipalKind::User, uuid: owner };
        let archive = ctx.app.create_uploaded_archive(&command, owner, filename).await?;
        (archive, ArchiveStatus::Pending)
    } else {
        let archive = match ctx.app.archive_by_id(id).await {
            Ok(archive) => archive,
            Err(AppError::Domain(DomainError::NotFound(_))) => return Err(no_archive()),
            Err(error) => return Err(error.into()),
        };
        // Deleted or expired: FTS has no record of it any more.
        if fts_status(&archive) == ArchiveStatus::Deleted {
            return Err(no_archive());
        }
        let Some(status) = info.get("archive_status") else { return Err(Fts::bad_request("Missing archive status")) };
        let status = status.as_i64().ok_or_else(parsing)?;
        if fts_status(&archive) == ArchiveStatus::Completed && status != ArchiveStatus::Deleted as i64 {
            return Err(Fts::bad_request("Error parsing archive information: the archive is already uploaded"));
        }
        let principal = vouched(&caller);
        let changed = match ctx.app.set_uploaded_archive_status(&principal, &command, &archive, status).await {
            Ok(changed) => changed,
            Err(AppError::Domain(DomainError::NotFound(_))) => return Err(no_archive()),
            Err(AppError::Domain(DomainError::Invalid(message) | DomainError::Conflict(message))) => {
                return Err(Fts::bad_request(format!("Error parsing archive information: {message}")))
            }
            Err(error) => return Err(error.into()),
        };
        let status = fts_status(&changed);
        (changed, status)
    };
    publish(&ctx, &archive, status).await;
    Ok(warp::reply::json(&archive_json(&archive, opentera(&ctx).archive_ttl)).into_response())
}

async fn upload(
    request_id: String,
    headers: HeaderMap,
    query: String,
    body: impl Stream<Item = Result<impl Buf + Send + 'static, warp::Error>> + Send + 'static,
    ctx: Context,
) -> Result<Response, Fts> {
    let (body, meter) = guard_body(&headers, body, &ctx);
    let args: HashMap<String, String> = arguments(&query);
    let caller = caller(&ctx, &headers, &args, TokenRule::StaticAllowed).await?;
    services_only(&caller)?;
    let boundary = form_boundary(&headers, ctx.settings.max_upload_size, "archive").map_err(|e| {
        if e.status == StatusCode::UNSUPPORTED_MEDIA_TYPE {
            Fts::bad_request("Wrong content type")
        } else {
            e.into()
        }
    })?;
    let keep = |text: String| async move { Ok(RawFileAsset(text)) };
    let (RawFileAsset(text), file) =
        receive_form(body, meter, boundary, &ctx, Uuid::new_v4(), "archive", keep).await.map_err(|e| match e.code {
            "missing_file_asset" => Fts::bad_request("Missing archive information"),
            "missing_file" => Fts::bad_request("Missing uploaded file"),
            "missing_filename" => Fts::bad_request("Missing filename"),
            _ => e.into(),
        })?;
    // From here on, a refusal drops `file.blob`, which removes the received bytes.
    let info: Value = serde_json::from_str(&text)
        .map_err(|e| Fts::bad_request(format!("Error parsing archive information : {e}")))?;
    let Some(id) = info.get("id_archive_file_data") else { return Err(Fts::bad_request("Missing archive ID")) };
    let id = id.as_i64().ok_or_else(|| Fts::bad_request("Error parsing archive information : not an id"))?;
    let archive = match ctx.app.archive_by_id(id).await {
        Ok(archive) => archive,
        Err(AppError::Domain(DomainError::NotFound(_))) => return Err(no_archive()),
        Err(error) => return Err(error.into()),
    };
    match fts_status(&archive) {
        ArchiveStatus::Completed => return Err(Fts::new(StatusCode::NOT_FOUND, "Archive has already been uploaded.")),
        ArchiveStatus::Deleted => return Err(no_archive()),
        _ => {}
    }
    if archive.archive_original_filename != file.filename.as_str() {
        return Err(Fts::bad_request("Filename does not match the archive information"));
    }
    let command = CommandContext::for_request(&caller.principal, &request_id);
    let principal = caller.principal.clone();
    let (app, ttl, pending) = (ctx.app.clone(), opentera(&ctx).archive_ttl, archive.clone());
    let completed = ctx
        .app
        .run_to_completion(async move {
            app.complete_uploaded_archive(&principal, &command, &pending, file.blob, ttl).await
        })
        .await
        .map_err(|error| match error {
            AppError::Domain(DomainError::Conflict(message)) => {
                Fts::bad_request(format!("Error parsing archive information : {message}"))
            }
            other => other.into(),
        })?;
    publish(&ctx, &completed, ArchiveStatus::Completed).await;
    Ok(warp::reply::json(&archive_json(&completed, opentera(&ctx).archive_ttl)).into_response())
}
