//! The tasks a kind of session spawns (a run's provider drivers and its
//! credential deadline, a login session's driver and output reader), held
//! in one place so shutdown ends and joins them instead of leaving them to
//! the runtime's teardown.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::task::JoinSet;

#[derive(Debug)]
pub struct Tasks {
    /// None once shut down: nothing new starts.
    set: Mutex<Option<JoinSet<()>>>,
}

impl Default for Tasks {
    fn default() -> Self {
        Self::new()
    }
}

impl Tasks {
    pub fn new() -> Self {
        Self {
            set: Mutex::new(Some(JoinSet::new())),
        }
    }

    /// Runs `task` under this supervisor (finished ones are reaped here, so
    /// the set holds only live tasks). After `shutdown` nothing starts.
    pub fn spawn<F>(&self, task: F) -> bool
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let Ok(mut guard) = self.set.lock() else {
            return false;
        };
        let Some(set) = guard.as_mut() else {
            return false;
        };
        while set.try_join_next().is_some() {}
        set.spawn(task);
        true
    }

    /// Tasks still running.
    pub fn live(&self) -> usize {
        self.set
            .lock()
            .ok()
            .and_then(|mut g| {
                g.as_mut().map(|s| {
                    while s.try_join_next().is_some() {}
                    s.len()
                })
            })
            .unwrap_or(0)
    }

    /// Stops new tasks, gives the running ones `grace` to end by themselves
    /// (their sessions were told to end), then aborts the rest and joins
    /// them all.
    pub async fn shutdown(&self, grace: Duration) {
        let Some(mut set) = self.set.lock().ok().and_then(|mut g| g.take()) else {
            return;
        };
        let deadline = tokio::time::Instant::now() + grace;
        while !set.is_empty() {
            match tokio::time::timeout_at(deadline, set.join_next()).await {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!(
                        tasks = set.len(),
                        "session tasks still running at shutdown; aborting them"
                    );
                    set.abort_all();
                    while set.join_next().await.is_some() {}
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn shutdown_joins_what_ends_aborts_what_hangs_and_starts_nothing_after() {
        let tasks = Tasks::new();
        let ended = Arc::new(AtomicUsize::new(0));
        let e = ended.clone();
        assert!(tasks.spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            e.fetch_add(1, Ordering::SeqCst);
        }));
        // A task that would never end, holding a guard that counts its drop.
        struct Dropped(Arc<AtomicUsize>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                self.0.fetch_add(10, Ordering::SeqCst);
            }
        }
        let guard = Dropped(ended.clone());
        assert!(tasks.spawn(async move {
            let _g = guard;
            std::future::pending::<()>().await;
        }));
        assert_eq!(tasks.live(), 2);
        tasks.shutdown(Duration::from_millis(300)).await;
        assert_eq!(
            ended.load(Ordering::SeqCst),
            11,
            "one ended, one aborted and dropped"
        );
        assert_eq!(tasks.live(), 0);
        assert!(!tasks.spawn(async {}), "nothing starts after shutdown");
    }

    #[tokio::test]
    async fn finished_tasks_do_not_accumulate() {
        let tasks = Tasks::new();
        for _ in 0..100 {
            tasks.spawn(async {});
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(tasks.live(), 0);
    }
}
