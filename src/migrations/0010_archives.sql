-- Archives (API.md "Jobs: imports and archives"): the read model of the archive-<uuid>
-- streams, rebuilt by replay.
CREATE TABLE archives (
    archive_uuid      uuid        PRIMARY KEY,
    job_uuid          uuid        NOT NULL,
    id_session        bigint,
    owner_kind        text        NOT NULL,
    owner_uuid        uuid        NOT NULL,
    -- pending | in_progress | completed | failed | expired | deleted
    status            text        NOT NULL,
    filename          text        NOT NULL,
    size              bigint,
    sha256            text,
    entries           bigint,
    skipped_assets    uuid[]      NOT NULL,
    blob_backend      text,
    blob_key          text,
    error             text,
    completed_at      timestamptz,
    expires_at        timestamptz,
    created_at        timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL,
    version           bigint      NOT NULL,
    created_position  bigint      NOT NULL
);
-- What the cleanup looks for.
CREATE INDEX archives_expiring ON archives (expires_at) WHERE status = 'completed';

-- The orphan sweep asks, for each blob it finds, whether anything refers to its key.
CREATE INDEX assets_by_blob_key ON assets (blob_key) WHERE blob_key IS NOT NULL;
CREATE INDEX uploads_by_blob_key ON uploads (blob_key) WHERE blob_key IS NOT NULL;
CREATE INDEX archives_by_blob_key ON archives (blob_key) WHERE blob_key IS NOT NULL;
-- The cleanup of old receipts.
CREATE INDEX command_receipts_by_age ON command_receipts (received_at);
-- The scheduler looks for the last cleanup.
CREATE INDEX jobs_by_kind ON jobs (kind, created_at DESC);
