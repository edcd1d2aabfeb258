//! Where a blob's bytes are: the backend and the key in it, as the events that make
//! bytes visible record them (the blob store in `crate::blobs` reads and writes them).

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Which backend holds a blob, as events record it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// Files under `<data_dir>/blobs`.
    Local,
    /// Objects in the configured S3-compatible bucket, below its prefix.
    S3,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::S3 => "s3",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "local" => Some(Self::Local),
            "s3" => Some(Self::S3),
            _ => None,
        }
    }
}

/// Where a blob's bytes live: the backend and the key within it (relative to the
/// backend's root: the data dir's `blobs/`, or the bucket's prefix). Recorded by every
/// event that makes bytes visible, so that moving to another backend, or replaying, still
/// finds each blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct BlobLocation {
    pub backend: BackendKind,
    /// `ab/cd/<uuid>`: two shard levels from the uuid's first hex digits.
    pub key: String,
}

impl BlobLocation {
    /// Where the blob of `id` goes on `backend` (the same key on every backend).
    pub fn new(backend: BackendKind, id: Uuid) -> Self {
        Self { backend, key: key_for(id) }
    }
}

/// The key of the blob `id`: `ab/cd/<uuid>`.
pub fn key_for(id: Uuid) -> String {
    let hex = id.simple().to_string();
    format!("{}/{}/{}", &hex[0..2], &hex[2..4], id)
}

/// Whether `key` is one of ours: `ab/cd/<uuid>` with the shards of that uuid. Keys come
/// from our own events, but one that is not ours is never turned into a path or URL.
pub fn is_valid_key(key: &str) -> bool {
    let mut parts = key.split('/');
    let (Some(_), Some(_), Some(id), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    id.parse::<Uuid>().is_ok_and(|id| key_for(id) == key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_the_uuid_sharded_and_nothing_else_is_a_key() {
        let id: Uuid = "a1b2c3d4-0000-4000-8000-000000000000".parse().unwrap();
        assert_eq!(key_for(id), "a1/b2/a1b2c3d4-0000-4000-8000-000000000000");
        assert!(is_valid_key(&key_for(id)));
        for bad in [
            "",
            "../x",
            "a1/b2/../../etc/passwd",
            "ff/b2/a1b2c3d4-0000-4000-8000-000000000000",
            "a1/b2/a1b2c3d4-0000-4000-8000-000000000000/x",
            "/a1/b2/a1b2c3d4-0000-4000-8000-000000000000",
            "a1/b2/A1B2C3D4-0000-4000-8000-000000000000",
        ] {
            assert!(!is_valid_key(bad), "{bad:?}");
        }
    }
}
