//! Configuration, read once into typed structs: `ASSETD_*` environment variables, also
//! accepted as command-line flags, with working defaults for local use. Secrets have no
//! defaults; `scripts/up` generates them into a local env file.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Where the database is.
#[derive(clap::Args, Clone, Debug)]
pub struct DatabaseConfig {
    /// Postgres URL of assetd's database.
    #[arg(long, env = "ASSETD_DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:5432/assetd")]
    pub database_url: String,
    /// Largest number of pooled database connections.
    #[arg(long, env = "ASSETD_DATABASE_POOL_SIZE", default_value_t = 32)]
    pub database_pool_size: usize,
}

/// The S3 backend's tuning (see `blobs::s3`).
#[derive(clap::Args, Clone, Debug)]
pub struct S3Settings {
    /// Size of each part of a multipart upload, in bytes (5 MiB to 5 GiB); a smaller
    /// blob goes in one PUT.
    #[arg(long = "s3-part-size", env = "ASSETD_S3_PART_SIZE", default_value_t = 8 << 20)]
    pub part_size: usize,
    /// Parts of one upload sent at once.
    #[arg(long = "s3-parts-in-flight", env = "ASSETD_S3_PARTS_IN_FLIGHT", default_value_t = 2)]
    pub parts_in_flight: usize,
    /// Parts held in memory at once by all uploads together (each one part size).
    #[arg(long = "s3-parts-in-memory", env = "ASSETD_S3_PARTS_IN_MEMORY", default_value_t = 8)]
    pub parts_in_memory: usize,
    /// When above 0, plain whole downloads answer 302 to a presigned GET URL of the
    /// object, valid this many seconds (the S3 counterpart of X-Accel-Redirect).
    #[arg(long = "s3-presigned-seconds", env = "ASSETD_S3_PRESIGNED_SECONDS", default_value_t = 0)]
    pub presigned_seconds: u64,
    /// `object_store` settings applied over the `AWS_*` environment (`aws_endpoint`,
    /// …): for embedding and tests, which must not change the process's environment.
    #[arg(skip)]
    pub aws_overrides: Vec<(String, String)>,
}

impl Default for S3Settings {
    fn default() -> Self {
        Self { part_size: 8 << 20, parts_in_flight: 2, parts_in_memory: 8, presigned_seconds: 0, aws_overrides: vec![] }
    }
}

/// Everything `assetd serve` needs.
#[derive(clap::Args, Clone, Debug)]
pub struct ServeConfig {
    #[command(flatten)]
    pub database: DatabaseConfig,
    /// Address to listen on (OpenTera's port for this service by default).
    #[arg(long, env = "ASSETD_LISTEN", default_value = "127.0.0.1:4042")]
    pub listen: SocketAddr,
    /// Path prefix of every route, as seen through nginx too: `/file` by default; the
    /// root in OpenTera mode, whose nginx strips `/file` (`/` names the root).
    #[arg(long, env = "ASSETD_BASE_PATH", value_parser = parse_base_path)]
    pub base_path: Option<String>,
    /// OpenTera mode (off unless `ASSETD_OPENTERA_REDIS` is set).
    #[command(flatten)]
    pub opentera: crate::opentera::OpenTeraConfig,
    /// Directory for blobs and temporary files.
    #[arg(long, env = "ASSETD_DATA_DIR", default_value = "./var/data")]
    pub data_dir: PathBuf,
    /// Where blobs go: `local` (files under the data dir) or `s3://bucket[/prefix]` (an
    /// S3-compatible bucket, which must exist; endpoint, region and credentials from
    /// `AWS_ENDPOINT`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_ALLOW_HTTP`). Blobs already stored stay readable where their events say.
    #[arg(long, env = "ASSETD_BLOBS", default_value = "local")]
    pub blobs: String,
    #[command(flatten)]
    pub s3: S3Settings,
    /// Largest accepted upload, in bytes.
    #[arg(long, env = "ASSETD_MAX_UPLOAD_SIZE", default_value_t = 10 * 1024 * 1024 * 1024)]
    pub max_upload_size: u64,
    /// HS256 secret that signs principal tokens (and, derived, asset access tokens).
    #[arg(long, env = "ASSETD_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: String,
    /// HMAC-SHA256 key of signed URLs (download URLs, upload URLs); not the JWT secret.
    #[arg(long, env = "ASSETD_URL_SIGNING_KEY", hide_env_values = true)]
    pub url_signing_key: String,
    /// The key before the last rotation: URLs it signed still verify (never signs).
    #[arg(long, env = "ASSETD_URL_SIGNING_KEY_PREVIOUS", hide_env_values = true)]
    pub url_signing_key_previous: Option<String>,
    /// How long a signed download URL is valid when `expires_in` is not given, in seconds.
    #[arg(long, env = "ASSETD_SIGNED_URL_SECONDS", default_value_t = 15 * 60)]
    pub signed_url_seconds: u64,
    /// The longest a signed download URL may be valid, in seconds (longer asks are cut to it).
    #[arg(long, env = "ASSETD_SIGNED_URL_MAX_SECONDS", default_value_t = 7 * 24 * 3600)]
    pub signed_url_max_seconds: u64,
    /// How long a two-phase upload (and its upload URL) lives before it expires unless
    /// committed or imported, in seconds.
    #[arg(long, env = "ASSETD_UPLOAD_TTL", default_value_t = 24 * 3600)]
    pub upload_ttl_seconds: u64,
    /// When set, downloads answer with `X-Accel-Redirect: <prefix><ab>/<cd>/<uuid>` and
    /// nginx sends the bytes (its internal location aliases `<data_dir>/blobs/`).
    #[arg(long, env = "ASSETD_ACCEL_REDIRECT_PREFIX")]
    pub accel_redirect_prefix: Option<String>,
    /// `scheme://host[:port]` clients reach assetd at (e.g. https://files.example.org),
    /// for the absolute URLs in answers; taken from the request's Host and
    /// X-Forwarded-* headers when unset.
    #[arg(long, env = "ASSETD_PUBLIC_URL", value_parser = parse_public_url)]
    pub public_url: Option<String>,
    /// How long principal tokens may live, by kind.
    #[command(flatten)]
    pub token_limits: crate::auth::TokenLimits,
    /// Lifetime of the asset access tokens handed out, in seconds.
    #[arg(long, env = "ASSETD_ASSET_TOKEN_TTL", default_value_t = 3600)]
    pub asset_token_ttl: i64,
    /// A request body that delivers nothing for this many seconds is abandoned (408).
    #[arg(long, env = "ASSETD_BODY_IDLE_TIMEOUT", default_value_t = 60)]
    pub body_idle_timeout_seconds: u64,
    /// RabbitMQ, where every event is published (see EVENTS.md).
    #[arg(
        long,
        env = "ASSETD_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    pub amqp_url: String,
    /// Prefix of the AMQP names: events go to the `<prefix>.events` topic exchange.
    #[arg(long, env = "ASSETD_AMQP_PREFIX", default_value = "assetd")]
    pub amqp_prefix: String,
    /// Whether this process runs the outbox relay (only one relay publishes at a time
    /// across processes, whatever this says).
    #[arg(long, env = "ASSETD_RELAY", default_value_t = true, action = clap::ArgAction::Set)]
    pub relay: bool,
    /// Whether this process consumes the `<prefix>.commands` queue (several may).
    #[arg(long, env = "ASSETD_COMMANDS", default_value_t = true, action = clap::ArgAction::Set)]
    pub commands: bool,
    /// Job workers and imports.
    #[command(flatten)]
    pub jobs: JobsConfig,
    /// On SIGTERM, how long in-flight requests may take to finish, in seconds.
    #[arg(long, env = "ASSETD_SHUTDOWN_GRACE", default_value_t = 30)]
    pub shutdown_grace_seconds: u64,
}

/// How jobs run (EVENTS.md "Jobs").
/// The shortest and longest job lease, in seconds (`ASSETD_JOB_LEASE_SECONDS` is held
/// between them).
pub const MIN_LEASE_SECONDS: u64 = 3;
pub const MAX_LEASE_SECONDS: u64 = 24 * 3600;
/// The longest delay between two attempts (a week), whatever is configured.
pub const MAX_RETRY_DELAY_MS: u64 = 7 * 24 * 3600 * 1000;

#[derive(clap::Args, Clone, Debug)]
pub struct JobsConfig {
    /// Whether `serve` runs job workers too (`assetd worker` runs only them).
    #[arg(long, env = "ASSETD_WORKERS", default_value_t = true, action = clap::ArgAction::Set)]
    pub workers: bool,
    /// Imports one worker runs at once.
    #[arg(long, env = "ASSETD_IMPORT_CONCURRENCY", default_value_t = 4)]
    pub import_concurrency: usize,
    /// Attempts an import gets before it fails for good.
    #[arg(long, env = "ASSETD_IMPORT_MAX_ATTEMPTS", default_value_t = 5)]
    pub import_max_attempts: u32,
    /// The first retry's delay, in milliseconds; each next one doubles (with jitter).
    #[arg(long, env = "ASSETD_JOB_RETRY_BASE_MS", default_value_t = 2_000)]
    pub retry_base_ms: u64,
    /// The longest delay between two attempts, in milliseconds.
    #[arg(long, env = "ASSETD_JOB_RETRY_MAX_MS", default_value_t = 600_000)]
    pub retry_max_ms: u64,
    /// How long a running attempt is its worker's without a word from it, in seconds
    /// (workers report every second while they make progress); 3 to 86400.
    #[arg(long, env = "ASSETD_JOB_LEASE_SECONDS", default_value_t = 30)]
    pub lease_seconds: u64,
    /// Hosts, addresses and CIDR networks imports may reach although not public
    /// (comma-separated), e.g. `files.internal,10.0.0.0/8`.
    #[arg(long, env = "ASSETD_IMPORT_ALLOWLIST", default_value = "")]
    pub import_allowlist: String,
    /// Seconds an import may take to connect.
    #[arg(long, env = "ASSETD_IMPORT_CONNECT_TIMEOUT", default_value_t = 10)]
    pub import_connect_timeout: u64,
    /// Seconds an import's source may stay silent.
    #[arg(long, env = "ASSETD_IMPORT_READ_TIMEOUT", default_value_t = 30)]
    pub import_read_timeout: u64,
    /// Seconds a whole fetch may take.
    #[arg(long, env = "ASSETD_IMPORT_TIMEOUT", default_value_t = 3_600)]
    pub import_timeout: u64,
    /// A PEM file of certificate authorities imports trust besides the public ones
    /// (internal sources with a private CA).
    #[arg(long, env = "ASSETD_IMPORT_CA_FILE")]
    pub import_ca_file: Option<std::path::PathBuf>,
    /// Seconds a completed archive is kept before it expires (7 days).
    #[arg(long, env = "ASSETD_ARCHIVE_TTL", default_value_t = 7 * 86_400)]
    pub archive_ttl_seconds: u64,
    /// Seconds between two cleanups (expiries, orphan blobs, temporary files, old
    /// receipts); 0 turns the scheduled cleanup off.
    #[arg(long, env = "ASSETD_CLEANUP_INTERVAL", default_value_t = 3_600)]
    pub cleanup_interval_seconds: u64,
    /// Seconds a blob nothing refers to is left alone before the cleanup removes it
    /// (bytes being recorded right now are younger).
    #[arg(long, env = "ASSETD_ORPHAN_GRACE", default_value_t = 3_600)]
    pub orphan_grace_seconds: u64,
    /// Seconds the receipts of AMQP commands are kept (a message redelivered later than
    /// this would run again): 30 days.
    #[arg(long, env = "ASSETD_RECEIPT_MAX_AGE", default_value_t = 30 * 86_400)]
    pub receipt_max_age_seconds: u64,
}

impl ServeConfig {
    /// The base path in effect: as set, else `/file`, or the root in OpenTera mode.
    pub fn base_path(&self) -> String {
        match &self.base_path {
            Some(path) => path.clone(),
            None if self.opentera.opentera_redis.is_some() => String::new(),
            None => "/file".into(),
        }
    }
}

impl Default for JobsConfig {
    /// As the command line's defaults.
    fn default() -> Self {
        Self {
            workers: true,
            import_concurrency: 4,
            import_max_attempts: 5,
            retry_base_ms: 2_000,
            retry_max_ms: 600_000,
            lease_seconds: 30,
            import_allowlist: String::new(),
            import_connect_timeout: 10,
            import_read_timeout: 30,
            import_timeout: 3_600,
            import_ca_file: None,
            archive_ttl_seconds: 7 * 86_400,
            cleanup_interval_seconds: 3_600,
            orphan_grace_seconds: 3_600,
            receipt_max_age_seconds: 30 * 86_400,
        }
    }
}

impl JobsConfig {
    pub fn backoff(&self) -> crate::jobs::Backoff {
        crate::jobs::Backoff {
            base: std::time::Duration::from_millis(self.retry_base_ms.clamp(1, MAX_RETRY_DELAY_MS)),
            max: std::time::Duration::from_millis(
                self.retry_max_ms.max(self.retry_base_ms).clamp(1, MAX_RETRY_DELAY_MS),
            ),
        }
    }

    /// How long a running attempt is its worker's: at least [`MIN_LEASE_SECONDS`], so
    /// that a worker renewing every third of it (and looking every second) always
    /// notices a lost lease before another attempt can have gone far.
    pub fn lease(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.lease_seconds.clamp(MIN_LEASE_SECONDS, MAX_LEASE_SECONDS))
    }

    pub fn cleanup_policy(&self) -> crate::app::cleanup::CleanupPolicy {
        use std::time::Duration;
        crate::app::cleanup::CleanupPolicy {
            orphan_grace: Duration::from_secs(self.orphan_grace_seconds),
            receipt_max_age: Duration::from_secs(self.receipt_max_age_seconds),
            ..Default::default()
        }
    }

    /// How long a completed archive is kept (at most a century: the time must stay
    /// representable).
    pub fn archive_ttl(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.archive_ttl_seconds.clamp(1, 100 * 365 * 86_400))
    }

    /// How often the scheduler queues a cleanup; none when turned off.
    pub fn cleanup_every(&self) -> Option<std::time::Duration> {
        (self.cleanup_interval_seconds > 0).then(|| std::time::Duration::from_secs(self.cleanup_interval_seconds))
    }

    pub fn import_policy(&self) -> crate::app::jobs::JobPolicy {
        crate::app::jobs::JobPolicy { max_attempts: self.import_max_attempts.max(1) }
    }

    pub fn fetch_settings(&self, max_size: u64) -> Result<crate::jobs::fetch::FetchSettings, String> {
        use std::time::Duration;
        Ok(crate::jobs::fetch::FetchSettings {
            allow: crate::jobs::fetch::AllowList::parse(&self.import_allowlist)
                .map_err(|error| format!("ASSETD_IMPORT_ALLOWLIST: {error}"))?,
            connect_timeout: Duration::from_secs(self.import_connect_timeout.max(1)),
            read_timeout: Duration::from_secs(self.import_read_timeout.max(1)),
            total_timeout: Duration::from_secs(self.import_timeout.max(1)),
            max_size,
            extra_roots: match &self.import_ca_file {
                Some(path) => crate::jobs::fetch::read_certificates(path)
                    .map_err(|error| format!("ASSETD_IMPORT_CA_FILE: {error}"))?,
                None => Vec::new(),
            },
        })
    }
}

fn parse_base_path(value: &str) -> Result<String, String> {
    let trimmed = value.trim_matches('/');
    if trimmed.is_empty() {
        return Ok(String::new());
    }
    if trimmed.split('/').any(|s| s.is_empty() || !s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))) {
        return Err("a path like /file (letters, digits, '-', '_', '.')".into());
    }
    Ok(format!("/{trimmed}"))
}

fn parse_public_url(value: &str) -> Result<String, String> {
    let trimmed = value.trim().trim_end_matches('/');
    let rest = trimmed.strip_prefix("https://").or_else(|| trimmed.strip_prefix("http://"));
    match rest {
        Some(host) if !host.is_empty() && host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b)) => {
            Ok(trimmed.to_owned())
        }
        _ => Err("an origin like https://files.example.org (scheme, host, optional port; no path)".into()),
    }
}

impl DatabaseConfig {
    pub fn pool(&self) -> anyhow::Result<deadpool_postgres::Pool> {
        let pg: tokio_postgres::Config = self.database_url.parse()?;
        let manager = deadpool_postgres::Manager::from_config(
            pg,
            tokio_postgres::NoTls,
            deadpool_postgres::ManagerConfig { recycling_method: deadpool_postgres::RecyclingMethod::Fast },
        );
        Ok(deadpool_postgres::Pool::builder(manager)
            .max_size(self.database_pool_size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(std::time::Duration::from_secs(10)))
            .create_timeout(Some(std::time::Duration::from_secs(5)))
            .build()?)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn base_paths_are_normalised() {
        assert_eq!(super::parse_base_path("file").unwrap(), "/file");
        assert_eq!(super::parse_base_path("/api/file/").unwrap(), "/api/file");
        // The root (OpenTera mode's default): routes start at /api.
        assert_eq!(super::parse_base_path("/").unwrap(), "");
        assert!(super::parse_base_path("/a b").is_err());
        assert_eq!(super::parse_public_url("https://files.example.org/").unwrap(), "https://files.example.org");
        assert!(super::parse_public_url("files.example.org").is_err());
        assert!(super::parse_public_url("https://x.org/file").is_err());
    }
}
