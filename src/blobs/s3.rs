//! The S3-compatible backend (AWS S3, MinIO, Ceph RGW, Garage, R2…) through the
//! `object_store` crate: `ASSETD_BLOBS=s3://bucket/prefix`, with the endpoint, region and
//! credentials from the standard `AWS_*` variables as `object_store` reads them.
//!
//! An upload is received as with the local backend (hashed, its memory bounded by the
//! shared budget) into a staging file under `<data_dir>/tmp` (not fsynced: the bucket
//! makes it durable), and each full part is read back (from the page cache) and sent as
//! a part of a multipart upload while the next one arrives: at most
//! `ASSETD_S3_PARTS_IN_FLIGHT` parts of one upload, and `ASSETD_S3_PARTS_IN_MEMORY`
//! part-sized buffers of all uploads (a blob smaller than a part, sent in one PUT, takes
//! one too), are in memory at once. The object becomes visible only when the upload is
//! completed; a writer dropped before that aborts its multipart upload (in the
//! background, waited for at shutdown), so a failed or cancelled upload leaves nothing
//! billed behind. Only a process killed outright leaves one open: the bucket's lifecycle
//! rule for incomplete multipart uploads is what removes those.

use std::collections::VecDeque;
use std::io;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as ObjectPath;
use object_store::signer::Signer;
use object_store::{
    BackoffConfig, ClientConfigKey, GetOptions, GetRange, MultipartUpload, ObjectStore, ObjectStoreExt, PutMode,
    PutOptions, PutPayload, RetryConfig,
};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use super::local::{LocalBackend, LocalWriter};
use super::{
    invalid_key, is_valid_key, BackendKind, BackendUnavailable, BlobBackend, BlobLocation, BlobRead, BlobStat,
    BlobWrite, DeliveryHint, PlaceSealed, SealedBlob, StoredBlob, TempBlob,
};
pub use crate::config::S3Settings;

/// S3's smallest part (but the last).
const MIN_PART_SIZE: usize = 5 << 20;
/// S3's largest part.
const MAX_PART_SIZE: usize = 5 << 30;

#[derive(Debug)]
pub struct S3Backend {
    inner: Arc<S3Inner>,
}

#[derive(Debug)]
struct S3Inner {
    /// Writes and metadata: requests that must end within two minutes (a part of up to
    /// the part size, a completion, a stat).
    store: AmazonS3,
    /// Downloads: a GET streams at the pace of the client that downloads it, so its
    /// request timeout is long.
    reader: AmazonS3,
    /// The prefix every key goes under (no slashes at either end), or empty.
    prefix: String,
    /// Where uploads are staged (its temporary files, its memory budget).
    staging: Arc<LocalBackend>,
    part_size: usize,
    parts_in_flight: usize,
    /// One permit per part held in memory, across all uploads.
    part_memory: Arc<Semaphore>,
    presigned: Option<Duration>,
    /// Aborts of multipart uploads running in the background (see [`abort_later`]),
    /// waited for at shutdown ([`S3Backend::finish_aborts`]).
    aborts: tokio_util::task::TaskTracker,
}

impl S3Inner {
    fn path(&self, key: &str) -> io::Result<ObjectPath> {
        if !is_valid_key(key) {
            return Err(invalid_key(key));
        }
        Ok(ObjectPath::from(if self.prefix.is_empty() { key.to_owned() } else { format!("{}/{key}", self.prefix) }))
    }

    /// The key of an object path below the prefix, if it is a blob's.
    fn key_of(&self, path: &ObjectPath) -> Option<String> {
        let path = path.as_ref();
        let key = if self.prefix.is_empty() { path } else { path.strip_prefix(&self.prefix)?.strip_prefix('/')? };
        is_valid_key(key).then(|| key.to_owned())
    }
}

/// An `object_store` error as an I/O error: a missing object (not bucket) is `NotFound`, an existing
/// one `AlreadyExists`; refused credentials or an unsupported request are faults of the
/// deployment (500, logged); anything else (unreachable, timed out, 5xx after retries)
/// is the store being out of reach ([`BackendUnavailable`]: 503, try again).
fn s3_error(error: object_store::Error) -> io::Error {
    use object_store::Error as E;
    match error {
        // A missing bucket is the deployment's store gone, not a missing blob.
        E::NotFound { .. } if error.to_string().contains("NoSuchBucket") => {
            io::Error::other(BackendUnavailable(error.to_string()))
        }
        E::NotFound { .. } => io::Error::new(io::ErrorKind::NotFound, error.to_string()),
        E::AlreadyExists { .. } | E::Precondition { .. } => {
            io::Error::new(io::ErrorKind::AlreadyExists, error.to_string())
        }
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => {
            io::Error::new(io::ErrorKind::PermissionDenied, error.to_string())
        }
        E::NotImplemented { .. } | E::NotSupported { .. } | E::InvalidPath { .. } => {
            io::Error::other(error.to_string())
        }
        other => io::Error::other(BackendUnavailable(other.to_string())),
    }
}

/// S3's most parts in one multipart upload.
const MAX_PARTS: u64 = 10_000;
/// S3's longest presigned URL lifetime (a week).
const MAX_PRESIGNED_SECONDS: u64 = 7 * 24 * 3600;

impl S3Backend {
    /// Opens the bucket of `url` (`s3://bucket[/prefix]`), which must exist: a listing of
    /// the prefix is tried now, so that a wrong bucket or endpoint stops `serve` at once.
    pub async fn open(
        url: &str,
        settings: &S3Settings,
        staging: Arc<LocalBackend>,
        max_blob_size: u64,
    ) -> anyhow::Result<Self> {
        let (bucket, prefix) = parse_s3_url(url)?;
        anyhow::ensure!(
            (MIN_PART_SIZE..=MAX_PART_SIZE).contains(&settings.part_size),
            "ASSETD_S3_PART_SIZE must be between 5 MiB and 5 GiB (S3's limits), not {}",
            settings.part_size
        );
        anyhow::ensure!(
            max_blob_size.div_ceil(settings.part_size as u64) <= MAX_PARTS,
            "ASSETD_S3_PART_SIZE {} is too small for uploads of up to {max_blob_size} bytes \
             (ASSETD_MAX_UPLOAD_SIZE): S3 takes at most {MAX_PARTS} parts",
            settings.part_size
        );
        anyhow::ensure!(
            settings.presigned_seconds <= MAX_PRESIGNED_SECONDS,
            "ASSETD_S3_PRESIGNED_SECONDS must be at most {MAX_PRESIGNED_SECONDS} (a week, S3's limit)"
        );
        let store = build_store(&bucket, &settings.aws_overrides, "120s")?;
        let reader = build_store(&bucket, &settings.aws_overrides, "24h")?;
        let inner = S3Inner {
            store,
            reader,
            prefix,
            staging,
            part_size: settings.part_size,
            parts_in_flight: settings.parts_in_flight.max(1),
            part_memory: Arc::new(Semaphore::new(settings.parts_in_memory.max(1))),
            presigned: (settings.presigned_seconds > 0).then(|| Duration::from_secs(settings.presigned_seconds)),
            aborts: tokio_util::task::TaskTracker::new(),
        };
        let prefix_path = (!inner.prefix.is_empty()).then(|| ObjectPath::from(inner.prefix.as_str()));
        inner.store.list_with_delimiter(prefix_path.as_ref()).await.map_err(|e| {
            anyhow::Error::new(e).context(format!(
                "the S3 bucket {bucket} cannot be listed: is the endpoint reachable, and does the bucket exist?"
            ))
        })?;
        Ok(Self { inner: Arc::new(inner) })
    }

    /// Waits (at most `timeout`) for the multipart uploads being aborted in the
    /// background, so that a stopping process leaves none open.
    pub async fn finish_aborts(&self, timeout: Duration) {
        self.inner.aborts.close();
        if tokio::time::timeout(timeout, self.inner.aborts.wait()).await.is_err() {
            tracing::warn!("some multipart uploads could not be aborted before stopping");
        }
    }

    /// Whether the bucket answers (for `/ready`).
    pub async fn ready(&self) -> bool {
        let prefix = (!self.inner.prefix.is_empty()).then(|| ObjectPath::from(self.inner.prefix.as_str()));
        let check = self.inner.store.list_with_delimiter(prefix.as_ref());
        matches!(tokio::time::timeout(Duration::from_secs(2), check).await, Ok(Ok(_)))
    }
}

/// A client of `bucket` configured from the `AWS_*` environment, then `overrides`
/// (`object_store` config keys such as `aws_endpoint`), with `timeout` for each whole
/// request and 5 s to connect.
fn build_store(bucket: &str, overrides: &[(String, String)], timeout: &str) -> anyhow::Result<AmazonS3> {
    let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
    for (key, value) in overrides {
        let key: AmazonS3ConfigKey = key.parse().map_err(|e| anyhow::anyhow!("unknown S3 setting {key}: {e}"))?;
        builder = builder.with_config(key, value);
    }
    // Set whatever the environment says: object_store's own default (30 s for a whole
    // request) would cut off every download slower than its size in 30 s.
    builder = builder
        .with_config(AmazonS3ConfigKey::Client(ClientConfigKey::Timeout), timeout)
        .with_config(AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout), "5s");
    builder
        .with_retry(RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries: 3,
            retry_timeout: Duration::from_secs(30),
        })
        .build()
        .map_err(|e| anyhow::anyhow!("configuring the S3 bucket {bucket}: {e}"))
}

/// `s3://bucket[/prefix]` → (bucket, prefix without slashes at its ends).
fn parse_s3_url(url: &str) -> anyhow::Result<(String, String)> {
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| anyhow::anyhow!("ASSETD_BLOBS must be `local` or `s3://bucket[/prefix]`, not {url:?}"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    anyhow::ensure!(
        !bucket.is_empty() && bucket.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)),
        "ASSETD_BLOBS names no valid bucket: {url:?}"
    );
    let prefix = prefix.trim_matches('/');
    // Plain characters only: the prefix is compared with the object paths listed back.
    let plain = |part: &str| {
        !part.is_empty()
            && part != "."
            && part != ".."
            && part.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
    };
    anyhow::ensure!(
        prefix.is_empty() || prefix.split('/').all(plain),
        "ASSETD_BLOBS has an invalid prefix (letters, digits, '-', '.', '_' between slashes): {url:?}"
    );
    Ok((bucket.to_owned(), prefix.to_owned()))
}

#[async_trait]
impl BlobBackend for S3Backend {
    fn kind(&self) -> BackendKind {
        BackendKind::S3
    }

    fn create_writer(&self, key: String) -> TempBlob {
        Box::new(S3Writer {
            inner: self.inner.clone(),
            staging: self.inner.staging.writer(None),
            key,
            upload: Upload::None,
            parts: VecDeque::new(),
            sent: 0,
        })
    }

    async fn read(&self, key: &str, range: Range<u64>) -> io::Result<BlobRead> {
        let path = self.inner.path(key)?;
        if range.is_empty() {
            // No empty range exists in HTTP: check the object is there, send nothing.
            self.inner.store.head(&path).await.map_err(s3_error)?;
            return Ok(futures::stream::empty().boxed());
        }
        let options = GetOptions { range: Some(GetRange::Bounded(range)), ..Default::default() };
        let result = self.inner.reader.get_opts(&path, options).await.map_err(s3_error)?;
        Ok(result.into_stream().map_err(s3_error).boxed())
    }

    async fn stat(&self, key: &str) -> io::Result<Option<BlobStat>> {
        let path = self.inner.path(key)?;
        match self.inner.store.head(&path).await {
            Ok(meta) => {
                Ok(Some(BlobStat { key: key.to_owned(), size: meta.size, modified: meta.last_modified.into() }))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(error) => Err(s3_error(error)),
        }
    }

    async fn remove(&self, key: &str) -> io::Result<()> {
        let path = self.inner.path(key)?;
        match self.inner.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(error) => Err(s3_error(error)),
        }
    }

    fn list(&self) -> BoxStream<'static, io::Result<BlobStat>> {
        let inner = self.inner.clone();
        let prefix = (!inner.prefix.is_empty()).then(|| ObjectPath::from(inner.prefix.as_str()));
        inner
            .store
            .list(prefix.as_ref())
            .map_err(s3_error)
            .try_filter_map(move |meta| {
                let key = inner.key_of(&meta.location);
                async move { Ok(key.map(|key| BlobStat { key, size: meta.size, modified: meta.last_modified.into() })) }
            })
            .boxed()
    }

    async fn delivery_hint(&self, key: &str) -> io::Result<DeliveryHint> {
        let Some(lifetime) = self.inner.presigned else { return Ok(DeliveryHint::Stream) };
        let path = self.inner.path(key)?;
        let url = self.inner.store.signed_url(hyper1::Method::GET, &path, lifetime).await.map_err(s3_error)?;
        Ok(DeliveryHint::Redirect(url.to_string()))
    }
}

/// An S3 upload in progress: staged locally, sent a part at a time.
struct S3Writer {
    inner: Arc<S3Inner>,
    staging: LocalWriter,
    key: String,
    upload: Upload,
    /// Parts being sent, oldest first; each holds a permit of `part_memory`.
    parts: VecDeque<JoinHandle<object_store::Result<()>>>,
    /// Bytes handed to parts so far.
    sent: u64,
}

/// The writer's multipart upload.
enum Upload {
    /// None yet: no full part was sent.
    None,
    /// Being created, in a task of its own: a writer dropped meanwhile still learns its
    /// id (and aborts it) rather than leave it open.
    Creating(JoinHandle<object_store::Result<Box<dyn MultipartUpload>>>),
    Created(Box<dyn MultipartUpload>),
}

/// How the bytes of a finished write go up.
enum Finished {
    /// A blob smaller than a part: one PUT, with the memory it holds (a part's permit, or
    /// the upload budget's share of the few bytes that never left memory).
    Single(PutPayload, #[allow(dead_code)] Held),
    /// Every part sent: complete the upload.
    Multipart(Box<dyn MultipartUpload>),
}

/// Memory a finished small blob holds until it is sent; released when dropped.
enum Held {
    Part(#[allow(dead_code)] tokio::sync::OwnedSemaphorePermit),
    Budget(#[allow(dead_code)] super::local::HeldBuffer),
}

impl S3Writer {
    fn part_size(&self) -> u64 {
        self.inner.part_size as u64
    }

    /// Sends the next `len` staged bytes as a part, after the oldest parts in flight are
    /// done if this upload has its share out, and once memory for it is free (held by
    /// other uploads' parts, which finish on their own: no wait can close a cycle).
    async fn send_part(&mut self, len: usize) -> io::Result<()> {
        while self.parts.len() >= self.inner.parts_in_flight {
            self.finish_oldest_part().await?;
        }
        let permit = self.inner.part_memory.clone().acquire_owned().await.map_err(io::Error::other)?;
        let bytes = self.staging.read_flushed(self.sent, len).await?;
        let upload = self.created_upload().await?;
        let part = upload.put_part(PutPayload::from(bytes));
        self.parts.push_back(tokio::spawn(async move {
            let sent = part.await;
            drop(permit);
            sent
        }));
        self.sent += len as u64;
        Ok(())
    }

    /// The multipart upload, created (in a task of its own) on first use.
    async fn created_upload(&mut self) -> io::Result<&mut Box<dyn MultipartUpload>> {
        if matches!(self.upload, Upload::None) {
            let (store, path) = (self.inner.store.clone(), self.inner.path(&self.key)?);
            self.upload = Upload::Creating(tokio::spawn(async move { store.put_multipart(&path).await }));
        }
        if let Upload::Creating(creating) = &mut self.upload {
            let created = creating.await.map_err(io::Error::other);
            self.upload = Upload::None;
            self.upload = Upload::Created(created?.map_err(s3_error)?);
        }
        match &mut self.upload {
            Upload::Created(upload) => Ok(upload),
            _ => unreachable!("created above"),
        }
    }

    /// Waits for the oldest part in flight. It stays in `parts` until it has finished,
    /// so that a writer dropped meanwhile aborts it.
    async fn finish_oldest_part(&mut self) -> io::Result<()> {
        let Some(part) = self.parts.front_mut() else { return Ok(()) };
        let sent = part.await;
        self.parts.pop_front();
        sent.map_err(io::Error::other)?.map_err(s3_error)
    }

    /// Everything received is hashed and sent (or, for a small blob, ready to PUT).
    async fn finish(&mut self) -> io::Result<(u64, crate::domain::names::Sha256Hex, Finished)> {
        let size = self.staging.size();
        if matches!(self.upload, Upload::None) && self.staging.in_memory_only() {
            let (held, sha256) = self.staging.take_in_memory();
            let payload = held.chunks().iter().cloned().collect();
            return Ok((size, sha256, Finished::Single(payload, Held::Budget(held))));
        }
        self.staging.flush().await?;
        let sha256 = self.staging.flushed_sha256();
        if matches!(self.upload, Upload::None) {
            let permit = self.inner.part_memory.clone().acquire_owned().await.map_err(io::Error::other)?;
            let bytes = self.staging.read_flushed(0, size as usize).await?;
            return Ok((size, sha256, Finished::Single(PutPayload::from(bytes), Held::Part(permit))));
        }
        let rest = size - self.sent;
        if rest > 0 {
            self.send_part(rest as usize).await?;
        }
        while !self.parts.is_empty() {
            self.finish_oldest_part().await?;
        }
        match std::mem::replace(&mut self.upload, Upload::None) {
            Upload::Created(upload) => Ok((size, sha256, Finished::Multipart(upload))),
            _ => unreachable!("parts were sent"),
        }
    }

    fn location(&self) -> BlobLocation {
        BlobLocation { backend: BackendKind::S3, key: self.key.clone() }
    }
}

#[async_trait]
impl BlobWrite for S3Writer {
    async fn write(&mut self, chunk: Bytes) -> io::Result<()> {
        self.staging.write(chunk).await?;
        if self.staging.size() - self.sent >= self.part_size() {
            self.staging.flush().await?;
            while self.staging.flushed() - self.sent >= self.part_size() {
                self.send_part(self.inner.part_size).await?;
            }
        }
        Ok(())
    }

    async fn write_held(&mut self) -> io::Result<()> {
        self.staging.write_held().await
    }

    fn size(&self) -> u64 {
        self.staging.size()
    }

    /// Never replaces an object: a single PUT is conditional (`If-None-Match: *`); before
    /// a multipart upload is completed, the key is checked to be free (object_store has
    /// no conditional completion; keys are fresh uuids, so this guards only a bug).
    async fn persist(mut self: Box<Self>) -> io::Result<StoredBlob> {
        let path = self.inner.path(&self.key)?;
        let (size, sha256, finished) = self.finish().await?;
        match finished {
            Finished::Single(payload, held) => {
                let options = PutOptions { mode: PutMode::Create, ..Default::default() };
                self.inner.store.put_opts(&path, payload, options).await.map_err(s3_error)?;
                drop(held);
            }
            Finished::Multipart(mut upload) => {
                let exists = match self.inner.store.head(&path).await {
                    Ok(_) => Some(io::Error::new(io::ErrorKind::AlreadyExists, format!("{path} exists"))),
                    Err(object_store::Error::NotFound { .. }) => None,
                    Err(error) => Some(s3_error(error)),
                };
                if let Some(error) = exists {
                    self.abort_later(upload);
                    return Err(error);
                }
                if let Err(error) = upload.complete().await {
                    self.abort_later(upload);
                    return Err(s3_error(error));
                }
            }
        }
        Ok(StoredBlob { size, sha256, location: self.location() })
    }

    async fn seal(mut self: Box<Self>) -> io::Result<SealedBlob> {
        let (size, sha256, finished) = self.finish().await?;
        let placement = S3Sealed { inner: self.inner.clone(), key: self.key.clone(), finished: Some(finished) };
        Ok(SealedBlob::new(size, sha256, self.location(), Box::new(placement)))
    }
}

impl S3Writer {
    fn abort_later(&self, upload: Box<dyn MultipartUpload>) {
        abort_later(&self.inner, upload);
    }
}

impl Drop for S3Writer {
    fn drop(&mut self) {
        let parts: Vec<_> = self.parts.drain(..).collect();
        for part in &parts {
            part.abort();
        }
        let upload = std::mem::replace(&mut self.upload, Upload::None);
        let inner = self.inner.clone();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        // The parts are stopped first: one still being sent could outlive the abort.
        inner.aborts.clone().spawn_on(
            async move {
                for part in parts {
                    let _ = part.await;
                }
                let upload = match upload {
                    Upload::None => return,
                    Upload::Creating(creating) => match creating.await {
                        Ok(Ok(upload)) => upload,
                        _ => return,
                    },
                    Upload::Created(upload) => upload,
                };
                abort_now(upload).await;
            },
            &runtime,
        );
    }
}

/// Aborts a multipart upload in the background (drop cannot await), tracked so that a
/// stopping process waits for it. Without a runtime (the process is ending), the bucket's
/// lifecycle rule for incomplete uploads is what removes it.
fn abort_later(inner: &S3Inner, upload: Box<dyn MultipartUpload>) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        inner.aborts.spawn_on(abort_now(upload), &runtime);
    }
}

/// Aborts, and tries again for about a minute while the bucket is out of reach (an
/// outage is what failed many uploads at once).
async fn abort_now(mut upload: Box<dyn MultipartUpload>) {
    let mut delay = Duration::from_secs(1);
    loop {
        match upload.abort().await {
            Ok(()) => return,
            Err(error) if delay > Duration::from_secs(32) => {
                tracing::warn!(%error, "could not abort a multipart upload; the bucket's lifecycle rule will remove it");
                return;
            }
            Err(_) => {
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    }
}

/// An S3 blob whose parts are all uploaded (or, small, whose bytes are in memory), not
/// yet completed: invisible until placed. Dropped, its multipart upload is aborted.
struct S3Sealed {
    inner: Arc<S3Inner>,
    key: String,
    finished: Option<Finished>,
}

#[async_trait]
impl PlaceSealed for S3Sealed {
    async fn place(mut self: Box<Self>) -> io::Result<()> {
        let path = self.inner.path(&self.key)?;
        match self.finished.take().expect("placed once") {
            Finished::Single(payload, held) => {
                self.inner.store.put(&path, payload).await.map_err(s3_error)?;
                drop(held);
            }
            Finished::Multipart(mut upload) => {
                if let Err(error) = upload.complete().await {
                    abort_later(&self.inner, upload);
                    return Err(s3_error(error));
                }
            }
        }
        Ok(())
    }
}

impl Drop for S3Sealed {
    fn drop(&mut self) {
        if let Some(Finished::Multipart(upload)) = self.finished.take() {
            abort_later(&self.inner, upload);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_urls_name_a_bucket_and_an_optional_prefix() {
        assert_eq!(parse_s3_url("s3://b").unwrap(), ("b".into(), "".into()));
        assert_eq!(parse_s3_url("s3://b/").unwrap(), ("b".into(), "".into()));
        assert_eq!(parse_s3_url("s3://my-bucket/a/b/").unwrap(), ("my-bucket".into(), "a/b".into()));
        for bad in ["", "local2", "s3://", "s3:///x", "s3://b/a//c", "s3://b/../c", "http://b/c", "s3://b c/x"] {
            assert!(parse_s3_url(bad).is_err(), "{bad:?}");
        }
    }
}
