//! Sealing a CLI's credential file to the user's vault inside its
//! sandbox: only the sealed box leaves the sandbox. Login sessions capture
//! with it; runs seal a CLI's (possibly refreshed) login back with it.

use std::time::Duration;

use polydev_domain::{Provider, UserId};
use polydev_sandbox::{Manager, SandboxId};
use polydev_store::{now_ms, Store, StoreError};

/// HPKE `info` of a captured CLI credential sealed to the user; the AAD
/// binds the user, the vault item id (`credential.<provider>`) and the
/// version it is stored as (`ItemContext::sealed_aad`).
pub const LOGIN_CREDENTIAL_PURPOSE: &str = "polydev/login-credential/v2";

/// The vault item a provider's captured credential is stored as.
pub fn credential_item_id(provider: Provider) -> String {
    format!("credential.{}", provider.as_str())
}

/// Has the agent of `sandbox` seal the CLI credential file at `path` to
/// `recipient` (the user's vault public key) — only the sealed box leaves
/// the sandbox — and stores it as the next version of the user's vault item
/// `credential.<provider>`, whose id it returns. Login sessions capture
/// with it; runs seal a CLI's (possibly refreshed) login back with it.
pub async fn seal_credential_to_vault(
    manager: &Manager,
    store: &Store,
    user: UserId,
    recipient: &[u8],
    sandbox: &SandboxId,
    provider: Provider,
    path: &str,
) -> Result<String, String> {
    let item = credential_item_id(provider);
    // Sealed for the exact version it is stored as; a concurrent writer
    // (another run sealing back) makes us seal again for the next one.
    for _ in 0..3 {
        let current = match store.vault_item(user, &item).await {
            Ok(i) => i.version,
            Err(StoreError::NotFound) => 0,
            Err(e) => return Err(format!("cannot read the vault item: {e}")),
        };
        let aad = polydev_vault::ItemContext::new(&user.to_string(), &item, (current + 1) as u64)
            .sealed_aad();
        let mut agent = manager
            .agent(sandbox, Duration::from_secs(5))
            .await
            .map_err(|e| format!("cannot reach the sandbox's agent: {e}"))?;
        let sealed = agent
            .seal_file(path, recipient, LOGIN_CREDENTIAL_PURPOSE, &aad)
            .await
            .map_err(|e| format!("cannot seal the credential: {e}"))?;
        match store
            .put_vault_item(user, &item, current, &sealed, now_ms())
            .await
        {
            Ok(_) => return Ok(item),
            Err(StoreError::Conflict(_)) => continue,
            Err(e) => return Err(format!("cannot store the sealed credential: {e}")),
        }
    }
    Err("the vault item kept changing while it was sealed; try again".into())
}
