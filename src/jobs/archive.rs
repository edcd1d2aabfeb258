//! The archive job's work: the zip of an archive's assets, written straight into the
//! blob store while the assets are read (constant memory; see [`crate::archive_zip`]).
//!
//! Assets deleted while the archive is built: the plan is read when the attempt starts,
//! so an asset deleted before then is left out (and named in `skipped_assets`). One
//! deleted during the attempt, whose bytes go while the zip is being written, makes the
//! attempt fail as retryable: the next attempt plans again, without it. An archive is
//! never completed with a truncated entry.

use std::collections::HashMap;
use std::io;

use uuid::Uuid;

use super::fetch::FetchError;
use crate::app::App;
use crate::archive_zip::{entry_names, write_zip, ArchiveEntry};
use crate::blobs::SealedBlob;

/// A built archive, sealed (durable, not yet visible under its key).
pub struct ArchiveBuilt {
    pub archive_uuid: Uuid,
    pub entries: u64,
    /// Bytes of the assets read into it.
    pub archived_bytes: u64,
    pub skipped: Vec<Uuid>,
    pub sealed: SealedBlob,
}

/// Builds the zip of `archive_uuid`.
pub async fn build(
    app: &App,
    archive_uuid: Uuid,
    progress: &tokio::sync::watch::Sender<(u64, Option<u64>)>,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<ArchiveBuilt, FetchError> {
    let plan = app.archive_plan(archive_uuid).await.map_err(|error| match error {
        crate::app::AppError::Domain(crate::domain::DomainError::NotFound(_)) => {
            FetchError::permanent("the archive is gone")
        }
        error => FetchError::passing(format!("planning the archive: {error}")),
    })?;
    // Entry names: made safe and unique within each folder.
    let mut by_folder: HashMap<&str, Vec<usize>> = HashMap::new();
    for (index, (_, folder)) in plan.assets.iter().enumerate() {
        by_folder.entry(folder.as_str()).or_default().push(index);
    }
    let mut names = vec![String::new(); plan.assets.len()];
    for (folder, indices) in &by_folder {
        let files: Vec<String> =
            indices.iter().map(|&index| plan.assets[index].0.asset_original_filename.clone()).collect();
        for (index, name) in indices.iter().zip(entry_names(folder, &files)) {
            names[*index] = name;
        }
    }
    let entries: Vec<ArchiveEntry> = plan
        .assets
        .iter()
        .zip(names)
        .map(|((asset, _), name)| ArchiveEntry {
            name,
            size: u64::try_from(asset.asset_file_size).unwrap_or_default(),
            media_type: asset.asset_type.clone(),
            modified: asset.asset_datetime,
        })
        .collect();
    let total: u64 = entries.iter().map(|entry| entry.size).sum();
    let locations: Vec<_> =
        plan.assets.iter().map(|(asset, _)| (asset.blob_location(), asset.asset_file_size)).collect();
    progress.send_replace((0, Some(total)));
    let mut blob = app.blobs.create_temp(archive_uuid);
    let blobs = app.blobs.clone();
    let open = |index: usize| {
        let blobs = blobs.clone();
        let (location, size) = locations[index].clone();
        async move { blobs.read(&location, 0..u64::try_from(size).unwrap_or_default()).await }
    };
    let reporter = progress.clone();
    let report = move |done: u64| {
        reporter.send_replace((done, Some(total)));
    };
    let written = write_zip(entries, open, &mut blob, report, cancel).await.map_err(|error| match error.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::UnexpectedEof => FetchError::passing(format!(
            "an asset's bytes went while the archive was being written (deleted meanwhile?): {error}; \
             the next attempt builds it without it"
        )),
        io::ErrorKind::Interrupted => FetchError::passing("stopped"),
        _ => FetchError::passing(format!("writing the archive: {error}")),
    })?;
    let sealed = blob.seal().await.map_err(|error| FetchError::passing(format!("storing the archive: {error}")))?;
    Ok(ArchiveBuilt {
        archive_uuid,
        entries: written.entries,
        archived_bytes: written.bytes_in,
        skipped: plan.skipped,
        sealed,
    })
}
