//! The key hierarchy. Every key zeroizes on drop and prints as `[redacted]`.

use std::fmt;

use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::envelope::{self, ItemContext, Kind};
use crate::VaultError;

/// HKDF `info` labels. Changing one changes every derived key: never do.
const INFO_WRAPPING: &[u8] = b"polydev vault v1 key-wrapping";
const INFO_LOGIN: &[u8] = b"polydev vault v1 login";

macro_rules! secret_key {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        pub struct $name(Zeroizing<[u8; 32]>);

        impl $name {
            pub(crate) fn from_bytes(bytes: [u8; 32]) -> Self {
                Self(Zeroizing::new(bytes))
            }

            /// The raw key, for the layer that must hand it to a cipher.
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "([redacted])"))
            }
        }
    };
}

secret_key!(
    /// Derived from the password by the slow KDF; never leaves the client.
    MasterKey
);
secret_key!(
    /// Wraps (encrypts) the vault key; derived from the master key.
    WrappingKey
);
secret_key!(
    /// What the client proves it knows at login. The server keeps only an
    /// Argon2id hash of it, and it decrypts nothing.
    LoginCredential
);
secret_key!(
    /// The random key that encrypts a user's items; stored only wrapped.
    VaultKey
);

fn hkdf32(ikm: &[u8; 32], info: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    Hkdf::<Sha256>::new(None, ikm)
        .expand(info, &mut out)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    out
}

impl MasterKey {
    /// The two independent keys the master key yields.
    pub fn split(&self) -> (WrappingKey, LoginCredential) {
        (
            WrappingKey::from_bytes(hkdf32(&self.0, INFO_WRAPPING)),
            LoginCredential::from_bytes(hkdf32(&self.0, INFO_LOGIN)),
        )
    }
}

impl VaultKey {
    /// A vault key from its raw bytes (a CLI session key); the caller
    /// should wipe its copy.
    pub fn from_raw(bytes: [u8; 32]) -> Self {
        Self::from_bytes(bytes)
    }

    /// A fresh random vault key (at sign-up).
    pub fn generate() -> Self {
        let mut k = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut k);
        Self::from_bytes(k)
    }

    /// The vault key encrypted under `wrapping`, bound to the user.
    pub fn wrap(&self, wrapping: &WrappingKey, user_id: &str) -> Vec<u8> {
        envelope::seal(
            wrapping.as_bytes(),
            Kind::VaultKey,
            &ItemContext::vault_key(user_id),
            self.as_bytes(),
        )
    }

    pub fn unwrap(
        wrapped: &[u8],
        wrapping: &WrappingKey,
        user_id: &str,
    ) -> Result<Self, VaultError> {
        let bytes = envelope::open(
            wrapping.as_bytes(),
            Kind::VaultKey,
            &ItemContext::vault_key(user_id),
            wrapped,
        )?;
        let key: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| VaultError::Undecryptable)?;
        Ok(Self::from_bytes(key))
    }

    /// Encrypts an item's plaintext for its context.
    pub fn seal_item(&self, ctx: &ItemContext, plaintext: &[u8]) -> Vec<u8> {
        envelope::seal(self.as_bytes(), Kind::Item, ctx, plaintext)
    }

    /// Decrypts an item; the context must be the one it was sealed with.
    pub fn open_item(
        &self,
        ctx: &ItemContext,
        envelope: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        envelope::open(self.as_bytes(), Kind::Item, ctx, envelope)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hkdf_sha256_matches_rfc_5869_test_case_1() {
        let ikm = [0x0bu8; 22];
        let salt = hex::decode("000102030405060708090a0b0c").unwrap();
        let info = hex::decode("f0f1f2f3f4f5f6f7f8f9").unwrap();
        let (prk, hk) = Hkdf::<Sha256>::extract(Some(&salt), &ikm);
        assert_eq!(
            hex::encode(prk),
            "077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5"
        );
        let mut okm = [0u8; 42];
        hk.expand(&info, &mut okm).unwrap();
        assert_eq!(
            hex::encode(okm),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
        );
    }

    #[test]
    fn the_split_is_fixed_and_its_halves_differ() {
        // Frozen: a change here would lock every user out of their vault.
        // Values computed independently (Python hmac/hashlib HKDF-SHA256,
        // empty salt) for a master key of 32 bytes 0x42.
        let master = MasterKey::from_bytes([0x42; 32]);
        let (wrapping, login) = master.split();
        assert_eq!(
            hex::encode(wrapping.as_bytes()),
            "7c0f91867e880c5d1974f71fdff27ec444515b3ce8909b02742e90f63b777fa9"
        );
        assert_eq!(
            hex::encode(login.as_bytes()),
            "2194a46124fa2230f19cc969d18796051c2f6db3c7ed0e07a0c26ac6fd90a760"
        );
    }

    #[test]
    fn keys_never_print() {
        let key = VaultKey::from_bytes([0xab; 32]);
        let shown = format!("{key:?} {:?}", MasterKey::from_bytes([0xab; 32]));
        assert!(!shown.contains("171") && !shown.contains("ab"), "{shown}");
        assert_eq!(format!("{key:?}"), "VaultKey([redacted])");
    }

    #[test]
    fn a_wrapped_vault_key_opens_only_with_its_wrapping_key_and_user() {
        let (wrapping, _) = MasterKey::from_bytes([1; 32]).split();
        let (other, _) = MasterKey::from_bytes([2; 32]).split();
        let key = VaultKey::generate();
        let wrapped = key.wrap(&wrapping, "user-a");
        assert_eq!(
            VaultKey::unwrap(&wrapped, &wrapping, "user-a")
                .unwrap()
                .as_bytes(),
            key.as_bytes()
        );
        assert_eq!(
            VaultKey::unwrap(&wrapped, &other, "user-a").unwrap_err(),
            VaultError::Undecryptable
        );
        assert_eq!(
            VaultKey::unwrap(&wrapped, &wrapping, "user-b").unwrap_err(),
            VaultError::Undecryptable
        );
    }
}
