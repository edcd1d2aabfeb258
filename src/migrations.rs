//! Schema migrations, applied in order by `assetd migrate` and at `serve` start.
//! Idempotent and safe when several processes start at once: an advisory lock
//! serialises them and `schema_migrations` records what is applied.

/// (version, name, SQL). Append only: never edit a migration that has shipped.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "events", include_str!("migrations/0001_events.sql")),
    (2, "projections", include_str!("migrations/0002_projections.sql")),
    (3, "causation_index", include_str!("migrations/0003_causation_index.sql")),
    (4, "command_receipts", include_str!("migrations/0004_command_receipts.sql")),
    (5, "session_registrations", include_str!("migrations/0005_session_registrations.sql")),
    (6, "jobs", include_str!("migrations/0006_jobs.sql")),
    (7, "blob_locations", include_str!("migrations/0007_blob_locations.sql")),
    (8, "read_model_notifications", include_str!("migrations/0008_read_model_notifications.sql")),
    (9, "uploads", include_str!("migrations/0009_uploads.sql")),
    (10, "archives", include_str!("migrations/0010_archives.sql")),
    (11, "orphan_candidates", include_str!("migrations/0011_orphan_candidates.sql")),
    (12, "opentera", include_str!("migrations/0012_opentera.sql")),
];

/// An arbitrary constant naming the migration lock.
const MIGRATION_LOCK_KEY: i64 = 0x6173_7365_7464_6d67;

/// Applies every migration not yet applied; returns how many were.
pub async fn run(client: &mut deadpool_postgres::Client) -> Result<usize, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY]).await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version    integer     PRIMARY KEY,
             name       text        NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await?;
    let applied: Vec<i32> =
        tx.query("SELECT version FROM schema_migrations", &[]).await?.iter().map(|row| row.get(0)).collect();
    let mut count = 0;
    for (version, name, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        tx.batch_execute(sql).await?;
        tx.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", &[version, name]).await?;
        count += 1;
    }
    tx.commit().await?;
    Ok(count)
}
