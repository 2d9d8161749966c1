//! polydev's zero-knowledge vault: the key hierarchy, the envelope format
//! and sealing. Pure: no IO, no clocks, no global state — everything here
//! runs the same in the `polydev` CLI, in tests, and (ported to Web Crypto,
//! byte for byte) in the browser. `docs/VAULT.md` is the specification.
//!
//! ```text
//! password ──KDF (PBKDF2-SHA256 600k | Argon2id)──▶ master key
//! master key ──HKDF "…key-wrapping"──▶ wrapping key ──wraps──▶ vault key (random)
//! master key ──HKDF "…login"─────────▶ login credential (the server stores argon2id of it)
//! vault key ──AES-256-GCM──▶ items;   vault key ──wraps──▶ sealing private key
//! anyone ──HPKE(P-256, HKDF-SHA256, AES-256-GCM) to the user's public key──▶ sealed box
//! ```
//!
//! Invariants: no key type prints its bytes (`Debug` is redacted) and every
//! key is zeroized on drop; every ciphertext is bound by its AAD to the user,
//! the item and its version, so it cannot be moved or replayed elsewhere.

mod enroll;
mod envelope;
mod kdf;
mod keys;
mod seal;

pub use enroll::Enrollment;
pub use envelope::{ItemContext, Kind, FORMAT_VERSION, MAGIC};
pub use kdf::{
    KdfParams, KdfSpec, MIN_ARGON2_ITERATIONS, MIN_ARGON2_MEMORY_KIB, MIN_PBKDF2_ITERATIONS,
};
pub use keys::{LoginCredential, MasterKey, VaultKey, WrappingKey};
pub use seal::{SealingKeyPair, SealingPublicKey};

/// Why vault data could not be used. Callers branch on these; none of them
/// carries key material or plaintext.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VaultError {
    #[error("data is too short to be a vault envelope")]
    Truncated,
    #[error("data is not a polydev vault envelope")]
    NotAnEnvelope,
    #[error("envelope version {0} is newer than this build understands")]
    UnsupportedVersion(u8),
    #[error("envelope version {0} is older than the oldest accepted")]
    Downgrade(u8),
    #[error("envelope holds a {found:?}, expected a {expected:?}")]
    WrongKind { expected: Kind, found: Kind },
    #[error("cannot decrypt: wrong key, or the data or its context was altered")]
    Undecryptable,
    #[error("key derivation parameters are weaker than allowed: {0}")]
    WeakKdf(String),
    #[error("key derivation failed: {0}")]
    Kdf(String),
    #[error("not a valid P-256 key")]
    BadKey,
}
