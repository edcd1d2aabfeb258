-- Two-phase uploads (API.md "Signed URLs and two-phase uploads"): the read model of the
-- upload-<uuid> streams, rebuilt by replay.
CREATE TABLE uploads (
    upload_uuid       uuid        PRIMARY KEY,
    id_session        bigint      NOT NULL,
    filename          text        NOT NULL,
    mime_type         text,
    expected_size     bigint,
    expected_sha256   text,
    -- pending | received | importing | committed | failed | expired
    status            text        NOT NULL,
    size              bigint,
    sha256            text,
    content_type      text,
    blob_backend      text,
    blob_key          text,
    asset_uuid        uuid,
    job_uuid          uuid,
    error             text,
    creator_kind      text        NOT NULL,
    creator_uuid      uuid        NOT NULL,
    requested_by_kind text        NOT NULL,
    requested_by_uuid uuid        NOT NULL,
    expires_at        timestamptz NOT NULL,
    created_at        timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL,
    version           bigint      NOT NULL,
    created_position  bigint      NOT NULL
);
-- What the expiry job looks for.
CREATE INDEX uploads_expiring ON uploads (expires_at) WHERE status IN ('pending', 'received');

-- A job may work on no session (the expiry of uploads).
ALTER TABLE jobs ALTER COLUMN id_session DROP NOT NULL;
