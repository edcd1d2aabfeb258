//! The OpenAPI document (generated from the handlers' annotations; `assetd openapi`
//! prints it and `openapi/openapi.json` is its checked-in copy) and the Swagger UI at
//! `<base>/doc`, served from files vendored into the binary.

use std::sync::Arc;

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::server::Server;
use utoipa::{Modify, OpenApi};
use warp::filters::BoxedFilter;
use warp::{Filter, Reply};

use super::error::{ErrorBody, ErrorDetail};
use super::{archives, assets, fields, helper, jobs, ops, sessions, signed, upload, uploads};
use crate::domain::principal::{Actor, PrincipalKind};
use crate::projections::read::{AssetInfo, SessionInfo};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "assetd",
        description = "Stores the files (assets) of sessions. OpenTera FileTransferService compatible. \
            Authenticate with `Authorization: Bearer <jwt>` (or `OpenTera <jwt>`).",
    ),
    paths(
        sessions::put_session,
        sessions::get_session,
        sessions::delete_session,
        sessions::list_assets,
        upload::upload,
        assets::download_asset,
        assets::delete_asset,
        assets::get_infos,
        assets::post_infos,
        assets::asset_events,
        jobs::request_import,
        jobs::get_job,
        jobs::cancel_job,
        jobs::list_jobs,
        archives::request_archive,
        archives::download_archive,
        archives::archive_infos,
        archives::delete_archive,
        uploads::create_upload,
        uploads::upload_status,
        uploads::commit_upload,
        signed::ask_download_url,
        signed::signed_download,
        signed::signed_upload,
        helper::helper_download,
        helper::helper_upload,
        ops::health,
        ops::ready,
        ops::metrics,
    ),
    components(schemas(
        ErrorBody, ErrorDetail, SessionInfo, AssetInfo, Actor, PrincipalKind,
        crate::app::sessions::SessionBody, sessions::AssetPage, sessions::ListedAsset,
        upload::FileAsset, upload::UploadForm, upload::UploadedAsset,
        fields::PageSize, fields::ExpiresIn, fields::ListingCursor, fields::JobCursor, fields::ImportUrl, fields::IdempotencyKey, fields::UuidText,
        crate::app::jobs::ImportBody, crate::app::jobs::UploadImportBody, crate::app::jobs::AnyImportBody, jobs::ImportAccepted, jobs::JobPage,
        uploads::NewUpload, uploads::UploadCreated, uploads::CommitUpload, uploads::UploadView, crate::projections::read::UploadInfo,
        signed::SignedUrl, helper::HelperUploadForm,
        crate::app::archives::ArchiveBody, crate::app::archives::ArchiveOfSession, crate::app::archives::ArchiveOfAssets, archives::ArchiveAccepted, crate::projections::read::ArchiveInfo, sessions::SessionDeletionAccepted,
        crate::projections::read::JobInfo, crate::projections::read::JobProgress,
        assets::InfosRequest, assets::InfosBatch, assets::InfosRename, assets::AssetRef, assets::RenameRequest, assets::AssetEventRecord, assets::AssetDeletedReply,
    )),
    modifiers(&BearerAuth, &CommonResponses),
    tags(
        (name = "sessions", description = "the registry of sessions"),
        (name = "assets", description = "files of sessions (OpenTera compatible)"),
        (name = "jobs", description = "imports from URLs and other long work, run by workers"),
        (name = "archives", description = "zips of a session's assets, built by a job, kept until they expire"),
        (name = "uploads", description = "two-phase uploads: ask for an upload URL, PUT the bytes, commit or import"),
        (name = "signed", description = "signed URLs: downloads and uploads without an Authorization header"),
        (name = "helpers", description = "routes for devices that cannot build URLs"),
        (name = "operations", description = "health and readiness"),
    ),
)]
pub struct ApiDoc;

struct BearerAuth;

/// Answers every API operation may give whatever it does: the database down (503).
struct CommonResponses;

impl Modify for CommonResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let unavailable = utoipa::openapi::ResponseBuilder::new()
            .description("a dependency (the database) is down or going away; retry after `Retry-After` seconds")
            .header(
                "Retry-After",
                utoipa::openapi::HeaderBuilder::new()
                    .schema(utoipa::openapi::ObjectBuilder::new().schema_type(utoipa::openapi::Type::Integer))
                    .description(Some("seconds to wait before trying again"))
                    .build(),
            )
            .content(
                "application/json",
                utoipa::openapi::ContentBuilder::new()
                    .schema(Some(utoipa::openapi::Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build();
        for (path, item) in openapi.paths.paths.iter_mut() {
            if !path.starts_with("/api/") && !path.starts_with("/helper/") {
                continue;
            }
            for operation in [&mut item.get, &mut item.put, &mut item.post, &mut item.delete].into_iter().flatten() {
                operation.responses.responses.entry("503".into()).or_insert_with(|| unavailable.clone().into());
            }
        }
    }
}

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some("A JWT; `OpenTera <jwt>` is accepted as well"))
                    .build(),
            ),
        );
    }
}

/// The document for a server mounted at `base_path` (paths are relative to it).
pub fn document(base_path: &str) -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    doc.servers = Some(vec![Server::new(base_path)]);
    doc
}

/// `<base>/doc` (redirects to `<base>/doc/`), `<base>/doc/openapi.json`, and the UI files.
///
/// Served at the root (OpenTera mode), the page is reached through a proxy that strips
/// a prefix (OpenTera's nginx: `/file`): its links are then relative, and the document
/// names the prefix the proxy declares in `X-Script-Name` as its server.
pub fn routes(base_path: &str) -> BoxedFilter<(warp::reply::Response,)> {
    let spec = Arc::new(document(base_path));
    let at_root = base_path.is_empty();
    let spec_url = if at_root { "openapi.json".to_owned() } else { format!("{base_path}/doc/openapi.json") };
    let config = Arc::new(utoipa_swagger_ui::Config::from(spec_url).try_it_out_enabled(true));
    // Relative at the root, so that it stays under the proxy's prefix.
    let doc_root = if at_root { "doc/".to_owned() } else { format!("{base_path}/doc/") };

    let json = warp::path!("doc" / "openapi.json")
        .and(super::get_or_head())
        .and(warp::header::optional::<String>("x-script-name"))
        .map(move |script_name: Option<String>| {
            let prefix = script_name.filter(|p| {
                at_root && p.starts_with('/') && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"/-_.".contains(&b))
            });
            match prefix {
                Some(prefix) => {
                    let mut document = (*spec).clone();
                    document.servers = Some(vec![Server::new(prefix.trim_end_matches('/'))]);
                    warp::reply::json(&document).into_response()
                }
                None => warp::reply::json(&*spec).into_response(),
            }
        });
    let redirect = warp::path!("doc").and(super::get_or_head()).and(warp::path::full()).and_then(
        move |full: warp::path::FullPath| {
            let doc_root = doc_root.clone();
            async move {
                // Only the bare `/doc`; `/doc/` falls through to the UI.
                if full.as_str().ends_with('/') {
                    Err(warp::reject::not_found())
                } else {
                    Ok(warp::http::Response::builder()
                        .status(warp::http::StatusCode::FOUND)
                        .header("location", doc_root)
                        .body(warp::hyper::Body::empty())
                        .unwrap_or_default())
                }
            }
        },
    );
    let ui = warp::path("doc").and(super::get_or_head()).and(warp::path::tail()).map(move |tail: warp::path::Tail| {
        match utoipa_swagger_ui::serve(tail.as_str(), config.clone()) {
            Ok(Some(file)) => warp::http::Response::builder()
                .header("content-type", file.content_type)
                .body(file.bytes.into_owned().into())
                .unwrap_or_default(),
            Ok(None) => super::error::ApiError::not_found("documentation file").into_response(),
            Err(error) => super::error::ApiError::internal(error).into_response(),
        }
    });
    json.or(redirect).unify().or(ui).unify().boxed()
}
