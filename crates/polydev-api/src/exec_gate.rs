//! How many JSON exec answers the API holds in memory at once: in all and
//! per user (each is up to `MAX_JSON_OUTPUT` until it is sent).

use std::time::Duration;

use polydev_domain::UserId;

use crate::error::{ApiError, ApiResult};

/// JSON exec answers held at once: in all, and per user (each is up to
/// `MAX_JSON_OUTPUT` in memory until it is sent).
#[derive(Debug)]
pub struct ExecGate {
    global: tokio::sync::Semaphore,
    per_user: std::sync::Mutex<std::collections::HashMap<UserId, u32>>,
    per_user_max: u32,
}

impl Default for ExecGate {
    fn default() -> Self {
        Self {
            global: tokio::sync::Semaphore::new(64),
            per_user: Default::default(),
            per_user_max: 4,
        }
    }
}

/// A user's place at the gate, given back on drop.
struct UserSlot<'a> {
    gate: &'a ExecGate,
    user: UserId,
}

impl Drop for UserSlot<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.gate.per_user.lock() {
            if let Some(n) = m.get_mut(&self.user) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(&self.user);
                }
            }
        }
    }
}

/// Held while a JSON answer is gathered.
pub(crate) struct ExecSlot<'a> {
    _user: UserSlot<'a>,
    _global: tokio::sync::SemaphorePermit<'a>,
}

impl ExecGate {
    pub(crate) async fn enter(&self, user: UserId) -> ApiResult<ExecSlot<'_>> {
        {
            let mut m = self
                .per_user
                .lock()
                .map_err(|_| ApiError::unavailable("exec gate poisoned", 1))?;
            let n = m.entry(user).or_insert(0);
            if *n >= self.per_user_max {
                return Err(ApiError::too_many_requests(
                    format!("you have {} commands waiting for a JSON answer already; wait for one, or stream with Accept: text/event-stream", self.per_user_max),
                    1,
                ));
            }
            *n += 1;
        }
        let slot = UserSlot { gate: self, user };
        match tokio::time::timeout(Duration::from_secs(10), self.global.acquire()).await {
            Ok(Ok(permit)) => Ok(ExecSlot {
                _user: slot,
                _global: permit,
            }),
            _ => Err(ApiError::unavailable(
                "this server answers too many commands at once; try again shortly",
                2,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    #[tokio::test]
    async fn the_exec_gate_holds_a_few_answers_per_user_and_gives_them_back() {
        let gate = ExecGate::default();
        let (ada, bob) = (UserId::new(), UserId::new());
        let mut held = Vec::new();
        for _ in 0..gate.per_user_max {
            held.push(gate.enter(ada).await.unwrap());
        }
        assert_eq!(
            gate.enter(ada).await.err().unwrap().status,
            StatusCode::TOO_MANY_REQUESTS
        );
        assert!(gate.enter(bob).await.is_ok(), "another user is not held up");
        held.pop();
        assert!(gate.enter(ada).await.is_ok(), "a slot came back");
        drop(held);
        assert!(gate
            .per_user
            .lock()
            .unwrap()
            .get(&ada)
            .is_none_or(|n| *n == 0));
    }
}
