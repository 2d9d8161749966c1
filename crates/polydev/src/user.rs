//! `polydev user add`: lets an operator make the first admin.

use std::io::BufRead;

use anyhow::{bail, Context};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use polydev_api::PasswordHasherPool;
use polydev_domain::{Email, PasswordPolicy, Role, UserId};
use polydev_store::{now_ms, NewToken, NewUser, StoreError, TokenKind, VaultKeys};
use polydev_vault::Enrollment;
use secrecy::{ExposeSecret, SecretString};

use crate::cli::UserAddArgs;
use crate::config::StoreConfig;
use crate::serve::open_store;

pub async fn add(config: &StoreConfig, args: &UserAddArgs) -> anyhow::Result<()> {
    let email = Email::parse(&args.email).context("--email")?;
    let id = UserId::new();
    // With a password, the vault is enrolled here, as a browser would at
    // sign-up: the store gets the login credential's hash and wrapped keys.
    let enrollment = if args.password_stdin {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("cannot read the password from standard input")?;
        let password = SecretString::from(line.trim_end_matches(['\r', '\n']).to_owned());
        PasswordPolicy::check(password.expose_secret())?;
        Some(Enrollment::new(&password, &id.to_string())?)
    } else {
        None
    };
    let store = open_store(config).await?;
    let role = if args.admin { Role::Admin } else { Role::User };
    let now = now_ms();
    let created = match &enrollment {
        Some(e) => {
            let hasher = PasswordHasherPool::new(1, std::time::Duration::from_secs(30));
            let credential = SecretString::from(B64.encode(e.login_credential.as_bytes()));
            let hash = hasher
                .hash(credential)
                .await
                .map_err(|e| anyhow::anyhow!(e.message))?;
            let keys = VaultKeys {
                kdf: e.spec.params.to_text(),
                kdf_salt: e.spec.salt.to_vec(),
                wrapped_vault_key: e.wrapped_vault_key.clone(),
                public_key: e.public_key.clone(),
                wrapped_private_key: e.wrapped_private_key.clone(),
                updated_at_ms: now,
            };
            let new = NewUser {
                id,
                email,
                password_hash: Some(hash),
                role,
                created_at_ms: now,
            };
            store.create_user_with_vault(&new, &keys).await
        }
        None => {
            store
                .create_user(&NewUser {
                    id,
                    email,
                    password_hash: None,
                    role,
                    created_at_ms: now,
                })
                .await
        }
    };
    let user = match created {
        Ok(user) => user,
        Err(StoreError::Conflict(_)) => {
            bail!("a user with email {} already exists", args.email.trim())
        }
        Err(e) => return Err(e).context("cannot create the user"),
    };
    let minted = polydev_api::mint_token();
    store
        .create_token(&NewToken {
            user_id: user.id,
            kind: TokenKind::Api,
            token_hash: minted.hash.clone(),
            created_at_ms: now,
            expires_at_ms: None,
        })
        .await
        .context("cannot store the API token")?;
    let out = serde_json::json!({
        "id": user.id,
        "email": user.email,
        "role": user.role,
        "token": minted.token.expose_secret(),
    });
    println!("{out}");
    store.close().await;
    Ok(())
}
