-- Read models, updated in the same transaction as the append (src/projections) and
-- rebuilt from the events alone by `assetd replay`.
CREATE TABLE sessions (
    id_session           bigint      PRIMARY KEY,
    session_uuid         uuid        NOT NULL,
    session_name         text        NOT NULL,
    id_creator_uuid      uuid,
    session_users        uuid[]      NOT NULL,
    session_participants uuid[]      NOT NULL,
    session_devices      uuid[]      NOT NULL,
    created_at           timestamptz NOT NULL,
    updated_at           timestamptz NOT NULL,
    version              bigint      NOT NULL
);

CREATE TABLE assets (
    asset_uuid              uuid        PRIMARY KEY,
    id_session              bigint      NOT NULL,
    asset_name              text        NOT NULL,
    asset_original_filename text        NOT NULL,
    asset_type              text        NOT NULL,
    asset_file_size         bigint      NOT NULL,
    asset_sha256            text        NOT NULL,
    asset_datetime          timestamptz NOT NULL,
    directory               text        NOT NULL,
    tags                    jsonb       NOT NULL,
    metadata                jsonb       NOT NULL,
    asset_status            text        NOT NULL,
    asset_created_at        timestamptz NOT NULL,
    creator_kind            text        NOT NULL,
    creator_uuid            uuid        NOT NULL,
    asset_source            text        NOT NULL,
    asset_version           bigint      NOT NULL
);
-- Session listings: newest first, keyset-paginated, live assets only.
CREATE INDEX assets_session_listing ON assets (id_session, asset_created_at DESC, asset_uuid DESC)
    WHERE asset_status = 'available';
