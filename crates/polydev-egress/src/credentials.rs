//! Per-sandbox proxy credentials: minted with a random secret, stored as a
//! SHA-256 hash, looked up through a short-lived cache.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use polydev_domain::UserId;
use polydev_store::{now_ms, EgressCredential, Store, StoreError};
use rand::RngCore;
use sha2::{Digest, Sha256};

/// What a sandbox gets: `username:secret` for Proxy-Authorization.
#[derive(Clone)]
pub struct MintedCredential {
    pub username: String,
    pub secret: String,
    pub user_id: UserId,
    pub sandbox_id: String,
    pub template: String,
}

impl std::fmt::Debug for MintedCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MintedCredential")
            .field("username", &self.username)
            .field("secret", &"[redacted]")
            .field("user_id", &self.user_id)
            .field("sandbox_id", &self.sandbox_id)
            .finish()
    }
}

/// Whose traffic a request is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user_id: UserId,
    pub sandbox_id: String,
    pub template: String,
}

pub(crate) fn hash(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Debug)]
pub(crate) struct Credentials {
    store: Store,
    ttl: Duration,
    cache: Mutex<HashMap<String, (Option<EgressCredential>, Instant)>>,
}

impl Credentials {
    pub(crate) fn new(store: Store, ttl: Duration) -> Self {
        Self {
            store,
            ttl,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) async fn mint(
        &self,
        user_id: UserId,
        sandbox_id: &str,
        template: &str,
    ) -> Result<MintedCredential, StoreError> {
        let mut bytes = [0u8; 24];
        rand::rng().fill_bytes(&mut bytes);
        let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let mut id = [0u8; 9];
        rand::rng().fill_bytes(&mut id);
        let username = format!(
            "sbx-{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(id)
                .to_ascii_lowercase()
                .replace(['-', '_'], "x")
        );
        self.store
            .create_egress_credential(&EgressCredential {
                username: username.clone(),
                secret_hash: hash(&secret),
                user_id,
                sandbox_id: sandbox_id.to_owned(),
                template: template.to_owned(),
                created_at_ms: now_ms(),
            })
            .await?;
        Ok(MintedCredential {
            username,
            secret,
            user_id,
            sandbox_id: sandbox_id.to_owned(),
            template: template.to_owned(),
        })
    }

    pub(crate) fn forget(&self, username: &str) {
        if let Ok(mut c) = self.cache.lock() {
            c.remove(username);
        }
    }

    /// The identity behind `username:secret`, or `None` when they are not
    /// a live credential.
    pub(crate) async fn verify(
        &self,
        username: &str,
        secret: &str,
    ) -> Result<Option<Identity>, StoreError> {
        let cached = self.cache.lock().ok().and_then(|c| {
            c.get(username)
                .filter(|(_, at)| at.elapsed() < self.ttl)
                .map(|(c, _)| c.clone())
        });
        let credential = match cached {
            Some(c) => c,
            None => {
                let found = match self.store.egress_credential(username).await {
                    Ok(c) => Some(c),
                    Err(StoreError::NotFound) => None,
                    Err(e) => return Err(e),
                };
                if let Ok(mut c) = self.cache.lock() {
                    if c.len() > 100_000 {
                        c.clear();
                    }
                    c.insert(username.to_owned(), (found.clone(), Instant::now()));
                }
                found
            }
        };
        Ok(credential
            .filter(|c| constant_time_eq(c.secret_hash.as_bytes(), hash(secret).as_bytes()))
            .map(|c| Identity {
                user_id: c.user_id,
                sandbox_id: c.sandbox_id,
                template: c.template,
            }))
    }
}

/// Splits a `Proxy-Authorization: Basic …` value into user and secret.
pub(crate) fn parse_basic(value: &str) -> Option<(String, String)> {
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, secret) = text.split_once(':')?;
    Some((user.to_owned(), secret.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_parse() {
        assert_eq!(
            parse_basic("Basic dXNlcjpwYXNz"),
            Some(("user".into(), "pass".into()))
        );
        assert_eq!(
            parse_basic("basic dXNlcjpwYTpzcw=="),
            Some(("user".into(), "pa:ss".into()))
        );
        assert_eq!(parse_basic("Bearer x"), None);
        assert_eq!(parse_basic("Basic !!!"), None);
    }

    #[test]
    fn secrets_never_show_in_debug() {
        let c = MintedCredential {
            username: "sbx-a".into(),
            secret: "canary-secret".into(),
            user_id: UserId::new(),
            sandbox_id: "s".into(),
            template: "runtime".into(),
        };
        assert!(!format!("{c:?}").contains("canary-secret"));
    }
}
