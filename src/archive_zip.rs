//! Zip archives of several blobs, streamed into a blob writer in constant memory.
//!
//! The `zip` crate writes every byte of the format. It is synchronous, so it runs on a
//! blocking thread, in its streaming mode ([`ZipWriter::new_stream`]: each entry's CRC
//! and sizes follow its data in a data descriptor, so nothing written is ever revisited
//! and the output needs no `Seek`). Two bounded channels link it to the async side:
//! entry bytes go in ([`INPUT_CHANNEL_CAPACITY`] chunks as the blob reads deliver them),
//! archive bytes come out ([`OUTPUT_CHANNEL_CAPACITY`] chunks of [`OUTPUT_CHUNK`]). Memory
//! is therefore a few MiB whatever the sizes, plus the central directory the crate keeps
//! until the end (a few hundred bytes per entry).
//!
//! zip 3.0.0 (in the lock through utoipa-swagger-ui's build script) has no streaming
//! writer: it came in 4.2, and ZIP64 with data descriptors was only fixed later (7.0,
//! 8.2, 8.3). 8.6 is the newest release that adds no dependency but the small
//! `typed-path` (9.x pulls getrandom and zeroize even without default features).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use chrono::{Datelike, Timelike};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use zip::result::ZipError;
use zip::write::{SimpleFileOptions, StreamWriter};
use zip::{CompressionMethod, ZipWriter};

use crate::blobs::{BlobRead, TempBlob};

/// One file of the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveEntry {
    /// The name inside the zip (already made safe and unique by [`entry_names`]).
    pub name: String,
    /// Its size in bytes, known beforehand: it decides ZIP64 for the entry, and the entry
    /// must deliver exactly that many.
    pub size: u64,
    /// Its MIME type: decides stored or deflated ([`is_precompressed`]).
    pub media_type: String,
    /// Last-modified time recorded in the entry (zip times are local, 2 s steps, 1980–2107:
    /// this one is written as UTC and clamped).
    pub modified: chrono::DateTime<chrono::Utc>,
}

/// What was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZipWritten {
    pub entries: u64,
    pub bytes_in: u64,
}

/// Archive bytes are handed to the blob writer in chunks of this size.
const OUTPUT_CHUNK: usize = 256 * 1024;
/// Chunks waiting for the blob writer; past them the zip thread waits (backpressure).
const OUTPUT_CHANNEL_CAPACITY: usize = 4;
/// Chunks of entry bytes read ahead of the zip thread.
const INPUT_CHANNEL_CAPACITY: usize = 4;
/// Deflate level 2. With flate2's zlib-rs backend, level 1 is the "quick" strategy, which
/// gives up much of the ratio (measured on sensor CSV: 0.57 against 0.38) and expands
/// incompressible bytes (random: +5.5%, against +0.03%); level 2 compresses nearly as well
/// as 6 (0.37) at twice its speed (~100 MB/s per core against ~50).
const DEFLATE_LEVEL: i64 = 2;
/// Permissions of the extracted files: readable by all, writable by the owner.
const ENTRY_PERMISSIONS: u32 = 0o644;
/// The longest a file or folder name may be on common file systems, in bytes.
const MAX_SEGMENT_BYTES: usize = 255;
/// Longest extension kept apart when a name is shortened or numbered; a longer one is
/// just the end of the name.
const MAX_EXTENSION_BYTES: usize = 32;
/// The name of a file whose name is nothing once cleaned.
const FALLBACK_FILE_NAME: &str = "file";

/// Writes a zip of `entries`, in order, into `out`.
///
/// For each entry, `open(index)` gives its bytes, which must be exactly `size` of them:
/// fewer is an `UnexpectedEof` error, more an `InvalidData` one. `progress` gets the
/// entry bytes consumed so far, after each chunk. Once `cancel` is cancelled the write
/// stops with an `Interrupted` error. On error `out` holds a partial archive: the caller
/// drops it.
pub async fn write_zip<F, Fut>(
    entries: Vec<ArchiveEntry>,
    mut open: F,
    out: &mut TempBlob,
    progress: impl Fn(u64) + Send + Sync + 'static,
    cancel: &CancellationToken,
) -> io::Result<ZipWritten>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = io::Result<BlobRead>>,
{
    let plans: Vec<(String, SimpleFileOptions)> =
        entries.iter().map(|entry| (entry.name.clone(), entry_options(entry))).collect();
    let (input_tx, input_rx) = mpsc::channel(INPUT_CHANNEL_CAPACITY);
    let (output_tx, output_rx) = mpsc::channel(OUTPUT_CHANNEL_CAPACITY);
    let zipper = tokio::task::spawn_blocking(move || zip_entries(plans, input_rx, output_tx));

    let streaming = async {
        tokio::try_join!(feed_entries(&entries, &mut open, input_tx, &progress), drain_output(output_rx, out))
    };
    let streamed = tokio::select! {
        biased;
        () = cancel.cancelled() => Err(io::Error::new(io::ErrorKind::Interrupted, "the archive was cancelled")),
        result = streaming => result.map(|(bytes_in, ())| bytes_in),
    };
    // Both channels closed with `streaming`, so the zip thread stops at its next send or
    // receive: waiting for it is short, and no work goes on after we return.
    let zipped = match zipper.await {
        Ok(result) => result,
        Err(error) if error.is_panic() => Err(io::Error::other("the zip writer panicked")),
        Err(error) => Err(io::Error::other(format!("the zip writer did not finish: {error}"))),
    };
    match (streamed, zipped) {
        // A side that only saw the other one go away has the less useful error.
        (Err(error), _) if !is_peer_gone(&error) => Err(error),
        (_, Err(error)) => Err(error),
        (Err(error), Ok(_)) => Err(error),
        (Ok(bytes_in), Ok(entries)) => Ok(ZipWritten { entries, bytes_in }),
    }
}

/// The zip options of an entry: compression by its type, ZIP64 by its size.
fn entry_options(entry: &ArchiveEntry) -> SimpleFileOptions {
    let (method, level) = if is_precompressed(&entry.media_type) {
        (CompressionMethod::Stored, None)
    } else {
        (CompressionMethod::Deflated, Some(DEFLATE_LEVEL))
    };
    SimpleFileOptions::default()
        .compression_method(method)
        .compression_level(level)
        .last_modified_time(zip_time(entry.modified))
        .system(zip::System::Unix)
        .unix_permissions(ENTRY_PERMISSIONS)
        .large_file(needs_zip64(entry.size, method))
}

/// Whether an entry of `size` bytes needs ZIP64 sizes: the streamed entry's sizes go in
/// its data descriptor, whose 32 or 64 bits are chosen before the data is written. A
/// 32-bit size of 0xFFFF_FFFF already means "see ZIP64". Deflate can expand
/// incompressible data (0.03% at level 2; the margin kept, 1/8, bounds any level), so
/// deflated entries switch earlier: 20 bytes more per entry of ~3.8 GB or more.
fn needs_zip64(size: u64, method: CompressionMethod) -> bool {
    let largest_output = if method == CompressionMethod::Stored { size } else { size.saturating_add(size / 8 + 1024) };
    largest_output >= zip::ZIP64_BYTES_THR
}

/// `time` as a zip timestamp: 2-second steps, clamped to 1980–2107.
fn zip_time(time: chrono::DateTime<chrono::Utc>) -> zip::DateTime {
    let latest = || zip::DateTime::from_date_and_time(2107, 12, 31, 23, 59, 58).unwrap_or_default();
    match u16::try_from(time.year()) {
        Ok(year) if year < 1980 => zip::DateTime::default(),
        Ok(year) if year > 2107 => latest(),
        Ok(year) => zip::DateTime::from_date_and_time(
            year,
            time.month() as u8,
            time.day() as u8,
            time.hour() as u8,
            time.minute() as u8,
            time.second() as u8,
        )
        .unwrap_or_default(),
        Err(_) if time.year() < 0 => zip::DateTime::default(),
        Err(_) => latest(),
    }
}

/// From the async side to the zip thread.
enum EntryBytes {
    Chunk(Bytes),
    /// The entry's bytes are all sent (and were exactly its size).
    End,
}

/// Reads the entries one after the other and sends their bytes to the zip thread.
/// Returns the bytes read.
async fn feed_entries<F, Fut>(
    entries: &[ArchiveEntry],
    open: &mut F,
    input: mpsc::Sender<EntryBytes>,
    progress: &(impl Fn(u64) + Send + Sync),
) -> io::Result<u64>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = io::Result<BlobRead>>,
{
    let mut bytes_in = 0u64;
    for (index, entry) in entries.iter().enumerate() {
        let mut bytes = open(index).await?;
        let mut delivered = 0u64;
        while let Some(chunk) = bytes.next().await {
            let chunk = chunk?;
            delivered += chunk.len() as u64;
            if delivered > entry.size {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{:?} has more than its {} bytes", entry.name, entry.size),
                ));
            }
            if chunk.is_empty() {
                continue;
            }
            let length = chunk.len() as u64;
            send(&input, EntryBytes::Chunk(chunk)).await?;
            bytes_in += length;
            progress(bytes_in);
        }
        if delivered < entry.size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{:?} ended after {delivered} of its {} bytes", entry.name, entry.size),
            ));
        }
        send(&input, EntryBytes::End).await?;
    }
    Ok(bytes_in)
}

async fn send(input: &mpsc::Sender<EntryBytes>, message: EntryBytes) -> io::Result<()> {
    input.send(message).await.map_err(|_| peer_gone("the zip writer stopped"))
}

/// Writes the archive's chunks to `out` until the zip thread is done.
async fn drain_output(mut output: mpsc::Receiver<Bytes>, out: &mut TempBlob) -> io::Result<()> {
    while let Some(chunk) = output.recv().await {
        out.write(chunk).await?;
    }
    Ok(())
}

/// The zip thread: writes the entries as their bytes arrive, then the central directory.
/// Returns the number of entries.
fn zip_entries(
    plans: Vec<(String, SimpleFileOptions)>,
    mut input: mpsc::Receiver<EntryBytes>,
    output: mpsc::Sender<Bytes>,
) -> io::Result<u64> {
    let abandoned = Arc::new(AtomicBool::new(false));
    let mut zip = ZipWriter::new_stream(ChunkSender::new(output, abandoned.clone()));
    // Declared after `zip`, so dropped before it: see `AbandonUnlessFinished`.
    let mut guard = AbandonUnlessFinished { abandoned, finished: false };
    let mut entries = 0u64;
    for (name, options) in plans {
        zip.start_file(name, options).map_err(zip_error)?;
        loop {
            match input.blocking_recv() {
                Some(EntryBytes::Chunk(bytes)) => zip.write_all(&bytes)?,
                Some(EntryBytes::End) => break,
                None => return Err(peer_gone("the entries' reader stopped")),
            }
        }
        entries += 1;
    }
    let mut sender = zip.finish().map_err(zip_error)?.into_inner();
    sender.flush()?;
    guard.finished = true;
    Ok(entries)
}

/// `ZipWriter`'s drop completes the archive (central directory and all) when it was not
/// finished. On the error paths that would be bytes of a broken archive: this guard turns
/// the output into a sink first.
struct AbandonUnlessFinished {
    abandoned: Arc<AtomicBool>,
    finished: bool,
}

impl Drop for AbandonUnlessFinished {
    fn drop(&mut self) {
        if !self.finished {
            self.abandoned.store(true, Ordering::Relaxed);
        }
    }
}

/// The zip thread's output: gathers bytes into chunks of [`OUTPUT_CHUNK`] and sends them
/// to the async side, waiting while the channel is full. Once abandoned (the archive given
/// up, or the async side gone) it swallows whatever is written.
struct ChunkSender {
    chunk: Vec<u8>,
    output: mpsc::Sender<Bytes>,
    abandoned: Arc<AtomicBool>,
}

impl ChunkSender {
    fn new(output: mpsc::Sender<Bytes>, abandoned: Arc<AtomicBool>) -> StreamWriter<Self> {
        StreamWriter::new(Self { chunk: Vec::with_capacity(OUTPUT_CHUNK), output, abandoned })
    }

    fn send_chunk(&mut self) -> io::Result<()> {
        let chunk = std::mem::replace(&mut self.chunk, Vec::with_capacity(OUTPUT_CHUNK));
        if self.output.blocking_send(Bytes::from(chunk)).is_err() {
            self.abandoned.store(true, Ordering::Relaxed);
            return Err(peer_gone("the archive's writer stopped"));
        }
        Ok(())
    }
}

impl Write for ChunkSender {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.abandoned.load(Ordering::Relaxed) {
            return Ok(data.len());
        }
        let taken = data.len().min(OUTPUT_CHUNK - self.chunk.len());
        self.chunk.extend_from_slice(&data[..taken]);
        if self.chunk.len() == OUTPUT_CHUNK {
            self.send_chunk()?;
        }
        Ok(taken)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.chunk.is_empty() || self.abandoned.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.send_chunk()
    }
}

/// The other end of a channel went away: it stopped on an error of its own, which is the
/// one worth reporting.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct PeerGone(&'static str);

fn peer_gone(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, PeerGone(what))
}

fn is_peer_gone(error: &io::Error) -> bool {
    error.get_ref().is_some_and(|inner| inner.is::<PeerGone>())
}

/// A zip error as an I/O error, keeping an I/O error as it was (and so `PeerGone`).
fn zip_error(error: ZipError) -> io::Error {
    match error {
        ZipError::Io(error) => error,
        error => error.into(),
    }
}

/// Whether a MIME type is stored rather than deflated: its bytes are compressed already
/// (deflating them again costs CPU for nothing).
pub fn is_precompressed(media_type: &str) -> bool {
    let essence = media_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    match kind {
        // Bitmaps and SVG (XML text) are the images that do compress.
        "image" => !matches!(subtype, "svg+xml" | "bmp" | "x-ms-bmp"),
        "video" => true,
        // PCM: WAV and AIFF.
        "audio" => !matches!(subtype, "wav" | "x-wav" | "wave" | "vnd.wave" | "aiff" | "x-aiff"),
        "font" => matches!(subtype, "woff" | "woff2"),
        "application" => {
            matches!(
                subtype,
                "zip"
                    | "x-zip-compressed"
                    | "gzip"
                    | "x-gzip"
                    | "x-7z-compressed"
                    | "x-rar-compressed"
                    | "vnd.rar"
                    | "x-bzip2"
                    | "x-xz"
                    | "zstd"
                    | "epub+zip"
            )
                // Office documents: zip containers.
                || subtype.starts_with("vnd.openxmlformats-")
                || subtype.starts_with("vnd.oasis.opendocument.")
        }
        _ => false,
    }
}

/// Names for the entries of an archive: `<prefix>/<file name>`, safe to extract anywhere
/// and unique even on case-insensitive file systems.
///
/// Each name is one path segment: `/` and `\` inside it join its parts with `_` (so
/// `/etc/passwd` is `etc_passwd`), and `.`/`..` parts are dropped. Control characters
/// (C0, DEL, C1) and bidi overrides go; the characters Windows refuses (`<>:"|?*`) become
/// `_`; leading spaces and trailing dots and spaces go (Windows drops the latter, so two
/// names could meet); Windows device names (`con`, `lpt1`…) get a `_`. A name that is
/// nothing once cleaned is `file`, a prefix that is nothing puts the files at the root.
/// Segments are cut to 255 bytes at a character boundary, keeping the extension. Names
/// equal but for case get " (2)", " (3)"… before the extension. Unicode stays as it is
/// (the zip crate sets the UTF-8 flag).
///
/// Names are unique within one call: a caller with several folders calls it per folder.
pub fn entry_names(prefix: &str, file_names: &[String]) -> Vec<String> {
    let folder = fit_segment(&flatten(prefix));
    let mut taken: HashSet<String> = HashSet::new();
    // The next number to try for a name, so that many copies of one name stay linear.
    let mut next_number: HashMap<String, u64> = HashMap::new();
    file_names
        .iter()
        .map(|file_name| {
            let mut name = flatten(file_name);
            if name.is_empty() {
                name = FALLBACK_FILE_NAME.to_owned();
            }
            let base = fit_segment(&name);
            let base_key = base.to_lowercase();
            let mut unique = base.clone();
            if taken.contains(&base_key) {
                let number = next_number.entry(base_key).or_insert(2);
                loop {
                    unique = numbered(&name, *number);
                    *number += 1;
                    if !taken.contains(&unique.to_lowercase()) {
                        break;
                    }
                }
            }
            taken.insert(unique.to_lowercase());
            if folder.is_empty() {
                unique
            } else {
                format!("{folder}/{unique}")
            }
        })
        .collect()
}

/// `name` as one clean path segment (possibly empty).
fn flatten(name: &str) -> String {
    let parts: Vec<String> = name.split(['/', '\\']).map(clean_part).filter(|part| !part.is_empty()).collect();
    avoid_device_name(parts.join("_"))
}

fn clean_part(part: &str) -> String {
    let kept: String = part
        .chars()
        .filter(|&c| !c.is_control() && !is_bidi_control(c))
        .map(|c| if matches!(c, '<' | '>' | ':' | '"' | '|' | '?' | '*') { '_' } else { c })
        .collect();
    let trimmed = kept.trim_start_matches(' ').trim_end_matches(['.', ' ']);
    trimmed.to_owned()
}

/// Characters that reorder the text around them: they can disguise an extension.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Windows opens a device for `con`, `nul.txt`…: such a name gets a `_` after its stem.
fn avoid_device_name(name: String) -> String {
    let (stem, rest) = name.split_once('.').map_or((name.as_str(), ""), |(stem, _)| (stem, &name[stem.len()..]));
    let upper = stem.trim_end().to_ascii_uppercase();
    let is_device = matches!(upper.as_str(), "CON" | "PRN" | "AUX" | "NUL")
        || ((upper.starts_with("COM") || upper.starts_with("LPT"))
            && upper.len() == 4
            && upper.as_bytes()[3].is_ascii_digit()
            && upper.as_bytes()[3] != b'0');
    if is_device {
        format!("{stem}_{rest}")
    } else {
        name
    }
}

/// `name` split at its extension's dot: (stem, ".ext"), the extension empty when there is
/// none (or it is too long to be one).
fn split_extension(name: &str) -> (&str, &str) {
    match name.rfind('.') {
        Some(dot) if dot > 0 && name.len() - dot - 1 <= MAX_EXTENSION_BYTES && dot + 1 < name.len() => {
            name.split_at(dot)
        }
        _ => (name, ""),
    }
}

/// `name` cut to [`MAX_SEGMENT_BYTES`], keeping its extension.
fn fit_segment(name: &str) -> String {
    with_suffix(name, "")
}

/// `name` with " (number)" before its extension, within [`MAX_SEGMENT_BYTES`].
fn numbered(name: &str, number: u64) -> String {
    with_suffix(name, &format!(" ({number})"))
}

fn with_suffix(name: &str, suffix: &str) -> String {
    let (stem, extension) = split_extension(name);
    let room = MAX_SEGMENT_BYTES - suffix.len() - extension.len();
    let mut cut = stem.len().min(room);
    while !stem.is_char_boundary(cut) {
        cut -= 1;
    }
    // A cut may leave a trailing space or dot: Windows would drop it.
    let stem = stem[..cut].trim_end_matches(['.', ' ']);
    format!("{stem}{suffix}{extension}")
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::sync::atomic::AtomicU64;
    use std::time::Duration;

    use async_trait::async_trait;
    use chrono::TimeZone;
    use futures::stream;
    use uuid::Uuid;

    use super::*;
    use crate::blobs::{BlobStore, BlobWrite, SealedBlob, StoredBlob};

    fn entry(name: &str, size: usize, media_type: &str) -> ArchiveEntry {
        ArchiveEntry {
            name: name.to_owned(),
            size: size as u64,
            media_type: media_type.to_owned(),
            modified: chrono::Utc.with_ymd_and_hms(2024, 3, 5, 14, 7, 22).unwrap(),
        }
    }

    /// `bytes` as a blob read of `chunk`-byte pieces.
    fn read_of(bytes: Vec<u8>, chunk: usize) -> BlobRead {
        let pieces: Vec<io::Result<Bytes>> =
            Bytes::from(bytes).chunks(chunk).map(|piece| Ok(Bytes::copy_from_slice(piece))).collect();
        stream::iter(pieces).boxed()
    }

    /// Pseudo-random bytes (xorshift), the same for the same seed.
    fn noise(seed: u64, length: usize) -> Vec<u8> {
        let mut state = seed | 1;
        let mut bytes = Vec::with_capacity(length + 8);
        while bytes.len() < length {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            bytes.extend_from_slice(&state.to_le_bytes());
        }
        bytes.truncate(length);
        bytes
    }

    struct Zipped {
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
        written: ZipWritten,
    }

    /// Zips `contents` into a real local store and returns the placed blob's file.
    async fn zip_into_store(entries: Vec<ArchiveEntry>, contents: Vec<Vec<u8>>) -> io::Result<Zipped> {
        let dir = tempfile::tempdir()?;
        let store = BlobStore::open(dir.path()).await?;
        let id = Uuid::new_v4();
        let mut blob = store.create_temp(id);
        let contents = Arc::new(contents);
        let open = |index: usize| {
            let contents = contents.clone();
            async move { Ok(read_of(contents[index].clone(), 100_000)) }
        };
        let written = write_zip(entries, open, &mut blob, |_| {}, &CancellationToken::new()).await?;
        blob.seal().await?.place().await?;
        Ok(Zipped { path: store.local().path(id), _dir: dir, written })
    }

    #[tokio::test]
    async fn writes_entries_with_unique_names_their_bytes_and_compression() {
        let originals =
            ["photo.jpg".to_owned(), "Compte rendu — séance 3 (été).txt".to_owned(), "photo.jpg".to_owned()];
        let names = entry_names("12_Visit of Monday", &originals);
        assert_eq!(
            names,
            [
                "12_Visit of Monday/photo.jpg",
                "12_Visit of Monday/Compte rendu — séance 3 (été).txt",
                "12_Visit of Monday/photo (2).jpg"
            ]
        );
        let text = "séance: exercices d'équilibre, 3 × 10 répétitions\n".repeat(2000).into_bytes();
        let contents = vec![noise(1, 300_000), text, noise(2, 5)];
        let entries = vec![
            entry(&names[0], contents[0].len(), "image/jpeg"),
            entry(&names[1], contents[1].len(), "text/plain; charset=utf-8"),
            entry(&names[2], contents[2].len(), "image/jpeg"),
        ];
        let total: usize = contents.iter().map(Vec::len).sum();
        let zipped = zip_into_store(entries, contents.clone()).await.unwrap();
        assert_eq!(zipped.written, ZipWritten { entries: 3, bytes_in: total as u64 });

        let bytes = std::fs::read(&zipped.path).unwrap();
        // Streamed: the first local header says its sizes follow in a data descriptor.
        assert_eq!(&bytes[..4], b"PK\x03\x04");
        assert_ne!(u16::from_le_bytes([bytes[6], bytes[7]]) & 0x08, 0);
        let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
        assert_eq!(archive.len(), 3);
        let methods = [CompressionMethod::Stored, CompressionMethod::Deflated, CompressionMethod::Stored];
        for (index, expected) in contents.iter().enumerate() {
            let mut file = archive.by_index(index).unwrap();
            assert_eq!(file.name(), names[index]);
            assert_eq!(file.compression(), methods[index]);
            assert_eq!(file.size(), expected.len() as u64);
            assert_eq!(file.unix_mode().map(|mode| mode & 0o777), Some(0o644));
            let modified = file.last_modified().unwrap();
            assert_eq!(
                (
                    modified.year(),
                    modified.month(),
                    modified.day(),
                    modified.hour(),
                    modified.minute(),
                    modified.second()
                ),
                (2024, 3, 5, 14, 7, 22)
            );
            let mut read = Vec::new();
            file.read_to_end(&mut read).unwrap(); // also checks the CRC
            assert!(read == *expected, "entry {index} differs");
        }
        let text = archive.by_index(1).unwrap();
        assert!(text.compressed_size() < text.size() / 10);
    }

    #[tokio::test]
    async fn reports_progress_and_writes_an_empty_archive() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).await.unwrap();
        let mut blob = store.create_temp(Uuid::new_v4());
        let seen = Arc::new(AtomicU64::new(0));
        let reported = seen.clone();
        let report = move |done: u64| {
            assert!(done >= reported.swap(done, Ordering::Relaxed));
        };
        let entries = vec![entry("a.bin", 1_000_000, "application/octet-stream"), entry("b.bin", 7, "video/mp4")];
        let open = |index: usize| async move { Ok(read_of(noise(index as u64, [1_000_000, 7][index]), 65_536)) };
        let written = write_zip(entries, open, &mut blob, report, &CancellationToken::new()).await.unwrap();
        assert_eq!(written, ZipWritten { entries: 2, bytes_in: 1_000_007 });
        assert_eq!(seen.load(Ordering::Relaxed), 1_000_007);

        let zipped = zip_into_store(Vec::new(), Vec::new()).await.unwrap();
        assert_eq!(zipped.written, ZipWritten { entries: 0, bytes_in: 0 });
        let archive = zip::ZipArchive::new(std::fs::File::open(&zipped.path).unwrap()).unwrap();
        assert_eq!(archive.len(), 0);
    }

    #[tokio::test]
    async fn an_entry_shorter_or_longer_than_its_size_is_an_error() {
        let short = zip_into_store(
            vec![entry("a.txt", 10, "text/plain"), entry("b.txt", 11, "text/plain")],
            vec![b"0123456789".to_vec(), b"0123456789".to_vec()],
        )
        .await;
        assert_eq!(short.err().map(|error| error.kind()), Some(io::ErrorKind::UnexpectedEof));

        let long = zip_into_store(vec![entry("a.jpg", 9, "image/jpeg")], vec![b"0123456789".to_vec()]).await;
        assert_eq!(long.err().map(|error| error.kind()), Some(io::ErrorKind::InvalidData));
    }

    #[tokio::test]
    async fn a_failing_open_or_read_is_returned() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).await.unwrap();
        let entries = || vec![entry("a.txt", 3, "text/plain"), entry("b.txt", 3, "text/plain")];

        let mut blob = store.create_temp(Uuid::new_v4());
        let open = |index: usize| async move {
            match index {
                0 => Ok(read_of(b"abc".to_vec(), 1)),
                _ => Err(io::Error::new(io::ErrorKind::NotFound, "the blob is gone")),
            }
        };
        let error = write_zip(entries(), open, &mut blob, |_| {}, &CancellationToken::new()).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
        assert_eq!(error.to_string(), "the blob is gone");

        let mut blob = store.create_temp(Uuid::new_v4());
        let open = |_| async {
            let failing: BlobRead = stream::iter(vec![
                Ok(Bytes::from_static(b"a")),
                Err(io::Error::new(io::ErrorKind::ConnectionReset, "the bucket hung up")),
            ])
            .boxed();
            Ok(failing)
        };
        let error = write_zip(entries(), open, &mut blob, |_| {}, &CancellationToken::new()).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
    }

    #[tokio::test]
    async fn an_error_of_the_zip_writer_is_returned() {
        // Two entries of one name: the zip crate refuses the second.
        let result = zip_into_store(
            vec![entry("a.txt", 1, "text/plain"), entry("a.txt", 1, "text/plain")],
            vec![b"a".to_vec(), b"b".to_vec()],
        )
        .await;
        let error = result.err().unwrap();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
        assert!(!is_peer_gone(&error));
    }

    /// A blob writer that fails once it has taken `limit` bytes.
    struct FullDisk {
        taken: u64,
        limit: u64,
    }

    #[async_trait]
    impl BlobWrite for FullDisk {
        async fn write(&mut self, chunk: Bytes) -> io::Result<()> {
            self.taken += chunk.len() as u64;
            if self.taken > self.limit {
                return Err(io::Error::new(io::ErrorKind::StorageFull, "no space left"));
            }
            Ok(())
        }
        async fn write_held(&mut self) -> io::Result<()> {
            Ok(())
        }
        fn size(&self) -> u64 {
            self.taken
        }
        async fn persist(self: Box<Self>) -> io::Result<StoredBlob> {
            Err(io::Error::other("not in this test"))
        }
        async fn seal(self: Box<Self>) -> io::Result<SealedBlob> {
            Err(io::Error::other("not in this test"))
        }
    }

    #[tokio::test]
    async fn an_error_of_the_output_is_returned() {
        let mut blob: TempBlob = Box::new(FullDisk { taken: 0, limit: 1 << 20 });
        let size = 8 << 20;
        let open = move |_| async move { Ok(read_of(noise(3, size), 256 * 1024)) };
        let entries = vec![entry("big.bin", size, "video/mp4")];
        let error = write_zip(entries, open, &mut blob, |_| {}, &CancellationToken::new()).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::StorageFull);
    }

    #[tokio::test]
    async fn cancelling_stops_soon_with_interrupted() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).await.unwrap();
        let mut blob = store.create_temp(Uuid::new_v4());
        // One chunk, then a read that never ends.
        let open = |_| async {
            let stalled: BlobRead = stream::iter(vec![Ok(Bytes::from_static(b"abc"))]).chain(stream::pending()).boxed();
            Ok(stalled)
        };
        let cancel = CancellationToken::new();
        let canceller = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            canceller.cancel();
        });
        let entries = vec![entry("a.txt", 100, "text/plain")];
        let result =
            tokio::time::timeout(Duration::from_secs(10), write_zip(entries, open, &mut blob, |_| {}, &cancel))
                .await
                .expect("the write stops once cancelled");
        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::Interrupted);
    }

    #[tokio::test]
    async fn a_64_mib_entry_reads_back_equal() {
        const SIZE: usize = 64 << 20;
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).await.unwrap();
        let id = Uuid::new_v4();
        let mut blob = store.create_temp(id);
        // Generated chunk by chunk, as a blob read delivers it: never whole in memory.
        let open = |_| async {
            let chunks = stream::unfold(0usize, |sent| async move {
                (sent < SIZE).then(|| {
                    let length = (SIZE - sent).min(256 * 1024);
                    (Ok(Bytes::from(noise(sent as u64, length))), sent + length)
                })
            });
            Ok(chunks.boxed() as BlobRead)
        };
        let entries = vec![entry("data.bin", SIZE, "application/octet-stream")];
        let written = write_zip(entries, open, &mut blob, |_| {}, &CancellationToken::new()).await.unwrap();
        assert_eq!(written, ZipWritten { entries: 1, bytes_in: SIZE as u64 });
        blob.seal().await.unwrap().place().await.unwrap();

        let mut archive = zip::ZipArchive::new(std::fs::File::open(store.local().path(id)).unwrap()).unwrap();
        let mut file = archive.by_index(0).unwrap();
        assert_eq!(file.compression(), CompressionMethod::Deflated);
        assert_eq!(file.size(), SIZE as u64);
        let mut offset = 0usize;
        let mut buffer = vec![0u8; 256 * 1024];
        while offset < SIZE {
            // Reading to the end makes the zip reader check the CRC.
            file.read_exact(&mut buffer).unwrap();
            assert!(buffer == noise(offset as u64, buffer.len()), "bytes differ at {offset}");
            offset += buffer.len();
        }
        assert_eq!(file.read(&mut buffer).unwrap(), 0);
    }

    #[tokio::test]
    async fn more_than_65535_entries_make_a_zip64_archive() {
        let count = 65_540;
        let names: Vec<String> = (0..count).map(|index| format!("{index}.txt")).collect();
        let entries: Vec<ArchiveEntry> = names.iter().map(|name| entry(name, 1, "image/png")).collect();
        let contents: Vec<Vec<u8>> = (0..count).map(|index| vec![b'a' + (index % 26) as u8]).collect();
        let zipped = zip_into_store(entries, contents).await.unwrap();
        assert_eq!(zipped.written.entries, count as u64);
        let bytes = std::fs::read(&zipped.path).unwrap();
        // The ZIP64 end of central directory locator sits just before the classic record.
        let locator = bytes.len() - 22 - 20;
        assert_eq!(&bytes[locator..locator + 4], b"PK\x06\x07");
        let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
        assert_eq!(archive.len(), count);
        let mut last = archive.by_index(count - 1).unwrap();
        assert_eq!(last.name(), "65539.txt");
        let mut read = Vec::new();
        last.read_to_end(&mut read).unwrap();
        assert_eq!(read, [b'a' + (65_539 % 26) as u8]);
    }

    #[test]
    fn zip64_is_chosen_by_size_before_writing() {
        let threshold = 0xFFFF_FFFF;
        assert!(!needs_zip64(threshold - 1, CompressionMethod::Stored));
        assert!(needs_zip64(threshold, CompressionMethod::Stored));
        assert!(needs_zip64(5 << 30, CompressionMethod::Stored));
        // Deflate may expand: a deflated entry switches well before.
        assert!(!needs_zip64(3 << 30, CompressionMethod::Deflated));
        assert!(needs_zip64(3_900_000_000, CompressionMethod::Deflated));
        assert!(needs_zip64(threshold, CompressionMethod::Deflated));
        // And the options carry it.
        let large = format!("{:?}", entry_options(&entry("big.mp4", 0, "video/mp4")).large_file(true));
        let options =
            format!("{:?}", entry_options(&ArchiveEntry { size: 5 << 30, ..entry("big.mp4", 0, "video/mp4") }));
        assert_eq!(options, large);
        assert_ne!(format!("{:?}", entry_options(&entry("big.mp4", 0, "video/mp4"))), large);
    }

    #[test]
    fn times_are_clamped_to_what_zip_can_hold() {
        let at = |year, month, day, hour, minute, second| {
            zip_time(chrono::Utc.with_ymd_and_hms(year, month, day, hour, minute, second).unwrap())
        };
        let parts =
            |time: zip::DateTime| (time.year(), time.month(), time.day(), time.hour(), time.minute(), time.second());
        assert_eq!(parts(at(2024, 2, 29, 23, 59, 59)), (2024, 2, 29, 23, 59, 58));
        assert_eq!(parts(at(1970, 1, 1, 0, 0, 0)), (1980, 1, 1, 0, 0, 0));
        assert_eq!(parts(at(1979, 12, 31, 23, 59, 59)), (1980, 1, 1, 0, 0, 0));
        assert_eq!(parts(at(2200, 6, 1, 12, 0, 0)), (2107, 12, 31, 23, 59, 58));
    }

    #[test]
    fn precompressed_types_are_stored() {
        for stored in [
            "image/jpeg",
            "IMAGE/PNG",
            "video/mp4",
            "audio/mpeg",
            "audio/ogg; codecs=opus",
            "application/zip",
            "application/x-zip-compressed",
            "application/gzip",
            "application/x-gzip",
            "application/x-7z-compressed",
            "application/x-rar-compressed",
            "application/x-bzip2",
            "application/x-xz",
            "application/zstd",
            "application/epub+zip",
            "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
            "font/woff2",
        ] {
            assert!(is_precompressed(stored), "{stored}");
        }
        for deflated in [
            "audio/wav",
            "audio/x-wav",
            "audio/wave",
            "application/pdf",
            "application/json",
            "application/octet-stream",
            "text/plain",
            "text/csv; charset=utf-8",
            "image/svg+xml",
            "image/bmp",
            "",
            "nonsense",
        ] {
            assert!(!is_precompressed(deflated), "{deflated}");
        }
    }

    fn names(prefix: &str, file_names: &[&str]) -> Vec<String> {
        entry_names(prefix, &file_names.iter().map(|name| name.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn entry_names_stay_inside_the_folder() {
        assert_eq!(
            names(
                "12_Visit of Monday",
                &["..", ".", "../../etc/passwd", "/etc/passwd", "a\\b", "C:\\Users\\me\\x.txt"]
            ),
            [
                "12_Visit of Monday/file",
                "12_Visit of Monday/file (2)",
                "12_Visit of Monday/etc_passwd",
                "12_Visit of Monday/etc_passwd (2)",
                "12_Visit of Monday/a_b",
                "12_Visit of Monday/C__Users_me_x.txt",
            ]
        );
        // A prefix is one folder too; one that is nothing puts the files at the root.
        assert_eq!(names("../a/b", &["x"]), ["a_b/x"]);
        assert_eq!(names("..", &["x"]), ["x"]);
        assert_eq!(names("", &["/x"]), ["x"]);
    }

    #[test]
    fn entry_names_drop_control_characters_and_odd_ends() {
        assert_eq!(
            names(
                "p",
                &["a\u{0}b\nc\u{7f}d\u{85}e.txt", "\u{1}\u{2}", "", "   ", "...", " spaced . ", "x.txt. . ", ".hidden"]
            ),
            ["p/abcde.txt", "p/file", "p/file (2)", "p/file (3)", "p/file (4)", "p/spaced", "p/x.txt", "p/.hidden"]
        );
        assert_eq!(
            names("p", &["invoice\u{202e}fdp.exe", "a<b>:c\"d|e?f*.txt"]),
            ["p/invoicefdp.exe", "p/a_b__c_d_e_f_.txt"]
        );
        assert_eq!(
            names("p", &["CON", "nul.txt", "com1.log", "console.txt", "com0"]),
            ["p/CON_", "p/nul_.txt", "p/com1_.log", "p/console.txt", "p/com0"]
        );
    }

    #[test]
    fn entry_names_are_unique_whatever_the_case() {
        assert_eq!(
            names("p", &["a.txt", "A.TXT", "a.txt", "a (2).txt", "b", "B"]),
            ["p/a.txt", "p/A (2).TXT", "p/a (3).txt", "p/a (2) (2).txt", "p/b", "p/B (2)"]
        );
        assert_eq!(
            names("p", &["Été.txt", "éTÉ.TXT", "日本語.pdf", "日本語.pdf"]),
            ["p/Été.txt", "p/éTÉ (2).TXT", "p/日本語.pdf", "p/日本語 (2).pdf"]
        );
        // Many copies of one name stay quick (no quadratic search).
        let many = names("p", &vec!["same.txt"; 20_000]);
        assert_eq!(many[19_999], "p/same (20000).txt");
        assert_eq!(many.iter().map(|name| name.to_lowercase()).collect::<HashSet<_>>().len(), 20_000);
    }

    #[test]
    fn entry_names_fit_in_255_bytes_keeping_the_extension() {
        let long = format!("{}.pdf", "é".repeat(300));
        let got = entry_names(&"f".repeat(300), &[long.clone(), long]);
        let (folder, first) = got[0].split_once('/').unwrap();
        assert_eq!(folder, "f".repeat(255));
        assert!(first.len() <= 255 && first.ends_with("é.pdf"), "{first}");
        assert_eq!(first.len(), 254); // "é" is two bytes: the cut stays on a boundary
        let second = got[1].split_once('/').unwrap().1;
        assert!(second.len() <= 255 && second.ends_with("é (2).pdf"), "{second}");
        // A long "extension" is just the end of the name.
        let odd = entry_names("p", &[format!("a.{}", "x".repeat(300))]);
        assert_eq!(odd[0].len(), "p/".len() + 255);
        // A cut that ends on a space or dot drops it.
        let spaced = entry_names("p", &[format!("{} b.txt", "a".repeat(250))]);
        assert_eq!(spaced[0], format!("p/{}.txt", "a".repeat(250)));
    }
}
