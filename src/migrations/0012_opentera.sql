-- OpenTera mode. Assets: TeraServer's `id_asset` of an asset it created (its uuid is
-- already the asset's); null for assets made without TeraServer. Archives: who uploaded
-- an archive built outside assetd (OpenTera's AssetsArchiveWorker), and FTS's integer
-- archive id (`id_archive_file_data`), which is the archive's `created_position`.
ALTER TABLE assets ADD COLUMN opentera_id_asset BIGINT;
ALTER TABLE archives ADD COLUMN uploader_uuid uuid;
CREATE INDEX archives_created_position ON archives (created_position);
