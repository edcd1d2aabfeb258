//! `/api/assets`: download, delete, infos (single, batch, rename) and the audit trail,
//! with OpenTera's query parameters (`asset_uuid`, `uuid`, `access_token`).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use warp::filters::BoxedFilter;
use warp::http::HeaderMap;
use warp::Filter;

use super::auth::authenticated;
use super::download::{self, Delivery};
use super::error::{ApiError, ErrorBody};
use super::fields;
use super::{get_or_head, json_body, parse_uuid, query_map, request_context, respond, with_context, Context, JsonBody};
use crate::app::CommandContext;
use crate::domain::names::FileName;
use crate::domain::principal::Principal;
use crate::eventstore::RecordedEvent;
use crate::projections::read::AssetInfo;

/// The request header nginx/assetd.conf sets on what it proxies: it will follow an
/// X-Accel-Redirect answer.
const ACCEL_AVAILABLE: &str = "x-accel-available";

/// Largest batch of `POST /assets/infos`.
const MAX_BATCH: usize = 1000;

/// `POST /assets/infos`: either a batch of infos or a rename, never both.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum InfosRequest {
    Batch(InfosBatch),
    Rename(InfosRename),
}

/// The infos of several assets.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InfosBatch {
    #[schema(max_items = 1000)] // MAX_BATCH (a literal here; a test compares them)
    pub assets: Vec<AssetRef>,
}

/// A rename.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InfosRename {
    pub file_asset: RenameRequest,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct AssetRef {
    #[schema(value_type = fields::UuidText)]
    pub asset_uuid: Uuid,
    pub access_token: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct RenameRequest {
    #[schema(value_type = fields::UuidText)]
    pub asset_uuid: Uuid,
    pub access_token: Option<String>,
    /// The new file name.
    #[schema(value_type = fields::FileName)]
    pub asset_original_filename: String,
}

/// One event of an asset's history.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AssetEventRecord {
    pub event_id: Uuid,
    pub event_type: String,
    pub stream: String,
    pub version: i64,
    pub position: i64,
    pub recorded_at: DateTime<Utc>,
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
    /// actor, request_id, correlation_id, causation_id, service_version
    #[schema(value_type = Object)]
    pub metadata: serde_json::Value,
}

impl From<RecordedEvent> for AssetEventRecord {
    fn from(e: RecordedEvent) -> Self {
        Self {
            event_id: e.id,
            event_type: e.event_type,
            stream: e.stream,
            version: e.version,
            position: e.position,
            recorded_at: e.recorded_at,
            data: e.data,
            metadata: e.metadata,
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AssetDeletedReply {
    pub asset_uuid: Uuid,
    pub asset_status: String,
}

pub fn routes(ctx: Context) -> BoxedFilter<(warp::reply::Response,)> {
    let download = warp::path!("assets")
        .and(get_or_head())
        .and(warp::method())
        .and(authenticated(ctx.clone()))
        .and(query_map())
        .and(warp::header::headers_cloned())
        .and(with_context(ctx.clone()))
        .then(|method, principal, query, headers, ctx| async move {
            respond(download_asset(method, principal, query, headers, ctx).await)
        });
    let delete = warp::path!("assets")
        .and(warp::delete())
        .and(authenticated(ctx.clone()))
        .and(request_context())
        .and(query_map())
        .and(with_context(ctx.clone()))
        .then(|principal, request_id, query, ctx| async move {
            respond(delete_asset(principal, request_id, query, ctx).await)
        });
    let info = warp::path!("assets" / "infos")
        .and(get_or_head())
        .and(authenticated(ctx.clone()))
        .and(query_map())
        .and(with_context(ctx.clone()))
        .then(|principal, query, ctx| async move { respond(get_infos(principal, query, ctx).await) });
    let infos =
        warp::path!("assets" / "infos")
            .and(warp::post())
            .and(json_body(ctx.settings.body_idle_timeout))
            .and(authenticated(ctx.clone()))
            .and(request_context())
            .and(with_context(ctx.clone()))
            .then(|body, principal, request_id, ctx| async move {
                respond(post_infos(principal, request_id, body, ctx).await)
            });
    let events = warp::path!("assets" / String / "events")
        .and(get_or_head())
        .and(authenticated(ctx.clone()))
        .and(query_map())
        .and(with_context(ctx))
        .then(|uuid, principal, query, ctx| async move { respond(asset_events(uuid, principal, query, ctx).await) });
    download.or(delete).unify().or(info).unify().or(infos).unify().or(events).unify().boxed()
}

/// Download an asset's bytes.
#[utoipa::path(get, path = "/api/assets", tag = "assets",
    params(
        ("asset_uuid" = fields::UuidText, Query, description = "the asset"),
        ("access_token" = Option<String>, Query, description = "asset access token, when the caller has no session access"),
        ("Range" = Option<String>, Header, description = "a single byte range, e.g. bytes=0-1023"),
        ("If-None-Match" = Option<String>, Header, description = "the ETag of a cached copy"),
        ("If-Modified-Since" = Option<String>, Header, description = "an HTTP date (IMF-fixdate, RFC 850 or asctime); ignored when invalid or later than now"),
    ),
    responses(
        (status = 200, description = "the bytes, with Content-Disposition, ETag, Accept-Ranges", content_type = "application/octet-stream"),
        (status = 206, description = "the requested range, with Content-Range"),
        (status = 304, description = "the cached copy is current"),
        (status = 401, description = "no or bad token", body = ErrorBody),
        (status = 403, description = "no access", body = ErrorBody),
        (status = 404, description = "unknown or deleted asset", body = ErrorBody),
        (status = 416, description = "unsatisfiable range", body = ErrorBody),
        (status = 400, description = "missing or malformed asset_uuid, or an If-Match / If-None-Match that is not an entity-tag list", body = ErrorBody),
        (status = 412, description = "If-Match or If-Unmodified-Since failed", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn download_asset(
    method: warp::http::Method,
    principal: Principal,
    query: HashMap<String, String>,
    headers: HeaderMap,
    ctx: Context,
) -> Result<warp::reply::Response, ApiError> {
    let uuid = parse_uuid("asset_uuid", query.get("asset_uuid"))?;
    let asset = ctx.app.asset_for(&principal, uuid, query.get("access_token").map(String::as_str)).await?;
    if !asset.is_available() {
        return Err(ApiError::not_found("asset"));
    }
    deliver(&asset, &method, &headers, &ctx).await
}

/// The answer to a GET or HEAD of an available asset's bytes, however it was reached
/// (the API, a signed URL).
pub(super) async fn deliver(
    asset: &AssetInfo,
    method: &warp::http::Method,
    headers: &HeaderMap,
    ctx: &Context,
) -> Result<warp::reply::Response, ApiError> {
    // Only nginx's requests are answered with X-Accel-Redirect (nginx/assetd.conf marks
    // them): a client that reaches assetd directly gets the bytes, not an empty body.
    let delivery = match &ctx.settings.accel_redirect_prefix {
        Some(prefix) if headers.get(ACCEL_AVAILABLE).is_some_and(|v| v == "yes") => Delivery::AccelRedirect(prefix),
        _ => Delivery::Direct,
    };
    let is_head = method == warp::http::Method::HEAD;
    download::respond(asset, headers, is_head, &ctx.app.blobs, delivery, &ctx.app.metrics).await
}

/// Delete an asset; its bytes are removed and downloads answer 404.
#[utoipa::path(delete, path = "/api/assets", tag = "assets",
    params(
        ("uuid" = fields::UuidText, Query, description = "the asset (`asset_uuid` is accepted too)"),
        ("access_token" = Option<String>, Query, description = "asset access token"),
    ),
    responses(
        (status = 200, description = "deleted", body = AssetDeletedReply),
        (status = 401, description = "no or bad token", body = ErrorBody),
        (status = 403, description = "no access", body = ErrorBody),
        (status = 404, description = "unknown or already deleted asset", body = ErrorBody),
        (status = 400, description = "missing or malformed uuid", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn delete_asset(
    principal: Principal,
    request_id: String,
    query: HashMap<String, String>,
    ctx: Context,
) -> Result<impl warp::Reply, ApiError> {
    let uuid = parse_uuid("uuid", query.get("uuid").or(query.get("asset_uuid")))?;
    let ctx_command = CommandContext::for_request(&principal, &request_id);
    let (app, access_token) = (ctx.app.clone(), query.get("access_token").cloned());
    ctx.app
        .run_to_completion(
            async move { app.delete_asset(&principal, &ctx_command, uuid, access_token.as_deref()).await },
        )
        .await?;
    Ok(warp::reply::json(&AssetDeletedReply { asset_uuid: uuid, asset_status: "deleted".into() }))
}

/// An asset's information.
#[utoipa::path(get, path = "/api/assets/infos", tag = "assets",
    params(
        ("asset_uuid" = fields::UuidText, Query, description = "the asset"),
        ("access_token" = Option<String>, Query, description = "asset access token"),
    ),
    responses(
        (status = 200, description = "the asset's information", body = AssetInfo),
        (status = 401, description = "no or bad token", body = ErrorBody),
        (status = 403, description = "no access", body = ErrorBody),
        (status = 404, description = "unknown asset", body = ErrorBody),
        (status = 400, description = "missing or malformed asset_uuid", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn get_infos(
    principal: Principal,
    query: HashMap<String, String>,
    ctx: Context,
) -> Result<impl warp::Reply, ApiError> {
    let uuid = parse_uuid("asset_uuid", query.get("asset_uuid"))?;
    let asset = ctx.app.asset_for(&principal, uuid, query.get("access_token").map(String::as_str)).await?;
    Ok(warp::reply::json(&asset))
}

/// Several assets' information, or a rename (OpenTera's two uses of this endpoint).
#[utoipa::path(post, path = "/api/assets/infos", tag = "assets",
    request_body = InfosRequest,
    responses(
        (status = 200, description = "a list of infos for a batch; the renamed asset's info for a rename", body = Vec<AssetInfo>),
        (status = 400, description = "not JSON", body = ErrorBody),
        (status = 401, description = "no or bad token", body = ErrorBody),
        (status = 403, description = "no access to one of the assets", body = ErrorBody),
        (status = 404, description = "unknown asset", body = ErrorBody),
        (status = 422, description = "neither shape, too many assets, or an invalid file name", body = ErrorBody),
        (status = 413, description = "body over 1 MiB", body = ErrorBody),
        (status = 415, description = "body not application/json", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn post_infos(
    principal: Principal,
    request_id: String,
    body: JsonBody,
    ctx: Context,
) -> Result<warp::reply::Response, ApiError> {
    use warp::Reply;
    match body.parse::<InfosRequest>().await? {
        InfosRequest::Batch(InfosBatch { assets }) => {
            if assets.len() > MAX_BATCH {
                return Err(ApiError::new(
                    warp::http::StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_field",
                    format!("at most {MAX_BATCH} assets per request"),
                ));
            }
            let requested: Vec<(Uuid, Option<String>)> =
                assets.into_iter().map(|a| (a.asset_uuid, a.access_token)).collect();
            Ok(warp::reply::json(&ctx.app.assets_for(&principal, &requested).await?).into_response())
        }
        InfosRequest::Rename(InfosRename { file_asset }) => {
            let name = FileName::parse_field("asset_original_filename", &file_asset.asset_original_filename)
                .map_err(ApiError::invalid_field)?;
            let ctx_command = CommandContext::for_request(&principal, &request_id);
            let info = ctx
                .app
                .rename_asset(&principal, &ctx_command, file_asset.asset_uuid, file_asset.access_token.as_deref(), name)
                .await?;
            Ok(warp::reply::json(&info).into_response())
        }
    }
}

/// An asset's events, oldest first: who uploaded, renamed, deleted it, and when.
#[utoipa::path(get, path = "/api/assets/{asset_uuid}/events", tag = "assets",
    params(
        ("asset_uuid" = fields::UuidText, Path, description = "the asset"),
        ("access_token" = Option<String>, Query, description = "asset access token"),
    ),
    responses(
        (status = 200, description = "the events", body = Vec<AssetEventRecord>),
        (status = 401, description = "no or bad token", body = ErrorBody),
        (status = 403, description = "no access", body = ErrorBody),
        (status = 404, description = "unknown asset", body = ErrorBody),
        (status = 400, description = "malformed asset_uuid", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn asset_events(
    uuid: String,
    principal: Principal,
    query: HashMap<String, String>,
    ctx: Context,
) -> Result<impl warp::Reply, ApiError> {
    let uuid = parse_uuid("asset_uuid", Some(&uuid))?;
    let events = ctx.app.asset_history(&principal, uuid, query.get("access_token").map(String::as_str)).await?;
    Ok(warp::reply::json(&events.into_iter().map(AssetEventRecord::from).collect::<Vec<_>>()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_documented_batch_limit_is_the_enforced_one() {
        let document = serde_json::to_value(super::super::openapi::document("/file")).unwrap();
        let batch = &document["components"]["schemas"]["InfosBatch"]["properties"]["assets"];
        assert_eq!(batch["maxItems"], super::MAX_BATCH);
    }
}
