//! Password → master key. Parameters live with the user (upgradable); the
//! salt is random per user.

use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroizing;

use crate::keys::MasterKey;
use crate::VaultError;

/// The floor below which a PBKDF2 parameter set is refused (a downgrade).
pub const MIN_PBKDF2_ITERATIONS: u32 = 600_000;
/// The Argon2id floor (OWASP's smallest recommended set).
pub const MIN_ARGON2_MEMORY_KIB: u32 = 19 * 1024;
pub const MIN_ARGON2_ITERATIONS: u32 = 2;

/// Which slow KDF turns the password into the master key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KdfParams {
    /// PBKDF2-HMAC-SHA256: what every browser's Web Crypto has.
    Pbkdf2Sha256 { iterations: u32 },
    /// Argon2id, where the client has it.
    Argon2id {
        memory_kib: u32,
        iterations: u32,
        parallelism: u32,
    },
}

impl Default for KdfParams {
    fn default() -> Self {
        KdfParams::Pbkdf2Sha256 {
            iterations: MIN_PBKDF2_ITERATIONS,
        }
    }
}

impl KdfParams {
    /// The stored text form: `pbkdf2-sha256:600000` or `argon2id:19456:2:1`.
    pub fn to_text(&self) -> String {
        match *self {
            KdfParams::Pbkdf2Sha256 { iterations } => format!("pbkdf2-sha256:{iterations}"),
            KdfParams::Argon2id {
                memory_kib,
                iterations,
                parallelism,
            } => {
                format!("argon2id:{memory_kib}:{iterations}:{parallelism}")
            }
        }
    }

    /// Parses `to_text`'s form.
    pub fn from_text(text: &str) -> Option<Self> {
        let parts: Vec<&str> = text.split(':').collect();
        match parts.as_slice() {
            ["pbkdf2-sha256", i] => Some(KdfParams::Pbkdf2Sha256 {
                iterations: i.parse().ok()?,
            }),
            ["argon2id", m, t, p] => Some(KdfParams::Argon2id {
                memory_kib: m.parse().ok()?,
                iterations: t.parse().ok()?,
                parallelism: p.parse().ok()?,
            }),
            _ => None,
        }
    }

    /// Refuses parameter sets weaker than the floor.
    pub fn check(&self) -> Result<(), VaultError> {
        match *self {
            KdfParams::Pbkdf2Sha256 { iterations } if iterations < MIN_PBKDF2_ITERATIONS => Err(VaultError::WeakKdf(
                format!("PBKDF2 with {iterations} iterations (minimum {MIN_PBKDF2_ITERATIONS})"),
            )),
            KdfParams::Argon2id { memory_kib, iterations, parallelism }
                if memory_kib < MIN_ARGON2_MEMORY_KIB || iterations < MIN_ARGON2_ITERATIONS || parallelism == 0 =>
            {
                Err(VaultError::WeakKdf(format!(
                    "Argon2id m={memory_kib} KiB t={iterations} p={parallelism} (minimum m=19456 t=2 p=1)"
                )))
            }
            _ => Ok(()),
        }
    }
}

/// Parameters plus the user's salt: everything needed to re-derive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KdfSpec {
    pub params: KdfParams,
    pub salt: [u8; 16],
}

impl KdfSpec {
    /// Default parameters with a fresh random salt (at sign-up).
    pub fn generate() -> Self {
        let mut salt = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut salt);
        Self {
            params: KdfParams::default(),
            salt,
        }
    }

    /// Runs the slow KDF. Refuses weak parameters.
    pub fn derive(&self, password: &SecretString) -> Result<MasterKey, VaultError> {
        self.params.check()?;
        let mut out = Zeroizing::new([0u8; 32]);
        let pw = password.expose_secret().as_bytes();
        match self.params {
            KdfParams::Pbkdf2Sha256 { iterations } => {
                pbkdf2::pbkdf2_hmac::<sha2::Sha256>(pw, &self.salt, iterations, out.as_mut());
            }
            KdfParams::Argon2id {
                memory_kib,
                iterations,
                parallelism,
            } => {
                let params = argon2::Params::new(memory_kib, iterations, parallelism, Some(32))
                    .map_err(|e| VaultError::Kdf(e.to_string()))?;
                argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
                    .hash_password_into(pw, &self.salt, out.as_mut())
                    .map_err(|e| VaultError::Kdf(e.to_string()))?;
            }
        }
        Ok(MasterKey::from_bytes(*out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pbkdf2_matches_a_published_vector() {
        // PBKDF2-HMAC-SHA256("password", "salt", 1 iteration, 32 bytes): the
        // widely published vector (RFC 6070's inputs, SHA-256 output).
        let mut out = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<sha2::Sha256>(b"password", b"salt", 1, &mut out);
        assert_eq!(
            hex::encode(out),
            "120fb6cffcf8b32c43e7225256c4f837a86548c92ccc35480805987cb70be17b"
        );
    }

    #[test]
    fn the_text_form_round_trips() {
        for p in [
            KdfParams::default(),
            KdfParams::Argon2id {
                memory_kib: 19456,
                iterations: 2,
                parallelism: 1,
            },
        ] {
            assert_eq!(KdfParams::from_text(&p.to_text()), Some(p));
        }
        assert_eq!(KdfParams::default().to_text(), "pbkdf2-sha256:600000");
        assert_eq!(KdfParams::from_text("scrypt:1"), None);
    }

    #[test]
    fn weak_parameters_are_refused_and_the_default_is_the_floor() {
        let weak = KdfSpec {
            params: KdfParams::Pbkdf2Sha256 { iterations: 1000 },
            salt: [0; 16],
        };
        assert!(matches!(
            weak.derive(&SecretString::from("pw")),
            Err(VaultError::WeakKdf(_))
        ));
        assert!(KdfParams::Argon2id {
            memory_kib: 1024,
            iterations: 2,
            parallelism: 1
        }
        .check()
        .is_err());
        assert_eq!(
            KdfParams::default(),
            KdfParams::Pbkdf2Sha256 {
                iterations: 600_000
            }
        );
    }

    #[test]
    fn the_same_password_and_salt_give_the_same_master_key() {
        let spec = KdfSpec {
            params: KdfParams::Argon2id {
                memory_kib: 19 * 1024,
                iterations: 2,
                parallelism: 1,
            },
            salt: [7; 16],
        };
        let a = spec.derive(&SecretString::from("correct horse")).unwrap();
        let b = spec.derive(&SecretString::from("correct horse")).unwrap();
        let c = spec.derive(&SecretString::from("correct horsE")).unwrap();
        assert_eq!(a.split().1.as_bytes(), b.split().1.as_bytes());
        assert_ne!(a.split().1.as_bytes(), c.split().1.as_bytes());
    }
}
