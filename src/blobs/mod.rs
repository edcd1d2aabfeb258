//! Byte storage behind one trait, [`BlobBackend`]: the local file system ([`local`]) or
//! an S3-compatible bucket ([`s3`]). Everything else (HTTP handlers, the recorder, jobs)
//! goes through [`BlobStore`], which writes to the configured backend and reads each
//! blob from the backend its event names ([`BlobLocation`]).
//!
//! Every backend gives the same guarantees: a writer hashes (SHA-256) as the bytes
//! stream, memory stays bounded whatever the size, and a blob becomes visible under its
//! key only once complete and durable ([`BlobWrite::persist`], which never replaces a
//! blob, or [`SealedBlob::place`], which may). A writer dropped before that leaves
//! nothing visible and cleans up after itself (temporary file removed, multipart upload
//! aborted).

pub mod local;
pub mod s3;

use std::fmt;
use std::io;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use uuid::Uuid;

pub use crate::domain::blob::{is_valid_key, key_for, BackendKind, BlobLocation};
use crate::domain::names::Sha256Hex;
pub use local::{BufferBudget, LocalBackend, UPLOAD_BUFFER_BUDGET};
pub use s3::{S3Backend, S3Settings};

fn invalid_key(key: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, format!("{key:?} is not a blob key"))
}

/// What a completed write produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBlob {
    pub size: u64,
    pub sha256: Sha256Hex,
    pub location: BlobLocation,
}

/// A blob as a listing or `stat` sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobStat {
    pub key: String,
    pub size: u64,
    pub modified: SystemTime,
}

/// The bytes of a blob (or of a range of it), as they are read.
pub type BlobRead = BoxStream<'static, io::Result<Bytes>>;

/// How a download's bytes can best leave: the backend's suggestion; the HTTP layer
/// decides with what the request and configuration allow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryHint {
    /// A file nginx can send itself (X-Accel-Redirect): the key below the `blobs/` dir.
    LocalFile(String),
    /// A presigned GET URL of the object (302).
    Redirect(String),
    /// Read it through assetd.
    Stream,
}

/// A blob being written. Dropped before `persist`/`seal`, it leaves nothing behind.
#[async_trait]
pub trait BlobWrite: Send {
    /// Takes a received chunk. May wait (bounded memory: the writer applies backpressure).
    async fn write(&mut self, chunk: Bytes) -> io::Result<()>;
    /// Writes out what is held in memory now, so that a paused client does not sit on
    /// its share of the uploads' memory budget.
    async fn write_held(&mut self) -> io::Result<()>;
    /// Bytes taken so far.
    fn size(&self) -> u64;
    /// Makes the bytes visible under the writer's key, durably, never replacing a blob
    /// already there (`AlreadyExists`).
    async fn persist(self: Box<Self>) -> io::Result<StoredBlob>;
    /// Completes, hashes and makes the bytes durable without making them visible yet:
    /// the caller checks them (their SHA-256), then decides under its own lock.
    async fn seal(self: Box<Self>) -> io::Result<SealedBlob>;
}

/// A blob being written: what `BlobStore::create_temp` hands out.
pub type TempBlob = Box<dyn BlobWrite>;

/// The backend side of a sealed blob: makes it visible, or (dropped) discards it.
#[async_trait]
pub trait PlaceSealed: Send {
    /// Makes the bytes visible under their key, durably, replacing whatever is there.
    async fn place(self: Box<Self>) -> io::Result<()>;
}

/// A blob whose bytes are complete, hashed and durable, and not yet visible. Dropping it
/// discards the bytes.
pub struct SealedBlob {
    pub size: u64,
    pub sha256: Sha256Hex,
    pub location: BlobLocation,
    inner: Box<dyn PlaceSealed>,
}

impl SealedBlob {
    pub fn new(size: u64, sha256: Sha256Hex, location: BlobLocation, inner: Box<dyn PlaceSealed>) -> Self {
        Self { size, sha256, location, inner }
    }

    /// Makes the bytes visible under their key, *replacing* whatever is there. Only for
    /// a caller that holds the right to that key (an import, under its job's lock, whose
    /// asset is not recorded yet): uploads use [`BlobWrite::persist`], which never replaces.
    pub async fn place(self) -> io::Result<StoredBlob> {
        let stored = StoredBlob { size: self.size, sha256: self.sha256, location: self.location };
        self.inner.place().await?;
        Ok(stored)
    }
}

impl fmt::Debug for SealedBlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedBlob").field("size", &self.size).field("location", &self.location).finish()
    }
}

/// One kind of byte storage. Keys are [`key_for`] a uuid.
#[async_trait]
pub trait BlobBackend: Send + Sync + fmt::Debug {
    fn kind(&self) -> BackendKind;
    /// Starts a streaming write of the blob `key`.
    fn create_writer(&self, key: String) -> TempBlob;
    /// The bytes in `range` (which the caller has checked against the blob's size).
    async fn read(&self, key: &str, range: Range<u64>) -> io::Result<BlobRead>;
    /// The blob's size and time, or `None` when there is none.
    async fn stat(&self, key: &str) -> io::Result<Option<BlobStat>>;
    /// Removes a blob; one already gone is not an error.
    async fn remove(&self, key: &str) -> io::Result<()>;
    /// Every blob, for cleanup (order unspecified).
    fn list(&self) -> BoxStream<'static, io::Result<BlobStat>>;
    /// Removes the blob `key` if it was last written at or before `cutoff` (an orphan
    /// the cleanup found); returns whether it did. Bytes placed there since the cleanup
    /// looked are newer, and stay.
    async fn remove_if_older(&self, key: &str, cutoff: SystemTime) -> io::Result<bool> {
        match self.stat(key).await? {
            Some(stat) if stat.modified <= cutoff => self.remove(key).await.map(|()| true),
            _ => Ok(false),
        }
    }
    /// How a whole download of `key` can best be delivered.
    async fn delivery_hint(&self, key: &str) -> io::Result<DeliveryHint>;
}

/// An error that means the backend is out of reach (503, retried), not that the request
/// or the blob is wrong.
#[derive(Debug, thiserror::Error)]
#[error("the blob store is unavailable: {0}")]
pub struct BackendUnavailable(pub String);

/// Whether `error` is the backend being out of reach.
pub fn is_backend_unavailable(error: &io::Error) -> bool {
    error.get_ref().is_some_and(|inner| inner.is::<BackendUnavailable>())
}

/// The blob stores of a deployment: the local one (always there: it also holds the
/// temporary files) and, when configured, an S3-compatible one. New blobs go to the
/// configured backend; a blob is read from wherever its event says it is.
#[derive(Clone, Debug)]
pub struct BlobStore {
    local: Arc<LocalBackend>,
    s3: Option<Arc<S3Backend>>,
}

impl BlobStore {
    /// A local store under `data_dir`.
    pub async fn open(data_dir: &Path) -> io::Result<Self> {
        Ok(Self { local: Arc::new(LocalBackend::open(data_dir).await?), s3: None })
    }

    /// A local store with uploads sharing `budget`.
    pub async fn open_with_budget(data_dir: &Path, budget: BufferBudget) -> io::Result<Self> {
        Ok(Self { local: Arc::new(LocalBackend::open_with_budget(data_dir, budget).await?), s3: None })
    }

    /// The store `ASSETD_BLOBS` names: `local` (the default) or `s3://bucket/prefix`.
    /// `max_blob_size`: the largest blob that will be written (S3 part counts are checked
    /// against it).
    pub async fn open_configured(
        data_dir: &Path,
        blobs: &str,
        s3: &S3Settings,
        max_blob_size: u64,
    ) -> anyhow::Result<Self> {
        let local = Arc::new(LocalBackend::open(data_dir).await?);
        let s3 = match blobs.trim() {
            "" | "local" => None,
            url => Some(Arc::new(S3Backend::open(url, s3, local.clone(), max_blob_size).await?)),
        };
        Ok(Self { local, s3 })
    }

    /// At shutdown: waits (at most `timeout`) for the multipart uploads of failed S3
    /// writes to be aborted.
    pub async fn finish(&self, timeout: std::time::Duration) {
        if let Some(s3) = &self.s3 {
            s3.finish_aborts(timeout).await;
        }
    }

    /// Removes the blob `key` from every configured backend (bytes a failed import
    /// attempt may have left, wherever the process that ran it was writing).
    pub async fn remove_everywhere(&self, key: &str) -> io::Result<()> {
        self.local.remove(key).await?;
        if let Some(s3) = &self.s3 {
            s3.remove(key).await?;
        }
        Ok(())
    }

    /// Every configured backend (the local one first).
    pub fn backends(&self) -> Vec<&dyn BlobBackend> {
        let mut backends: Vec<&dyn BlobBackend> = vec![self.local.as_ref()];
        if let Some(s3) = &self.s3 {
            backends.push(s3.as_ref());
        }
        backends
    }

    /// The backend new blobs go to.
    pub fn writer_backend(&self) -> &dyn BlobBackend {
        match &self.s3 {
            Some(s3) => s3.as_ref(),
            None => self.local.as_ref(),
        }
    }

    pub fn writer_kind(&self) -> BackendKind {
        self.writer_backend().kind()
    }

    /// The backend a recorded blob is on.
    pub fn backend(&self, kind: BackendKind) -> io::Result<&dyn BlobBackend> {
        match kind {
            BackendKind::Local => Ok(self.local.as_ref()),
            BackendKind::S3 => match &self.s3 {
                Some(s3) => Ok(s3.as_ref()),
                None => Err(io::Error::other(BackendUnavailable(
                    "the blob is on S3, and no S3 bucket is configured (ASSETD_BLOBS)".into(),
                ))),
            },
        }
    }

    /// Where the blob of `id` goes when written now.
    pub fn location_for(&self, id: Uuid) -> BlobLocation {
        BlobLocation::new(self.writer_kind(), id)
    }

    /// Starts a streaming write of the blob of `id` on the configured backend.
    pub fn create_temp(&self, id: Uuid) -> TempBlob {
        self.writer_backend().create_writer(key_for(id))
    }

    pub async fn read(&self, location: &BlobLocation, range: Range<u64>) -> io::Result<BlobRead> {
        self.backend(location.backend)?.read(&location.key, range).await
    }

    pub async fn stat(&self, location: &BlobLocation) -> io::Result<Option<BlobStat>> {
        self.backend(location.backend)?.stat(&location.key).await
    }

    /// Removes a blob; one already gone is not an error.
    pub async fn remove(&self, location: &BlobLocation) -> io::Result<()> {
        self.backend(location.backend)?.remove(&location.key).await
    }

    /// The local backend: temporary files, and blobs recorded as local.
    pub fn local(&self) -> &LocalBackend {
        &self.local
    }

    /// The memory budget uploads share.
    pub fn budget(&self) -> &BufferBudget {
        self.local.budget()
    }

    /// Whether the S3 bucket answers: `None` without one.
    pub async fn ready(&self) -> Option<bool> {
        match &self.s3 {
            Some(s3) => Some(s3.ready().await),
            None => None,
        }
    }

    /// See [`LocalBackend::remove_orphan_temp_files`].
    pub async fn remove_orphan_temp_files(&self) -> io::Result<usize> {
        self.local.remove_orphan_temp_files().await
    }
}
