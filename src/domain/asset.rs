//! The asset aggregate (`asset-<uuid>` streams): one stored file of a session. Created by
//! an upload once its bytes are durable, renamed, deleted. A deleted asset stays
//! deleted; its history remains readable.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::blob::{BackendKind, BlobLocation};
use super::names::{AssetName, Directory, FileName, MediaType, SessionId, Sha256Hex, Tags};
use super::principal::Actor;
use super::{domain_events, DomainError};

/// Where an asset's bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AssetSource {
    Upload,
    Import,
    SignedUpload,
}

impl AssetSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Upload => "upload",
            Self::Import => "import",
            Self::SignedUpload => "signed_upload",
        }
    }
}

/// The payload of `AssetUploaded`: all a consumer needs to know about the new asset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AssetUploaded {
    pub asset_uuid: Uuid,
    pub id_session: SessionId,
    pub asset_name: AssetName,
    pub asset_original_filename: FileName,
    pub asset_type: MediaType,
    pub asset_file_size: u64,
    pub asset_sha256: Sha256Hex,
    pub asset_datetime: Option<DateTime<Utc>>,
    pub directory: Directory,
    pub tags: Tags,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub asset_creator: Actor,
    pub asset_source: AssetSource,
    /// Where the bytes are stored (absent only from events recorded before backends
    /// were recorded: those are on the local backend at `key_for(asset_uuid)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob: Option<BlobLocation>,
    /// TeraServer's `id_asset`, when TeraServer made the asset (OpenTera mode: its
    /// `asset_uuid` is then TeraServer's too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_asset: Option<i64>,
}

impl AssetUploaded {
    /// Where the asset's bytes are.
    pub fn blob_location(&self) -> BlobLocation {
        self.blob.clone().unwrap_or_else(|| BlobLocation::new(BackendKind::Local, self.asset_uuid))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AssetRenamed {
    pub asset_uuid: Uuid,
    pub id_session: SessionId,
    pub previous_filename: FileName,
    pub asset_original_filename: FileName,
}

/// Why an asset was deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeletionReason {
    Requested,
    SessionDeleted,
}

/// The payload of `AssetDeleted`: which asset it was, so that a consumer can say what
/// was deleted without having kept it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AssetDeleted {
    pub asset_uuid: Uuid,
    pub id_session: SessionId,
    /// The asset's name, file name and folder when deleted (absent only from events
    /// recorded before these fields were added).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asset_name: Option<AssetName>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asset_original_filename: Option<FileName>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory: Option<Directory>,
    pub asset_sha256: Sha256Hex,
    pub asset_file_size: u64,
    pub reason: DeletionReason,
}

/// The payload of `AssetImported`: an asset a job fetched (`asset_source: "import"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AssetImported {
    #[serde(flatten)]
    pub asset: AssetUploaded,
    /// The job that made it (the asset's uuid derives from it, or is the upload's).
    pub job_uuid: Uuid,
    /// Where the bytes came from, without credentials or query secrets; absent for the
    /// import of a two-phase upload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_url: Option<String>,
    /// The two-phase upload it imported (whose uuid the asset has).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_uuid: Option<Uuid>,
}

/// The payload of `AssetCommitted`: a two-phase upload committed as an asset
/// (`asset_source: "signed_upload"`; the asset has the upload's uuid and its bytes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AssetCommitted {
    #[serde(flatten)]
    pub asset: AssetUploaded,
    pub upload_uuid: Uuid,
}

domain_events!(AssetEvent {
    AssetUploaded(AssetUploaded),
    AssetImported(AssetImported),
    AssetCommitted(AssetCommitted),
    AssetRenamed(AssetRenamed),
    AssetDeleted(AssetDeleted),
});

/// An asset's state folded from its stream.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Asset {
    pub uploaded: Option<AssetUploaded>,
    pub deleted: bool,
}

/// What may be asked of an asset.
#[derive(Debug, Clone)]
pub enum AssetCommand {
    Upload(AssetUploaded),
    Import(AssetImported),
    Commit(AssetCommitted),
    Rename(FileName),
    Delete(DeletionReason),
}

impl Asset {
    /// [`crate::domain::Aggregate::handle`].
    pub fn decide(&self, command: AssetCommand) -> Result<Vec<AssetEvent>, DomainError> {
        match command {
            AssetCommand::Upload(uploaded) => self.handle_upload(uploaded),
            AssetCommand::Import(imported) => self.handle_import(imported),
            AssetCommand::Commit(committed) => self.handle_commit(committed),
            AssetCommand::Rename(name) => self.handle_rename(name),
            AssetCommand::Delete(reason) => self.handle_delete(reason),
        }
    }

    pub fn apply(&mut self, event: &AssetEvent) {
        match event {
            AssetEvent::AssetUploaded(uploaded) => self.uploaded = Some(uploaded.clone()),
            AssetEvent::AssetImported(imported) => self.uploaded = Some(imported.asset.clone()),
            AssetEvent::AssetCommitted(committed) => self.uploaded = Some(committed.asset.clone()),
            AssetEvent::AssetRenamed(renamed) => {
                if let Some(uploaded) = &mut self.uploaded {
                    uploaded.asset_original_filename = renamed.asset_original_filename.clone();
                }
            }
            AssetEvent::AssetDeleted(_) => self.deleted = true,
        }
    }

    fn live(&self) -> Result<&AssetUploaded, DomainError> {
        match &self.uploaded {
            Some(uploaded) if !self.deleted => Ok(uploaded),
            _ => Err(DomainError::NotFound("asset")),
        }
    }

    /// Record a new asset whose bytes are already durable.
    pub fn handle_upload(&self, uploaded: AssetUploaded) -> Result<Vec<AssetEvent>, DomainError> {
        if self.uploaded.is_some() {
            return Err(DomainError::Conflict(format!("asset {} already exists", uploaded.asset_uuid)));
        }
        Ok(vec![AssetEvent::AssetUploaded(uploaded)])
    }

    /// Record an asset a job fetched (its bytes already durable).
    pub fn handle_import(&self, imported: AssetImported) -> Result<Vec<AssetEvent>, DomainError> {
        if self.uploaded.is_some() {
            return Err(DomainError::Conflict(format!("asset {} already exists", imported.asset.asset_uuid)));
        }
        Ok(vec![AssetEvent::AssetImported(imported)])
    }

    /// Record the asset a two-phase upload became (its bytes already durable).
    pub fn handle_commit(&self, committed: AssetCommitted) -> Result<Vec<AssetEvent>, DomainError> {
        if self.uploaded.is_some() {
            return Err(DomainError::Conflict(format!("asset {} already exists", committed.asset.asset_uuid)));
        }
        Ok(vec![AssetEvent::AssetCommitted(committed)])
    }

    /// Rename (OpenTera renames `asset_original_filename`). The same name again is a no-op.
    pub fn handle_rename(&self, new_name: FileName) -> Result<Vec<AssetEvent>, DomainError> {
        let live = self.live()?;
        if live.asset_original_filename == new_name {
            return Ok(vec![]);
        }
        Ok(vec![AssetEvent::AssetRenamed(AssetRenamed {
            asset_uuid: live.asset_uuid,
            id_session: live.id_session,
            previous_filename: live.asset_original_filename.clone(),
            asset_original_filename: new_name,
        })])
    }

    pub fn handle_delete(&self, reason: DeletionReason) -> Result<Vec<AssetEvent>, DomainError> {
        let live = self.live()?;
        Ok(vec![AssetEvent::AssetDeleted(AssetDeleted {
            asset_uuid: live.asset_uuid,
            id_session: live.id_session,
            asset_name: Some(live.asset_name.clone()),
            asset_original_filename: Some(live.asset_original_filename.clone()),
            directory: Some(live.directory.clone()),
            asset_sha256: live.asset_sha256.clone(),
            asset_file_size: live.asset_file_size,
            reason,
        })])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::principal::PrincipalKind;
    use crate::domain::DomainEvent;

    fn uploaded() -> AssetUploaded {
        AssetUploaded {
            asset_uuid: Uuid::new_v4(),
            id_session: SessionId::new(1).unwrap(),
            asset_name: AssetName::parse("Asset Name").unwrap(),
            asset_original_filename: FileName::parse("name.zip").unwrap(),
            asset_type: MediaType::parse("application/zip").unwrap(),
            asset_file_size: 3,
            asset_sha256: Sha256Hex::parse(&"a".repeat(64)).unwrap(),
            asset_datetime: None,
            directory: Directory::root(),
            tags: Tags::default(),
            metadata: Default::default(),
            asset_creator: Actor { kind: PrincipalKind::User, uuid: Uuid::new_v4() },
            asset_source: AssetSource::Upload,
            blob: None,
            id_asset: None,
        }
    }

    fn given(events: &[AssetEvent]) -> Asset {
        let mut asset = Asset::default();
        events.iter().for_each(|e| asset.apply(e));
        asset
    }

    #[test]
    fn upload_creates_once() {
        let events = Asset::default().handle_upload(uploaded()).unwrap();
        assert_eq!(events.len(), 1);
        assert!(matches!(given(&events).handle_upload(uploaded()), Err(DomainError::Conflict(_))));
    }

    #[test]
    fn rename_changes_the_original_filename_and_same_name_is_a_no_op() {
        let asset = given(&[AssetEvent::AssetUploaded(uploaded())]);
        assert_eq!(asset.handle_rename(FileName::parse("name.zip").unwrap()).unwrap(), vec![]);
        let renamed = asset.handle_rename(FileName::parse("new.zip").unwrap()).unwrap();
        let mut after = asset.clone();
        renamed.iter().for_each(|e| after.apply(e));
        assert_eq!(after.uploaded.unwrap().asset_original_filename.as_str(), "new.zip");
    }

    #[test]
    fn deleted_assets_cannot_be_renamed_or_deleted_again() {
        let asset = given(&[AssetEvent::AssetUploaded(uploaded())]);
        let deleted = asset.handle_delete(DeletionReason::Requested).unwrap();
        let mut after = asset.clone();
        deleted.iter().for_each(|e| after.apply(e));
        assert_eq!(after.handle_delete(DeletionReason::Requested), Err(DomainError::NotFound("asset")));
        assert_eq!(after.handle_rename(FileName::parse("x").unwrap()), Err(DomainError::NotFound("asset")));
        assert_eq!(Asset::default().handle_delete(DeletionReason::Requested), Err(DomainError::NotFound("asset")));
    }

    #[test]
    fn deletions_say_what_was_deleted_and_older_ones_still_read() {
        let asset = given(&[AssetEvent::AssetUploaded(uploaded())]);
        let renamed = asset.handle_rename(FileName::parse("new.zip").unwrap()).unwrap();
        let mut after = asset.clone();
        renamed.iter().for_each(|e| after.apply(e));
        let [AssetEvent::AssetDeleted(deleted)] = &after.handle_delete(DeletionReason::Requested).unwrap()[..] else {
            panic!("one AssetDeleted")
        };
        assert_eq!(deleted.asset_name.as_ref().map(AssetName::as_str), Some("Asset Name"));
        assert_eq!(deleted.asset_original_filename.as_ref().map(FileName::as_str), Some("new.zip"));
        assert_eq!(deleted.directory, Some(Directory::root()));
        // As recorded before those fields existed.
        let older = serde_json::json!({"asset_uuid": Uuid::new_v4(), "id_session": 1, "asset_sha256": "a".repeat(64),
                                       "asset_file_size": 3, "reason": "requested"});
        let AssetEvent::AssetDeleted(older) = AssetEvent::from_parts("AssetDeleted", &older).unwrap().unwrap() else {
            panic!("an AssetDeleted")
        };
        assert_eq!(older.asset_name, None);
    }

    #[test]
    fn events_round_trip_through_json() {
        let event = AssetEvent::AssetUploaded(uploaded());
        assert_eq!(AssetEvent::from_parts(event.event_type(), &event.to_data()).unwrap().unwrap(), event);
        assert!(AssetEvent::from_parts("SomethingElse", &serde_json::json!({})).is_none());
    }
}
