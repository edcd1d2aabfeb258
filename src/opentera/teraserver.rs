//! The calls FTS makes to TeraServer's API, made the same way: `Authorization:
//! OpenTera <token>`, JSON, 10 s timeout. TeraServer is reached through the deployment's
//! nginx (TLS with the deployment's own certificate, not verified by default, as FTS).

use std::time::Duration;

use serde_json::Value;
use uuid::Uuid;

/// How long one call to TeraServer may take (FTS: 10 s).
const TIMEOUT: Duration = Duration::from_secs(10);

/// Why a call to TeraServer gave no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum TeraServerError {
    /// Not reached, timed out, or answered something that is not TeraServer's JSON.
    #[error("TeraServer is unreachable: {0}")]
    Unreachable(String),
    /// Answered with an error status: passed on as FTS does.
    #[error("TeraServer answered {status}: {body}")]
    Refused { status: u16, body: String },
}

#[derive(Clone)]
pub struct TeraServer {
    base: String,
    http: reqwest::Client,
}

impl TeraServer {
    pub fn new(base: &str, verify_tls: bool) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .connect_timeout(Duration::from_secs(5))
            .danger_accept_invalid_certs(!verify_tls)
            .build()?;
        Ok(Self { base: base.trim_end_matches('/').to_owned(), http })
    }

    async fn send(&self, request: reqwest::RequestBuilder, token: &str) -> Result<Value, TeraServerError> {
        let unreachable = |e: reqwest::Error| TeraServerError::Unreachable(e.to_string());
        let answer = request.header("Authorization", format!("OpenTera {token}")).send().await.map_err(unreachable)?;
        let status = answer.status();
        let body = answer.bytes().await.map_err(unreachable)?;
        if !status.is_success() {
            let body = String::from_utf8_lossy(&body[..body.len().min(1024)]).into_owned();
            return Err(TeraServerError::Refused { status: status.as_u16(), body });
        }
        if body.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&body).map_err(|e| TeraServerError::Unreachable(format!("not JSON: {e}")))
    }

    /// `GET /api/service/sessions?id_session=`: the session as TeraServer shows it to
    /// the service whose token is given, or None when it shows none.
    pub async fn session(&self, id_session: i64, token: &str) -> Result<Option<Value>, TeraServerError> {
        let request = self.http.get(format!("{}/api/service/sessions", self.base)).query(&[("id_session", id_session)]);
        match self.send(request, token).await {
            Ok(Value::Array(mut sessions)) if !sessions.is_empty() => Ok(Some(sessions.swap_remove(0))),
            Ok(_) => Ok(None),
            // FTS: any answer but 200 with a session refuses the session.
            Err(TeraServerError::Refused { .. }) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// `GET /api/user/projects?user_uuid=` with the user's own token: the user's role
    /// in `id_project` (FTS lets project admins upload to any session of the project).
    pub async fn user_project_role(
        &self,
        user_uuid: Uuid,
        user_token: &str,
        id_project: i64,
    ) -> Result<Option<String>, TeraServerError> {
        let request =
            self.http.get(format!("{}/api/user/projects", self.base)).query(&[("user_uuid", user_uuid.to_string())]);
        let projects = match self.send(request, user_token).await {
            Ok(Value::Array(projects)) => projects,
            Ok(_) | Err(TeraServerError::Refused { .. }) => return Ok(None),
            Err(error) => return Err(error),
        };
        Ok(projects
            .iter()
            .find(|p| p.get("id_project").and_then(Value::as_i64) == Some(id_project))
            .and_then(|p| p.get("project_role").and_then(Value::as_str).map(str::to_owned)))
    }

    /// `POST /api/service/assets {"asset": …}`: TeraServer creates the asset and answers
    /// `[asset]`, with the `asset_uuid` and `id_asset` it chose.
    pub async fn create_asset(&self, asset: Value, token: &str) -> Result<Value, TeraServerError> {
        let request =
            self.http.post(format!("{}/api/service/assets", self.base)).json(&serde_json::json!({ "asset": asset }));
        match self.send(request, token).await? {
            Value::Array(mut assets) if !assets.is_empty() => Ok(assets.swap_remove(0)),
            Value::Object(asset) => Ok(Value::Object(asset)),
            other => Err(TeraServerError::Unreachable(format!("unexpected answer to an asset creation: {other}"))),
        }
    }

    /// `DELETE /api/service/assets?uuid=`.
    pub async fn delete_asset(&self, asset_uuid: Uuid, token: &str) -> Result<(), TeraServerError> {
        let request =
            self.http.delete(format!("{}/api/service/assets", self.base)).query(&[("uuid", asset_uuid.to_string())]);
        self.send(request, token).await.map(|_| ())
    }
}
