-- The event store: the only source of truth. See DESIGN.md "Event store".
CREATE TABLE events (
    position    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream      text        NOT NULL,
    version     bigint      NOT NULL CHECK (version > 0),
    id          uuid        NOT NULL,
    type        text        NOT NULL,
    data        jsonb       NOT NULL,
    metadata    jsonb       NOT NULL,
    -- The writing transaction's id: readers of the global log order by (tx, position)
    -- and only read transactions older than every running one, so none is skipped.
    tx          xid8        NOT NULL DEFAULT pg_current_xact_id(),
    recorded_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT events_stream_version_key UNIQUE (stream, version),
    CONSTRAINT events_id_key UNIQUE (id)
);
CREATE INDEX events_global_order ON events (tx, position);

-- Where each reader of the global log (relay, catch-up projections) has got to.
CREATE TABLE checkpoints (
    name     text   PRIMARY KEY,
    tx       xid8   NOT NULL,
    position bigint NOT NULL
);
