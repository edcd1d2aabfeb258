//! The HTTP edge (warp on hyper): routes, authentication, request parsing and limits,
//! error mapping, OpenAPI and the Swagger UI. No business rules: handlers parse, call
//! `app`, and shape the answer.

mod allow;
mod archives;
mod assets;
mod auth;
mod body;
mod conditional;
mod connection;
mod download;
pub mod error;
pub(crate) mod fields;
mod helper;
mod jobs;
pub mod openapi;
mod opentera;
mod opentera_archives;
mod ops;
pub mod request_id;
pub mod sessions;
mod signed;
mod upload;
mod uploads;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::service::{make_service_fn, service_fn, Service};
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::{Filter, Reply};

use crate::app::App;

/// What the HTTP layer needs besides the application.
#[derive(Clone, Debug)]
pub struct HttpSettings {
    pub base_path: String,
    pub max_upload_size: u64,
    pub accel_redirect_prefix: Option<String>,
    /// A request body that delivers nothing for this long is abandoned (408).
    pub body_idle_timeout: Duration,
    /// `scheme://host[:port]` for absolute URLs in answers, without the base path.
    pub public_url: Option<String>,
    /// How the imports it queues run.
    pub import_policy: crate::app::jobs::JobPolicy,
    /// Signs and checks signed URLs.
    pub signer: crate::auth::UrlSigner,
    /// A signed download URL's lifetime when none is asked for, and the longest one.
    pub signed_url_seconds: u64,
    pub signed_url_max_seconds: u64,
}

/// Shared state of the handlers.
#[derive(Clone)]
pub struct Context {
    pub app: App,
    pub settings: Arc<HttpSettings>,
}

/// A filter that hands each handler the shared context.
fn with_context(ctx: Context) -> impl Filter<Extract = (Context,), Error = Infallible> + Clone {
    warp::any().map(move || ctx.clone())
}

/// GET, and HEAD wherever GET is allowed (hyper sends no body for HEAD).
fn get_or_head() -> impl Filter<Extract = (), Error = warp::Rejection> + Copy {
    warp::get().or(warp::head()).unify()
}

/// Matches the base path (`/file`), whose segments are only known at run time.
fn base_path(base: &str) -> BoxedFilter<()> {
    base.split('/').filter(|s| !s.is_empty()).fold(warp::any().boxed(), |filter, segment| {
        // warp wants 'static segments; the base path is fixed for the process's life.
        let segment: &'static str = Box::leak(segment.to_owned().into_boxed_str());
        filter.and(warp::path(segment)).boxed()
    })
}

/// Every route of the service under the base path, with errors turned into JSON.
pub fn routes(ctx: Context) -> BoxedFilter<(warp::reply::Response,)> {
    // OpenTera mode: FTS's asset routes first, in place of the native ones.
    let opentera_assets = match ctx.app.opentera {
        Some(_) => opentera::routes(ctx.clone()),
        None => warp::any().and_then(|| async { Err::<warp::reply::Response, _>(warp::reject::not_found()) }).boxed(),
    };
    let api = warp::path("api").and(
        opentera_assets
            .or(sessions::routes(ctx.clone()))
            .unify()
            .or(upload::route(ctx.clone()))
            .unify()
            .or(assets::routes(ctx.clone()))
            .unify()
            .or(jobs::routes(ctx.clone()))
            .unify()
            .or(archives::routes(ctx.clone()))
            .unify()
            .or(uploads::routes(ctx.clone()))
            .unify()
            .or(signed::routes(ctx.clone()))
            .unify()
            .boxed(),
    );
    let routes = base_path(&ctx.settings.base_path)
        .and(
            api.or(helper::routes(ctx.clone()))
                .unify()
                .or(ops::routes(ctx.clone()))
                .unify()
                .or(openapi::routes(&ctx.settings.base_path))
                .unify(),
        )
        .recover(error::recover)
        .unify()
        .boxed();
    match ctx.app.opentera {
        None => routes,
        Some(_) => opentera_shape(routes),
    }
}

/// OpenTera mode's answers, as FTS gives them: CORS open to all (its `after_request`),
/// OPTIONS answered on every route, and 403 for every authentication failure.
fn opentera_shape(routes: BoxedFilter<(warp::reply::Response,)>) -> BoxedFilter<(warp::reply::Response,)> {
    let options = warp::options().map(|| warp::reply::with_status(warp::reply(), StatusCode::OK).into_response());
    options
        .or(routes)
        .unify()
        .map(|mut response: warp::reply::Response| {
            if response.status() == StatusCode::UNAUTHORIZED {
                *response.status_mut() = StatusCode::FORBIDDEN;
            }
            let headers = response.headers_mut();
            for name in ["access-control-allow-origin", "access-control-allow-headers", "access-control-allow-methods"]
            {
                headers.insert(name, warp::http::HeaderValue::from_static("*"));
            }
            response
        })
        .boxed()
}

/// A client must send its request line and headers within this time.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest request target (path and query) answered; longer ones get 414, as through
/// nginx (whose request line must fit its 8 KiB header buffer).
const MAX_URI_LENGTH: usize = 8 * 1024;

/// Serves `routes` on `listener` until `shutdown` resolves, then lets in-flight requests
/// finish for at most `grace`.
pub async fn serve(
    ctx: Context,
    listener: std::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> anyhow::Result<()> {
    listener.set_nonblocking(true)?;
    let ctx_commands = ctx.app.commands.clone();
    let routes_allow = Arc::new(allow::AllowedMethods::from_openapi(&ctx.settings.base_path));
    let metrics = ctx.app.metrics.clone();
    let warp_service = warp::service(routes(ctx));
    let make_service = make_service_fn(move |conn: &connection::Connection| {
        let (remote, exchanges) = (conn.remote_addr(), conn.exchanges());
        let (warp_service, routes_allow, metrics) = (warp_service.clone(), routes_allow.clone(), metrics.clone());
        async move {
            Ok::<_, Infallible>(service_fn(move |request| {
                exchanges.handed();
                let exchanges = exchanges.clone();
                let response = handle(warp_service.clone(), routes_allow.clone(), metrics.clone(), remote, request);
                async move { Ok::<_, Infallible>(exchanges.track(response.await?)) }
            }))
        }
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut incoming = hyper::server::conn::AddrIncoming::from_listener(tokio::net::TcpListener::from_std(listener)?)?;
    incoming.set_nodelay(true);
    let server = hyper::Server::builder(connection::Incoming(incoming))
        .http1_keepalive(true)
        .http1_header_read_timeout(HEADER_READ_TIMEOUT)
        .serve(make_service)
        .with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("shutting down: no new connections, finishing in-flight requests");
            let _ = stop_tx.send(());
        });
    let commands = ctx_commands;
    let mut server = tokio::spawn(server);
    let deadline = async {
        let _ = stop_rx.await;
        tokio::time::sleep(grace).await;
    };
    tokio::pin!(deadline);
    let grace_spent = tokio::select! {
        result = &mut server => {
            result??;
            false
        }
        _ = &mut deadline => {
            tracing::warn!(?grace, "in-flight requests did not finish within the grace period; closing them");
            server.abort();
            let _ = server.await;
            true
        }
    };
    // Commands detached from their requests (uploads being recorded, deletes removing
    // bytes) finish too, within what is left of the grace period (the deadline, once
    // passed, is not waited on again).
    commands.close();
    if grace_spent {
        if !commands.is_empty() {
            tracing::warn!(remaining = commands.len(), "commands still running at exit");
        }
    } else {
        tokio::select! {
            _ = commands.wait() => {}
            _ = &mut deadline => tracing::warn!(remaining = commands.len(), "commands still running at exit"),
        }
    }
    Ok(())
}

/// Wraps one request: request id, a tracing span, an access log line, the request
/// counter; the limit on URI length and the `Allow` header of a 405.
async fn handle<S>(
    mut service: S,
    routes_allow: Arc<allow::AllowedMethods>,
    metrics: crate::metrics::Metrics,
    remote: SocketAddr,
    request: hyper::Request<hyper::Body>,
) -> Result<hyper::Response<hyper::Body>, Infallible>
where
    S: Service<hyper::Request<hyper::Body>, Response = warp::reply::Response, Error = Infallible>,
{
    let id = request_id::from_header(request.headers().get("x-request-id").and_then(|v| v.to_str().ok()));
    let method = request.method().clone();
    // The path only: query strings carry secrets (access_token, signature).
    let path = request.uri().path().to_owned();
    let uri_length = request.uri().path_and_query().map_or(0, |p| p.as_str().len());
    let started = Instant::now();
    let span = tracing::info_span!("request", request_id = %id, %method, %path, %remote);
    let work = async {
        if uri_length > MAX_URI_LENGTH {
            return error::ApiError::new(
                StatusCode::URI_TOO_LONG,
                "uri_too_long",
                format!("the request URI is too long (at most {MAX_URI_LENGTH} bytes)"),
            )
            .into_response();
        }
        let (request, unread) = keep_small_body(request);
        let mut response = service.call(request).await.unwrap_or_else(|never| match never {});
        let status = response.status();
        if (status.is_client_error() && status != StatusCode::REQUEST_TIMEOUT) || status.is_server_error() {
            drain_small_body(unread).await;
        }
        if response.status() == StatusCode::METHOD_NOT_ALLOWED {
            match routes_allow.for_path(&path) {
                Some(allowed) => {
                    response.headers_mut().insert("allow", allowed);
                }
                // warp reports 405 when some route refused the method before its path
                // was even tried: no route has this path.
                None => {
                    response = error::ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route").into_response()
                }
            }
        }
        response
    };
    let mut response = tracing::Instrument::instrument(request_id::scope(id.clone(), work), span.clone()).await;
    if let Ok(value) = warp::http::HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", value);
    }
    // Counted when the answer's head is ready, as the log line: a download cut short
    // still counts with the status it was given.
    metrics.http_request(method.as_str(), response.status().as_u16());
    span.in_scope(|| {
        tracing::info!(
            status = response.status().as_u16(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "request"
        )
    });
    Ok(response)
}

/// The largest request body read to its end after a refusal that did not read it.
const DRAINED_BODY_LIMIT: u64 = 64 * 1024;

/// A small request body's remainder, kept here while the handler reads it (if it does).
type SharedBody = Arc<tokio::sync::Mutex<hyper::Body>>;

/// For a request with a small body (a declared length up to [`DRAINED_BODY_LIMIT`]), the
/// request with a body read through a handle kept here, so that what the handler left
/// unread can be drained before its refusal is sent (see [`drain_small_body`]). Larger
/// bodies (uploads) pass as they are.
fn keep_small_body(request: hyper::Request<hyper::Body>) -> (hyper::Request<hyper::Body>, Option<SharedBody>) {
    let length = request
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.trim().parse::<u64>().ok());
    // A client waiting for `100 Continue` has sent nothing: reading would invite the body
    // it was about to be spared.
    let expects_continue = request
        .headers()
        .get(hyper::header::EXPECT)
        .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects_continue || !length.is_some_and(|length| (1..=DRAINED_BODY_LIMIT).contains(&length)) {
        return (request, None);
    }
    let (parts, body) = request.into_parts();
    let shared: SharedBody = Arc::new(tokio::sync::Mutex::new(body));
    let chunks = futures::stream::unfold(shared.clone(), |shared| async move {
        let next = hyper::body::HttpBody::data(&mut *shared.lock().await).await;
        next.map(|chunk| (chunk, shared))
    });
    (hyper::Request::from_parts(parts, hyper::Body::wrap_stream(chunks)), Some(shared))
}

/// Reads what is left of a small request body that a refusal (a 405, a 401, a 404 of
/// the route) did not read. Answering and closing with the body still in the socket's
/// receive buffer makes the kernel reset the connection, and a proxy (nginx) that had
/// not read the answer yet reports 502 instead of the refusal.
async fn drain_small_body(unread: Option<SharedBody>) {
    let Some(shared) = unread else { return };
    let drain = async {
        let mut body = shared.lock().await;
        while let Some(Ok(_)) = hyper::body::HttpBody::data(&mut *body).await {}
    };
    // A client that declared a body and sends none is not waited for long.
    let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
}

/// Converts a handler's result into a response.
pub(crate) fn respond<T: Reply>(result: Result<T, error::ApiError>) -> warp::reply::Response {
    match result {
        Ok(reply) => reply.into_response(),
        Err(error) => error.into_response(),
    }
}

/// Largest JSON request body accepted.
const MAX_JSON_BODY: usize = crate::app::MAX_COMMAND_BODY;

/// A JSON request body, taken but not yet read. Routes take it before authenticating,
/// so a refused request's body is drained rather than reset under the client (see
/// `body`), and read it with [`JsonBody::parse`] once the caller is known.
pub(crate) struct JsonBody {
    content_type: Option<String>,
    body: body::GuardedBody<bytes::Bytes, warp::Error>,
}

fn json_body(idle_timeout: Duration) -> impl Filter<Extract = (JsonBody,), Error = warp::Rejection> + Clone {
    warp::header::optional::<String>("content-type")
        .and(warp::header::optional::<String>("expect"))
        .and(warp::body::stream())
        .map(move |content_type, expect: Option<String>, body| {
            let expects_continue = expect.is_some_and(|e| e.eq_ignore_ascii_case("100-continue"));
            JsonBody::new(content_type, body, idle_timeout, expects_continue)
        })
}

impl JsonBody {
    fn new<S, B>(content_type: Option<String>, body: S, idle_timeout: Duration, expects_continue: bool) -> Self
    where
        S: futures::Stream<Item = Result<B, warp::Error>> + Send + 'static,
        B: bytes::Buf + Send + 'static,
    {
        use futures::TryStreamExt;
        let source = body.map_ok(|mut buf| buf.copy_to_bytes(buf.remaining()));
        let (body, meter) = body::GuardedBody::new(source, idle_timeout, 0);
        meter.in_field();
        JsonBody { content_type, body: body.expecting_continue(expects_continue) }
    }
}

impl JsonBody {
    /// Reads at most [`MAX_JSON_BODY`] bytes: not JSON → 400 `invalid_json`, the wrong
    /// shape → 422, a non-JSON Content-Type → 415 (none at all is taken as JSON, as
    /// `curl -d` sends).
    pub(crate) async fn parse<T: serde::de::DeserializeOwned>(self) -> Result<T, error::ApiError> {
        Ok(self.parse_keeping_bytes().await?.0)
    }

    /// [`JsonBody::parse`], also giving the bytes as received.
    pub(crate) async fn parse_keeping_bytes<T: serde::de::DeserializeOwned>(
        self,
    ) -> Result<(T, Vec<u8>), error::ApiError> {
        use futures::TryStreamExt;
        if let Some(content_type) = self.content_type.filter(|t| !is_json_media_type(t)) {
            return Err(error::ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!("the body must be application/json, not {content_type}"),
            ));
        }
        let mut body = std::pin::pin!(self.body);
        let mut collected = Vec::new();
        while let Some(chunk) = body.try_next().await.map_err(|e| match e {
            body::BodyError::Idle(_) => {
                error::ApiError::new(StatusCode::REQUEST_TIMEOUT, "request_timeout", e.to_string())
            }
            _ => error::ApiError::bad_request("body_read_failed", e.to_string()),
        })? {
            if collected.len() + chunk.len() > MAX_JSON_BODY {
                return Err(error::ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!("JSON bodies are limited to {MAX_JSON_BODY} bytes"),
                ));
            }
            collected.extend_from_slice(&chunk);
        }
        let parsed = parse_json(&collected)?;
        Ok((parsed, collected))
    }
}

/// `application/json`, `application/<anything>+json`, with or without parameters.
fn is_json_media_type(value: &str) -> bool {
    let essence = value.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Parses JSON in two steps so syntax errors (400) and shape errors (422) differ. An
/// object with a key given twice is refused (400), not read as its last value (a second
/// `"sha256": null` must not silently drop the first); and a body must be an object (serde
/// would otherwise take an array's items for a struct's fields, by position).
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, error::ApiError> {
    serde_json::from_slice::<UniqueKeys>(bytes)
        .map_err(|e| error::ApiError::bad_request("invalid_json", format!("the body is not valid JSON: {e}")))?;
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| error::ApiError::bad_request("invalid_json", format!("the body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(error::ApiError::new(
            warp::http::StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            "the body must be a JSON object",
        ));
    }
    serde_json::from_value(value).map_err(|e| {
        error::ApiError::new(
            warp::http::StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            format!("invalid JSON body: {e}"),
        )
    })
}

/// Any JSON whose objects name each key once (what [`parse_json`] checks first).
struct UniqueKeys;

impl<'de> serde::Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = UniqueKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("JSON")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<UniqueKeys, A::Error> {
                let mut seen = std::collections::HashSet::new();
                while let Some(key) = map.next_key::<String>()? {
                    if !seen.insert(key.clone()) {
                        return Err(serde::de::Error::custom(format!("the key {key:?} is given more than once")));
                    }
                    map.next_value::<UniqueKeys>()?;
                }
                Ok(UniqueKeys)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<UniqueKeys, A::Error> {
                while seq.next_element::<UniqueKeys>()?.is_some() {}
                Ok(UniqueKeys)
            }
            fn visit_bool<E>(self, _: bool) -> Result<UniqueKeys, E> {
                Ok(UniqueKeys)
            }
            fn visit_i64<E>(self, _: i64) -> Result<UniqueKeys, E> {
                Ok(UniqueKeys)
            }
            fn visit_u64<E>(self, _: u64) -> Result<UniqueKeys, E> {
                Ok(UniqueKeys)
            }
            fn visit_f64<E>(self, _: f64) -> Result<UniqueKeys, E> {
                Ok(UniqueKeys)
            }
            fn visit_str<E>(self, _: &str) -> Result<UniqueKeys, E> {
                Ok(UniqueKeys)
            }
            fn visit_unit<E>(self) -> Result<UniqueKeys, E> {
                Ok(UniqueKeys)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// The query string as key → value; a key given twice is refused (400).
fn query_map() -> impl Filter<Extract = (std::collections::HashMap<String, String>,), Error = warp::Rejection> + Clone {
    warp::query::raw().or(warp::any().map(String::new)).unify().and_then(|raw: String| async move {
        let bad = |message: String| warp::Rejection::from(error::ApiError::bad_request("invalid_query", message));
        let pairs = serde_urlencoded::from_str::<Vec<(String, String)>>(&raw)
            .map_err(|e| bad(format!("malformed query string: {e}")))?;
        let mut map = std::collections::HashMap::with_capacity(pairs.len());
        for (key, value) in pairs {
            if map.contains_key(&key) {
                return Err(bad(format!("the parameter '{key}' is given more than once")));
            }
            map.insert(key, value);
        }
        Ok(map)
    })
}

/// Parses a uuid query or path parameter.
pub(crate) fn parse_uuid(field: &'static str, value: Option<&String>) -> Result<uuid::Uuid, error::ApiError> {
    let value = value.ok_or_else(|| {
        error::ApiError::bad_request("missing_parameter", format!("the '{field}' parameter is required"))
    })?;
    uuid::Uuid::try_parse(value)
        .map_err(|_| error::ApiError::bad_request("invalid_parameter", format!("'{field}' must be a uuid")))
}

/// The current request id, for handlers that record it in events.
fn request_context() -> impl Filter<Extract = (String,), Error = Infallible> + Clone {
    warp::any().map(request_id::current)
}

/// The `scheme://host[:port]` of the absolute URLs in answers: `ASSETD_PUBLIC_URL` when
/// configured (deployments should set it: clients choose Host and X-Forwarded-* headers);
/// otherwise as the client addressed us (through nginx: its forwarded headers), and
/// empty when unknown, which leaves the URLs relative.
fn origin(settings: &HttpSettings, headers: &warp::http::HeaderMap) -> String {
    if let Some(public) = &settings.public_url {
        return public.clone();
    }
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim).filter(|v| !v.is_empty());
    let host = get("x-forwarded-host").or_else(|| get("host"));
    let scheme = match get("x-forwarded-proto") {
        Some("https") => "https",
        _ => "http",
    };
    match host {
        Some(host) if host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b)) => {
            format!("{scheme}://{host}")
        }
        _ => String::new(),
    }
}
