//! `/api/uploads`: two-phase uploads. Ask for one (and get its signed upload URL), read
//! its status, commit it as an asset. The bytes arrive by the signed PUT (`signed`);
//! an upload's asynchronous import is asked for at `/api/imports` (`jobs`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use warp::filters::BoxedFilter;
use warp::http::{HeaderMap, StatusCode};
use warp::Filter;

use super::auth::authenticated;
use super::error::{ApiError, ErrorBody};
use super::fields;
use super::upload::UploadedAsset;
use super::{get_or_head, json_body, request_context, respond, with_context, Context, JsonBody};
use crate::app::jobs::creator_named;
use crate::app::uploads::{AssetFields, UploadRequest};
use crate::app::CommandContext;
use crate::domain::names::{
    check_storable_json, AssetName, Directory, FileName, InvalidValue, MediaType, SessionId, Sha256Hex, Tags,
};
use crate::domain::principal::Principal;
use crate::projections::read::UploadInfo;

/// The body of `POST /uploads`. Fields it does not know are refused (a misspelt
/// `sha256` must not silently go unchecked).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewUpload {
    #[schema(value_type = fields::SessionId)]
    #[serde(deserialize_with = "crate::app::jobs::integral")]
    pub id_session: i64,
    /// The file's name (the asset's `asset_original_filename`).
    #[schema(value_type = fields::FileName)]
    pub filename: String,
    /// The file's type; else the PUT's Content-Type, else guessed from the name.
    #[schema(value_type = Option<fields::MediaType>)]
    pub mime_type: Option<String>,
    /// When given, the PUT must send exactly this many bytes; at most
    /// `ASSETD_MAX_UPLOAD_SIZE` (10 GiB by default, the maximum shown: more is 413).
    #[schema(minimum = 0, maximum = 10737418240_u64)]
    #[serde(default, deserialize_with = "whole_bytes")]
    pub size: Option<u64>,
    /// When given, the PUT's bytes must have this SHA-256 (hex).
    #[schema(value_type = Option<String>, pattern = "^[0-9a-fA-F]{64}$")]
    pub sha256: Option<String>,
    /// Services may name the asset's creator with one of these (else they are it).
    #[schema(value_type = Option<fields::UuidText>)]
    pub id_user: Option<Uuid>,
    #[schema(value_type = Option<fields::UuidText>)]
    pub id_participant: Option<Uuid>,
    #[schema(value_type = Option<fields::UuidText>)]
    pub id_device: Option<Uuid>,
    #[schema(value_type = Option<fields::UuidText>)]
    pub id_service: Option<Uuid>,
}

/// A byte count, also when written as a number with a zero fraction (`12.0`): JSON
/// Schema's `integer`.
fn whole_bytes<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    let Some(number) = Option::<serde_json::Number>::deserialize(deserializer)? else { return Ok(None) };
    if let Some(bytes) = number.as_u64() {
        return Ok(Some(bytes));
    }
    match number.as_f64() {
        Some(float) if float.fract() == 0.0 && (0.0..u64::MAX as f64).contains(&float) => Ok(Some(float as u64)),
        _ => Err(serde::de::Error::custom(format!("{number} is not a whole number of bytes"))),
    }
}

/// The answer to `POST /uploads`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UploadCreated {
    pub upload_uuid: Uuid,
    /// Takes one `PUT` of the raw bytes, without an Authorization header, until `expires_at`.
    pub upload_url: String,
    pub expires_at: DateTime<Utc>,
    /// `GET` it for the upload's status.
    pub status_url: String,
}

/// The body of `POST /uploads/{upload_uuid}/commit`: the asset's fields, as a multipart
/// upload's `file_asset` has them.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CommitUpload {
    #[schema(value_type = fields::AssetName)]
    pub asset_name: String,
    /// MIME type; else the declared one, else the PUT's Content-Type, else guessed.
    #[schema(value_type = Option<fields::MediaType>)]
    pub asset_type: Option<String>,
    #[schema(value_type = Option<fields::AssetDateTime>)]
    pub asset_datetime: Option<String>,
    #[schema(value_type = Option<fields::Directory>)]
    pub directory: Option<String>,
    #[schema(value_type = Option<fields::Tags>)]
    pub tags: Option<Vec<String>>,
    #[schema(value_type = Option<fields::Metadata>)]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

impl CommitUpload {
    fn validate(self) -> Result<AssetFields, InvalidValue> {
        let metadata = self.metadata.unwrap_or_default();
        check_storable_json("metadata", &serde_json::Value::Object(metadata.clone()))?;
        Ok(AssetFields {
            asset_name: AssetName::parse(&self.asset_name)?,
            asset_type: self
                .asset_type
                .as_deref()
                .map(|given| fields::check_media_type(given).and_then(|()| MediaType::parse(given)))
                .transpose()?,
            asset_datetime: self.asset_datetime.as_deref().map(fields::parse_asset_datetime).transpose()?,
            directory: match self.directory.as_deref() {
                Some(dir) => Directory::parse(dir)?,
                None => Directory::root(),
            },
            tags: Tags::parse(self.tags.unwrap_or_default())?,
            metadata,
        })
    }
}

/// An upload's status as answered: the record, its status as of now (a pending or
/// received upload past its time is `expired`), and, once committed, the asset's URL
/// and an access token for the reader.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UploadView {
    #[serde(flatten)]
    pub info: UploadInfo,
    pub status_url: String,
    /// Once committed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub asset_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
}

impl UploadView {
    pub fn new(mut info: UploadInfo, headers: &HeaderMap, ctx: &Context, reader: Option<&Principal>) -> Self {
        if matches!(info.status.as_str(), "pending" | "received") && info.expires_at <= Utc::now() {
            info.status = "expired".into();
        }
        let origin = super::origin(&ctx.settings, headers);
        let base = &ctx.settings.base_path;
        let status_url = format!("{origin}{base}/api/uploads/{}", info.upload_uuid);
        let asset = info.asset_uuid.filter(|_| info.status == "committed");
        Self {
            asset_url: asset.map(|uuid| format!("{origin}{base}/api/assets?asset_uuid={uuid}")),
            access_token: asset.zip(reader).map(|(uuid, reader)| ctx.app.asset_token(uuid, reader)),
            status_url,
            info,
        }
    }
}

pub fn routes(ctx: Context) -> BoxedFilter<(warp::reply::Response,)> {
    let create = warp::path!("uploads")
        .and(warp::post())
        .and(json_body(ctx.settings.body_idle_timeout))
        .and(authenticated(ctx.clone()))
        .and(request_context())
        .and(warp::header::headers_cloned())
        .and(with_context(ctx.clone()))
        .then(|body, principal, request_id, headers, ctx| async move {
            respond(create_upload(body, principal, request_id, headers, ctx).await)
        });
    let status = warp::path!("uploads" / String)
        .and(get_or_head())
        .and(authenticated(ctx.clone()))
        .and(warp::header::headers_cloned())
        .and(with_context(ctx.clone()))
        .then(
            |uuid, principal, headers, ctx| async move { respond(upload_status(uuid, principal, headers, ctx).await) },
        );
    let commit = warp::path!("uploads" / String / "commit")
        .and(warp::post())
        .and(json_body(ctx.settings.body_idle_timeout))
        .and(authenticated(ctx.clone()))
        .and(request_context())
        .and(warp::header::headers_cloned())
        .and(with_context(ctx))
        .then(|uuid, body, principal, request_id, headers, ctx| async move {
            respond(commit_upload(uuid, body, principal, request_id, headers, ctx).await)
        });
    create.or(status).unify().or(commit).unify().boxed()
}

/// Ask for a two-phase upload: its signed upload URL takes one PUT of the raw bytes.
#[utoipa::path(post, path = "/api/uploads", tag = "uploads",
    request_body = NewUpload,
    responses(
        (status = 201, description = "the upload, waiting for its bytes", body = UploadCreated),
        (status = 400, description = "not JSON", body = ErrorBody),
        (status = 401, description = "no or bad token", body = ErrorBody),
        (status = 403, description = "no access to the session", body = ErrorBody),
        (status = 404, description = "unknown session", body = ErrorBody),
        (status = 415, description = "body not application/json", body = ErrorBody),
        (status = 422, description = "invalid field (filename, mime_type, size over the upload limit, sha256, creator…)", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn create_upload(
    body: JsonBody,
    principal: Principal,
    request_id: String,
    headers: HeaderMap,
    ctx: Context,
) -> Result<impl warp::Reply, ApiError> {
    let body: NewUpload = body.parse().await?;
    let max = ctx.settings.max_upload_size;
    let request = (|| -> Result<UploadRequest, InvalidValue> {
        if body.size.is_some_and(|size| size > max) {
            return Err(InvalidValue::new("size", format!("at most {max} bytes (the upload limit)")));
        }
        // Services that name no creator are it (two-phase uploads are new: no client
        // relies on OpenTera's rule here).
        let named = [body.id_user, body.id_participant, body.id_device, body.id_service];
        let creator = match named.iter().any(Option::is_some) {
            true => creator_named(&principal, named)?,
            false => principal.actor(),
        };
        Ok(UploadRequest {
            id_session: SessionId::new(body.id_session)?,
            filename: FileName::parse_field("filename", &body.filename)?,
            mime_type: body
                .mime_type
                .as_deref()
                .map(|given| {
                    fields::check_media_type(given)
                        .and_then(|()| MediaType::parse(given))
                        .map_err(|e| InvalidValue::new("mime_type", e.reason))
                })
                .transpose()?,
            size: body.size,
            sha256: body
                .sha256
                .as_deref()
                .map(|s| Sha256Hex::parse(&s.to_ascii_lowercase()).map_err(|e| InvalidValue::new("sha256", e.reason)))
                .transpose()?,
            creator,
        })
    })()
    .map_err(ApiError::invalid_field)?;
    let command = CommandContext::for_request(&principal, &request_id);
    let upload = ctx.app.start_upload(&principal, &command, request).await?;
    let upload_url = super::signed::signed_url(&ctx, &headers, "PUT", "uploads", upload.upload_uuid, upload.expires_at);
    let view = UploadView::new(upload, &headers, &ctx, None);
    let created = UploadCreated {
        upload_uuid: view.info.upload_uuid,
        upload_url,
        expires_at: view.info.expires_at,
        status_url: view.status_url.clone(),
    };
    let reply = warp::reply::with_header(warp::reply::json(&created), "location", created.status_url.clone());
    Ok(warp::reply::with_status(reply, StatusCode::CREATED))
}

/// A two-phase upload's status: `pending` (no bytes yet), `received`, `importing`,
/// `committed` (with the asset), `failed` (with the error) or `expired`.
#[utoipa::path(get, path = "/api/uploads/{upload_uuid}", tag = "uploads",
    params(("upload_uuid" = fields::UuidText, Path, description = "the upload")),
    responses(
        (status = 200, description = "the upload", body = UploadView),
        (status = 400, description = "upload_uuid is not a uuid", body = ErrorBody),
        (status = 401, description = "no or bad token", body = ErrorBody),
        (status = 403, description = "neither who asked for it nor a member of its session", body = ErrorBody),
        (status = 404, description = "unknown upload", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn upload_status(
    uuid: String,
    principal: Principal,
    headers: HeaderMap,
    ctx: Context,
) -> Result<impl warp::Reply, ApiError> {
    let uuid = super::parse_uuid("upload_uuid", Some(&uuid))?;
    let upload = ctx.app.upload_for(&principal, uuid).await?;
    // A token for the asset only to who may reach it now (the upload's requester may
    // have lost the session since).
    let reaches_asset = match upload.asset_uuid {
        Some(asset) => ctx.app.asset_for(&principal, asset, None).await.is_ok_and(|asset| asset.is_available()),
        None => false,
    };
    let reader = reaches_asset.then_some(&principal);
    Ok(warp::reply::json(&UploadView::new(upload, &headers, &ctx, reader)))
}

/// Commit a received upload as an asset (its uuid is the upload's); the answer is that
/// of a multipart upload.
#[utoipa::path(post, path = "/api/uploads/{upload_uuid}/commit", tag = "uploads",
    params(("upload_uuid" = fields::UuidText, Path, description = "the upload")),
    request_body = CommitUpload,
    responses(
        (status = 200, description = "the asset", body = UploadedAsset),
        (status = 400, description = "not JSON, or upload_uuid not a uuid", body = ErrorBody),
        (status = 401, description = "no or bad token", body = ErrorBody),
        (status = 403, description = "neither who asked for the upload nor a service or superadmin, or no longer admitted to the session", body = ErrorBody),
        (status = 404, description = "unknown upload (or its session is gone)", body = ErrorBody),
        (status = 409, description = "no bytes yet, already committed, being imported, or failed", body = ErrorBody),
        (status = 410, description = "the upload expired", body = ErrorBody),
        (status = 415, description = "body not application/json", body = ErrorBody),
        (status = 422, description = "invalid field", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn commit_upload(
    uuid: String,
    body: JsonBody,
    principal: Principal,
    request_id: String,
    headers: HeaderMap,
    ctx: Context,
) -> Result<impl warp::Reply, ApiError> {
    let uuid = super::parse_uuid("upload_uuid", Some(&uuid))?;
    let fields = body.parse::<CommitUpload>().await?.validate().map_err(ApiError::invalid_field)?;
    let command = CommandContext::for_request(&principal, &request_id);
    let info = ctx.app.commit_upload(&principal, &command, uuid, fields).await?;
    Ok(warp::reply::json(&super::upload::uploaded_answer(info, &principal, &headers, &ctx)))
}
