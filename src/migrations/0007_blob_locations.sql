-- Where each asset's bytes are (DESIGN.md "Blob store"): the backend and key its event
-- recorded. NULL for assets recorded before backends were: local, at the uuid's key.
ALTER TABLE assets ADD COLUMN blob_backend text, ADD COLUMN blob_key text;
