//! Group commit for uploads. Each upload's bytes are already durable when it gets here;
//! what is left is one event and one row. Recorded one transaction each, a burst of
//! small uploads costs Postgres seven statements and a WAL flush per file; recorded
//! together, a batch costs a handful of statements and one flush. A few workers take
//! whatever has queued up (up to [`MAX_BATCH`]) while the others are committing, so a
//! lone upload waits for nobody and a burst forms batches by itself.
//!
//! The rules are the single-upload rules: the session is read under a share lock and
//! must admit the uploader, and the events come from [`Asset::handle_upload`]. An
//! upload refused by those rules is answered on its own and the rest go on. If the
//! batch's transaction fails, each upload is recorded again on its own, so one bad
//! upload cannot fail its neighbours.

use std::collections::HashMap;
use std::sync::Arc;

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot, Mutex};
use uuid::Uuid;

use super::{asset_stream, new_events, AppError, CommandContext, MAX_ATTEMPTS};
use crate::domain::asset::{Asset, AssetEvent, AssetUploaded};
use crate::domain::names::SessionId;
use crate::domain::principal::Principal;
use crate::domain::DomainError;
use crate::eventstore;
use crate::projections::{self, read, read::AssetInfo};

/// Uploads recorded in one transaction at most.
const MAX_BATCH: usize = 64;
/// Transactions in flight at once: while some commit, the next batch is gathering.
const WORKERS: usize = 4;

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
        self.queue.send(pending).map_err(|_| AppError::TaskFailed("the upload recorder has stopped".into()))?;
        outcome.await.map_err(|_| AppError::TaskFailed("the upload recorder dropped an upload".into()))?
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
        record_batch(&pool, batch).await;
    }
}

/// The [`in_transaction!`] macro's view of what it runs on.
struct Db<'a> {
    pool: &'a Pool,
}

async fn record_batch(pool: &Pool, batch: Vec<PendingUpload>) {
    let db = Db { pool };
    let (uploads, replies): (Vec<_>, Vec<_>) =
        batch.into_iter().map(|p| ((p.principal, p.ctx, p.uploaded), p.reply)).unzip();
    match record_together(&db, &uploads).await {
        Ok(outcomes) => {
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(outcome);
            }
        }
        Err(AppError::CommitOutcomeUnknown(error)) => {
            for reply in replies {
                let _ = reply.send(Err(AppError::CommitOutcomeUnknown(error.clone())));
            }
        }
        Err(error) if uploads.len() == 1 => {
            let _ = replies.into_iter().next().expect("one reply").send(Err(error));
        }
        Err(error) => {
            tracing::warn!(%error, uploads = uploads.len(), "recording a batch of uploads failed; recording them one by one");
            for (upload, reply) in uploads.into_iter().zip(replies) {
                let outcome = match record_together(&db, std::slice::from_ref(&upload)).await {
                    Ok(mut outcomes) => outcomes.pop().expect("one outcome per upload"),
                    Err(error) => Err(error),
                };
                let _ = reply.send(outcome);
            }
        }
    }
}

/// Records `uploads` in one transaction. The outer error is the transaction's; the
/// inner ones are uploads the rules refused (nothing of theirs is written).
async fn record_together(
    db: &Db<'_>,
    uploads: &[(Principal, CommandContext, AssetUploaded)],
) -> Result<Vec<Result<AssetInfo, AppError>>, AppError> {
    in_transaction!(db, |tx| {
        let mut session_ids: Vec<SessionId> = uploads.iter().map(|(_, _, u)| u.id_session).collect();
        session_ids.sort_by_key(|id| id.get());
        session_ids.dedup();
        let sessions: HashMap<i64, _> = read::lock_sessions(&tx, &session_ids)
            .await?
            .into_iter()
            .filter_map(|s| s.details())
            .map(|details| (details.id_session.get(), details))
            .collect();
        let mut outcomes: Vec<Option<Result<AssetInfo, AppError>>> = Vec::with_capacity(uploads.len());
        let mut streams = Vec::new();
        for (principal, ctx, uploaded) in uploads {
            let events = match sessions.get(&uploaded.id_session.get()) {
                None => Err(AppError::Domain(DomainError::NotFound("session"))),
                Some(details) if !details.grants(principal) => {
                    Err(AppError::Forbidden(format!("no access to session {}", details.id_session)))
                }
                // A fresh uuid's stream: its state is the default one.
                Some(_) => Asset::default().handle_upload(uploaded.clone()).map_err(AppError::from),
            };
            match events {
                Ok(events) => {
                    streams.push((asset_stream(uploaded.asset_uuid), new_events::<AssetEvent>(ctx, &events)));
                    outcomes.push(None);
                }
                Err(refused) => outcomes.push(Some(Err(refused))),
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
        Ok(uploads
            .iter()
            .zip(outcomes)
            .map(|((_, _, uploaded), outcome)| {
                outcome.unwrap_or_else(|| {
                    infos.remove(&uploaded.asset_uuid).ok_or(AppError::Domain(DomainError::NotFound("asset")))
                })
            })
            .collect())
    })
}
