//! `polydev vault …`: the vault's command-line client. All cryptography
//! happens here (through `polydev-vault`); the server sees wrapped keys and
//! envelopes only.

use std::io::{Read, Write};

use anyhow::{bail, Context};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use polydev_vault::{Enrollment, ItemContext, KdfParams, KdfSpec, VaultKey};
use secrecy::SecretString;
use serde_json::{json, Value};

use crate::cli::{ServerArgs, VaultCommand};

struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    fn new(args: &ServerArgs) -> anyhow::Result<Self> {
        Ok(Self {
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(30))
                .build()?,
            base: args.server.trim_end_matches('/').to_owned(),
            token: args.token.clone(),
        })
    }

    /// Sends a request; returns (status, JSON body or Null).
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.base))?;
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    async fn ok(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let (status, value) = self.call(method, path, body).await?;
        if (200..300).contains(&status) {
            return Ok(value);
        }
        let message = value["error"]["message"]
            .as_str()
            .unwrap_or("unexpected answer");
        bail!("the server answered {status}: {message}")
    }

    async fn user_id(&self) -> anyhow::Result<String> {
        let me = self.ok(reqwest::Method::GET, "/api/me", None).await?;
        Ok(me["id"]
            .as_str()
            .context("no user id in /api/me")?
            .to_owned())
    }
}

fn read_password() -> anyhow::Result<SecretString> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("cannot read the password from standard input")?;
    let password = line.trim_end_matches(['\r', '\n']).to_owned();
    if password.chars().count() < 8 {
        bail!("the vault password must be at least 8 characters");
    }
    Ok(SecretString::from(password))
}

fn b64(field: &str, value: &Value) -> anyhow::Result<Vec<u8>> {
    B64.decode(
        value[field]
            .as_str()
            .with_context(|| format!("no {field} in the answer"))?,
    )
    .with_context(|| format!("{field} is not base64"))
}

fn kdf_from(value: &Value) -> anyhow::Result<KdfParams> {
    match value["algorithm"].as_str() {
        Some("pbkdf2-sha256") => Ok(KdfParams::Pbkdf2Sha256 {
            iterations: value["iterations"].as_u64().context("no iterations")? as u32,
        }),
        Some("argon2id") => Ok(KdfParams::Argon2id {
            memory_kib: value["memoryKib"].as_u64().context("no memoryKib")? as u32,
            iterations: value["iterations"].as_u64().context("no iterations")? as u32,
            parallelism: value["parallelism"].as_u64().context("no parallelism")? as u32,
        }),
        other => bail!("unknown KDF {other:?}"),
    }
}

fn kdf_json(params: &KdfParams) -> Value {
    match *params {
        KdfParams::Pbkdf2Sha256 { iterations } => {
            json!({"algorithm": "pbkdf2-sha256", "iterations": iterations})
        }
        KdfParams::Argon2id {
            memory_kib,
            iterations,
            parallelism,
        } => {
            json!({"algorithm": "argon2id", "memoryKib": memory_kib, "iterations": iterations, "parallelism": parallelism})
        }
    }
}

/// The `vault` object of sign-up, `PUT /api/vault/keys` and password change.
fn vault_json(e: &Enrollment) -> Value {
    json!({
        "kdf": kdf_json(&e.spec.params),
        "salt": B64.encode(e.spec.salt),
        "wrappedVaultKey": B64.encode(&e.wrapped_vault_key),
        "publicKey": B64.encode(&e.public_key),
        "wrappedPrivateKey": B64.encode(&e.wrapped_private_key),
    })
}

/// `polydev login`: derives the login credential here and prints a token.
pub async fn login(server: &str, email: &str) -> anyhow::Result<()> {
    let password = read_password()?;
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()?;
    let base = server.trim_end_matches('/');
    let pre: Value = http
        .get(format!("{base}/api/auth/prelogin"))
        .query(&[("email", email)])
        .send()
        .await
        .with_context(|| format!("cannot reach {base}"))?
        .json()
        .await?;
    let salt: [u8; 16] = b64("salt", &pre)?
        .try_into()
        .map_err(|_| anyhow::anyhow!("salt is not 16 bytes"))?;
    let (_, login) = KdfSpec {
        params: kdf_from(&pre["kdf"])?,
        salt,
    }
    .derive(&password)?
    .split();
    let resp = http
        .post(format!("{base}/api/auth/login"))
        .json(&json!({"email": email, "loginCredential": B64.encode(login.as_bytes())}))
        .send()
        .await?;
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!(
            "the server answered {}: {}",
            status.as_u16(),
            body["error"]["message"].as_str().unwrap_or("")
        );
    }
    println!("{}", json!({"token": body["token"], "user": body["user"]}));
    Ok(())
}

fn session_key(session: &str) -> anyhow::Result<VaultKey> {
    let bytes = B64
        .decode(session.trim())
        .context("POLYDEV_VAULT_SESSION is not a session key from `polydev vault unlock`")?;
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("POLYDEV_VAULT_SESSION has the wrong length"))?;
    Ok(VaultKey::from_raw(bytes))
}

pub async fn run(command: VaultCommand) -> anyhow::Result<()> {
    match command {
        VaultCommand::Init(args) => {
            let client = Client::new(&args)?;
            let password = read_password()?;
            let user = client.user_id().await?;
            let e = Enrollment::new(&password, &user)?;
            client
                .ok(
                    reqwest::Method::PUT,
                    "/api/vault/keys",
                    Some(vault_json(&e)),
                )
                .await?;
            eprintln!("vault created; remember the password: it cannot be recovered");
        }
        VaultCommand::Unlock(args) => {
            let client = Client::new(&args)?;
            let password = read_password()?;
            let user = client.user_id().await?;
            let keys = client
                .ok(reqwest::Method::GET, "/api/vault/keys", None)
                .await?;
            let salt: [u8; 16] = b64("salt", &keys)?
                .try_into()
                .map_err(|_| anyhow::anyhow!("salt is not 16 bytes"))?;
            let spec = KdfSpec {
                params: kdf_from(&keys["kdf"])?,
                salt,
            };
            let (wrapping, _login) = spec.derive(&password)?.split();
            let vault_key = VaultKey::unwrap(&b64("wrappedVaultKey", &keys)?, &wrapping, &user)
                .map_err(|_| anyhow::anyhow!("wrong password"))?;
            println!("{}", B64.encode(vault_key.as_bytes()));
        }
        VaultCommand::Put {
            server,
            session,
            id,
        } => {
            let client = Client::new(&server)?;
            let key = session_key(&session)?;
            let user = client.user_id().await?;
            let mut plaintext = zeroize::Zeroizing::new(Vec::new());
            std::io::stdin()
                .read_to_end(&mut plaintext)
                .context("cannot read standard input")?;
            let (status, current) = client
                .call(
                    reqwest::Method::GET,
                    &format!("/api/vault/items/{id}"),
                    None,
                )
                .await?;
            let version = match status {
                200 => current["version"].as_i64().context("no version")?,
                404 => 0,
                other => bail!(
                    "the server answered {other}: {}",
                    current["error"]["message"].as_str().unwrap_or("")
                ),
            };
            let envelope = key.seal_item(
                &ItemContext::new(&user, &id, (version + 1) as u64),
                &plaintext,
            );
            let stored = client
                .ok(
                    reqwest::Method::PUT,
                    &format!("/api/vault/items/{id}"),
                    Some(json!({"version": version, "envelope": B64.encode(envelope)})),
                )
                .await?;
            println!("{}", json!({"id": id, "version": stored["version"]}));
        }
        VaultCommand::Get {
            server,
            session,
            id,
        } => {
            let client = Client::new(&server)?;
            let key = session_key(&session)?;
            let user = client.user_id().await?;
            let item = client
                .ok(
                    reqwest::Method::GET,
                    &format!("/api/vault/items/{id}"),
                    None,
                )
                .await?;
            let version = item["version"].as_i64().context("no version")?;
            let plaintext = key
                .open_item(
                    &ItemContext::new(&user, &id, version as u64),
                    &b64("envelope", &item)?,
                )
                .map_err(|e| anyhow::anyhow!("cannot open item {id}: {e}"))?;
            std::io::stdout().write_all(&plaintext)?;
        }
        VaultCommand::List(args) => {
            let client = Client::new(&args)?;
            let items = client
                .ok(reqwest::Method::GET, "/api/vault/items", None)
                .await?;
            println!("{}", items["items"]);
        }
    }
    Ok(())
}
