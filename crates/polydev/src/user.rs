//! `polydev user add`: lets an operator make the first admin.

use std::io::BufRead;

use anyhow::{bail, Context};
use polydev_api::PasswordHasherPool;
use polydev_domain::{Email, PasswordPolicy, Role, UserId};
use polydev_store::{now_ms, NewToken, NewUser, StoreError, TokenKind};
use secrecy::{ExposeSecret, SecretString};

use crate::cli::UserAddArgs;
use crate::config::StoreConfig;
use crate::serve::open_store;

pub async fn add(config: &StoreConfig, args: &UserAddArgs) -> anyhow::Result<()> {
    let email = Email::parse(&args.email).context("--email")?;
    let password_hash = if args.password_stdin {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("cannot read the password from standard input")?;
        let password = SecretString::from(line.trim_end_matches(['\r', '\n']).to_owned());
        PasswordPolicy::check(password.expose_secret())?;
        let hasher = PasswordHasherPool::new(1, std::time::Duration::from_secs(30));
        Some(
            hasher
                .hash(password)
                .await
                .map_err(|e| anyhow::anyhow!(e.message))?,
        )
    } else {
        None
    };
    let store = open_store(config).await?;
    let role = if args.admin { Role::Admin } else { Role::User };
    let now = now_ms();
    let user = match store
        .create_user(&NewUser {
            id: UserId::new(),
            email,
            password_hash,
            role,
            created_at_ms: now,
        })
        .await
    {
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
