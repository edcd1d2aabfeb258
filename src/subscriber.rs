//! Reading the global log as the single leader, from a named checkpoint: what the
//! outbox relay and the job scheduler share (and any later subscriber will).
//!
//! A subscriber leads while it holds a session-level advisory lock on a connection of
//! its own; when the holder dies its connection closes, the lock is released, and
//! another process's subscriber of the same name takes over. It reads the log after
//! its checkpoint in commit order (see `eventstore::read_all`), hands each batch to its
//! [`LogHandler`], and only then advances the checkpoint: whatever fails, the next term
//! starts from the checkpoint again, so events are handled at least once, in order,
//! never skipped.
//!
//! At shutdown (`flush` cancelled) it handles what is committed, so that the last
//! requests' events do not wait for the next start, then returns.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::app::ComponentState;
use crate::config::DatabaseConfig;
use crate::eventstore::{self, GlobalPosition, RecordedEvent};

/// Events handled per pass (one batch, then one checkpoint write).
const BATCH: i64 = 500;
/// The first wait after a pass that found events (it doubles up to `idle_poll`).
const FIRST_IDLE_WAIT: Duration = Duration::from_millis(10);

/// Which subscriber: its checkpoint's name and the advisory lock only its leader holds.
#[derive(Clone, Debug)]
pub struct Subscription {
    pub checkpoint: &'static str,
    pub leader_lock: i64,
    pub database_url: String,
    /// The longest wait when there is nothing new (shorter right after events).
    pub idle_poll: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum SubscriberError {
    #[error("database: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("event store: {0}")]
    EventStore(#[from] eventstore::EventStoreError),
    #[error("{0}")]
    Handler(String),
}

/// A batch handled up to a point: `handled` events were, then `error`.
pub struct PartlyHandled {
    pub handled: usize,
    pub error: SubscriberError,
}

/// What a subscriber does with the log.
#[async_trait::async_trait]
pub trait LogHandler: Send {
    /// At the start of each leadership term (connect, declare what it needs).
    async fn begin_term(&mut self) -> Result<(), SubscriberError>;
    /// Handles `events`, in order. On failure, says how many were handled first.
    async fn handle(&mut self, events: &[RecordedEvent]) -> Result<(), PartlyHandled>;
    /// When there is nothing new (also a chance for periodic work); an error ends the term.
    async fn idle(&mut self) -> Result<(), SubscriberError>;
    /// Where the subscriber is (leading, standing by, reconnecting).
    fn report(&self, _state: ComponentState) {}
}

/// How a leadership term ended without failing.
enum Term {
    /// Another process leads: try again later.
    Standby,
    /// Flushing, and nothing is left (or another process leads).
    Flushed,
}

/// Runs `handler` until the task is dropped, or until `flush` is cancelled and every
/// event committed by then is handled: waits to lead, then reads; starts over (with
/// backoff) after any failure. A flush cannot finish while the handler keeps failing:
/// the caller bounds it.
pub async fn run(subscription: Subscription, mut handler: impl LogHandler, flush: CancellationToken) {
    let mut backoff = Duration::from_millis(200);
    handler.report(ComponentState::Connecting);
    loop {
        match lead(&subscription, &mut handler, &flush).await {
            Ok(Term::Standby) => backoff = Duration::from_millis(200),
            Ok(Term::Flushed) => {
                handler.report(ComponentState::Disabled);
                return;
            }
            Err(error) => {
                handler.report(ComponentState::Connecting);
                tracing::warn!(subscriber = subscription.checkpoint, %error, retry_in_ms = backoff.as_millis() as u64,
                    "subscriber stopped; starting over");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    // Nothing to flush through a handler that fails: the next leader will.
                    _ = flush.cancelled() => {
                        handler.report(ComponentState::Disabled);
                        return;
                    }
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// One leadership term.
async fn lead(
    subscription: &Subscription,
    handler: &mut impl LogHandler,
    flush: &CancellationToken,
) -> Result<Term, SubscriberError> {
    // A pool of one, for this term only: dropping it closes the connection, which is
    // what releases the lock.
    let pool = DatabaseConfig { database_url: subscription.database_url.clone(), database_pool_size: 1 }
        .pool()
        .map_err(|error| SubscriberError::Handler(error.to_string()))?;
    let client = pool.get().await.map_err(|error| SubscriberError::Handler(error.to_string()))?;
    let led: bool = client.query_one("SELECT pg_try_advisory_lock($1)", &[&subscription.leader_lock]).await?.get(0);
    if !led {
        if flush.is_cancelled() {
            return Ok(Term::Flushed); // the leader handles it
        }
        handler.report(ComponentState::Standby);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = flush.cancelled() => {}
        }
        return Ok(Term::Standby);
    }
    tracing::info!(subscriber = subscription.checkpoint, "subscriber leading");
    handler.begin_term().await?;
    handler.report(ComponentState::Up);
    // Once flushing: the last event committed when the flush began, which must be
    // handled before the subscriber stops (None: there are no events).
    let mut flush_until: Option<Option<GlobalPosition>> = None;
    // Events come in bursts: right after some, look again soon (a job queued a moment
    // ago is waiting on this), then less and less often, up to `idle_poll`.
    let mut wait = FIRST_IDLE_WAIT;
    loop {
        let handled = pass(&client, subscription.checkpoint, handler).await?;
        if flush.is_cancelled() {
            // Nothing left to read is not enough: the log holds back events committed
            // after a transaction still running (in any database of the cluster);
            // those are waited for. Events committed later (by other processes) are
            // not: the next leader handles them.
            if flush_until.is_none() {
                flush_until = Some(eventstore::last_committed(&client).await?);
            }
            let done = match flush_until.flatten() {
                None => true,
                Some(last) => checkpoint(&client, subscription.checkpoint).await? >= last,
            };
            if done {
                tracing::info!(subscriber = subscription.checkpoint, "flushed: every committed event is handled");
                return Ok(Term::Flushed);
            }
        }
        if handled > 0 {
            wait = FIRST_IDLE_WAIT;
        } else {
            handler.idle().await?;
            tokio::select! {
                _ = tokio::time::sleep(wait.min(subscription.idle_poll)) => {}
                _ = flush.cancelled(), if flush_until.is_none() => {}
            }
            wait = (wait * 2).min(subscription.idle_poll);
        }
    }
}

/// Handles the next batch after the checkpoint; returns how many events it held.
async fn pass(
    client: &deadpool_postgres::Client,
    name: &str,
    handler: &mut impl LogHandler,
) -> Result<usize, SubscriberError> {
    let after = checkpoint(client, name).await?;
    let events = eventstore::read_all(client, after, BATCH).await?;
    let Some(last) = events.last() else { return Ok(0) };
    if let Err(PartlyHandled { handled, error }) = handler.handle(&events).await {
        // What was handled before the failure is not handled again.
        if let Some(handled) = handled.checked_sub(1) {
            save_checkpoint(client, name, events[handled].global_position()).await?;
        }
        return Err(error);
    }
    save_checkpoint(client, name, last.global_position()).await?;
    Ok(events.len())
}

/// Where the subscriber `name` has got to.
pub async fn checkpoint(
    client: &impl deadpool_postgres::GenericClient,
    name: &str,
) -> Result<GlobalPosition, SubscriberError> {
    let row = client.query_opt("SELECT tx::text, position FROM checkpoints WHERE name = $1", &[&name]).await?;
    Ok(match row {
        None => GlobalPosition::START,
        Some(row) => {
            let tx: String = row.get(0);
            let tx = tx.parse().map_err(|_| SubscriberError::Handler(format!("unreadable checkpoint tx {tx}")))?;
            GlobalPosition { tx, position: row.get(1) }
        }
    })
}

async fn save_checkpoint(
    client: &deadpool_postgres::Client,
    name: &str,
    at: GlobalPosition,
) -> Result<(), SubscriberError> {
    client
        .execute(
            "INSERT INTO checkpoints (name, tx, position) VALUES ($1, $2::text::xid8, $3)
             ON CONFLICT (name) DO UPDATE SET tx = excluded.tx, position = excluded.position",
            &[&name, &at.tx.to_string(), &at.position],
        )
        .await?;
    Ok(())
}
