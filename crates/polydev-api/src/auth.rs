//! Who is calling: bearer tokens and the web UI's session cookie, password
//! hashing, and the login rate limits.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use axum::extract::{ConnectInfo, FromRef, FromRequestParts};
use axum::http::header::{AUTHORIZATION, COOKIE};
use axum::http::request::Parts;
use base64::Engine;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use polydev_domain::Role;
use polydev_store::{now_ms, Store, StoreError, TokenKind, User};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::error::ApiError;

/// The web UI's session cookie.
pub const SESSION_COOKIE: &str = "polydev_session";

/// A freshly minted bearer token; shown to its owner once, stored hashed.
#[derive(Debug)]
pub struct MintedToken {
    pub token: SecretString,
    pub hash: String,
}

/// Mints a 256-bit random token, `pd_<base64url>`.
pub fn mint_token() -> MintedToken {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let token = format!(
        "pd_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    let hash = token_hash(&token);
    MintedToken {
        token: SecretString::from(token),
        hash,
    }
}

/// Hex SHA-256 of a token: what the store keeps.
pub fn token_hash(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hashes and verifies passwords with Argon2id (the crate's default
/// parameters: 19 MiB, t=2, p=1), on blocking threads, with a bound on how
/// many run at once so a login storm cannot exhaust memory.
#[derive(Debug)]
pub struct PasswordHasherPool {
    permits: Semaphore,
    wait: Duration,
    /// Verified against when the email is unknown, so timing does not tell
    /// whether an account exists.
    dummy_hash: String,
}

impl PasswordHasherPool {
    pub fn new(concurrency: usize, wait: Duration) -> Self {
        let salt = SaltString::generate(&mut OsRng);
        let dummy_hash = Argon2::default()
            .hash_password(b"polydev-dummy-password", &salt)
            .map(|h| h.to_string())
            .unwrap_or_default();
        Self {
            permits: Semaphore::new(concurrency.max(1)),
            wait,
            dummy_hash,
        }
    }

    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        let _permit = tokio::time::timeout(self.wait, self.permits.acquire())
            .await
            .map_err(|_| ApiError::unavailable("the server is busy verifying passwords", 1))?
            .map_err(|_| ApiError::unavailable("shutting down", 1))?;
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| ApiError::internal("password hashing task failed", &e))
    }

    pub async fn hash(&self, password: SecretString) -> Result<String, ApiError> {
        self.run(move || {
            let salt = SaltString::generate(&mut OsRng);
            Argon2::default()
                .hash_password(password.expose_secret().as_bytes(), &salt)
                .map(|h| h.to_string())
        })
        .await?
        .map_err(|e| ApiError::internal("password hashing failed", &e))
    }

    /// True when `password` matches `stored` (or false, after the same work,
    /// when there is no stored hash).
    pub async fn verify(
        &self,
        password: SecretString,
        stored: Option<String>,
    ) -> Result<bool, ApiError> {
        let (hash, real) = match stored {
            Some(h) => (h, true),
            None => (self.dummy_hash.clone(), false),
        };
        self.run(move || {
            let Ok(parsed) = PasswordHash::new(&hash) else {
                return false;
            };
            let ok = Argon2::default()
                .verify_password(password.expose_secret().as_bytes(), &parsed)
                .is_ok();
            ok && real
        })
        .await
    }
}

/// Login attempts allowed per minute, per client IP and per account.
#[derive(Debug)]
pub struct LoginLimiter {
    per_ip: DefaultKeyedRateLimiter<IpAddr>,
    per_account: DefaultKeyedRateLimiter<String>,
}

impl LoginLimiter {
    pub fn new(per_ip_per_minute: u32, per_account_per_minute: u32) -> Self {
        let quota =
            |n: u32| Quota::per_minute(NonZeroU32::new(n.max(1)).unwrap_or(NonZeroU32::MIN));
        Self {
            per_ip: RateLimiter::keyed(quota(per_ip_per_minute)),
            per_account: RateLimiter::keyed(quota(per_account_per_minute)),
        }
    }

    /// Counts one attempt; `Err` with the seconds to wait when over a limit.
    pub fn check(&self, ip: IpAddr, account: &str) -> Result<(), ApiError> {
        let clock = governor::clock::DefaultClock::default();
        let wait = |not_until: governor::NotUntil<_>| {
            not_until
                .wait_time_from(governor::clock::Clock::now(&clock))
                .as_secs()
                + 1
        };
        if let Err(n) = self.per_ip.check_key(&ip) {
            return Err(ApiError::too_many_requests(
                "too many login attempts from this address; wait and try again",
                wait(n),
            ));
        }
        if let Err(n) = self.per_account.check_key(&account.to_owned()) {
            return Err(ApiError::too_many_requests(
                "too many login attempts for this account; wait and try again",
                wait(n),
            ));
        }
        Ok(())
    }

    /// Counts one attempt against an account only (for signed-in actions
    /// such as a password change, where the address says nothing).
    pub fn check_account(&self, account: &str) -> Result<(), ApiError> {
        let clock = governor::clock::DefaultClock::default();
        self.per_account
            .check_key(&account.to_owned())
            .map_err(|n| {
                ApiError::too_many_requests(
                    "too many attempts for this account; wait and try again",
                    n.wait_time_from(governor::clock::Clock::now(&clock))
                        .as_secs()
                        + 1,
                )
            })
    }

    /// Forgets keys whose limits have fully recovered (bounds memory).
    pub fn sweep(&self) {
        self.per_ip.retain_recent();
        self.per_account.retain_recent();
    }
}

/// Sign-ups allowed per hour, per client address.
#[derive(Debug)]
pub struct SignupLimiter {
    per_ip: DefaultKeyedRateLimiter<IpAddr>,
}

impl SignupLimiter {
    pub fn new(per_hour: u32) -> Self {
        let n = NonZeroU32::new(per_hour.max(1)).unwrap_or(NonZeroU32::MIN);
        Self {
            per_ip: RateLimiter::keyed(Quota::per_hour(n)),
        }
    }

    /// Counts one sign-up; `Err` (429 with the wait) when over the limit.
    /// IPv6 addresses count per /64 (what one subscriber usually holds).
    pub fn check(&self, ip: IpAddr) -> Result<(), ApiError> {
        let key = match ip {
            IpAddr::V6(v6) => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
            v4 => v4,
        };
        let clock = governor::clock::DefaultClock::default();
        self.per_ip.check_key(&key).map_err(|n| {
            ApiError::too_many_requests(
                "too many sign-ups from this address; wait and try again",
                n.wait_time_from(governor::clock::Clock::now(&clock))
                    .as_secs()
                    + 1,
            )
        })
    }

    pub fn sweep(&self) {
        self.per_ip.retain_recent();
    }
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Principal {
    pub user: User,
    pub token_kind: TokenKind,
    /// Hash of the token presented, so logout can revoke exactly it.
    pub token_hash: String,
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        self.user.role == Role::Admin
    }
}

/// The token a request presents: `Authorization: Bearer …`, else the
/// session cookie.
pub fn presented_token(parts: &Parts) -> Option<String> {
    if let Some(value) = parts
        .headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let (scheme, token) = value.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().to_owned())
            .filter(|t| !t.is_empty());
    }
    parts
        .headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value.to_owned())
        .filter(|t| !t.is_empty())
}

/// The client's address as seen by this server.
///
/// When the peer is a trusted proxy (e.g. the nginx in front), the client is
/// the right-most `X-Forwarded-For` address that is not itself a trusted
/// proxy; anything a client wrote further left is not believed. With no
/// trusted proxies configured the header is ignored.
pub fn client_ip(parts: &Parts, trusted: &[ipnet::IpNet]) -> IpAddr {
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        if parts.headers.contains_key("x-forwarded-for") {
            static WARNED: std::sync::atomic::AtomicBool =
                std::sync::atomic::AtomicBool::new(false);
            if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(peer = %peer, "requests carry X-Forwarded-For from an address not in --trusted-proxies: the header is ignored and every client of that proxy counts as one address for the login limits; add the proxy to --trusted-proxies");
            }
        }
        return peer;
    }
    let forwarded: Vec<IpAddr> = parts
        .headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|a| a.trim().parse::<IpAddr>())
        .collect::<Result<_, _>>()
        .unwrap_or_default();
    forwarded
        .into_iter()
        .rev()
        .find(|ip| !is_trusted(ip))
        .unwrap_or(peer)
}

async fn authenticate(parts: &mut Parts, store: &Store) -> Result<Principal, ApiError> {
    if let Some(p) = parts.extensions.get::<Principal>() {
        return Ok(p.clone());
    }
    let token = presented_token(parts).ok_or_else(ApiError::unauthorized)?;
    let hash = token_hash(&token);
    let owner = match store.token_owner(&hash, now_ms()).await {
        Ok(owner) => owner,
        Err(StoreError::NotFound) => return Err(ApiError::unauthorized()),
        Err(e) => return Err(e.into()),
    };
    let principal = Principal {
        user: owner.user,
        token_kind: owner.kind,
        token_hash: hash,
    };
    tracing::Span::current().record("user_id", tracing::field::display(principal.user.id));
    parts.extensions.insert(principal.clone());
    Ok(principal)
}

/// Extractor: any signed-in user (401 otherwise).
#[derive(Debug, Clone)]
pub struct CurrentUser(pub Principal);

/// Works on any router state the store can be taken from (`FromRef`), so
/// this module needs nothing of the API's state.
impl<S> FromRequestParts<S> for CurrentUser
where
    S: Send + Sync,
    Store: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        authenticate(parts, &Store::from_ref(state))
            .await
            .map(CurrentUser)
    }
}

/// Extractor: an admin (401 when not signed in, 403 when not an admin).
#[derive(Debug, Clone)]
pub struct AdminUser(pub Principal);

impl<S> FromRequestParts<S> for AdminUser
where
    S: Send + Sync,
    Store: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let principal = authenticate(parts, &Store::from_ref(state)).await?;
        if !principal.is_admin() {
            return Err(ApiError::forbidden("this needs the admin role"));
        }
        Ok(AdminUser(principal))
    }
}

/// Shared, cheap handles for the auth routes.
#[derive(Debug, Clone)]
pub struct AuthServices {
    pub hasher: Arc<PasswordHasherPool>,
    pub limiter: Arc<LoginLimiter>,
    pub signups: Arc<SignupLimiter>,
}

/// Non-admins may only name themselves; checked before existence so the
/// answer does not reveal whether another account exists.
pub(crate) fn ensure_self_or_admin(
    principal: &Principal,
    id: polydev_domain::UserId,
) -> crate::error::ApiResult<()> {
    if principal.user.id == id || principal.is_admin() {
        Ok(())
    } else {
        Err(ApiError::forbidden("you may only act on your own account"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_prefixed_and_hash_stably() {
        let a = mint_token();
        let b = mint_token();
        assert!(a.token.expose_secret().starts_with("pd_"));
        assert_ne!(a.token.expose_secret(), b.token.expose_secret());
        assert_eq!(a.hash, token_hash(a.token.expose_secret()));
        assert_eq!(a.hash.len(), 64);
        assert!(!format!("{a:?}").contains(a.token.expose_secret()));
    }

    fn parts(headers: &[(&str, &str)]) -> Parts {
        let mut req = axum::http::Request::builder();
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.body(()).expect("request").into_parts().0
    }

    #[test]
    fn bearer_header_wins_over_cookie() {
        let p = parts(&[
            ("authorization", "Bearer abc"),
            ("cookie", "polydev_session=def"),
        ]);
        assert_eq!(presented_token(&p).as_deref(), Some("abc"));
        let p = parts(&[("cookie", "theme=dark; polydev_session=def")]);
        assert_eq!(presented_token(&p).as_deref(), Some("def"));
        let p = parts(&[("authorization", "Basic abc")]);
        assert_eq!(presented_token(&p), None);
        assert_eq!(presented_token(&parts(&[])), None);
    }

    #[tokio::test]
    async fn passwords_verify_and_unknown_accounts_never_match() {
        let pool = PasswordHasherPool::new(2, Duration::from_secs(5));
        let hash = pool
            .hash(SecretString::from("correct horse"))
            .await
            .unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(pool
            .verify(SecretString::from("correct horse"), Some(hash.clone()))
            .await
            .unwrap());
        assert!(!pool
            .verify(SecretString::from("wrong horse"), Some(hash))
            .await
            .unwrap());
        assert!(!pool
            .verify(SecretString::from("polydev-dummy-password"), None)
            .await
            .unwrap());
    }

    #[test]
    fn forwarded_addresses_count_only_from_trusted_proxies() {
        let with = |peer: [u8; 4], xff: &str| {
            let mut p = parts(&[("x-forwarded-for", xff)]);
            p.extensions
                .insert(ConnectInfo(SocketAddr::from((peer, 1234))));
            p
        };
        let trusted: Vec<ipnet::IpNet> = vec![
            "127.0.0.1/32".parse().unwrap(),
            "10.0.0.0/8".parse().unwrap(),
        ];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // From the proxy: the right-most address that is not a proxy.
        assert_eq!(
            client_ip(&with([127, 0, 0, 1], "203.0.113.9"), &trusted),
            ip("203.0.113.9")
        );
        assert_eq!(
            client_ip(
                &with([127, 0, 0, 1], "6.6.6.6, 203.0.113.9, 10.1.1.1"),
                &trusted
            ),
            ip("203.0.113.9")
        );
        // Straight from a client, or with no proxies configured: the header is ignored.
        assert_eq!(
            client_ip(&with([198, 51, 100, 7], "203.0.113.9"), &trusted),
            ip("198.51.100.7")
        );
        assert_eq!(
            client_ip(&with([127, 0, 0, 1], "203.0.113.9"), &[]),
            ip("127.0.0.1")
        );
        // Garbage in the header: the peer.
        assert_eq!(
            client_ip(&with([127, 0, 0, 1], "not an ip"), &trusted),
            ip("127.0.0.1")
        );
    }

    #[test]
    fn sign_ups_count_per_address_and_per_ipv6_64() {
        let limiter = SignupLimiter::new(2);
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(limiter.check(v6("2001:db8:1:2::1")).is_ok());
        assert!(limiter.check(v6("2001:db8:1:2::ffff")).is_ok());
        assert!(
            limiter.check(v6("2001:db8:1:2:abcd::9")).is_err(),
            "same /64"
        );
        assert!(limiter.check(v6("2001:db8:1:3::1")).is_ok());
        assert!(limiter.check(IpAddr::from([198, 51, 100, 1])).is_ok());
    }

    #[test]
    fn login_limits_apply_per_ip_and_per_account() {
        let limiter = LoginLimiter::new(3, 2);
        let ip = IpAddr::from([127, 0, 0, 1]);
        assert!(limiter.check(ip, "a@example.com").is_ok());
        assert!(limiter.check(ip, "a@example.com").is_ok());
        let err = limiter.check(ip, "a@example.com").unwrap_err();
        assert_eq!(err.status, axum::http::StatusCode::TOO_MANY_REQUESTS);
        assert!(err.retry_after.unwrap() >= 1);
        // The IP has used its three attempts, whatever the account.
        assert!(limiter.check(ip, "b@example.com").is_err());
        assert!(limiter
            .check(IpAddr::from([127, 0, 0, 2]), "b@example.com")
            .is_ok());
    }
}
