//! Group commit for uploads. Each upload's bytes are already durable when it gets here;
//! what is left is one event and one row. Recorded one transaction each, a burst of
//! small uploads costs Postgres seven statements and a WAL flush per file; recorded
//! together, a batch costs a handful of statements and one flush. A worker takes
//! whatever has queued up (up to [`MAX_BATCH`]) while it was committing, so a lone
//! upload waits for nobody and a burst forms batches by itself.
//!
//! The rules are the single-upload rules: the session is read under a share lock and
//! must admit the uploader, and the events come from [`Asset::handle_upload`]. An
//! upload refused by those rules is answered on its own and the rest go on. If the
//! batch's transaction fails, each upload is recorded again on its own, so one bad
//! upload cannot fail its neighbours.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot, Mutex};
use uuid::Uuid;

use super::{asset_stream, new_events, AppError, CommandContext};
use crate::domain::asset::{Asset, AssetCommand, AssetEvent, AssetUploaded};
use crate::domain::names::SessionId;
use crate::domain::principal::Principal;
use crate::domain::{Aggregate, DomainError};
use crate::eventstore;
use crate::projections::{self, read, read::AssetInfo};

/// Uploads recorded in one transaction at most.
const MAX_BATCH: usize = 64;
/// Batches in flight at once. One: the uploads that arrive while a batch commits make
/// the next batch, and bigger batches are what makes this fast (scripts/bench: 3,400
/// uploads/s with one worker, 3,000 with two, 2,300 with four). A batch never waits
/// for a session lock (see [`Locks::Skip`]), so one worker cannot be stalled by a
/// long session delete.
const WORKERS: usize = 1;

/// An upload whose bytes are durable, waiting for its event.
pub(crate) struct PendingUpload {
    pub principal: Principal,
    pub ctx: CommandContext,
    pub uploaded: AssetUploaded,
    pub reply: oneshot::Sender<Result<AssetInfo, AppError>>,
}

/// The queue in front of the workers. Cloned with the [`App`](super::App); the workers
/// stop when the last clone is dropped.
#[derive(Clone)]
pub(crate) struct UploadRecorder {
    queue: mpsc::UnboundedSender<PendingUpload>,
}

impl UploadRecorder {
    /// Starts the workers on the current runtime.
    pub fn start(pool: Pool) -> Self {
        let (queue, receiver) = mpsc::unbounded_channel();
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..WORKERS {
            tokio::spawn(work(pool.clone(), receiver.clone()));
        }
        Self { queue }
    }

    /// Records one upload (with whichever others are queued) and waits for the outcome.
    pub async fn record(
        &self,
        principal: Principal,
        ctx: CommandContext,
        uploaded: AssetUploaded,
    ) -> Result<AssetInfo, AppError> {
        let (reply, outcome) = oneshot::channel();
        let pending = PendingUpload { principal, ctx, uploaded, reply };
        self.queue.send(pending).map_err(|_| AppError::Unavailable("the upload recorder has stopped".into()))?;
        outcome.await.map_err(|_| AppError::Unavailable("the upload recorder failed".into()))?
    }
}

async fn work(pool: Pool, receiver: Arc<Mutex<mpsc::UnboundedReceiver<PendingUpload>>>) {
    loop {
        let batch = {
            let mut receiver = receiver.lock().await;
            let Some(first) = receiver.recv().await else { return };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match receiver.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            batch
        };
        record_batch(pool.clone(), batch).await;
    }
}

/// The [`in_transaction!`] macro's view of what it runs on.
struct Db<'a> {
    pool: &'a Pool,
}

/// Records a batch and answers each of its uploads. Whatever one upload carries, it can
/// fail only itself: a batch that fails in a way one upload could have caused (a
/// statement refused, a row that does not read back, even a panic) is recorded again
/// upload by upload, each in a task of its own.
async fn record_batch(pool: Pool, batch: Vec<PendingUpload>) {
    let (uploads, replies): (Vec<_>, Vec<_>) =
        batch.into_iter().map(|p| ((p.principal, p.ctx, p.uploaded), p.reply)).unzip();
    let uploads = Arc::new(uploads);
    // In a task of its own: a panic fails this attempt, never the worker.
    let together = {
        let (pool, uploads) = (pool.clone(), uploads.clone());
        tokio::spawn(async move { record_together(&Db { pool: &pool }, &uploads, Locks::Skip).await }).await
    };
    match together {
        Ok(Ok(outcomes)) => {
            for (index, (reply, outcome)) in replies.into_iter().zip(outcomes).enumerate() {
                match outcome {
                    Some(outcome) => {
                        let _ = reply.send(outcome);
                    }
                    // Its session is being changed: wait for that on its own, not here.
                    None => {
                        tokio::spawn(answer_alone(pool.clone(), uploads.clone(), index, reply));
                    }
                }
            }
        }
        Ok(Err(error)) if uploads.len() == 1 => {
            let _ = replies.into_iter().next().expect("one reply").send(Err(error));
        }
        Ok(Err(error)) if could_be_one_uploads_fault(&error) => {
            tracing::warn!(%error, uploads = uploads.len(), "recording a batch of uploads failed; recording them one by one");
            record_one_by_one(pool, uploads, replies).await;
        }
        Err(panic) => {
            tracing::error!(error = %panic, uploads = uploads.len(), "recording a batch of uploads panicked; recording them one by one");
            record_one_by_one(pool, uploads, replies).await;
        }
        // The database is unreachable, or the commit's fate unknown: the same for all,
        // at once (one by one would wait for the pool once per upload).
        Ok(Err(error)) => {
            let unknown = matches!(error, AppError::CommitOutcomeUnknown(_));
            for reply in replies {
                let _ = reply.send(Err(if unknown {
                    AppError::CommitOutcomeUnknown(error.to_string())
                } else {
                    AppError::Unavailable(error.to_string())
                }));
            }
        }
    }
}

async fn record_one_by_one(
    pool: Pool,
    uploads: Arc<Vec<Upload>>,
    replies: Vec<oneshot::Sender<Result<AssetInfo, AppError>>>,
) {
    let alone =
        replies.into_iter().enumerate().map(|(index, reply)| answer_alone(pool.clone(), uploads.clone(), index, reply));
    futures::future::join_all(alone).await;
}

/// Records `uploads[index]` on its own, in a task of its own (a panic fails only it),
/// and answers it.
async fn answer_alone(
    pool: Pool,
    uploads: Arc<Vec<Upload>>,
    index: usize,
    reply: oneshot::Sender<Result<AssetInfo, AppError>>,
) {
    let outcome = tokio::spawn(async move { record_alone(&Db { pool: &pool }, &uploads[index]).await })
        .await
        .unwrap_or_else(|panic| Err(AppError::TaskFailed(format!("recording the upload panicked: {panic}"))));
    let _ = reply.send(outcome);
}

/// Whether a failed batch may have failed because of one of its uploads (a statement
/// Postgres refused, a version conflict, a row that did not read back), so that
/// recording each alone is worth it; not when the database is unreachable.
fn could_be_one_uploads_fault(error: &AppError) -> bool {
    if error.is_database_unavailable() {
        return false;
    }
    matches!(error, AppError::Database(_) | AppError::EventStore(_) | AppError::Projection(_) | AppError::TaskFailed(_))
}

type Upload = (Principal, CommandContext, AssetUploaded);

/// Whether a batch waits for sessions that other transactions are changing.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Locks {
    /// Wait (one upload on its own).
    Wait,
    /// Leave their uploads out, answered `None`: one session delete holding its row for
    /// long must not stall every upload queued behind it.
    Skip,
}

async fn record_alone(db: &Db<'_>, upload: &Upload) -> Result<AssetInfo, AppError> {
    let mut outcomes = record_together(db, std::slice::from_ref(upload), Locks::Wait).await?;
    outcomes.pop().flatten().expect("with Locks::Wait every upload is answered")
}

/// Records `uploads` in one transaction. The outer error is the transaction's; the
/// inner ones are uploads the rules refused (nothing of theirs is written); `None` is
/// an upload left out because its session was locked (with [`Locks::Skip`] only).
async fn record_together(
    db: &Db<'_>,
    uploads: &[Upload],
    locks: Locks,
) -> Result<Vec<Option<Result<AssetInfo, AppError>>>, AppError> {
    in_transaction!(db, |tx| {
        let mut session_ids: Vec<SessionId> = uploads.iter().map(|(_, _, u)| u.id_session).collect();
        session_ids.sort_by_key(|id| id.get());
        session_ids.dedup();
        let sessions: HashMap<i64, _> = read::lock_sessions(&tx, &session_ids, locks == Locks::Skip)
            .await?
            .into_iter()
            .filter_map(|s| s.details())
            .map(|details| (details.id_session.get(), details))
            .collect();
        // Our transaction id was fixed at the first row locked; if we then waited for a
        // session's update, that update's events carry a larger id, and ours must not
        // come before them in the global log: retry in a new transaction.
        let session_streams: Vec<String> = session_ids.iter().map(|id| id.stream()).collect();
        eventstore::refuse_if_written_after_us(&tx, &session_streams).await?;
        // Per upload: None = to be written, Some(Some(answer)) = refused, Some(None) = left out.
        let mut outcomes: Vec<Option<Option<Result<AssetInfo, AppError>>>> = Vec::with_capacity(uploads.len());
        let mut streams = Vec::new();
        let mut seen = HashSet::new();
        for (principal, ctx, uploaded) in uploads {
            if locks == Locks::Skip && !sessions.contains_key(&uploaded.id_session.get()) {
                // Locked by someone else, or not registered: the lone path tells which.
                outcomes.push(Some(None));
                continue;
            }
            let events = match sessions.get(&uploaded.id_session.get()) {
                _ if !seen.insert(uploaded.asset_uuid) => Err(AppError::Domain(DomainError::Conflict(format!(
                    "asset {} already exists",
                    uploaded.asset_uuid
                )))),
                None => Err(AppError::Domain(DomainError::NotFound("session"))),
                Some(details) if !details.grants(principal) => {
                    Err(AppError::Forbidden(format!("no access to session {}", details.id_session)))
                }
                // A fresh uuid's stream: its state is the default one.
                Some(_) => Asset::default().handle(AssetCommand::Upload(uploaded.clone())).map_err(AppError::from),
            };
            match events {
                Ok(events) => {
                    streams.push((asset_stream(uploaded.asset_uuid), new_events::<AssetEvent>(ctx, &events)));
                    outcomes.push(None);
                }
                Err(refused) => outcomes.push(Some(Some(Err(refused)))),
            }
        }
        let appended: Vec<(&str, &[eventstore::NewEvent])> =
            streams.iter().map(|(stream, events)| (stream.as_str(), events.as_slice())).collect();
        let recorded = eventstore::append_to_new_streams(&tx, &appended).await?;
        // Independent rows: sent together, answered together (the driver pipelines them).
        futures::future::try_join_all(recorded.iter().map(|event| projections::apply(&tx, event))).await?;
        let written: Vec<Uuid> =
            uploads.iter().zip(&outcomes).filter(|(_, o)| o.is_none()).map(|((_, _, u), _)| u.asset_uuid).collect();
        let mut infos: HashMap<Uuid, AssetInfo> =
            read::assets(&tx, &written).await?.into_iter().map(|info| (info.asset_uuid, info)).collect();
        let mut answers = Vec::with_capacity(uploads.len());
        for ((_, _, uploaded), outcome) in uploads.iter().zip(outcomes) {
            answers.push(match outcome {
                Some(answered_or_left_out) => answered_or_left_out,
                // Not in the read model after our own insert: roll everything back.
                None => Some(Ok(infos.remove(&uploaded.asset_uuid).ok_or_else(|| {
                    AppError::TaskFailed(format!("asset {} missing from the read model", uploaded.asset_uuid))
                })?)),
            });
        }
        Ok(answers)
    })
}
