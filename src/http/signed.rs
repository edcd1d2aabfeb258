//! Signed URLs over HTTP: asking for a download URL, downloading through one, and the
//! signed PUT of a two-phase upload's bytes. Signed routes take no Authorization
//! header: the URL is the permission (see `crate::auth::UrlSigner`). They answer
//! browsers on any origin (CORS, `*`: no cookie or credential is ever involved).

use std::collections::HashMap;

use bytes::Buf;
use chrono::{DateTime, Utc};
use futures::Stream;
use serde::Serialize;
use uuid::Uuid;
use warp::filters::BoxedFilter;
use warp::http::{HeaderMap, HeaderValue, StatusCode};
use warp::Filter;

use super::auth::authenticated;
use super::body::{BodyError, GuardedBody};
use super::error::{ApiError, ErrorBody};
use super::fields;
use super::uploads::UploadView;
use super::{query_map, request_context, respond, with_context, Context};
use crate::app::{AppError, CommandContext};
use crate::auth::SignatureError;
use crate::domain::names::MediaType;
use crate::domain::principal::Principal;

/// A signed URL and until when it works.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SignedUrl {
    /// Absolute when the server knows its public address (`ASSETD_PUBLIC_URL`, or the
    /// request's Host), else relative to it.
    pub download_url: String,
    pub expires_at: DateTime<Utc>,
}

pub fn routes(ctx: Context) -> BoxedFilter<(warp::reply::Response,)> {
    let download_url = warp::path!("assets" / String / "download-url")
        .and(warp::post())
        .and(authenticated(ctx.clone()))
        .and(query_map())
        .and(warp::header::headers_cloned())
        .and(with_context(ctx.clone()))
        .then(|uuid, principal, query, headers, ctx| async move {
            respond(ask_download_url(uuid, principal, query, headers, ctx).await)
        });
    let download = warp::path!("signed" / "assets" / String)
        .and(super::get_or_head())
        .and(warp::method())
        .and(warp::path::full())
        .and(query_map())
        .and(warp::header::headers_cloned())
        .and(with_context(ctx.clone()))
        .then(|uuid, method, path: warp::path::FullPath, query, headers, ctx| async move {
            with_cors(respond(signed_download(uuid, method, path.as_str(), query, headers, ctx).await))
        });
    let upload = warp::path!("signed" / "uploads" / String)
        .and(warp::put())
        .and(warp::path::full())
        .and(query_map())
        .and(warp::header::headers_cloned())
        .and(request_context())
        .and(warp::body::stream())
        .and(with_context(ctx))
        .then(|uuid, path: warp::path::FullPath, query, headers, request_id, body, ctx| async move {
            with_cors(respond(signed_upload(uuid, path.as_str(), query, headers, request_id, body, ctx).await))
        });
    let preflight = warp::path("signed")
        .and(warp::options())
        .map(|| with_cors(warp::reply::with_status(warp::reply(), StatusCode::NO_CONTENT).into_response_boxed()));
    download_url.or(download).unify().or(upload).unify().or(preflight).unify().boxed()
}

trait IntoResponseBoxed {
    fn into_response_boxed(self) -> warp::reply::Response;
}

impl<T: warp::Reply> IntoResponseBoxed for T {
    fn into_response_boxed(self) -> warp::reply::Response {
        self.into_response()
    }
}

/// What browsers need to use a signed URL from a page on another origin.
fn with_cors(mut response: warp::reply::Response) -> warp::reply::Response {
    let headers = response.headers_mut();
    for (name, value) in [
        ("access-control-allow-origin", "*"),
        ("access-control-allow-methods", "GET, HEAD, PUT, OPTIONS"),
        ("access-control-allow-headers", "content-type, range, if-range, if-none-match, if-match, if-modified-since, if-unmodified-since, x-request-id"),
        ("access-control-expose-headers", "content-length, content-range, content-disposition, accept-ranges, etag, last-modified, x-request-id"),
        ("access-control-max-age", "600"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// Refuses a signed URL that is not ours for `method` on `path`, or is past its time.
fn check_signature(ctx: &Context, method: &str, path: &str, query: &HashMap<String, String>) -> Result<(), ApiError> {
    let now = Utc::now().timestamp();
    let expires = query.get("expires").map(String::as_str);
    let signature = query.get("signature").map(String::as_str);
    ctx.settings.signer.verify(method, path, expires, signature, now).map_err(|error| match error {
        SignatureError::Invalid => ApiError::new(
            StatusCode::FORBIDDEN,
            "invalid_signature",
            "the URL's signature is missing or does not match it (a signed URL cannot be changed)",
        ),
        SignatureError::Expired => ApiError::new(StatusCode::FORBIDDEN, "url_expired", "the signed URL has expired"),
    })
}

/// `<origin><base>/api/signed/<what>/<uuid>?expires=…&signature=…` for `method`, valid
/// until `expires_at`.
pub(super) fn signed_url(
    ctx: &Context,
    headers: &HeaderMap,
    method: &str,
    what: &str,
    uuid: Uuid,
    expires_at: DateTime<Utc>,
) -> String {
    let path = format!("{}/api/signed/{what}/{uuid}", ctx.settings.base_path);
    let query = ctx.settings.signer.query(method, &path, expires_at.timestamp());
    format!("{}{path}?{query}", super::origin(&ctx.settings, headers))
}

/// A signed download URL of an available asset, valid `expires_in` seconds (the
/// configured default when none is asked, at most the configured maximum).
pub(super) async fn download_link(
    principal: &Principal,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    ctx: &Context,
    uuid: Uuid,
) -> Result<SignedUrl, ApiError> {
    let expires_in = match query.get("expires_in") {
        None => i64::try_from(ctx.settings.signed_url_seconds).unwrap_or(i64::MAX),
        Some(text) => text.parse::<i64>().ok().filter(|seconds| *seconds > 0).ok_or_else(|| {
            ApiError::bad_request("invalid_parameter", "expires_in must be a positive whole number of seconds")
        })?,
    };
    let max = i64::try_from(ctx.settings.signed_url_max_seconds).unwrap_or(i64::MAX);
    let mut expires_in = expires_in.min(max);
    let token = query.get("access_token").map(String::as_str).filter(|token| !token.is_empty());
    let asset = match ctx.app.asset_for(principal, uuid, None).await {
        Err(AppError::Forbidden(_)) if token.is_some() => {
            // Let in by the access token alone: the URL lives no longer than the token.
            let asset = ctx.app.asset_for(principal, uuid, token).await?;
            if let Some(grant) = token.and_then(|token| ctx.app.auth.asset_grant(token).ok()) {
                expires_in = expires_in.min(grant.expires_at - Utc::now().timestamp()).max(1);
            }
            asset
        }
        found => found?,
    };
    if !asset.is_available() {
        return Err(ApiError::not_found("asset"));
    }
    let expires_at = Utc::now() + chrono::Duration::seconds(expires_in);
    // Whole seconds: what the URL says is what the answer says.
    let expires_at = DateTime::from_timestamp(expires_at.timestamp(), 0).unwrap_or(expires_at);
    Ok(SignedUrl { download_url: signed_url(ctx, headers, "GET", "assets", uuid, expires_at), expires_at })
}

/// A signed URL that downloads the asset without an Authorization header.
#[utoipa::path(post, path = "/api/assets/{asset_uuid}/download-url", tag = "signed",
    params(
        ("asset_uuid" = fields::UuidText, Path, description = "the asset"),
        ("expires_in" = Option<fields::ExpiresIn>, Query, description = "seconds the URL is valid (default 900; longer asks are cut to the configured maximum, a week by default, and to the access_token's own lifetime when only that token lets the caller in)"),
        ("access_token" = Option<String>, Query, description = "asset access token, when the caller has no session access"),
    ),
    responses(
        (status = 200, description = "the URL", body = SignedUrl),
        (status = 400, description = "malformed asset_uuid or expires_in", body = ErrorBody),
        (status = 401, description = "no or bad token", body = ErrorBody),
        (status = 403, description = "no access", body = ErrorBody),
        (status = 404, description = "unknown or deleted asset", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn ask_download_url(
    uuid: String,
    principal: Principal,
    query: HashMap<String, String>,
    headers: HeaderMap,
    ctx: Context,
) -> Result<impl warp::Reply, ApiError> {
    let uuid = super::parse_uuid("asset_uuid", Some(&uuid))?;
    Ok(warp::reply::json(&download_link(&principal, &query, &headers, &ctx, uuid).await?))
}

/// Download through a signed URL: no Authorization header; otherwise exactly as
/// `GET /api/assets` (headers, Range, conditional requests).
#[utoipa::path(get, path = "/api/signed/assets/{asset_uuid}", tag = "signed",
    params(
        ("asset_uuid" = fields::UuidText, Path, description = "the asset"),
        ("expires" = i64, Query, description = "as the signed URL says (Unix seconds)"),
        ("signature" = String, Query, description = "as the signed URL says"),
        ("Range" = Option<String>, Header, description = "a single byte range, e.g. bytes=0-1023"),
        ("If-None-Match" = Option<String>, Header, description = "the ETag of a cached copy"),
    ),
    responses(
        (status = 200, description = "the bytes, with Content-Disposition, ETag, Accept-Ranges", content_type = "application/octet-stream"),
        (status = 206, description = "the requested range, with Content-Range"),
        (status = 302, description = "to a presigned URL of the object store (S3, when configured)"),
        (status = 304, description = "the cached copy is current"),
        (status = 400, description = "a malformed conditional header", body = ErrorBody),
        (status = 403, description = "invalid_signature (changed, or not signed by us) or url_expired", body = ErrorBody),
        (status = 404, description = "unknown or deleted asset", body = ErrorBody),
        (status = 412, description = "If-Match or If-Unmodified-Since failed", body = ErrorBody),
        (status = 416, description = "unsatisfiable range", body = ErrorBody),
    ))]
async fn signed_download(
    uuid: String,
    method: warp::http::Method,
    path: &str,
    query: HashMap<String, String>,
    headers: HeaderMap,
    ctx: Context,
) -> Result<warp::reply::Response, ApiError> {
    // A HEAD is what its GET would be.
    check_signature(&ctx, "GET", path, &query)?;
    let uuid = super::parse_uuid("asset_uuid", Some(&uuid))?;
    let asset = ctx.app.asset_by_url(uuid).await?;
    super::assets::deliver(&asset, &method, &headers, &ctx).await
}

/// How long the PUT's body may pause before what it holds is written out (as for
/// multipart uploads: see `upload`).
const HAND_OVER_WHEN_IDLE: std::time::Duration = std::time::Duration::from_millis(500);

/// The bytes of a two-phase upload, as the raw body of one PUT to its signed URL.
#[utoipa::path(put, path = "/api/signed/uploads/{upload_uuid}", tag = "signed",
    params(
        ("upload_uuid" = fields::UuidText, Path, description = "the upload"),
        ("expires" = i64, Query, description = "as the upload URL says (Unix seconds)"),
        ("signature" = String, Query, description = "as the upload URL says"),
        ("Content-Type" = Option<String>, Header, description = "the file's type (used when none was declared)"),
    ),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "the file's bytes"),
    responses(
        (status = 200, description = "received: the upload's status, with ETag \"sha256:<hex>\"", body = UploadView),
        (status = 400, description = "a query parameter given twice, a Content-Range (partial PUTs are not supported), or a body that could not be read", body = ErrorBody),
        (status = 403, description = "invalid_signature or url_expired", body = ErrorBody),
        (status = 404, description = "unknown upload", body = ErrorBody),
        (status = 408, description = "the client stopped sending the body", body = ErrorBody),
        (status = 409, description = "the upload already has its bytes (or was committed, imported, expired)", body = ErrorBody),
        (status = 410, description = "the upload expired while its bytes were arriving", body = ErrorBody),
        (status = 413, description = "larger than the upload limit", body = ErrorBody),
        (status = 422, description = "size_mismatch or sha256_mismatch with what was declared; nothing is kept", body = ErrorBody),
        (status = 507, description = "no space left to store the upload", body = ErrorBody),
    ))]
async fn signed_upload(
    uuid: String,
    path: &str,
    query: HashMap<String, String>,
    headers: HeaderMap,
    request_id: String,
    body: impl Stream<Item = Result<impl Buf + Send + 'static, warp::Error>> + Send + 'static,
    ctx: Context,
) -> Result<warp::reply::Response, ApiError> {
    use futures::StreamExt;
    use warp::Reply;
    // Guarded first: an early answer drains what the client still sends (see `body`).
    let expects_continue = headers.get("expect").is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let metrics = ctx.app.metrics.clone();
    let body = futures::TryStreamExt::inspect_ok(body, move |chunk| metrics.upload_received(chunk.remaining() as u64));
    let (body, _meter) = GuardedBody::new(body, ctx.settings.body_idle_timeout, u64::MAX);
    let mut body = body.expecting_continue(expects_continue);
    check_signature(&ctx, "PUT", path, &query)?;
    let uuid = super::parse_uuid("upload_uuid", Some(&uuid))?;
    // One PUT is the whole file: a part of one (RFC 9110 §14.5) must not be taken for it.
    if headers.contains_key("content-range") {
        return Err(ApiError::bad_request(
            "invalid_header",
            "Content-Range is not accepted: the PUT sends the whole file (a PUT of a part is not supported)",
        ));
    }
    let upload = ctx.app.upload_by_url(uuid).await?;
    if upload.status != "pending" {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("the upload is {}, not waiting for its bytes", upload.status),
        ));
    }
    let max = ctx.settings.max_upload_size;
    let declared = upload.expected_size.and_then(|size| u64::try_from(size).ok());
    let size_mismatch = |message: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "size_mismatch", message);
    let content_length =
        headers.get("content-length").and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
    if let (Some(length), Some(declared)) = (content_length, declared) {
        if length != declared {
            return Err(size_mismatch(format!("the body has {length} bytes, not the declared {declared}")));
        }
    }
    if content_length.is_some_and(|length| length > max) {
        return Err(ApiError::too_large(max));
    }
    let limit = declared.unwrap_or(max);
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .filter(|t| !t.trim().to_ascii_lowercase().starts_with("application/octet-stream"))
        .and_then(|t| fields::check_media_type(t.trim()).ok().and_then(|()| MediaType::parse(t.trim()).ok()));
    // Each PUT writes a blob of its own (UploadReceived records which): two PUTs racing
    // for one upload can then never replace each other's bytes, and the one whose
    // record is refused removes only its own (an S3 completion, unlike a local rename,
    // cannot refuse to replace an object).
    let mut blob = ctx.app.blobs.create_temp(Uuid::new_v4());
    let storage = |e| ApiError::from(AppError::Storage(e));
    let mut received = 0u64;
    loop {
        let next = body.next();
        futures::pin_mut!(next);
        let next = tokio::select! {
            next = &mut next => next,
            _ = tokio::time::sleep(HAND_OVER_WHEN_IDLE) => {
                blob.write_held().await.map_err(storage)?;
                next.await
            }
        };
        let chunk = match next {
            None => break,
            Some(Ok(chunk)) => chunk,
            Some(Err(BodyError::Idle(idle))) => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    format!("the client sent nothing for {idle:?}"),
                ))
            }
            Some(Err(error)) => return Err(ApiError::bad_request("body_read_failed", error.to_string())),
        };
        received += chunk.len() as u64;
        if received > limit {
            return Err(match declared {
                Some(declared) => size_mismatch(format!("the body is longer than the declared {declared} bytes")),
                None => ApiError::too_large(max),
            });
        }
        blob.write(chunk).await.map_err(storage)?;
    }
    if let Some(declared) = declared.filter(|declared| *declared != received) {
        return Err(size_mismatch(format!("the body has {received} bytes, not the declared {declared}")));
    }
    let command = CommandContext {
        actor: crate::domain::principal::Actor { kind: upload.requested_by.kind, uuid: upload.requested_by.uuid },
        request_id: request_id.clone(),
        correlation_id: request_id,
        message: None,
    };
    let app = ctx.app.clone();
    let info = ctx
        .app
        .run_to_completion(async move { app.receive_upload(&command, &upload, blob, content_type).await })
        .await?;
    let etag = info.sha256.as_deref().map(|sha256| format!("\"sha256:{sha256}\""));
    let view = UploadView::new(info, &headers, &ctx, None);
    let mut response = warp::reply::json(&view).into_response();
    if let Some(etag) = etag.and_then(|etag| HeaderValue::from_str(&etag).ok()) {
        response.headers_mut().insert("etag", etag);
    }
    Ok(response)
}
