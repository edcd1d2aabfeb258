-- Blobs the cleanup found unreferenced (and old), by backend and key: one is removed
-- only when a later cleanup, at least the grace period after, finds it unreferenced
-- again, so bytes stored a moment before their record (an S3 object written in parts
-- carries the time its upload started) are never taken for orphans. Not a read model.
CREATE TABLE orphan_candidates (
    backend text        NOT NULL,
    key     text        NOT NULL,
    seen_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (backend, key)
);
