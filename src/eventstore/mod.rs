//! The event store on Postgres: append to a stream with an expected version, read a
//! stream, read the global log in commit order.
//!
//! Appends take a caller's transaction so projections are updated atomically with the
//! events (see `app`). The global log is read in `(tx, position)` order and only for
//! transactions older than every running one: identity positions are handed out before
//! commit, so "position > last seen" would skip an event whose transaction commits late.

use chrono::{DateTime, Utc};
use deadpool_postgres::{GenericClient, Pool};
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// What the writer believes the stream's version to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// Append whatever the current version.
    Any,
    /// The stream must have no events yet.
    NoStream,
    /// The stream's last event must have exactly this version (versions start at 1).
    Exact(i64),
}

/// An event to append.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub id: Uuid,
    pub event_type: String,
    pub data: serde_json::Value,
    pub metadata: serde_json::Value,
}

/// A position in the global log: the writing transaction, then the row position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, Deserialize)]
pub struct GlobalPosition {
    pub tx: u64,
    pub position: i64,
}

impl GlobalPosition {
    pub const START: GlobalPosition = GlobalPosition { tx: 0, position: 0 };
}

/// An event as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedEvent {
    pub position: i64,
    pub tx: u64,
    pub stream: String,
    pub version: i64,
    pub id: Uuid,
    pub event_type: String,
    pub data: serde_json::Value,
    pub metadata: serde_json::Value,
    pub recorded_at: DateTime<Utc>,
}

impl RecordedEvent {
    pub fn global_position(&self) -> GlobalPosition {
        GlobalPosition { tx: self.tx, position: self.position }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EventStoreError {
    #[error("stream {stream}: expected version {expected:?}, found {actual}")]
    Conflict { stream: String, expected: ExpectedVersion, actual: i64 },
    #[error("an event id was already appended")]
    DuplicateEventId,
    #[error("database: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("stored value out of range: {0}")]
    Corrupt(String),
}

impl EventStoreError {
    pub fn is_conflict(&self) -> bool {
        matches!(self, Self::Conflict { .. })
    }
}

// `tx` is read as text (no xid8 type in the driver) under another name: an output
// column named `tx` would be what a bare `ORDER BY tx` sorts by, as text.
const SELECT_COLUMNS: &str = "position, tx::text AS tx_text, stream, version, id, type, data, metadata, recorded_at";

fn recorded_from_row(row: &tokio_postgres::Row) -> Result<RecordedEvent, EventStoreError> {
    let tx: String = row.try_get(1)?;
    Ok(RecordedEvent {
        position: row.try_get(0)?,
        tx: tx.parse().map_err(|_| EventStoreError::Corrupt(format!("tx {tx}")))?,
        stream: row.try_get(2)?,
        version: row.try_get(3)?,
        id: row.try_get(4)?,
        event_type: row.try_get(5)?,
        data: row.try_get(6)?,
        metadata: row.try_get(7)?,
        recorded_at: row.try_get(8)?,
    })
}

/// Appends `events` to `stream` inside the caller's transaction (or any client).
/// Concurrent writers to one stream are detected by the `(stream, version)` key: the
/// loser gets [`EventStoreError::Conflict`] and its transaction must be retried.
pub async fn append(
    client: &impl GenericClient,
    stream: &str,
    expected: ExpectedVersion,
    events: &[NewEvent],
) -> Result<Vec<RecordedEvent>, EventStoreError> {
    let conflict = |actual| EventStoreError::Conflict { stream: stream.to_owned(), expected, actual };
    if expected == ExpectedVersion::NoStream {
        // A new stream (every upload) needs no look-up: the unique key catches a race.
        return append_to_new_streams(client, &[(stream, events)]).await;
    }
    // The last event, and whether its transaction id is above ours. Readers order the
    // global log by (tx, position); appending after an event with a larger tx would put
    // our event before it in that order, so we refuse and the caller retries in a new
    // (larger) transaction. This keeps the global order consistent with stream order.
    let statement = client
        .prepare_cached(
            "SELECT version, tx > pg_current_xact_id() FROM events WHERE stream = $1 ORDER BY version DESC LIMIT 1",
        )
        .await?;
    let current: i64 = match client.query_opt(&statement, &[&stream]).await? {
        None => 0,
        Some(row) if row.get::<_, bool>(1) => return Err(conflict(row.get(0))),
        Some(row) => row.get(0),
    };
    if let ExpectedVersion::Exact(v) = expected {
        if v != current {
            return Err(conflict(current));
        }
    }
    insert_events(client, &[(stream, events)], current).await
}

/// Appends the first events of several new streams (each expected to have none), in
/// one statement: a batch of uploads is one round trip.
pub async fn append_to_new_streams(
    client: &impl GenericClient,
    streams: &[(&str, &[NewEvent])],
) -> Result<Vec<RecordedEvent>, EventStoreError> {
    insert_events(client, streams, 0).await
}

/// Inserts each stream's events after version `after`. ON CONFLICT on the version key
/// only: a concurrent writer that took one of our versions makes us insert fewer rows
/// (the caller rolls back), and the transaction stays usable to report the stream's
/// actual version. A reused event id still errors.
async fn insert_events(
    client: &impl GenericClient,
    streams: &[(&str, &[NewEvent])],
    after: i64,
) -> Result<Vec<RecordedEvent>, EventStoreError> {
    let total: usize = streams.iter().map(|(_, events)| events.len()).sum();
    if total == 0 {
        return Ok(vec![]);
    }
    let mut names = Vec::with_capacity(total);
    let mut versions = Vec::with_capacity(total);
    let mut ids = Vec::with_capacity(total);
    let mut types = Vec::with_capacity(total);
    let mut data = Vec::with_capacity(total);
    let mut metadata = Vec::with_capacity(total);
    for (stream, events) in streams {
        for (offset, event) in events.iter().enumerate() {
            names.push(*stream);
            versions.push(after + 1 + offset as i64);
            ids.push(event.id);
            types.push(event.event_type.as_str());
            data.push(&event.data);
            metadata.push(&event.metadata);
        }
    }
    // WITH ORDINALITY + ORDER BY: positions follow the order given (a stream's events
    // in version order).
    let statement = format!(
        "INSERT INTO events (stream, version, id, type, data, metadata)
         SELECT s, v, i, t, d, m
         FROM unnest($1::text[], $2::bigint[], $3::uuid[], $4::text[], $5::jsonb[], $6::jsonb[]) WITH ORDINALITY
              AS x(s, v, i, t, d, m, n)
         ORDER BY n
         ON CONFLICT (stream, version) DO NOTHING
         RETURNING {SELECT_COLUMNS}"
    );
    let statement = client.prepare_cached(&statement).await?;
    let rows =
        client.query(&statement, &[&names, &versions, &ids, &types, &data, &metadata]).await.map_err(|error| {
            match error.as_db_error().and_then(|db| db.constraint()) {
                Some("events_id_key") => EventStoreError::DuplicateEventId,
                _ => EventStoreError::Database(error),
            }
        })?;
    let mut recorded = rows.iter().map(recorded_from_row).collect::<Result<Vec<_>, _>>()?;
    if recorded.len() < total {
        // Some stream was written concurrently: name the first one that lost rows.
        // (A stream named twice shows no shortfall of its own: name the first then.)
        let (stream, _) = streams
            .iter()
            .find(|(stream, events)| recorded.iter().filter(|e| e.stream == *stream).count() < events.len())
            .unwrap_or(&streams[0]);
        let statement = client.prepare_cached("SELECT coalesce(max(version), 0) FROM events WHERE stream = $1").await?;
        let actual: i64 = client.query_one(&statement, &[stream]).await?.get(0);
        let expected = if after == 0 { ExpectedVersion::NoStream } else { ExpectedVersion::Exact(after) };
        return Err(EventStoreError::Conflict { stream: (*stream).to_owned(), expected, actual });
    }
    recorded.sort_by_key(|e| e.position);
    Ok(recorded)
}

/// Refuses (with a retryable conflict) when one of `streams` holds an event from a
/// transaction newer than the caller's: the caller decided on what that event says, so
/// its own events must not come first in the global `(tx, position)` order. For a
/// command that reads streams it does not append to (an upload reads its session).
pub async fn refuse_if_written_after_us(
    client: &impl GenericClient,
    streams: &[String],
) -> Result<(), EventStoreError> {
    let statement = client
        .prepare_cached(
            "SELECT stream, max(version) FROM events WHERE stream = ANY($1) AND tx > pg_current_xact_id()
             GROUP BY stream LIMIT 1",
        )
        .await?;
    match client.query_opt(&statement, &[&streams]).await? {
        None => Ok(()),
        Some(row) => {
            Err(EventStoreError::Conflict { stream: row.get(0), expected: ExpectedVersion::Any, actual: row.get(1) })
        }
    }
}

/// Makes other writers of `stream` wait until the caller's transaction ends. Taken
/// before a command reads the stream it will append to, so concurrent commands on one
/// stream queue up instead of failing with a conflict. (Appends stay safe without it:
/// the version key still catches any writer that did not take the lock.)
pub async fn lock_stream(client: &impl GenericClient, stream: &str) -> Result<(), EventStoreError> {
    let statement = client.prepare_cached("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))").await?;
    client.execute(&statement, &[&stream]).await?;
    Ok(())
}

/// A stream's events with `version > after_version`, in order.
pub async fn read_stream(
    client: &impl GenericClient,
    stream: &str,
    after_version: i64,
) -> Result<Vec<RecordedEvent>, EventStoreError> {
    let statement = format!("SELECT {SELECT_COLUMNS} FROM events WHERE stream = $1 AND version > $2 ORDER BY version");
    let statement = client.prepare_cached(&statement).await?;
    client.query(&statement, &[&stream, &after_version]).await?.iter().map(recorded_from_row).collect()
}

/// The events recorded with `causation_id` in their metadata (what one command
/// message caused), in commit order.
pub async fn read_caused_by(
    client: &impl GenericClient,
    causation_id: &str,
) -> Result<Vec<RecordedEvent>, EventStoreError> {
    let statement = format!(
        "SELECT {SELECT_COLUMNS} FROM events WHERE metadata->>'causation_id' = $1 ORDER BY events.tx, events.position"
    );
    let statement = client.prepare_cached(&statement).await?;
    client.query(&statement, &[&causation_id]).await?.iter().map(recorded_from_row).collect()
}

/// Up to `limit` events after `after` in commit order. Only transactions that finished
/// before every transaction still running are returned, so a later call from the last
/// returned position never misses an event that commits late.
pub async fn read_all(
    client: &impl GenericClient,
    after: GlobalPosition,
    limit: i64,
) -> Result<Vec<RecordedEvent>, EventStoreError> {
    let statement = format!(
        "SELECT {SELECT_COLUMNS} FROM events
         WHERE (events.tx, events.position) > ($1::text::xid8, $2) AND tx < pg_snapshot_xmin(pg_current_snapshot())
         ORDER BY events.tx, events.position
         LIMIT $3"
    );
    let statement = client.prepare_cached(&statement).await?;
    let rows = client.query(&statement, &[&after.tx.to_string(), &after.position, &limit]).await?;
    rows.iter().map(recorded_from_row).collect()
}

/// The position of the last event committed so far (as the caller's statement sees it),
/// which a reader of the global log may not be allowed to read yet: see [`read_all`].
pub async fn last_committed(client: &impl GenericClient) -> Result<Option<GlobalPosition>, EventStoreError> {
    let row = client
        .query_opt(
            "SELECT tx::text AS tx_text, position FROM events ORDER BY events.tx DESC, events.position DESC LIMIT 1",
            &[],
        )
        .await?;
    row.map(|row| {
        let tx: String = row.get(0);
        let tx = tx.parse().map_err(|_| EventStoreError::Corrupt(format!("unreadable tx {tx}")))?;
        Ok(GlobalPosition { tx, position: row.get(1) })
    })
    .transpose()
}

/// Every event the caller's snapshot sees, in `(tx, position)` order, streamed from one
/// query (replay: a fixed set of commits inside one REPEATABLE READ transaction).
/// Without their metadata (`null`): read models are made from the payload alone, and
/// leaving it out saves a fifth of a replay.
pub async fn stream_all_in_snapshot(
    client: &tokio_postgres::Transaction<'_>,
) -> Result<impl futures::Stream<Item = Result<RecordedEvent, EventStoreError>>, EventStoreError> {
    let columns = SELECT_COLUMNS.replace("metadata", "'null'::jsonb AS metadata");
    let statement = format!("SELECT {columns} FROM events ORDER BY events.tx, events.position");
    let no_params: [&(dyn tokio_postgres::types::ToSql + Sync); 0] = [];
    let rows = client.query_raw(&statement, no_params).await?;
    Ok(rows.map_err(EventStoreError::from).and_then(|row| futures::future::ready(recorded_from_row(&row))))
}

/// The event store over a connection pool, for callers that do not need their own
/// transaction (tests, tools, readers).
#[derive(Clone)]
pub struct EventStore {
    pool: Pool,
}

impl EventStore {
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }

    pub async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> Result<Vec<RecordedEvent>, EventStoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let recorded = append(&tx, stream, expected, events).await?;
        tx.commit().await?;
        Ok(recorded)
    }

    pub async fn read_stream(&self, stream: &str, after_version: i64) -> Result<Vec<RecordedEvent>, EventStoreError> {
        read_stream(&self.pool.get().await?, stream, after_version).await
    }

    pub async fn read_all(&self, after: GlobalPosition, limit: i64) -> Result<Vec<RecordedEvent>, EventStoreError> {
        read_all(&self.pool.get().await?, after, limit).await
    }
}
