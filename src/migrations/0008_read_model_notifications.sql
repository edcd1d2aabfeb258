-- Every change to an asset or session row is announced on the channel
-- `assetd_read_models` when its transaction commits, so that each process can drop
-- what it keeps of that row (src/app/read_cache.rs): `a:<asset uuid>`, `s:<id_session>`,
-- or `*` when a table is emptied (replay). Inserts need no announcement: nothing is
-- kept of a row before it exists.
CREATE FUNCTION assetd_announce_asset_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('assetd_read_models', 'a:' || OLD.asset_uuid::text);
    RETURN NULL;
END
$$;
CREATE TRIGGER assets_announce_change AFTER UPDATE OR DELETE ON assets
    FOR EACH ROW EXECUTE FUNCTION assetd_announce_asset_change();

CREATE FUNCTION assetd_announce_session_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('assetd_read_models', 's:' || OLD.id_session::text);
    RETURN NULL;
END
$$;
CREATE TRIGGER sessions_announce_change AFTER UPDATE OR DELETE ON sessions
    FOR EACH ROW EXECUTE FUNCTION assetd_announce_session_change();

CREATE FUNCTION assetd_announce_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('assetd_read_models', '*');
    RETURN NULL;
END
$$;
CREATE TRIGGER assets_announce_truncate AFTER TRUNCATE ON assets
    FOR EACH STATEMENT EXECUTE FUNCTION assetd_announce_truncate();
CREATE TRIGGER sessions_announce_truncate AFTER TRUNCATE ON sessions
    FOR EACH STATEMENT EXECUTE FUNCTION assetd_announce_truncate();
