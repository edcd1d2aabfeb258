//! OpenTera's protobuf messages that assetd publishes, encoded with prost. The
//! definitions are those of the `opentera` package's generated modules
//! (`opentera/messages/python/TeraModuleMessage_pb2.py`, `ArchiveEvent_pb2.py`):
//! `TeraEvent{header{version, time, topic}, events: [Any]}` and
//! `ArchiveEvent{archive_uuid, owner_uuid, status, archive_url}`.

use prost::Message;

/// `opentera.protobuf.TeraEvent.Header`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Header {
    #[prost(uint32, tag = "1")]
    pub version: u32,
    /// Seconds since the epoch.
    #[prost(double, tag = "2")]
    pub time: f64,
    #[prost(string, tag = "3")]
    pub topic: String,
}

/// `google.protobuf.Any`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Any {
    #[prost(string, tag = "1")]
    pub type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
}

/// `opentera.protobuf.TeraEvent`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TeraEvent {
    #[prost(message, optional, tag = "1")]
    pub header: Option<Header>,
    #[prost(message, repeated, tag = "2")]
    pub events: Vec<Any>,
}

/// `opentera.protobuf.ArchiveEvent.Status`: FTS's `archive_status` numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
pub enum ArchiveStatus {
    Pending = 0,
    InProgress = 1,
    Completed = 2,
    Cancelled = 3,
    Deleted = 4,
}

/// `opentera.protobuf.ArchiveEvent`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ArchiveEvent {
    #[prost(string, tag = "1")]
    pub archive_uuid: String,
    #[prost(string, tag = "2")]
    pub owner_uuid: String,
    #[prost(enumeration = "ArchiveStatus", tag = "3")]
    pub status: i32,
    /// Relative, and with a trailing space, exactly as FTS sends it.
    #[prost(string, tag = "4")]
    pub archive_url: String,
}

impl ArchiveEvent {
    /// The event FTS sends for an archive: its URL under the service's client endpoint.
    pub fn new(archive_uuid: uuid::Uuid, owner_uuid: uuid::Uuid, status: ArchiveStatus, clientendpoint: &str) -> Self {
        Self {
            archive_uuid: archive_uuid.to_string(),
            owner_uuid: owner_uuid.to_string(),
            status: status as i32,
            archive_url: format!("{clientendpoint}/api/archives?archive_uuid={archive_uuid} "),
        }
    }
}

/// `opentera.protobuf.DatabaseEvent.EventType`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
pub enum DatabaseEventType {
    DbUnknown = 0,
    DbCreate = 1,
    DbUpdate = 2,
    DbDelete = 3,
}

/// `opentera.protobuf.DatabaseEvent`: TeraServer's news of a change in its database.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DatabaseEvent {
    #[prost(enumeration = "DatabaseEventType", tag = "1")]
    pub r#type: i32,
    #[prost(string, tag = "2")]
    pub object_type: String,
    /// The object, as JSON.
    #[prost(string, tag = "3")]
    pub object_value: String,
}

/// The channel TeraServer publishes its asset changes on.
pub const ASSET_EVENTS_CHANNEL: &str = "module.TeraServer.DatabaseModule.events.asset";

/// The assets a `TeraEvent` says TeraServer deleted (FTS's `asset_event_received`:
/// `DB_DELETE` of an `asset`).
pub fn deleted_assets(message: &[u8]) -> Vec<uuid::Uuid> {
    let Ok(event) = TeraEvent::decode(message) else { return vec![] };
    event
        .events
        .iter()
        .filter(|any| any.type_url.ends_with("opentera.protobuf.DatabaseEvent"))
        .filter_map(|any| DatabaseEvent::decode(&any.value[..]).ok())
        .filter(|e| e.object_type == "asset" && e.r#type == DatabaseEventType::DbDelete as i32)
        .filter_map(|e| {
            let value: serde_json::Value = serde_json::from_str(&e.object_value).ok()?;
            value.get("asset_uuid")?.as_str()?.parse().ok()
        })
        .collect()
}

const ARCHIVE_EVENT_TYPE_URL: &str = "type.googleapis.com/opentera.protobuf.ArchiveEvent";

/// The bytes published on `topic`: a `TeraEvent` holding the archive event.
pub fn encode_archive_event(event: &ArchiveEvent, topic: &str, now: chrono::DateTime<chrono::Utc>) -> Vec<u8> {
    let time = now.timestamp_micros() as f64 / 1e6;
    TeraEvent {
        header: Some(Header { version: 1, time, topic: topic.to_owned() }),
        events: vec![Any { type_url: ARCHIVE_EVENT_TYPE_URL.into(), value: event.encode_to_vec() }],
    }
    .encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deleted_assets_are_read_from_teraservers_database_events() {
        let asset = uuid::Uuid::new_v4();
        let event = |kind: DatabaseEventType, object_type: &str| Any {
            type_url: "type.googleapis.com/opentera.protobuf.DatabaseEvent".into(),
            value: DatabaseEvent {
                r#type: kind as i32,
                object_type: object_type.into(),
                object_value: format!(r#"{{"asset_uuid": "{asset}", "id_asset": 3}}"#),
            }
            .encode_to_vec(),
        };
        let message = TeraEvent {
            header: Some(Header { version: 1, time: 1.0, topic: ASSET_EVENTS_CHANNEL.into() }),
            events: vec![
                event(DatabaseEventType::DbUpdate, "asset"),
                event(DatabaseEventType::DbDelete, "session"),
                event(DatabaseEventType::DbDelete, "asset"),
            ],
        }
        .encode_to_vec();
        assert_eq!(deleted_assets(&message), vec![asset]);
        assert!(deleted_assets(b"not protobuf").is_empty());
    }

    /// Bytes made by OpenTera's own generated Python classes (protobuf 4) for
    /// TeraEvent{header{1, 1.5, "service.FileTransferService.events"},
    /// [Any(ArchiveEvent{"a", "o", COMPLETED, "/file/api/archives?archive_uuid=a "})]}.
    const GOLDEN: &str = "0a2f080111000000000000f83f1a22736572766963652e46696c655472616e73666572536572766963652e6576656e747312620a32747970652e676f6f676c65617069732e636f6d2f6f70656e746572612e70726f746f6275662e417263686976654576656e74122c0a016112016f180222222f66696c652f6170692f61726368697665733f617263686976655f757569643d6120";

    #[test]
    fn archive_events_are_encoded_as_openteras_python_encodes_them() {
        let event = ArchiveEvent {
            archive_uuid: "a".into(),
            owner_uuid: "o".into(),
            status: ArchiveStatus::Completed as i32,
            archive_url: "/file/api/archives?archive_uuid=a ".into(),
        };
        let at = chrono::DateTime::from_timestamp(1, 500_000_000).unwrap();
        let bytes = encode_archive_event(&event, "service.FileTransferService.events", at);
        assert_eq!(hex::encode(&bytes), GOLDEN);
        let decoded = TeraEvent::decode(&bytes[..]).unwrap();
        assert_eq!(ArchiveEvent::decode(&decoded.events[0].value[..]).unwrap(), event);
    }
}
