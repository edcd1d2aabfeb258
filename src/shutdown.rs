//! One owner for every background task of a process (relay, job scheduler, command
//! consumer, job workers) and the two moments of a graceful stop: `stop` (take no new
//! work: consumers stop taking messages, workers hand their running attempts back) and,
//! once the HTTP requests have finished, `flush` (the log subscribers hand on what
//! those requests recorded, then return). `finish` waits for all of them within a
//! bound and aborts what is left.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Clone, Default)]
pub struct Shutdown {
    stop: CancellationToken,
    flush: CancellationToken,
    tasks: TaskTracker,
    handles: std::sync::Arc<std::sync::Mutex<Vec<(String, tokio::task::AbortHandle)>>>,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancelled when the process should take no new work.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Cancelled once requests have finished: subscribers flush, then return.
    pub fn flush_token(&self) -> CancellationToken {
        self.flush.clone()
    }

    /// Runs `task` as one of the process's background tasks.
    pub fn spawn(&self, name: &str, task: impl Future<Output = ()> + Send + 'static) {
        let handle = self.tasks.spawn(task);
        self.handles.lock().expect("not poisoned").push((name.to_owned(), handle.abort_handle()));
    }

    /// Take no new work.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Flushes, then waits for every task until `deadline`; what has not finished by
    /// then is aborted (an unacked message goes back to its queue; unpublished events
    /// wait for the next relay).
    pub async fn finish(&self, timeout: Duration) {
        self.stop.cancel();
        self.flush.cancel();
        self.tasks.close();
        if tokio::time::timeout(timeout, self.tasks.wait()).await.is_err() {
            for (name, handle) in self.handles.lock().expect("not poisoned").iter() {
                if !handle.is_finished() {
                    tracing::warn!(task = %name, ?timeout, "did not finish in time; stopped");
                    handle.abort();
                }
            }
        }
    }
}
