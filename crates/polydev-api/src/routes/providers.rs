//! `GET /api/providers`: each CLI as the provider registry knows it, with
//! what this installation offers the caller (credential kinds, sign-in
//! modes) and why.

use axum::extract::State;
use axum::Json;
use polydev_domain::Provider;
use polydev_sessions::providers::{self, SubscriptionLogin};
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::CurrentUser;
use crate::error::{ApiResult, ErrorBody};
use crate::state::AppState;

/// One provider's CLI and what this installation offers you with it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ProviderEntry {
    /// `claude_code`, `codex`, `gemini_cli`, `opencode`, `copilot`.
    id: &'static str,
    name: &'static str,
    /// Its API-key credential in a few words (a field's label).
    key_label: &'static str,
    /// What that credential is, for the person pasting one.
    key_hint: &'static str,
    /// Whether the CLI has a subscription sign-in polydev can run at all
    /// (whatever this installation's policy).
    has_sign_in: bool,
    /// The CLI's npm package.
    package: &'static str,
    /// The version this installation's images install.
    version: Option<String>,
    /// What you may hand a run: `api_key` always; `cloud_key` where the
    /// CLI runs on a cloud account (Claude Code on Amazon Bedrock, Gemini
    /// CLI on Vertex AI); `cli_login` (a login session's capture) and
    /// `subscription_token` (Claude Code's `setup-token`) where the
    /// subscription sign-in is offered to you.
    credential_kinds: Vec<&'static str>,
    /// Its `cloud_key` credential in a few words, if it takes one.
    cloud_key_label: Option<&'static str>,
    /// What its `cloud_key` credential is, if it takes one.
    cloud_key_hint: Option<&'static str>,
    /// How a `cloud_key` begins where that tells it from an API key.
    cloud_key_prefixes: &'static [&'static str],
    /// The login-session modes you may start (`browser`, `code`); none
    /// when the subscription sign-in is not offered to you, or login
    /// sessions are off here.
    sign_in_modes: Vec<&'static str>,
    policy: SignInPolicyView,
}

/// The installation's subscription sign-in policy for one provider.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SignInPolicyView {
    subscription_login: SubscriptionLogin,
    /// Whether the subscription sign-in is offered to you.
    offered_to_you: bool,
    /// What the vendor's terms say, in one line.
    reason: &'static str,
    /// The vendor's page that says so.
    terms: &'static str,
}

/// The providers: versions, credential kinds, sign-in modes and the policy
/// with its reason, as they apply to you.
#[utoipa::path(get, operation_id = "list_providers", path = "/api/providers", tag = "auth", security(("bearer" = [])),
    responses((status = 200, body = [ProviderEntry]), (status = 401, body = ErrorBody)))]
pub(crate) async fn list(
    State(state): State<AppState>,
    CurrentUser(principal): CurrentUser,
) -> ApiResult<Json<Vec<ProviderEntry>>> {
    let admin = principal.is_admin();
    let modes = state.logins.as_ref().map(|l| l.modes()).unwrap_or_default();
    let views = Provider::ALL
        .iter()
        .map(|&p| {
            let info = providers::info(p);
            let policy = state.config.sign_in.of(p);
            let offered = policy.allows(admin);
            let mut kinds = vec!["api_key"];
            if info.cloud.is_some() {
                kinds.push("cloud_key");
            }
            if offered && info.sign_in {
                kinds.push("cli_login");
            }
            if offered && info.token.is_some() {
                kinds.push("subscription_token");
            }
            ProviderEntry {
                id: p.as_str(),
                name: info.name,
                key_label: info.key_label,
                key_hint: info.key_hint,
                has_sign_in: info.sign_in,
                package: info.package,
                version: providers::pinned_version(p),
                credential_kinds: kinds,
                cloud_key_label: info.cloud.map(|c| c.label),
                cloud_key_hint: info.cloud.map(|c| c.hint),
                cloud_key_prefixes: info.cloud.map(|c| c.prefixes).unwrap_or_default(),
                sign_in_modes: if offered {
                    modes.get(p.as_str()).cloned().unwrap_or_default()
                } else {
                    Vec::new()
                },
                policy: SignInPolicyView {
                    subscription_login: policy,
                    offered_to_you: offered,
                    reason: info.terms.reason,
                    terms: info.terms.source,
                },
            }
        })
        .collect();
    Ok(Json(views))
}
