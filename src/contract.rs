//! The AMQP contract files of `events/` (`assetd contract`): an AsyncAPI 3 document for
//! the events exchange, the commands queue, its dead queue and the replies, and a JSON
//! Schema (draft-07, AsyncAPI's schema dialect) per event, command and reply. All are
//! generated from the Rust types that produce or parse the messages, so they cannot
//! drift from the code; a test fails when the checked-in files are stale, and the AMQP
//! tests validate every message they receive against them.

use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde_json::{json, Map, Value};

use crate::app::EventMetadata;
use crate::commands;
use crate::domain::{visit_aggregates, Aggregate, AggregateVisitor, DomainEvent, PayloadVisitor};
use crate::relay::{routing_key, EventMessage};

/// A file to write under the contract directory (`events/`).
pub struct ContractFile {
    /// Relative to the contract directory, with `/` separators.
    pub path: String,
    pub content: Value,
}

/// The JSON Schema of one message, and where it goes.
struct MessageSchema {
    /// The AMQP routing key / command name, e.g. `asset.uploaded`.
    name: String,
    /// Event type or command name, as in the AMQP `type` property.
    message_type: String,
    /// `schemas/...json`.
    path: String,
    schema: Schema,
}

fn generator() -> SchemaGenerator {
    // Inlined: every schema file stands alone, and the AsyncAPI document embeds them
    // as they are.
    SchemaSettings::draft07().with(|settings| settings.inline_subschemas = true).into_generator()
}

struct EventSchemas {
    /// Of the aggregate being visited: the streams its events are recorded in.
    stream_pattern: String,
    schemas: Vec<MessageSchema>,
}

impl AggregateVisitor for EventSchemas {
    fn visit<A: Aggregate>(&mut self) {
        self.stream_pattern = format!("^{}-{}$", A::CATEGORY, A::ID_PATTERN);
        A::Event::visit_payloads(self);
    }
}

impl PayloadVisitor for EventSchemas {
    fn visit<Payload: JsonSchema>(&mut self, event_type: &'static str) {
        let mut schema = generator().into_root_schema_for::<EventMessage<Payload, EventMetadata>>();
        let key = routing_key(event_type);
        schema.insert("title".into(), json!(event_type));
        schema.insert(
            "description".into(),
            json!(format!(
                "The body of the events exchange's messages with routing key `{key}` (AMQP type `{event_type}`)."
            )),
        );
        let properties = schema.get_mut("properties").and_then(Value::as_object_mut).expect("an object schema");
        properties.insert("event_type".into(), json!({"const": event_type}));
        properties.insert("stream".into(), json!({"type": "string", "pattern": &self.stream_pattern}));
        self.schemas.push(MessageSchema {
            path: format!("schemas/events/{key}.json"),
            name: key,
            message_type: event_type.to_owned(),
            schema,
        });
    }
}

fn event_schemas() -> Vec<MessageSchema> {
    let mut schemas = EventSchemas { stream_pattern: String::new(), schemas: vec![] };
    visit_aggregates(&mut schemas);
    schemas.schemas
}

/// A command with its reply.
struct CommandSchemas {
    command: MessageSchema,
    reply: MessageSchema,
}

fn command_schemas() -> Vec<CommandSchemas> {
    fn titled(mut schema: Schema, title: &str, description: &str) -> Schema {
        schema.insert("title".into(), json!(title));
        schema.insert("description".into(), json!(description));
        schema
    }
    fn message(name: &str, schema: Schema) -> MessageSchema {
        MessageSchema {
            path: format!("schemas/commands/{name}.json"),
            name: name.to_owned(),
            message_type: name.to_owned(),
            schema,
        }
    }
    let reply_description = "The reply to a command sent with `reply_to`, with its `correlation_id`.";
    commands::COMMANDS
        .iter()
        .map(|spec| CommandSchemas {
            command: message(spec.name, titled((spec.schema)(&mut generator()), spec.name, spec.description)),
            reply: message(
                &format!("{}.reply", spec.name),
                titled((spec.reply_schema)(&mut generator()), &format!("{} reply", spec.name), reply_description),
            ),
        })
        .collect()
}

/// `asset.uploaded` → `assetUploaded`: AsyncAPI keys for channels and operations.
fn camel(name: &str) -> String {
    let mut out = String::new();
    let mut upper = false;
    for c in name.chars() {
        if c == '.' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// A schema as embedded in the AsyncAPI document (no `$schema` of its own).
fn embedded(schema: &Schema) -> Value {
    let mut value = schema.clone().to_value();
    if let Some(object) = value.as_object_mut() {
        object.remove("$schema");
    }
    value
}

const AMQP_BINDING: &str = "0.3.0";

/// Every contract file, for the AMQP names under `prefix` (`ASSETD_AMQP_PREFIX`).
pub fn files(prefix: &str) -> Vec<ContractFile> {
    let events = event_schemas();
    let commands = command_schemas();
    let events_exchange = format!("{prefix}.events");
    let commands_queue = format!("{prefix}.commands");
    let dead_queue = format!("{prefix}.commands.dead");

    let mut channels = Map::new();
    let mut operations = Map::new();
    let mut schemas = Map::new();
    let mut messages = Map::new();
    let mut add_message = |message: &MessageSchema, summary: String, extra: Value| {
        let schema_key = camel(&message.name);
        schemas.insert(schema_key.clone(), embedded(&message.schema));
        let mut body = json!({
            "name": message.message_type,
            "title": message.message_type,
            "summary": summary,
            "contentType": "application/json",
            "payload": {"$ref": format!("#/components/schemas/{schema_key}")},
            "bindings": {"amqp": {"messageType": message.message_type, "bindingVersion": AMQP_BINDING}},
        });
        if let (Some(body), Value::Object(extra)) = (body.as_object_mut(), extra) {
            body.extend(extra);
        }
        messages.insert(schema_key, body);
    };
    let message_ref = |name: &str| json!({"$ref": format!("#/components/messages/{}", camel(name))});

    for event in &events {
        let key = camel(&event.name);
        add_message(
            event,
            format!("Published once an event of type `{}` is committed.", event.message_type),
            json!({"correlationId": {
                "description": "The AMQP correlation_id property: the correlation id of the event's metadata.",
                "location": "$message.payload#/metadata/correlation_id",
            }}),
        );
        channels.insert(
            key.clone(),
            json!({
                "address": event.name,
                "title": format!("{} events", event.message_type),
                "description": format!(
                    "Messages with routing key `{}` on the `{events_exchange}` topic exchange. Bind a queue of your \
                     own with this key (or `{}.*`, `#`). At least once: dedupe by `event_id` (also the AMQP \
                     `message_id`); the first delivery of each event comes in its stream's order. `position` orders \
                     events within one transaction only: do not use it as a cursor.",
                    event.name,
                    event.name.split('.').next().unwrap_or_default(),
                ),
                "messages": {key.clone(): message_ref(&event.name)},
                "bindings": routing_key_binding(&events_exchange, "topic"),
            }),
        );
        operations.insert(
            format!("publish{}", capitalised(&key)),
            json!({
                "action": "send",
                "title": format!("Publish {}", event.message_type),
                "summary": "The outbox relay publishes each committed event, persistent, with publisher confirms.",
                "channel": {"$ref": format!("#/channels/{key}")},
                "messages": [{"$ref": format!("#/channels/{key}/messages/{key}")}],
                "bindings": {"amqp": {"deliveryMode": 2, "mandatory": false, "bindingVersion": AMQP_BINDING}},
            }),
        );
    }

    // AMQP properties (correlation_id, reply_to, message_id) are not application headers:
    // AsyncAPI's runtime expressions cannot point at them, so they are described.
    let correlation_id = json!({
        "description": "The AMQP correlation_id property (a property, not a header: AsyncAPI can only point at headers).",
        "location": "$message.header#/correlation_id",
    });
    let command_properties = json!({
        "description":
            "AMQP properties: `message_id` (recorded as the events' causation_id; it names one command as sent: a \
             message whose id already ran with the same command and body (key order and white space aside) is \
             answered, not run again, even from
             another process and even if it changed nothing; an id that ran another command or body is refused), \
             `correlation_id` (copied to the reply, recorded in the events' metadata), `reply_to` (where the reply \
             goes), `app_id` (optional: the sending service's uuid, recorded as the events' actor; anything else \
             counts as the nil uuid), `type` (the command's name when sent straight to the queue; through the \
             exchange the routing key names it, and a `type` that names another command is refused).",
        "correlationId": correlation_id,
    });
    let reply_properties = json!({
        "description": "Sent to the command's `reply_to` with its `correlation_id` and AMQP `type` `<command>.reply`.",
        "correlationId": correlation_id,
    });
    let mut command_messages = Map::new();
    let mut dead_messages = Map::new();
    let mut reply_messages = Map::new();
    for command in &commands {
        add_message(
            &command.command,
            format!(
                "The `{}` command: the routing key on the commands exchange, or the AMQP `type`.",
                command.command.name
            ),
            command_properties.clone(),
        );
        add_message(&command.reply, format!("The reply to `{}`.", command.command.name), reply_properties.clone());
        let key = camel(&command.command.name);
        command_messages.insert(key.clone(), message_ref(&command.command.name));
        reply_messages.insert(camel(&command.reply.name), message_ref(&command.reply.name));
        dead_messages
            .insert(key, json!({"$ref": format!("#/components/messages/{}", dead_key(&command.command.name))}));
    }
    for command in &commands {
        let key = camel(&command.command.name);
        let name = format!("{} (refused)", command.command.name);
        let mut dead = messages[&key].clone();
        dead["name"] = json!(name);
        dead["title"] = json!(name);
        dead["summary"] = json!(format!("A refused `{}` command: its body as sent.", command.command.name));
        dead["description"] = json!(
            "Refused because it could not run as sent, so its body is any bytes (the command's schema is what it \
             should have been). AMQP `type`, `message_id`, `correlation_id` and `content_type` are the command's; \
             the sender's own headers are not kept. Without `x-assetd-error`, the broker dead-lettered it itself \
             (see its `x-death` header)."
        );
        dead["payload"] = json!({});
        dead.as_object_mut().expect("a message object").remove("contentType");
        dead["headers"] = json!({
            "type": "object",
            "properties": {
                "x-assetd-error": {"type": "string", "maxLength": 1030, "description": "Why the command was refused."},
                "x-assetd-command": {"type": "string", "description": "The command's name (its routing key on the exchange, else its type)."},
            },
        });
        messages.insert(dead_key(&command.command.name), dead);
    }
    let queue_binding = |name: &str| {
        json!({"amqp": {
            "is": "queue",
            "queue": {"name": name, "durable": true, "exclusive": false, "autoDelete": false, "vhost": "/"},
            "bindingVersion": AMQP_BINDING,
        }})
    };
    channels.insert(
        "commands".into(),
        json!({
            "address": commands_queue,
            "title": "Commands queue",
            "description": format!(
                "The queue the `{commands_queue}` direct exchange feeds (see the channels of each command). A \
                 command may also be sent straight to it, with its name as AMQP `type`. Consumed with manual acks; \
                 a command that fails for a passing reason (database unreachable) is retried. The queue is declared \
                 with `x-dead-letter-exchange: \"\"` and `x-dead-letter-routing-key: {dead_queue}`: declare it \
                 the same way or not at all. Routing keys other than the commands' are unroutable on the exchange \
                 (publish with `mandatory` to hear of it). Give each command a \
                 `message_id`: a message whose id already ran is not run again (its reply says `duplicate: true`), so \
                 redeliveries and retries (of the same body) are safe."
            ),
            "messages": command_messages,
            "bindings": queue_binding(&commands_queue),
        }),
    );
    channels.insert(
        "deadCommands".into(),
        json!({
            "address": dead_queue,
            "title": "Refused commands",
            "description": "Commands that cannot run as sent (not JSON, unknown, invalid, refused by the rules), \
                            with an `x-assetd-error` header saying why. They never block the commands queue.",
            "messages": dead_messages,
            "bindings": queue_binding(&dead_queue),
        }),
    );
    channels.insert(
        "commandReplies".into(),
        json!({
            "address": null,
            "title": "Command replies",
            "description": "The queue named by a command's `reply_to` property: `{ok, error?, result?}` with the \
                            command's `correlation_id`.",
            "messages": reply_messages,
        }),
    );
    let reply_address = json!({
        "description": "The command's AMQP reply_to property (a property, not a header: AsyncAPI can only point at \
                        headers).",
        "location": "$message.header#/reply_to",
    });
    let all_commands: Vec<Value> = commands
        .iter()
        .map(|c| json!({"$ref": format!("#/channels/commands/messages/{}", camel(&c.command.name))}))
        .collect();
    let all_replies: Vec<Value> = commands
        .iter()
        .map(|c| json!({"$ref": format!("#/channels/commandReplies/messages/{}", camel(&c.reply.name))}))
        .collect();
    let all_dead: Vec<Value> = commands
        .iter()
        .map(|c| json!({"$ref": format!("#/channels/deadCommands/messages/{}", camel(&c.command.name))}))
        .collect();
    operations.insert(
        "consumeCommands".into(),
        json!({
            "action": "receive",
            "title": "Run commands sent straight to the queue",
            "summary": "Runs each command as the HTTP endpoint would (same domain rules); replies when asked.",
            "channel": {"$ref": "#/channels/commands"},
            "messages": all_commands,
            "bindings": {"amqp": {"ack": true, "bindingVersion": AMQP_BINDING}},
            "reply": {
                "address": reply_address,
                "channel": {"$ref": "#/channels/commandReplies"},
                "messages": all_replies,
            },
        }),
    );
    operations.insert(
        "deadLetterCommands".into(),
        json!({
            "action": "send",
            "title": "Dead-letter refused commands",
            "summary": "A refused command is moved, body unchanged, with the reason in the `x-assetd-error` header.",
            "channel": {"$ref": "#/channels/deadCommands"},
            "messages": all_dead,
            "bindings": {"amqp": {"deliveryMode": 2, "mandatory": false, "bindingVersion": AMQP_BINDING}},
        }),
    );

    // The usual way in: the commands exchange, with the command's name as routing key.
    for command in &commands {
        let key = camel(&command.command.name);
        let channel = format!("{key}Command");
        channels.insert(
            channel.clone(),
            json!({
                "address": command.command.name,
                "title": format!("{} commands", command.command.name),
                "description": format!(
                    "Messages with routing key `{}` on the `{commands_queue}` direct exchange (durable), which \
                     routes them to the `{commands_queue}` queue.",
                    command.command.name
                ),
                "messages": {key.clone(): message_ref(&command.command.name)},
                "bindings": routing_key_binding(&commands_queue, "direct"),
            }),
        );
        operations.insert(
            format!("run{}", capitalised(&key)),
            json!({
                "action": "receive",
                "title": format!("Run {}", command.command.name),
                "summary": "Runs the command as the HTTP endpoint would (same domain rules); replies when asked.",
                "channel": {"$ref": format!("#/channels/{channel}")},
                "messages": [{"$ref": format!("#/channels/{channel}/messages/{key}")}],
                "bindings": {"amqp": {"ack": true, "bindingVersion": AMQP_BINDING}},
                "reply": {
                    "address": reply_address.clone(),
                    "channel": {"$ref": "#/channels/commandReplies"},
                    "messages": [{"$ref": format!("#/channels/commandReplies/messages/{}", camel(&command.reply.name))}],
                },
            }),
        );
    }

    let asyncapi = json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": "assetd events and commands",
            "version": env!("CARGO_PKG_VERSION"),
            "description": format!(
                "What assetd publishes and consumes on RabbitMQ (EVENTS.md). Names carry the prefix \
                 `ASSETD_AMQP_PREFIX`, here `{prefix}`. Generated by `assetd contract` from the Rust types; \
                 each message's schema is also in `events/schemas/`."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {"rabbitmq": {
            "host": "127.0.0.1:5672",
            "protocol": "amqp",
            "protocolVersion": "0.9.1",
            "description": "The broker of `ASSETD_AMQP_URL`.",
        }},
        "channels": channels,
        "operations": operations,
        "components": {"schemas": schemas, "messages": messages},
    });

    let mut files = vec![ContractFile { path: "asyncapi.json".into(), content: asyncapi }];
    let every_schema = events.into_iter().chain(commands.into_iter().flat_map(|c| [c.command, c.reply]));
    files.extend(every_schema.map(|message| ContractFile { path: message.path, content: message.schema.to_value() }));
    files
}

/// The AMQP binding of a channel that is a routing key on a durable exchange.
fn routing_key_binding(exchange: &str, kind: &str) -> Value {
    json!({"amqp": {
        "is": "routingKey",
        "exchange": {"name": exchange, "type": kind, "durable": true, "autoDelete": false, "vhost": "/"},
        "bindingVersion": AMQP_BINDING,
    }})
}

fn dead_key(command: &str) -> String {
    format!("{}Refused", camel(command))
}

fn capitalised(name: &str) -> String {
    let mut chars = name.chars();
    chars.next().map(|first| first.to_uppercase().chain(chars).collect()).unwrap_or_default()
}

/// Writes the files under `dir`, and removes the `.json` files of its schema folders
/// that are no longer generated (an event type renamed, say). Nothing else is touched.
pub fn write(dir: &std::path::Path, prefix: &str) -> std::io::Result<usize> {
    let files = files(prefix);
    for folder in ["schemas/events", "schemas/commands"] {
        for entry in std::fs::read_dir(dir.join(folder)).into_iter().flatten() {
            let path = entry?.path();
            let relative = path.strip_prefix(dir).unwrap_or(&path).to_string_lossy().replace('\\', "/");
            let generated = files.iter().any(|file| file.path == relative);
            if path.extension().is_some_and(|ext| ext == "json") && !generated {
                std::fs::remove_file(&path)?;
            }
        }
    }
    for file in &files {
        let path = dir.join(&file.path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let text = serde_json::to_string_pretty(&file.content).expect("JSON values serialize") + "\n";
        std::fs::write(path, text)?;
    }
    Ok(files.len())
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_become_asyncapi_keys() {
        assert_eq!(super::camel("asset.uploaded"), "assetUploaded");
        assert_eq!(super::camel("session.upsert.reply"), "sessionUpsertReply");
        assert_eq!(super::capitalised("assetUploaded"), "AssetUploaded");
    }
}
