//! The process's connection to RabbitMQ: one AMQP connection, opened on first use and
//! opened again when lost, and a bb8 pool of channels on it (publisher confirms on).
//! The relay and the command consumer take their channels from here; a channel found
//! broken (its connection lost with the broker's restart) is dropped by the pool, and
//! the next one asked for reconnects. A keeper task checks the connection every second
//! and reconnects with backoff (logged), so it comes back by itself even while nothing
//! uses it; `/ready` shows its state.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection, ConnectionProperties};

use crate::app::{ComponentState, MessagingStatus};

/// Channels one process may hold at once (the relay's, the consumer's, replies…).
const MAX_CHANNELS: u32 = 16;
/// How long asking for a channel may take. The pool keeps trying to connect meanwhile.
const CHECKOUT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long opening the connection, or a channel on it, may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// A pooled channel: back to the pool when dropped (or discarded if broken).
pub type PooledChannel = bb8::PooledConnection<'static, ChannelManager>;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("{0}")]
    Amqp(#[from] lapin::Error),
    #[error("the broker did not answer within {0:?}")]
    TimedOut(Duration),
    #[error("{0}")]
    Unavailable(String),
}

/// Cheap to clone: all clones share the connection and the pool.
#[derive(Clone)]
pub struct Broker {
    pool: bb8::Pool<ChannelManager>,
    status: Arc<MessagingStatus>,
    /// Why the last attempt to open a channel failed: bb8 only says "timed out".
    last_error: Arc<std::sync::Mutex<Option<String>>>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").field("state", &self.pool.state()).finish()
    }
}

impl Broker {
    /// Starts connecting (in the background; must be called on a Tokio runtime).
    pub fn start(url: &str, status: Arc<MessagingStatus>) -> Self {
        let last_error = Arc::new(std::sync::Mutex::new(None));
        let manager = ChannelManager {
            url: url.to_owned(),
            connection: tokio::sync::Mutex::new(Slot::default()),
            status: status.clone(),
        };
        status.set_broker(ComponentState::Connecting);
        let pool = bb8::Pool::builder()
            .max_size(MAX_CHANNELS)
            .min_idle(None)
            .connection_timeout(CHECKOUT_TIMEOUT)
            .test_on_check_out(true)
            .error_sink(Box::new(RememberErrors(last_error.clone())))
            .build_unchecked(manager);
        let broker = Self { pool, status, last_error };
        tokio::spawn(broker.clone().keep_connected());
        broker
    }

    async fn keep_connected(self) {
        let mut backoff = Duration::from_millis(200);
        loop {
            // Checking a channel out validates it; a broken one makes the pool reconnect.
            match self.channel().await {
                Ok(channel) => {
                    *self.last_error.lock().expect("not poisoned") = None;
                    // The live connection's state (an earlier one's watcher may have
                    // reported its loss after this one opened).
                    let state = if channel.connection.blocked() { ComponentState::Blocked } else { ComponentState::Up };
                    self.status.set_broker(state);
                    drop(channel);
                    backoff = Duration::from_millis(200);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(error) => {
                    tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "broker unreachable");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    /// A channel in confirm mode, connecting (again) first if needed.
    pub async fn channel(&self) -> Result<PooledChannel, BrokerError> {
        self.pool.get_owned().await.map_err(|error| match error {
            bb8::RunError::User(error) => error,
            bb8::RunError::TimedOut => match self.last_error.lock().expect("not poisoned").clone() {
                Some(reason) => {
                    BrokerError::Unavailable(format!("no broker channel within {CHECKOUT_TIMEOUT:?}: {reason}"))
                }
                None => BrokerError::TimedOut(CHECKOUT_TIMEOUT),
            },
        })
    }

    /// A channel of the shared connection that is not pooled: for a consumer, which
    /// closes it when done rather than hand a consuming channel to someone else.
    pub async fn dedicated_channel(&self) -> Result<BrokerChannel, BrokerError> {
        self.pool.dedicated_connection().await
    }

    /// Channels open (idle or in use), for tests and diagnostics.
    pub fn open_channels(&self) -> u32 {
        self.pool.state().connections
    }
}

/// The pool reports failed attempts here, not to the caller (whose checkout only times
/// out): kept so that the timeout can say why.
#[derive(Debug, Clone)]
struct RememberErrors(Arc<std::sync::Mutex<Option<String>>>);

impl bb8::ErrorSink<BrokerError> for RememberErrors {
    fn sink(&self, error: BrokerError) {
        tracing::debug!(%error, "opening a broker channel failed");
        *self.0.lock().expect("not poisoned") = Some(error.to_string());
    }
    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<BrokerError>> {
        Box::new(self.clone())
    }
}

/// A channel and the status of the connection it is on: a channel of a lost
/// connection does not always learn of it, the connection does.
pub struct BrokerChannel {
    channel: Channel,
    connection: lapin::ConnectionStatus,
}

impl BrokerChannel {
    /// The channel and its connection are open.
    pub fn usable(&self) -> bool {
        self.channel.status().connected() && self.connection.connected()
    }
}

impl std::ops::Deref for BrokerChannel {
    type Target = Channel;
    fn deref(&self) -> &Channel {
        &self.channel
    }
}

/// bb8's view of the broker: its "connections" are channels on one shared AMQP
/// connection.
pub struct ChannelManager {
    url: String,
    connection: tokio::sync::Mutex<Slot>,
    status: Arc<MessagingStatus>,
}

/// The connection, or the attempt to open it.
#[derive(Default)]
struct Slot {
    open: Option<Arc<Connection>>,
    /// An attempt still running, with when it started. Not dropped while running
    /// (lapin has already started the connection's I/O thread, which a dropped attempt
    /// would leave behind), unless stalled for [`ABANDON_CONNECT_AFTER`].
    opening: Option<(tokio::task::JoinHandle<lapin::Result<Connection>>, tokio::time::Instant)>,
}

/// A handshake the broker never finishes is given up (its thread leaked) after this.
const ABANDON_CONNECT_AFTER: Duration = Duration::from_secs(120);

impl ChannelManager {
    /// The live connection, opened now if there is none.
    async fn live_connection(&self) -> Result<Arc<Connection>, BrokerError> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.open.as_ref().filter(|connection| connection.status().connected()) {
            return Ok(connection.clone());
        }
        slot.open = None;
        if slot.opening.as_ref().is_some_and(|(_, started)| started.elapsed() > ABANDON_CONNECT_AFTER) {
            tracing::warn!("the broker never finished a handshake; giving up on it");
            if let Some((attempt, _)) = slot.opening.take() {
                attempt.abort();
            }
        }
        let (attempt, _) = slot.opening.get_or_insert_with(|| {
            let url = self.url.clone();
            let attempt = tokio::spawn(async move { Connection::connect(&url, ConnectionProperties::default()).await });
            (attempt, tokio::time::Instant::now())
        });
        let opened = match tokio::time::timeout(OPEN_TIMEOUT, attempt).await {
            Err(_) => return Err(BrokerError::TimedOut(OPEN_TIMEOUT)), // still trying
            Ok(joined) => {
                slot.opening = None;
                joined.map_err(|error| BrokerError::Unavailable(format!("connecting: {error}")))?
            }
        };
        match opened {
            Ok(connection) => {
                tracing::info!("broker connected");
                self.status.set_broker(ComponentState::Up);
                watch(&connection, self.status.clone());
                let connection = Arc::new(connection);
                slot.open = Some(connection.clone());
                Ok(connection)
            }
            Err(error) => {
                self.status.set_broker(ComponentState::Connecting);
                Err(error.into())
            }
        }
    }
}

/// Logs a lost or blocked connection and shows it in `/ready` at once, not at the next
/// use. An error of one channel (the connection still up) is not the connection's.
fn watch(connection: &Connection, status: Arc<MessagingStatus>) {
    let mut events = connection.events_listener();
    let connection_status = connection.status().clone();
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            match event {
                lapin::Event::Error(error) if connection_status.connected() => {
                    tracing::debug!(%error, "a broker channel failed");
                }
                lapin::Event::Error(error) => {
                    tracing::warn!(%error, "broker connection lost; reconnecting");
                    status.set_broker(ComponentState::Connecting);
                    break;
                }
                lapin::Event::ConnectionBlocked(reason) => {
                    tracing::warn!(%reason, "the broker blocks publishing (resource alarm)");
                    status.set_broker(ComponentState::Blocked);
                }
                lapin::Event::ConnectionUnblocked => {
                    tracing::info!("the broker unblocked publishing");
                    status.set_broker(ComponentState::Up);
                }
                _ => {}
            }
        }
    });
}

impl bb8::ManageConnection for ChannelManager {
    type Connection = BrokerChannel;
    type Error = BrokerError;

    async fn connect(&self) -> Result<BrokerChannel, BrokerError> {
        let connection = self.live_connection().await?;
        let open = async {
            let channel = connection.create_channel().await?;
            channel.confirm_select(ConfirmSelectOptions::default()).await?;
            Ok::<_, lapin::Error>(channel)
        };
        let channel =
            tokio::time::timeout(OPEN_TIMEOUT, open).await.map_err(|_| BrokerError::TimedOut(OPEN_TIMEOUT))??;
        Ok(BrokerChannel { channel, connection: connection.status().clone() })
    }

    async fn is_valid(&self, channel: &mut BrokerChannel) -> Result<(), BrokerError> {
        if channel.usable() {
            Ok(())
        } else {
            Err(lapin::Error::from(lapin::ErrorKind::InvalidChannelState(lapin::ChannelState::Error, "pooled channel"))
                .into())
        }
    }

    fn has_broken(&self, channel: &mut BrokerChannel) -> bool {
        !channel.usable()
    }
}
