//! Vault key material as the API carries it (KDF parameters, salt, wrapped
//! keys) and the login credential: their views and the shape checks made
//! before anything is stored. Sign-up, password change and the vault's
//! own routes use them; the server never holds a key that opens them.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use polydev_store::{now_ms, VaultKeys};
use polydev_vault::{KdfParams, Kind, SealingPublicKey, FORMAT_VERSION, MAGIC};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{ApiError, ApiResult};

pub(crate) use crate::limits::WRAPPED_KEY_LEN;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "algorithm", rename_all = "kebab-case", deny_unknown_fields)]
pub(crate) enum KdfView {
    #[serde(rename = "pbkdf2-sha256")]
    Pbkdf2Sha256 { iterations: u32 },
    #[serde(rename = "argon2id", rename_all = "camelCase")]
    Argon2id {
        memory_kib: u32,
        iterations: u32,
        parallelism: u32,
    },
}

impl From<KdfParams> for KdfView {
    fn from(p: KdfParams) -> Self {
        match p {
            KdfParams::Pbkdf2Sha256 { iterations } => KdfView::Pbkdf2Sha256 { iterations },
            KdfParams::Argon2id {
                memory_kib,
                iterations,
                parallelism,
            } => KdfView::Argon2id {
                memory_kib,
                iterations,
                parallelism,
            },
        }
    }
}

impl KdfView {
    fn params(&self) -> KdfParams {
        match *self {
            KdfView::Pbkdf2Sha256 { iterations } => KdfParams::Pbkdf2Sha256 { iterations },
            KdfView::Argon2id {
                memory_kib,
                iterations,
                parallelism,
            } => KdfParams::Argon2id {
                memory_kib,
                iterations,
                parallelism,
            },
        }
    }

    /// From the stored text form (see `KdfParams::to_text`).
    pub(crate) fn decode(stored: &str) -> Option<Self> {
        KdfParams::from_text(stored).map(Self::from)
    }
}

/// A user's vault key material; binary fields are standard base64.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct VaultKeysView {
    #[schema(schema_with = crate::schema::kdf)]
    pub(crate) kdf: KdfView,
    #[schema(schema_with = crate::schema::salt)]
    pub(crate) salt: String,
    #[schema(schema_with = crate::schema::wrapped_key_2)]
    pub(crate) wrapped_vault_key: String,
    #[schema(schema_with = crate::schema::public_key)]
    pub(crate) public_key: String,
    #[schema(schema_with = crate::schema::wrapped_key_3)]
    pub(crate) wrapped_private_key: String,
}

pub(crate) fn decode_b64(field: &'static str, value: &str) -> ApiResult<Vec<u8>> {
    B64.decode(value.trim()).map_err(|_| {
        ApiError::bad_request("invalid_body", format!("{field} must be standard base64"))
    })
}

/// Checks magic, version and kind of an envelope without opening it.
pub(crate) fn check_envelope(
    field: &'static str,
    bytes: &[u8],
    kind: Kind,
    exact_len: Option<usize>,
) -> ApiResult<()> {
    let kind_byte = match kind {
        Kind::Item => 1,
        Kind::VaultKey => 2,
        Kind::SealingKey => 3,
        Kind::Sealed => 4,
    };
    let shape_ok = bytes.len() >= 3 + 12 + 16
        && bytes[0] == MAGIC
        && bytes[1] == FORMAT_VERSION
        && bytes[2] == kind_byte
        && exact_len.is_none_or(|n| bytes.len() == n);
    if shape_ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "invalid_envelope",
            format!("{field} is not a version-{FORMAT_VERSION} vault envelope of the expected kind and size (see docs/VAULT.md)"),
        ))
    }
}

/// Checks key material's shape (never its content) and converts it for
/// the store.
pub(crate) fn validate_keys(body: &VaultKeysView) -> ApiResult<VaultKeys> {
    body.kdf
        .params()
        .check()
        .map_err(|e| ApiError::bad_request("weak_kdf", e.to_string()))?;
    let salt = decode_b64("salt", &body.salt)?;
    if salt.len() != 16 {
        return Err(ApiError::bad_request(
            "invalid_body",
            "salt must be 16 bytes",
        ));
    }
    let wrapped_vault_key = decode_b64("wrappedVaultKey", &body.wrapped_vault_key)?;
    check_envelope(
        "wrappedVaultKey",
        &wrapped_vault_key,
        Kind::VaultKey,
        Some(WRAPPED_KEY_LEN),
    )?;
    let wrapped_private_key = decode_b64("wrappedPrivateKey", &body.wrapped_private_key)?;
    check_envelope(
        "wrappedPrivateKey",
        &wrapped_private_key,
        Kind::SealingKey,
        Some(WRAPPED_KEY_LEN),
    )?;
    let public_key = decode_b64("publicKey", &body.public_key)?;
    SealingPublicKey::from_bytes(&public_key).map_err(|_| {
        ApiError::bad_request(
            "invalid_public_key",
            "publicKey must be a 65-byte uncompressed P-256 point",
        )
    })?;
    Ok(VaultKeys {
        kdf: body.kdf.params().to_text(),
        kdf_salt: salt,
        wrapped_vault_key,
        public_key,
        wrapped_private_key,
        updated_at_ms: now_ms(),
    })
}

/// Decodes a login credential (base64 of 32 bytes) into its canonical
/// base64 text, which is what the server hashes.
pub(crate) fn login_credential(value: &secrecy::SecretString) -> ApiResult<secrecy::SecretString> {
    use secrecy::ExposeSecret;
    let bytes =
        zeroize::Zeroizing::new(B64.decode(value.expose_secret().trim()).unwrap_or_default());
    if bytes.len() != 32 {
        return Err(ApiError::bad_request(
            "invalid_login_credential",
            "loginCredential must be the base64 of the 32-byte login credential derived on the client (see docs/VAULT.md)",
        ));
    }
    Ok(secrecy::SecretString::from(B64.encode(&*bytes)))
}
