//! The blob store: an asset's bytes on the local file system, addressed by uuid.
//!
//! Layout `<data_dir>/blobs/<2 hex>/<2 hex>/<uuid>`. A write goes to `<data_dir>/tmp/`,
//! is hashed while it streams, fsynced, renamed into place and its directory fsynced,
//! so a blob that exists is complete and durable. A [`TempBlob`] that is dropped before
//! [`TempBlob::persist`] (error, client gone, task cancelled) removes its file.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use std::io::Write;
use tokio::fs;
use uuid::Uuid;

use crate::domain::names::Sha256Hex;

/// Bytes gathered before each write to disk: large writes keep the blocking-pool hops of
/// `tokio::fs` rare without holding much memory per upload.
const WRITE_BUFFER: usize = 1 << 20;

#[derive(Clone, Debug)]
pub struct BlobStore {
    blobs: PathBuf,
    tmp: PathBuf,
    durable_shards: DurableShards,
}

/// Shard directories (`ab/cd`) this process has made sure exist durably: created, and
/// their parents fsynced. Checked per process rather than by "did I create it", because
/// another upload (or process) may have created it a moment ago and not fsynced yet.
#[derive(Clone, Debug, Default)]
struct DurableShards(Arc<Mutex<HashSet<PathBuf>>>);

impl DurableShards {
    /// Blocking: called from the blocking pool. The outer directories exist already
    /// (see [`BlobStore::open`]): a new shard costs one mkdir and one directory fsync.
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

/// Temporary files older than this are left over from a crash and are removed at start.
const STALE_TEMP_AGE: Duration = Duration::from_secs(24 * 3600);

/// What a completed write produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBlob {
    pub size: u64,
    pub sha256: Sha256Hex,
}

impl BlobStore {
    /// Opens (creating if needed) the store under `data_dir`.
    pub async fn open(data_dir: &Path) -> io::Result<Self> {
        let store =
            Self { blobs: data_dir.join("blobs"), tmp: data_dir.join("tmp"), durable_shards: DurableShards::default() };
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
        store.remove_stale_temp_files().await?;
        Ok(store)
    }

    /// Removes temporary files left by a crash. Only old ones: another process sharing
    /// the data directory may be writing the recent ones.
    async fn remove_stale_temp_files(&self) -> io::Result<()> {
        let mut entries = fs::read_dir(&self.tmp).await?;
        while let Some(entry) = entries.next_entry().await? {
            let modified = entry.metadata().await.and_then(|m| m.modified());
            let stale = modified.map(|m| m.elapsed().unwrap_or_default() > STALE_TEMP_AGE).unwrap_or(false);
            if stale {
                let _ = fs::remove_file(entry.path()).await;
            }
        }
        Ok(())
    }

    /// Where the blob `id` lives, whether or not it exists.
    pub fn path(&self, id: Uuid) -> PathBuf {
        self.blobs.join(Self::relative_path(id))
    }

    /// The blob's path below the `blobs` directory (`ab/cd/<uuid>`), as nginx's
    /// X-Accel-Redirect location sees it.
    pub fn relative_path(id: Uuid) -> String {
        let hex = id.simple().to_string();
        format!("{}/{}/{}", &hex[0..2], &hex[2..4], id)
    }

    /// Starts a streaming write. The temporary file is created when the bytes outgrow one
    /// write buffer, so a small upload costs a single blocking call in [`TempBlob::persist`].
    pub fn create_temp(&self) -> TempBlob {
        TempBlob {
            temp_path: None,
            pending: Vec::new(),
            state: Some(WriteState { hasher: Sha256::new(), file: None, written: 0 }),
            in_flight: None,
            size: 0,
            tmp_dir: self.tmp.clone(),
            blobs: self.blobs.clone(),
            durable_shards: self.durable_shards.clone(),
        }
    }

    pub async fn open_read(&self, id: Uuid) -> io::Result<fs::File> {
        fs::File::open(self.path(id)).await
    }

    /// Removes a blob; a blob already gone is not an error.
    pub async fn remove(&self, id: Uuid) -> io::Result<()> {
        match fs::remove_file(self.path(id)).await {
            Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
            _ => Ok(()),
        }
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

/// A blob being written. Dropping it unpersisted deletes the temporary file.
///
/// Received bytes gather in a buffer; each full buffer is hashed and written by the
/// blocking pool while the next one fills, so receiving overlaps with hashing and
/// writing (SHA-256 alone is about as costly as the rest of a large upload).
pub struct TempBlob {
    /// The temporary file's path, chosen before the file is created so that dropping
    /// the blob at any moment (a cancelled request) removes whatever was created.
    temp_path: Option<PathBuf>,
    /// Bytes received and not yet handed over (at most [`WRITE_BUFFER`]).
    pending: Vec<u8>,
    /// What the blocking pool works with between buffers; `None` while a buffer is in
    /// flight (then it is in `in_flight`).
    state: Option<WriteState>,
    in_flight: Option<InFlight>,
    size: u64,
    tmp_dir: PathBuf,
    blobs: PathBuf,
    durable_shards: DurableShards,
}

/// A buffer being hashed and written: gives back the state and the (used) buffer.
type InFlight = tokio::task::JoinHandle<(io::Result<()>, WriteState, Vec<u8>)>;

/// The hash of the bytes handed over so far, and the file they went to.
struct WriteState {
    hasher: Sha256,
    file: Option<Arc<std::fs::File>>,
    /// Bytes written to the file so far.
    written: u64,
}

impl WriteState {
    /// Blocking: hashes `bytes` and appends them to the file at `path` (created on first
    /// use), then asks for them to be written back.
    fn append(&mut self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        self.hasher.update(bytes);
        let file = match &self.file {
            Some(file) => file.clone(),
            None => {
                let file = Arc::new(std::fs::OpenOptions::new().write(true).create_new(true).open(path)?);
                self.file = Some(file.clone());
                file
            }
        };
        (&*file).write_all(bytes)?;
        start_writeback(&file, self.written, bytes.len());
        self.written += bytes.len() as u64;
        Ok(())
    }
}

impl TempBlob {
    pub async fn write(&mut self, chunk: &[u8]) -> io::Result<()> {
        self.size += chunk.len() as u64;
        // Handed over before it would outgrow the buffer, so the buffer stays within its size.
        if !self.pending.is_empty() && self.pending.len() + chunk.len() > WRITE_BUFFER {
            self.hand_over_pending().await?;
        }
        self.pending.extend_from_slice(chunk);
        Ok(())
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Waits for the buffer in flight, if any, and takes back its state and buffer.
    async fn settle(&mut self) -> io::Result<Vec<u8>> {
        let Some(in_flight) = self.in_flight.take() else { return Ok(Vec::new()) };
        let (result, state, mut spare) = in_flight.await.map_err(io::Error::other)?;
        self.state = Some(state);
        result?;
        spare.clear();
        Ok(spare)
    }

    /// Sends the pending bytes to the blocking pool to be hashed and written, after the
    /// previous buffer is done (one at a time: the hash is sequential), and goes on with
    /// the previous buffer, emptied.
    async fn hand_over_pending(&mut self) -> io::Result<()> {
        let spare = self.settle().await?;
        let bytes = std::mem::replace(&mut self.pending, spare);
        let path = self.temp_path.get_or_insert_with(|| self.tmp_dir.join(format!("{}.part", Uuid::new_v4()))).clone();
        let mut state = self.state.take().expect("settled");
        if state.file.is_none() {
            // Created before any write goes off on its own, so that dropping this blob
            // (which unlinks the path at once) can never race with the file's creation.
            let create_path = path.clone();
            let created = tokio::task::spawn_blocking(move || {
                std::fs::OpenOptions::new().write(true).create_new(true).open(create_path)
            })
            .await
            .map_err(io::Error::other);
            match created {
                Ok(Ok(file)) => state.file = Some(Arc::new(file)),
                Ok(Err(error)) | Err(error) => {
                    self.state = Some(state);
                    return Err(error);
                }
            }
        }
        self.in_flight = Some(tokio::task::spawn_blocking(move || {
            let result = state.append(&path, &bytes);
            (result, state, bytes)
        }));
        Ok(())
    }

    /// Makes the bytes durable under `id`: hash and write what is buffered, fsync, rename
    /// into place, fsync the directory. A small blob does all of it in one blocking call.
    pub async fn persist(mut self, id: Uuid) -> io::Result<StoredBlob> {
        self.settle().await?;
        let target = self.blobs.join(BlobStore::relative_path(id));
        let mut state = self.state.take().expect("settled");
        let temp_path = self.temp_path.take().unwrap_or_else(|| self.tmp_dir.join(format!("{}.part", Uuid::new_v4())));
        let pending = std::mem::take(&mut self.pending);
        let durable_shards = self.durable_shards.clone();
        let hasher = tokio::task::spawn_blocking(move || {
            // From here the temporary file is ours to remove on any failure.
            let renamed = (|| {
                state.append(&temp_path, &pending)?;
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
        Ok(StoredBlob { size: self.size, sha256: Sha256Hex::from_digest(&hasher.finalize()) })
    }
}

impl Drop for TempBlob {
    fn drop(&mut self) {
        // Best effort and synchronous: drop can't await, and unlink is quick. A buffer
        // still in flight writes on into the unlinked file, which goes with its handle.
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
    use super::*;

    #[tokio::test]
    async fn opening_removes_temp_files_left_by_a_crash_but_not_recent_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).await.unwrap();
        let old = dir.path().join("tmp/old.part");
        let recent = dir.path().join("tmp/recent.part");
        std::fs::write(&old, b"x").unwrap();
        std::fs::write(&recent, b"x").unwrap();
        let two_days_ago = std::time::SystemTime::now() - Duration::from_secs(48 * 3600);
        std::fs::File::options().write(true).open(&old).unwrap().set_modified(two_days_ago).unwrap();
        drop(store);
        BlobStore::open(dir.path()).await.unwrap();
        assert!(!old.exists(), "a day-old temp file is a crash's leftover");
        assert!(recent.exists(), "a recent one may be another process's upload");
    }

    #[tokio::test]
    async fn persisted_blobs_are_hashed_and_temp_files_never_linger() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).await.unwrap();
        let mut blob = store.create_temp();
        blob.write(b"hello ").await.unwrap();
        blob.write(b"world").await.unwrap();
        let id = Uuid::new_v4();
        let stored = blob.persist(id).await.unwrap();
        assert_eq!(stored.size, 11);
        assert_eq!(stored.sha256.as_str(), "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9");
        assert_eq!(std::fs::read(store.path(id)).unwrap(), b"hello world");
        assert_eq!(store.temp_file_count().await.unwrap(), 0);

        let mut small = store.create_temp();
        small.write(b"partial").await.unwrap();
        assert_eq!(store.temp_file_count().await.unwrap(), 0, "small writes are buffered until persist");
        drop(small);

        let mut abandoned = store.create_temp();
        abandoned.write(&vec![7; WRITE_BUFFER]).await.unwrap();
        abandoned.write(b"more").await.unwrap();
        assert_eq!(store.temp_file_count().await.unwrap(), 1, "past one buffer the bytes go to a temp file");
        abandoned.write(&vec![8; WRITE_BUFFER]).await.unwrap();
        drop(abandoned);
        assert_eq!(store.temp_file_count().await.unwrap(), 0);

        let mut large = store.create_temp();
        let bytes: Vec<u8> = (0..3 * WRITE_BUFFER + 5).map(|i| (i % 251) as u8).collect();
        for chunk in bytes.chunks(100_000) {
            large.write(chunk).await.unwrap();
        }
        let large_id = Uuid::new_v4();
        assert_eq!(large.persist(large_id).await.unwrap().size, bytes.len() as u64);
        assert_eq!(std::fs::read(store.path(large_id)).unwrap(), bytes);
        assert_eq!(store.temp_file_count().await.unwrap(), 0);

        let mut again = store.create_temp();
        again.write(b"other bytes").await.unwrap();
        let refused = again.persist(id).await.unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(store.path(id)).unwrap(), b"hello world", "a blob is never replaced");
        assert_eq!(store.temp_file_count().await.unwrap(), 0);

        store.remove(id).await.unwrap();
        store.remove(id).await.unwrap();
        assert!(!store.path(id).exists());
    }
}
