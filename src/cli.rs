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
    let blobs = BlobStore::open(&config.data_dir)
        .await
        .with_context(|| format!("opening the data dir {}", config.data_dir.display()))?;
    let auth = Authenticator::with_limits(&config.jwt_secret, config.token_limits);
    let app = App::new(pool, blobs, auth, config.asset_token_ttl);
    let settings = HttpSettings {
        base_path: config.base_path.clone(),
        max_upload_size: config.max_upload_size,
        accel_redirect_prefix: config.accel_redirect_prefix.clone().filter(|p| !p.is_empty()),
        body_idle_timeout: Duration::from_secs(config.body_idle_timeout_seconds.max(1)),
        public_url: config.public_url.clone(),
    };
    Ok(Context { app, settings: std::sync::Arc::new(settings) })
}

async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    let ctx = build_context(&config).await?;
    let listener = std::net::TcpListener::bind(config.listen).with_context(|| format!("binding {}", config.listen))?;
    tracing::info!(listen = %config.listen, base_path = %config.base_path, "assetd serving");
    let broker = (config.relay || config.commands)
        .then(|| crate::broker::Broker::start(&config.amqp_url, ctx.app.messaging.clone()));
    // At the signal: the command consumer stops taking commands. Once the requests
    // have finished: the relay publishes what they recorded, then stops.
    let (stopping, stop) = tokio::sync::watch::channel(false);
    let (flushing, flush) = tokio::sync::watch::channel(false);
    let relay = broker.clone().filter(|_| config.relay).map(|broker| {
        let config = crate::relay::RelayConfig {
            status: ctx.app.messaging.clone(),
            database_url: config.database.database_url.clone(),
            broker,
            exchange: format!("{}.events", config.amqp_prefix),
            idle_poll: Duration::from_millis(200),
        };
        tokio::spawn(crate::relay::run(config, flush))
    });
    let commands = broker.filter(|_| config.commands).map(|broker| {
        let config = crate::commands::CommandsConfig { broker, prefix: config.amqp_prefix.clone() };
        tokio::spawn(crate::commands::run(ctx.app.clone(), config, stop))
    });
    let messaging = ctx.app.messaging.clone();
    let signal = async move {
        shutdown_signal().await;
        stopping.send_replace(true);
    };
    http::serve(ctx, listener, signal, Duration::from_secs(config.shutdown_grace_seconds)).await?;
    // The consumer, then the relay, within one bound; the consumer gets half of it at
    // most, so that the relay always has time to flush.
    let deadline = tokio::time::Instant::now() + AMQP_SHUTDOWN_TIMEOUT;
    // A command still unacked when abandoned goes back to the queue, for whoever runs next.
    if let Some(commands) = commands {
        let consumer_deadline = tokio::time::Instant::now() + AMQP_SHUTDOWN_TIMEOUT / 2;
        finish_or_abandon(commands, consumer_deadline, "the command consumer").await;
    }
    // Whatever the relay had not confirmed is published again by the next relay; one
    // that cannot reach the broker has nothing to flush to.
    if let Some(relay) = relay {
        if messaging.relay() == crate::app::ComponentState::Connecting {
            tracing::warn!("the broker is unreachable: events not yet published wait for the next relay");
            relay.abort();
        } else {
            flushing.send_replace(true);
            finish_or_abandon(relay, deadline, "the relay (events not yet published wait for the next relay)").await;
        }
    }

    tracing::info!("assetd stopped");
    Ok(())
}

/// How long the AMQP side may take to finish at shutdown, once requests have finished.
const AMQP_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

async fn finish_or_abandon(mut task: tokio::task::JoinHandle<()>, deadline: tokio::time::Instant, what: &str) {
    if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
        tracing::warn!(timeout = ?AMQP_SHUTDOWN_TIMEOUT, "{what} did not finish in time; stopped");
        task.abort();
    }
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}
