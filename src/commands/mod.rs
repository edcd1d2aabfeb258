//! Commands from other services over AMQP (EVENTS.md): the `<prefix>.commands` queue,
//! fed by the `<prefix>.commands` direct exchange, consumed with manual acks.
//! `session.upsert` and `session.delete` run the very application commands the HTTP
//! endpoints run. A command that cannot be run as sent (not JSON, unknown, invalid, or
//! refused by the rules) is moved to `<prefix>.commands.dead` with an
//! `x-assetd-error` header saying why, and acked: it never blocks the queue. With
//! `reply_to`, the sender gets `{ok, error?, result?}` with its `correlation_id`.
//! A command that fails for a passing reason (the database unreachable) goes back to
//! the queue after a pause.

use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, ExchangeKind};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::app::archives::ArchiveBody;
use crate::app::jobs::{AnyImportBody, JobPolicy};
use crate::app::sessions::{SessionBody, SessionDeletedReply};
use crate::app::{App, AppError, CommandContext, ComponentState, ReceivedMessage};
use crate::broker::BrokerError;
use crate::domain::names::SessionId;
use crate::domain::principal::{Principal, PrincipalKind};
use crate::domain::session::UpsertSession;
use crate::domain::DomainError;
use crate::eventstore;
use crate::projections::read::SessionInfo;

/// Commands handled at once per consumer.
const PREFETCH: u16 = 16;

#[derive(Clone, Debug)]
pub struct CommandsConfig {
    /// Where its channel comes from (shared with the relay).
    pub broker: crate::broker::Broker,
    /// Names: `<prefix>.commands` (exchange and queue), `<prefix>.commands.dead`.
    pub prefix: String,
    /// How the imports it queues run.
    pub import_policy: JobPolicy,
}

impl CommandsConfig {
    pub fn queue(&self) -> String {
        format!("{}.commands", self.prefix)
    }
    pub fn dead_queue(&self) -> String {
        format!("{}.commands.dead", self.prefix)
    }
}

/// `session.upsert`'s body is `PUT /sessions/{id_session}`'s ([`SessionBody`]) with
/// `id_session` in it: parsed by [`parse_session_upsert`], described by
/// [`session_upsert_schema`].
pub const SESSION_UPSERT: &str = "session.upsert";
pub const SESSION_DELETE: &str = "session.delete";

/// `session.delete`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionDelete {
    pub id_session: SessionId,
}

/// The reply to a command with `reply_to` (sent with its `correlation_id`).
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct CommandReply<Result> {
    pub ok: bool,
    /// Present (true) when a command with this `message_id` had already run: it was
    /// not run again, and `result` is the current state.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    #[schemars(default)]
    pub duplicate: bool,
    /// Why the command was refused (`ok: false`); it is also in the dead queue.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What the command did (`ok: true`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Result>,
}

fn parse_session_upsert(body: &[u8]) -> Result<UpsertSession, Refusal> {
    let invalid = |error: serde_json::Error| Refusal::Invalid(format!("invalid body: {error}"));
    let mut body: serde_json::Map<String, Value> = serde_json::from_slice(body).map_err(invalid)?;
    let id_session = body
        .remove("id_session")
        .and_then(|id| id.as_i64())
        .ok_or_else(|| Refusal::Invalid("invalid body: id_session must be an integer".into()))?;
    let id_session = SessionId::new(id_session).map_err(|e| Refusal::Invalid(e.to_string()))?;
    Ok(serde_json::from_value::<SessionBody>(Value::Object(body)).map_err(invalid)?.into_command(id_session))
}

/// The JSON Schema of `session.upsert`: [`SessionBody`]'s with a required `id_session`.
pub fn session_upsert_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = generator.root_schema_for::<SessionBody>();
    let id_session = generator.subschema_for::<SessionId>();
    let object = schema.as_object_mut().expect("SessionBody's schema is an object");
    object.insert("title".into(), json!("session.upsert"));
    if let Some(Value::Object(properties)) = object.get_mut("properties") {
        properties.insert("id_session".into(), id_session.to_value());
    }
    if let Some(Value::Array(required)) = object.get_mut("required") {
        required.insert(0, json!("id_session"));
    }
    schema
}

/// Why a command was not run.
enum Refusal {
    /// As sent, it never will be: dead-letter it.
    Invalid(String),
    /// Try again later.
    Transient(String),
}

impl From<AppError> for Refusal {
    fn from(error: AppError) -> Self {
        use crate::eventstore::EventStoreError;
        // The database going away or out of reach (the classifier the HTTP edge answers
        // 503 by) passes. Postgres refusing the data itself (classes 22, data exception,
        // and 23, integrity constraint) will refuse it again: not worth a retry. Any
        // other database failure (a lock not had in time, a deadlock) may pass.
        let refused_data =
            |e: &tokio_postgres::Error| e.code().is_some_and(|code| matches!(&code.code()[..2], "22" | "23"));
        if error.is_database_unavailable() {
            return Refusal::Transient(error.to_string());
        }
        if let Some(e) = error.database_error() {
            return if refused_data(e) {
                Refusal::Invalid(error.to_string())
            } else {
                Refusal::Transient(error.to_string())
            };
        }
        match error {
            AppError::Domain(DomainError::NotFound(what)) => Refusal::Invalid(format!("{what} not found")),
            AppError::Domain(other) => Refusal::Invalid(other.to_string()),
            AppError::Forbidden(message) => Refusal::Invalid(message),
            AppError::TooMany(_, message) => Refusal::Invalid(message),
            AppError::EventStore(ref e) if e.is_conflict() => Refusal::Transient(error.to_string()),
            AppError::CorruptEvent(_) | AppError::Projection(_) | AppError::EventStore(EventStoreError::Corrupt(_)) => {
                Refusal::Invalid(error.to_string())
            }
            other => Refusal::Transient(other.to_string()),
        }
    }
}

/// An AMQP id (message or correlation id) fit to use as a request id: the request-id
/// rules of the HTTP edge; anything else is replaced.
fn plain_id(value: Option<&lapin::types::ShortString>) -> Option<String> {
    value
        .map(|v| v.as_str())
        .filter(|v| {
            (1..=128).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
        })
        .map(str::to_owned)
}

/// A message id as recorded in the events (`causation_id`), by which a command sent
/// again is recognised: any id, with control characters and `\` escaped (Postgres
/// cannot store NUL in JSON), so that one id always records the same way and two ids
/// never record alike.
fn recorded_message_id(value: Option<&lapin::types::ShortString>) -> Option<String> {
    let value = value.map(|v| v.as_str()).filter(|v| !v.is_empty())?;
    Some(value.chars().fold(String::with_capacity(value.len()), |mut recorded, c| {
        if c.is_control() || c == '\\' {
            recorded.extend(c.escape_unicode());
        } else {
            recorded.push(c);
        }
        recorded
    }))
}

/// Consumes commands until the task is dropped or `stop` is cancelled (then the command
/// being handled is finished, the ones prefetched go back to the queue, and it
/// returns), reconnecting with backoff.
pub async fn run(app: App, config: CommandsConfig, stop: tokio_util::sync::CancellationToken) {
    let mut backoff = Duration::from_millis(200);
    while !stop.is_cancelled() {
        app.messaging.set_commands(ComponentState::Connecting);
        let result = consume(&app, &config, &stop).await;
        if app.messaging.commands() == ComponentState::Up {
            backoff = Duration::from_millis(200); // it had been working
        }
        if let Err(error) = result {
            tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "command consumer stopped; starting over");
            tokio::select! {
                biased;
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }
    app.messaging.set_commands(ComponentState::Disabled);
}

/// Declares the topology (idempotently): exchange, queue with its dead-letter route,
/// dead queue.
pub async fn declare(channel: &Channel, config: &CommandsConfig) -> lapin::Result<()> {
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    channel.queue_declare(config.dead_queue().as_str().into(), durable, FieldTable::default()).await?;
    let mut arguments = FieldTable::default();
    arguments.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
    arguments.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(config.dead_queue().as_str().into()));
    channel.queue_declare(config.queue().as_str().into(), durable, arguments).await?;
    channel
        .exchange_declare(
            config.queue().as_str().into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions { durable: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?;
    for command in COMMANDS.iter().map(|command| command.name) {
        channel
            .queue_bind(
                config.queue().as_str().into(),
                config.queue().as_str().into(),
                command.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

/// How long one broker operation of the consumer (a reply, a dead letter, an ack) may
/// take before the consumer starts over (a blocked or silent connection).
const BROKER_OP_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest `x-assetd-error` (and reply `error`): the reason may quote the input.
const MAX_REASON_BYTES: usize = 1024;

async fn bounded<T>(operation: impl std::future::Future<Output = lapin::Result<T>>) -> Result<T, BrokerError> {
    Ok(tokio::time::timeout(BROKER_OP_TIMEOUT, operation)
        .await
        .map_err(|_| BrokerError::TimedOut(BROKER_OP_TIMEOUT))??)
}

/// Consumes until `stop`, the broker connection fails or a command fails for a passing
/// reason (the database unreachable): then its channel is closed, so the commands it held go
/// back to the queue for other processes, and `run` starts over once the database
/// answers.
async fn consume(
    app: &App,
    config: &CommandsConfig,
    stop: &tokio_util::sync::CancellationToken,
) -> Result<(), BrokerError> {
    if !app.database_ready().await {
        return Err(BrokerError::Unavailable("the database is unreachable; not taking commands".into()));
    }
    // A channel of its own (a consumer must not go back to the pool). In confirm
    // mode: dead letters and replies are confirmed before the command is acked.
    let channel = config.broker.dedicated_channel().await?;
    let result = async {
        bounded(declare(&channel, config)).await?;
        bounded(channel.basic_qos(PREFETCH, BasicQosOptions::default())).await?;
        let mut deliveries = bounded(channel.basic_consume(
            config.queue().as_str().into(),
            "assetd".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ))
        .await?;
        tracing::info!(queue = %config.queue(), "consuming commands");
        app.messaging.set_commands(ComponentState::Up);
        loop {
            // Biased: once stopped, no more of the deliveries already prefetched.
            let delivery = tokio::select! {
                biased;
                _ = stop.cancelled() => return Ok(()),
                delivery = deliveries.next() => delivery,
            };
            let Some(delivery) = delivery else { return Ok(()) };
            if let Handled::RetryLater(reason) = handle(app, config, &channel, delivery?).await? {
                return Err(BrokerError::Unavailable(reason));
            }
        }
    }
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(5), channel.close(200, "consumer stopped".into())).await;
    result
}

/// What became of one delivery.
enum Handled {
    Done,
    /// Back in the queue: the consumer should stop for a while.
    RetryLater(String),
}

async fn handle(
    app: &App,
    config: &CommandsConfig,
    channel: &Channel,
    delivery: Delivery,
) -> Result<Handled, BrokerError> {
    let outcome = run_command(app, config, &delivery).await.map_err(|refusal| match refusal {
        Refusal::Invalid(reason) => Refusal::Invalid(truncated(reason, MAX_REASON_BYTES)),
        transient => transient,
    });
    let command = truncated(command_name(&delivery), 255);
    let message_id = delivery.properties.message_id().as_ref().map(|id| id.as_str()).unwrap_or_default();
    let reply = match &outcome {
        Ok(Ran::Now(result)) => {
            tracing::info!(%command, message_id, "command ran");
            Some(CommandReply { ok: true, duplicate: false, error: None, result: Some(result) })
        }
        Ok(Ran::Before(result)) => {
            tracing::info!(%command, message_id, "command already run; not run again");
            Some(CommandReply { ok: true, duplicate: true, error: None, result: result.as_ref() })
        }
        Err(Refusal::Invalid(error)) => {
            Some(CommandReply { ok: false, duplicate: false, error: Some(error.clone()), result: None })
        }
        Err(Refusal::Transient(_)) => None,
    };
    if let (Some(reply), Some(reply_to)) = (reply, delivery.properties.reply_to()) {
        // Persistent: a durable reply queue keeps it across a broker restart.
        let mut properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_type(format!("{command}.reply").as_str().into())
            .with_delivery_mode(2);
        if let Some(correlation_id) = delivery.properties.correlation_id() {
            properties = properties.with_correlation_id(correlation_id.clone());
        }
        let body = serde_json::to_vec(&reply).expect("JSON values serialize");
        // A reply the broker could not take is not worth running the command again for
        // (the events say what happened): its confirm is awaited, not checked.
        let publish = async {
            channel
                .basic_publish("".into(), reply_to.as_str().into(), BasicPublishOptions::default(), &body, properties)
                .await?
                .await
        };
        bounded(publish).await?;
    }
    match outcome {
        Ok(_) => {
            bounded(delivery.ack(BasicAckOptions::default())).await?;
        }
        Err(Refusal::Invalid(reason)) => {
            tracing::info!(%command, message_id, %reason, "dead-lettering a command");
            // Bounded headers: the sender's own are not kept (with ours they could
            // exceed the broker's frame size, which closes the whole connection).
            let mut headers = FieldTable::default();
            headers.insert("x-assetd-error".into(), AMQPValue::LongString(reason.as_str().into()));
            headers.insert("x-assetd-command".into(), AMQPValue::LongString(command.as_str().into()));
            // What identifies the command, without the sender's TTL: kept in the dead
            // queue until someone looks.
            let original = &delivery.properties;
            let mut properties = BasicProperties::default()
                .with_headers(headers)
                .with_delivery_mode(2)
                .with_type(command.as_str().into());
            if let Some(content_type) = original.content_type() {
                properties = properties.with_content_type(content_type.clone());
            }
            if let Some(message_id) = original.message_id() {
                properties = properties.with_message_id(message_id.clone());
            }
            if let Some(correlation_id) = original.correlation_id() {
                properties = properties.with_correlation_id(correlation_id.clone());
            }
            let publish = async {
                channel
                    .basic_publish(
                        "".into(),
                        config.dead_queue().as_str().into(),
                        BasicPublishOptions::default(),
                        &delivery.data,
                        properties,
                    )
                    .await?
                    .await
            };
            if bounded(publish).await?.is_ack() {
                bounded(delivery.ack(BasicAckOptions::default())).await?;
            } else {
                // Not safely in the dead queue: let the broker dead-letter it (no header).
                bounded(delivery.reject(lapin::options::BasicRejectOptions { requeue: false })).await?;
            }
        }
        Err(Refusal::Transient(reason)) => {
            tracing::warn!(%command, message_id, %reason, "a command failed for now; back to the queue");
            bounded(delivery.nack(BasicNackOptions { requeue: true, ..Default::default() })).await?;
            return Ok(Handled::RetryLater(reason));
        }
    }
    Ok(Handled::Done)
}

/// At most `max` bytes of `text`, cut at a character boundary.
fn truncated(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// The command a message asks for: sent straight to the queue (the default exchange),
/// its `type`; through an exchange, its routing key.
fn command_name(delivery: &Delivery) -> String {
    match delivery.properties.kind() {
        Some(kind) if delivery.exchange.as_str().is_empty() => kind.to_string(),
        _ => delivery.routing_key.to_string(),
    }
}

/// Why the command a message asks for cannot be told: a `type` that names another
/// command than the routing key it was sent with, or no `type` on a message sent
/// straight to the queue.
fn unclear_command(delivery: &Delivery) -> Option<Refusal> {
    let kind = delivery.properties.kind().as_ref().map(|kind| kind.as_str());
    let routing_key = delivery.routing_key.as_str();
    if delivery.exchange.as_str().is_empty() {
        return kind.is_none().then(|| {
            Refusal::Invalid("a command sent straight to the queue names itself in the AMQP type property".into())
        });
    }
    let kind = kind?;
    (kind != routing_key)
        .then(|| Refusal::Invalid(format!("the type property {kind:?} contradicts the routing key {routing_key:?}")))
}

/// A command that was run, now or by an earlier delivery of the same message.
enum Ran {
    Now(Value),
    /// With what it gave then, as far as it can be told now (the session's current
    /// state; none if it is gone).
    Before(Option<Value>),
}

/// What running a command can end in besides a result.
enum RunError {
    Refused(Refusal),
    App(AppError),
}

impl From<AppError> for RunError {
    fn from(error: AppError) -> Self {
        Self::App(error)
    }
}
impl From<Refusal> for RunError {
    fn from(refusal: Refusal) -> Self {
        Self::Refused(refusal)
    }
}

/// One command as it runs: who sent it, its context and body.
struct Invocation<'a> {
    app: &'a App,
    config: &'a CommandsConfig,
    principal: Principal,
    ctx: CommandContext,
    body: &'a [u8],
}

type Running<'a, T> = futures::future::BoxFuture<'a, Result<T, RunError>>;

/// One AMQP command: the one place that says what its body is, what it runs and what
/// it answers when its message was already run. Adding a command is one entry in
/// [`COMMANDS`]; the queue bindings and the contract files come from the table.
pub struct CommandSpec {
    pub name: &'static str,
    pub description: &'static str,
    /// The body's JSON Schema.
    pub schema: fn(&mut schemars::SchemaGenerator) -> schemars::Schema,
    /// The reply's JSON Schema.
    pub reply_schema: fn(&mut schemars::SchemaGenerator) -> schemars::Schema,
    run: for<'a> fn(&'a Invocation<'a>) -> Running<'a, Value>,
    /// What the command gave when its message was first run (`message_id` given).
    ran_before: for<'a> fn(&'a Invocation<'a>, &'a str) -> Running<'a, Option<Value>>,
}

pub const IMPORT_REQUEST: &str = "import.request";
pub const ARCHIVE_REQUEST: &str = "archive.request";

/// Every command assetd takes.
pub static COMMANDS: [CommandSpec; 4] = [
    CommandSpec {
        name: SESSION_UPSERT,
        description:
            "Register or update a session: the body of `PUT /file/api/sessions/{id_session}` with `id_session`.",
        schema: session_upsert_schema,
        reply_schema: |generator| generator.root_schema_for::<CommandReply<SessionInfo>>(),
        run: run_session_upsert,
        ran_before: session_upsert_ran_before,
    },
    CommandSpec {
        name: SESSION_DELETE,
        description: "Delete a session, as `DELETE /file/api/sessions/{id_session}`: the reply names the job that deletes its assets.",
        schema: |generator| generator.root_schema_for::<SessionDelete>(),
        reply_schema: |generator| generator.root_schema_for::<CommandReply<SessionDeletedReply>>(),
        run: run_session_delete,
        ran_before: session_delete_ran_before,
    },
    CommandSpec {
        name: IMPORT_REQUEST,
        description: "Import a file from a URL (or a received two-phase upload) into a session, as `POST /file/api/imports`: the reply names the job.",
        schema: |generator| generator.root_schema_for::<AnyImportBody>(),
        reply_schema: |generator| generator.root_schema_for::<CommandReply<ImportQueued>>(),
        run: run_import_request,
        ran_before: import_request_ran_before,
    },
    CommandSpec {
        name: ARCHIVE_REQUEST,
        description: "Ask for a zip of a session's assets (`id_session`) or of a list of assets (`asset_uuids`), as `POST /file/api/archives`: the reply names the archive and its job; `archive.completed` says when it can be downloaded.",
        schema: |generator| generator.root_schema_for::<ArchiveBody>(),
        reply_schema: |generator| generator.root_schema_for::<CommandReply<ArchiveQueued>>(),
        run: run_archive_request,
        ran_before: archive_request_ran_before,
    },
];

fn body_of<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Refusal> {
    serde_json::from_slice(body).map_err(|error| Refusal::Invalid(format!("invalid body: {error}")))
}

fn to_value(result: impl Serialize) -> Value {
    serde_json::to_value(result).expect("replies are plain data")
}

fn run_session_upsert<'a>(call: &'a Invocation<'a>) -> Running<'a, Value> {
    Box::pin(async move {
        let upsert = parse_session_upsert(call.body)?;
        Ok(to_value(call.app.upsert_session(&call.principal, &call.ctx, upsert).await?))
    })
}

fn session_upsert_ran_before<'a>(call: &'a Invocation<'a>, _message_id: &'a str) -> Running<'a, Option<Value>> {
    Box::pin(async move {
        let upsert = parse_session_upsert(call.body)?;
        Ok(call.app.session_for(&call.principal, upsert.id_session).await.ok().map(to_value))
    })
}

fn run_session_delete<'a>(call: &'a Invocation<'a>) -> Running<'a, Value> {
    Box::pin(async move {
        let id_session = body_of::<SessionDelete>(call.body)?.id_session;
        let policy = call.config.import_policy;
        let job_uuid = call.app.delete_session(&call.principal, &call.ctx, id_session, policy).await?;
        Ok(to_value(SessionDeletedReply { id_session: id_session.get(), job_uuid }))
    })
}

fn session_delete_ran_before<'a>(call: &'a Invocation<'a>, message_id: &'a str) -> Running<'a, Option<Value>> {
    Box::pin(async move {
        let id_session = body_of::<SessionDelete>(call.body)?.id_session;
        let Some(job_uuid) = caused_by(call.app, message_id, "JobQueued", "job_uuid").await?.into_iter().next() else {
            return Ok(None);
        };
        Ok(Some(to_value(SessionDeletedReply { id_session: id_session.get(), job_uuid })))
    })
}

/// The reply to `archive.request`.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct ArchiveQueued {
    pub archive_uuid: Uuid,
    pub job_uuid: Uuid,
    /// `pending` when just asked for; the archive's status now when the message was sent again.
    pub archive_status: String,
}

fn run_archive_request<'a>(call: &'a Invocation<'a>) -> Running<'a, Value> {
    Box::pin(async move {
        let scope = body_of::<ArchiveBody>(call.body)?.validate().map_err(|e| Refusal::Invalid(e.to_string()))?;
        let policy = call.config.import_policy;
        let archive = call.app.request_archive(&call.principal, &call.ctx, scope, policy).await?;
        Ok(to_value(ArchiveQueued {
            archive_uuid: archive.archive_uuid,
            job_uuid: archive.job_uuid,
            archive_status: archive.archive_status,
        }))
    })
}

fn archive_request_ran_before<'a>(call: &'a Invocation<'a>, message_id: &'a str) -> Running<'a, Option<Value>> {
    Box::pin(async move {
        let requested = caused_by(call.app, message_id, "ArchiveRequested", "archive_uuid").await?;
        let Some(archive_uuid) = requested.into_iter().next() else { return Ok(None) };
        let archive = call.app.archive_for(&call.principal, archive_uuid).await?;
        Ok(Some(to_value(ArchiveQueued {
            archive_uuid,
            job_uuid: archive.job_uuid,
            archive_status: archive.status_at(chrono::Utc::now()).to_owned(),
        })))
    })
}

/// The reply to `import.request`.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct ImportQueued {
    pub job_uuid: Uuid,
    /// `queued` when just asked for; the job's status now when the message was sent again.
    pub status: String,
}

fn run_import_request<'a>(call: &'a Invocation<'a>) -> Running<'a, Value> {
    Box::pin(async move {
        let request = match body_of::<AnyImportBody>(call.body)? {
            AnyImportBody::Url(body) => body.validate(&call.principal).map_err(|e| Refusal::Invalid(e.to_string()))?,
            AnyImportBody::Upload(body) => {
                let spec = body.validate(&call.principal).map_err(|e| Refusal::Invalid(e.to_string()))?;
                call.app.upload_import_request(&call.principal, spec).await?
            }
        };
        let requested =
            call.app.request_import(&call.principal, &call.ctx, request, None, call.config.import_policy).await?;
        Ok(to_value(ImportQueued { job_uuid: requested.job.job_uuid, status: requested.job.status.to_owned() }))
    })
}

fn import_request_ran_before<'a>(call: &'a Invocation<'a>, message_id: &'a str) -> Running<'a, Option<Value>> {
    Box::pin(async move {
        let Some(job_uuid) = caused_by(call.app, message_id, "JobQueued", "job_uuid").await?.into_iter().next() else {
            return Ok(None);
        };
        let status = call.app.job_for(&call.principal, job_uuid).await.map(|job| job.status.to_owned());
        Ok(Some(to_value(ImportQueued { job_uuid, status: status.unwrap_or_else(|_| "unknown".into()) })))
    })
}

/// The uuids in `field` of the events of `event_type` that the message `message_id` caused.
async fn caused_by(app: &App, message_id: &str, event_type: &str, field: &str) -> Result<Vec<Uuid>, RunError> {
    let client = app.pool.get().await.map_err(AppError::from)?;
    Ok(eventstore::read_caused_by(&client, message_id)
        .await
        .map_err(AppError::from)?
        .iter()
        .filter(|event| event.event_type == event_type)
        .filter_map(|event| event.data.get(field)?.as_str()?.parse().ok())
        .collect())
}

async fn run_command(app: &App, config: &CommandsConfig, delivery: &Delivery) -> Result<Ran, Refusal> {
    if let Some(refusal) = unclear_command(delivery) {
        return Err(refusal);
    }
    if delivery.data.len() > crate::app::MAX_COMMAND_BODY {
        return Err(Refusal::Invalid(format!(
            "the body has {} bytes; commands are limited to {} (as JSON bodies over HTTP)",
            delivery.data.len(),
            crate::app::MAX_COMMAND_BODY
        )));
    }
    let name = command_name(delivery);
    let spec = COMMANDS
        .iter()
        .find(|command| command.name == name)
        .ok_or_else(|| Refusal::Invalid(format!("unknown command {name:?}")))?;
    // The sending service may name itself (its uuid) in `app_id`.
    let sender = delivery.properties.app_id().as_ref().and_then(|id| id.as_str().parse().ok());
    let principal = Principal {
        kind: PrincipalKind::Service,
        uuid: sender.unwrap_or(Uuid::nil()),
        name: "amqp-commands".into(),
        superadmin: false,
    };
    let request_id = plain_id(delivery.properties.message_id().as_ref()).unwrap_or_else(|| Uuid::new_v4().to_string());
    let message = recorded_message_id(delivery.properties.message_id().as_ref()).map(|id| ReceivedMessage {
        id,
        command: spec.name,
        body_sha256: crate::app::body_sha256(&delivery.data),
    });
    let ctx = CommandContext {
        actor: principal.actor(),
        correlation_id: plain_id(delivery.properties.correlation_id().as_ref()).unwrap_or_else(|| request_id.clone()),
        request_id,
        message,
    };
    let call = Invocation { app, config, principal, ctx, body: &delivery.data };
    // The application records the message's receipt with the command's events, or
    // finds it there: a message sent again (redelivered after a lost ack, or retried by
    // its sender) is answered, not run again.
    match (spec.run)(&call).await {
        Ok(result) => Ok(Ran::Now(result)),
        Err(RunError::App(AppError::AlreadyReceived(message_id))) => {
            same_command_as_before(&call, &message_id).await?;
            match (spec.ran_before)(&call, &message_id).await {
                Ok(result) => Ok(Ran::Before(result)),
                Err(RunError::Refused(refusal)) => Err(refusal),
                Err(RunError::App(error)) => Err(error.into()),
            }
        }
        Err(RunError::App(error)) => Err(error.into()),
        Err(RunError::Refused(refusal)) => Err(refusal),
    }
}

/// A message received before must be this very command (the same name and body): an
/// id used for another command is refused.
async fn same_command_as_before(call: &Invocation<'_>, message_id: &str) -> Result<(), Refusal> {
    let client = call.app.pool.get().await.map_err(AppError::from)?;
    let receipt = client
        .query_opt("SELECT command, body_sha256 FROM command_receipts WHERE message_id = $1", &[&message_id])
        .await
        .map_err(AppError::from)?;
    let same = receipt.is_some_and(|row| {
        let message = call.ctx.message.as_ref();
        Some(row.get::<_, &str>(0)) == message.map(|m| m.command)
            && Some(row.get::<_, &str>(1)) == message.map(|m| m.body_sha256.as_str())
    });
    if !same {
        return Err(Refusal::Invalid(format!(
            "message_id \"{message_id}\" was already used by another command; give each command an id of its own"
        )));
    }
    Ok(())
}
