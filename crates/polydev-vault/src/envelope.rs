//! The versioned envelope (AES-256-GCM), byte by byte:
//!
//! ```text
//! offset  size  field
//! 0       1     magic 0x50 ('P')
//! 1       1     format version (1)
//! 2       1     kind: 1 item, 2 wrapped vault key, 3 wrapped sealing private key
//! 3       12    nonce (random)
//! 15      n+16  AES-256-GCM ciphertext of the n plaintext bytes, then the tag
//! ```
//!
//! The AAD is `"polydev-vault" || version || kind || u32be len || user id ||
//! u32be len || item id || u64be item version`, so an envelope opens only
//! for the user, item and version it was made for.

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use zeroize::Zeroizing;

use crate::VaultError;

pub const MAGIC: u8 = b'P';
pub const FORMAT_VERSION: u8 = 1;
/// The oldest version still accepted; older ones are refused as downgrades.
const OLDEST_ACCEPTED: u8 = 1;
const HEADER: usize = 3 + 12;
const TAG: usize = 16;

/// What an envelope holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Item,
    VaultKey,
    SealingKey,
    /// An HPKE sealed box (see `seal.rs`; same header, different body).
    Sealed,
}

impl Kind {
    pub(crate) fn byte(self) -> u8 {
        match self {
            Kind::Item => 1,
            Kind::VaultKey => 2,
            Kind::SealingKey => 3,
            Kind::Sealed => 4,
        }
    }

    pub(crate) fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(Kind::Item),
            2 => Some(Kind::VaultKey),
            3 => Some(Kind::SealingKey),
            4 => Some(Kind::Sealed),
            _ => None,
        }
    }
}

/// Where a ciphertext belongs: bound into its AAD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemContext {
    pub user_id: String,
    pub item_id: String,
    pub version: u64,
}

impl ItemContext {
    pub fn new(user_id: &str, item_id: &str, version: u64) -> Self {
        Self {
            user_id: user_id.to_owned(),
            item_id: item_id.to_owned(),
            version,
        }
    }

    /// The AAD of a vault item stored as a sealed box (kind 4): a CLI
    /// credential sealed inside a sandbox to the user. Bound to the user,
    /// the item and the version it is stored as, like every other item.
    pub fn sealed_aad(&self) -> Vec<u8> {
        self.aad(Kind::Sealed)
    }

    pub(crate) fn vault_key(user_id: &str) -> Self {
        Self::new(user_id, "vault-key", 0)
    }

    pub(crate) fn aad(&self, kind: Kind) -> Vec<u8> {
        let mut aad = Vec::with_capacity(32 + self.user_id.len() + self.item_id.len());
        aad.extend_from_slice(b"polydev-vault");
        aad.push(FORMAT_VERSION);
        aad.push(kind.byte());
        for part in [self.user_id.as_bytes(), self.item_id.as_bytes()] {
            aad.extend_from_slice(&(part.len() as u32).to_be_bytes());
            aad.extend_from_slice(part);
        }
        aad.extend_from_slice(&self.version.to_be_bytes());
        aad
    }
}

/// Checks magic, version and kind; returns the body after the 3-byte head.
pub(crate) fn check_header(
    data: &[u8],
    expected: Kind,
    min_len: usize,
) -> Result<&[u8], VaultError> {
    if data.len() < 3 {
        return Err(VaultError::Truncated);
    }
    if data[0] != MAGIC {
        return Err(VaultError::NotAnEnvelope);
    }
    match data[1] {
        v if v > FORMAT_VERSION => return Err(VaultError::UnsupportedVersion(v)),
        v if v < OLDEST_ACCEPTED => return Err(VaultError::Downgrade(v)),
        _ => {}
    }
    let found = Kind::from_byte(data[2]).ok_or(VaultError::NotAnEnvelope)?;
    if found != expected {
        return Err(VaultError::WrongKind { expected, found });
    }
    if data.len() < min_len {
        return Err(VaultError::Truncated);
    }
    Ok(&data[3..])
}

pub(crate) fn seal(key: &[u8; 32], kind: Kind, ctx: &ItemContext, plaintext: &[u8]) -> Vec<u8> {
    let mut nonce = [0u8; 12];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut nonce);
    seal_with_nonce(key, kind, ctx, plaintext, nonce)
}

pub(crate) fn seal_with_nonce(
    key: &[u8; 32],
    kind: Kind,
    ctx: &ItemContext,
    plaintext: &[u8],
    nonce: [u8; 12],
) -> Vec<u8> {
    let cipher = Aes256Gcm::new(key.into());
    let aad = ctx.aad(kind);
    let ct = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad: &aad,
            },
        )
        .expect("AES-GCM encryption of an in-memory buffer cannot fail");
    let mut out = Vec::with_capacity(HEADER + ct.len());
    out.extend_from_slice(&[MAGIC, FORMAT_VERSION, kind.byte()]);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    out
}

pub(crate) fn open(
    key: &[u8; 32],
    kind: Kind,
    ctx: &ItemContext,
    data: &[u8],
) -> Result<Zeroizing<Vec<u8>>, VaultError> {
    let body = check_header(data, kind, HEADER + TAG)?;
    let (nonce, ct) = body.split_at(12);
    let cipher = Aes256Gcm::new(key.into());
    let aad = ctx.aad(kind);
    cipher
        .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad: &aad })
        .map(Zeroizing::new)
        .map_err(|_| VaultError::Undecryptable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::VaultKey;

    #[test]
    fn the_layout_is_as_documented() {
        let ctx = ItemContext::new("u", "i", 7);
        let env = seal_with_nonce(&[9; 32], Kind::Item, &ctx, b"hello", [3; 12]);
        assert_eq!(&env[..3], &[b'P', 1, 1]);
        assert_eq!(&env[3..15], &[3; 12]);
        assert_eq!(env.len(), 15 + 5 + 16);
        let mut aad = b"polydev-vault".to_vec();
        aad.extend_from_slice(&[
            1, 1, 0, 0, 0, 1, b'u', 0, 0, 0, 1, b'i', 0, 0, 0, 0, 0, 0, 0, 7,
        ]);
        assert_eq!(ctx.aad(Kind::Item), aad);
        assert_eq!(
            open(&[9; 32], Kind::Item, &ctx, &env).unwrap().as_slice(),
            b"hello"
        );
    }

    #[test]
    fn tampering_truncation_wrong_keys_contexts_kinds_and_versions_are_refused() {
        let key = VaultKey::generate();
        let ctx = ItemContext::new("user-1", "item-1", 3);
        let env = key.seal_item(&ctx, b"canary-credential");
        assert_eq!(
            key.open_item(&ctx, &env).unwrap().as_slice(),
            b"canary-credential"
        );

        for i in [3, 10, 15, env.len() - 1] {
            let mut bad = env.clone();
            bad[i] ^= 1;
            assert_eq!(
                key.open_item(&ctx, &bad).unwrap_err(),
                VaultError::Undecryptable,
                "byte {i}"
            );
        }
        assert_eq!(
            key.open_item(&ctx, &env[..20]).unwrap_err(),
            VaultError::Truncated
        );
        assert_eq!(
            key.open_item(&ctx, &env[..2]).unwrap_err(),
            VaultError::Truncated
        );
        assert_eq!(key.open_item(&ctx, b"").unwrap_err(), VaultError::Truncated);
        assert_eq!(
            VaultKey::generate().open_item(&ctx, &env).unwrap_err(),
            VaultError::Undecryptable
        );
        for other in [
            ItemContext::new("user-2", "item-1", 3),
            ItemContext::new("user-1", "item-2", 3),
            ItemContext::new("user-1", "item-1", 4),
        ] {
            assert_eq!(
                key.open_item(&other, &env).unwrap_err(),
                VaultError::Undecryptable,
                "{other:?}"
            );
        }
        let mut newer = env.clone();
        newer[1] = 2;
        assert_eq!(
            key.open_item(&ctx, &newer).unwrap_err(),
            VaultError::UnsupportedVersion(2)
        );
        let mut older = env.clone();
        older[1] = 0;
        assert_eq!(
            key.open_item(&ctx, &older).unwrap_err(),
            VaultError::Downgrade(0)
        );
        let mut kind = env.clone();
        kind[2] = 2;
        assert_eq!(
            key.open_item(&ctx, &kind).unwrap_err(),
            VaultError::WrongKind {
                expected: Kind::Item,
                found: Kind::VaultKey
            }
        );
        let mut magic = env;
        magic[0] = b'X';
        assert_eq!(
            key.open_item(&ctx, &magic).unwrap_err(),
            VaultError::NotAnEnvelope
        );
    }

    #[test]
    fn nonces_are_fresh_per_seal() {
        let key = VaultKey::generate();
        let ctx = ItemContext::new("u", "i", 1);
        assert_ne!(
            key.seal_item(&ctx, b"x")[3..15],
            key.seal_item(&ctx, b"x")[3..15]
        );
    }
}
