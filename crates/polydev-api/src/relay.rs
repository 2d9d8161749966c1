//! The sealed-credential relay: a client posts a box sealed (HPKE) to a
//! recipient's public key — a sandbox's ephemeral key, once the sandbox
//! runtime exists — and the recipient's side takes it. The controller only
//! ever holds the ciphertext, briefly: boxes are kept in memory (never
//! stored), at most `MAX_PER_USER` per user, and expire.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use polydev_domain::UserId;

/// Boxes one user may have waiting.
pub const MAX_PER_USER: usize = 64;
/// A box nobody took is dropped after this.
pub const TTL: Duration = Duration::from_secs(10 * 60);

#[derive(Debug)]
struct Entry {
    owner: UserId,
    sealed: Vec<u8>,
    at: Instant,
}

/// Mailboxes keyed by their id (e.g. a sandbox id).
#[derive(Debug, Default)]
pub struct Relay {
    boxes: Mutex<HashMap<String, Entry>>,
}

/// Why a box was not accepted.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RelayError {
    #[error("too many sealed boxes are waiting for this account")]
    Full,
    #[error("a sealed box is already waiting in this mailbox")]
    Occupied,
}

impl Relay {
    /// Leaves `sealed` for `mailbox`; one box per mailbox.
    pub fn post(&self, owner: UserId, mailbox: &str, sealed: Vec<u8>) -> Result<(), RelayError> {
        let Ok(mut boxes) = self.boxes.lock() else {
            return Err(RelayError::Full);
        };
        boxes.retain(|_, e| e.at.elapsed() < TTL);
        if boxes.contains_key(mailbox) {
            return Err(RelayError::Occupied);
        }
        if boxes.values().filter(|e| e.owner == owner).count() >= MAX_PER_USER {
            return Err(RelayError::Full);
        }
        boxes.insert(
            mailbox.to_owned(),
            Entry {
                owner,
                sealed,
                at: Instant::now(),
            },
        );
        Ok(())
    }

    /// Takes (removes) the box in `mailbox` if `owner` posted it and it
    /// has not expired. The recipient side (the sandbox runtime) calls this.
    pub fn take(&self, owner: UserId, mailbox: &str) -> Option<Vec<u8>> {
        let mut boxes = self.boxes.lock().ok()?;
        match boxes.get(mailbox) {
            Some(e) if e.owner == owner && e.at.elapsed() < TTL => {
                boxes.remove(mailbox).map(|e| e.sealed)
            }
            _ => None,
        }
    }

    /// Boxes waiting (for tests and metrics).
    pub fn len(&self) -> usize {
        self.boxes.lock().map(|b| b.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_box_is_taken_once_by_its_owner_only() {
        let relay = Relay::default();
        let (ada, bob) = (UserId::new(), UserId::new());
        relay.post(ada, "sandbox-1", vec![1, 2, 3]).unwrap();
        assert_eq!(
            relay.post(ada, "sandbox-1", vec![4]),
            Err(RelayError::Occupied)
        );
        assert_eq!(relay.take(bob, "sandbox-1"), None);
        assert_eq!(relay.take(ada, "sandbox-1"), Some(vec![1, 2, 3]));
        assert_eq!(relay.take(ada, "sandbox-1"), None, "taken once");
        for i in 0..MAX_PER_USER {
            relay.post(ada, &format!("m{i}"), vec![0]).unwrap();
        }
        assert_eq!(relay.post(ada, "one-more", vec![0]), Err(RelayError::Full));
        assert!(
            relay.post(bob, "bobs", vec![0]).is_ok(),
            "limits are per user"
        );
    }
}
