//! The domain: sessions and assets as event-sourced aggregates, plus the value types
//! (names, ids, principals) whose constructors are the only way to get a valid one.
//!
//! Pure code: nothing here knows about warp, Postgres or the file system. Each aggregate
//! folds its state from its own events (`apply`) and turns a command into new events
//! (`handle_*`), so the rules are unit-tested with given-events / when / then-events.

pub mod archive;
pub mod asset;
pub mod blob;
pub mod job;
pub mod names;
pub mod principal;
pub mod session;
pub mod upload;

/// Why a command was refused by an aggregate. The HTTP and AMQP edges map these to
/// their own error shapes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DomainError {
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    /// Its time is over (an upload past its expiry).
    #[error("{0}")]
    Expired(String),
}

/// An event as the domain sees it: a type name and a JSON payload. The event store
/// adds position, version, id, metadata.
pub trait DomainEvent: Sized {
    fn event_type(&self) -> &'static str;
    fn to_data(&self) -> serde_json::Value;
    /// `None` for a type this aggregate does not know (ignored when folding).
    fn from_parts(event_type: &str, data: &serde_json::Value) -> Option<Result<Self, serde_json::Error>>;
    /// Every event type of this aggregate with its payload type.
    fn visit_payloads(visitor: &mut impl PayloadVisitor);
}

/// An event-sourced aggregate: its state folds from its own stream (`apply`), and
/// `handle` turns a command into new events (or refuses it). `app::stage` is the one
/// place that loads a stream, handles, appends with the expected version and projects;
/// projections find an aggregate's events by its category.
pub trait Aggregate: Default {
    type Event: DomainEvent;
    type Command: Clone;
    /// Streams are named `<CATEGORY>-<id>`.
    const CATEGORY: &'static str;
    /// What an `<id>` of a stream name looks like (a regular expression, unanchored).
    const ID_PATTERN: &'static str;
    fn apply(&mut self, event: &Self::Event);
    fn handle(&self, command: Self::Command) -> Result<Vec<Self::Event>, DomainError>;
    fn stream(id: impl std::fmt::Display) -> String {
        format!("{}-{id}", Self::CATEGORY)
    }
}

/// Implements [`Aggregate`] for a type with inherent `apply` and `decide`.
macro_rules! aggregate {
    ($state:ty, $event:ty, $command:ty, $category:literal, $id_pattern:expr) => {
        impl $crate::domain::Aggregate for $state {
            type Event = $event;
            type Command = $command;
            const CATEGORY: &'static str = $category;
            const ID_PATTERN: &'static str = $id_pattern;
            fn apply(&mut self, event: &$event) {
                <$state>::apply(self, event)
            }
            fn handle(&self, command: $command) -> Result<Vec<$event>, DomainError> {
                <$state>::decide(self, command)
            }
        }
    };
}

const UUID_PATTERN: &str = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}";
aggregate!(session::Session, session::SessionEvent, session::SessionCommand, "session", "[1-9][0-9]*");
aggregate!(asset::Asset, asset::AssetEvent, asset::AssetCommand, "asset", UUID_PATTERN);
aggregate!(job::Job, job::JobEvent, job::JobCommand, "job", UUID_PATTERN);
aggregate!(upload::Upload, upload::UploadEvent, upload::UploadCommand, "upload", UUID_PATTERN);
aggregate!(archive::Archive, archive::ArchiveEvent, archive::ArchiveCommand, "archive", UUID_PATTERN);

/// Visits every aggregate: what must cover them all (the contract's event schemas)
/// takes them from here, so a new aggregate is one line here.
pub trait AggregateVisitor {
    fn visit<A: Aggregate>(&mut self);
}

pub fn visit_aggregates(visitor: &mut impl AggregateVisitor) {
    visitor.visit::<session::Session>();
    visitor.visit::<asset::Asset>();
    visitor.visit::<job::Job>();
    visitor.visit::<upload::Upload>();
    visitor.visit::<archive::Archive>();
}

/// Visits the payload type of each event type of an aggregate (for the JSON Schemas
/// of the contract files).
pub trait PayloadVisitor {
    fn visit<Payload: schemars::JsonSchema>(&mut self, event_type: &'static str);
}

/// Implements [`DomainEvent`] for an enum whose variants each wrap one payload struct,
/// with the variant name as the event type.
macro_rules! domain_events {
    ($enum:ident { $($variant:ident($payload:ty)),+ $(,)? }) => {
        #[derive(Debug, Clone, PartialEq)]
        pub enum $enum { $($variant($payload)),+ }

        impl $crate::domain::DomainEvent for $enum {
            fn event_type(&self) -> &'static str {
                match self { $(Self::$variant(_) => stringify!($variant)),+ }
            }
            fn to_data(&self) -> serde_json::Value {
                match self {
                    $(Self::$variant(payload) => serde_json::to_value(payload)
                        .expect("event payloads are plain data and always serialise")),+
                }
            }
            fn visit_payloads(visitor: &mut impl $crate::domain::PayloadVisitor) {
                $(visitor.visit::<$payload>(stringify!($variant));)+
            }
            fn from_parts(event_type: &str, data: &serde_json::Value) -> Option<Result<Self, serde_json::Error>> {
                match event_type {
                    $(stringify!($variant) => Some(<$payload as serde::Deserialize>::deserialize(data).map(Self::$variant)),)+
                    _ => None,
                }
            }
        }
    };
}
pub(crate) use domain_events;
