//! The command line: `assetd serve | migrate | replay | openapi | contract | token`.

use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use uuid::Uuid;

use crate::app::App;
use crate::auth::Authenticator;
use crate::blobs::BlobStore;
use crate::config::{DatabaseConfig, ServeConfig};
use crate::domain::principal::{Principal, PrincipalKind};
use crate::http::{self, Context, HttpSettings};

#[derive(Parser)]
#[command(name = "assetd", version, about = "Stores the files of sessions; see README.md")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP API (migrating the database first).
    Serve(Box<ServeConfig>),
    /// Run only job workers (and the job scheduler), to scale them apart from `serve`.
    Worker(Box<ServeConfig>),
    /// Apply database migrations and exit.
    Migrate(DatabaseConfig),
    /// Rebuild the read models from the events.
    Replay(DatabaseConfig),
    /// Print the OpenAPI document.
    Openapi {
        #[arg(long, env = "ASSETD_BASE_PATH", default_value = "/file")]
        base_path: String,
    },
    /// Write the AMQP contract files: AsyncAPI document and JSON Schemas.
    Contract {
        /// The directory to write `asyncapi.json` and `schemas/` into.
        #[arg(long, default_value = "events")]
        out: std::path::PathBuf,
        /// The AMQP names' prefix (not read from ASSETD_AMQP_PREFIX: the checked-in
        /// files use the default).
        #[arg(long, default_value = "assetd")]
        prefix: String,
    },
    /// Queue a job that expires the two-phase uploads past their time (removing their
    /// bytes), print its uuid and exit; a worker runs it.
    ExpireUploads(Box<ServeConfig>),
    /// Mint a principal token for development and tests.
    Token(TokenArgs),
}

#[derive(clap::Args)]
struct TokenArgs {
    /// user, participant, device or service.
    #[arg(long, default_value = "service")]
    kind: String,
    /// The principal's uuid (random when omitted).
    #[arg(long)]
    sub: Option<Uuid>,
    #[arg(long, default_value = "dev")]
    name: String,
    #[arg(long)]
    superadmin: bool,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 86_400)]
    lifetime: i64,
    #[arg(long, env = "ASSETD_JWT_SECRET", hide_env_values = true)]
    jwt_secret: String,
    /// The lifetimes `serve` accepts: a longer token would be refused, so it is not minted.
    #[command(flatten)]
    limits: crate::auth::TokenLimits,
}

pub async fn run() -> anyhow::Result<()> {
    init_logging();
    match Cli::parse().command {
        Command::Serve(config) => serve(*config).await,
        Command::Worker(config) => worker(*config).await,
        Command::ExpireUploads(config) => {
            let ctx = build_context(&config).await?;
            let system = crate::app::CommandContext {
                actor: crate::domain::principal::Actor { kind: PrincipalKind::Service, uuid: Uuid::nil() },
                request_id: format!("cli-{}", Uuid::new_v4()),
                correlation_id: format!("cli-{}", Uuid::new_v4()),
                message: None,
            };
            let job = ctx.app.request_upload_expiry(&system, config.jobs.import_policy()).await?;
            println!("{job}");
            Ok(())
        }
        Command::Migrate(db) => {
            let pool = db.pool()?;
            let applied = crate::migrations::run(&mut pool.get().await.context("connecting to the database")?).await?;
            println!("{applied} migration(s) applied");
            Ok(())
        }
        Command::Replay(db) => {
            let pool = db.pool()?;
            let mut client = pool.get().await.context("connecting to the database")?;
            crate::migrations::run(&mut client).await?;
            let started = std::time::Instant::now();
            let events = crate::projections::replay(&mut client).await?;
            let seconds = started.elapsed().as_secs_f64();
            println!("replayed {events} events in {seconds:.2} s ({:.0} events/s)", events as f64 / seconds.max(1e-9));
            Ok(())
        }
        Command::Openapi { base_path } => {
            println!("{}", serde_json::to_string_pretty(&http::openapi::document(&base_path))?);
            Ok(())
        }
        Command::Contract { out, prefix } => {
            let written = crate::contract::write(&out, &prefix)
                .with_context(|| format!("writing the contract files to {}", out.display()))?;
            println!("{written} file(s) written to {}", out.display());
            Ok(())
        }
        Command::Token(args) => {
            let kind =
                PrincipalKind::parse(&args.kind).context("--kind must be user, participant, device or service")?;
            anyhow::ensure!(!args.superadmin || kind == PrincipalKind::User, "only users can be superadmins");
            let limits = args.limits;
            anyhow::ensure!(
                args.lifetime <= limits.max_lifetime(kind),
                "--lifetime: at most {} s for a {} token (see ASSETD_MAX_*_TOKEN_LIFETIME)",
                limits.max_lifetime(kind),
                kind.as_str()
            );
            let principal = Principal {
                kind,
                uuid: args.sub.unwrap_or_else(Uuid::new_v4),
                name: args.name,
                superadmin: args.superadmin,
            };
            println!("{}", Authenticator::new(&args.jwt_secret).mint(&principal, args.lifetime));
            Ok(())
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ASSETD_LOG").unwrap_or_else(|_| "info".into());
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Builds the application from `config`: pool, migrations, blob store.
pub async fn build_context(config: &ServeConfig) -> anyhow::Result<Context> {
    anyhow::ensure!(!config.jwt_secret.is_empty(), "ASSETD_JWT_SECRET must not be empty");
    anyhow::ensure!(!config.url_signing_key.is_empty(), "ASSETD_URL_SIGNING_KEY must not be empty");
    let pool = config.database.pool()?;
    let mut client = pool.get().await.context("connecting to the database")?;
    crate::migrations::run(&mut client).await.context("migrating the database")?;
    drop(client);
    let blobs = BlobStore::open_configured(&config.data_dir, &config.blobs, &config.s3, config.max_upload_size)
        .await
        .with_context(|| {
        format!("opening the blob store ({}, data dir {})", config.blobs, config.data_dir.display())
    })?;
    let auth = Authenticator::with_limits(&config.jwt_secret, config.token_limits);
    let mut app = App::new(pool, blobs, auth, config.asset_token_ttl);
    app.upload_ttl = Duration::from_secs(config.upload_ttl_seconds.clamp(1, MAX_UPLOAD_TTL_SECONDS));
    app.read_cache.spawn_listener(config.database.database_url.clone());
    if config.opentera.opentera_redis.is_some() {
        let mut opentera =
            crate::opentera::OpenTera::connect(&config.opentera).await.context("connecting to OpenTera's Redis")?;
        opentera.archive_ttl = config.jobs.archive_ttl();
        app.opentera = Some(opentera.clone());
        opentera.follow_asset_deletions(app.clone());
    }
    let settings = HttpSettings {
        base_path: config.base_path(),
        max_upload_size: config.max_upload_size,
        accel_redirect_prefix: config.accel_redirect_prefix.clone().filter(|p| !p.is_empty()),
        body_idle_timeout: Duration::from_secs(config.body_idle_timeout_seconds.max(1)),
        public_url: config.public_url.clone(),
        import_policy: config.jobs.import_policy(),
        signer: crate::auth::UrlSigner::new(config.url_signing_key.clone(), config.url_signing_key_previous.clone()),
        signed_url_seconds: config.signed_url_seconds.clamp(1, MAX_SIGNED_URL_SECONDS),
        signed_url_max_seconds: config.signed_url_max_seconds.clamp(1, MAX_SIGNED_URL_SECONDS),
    };
    Ok(Context { app, settings: std::sync::Arc::new(settings) })
}

/// The longest any signed URL may live (a year): an absurd setting must not overflow.
const MAX_SIGNED_URL_SECONDS: u64 = 365 * 24 * 3600;
/// The longest an upload may wait for its commit (a year).
const MAX_UPLOAD_TTL_SECONDS: u64 = 365 * 24 * 3600;

/// How long a stopping process waits for the multipart uploads of failed S3 writes to
/// be aborted.
const BLOB_ABORTS_TIMEOUT: Duration = Duration::from_secs(10);

async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    let ctx = build_context(&config).await?;
    let listener = std::net::TcpListener::bind(config.listen).with_context(|| format!("binding {}", config.listen))?;
    tracing::info!(listen = %config.listen, base_path = %config.base_path(), opentera = ctx.app.opentera.is_some(), "assetd serving");
    let shutdown = crate::shutdown::Shutdown::new();
    start_background(&ctx.app, &config, &shutdown, Role::Serve)?;
    // At the signal: consumers and workers stop taking work. Once the requests have
    // finished: the relay publishes what they recorded, then everything stops.
    let signal = {
        let shutdown = shutdown.clone();
        async move {
            shutdown_signal().await;
            shutdown.stop();
        }
    };
    let blobs = ctx.app.blobs.clone();
    http::serve(ctx, listener, signal, Duration::from_secs(config.shutdown_grace_seconds)).await?;
    shutdown.finish(BACKGROUND_SHUTDOWN_TIMEOUT).await;
    blobs.finish(BLOB_ABORTS_TIMEOUT).await;
    tracing::info!("assetd stopped");
    Ok(())
}

async fn worker(config: ServeConfig) -> anyhow::Result<()> {
    let ctx = build_context(&config).await?;
    let shutdown = crate::shutdown::Shutdown::new();
    start_background(&ctx.app, &config, &shutdown, Role::Worker)?;
    tracing::info!("assetd worker running");
    shutdown_signal().await;
    shutdown.finish(BACKGROUND_SHUTDOWN_TIMEOUT).await;
    ctx.app.blobs.finish(BLOB_ABORTS_TIMEOUT).await;
    tracing::info!("assetd worker stopped");
    Ok(())
}

/// Which background tasks a process runs.
#[derive(PartialEq)]
pub enum Role {
    /// `serve`: the relay and the command consumer (as configured), and workers
    /// unless `ASSETD_WORKERS=false`.
    Serve,
    /// `worker`: workers only.
    Worker,
}

/// Starts the process's background tasks under `shutdown`.
pub fn start_background(
    app: &App,
    config: &ServeConfig,
    shutdown: &crate::shutdown::Shutdown,
    role: Role,
) -> anyhow::Result<()> {
    shutdown.spawn("the temp file sweeper", sweep_orphan_temp_files(app.clone(), shutdown.stop_token()));
    let relay = role == Role::Serve && config.relay;
    let commands = role == Role::Serve && config.commands;
    let workers = role == Role::Worker || config.jobs.workers;
    if !(relay || commands || workers) {
        return Ok(());
    }
    let broker = crate::broker::Broker::start(&config.amqp_url, app.messaging.clone());
    let prefix = config.amqp_prefix.clone();
    if relay {
        let relay = crate::relay::RelayConfig {
            status: app.messaging.clone(),
            database_url: config.database.database_url.clone(),
            broker: broker.clone(),
            exchange: crate::jobs::topology::events_exchange(&prefix),
            job_queues: Some(prefix.clone()),
            idle_poll: Duration::from_millis(200),
        };
        shutdown.spawn_subscriber("the relay", crate::relay::run(relay, shutdown.flush_token()));
    }
    if commands {
        let commands = crate::commands::CommandsConfig {
            broker: broker.clone(),
            prefix: prefix.clone(),
            import_policy: config.jobs.import_policy(),
        };
        shutdown.spawn("the command consumer", crate::commands::run(app.clone(), commands, shutdown.stop_token()));
    }
    if workers {
        let fetcher = crate::jobs::fetch::Fetcher::new(
            config
                .jobs
                .fetch_settings(config.max_upload_size)
                .map_err(|e| anyhow::anyhow!("the import settings (ASSETD_IMPORT_*): {e}"))?,
        )
        .map_err(|e| anyhow::anyhow!("the import HTTP client: {e}"))?;
        let worker = crate::jobs::WorkerConfig {
            broker: broker.clone(),
            prefix: prefix.clone(),
            worker_id: crate::jobs::default_worker_id(),
            import_concurrency: config.jobs.import_concurrency,
            import_policy: config.jobs.import_policy(),
            lease: config.jobs.lease(),
            backoff: config.jobs.backoff(),
            fetcher,
            archive_ttl: config.jobs.archive_ttl(),
            cleanup: config.jobs.cleanup_policy(),
        };
        shutdown.spawn("the job workers", crate::jobs::run(app.clone(), worker, shutdown.stop_token()));
        let scheduler = crate::jobs::SchedulerConfig {
            broker,
            prefix,
            database_url: config.database.database_url.clone(),
            backoff: config.jobs.backoff(),
            sweep_every: Duration::from_secs(1),
            cleanup_every: config.jobs.cleanup_every(),
            job_policy: config.jobs.import_policy(),
        };
        shutdown.spawn_subscriber(
            "the job scheduler",
            crate::jobs::run_scheduler(app.clone(), scheduler, shutdown.flush_token()),
        );
    }
    Ok(())
}

/// Every minute, removes the temporary files of uploads and imports whose process was
/// killed (see [`crate::blobs::BlobStore::remove_orphan_temp_files`]).
async fn sweep_orphan_temp_files(app: App, stop: tokio_util::sync::CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
        match app.blobs.remove_orphan_temp_files().await {
            Ok(0) => {}
            Ok(removed) => tracing::info!(removed, "removed temporary files whose writer was killed"),
            Err(error) => tracing::warn!(%error, "could not sweep the temporary files"),
        }
    }
}

/// How long the background tasks may take to finish, once requests have finished.
const BACKGROUND_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}
