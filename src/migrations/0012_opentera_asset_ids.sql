-- OpenTera mode: TeraServer's `id_asset` of an asset it created (its uuid is already
-- the asset's). Null for assets made without TeraServer.
ALTER TABLE assets ADD COLUMN opentera_id_asset BIGINT;
