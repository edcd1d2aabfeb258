-- A session deleted and registered again is a new session: the assets of the earlier
-- registration (all deleted with it) must stay closed to the new members. Each session
-- row remembers the global position of the registration it stands for, each asset the
-- position of the event that created it; an asset belongs to the session's current
-- registration when it was created after that registration (src/projections/read.rs,
-- SessionInfo::owns). Positions, not timestamps: an upload is appended after it read
-- the registered session, so its position is always the larger one.
ALTER TABLE sessions ADD COLUMN registered_position bigint NOT NULL DEFAULT 0;
ALTER TABLE assets ADD COLUMN created_position bigint NOT NULL DEFAULT 0;
UPDATE sessions s SET registered_position = coalesce((
    SELECT max(e.position) FROM events e
    WHERE e.stream = 'session-' || s.id_session AND e.type = 'SessionRegistered'), 0);
UPDATE assets a SET created_position = coalesce((
    SELECT e.position FROM events e WHERE e.stream = 'asset-' || a.asset_uuid AND e.version = 1), 0);
ALTER TABLE sessions ALTER COLUMN registered_position DROP DEFAULT;
ALTER TABLE assets ALTER COLUMN created_position DROP DEFAULT;
