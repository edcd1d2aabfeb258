//! Asset and session records kept between requests, so that a download (a range request
//! above all: a video player asks for thousands) costs no database round trip.
//!
//! Never stale: every change to an `assets` or `sessions` row notifies the channel
//! `assetd_read_models` when its transaction commits (triggers of migration 0008), and
//! each process listens on its own connection and drops what changed. While that
//! connection is down (or not yet up), nothing is cached or served from the cache, and
//! everything is dropped when it comes back. A record read from the database is cached
//! only if no notification arrived since the read began (a generation count), so a
//! change committed during the read cannot be overwritten by what the read saw. The
//! process that makes a change also drops the record itself at once, so it reads its
//! own writes without waiting for the notification.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use uuid::Uuid;

use crate::projections::read::{AssetInfo, SessionInfo};

/// The channel the triggers notify: `a:<asset uuid>`, `s:<id_session>`, or `*` (a table
/// was truncated: replay).
pub const CHANNEL: &str = "assetd_read_models";
/// Records kept of each kind.
const CAPACITY: u64 = 100_000;
/// An upper bound on how long a record is kept, whatever happens.
const TIME_TO_LIVE: Duration = Duration::from_secs(600);
/// Wait before listening again after the connection was lost.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct ReadCache {
    inner: Arc<Inner>,
}

struct Inner {
    assets: moka::sync::Cache<Uuid, AssetInfo>,
    sessions: moka::sync::Cache<i64, SessionInfo>,
    /// Counts invalidations: a read that began before one does not fill the cache.
    generation: AtomicU64,
    /// Whether the listening connection is up (notifications are seen).
    live: AtomicBool,
}

impl std::fmt::Debug for ReadCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadCache").field("live", &self.is_live()).finish()
    }
}

impl Default for ReadCache {
    fn default() -> Self {
        Self {
            inner: Arc::new(Inner {
                assets: moka::sync::Cache::builder().max_capacity(CAPACITY).time_to_live(TIME_TO_LIVE).build(),
                sessions: moka::sync::Cache::builder().max_capacity(CAPACITY).time_to_live(TIME_TO_LIVE).build(),
                generation: AtomicU64::new(0),
                live: AtomicBool::new(false),
            }),
        }
    }
}

impl ReadCache {
    pub fn is_live(&self) -> bool {
        self.inner.live.load(Ordering::SeqCst)
    }

    /// Taken before a database read whose result may be cached (see [`ReadCache::fill`]).
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::SeqCst)
    }

    pub fn asset(&self, uuid: Uuid) -> Option<AssetInfo> {
        self.is_live().then(|| self.inner.assets.get(&uuid)).flatten()
    }

    pub fn session(&self, id: i64) -> Option<SessionInfo> {
        self.is_live().then(|| self.inner.sessions.get(&id)).flatten()
    }

    /// Keeps what a read that began at `generation` found, unless something changed since.
    pub fn fill(&self, generation: u64, asset: &AssetInfo, session: Option<&SessionInfo>) {
        // Inserted first, checked after: an invalidation racing with this insert either
        // bumped the generation before the check (then the entries go again) or comes
        // after the insert (then it removes them itself).
        self.inner.assets.insert(asset.asset_uuid, asset.clone());
        if let Some(session) = session {
            self.inner.sessions.insert(session.id_session, session.clone());
        }
        if !self.is_live() || self.generation() != generation {
            self.inner.assets.invalidate(&asset.asset_uuid);
            if let Some(session) = session {
                self.inner.sessions.invalidate(&session.id_session);
            }
        }
    }

    pub fn forget_asset(&self, uuid: Uuid) {
        self.inner.generation.fetch_add(1, Ordering::SeqCst);
        self.inner.assets.invalidate(&uuid);
    }

    pub fn forget_session(&self, id: i64) {
        self.inner.generation.fetch_add(1, Ordering::SeqCst);
        self.inner.sessions.invalidate(&id);
    }

    pub fn forget_all(&self) {
        self.inner.generation.fetch_add(1, Ordering::SeqCst);
        self.inner.assets.invalidate_all();
        self.inner.sessions.invalidate_all();
    }

    /// What a notification's payload names goes.
    fn on_notification(&self, payload: &str) {
        match payload.split_once(':') {
            Some(("a", uuid)) => match uuid.parse() {
                Ok(uuid) => self.forget_asset(uuid),
                Err(_) => self.forget_all(),
            },
            Some(("s", id)) => match id.parse() {
                Ok(id) => self.forget_session(id),
                Err(_) => self.forget_all(),
            },
            _ => self.forget_all(),
        }
    }

    fn set_live(&self, live: bool) {
        // Whatever happened while not listening is unknown: start empty either way.
        self.forget_all();
        self.inner.live.store(live, Ordering::SeqCst);
    }

    /// Listens for changes on a connection of its own to `database_url`, for as long as
    /// the runtime runs; reconnects after a second when the connection is lost.
    pub fn spawn_listener(&self, database_url: String) {
        let cache = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(error) = cache.listen(&database_url).await {
                    tracing::debug!(%error, "the read cache's listening connection ended");
                }
                cache.set_live(false);
                tokio::time::sleep(RECONNECT_DELAY).await;
            }
        });
    }

    async fn listen(&self, database_url: &str) -> Result<(), tokio_postgres::Error> {
        let (client, mut connection) = tokio_postgres::connect(database_url, tokio_postgres::NoTls).await?;
        let (sender, mut notifications) = tokio::sync::mpsc::unbounded_channel();
        let driver = tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(tokio_postgres::AsyncMessage::Notification(notification)) => {
                        if sender.send(notification.payload().to_owned()).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        let listening = client.batch_execute(&format!("LISTEN {CHANNEL}")).await;
        if let Err(error) = listening {
            driver.abort();
            return Err(error);
        }
        self.set_live(true);
        // Until the connection ends (the driver drops the sender).
        while let Some(payload) = notifications.recv().await {
            self.on_notification(&payload);
        }
        self.set_live(false);
        drop(client);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asset(uuid: Uuid) -> AssetInfo {
        serde_json::from_value(serde_json::json!({
            "asset_uuid": uuid, "id_session": 1, "asset_name": "n", "asset_original_filename": "n",
            "asset_type": "application/octet-stream", "asset_file_size": 1, "asset_sha256": "00",
            "asset_datetime": "2026-01-01T00:00:00Z", "directory": "", "tags": [], "metadata": {},
            "asset_status": "available", "asset_created_at": "2026-01-01T00:00:00Z",
            "asset_creator": {"kind": "user", "uuid": uuid}, "asset_source": "upload", "asset_version": 1,
        }))
        .unwrap()
    }

    #[test]
    fn only_reads_that_no_change_overtook_are_kept_and_only_while_listening() {
        let cache = ReadCache::default();
        let uuid = Uuid::new_v4();
        cache.fill(cache.generation(), &asset(uuid), None);
        assert!(cache.asset(uuid).is_none(), "not listening: nothing is kept");

        cache.inner.live.store(true, Ordering::SeqCst);
        let began = cache.generation();
        cache.on_notification(&format!("a:{}", Uuid::new_v4()));
        cache.fill(began, &asset(uuid), None);
        assert!(cache.asset(uuid).is_none(), "a change announced during the read: not kept");

        cache.fill(cache.generation(), &asset(uuid), None);
        assert!(cache.asset(uuid).is_some());
        cache.on_notification(&format!("a:{uuid}"));
        assert!(cache.asset(uuid).is_none(), "its change drops it");

        cache.fill(cache.generation(), &asset(uuid), None);
        cache.on_notification("*");
        assert!(cache.asset(uuid).is_none(), "a truncation drops everything");
        cache.fill(cache.generation(), &asset(uuid), None);
        cache.set_live(false);
        assert!(cache.asset(uuid).is_none(), "a lost connection drops everything");
    }
}
