//! Sign-up and login bodies as a browser makes them (keys derived from
//! the password on the client; docs/VAULT.md).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};

/// What a client sends at sign-up for `email` and `password`, and the
/// enrollment it keeps (its login credential logs in; its keys open the
/// vault).
///
/// # Panics
/// When key derivation fails (it does not for any password).
#[allow(clippy::expect_used)] // a test kit: failing loudly is the point
pub fn signup(email: &str, password: &str) -> (Value, polydev_vault::Enrollment) {
    let user_id = uuid::Uuid::new_v4().to_string();
    let e =
        polydev_vault::Enrollment::new(&secrecy::SecretString::from(password.to_owned()), &user_id)
            .expect("derive keys");
    let body = json!({
        "email": email,
        "userId": user_id,
        "loginCredential": B64.encode(e.login_credential.as_bytes()),
        "vault": {
            "kdf": {"algorithm": "pbkdf2-sha256", "iterations": polydev_vault::MIN_PBKDF2_ITERATIONS},
            "salt": B64.encode(e.spec.salt),
            "wrappedVaultKey": B64.encode(&e.wrapped_vault_key),
            "publicKey": B64.encode(&e.public_key),
            "wrappedPrivateKey": B64.encode(&e.wrapped_private_key),
        },
    });
    (body, e)
}

/// A login body with the credential an enrollment derived.
pub fn login_body(email: &str, e: &polydev_vault::Enrollment) -> Value {
    json!({"email": email, "loginCredential": B64.encode(e.login_credential.as_bytes())})
}

/// A login body with a credential that matches no account.
pub fn wrong_login_body(email: &str) -> Value {
    json!({"email": email, "loginCredential": B64.encode([0x77u8; 32])})
}
