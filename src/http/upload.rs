//! `POST /api/assets`: OpenTera's multipart upload, streamed.
//!
//! The token is checked before the body is read. The body is parsed as it arrives:
//! `file_asset` (JSON) is validated, and the session checked, as soon as it is seen, so a
//! request for an unknown or forbidden session is refused before its file is read
//! (clients send `file_asset` first; if `file` comes first it is streamed to a temporary
//! file and checked after). The file's bytes go straight to the blob store, hashed on the
//! way; nothing is buffered whole. Any failure drops the temporary blob, which deletes it,
//! so a refused upload leaves no asset, no event and no file.

use bytes::Buf;
use chrono::{DateTime, Utc};
use futures::Stream;
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use warp::filters::BoxedFilter;
use warp::http::{HeaderMap, StatusCode};
use warp::Filter;

use super::auth::authenticate;
use super::body::{BodyError, BodyMeter, GuardedBody};
use super::error::{ApiError, ErrorBody};
use super::fields;
use super::{request_context, respond, with_context, Context};
use crate::app::{AppError, CommandContext};
use crate::blobs::TempBlob;
use crate::domain::asset::{AssetSource, AssetUploaded};
use crate::domain::names::{check_storable_json, AssetName, Directory, FileName, MediaType, SessionId, Tags};
use crate::domain::principal::{Actor, Principal, PrincipalKind};
use crate::projections::read::AssetInfo;

/// Largest `file_asset` (and any other non-file field) accepted.
const MAX_FORM_FIELD: u64 = 64 * 1024;
/// Room for multipart boundaries, part headers and small fields around the file.
const MULTIPART_OVERHEAD: u64 = 1024 * 1024;
/// How long an upload's body may pause before what it holds is written out, giving
/// back its share of the memory budget (see `crate::blobs::BufferBudget`).
const HAND_OVER_WHEN_IDLE: std::time::Duration = std::time::Duration::from_millis(500);
/// Most bytes a client may send between two fields' contents (preamble, delimiters,
/// part headers), which the parser has to buffer.
const MAX_OUTSIDE_FIELDS: u64 = 64 * 1024;

/// The JSON in the `file_asset` field. Unknown fields are ignored.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct FileAsset {
    #[schema(value_type = fields::SessionId)]
    pub id_session: i64,
    #[schema(value_type = fields::AssetName)]
    pub asset_name: String,
    /// MIME type; guessed from the file name when absent.
    #[schema(value_type = Option<fields::MediaType>)]
    pub asset_type: Option<String>,
    /// When the asset was made; the upload time if absent.
    #[schema(value_type = Option<fields::AssetDateTime>)]
    pub asset_datetime: Option<String>,
    /// Virtual folder, `/` by default.
    #[schema(value_type = Option<fields::Directory>)]
    pub directory: Option<String>,
    #[schema(value_type = Option<fields::Tags>)]
    pub tags: Option<Vec<String>>,
    #[schema(value_type = Option<fields::Metadata>)]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    /// Services name the creator with exactly one of these four (users upload as
    /// themselves: theirs are ignored).
    #[schema(value_type = Option<fields::UuidText>)]
    pub id_user: Option<Uuid>,
    #[schema(value_type = Option<fields::UuidText>)]
    pub id_participant: Option<Uuid>,
    #[schema(value_type = Option<fields::UuidText>)]
    pub id_device: Option<Uuid>,
    #[schema(value_type = Option<fields::UuidText>)]
    pub id_service: Option<Uuid>,
}

/// The multipart form, for the OpenAPI document: `file_asset` is a part of JSON text
/// (its media type is `application/json`, see the request body's `encoding`), `file` the
/// bytes. Other parts are skipped, if their names are header text (no control characters).
pub struct UploadForm;

impl utoipa::PartialSchema for UploadForm {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
        ObjectBuilder::new()
            .property("file_asset", utoipa::openapi::Ref::from_schema_name("FileAsset"))
            .property(
                "file",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .format(Some(SchemaFormat::KnownFormat(KnownFormat::Binary))),
            )
            .required("file_asset")
            .required("file")
            .property_names(Some(
                ObjectBuilder::new().schema_type(Type::String).pattern(Some(r"^[^\u0000-\u001F\u007F]*$")),
            ))
            .description(Some("`file_asset` (JSON text of a FileAsset) and `file`; other parts are skipped"))
            .into()
    }
}

impl utoipa::ToSchema for UploadForm {
    fn schemas(schemas: &mut Vec<(String, utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>)>) {
        schemas.push(("FileAsset".into(), <FileAsset as utoipa::PartialSchema>::schema()));
        <FileAsset as utoipa::ToSchema>::schemas(schemas);
    }
}

/// The answer to an upload.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UploadedAsset {
    #[serde(flatten)]
    pub info: AssetInfo,
    /// Opens this asset to whoever holds it, until it expires.
    pub access_token: String,
    pub asset_url: String,
    pub asset_infos_url: String,
}

pub fn route(ctx: Context) -> BoxedFilter<(warp::reply::Response,)> {
    warp::path!("assets")
        .and(warp::post())
        .and(request_context())
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .and(with_context(ctx))
        .then(|request_id, headers, body, ctx| async move {
            respond(upload(request_id, headers, body, ctx, FILE_ASSET).await)
        })
        .boxed()
}

/// The form field that holds the asset's JSON: `file_asset` (OpenTera), or `jsonData`
/// on the device helper route.
pub(super) const FILE_ASSET: &str = "file_asset";
pub(super) const JSON_DATA: &str = "jsonData";

/// The answer to an upload (and to a commit): the asset, a token that opens it, its URLs.
pub(super) fn uploaded_answer(
    info: AssetInfo,
    requester: &Principal,
    headers: &HeaderMap,
    ctx: &Context,
) -> UploadedAsset {
    let origin = super::origin(&ctx.settings, headers);
    let base = &ctx.settings.base_path;
    let asset_uuid = info.asset_uuid;
    UploadedAsset {
        access_token: ctx.app.asset_token(asset_uuid, requester),
        asset_url: format!("{origin}{base}/api/assets?asset_uuid={asset_uuid}"),
        asset_infos_url: format!("{origin}{base}/api/assets/infos?asset_uuid={asset_uuid}"),
        info,
    }
}

/// What a validated `file_asset` says, with the session checked.
pub(super) struct UploadPlan {
    pub id_session: SessionId,
    pub asset_name: AssetName,
    pub asset_type: Option<MediaType>,
    pub asset_datetime: Option<DateTime<Utc>>,
    pub directory: Directory,
    pub tags: Tags,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub creator: Actor,
}

/// The file part once fully received.
pub(super) struct ReceivedFile {
    pub blob: TempBlob,
    pub filename: FileName,
    pub part_type: Option<MediaType>,
}

/// Upload a file to a session (OpenTera compatible).
#[utoipa::path(post, path = "/api/assets", tag = "assets",
    request_body(
        content((UploadForm = "multipart/form-data", encoding(("file_asset" = (content_type = "application/json"))))),
        description = "`file_asset`: a FileAsset as JSON text; `file`: the bytes, with a filename"),
    responses(
        (status = 200, description = "the stored asset", body = UploadedAsset),
        (status = 400, description = "malformed multipart, missing file_asset or file, file_asset not JSON", body = ErrorBody),
        (status = 401, description = "no or bad token", body = ErrorBody),
        (status = 403, description = "no access to the session", body = ErrorBody),
        (status = 404, description = "unknown session", body = ErrorBody),
        (status = 413, description = "larger than the upload limit", body = ErrorBody),
        (status = 415, description = "not multipart/form-data", body = ErrorBody),
        (status = 422, description = "invalid field (name, type, directory, creator…)", body = ErrorBody),
        (status = 408, description = "the client stopped sending the body", body = ErrorBody),
        (status = 507, description = "no space left to store the upload", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn upload(
    request_id: String,
    headers: HeaderMap,
    body: impl Stream<Item = Result<impl Buf + Send + 'static, warp::Error>> + Send + 'static,
    ctx: Context,
    json_field: &'static str,
) -> Result<impl warp::Reply, ApiError> {
    let (body, meter) = guard_body(&headers, body, &ctx);
    let principal = authenticate(&headers, "", &ctx).await?;
    let boundary = form_boundary(&headers, ctx.settings.max_upload_size, json_field)?;

    let asset_uuid = Uuid::new_v4();
    let check = |text: String| {
        let (principal, ctx) = (&principal, &ctx);
        async move { check_file_asset(&text, principal, ctx).await }
    };
    let (plan, file) = receive_form(body, meter, boundary, &ctx, asset_uuid, json_field, check).await?;

    let asset_type =
        plan.asset_type.clone().or(file.part_type).unwrap_or_else(|| MediaType::guess_from_filename(&file.filename));
    let command = CommandContext::for_request(&principal, &request_id);
    let requester = principal.clone();
    let app = ctx.app.clone();
    let info = ctx
        .app
        .run_to_completion(async move {
            let (blob, filename) = (file.blob, file.filename);
            app.store_upload(&principal, &command, blob, |stored| {
                plan.into_asset(asset_uuid, filename, asset_type, stored, None)
            })
            .await
        })
        .await?;
    Ok(warp::reply::json(&uploaded_answer(info, &requester, &headers, &ctx)))
}

/// Guards an upload's body before anything can fail: an early answer then drains what
/// the client is still sending instead of resetting the connection under it.
pub(super) fn guard_body<B: Buf + Send + 'static>(
    headers: &HeaderMap,
    body: impl Stream<Item = Result<B, warp::Error>> + Send + 'static,
    ctx: &Context,
) -> (GuardedBody<B, warp::Error>, BodyMeter) {
    let expects_continue = headers.get("expect").is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    // Counted as the bytes arrive, a refused upload's drained rest included: what
    // clients sent us, whatever became of it.
    let metrics = ctx.app.metrics.clone();
    let body = futures::TryStreamExt::inspect_ok(body, move |chunk| metrics.upload_received(chunk.remaining() as u64));
    let (body, meter) = GuardedBody::new(body, ctx.settings.body_idle_timeout, MAX_OUTSIDE_FIELDS);
    (body.expecting_continue(expects_continue), meter)
}

/// The multipart boundary of an upload, once its type and declared length are checked.
pub(super) fn form_boundary(headers: &HeaderMap, max: u64, json_field: &str) -> Result<String, ApiError> {
    let content_type = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
    if !content_type.trim_start().to_ascii_lowercase().starts_with("multipart/form-data") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("uploads must be multipart/form-data with the fields {json_field} and file"),
        ));
    }
    let boundary =
        multer::parse_boundary(content_type).ok().filter(|b| !b.is_empty() && b.len() <= 70).ok_or_else(|| {
            ApiError::bad_request("invalid_multipart", "the multipart Content-Type has no valid boundary")
        })?;
    let declared_length =
        headers.get("content-length").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared_length.is_some_and(|length| length > max + MULTIPART_OVERHEAD) {
        return Err(ApiError::too_large(max));
    }
    Ok(boundary)
}

/// What the JSON field of an upload form became once checked.
pub(super) trait FormPlan {
    /// The file name to use when the file part has none (none: the part must have one).
    fn stand_in_filename(&self) -> Option<&str>;
}

impl UploadPlan {
    /// The `AssetUploaded` of this upload, once its bytes are stored.
    pub(super) fn into_asset(
        self,
        asset_uuid: Uuid,
        filename: FileName,
        asset_type: MediaType,
        stored: crate::blobs::StoredBlob,
        id_asset: Option<i64>,
    ) -> AssetUploaded {
        AssetUploaded {
            asset_uuid,
            id_session: self.id_session,
            asset_name: self.asset_name,
            asset_original_filename: filename,
            asset_type,
            asset_file_size: stored.size,
            asset_sha256: stored.sha256,
            // Recorded when not given, so that the event says what the read model shows.
            asset_datetime: self.asset_datetime.or_else(|| crate::domain::names::storable(chrono::Utc::now())),
            directory: self.directory,
            tags: self.tags,
            metadata: self.metadata,
            asset_creator: self.creator,
            asset_source: AssetSource::Upload,
            blob: Some(stored.location),
            id_asset,
        }
    }
}

impl FormPlan for UploadPlan {
    fn stand_in_filename(&self) -> Option<&str> {
        // OpenTera clients always send a filename; without one, the asset's name stands in.
        Some(self.asset_name.as_str())
    }
}

/// Reads the multipart form as it arrives: the JSON field is checked by `check` as soon
/// as it is seen, the file streams into a temporary blob under `blob_key`, unknown
/// fields are skipped.
#[allow(clippy::too_many_arguments)]
pub(super) async fn receive_form<B, P, F, Fut>(
    body: GuardedBody<B, warp::Error>,
    meter: BodyMeter,
    boundary: String,
    ctx: &Context,
    blob_key: Uuid,
    json_field: &'static str,
    mut check: F,
) -> Result<(P, ReceivedFile), ApiError>
where
    B: Buf + Send + 'static,
    P: FormPlan,
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<P, ApiError>>,
{
    let max = ctx.settings.max_upload_size;
    let limits = multer::SizeLimit::new()
        .whole_stream(max + MULTIPART_OVERHEAD)
        .per_field(MAX_FORM_FIELD)
        .for_field("file", max);
    let mut multipart =
        multer::Multipart::with_constraints(body, boundary, multer::Constraints::new().size_limit(limits));

    let mut plan: Option<P> = None;
    let mut file: Option<ReceivedFile> = None;
    while let Some(mut field) = {
        meter.between_fields(MAX_OUTSIDE_FIELDS);
        multipart.next_field().await.map_err(|e| multipart_error(e, max))?
    } {
        meter.in_field();
        match field.name() {
            Some(name) if name == json_field && plan.is_none() => {
                let bytes = field.bytes().await.map_err(|e| multipart_error(e, max))?;
                let text = std::str::from_utf8(&bytes).map_err(|_| {
                    ApiError::bad_request("invalid_file_asset", format!("{json_field} must be UTF-8 JSON"))
                })?;
                plan = Some(check(text.to_owned()).await?);
            }
            Some("file") if file.is_none() => {
                let filename = match part_filename(&field)? {
                    Some(name) => FileName::parse(&name).map_err(ApiError::invalid_field)?,
                    None => match plan.as_ref().and_then(|plan| plan.stand_in_filename()) {
                        Some(name) => FileName::parse(name).map_err(ApiError::invalid_field)?,
                        None => {
                            return Err(ApiError::bad_request("missing_filename", "the file part needs a filename"))
                        }
                    },
                };
                let part_type = field
                    .content_type()
                    .filter(|m| m.essence_str() != "application/octet-stream")
                    .and_then(|m| MediaType::parse(m.as_ref()).ok());
                let mut blob = ctx.app.blobs.create_temp(blob_key);
                let storage = |e| ApiError::from(AppError::Storage(e));
                loop {
                    let next = field.chunk();
                    futures::pin_mut!(next);
                    // A client that stops sending must not sit on its share of the
                    // uploads' memory budget until its idle timeout: what it sent is
                    // written out meanwhile (the read itself is not interrupted).
                    let next = tokio::select! {
                        next = &mut next => next,
                        _ = tokio::time::sleep(HAND_OVER_WHEN_IDLE) => {
                            blob.write_held().await.map_err(storage)?;
                            next.await
                        }
                    };
                    match next.map_err(|e| multipart_error(e, max))? {
                        Some(chunk) => blob.write(chunk).await.map_err(storage)?,
                        None => break,
                    }
                }
                file = Some(ReceivedFile { blob, filename, part_type });
            }
            Some(name) if name == json_field || name == "file" => {
                return Err(ApiError::bad_request("duplicate_field", format!("the field '{name}' was sent twice")));
            }
            _ => {
                // Unknown fields are ignored (bounded by the per-field limit).
                while field.chunk().await.map_err(|e| multipart_error(e, max))?.is_some() {}
            }
        }
    }
    let plan = plan.ok_or_else(|| {
        ApiError::bad_request("missing_file_asset", format!("the multipart field '{json_field}' is required"))
    })?;
    let file = file.ok_or_else(|| ApiError::bad_request("missing_file", "the multipart field 'file' is required"))?;

    Ok((plan, file))
}

/// Parses and checks `file_asset`, including the session and the caller's access to it.
async fn check_file_asset(text: &str, principal: &Principal, ctx: &Context) -> Result<UploadPlan, ApiError> {
    let plan = parse_file_asset(text, principal)?;
    ctx.app.precheck_upload(principal, plan.id_session).await?;
    Ok(plan)
}

/// Parses and checks `file_asset` on its own (pure: no session look-up).
fn parse_file_asset(text: &str, principal: &Principal) -> Result<UploadPlan, ApiError> {
    parse_file_asset_by(text, principal, None)
}

/// As [`parse_file_asset`]; with `creator`, that is the creator whatever the caller
/// (OpenTera mode, where the creator fields are TeraServer's integer ids).
pub(super) fn parse_file_asset_by(
    text: &str,
    principal: &Principal,
    creator: Option<Actor>,
) -> Result<UploadPlan, ApiError> {
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| ApiError::bad_request("invalid_file_asset", format!("file_asset must be a JSON object: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::bad_request("invalid_file_asset", "file_asset must be a JSON object"));
    }
    let form: FileAsset = serde_json::from_value(value)
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", format!("file_asset: {e}")))?;
    let id_session = SessionId::new(form.id_session).map_err(ApiError::invalid_field)?;
    let asset_name = AssetName::parse(&form.asset_name).map_err(ApiError::invalid_field)?;
    let asset_type = form
        .asset_type
        .as_deref()
        .map(|given| fields::check_media_type(given).and_then(|()| MediaType::parse(given)))
        .transpose()
        .map_err(ApiError::invalid_field)?;
    let asset_datetime = form.asset_datetime.as_deref().map(parse_datetime).transpose()?;
    let metadata = form.metadata.unwrap_or_default();
    check_storable_json("metadata", &serde_json::Value::Object(metadata.clone())).map_err(ApiError::invalid_field)?;
    let directory = match form.directory.as_deref() {
        Some(dir) => Directory::parse(dir).map_err(ApiError::invalid_field)?,
        None => Directory::root(),
    };
    let tags = Tags::parse(form.tags.unwrap_or_default()).map_err(ApiError::invalid_field)?;
    let creator =
        if let Some(creator) = creator {
            creator
        } else if principal.is_service() {
            let named: Vec<Actor> = [
                (PrincipalKind::User, form.id_user),
                (PrincipalKind::Participant, form.id_participant),
                (PrincipalKind::Device, form.id_device),
                (PrincipalKind::Service, form.id_service),
            ]
            .into_iter()
            .filter_map(|(kind, uuid)| uuid.map(|uuid| Actor { kind, uuid }))
            .collect();
            match named[..] {
                [creator] => creator,
                _ => return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_field",
                    "services must name the creator with exactly one of id_user, id_participant, id_device, id_service",
                )),
            }
        } else {
            principal.actor()
        };
    Ok(UploadPlan { id_session, asset_name, asset_type, asset_datetime, directory, tags, metadata, creator })
}

pub(super) fn parse_datetime(value: &str) -> Result<DateTime<Utc>, ApiError> {
    fields::parse_asset_datetime(value).map_err(ApiError::invalid_field)
}

/// The file part's name. RFC 6266: `filename*` (RFC 5987, UTF-8 or ISO-8859-1, which
/// multer does not read) wins over `filename`. A name that is there but is not text is
/// refused, not dropped.
fn part_filename(field: &multer::Field<'_>) -> Result<Option<String>, ApiError> {
    let not_text = || ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", "filename: must be text");
    let mut plain_present = false;
    if let Some(disposition) = field.headers().get("content-disposition") {
        for parameter in disposition.as_bytes().split(|b| *b == b';') {
            let Some(eq) = parameter.iter().position(|b| *b == b'=') else { continue };
            let name = String::from_utf8_lossy(&parameter[..eq]).trim().to_ascii_lowercase();
            match name.as_str() {
                "filename*" => {
                    let value = std::str::from_utf8(&parameter[eq + 1..]).map_err(|_| not_text())?;
                    let mut parts = value.trim().trim_matches('"').splitn(3, '\'');
                    let (charset, _language, encoded) = (parts.next(), parts.next(), parts.next());
                    let (Some(charset), Some(encoded)) = (charset, encoded) else { return Err(not_text()) };
                    let bytes: Vec<u8> = percent_encoding::percent_decode_str(encoded).collect();
                    return match charset.to_ascii_lowercase().as_str() {
                        "utf-8" => String::from_utf8(bytes).map(Some).map_err(|_| not_text()),
                        "iso-8859-1" => Ok(Some(bytes.iter().map(|b| char::from(*b)).collect())),
                        _ => Err(not_text()),
                    };
                }
                "filename" => plain_present = true,
                _ => {}
            }
        }
    }
    match field.file_name() {
        Some(name) => Ok(Some(name.to_owned())),
        // multer drops a filename that is not UTF-8.
        None if plain_present => Err(not_text()),
        None => Ok(None),
    }
}

fn multipart_error(error: multer::Error, max: u64) -> ApiError {
    match error {
        multer::Error::FieldSizeExceeded { field_name, .. } if field_name.as_deref() == Some("file") => {
            ApiError::too_large(max)
        }
        multer::Error::FieldSizeExceeded { field_name, limit } => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the field '{}' exceeds {limit} bytes", field_name.unwrap_or_default()),
        ),
        multer::Error::StreamSizeExceeded { .. } => ApiError::too_large(max),
        multer::Error::StreamReadFailed(e) => match e.downcast_ref::<BodyError>() {
            Some(BodyError::Idle(_)) => ApiError::new(StatusCode::REQUEST_TIMEOUT, "request_timeout", e.to_string()),
            Some(BodyError::OutsideFields(_)) => {
                ApiError::bad_request("invalid_multipart", format!("malformed multipart body: {e}"))
            }
            _ => ApiError::bad_request("body_read_failed", format!("the request body could not be read: {e}")),
        },
        other => ApiError::bad_request("invalid_multipart", format!("malformed multipart body: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::asset::AssetEvent;
    use crate::domain::DomainEvent;
    use proptest::prelude::*;

    fn user() -> Principal {
        Principal { kind: PrincipalKind::User, uuid: Uuid::nil(), name: String::new(), superadmin: false }
    }

    /// JSON-ish values that sit on the rules' edges, and some that are not JSON at all.
    fn value() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            Just("null".to_owned()),
            any::<bool>().prop_map(|b| b.to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<u64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|f| format!("{f:e}")),
            "-?[0-9]{1,3}(\\.[0-9]{0,20})?([eE][-+]?[0-9]{1,4})?",
            "\"([a-z/.\\\\ é]|\\\\u00[01][0-9a-f]|\\\\ud8[0-9a-f]{2}|\\\\u202e|\\\\n){0,12}\"",
            "[\\[\\]{}:,\"0-9a-z]{0,8}",
        ];
        leaf.prop_recursive(40, 120, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(|items| format!("[{}]", items.join(","))),
                prop::collection::vec(("[a-z\\\\]{0,3}", inner), 0..6).prop_map(|entries| {
                    let entries: Vec<String> = entries.into_iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
                    format!("{{{}}}", entries.join(","))
                }),
            ]
        })
    }

    fn file_asset() -> impl Strategy<Value = String> {
        let field = prop_oneof![
            Just("id_session"),
            Just("asset_name"),
            Just("asset_type"),
            Just("asset_datetime"),
            Just("directory"),
            Just("tags"),
            Just("metadata"),
            Just("id_user"),
            Just("other"),
        ];
        let datetime = "\"[-+]?[0-9]{1,6}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,12})?(Z|[-+][0-9]{2}:[0-9]{2})?\"";
        let entry = prop_oneof![
            (field, value()).prop_map(|(f, v)| format!("\"{f}\":{v}")),
            datetime.prop_map(|d| format!("\"asset_datetime\":{d}"))
        ];
        prop::collection::vec(entry, 0..8).prop_map(|entries| {
            format!("{{\"id_session\":1,\"asset_name\":\"a\",{}}}", entries.join(",")).replace(",}", "}")
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5_000))]
        /// Whatever `file_asset` holds: no panic, and what is accepted makes an event
        /// that serialises and parses back to itself (so it can be stored and replayed).
        #[test]
        fn file_asset_parsing_never_panics_and_accepts_only_storable_values(text in file_asset()) {
            if let Ok(plan) = parse_file_asset(&text, &user()) {
                prop_assert!(check_storable_json("metadata", &serde_json::Value::Object(plan.metadata.clone())).is_ok());
                let event = AssetEvent::AssetUploaded(AssetUploaded {
                    asset_uuid: Uuid::nil(),
                    id_session: plan.id_session,
                    asset_name: plan.asset_name,
                    asset_original_filename: FileName::parse("f").unwrap(),
                    asset_type: plan.asset_type.unwrap_or_else(MediaType::octet_stream),
                    asset_file_size: 1,
                    asset_sha256: crate::domain::names::Sha256Hex::parse(&"0".repeat(64)).unwrap(),
                    asset_datetime: plan.asset_datetime,
                    directory: plan.directory,
                    tags: plan.tags,
                    metadata: plan.metadata,
                    asset_creator: plan.creator,
                    asset_source: AssetSource::Upload,
                    blob: None,
                    id_asset: None,
                });
                // Through text, as the event store keeps it.
                let stored: serde_json::Value = serde_json::from_str(&event.to_data().to_string()).unwrap();
                let again = AssetEvent::from_parts(event.event_type(), &stored).unwrap().unwrap();
                prop_assert_eq!(again, event);
            }
        }
    }
}
