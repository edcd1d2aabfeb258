//! The job queues (EVENTS.md "AMQP topology"), declared idempotently by the relay
//! (before it publishes any `JobQueued`) and by every worker:
//!
//! - `<prefix>.jobs`: bound to `job.queued` on the `<prefix>.events` exchange, so the
//!   outbox relay is the one way a new job reaches the workers.
//! - `<prefix>.jobs.retry.<n>s`, one queue per backoff step, each with a queue-level
//!   TTL of n seconds that dead-letters back to `<prefix>.jobs`. RabbitMQ expires
//!   messages only at the head of a queue, so one queue holding mixed delays would let
//!   a long wait hold back a short one; within one queue every message waits as long.
//!   A delay is made of steps: a message that comes back early is sent on to the
//!   largest step that fits what is left.
//! - `<prefix>.jobs.dead`: bound to `job.failed`: a copy of every job out of attempts.

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

/// The backoff steps, in seconds: powers of two up to a bit over an hour.
pub const RETRY_STEPS: [u64; 13] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096];

pub fn events_exchange(prefix: &str) -> String {
    format!("{prefix}.events")
}
pub fn jobs_queue(prefix: &str) -> String {
    format!("{prefix}.jobs")
}
pub fn dead_queue(prefix: &str) -> String {
    format!("{prefix}.jobs.dead")
}
pub fn retry_queue(prefix: &str, step_seconds: u64) -> String {
    format!("{prefix}.jobs.retry.{step_seconds}s")
}

/// The largest step no longer than `remaining`; none when less than the smallest is
/// left (the worker waits that out itself).
pub fn step_for(remaining: Duration) -> Option<u64> {
    RETRY_STEPS.iter().rev().copied().find(|step| Duration::from_secs(*step) <= remaining)
}

pub async fn declare(channel: &Channel, prefix: &str) -> lapin::Result<()> {
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    let exchange = events_exchange(prefix);
    channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions { durable: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?;
    for (queue, key) in [(jobs_queue(prefix), "job.queued"), (dead_queue(prefix), "job.failed")] {
        channel.queue_declare(queue.as_str().into(), durable, FieldTable::default()).await?;
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    for step in RETRY_STEPS {
        let mut arguments = FieldTable::default();
        arguments.insert("x-message-ttl".into(), AMQPValue::LongLongInt((step * 1000) as i64));
        arguments.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
        arguments.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(jobs_queue(prefix).as_str().into()));
        channel.queue_declare(retry_queue(prefix, step).as_str().into(), durable, arguments).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_are_cut_into_the_largest_steps_that_fit() {
        assert_eq!(step_for(Duration::from_millis(900)), None);
        assert_eq!(step_for(Duration::from_secs(1)), Some(1));
        assert_eq!(step_for(Duration::from_secs(60)), Some(32));
        assert_eq!(step_for(Duration::from_secs(100_000)), Some(4096));
    }
}
