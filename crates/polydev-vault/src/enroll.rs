//! Everything a client makes from a password when an account (or its
//! vault) is created: what the server stores, and the keys that stay here.

use secrecy::SecretString;

use crate::{KdfSpec, LoginCredential, SealingKeyPair, VaultError, VaultKey};

/// A new vault for `user_id`: send `login_credential` (base64) and the
/// wrapped material to the server; keep `vault_key` and `sealing` in memory.
#[derive(Debug)]
pub struct Enrollment {
    pub spec: KdfSpec,
    pub login_credential: LoginCredential,
    pub wrapped_vault_key: Vec<u8>,
    pub public_key: Vec<u8>,
    pub wrapped_private_key: Vec<u8>,
    pub vault_key: VaultKey,
    pub sealing: SealingKeyPair,
}

impl Enrollment {
    /// Fresh salt, vault key and sealing key pair for `password`.
    pub fn new(password: &SecretString, user_id: &str) -> Result<Self, VaultError> {
        Self::with_spec(password, user_id, KdfSpec::generate())
    }

    /// As `new`, with given KDF parameters and salt.
    pub fn with_spec(
        password: &SecretString,
        user_id: &str,
        spec: KdfSpec,
    ) -> Result<Self, VaultError> {
        let (wrapping, login_credential) = spec.derive(password)?.split();
        let vault_key = VaultKey::generate();
        let sealing = SealingKeyPair::generate();
        Ok(Self {
            wrapped_vault_key: vault_key.wrap(&wrapping, user_id),
            public_key: sealing.public().to_bytes(),
            wrapped_private_key: sealing.wrap(&vault_key, user_id),
            spec,
            login_credential,
            vault_key,
            sealing,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_enrollment_unlocks_with_its_password_only() {
        let pw = SecretString::from("correct horse");
        let e = Enrollment::new(&pw, "user-1").unwrap();
        let (wrapping, login) = e.spec.derive(&pw).unwrap().split();
        assert_eq!(login.as_bytes(), e.login_credential.as_bytes());
        let key = VaultKey::unwrap(&e.wrapped_vault_key, &wrapping, "user-1").unwrap();
        assert_eq!(key.as_bytes(), e.vault_key.as_bytes());
        let (other, _) = e
            .spec
            .derive(&SecretString::from("wrong horse"))
            .unwrap()
            .split();
        assert!(VaultKey::unwrap(&e.wrapped_vault_key, &other, "user-1").is_err());
    }
}
