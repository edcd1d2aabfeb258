//! Which failures mean "the database is going away or out of reach": the one
//! classifier behind both the HTTP edge (503 with `Retry-After`, never 500) and the
//! AMQP command consumer (the command goes back to the queue instead of being
//! dead-lettered). A failure of this kind says nothing about the request: the same
//! request may succeed once the database is back.

use super::AppError;
use crate::eventstore::EventStoreError;
use crate::projections::ProjectionError;

/// Seconds a client is asked to wait (`Retry-After`) when the database is unavailable.
pub const RETRY_AFTER_SECONDS: u64 = 5;

/// Whether `error` means the database connection is gone, going or cannot be had:
/// a connection that closed, an I/O error on it, a `FATAL` or `PANIC` error (the
/// server ends the session after those), or a SQLSTATE of class 08 (connection
/// exception), 53 (insufficient resources: too many connections, disk full, out of
/// memory), 57P01–57P05 (administrator, crash or idle shutdown, cannot connect now,
/// database dropped) or 58 (system error: I/O on the server).
pub fn database_unavailable(error: &tokio_postgres::Error) -> bool {
    if error.is_closed() {
        return true;
    }
    if let Some(db) = error.as_db_error() {
        let code = db.code().code();
        return matches!(db.severity(), "FATAL" | "PANIC")
            || code.starts_with("08")
            || code.starts_with("53")
            || code.starts_with("58")
            || matches!(code, "57P01" | "57P02" | "57P03" | "57P04" | "57P05");
    }
    // Not an answer from the server: an I/O error on the socket (reset, EOF in the
    // middle of a message) is the connection going away. Anything else (a value that
    // does not convert, a wrong row count) is our own fault.
    caused_by_io(error)
}

/// Whether an I/O error is among `error`'s causes.
pub fn caused_by_io(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = error.source();
    while let Some(inner) = cause {
        if inner.is::<std::io::Error>() {
            return true;
        }
        cause = inner.source();
    }
    false
}

impl AppError {
    /// Whether this failure is the database being unavailable (see
    /// [`database_unavailable`]): answered 503, and retried by the command consumer.
    /// Pool errors always are (no connection could be had or made in time).
    pub fn is_database_unavailable(&self) -> bool {
        match self {
            AppError::Pool(_) | AppError::Unavailable(_) | AppError::CommitOutcomeUnknown(_) => true,
            AppError::Database(e) => database_unavailable(e),
            AppError::EventStore(e) => event_store_unavailable(e),
            AppError::Projection(ProjectionError::Database(e)) => database_unavailable(e),
            AppError::Projection(ProjectionError::EventStore(e)) => event_store_unavailable(e),
            _ => false,
        }
    }

    /// The database error underneath, if there is one.
    pub fn database_error(&self) -> Option<&tokio_postgres::Error> {
        match self {
            AppError::Database(e)
            | AppError::EventStore(EventStoreError::Database(e))
            | AppError::Projection(ProjectionError::Database(e))
            | AppError::Projection(ProjectionError::EventStore(EventStoreError::Database(e))) => Some(e),
            _ => None,
        }
    }
}

fn event_store_unavailable(error: &EventStoreError) -> bool {
    match error {
        EventStoreError::Pool(_) => true,
        EventStoreError::Database(e) => database_unavailable(e),
        _ => false,
    }
}
