//! OpenTera mode's asset routes: `/api/assets` and `/api/assets/infos` as OpenTera's
//! FileTransferService (FTS) answers them (`services/FileTransferService/API/
//! QueryAssetFile*.py`): OpenTera's tokens (static ones on the POSTs), FTS's access
//! tokens, TeraServer deciding sessions and making assets, FTS's statuses and bodies
//! (a JSON string, or flask-restx's `{"errors", "message"}` for a missing argument).
//!
//! The bytes, their events and their delivery are assetd's (the same store, Range,
//! ETag, X-Accel-Redirect as the native routes).

use std::collections::HashMap;

use bytes::Buf;
use futures::Stream;
use serde_json::{json, Map, Value};
use uuid::Uuid;
use warp::filters::BoxedFilter;
use warp::http::{HeaderMap, StatusCode};
use warp::reply::Response;
use warp::{Filter, Reply};

use super::assets::deliver;
use super::auth::opentera_unavailable;
use super::error::ApiError;
use super::upload::{form_boundary, guard_body, parse_file_asset_by, receive_form, FormPlan};
use super::{get_or_head, json_body, request_context, with_context, Context, JsonBody};
use crate::app::{AppError, CommandContext};
use crate::domain::names::{FileName, MediaType, SessionId};
use crate::domain::session::UpsertSession;
use crate::domain::DomainError;
use crate::opentera::tokens::{self, Caller, TokenRule};
use crate::opentera::{service_principal, vouched, OpenTera, OpenTeraError, ACCESS_TOKEN_SECONDS};
use crate::projections::read::AssetInfo;

/// An FTS-shaped error answer.
#[derive(Debug)]
pub(super) struct Fts {
    pub(super) status: StatusCode,
    body: Value,
    headers: Vec<(&'static str, String)>,
}

impl Fts {
    pub(super) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, body: Value::String(message.into()), headers: vec![] }
    }
    pub(super) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    pub(super) fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, message)
    }
    /// flask-restx's answer to a required argument that is missing.
    fn missing(argument: &str, help: &str) -> Self {
        let message =
            format!("{help} Missing required parameter in the JSON body or the post body or the query string");
        Self {
            status: StatusCode::BAD_REQUEST,
            body: json!({"errors": {argument: message}, "message": "Input payload validation failed"}),
            headers: vec![],
        }
    }
    fn into_response(self) -> Response {
        let mut response = warp::reply::with_status(warp::reply::json(&self.body), self.status).into_response();
        for (name, value) in self.headers {
            if let Ok(value) = value.parse() {
                response.headers_mut().insert(name, value);
            }
        }
        response
    }
}

/// assetd's own errors, in FTS's statuses: no 401, 415 or 422 (all 400 or 403 there).
impl From<ApiError> for Fts {
    fn from(error: ApiError) -> Self {
        let status = match error.status {
            StatusCode::UNAUTHORIZED => StatusCode::FORBIDDEN,
            StatusCode::UNPROCESSABLE_ENTITY | StatusCode::UNSUPPORTED_MEDIA_TYPE => StatusCode::BAD_REQUEST,
            other => other,
        };
        Self { status, body: Value::String(error.message), headers: error.headers }
    }
}

impl From<AppError> for Fts {
    fn from(error: AppError) -> Self {
        match error {
            AppError::Domain(DomainError::NotFound(_)) => Fts::new(StatusCode::NOT_FOUND, "No asset found"),
            other => ApiError::from(other).into(),
        }
    }
}

impl From<OpenTeraError> for Fts {
    fn from(error: OpenTeraError) -> Self {
        opentera_unavailable(error).into()
    }
}

pub(super) fn respond(result: Result<Response, Fts>) -> Response {
    result.unwrap_or_else(Fts::into_response)
}

/// The routes that replace the native asset routes in OpenTera mode.
pub fn routes(ctx: Context) -> BoxedFilter<(Response,)> {
    let query = warp::query::raw().or(warp::any().map(String::new)).unify();
    let download = warp::path!("assets")
        .and(get_or_head())
        .and(warp::method())
        .and(warp::header::headers_cloned())
        .and(query)
        .and(with_context(ctx.clone()))
        .then(|method, headers, query, ctx| async move { respond(download(method, headers, query, ctx).await) });
    let upload = warp::path!("assets")
        .and(warp::post())
        .and(request_context())
        .and(warp::header::headers_cloned())
        .and(query)
        .and(warp::body::stream())
        .and(with_context(ctx.clone()))
        .then(|request_id, headers, query, body, ctx| async move {
            respond(upload(request_id, headers, query, body, ctx).await)
        });
    let delete = warp::path!("assets")
        .and(warp::delete())
        .and(request_context())
        .and(warp::header::headers_cloned())
        .and(query)
        .and(with_context(ctx.clone()))
        .then(|request_id, headers, query, ctx| async move { respond(delete(request_id, headers, query, ctx).await) });
    let infos = warp::path!("assets" / "infos")
        .and(get_or_head())
        .and(warp::header::headers_cloned())
        .and(query)
        .and(with_context(ctx.clone()))
        .then(|headers, query, ctx| async move { respond(get_infos(headers, query, ctx).await) });
    let post_infos = warp::path!("assets" / "infos")
        .and(warp::post())
        .and(request_context())
        .and(warp::header::headers_cloned())
        .and(query)
        .and(json_body(ctx.settings.body_idle_timeout))
        .and(with_context(ctx.clone()))
        .then(|request_id, headers, query, body, ctx| async move {
            respond(post_infos(request_id, headers, query, body, ctx).await)
        });
    download
        .or(upload)
        .unify()
        .or(delete)
        .unify()
        .or(infos)
        .unify()
        .or(post_infos)
        .unify()
        .or(super::opentera_archives::routes(ctx))
        .unify()
        .boxed()
}

pub(super) fn opentera(ctx: &Context) -> &OpenTera {
    ctx.app.opentera.as_ref().expect("OpenTera routes are mounted in OpenTera mode only")
}

pub(super) fn arguments(query: &str) -> HashMap<String, String> {
    // flask-restx: the first value of a repeated argument.
    let mut map = HashMap::new();
    for (name, value) in serde_urlencoded::from_str::<Vec<(String, String)>>(query).unwrap_or_default() {
        map.entry(name).or_insert(value);
    }
    map
}

/// FTS's authentication: the caller, or 403 "Forbidden".
pub(super) async fn caller(
    ctx: &Context,
    headers: &HeaderMap,
    args: &HashMap<String, String>,
    rule: TokenRule,
) -> Result<Caller, Fts> {
    let token = args.get("token").map(String::as_str);
    opentera(ctx).authenticate(headers, token, rule).await?.ok_or_else(|| Fts::forbidden("Forbidden"))
}

pub(super) fn required<'a>(args: &'a HashMap<String, String>, name: &str, help: &str) -> Result<&'a str, Fts> {
    args.get(name).map(String::as_str).ok_or_else(|| Fts::missing(name, help))
}

/// FTS's `has_access_to_asset`: the access token names the asset, for this caller.
async fn check_access(ctx: &Context, caller: &Caller, access_token: &str, asset_uuid: &str) -> Result<(), Fts> {
    let snapshot = opentera(ctx).snapshot(false).await?;
    if tokens::access_token_grants(&snapshot.keys, access_token, caller.principal.uuid, asset_uuid) {
        Ok(())
    } else {
        Err(Fts::forbidden("Access denied to asset"))
    }
}

/// The asset, if assetd holds it and it is available (FTS: 404 otherwise).
async fn available_asset(ctx: &Context, caller: &Caller, asset_uuid: &str) -> Result<AssetInfo, Fts> {
    let not_found = || Fts::new(StatusCode::NOT_FOUND, "No asset found");
    let uuid = Uuid::try_parse(asset_uuid).map_err(|_| not_found())?;
    let asset = ctx.app.asset_for(&vouched(caller), uuid, None).await?;
    if !asset.is_available() {
        return Err(not_found());
    }
    Ok(asset)
}

/// FTS's `AssetFileData` fields, with assetd's and TeraServer's `id_asset`.
fn asset_json(asset: &AssetInfo) -> Value {
    let mut value = serde_json::to_value(asset).unwrap_or_default();
    if let Value::Object(map) = &mut value {
        map.insert("id_asset_file_data".into(), json!(asset.id_asset.unwrap_or(asset.created_position)));
    }
    value
}

async fn download(
    method: warp::http::Method,
    headers: HeaderMap,
    query: String,
    ctx: Context,
) -> Result<Response, Fts> {
    let args = arguments(&query);
    let caller = caller(&ctx, &headers, &args, TokenRule::DynamicOnly).await?;
    let access_token =
        required(&args, "access_token", "Access token proving that the requested assets can be accessed.")?;
    let asset_uuid = required(&args, "asset_uuid", "UUID of the asset to download")?;
    check_access(&ctx, &caller, access_token, asset_uuid).await?;
    let asset = available_asset(&ctx, &caller, asset_uuid).await?;
    Ok(deliver(&asset, &method, &headers, &ctx).await?)
}

async fn get_infos(headers: HeaderMap, query: String, ctx: Context) -> Result<Response, Fts> {
    let args = arguments(&query);
    let caller = caller(&ctx, &headers, &args, TokenRule::DynamicOnly).await?;
    let access_token =
        required(&args, "access_token", "Access token proving that the requested assets can be accessed.")?;
    let asset_uuid = required(&args, "asset_uuid", "UUID of the asset to get info")?;
    check_access(&ctx, &caller, access_token, asset_uuid).await?;
    let asset = available_asset(&ctx, &caller, asset_uuid).await?;
    Ok(warp::reply::json(&asset_json(&asset)).into_response())
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
    let text = |value: Option<&Value>| value.and_then(Value::as_str).map(str::to_owned);
    if let Some(assets) = body.get("assets") {
        let assets = assets.as_array().ok_or_else(|| Fts::bad_request("Badly formatted request"))?;
        let mut found = Vec::new();
        for asset in assets {
            let access_token = text(asset.get("access_token"))
                .ok_or_else(|| Fts::bad_request("Missing access token for at least one requested asset"))?;
            let asset_uuid = text(asset.get("asset_uuid"))
                .ok_or_else(|| Fts::bad_request("Missing asset UUID for at least one requested asset"))?;
            check_access(&ctx, &caller, &access_token, &asset_uuid)
                .await
                .map_err(|_| Fts::forbidden("Access denied for at least one requested asset"))?;
            // FTS answers with the assets it holds, leaving out the others.
            match available_asset(&ctx, &caller, &asset_uuid).await {
                Ok(asset) => found.push(asset_json(&asset)),
                Err(error) if error.status == StatusCode::NOT_FOUND => {}
                Err(error) => return Err(error),
            }
        }
        return Ok(warp::reply::json(&found).into_response());
    }
    let Some(file_asset) = body.get("file_asset") else { return Err(Fts::bad_request("Badly formatted request")) };
    let access_token = text(file_asset.get("access_token")).ok_or_else(|| Fts::bad_request("Missing access token"))?;
    let asset_uuid = text(file_asset.get("asset_uuid")).ok_or_else(|| Fts::bad_request("Missing asset uuid"))?;
    check_access(&ctx, &caller, &access_token, &asset_uuid).await.map_err(|_| Fts::forbidden("Forbidden"))?;
    let filename = text(file_asset.get("asset_original_filename"))
        .ok_or_else(|| Fts::bad_request("Only original filename can be changed from here"))?;
    let name = FileName::parse_field("asset_original_filename", &filename).map_err(ApiError::invalid_field)?;
    let asset = available_asset(&ctx, &caller, &asset_uuid).await?;
    let principal = vouched(&caller);
    let command = CommandContext::for_request(&caller.principal, &request_id);
    let renamed = ctx.app.rename_asset(&principal, &command, asset.asset_uuid, None, name).await?;
    Ok(warp::reply::json(&asset_json(&renamed)).into_response())
}

async fn delete(request_id: String, headers: HeaderMap, query: String, ctx: Context) -> Result<Response, Fts> {
    let args = arguments(&query);
    let caller = caller(&ctx, &headers, &args, TokenRule::DynamicOnly).await?;
    let asset_uuid = required(&args, "uuid", "UUID of the asset do delete")?;
    let access_token =
        required(&args, "access_token", "Access token proving that the requested asset can be deleted.")?;
    check_access(&ctx, &caller, access_token, asset_uuid).await?;
    let opentera = opentera(&ctx);
    let uuid = Uuid::try_parse(asset_uuid).map_err(|_| Fts::new(StatusCode::NOT_FOUND, "No asset found"))?;
    // TeraServer first (its refusal is passed on, as FTS does); then the bytes.
    let teraserver = &opentera.teraserver;
    match opentera.as_service(|token| async move { teraserver.delete_asset(uuid, &token).await }).await? {
        Ok(()) => {}
        Err(crate::opentera::teraserver::TeraServerError::Refused { status, body }) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            return Err(Fts::new(status, format!("Unable to delete asset: {body}")));
        }
        Err(error) => return Err(OpenTeraError::from(error).into()),
    }
    let principal = vouched(&caller);
    let command = CommandContext::for_request(&caller.principal, &request_id);
    let app = ctx.app.clone();
    let deleted =
        ctx.app.run_to_completion(async move { app.delete_asset(&principal, &command, uuid, None).await }).await;
    match deleted {
        // TeraServer's asset is gone; assetd never had it, or it was deleted already.
        Ok(()) | Err(AppError::Domain(DomainError::NotFound(_))) => {}
        Err(AppError::Domain(DomainError::Conflict(_))) => {}
        Err(error) => return Err(error.into()),
    }
    Ok(warp::reply::json(&"").into_response())
}

/// In OpenTera mode the form's JSON is only kept while the body arrives: it is checked
/// once the body is in, in FTS's order.
pub(super) struct RawFileAsset(pub String);

impl FormPlan for RawFileAsset {
    fn stand_in_filename(&self) -> Option<&str> {
        None
    }
}

/// The fields of a `file_asset` that TeraServer's asset takes.
const TERASERVER_ASSET_FIELDS: [&str; 8] = [
    "id_session",
    "asset_name",
    "asset_type",
    "asset_datetime",
    "id_user",
    "id_participant",
    "id_device",
    "id_service",
];

async fn upload(
    request_id: String,
    headers: HeaderMap,
    query: String,
    body: impl Stream<Item = Result<impl Buf + Send + 'static, warp::Error>> + Send + 'static,
    ctx: Context,
) -> Result<Response, Fts> {
    let (body, meter) = guard_body(&headers, body, &ctx);
    let args = arguments(&query);
    let caller = caller(&ctx, &headers, &args, TokenRule::StaticAllowed).await?;
    let boundary = form_boundary(&headers, ctx.settings.max_upload_size, "file_asset").map_err(|e| {
        if e.status == StatusCode::UNSUPPORTED_MEDIA_TYPE {
            Fts::bad_request("Wrong content type")
        } else {
            e.into()
        }
    })?;
    let keep = |text: String| async move { Ok(RawFileAsset(text)) };
    let (RawFileAsset(text), file) = receive_form(body, meter, boundary, &ctx, Uuid::new_v4(), "file_asset", keep)
        .await
        .map_err(|e| match e.code {
            "missing_file_asset" => Fts::bad_request("Missing file asset information"),
            "missing_file" => Fts::bad_request("Missing uploaded file"),
            "missing_filename" => Fts::bad_request("Missing filename"),
            _ => e.into(),
        })?;
    // From here on, a refusal drops `file.blob`, which removes the received bytes.
    let mut file_asset: Map<String, Value> = match serde_json::from_str(&text) {
        Ok(Value::Object(map)) => map,
        _ => return Err(Fts::bad_request("Invalid file_asset format")),
    };
    if !file_asset.contains_key("id_session") || !file_asset.contains_key("asset_name") {
        return Err(Fts::bad_request("Missing required field(s) in asset descriptor"));
    }
    // assetd's own checks of the fields it keeps (creators are TeraServer's ids here).
    let mut own = file_asset.clone();
    for creator in ["id_user", "id_participant", "id_device", "id_service"] {
        own.remove(creator);
    }
    let plan = parse_file_asset_by(&Value::Object(own).to_string(), &caller.principal, Some(caller.principal.actor()))?;
    let opentera = opentera(&ctx);
    let session = match opentera.session_for_upload(&caller, plan.id_session.get()).await? {
        Ok(session) => session,
        Err(_) => return Err(Fts::forbidden("Session access is forbidden")),
    };
    let (record, _) = opentera.service().await?;
    // The creator: the caller; a service names one, and is recorded as the maker too.
    if caller.principal.is_service() {
        if !["id_device", "id_participant", "id_user", "id_service"].iter().any(|k| file_asset.contains_key(*k)) {
            return Err(Fts::bad_request("Missing at least one ID creator"));
        }
        if let Some(id_service) = record.id_service {
            file_asset.insert("id_service".into(), json!(id_service));
        }
    } else {
        // Users, participants and devices upload as themselves: creators they name go.
        for creator in ["id_user", "id_participant", "id_device", "id_service"] {
            file_asset.remove(creator);
        }
        let field = match caller.principal.kind {
            crate::domain::principal::PrincipalKind::User => "id_user",
            crate::domain::principal::PrincipalKind::Participant => "id_participant",
            _ => "id_device",
        };
        file_asset.insert(field.into(), json!(caller.id));
    }
    let asset_type = plan
        .asset_type
        .clone()
        .or(file.part_type.clone())
        .unwrap_or_else(|| MediaType::guess_from_filename(&file.filename));
    let mut asset: Map<String, Value> =
        file_asset.into_iter().filter(|(k, _)| TERASERVER_ASSET_FIELDS.contains(&k.as_str())).collect();
    asset.insert("id_asset".into(), json!(0));
    asset.insert("asset_service_uuid".into(), json!(record.service_uuid.to_string()));
    asset.insert("asset_type".into(), json!(asset_type.as_str()));
    asset
        .entry("asset_datetime")
        .or_insert_with(|| json!(chrono::Utc::now().naive_utc().format("%Y-%m-%dT%H:%M:%S%.6f").to_string()));

    // TeraServer makes the asset (its uuid and id), then assetd records it with the bytes.
    let teraserver = &opentera.teraserver;
    let asset = Value::Object(asset);
    let create = |token: String| {
        let asset = asset.clone();
        async move { teraserver.create_asset(asset, &token).await }
    };
    let created = match opentera.as_service(create).await? {
        Ok(created) => created,
        Err(crate::opentera::teraserver::TeraServerError::Refused { status, body }) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            return Err(Fts::new(status, format!("Unable to create asset: {body}")));
        }
        Err(error) => return Err(OpenTeraError::from(error).into()),
    };
    let made = created.get("asset_uuid").and_then(Value::as_str).and_then(|u| Uuid::try_parse(u).ok());
    let id_asset = created.get("id_asset").and_then(Value::as_i64);
    let (Some(asset_uuid), Some(id_asset)) = (made, id_asset) else {
        return Err(Fts::new(StatusCode::BAD_GATEWAY, "TeraServer's answer has no asset_uuid or id_asset"));
    };
    let stored =
        record_upload(&ctx, &caller, &request_id, &session, &record, plan, file, asset_type, asset_uuid, id_asset)
            .await;
    let info = match stored {
        Ok(info) => info,
        // The commit's outcome is unknown: the asset may be recorded, so TeraServer's stays
        // (the client's retry, or the cleanup of unreferenced bytes, settles it).
        Err(Recording::MayHaveCommitted(error)) => return Err(error),
        Err(Recording::Failed(error)) => {
            // No asset without bytes: TeraServer's asset goes again.
            let undo = |token: String| async move { teraserver.delete_asset(asset_uuid, &token).await };
            if let Err(undo) = opentera.as_service(undo).await.and_then(|answer| Ok(answer?)) {
                tracing::error!(%asset_uuid, %undo, "an upload failed and TeraServer's asset could not be deleted");
            }
            return Err(error);
        }
    };

    let mut answer = created.as_object().cloned().unwrap_or_default();
    if let Value::Object(ours) = asset_json(&info) {
        answer.extend(ours);
    }
    let (server, port) = external_address(&headers, &ctx);
    let base = format!("https://{server}:{port}{}", record.clientendpoint);
    answer.insert("asset_infos_url".into(), json!(format!("{base}/api/assets/infos")));
    answer.insert("asset_url".into(), json!(format!("{base}/api/assets")));
    // Signed with the key in force now (TeraServer may have renewed it during the upload).
    let (_, service_key) = opentera.service().await?;
    let token = tokens::mint_access_token(&service_key, &[asset_uuid], caller.principal.uuid, ACCESS_TOKEN_SECONDS);
    answer.insert("access_token".into(), json!(token));
    Ok(warp::reply::json(&answer).into_response())
}

/// Why an asset TeraServer made was not recorded.
enum Recording {
    Failed(Fts),
    /// The database did not say whether the commit happened.
    MayHaveCommitted(Fts),
}

/// Registers TeraServer's session in assetd (its members as TeraServer lists them) and
/// records the asset with the received bytes.
#[allow(clippy::too_many_arguments)]
async fn record_upload(
    ctx: &Context,
    caller: &Caller,
    request_id: &str,
    session: &Value,
    record: &crate::opentera::ServiceRecord,
    plan: super::upload::UploadPlan,
    file: super::upload::ReceivedFile,
    asset_type: MediaType,
    asset_uuid: Uuid,
    id_asset: i64,
) -> Result<AssetInfo, Recording> {
    let command = CommandContext::for_request(&caller.principal, request_id);
    register_session(ctx, &command, record, plan.id_session, session).await.map_err(Recording::Failed)?;
    let principal = vouched(caller);
    let app = ctx.app.clone();
    let info = ctx
        .app
        .run_to_completion(async move {
            let (blob, filename) = (file.blob, file.filename);
            app.store_upload(&principal, &command, blob, |stored| {
                plan.into_asset(asset_uuid, filename, asset_type, stored, Some(id_asset))
            })
            .await
        })
        .await
        .map_err(|error| match error {
            AppError::CommitOutcomeUnknown(_) => Recording::MayHaveCommitted(error.into()),
            other => Recording::Failed(other.into()),
        })?;
    Ok(info)
}

/// TeraServer's session, registered (or updated) in assetd's registry when it is not
/// there as TeraServer shows it: assets belong to registered sessions.
async fn register_session(
    ctx: &Context,
    command: &CommandContext,
    record: &crate::opentera::ServiceRecord,
    id_session: SessionId,
    session: &Value,
) -> Result<(), Fts> {
    let name = session
        .get("session_name")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|n| !n.is_empty() && n.chars().count() <= 255 && !n.chars().any(char::is_control))
        .map_or_else(|| format!("Session {}", id_session.get()), str::to_owned);
    // Registered without members: in OpenTera mode TeraServer decides who reaches a
    // session, at each request, so assetd's registry must grant nobody anything (its
    // other routes then serve services, superadmins and access tokens' holders only).
    let upsert = UpsertSession {
        id_session,
        session_name: name,
        session_uuid: session.get("session_uuid").and_then(Value::as_str).and_then(|u| u.parse().ok()),
        id_creator_uuid: None,
        session_users: vec![],
        session_participants: vec![],
        session_devices: vec![],
    };
    let fingerprint = format!("{upsert:?}");
    let opentera = opentera(ctx);
    if opentera.registered_sessions.get(&id_session.get()).as_deref() == Some(&fingerprint) {
        return Ok(());
    }
    let service = service_principal(record);
    let command = CommandContext { actor: service.actor(), ..command.clone() };
    ctx.app.upsert_session(&service, &command, upsert).await?;
    opentera.registered_sessions.insert(id_session.get(), std::sync::Arc::new(fingerprint));
    Ok(())
}

/// Where clients reach FTS, as OpenTera's nginx tells it (`X_ExternalServer`, with an
/// underscore, and `X-ExternalPort`); else as the request came.
pub(super) fn external_address(headers: &HeaderMap, ctx: &Context) -> (String, String) {
    let get = |names: [&str; 2]| {
        names.iter().find_map(|name| headers.get(*name).and_then(|v| v.to_str().ok()).map(str::trim).map(str::to_owned))
    };
    // Host and port characters only: these headers end up in URLs clients follow.
    let host_like = |v: &String| !v.is_empty() && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
    let server = get(["x_externalserver", "x-externalserver"]).filter(host_like);
    let port =
        get(["x_externalport", "x-externalport"]).filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    match (server, port) {
        (Some(server), Some(port)) => (server, port),
        (server, port) => {
            let origin = super::origin(&ctx.settings, headers);
            let authority = origin.split("://").nth(1).unwrap_or("localhost").to_owned();
            let (host, default_port) = match authority.rsplit_once(':') {
                Some((host, port)) if !host.ends_with(']') || port.is_empty() => (host.to_owned(), port.to_owned()),
                _ => (authority, "443".to_owned()),
            };
            (server.unwrap_or(host), port.unwrap_or(default_port))
        }
    }
}

/// Who reads records whose access OpenTera's rules decide afterwards (the handler then
/// checks owner or service itself, as FTS does).
pub(super) fn privileged_reader() -> crate::domain::principal::Principal {
    crate::domain::principal::Principal {
        kind: crate::domain::principal::PrincipalKind::Service,
        uuid: Uuid::nil(),
        name: "opentera".into(),
        superadmin: false,
    }
}
