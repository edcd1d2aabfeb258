//! OpenTera mode: assetd in place of OpenTera's FileTransferService (FTS), inside a
//! running OpenTera deployment (../shared/OPENTERA.md, README "Replacing OpenTera's
//! FileTransferService").
//!
//! On when `ASSETD_OPENTERA_REDIS` is set. Tokens are then OpenTera's, verified with
//! the keys TeraServer keeps in that Redis ([`tokens`]); sessions and assets are
//! TeraServer's, asked of its service API ([`teraserver`]); archive changes are
//! published to Redis as OpenTera's protobuf `ArchiveEvent` ([`events`]). What assetd
//! records (events, AMQP, jobs, storage) is unchanged.

pub mod events;
pub mod teraserver;
pub mod tokens;

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use serde_json::Value;
use uuid::Uuid;
use warp::http::HeaderMap;

use crate::domain::principal::{Principal, PrincipalKind};
use teraserver::{TeraServer, TeraServerError};
use tokens::{Caller, FoundToken, TokenKeys, TokenRule};

/// The settings of OpenTera mode.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct OpenTeraConfig {
    /// The OpenTera deployment's Redis (`redis://host:port/db`); setting it turns
    /// OpenTera mode on (off by default).
    #[arg(long, env = "ASSETD_OPENTERA_REDIS", hide_env_values = true)]
    pub opentera_redis: Option<String>,
    /// TeraServer's base URL, as FTS reaches it (through the deployment's nginx).
    #[arg(long, env = "ASSETD_OPENTERA_SERVER", default_value = "https://127.0.0.1:40075")]
    pub opentera_server: String,
    /// Verify TeraServer's TLS certificate. Off by default, as in FTS: deployments
    /// use their own self-signed certificate.
    #[arg(long, env = "ASSETD_OPENTERA_VERIFY_TLS", default_value_t = false, action = clap::ArgAction::Set)]
    pub opentera_verify_tls: bool,
    /// The service key of the record TeraServer publishes (`service.<key>` in Redis).
    #[arg(long, env = "ASSETD_OPENTERA_SERVICE_KEY", default_value = "FileTransferService")]
    pub opentera_service_key: String,
    /// How long TeraServer's yes to a session is reused for further uploads, in
    /// seconds (0 to 10; a no is never reused).
    #[arg(long, env = "ASSETD_OPENTERA_SESSION_CACHE_SECONDS", default_value_t = 2,
          value_parser = clap::value_parser!(u64).range(0..=10))]
    pub opentera_session_cache_seconds: u64,
}

/// Keys and the service record are read again when older than this, and at once (at
/// most this often) when a token fails to verify: TeraServer makes new keys at every
/// start.
const KEYS_MAX_AGE: Duration = Duration::from_secs(1);

/// The longest one Redis call may take before the request gets its 503.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs a Redis call within [`REDIS_TIMEOUT`].
async fn bounded<T>(call: impl std::future::Future<Output = redis::RedisResult<T>>) -> Result<T, OpenTeraError> {
    match tokio::time::timeout(REDIS_TIMEOUT, call).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(OpenTeraError::RedisTimeout),
    }
}

/// Lifetime of the access tokens assetd hands out in OpenTera mode (FTS: 1,800 s).
pub const ACCESS_TOKEN_SECONDS: i64 = 1800;

/// What TeraServer publishes about this service (`service.FileTransferService`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRecord {
    pub service_uuid: Uuid,
    pub id_service: Option<i64>,
    /// `/file` in a standard deployment: the prefix of the URLs clients use.
    pub clientendpoint: String,
}

impl ServiceRecord {
    fn parse(text: &str) -> Option<Self> {
        let value: Value = serde_json::from_str(text).ok()?;
        Some(Self {
            service_uuid: value.get("service_uuid")?.as_str()?.parse().ok()?,
            id_service: value.get("id_service").and_then(Value::as_i64),
            clientendpoint: value.get("service_clientendpoint").and_then(Value::as_str).unwrap_or("/file").to_owned(),
        })
    }
}

/// One reading of Redis: the token keys and the service record.
#[derive(Debug)]
pub struct Snapshot {
    pub keys: TokenKeys,
    pub record: Option<ServiceRecord>,
    read_at: Instant,
}

/// Why an OpenTera request could not be decided.
#[derive(Debug, thiserror::Error)]
pub enum OpenTeraError {
    #[error("OpenTera's Redis is unreachable: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("OpenTera's Redis did not answer in time")]
    RedisTimeout,
    #[error(transparent)]
    TeraServer(#[from] TeraServerError),
    /// TeraServer has not published what assetd needs (keys, the service record).
    #[error("OpenTera is not set up yet: {0}")]
    NotSetUp(&'static str),
}

/// Why a session was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionRefused;

#[derive(Clone)]
pub struct OpenTera {
    client: redis::Client,
    redis: redis::aio::ConnectionManager,
    snapshot: Arc<RwLock<Arc<Snapshot>>>,
    pub teraserver: TeraServer,
    service_key: String,
    /// TeraServer's yes to (session, token it was asked with).
    sessions: moka::sync::Cache<(i64, String), Value>,
    /// Sessions registered in assetd as TeraServer last showed them (id → what was
    /// registered), so an upload registers again only when something changed.
    pub registered_sessions: moka::sync::Cache<i64, Arc<String>>,
    /// How long an uploaded archive is kept after it was asked for (FTS: 7 days).
    pub archive_ttl: Duration,
}

impl OpenTera {
    /// Connects to Redis (and reads the keys once, to report what is missing).
    pub async fn connect(config: &OpenTeraConfig) -> anyhow::Result<Self> {
        let url =
            config.opentera_redis.as_deref().ok_or_else(|| anyhow::anyhow!("ASSETD_OPENTERA_REDIS is not set"))?;
        let client = redis::Client::open(url)?;
        // Bounded everywhere: with Redis down, requests get their 503 at once rather than
        // waiting for the reconnection's backoff.
        let settings = redis::aio::ConnectionManagerConfig::new()
            .set_number_of_retries(1)
            .set_max_delay(500)
            .set_connection_timeout(REDIS_TIMEOUT)
            .set_response_timeout(REDIS_TIMEOUT);
        let redis = redis::aio::ConnectionManager::new_with_config(client.clone(), settings).await?;
        let empty = Snapshot { keys: TokenKeys::default(), record: None, read_at: Instant::now() - KEYS_MAX_AGE * 2 };
        let opentera = Self {
            client,
            redis,
            snapshot: Arc::new(RwLock::new(Arc::new(empty))),
            teraserver: TeraServer::new(&config.opentera_server, config.opentera_verify_tls)?,
            service_key: config.opentera_service_key.clone(),
            sessions: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(config.opentera_session_cache_seconds).max(Duration::from_millis(1)))
                .build(),
            registered_sessions: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(60))
                .build(),
            archive_ttl: Duration::from_secs(7 * 86_400),
        };
        let first = opentera.snapshot(true).await?;
        if first.keys.service.is_none() || first.record.is_none() {
            tracing::warn!(
                "OpenTera's keys or service record are not in Redis yet (is TeraServer running?); read again on use"
            );
        }
        Ok(opentera)
    }

    /// The keys and record, read again when older than [`KEYS_MAX_AGE`], or always
    /// with `fresh` (a token failed: it may be signed with keys renewed a moment ago).
    pub async fn snapshot(&self, fresh: bool) -> Result<Arc<Snapshot>, OpenTeraError> {
        let current = self.snapshot.read().expect("not poisoned").clone();
        if !fresh && current.read_at.elapsed() < KEYS_MAX_AGE {
            return Ok(current);
        }
        let names = [
            "UserTokenAPIKey",
            "ParticipantTokenAPIKey",
            "ParticipantStaticTokenAPIKey",
            "DeviceTokenAPIKey",
            "DeviceStaticTokenAPIKey",
            "ServiceTokenAPIKey",
        ];
        let record_key = format!("service.{}", self.service_key);
        let mut redis = self.redis.clone();
        let mut values: Vec<Option<Vec<u8>>> =
            redis::cmd("MGET").arg(&names[..]).arg(&record_key).query_async(&mut redis).await?;
        let record = values.pop().flatten().and_then(|text| ServiceRecord::parse(&String::from_utf8_lossy(&text)));
        let mut values = values.into_iter();
        let mut next = || values.next().flatten().filter(|key| !key.is_empty());
        let keys = TokenKeys {
            user: next(),
            participant: next(),
            participant_static: next(),
            device: next(),
            device_static: next(),
            service: next(),
        };
        let snapshot = Arc::new(Snapshot { keys, record, read_at: Instant::now() });
        *self.snapshot.write().expect("not poisoned") = snapshot.clone();
        Ok(snapshot)
    }

    /// Does OpenTera's Redis answer (for `/ready`)?
    pub async fn ready(&self) -> bool {
        let mut redis = self.redis.clone();
        bounded(redis::cmd("PING").query_async::<String>(&mut redis)).await.is_ok()
    }

    /// The request's caller, or None (refused: 403). Keys are read again once when a
    /// token fails, so tokens signed with keys TeraServer just renewed pass at once.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        query_token: Option<&str>,
        rule: TokenRule,
    ) -> Result<Option<Caller>, OpenTeraError> {
        let found = tokens::find_token(headers, query_token);
        if matches!(found, FoundToken::MalformedHeader | FoundToken::None) {
            return Ok(None);
        }
        let redis = self.redis.clone();
        let revoked = |set: &'static str, token: String| {
            let mut redis = redis.clone();
            // A Redis that fails here fails closed: the token counts as revoked.
            async move { bounded(redis.sismember::<_, _, bool>(set, token)).await.unwrap_or(true) }
        };
        let snapshot = self.snapshot(false).await?;
        if let Some(caller) = tokens::verify(&snapshot.keys, &found, rule, revoked).await {
            return Ok(Some(caller));
        }
        let again = self.snapshot(true).await?;
        if again.keys == snapshot.keys {
            return Ok(None);
        }
        Ok(tokens::verify(&again.keys, &found, rule, revoked).await)
    }

    /// The record and service key, which everything assetd does as FTS needs.
    pub async fn service(&self) -> Result<(ServiceRecord, Vec<u8>), OpenTeraError> {
        let snapshot = self.snapshot(false).await?;
        let record = snapshot.record.clone().ok_or(OpenTeraError::NotSetUp("no service record in Redis"))?;
        let key = snapshot.keys.service.clone().ok_or(OpenTeraError::NotSetUp("no ServiceTokenAPIKey in Redis"))?;
        Ok((record, key))
    }

    /// A token of this service, to call TeraServer with.
    pub async fn service_token(&self) -> Result<String, OpenTeraError> {
        let (record, key) = self.service().await?;
        Ok(tokens::mint_service_token(&key, record.service_uuid, 3600))
    }

    /// Whether Redis holds other keys or another record than those last read (TeraServer
    /// restarted): then a token assetd signed a moment ago may be refused by TeraServer.
    async fn renewed(&self) -> Result<bool, OpenTeraError> {
        let before = self.snapshot(false).await?;
        let now = self.snapshot(true).await?;
        Ok(now.keys.service != before.keys.service || now.record != before.record)
    }

    /// Calls TeraServer as this service. If TeraServer refuses the token (401 or 403)
    /// because it has just renewed its keys, once more with a token signed by the new ones.
    /// The outer error is Redis's; the inner result is TeraServer's answer.
    pub async fn as_service<T, F, Fut>(&self, call: F) -> Result<Result<T, TeraServerError>, OpenTeraError>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = Result<T, TeraServerError>>,
    {
        let answer = call(self.service_token().await?).await;
        if matches!(answer, Err(TeraServerError::Refused { status: 401 | 403, .. })) && self.renewed().await? {
            return Ok(call(self.service_token().await?).await);
        }
        Ok(answer)
    }

    /// Does TeraServer let `caller` put files in this session? FTS's rule: TeraServer
    /// must show the session (to the caller when it is a service, else to FTS); then
    /// superadmins, the project's admins, and the session's members and creator pass.
    /// Returns TeraServer's session.
    pub async fn session_for_upload(
        &self,
        caller: &Caller,
        id_session: i64,
    ) -> Result<Result<Value, SessionRefused>, OpenTeraError> {
        let cache_key = (id_session, if caller.principal.is_service() { caller.token.clone() } else { String::new() });
        let session = match self.sessions.get(&cache_key) {
            Some(session) => session,
            None => match self.ask_session(caller, id_session).await? {
                Some(session) => {
                    self.sessions.insert(cache_key, session.clone());
                    session
                }
                None => return Ok(Err(SessionRefused)),
            },
        };
        let allowed = match caller.principal.kind {
            PrincipalKind::Service => true,
            PrincipalKind::User => {
                caller.principal.superadmin
                    || is_member(&session, "session_users", "user_uuid", "id_creator_user", caller)
                    || self.is_project_admin(&session, caller).await?
            }
            PrincipalKind::Participant => {
                is_member(&session, "session_participants", "participant_uuid", "id_creator_participant", caller)
            }
            PrincipalKind::Device => is_member(&session, "session_devices", "device_uuid", "id_creator_device", caller),
        };
        Ok(if allowed { Ok(session) } else { Err(SessionRefused) })
    }

    /// TeraServer's session, asked with the caller's token when it is a service, with
    /// this service's own otherwise (again with renewed keys if TeraServer just renewed).
    async fn ask_session(&self, caller: &Caller, id_session: i64) -> Result<Option<Value>, OpenTeraError> {
        if caller.principal.is_service() {
            return Ok(self.teraserver.session(id_session, &caller.token).await?);
        }
        let found = self.teraserver.session(id_session, &self.service_token().await?).await?;
        if found.is_none() && self.renewed().await? {
            return Ok(self.teraserver.session(id_session, &self.service_token().await?).await?);
        }
        Ok(found)
    }

    async fn is_project_admin(&self, session: &Value, caller: &Caller) -> Result<bool, OpenTeraError> {
        let Some(id_project) = session
            .get("session_participants")
            .and_then(|p| p.get(0))
            .and_then(|p| p.get("id_project"))
            .and_then(Value::as_i64)
        else {
            return Ok(false);
        };
        let role = self.teraserver.user_project_role(caller.principal.uuid, &caller.token, id_project).await?;
        Ok(role.as_deref() == Some("admin"))
    }

    /// Publishes an archive change as OpenTera's `TeraEvent{ArchiveEvent}` on the
    /// service's events channel, which TeraServer forwards to the owner's websocket.
    pub async fn publish_archive_event(&self, event: &events::ArchiveEvent) -> Result<(), OpenTeraError> {
        let channel = format!("service.{}.events", self.service_key);
        let bytes = events::encode_archive_event(event, &channel, chrono::Utc::now());
        let mut redis = self.redis.clone();
        bounded(redis.publish::<_, _, ()>(channel, bytes)).await?;
        Ok(())
    }
}

impl OpenTera {
    /// Follows TeraServer's asset deletions (its database events on Redis), as FTS does:
    /// an asset TeraServer deleted by any path loses its bytes here too. Runs until the
    /// process ends, subscribing again after any Redis failure.
    pub fn follow_asset_deletions(&self, app: crate::app::App) {
        let client = self.client.clone();
        tokio::spawn(async move {
            loop {
                if let Err(error) = Self::asset_deletions(&client, &app).await {
                    tracing::warn!(%error, "OpenTera's asset events: subscription lost; subscribing again");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    async fn asset_deletions(client: &redis::Client, app: &crate::app::App) -> Result<(), redis::RedisError> {
        use futures::StreamExt;
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(events::ASSET_EVENTS_CHANNEL).await?;
        let mut messages = pubsub.on_message();
        while let Some(message) = messages.next().await {
            for asset_uuid in events::deleted_assets(message.get_payload_bytes()) {
                let Some(opentera) = &app.opentera else { continue };
                let Ok((record, _)) = opentera.service().await else { continue };
                let service = service_principal(&record);
                let vouched = Principal { superadmin: true, ..service.clone() };
                let ctx = crate::app::CommandContext::for_request(&service, &format!("teraserver-delete-{asset_uuid}"));
                let app = app.clone();
                let deleted = app
                    .clone()
                    .run_to_completion(async move { app.delete_asset(&vouched, &ctx, asset_uuid, None).await })
                    .await;
                match deleted {
                    Ok(()) => tracing::info!(%asset_uuid, "asset deleted in TeraServer: deleted here too"),
                    Err(crate::app::AppError::Domain(
                        crate::domain::DomainError::NotFound(_) | crate::domain::DomainError::Conflict(_),
                    )) => {}
                    Err(error) => {
                        tracing::warn!(%asset_uuid, %error, "asset deleted in TeraServer could not be deleted here")
                    }
                }
            }
        }
        Ok(())
    }
}

/// Is the caller listed in the session's `list` (by uuid) or its creator (by id)?
fn is_member(session: &Value, list: &str, uuid_field: &str, creator_field: &str, caller: &Caller) -> bool {
    let uuid = caller.principal.uuid.to_string();
    let listed = session.get(list).and_then(Value::as_array).is_some_and(|members| {
        members.iter().any(|m| m.get(uuid_field).and_then(Value::as_str).is_some_and(|u| u.eq_ignore_ascii_case(&uuid)))
    });
    listed || (caller.id.is_some() && session.get(creator_field).and_then(Value::as_i64) == caller.id)
}

/// The caller, acting on something OpenTera's rules already let it reach: assetd's
/// own session rules are not applied again (sessions are TeraServer's), so it acts as
/// privileged for that one call. Events still record the caller (kind and uuid).
pub fn vouched(caller: &Caller) -> Principal {
    Principal { superadmin: true, ..caller.principal.clone() }
}

/// This service, as the actor of what assetd does for TeraServer (registering sessions).
pub fn service_principal(record: &ServiceRecord) -> Principal {
    Principal {
        kind: PrincipalKind::Service,
        uuid: record.service_uuid,
        name: "FileTransferService".into(),
        superadmin: false,
    }
}
