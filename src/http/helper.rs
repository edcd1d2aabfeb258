//! `/helper`: routes for devices that cannot build URLs or handle a JSON answer before
//! the bytes (the "API helpers" of IoT gateways). The same authentication and rules as
//! the API routes they stand for.

use std::collections::HashMap;

use warp::filters::BoxedFilter;
use warp::http::{HeaderMap, HeaderValue, StatusCode};
use warp::Filter;

use super::auth::authenticated;
use super::error::{ApiError, ErrorBody};
use super::fields;
use super::signed::SignedUrl;
use super::upload::{UploadForm, UploadedAsset, JSON_DATA};
use super::{query_map, request_context, respond, with_context, Context};
use crate::domain::principal::Principal;

pub fn routes(ctx: Context) -> BoxedFilter<(warp::reply::Response,)> {
    let download = warp::path!("helper" / "download")
        .and(super::get_or_head())
        .and(authenticated(ctx.clone()))
        .and(query_map())
        .and(warp::header::headers_cloned())
        .and(with_context(ctx.clone()))
        .then(|principal, query, headers, ctx| async move {
            respond(helper_download(principal, query, headers, ctx).await)
        });
    let upload =
        warp::path!("helper" / "upload")
            .and(warp::post())
            .and(request_context())
            .and(warp::header::headers_cloned())
            .and(warp::body::stream())
            .and(with_context(ctx))
            .then(|request_id, headers, body, ctx| async move {
                respond(helper_upload(request_id, headers, body, ctx).await)
            });
    download.or(upload).unify().boxed()
}

/// Redirects to a fresh signed download URL of the asset (as
/// `POST /api/assets/{asset_uuid}/download-url` would give).
#[utoipa::path(get, path = "/helper/download", tag = "helpers",
    params(
        ("asset_uuid" = fields::UuidText, Query, description = "the asset"),
        ("access_token" = Option<String>, Query, description = "asset access token, when the caller has no session access"),
        ("expires_in" = Option<fields::ExpiresIn>, Query, description = "seconds the URL is valid (default 900)"),
    ),
    responses(
        (status = 302, description = "Location: the signed download URL (also in the body)", body = SignedUrl),
        (status = 400, description = "missing or malformed asset_uuid or expires_in", body = ErrorBody),
        (status = 401, description = "no or bad token", body = ErrorBody),
        (status = 403, description = "no access", body = ErrorBody),
        (status = 404, description = "unknown or deleted asset", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn helper_download(
    principal: Principal,
    query: HashMap<String, String>,
    headers: HeaderMap,
    ctx: Context,
) -> Result<warp::reply::Response, ApiError> {
    use warp::Reply;
    let uuid = super::parse_uuid("asset_uuid", query.get("asset_uuid"))?;
    let link = super::signed::download_link(&principal, &query, &headers, &ctx, uuid).await?;
    let location = HeaderValue::from_str(&link.download_url).map_err(ApiError::internal)?;
    let mut response = warp::reply::with_status(warp::reply::json(&link), StatusCode::FOUND).into_response();
    response.headers_mut().insert("location", location);
    response.headers_mut().insert("cache-control", HeaderValue::from_static("no-store"));
    Ok(response)
}

/// Upload a file as `POST /api/assets` does, with the asset's JSON in the field
/// `jsonData` (instead of `file_asset`).
#[utoipa::path(post, path = "/helper/upload", tag = "helpers",
    request_body(
        content((HelperUploadForm = "multipart/form-data", encoding(("jsonData" = (content_type = "application/json"))))),
        description = "`jsonData`: a FileAsset as JSON text; `file`: the bytes, with a filename"),
    responses(
        (status = 200, description = "the stored asset", body = UploadedAsset),
        (status = 400, description = "malformed multipart, missing jsonData or file, jsonData not JSON", body = ErrorBody),
        (status = 401, description = "no or bad token", body = ErrorBody),
        (status = 403, description = "no access to the session", body = ErrorBody),
        (status = 404, description = "unknown session", body = ErrorBody),
        (status = 408, description = "the client stopped sending the body", body = ErrorBody),
        (status = 413, description = "larger than the upload limit", body = ErrorBody),
        (status = 415, description = "not multipart/form-data", body = ErrorBody),
        (status = 422, description = "invalid field", body = ErrorBody),
        (status = 507, description = "no space left to store the upload", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn helper_upload(
    request_id: String,
    headers: HeaderMap,
    body: impl futures::Stream<Item = Result<impl bytes::Buf + Send + 'static, warp::Error>> + Send + 'static,
    ctx: Context,
) -> Result<warp::reply::Response, ApiError> {
    use warp::Reply;
    Ok(super::upload::upload(request_id, headers, body, ctx, JSON_DATA).await?.into_response())
}

/// The helper's multipart form, for the OpenAPI document: [`UploadForm`] with `jsonData`.
pub struct HelperUploadForm;

impl utoipa::PartialSchema for HelperUploadForm {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        let utoipa::openapi::RefOr::T(utoipa::openapi::schema::Schema::Object(mut form)) =
            <UploadForm as utoipa::PartialSchema>::schema()
        else {
            unreachable!("UploadForm is an object schema")
        };
        if let Some(json) = form.properties.remove("file_asset") {
            form.properties.insert(JSON_DATA.to_owned(), json);
        }
        form.required = vec![JSON_DATA.to_owned(), "file".to_owned()];
        form.description = Some("`jsonData` (JSON text of a FileAsset) and `file`; other parts are skipped".into());
        utoipa::openapi::RefOr::T(utoipa::openapi::schema::Schema::Object(form))
    }
}

impl utoipa::ToSchema for HelperUploadForm {
    fn schemas(schemas: &mut Vec<(String, utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>)>) {
        <UploadForm as utoipa::ToSchema>::schemas(schemas);
    }
}
