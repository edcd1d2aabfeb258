//! Operational endpoints: liveness and readiness.

use serde_json::json;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::{Filter, Reply};

use super::{get_or_head, with_context, Context};

pub fn routes(ctx: Context) -> BoxedFilter<(warp::reply::Response,)> {
    let health = warp::path!("health").and(get_or_head()).map(health);
    let ready = warp::path!("ready").and(get_or_head()).and(with_context(ctx)).then(ready);
    health.or(ready).unify().boxed()
}

/// The process is up and serving.
#[utoipa::path(get, path = "/health", tag = "operations", responses((status = 200, description = "alive")))]
pub fn health() -> warp::reply::Response {
    warp::reply::json(&json!({"status": "ok"})).into_response()
}

/// Ready to serve requests: Postgres answers.
#[utoipa::path(get, path = "/ready", tag = "operations", responses(
    (status = 200, description = "every dependency answers"),
    (status = 503, description = "a dependency is down"),
))]
pub async fn ready(ctx: Context) -> warp::reply::Response {
    let database_ok = ctx.app.database_ready().await;
    let body = json!({
        "status": if database_ok { "ready" } else { "unavailable" },
        "checks": { "database": if database_ok { "ok" } else { "unreachable" } },
    });
    let status = if database_ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    warp::reply::with_status(warp::reply::json(&body), status).into_response()
}
