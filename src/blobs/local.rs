//! The local backend: blobs as files under `<data_dir>/blobs`, at their key
//! (`<2 hex>/<2 hex>/<uuid>`). A write goes to `<data_dir>/tmp/`, is hashed while it
//! streams, fsynced, renamed into place and its directory fsynced, so a blob that exists
//! is complete and durable. A [`LocalWriter`] that is dropped before it is persisted
//! (error, client gone, task cancelled) removes its file. The S3 backend stages its
//! uploads through the same writer (without the fsync).
//!
//! Memory: an upload keeps the chunks it received (no copy) until they are hashed and
//! written, at most one buffer gathering and one being written. A buffer starts small
//! and grows only while bytes arrive fast, and all uploads together hold at most a
//! [`BufferBudget`]: past it, an upload writes what it holds and waits, which stops it
//! reading its body (TCP then slows the client down).

use std::collections::HashSet;
use std::io::{self, IoSlice, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};
use tokio::fs;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

use super::{
    invalid_key, is_valid_key, BackendKind, BlobBackend, BlobLocation, BlobRead, BlobStat, BlobWrite, DeliveryHint,
    PlaceSealed, SealedBlob, StoredBlob, TempBlob,
};
use crate::domain::names::Sha256Hex;

/// Received bytes that all uploads of a store may hold in memory at once, waiting to be
/// hashed and written (see [`BufferBudget`]).
pub const UPLOAD_BUFFER_BUDGET: usize = 32 << 20;
/// The size a buffer starts at, and never goes below: what a slow client's upload holds.
const MIN_WRITE_BUFFER: usize = 64 << 10;
/// The largest buffer: large writes keep the blocking-pool hops rare on fast uploads.
const MAX_WRITE_BUFFER: usize = 1 << 20;
/// A buffer that fills faster than this doubles for the next one (up to the largest)...
const FAST_FILL: Duration = Duration::from_millis(100);
/// ...and one that takes longer than this halves (down to the smallest): a buffer holds
/// about a tenth of a second to a second of what arrives.
const SLOW_FILL: Duration = Duration::from_secs(1);
/// Most chunks gathered in one buffer: a client sending tiny chunks costs a bounded list
/// (and one `writev` takes them all).
const MAX_CHUNKS: usize = 256;

/// Bytes read from disk per chunk of a streamed download.
const READ_CHUNK: usize = 256 * 1024;

#[derive(Clone, Debug)]
pub struct LocalBackend {
    blobs: PathBuf,
    tmp: PathBuf,
    durable_shards: DurableShards,
    budget: BufferBudget,
}

/// Memory for received bytes not yet written, shared by every upload of a store, in
/// bytes. An upload takes its share per chunk received and gives it back once the
/// chunk is written (or dropped).
///
/// No upload can wait for memory while holding some that waits on it: one that finds
/// the budget spent first hands what it gathered to the blocking pool, whose writes
/// finish on their own and give their share back. What is still held is then held by
/// uploads that are receiving (bounded in time by the body's idle timeout) or writing.
#[derive(Clone, Debug)]
pub struct BufferBudget {
    bytes: Arc<Semaphore>,
    total: usize,
}

impl BufferBudget {
    pub fn new(total: usize) -> Self {
        let total = total.clamp(1, u32::MAX as usize);
        Self { bytes: Arc::new(Semaphore::new(total)), total }
    }

    /// Bytes not taken by any upload.
    pub fn available(&self) -> usize {
        self.bytes.available_permits()
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// A chunk larger than the whole budget takes all of it.
    fn share(&self, len: usize) -> u32 {
        len.min(self.total) as u32
    }

    fn try_take(&self, len: usize) -> Option<OwnedSemaphorePermit> {
        self.bytes.clone().try_acquire_many_owned(self.share(len)).ok()
    }

    async fn take(&self, len: usize) -> OwnedSemaphorePermit {
        self.bytes.clone().acquire_many_owned(self.share(len)).await.expect("the budget's semaphore is never closed")
    }
}

/// Shard directories (`ab/cd`) this process has made sure exist durably: created, and
/// their parents fsynced. Checked per process rather than by "did I create it", because
/// another upload (or process) may have created it a moment ago and not fsynced yet.
#[derive(Clone, Debug, Default)]
struct DurableShards(Arc<Mutex<HashSet<PathBuf>>>);

impl DurableShards {
    /// Blocking: called from the blocking pool. The outer directories exist already
    /// (see [`LocalBackend::open`]): a new shard costs one mkdir and one directory fsync.
    fn ensure(&self, shard: &Path) -> io::Result<()> {
        if self.0.lock().expect("not poisoned").contains(shard) {
            return Ok(());
        }
        std::fs::create_dir_all(shard)?;
        sync_dir(shard.parent().expect("a shard is inside an outer directory"))?;
        self.0.lock().expect("not poisoned").insert(shard.to_owned());
        Ok(())
    }
}

/// Temporary files older than this are left over from a crash and are removed at start,
/// even where the file system cannot say whether a writer still holds them.
const STALE_TEMP_AGE: Duration = Duration::from_secs(24 * 3600);
/// A temporary file no process holds and untouched for this long is an orphan (its
/// writer was killed): its writer locks it the moment it creates it, so this only has
/// to cover that moment.
const ORPHAN_TEMP_AGE: Duration = Duration::from_secs(2);

/// Creates a temporary file and takes an exclusive `flock` on it, held for as long as
/// the file is open: a sweep can then tell a live writer's file (locked) from one
/// whose writer died (the kernel drops the lock with the process).
fn create_temp_file(path: &Path) -> io::Result<std::fs::File> {
    let file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(path)?;
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall on a descriptor we own. A file system without flock
        // leaves the file unlocked; the sweep then goes by age alone.
        unsafe {
            libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB);
        }
    }
    Ok(file)
}

/// Whether the temporary file at `path` is an orphan: older than [`ORPHAN_TEMP_AGE`]
/// and locked by no one, or older than [`STALE_TEMP_AGE`] where locks do not work.
fn is_orphan_temp(path: &Path) -> bool {
    let Ok(age) = std::fs::metadata(path).and_then(|m| m.modified()).map(|m| m.elapsed().unwrap_or_default()) else {
        return false;
    };
    if age > STALE_TEMP_AGE {
        return true;
    }
    if age < ORPHAN_TEMP_AGE {
        return false;
    }
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let Ok(file) = std::fs::File::open(path) else { return false };
        // SAFETY: a plain syscall on a descriptor we own; closing it releases the lock.
        let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        locked == 0
    }
    #[cfg(not(target_os = "linux"))]
    false
}

impl LocalBackend {
    /// Opens (creating if needed) the store under `data_dir`, with uploads sharing
    /// [`UPLOAD_BUFFER_BUDGET`] bytes of memory.
    pub async fn open(data_dir: &Path) -> io::Result<Self> {
        Self::open_with_budget(data_dir, BufferBudget::new(UPLOAD_BUFFER_BUDGET)).await
    }

    /// Opens the store with uploads sharing `budget`.
    pub async fn open_with_budget(data_dir: &Path, budget: BufferBudget) -> io::Result<Self> {
        let store = Self {
            blobs: data_dir.join("blobs"),
            tmp: data_dir.join("tmp"),
            durable_shards: DurableShards::default(),
            budget,
        };
        fs::create_dir_all(&store.blobs).await?;
        fs::create_dir_all(&store.tmp).await?;
        // The 256 outer shard directories, made once and durably, so that an upload never
        // has to create (and fsync) two levels.
        let blobs = store.blobs.clone();
        tokio::task::spawn_blocking(move || {
            let mut created = false;
            for outer in 0..=255u8 {
                let dir = blobs.join(format!("{outer:02x}"));
                if !dir.is_dir() {
                    std::fs::create_dir_all(&dir)?;
                    created = true;
                }
            }
            if created {
                sync_dir(&blobs)?;
            }
            Ok::<_, io::Error>(())
        })
        .await
        .map_err(io::Error::other)??;
        store.remove_orphan_temp_files().await?;
        Ok(store)
    }

    /// Removes the temporary files of writers that died (a process killed mid-upload or
    /// mid-import): those no process holds. Another process sharing the data directory
    /// holds its own, which stay. Run at start and every minute (see `cli`). Returns how
    /// many went.
    pub async fn remove_orphan_temp_files(&self) -> io::Result<usize> {
        let tmp = self.tmp.clone();
        tokio::task::spawn_blocking(move || {
            let mut removed = 0;
            for entry in std::fs::read_dir(&tmp)? {
                let path = entry?.path();
                if is_orphan_temp(&path) && std::fs::remove_file(&path).is_ok() {
                    removed += 1;
                }
            }
            Ok(removed)
        })
        .await
        .map_err(io::Error::other)?
    }

    /// Where the blob `id` lives, whether or not it exists.
    pub fn path(&self, id: Uuid) -> PathBuf {
        self.blobs.join(super::key_for(id))
    }

    /// The file of the blob `key`, refusing anything that is not a blob key.
    pub fn path_of(&self, key: &str) -> io::Result<PathBuf> {
        if !is_valid_key(key) {
            return Err(invalid_key(key));
        }
        Ok(self.blobs.join(key))
    }

    /// Starts a streaming write of `key` (or, with none, a staging file for another
    /// backend). The temporary file is created when the bytes outgrow the first buffer,
    /// so a small upload costs a single blocking call when it is persisted.
    pub(super) fn writer(&self, key: Option<String>) -> LocalWriter {
        LocalWriter {
            key,
            temp_path: None,
            pending: Buffer::default(),
            buffer_limit: MIN_WRITE_BUFFER,
            filling_since: Instant::now(),
            state: Some(WriteState { hasher: Sha256::new(), file: None, written: 0 }),
            in_flight: None,
            size: 0,
            tmp_dir: self.tmp.clone(),
            blobs: self.blobs.clone(),
            durable_shards: self.durable_shards.clone(),
            budget: self.budget.clone(),
        }
    }

    /// The memory budget its uploads share.
    pub fn budget(&self) -> &BufferBudget {
        &self.budget
    }

    /// Files in the temporary directory (tests check that failed uploads leave none).
    pub async fn temp_file_count(&self) -> io::Result<usize> {
        let mut entries = fs::read_dir(&self.tmp).await?;
        let mut count = 0;
        while entries.next_entry().await?.is_some() {
            count += 1;
        }
        Ok(count)
    }
}

#[async_trait]
impl BlobBackend for LocalBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Local
    }

    fn create_writer(&self, key: String) -> TempBlob {
        Box::new(self.writer(Some(key)))
    }

    async fn read(&self, key: &str, range: Range<u64>) -> io::Result<BlobRead> {
        let mut file = fs::File::open(self.path_of(key)?).await?;
        if range.start > 0 {
            file.seek(io::SeekFrom::Start(range.start)).await?;
        }
        let length = range.end.saturating_sub(range.start);
        Ok(tokio_util::io::ReaderStream::with_capacity(file.take(length), READ_CHUNK).boxed())
    }

    async fn stat(&self, key: &str) -> io::Result<Option<BlobStat>> {
        match fs::metadata(self.path_of(key)?).await {
            Ok(meta) => Ok(Some(BlobStat { key: key.to_owned(), size: meta.len(), modified: meta.modified()? })),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(error),
        }
    }

    async fn remove(&self, key: &str) -> io::Result<()> {
        match fs::remove_file(self.path_of(key)?).await {
            Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
            _ => Ok(()),
        }
    }

    /// Atomically: the file is first renamed aside (whatever inode is at the key then),
    /// and only then its time is read; one placed there a moment ago (an import's retry
    /// replacing a crashed attempt's leftover) is put back, so a stat-then-remove race
    /// can never remove fresh bytes.
    async fn remove_if_older(&self, key: &str, cutoff: SystemTime) -> io::Result<bool> {
        let path = self.path_of(key)?;
        let aside = self.tmp.join(format!("{}.orphan", Uuid::new_v4()));
        tokio::task::spawn_blocking(move || {
            match std::fs::rename(&path, &aside) {
                Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(false),
                other => other?,
            }
            if std::fs::metadata(&aside)?.modified()? <= cutoff {
                std::fs::remove_file(&aside)?;
                return Ok(true);
            }
            // Back, unless something newer took the key meanwhile (then that one stays).
            match std::fs::hard_link(&aside, &path) {
                Err(error) if error.kind() != io::ErrorKind::AlreadyExists => return Err(error),
                _ => {}
            }
            std::fs::remove_file(&aside)?;
            Ok(false)
        })
        .await
        .map_err(io::Error::other)?
    }

    fn list(&self) -> BoxStream<'static, io::Result<BlobStat>> {
        // Top-level shard by top-level shard (only those that exist), each read by the
        // blocking pool: memory holds one 256th of the names. Walking only what exists
        // keeps a sparse store's listing quick (65,536 empty lookups took seconds).
        let blobs = self.blobs.clone();
        let top = blobs.clone();
        futures::stream::once(async move {
            tokio::task::spawn_blocking(move || existing_shards(&top)).await.map_err(io::Error::other)?
        })
        .map_ok(move |shards| {
            let blobs = blobs.clone();
            futures::stream::iter(shards).then(move |shard| {
                let dir = blobs.join(shard);
                async move {
                    tokio::task::spawn_blocking(move || -> io::Result<Vec<BlobStat>> {
                        let mut stats = Vec::new();
                        for sub in existing_shards(&dir)? {
                            stats.extend(list_shard(&dir.join(sub))?);
                        }
                        Ok(stats)
                    })
                    .await
                    .map_err(io::Error::other)?
                }
            })
        })
        .try_flatten()
        .map_ok(|stats| futures::stream::iter(stats.into_iter().map(Ok)))
        .try_flatten()
        .boxed()
    }

    /// A file nginx can send, once it is known to be there. The `stat` is made here on
    /// the runtime's thread, as nginx makes its own: on a local file system it answers
    /// from the dentry cache in microseconds, cheaper than a hop to the blocking pool
    /// (which, at a thousand range requests a second, costs the hop's latency on each).
    async fn delivery_hint(&self, key: &str) -> io::Result<DeliveryHint> {
        match std::fs::metadata(self.path_of(key)?) {
            Ok(_) => Ok(DeliveryHint::LocalFile(key.to_owned())),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(DeliveryHint::Stream),
            Err(error) => Err(error),
        }
    }
}

/// The shard directories (two lower-case hex digits) in `dir`, sorted; none when `dir`
/// does not exist.
fn existing_shards(dir: &Path) -> io::Result<Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error),
    };
    let mut shards = Vec::new();
    for entry in entries {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.len() == 2 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            shards.push(name);
        }
    }
    shards.sort();
    Ok(shards)
}

/// The blobs of one shard directory (none when it does not exist).
fn list_shard(dir: &Path) -> io::Result<Vec<BlobStat>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error),
    };
    let shard = dir.strip_prefix(dir.parent().and_then(Path::parent).unwrap_or(dir)).unwrap_or(dir);
    let mut stats = Vec::new();
    for entry in entries {
        let entry = entry?;
        let Ok(meta) = entry.metadata() else { continue };
        let key = format!("{}/{}", shard.display(), entry.file_name().to_string_lossy());
        if meta.is_file() && is_valid_key(&key) {
            stats.push(BlobStat { key, size: meta.len(), modified: meta.modified()? });
        }
    }
    Ok(stats)
}

/// A blob being written. Dropping it unpersisted deletes the temporary file.
///
/// Received chunks gather in a buffer (kept as they came, not copied); each full buffer
/// is hashed and written by the blocking pool while the next one fills, so receiving
/// overlaps with hashing and writing (SHA-256 alone is about as costly as the rest of a
/// large upload).
pub struct LocalWriter {
    /// The blob's key; `None` for a staging file (another backend's upload).
    key: Option<String>,
    /// The temporary file's path, chosen before the file is created so that dropping
    /// the blob at any moment (a cancelled request) removes whatever was created.
    temp_path: Option<PathBuf>,
    /// Chunks received and not yet handed over.
    pending: Buffer,
    /// How many bytes `pending` gathers before it is handed over: from
    /// [`MIN_WRITE_BUFFER`], doubling while buffers fill fast, to [`MAX_WRITE_BUFFER`].
    buffer_limit: usize,
    /// When `pending` got its first chunk.
    filling_since: Instant,
    /// What the blocking pool works with between buffers; `None` while a buffer is in
    /// flight (then it is in `in_flight`).
    state: Option<WriteState>,
    in_flight: Option<InFlight>,
    size: u64,
    tmp_dir: PathBuf,
    blobs: PathBuf,
    durable_shards: DurableShards,
    budget: BufferBudget,
}

/// A buffer being hashed and written: gives back the state. The buffer itself, and its
/// share of the budget, are dropped as soon as it is written.
type InFlight = tokio::task::JoinHandle<(io::Result<()>, WriteState)>;

/// Chunks gathered for one write, with their share of the budget.
#[derive(Default)]
struct Buffer {
    chunks: Vec<Bytes>,
    len: usize,
    share: Option<OwnedSemaphorePermit>,
}

impl Buffer {
    fn push(&mut self, chunk: Bytes, share: OwnedSemaphorePermit) {
        self.len += chunk.len();
        self.chunks.push(chunk);
        match &mut self.share {
            Some(held) => held.merge(share),
            None => self.share = Some(share),
        }
    }

    fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }
}

/// The hash of the bytes handed over so far, and the file they went to.
struct WriteState {
    hasher: Sha256,
    file: Option<Arc<std::fs::File>>,
    /// Bytes written to the file so far.
    written: u64,
}

impl WriteState {
    /// Blocking: hashes `chunks` and appends them to the file at `path` (created on first
    /// use), then asks for them to be written back.
    fn append(&mut self, path: &Path, chunks: &[Bytes]) -> io::Result<()> {
        for chunk in chunks {
            self.hasher.update(chunk);
        }
        let file = match &self.file {
            Some(file) => file.clone(),
            None => {
                let file = Arc::new(create_temp_file(path)?);
                self.file = Some(file.clone());
                file
            }
        };
        let len = write_all_chunks(&file, chunks)?;
        start_writeback(&file, self.written, len);
        self.written += len as u64;
        Ok(())
    }
}

/// The size of the next buffer, after one of `limit` bytes took `took` to fill.
fn next_buffer_limit(limit: usize, took: Duration) -> usize {
    if took < FAST_FILL {
        (limit * 2).min(MAX_WRITE_BUFFER)
    } else if took > SLOW_FILL {
        (limit / 2).max(MIN_WRITE_BUFFER)
    } else {
        limit
    }
}

/// Writes every chunk, in order, with as few `writev` calls as the kernel allows.
fn write_all_chunks(file: &std::fs::File, chunks: &[Bytes]) -> io::Result<usize> {
    let mut slices: Vec<IoSlice<'_>> = chunks.iter().map(|chunk| IoSlice::new(chunk)).collect();
    let total = chunks.iter().map(Bytes::len).sum();
    let mut remaining = &mut slices[..];
    IoSlice::advance_slices(&mut remaining, 0);
    while !remaining.is_empty() {
        match (&*file).write_vectored(remaining) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut remaining, n),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(total)
}

impl LocalWriter {
    /// Takes a received chunk. Waits while the uploads' memory budget is spent, after
    /// handing over what this one holds.
    pub async fn write(&mut self, chunk: Bytes) -> io::Result<()> {
        if chunk.is_empty() {
            return Ok(());
        }
        self.size += chunk.len() as u64;
        if !self.pending.is_empty() {
            if self.pending.len + chunk.len() > self.buffer_limit {
                self.adapt_buffer_limit();
                self.hand_over_pending().await?;
            } else if self.pending.chunks.len() >= MAX_CHUNKS {
                self.hand_over_pending().await?;
            }
        }
        let share = match self.budget.try_take(chunk.len()) {
            Some(share) => share,
            None => {
                if !self.pending.is_empty() {
                    self.hand_over_pending().await?;
                }
                self.budget.take(chunk.len()).await
            }
        };
        if self.pending.is_empty() {
            self.filling_since = Instant::now();
        }
        self.pending.push(chunk, share);
        Ok(())
    }

    /// Hands what this upload holds to the blocking pool to be written now, so that its
    /// share of the budget comes back even if no more bytes arrive (a paused client).
    pub async fn write_held(&mut self) -> io::Result<()> {
        if !self.pending.is_empty() {
            self.hand_over_pending().await?;
        }
        Ok(())
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// How many bytes a buffer gathers before it is written, now.
    pub fn buffer_limit(&self) -> usize {
        self.buffer_limit
    }

    /// Bytes received and not yet handed over to be written.
    pub fn buffered(&self) -> usize {
        self.pending.len
    }

    /// Called when `pending` is full: the next buffer grows if this one filled fast, and
    /// shrinks if it filled slowly.
    fn adapt_buffer_limit(&mut self) {
        self.buffer_limit = next_buffer_limit(self.buffer_limit, self.filling_since.elapsed());
    }

    /// The temporary file's path, chosen now if it was not yet (a fresh name in `tmp/`).
    fn temp_path_chosen(&mut self) -> PathBuf {
        let tmp_dir = &self.tmp_dir;
        self.temp_path.get_or_insert_with(|| tmp_dir.join(format!("{}.part", Uuid::new_v4()))).clone()
    }

    /// Waits for the buffer in flight, if any, and takes back the state.
    async fn settle(&mut self) -> io::Result<()> {
        let Some(in_flight) = self.in_flight.take() else { return Ok(()) };
        let (result, state) = in_flight.await.map_err(io::Error::other)?;
        self.state = Some(state);
        result
    }

    /// Sends the pending chunks to the blocking pool to be hashed and written, after the
    /// previous buffer is done (one at a time: the hash is sequential).
    async fn hand_over_pending(&mut self) -> io::Result<()> {
        self.settle().await?;
        let buffer = std::mem::take(&mut self.pending);
        let path = self.temp_path_chosen();
        let mut state = self.state.take().expect("settled");
        if state.file.is_none() {
            // Created before any write goes off on its own, so that dropping this blob
            // (which unlinks the path at once) can never race with the file's creation.
            let create_path = path.clone();
            let created =
                tokio::task::spawn_blocking(move || create_temp_file(&create_path)).await.map_err(io::Error::other);
            match created {
                Ok(Ok(file)) => state.file = Some(Arc::new(file)),
                Ok(Err(error)) | Err(error) => {
                    self.state = Some(state);
                    return Err(error);
                }
            }
        }
        self.in_flight = Some(tokio::task::spawn_blocking(move || {
            let result = state.append(&path, &buffer.chunks);
            drop(buffer);
            (result, state)
        }));
        Ok(())
    }

    /// Makes the bytes durable under the writer's key: hash and write what is buffered,
    /// fsync, rename into place (never replacing), fsync the directory. A small blob does
    /// all of it in one blocking call.
    async fn persist_here(mut self) -> io::Result<StoredBlob> {
        let key = self.key.clone().ok_or_else(|| io::Error::other("a staging file has no key"))?;
        let target = self.blobs.join(&key);
        self.settle().await?;
        let mut state = self.state.take().expect("settled");
        let temp_path = self.temp_path_chosen();
        self.temp_path = None;
        let pending = std::mem::take(&mut self.pending);
        let durable_shards = self.durable_shards.clone();
        let hasher = tokio::task::spawn_blocking(move || {
            // From here the temporary file is ours to remove on any failure.
            let renamed = (|| {
                state.append(&temp_path, &pending.chunks)?;
                drop(pending);
                state.file.as_ref().expect("append creates the file").sync_all()?;
                let shard = target.parent().expect("blob paths have two shard directories");
                durable_shards.ensure(shard)?;
                rename_no_replace(&temp_path, &target)
            })();
            if let Err(error) = renamed {
                let _ = std::fs::remove_file(&temp_path);
                return Err(error);
            }
            if let Err(error) = sync_dir(target.parent().expect("blob paths have a parent")) {
                // Not known to be durable: take it back rather than let an event name it.
                let _ = std::fs::remove_file(&target);
                return Err(error);
            }
            Ok(state.hasher)
        })
        .await
        .map_err(io::Error::other)??;
        Ok(StoredBlob {
            size: self.size,
            sha256: Sha256Hex::from_digest(&hasher.finalize()),
            location: BlobLocation { backend: BackendKind::Local, key },
        })
    }

    /// Hashes and writes what is buffered and makes the temporary file durable, without
    /// giving it its key yet: the caller checks what it got (its SHA-256) and then
    /// decides, under whatever lock it needs, whether it goes there ([`SealedBlob::place`]).
    async fn seal_here(mut self) -> io::Result<SealedBlob> {
        let key = self.key.clone().ok_or_else(|| io::Error::other("a staging file has no key"))?;
        self.settle().await?;
        let mut state = self.state.take().expect("settled");
        let temp_path = self.temp_path_chosen();
        let pending = std::mem::take(&mut self.pending);
        // On failure `self` still names the file, and dropping it removes it.
        let state = tokio::task::spawn_blocking(move || {
            state.append(&temp_path, &pending.chunks)?;
            drop(pending);
            state.file.as_ref().expect("append creates the file").sync_all()?;
            Ok::<_, io::Error>(state)
        })
        .await
        .map_err(io::Error::other)??;
        let placement = LocalSealed {
            temp_path: self.temp_path.take(),
            file: state.file,
            target: self.blobs.join(&key),
            durable_shards: self.durable_shards.clone(),
        };
        Ok(SealedBlob::new(
            self.size,
            Sha256Hex::from_digest(&state.hasher.finalize()),
            BlobLocation { backend: BackendKind::Local, key },
            Box::new(placement),
        ))
    }
}

#[async_trait]
impl BlobWrite for LocalWriter {
    async fn write(&mut self, chunk: Bytes) -> io::Result<()> {
        LocalWriter::write(self, chunk).await
    }

    async fn write_held(&mut self) -> io::Result<()> {
        LocalWriter::write_held(self).await
    }

    fn size(&self) -> u64 {
        self.size
    }

    async fn persist(self: Box<Self>) -> io::Result<StoredBlob> {
        self.persist_here().await
    }

    async fn seal(self: Box<Self>) -> io::Result<SealedBlob> {
        self.seal_here().await
    }
}

/// For a backend that stages its uploads in a local file (S3): the bytes are hashed and
/// written here, and read back from the page cache a part at a time.
impl LocalWriter {
    /// Writes out everything received so far.
    pub(super) async fn flush(&mut self) -> io::Result<()> {
        self.write_held().await?;
        self.settle().await
    }

    /// Bytes written to the staging file (all of them after [`LocalWriter::flush`]).
    pub(super) fn flushed(&self) -> u64 {
        self.state.as_ref().map_or(0, |state| state.written)
    }

    /// Whether every byte is still in memory (a small blob: no file was needed).
    pub(super) fn in_memory_only(&self) -> bool {
        self.in_flight.is_none() && self.state.as_ref().is_some_and(|state| state.file.is_none())
    }

    /// A small blob's bytes and their SHA-256, taken from memory (see
    /// [`LocalWriter::in_memory_only`]).
    pub(super) fn take_in_memory(&mut self) -> (HeldBuffer, Sha256Hex) {
        let pending = std::mem::take(&mut self.pending);
        let state = self.state.as_mut().expect("nothing in flight");
        for chunk in &pending.chunks {
            state.hasher.update(chunk);
        }
        (HeldBuffer(pending), Sha256Hex::from_digest(&state.hasher.clone().finalize()))
    }

    /// The SHA-256 of everything flushed.
    pub(super) fn flushed_sha256(&self) -> Sha256Hex {
        let state = self.state.as_ref().expect("flushed");
        Sha256Hex::from_digest(&state.hasher.clone().finalize())
    }

    /// `len` flushed bytes from `offset`.
    pub(super) async fn read_flushed(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        let file = self
            .state
            .as_ref()
            .and_then(|state| state.file.clone())
            .ok_or_else(|| io::Error::other("the staging file holds nothing yet"))?;
        tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            let mut buffer = vec![0; len];
            file.read_exact_at(&mut buffer, offset)?;
            Ok(Bytes::from(buffer))
        })
        .await
        .map_err(io::Error::other)?
    }
}

/// Chunks taken from a writer with their share of the upload budget, given back when
/// this is dropped.
pub(super) struct HeldBuffer(Buffer);

impl HeldBuffer {
    pub(super) fn chunks(&self) -> &[Bytes] {
        &self.0.chunks
    }
}

/// A local blob sealed in its temporary file. Dropping it removes the file.
struct LocalSealed {
    temp_path: Option<PathBuf>,
    /// Kept open (with its lock) until placed, so no sweep takes it for an orphan.
    file: Option<Arc<std::fs::File>>,
    target: PathBuf,
    durable_shards: DurableShards,
}

#[async_trait]
impl PlaceSealed for LocalSealed {
    async fn place(mut self: Box<Self>) -> io::Result<()> {
        let temp_path = self.temp_path.take().expect("a sealed blob has its file");
        let target = self.target.clone();
        let durable_shards = self.durable_shards.clone();
        let file = self.file.take();
        tokio::task::spawn_blocking(move || {
            let shard = target.parent().expect("blob paths have two shard directories");
            let renamed = durable_shards.ensure(shard).and_then(|()| std::fs::rename(&temp_path, &target));
            drop(file);
            if let Err(error) = renamed {
                let _ = std::fs::remove_file(&temp_path);
                return Err(error);
            }
            if let Err(error) = sync_dir(shard) {
                let _ = std::fs::remove_file(&target);
                return Err(error);
            }
            Ok(())
        })
        .await
        .map_err(io::Error::other)?
    }
}

impl Drop for LocalSealed {
    fn drop(&mut self) {
        if let Some(path) = self.temp_path.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Drop for LocalWriter {
    fn drop(&mut self) {
        // Best effort and synchronous: drop can't await, and unlink is quick. A buffer
        // still in flight writes on into the unlinked file, which goes with its handle,
        // and gives its share of the budget back when done; the pending one goes now.
        if let Some(path) = self.temp_path.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Asks the kernel to start writing a just-written range to disk, without waiting: a
/// large upload's bytes then reach the disk while it streams, and `persist`'s fsync
/// waits only for the last of them rather than the whole file. A hint: errors are
/// ignored (the fsync still decides).
fn start_writeback(file: &std::fs::File, offset: u64, len: usize) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall on a descriptor we own, with no memory passed.
        unsafe {
            libc::sync_file_range(file.as_raw_fd(), offset as i64, len as i64, libc::SYNC_FILE_RANGE_WRITE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}

/// Renames `from` to `to` unless `to` exists (then `AlreadyExists`): a blob, once
/// there, is never replaced, whatever uuid a caller passes.
fn rename_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let from_c = CString::new(from.as_os_str().as_bytes()).map_err(io::Error::other)?;
        let to_c = CString::new(to.as_os_str().as_bytes()).map_err(io::Error::other)?;
        // SAFETY: both pointers are valid NUL-terminated strings for the call's duration.
        let result = unsafe {
            libc::renameat2(libc::AT_FDCWD, from_c.as_ptr(), libc::AT_FDCWD, to_c.as_ptr(), libc::RENAME_NOREPLACE)
        };
        if result == 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        // A file system without RENAME_NOREPLACE: link (which never replaces) and unlink.
        if !matches!(error.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) {
            return Err(error);
        }
    }
    std::fs::hard_link(from, to)?;
    std::fs::remove_file(from)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::super::key_for;
    use super::*;

    impl LocalBackend {
        fn create_temp(&self) -> LocalWriter {
            self.writer(None)
        }
    }

    impl LocalWriter {
        async fn persist(mut self, id: Uuid) -> io::Result<StoredBlob> {
            self.key = Some(key_for(id));
            self.persist_here().await
        }

        async fn seal_as(mut self, id: Uuid) -> io::Result<SealedBlob> {
            self.key = Some(key_for(id));
            self.seal_here().await
        }
    }

    #[tokio::test]
    async fn opening_removes_temp_files_left_by_a_crash_but_not_recent_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBackend::open(dir.path()).await.unwrap();
        let old = dir.path().join("tmp/old.part");
        let recent = dir.path().join("tmp/recent.part");
        std::fs::write(&old, b"x").unwrap();
        std::fs::write(&recent, b"x").unwrap();
        let two_days_ago = std::time::SystemTime::now() - Duration::from_secs(48 * 3600);
        std::fs::File::options().write(true).open(&old).unwrap().set_modified(two_days_ago).unwrap();
        drop(store);
        LocalBackend::open(dir.path()).await.unwrap();
        assert!(!old.exists(), "a day-old temp file is a crash's leftover");
        assert!(recent.exists(), "a recent one may be another process's upload");
    }

    #[tokio::test]
    async fn orphan_temp_files_go_and_those_a_writer_holds_stay() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBackend::open(dir.path()).await.unwrap();
        // A writer alive: a blob being written, its file older than the orphan age.
        let mut held = store.create_temp();
        held.write(bytes(1, 3 << 20)).await.unwrap();
        held.write_held().await.unwrap();
        held.settle().await.unwrap();
        let held_path = held.temp_path.clone().unwrap();
        // A writer that died: a file nobody holds.
        let orphan = dir.path().join("tmp/orphan.part");
        std::fs::write(&orphan, b"x").unwrap();
        let a_minute_ago = std::time::SystemTime::now() - Duration::from_secs(60);
        for path in [&orphan, &held_path] {
            std::fs::File::options().write(true).open(path).unwrap().set_modified(a_minute_ago).unwrap();
        }
        assert_eq!(store.remove_orphan_temp_files().await.unwrap(), 1);
        assert!(!orphan.exists(), "no process holds it");
        assert!(held_path.exists(), "its writer holds it");
        let stored = held.persist(Uuid::new_v4()).await.unwrap();
        assert_eq!(stored.size, 3 << 20);
        assert_eq!(store.temp_file_count().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_sealed_blob_is_hashed_before_it_has_an_id_and_placing_replaces_a_leftover() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBackend::open(dir.path()).await.unwrap();
        let id = Uuid::new_v4();
        // Dropped once sealed: nothing stays.
        let mut blob = store.create_temp();
        blob.write(bytes(2, 100_000)).await.unwrap();
        let sealed = blob.seal_as(id).await.unwrap();
        assert_eq!(sealed.sha256, Sha256Hex::from_digest(&Sha256::digest(bytes(2, 100_000))));
        drop(sealed);
        assert_eq!(store.temp_file_count().await.unwrap(), 0);
        // A leftover under the id is replaced.
        std::fs::create_dir_all(store.path(id).parent().unwrap()).unwrap();
        std::fs::write(store.path(id), b"leftover").unwrap();
        for (pattern, len) in [(3u8, 10usize), (4, 3 << 20), (5, 0)] {
            let mut blob = store.create_temp();
            blob.write(bytes(pattern, len)).await.unwrap();
            let stored = blob.seal_as(id).await.unwrap().place().await.unwrap();
            assert_eq!(stored.size, len as u64);
            assert_eq!(std::fs::read(store.path(id)).unwrap(), bytes(pattern, len).to_vec());
        }
        assert_eq!(store.temp_file_count().await.unwrap(), 0);
    }

    fn bytes(pattern: u8, len: usize) -> Bytes {
        Bytes::from(vec![pattern; len])
    }

    #[tokio::test]
    async fn persisted_blobs_are_hashed_and_temp_files_never_linger() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBackend::open(dir.path()).await.unwrap();
        let mut blob = store.create_temp();
        blob.write(Bytes::from_static(b"hello ")).await.unwrap();
        blob.write(Bytes::from_static(b"world")).await.unwrap();
        let id = Uuid::new_v4();
        let stored = blob.persist(id).await.unwrap();
        assert_eq!(stored.size, 11);
        assert_eq!(stored.sha256.as_str(), "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9");
        assert_eq!(std::fs::read(store.path(id)).unwrap(), b"hello world");
        assert_eq!(store.temp_file_count().await.unwrap(), 0);

        let mut small = store.create_temp();
        small.write(Bytes::from_static(b"partial")).await.unwrap();
        assert_eq!(store.temp_file_count().await.unwrap(), 0, "small writes are buffered until persist");
        drop(small);

        let mut abandoned = store.create_temp();
        abandoned.write(bytes(7, MIN_WRITE_BUFFER)).await.unwrap();
        abandoned.write(Bytes::from_static(b"more")).await.unwrap();
        assert_eq!(store.temp_file_count().await.unwrap(), 1, "past one buffer the bytes go to a temp file");
        abandoned.write(bytes(8, MAX_WRITE_BUFFER)).await.unwrap();
        drop(abandoned);
        assert_eq!(store.temp_file_count().await.unwrap(), 0);

        let mut large = store.create_temp();
        let content: Vec<u8> = (0..3 * MAX_WRITE_BUFFER + 5).map(|i| (i % 251) as u8).collect();
        for chunk in content.chunks(100_000) {
            large.write(Bytes::copy_from_slice(chunk)).await.unwrap();
        }
        let large_id = Uuid::new_v4();
        let stored = large.persist(large_id).await.unwrap();
        assert_eq!(stored.size, content.len() as u64);
        assert_eq!(stored.sha256.as_str(), hex::encode(Sha256::digest(&content)));
        assert_eq!(std::fs::read(store.path(large_id)).unwrap(), content);
        assert_eq!(store.temp_file_count().await.unwrap(), 0);

        let mut again = store.create_temp();
        again.write(Bytes::from_static(b"other bytes")).await.unwrap();
        let refused = again.persist(id).await.unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(store.path(id)).unwrap(), b"hello world", "a blob is never replaced");
        assert_eq!(store.temp_file_count().await.unwrap(), 0);

        store.remove(&key_for(id)).await.unwrap();
        store.remove(&key_for(id)).await.unwrap();
        assert!(!store.path(id).exists());
    }

    /// Waits (bounded) until every upload has given its memory back.
    async fn budget_returned(store: &LocalBackend) -> bool {
        for _ in 0..500 {
            if store.budget().available() == store.budget().total() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    #[tokio::test]
    async fn a_paused_upload_gives_its_share_back_once_what_it_holds_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBackend::open(dir.path()).await.unwrap();
        let total = store.budget().total();
        let mut blob = store.create_temp();
        blob.write(Bytes::from(vec![1u8; 4096])).await.unwrap();
        assert_eq!(store.budget().available(), total - 4096, "held while receiving");
        blob.write_held().await.unwrap();
        assert!(budget_returned(&store).await, "written out, its share comes back while the client pauses");
        blob.write(Bytes::from(vec![2u8; 10])).await.unwrap();
        let id = Uuid::new_v4();
        assert_eq!(blob.persist(id).await.unwrap().size, 4106);
        let mut expected = vec![1u8; 4096];
        expected.extend_from_slice(&[2u8; 10]);
        assert_eq!(std::fs::read(store.path(id)).unwrap(), expected, "and the file is whole");
        assert!(budget_returned(&store).await);
    }

    #[tokio::test]
    async fn a_buffer_starts_small_and_holds_only_what_was_received() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBackend::open(dir.path()).await.unwrap();
        let total = store.budget().total();
        let mut blob = store.create_temp();
        assert_eq!(blob.buffer_limit(), MIN_WRITE_BUFFER, "a new upload's buffer is small");
        assert_eq!(store.budget().available(), total, "and holds no memory before bytes arrive");
        blob.write(bytes(1, 4096)).await.unwrap();
        assert_eq!(blob.buffered(), 4096);
        assert_eq!(store.budget().available(), total - 4096, "it holds what it received, no more");
        drop(blob);
        assert_eq!(store.budget().available(), total, "dropping it gives the memory back");

        let mut large = store.create_temp();
        for _ in 0..64 {
            large.write(bytes(2, 64 * 1024)).await.unwrap();
            assert!(large.buffered() <= large.buffer_limit() && large.buffer_limit() <= MAX_WRITE_BUFFER);
        }
        large.persist(Uuid::new_v4()).await.unwrap();
        assert!(budget_returned(&store).await, "a persisted upload holds nothing");
    }

    #[test]
    fn buffers_grow_while_bytes_arrive_fast_and_shrink_when_they_trickle() {
        let fast = Duration::from_millis(1);
        let steady = Duration::from_millis(500);
        let slow = Duration::from_secs(5);
        let mut limit = MIN_WRITE_BUFFER;
        let mut sizes = vec![limit];
        while limit < MAX_WRITE_BUFFER {
            limit = next_buffer_limit(limit, fast);
            sizes.push(limit);
        }
        assert_eq!(sizes, [64, 128, 256, 512, 1024].map(|k| k << 10));
        assert_eq!(next_buffer_limit(MAX_WRITE_BUFFER, fast), MAX_WRITE_BUFFER);
        assert_eq!(next_buffer_limit(256 << 10, steady), 256 << 10);
        assert_eq!(next_buffer_limit(256 << 10, slow), 128 << 10);
        assert_eq!(next_buffer_limit(MIN_WRITE_BUFFER, slow), MIN_WRITE_BUFFER);
    }

    #[tokio::test]
    async fn uploads_share_a_bounded_budget_without_deadlock_and_aborted_ones_give_it_back() {
        let dir = tempfile::tempdir().unwrap();
        let budget = BufferBudget::new(256 * 1024);
        let store = LocalBackend::open_with_budget(dir.path(), budget.clone()).await.unwrap();
        // Eight uploads of 2 MiB each at once, through a budget that holds an eighth of one.
        let uploads = (0..8u8).map(|n| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut blob = store.create_temp();
                let content: Vec<u8> = (0..2 * 1024 * 1024).map(|i| (i % 241) as u8 ^ n).collect();
                for chunk in content.chunks(48 * 1024) {
                    blob.write(Bytes::copy_from_slice(chunk)).await.unwrap();
                    assert!(store.budget().available() <= store.budget().total());
                }
                if n % 2 == 0 {
                    // An aborted upload: dropped with buffers pending and in flight.
                    drop(blob);
                    return;
                }
                let id = Uuid::new_v4();
                let stored = blob.persist(id).await.unwrap();
                assert_eq!(stored.sha256.as_str(), hex::encode(Sha256::digest(&content)));
                assert_eq!(std::fs::read(store.path(id)).unwrap(), content);
            })
        });
        let all = futures::future::try_join_all(uploads);
        tokio::time::timeout(Duration::from_secs(60), all).await.expect("no upload waits forever").unwrap();
        assert!(budget_returned(&store).await, "every byte of the budget comes back");
        assert_eq!(store.temp_file_count().await.unwrap(), 0, "aborted uploads leave no file");
    }
}
