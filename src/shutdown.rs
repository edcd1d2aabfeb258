//! One owner for every background task of a process (relay, job scheduler, command
//! consumer, job workers) and the two moments of a graceful stop: `stop` (take no new
//! work: consumers stop taking messages, workers hand their running attempts back) and,
//! once the HTTP requests and the consumers have finished, `flush` (the log subscribers
//! hand on what those recorded, then return). `finish` waits for all of them within a
//! bound and aborts what is left.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Clone, Default)]
pub struct Shutdown {
    stop: CancellationToken,
    flush: CancellationToken,
    /// Tasks that end at `stop` (consumers and workers: they record events as they end).
    consumers: TaskTracker,
    /// Tasks that end at `flush` (log subscribers: they hand on what was recorded).
    subscribers: TaskTracker,
    handles: std::sync::Arc<std::sync::Mutex<Vec<Handle>>>,
}

struct Handle {
    name: String,
    subscriber: bool,
    abort: tokio::task::AbortHandle,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancelled when the process should take no new work.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Cancelled once requests and consumers have finished: subscribers flush, then
    /// return.
    pub fn flush_token(&self) -> CancellationToken {
        self.flush.clone()
    }

    /// Runs `task`, which ends once [`Self::stop_token`] is cancelled.
    pub fn spawn(&self, name: &str, task: impl Future<Output = ()> + Send + 'static) {
        let abort = self.consumers.spawn(task).abort_handle();
        self.handles.lock().expect("not poisoned").push(Handle { name: name.to_owned(), subscriber: false, abort });
    }

    /// Runs `task`, a log subscriber, which ends once [`Self::flush_token`] is
    /// cancelled: after every [`Self::spawn`]ed task has ended, so that what they
    /// recorded on their way out (a worker's released attempt) is handed on too.
    pub fn spawn_subscriber(&self, name: &str, task: impl Future<Output = ()> + Send + 'static) {
        let abort = self.subscribers.spawn(task).abort_handle();
        self.handles.lock().expect("not poisoned").push(Handle { name: name.to_owned(), subscriber: true, abort });
    }

    /// Take no new work.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Stops the consumers and waits for them for half of `timeout` (handing back an
    /// attempt or finishing a command is a transaction), then flushes the subscribers
    /// and waits for them until `timeout` is up. What has not finished in its time is
    /// aborted: an unacked message goes back to its queue, unpublished events wait for
    /// the next relay.
    pub async fn finish(&self, timeout: Duration) {
        let started = tokio::time::Instant::now();
        self.stop.cancel();
        self.consumers.close();
        if tokio::time::timeout_at(started + timeout / 2, self.consumers.wait()).await.is_err() {
            self.abort_unfinished(false, timeout / 2);
        }
        self.flush.cancel();
        self.subscribers.close();
        if tokio::time::timeout_at(started + timeout, self.subscribers.wait()).await.is_err() {
            self.abort_unfinished(true, timeout);
        }
    }

    fn abort_unfinished(&self, subscribers: bool, after: Duration) {
        for handle in self.handles.lock().expect("not poisoned").iter().filter(|h| h.subscriber == subscribers) {
            if !handle.abort.is_finished() {
                tracing::warn!(task = %handle.name, ?after, "did not finish in time; stopped");
                handle.abort.abort();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[tokio::test]
    async fn subscribers_flush_only_after_the_consumers_have_ended() {
        let shutdown = Shutdown::new();
        let order = Arc::new(Mutex::new(Vec::new()));
        let (stop, flush) = (shutdown.stop_token(), shutdown.flush_token());
        let seen = order.clone();
        shutdown.spawn("consumer", async move {
            stop.cancelled().await;
            // Records something on its way out, slowly.
            tokio::time::sleep(Duration::from_millis(200)).await;
            seen.lock().unwrap().push("consumer ended");
        });
        let seen = order.clone();
        shutdown.spawn_subscriber("subscriber", async move {
            flush.cancelled().await;
            seen.lock().unwrap().push("subscriber flushed");
        });
        shutdown.finish(Duration::from_secs(5)).await;
        assert_eq!(*order.lock().unwrap(), ["consumer ended", "subscriber flushed"]);
    }

    /// Sets its flag when dropped: a task that was aborted (or ended) drops it.
    struct DropFlag(Arc<std::sync::atomic::AtomicBool>);
    impl Drop for DropFlag {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn what_does_not_finish_in_time_is_aborted_and_subscribers_still_get_their_time() {
        let shutdown = Shutdown::new();
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let guard = DropFlag(dropped.clone());
        shutdown.spawn("stuck", async move {
            let _guard = guard;
            std::future::pending::<()>().await
        });
        let flushed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flush, seen) = (shutdown.flush_token(), flushed.clone());
        shutdown.spawn_subscriber("subscriber", async move {
            flush.cancelled().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            seen.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        let started = std::time::Instant::now();
        shutdown.finish(Duration::from_millis(600)).await;
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(dropped.load(std::sync::atomic::Ordering::SeqCst), "the stuck consumer was aborted");
        assert!(flushed.load(std::sync::atomic::Ordering::SeqCst), "the subscriber flushed in its half");
    }
}
