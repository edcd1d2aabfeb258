//! Operational endpoints: liveness, readiness, metrics.

use serde_json::json;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::{Filter, Reply};

use super::{get_or_head, with_context, Context};

pub fn routes(ctx: Context) -> BoxedFilter<(warp::reply::Response,)> {
    let health = warp::path!("health").and(get_or_head()).map(health);
    let ready = warp::path!("ready").and(get_or_head()).and(with_context(ctx.clone())).then(ready);
    let metrics = warp::path!("metrics").and(get_or_head()).and(with_context(ctx)).then(metrics);
    health.or(ready).unify().or(metrics).unify().boxed()
}

/// The process is up and serving.
#[utoipa::path(get, path = "/health", tag = "operations", responses((status = 200, description = "alive")))]
pub fn health() -> warp::reply::Response {
    warp::reply::json(&json!({"status": "ok"})).into_response()
}

/// Ready to serve requests: Postgres answers, and so does the S3 bucket when blobs are
/// there (`blobs`: ok, unreachable, or local). The broker's state is reported too
/// (`broker`: up, connecting or disabled; `relay`, `commands`, `workers`: up, standby,
/// connecting or disabled) but does not make this 503: requests succeed without it,
/// and events wait in Postgres for the relay.
#[utoipa::path(get, path = "/ready", tag = "operations", responses(
    (status = 200, description = "the database (and the S3 bucket, and OpenTera's Redis in OpenTera mode) answer"),
    (status = 503, description = "the database, the S3 bucket or OpenTera's Redis is down"),
))]
pub async fn ready(ctx: Context) -> warp::reply::Response {
    let opentera = async {
        match &ctx.app.opentera {
            None => None,
            Some(opentera) => Some(opentera.ready().await),
        }
    };
    let (database_ok, blobs, opentera) = tokio::join!(ctx.app.database_ready(), ctx.app.blobs.ready(), opentera);
    let blobs_ok = blobs != Some(false);
    let opentera_ok = opentera != Some(false);
    let ready = database_ok && blobs_ok && opentera_ok;
    let body = json!({
        "status": if ready { "ready" } else { "unavailable" },
        "checks": {
            "database": if database_ok { "ok" } else { "unreachable" },
            "blobs": match blobs { None => "local", Some(true) => "ok", Some(false) => "unreachable" },
            "broker": ctx.app.messaging.broker().as_str(),
            "relay": ctx.app.messaging.relay().as_str(),
            "commands": ctx.app.messaging.commands().as_str(),
            "workers": ctx.app.messaging.workers().as_str(),
            "opentera_redis": match opentera { None => "disabled", Some(true) => "ok", Some(false) => "unreachable" },
        },
    });
    if ready {
        return warp::reply::json(&body).into_response();
    }
    // Not ready is an error answer too: the error shape (with the request id) beside
    // the checks, and when to ask again.
    let mut body = body;
    body["error"] = json!({
        "code": "unavailable",
        "message": if !database_ok {
            "the database is unreachable"
        } else if !blobs_ok {
            "the blob store is unreachable"
        } else {
            "OpenTera's Redis is unreachable"
        },
        "request_id": super::request_id::current(),
    });
    let mut response =
        warp::reply::with_status(warp::reply::json(&body), StatusCode::SERVICE_UNAVAILABLE).into_response();
    response.headers_mut().insert("retry-after", crate::app::RETRY_AFTER_SECONDS.into());
    response
}

/// Prometheus text format (0.0.4): requests, bytes moved, jobs, and the relay's lag.
#[utoipa::path(get, path = "/metrics", tag = "operations", responses(
    (status = 200, description = "metrics in the Prometheus text format", content_type = "text/plain"),
    (status = 503, description = "the database is down"),
))]
pub async fn metrics(ctx: Context) -> warp::reply::Response {
    let (events, oldest_seconds) = match ctx.app.relay_lag().await {
        Ok(lag) => lag,
        Err(error) => return super::error::ApiError::from(error).into_response(),
    };
    match ctx.app.metrics.encode(events, oldest_seconds) {
        Ok(text) => warp::reply::with_header(text, "content-type", crate::metrics::CONTENT_TYPE).into_response(),
        Err(error) => super::error::ApiError::internal(error).into_response(),
    }
}
